"""RoI max pooling: Fast R-CNN (Girshick, 2015), section 2.1 "The RoI pooling layer".

Each region of interest (RoI) on the feature map is cut into a fixed grid of ph x pw bins
and every bin is max-pooled, channel by channel, so that a RoI of any size becomes a
(C, ph, pw) block the fully connected head can take.

The rounding rules are those that torchvision.ops.roi_pool standardised:

* the RoI corners (x1, y1, x2, y2), in image pixels, are multiplied by spatial_scale
  (1/16 for VGG-16 conv5) and rounded half away from zero (C's round(), not numpy's
  round-half-to-even);
* the RoI covers max(end - start + 1, 1) cells on each axis (a corner is a cell, so a
  zero-width RoI still covers one);
* bin i of n covers cells floor(i * size / n) .. ceil((i + 1) * size / n) (end
  excluded) after the RoI's start, clipped to the map: neighbouring bins may share a cell;
* an empty bin (wholly outside the map) outputs 0 and argmax -1;
* the max takes the FIRST maximum in row-major order (this decides where the gradient goes).

The backward (section 2.3, "Back-propagation through RoI pooling layers") routes each
output gradient to the single input that won the max: the forward's `argmax`.

The file reads top down: roi_pool_reference, the paper's loop over RoIs, bins and cells; the
small helpers it uses (rounding, bin bounds), which the fast version uses too; then
roi_pool_forward, the same computation vectorised, which must equal the reference exactly
(values and argmax; tests/test_roi_pool.py checks it). Read the reference first.
"""
import numpy as np

from . import _checks


# ---- the teaching version: plain loops, as the paper describes it ----------------------------

def roi_pool_reference(features, rois, output_size, spatial_scale):
    """RoI max pooling (Fast R-CNN 2.1) as plain loops over RoIs, bins and cells.

    The same inputs, outputs and rounding rules as roi_pool_forward, which is this computation
    vectorised and must return exactly the same `out` and `argmax`. Only the channels are
    vectorised here: each step below handles all C channels of one cell at once.

    Args:
        features: (N, C, H, W) float32 feature maps.
        rois: (K, 5) float32 (batch index, x1, y1, x2, y2) in image pixels.
        output_size: int or (ph, pw), the bins per RoI.
        spatial_scale: positive float, feature cells per image pixel (1/16 at stride 16).
    Returns:
        out: (K, C, ph, pw) float32, the max of each bin (0 for an empty bin).
        argmax: (K, C, ph, pw) int64, flat index into features.reshape(-1) of each bin's first
            maximum in row-major order, -1 for an empty bin.
    The backward needs no loop of its own: roi_pool_backward adds each grad_out at its argmax.
    """
    features, rois, (ph, pw), spatial_scale = check_forward_inputs(
        features, rois, output_size, spatial_scale)
    N, C, H, W = features.shape
    K = len(rois)
    out = np.zeros((K, C, ph, pw), dtype=np.float32)        # empty bins keep 0 ...
    argmax = np.full((K, C, ph, pw), -1, dtype=np.int64)    # ... and argmax -1
    channels = np.arange(C)                                 # (C,)

    batch, (row_lo, row_hi), (col_lo, col_hi) = bin_cells(rois, (ph, pw), spatial_scale, (H, W))
    for k in range(K):                                      # every RoI
        n = batch[k]
        for i in range(ph):                                 # every bin (i, j)
            for j in range(pw):
                h0, h1 = row_lo[k, i], row_hi[k, i]
                w0, w1 = col_lo[k, j], col_hi[k, j]
                if h1 <= h0 or w1 <= w0:
                    continue                                    # empty bin (outside the map)
                best = np.full(C, -np.inf, dtype=np.float32)    # (C,) the max so far
                where = np.full(C, -1, dtype=np.int64)          # (C,) its h * W + w
                for h in range(h0, h1):                         # every cell of the bin, row-major
                    for w in range(w0, w1):
                        value = features[n, :, h, w]            # (C,)
                        larger = value > best                   # strictly: the first max stays
                        best[larger] = value[larger]
                        where[larger] = h * W + w
                out[k, :, i, j] = best                          # y_rj = max of x_i over bin R(r, j)
                argmax[k, :, i, j] = (n * C + channels) * (H * W) + where  # flat (n, c, h, w)
    return out, argmax


# ---- the pieces both versions use: corners to cells, bins -------------------------------------

def check_forward_inputs(features, rois, output_size, spatial_scale):
    """Validate the forward's inputs.

    Returns:
        features (N, C, H, W) float32, rois (K, 5) float32, (ph, pw), spatial_scale float.
    """
    features = _checks.as_features(features)                           # (N, C, H, W)
    spatial_scale = _checks.positive_number(spatial_scale, "spatial_scale")
    rois = _checks.as_rois(rois, num_images=features.shape[0],
                           spatial_scale=spatial_scale)                 # (K, 5)
    output_size = _checks.pair(output_size)
    return features, rois, output_size, spatial_scale


def round_half_away(x):
    """Round half away from zero, as C's round(): 2.5 -> 3, -2.5 -> -3 (np.round gives 2, -2)."""
    x = np.asarray(x, dtype=np.float64)  # float32 values plus 0.5 are exact in float64
    return (np.sign(x) * np.floor(np.abs(x) + 0.5)).astype(np.int64)


def scaled_roi_cells(rois, spatial_scale):
    """RoI corners in feature-map cells.

    Args:
        rois: (K, 5) float32 (batch index, x1, y1, x2, y2) in image pixels.
        spatial_scale: feature cells per image pixel (1/16 for a stride-16 map).
    Returns:
        batch (K,) int64, and x1, y1, x2, y2 (K,) int64: corners times spatial_scale (in float32,
        as torchvision computes them), rounded half away from zero.
    """
    corners = rois[:, 1:5] * np.float32(spatial_scale)  # (K, 4) float32
    x1, y1, x2, y2 = round_half_away(corners).T
    return rois[:, 0].astype(np.int64), x1, y1, x2, y2


def bin_bounds(start, end, pooled, limit):
    """Cell range [lo, hi) of each of `pooled` bins along one axis, for every RoI.

    Args:
        start, end: (K,) int64 first and last cell of each RoI (from scaled_roi_cells).
        pooled: number of bins along this axis (ph or pw).
        limit: map size along this axis (H or W); bins are clipped to [0, limit] (None: to
            [0, inf), for a drawing without a map).
    Returns:
        lo, hi: (K, pooled) int64; a bin is empty when hi <= lo.
    """
    size = np.maximum(end - start + 1, 1).astype(np.float32)        # (K,) cells in the RoI
    bin_size = (size / np.float32(pooled))[:, None]                  # (K, 1) float32
    i = np.arange(pooled, dtype=np.float32)[None, :]                 # (1, pooled)
    lo = np.floor(i * bin_size).astype(np.int64) + start[:, None]    # (K, pooled)
    hi = np.ceil((i + 1) * bin_size).astype(np.int64) + start[:, None]
    return np.clip(lo, 0, limit), np.clip(hi, 0, limit)


def bin_cells(rois, output_size, spatial_scale, map_size):
    """The geometry of RoI pooling: which cells each bin of each RoI takes the max over.

    scaled_roi_cells, then bin_bounds along y and along x.  roi_pool_reference, roi_pool_forward
    and viz's drawings all use it: there is one definition of a bin.

    Args:
        rois: (K, 5) float32 (batch index, x1, y1, x2, y2) in image pixels.
        output_size: (ph, pw).
        spatial_scale: feature cells per image pixel.
        map_size: (H, W) of the feature map, or None for no upper clip.
    Returns:
        batch (K,) int64; (row_lo, row_hi) (K, ph) int64; (col_lo, col_hi) (K, pw) int64:
        bin (i, j) of RoI k covers rows row_lo[k, i] .. row_hi[k, i] - 1 and columns
        col_lo[k, j] .. col_hi[k, j] - 1 (empty when hi <= lo).

    >>> batch, rows, cols = bin_cells(np.array([[0, 0, 0, 6, 0]], np.float32), (1, 3), 1.0, (8, 8))
    >>> cols            # 7 cells in 3 bins of 7/3: 0..2, 2..4, 4..6 (neighbours share a cell)
    (array([[0, 2, 4]]), array([[3, 5, 7]]))
    """
    (ph, pw), (H, W) = output_size, (None, None) if map_size is None else map_size
    batch, x1, y1, x2, y2 = scaled_roi_cells(rois, spatial_scale)      # (K,) each, whole cells
    return batch, bin_bounds(y1, y2, ph, H), bin_bounds(x1, x2, pw, W)


# ---- the same, vectorised: one max over packed keys finds both the value and where it is -----

def max_keys(features):
    """Pack every feature value and its position into one int64 so that ONE max finds both.

    A bin needs its maximum AND where the first maximum sits (row-major), for the backward.
    key = (value as an order-preserving int32) * 2**32 + (2**32 - 1 - h * W - w): a larger
    value gives a larger key, and among equal values the earlier position gives the larger key.
    So max(keys of a bin) names the bin's first maximum, and max is cheap and vectorised.
    (-0.0 is first made +0.0, since the two compare equal as floats.)

    Args:
        features: (N, C, H, W) float32.
    Returns:
        (N, H, W, C) int64 keys, channels last so a max over cells runs over whole channel rows.
    """
    N, C, H, W = features.shape
    values = np.ascontiguousarray(features.transpose(0, 2, 3, 1)) + np.float32(0.0)  # (N, H, W, C)
    bits = values.view(np.int32)
    order = bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))       # negative floats: flip to sort
    position = np.arange(H * W, dtype=np.int64).reshape(1, H, W, 1)
    return (order.astype(np.int64) << 32) | (0xFFFFFFFF - position)


def key_position(keys):
    """The h * W + w that max_keys packed into the low 32 bits."""
    return 0xFFFFFFFF - (keys & 0xFFFFFFFF)


def roi_pool_forward(features, rois, output_size, spatial_scale):
    """RoI max pooling (Fast R-CNN 2.1), torchvision.ops.roi_pool semantics, vectorised.

    out[k, c, i, j] = max of features[batch_k, c, h, w] over the cells (h, w) of bin (i, j)
    of RoI k, the bins given by bin_bounds. Exactly equal (values and argmax) to
    roi_pool_reference, the plain-loop version at the top of this file.

    Args:
        features: (N, C, H, W) float32 feature maps.
        rois: (K, 5) float32 (batch index, x1, y1, x2, y2) in image pixels.
        output_size: int or (ph, pw), the bins per RoI.
        spatial_scale: positive float, feature cells per image pixel (1/16 at stride 16).
    Returns:
        out: (K, C, ph, pw) float32, the max of each bin (0 for an empty bin).
        argmax: (K, C, ph, pw) int64, the flat index into features.reshape(-1) of each bin's
            first maximum in row-major order, -1 for an empty bin. roi_pool_backward consumes it.
    """
    return _roi_pool_forward(*check_forward_inputs(features, rois, output_size, spatial_scale))


def _roi_pool_forward(features, rois, output_size, spatial_scale):
    """roi_pool_forward of checked inputs (check_forward_inputs): ops dispatches here."""
    N, C, H, W = features.shape
    K = rois.shape[0]
    ph, pw = output_size

    batch, (row_lo, row_hi), (col_lo, col_hi) = bin_cells(rois, (ph, pw), spatial_scale, (H, W))
    empty = (row_hi <= row_lo)[:, :, None] | (col_hi <= col_lo)[:, None, :]   # (K, ph, pw)

    out = np.empty((K, C, ph, pw), dtype=np.float32)
    argmax = np.empty((K, C, ph, pw), dtype=np.int64)
    keys = max_keys(features)                                          # (N, H, W, C)
    # flat index of (batch, c, 0, 0), plus the 2**32 - 1 that key_position subtracts from
    channel_base = (np.arange(C, dtype=np.int64) * (H * W) + 0xFFFFFFFF)[:, None, None]  # (C, 1, 1)
    # One RoI's bin keys, channels last.  The spare 8 channels keep its rows from lying a power
    # of two apart in memory: reading the block channel by channel below is then ~7x faster.
    bin_max = np.zeros((ph, pw, C + 8), dtype=np.int64)[:, :, :C]     # (ph, pw, C)
    row_lo, row_hi, col_lo, col_hi = (a.tolist() for a in (row_lo, row_hi, col_lo, col_hi))
    for k in range(K):
        if empty[k].all():
            argmax[k] = -1
            continue
        plane = keys[batch[k]]                                         # (H, W, C)
        r0, r1 = min(row_lo[k]), max(row_hi[k])                        # rows any bin uses
        # The max over a bin's rectangle is the max over its rows of the max over its columns.
        col_max = np.zeros((r1 - r0, pw, C), dtype=np.int64)           # (rows, pw, C)
        for j, (w0, w1) in enumerate(zip(col_lo[k], col_hi[k])):
            if w1 > w0:
                np.maximum.reduce(plane[r0:r1, w0:w1], axis=1, out=col_max[:, j])
        for i, (h0, h1) in enumerate(zip(row_lo[k], row_hi[k])):
            if h1 > h0:
                np.maximum.reduce(col_max[h0 - r0:h1 - r0], axis=0, out=bin_max[i])
        # argmax = flat index of (batch, c, h, w) = batch C H W + c H W + key_position(key),
        # written channels first: (C, ph, pw)
        np.bitwise_and(bin_max.transpose(2, 0, 1), 0xFFFFFFFF, out=argmax[k])
        np.subtract(batch[k] * C * H * W + channel_base, argmax[k], out=argmax[k])
        if empty[k].any():
            argmax[k][:, empty[k]] = -1                                # empty bins: no maximum
    if empty.all():                                                    # (also: a map with no cells)
        out[:] = 0.0
        return out, argmax
    np.take(features.reshape(-1), argmax, out=out)                     # (K, C, ph, pw) the maxima
    if empty.any():
        out[argmax < 0] = 0.0                                          # (index -1 read the last entry)
    return out, argmax


def check_backward_inputs(grad_out, argmax, input_shape):
    """Validate roi_pool_backward's inputs.

    Returns:
        grad_out (K, C, ph, pw) float32, argmax (K, C, ph, pw) int64, input_shape (N, C, H, W).
    """
    input_shape = _checks.as_shape4(input_shape)
    grad_out = _checks.as_float_array(grad_out, "grad_out", ndim=4)
    argmax_arr = np.asarray(argmax)
    if argmax_arr.dtype.kind not in "iu":
        raise ValueError(f"argmax: expected an integer array (roi_pool_forward's argmax), "
                         f"got dtype {argmax_arr.dtype}")
    if argmax_arr.shape != grad_out.shape:
        raise ValueError(f"argmax: expected the shape of grad_out {tuple(grad_out.shape)}, "
                         f"got {tuple(argmax_arr.shape)}")
    if grad_out.shape[1] != input_shape[1]:
        raise ValueError(f"grad_out: expected {input_shape[1]} channels (input_shape[1]), "
                         f"got shape {tuple(grad_out.shape)}")
    size = int(np.prod(input_shape))
    if argmax_arr.size and (argmax_arr.min() < -1 or argmax_arr.max() >= size):
        raise ValueError(f"argmax: expected flat indices in [-1, {size}) for input_shape "
                         f"{input_shape}, got range [{argmax_arr.min()}, {argmax_arr.max()}]")
    return grad_out, argmax_arr.astype(np.int64, copy=False), input_shape


def roi_pool_backward(grad_out, argmax, input_shape):
    """Gradient of roi_pool_forward with respect to its features (Fast R-CNN 2.3, eq. 4).

    dL/dx_i = sum over every (RoI, bin) whose max was x_i of dL/dy: each output's gradient is
    added at the flat index the forward's `argmax` recorded (skipping empty bins, argmax -1).

    Args:
        grad_out: (K, C, ph, pw) float32, dL/d(out).
        argmax: (K, C, ph, pw) int64, the forward's argmax.
        input_shape: (N, C, H, W) of the forward's features.
    Returns:
        (N, C, H, W) float32, dL/d(features).
    """
    return _roi_pool_backward(*check_backward_inputs(grad_out, argmax, input_shape))


def _roi_pool_backward(grad_out, argmax, input_shape):
    """roi_pool_backward of checked inputs (check_backward_inputs): ops dispatches here."""
    # grad.reshape(-1)[argmax] += grad_out, adding up repeats: np.add.at (plain `+=` with fancy
    # indexing would keep only one of the repeats).  Indices are shifted by one so that empty
    # bins (argmax -1) land in slot 0, which is dropped.
    grad = np.zeros(int(np.prod(input_shape)) + 1, dtype=np.float32)   # (1 + N C H W,)
    np.add.at(grad, argmax.reshape(-1) + 1, grad_out.reshape(-1))
    return grad[1:].reshape(input_shape)                               # (N, C, H, W)
