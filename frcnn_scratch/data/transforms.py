"""Image transforms that keep boxes in step: resize (the paper's image scaling) and horizontal flip.

Faster R-CNN trains and tests on images rescaled so that the shorter side is `min_size` pixels
(600 in the paper, Section 4) unless that makes the longer side exceed `max_size` (1000), and it
flips training images horizontally (the paper's only data augmentation). Both functions here are
pure: they return a new sample and never modify the one passed in.

A sample is dict(image=(H, W, 3) float32 in [0, 1], boxes=(G, 4) float32 xyxy, labels=(G,) int64,
difficult=(G,) bool, id=str); keys other than image and boxes are carried over unchanged.
"""
import numpy as np

from .._checks import as_boxes, as_float_array
from ..rescale import compute_scale, resize_image


def _check_sample(sample):
    """Validate the two keys a transform touches; returns (image (H, W, C), boxes (G, 4))."""
    if not isinstance(sample, dict) or "image" not in sample:
        raise ValueError("sample: expected a dict with at least an 'image' key")
    image = as_float_array(sample["image"], "sample['image']", ndim=3)
    boxes = as_boxes(sample.get("boxes", np.zeros((0, 4), np.float32)), "sample['boxes']")
    return image, boxes


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
