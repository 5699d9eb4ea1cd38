"""Region Proposal Network (section 3.1): the RPN head, its training targets, the proposal layer.

The RPN slides a small network over the backbone's feature map (Figure 3):

    features (N, C, H, W)
      -> 3x3 conv + ReLU                       the "intermediate layer" (256-d for ZF, 512-d for VGG)
      -> 1x1 conv, k outputs  = objectness     the cls layer (k logistic outputs, one per anchor)
      -> 1x1 conv, 4k outputs = t              the reg layer (eq. 2 offsets, one 4-vector per anchor)

Outputs are flattened in the anchors' order, index = (y * W + x) * k + a (see anchors.py), so
that row i of `logits` / `deltas` belongs to anchor i.

Training targets (3.1.2) come from labeling.py: an anchor is positive (1) at IoU > 0.7 with some
ground truth box (strictly "higher than 0.7", as section 3.1.2 says; the paper's released code
used >=, which label_anchors offers as pos_inclusive=True) or when it is a box's best anchor;
negative (0) at IoU < 0.3 with every box; else ignored (-1).  A mini-batch samples up to half
positives.

The proposal layer turns (logits, deltas) into boxes for the detection network: decode, clip to
the image, drop tiny boxes, keep the pre-NMS top N by score, NMS at 0.7, keep the post-NMS top N.
"""
import numpy as np

from . import _checks, ops
from .anchors import _anchors_inside
from .box_coding import _decode, _encode
from .boxes import _clip_boxes, _remove_small_boxes, check_image_shape, check_min_size
from .labeling import _label_anchors, _sample_labels, check_iou_thresholds
from .losses import sigmoid
from .nms import check_iou_threshold
from . import nn


class RPNHead:
    """The RPN's layers: 3x3 conv + ReLU, then the sibling 1x1 cls (k) and reg (4k) convs.

    Args:
        in_channels: channels of the backbone's feature map.
        mid_channels: channels of the 3x3 "intermediate layer".
        num_anchors: k, anchors per feature-map position.
        rng: np.random.Generator for the weights (cls and reg are N(0, 0.01^2), as in the paper).
        layers: where Conv2d and ReLU come from: frcnn_scratch.nn (the textbook) or
            frcnn_scratch.fast (the same layers, faster).
    """

    def __init__(self, in_channels, mid_channels, num_anchors, rng, layers=nn):
        self.k = int(num_anchors)
        self.conv = layers.Conv2d(in_channels, mid_channels, 3, padding=1, rng=rng)
        self.relu = layers.ReLU()
        # "initialized by drawing weights from a zero-mean Gaussian with standard deviation 0.01"
        self.cls = layers.Conv2d(mid_channels, self.k, 1, rng=rng, std=0.01)
        self.reg = layers.Conv2d(mid_channels, 4 * self.k, 1, rng=rng, std=0.01)
        self.layers = {"conv": self.conv, "cls": self.cls, "reg": self.reg}

    def forward(self, features):
        """features (N, C, H, W) -> (logits (N, H*W*k), deltas (N, H*W*k, 4)), anchor order."""
        n, _, h, w = features.shape
        hidden = self.relu.forward(self.conv.forward(features))          # (N, mid, H, W)
        logits = self.cls.forward(hidden)                                # (N, k, H, W)
        deltas = self.reg.forward(hidden)                                # (N, 4k, H, W)
        logits = logits.transpose(0, 2, 3, 1).reshape(n, h * w * self.k)
        deltas = deltas.transpose(0, 2, 3, 1).reshape(n, h * w * self.k, 4)
        self._hw = (h, w)
        return logits, deltas

    def backward(self, grad_logits, grad_deltas):
        """Gradients of (logits, deltas) in anchor order -> gradient of the features (N, C, H, W)."""
        h, w = self._hw
        n = grad_logits.shape[0]
        g_cls = grad_logits.reshape(n, h, w, self.k).transpose(0, 3, 1, 2)          # (N, k, H, W)
        g_reg = grad_deltas.reshape(n, h, w, 4 * self.k).transpose(0, 3, 1, 2)      # (N, 4k, H, W)
        g_hidden = self.cls.backward(np.ascontiguousarray(g_cls))
        g_hidden = g_hidden + self.reg.backward(np.ascontiguousarray(g_reg))
        return self.conv.backward(self.relu.backward(g_hidden))


def anchor_targets(anchors, gt_boxes, image_shape, pos_iou=0.7, neg_iou=0.3,
                   batch_size=256, positive_fraction=0.5, rng=None):
    """Training targets of the RPN for one image (3.1.2).

    Args:
        anchors: (A, 4) all anchors of the image, xyxy.
        gt_boxes: (G, 4) ground-truth boxes, xyxy (G may be 0).
        image_shape: (height, width); anchors crossing the border are ignored (None: none is).
        pos_iou, neg_iou: the 0.7 / 0.3 thresholds.
        batch_size, positive_fraction: the mini-batch of anchors (256 at up to 1:1 in the paper).
        rng: np.random.Generator (or an int seed, or None) for the sampling.
    Returns:
        labels: (A,) int64 in {1, 0, -1}; only the sampled anchors are >= 0.
        targets: (A, 4) float32 t* of eq. (2) for each anchor's best ground truth (0 where none).
    """
    anchors = _checks.as_boxes(anchors, "anchors")                        # (A, 4)
    gt_boxes = _checks.as_boxes(gt_boxes, "gt_boxes")                     # (G, 4)
    image_shape = None if image_shape is None else check_image_shape(image_shape)
    pos_iou, neg_iou = check_iou_thresholds(pos_iou, neg_iou)
    batch_size = _checks.whole_number(batch_size, "batch_size")
    positive_fraction = _checks.unit_interval(positive_fraction, "positive_fraction")
    return _anchor_targets(anchors, gt_boxes, image_shape, pos_iou, neg_iou, batch_size,
                           positive_fraction, np.random.default_rng(rng))


def _anchor_targets(anchors, gt_boxes, image_shape, pos_iou, neg_iou, batch_size,
                    positive_fraction, rng):
    """anchor_targets of checked inputs (rng a Generator): label, sample, encode."""
    if image_shape is None:
        inside = np.ones(len(anchors), bool)                              # (A,)
    else:
        inside = _anchors_inside(anchors, image_shape, 0.0)               # (A,) bool
    labels, matched = _label_anchors(anchors, gt_boxes, inside, pos_iou, neg_iou, False)
    labels = _sample_labels(labels, batch_size, positive_fraction, rng)
    targets = np.zeros((len(anchors), 4), np.float32)                     # (A, 4)
    pos = np.flatnonzero(labels == 1)
    if len(pos):
        # a positive anchor overlaps its gt box (IoU > 0): both have positive sizes, as eq. (2) needs
        targets[pos] = _encode(gt_boxes[matched[pos]], anchors[pos], (1.0, 1.0, 1.0, 1.0))
    return labels.astype(np.int64), targets


def top_n(scores, n):
    """Indices of the n highest scores, highest first, ties in index order: the first n of
    np.argsort(-scores, kind="stable"), without sorting all of them (a partition finds the n-th
    score; only the scores at or above it are sorted)."""
    if n >= len(scores):
        return np.argsort(-scores, kind="stable")
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    kth = np.partition(-scores, n - 1)[n - 1]                             # the n-th highest, negated
    candidates = np.flatnonzero(-scores <= kth)                           # index order: ties stay so
    return candidates[np.argsort(-scores[candidates], kind="stable")][:n]


def generate_proposals(anchors, logits, deltas, image_shape, pre_nms_top_n, post_nms_top_n,
                       nms_threshold=0.7, min_size=0.0, backend=None):
    """The proposal layer for one image: decode, clip, drop small, top-N, NMS, top-N.

    The NMS stops once it has kept the post-NMS top N (`ops.nms(..., max_keep=)`): greedy NMS
    never revisits a kept box, so these are the first N of the whole NMS.

    Args:
        anchors: (A, 4) anchors, xyxy.
        logits: (A,) objectness logits (the score is sigmoid(logit); ranking by logit is the same).
        deltas: (A, 4) predicted t for each anchor.
        image_shape: (height, width) to clip to.
        pre_nms_top_n: highest-scoring boxes kept before NMS (12000 train / 6000 test in the paper);
            a whole number >= 0 (0 keeps none: an empty, valid result).
        post_nms_top_n: boxes kept after NMS (2000 train / 300 test); a whole number >= 0.
        nms_threshold: IoU above which a lower-scoring box is suppressed (0.7).
        min_size: boxes narrower or shorter than this (pixels) are dropped.
        backend: passed to ops.nms.
    Returns:
        proposals: (P, 4) float32 boxes, highest score first, P <= post_nms_top_n.
        scores: (P,) float32 objectness probabilities.
    """
    anchors = _checks.as_boxes(anchors, "anchors")                        # (A, 4)
    logits = _checks.as_float_array(logits, "logits", ndim=1)             # (A,)
    deltas = _checks.as_float_array(deltas, "deltas", ndim=2, last_dim=4)  # (A, 4)
    if not len(anchors) == len(logits) == len(deltas):
        raise ValueError(f"anchors, logits, deltas: expected one row per anchor, got "
                         f"{len(anchors)}, {len(logits)}, {len(deltas)}")
    image_shape = check_image_shape(image_shape)
    pre_nms_top_n = _checks.whole_number(pre_nms_top_n, "pre_nms_top_n")
    post_nms_top_n = _checks.whole_number(post_nms_top_n, "post_nms_top_n")
    nms_threshold = check_iou_threshold(nms_threshold, "nms_threshold")
    min_size = check_min_size(min_size)
    return _generate_proposals(anchors, logits, deltas, image_shape, pre_nms_top_n,
                               post_nms_top_n, nms_threshold, min_size, backend)


def _generate_proposals(anchors, logits, deltas, image_shape, pre_nms_top_n, post_nms_top_n,
                        nms_threshold, min_size, backend=None):
    """generate_proposals of checked inputs.  Decoded boxes of finite t are finite with
    x2 >= x1, so the NMS can trust them."""
    boxes, logits = _best_boxes(anchors, logits, deltas, image_shape, min_size, pre_nms_top_n)
    keep = ops._nms(boxes, logits, nms_threshold, backend, max_keep=post_nms_top_n)
    return boxes[keep].astype(np.float32), sigmoid(logits[keep]).astype(np.float32)


def _best_boxes(anchors, logits, deltas, image_shape, min_size, n):
    """Decode, clip, drop small, keep the n best: (n, 4) boxes and their logits, best first.

    In the paper's order every anchor is decoded (tens of thousands at 600 x 1000) and a few
    hundred survive the top-N.  Each box depends on its own anchor and t alone, so the anchors are
    ranked first and only the best are decoded, more if the size test drops too many: the same
    boxes in the same order (tests compare it with decoding all of them).
    """
    take = n + n // 4 + 16                                 # a margin for boxes dropped as small
    while True:
        order = top_n(logits, take)                        # best first, ties in index order
        boxes = _clip_boxes(_decode(deltas[order], anchors[order], (1.0, 1.0, 1.0, 1.0)),
                            image_shape)
        keep = _remove_small_boxes(boxes, min_size)[:n]    # the first n that pass, in order
        if len(keep) == n or len(order) == len(logits):
            return boxes[keep], logits[order[keep]]
        take *= 4
