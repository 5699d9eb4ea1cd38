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
       (IoU == threshold survives; IoU is computed in float32 like boxes.box_iou and compared
       with the threshold as a float64 number, as torchvision's nms does; a pair with zero
       union has IoU 0, so a zero-area box suppresses nothing);
    4. repeat 2-3 until no box is alive.

>>> import numpy as np
>>> boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30]], np.float32)
>>> nms(boxes, np.array([0.9, 0.8, 0.7]), iou_threshold=0.5)   # box 1 overlaps box 0: IoU 9/11
array([0, 2])
"""
import numpy as np

from ._checks import as_boxes, as_float_array, as_labels, whole_number

__all__ = ["check_nms_inputs", "check_iou_threshold", "check_classes", "float32_threshold",
           "nms", "nms_reference", "batched_nms"]


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
    return boxes, scores, check_iou_threshold(iou_threshold)


def check_iou_threshold(iou_threshold, name="iou_threshold"):
    """An NMS threshold: a number in [0, 1] -> float; a ValueError naming `name` otherwise."""
    try:
        thr = float(iou_threshold)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number in [0, 1], got {iou_threshold!r}") from None
    if not 0.0 <= thr <= 1.0:                                          # also rejects NaN
        raise ValueError(f"{name}: expected a number in [0, 1], got {thr}")
    return thr


def float32_threshold(iou_threshold):
    """The float32 t such that, for every float32 IoU x, x > t exactly when x > iou_threshold
    compared as float64 numbers.

    IoUs are float32, the threshold a Python float: float32(0.3) rounds up, past 0.3, so an IoU
    equal to float32(0.3) is above 0.3 and must be suppressed, but would not be if compared with
    float32(0.3).  The largest float32 not above the threshold gives the float64 answer with a
    float32 comparison (the kernels use it too).

    >>> float(np.float32(0.3)) > 0.3, bool(float32_threshold(0.3) < 0.3)
    (True, True)
    """
    t = np.float32(iou_threshold)
    if float(t) > float(iou_threshold):
        t = np.nextafter(t, np.float32(-np.inf))
    return t


def _score_order(scores):
    """Indices that sort scores from highest to lowest; ties keep the lower index first."""
    return np.argsort(-scores, kind="stable")                          # (N,) int64


BLOCK = 64   # boxes whose IoU rows `nms` computes at once


def nms(boxes, scores, iou_threshold, max_keep=None):
    """Greedy NMS (section 3.3): the indices of the boxes kept, best score first.

    The greedy rule needs one IoU row per kept box: that box against every later one.  Doing
    that one row at a time costs a dozen small NumPy calls per kept box, so this walks the
    score-ranked boxes in blocks of BLOCK and, for each block:

        1. computes the IoU rows of the block's live boxes against every live box from the
           block on, as one (r, M) matrix (its first r columns are the block itself);
        2. runs the greedy rule inside the block on its (r, r) corner: a loop over r booleans;
        3. lets the block's kept boxes suppress every later live box in one vectorised step.

    The result is exactly that of the one-box-at-a-time loop (`nms_reference`, tested equal).
    The same tiling is what GPU NMS kernels do (see kernels/nms.py).

    Args:
        boxes: (N, 4) xyxy float boxes.
        scores: (N,) scores; higher is better.
        iou_threshold: in [0, 1]; a box is suppressed when its IoU with a kept, higher-scored
            box is strictly greater than this.
        max_keep: None, or stop once this many boxes are kept (the proposal layer keeps only its
            post-NMS top N).  A kept box is never revisited, so these are the first max_keep of
            the whole NMS, and the rest of the boxes need not be compared at all.
    Returns:
        (K,) int64 indices into `boxes`, sorted by score descending (ties: lower index first).
        N = 0 gives an empty int64 array.
    """
    boxes, scores, thr = check_nms_inputs(boxes, scores, iou_threshold)
    max_keep = None if max_keep is None else whole_number(max_keep, "max_keep")
    return _nms(boxes, scores, thr, max_keep)


def _nms(boxes, scores, iou_threshold, max_keep=None):
    """nms of checked inputs (check_nms_inputs; max_keep None or an int): the blocked greedy loop
    that nms describes.  ops and batched_nms call it."""
    thr = float32_threshold(iou_threshold)      # IoU > thr in float32 == IoU > threshold in float64
    order = _score_order(scores)                                       # (N,)
    ranked = boxes[order]                                              # (N, 4) best first
    x1, y1, x2, y2 = (ranked[:, k] for k in range(4))                  # each (N,)
    area = (x2 - x1) * (y2 - y1)                                       # (N,)

    n = len(order)
    alive = np.ones(n, dtype=bool)              # alive[i]: box of rank i is not yet decided
    keep = []                                   # ranks kept, in order
    for start in range(0, n, BLOCK):
        live = np.flatnonzero(alive[start:]) + start       # (M,) live ranks from this block on
        r = int(np.count_nonzero(alive[start:start + BLOCK]))   # live[:r] lie in this block
        if r == 0:
            continue
        # 1. IoU of the block's live boxes (rows) with all live boxes from here on (columns).
        bx1, by1, bx2, by2, barea = x1[live], y1[live], x2[live], y2[live], area[live]   # (M,)
        iw = np.minimum(bx2[:r, None], bx2) - np.maximum(bx1[:r, None], bx1)   # (r, M)
        ih = np.minimum(by2[:r, None], by2) - np.maximum(by1[:r, None], by1)   # (r, M)
        inter = np.maximum(iw, 0) * np.maximum(ih, 0)                  # 0 when apart
        union = barea[:r, None] + barea - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        overlaps = iou > thr                    # (r, M) suppress on IoU > threshold, strictly
        # 2. Greedy inside the block, in rank order.  (Marks that row k puts on itself or on
        #    earlier boxes of the block change nothing: those are already decided.)
        kept = np.zeros(r, dtype=bool)
        suppressed = np.zeros(r, dtype=bool)
        for k in range(r):
            if not suppressed[k]:
                kept[k] = True
                suppressed |= overlaps[k, :r]
        keep.extend(live[:r][kept])
        alive[live[:r]] = False                 # the block's boxes are decided
        if max_keep is not None and len(keep) >= max_keep:
            break                               # the later boxes cannot change these
        # 3. The block's kept boxes suppress the later live boxes they overlap.
        hit = overlaps[kept, r:].any(axis=0)                           # (M - r,)
        alive[live[r:][hit]] = False
    return order[np.array(keep[:max_keep], dtype=np.int64)]


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
    thr = float32_threshold(thr)                # IoU > thr in float32 == IoU > threshold in float64
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


def check_classes(classes, n):
    """(N,) int64 class labels, one per box: whole numbers of any sign (_checks.as_labels)."""
    return as_labels(classes, "classes", low=np.iinfo(np.int64).min, high=None, size=n)


def batched_nms(boxes, scores, classes, iou_threshold, nms_fn=None):
    """Class-wise NMS: boxes of different classes never suppress each other.

    Args:
        boxes: (N, 4) xyxy.
        scores: (N,).
        classes: (N,) integer class label of each box.
        iou_threshold: in [0, 1], as in `nms`.
        nms_fn: the single-class NMS to run, called as nms_fn(boxes, scores, iou_threshold) on
            checked float32 arrays; None: this file's nms (ops passes the chosen backend's).
    Returns:
        (K,) int64 indices into `boxes` of the boxes kept in any class, sorted by score
        descending (ties: lower index first).  N = 0 gives an empty int64 array.
    """
    boxes, scores, thr = check_nms_inputs(boxes, scores, iou_threshold)
    classes = check_classes(classes, len(boxes))                       # (N,)
    return _batched_nms(boxes, scores, classes, thr, nms_fn or _nms)


def _batched_nms(boxes, scores, classes, iou_threshold, nms_fn):
    """batched_nms of checked inputs ((N,) int64 classes); nms_fn runs on each class's boxes."""
    kept = [np.zeros(0, dtype=np.int64)]
    for c in np.unique(classes):
        members = np.flatnonzero(classes == c)                         # this class's boxes
        local = np.asarray(nms_fn(boxes[members], scores[members], iou_threshold),
                           dtype=np.int64)
        kept.append(members[local])
    kept = np.sort(np.concatenate(kept))                               # ascending index
    return kept[_score_order(scores[kept])]                            # by score, stable
