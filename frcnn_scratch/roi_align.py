"""RoI Align: Mask R-CNN (He, Gkioxari, Dollar, Girshick, 2017), section 3 "RoIAlign".

RoI pooling rounds the RoI and its bins to whole cells, which misaligns the pooled features
with the RoI. RoI Align rounds nothing: each of the ph x pw bins gets a regular grid of
sampling points, the feature map is read at each point by bilinear interpolation, and the bin
outputs the mean of its samples.

The details follow torchvision.ops.roi_align:

* corners are scaled by spatial_scale; with aligned=True (a later half-pixel correction of
  Detectron2 and torchvision, not in the Mask R-CNN paper) they are shifted by -0.5 so that a
  pixel's centre maps onto a cell's centre, and with aligned=False the RoI is forced to be at
  least 1 x 1 cell;
* each bin has grid_h x grid_w samples: sampling_ratio on both axes when it is > 0, else
  ceil(roi_h / ph) and ceil(roi_w / pw) (adaptive), at the centres of a grid_h x grid_w split
  of the bin;
* a sample with y < -1 or y > H (or x < -1 or x > W) reads 0; otherwise y is clamped to >= 0,
  and a y at or past the last row reads the last row (the same along x);
* out = (sum of the bin's samples) / (grid_h * grid_w).

The file reads top down: roi_align_reference and roi_align_backward_reference, the paper's
loop over RoIs, bins and sampling points; the small helpers they use (RoI geometry, sample
coordinates, bilinear weights), which the fast version uses too; then roi_align_forward and
roi_align_backward, the same computation vectorised, which must equal the references to
float32 rounding (tests/test_roi_align.py checks it). Read the references first.

How the fast version computes it. A bilinear weight is a product of a weight along y and a
weight along x, and a bin's sampling grid is a product of a y-grid and an x-grid. So for one RoI
the whole operation is two small matrix products, one per axis:

    out[c] = Ay @ F[c] @ Ax.T            Ay: (ph, H), Ax: (pw, W)

where Ay[i, h] is the total weight that the samples of bin row i put on feature row h,
divided by grid_h (and Ax the same along x). Being linear, the backward is the transpose:

    dL/dF[c] = Ay.T @ dL/dout[c] @ Ax
"""
import numpy as np

from . import _checks


# ---- the teaching version: plain loops, as the paper describes it ----------------------------

def roi_align_reference(features, rois, output_size, spatial_scale, sampling_ratio=-1,
                        aligned=False):
    """RoI Align (Mask R-CNN 3) as plain loops over RoIs, bins and sampling points.

    The same inputs and output as roi_align_forward, which is this computation vectorised and
    must equal it up to float32 rounding (it adds the same terms in another order). Only the
    channels are vectorised here: each step below handles all C channels of a cell at once.

    Args:
        features: (N, C, H, W) float32 feature maps.
        rois: (K, 5) float32 (batch index, x1, y1, x2, y2) in image pixels.
        output_size: int or (ph, pw).
        spatial_scale: positive float, feature cells per image pixel (1/16 at stride 16).
        sampling_ratio: samples per bin along each axis; <= 0 means adaptive, ceil(roi / bins).
        aligned: shift the RoI by -0.5 cell (pixel centres on cell centres); no forced 1 x 1.
    Returns:
        out: (K, C, ph, pw) float32, the mean of each bin's bilinear samples.
    """
    features, rois, (ph, pw), spatial_scale, sampling_ratio, aligned = check_forward_inputs(
        features, rois, output_size, spatial_scale, sampling_ratio, aligned)
    N, C, H, W = features.shape
    out = np.zeros((len(rois), C, ph, pw), dtype=np.float32)
    if H == 0 or W == 0:
        return out                                                        # no cell to read
    batch, grid_h, grid_w, y_taps, x_taps = sampling_points(
        rois, (H, W), (ph, pw), spatial_scale, sampling_ratio, aligned)
    y_low, y_high, hy, ly = y_taps                                        # each (K, ph, Gh)
    x_low, x_high, hx, lx = x_taps                                        # each (K, pw, Gw)
    for k in range(len(rois)):                                            # every RoI
        plane = features[batch[k]]                                        # (C, H, W)
        count = max(grid_h[k] * grid_w[k], 1)                             # samples per bin
        for i in range(ph):                                               # every bin (i, j)
            for j in range(pw):
                total = np.zeros(C, dtype=np.float32)                     # (C,)
                for sy in range(grid_h[k]):                               # every sample (sy, sx)
                    r0, r1 = y_low[k, i, sy], y_high[k, i, sy]            # its two rows,
                    wy0, wy1 = hy[k, i, sy], ly[k, i, sy]                 # their weights
                    for sx in range(grid_w[k]):
                        c0, c1 = x_low[k, j, sx], x_high[k, j, sx]        # its two columns
                        wx0, wx1 = hx[k, j, sx], lx[k, j, sx]
                        # bilinear interpolation from the four nearest cells (Mask R-CNN Fig. 3)
                        total += (wy0 * wx0 * plane[:, r0, c0] + wy0 * wx1 * plane[:, r0, c1]
                                  + wy1 * wx0 * plane[:, r1, c0] + wy1 * wx1 * plane[:, r1, c1])
                out[k, :, i, j] = total / np.float32(count)                # the bin's mean
    return out


def roi_align_backward_reference(grad_out, rois, input_shape, output_size, spatial_scale,
                                 sampling_ratio=-1, aligned=False):
    """Gradient of RoI Align with respect to its features, as plain loops: the forward reversed.

    A bin's output was (sum of weight * cell over its samples) / count, so every cell a sample
    read gets grad_out * weight / count back. roi_align_backward computes the same, vectorised,
    and must equal it up to float32 rounding.

    Args:
        grad_out: (K, C, ph, pw) float32, dL/d(out).
        rois, output_size, spatial_scale, sampling_ratio, aligned: as given to the forward.
        input_shape: (N, C, H, W) of the forward's features.
    Returns:
        (N, C, H, W) float32, dL/d(features).
    """
    grad_out, rois, input_shape, (ph, pw), spatial_scale, sampling_ratio, aligned = \
        check_backward_inputs(grad_out, rois, input_shape, output_size, spatial_scale,
                              sampling_ratio, aligned)
    N, C, H, W = input_shape
    grad = np.zeros(input_shape, dtype=np.float32)
    if H == 0 or W == 0:
        return grad
    batch, grid_h, grid_w, y_taps, x_taps = sampling_points(
        rois, (H, W), (ph, pw), spatial_scale, sampling_ratio, aligned)
    y_low, y_high, hy, ly = y_taps                                        # each (K, ph, Gh)
    x_low, x_high, hx, lx = x_taps                                        # each (K, pw, Gw)
    for k in range(len(rois)):
        grad_plane = grad[batch[k]]                                       # (C, H, W), a view
        count = max(grid_h[k] * grid_w[k], 1)
        for i in range(ph):
            for j in range(pw):
                g = grad_out[k, :, i, j] / np.float32(count)              # (C,) per sample
                for sy in range(grid_h[k]):
                    r0, r1 = y_low[k, i, sy], y_high[k, i, sy]            # its two rows,
                    wy0, wy1 = hy[k, i, sy], ly[k, i, sy]                 # their weights
                    for sx in range(grid_w[k]):
                        c0, c1 = x_low[k, j, sx], x_high[k, j, sx]        # its two columns
                        wx0, wx1 = hx[k, j, sx], lx[k, j, sx]
                        grad_plane[:, r0, c0] += wy0 * wx0 * g            # the same four weights
                        grad_plane[:, r0, c1] += wy0 * wx1 * g
                        grad_plane[:, r1, c0] += wy1 * wx0 * g
                        grad_plane[:, r1, c1] += wy1 * wx1 * g
    return grad


# ---- the pieces both versions use: input checks, RoI geometry, sampling points, weights -------

def check_forward_inputs(features, rois, output_size, spatial_scale, sampling_ratio, aligned):
    """Validate the forward's inputs.

    Returns:
        features (N, C, H, W) float32, rois (K, 5) float32, (ph, pw), spatial_scale float,
        sampling_ratio int, aligned bool.
    """
    features = _checks.as_features(features)                              # (N, C, H, W)
    spatial_scale = _checks.positive_number(spatial_scale, "spatial_scale")
    rois = _checks.as_rois(rois, num_images=features.shape[0],
                           spatial_scale=spatial_scale)                    # (K, 5)
    output_size = _checks.pair(output_size)
    sampling_ratio = _checks.sampling_ratio(sampling_ratio)
    aligned = _checks.flag(aligned, "aligned")
    samples = check_samples(rois, spatial_scale, output_size, sampling_ratio, aligned)
    if features.size and samples:
        # A bin's sum of samples (each at most the largest |feature|) must stay finite in float32,
        # as the plain loops and the kernel add them before dividing by their count.
        largest = float(max(-features.min(), features.max()))
        if largest * samples > FLOAT32_SUM_LIMIT:
            raise ValueError(f"features: values up to {largest:.3g} summed over {samples} samples "
                             f"a bin overflow float32; keep |features| x samples per bin below "
                             f"{FLOAT32_SUM_LIMIT:.1e}")
    return features, rois, output_size, spatial_scale, sampling_ratio, aligned


FLOAT32_SUM_LIMIT = float(np.finfo(np.float32).max) / 2    # room for rounding in the sums


def check_samples(rois, spatial_scale, output_size, sampling_ratio, aligned):
    """The most samples any bin takes (grid_h * grid_w), with each side at most
    _checks.MAX_SAMPLING_RATIO, the adaptive grid of a huge RoI included; an error naming the
    first RoI beyond it."""
    if not len(rois):
        return 0
    _, (_, _, grid_h), (_, _, grid_w) = roi_geometry(rois, spatial_scale, output_size,
                                                     sampling_ratio, aligned)
    side = np.maximum(grid_h, grid_w)                                     # (K,)
    if side.max() > _checks.MAX_SAMPLING_RATIO:
        k = int(np.argmax(side > _checks.MAX_SAMPLING_RATIO))
        raise ValueError(f"rois: RoI {k} takes {int(side[k])} samples per bin side (adaptive "
                         f"sampling: ceil(RoI size / output size)); at most "
                         f"{_checks.MAX_SAMPLING_RATIO}: give a sampling_ratio, or smaller RoIs")
    return int((np.maximum(grid_h, 0) * np.maximum(grid_w, 0)).max())


def check_backward_inputs(grad_out, rois, input_shape, output_size, spatial_scale,
                          sampling_ratio, aligned):
    """Validate the backward's inputs.

    Returns:
        grad_out (K, C, ph, pw) float32, rois (K, 5) float32, input_shape (N, C, H, W),
        (ph, pw), spatial_scale float, sampling_ratio int, aligned bool.
    """
    input_shape = _checks.as_shape4(input_shape)
    spatial_scale = _checks.positive_number(spatial_scale, "spatial_scale")
    rois = _checks.as_rois(rois, num_images=input_shape[0],
                           spatial_scale=spatial_scale)                   # (K, 5)
    output_size = _checks.pair(output_size)
    grad_out = _checks.as_float_array(grad_out, "grad_out", ndim=4)
    expected = (len(rois), input_shape[1]) + output_size
    if grad_out.shape != expected:
        raise ValueError(f"grad_out: expected shape {expected}, got {tuple(grad_out.shape)}")
    sampling_ratio = _checks.sampling_ratio(sampling_ratio)
    aligned = _checks.flag(aligned, "aligned")
    check_samples(rois, spatial_scale, output_size, sampling_ratio, aligned)
    return (grad_out, rois, input_shape, output_size, spatial_scale, sampling_ratio, aligned)


def roi_geometry(rois, spatial_scale, output_size, sampling_ratio, aligned):
    """Start, bin size and samples per bin of every RoI, along y and along x.

    Args:
        rois: (K, 5) float32 (batch index, x1, y1, x2, y2) in image pixels.
        spatial_scale, output_size (ph, pw), sampling_ratio, aligned: as in roi_align_forward.
    Returns:
        batch (K,) int64, and for each axis a tuple (start (K,) float32, bin_size (K,) float32,
        grid (K,) int64): a RoI starts at `start`, its bin i spans start + i * bin_size ..
        start + (i + 1) * bin_size, and each bin has `grid` samples along this axis.
    """
    offset = np.float32(0.5 if aligned else 0.0)
    corners = rois[:, 1:5] * np.float32(spatial_scale) - offset          # (K, 4) float32
    axes = []
    for lo, hi, pooled in ((corners[:, 1], corners[:, 3], output_size[0]),   # y
                           (corners[:, 0], corners[:, 2], output_size[1])):  # x
        size = hi - lo                                                   # (K,) float32
        if not aligned:
            size = np.maximum(size, np.float32(1.0))                     # malformed RoIs -> 1 cell
        bin_size = size / np.float32(pooled)                             # (K,)
        if sampling_ratio > 0:
            grid = np.full(len(rois), sampling_ratio, dtype=np.int64)
        else:
            grid = np.ceil(size / np.float32(pooled)).astype(np.int64)   # adaptive
        axes.append((lo, bin_size, grid))
    return rois[:, 0].astype(np.int64), axes[0], axes[1]


def sample_coordinates(start, bin_size, grid, pooled):
    """Sampling points of every bin along one axis.

    Bin i gets `grid` points at the centres of `grid` equal parts:
        start + i * bin_size + (s + 0.5) * bin_size / grid,   s = 0 .. grid - 1.

    Args:
        start, bin_size: (K,) float32; grid: (K,) int64 samples per bin (may differ per RoI);
        pooled: bins along this axis.
    Returns:
        coords: (K, pooled, G) float32 with G = max(grid); used: (K, pooled, G) bool, False
        for the padding s >= grid of RoIs with fewer samples.
    """
    G = max(int(grid.max(initial=0)), 0)
    i = np.arange(pooled, dtype=np.float32)[None, :, None]                   # (1, pooled, 1)
    s = np.arange(G, dtype=np.float32)[None, None, :]                        # (1, 1, G)
    start, bin_size = start[:, None, None], bin_size[:, None, None]          # (K, 1, 1)
    per_grid = np.maximum(grid, 1).astype(np.float32)[:, None, None]
    coords = start + i * bin_size + (s + np.float32(0.5)) * bin_size / per_grid  # (K, pooled, G)
    used = np.broadcast_to(np.arange(G)[None, None, :] < grid[:, None, None], coords.shape)
    return coords, used


def bilinear_weights(coord, size):
    """Linear-interpolation weights along one axis: the 1-D half of bilinear interpolation.

    A point at coordinate y reads (1 - ly) * F[y_low] + ly * F[y_high] with y_low = floor(y),
    y_high = y_low + 1, ly = y - y_low. Bilinear interpolation in 2-D multiplies a y-weight by an
    x-weight: torchvision's w1..w4 = hy*hx, hy*lx, ly*hx, ly*lx with hy = 1 - ly.
    Border rules: y < -1 or y > size gives weights 0 (the sample reads 0); y < 0 is read at 0;
    y_low >= size - 1 reads the last row with weight 1.

    Args:
        coord: float32 array of coordinates (any shape); size: H (or W).
    Returns:
        low, high: int64 indices in [0, size); w_low, w_high: float32 weights; all coord's shape.
    """
    inside = (coord >= -1.0) & (coord <= size)                     # else the sample reads 0
    y = np.maximum(coord, np.float32(0.0))
    low = y.astype(np.int64)                                       # floor, since y >= 0
    at_edge = low >= size - 1
    low = np.where(at_edge, size - 1, low)
    high = np.where(at_edge, size - 1, low + 1)
    y = np.where(at_edge, low.astype(np.float32), y)
    ly = (y - low).astype(np.float32)                              # distance past y_low
    w_low = np.where(inside, np.float32(1.0) - ly, np.float32(0.0))
    w_high = np.where(inside, ly, np.float32(0.0))
    return np.clip(low, 0, None), np.clip(high, 0, None), w_low, w_high


def sampling_points(rois, map_size, output_size, spatial_scale, sampling_ratio, aligned):
    """Every sampling point of every bin, with the cells it reads and their weights, per axis.

    Args:
        rois: (K, 5) float32; map_size: (H, W), both > 0; output_size: (ph, pw);
        spatial_scale, sampling_ratio, aligned: as in roi_align_forward.
    Returns:
        batch (K,) int64; grid_h, grid_w (K,) int64 samples per bin along y and x;
        y_taps = (y_low, y_high, hy, ly), each (K, ph, Gh): sample sy of bin row i of RoI k
        reads rows y_low and y_high with weights hy = 1 - ly and ly (bilinear_weights);
        x_taps the same along x, each (K, pw, Gw). Entries past a RoI's own grid are padding.
    """
    (H, W), (ph, pw) = map_size, output_size
    batch, (y0, bin_h, grid_h), (x0, bin_w, grid_w) = roi_geometry(
        rois, spatial_scale, output_size, sampling_ratio, aligned)
    ys, _ = sample_coordinates(y0, bin_h, grid_h, ph)                     # (K, ph, Gh)
    xs, _ = sample_coordinates(x0, bin_w, grid_w, pw)                     # (K, pw, Gw)
    return batch, grid_h, grid_w, bilinear_weights(ys, H), bilinear_weights(xs, W)


# ---- the same, vectorised: RoI Align as two matrix products per RoI ---------------------------

def interpolation_matrix(start, bin_size, grid, pooled, size):
    """A (K, pooled, size) float32: A[k, i, h] = total weight bin i of RoI k puts on row h, / grid.

    Summing bilinear samples along one axis and averaging them is a linear map from the `size`
    feature rows to the `pooled` bins: this matrix.
    """
    K = len(start)
    A = np.zeros((K, pooled, size), dtype=np.float32)
    if K == 0 or size == 0:
        return A
    coords, used = sample_coordinates(start, bin_size, grid, pooled)    # (K, pooled, G)
    low, high, w_low, w_high = bilinear_weights(coords, size)           # (K, pooled, G) each
    scale = (1.0 / np.maximum(grid, 1)).astype(np.float32)[:, None, None]
    row = (np.arange(K)[:, None, None] * pooled + np.arange(pooled)[None, :, None]) * size
    row = np.broadcast_to(row, coords.shape)                              # (K, pooled, G)
    flat = np.concatenate([(row + low)[used], (row + high)[used]])
    weight = np.concatenate([(w_low * scale)[used], (w_high * scale)[used]])
    A.reshape(-1)[:] = np.bincount(flat, weights=weight, minlength=A.size)
    return A


def support(A):
    """(K, 2) int64 [first, last + 1) of the rows (or columns) each RoI's matrix A touches.

    A RoI reads only this window of the map; a RoI whose samples all fall outside gets an empty
    window (first == last + 1 == 0).
    """
    used = (A != 0).any(axis=1)                                             # (K, size)
    if used.shape[1] == 0:
        return np.zeros((len(A), 2), dtype=np.int64)                        # a map with no rows
    first = used.argmax(axis=1)
    end = used.shape[1] - used[:, ::-1].argmax(axis=1)
    none = ~used.any(axis=1)
    return np.stack([np.where(none, 0, first), np.where(none, 0, end)], axis=1)


def roi_align_forward(features, rois, output_size, spatial_scale, sampling_ratio=-1,
                      aligned=False):
    """RoI Align (Mask R-CNN 3), torchvision.ops.roi_align semantics, vectorised.

    Equal, up to float32 rounding, to roi_align_reference (the plain loops at the top of this file).

    Args:
        features: (N, C, H, W) float32 feature maps.
        rois: (K, 5) float32 (batch index, x1, y1, x2, y2) in image pixels.
        output_size: int or (ph, pw).
        spatial_scale: positive float, feature cells per image pixel (1/16 at stride 16).
        sampling_ratio: samples per bin along each axis; <= 0 means adaptive, ceil(roi / bins).
        aligned: shift the RoI by -0.5 cell (pixel centres on cell centres); no forced 1 x 1.
    Returns:
        out: (K, C, ph, pw) float32, the mean of each bin's bilinear samples.
    """
    return _roi_align_forward(*check_forward_inputs(features, rois, output_size, spatial_scale,
                                                    sampling_ratio, aligned))


def _roi_align_forward(features, rois, output_size, spatial_scale, sampling_ratio, aligned):
    """roi_align_forward of checked inputs (check_forward_inputs): ops dispatches here."""
    N, C, H, W = features.shape
    ph, pw = output_size
    batch, y_axis, x_axis = roi_geometry(rois, spatial_scale, (ph, pw), sampling_ratio, aligned)
    Ay = interpolation_matrix(*y_axis, ph, H)                               # (K, ph, H)
    Ax = interpolation_matrix(*x_axis, pw, W)                               # (K, pw, W)
    rows, cols = support(Ay), support(Ax)                                   # (K, 2) each

    # Channels last, so that rows r0..r1 and columns c0..c1 of a map are one (rh, rw * C)
    # matrix: each product below is a single matrix multiply over all channels at once, and
    # the order of the factors makes the result come out already laid out as (C, ph, pw).
    maps = np.ascontiguousarray(features.transpose(0, 2, 3, 1)).reshape(N, H, W * C)
    out = np.zeros((len(rois), C, ph, pw), dtype=np.float32)
    for k, ((r0, r1), (c0, c1)) in enumerate(zip(rows.tolist(), cols.tolist())):
        if r1 <= r0 or c1 <= c0:
            continue                                                        # no sample reads the map
        window = maps[batch[k], r0:r1, c0 * C:c1 * C]                       # (rh, rw * C)
        y_pooled = window.T @ Ay[k, :, r0:r1].T                             # (rw * C, ph): Ay @ F
        y_pooled = y_pooled.reshape(c1 - c0, C * ph)                        # (rw, C * ph)
        np.matmul(y_pooled.T, Ax[k, :, c0:c1].T,                            # (C * ph, pw): @ Ax.T
                  out=out[k].reshape(C * ph, pw))
    return out


def roi_align_backward(grad_out, rois, input_shape, output_size, spatial_scale,
                       sampling_ratio=-1, aligned=False):
    """Gradient of roi_align_forward with respect to its features, vectorised.

    Equal, up to float32 rounding, to roi_align_backward_reference at the top of this file.

    The forward is out[c] = Ay @ F[c] @ Ax.T per RoI, so dL/dF[c] += Ay.T @ dL/dout[c] @ Ax:
    each output's gradient, divided by the number of samples, goes back to the four cells of
    every sample with the same bilinear weights.

    Args:
        grad_out: (K, C, ph, pw) float32, dL/d(out).
        rois, output_size, spatial_scale, sampling_ratio, aligned: as given to the forward.
        input_shape: (N, C, H, W) of the forward's features.
    Returns:
        (N, C, H, W) float32, dL/d(features).
    """
    return _roi_align_backward(*check_backward_inputs(grad_out, rois, input_shape, output_size,
                                                      spatial_scale, sampling_ratio, aligned))


def _roi_align_backward(grad_out, rois, input_shape, output_size, spatial_scale, sampling_ratio,
                        aligned):
    """roi_align_backward of checked inputs (check_backward_inputs): ops dispatches here."""
    N, C, H, W = input_shape
    ph, pw = output_size
    batch, y_axis, x_axis = roi_geometry(rois, spatial_scale, (ph, pw), sampling_ratio, aligned)
    Ay = interpolation_matrix(*y_axis, ph, H)                               # (K, ph, H)
    Ax = interpolation_matrix(*x_axis, pw, W)                               # (K, pw, W)
    rows, cols = support(Ay), support(Ax)                                   # (K, 2) each

    grad_maps = np.zeros((N, H, W * C), dtype=np.float32)                   # channels last
    for k, ((r0, r1), (c0, c1)) in enumerate(zip(rows.tolist(), cols.tolist())):
        if r1 <= r0 or c1 <= c0:
            continue
        grad_y_pooled = Ax[k, :, c0:c1].T @ grad_out[k].reshape(C * ph, pw).T  # (rw, C * ph)
        grad_y_pooled = grad_y_pooled.reshape((c1 - c0) * C, ph)                # (rw * C, ph)
        grad_window = Ay[k, :, r0:r1].T @ grad_y_pooled.T                       # (rh, rw * C)
        grad_maps[batch[k], r0:r1, c0 * C:c1 * C] += grad_window
    grad = np.ascontiguousarray(grad_maps.reshape(N, H, W, C).transpose(0, 3, 1, 2))
    return grad
