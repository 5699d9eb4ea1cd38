"""Non-maximum suppression (NMS): keep the best box of each cluster of overlapping boxes.

The RPN proposes many boxes around every object.  Section 3.3 of the paper: "Some RPN proposals
highly overlap with each other.  To reduce redundancy, we adopt non-maximum suppression (NMS) on
the proposal regions based on their cls scores.  We fix the IoU threshold for NMS at 0.7."
The detector uses the same step per class on its final detections (class-wise NMS).

Greedy NMS, the rule every function here follows:

    1. sort the boxes by score, highest first; equal scores keep their input order (lower index
       first), so the result never depends on how the sort breaks ties;
    2. take the best box that is still alive and keep it;
    3. suppress every later box whose IoU with it is strictly greater than the threshold
       (IoU == threshold survives; IoU is computed in float32 like boxes.box_iou, and a pair
       with zero union has IoU 0, so a zero-area box suppresses nothing);
    4. repeat 2-3 until no box is alive.

>>> import numpy as np
>>> boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30]], np.float32)
>>> nms(boxes, np.array([0.9, 0.8, 0.7]), iou_threshold=0.5)   # box 1 overlaps box 0: IoU 9/11
array([0, 2])
"""
import numpy as np

from ._checks import as_boxes, as_float_array

__all__ = ["check_nms_inputs", "nms", "nms_reference", "batched_nms"]


def check_nms_inputs(boxes, scores, iou_threshold):
    """Validate NMS inputs; raise a ValueError naming the bad argument.

    Args:
        boxes: (N, 4) xyxy, finite, x2 >= x1 and y2 >= y1.
        scores: (N,) finite.
        iou_threshold: a number in [0, 1].
    Returns:
        (boxes float32 (N, 4), scores float32 (N,), iou_threshold float).
    """
    boxes = as_boxes(boxes, "boxes")                                   # (N, 4)
    scores = as_float_array(scores, "scores", ndim=1)                  # (N,)
    if scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"scores: expected shape ({boxes.shape[0]},) to match boxes "
                         f"{tuple(boxes.shape)}, got {tuple(scores.shape)}")
    try:
        thr = float(iou_threshold)
    except (TypeError, ValueError):
        raise ValueError(f"iou_threshold: expected a number in [0, 1], got {iou_threshold!r}") from None
    if not 0.0 <= thr <= 1.0:                                          # also rejects NaN
        raise ValueError(f"iou_threshold: expected a number in [0, 1], got {thr}")
    return boxes, scores, thr


def _score_order(scores):
    """Indices that sort scores from highest to lowest; ties keep the lower index first."""
    return np.argsort(-scores, kind="stable")                          # (N,) int64


def nms(boxes, scores, iou_threshold):
    """Greedy NMS (section 3.3): the indices of the boxes kept, best score first.

    One IoU row per kept box: the kept box against every later box in score order, computed
    with whole-array NumPy operations; boxes already suppressed are skipped as candidates.

    Args:
        boxes: (N, 4) xyxy float boxes.
        scores: (N,) scores; higher is better.
        iou_threshold: in [0, 1]; a box is suppressed when its IoU with a kept, higher-scored
            box is strictly greater than this.
    Returns:
        (K,) int64 indices into `boxes`, sorted by score descending (ties: lower index first).
        N = 0 gives an empty int64 array.
    """
    boxes, scores, thr = check_nms_inputs(boxes, scores, iou_threshold)
    thr = np.float32(thr)                       # compare in float32, the precision of the IoU
    order = _score_order(scores)                                       # (N,)
    ranked = boxes[order]                                              # (N, 4) best first
    # One contiguous array per coordinate: slicing them gives views, so a step copies nothing.
    x1, y1, x2, y2 = (np.ascontiguousarray(ranked[:, k]) for k in range(4))   # each (N,)
    area = (x2 - x1) * (y2 - y1)                                       # (N,)

    n = len(order)
    alive = np.ones(n, dtype=bool)              # alive[r]: the box at rank r is not suppressed
    keep = []
    for r in range(n):
        if not alive[r]:
            continue
        keep.append(r)                          # the best box still alive
        later = slice(r + 1, n)
        # IoU of box r with every later box: an (n - r - 1,) row of the IoU matrix.
        iw = np.minimum(x2[r], x2[later]) - np.maximum(x1[r], x1[later])
        ih = np.minimum(y2[r], y2[later]) - np.maximum(y1[r], y1[later])
        inter = np.maximum(iw, 0) * np.maximum(ih, 0)                  # 0 when apart
        union = area[r] + area[later] - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        alive[later] &= iou <= thr              # suppress IoU > threshold, strictly
    return order[np.array(keep, dtype=np.int64)]


def _pair_iou(a, b):
    """IoU of two float32 boxes, one number at a time (the same float32 steps as box_iou)."""
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), np.float32(0))
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), np.float32(0))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else np.float32(0)


def nms_reference(boxes, scores, iou_threshold):
    """Greedy NMS as two plain loops, to read (and to test `nms` against); O(N^2) Python steps.

    Same arguments and result as `nms`.
    """
    boxes, scores, thr = check_nms_inputs(boxes, scores, iou_threshold)
    thr = np.float32(thr)
    order = _score_order(scores)
    suppressed = np.zeros(len(boxes), dtype=bool)   # indexed by the original box index
    keep = []
    for rank, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(i)
        for j in order[rank + 1:]:                  # every lower-scored box
            if not suppressed[j] and _pair_iou(boxes[i], boxes[j]) > thr:
                suppressed[j] = True
    return np.array(keep, dtype=np.int64)


def _as_classes(classes, n):
    """(N,) int64 class labels; whole numbers only."""
    c = np.asarray(classes)
    if c.ndim != 1 or c.shape[0] != n:
        raise ValueError(f"classes: expected shape ({n},) to match boxes, got {tuple(c.shape)}")
    if c.size and not np.issubdtype(c.dtype, np.integer):
        as_float_array(c, "classes", ndim=1)                           # NaN / Inf / not numbers
        if np.any(c != np.round(c)):
            raise ValueError("classes: expected whole-number class labels")
    return c.astype(np.int64)


def batched_nms(boxes, scores, classes, iou_threshold, nms_fn=nms):
    """Class-wise NMS: boxes of different classes never suppress each other.

    Args:
        boxes: (N, 4) xyxy.
        scores: (N,).
        classes: (N,) integer class label of each box.
        iou_threshold: in [0, 1], as in `nms`.
        nms_fn: the single-class NMS to run, called as nms_fn(boxes, scores, iou_threshold) on
            validated float32 arrays (ops passes the chosen backend's nms).
    Returns:
        (K,) int64 indices into `boxes` of the boxes kept in any class, sorted by score
        descending (ties: lower index first).  N = 0 gives an empty int64 array.
    """
    boxes, scores, thr = check_nms_inputs(boxes, scores, iou_threshold)
    classes = _as_classes(classes, len(boxes))                        # (N,)
    kept = [np.zeros(0, dtype=np.int64)]
    for c in np.unique(classes):
        members = np.flatnonzero(classes == c)                         # this class's boxes
        local = np.asarray(nms_fn(boxes[members], scores[members], thr), dtype=np.int64)
        kept.append(members[local])
    kept = np.sort(np.concatenate(kept))                               # ascending index
    return kept[_score_order(scores[kept])]                            # by score, stable
