"""RoI Align (Mask R-CNN section 3) forward and backward as Triton kernels.

Semantics are torchvision.ops.roi_align's, as in the NumPy reference frcnn_scratch/roi_align.py:
corners scaled by spatial_scale (minus 0.5 when aligned), RoI at least 1 x 1 cell unless aligned,
grid_h x grid_w samples per bin (sampling_ratio, or ceil(roi_size / pooled) when it is <= 0),
sample s of bin i at start + i * bin + (s + 0.5) * bin / grid, bilinear reads that are 0 outside
[-1, size] and clamped inside, and out = sum of samples / max(grid_h * grid_w, 1).  A RoI with a
negative sample count on an axis (aligned, reversed by more than a bin) has no samples: out = 0.

Laid out for the GPU.  The launcher makes one channels-last copy of the map, (N, H, W, C), so that
the C values of a cell are neighbours in memory.  One program takes one row i of bins of one RoI
and a block of BLOCK_C channels: a (BLOCK_PW, BLOCK_C) tile, bins j down, channels across.  The
RoI's geometry is computed once per program; a sample row's y, its two rows and their weights are
scalars shared by the whole tile, a sample column's x is one value per bin j.  Each bilinear read
is then a load of consecutive channels of one cell: a warp reads neighbouring addresses.

Forward: for sample (sy, sx) of every bin of the tile, read w1*v1 + w2*v2 + w3*v3 + w4*v4 from the
four neighbouring cells and add it to the bin's sum: the same float32 operations in the same order
as roi_align_reference (the plain loops of the NumPy file), with FMA fusion off, so the result is
the reference's bit for bit.
Backward: the same walk, adding grad / count * w to each of the four cells with relaxed atomic adds
(cells are shared between samples, bins and RoIs; the adds need no ordering) into a channels-last
gradient, which the launcher turns back to (N, C, H, W).

Offsets into every tensor are int64: K * C * PH * PW passes 2**31 at paper sizes times 30.

NumPy reference: frcnn_scratch/roi_align.py, roi_align_forward / roi_align_backward (their cores
                 _roi_align_forward / _roi_align_backward; roi_align_reference and
                 roi_align_backward_reference, the plain loops whose order of operations the kernels
                 follow).  The helpers share its names: roi_geometry, sample_coordinates,
                 bilinear_weights.
Tests:           tests/test_kernels_roi_align.py (bit-equal to roi_align_reference)
Benchmark:       `frcnn bench --op roi_align` (frcnn_scratch/tools/bench.py)
"""
from . import device  # noqa: F401  (imports the package first: sets TRITON_INTERPRET=1 without CUDA)

import torch
import triton
import triton.language as tl

from . import _launch

LIMIT = tl.constexpr(2.0 ** 30)  # the largest sample count per bin side the kernels compute


@triton.jit
def roi_geometry(rois_ptr, k, PH, PW, spatial_scale, sampling_ratio, ALIGNED: tl.constexpr):
    """Batch index, start (y, x), bin size (y, x) and samples per bin (y, x) of RoI k, in the
    reference's float32 steps (frcnn_scratch.roi_align.roi_geometry)."""
    offset = 0.5 if ALIGNED else 0.0  # aligned: pixel centres land on cell centres
    b = tl.load(rois_ptr + k * 5 + 0).to(tl.int64)
    x1 = tl.load(rois_ptr + k * 5 + 1) * spatial_scale - offset
    y1 = tl.load(rois_ptr + k * 5 + 2) * spatial_scale - offset
    x2 = tl.load(rois_ptr + k * 5 + 3) * spatial_scale - offset
    y2 = tl.load(rois_ptr + k * 5 + 4) * spatial_scale - offset
    roi_h = y2 - y1
    roi_w = x2 - x1
    if not ALIGNED:  # malformed RoIs are forced to 1 x 1 cell
        roi_h = tl.maximum(roi_h, 1.0)
        roi_w = tl.maximum(roi_w, 1.0)
    bin_h = tl.math.div_rn(roi_h, tl.cast(PH, tl.float32))  # IEEE division, as NumPy
    bin_w = tl.math.div_rn(roi_w, tl.cast(PW, tl.float32))
    # samples per bin: negative for a reversed aligned RoI, and then no sample runs.  (Bins over
    # 2**30 cells, where the reference could not allocate its samples, are clamped to keep the
    # float -> int32 conversion defined.)
    grid_h = tl.where(sampling_ratio > 0, sampling_ratio,
                      tl.ceil(tl.minimum(tl.maximum(bin_h, -LIMIT), LIMIT)).to(tl.int32))
    grid_w = tl.where(sampling_ratio > 0, sampling_ratio,
                      tl.ceil(tl.minimum(tl.maximum(bin_w, -LIMIT), LIMIT)).to(tl.int32))
    return b, y1, x1, bin_h, bin_w, grid_h, grid_w


@triton.jit
def sample_coordinates(start, i, bin_size, s, grid):
    """start + i * bin + (s + 0.5) * bin / grid: sample s of bin i, one point of the reference's
    sample_coordinates, in its order of operations."""
    g = tl.cast(tl.maximum(grid, 1), tl.float32)
    return start + tl.cast(i, tl.float32) * bin_size + tl.math.div_rn(
        (tl.cast(s, tl.float32) + 0.5) * bin_size, g)


@triton.jit
def bilinear_weights(coord, size):
    """One axis of bilinear interpolation, as the reference's bilinear_weights: the two cells
    (low, high) a coordinate reads, their weights (w_low, w_high), and whether the
    coordinate lies in [-1, size] (outside, both weights are 0 and the sample reads 0).  The cells
    are always inside the map, so loads need no mask; y is clamped to <= size before it becomes an
    int (the same cells and weights as the reference, without int overflow for huge RoIs)."""
    fsize = tl.cast(size, tl.float32)
    inside = (coord >= -1.0) & (coord <= fsize)
    y = tl.minimum(tl.maximum(coord, 0.0), fsize)
    low = y.to(tl.int32)  # floor, since y >= 0
    at_edge = low >= size - 1
    low = tl.where(at_edge, size - 1, low)
    high = tl.where(at_edge, size - 1, low + 1)
    y = tl.where(at_edge, low.to(tl.float32), y)
    ly = y - low.to(tl.float32)  # distance past low
    return low, high, tl.where(inside, 1.0 - ly, 0.0), tl.where(inside, ly, 0.0), inside


@triton.jit
def roi_align_forward_kernel(feat_ptr, rois_ptr, out_ptr, C, H, W, PH, PW,
                             spatial_scale, sampling_ratio,
                             ALIGNED: tl.constexpr, BLOCK_PW: tl.constexpr,
                             BLOCK_C: tl.constexpr):
    """out[k, c, i, j] = mean over the bin's samples of the bilinear read of features[b, c], for
    bin row i of RoI k (program 0) and a block of channels (program 1).  feat_ptr is the
    channels-last copy (N, H, W, C)."""
    pid = tl.program_id(0).to(tl.int64)  # one (RoI k, bin row i)
    k = pid // PH
    i = pid % PH
    j = tl.arange(0, BLOCK_PW)  # (BLOCK_PW,) bin columns
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,) channels
    ok = (j < PW)[:, None] & (c < C)[None, :]  # (BLOCK_PW, BLOCK_C)
    b, y1, x1, bin_h, bin_w, grid_h, grid_w = roi_geometry(
        rois_ptr, k, PH, PW, spatial_scale, sampling_ratio, ALIGNED)

    acc = tl.zeros((BLOCK_PW, BLOCK_C), tl.float32)
    for sy in range(0, grid_h):  # sample rows: scalars for the whole tile
        y = sample_coordinates(y1, i, bin_h, sy, grid_h)
        y_lo, y_hi, hy, ly, y_in = bilinear_weights(y, H)
        row_lo = (b * H + y_lo) * W  # flat cell index of (b, y_lo, 0)
        row_hi = (b * H + y_hi) * W
        for sx in range(0, grid_w):  # sample columns: one per bin j
            x = sample_coordinates(x1, j, bin_w, sx, grid_w)  # (BLOCK_PW,)
            x_lo, x_hi, hx, lx, x_in = bilinear_weights(x, W)
            v1 = tl.load(feat_ptr + ((row_lo + x_lo) * C)[:, None] + c[None, :], mask=ok, other=0.0)
            v2 = tl.load(feat_ptr + ((row_lo + x_hi) * C)[:, None] + c[None, :], mask=ok, other=0.0)
            v3 = tl.load(feat_ptr + ((row_hi + x_lo) * C)[:, None] + c[None, :], mask=ok, other=0.0)
            v4 = tl.load(feat_ptr + ((row_hi + x_hi) * C)[:, None] + c[None, :], mask=ok, other=0.0)
            # bilinear interpolation from the four nearest cells (Mask R-CNN Fig. 3)
            acc += ((hy * hx)[:, None] * v1 + (hy * lx)[:, None] * v2
                    + (ly * hx)[:, None] * v3 + (ly * lx)[:, None] * v4)

    count = tl.maximum(grid_h.to(tl.int64) * grid_w, 1).to(tl.float32)
    o = ((k * C + c[None, :]) * PH + i) * PW + j[:, None]  # (BLOCK_PW, BLOCK_C) into (K, C, PH, PW)
    tl.store(out_ptr + o, tl.math.div_rn(acc, count + tl.zeros_like(acc)), mask=ok)


@triton.jit
def roi_align_backward_kernel(grad_out_ptr, rois_ptr, grad_ptr, C, H, W, PH, PW,
                              spatial_scale, sampling_ratio,
                              ALIGNED: tl.constexpr, BLOCK_PW: tl.constexpr,
                              BLOCK_C: tl.constexpr):
    """grad[b, :, :, c] += grad_out[k, c, i, j] / count * (bilinear weight) at each sample's four
    cells, for bin row i of RoI k and a block of channels.  grad_ptr is channels-last (N, H, W, C)."""
    pid = tl.program_id(0).to(tl.int64)
    k = pid // PH
    i = pid % PH
    j = tl.arange(0, BLOCK_PW)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = (j < PW)[:, None] & (c < C)[None, :]
    b, y1, x1, bin_h, bin_w, grid_h, grid_w = roi_geometry(
        rois_ptr, k, PH, PW, spatial_scale, sampling_ratio, ALIGNED)

    count = tl.maximum(grid_h.to(tl.int64) * grid_w, 1).to(tl.float32)
    o = ((k * C + c[None, :]) * PH + i) * PW + j[:, None]
    g = tl.load(grad_out_ptr + o, mask=ok, other=0.0)  # (BLOCK_PW, BLOCK_C)
    g = tl.math.div_rn(g, count + tl.zeros_like(g))  # each sample's share
    for sy in range(0, grid_h):
        y = sample_coordinates(y1, i, bin_h, sy, grid_h)
        y_lo, y_hi, hy, ly, y_in = bilinear_weights(y, H)
        row_lo = (b * H + y_lo) * W
        row_hi = (b * H + y_hi) * W
        for sx in range(0, grid_w):
            x = sample_coordinates(x1, j, bin_w, sx, grid_w)
            x_lo, x_hi, hx, lx, x_in = bilinear_weights(x, W)
            send = tl.where(y_in, ok & x_in[:, None], False)  # outside the map: nothing to send
            tl.atomic_add(grad_ptr + ((row_lo + x_lo) * C)[:, None] + c[None, :],
                          (hy * hx)[:, None] * g, mask=send, sem="relaxed")
            tl.atomic_add(grad_ptr + ((row_lo + x_hi) * C)[:, None] + c[None, :],
                          (hy * lx)[:, None] * g, mask=send, sem="relaxed")
            tl.atomic_add(grad_ptr + ((row_hi + x_lo) * C)[:, None] + c[None, :],
                          (ly * hx)[:, None] * g, mask=send, sem="relaxed")
            tl.atomic_add(grad_ptr + ((row_hi + x_hi) * C)[:, None] + c[None, :],
                          (ly * lx)[:, None] * g, mask=send, sem="relaxed")


def _check_rois(rois, like, pooled_h, pooled_w, sampling_ratio):
    """rois (K, 5) float32 on like's device, the checked (pooled_h, pooled_w) and sampling_ratio."""
    rois = _launch.tensor(rois, "rois", torch.float32, 2, last_dim=5)
    _launch.same_device(rois, "rois", like)
    return rois, _launch.output_size(pooled_h, pooled_w), _launch.sampling_ratio(sampling_ratio)


def roi_align_forward(features, rois, pooled_h, pooled_w, spatial_scale, sampling_ratio=-1,
                      aligned=False, block_c=128, num_warps=8):
    """RoI Align on the device.

    Args:
        features: (N, C, H, W) float32 tensor; stored channels last (torch.channels_last), it is
            read in place, else copied to that layout once.
        rois: (K, 5) float32 tensor (batch index, x1, y1, x2, y2) in image pixels, same device.
        pooled_h, pooled_w: bins per RoI.
        spatial_scale: feature cells per image pixel.
        sampling_ratio: samples per bin side, at most _launch.MAX_SAMPLING_RATIO; <= 0 is
            adaptive, ceil(roi_size / pooled) (frcnn_scratch.ops bounds that too).
        aligned: shift by -0.5 cell and do not force a 1 x 1 RoI.
        block_c: channels per program (a power of two).
    Returns:
        (K, C, pooled_h, pooled_w) float32 tensor.
    """
    features = _launch.tensor(features, "features", torch.float32, 4,
                              contiguous=False)  # any layout: see _launch.channels_last
    rois, (pooled_h, pooled_w), sampling_ratio = _check_rois(rois, features, pooled_h, pooled_w,
                                                             sampling_ratio)
    n, c, h, w = features.shape
    k = rois.shape[0]
    if k == 0 or c == 0 or h == 0 or w == 0:  # no RoI, or no cell to read: zeros
        return torch.zeros((k, c, pooled_h, pooled_w), dtype=torch.float32, device=features.device)
    out = torch.empty((k, c, pooled_h, pooled_w), dtype=torch.float32, device=features.device)
    block_c = min(block_c, triton.next_power_of_2(c))
    grid = (k * pooled_h, triton.cdiv(c, block_c))
    roi_align_forward_kernel[grid](_launch.channels_last(features), rois, out, c, h, w,
                                   pooled_h, pooled_w, float(spatial_scale), int(sampling_ratio),
                                   ALIGNED=bool(aligned), BLOCK_PW=triton.next_power_of_2(pooled_w),
                                   BLOCK_C=block_c, num_warps=num_warps, enable_fp_fusion=False)
    return out


def roi_align_backward(grad_out, rois, input_shape, pooled_h, pooled_w, spatial_scale,
                       sampling_ratio=-1, aligned=False, block_c=128, num_warps=8):
    """Gradient of roi_align_forward with respect to its features.

    Args:
        grad_out: (K, C, pooled_h, pooled_w) float32 tensor.
        rois, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned: as for the forward.
        input_shape: (N, C, H, W) of the forward's features.
    Returns:
        (N, C, H, W) float32 tensor (sums by atomic add: their order is not fixed on a GPU).
    """
    grad_out = _launch.tensor(grad_out, "grad_out", torch.float32, 4)
    rois, (pooled_h, pooled_w), sampling_ratio = _check_rois(rois, grad_out, pooled_h, pooled_w,
                                                             sampling_ratio)
    n, c, h, w = (int(v) for v in input_shape)
    k = rois.shape[0]
    if tuple(grad_out.shape) != (k, c, pooled_h, pooled_w):
        raise ValueError(f"grad_out: expected shape {(k, c, pooled_h, pooled_w)}, "
                         f"got {tuple(grad_out.shape)}")
    grad = torch.zeros((n, h, w, c), dtype=torch.float32, device=grad_out.device)  # channels last
    if k > 0 and c > 0 and h > 0 and w > 0:
        block_c = min(block_c, triton.next_power_of_2(c))
        grid = (k * pooled_h, triton.cdiv(c, block_c))
        roi_align_backward_kernel[grid](grad_out, rois, grad, c, h, w, pooled_h, pooled_w,
                                        float(spatial_scale), int(sampling_ratio),
                                        ALIGNED=bool(aligned),
                                        BLOCK_PW=triton.next_power_of_2(pooled_w),
                                        BLOCK_C=block_c, num_warps=num_warps,
                                        enable_fp_fusion=False)
    return grad.permute(0, 3, 1, 2).contiguous()  # (N, C, H, W)
