"""RoI max pooling (Fast R-CNN section 2.1) forward and backward as Triton kernels.

Semantics are those of the NumPy reference, frcnn_scratch/roi_pool.py (torchvision.ops.roi_pool):
corners times spatial_scale rounded half away from zero, roi size max(end - start + 1, 1),
bin i covering floor(i * size / n) .. ceil((i + 1) * size / n) after the start, clipped to the map,
empty bin -> 0 and argmax -1, first maximum in row-major order.

Forward: one program per (RoI, bin, block of BLOCK_C channels); it walks the bin's cells in
row-major order, BLOCK_HW cells at a time, takes each step's max and the first cell holding it, and
keeps a running max with a strict `>`, so the first maximum in row-major order wins.
Backward: one program per BLOCK outputs; each adds its gradient at its argmax with tl.atomic_add.
"""
from . import device  # noqa: F401  (imports the package first: sets TRITON_INTERPRET=1 without CUDA)

import torch
import triton
import triton.language as tl


@triton.jit
def _round_half_away(x):
    """C's round(): 2.5 -> 3, -2.5 -> -3.  x - trunc(x) is exact in float32, so no x + 0.5 error."""
    t = tl.where(x >= 0.0, tl.floor(x), tl.ceil(x))
    step = tl.where(x >= 0.0, 1.0, -1.0)
    return tl.where(tl.abs(x - t) >= 0.5, t + step, t).to(tl.int32)


@triton.jit
def roi_pool_forward_kernel(feat_ptr, rois_ptr, out_ptr, argmax_ptr,
                            C, H, W, PH, PW, spatial_scale,
                            BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """out[k, c, i, j] = max of features[b, c] over bin (i, j) of RoI k; argmax = its flat index."""
    pid = tl.program_id(0)  # one (RoI k, bin i, bin j)
    k = pid // (PH * PW)
    i = (pid // PW) % PH
    j = pid % PW
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,) channels
    c_ok = c < C

    # RoI corners in feature cells: image pixels * spatial_scale, rounded half away from zero
    b = tl.load(rois_ptr + k * 5 + 0).to(tl.int64)
    x1 = _round_half_away(tl.load(rois_ptr + k * 5 + 1) * spatial_scale)
    y1 = _round_half_away(tl.load(rois_ptr + k * 5 + 2) * spatial_scale)
    x2 = _round_half_away(tl.load(rois_ptr + k * 5 + 3) * spatial_scale)
    y2 = _round_half_away(tl.load(rois_ptr + k * 5 + 4) * spatial_scale)
    # cells per bin, float32; div_rn is IEEE division (a GPU's default may be approximate)
    bin_h = tl.math.div_rn(tl.maximum(y2 - y1 + 1, 1).to(tl.float32), PH.to(tl.float32))
    bin_w = tl.math.div_rn(tl.maximum(x2 - x1 + 1, 1).to(tl.float32), PW.to(tl.float32))

    # bin (i, j) covers rows [h0, h1) and columns [w0, w1), clipped to the map
    h0 = tl.minimum(tl.maximum(tl.floor(i * bin_h).to(tl.int32) + y1, 0), H)
    h1 = tl.minimum(tl.maximum(tl.ceil((i + 1) * bin_h).to(tl.int32) + y1, 0), H)
    w0 = tl.minimum(tl.maximum(tl.floor(j * bin_w).to(tl.int32) + x1, 0), W)
    w1 = tl.minimum(tl.maximum(tl.ceil((j + 1) * bin_w).to(tl.int32) + x1, 0), W)

    plane = (b * C + c.to(tl.int64)) * H * W  # (BLOCK_C,) flat offset of features[b, c, 0, 0]
    bin_cols = tl.maximum(w1 - w0, 1)
    n_cells = tl.maximum(h1 - h0, 0) * tl.maximum(w1 - w0, 0)  # 0 for an empty bin
    best = tl.full((BLOCK_C,), float("-inf"), tl.float32)
    best_at = tl.full((BLOCK_C,), -1, tl.int64)
    # the bin's cells in row-major order, BLOCK_HW at a time: a (BLOCK_HW, BLOCK_C) tile each step
    for t0 in range(0, n_cells, BLOCK_HW):
        t = t0 + tl.arange(0, BLOCK_HW)  # (BLOCK_HW,) cell numbers, row-major in the bin
        at = plane[None, :] + ((h0 + t // bin_cols) * W + (w0 + t % bin_cols))[:, None]
        ok = (t < n_cells)[:, None] & c_ok[None, :]
        v = tl.load(feat_ptr + at, mask=ok, other=float("-inf"))  # (BLOCK_HW, BLOCK_C)
        top = tl.max(v, axis=0)  # (BLOCK_C,)
        # the first cell holding the max (lowest t), then its flat index into features
        first = tl.min(tl.where(v == top[None, :], t[:, None], n_cells), axis=0)
        first_at = plane + (h0 + first // bin_cols) * W + (w0 + first % bin_cols)
        better = top > best  # strict: an earlier step's equal maximum stays
        best = tl.where(better, top, best)
        best_at = tl.where(better, first_at, best_at)

    best = tl.where(best_at >= 0, best, 0.0)  # an empty bin outputs 0 (argmax stays -1)
    o = ((k * C + c) * PH + i) * PW + j  # (BLOCK_C,) flat index into out (K, C, PH, PW)
    tl.store(out_ptr + o, best, mask=c_ok)
    tl.store(argmax_ptr + o, best_at, mask=c_ok)


@triton.jit
def roi_pool_backward_kernel(grad_out_ptr, argmax_ptr, grad_ptr, TOTAL,
                             BLOCK: tl.constexpr):
    """grad.flat[argmax[t]] += grad_out.flat[t] for the BLOCK outputs t of this program."""
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = t < TOTAL
    g = tl.load(grad_out_ptr + t, mask=ok, other=0.0)
    at = tl.load(argmax_ptr + t, mask=ok, other=-1)
    won = ok & (at >= 0)  # empty bins (argmax -1) send nothing
    tl.atomic_add(grad_ptr + tl.where(won, at, 0), g, mask=won)


def _check(x, name, dtype, ndim):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype != dtype or x.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D {dtype} tensor, got {x.dim()}-D {x.dtype}")
    return x.contiguous()


def roi_pool_forward(features, rois, pooled_h, pooled_w, spatial_scale, block_c=64,
                     block_hw=16):
    """RoI max pooling on the device.

    Args:
        features: (N, C, H, W) float32 tensor.
        rois: (K, 5) float32 tensor (batch index, x1, y1, x2, y2) in image pixels, same device.
        pooled_h, pooled_w: bins per RoI.
        spatial_scale: feature cells per image pixel.
        block_c: channels per program (a power of two).
        block_hw: bin cells per step of a program's loop (a power of two).
    Returns:
        out (K, C, pooled_h, pooled_w) float32 and argmax (same shape) int64: the flat index into
        features of each bin's first maximum, -1 for an empty bin.
    """
    features = _check(features, "features", torch.float32, 4)
    rois = _check(rois, "rois", torch.float32, 2)
    if rois.shape[1] != 5:
        raise ValueError(f"rois: expected shape (K, 5), got {tuple(rois.shape)}")
    if pooled_h <= 0 or pooled_w <= 0:
        raise ValueError(f"pooled_h, pooled_w: expected positive ints, got {(pooled_h, pooled_w)}")
    n, c, h, w = features.shape
    k = rois.shape[0]
    out = torch.zeros((k, c, pooled_h, pooled_w), dtype=torch.float32, device=features.device)
    argmax = torch.full((k, c, pooled_h, pooled_w), -1, dtype=torch.int64, device=features.device)
    if k == 0 or c == 0:
        return out, argmax
    block_c = min(block_c, triton.next_power_of_2(c))
    grid = (k * pooled_h * pooled_w, triton.cdiv(c, block_c))
    roi_pool_forward_kernel[grid](features, rois, out, argmax, c, h, w, pooled_h, pooled_w,
                                  float(spatial_scale), BLOCK_C=block_c, BLOCK_HW=block_hw,
                                  enable_fp_fusion=False)
    return out, argmax


def roi_pool_backward(grad_out, argmax, input_shape, block=256):
    """Gradient of roi_pool_forward with respect to its features: scatter-add at argmax.

    Args:
        grad_out: (K, C, ph, pw) float32 tensor.
        argmax: (K, C, ph, pw) int64 tensor from roi_pool_forward, same device.
        input_shape: (N, C, H, W) of the forward's features.
    Returns:
        (N, C, H, W) float32 tensor.  Where several outputs share an argmax, the adds happen in
        atomic order: the interpreter adds in flat order (as np.add.at does); a GPU may not.
    """
    grad_out = _check(grad_out, "grad_out", torch.float32, 4)
    argmax = _check(argmax, "argmax", torch.int64, 4)
    if argmax.shape != grad_out.shape:
        raise ValueError(f"argmax: expected shape {tuple(grad_out.shape)}, got {tuple(argmax.shape)}")
    grad = torch.zeros(tuple(int(v) for v in input_shape), dtype=torch.float32,
                       device=grad_out.device)
    total = grad_out.numel()
    if total == 0:
        return grad
    roi_pool_backward_kernel[(triton.cdiv(total, block),)](grad_out, argmax, grad, total,
                                                           BLOCK=block)
    return grad
