"""The Fast R-CNN detection network on top of the proposals (section 3.2 of Faster R-CNN,
sections 2.1-2.3 of Fast R-CNN).

    proposals (P, 4) + ground truth
      -> proposal targets: sample R RoIs (25% foreground), label them, encode per-class t*
      -> RoI pool or RoI Align on the shared feature map     (R, C, ph, pw)
      -> fc -> ReLU -> fc -> ReLU                             (R, hidden)
      -> cls_score (C+1 logits, softmax)  and  bbox_pred (4 (C+1) class-specific t)
      -> loss: softmax cross entropy + smooth L1 on the true class's 4 outputs (Fast R-CNN eq. 1)

At test time the same head scores every proposal; `postprocess_detections` decodes the boxes of
each class, drops low scores and runs NMS within each class.
"""
import numpy as np

from . import _checks, ops
from .box_coding import _decode, _encode, check_weights
from .boxes import _clip_boxes, _remove_small_boxes, check_image_shape
from .losses import _smooth_l1, _softmax_cross_entropy, softmax
from .nms import check_iou_threshold
from . import nn

HEAD_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # eq. (2) times these = dividing by stds (0.1, 0.1, 0.2, 0.2)


def _sample(indices, count, rng):
    """`count` of `indices` drawn without replacement (all of them if there are fewer)."""
    if len(indices) > count:
        indices = rng.choice(indices, size=count, replace=False)
    return np.asarray(indices, np.int64)


def proposal_targets(proposals, gt_boxes, gt_labels, num_classes, batch_size=128,
                     fg_fraction=0.25, fg_iou=0.5, bg_iou_hi=0.5, bg_iou_lo=0.1,
                     weights=HEAD_BOX_WEIGHTS, rng=None, backend=None):
    """Sample the RoIs the detection network trains on, for one image (Fast R-CNN 2.3).

    The ground-truth boxes are added to the proposals (so that every object has a perfect RoI
    early in training), then up to `fg_fraction * batch_size` foreground RoIs (IoU >= fg_iou
    with a ground truth box) and background RoIs (IoU in [bg_iou_lo, bg_iou_hi)) fill the batch.

    Args:
        proposals: (P, 4) RPN proposals, xyxy.
        gt_boxes: (G, 4) ground truth, xyxy.  gt_labels: (G,) int64 in 1..num_classes.
        num_classes: C, object classes (background 0 is extra).
        batch_size, fg_fraction, fg_iou, bg_iou_hi, bg_iou_lo: the sampling (128, 0.25, 0.5, [0.1, 0.5)).
        weights: box-coding weights of the head's t (10, 10, 5, 5).
        rng: a np.random.Generator, an int seed, or None (fresh randomness) for the sampling;
            the same seed gives the same RoIs.  backend: passed to ops.box_iou.
    Returns:
        rois: (R, 4) float32, foreground first.
        labels: (R,) int64 in 0..C (0 = background).
        bbox_targets: (R, 4 (C+1)) float32; row r holds t* in columns 4 l .. 4 l + 3 of its class l.
        bbox_weights: (R, 4 (C+1)) float32; 1 where bbox_targets counts in the loss, else 0.
    """
    proposals = _checks.as_boxes(proposals, "proposals")                  # (P, 4)
    gt_boxes = _checks.as_boxes(gt_boxes, "gt_boxes")                     # (G, 4)
    num_classes = _checks.whole_number(num_classes, "num_classes")
    gt_labels = _checks.as_labels(gt_labels, "gt_labels", 1, num_classes, size=len(gt_boxes))  # (G,)
    batch_size = _checks.whole_number(batch_size, "batch_size")
    fg_fraction = _checks.unit_interval(fg_fraction, "fg_fraction")
    fg_iou = _checks.unit_interval(fg_iou, "fg_iou")
    if fg_iou == 0:                        # every RoI, even one of zero size, would be foreground
        raise ValueError("fg_iou: expected a number in (0, 1], got 0.0")
    bg_iou_hi = _checks.unit_interval(bg_iou_hi, "bg_iou_hi")
    bg_iou_lo = _checks.unit_interval(bg_iou_lo, "bg_iou_lo")
    return _proposal_targets(proposals, gt_boxes, gt_labels, num_classes, batch_size,
                             fg_fraction, fg_iou, bg_iou_hi, bg_iou_lo, check_weights(weights),
                             np.random.default_rng(rng), backend)   # a Generator passes through


def _proposal_targets(proposals, gt_boxes, gt_labels, num_classes, batch_size, fg_fraction,
                      fg_iou, bg_iou_hi, bg_iou_lo, weights, rng, backend=None):
    """proposal_targets of checked inputs (rng a Generator)."""
    all_rois = np.concatenate([proposals, gt_boxes], axis=0)              # (P + G, 4)
    if len(gt_boxes):
        iou = ops._box_iou(all_rois, gt_boxes, backend)                   # (P + G, G)
        best_gt = iou.argmax(axis=1)
        max_iou = iou[np.arange(len(all_rois)), best_gt]
    else:
        best_gt = np.zeros(len(all_rois), np.int64)
        max_iou = np.zeros(len(all_rois), np.float32)

    fg = _sample(np.flatnonzero(max_iou >= fg_iou), int(round(fg_fraction * batch_size)), rng)
    bg_candidates = np.flatnonzero((max_iou < bg_iou_hi) & (max_iou >= bg_iou_lo))
    bg = _sample(bg_candidates, batch_size - len(fg), rng)
    keep = np.concatenate([fg, bg])                                       # (R,)

    rois = all_rois[keep]                                                 # (R, 4)
    labels = np.zeros(len(keep), np.int64)                                # (R,)
    labels[:len(fg)] = gt_labels[best_gt[fg]]
    bbox_targets = np.zeros((len(keep), 4 * (num_classes + 1)), np.float32)
    bbox_weights = np.zeros_like(bbox_targets)
    if len(fg):             # IoU >= fg_iou > 0: both boxes have positive sizes, as eq. (2) needs
        t = _encode(gt_boxes[best_gt[fg]], rois[:len(fg)], weights)       # (F, 4)
        cols = 4 * labels[:len(fg), None] + np.arange(4)                  # (F, 4) the class's columns
        rows = np.arange(len(fg))[:, None]
        bbox_targets[rows, cols] = t
        bbox_weights[rows, cols] = 1.0
    return rois.astype(np.float32), labels, bbox_targets, bbox_weights


class FastRCNNHead:
    """RoI pooling + two fc layers + the sibling cls_score / bbox_pred layers.

    Args:
        in_channels: channels of the shared feature map.
        pooled_size: ph = pw of the pooled grid (7 for VGG-16).
        hidden: width of the two fc layers (4096 for VGG-16).
        num_classes: C (the cls layer has C + 1 outputs, background first).
        spatial_scale: 1 / stride of the feature map.
        pooler: "align" (RoI Align, Mask R-CNN) or "pool" (RoI max pooling, Fast R-CNN).
        sampling_ratio, aligned: RoI Align's options.
        rng: np.random.Generator for the weights.  backend: passed to the ops.roi_* calls.
        layers: where Linear and ReLU come from: frcnn_scratch.nn (the textbook) or
            frcnn_scratch.fast.
    """

    def __init__(self, in_channels, pooled_size, hidden, num_classes, spatial_scale,
                 pooler="align", sampling_ratio=2, aligned=True, rng=None, backend=None,
                 layers=nn):
        if pooler not in ("align", "pool"):
            raise ValueError(f"pooler: expected 'align' or 'pool', got {pooler!r}")
        self.pooled = _checks.pair(pooled_size, "pooled_size")
        self.spatial_scale = spatial_scale
        self.pooler, self.sampling_ratio, self.aligned = pooler, sampling_ratio, aligned
        self.backend = backend
        self.num_classes = num_classes
        ph, pw = self.pooled
        self.fc6 = layers.Linear(in_channels * ph * pw, hidden, rng=rng)
        self.fc7 = layers.Linear(hidden, hidden, rng=rng)
        self.relu6, self.relu7 = layers.ReLU(), layers.ReLU()
        # "initialized from zero-mean Gaussians with std 0.01 and 0.001" (Fast R-CNN 2.3)
        self.cls_score = layers.Linear(hidden, num_classes + 1, rng=rng, std=0.01)
        self.bbox_pred = layers.Linear(hidden, 4 * (num_classes + 1), rng=rng, std=0.001)
        for layer in (self.cls_score, self.bbox_pred):
            layer.params["bias"][...] = 0.0
        self.layers = {"fc6": self.fc6, "fc7": self.fc7,
                       "cls_score": self.cls_score, "bbox_pred": self.bbox_pred}

    def pool(self, features, rois):
        """features (N, C, H, W), rois (R, 5) -> pooled (R, C, ph, pw)."""
        if self.pooler == "align":
            return ops.roi_align(features, rois, self.pooled, self.spatial_scale,
                                 self.sampling_ratio, self.aligned, backend=self.backend)
        pooled, self._argmax = ops.roi_pool(features, rois, self.pooled, self.spatial_scale,
                                            backend=self.backend)
        return pooled

    def pool_backward(self, grad_pooled):
        """Gradient of the pooled grid -> gradient of the feature map (N, C, H, W)."""
        if self.pooler == "align":
            return ops.roi_align_backward(grad_pooled, self._rois, self._feature_shape, self.pooled,
                                          self.spatial_scale, self.sampling_ratio, self.aligned,
                                          backend=self.backend)
        return ops.roi_pool_backward(grad_pooled, self._argmax, self._feature_shape,
                                     backend=self.backend)

    def forward(self, features, rois):
        """features (N, C, H, W), rois (R, 5) -> (cls_logits (R, C+1), bbox_deltas (R, 4 (C+1)))."""
        self._rois, self._feature_shape = rois, features.shape
        pooled = self.pool(features, rois)                                # (R, C, ph, pw)
        self._pooled_shape = pooled.shape
        x = pooled.reshape(len(rois), int(np.prod(pooled.shape[1:])))     # (R, C ph pw)
        x = self.relu6.forward(self.fc6.forward(x))                       # (R, hidden)
        x = self.relu7.forward(self.fc7.forward(x))                       # (R, hidden)
        return self.cls_score.forward(x), self.bbox_pred.forward(x)

    def backward(self, grad_cls, grad_bbox):
        """Gradients of (cls_logits, bbox_deltas) -> gradient of the feature map (N, C, H, W)."""
        g = self.cls_score.backward(grad_cls) + self.bbox_pred.backward(grad_bbox)  # (R, hidden)
        g = self.fc6.backward(self.relu6.backward(self.fc7.backward(self.relu7.backward(g))))
        return self.pool_backward(g.reshape(self._pooled_shape))


def fast_rcnn_loss(cls_logits, bbox_deltas, labels, bbox_targets, bbox_weights, sigma=1.0):
    """Fast R-CNN's multi-task loss L = L_cls + [u >= 1] L_loc (its eq. 1), averaged over the R RoIs.

    Args:
        cls_logits: (R, C+1).  bbox_deltas: (R, 4 (C+1)).
        labels, bbox_targets, bbox_weights: from `proposal_targets` (labels may hold -1: a RoI
            that is not counted); bbox_weights >= 0.
        sigma: smooth L1's sigma (1 for the head).
    Returns:
        dict(loss, loss_cls, loss_reg, grad_cls (R, C+1), grad_bbox (R, 4 (C+1))).
        float64 logits and deltas give float64 losses and gradients (for gradient checks).
    """
    cls_logits = _checks.as_float_values(cls_logits, "cls_logits", ndim=2)          # (R, C+1)
    r, c1 = cls_logits.shape
    if c1 == 0:
        raise ValueError("cls_logits: expected at least one class column, got shape (R, 0)")
    labels = _checks.as_labels(labels, "labels", -1, c1 - 1, size=r)                # (R,)
    bbox_deltas = _checks.as_float_values(bbox_deltas, "bbox_deltas", ndim=2)       # (R, 4 (C+1))
    bbox_targets = _checks.as_float_values(bbox_targets, "bbox_targets", ndim=2)
    bbox_weights = _checks.as_float_values(bbox_weights, "bbox_weights", ndim=2)
    for name, arr in (("bbox_deltas", bbox_deltas), ("bbox_targets", bbox_targets),
                      ("bbox_weights", bbox_weights)):
        if arr.shape != (r, 4 * c1):
            raise ValueError(f"{name}: expected shape ({r}, {4 * c1}) = (R, 4 (C+1)), "
                             f"got {tuple(arr.shape)}")
    if np.any(bbox_weights < 0):
        raise ValueError("bbox_weights: expected non-negative values")
    return _fast_rcnn_loss(cls_logits, bbox_deltas, labels,
                           bbox_targets.astype(bbox_deltas.dtype),
                           bbox_weights.astype(bbox_deltas.dtype),
                           _checks.positive_number(sigma, "sigma"))


def _fast_rcnn_loss(cls_logits, bbox_deltas, labels, bbox_targets, bbox_weights, sigma):
    """fast_rcnn_loss of checked arrays (targets and weights in bbox_deltas' dtype)."""
    r = max(len(labels), 1)
    loss_cls, grad_cls = _softmax_cross_entropy(cls_logits, labels)
    loss_reg, grad_bbox = _smooth_l1(bbox_deltas, bbox_targets, sigma, bbox_weights)
    return dict(loss=(loss_cls + loss_reg) / r, loss_cls=loss_cls / r, loss_reg=loss_reg / r,
                grad_cls=grad_cls / r,
                grad_bbox=grad_bbox / r)


def postprocess_detections(rois, cls_logits, bbox_deltas, image_shape, score_threshold=0.05,
                           nms_threshold=0.5, max_detections=100, weights=HEAD_BOX_WEIGHTS,
                           backend=None):
    """Scores and class-specific boxes of every RoI -> final detections (section 3.3 at test time).

    Args:
        rois: (R, 4) proposals the head scored.  cls_logits: (R, C+1).  bbox_deltas: (R, 4 (C+1)).
        image_shape: (height, width) to clip to.
        score_threshold: drop detections scoring below this.
        nms_threshold: class-wise NMS IoU threshold.  max_detections: keep the best this many.
        weights: the head's box-coding weights.  backend: passed to ops.batched_nms.
    Returns:
        dict(boxes (D, 4) float32, scores (D,) float32, labels (D,) int64 in 1..C).
    """
    rois = _checks.as_boxes(rois, "rois")                                 # (R, 4)
    cls_logits = _checks.as_float_array(cls_logits, "cls_logits", ndim=2)  # (R, C+1)
    r, c1 = cls_logits.shape
    if r != len(rois) or c1 < 2:
        raise ValueError(f"cls_logits: expected shape ({len(rois)}, C+1) with C >= 1, one row per RoI, "
                         f"got {tuple(cls_logits.shape)}")
    bbox_deltas = _checks.as_float_array(bbox_deltas, "bbox_deltas", ndim=2)
    if bbox_deltas.shape != (r, 4 * c1):
        raise ValueError(f"bbox_deltas: expected shape ({r}, {4 * c1}) = (R, 4 (C+1)), "
                         f"got {tuple(bbox_deltas.shape)}")
    image_shape = check_image_shape(image_shape)
    score_threshold = _checks.finite_number(score_threshold, "score_threshold")
    nms_threshold = check_iou_threshold(nms_threshold, "nms_threshold")
    if max_detections is not None:
        max_detections = _checks.whole_number(max_detections, "max_detections")
    return _postprocess_detections(rois, cls_logits, bbox_deltas, image_shape, score_threshold,
                                   nms_threshold, max_detections, check_weights(weights), backend)


def _postprocess_detections(rois, cls_logits, bbox_deltas, image_shape, score_threshold,
                            nms_threshold, max_detections, weights, backend=None):
    """postprocess_detections of checked inputs.  Decoded boxes of finite t are finite with
    x2 >= x1, so the class-wise NMS can trust them."""
    r, c1 = cls_logits.shape
    probs = softmax(cls_logits)                                           # (R, C+1)
    anchors = np.repeat(rois, c1, axis=0)                                 # (R (C+1), 4)
    boxes = _decode(bbox_deltas.reshape(-1, 4), anchors, weights)         # (R (C+1), 4)
    boxes = _clip_boxes(boxes, image_shape).reshape(r, c1, 4)
    boxes, probs = boxes[:, 1:].reshape(-1, 4), probs[:, 1:].reshape(-1)  # drop background
    labels = np.tile(np.arange(1, c1, dtype=np.int64), r)                 # (R C,)
    keep = np.flatnonzero(probs > score_threshold)
    keep = keep[_remove_small_boxes(boxes[keep], 1e-2)]
    boxes, probs, labels = boxes[keep], probs[keep], labels[keep]
    keep = ops._batched_nms(boxes, probs, labels, nms_threshold, backend)[:max_detections]
    return dict(boxes=boxes[keep].astype(np.float32), scores=probs[keep].astype(np.float32),
                labels=labels[keep])
