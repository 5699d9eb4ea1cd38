"""Image transforms that keep boxes in step: resize (the paper's image scaling) and horizontal flip.

Faster R-CNN trains and tests on images rescaled so that the shorter side is `min_size` pixels
(600 in the paper, Section 4) unless that makes the longer side exceed `max_size` (1000), and it
flips training images horizontally (the paper's only data augmentation). Both functions here are
pure: they return a new sample and never modify the one passed in.

A sample is dict(image=(H, W, 3) float32 in [0, 1], boxes=(G, 4) float32 xyxy, labels=(G,) int64,
difficult=(G,) bool, id=str); keys other than image and boxes are carried over unchanged.
"""
import numpy as np

from .._checks import as_boxes, as_float_array, positive_number


def _check_sample(sample):
    """Validate the two keys a transform touches; returns (image (H, W, C), boxes (G, 4))."""
    if not isinstance(sample, dict) or "image" not in sample:
        raise ValueError("sample: expected a dict with at least an 'image' key")
    image = as_float_array(sample["image"], "sample['image']", ndim=3)
    boxes = as_boxes(sample.get("boxes", np.zeros((0, 4), np.float32)), "sample['boxes']")
    return image, boxes


def source_coords(n_out, n_in):
    """Where each of n_out output pixel centres falls on an axis of n_in input pixels.

    Returns:
        (lo (n_out,) int64, hi (n_out,) int64, frac (n_out,) float32): the two input pixels to blend
        and the weight of `hi`; output = (1 - frac) * input[lo] + frac * input[hi].
    """
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0.0, n_in - 1)                       # clamp at the borders
    lo = np.floor(src).astype(np.int64)                     # (n_out,)
    hi = np.minimum(lo + 1, n_in - 1)                       # (n_out,)
    frac = (src - lo).astype(np.float32)                    # (n_out,)
    return lo, hi, frac


def bilinear_matrix(n_out, n_in):
    """(n_out, n_in) float32 matrix A with A @ v = the 1-D bilinear resampling of v (see source_coords).

    Bilinear resizing is separable: resized = A_y @ image @ A_x.T per channel. Handy for tiny
    inputs (a 4 x 4 noise grid); resize_image gathers instead, which is cheaper for big images.
    """
    lo, hi, frac = source_coords(int(n_out), int(n_in))
    a = np.zeros((int(n_out), int(n_in)), dtype=np.float32)
    rows = np.arange(int(n_out))
    np.add.at(a, (rows, lo), 1 - frac)
    np.add.at(a, (rows, hi), frac)
    return a


def resize_image(image, out_height, out_width):
    """Bilinear resampling of an image to (out_height, out_width), written in NumPy.

    Pixel centres sit at half-integers (pixel i covers [i, i + 1)), so output pixel i samples the
    input at (i + 0.5) / s - 0.5 with s = out / in per axis, clamped to the image ("half-pixel"
    convention, the one OpenCV's and PIL's bilinear resize use when upscaling).

    Args:
        image: (H, W, C) or (H, W) float array.
        out_height, out_width: positive ints.
    Returns:
        (out_height, out_width, C) (or (out_height, out_width)) float32.
    """
    image = as_float_array(image, "image")
    if image.ndim not in (2, 3) or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image: expected a non-empty (H, W) or (H, W, C) array, got {image.shape}")
    out_h, out_w = int(out_height), int(out_width)
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"out_height, out_width: expected positive ints, got {(out_height, out_width)}")
    in_h, in_w = image.shape[:2]

    y0, y1, wy = source_coords(out_h, in_h)
    x0, x1, wx = source_coords(out_w, in_w)
    extra = (1,) * (image.ndim - 2)                         # broadcast over channels
    wy = wy.reshape((-1, 1) + extra)                        # (out_h, 1, 1)
    wx = wx.reshape((1, -1) + extra)                        # (1, out_w, 1)
    top = image[y0][:, x0] * (1 - wx) + image[y0][:, x1] * wx      # (out_h, out_w, C)
    bottom = image[y1][:, x0] * (1 - wx) + image[y1][:, x1] * wx   # (out_h, out_w, C)
    return (top * (1 - wy) + bottom * wy).astype(np.float32)


def compute_scale(height, width, min_size, max_size):
    """The paper's image scale: shorter side -> min_size unless the longer side would exceed max_size.

    Returns:
        (scale float, new_height int, new_width int) with new sides = round(side * scale), at least 1.
    """
    min_size = positive_number(min_size, "min_size")
    max_size = positive_number(max_size, "max_size")
    scale = min_size / min(height, width)
    if round(max(height, width) * scale) > max_size:       # longer side too long: cap it instead
        scale = max_size / max(height, width)
    new_h = max(int(round(height * scale)), 1)
    new_w = max(int(round(width * scale)), 1)
    return scale, new_h, new_w


def resize(sample, min_size, max_size):
    """Rescale a sample so its shorter side is `min_size` (longer side at most `max_size`).

    The image is resampled bilinearly to (round(H * scale), round(W * scale)); boxes are multiplied
    by `scale` (as the paper's code does with im_scale) and clipped to the new image, since rounding
    the sides can shave a fraction of a pixel. Map predictions back with boxes / scale.

    Args:
        sample: dict with image (H, W, 3) and boxes (G, 4) xyxy.
        min_size: target length of the shorter side (pixels).
        max_size: cap on the longer side (pixels).
    Returns:
        (new sample, scale): the new sample has the resized image and scaled boxes; scale is a float.
    """
    image, boxes = _check_sample(sample)
    height, width = image.shape[:2]
    scale, new_h, new_w = compute_scale(height, width, min_size, max_size)
    out = dict(sample)
    out["image"] = resize_image(image, new_h, new_w)                      # (new_h, new_w, 3)
    scaled = boxes * np.float32(scale)                                     # (G, 4)
    scaled[:, 0::2] = np.clip(scaled[:, 0::2], 0, new_w)
    scaled[:, 1::2] = np.clip(scaled[:, 1::2], 0, new_h)
    out["boxes"] = scaled.astype(np.float32)
    return out, float(scale)


def hflip(sample):
    """Flip a sample left-right: image columns reversed, boxes x1' = W - x2, x2' = W - x1.

    With continuous coordinates (pixel i covers [i, i + 1)) the mirror of x is W - x, so a box stays
    tight around its flipped pixels. Flipping twice gives the sample back exactly.

    Args:
        sample: dict with image (H, W, 3) and boxes (G, 4) xyxy.
    Returns:
        A new sample.
    """
    image, boxes = _check_sample(sample)
    width = image.shape[1]
    out = dict(sample)
    out["image"] = np.ascontiguousarray(image[:, ::-1])                      # (H, W, 3)
    flipped = boxes.copy()                                                   # (G, 4)
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    out["boxes"] = flipped
    return out
