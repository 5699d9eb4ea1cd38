"""RoI Align (Mask R-CNN section 3) forward and backward as Triton kernels.

Semantics are torchvision.ops.roi_align's, as in the NumPy reference frcnn_scratch/roi_align.py:
corners scaled by spatial_scale (minus 0.5 when aligned), RoI at least 1 x 1 cell unless aligned,
grid_h x grid_w samples per bin (sampling_ratio, or ceil(roi_size / pooled) when it is <= 0),
sample s of bin i at start + i * bin + (s + 0.5) * bin / grid, bilinear reads that are 0 outside
[-1, size] and clamped inside, and out = sum of samples / max(grid_h * grid_w, 1).

Forward: one program per (RoI, bin, block of BLOCK_C channels); it takes the bin's samples
BLOCK_S at a time, reads w1 * v1 + w2 * v2 + w3 * v3 + w4 * v4 (the four neighbouring cells) for a
(BLOCK_S, BLOCK_C) tile, and sums the tile over its samples.
Backward: the same steps, but each sample sends grad / count * w to its four cells with
tl.atomic_add, since cells are shared between samples, bins and RoIs.

The sample coordinates are computed in the reference's float32 order (and FMA fusion is off), so
the kernel reads the same cells with the same weights; only the order of the float32 sums differs
(the reference multiplies interpolation matrices), which is why the tests use a tolerance.
"""
from . import device  # noqa: F401  (imports the package first: sets TRITON_INTERPRET=1 without CUDA)

import torch
import triton
import triton.language as tl


@triton.jit
def _roi_geometry(rois_ptr, k, PH, PW, spatial_scale, sampling_ratio, ALIGNED: tl.constexpr):
    """Batch index, start (y, x), bin size (y, x) and samples per bin (y, x) of RoI k."""
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
    bin_h = tl.math.div_rn(roi_h, PH.to(tl.float32))  # IEEE division, as NumPy
    bin_w = tl.math.div_rn(roi_w, PW.to(tl.float32))
    grid_h = tl.where(sampling_ratio > 0, sampling_ratio, tl.ceil(bin_h).to(tl.int32))
    grid_w = tl.where(sampling_ratio > 0, sampling_ratio, tl.ceil(bin_w).to(tl.int32))
    return b, y1, x1, bin_h, bin_w, grid_h, grid_w


@triton.jit
def _sample_coord(start, i, bin_size, s, grid):
    """start + i * bin + (s + 0.5) * bin / grid: sample s of bin i, in the reference's order."""
    g = tl.maximum(grid, 1).to(tl.float32)
    return start + i.to(tl.float32) * bin_size + tl.math.div_rn((s + 0.5) * bin_size, g)


@triton.jit
def _linear_1d(y, size):
    """One axis of bilinear interpolation: (low, high, w_low, w_high, inside) for coordinate y."""
    inside = (y >= -1.0) & (y <= size.to(tl.float32))  # else the sample reads 0
    y = tl.maximum(y, 0.0)
    low = y.to(tl.int32)  # floor, since y >= 0
    at_edge = low >= size - 1
    low = tl.where(at_edge, size - 1, low)
    high = tl.where(at_edge, size - 1, low + 1)
    y = tl.where(at_edge, low.to(tl.float32), y)
    ly = y - low.to(tl.float32)  # distance past low
    return low, high, 1.0 - ly, ly, inside


@triton.jit
def _samples(s, y1, x1, i, j, bin_h, bin_w, grid_h, grid_w, H, W):
    """For a vector of sample numbers s (row-major over the bin's grid_h x grid_w grid): the flat
    offsets within a (H, W) plane of the four cells each sample reads, and their bilinear weights
    w1..w4 = hy*hx, hy*lx, ly*hx, ly*lx, and whether the sample lies inside [-1, size] on both
    axes (outside, it reads 0: the caller masks it)."""
    sy = s // tl.maximum(grid_w, 1)
    sx = s % tl.maximum(grid_w, 1)
    y = _sample_coord(y1, i, bin_h, sy, grid_h)  # (BLOCK_S,)
    x = _sample_coord(x1, j, bin_w, sx, grid_w)
    y_lo, y_hi, hy, ly, y_in = _linear_1d(y, H)
    x_lo, x_hi, hx, lx, x_in = _linear_1d(x, W)
    inside = y_in & x_in
    cells = (y_lo * W + x_lo, y_lo * W + x_hi, y_hi * W + x_lo, y_hi * W + x_hi)
    weights = (hy * hx, hy * lx, ly * hx, ly * lx)
    return cells, weights, inside


@triton.jit
def roi_align_forward_kernel(feat_ptr, rois_ptr, out_ptr, C, H, W, PH, PW,
                             spatial_scale, sampling_ratio,
                             ALIGNED: tl.constexpr, BLOCK_C: tl.constexpr,
                             BLOCK_S: tl.constexpr):
    """out[k, c, i, j] = mean over the bin's samples of the bilinear read of features[b, c].

    The bin's grid_h * grid_w samples are taken BLOCK_S at a time: a (BLOCK_S, BLOCK_C) tile of
    bilinear reads, summed over the samples."""
    pid = tl.program_id(0)  # one (RoI k, bin i, bin j)
    k = pid // (PH * PW)
    i = (pid // PW) % PH
    j = pid % PW
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,) channels
    c_ok = c < C
    b, y1, x1, bin_h, bin_w, grid_h, grid_w = _roi_geometry(
        rois_ptr, k, PH, PW, spatial_scale, sampling_ratio, ALIGNED)
    plane = (b * C + c.to(tl.int64)) * H * W  # (BLOCK_C,) flat offset of features[b, c, 0, 0]

    acc = tl.zeros((BLOCK_C,), tl.float32)
    n_samples = grid_h * grid_w
    for s0 in range(0, n_samples, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)  # (BLOCK_S,) sample numbers
        cells, weights, inside = _samples(s, y1, x1, i, j, bin_h, bin_w, grid_h, grid_w, H, W)
        ok = (inside & (s < n_samples))[:, None] & c_ok[None, :]  # (BLOCK_S, BLOCK_C)
        val = tl.zeros((BLOCK_S, BLOCK_C), tl.float32)
        for q in tl.static_range(4):  # the four neighbouring cells, w1 * v1 + ... + w4 * v4
            v = tl.load(feat_ptr + plane[None, :] + cells[q][:, None], mask=ok, other=0.0)
            val += weights[q][:, None] * v
        acc += tl.sum(val, axis=0)

    count = tl.maximum(n_samples, 1).to(tl.float32)
    o = ((k * C + c) * PH + i) * PW + j  # (BLOCK_C,) flat index into out (K, C, PH, PW)
    tl.store(out_ptr + o, tl.math.div_rn(acc, count + tl.zeros_like(acc)), mask=c_ok)


@triton.jit
def roi_align_backward_kernel(grad_out_ptr, rois_ptr, grad_ptr, C, H, W, PH, PW,
                              spatial_scale, sampling_ratio,
                              ALIGNED: tl.constexpr, BLOCK_C: tl.constexpr,
                              BLOCK_S: tl.constexpr):
    """grad[b, c] += grad_out[k, c, i, j] / count * (bilinear weight) at each sample's 4 cells."""
    pid = tl.program_id(0)
    k = pid // (PH * PW)
    i = (pid // PW) % PH
    j = pid % PW
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    b, y1, x1, bin_h, bin_w, grid_h, grid_w = _roi_geometry(
        rois_ptr, k, PH, PW, spatial_scale, sampling_ratio, ALIGNED)
    plane = (b * C + c.to(tl.int64)) * H * W

    o = ((k * C + c) * PH + i) * PW + j
    n_samples = grid_h * grid_w
    count = tl.maximum(n_samples, 1).to(tl.float32)
    g = tl.load(grad_out_ptr + o, mask=c_ok, other=0.0)
    g = tl.math.div_rn(g, count + tl.zeros_like(g))  # (BLOCK_C,) each sample's share
    for s0 in range(0, n_samples, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        cells, weights, inside = _samples(s, y1, x1, i, j, bin_h, bin_w, grid_h, grid_w, H, W)
        ok = (inside & (s < n_samples))[:, None] & c_ok[None, :]  # (BLOCK_S, BLOCK_C)
        for q in tl.static_range(4):  # cells are shared by samples, bins and RoIs: atomic adds
            tl.atomic_add(grad_ptr + plane[None, :] + cells[q][:, None],
                          weights[q][:, None] * g[None, :], mask=ok)


def _check(x, name, ndim):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.float32 or x.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D float32 tensor, got {x.dim()}-D {x.dtype}")
    return x.contiguous()


def _check_rois(rois, pooled_h, pooled_w):
    rois = _check(rois, "rois", 2)
    if rois.shape[1] != 5:
        raise ValueError(f"rois: expected shape (K, 5), got {tuple(rois.shape)}")
    if pooled_h <= 0 or pooled_w <= 0:
        raise ValueError(f"pooled_h, pooled_w: expected positive ints, got {(pooled_h, pooled_w)}")
    return rois


def roi_align_forward(features, rois, pooled_h, pooled_w, spatial_scale, sampling_ratio=-1,
                      aligned=False, block_c=64, block_s=16):
    """RoI Align on the device.

    Args:
        features: (N, C, H, W) float32 tensor.
        rois: (K, 5) float32 tensor (batch index, x1, y1, x2, y2) in image pixels, same device.
        pooled_h, pooled_w: bins per RoI.
        spatial_scale: feature cells per image pixel.
        sampling_ratio: samples per bin side; <= 0 is adaptive, ceil(roi_size / pooled).
        aligned: shift by -0.5 cell and do not force a 1 x 1 RoI.
        block_c: channels per program (a power of two).
        block_s: bilinear samples per step of a program's loop (a power of two).
    Returns:
        (K, C, pooled_h, pooled_w) float32 tensor.
    """
    features = _check(features, "features", 4)
    rois = _check_rois(rois, pooled_h, pooled_w)
    n, c, h, w = features.shape
    k = rois.shape[0]
    out = torch.zeros((k, c, pooled_h, pooled_w), dtype=torch.float32, device=features.device)
    if k == 0 or c == 0 or h == 0 or w == 0:
        return out
    block_c = min(block_c, triton.next_power_of_2(c))
    grid = (k * pooled_h * pooled_w, triton.cdiv(c, block_c))
    roi_align_forward_kernel[grid](features, rois, out, c, h, w, pooled_h, pooled_w,
                                   float(spatial_scale), int(sampling_ratio),
                                   ALIGNED=bool(aligned), BLOCK_C=block_c, BLOCK_S=block_s,
                                   enable_fp_fusion=False)
    return out


def roi_align_backward(grad_out, rois, input_shape, pooled_h, pooled_w, spatial_scale,
                       sampling_ratio=-1, aligned=False, block_c=64, block_s=16):
    """Gradient of roi_align_forward with respect to its features.

    Args:
        grad_out: (K, C, pooled_h, pooled_w) float32 tensor.
        rois, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned: as for the forward.
        input_shape: (N, C, H, W) of the forward's features.
    Returns:
        (N, C, H, W) float32 tensor (sums by atomic add: their order is not fixed on a GPU).
    """
    grad_out = _check(grad_out, "grad_out", 4)
    rois = _check_rois(rois, pooled_h, pooled_w)
    n, c, h, w = (int(v) for v in input_shape)
    k = rois.shape[0]
    if tuple(grad_out.shape) != (k, c, pooled_h, pooled_w):
        raise ValueError(f"grad_out: expected shape {(k, c, pooled_h, pooled_w)}, "
                         f"got {tuple(grad_out.shape)}")
    grad = torch.zeros((n, c, h, w), dtype=torch.float32, device=grad_out.device)
    if k == 0 or c == 0 or h == 0 or w == 0:
        return grad
    block_c = min(block_c, triton.next_power_of_2(c))
    grid = (k * pooled_h * pooled_w, triton.cdiv(c, block_c))
    roi_align_backward_kernel[grid](grad_out, rois, grad, c, h, w, pooled_h, pooled_w,
                                    float(spatial_scale), int(sampling_ratio),
                                    ALIGNED=bool(aligned), BLOCK_C=block_c, BLOCK_S=block_s,
                                    enable_fp_fusion=False)
    return grad
