"""Box coding, eq. (2): a box as a small correction t = (tx, ty, tw, th) to an anchor.

The RPN (and later the detection head) does not predict corners.  It predicts how far to
move an anchor's centre, in units of the anchor's size, and how much to stretch it, on a
log scale.  With (x, y, w, h) a box's centre and size and (xa, ya, wa, ha) the anchor's:

    tx = (x - xa) / wa      ty = (y - ya) / ha      tw = log(w / wa)      th = log(h / ha)

encode turns boxes into t (the regression targets t*); decode turns predicted t back into
boxes.  Optional weights (wx, wy, ww, wh) multiply the four targets: (1, 1, 1, 1) for the RPN,
(10, 10, 5, 5) for the detection head, which is the same as dividing by the usual target
standard deviations (0.1, 0.1, 0.2, 0.2).  decode clamps tw and th at BBOX_CLAMP = log(1000/16)
so that one wild prediction cannot make exp() overflow into an infinite box.

>>> import numpy as np
>>> anchor = np.array([[0, 0, 10, 10]], np.float32)     # centre (5, 5), size 10 x 10
>>> box = np.array([[2, 0, 12, 20]], np.float32)        # centre (7, 10), size 10 x 20
>>> t = encode(box, anchor)                             # (2/10, 5/10, log 1, log 2)
>>> t
array([[0.2      , 0.5      , 0.       , 0.6931472]], dtype=float32)
>>> bool(np.allclose(decode(t, anchor), box, atol=1e-5))   # decode undoes encode (float32)
True
"""
import math

import numpy as np

from ._checks import as_boxes, as_float_array

__all__ = ["BBOX_CLAMP", "encode", "decode", "check_weights"]

BBOX_CLAMP = math.log(1000.0 / 16)   # largest tw, th decode uses: a box at most 62.5 x its anchor


def _centre_size(b):
    """(N, 4) xyxy -> four (N,) float64 arrays: cx, cy, w, h (continuous: w = x2 - x1)."""
    b = b.astype(np.float64)
    w = b[:, 2] - b[:, 0]
    h = b[:, 3] - b[:, 1]
    return b[:, 0] + 0.5 * w, b[:, 1] + 0.5 * h, w, h


def check_weights(weights):
    """(wx, wy, ww, wh): four positive finite numbers -> a tuple of floats (float32 values, as
    float32 arrays hold them).  Four numbers: no array scan."""
    try:
        w = np.asarray(weights, dtype=np.float32)
    except (TypeError, ValueError):
        w = None
    if w is None or w.shape != (4,) or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"weights: expected four positive numbers (wx, wy, ww, wh), got {weights!r}")
    return tuple(float(v) for v in w)


def _check_same_length(a, name_a, b, name_b):
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{name_a} and {name_b}: expected the same number of rows, "
                         f"got {a.shape[0]} and {b.shape[0]}")


def _check_positive_size(b, name):
    bad = (b[:, 2] - b[:, 0] <= 0) | (b[:, 3] - b[:, 1] <= 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name}: box {i} has zero width or height, so log(w / wa) of eq. (2) is "
                         f"undefined: {b[i].tolist()}")


def encode(boxes, anchors, weights=(1.0, 1.0, 1.0, 1.0)):
    """Regression targets t of eq. (2) that move each anchor onto its box.

    Args:
        boxes: (N, 4) xyxy, positive width and height (the ground truth each anchor matched).
        anchors: (N, 4) xyxy, positive width and height; row i pairs with boxes[i].
        weights: (wx, wy, ww, wh), each > 0, multiplying (tx, ty, tw, th).
    Returns:
        (N, 4) float32 t = (wx * tx, wy * ty, ww * tw, wh * th).  N = 0 gives (0, 4).
    """
    b = as_boxes(boxes, "boxes")                         # (N, 4)
    a = as_boxes(anchors, "anchors")                     # (N, 4)
    _check_same_length(b, "boxes", a, "anchors")
    _check_positive_size(a, "anchors")
    _check_positive_size(b, "boxes")
    return _encode(b, a, check_weights(weights))


def _encode(b, a, weights):
    """encode of checked boxes and anchors (float32 (N, 4), positive sizes) and checked weights."""
    wx, wy, ww, wh = weights
    x, y, w, h = _centre_size(b)                         # (N,) each
    xa, ya, wa, ha = _centre_size(a)
    tx = wx * (x - xa) / wa                              # eq. (2)
    ty = wy * (y - ya) / ha
    tw = ww * np.log(w / wa)
    th = wh * np.log(h / ha)
    return np.stack([tx, ty, tw, th], axis=1).astype(np.float32)   # (N, 4)


def decode(deltas, anchors, weights=(1.0, 1.0, 1.0, 1.0)):
    """Boxes from predicted t and their anchors: eq. (2) solved for (x, y, w, h).

        x = tx * wa + xa     y = ty * ha + ya     w = wa * exp(tw)     h = ha * exp(th)

    after dividing t by the weights and clamping tw, th at BBOX_CLAMP (from above only, as the
    paper's successors do: a tiny box is harmless, an infinite one is not).  decode(encode(b, a), a)
    gives b back whenever |log(w / wa)| and |log(h / ha)| are at most BBOX_CLAMP.

    Args:
        deltas: (N, 4) t = (tx, ty, tw, th) times weights.  Per-class outputs (N, C * 4) should
            be reshaped to (N * C, 4), with the anchors repeated to match.
        anchors: (N, 4) xyxy; row i pairs with deltas[i].
        weights: (wx, wy, ww, wh), each > 0, the same ones encode used.
    Returns:
        (N, 4) float32 xyxy boxes.  N = 0 gives (0, 4).
    """
    d = as_float_array(deltas, "deltas", ndim=2, last_dim=4)                      # (N, 4)
    a = as_boxes(anchors, "anchors")                     # (N, 4)
    _check_same_length(d, "deltas", a, "anchors")
    return _decode(d, a, check_weights(weights))


def _decode(d, a, weights):
    """decode of checked float32 deltas and anchors (N, 4) and checked weights."""
    d = d.astype(np.float64)
    wx, wy, ww, wh = weights
    xa, ya, wa, ha = _centre_size(a)                     # (N,) each
    tx, ty = d[:, 0] / wx, d[:, 1] / wy
    tw = np.minimum(d[:, 2] / ww, BBOX_CLAMP)
    th = np.minimum(d[:, 3] / wh, BBOX_CLAMP)
    x = tx * wa + xa                                     # eq. (2), inverted
    y = ty * ha + ya
    w = wa * np.exp(tw)
    h = ha * np.exp(th)
    return np.stack([x - 0.5 * w, y - 0.5 * h, x + 0.5 * w, y + 0.5 * h], axis=1).astype(np.float32)
