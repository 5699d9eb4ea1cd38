"""Faster R-CNN (Ren, He, Girshick, Sun 2015), the whole model in one file that reads like Figure 2.

    image (H, W, 3) in [0, 1]
      -> normalise, NCHW                                   (1, 3, H, W)
      -> backbone: [conv3x3 + ReLU (+ maxpool)] x L        (1, C, H/s, W/s)    the shared conv layers
      -> RPN head -> objectness logits, t per anchor       (A,), (A, 4)        section 3.1
      -> proposal layer (decode, clip, top-N, NMS)         (P, 4)              sections 3.1, 3.3
      -> (train) proposal targets: sample R RoIs           (R, 4)              Fast R-CNN 2.3
      -> RoI Align / RoI pool -> fc -> fc                  (R, hidden)         Fast R-CNN 2.1
      -> cls_score (C+1), bbox_pred 4 (C+1)                (R, C+1), (R, 4 (C+1))
      -> (train) four losses: RPN cls + reg, head cls + reg; backward by hand
      -> (test) per-class decode + NMS -> detections

Training is "approximate joint training" (section 3.2): one backward pass through both networks,
with the proposal boxes treated as constants (no gradient through their coordinates).

The hot ops (IoU, NMS, RoI pool / align and their backwards) go through frcnn_scratch.ops with
the model's `backend`, so the same model runs on the NumPy reference or the Triton kernels.
The head pools with RoI Align (Mask R-CNN, aligned=True) by default; config.pooler="pool" gives
the paper's RoI max pooling.  `fast=False` builds the network from nn.py's textbook layers and
runs `loss_and_grads` below stage after stage; `fast=True` (the default) computes the same with
frcnn_scratch.fast.
"""
import numpy as np

from . import checkpoint, fast as fast_layers, nn, ops
from ._checks import as_boxes, as_labels
from .anchors import generate_anchors, shift_anchors
from .config import Config
from .losses import rpn_loss
from .memory import check_memory
from .rescale import compute_scale, resize_image
from .roi_head import (HEAD_BOX_WEIGHTS, FastRCNNHead, fast_rcnn_loss, postprocess_detections,
                       proposal_targets)
from .rpn import RPNHead, anchor_targets, generate_proposals


def backbone(channels, rng):
    """The shared conv layers, VGG-style: conv3x3 (padding 1) + ReLU per entry of `channels`, with
    a 2x2 max pool after every entry but the last -> stride 2^(L-1)."""
    layers, in_ch = [], 3
    for i, out_ch in enumerate(channels):
        layers += [nn.Conv2d(in_ch, out_ch, 3, padding=1, rng=rng), nn.ReLU()]
        if i < len(channels) - 1:
            layers.append(nn.MaxPool2d(2, 2))
        in_ch = out_ch
    return nn.Sequential(*layers)


class FasterRCNN:
    """Backbone + RPN + Fast R-CNN head, trained jointly, with a hand-written backward.

    Args:
        config: a Config (defaults if None).
        backend: "numpy", "triton", or None (the current default of frcnn_scratch.ops);
            passed unchanged to every ops.* call.
        class_names: the names of labels 1..C (saved with the weights); default "class 1", ...
        fast: True: the layers, the training step and the prediction of frcnn_scratch.fast
            (bands, threads for large images, stages overlapped); False: nn.py's textbook layers
            and the plain step below, which never call into fast/.  The same parameters, names
            and initial weights either way, and the same results to float32 rounding; a
            checkpoint of one loads into the other.
    """

    def __init__(self, config=None, backend=None, class_names=None, fast=True):
        self.config = cfg = Config() if config is None else config
        if not isinstance(cfg, Config):
            raise ValueError(f"config: expected a Config, got {type(cfg).__name__}")
        self.backend = ops.check_backend(backend, allow_none=True)
        check_memory(cfg, what="config")               # before the weights are allocated
        if class_names is None:
            class_names = tuple(f"class {k}" for k in range(1, cfg.num_classes + 1))
        self.class_names = tuple(str(n) for n in class_names)
        if len(self.class_names) != cfg.num_classes or len(set(self.class_names)) != cfg.num_classes:
            raise ValueError(f"class_names: expected {cfg.num_classes} distinct names "
                             f"(config.num_classes), got {list(self.class_names)}")
        rng = np.random.default_rng(cfg.seed)
        self.fast = bool(fast)
        if self.fast:      # the same layers, computed in bands on threads (frcnn_scratch/fast)
            layers, self.backbone = fast_layers, fast_layers.backbone(cfg.channels, rng)
        else:              # the textbook layers of nn.py
            layers, self.backbone = nn, backbone(cfg.channels, rng)
        c = cfg.channels[-1]
        self.rpn = RPNHead(c, cfg.rpn_channels, cfg.num_anchors, rng, layers=layers)
        self.head = FastRCNNHead(c, cfg.pooled_size, cfg.fc_hidden, cfg.num_classes,
                                 spatial_scale=1.0 / cfg.stride, pooler=cfg.pooler,
                                 sampling_ratio=cfg.sampling_ratio, aligned=cfg.aligned,
                                 rng=rng, backend=self.backend, layers=layers)
        # anchors at the origin cell, (k, 4); shifted over each feature map as needed (3.1.1)
        self.base_anchors = generate_anchors(base_size=cfg.stride, ratios=cfg.anchor_ratios,
                                             scales=cfg.anchor_scales)
        self._anchors = None                 # ((H', W'), anchors) of the last map size
        self.feature_gradients = None

    # -- the forward pass, stage by stage --

    def preprocess(self, image):
        """(H, W, 3) float in [0, 1] -> normalised (1, 3, H, W) float32."""
        image = self.check_image(image)
        mean = np.asarray(self.config.pixel_mean, np.float32)
        std = np.asarray(self.config.pixel_std, np.float32)
        return ((image - mean) / std).transpose(2, 0, 1)[None].copy()   # (1, 3, H, W)

    def features(self, x):
        """The shared conv layers: (1, 3, H, W) -> (1, C, H/s, W/s)."""
        return self.backbone.forward(x)

    def anchors(self, feat_height, feat_width):
        """All anchors of a (feat_height, feat_width) map, (H' W' k, 4), index (y W' + x) k + a;
        those of the last size asked for are kept (read-only)."""
        key = (int(feat_height), int(feat_width))
        last = self._anchors                 # a training run needs them on every step
        if last is None or last[0] != key:
            anchors = shift_anchors(self.base_anchors, *key, self.config.stride)
            anchors.setflags(write=False)    # shared: no caller may change them
            self._anchors = last = (key, anchors)
        return last[1]

    def feature_size(self, height, width):
        """(H', W') of the backbone's map for a (height, width) image: the 3x3 convs keep the
        size (padding 1), each 2x2 pool halves it, rounding down."""
        for _ in self.config.channels[1:]:
            height, width = height // 2, width // 2
        return height, width

    def propose(self, features, image_shape, training):
        """RPN head + proposal layer -> (logits (A,), deltas (A, 4), anchors (A, 4), proposals (P, 4))."""
        logits, deltas = self.rpn.forward(features)                        # (1, A), (1, A, 4)
        anchors = self.anchors(*features.shape[2:])                        # (A, 4)
        proposals = self.proposals(anchors, logits[0], deltas[0], image_shape, training)
        return logits[0], deltas[0], anchors, proposals

    def proposals(self, anchors, logits, deltas, image_shape, training):
        """The proposal layer (3.1, 3.3): decode, clip, drop small (the released code's min size),
        top-N, NMS, top-N -> (P, 4)."""
        cfg = self.config
        pre, post = ((cfg.rpn_pre_nms_train, cfg.rpn_post_nms_train) if training
                     else (cfg.rpn_pre_nms_test, cfg.rpn_post_nms_test))
        return generate_proposals(anchors, logits, deltas, image_shape, pre, post,
                                  cfg.rpn_nms_threshold, cfg.rpn_min_size,
                                  backend=self.backend)[0]

    def sample_rois(self, proposals, gt_boxes, gt_labels, rng):
        """Proposal targets (Fast R-CNN 2.3): the ground truth joins the proposals (the released
        code's proposal_target_layer), then R RoIs are sampled -> (rois (R, 4), labels (R,),
        bbox targets and weights (R, 4 (C+1)))."""
        cfg = self.config
        return proposal_targets(proposals, gt_boxes, gt_labels, cfg.num_classes,
                                cfg.roi_batch_size, cfg.roi_fg_fraction, cfg.roi_fg_iou,
                                cfg.roi_bg_iou_hi, cfg.roi_bg_iou_lo, HEAD_BOX_WEIGHTS, rng,
                                backend=self.backend)

    @staticmethod
    def with_image_index(boxes):
        """(R, 4) boxes of image 0 -> (R, 5) RoIs (0, x1, y1, x2, y2), as RoI pool / Align take."""
        return np.concatenate([np.zeros((len(boxes), 1), np.float32), boxes], axis=1)

    # -- training: forward, the four losses, backward --

    def loss_and_grads(self, image, gt_boxes, gt_labels, rng, proposals=None,
                       parts=("rpn", "head")):
        """One training step's forward and backward on one image (the paper's mini-batch).

        Args:
            image: (H, W, 3) float in [0, 1].
            gt_boxes: (G, 4) xyxy in image pixels.  gt_labels: (G,) int64 in 1..C.
            rng: np.random.Generator or int seed for the anchor and RoI sampling (required: an
                unseeded step could not be repeated).
            proposals: optional (P, 4) boxes to use instead of the RPN's: fixed proposals, as
                the paper's 4-step training gives the detector (and a test hook: with fixed
                proposals the loss is a smooth function of the weights).
            parts: the losses whose gradient flows back: ("rpn", "head") is approximate joint
                training; ("rpn",) trains the RPN alone and ("head",) the detector alone, the
                steps of 4-step alternating training (section 3.2).  All four losses are
                reported either way; the other part's gradients are zero (to freeze a part,
                update only the others: SGD.step(names=...), as Trainer.step(trainable=...)).
        Returns:
            dict of floats: loss (of the chosen parts), rpn_cls, rpn_reg (lambda included),
            head_cls, head_reg.
            The gradients of `loss` are left in the layers (read them with grads()), and
            feature_gradients holds the norm of the gradient each part sent into the shared
            feature map (how much of the backbone's learning comes from each).
        """
        cfg = self.config
        gt_boxes, gt_labels, rng, use_rpn, use_head = self._check_targets(
            image, gt_boxes, gt_labels, rng, parts)
        if self.fast:        # the same stages, overlapped on threads: frcnn_scratch/fast/step.py
            losses = fast_layers.loss_and_grads(self, image, gt_boxes, gt_labels, rng, proposals,
                                                use_rpn, use_head)
            return self.check_gradients(losses)
        # forward: the backbone and the RPN (3.1)
        x = self.preprocess(image)                                         # (1, 3, H, W)
        image_shape = x.shape[2:]
        features = self.check_features(self.features(x))                   # (1, C, H', W')
        logits, deltas = self.rpn.forward(features)                        # (1, A), (1, A, 4)
        anchors = self.anchors(*features.shape[2:])                        # (A, 4)
        # the RPN's targets (3.1.2) and loss (eq. 1)
        labels, targets = anchor_targets(anchors, gt_boxes, image_shape, cfg.rpn_pos_iou,
                                         cfg.rpn_neg_iou, cfg.rpn_batch_size,
                                         cfg.rpn_positive_fraction, rng)   # (A,), (A, 4)
        rpn = rpn_loss(logits[0], deltas[0], labels, targets, lam=cfg.rpn_lambda,
                       sigma=cfg.rpn_sigma)
        # proposals (constants from here on) and the RoIs sampled from them (3.2)
        if proposals is None:
            proposals = self.proposals(anchors, logits[0], deltas[0], image_shape, training=True)
        rois, roi_labels, roi_targets, roi_weights = self.sample_rois(proposals, gt_boxes,
                                                                      gt_labels, rng)
        # the Fast R-CNN head: RoI pool / Align -> fc6 -> fc7 -> cls_score, bbox_pred; its loss
        cls_logits, bbox_deltas = self.head.forward(features, self.with_image_index(rois))
        head = fast_rcnn_loss(cls_logits, bbox_deltas, roi_labels, roi_targets, roi_weights)
        # backward, in reverse: each head sends its gradient into the shared map, then the backbone
        g_rpn = self.rpn.backward(rpn["grad_logits"][None] * use_rpn,
                                  rpn["grad_t"][None] * use_rpn)           # (1, C, H', W')
        g_head = self.head.backward(head["grad_cls"] * use_head,
                                    head["grad_bbox"] * use_head)          # (1, C, H', W')
        self.feature_gradients = dict(rpn=_norm(g_rpn), head=_norm(g_head))
        self.backbone.backward(g_rpn + g_head)
        return self.check_gradients(self.losses(rpn, head, use_rpn, use_head))

    def losses(self, rpn, head, use_rpn, use_head):
        """The step's loss dict from rpn_loss's and fast_rcnn_loss's results."""
        loss = rpn["loss"] * use_rpn + head["loss"] * use_head
        return dict(loss=float(loss), rpn_cls=float(rpn["loss_cls"]),
                    rpn_reg=float(self.config.rpn_lambda * rpn["loss_reg"]),
                    head_cls=float(head["loss_cls"]), head_reg=float(head["loss_reg"]))

    # -- inference --

    def predict(self, image):
        """Detect objects in one image, as it comes (`detect` rescales it first, by the config's
        min_size / max_size).

        Args:
            image: (H, W, 3) float in [0, 1].
        Returns:
            dict(boxes (D, 4) float32 xyxy in image pixels, scores (D,) float32, labels (D,) int64
            in 1..C), best score first, after class-wise NMS.
        """
        if self.fast:                     # the same, on the threads the image's size calls for
            return fast_layers.predict(self, image)
        with nn.no_grad():
            return self.detections(self.preprocess(image))

    def detections(self, x):
        """The test-time forward of a preprocessed image x (1, 3, H, W) -> detections (predict)."""
        cfg = self.config
        features = self.check_features(self.features(x))                   # (1, C, H', W')
        _, _, _, proposals = self.propose(features, x.shape[2:], training=False)  # (P, 4)
        cls_logits, bbox_deltas = self.head.forward(features, self.with_image_index(proposals))
        return postprocess_detections(proposals, cls_logits, bbox_deltas, x.shape[2:],
                                      cfg.score_threshold, cfg.nms_threshold, cfg.max_detections,
                                      HEAD_BOX_WEIGHTS, backend=self.backend)

    def detect(self, image):
        """`predict` on an image of any size: rescaled by config.min_size / max_size (the paper's
        rule, when set), detected, and the boxes mapped back to the image's own pixels."""
        cfg = self.config
        image = np.asarray(image, np.float32)
        scale = 1.0
        if cfg.min_size > 0 and image.ndim == 3:
            scale, h, w = compute_scale(image.shape[0], image.shape[1], cfg.min_size, cfg.max_size)
            if min(h, w) < cfg.stride:
                raise ValueError(f"image: {image.shape[0]} x {image.shape[1]} pixels become "
                                 f"{h} x {w} at min_size {cfg.min_size:g} / max_size "
                                 f"{cfg.max_size:g}; the model needs {cfg.stride} pixels a side")
            if (h, w) != image.shape[:2]:
                image = resize_image(image, h, w)
        det = self.predict(image)
        det["boxes"] = (det["boxes"] / np.float32(scale)).astype(np.float32)
        return det

    # -- checks at the door: the inputs once, the feature map and the gradients as they come --

    def check_image(self, image, values=True):
        """`image` as (H, W, 3) float32 with H, W >= the stride; values=True also checks that every
        value is finite and in [0, 1] (fast.preprocess checks them block by block instead)."""
        image = np.asarray(image, np.float32)
        if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < self.config.stride:
            raise ValueError(f"image: expected (H, W, 3) with H, W >= {self.config.stride}, "
                             f"got {image.shape}")
        if values:
            self.check_image_values(np.isfinite(image).all(), image.min(), image.max())
        return image

    @staticmethod
    def check_image_values(finite, low, high):
        """The error for an image that holds NaN or Inf, or values outside [0, 1]."""
        if not finite:
            raise ValueError("image: contains NaN or Inf")
        if low < 0.0 or high > 1.0:
            raise ValueError(f"image: expected values in [0, 1], got {float(low):g}.."
                             f"{float(high):g} (an 8-bit image? divide it by 255)")

    def _check_targets(self, image, gt_boxes, gt_labels, rng, parts):
        """A training step's ground truth, rng and parts, checked once -> (gt_boxes (G, 4),
        gt_labels (G,), a Generator, use_rpn, use_head)."""
        if rng is None:
            raise ValueError("rng: pass a seed (int) or a np.random.Generator; an unseeded "
                             "training step cannot be repeated")
        rng = np.random.default_rng(rng)                                   # a Generator passes through
        unknown = set(parts) - {"rpn", "head"}
        if unknown or not parts:
            raise ValueError(f"parts: expected 'rpn' and / or 'head', got {tuple(parts)!r}")
        gt_boxes = as_boxes(gt_boxes, "gt_boxes")                          # (G, 4)
        gt_labels = as_labels(gt_labels, "gt_labels", 1, self.config.num_classes,
                              size=len(gt_boxes))                          # (G,) int64
        h, w = self.check_image(image, values=False).shape[:2]
        outside = (gt_boxes[:, 0] >= w) | (gt_boxes[:, 2] <= 0) | (gt_boxes[:, 1] >= h) | \
            (gt_boxes[:, 3] <= 0)
        if outside.any():
            k = int(np.argmax(outside))
            raise ValueError(f"gt_boxes: box {k} {gt_boxes[k].tolist()} lies wholly outside the "
                             f"{w} x {h} image: no anchor can learn it")
        return gt_boxes, gt_labels, rng, "rpn" in parts, "head" in parts

    @staticmethod
    def check_features(features):
        """The backbone's output, refused if it holds NaN or Inf (weights that overflowed: any NaN
        on the way through the layers ends up here)."""
        if not np.isfinite(features).all():
            raise ValueError("features: the backbone's output contains NaN or Inf (do the weights "
                             "hold NaN or Inf, or did they overflow?)")
        return features

    def check_gradients(self, losses):
        """`losses`, once every gradient of the step is known to be finite."""
        for name, grad in self.grads().items():
            if not np.isfinite(grad).all():
                raise ValueError(f"the gradient of {name} contains NaN or Inf: the step "
                                 f"overflowed (is the learning rate too high?)")
        return losses

    # -- parameters: one flat dict "part.layer.name" -> array (the arrays the layers use) --

    def _parts(self):
        yield "backbone", self.backbone.params, lambda: self.backbone.grads
        for part, layers in (("rpn", self.rpn.layers), ("head", self.head.layers)):
            for name, layer in layers.items():
                yield f"{part}.{name}", layer.params, (lambda layer=layer: layer.grads)

    def params(self):
        """dict name -> parameter array (the layers' own arrays: updating them updates the model)."""
        return {f"{part}.{k}": v for part, params, _ in self._parts() for k, v in params.items()}

    def grads(self):
        """dict name -> gradient of the last `loss_and_grads` call (same keys as params())."""
        return {f"{part}.{k}": v for part, _, grads in self._parts() for k, v in grads().items()}

    def astype(self, dtype):
        """Cast every layer's parameters (float64 for gradient checks); returns self.

        The RoI ops stay float32 (ops works in float32); everything else follows `dtype`.
        """
        self.backbone.astype(dtype)
        for layers in (self.rpn.layers, self.head.layers):
            for layer in layers.values():
                layer.astype(dtype)
        return self

    # -- save / load: weights, config and class names in one .npz (checkpoint.py) --

    def save(self, path):
        """Write weights + config to `path` (.npz), atomically."""
        checkpoint.save_model(self, path)

    def load_weights(self, path):
        """Load weights saved by `save`; refuses a file whose network differs (any config field
        but the test-time and training-only ones)."""
        checkpoint.load_weights(self, path)

    @classmethod
    def load(cls, path, backend=None, overrides=None, fast=True):
        """A new model built from the config and class names stored in `path`, with its weights.

        overrides: dict of Config.TEST_TIME_FIELDS to change (score and NMS thresholds, test-time
            proposal counts, max detections, the input scale); a field that changes the network
            is refused, named.
        """
        return checkpoint.load_model(cls, path, backend=backend, overrides=overrides, fast=fast)


def _norm(g):
    """The Euclidean norm of a gradient, summed in float64."""
    return float(np.sqrt(np.sum(np.square(g, dtype=np.float64))))
