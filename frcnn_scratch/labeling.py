"""Anchor labels (section 3.1.2): which anchors the RPN should call "object", "background", or skip.

For training the RPN every anchor gets a binary class label.  An anchor is POSITIVE if
    (i)  it has the highest IoU with some ground-truth box (ties included), or
    (ii) its IoU with any ground-truth box is above 0.7;
NEGATIVE if its IoU is below 0.3 with every ground-truth box (and it is not positive);
and IGNORED otherwise: it does not count in the loss.  Rule (i) exists because a small or oddly
shaped object may have no anchor above 0.7; (ii) usually suffices.  Anchors that cross the
image border are ignored too (section 3.3).

Each mini-batch then samples 256 of the labelled anchors, up to half positive, the rest
negative (section 3.1.3, "Training RPNs").  Positive anchors regress toward their matched
ground-truth box, the one with which they have the highest IoU.

Labels use 1 = positive, 0 = negative, -1 = ignored.

>>> import numpy as np
>>> gt = np.array([[0, 0, 10, 10]], np.float32)
>>> anchors = np.array([[0, 0, 10, 10],      # IoU 1     -> positive
...                     [0, 0, 10, 20],      # IoU 0.5   -> ignored
...                     [20, 20, 30, 30]],   # IoU 0     -> negative
...                    np.float32)
>>> labels, matched = label_anchors(anchors, gt)
>>> labels, matched
(array([ 1, -1,  0]), array([0, 0, 0]))
"""
import numpy as np

from . import ops
from ._checks import as_boxes, as_labels, finite_number, unit_interval, whole_number
from .anchors import _anchors_inside
from .boxes import check_image_shape

__all__ = ["label_anchors", "sample_labels", "check_iou_thresholds"]


def label_anchors(anchors, gt_boxes, image_shape=None, pos_iou=0.7, neg_iou=0.3, allowed_border=0,
                  pos_inclusive=False):
    """Label every anchor positive (1), negative (0) or ignored (-1), as section 3.1.2 says.

    Rule (ii) uses the paper's words, IoU strictly "higher than 0.7".  The paper's released code
    compared with >= instead (and DESIGN.md's list of defaults follows it); pos_inclusive=True
    gives that.  The negative test is strict in both: max IoU < neg_iou.

    Args:
        anchors: (A, 4) xyxy, e.g. from anchors.shift_anchors.
        gt_boxes: (G, 4) xyxy ground-truth boxes; G = 0 is allowed.
        image_shape: (height, width), or None.  Given, anchors not inside the image (see
            anchors.anchors_inside with allowed_border) are ignored and take no part in rule (i).
        pos_iou: rule (ii)'s threshold, in [0, 1].
        neg_iou: the negative threshold, in [0, pos_iou].
        allowed_border: pixels an anchor may cross the border by and still count as inside.
        pos_inclusive: False -> rule (ii) is IoU > pos_iou (the paper); True -> IoU >= pos_iou.
    Returns:
        labels: (A,) int64 in {1, 0, -1}.
        matched_gt: (A,) int64, for every anchor the index of the ground-truth box with which it
            has the highest IoU (the lowest index on a tie); -1 for all anchors when G = 0.
    """
    a = as_boxes(anchors, "anchors")                     # (A, 4)
    g = as_boxes(gt_boxes, "gt_boxes")                   # (G, 4)
    pos_iou, neg_iou = check_iou_thresholds(pos_iou, neg_iou)
    if image_shape is None:
        inside = np.ones(a.shape[0], bool)               # (A,)
    else:
        inside = _anchors_inside(a, check_image_shape(image_shape),
                                 finite_number(allowed_border, "allowed_border"))
    return _label_anchors(a, g, inside, pos_iou, neg_iou, bool(pos_inclusive))


def check_iou_thresholds(pos_iou, neg_iou):
    """(pos_iou, neg_iou) as floats with 0 <= neg_iou <= pos_iou <= 1."""
    pos_iou = unit_interval(pos_iou, "pos_iou")
    neg_iou = unit_interval(neg_iou, "neg_iou")
    if neg_iou > pos_iou:
        raise ValueError(f"neg_iou: expected at most pos_iou = {pos_iou}, got {neg_iou}")
    return pos_iou, neg_iou


def _label_anchors(a, g, inside, pos_iou, neg_iou, pos_inclusive):
    """label_anchors of checked anchors (A, 4) and gt boxes (G, 4), the (A,) bool mask of the
    anchors inside the image, and checked thresholds."""
    num_anchors = a.shape[0]
    labels = np.full(num_anchors, -1, np.int64)          # (A,) everything starts ignored
    matched_gt = np.full(num_anchors, -1, np.int64)      # (A,)
    if g.shape[0] == 0:                                  # no objects: every usable anchor is background
        labels[inside] = 0
        return labels, matched_gt
    if num_anchors == 0:
        return labels, matched_gt

    iou = ops._box_iou(g, a).T                           # (A, G), a view of (G, A): its long
                                                         # rows make it 3x faster (A >> G)
    matched_gt[:] = iou.argmax(axis=1)                   # best gt per anchor, lowest index on ties
    best_iou = iou[np.arange(num_anchors), matched_gt]   # (A,)

    # The thresholds are compared in float32, like the IoUs, so that an IoU of exactly 0.7
    # (70 / 100, which float32 rounds) counts as equal to pos_iou = 0.7.
    pos_thr, neg_thr = np.float32(pos_iou), np.float32(neg_iou)

    # negative: IoU < neg_iou with every ground-truth box
    labels[inside & (best_iou < neg_thr)] = 0

    # positive (i): for each gt, the inside anchor(s) with the highest IoU, ties included,
    # but only where that IoU is above 0 (an anchor that does not touch a box is no match)
    iou_inside = np.where(inside[:, None], iou, np.float32(-1))   # (A, G); outside never wins
    best_per_gt = iou_inside.max(axis=0)                 # (G,)
    is_best = (iou_inside == best_per_gt[None, :]) & (best_per_gt[None, :] > 0)   # (A, G)
    labels[is_best.any(axis=1)] = 1

    # positive (ii): IoU above pos_iou with some ground-truth box
    above = best_iou >= pos_thr if pos_inclusive else best_iou > pos_thr
    labels[inside & above] = 1
    return labels, matched_gt


def sample_labels(labels, batch_size=256, positive_fraction=0.5, rng=None):
    """Sample a mini-batch of anchors: up to batch_size * positive_fraction positives, the rest
    negatives (section 3.1.3: 256 anchors, ratio up to 1:1, padded with negatives).

    Args:
        labels: (A,) ints in {1, 0, -1}, from label_anchors.
        batch_size: how many anchors to keep labelled, a whole number >= 0.
        positive_fraction: the most positives may make up, in [0, 1].
        rng: a np.random.Generator, or an int seed, or None (fresh randomness).  The same
            seed gives the same sample.
    Returns:
        (A,) int64: a copy of labels with the anchors that were not sampled set to -1.

    >>> labels = np.array([1, 1, 1, 0, 0, 0, 0, 0, -1])
    >>> out = sample_labels(labels, batch_size=4, rng=np.random.default_rng(0))
    >>> int((out == 1).sum()), int((out == 0).sum())        # 2 of the 3 positives, 2 negatives
    (2, 2)
    """
    return _sample_labels(as_labels(labels, "labels", -1, 1),                     # (A,)
                          whole_number(batch_size, "batch_size"),
                          unit_interval(positive_fraction, "positive_fraction"),
                          np.random.default_rng(rng))    # a Generator passes through unchanged


def _sample_labels(lab, batch_size, positive_fraction, rng):
    """sample_labels of checked (A,) int64 labels, batch_size, fraction and a Generator."""
    positives = np.flatnonzero(lab == 1)
    negatives = np.flatnonzero(lab == 0)
    num_pos = min(len(positives), int(batch_size * positive_fraction))
    num_neg = min(len(negatives), batch_size - num_pos)
    keep_pos = rng.permutation(positives)[:num_pos]
    keep_neg = rng.permutation(negatives)[:num_neg]

    out = np.full(lab.shape, -1, np.int64)               # (A,) everything unsampled is ignored
    out[keep_pos] = 1
    out[keep_neg] = 0
    return out
