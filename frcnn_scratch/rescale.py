"""The paper's input scale (section 3.3, "re-scale the images such that their shorter side is
s = 600 pixels"): `compute_scale` finds the scale, `resize_image` resamples bilinearly.  Used by
the model's `detect` and by the datasets (data/transforms.py, data/dataset.py)."""
import numpy as np

from ._checks import as_float_array, positive_number


def source_coords(n_out, n_in, extent=None):
    """Where each of n_out output pixel centres falls on an axis of n_in input pixels.

    extent: how many input pixels the picture spans, when its last pixel is only partly
    inside it (an image reduced by f x f blocks spans H / f pixels of its ceil(H / f)); None: n_in.
    Returns:
        (lo (n_out,) int64, hi (n_out,) int64, frac (n_out,) float32): the two input pixels to blend
        and the weight of `hi`; output = (1 - frac) * input[lo] + frac * input[hi].
    """
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * ((n_in if extent is None else extent)
                                                        / n_out) - 0.5
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


def resize_image(image, out_height, out_width, extent=None):
    """Bilinear resampling of an image to (out_height, out_width), written in NumPy.

    Pixel centres sit at half-integers (pixel i covers [i, i + 1)), so output pixel i samples the
    input at (i + 0.5) / s - 0.5 with s = out / in per axis, clamped to the image ("half-pixel"
    convention, the one OpenCV's and PIL's bilinear resize use when upscaling).

    Args:
        image: (H, W, C) or (H, W) float array.
        out_height, out_width: positive ints.
        extent: (h, w), the input pixels the picture spans when its last row and column are
            partial (see source_coords); None: the whole input.
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

    extent_h, extent_w = (None, None) if extent is None else extent
    y0, y1, wy = source_coords(out_h, in_h, extent_h)
    x0, x1, wx = source_coords(out_w, in_w, extent_w)
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
