"""Boxes: the formats every later stage speaks, their area, and their overlap (IoU).

A box here is a float32 row (x1, y1, x2, y2) in continuous pixel coordinates, so its width is
x2 - x1 and its height y2 - y1 (no "+1": the paper's released code added one; see anchors.py).
Three spellings of the same box appear in this project:

    xyxy    (x1, y1, x2, y2)   corners; what every function takes and returns
    cxcywh  (cx, cy, w, h)     centre and size; what eq. (2) of the paper is written in
    rchw    (r, c, h, w)       row = y1, column = x1, height, width; the seed code's format

Intersection over union (IoU) is the overlap measure of the paper (sections 3.1.2, 3.3):
IoU(a, b) = area(a ∩ b) / area(a ∪ b).  Two boxes with zero union (both of zero area)
have IoU 0 here, never NaN.

>>> import numpy as np
>>> a = np.array([[0, 0, 10, 10]], np.float32)
>>> b = np.array([[5, 0, 15, 10]], np.float32)
>>> box_iou(a, b)          # overlap 5 x 10 = 50; union 100 + 100 - 50 = 150
array([[0.33333334]], dtype=float32)
"""
import numpy as np

from ._checks import as_boxes, as_float_array

__all__ = [
    "xyxy_to_cxcywh", "cxcywh_to_xyxy", "xyxy_to_rchw", "rchw_to_xyxy",
    "box_area", "box_iou", "clip_boxes", "remove_small_boxes", "check_image_shape",
    "check_min_size",
]


# ---- formats ---------------------------------------------------------------------------------

def xyxy_to_cxcywh(boxes):
    """Corners -> centre and size.

    Args:
        boxes: (N, 4) xyxy, x2 >= x1 and y2 >= y1.
    Returns:
        (N, 4) float32 (cx, cy, w, h).

    >>> xyxy_to_cxcywh([[0, 0, 10, 4]])
    array([[ 5.,  2., 10.,  4.]], dtype=float32)
    """
    b = as_boxes(boxes, "boxes")                         # (N, 4)
    w = b[:, 2] - b[:, 0]
    h = b[:, 3] - b[:, 1]
    cx = b[:, 0] + 0.5 * w
    cy = b[:, 1] + 0.5 * h
    return np.stack([cx, cy, w, h], axis=1).astype(np.float32)


def cxcywh_to_xyxy(boxes):
    """Centre and size -> corners.

    Args:
        boxes: (N, 4) (cx, cy, w, h) with w, h >= 0.
    Returns:
        (N, 4) float32 xyxy.

    >>> cxcywh_to_xyxy([[5, 2, 10, 4]])
    array([[ 0.,  0., 10.,  4.]], dtype=float32)
    """
    b = _sized(boxes, "boxes", "(cx, cy, w, h)")         # (N, 4)
    half_w = 0.5 * b[:, 2]
    half_h = 0.5 * b[:, 3]
    return np.stack([b[:, 0] - half_w, b[:, 1] - half_h,
                     b[:, 0] + half_w, b[:, 1] + half_h], axis=1).astype(np.float32)


def xyxy_to_rchw(boxes):
    """Corners -> the seed's (row, col, height, width) = (y1, x1, y2 - y1, x2 - x1).

    >>> xyxy_to_rchw([[1, 2, 11, 6]])     # x1=1, y1=2: row 2, column 1, height 4, width 10
    array([[ 2.,  1.,  4., 10.]], dtype=float32)
    """
    b = as_boxes(boxes, "boxes")                         # (N, 4)
    return np.stack([b[:, 1], b[:, 0], b[:, 3] - b[:, 1], b[:, 2] - b[:, 0]],
                    axis=1).astype(np.float32)


def rchw_to_xyxy(boxes):
    """The seed's (row, col, height, width) -> corners (col, row, col + width, row + height).

    >>> rchw_to_xyxy([[2, 1, 4, 10]])
    array([[ 1.,  2., 11.,  6.]], dtype=float32)
    """
    b = _sized(boxes, "boxes", "(r, c, h, w)")           # (N, 4)
    r, c, h, w = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    return np.stack([c, r, c + w, r + h], axis=1).astype(np.float32)


def _sized(boxes, name, layout):
    """(N, 4) float32 in a format whose last two columns are sizes; sizes must be >= 0."""
    b = as_float_array(boxes, name, ndim=2, last_dim=4)
    if b.size:
        bad = (b[:, 2] < 0) | (b[:, 3] < 0)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{name}: box {i} of {layout} has a negative size: {b[i].tolist()}")
    return b


# ---- area and overlap ------------------------------------------------------------------------

def box_area(boxes):
    """Area (x2 - x1) * (y2 - y1) of each box.

    Args:
        boxes: (N, 4) xyxy.
    Returns:
        (N,) float32.

    >>> box_area([[0, 0, 10, 4], [3, 3, 3, 9]])   # the second box has zero width
    array([40.,  0.], dtype=float32)
    """
    b = as_boxes(boxes, "boxes")
    return _area(b)


def _area(b):
    return ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).astype(np.float32)   # (N,)


def box_iou(boxes1, boxes2):
    """Pairwise intersection over union: the inputs checked, then `_box_iou`, the NumPy reference
    that ops.box_iou dispatches to.

    Args:
        boxes1: (N, 4) xyxy.
        boxes2: (M, 4) xyxy.
    Returns:
        (N, M) float32; entry [i, j] = IoU(boxes1[i], boxes2[j]) in [0, 1].  A pair whose union is
        zero (two zero-area boxes) gets 0, not NaN.  N = 0 or M = 0 gives an empty (N, M) array.

    >>> box_iou([[0, 0, 2, 2], [0, 0, 0, 0]], [[1, 1, 3, 3], [0, 0, 0, 0]])
    array([[0.14285715, 0.        ],
           [0.        , 0.        ]], dtype=float32)
    """
    return _box_iou(as_boxes(boxes1, "boxes1"), as_boxes(boxes2, "boxes2"))


def _box_iou(a, b):
    """box_iou of checked (N, 4) and (M, 4) float32 arrays (ops dispatches here)."""
    area_a = _area(a)                                    # (N,)
    area_b = _area(b)                                    # (M,)
    # The intersection is the box between the larger top-left and the smaller bottom-right
    # corner; when those cross, the overlap is empty and its sides clamp to 0.
    # (In-place steps: each fresh (N, M) array costs more than the arithmetic on it.)
    iw = np.minimum(a[:, None, 2], b[None, :, 2])                    # (N, M) overlap's right edge
    iw -= np.maximum(a[:, None, 0], b[None, :, 0])                   # minus its left edge: width
    ih = np.minimum(a[:, None, 3], b[None, :, 3])                    # (N, M) bottom edge
    ih -= np.maximum(a[:, None, 1], b[None, :, 1])                   # minus top edge: height
    inter = np.maximum(iw, 0, out=iw)                                # (N, M) clamp, then
    inter *= np.maximum(ih, 0, out=ih)                               #   width * height
    union = area_a[:, None] + area_b[None, :]                        # (N, M)
    union -= inter
    # inter / union where union > 0, else 0 (a masked divide: boolean indexing is ~2x slower)
    return np.divide(inter, union, out=np.zeros(inter.shape, np.float32), where=union > 0)


# ---- clipping and filtering ------------------------------------------------------------------

def check_image_shape(image_shape, name="image_shape"):
    """(height, width) of an image as two non-negative finite floats; a clear error otherwise."""
    try:
        h, w = (float(v) for v in image_shape)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected (height, width), got {image_shape!r}") from None
    if not (np.isfinite(h) and np.isfinite(w)) or h < 0 or w < 0:
        raise ValueError(f"{name}: expected non-negative finite (height, width), got {image_shape!r}")
    return h, w


def clip_boxes(boxes, image_shape):
    """Clip boxes to the image: x into [0, width], y into [0, height].

    Args:
        boxes: (N, 4) xyxy.
        image_shape: (height, width) of the image.
    Returns:
        (N, 4) float32.  A box wholly outside the image becomes a zero-width or zero-height box
        on the border (remove_small_boxes drops it).

    >>> clip_boxes([[-5, 2, 30, 50]], image_shape=(40, 20))
    array([[ 0.,  2., 20., 40.]], dtype=float32)
    """
    return _clip_boxes(as_boxes(boxes, "boxes"), check_image_shape(image_shape))


def _clip_boxes(b, image_shape):
    """clip_boxes of checked (N, 4) float32 boxes and a checked (height, width)."""
    h, w = image_shape
    out = b.copy()
    out[:, 0::2] = np.clip(b[:, 0::2], 0, w)             # x1, x2
    out[:, 1::2] = np.clip(b[:, 1::2], 0, h)             # y1, y2
    return out


def remove_small_boxes(boxes, min_size):
    """Indices of the boxes that are at least `min_size` wide AND tall (section 3.3's proposals).

    Args:
        boxes: (N, 4) xyxy.
        min_size: a number >= 0, in the same pixels as the boxes.
    Returns:
        (K,) int64 indices into boxes, ascending.

    >>> remove_small_boxes([[0, 0, 20, 20], [0, 0, 20, 5], [0, 0, 16, 16]], min_size=16)
    array([0, 2])
    """
    return _remove_small_boxes(as_boxes(boxes, "boxes"), check_min_size(min_size))


def check_min_size(min_size):
    """min_size as a float, finite and >= 0; a ValueError naming it otherwise."""
    try:
        value = float(min_size)
    except (TypeError, ValueError):
        value = float("nan")
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"min_size: expected a finite number >= 0, got {min_size!r}")
    return value


def _remove_small_boxes(b, min_size):
    """remove_small_boxes of checked (N, 4) float32 boxes and a checked min_size."""
    w = b[:, 2] - b[:, 0]
    h = b[:, 3] - b[:, 1]
    return np.flatnonzero((w >= min_size) & (h >= min_size)).astype(np.int64)


def xyxy_to_xywh(boxes):
    """(N, 4) x1, y1, x2, y2 -> (N, 4) float64 x, y, w, h, COCO's box format (exact for float32)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)
