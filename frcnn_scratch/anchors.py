"""Anchors (section 3.1.1): k reference boxes at every position of the feature map.

At each sliding-window position the RPN predicts k proposals relative to k reference boxes,
the anchors: every combination of a few scales (areas) and aspect ratios, centred on the
window.  The paper uses 3 scales (box areas 128², 256², 512²) and 3 ratios (1:2, 1:1, 2:1),
so k = 9.  Here, as in the paper's code, ratio = height / width and the scales multiply the
feature stride (16): 16 * (8, 16, 32) = (128, 256, 512).

Two steps:
    generate_anchors   the k base anchors around one cell, (k, 4)
    shift_anchors      copy them to every cell of an H x W map, (H * W * k, 4)
and anchors_inside marks the ones that lie within the image (cross-boundary anchors are
ignored in training, section 3.3).

The paper's released code measured boxes in whole pixels (width = x2 - x1 + 1) and rounded the
widths; `legacy=True` reproduces its nine anchors exactly:

>>> generate_anchors(legacy=True).astype(int)
array([[ -84,  -40,   99,   55],
       [-176,  -88,  191,  103],
       [-360, -184,  375,  199],
       [ -56,  -56,   71,   71],
       [-120, -120,  135,  135],
       [-248, -248,  263,  263],
       [ -36,  -80,   51,   95],
       [ -80, -168,   95,  183],
       [-168, -344,  183,  359]])

The default (legacy=False) boxes are continuous: width = x2 - x1, area exactly (16 * scale)²,
centred at (8, 8), the centre of the first 16 x 16 cell:

>>> generate_anchors(ratios=(1,), scales=(8,))
array([[-56., -56.,  72.,  72.]], dtype=float32)
"""
import numpy as np

from ._checks import as_boxes, as_float_array, finite_number, positive_number, whole_number
from .boxes import check_image_shape

__all__ = ["generate_anchors", "shift_anchors", "anchors_inside"]


# ---- small helpers named after the geometry --------------------------------------------------
# A box is held here as its centre (cx, cy) and size (w, h); these four helpers move between
# that and corners, and enumerate the ratios and scales.  `extra` is 1 in the legacy pixel
# convention (a box from pixel x1 to pixel x2 covers x2 - x1 + 1 pixels) and 0 otherwise.

def _size_and_centre(box, extra):
    """One box (x1, y1, x2, y2) -> (w, h, cx, cy)."""
    w = box[2] - box[0] + extra
    h = box[3] - box[1] + extra
    return w, h, box[0] + 0.5 * (w - extra), box[1] + 0.5 * (h - extra)


def _boxes_around(ws, hs, cx, cy, extra):
    """Widths (n,) and heights (n,) around one centre -> (n, 4) corner boxes."""
    half_w = 0.5 * (np.asarray(ws, np.float64) - extra)
    half_h = 0.5 * (np.asarray(hs, np.float64) - extra)
    return np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=1)


def _ratio_variants(box, ratios, legacy):
    """Keep the box's area, change its shape: one box per ratio h / w -> (len(ratios), 4)."""
    extra = 1 if legacy else 0
    w, h, cx, cy = _size_and_centre(box, extra)
    area = w * h
    ws = np.sqrt(area / ratios)                          # w * h = area and h = ratio * w
    hs = ws * ratios
    if legacy:                                           # the paper's code rounded both sides
        ws = np.round(ws)
        hs = np.round(ws * ratios)
    return _boxes_around(ws, hs, cx, cy, extra)


def _scale_variants(box, scales, legacy):
    """Keep the box's shape, multiply its sides by each scale -> (len(scales), 4)."""
    extra = 1 if legacy else 0
    w, h, cx, cy = _size_and_centre(box, extra)
    return _boxes_around(w * scales, h * scales, cx, cy, extra)


# ---- the stage -------------------------------------------------------------------------------

def generate_anchors(base_size=16, ratios=(0.5, 1, 2), scales=(8, 16, 32), legacy=False):
    """The k = len(ratios) * len(scales) base anchors of one feature-map cell (section 3.1.1).

    Args:
        base_size: side of the cell in image pixels (the feature stride), > 0.
        ratios: aspect ratios h / w, each > 0.
        scales: side multipliers of base_size, each > 0; areas are (base_size * scale)².
        legacy: True -> the paper's released code exactly (pixel-inclusive widths, centre
            (base_size - 1) / 2 = 7.5, widths and heights rounded); False -> continuous boxes
            centred at (base_size / 2, base_size / 2).
    Returns:
        (k, 4) float32 xyxy, ratio-major and scale-minor: row i * len(scales) + j has
        ratios[i] and scales[j].

    >>> a = generate_anchors()
    >>> a.shape, float((a[4, 2] - a[4, 0]) * (a[4, 3] - a[4, 1])) == 256.0 ** 2
    ((9, 4), True)
    """
    base_size = positive_number(base_size, "base_size")
    ratios = _positive_list(ratios, "ratios")            # (R,)
    scales = _positive_list(scales, "scales")            # (S,)
    if legacy:
        base = np.array([0, 0, base_size - 1, base_size - 1], np.float64)
    else:
        base = np.array([0, 0, base_size, base_size], np.float64)
    by_ratio = _ratio_variants(base, ratios, legacy)     # (R, 4)
    anchors = [_scale_variants(box, scales, legacy) for box in by_ratio]   # R x (S, 4)
    return np.concatenate(anchors, axis=0).astype(np.float32)             # (R * S, 4)


def _positive_list(values, name):
    v = as_float_array(values, name, ndim=1, allow_empty=False).astype(np.float64)
    if np.any(v <= 0):
        raise ValueError(f"{name}: expected positive numbers, got {v.tolist()}")
    return v


def shift_anchors(base_anchors, feat_height, feat_width, stride):
    """Copy the k base anchors to every cell of an H x W feature map (section 3.1.1).

    Cell (y, x) adds (x * stride, y * stride) to every corner, so with the default anchors and
    stride = base_size the anchors of cell (y, x) are centred at ((x + 0.5) * stride,
    (y + 0.5) * stride).

    Args:
        base_anchors: (k, 4) xyxy, from generate_anchors.
        feat_height, feat_width: H, W >= 0 (ints).
        stride: image pixels per feature-map cell, > 0.
    Returns:
        (H * W * k, 4) float32 in the order (y, x, anchor): row (y * W + x) * k + a.

    >>> shift_anchors([[0, 0, 16, 16]], 2, 3, stride=16)[:, :2]   # (x1, y1) of each cell
    array([[ 0.,  0.],
           [16.,  0.],
           [32.,  0.],
           [ 0., 16.],
           [16., 16.],
           [32., 16.]], dtype=float32)
    """
    base = as_boxes(base_anchors, "base_anchors")        # (k, 4)
    H = whole_number(feat_height, "feat_height")
    W = whole_number(feat_width, "feat_width")
    stride = positive_number(stride, "stride")
    ys, xs = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")       # (H, W) each
    sx = xs.reshape(-1) * stride                                          # (H * W,)
    sy = ys.reshape(-1) * stride
    shifts = np.stack([sx, sy, sx, sy], axis=1)                           # (H * W, 4)
    anchors = shifts[:, None, :] + base[None, :, :].astype(np.float64)    # (H * W, k, 4)
    return anchors.reshape(-1, 4).astype(np.float32)


def anchors_inside(anchors, image_shape, allowed_border=0):
    """Which anchors lie inside the image (the others "cross image boundaries", section 3.3).

    An anchor is inside when x1 >= -b, y1 >= -b, x2 <= W + b, y2 <= H + b, with b the allowed
    border.  Boxes here are continuous, so x2 = W touches the right edge and is inside; the
    paper's code, with pixel-inclusive boxes, wrote the same test as x2 < W.

    Args:
        anchors: (A, 4) xyxy.
        image_shape: (height, width).
        allowed_border: pixels an anchor may stick out on each side, finite.
    Returns:
        (A,) bool.

    >>> anchors_inside([[0, 0, 10, 10], [-1, 0, 5, 5], [0, 0, 10, 11]], image_shape=(10, 10))
    array([ True, False, False])
    """
    return _anchors_inside(as_boxes(anchors, "anchors"), check_image_shape(image_shape),
                           finite_number(allowed_border, "allowed_border"))


def _anchors_inside(a, image_shape, b):
    """anchors_inside of checked (A, 4) anchors, (height, width) and border b."""
    h, w = image_shape
    return ((a[:, 0] >= -b) & (a[:, 1] >= -b) & (a[:, 2] <= w + b) & (a[:, 3] <= h + b))
