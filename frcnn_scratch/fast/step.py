"""FasterRCNN's training step and prediction with the stages overlapped on threads.

model.FasterRCNN.loss_and_grads runs Figure 2's stages one after the other.  Several of them need
nothing the others compute, so with more than one thread they run side by side here:

    main thread                              a helper of the team (threads.background)
    -----------                              -----------------------------------------
    preprocess (in blocks of rows)
    backbone forward                         anchor labels and targets (need only the boxes
    RPN forward                                and the map's size)
    RPN loss and backward                    proposals, RoI sampling, head forward, its loss
                                               and backward (need only the features and the
                                               RPN's outputs)
    feature gradients added, backbone backward

The random draws keep the plain step's order (anchor sampling, then RoI sampling: the detector's
side waits for the labelling before it samples), so on any number of threads the step draws what
the plain step draws and computes the same sums: tests/test_fast.py holds the two equal.  On one
thread `background` runs each job at once where it is started (the detector's side then comes
before the RPN's loss; they share nothing but the features, so the results are the same).
"""
import numpy as np

from .. import nn
from ..losses import rpn_loss
from ..roi_head import fast_rcnn_loss
from ..rpn import anchor_targets
from . import threads
from .blocks import BLOCK_SIZE


def preprocess(model, image):
    """model.preprocess (the checks, then (image - mean) / std as (1, 3, H, W) float32) in blocks
    of rows on the thread team, each block checked while it is in cache."""
    image = model.check_image(image, values=False)
    mean = np.asarray(model.config.pixel_mean, np.float32)
    std = np.asarray(model.config.pixel_std, np.float32)
    x = np.empty((1, 3) + image.shape[:2], np.float32)                 # (1, 3, H, W)

    def rows(part):                                     # a block of rows
        block = image[part]                                            # (rows, W, 3)
        for c in range(3):                  # channel by channel: a transposed copy each
            np.divide(block[..., c] - mean[c], std[c], out=x[0, c, part])
        return bool(np.isfinite(block).all()), block.min(), block.max()

    pieces = max(threads.workers(), image.size // BLOCK_SIZE)          # blocks that fit in cache
    blocks = threads.parallel(rows, [slice(a, b) for a, b in
                                     threads.chunks(image.shape[0], pieces)])
    model.check_image_values(all(b[0] for b in blocks), min(b[1] for b in blocks),
                             max(b[2] for b in blocks))
    return x


def predict(model, image):
    """model.predict, with the threads the image's size calls for."""
    with threads.for_image(*_size(image)), nn.no_grad():
        return model.detections(preprocess(model, image))


def loss_and_grads(model, image, gt_boxes, gt_labels, rng, proposals, use_rpn, use_head):
    """model.loss_and_grads's stages, overlapped (see the module's notes); its inputs are checked."""
    with threads.for_image(*_size(image)):
        return _overlapped_step(model, image, gt_boxes, gt_labels, rng, proposals, use_rpn,
                                use_head)


def _overlapped_step(model, image, gt_boxes, gt_labels, rng, proposals, use_rpn, use_head):
    cfg = model.config
    x = preprocess(model, image)                                       # (1, 3, H, W)
    image_shape = x.shape[2:]
    anchors = model.anchors(*model.feature_size(*image_shape))         # (A, 4)
    labelling = threads.background(anchor_targets, anchors, gt_boxes, image_shape,
                                   cfg.rpn_pos_iou, cfg.rpn_neg_iou, cfg.rpn_batch_size,
                                   cfg.rpn_positive_fraction, rng)
    try:
        features = model.check_features(model.backbone.forward(x))    # (1, C, H', W')
        logits, deltas = model.rpn.forward(features)                   # (1, A), (1, A, 4)
    except BaseException:
        threads.wait(labelling)            # it draws from rng: never left running after us
        raise
    detector = threads.background(_detector_side, model, features, anchors, logits[0], deltas[0],
                                  image_shape, gt_boxes, gt_labels, rng, proposals, labelling,
                                  use_head)
    try:
        labels, targets = labelling.result()                           # (A,), (A, 4)
        rpn = rpn_loss(logits[0], deltas[0], labels, targets, lam=cfg.rpn_lambda,
                       sigma=cfg.rpn_sigma)
        g_rpn = model.rpn.backward(rpn["grad_logits"][None] * use_rpn,
                                   rpn["grad_t"][None] * use_rpn)      # (1, C, H', W')
    except BaseException:
        threads.wait(detector)             # it draws from rng too
        raise
    head, g_head = detector.result()
    g_features, norms = sum_and_norms(g_rpn, g_head)
    model.feature_gradients = dict(rpn=norms[0], head=norms[1])
    model.backbone.backward(g_features)
    return model.losses(rpn, head, use_rpn, use_head)


def _detector_side(model, features, anchors, logits, deltas, image_shape, gt_boxes, gt_labels,
                   rng, proposals, labelling, use_head):
    """Fast R-CNN's side of the step (3.2): proposals (unless given), RoI sampling (after the
    anchor labelling has drawn from rng), head, its loss and backward -> (loss dict, gradient of
    the features)."""
    if proposals is None:                                              # constants from here on
        proposals = model.proposals(anchors, logits, deltas, image_shape, training=True)
    labelling.result()                     # its rng draws come before the RoI sampling's
    rois, roi_labels, roi_targets, roi_weights = model.sample_rois(proposals, gt_boxes,
                                                                   gt_labels, rng)
    cls_logits, bbox_deltas = model.head.forward(features, model.with_image_index(rois))
    head = fast_rcnn_loss(cls_logits, bbox_deltas, roi_labels, roi_targets, roi_weights)
    g_head = model.head.backward(head["grad_cls"] * use_head, head["grad_bbox"] * use_head)
    return head, g_head


def sum_and_norms(a, b):
    """a + b, and the Euclidean norms of a and b (summed in float64), for (1, C, H, W) gradients,
    in blocks of channels on threads.  The blocks depend on the size only: the norms do not
    depend on the thread count."""
    total = np.empty(np.broadcast_shapes(a.shape, b.shape), np.result_type(a, b))

    def block(channels):                                  # -> the block's sums of squares
        c0, c1 = channels
        np.add(a[:, c0:c1], b[:, c0:c1], out=total[:, c0:c1])
        return [float(np.sum(np.square(g[:, c0:c1], dtype=np.float64))) for g in (a, b)]

    parts = threads.parallel(block, threads.chunks(total.shape[1], 8))
    return total, [float(np.sqrt(sum(p[k] for p in parts))) for k in (0, 1)]


def _size(image):
    """(height, width) of an image-like input for the thread choice; (1, 1) when it has no such
    shape (the model's checks then name what is wrong)."""
    shape = np.shape(image)
    return (int(shape[0]), int(shape[1])) if len(shape) >= 2 else (1, 1)
