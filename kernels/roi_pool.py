"""RoI max pooling (Fast R-CNN section 2.1) forward and backward as Triton kernels.

Semantics are those of the NumPy reference, frcnn_scratch/roi_pool.py (torchvision.ops.roi_pool):
corners times spatial_scale rounded half away from zero, roi size max(end - start + 1, 1),
bin i covering floor(i * size / n) .. ceil((i + 1) * size / n) after the start, clipped to the map,
empty bin -> 0 and argmax -1, first maximum in row-major order.

Forward, laid out for the GPU.  The launcher makes one channels-last copy of the map, (N, H, W, C),
so that the C values of a cell are neighbours in memory.  One program takes one row i of bins of
one RoI and a block of BLOCK_C channels: a (BLOCK_PW, BLOCK_C) tile, bins j down, channels across.
The bin's rows [h0, h1) are the same for the whole tile (scalars, computed once); its columns
[w0, w1) are one per bin j.  The program walks the cells of its bins in row-major order; at each
cell a warp loads consecutive channels of one cell (consecutive addresses) and keeps a running
max with a strict `>`, so the first maximum in row-major order wins.  Stores go to (K, C, PH, PW):
the PW bins of a channel are consecutive.

Backward: dL/dx = sum of grad_out over the outputs whose argmax is x.  One lane per output, in
the output's order (neighbouring lanes: neighbouring bins of one channel plane), each adding its
gradient at its argmax with a relaxed atomic add (outputs may share an argmax; no ordering needed).

Offsets into every tensor are int64: K * C * PH * PW passes 2**31 at paper sizes times 30.

NumPy reference: frcnn_scratch/roi_pool.py, roi_pool_forward / roi_pool_backward (their cores
                 _roi_pool_forward / _roi_pool_backward; roi_pool_reference, the plain loops).
                 The helpers share its names: round_half_away, scaled_roi_cells, bin_bounds.
Tests:           tests/test_kernels_roi_pool.py (out and argmax bit-equal to the reference)
Benchmark:       `frcnn bench --op roi_pool` (frcnn_scratch/tools/bench.py)
"""
from . import device  # noqa: F401  (imports the package first: sets TRITON_INTERPRET=1 without CUDA)

import torch
import triton
import triton.language as tl

from . import _launch


@triton.jit
def round_half_away(x):
    """C's round() as int64: 2.5 -> 3, -2.5 -> -3.  x - trunc(x) is exact in float32."""
    t = tl.where(x >= 0.0, tl.floor(x), tl.ceil(x))
    step = tl.where(x >= 0.0, 1.0, -1.0)
    return tl.where(tl.abs(x - t) >= 0.5, t + step, t).to(tl.int64)


@triton.jit
def scaled_roi_cells(rois_ptr, k, spatial_scale):
    """Batch index and corners (x1, y1, x2, y2) of RoI k in feature cells, int64: image pixels
    times spatial_scale (in float32), rounded half away from zero."""
    b = tl.load(rois_ptr + k * 5 + 0).to(tl.int64)
    x1 = round_half_away(tl.load(rois_ptr + k * 5 + 1) * spatial_scale)
    y1 = round_half_away(tl.load(rois_ptr + k * 5 + 2) * spatial_scale)
    x2 = round_half_away(tl.load(rois_ptr + k * 5 + 3) * spatial_scale)
    y2 = round_half_away(tl.load(rois_ptr + k * 5 + 4) * spatial_scale)
    return b, x1, y1, x2, y2


@triton.jit
def bin_bounds(start, end, idx, pooled, limit):
    """Cells [lo, hi) of bin(s) `idx` along one axis of a RoI from cell `start` to `end`, clipped
    to [0, limit]: floor(idx * size / pooled) .. ceil((idx + 1) * size / pooled) after `start`,
    in the reference's float32 steps (frcnn_scratch.roi_pool.bin_bounds)."""
    size = tl.maximum(end - start + 1, 1).to(tl.float32)  # cells in the RoI (at least one)
    bin_size = tl.math.div_rn(size, tl.cast(pooled, tl.float32))  # IEEE division, as NumPy's
    i = idx.to(tl.float32)
    lo = tl.floor(i * bin_size).to(tl.int64) + start
    hi = tl.ceil((i + 1.0) * bin_size).to(tl.int64) + start
    return tl.minimum(tl.maximum(lo, 0), limit), tl.minimum(tl.maximum(hi, 0), limit)


@triton.jit
def roi_pool_forward_kernel(feat_ptr, rois_ptr, out_ptr, argmax_ptr,
                            C, H, W, PH, PW, spatial_scale,
                            BLOCK_PW: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[k, c, i, j] = max of features[b, c] over bin (i, j) of RoI k; argmax = its flat index
    into the (N, C, H, W) features.  feat_ptr is the channels-last copy (N, H, W, C)."""
    pid = tl.program_id(0).to(tl.int64)  # one (RoI k, bin row i)
    k = pid // PH
    i = pid % PH
    j = tl.arange(0, BLOCK_PW)  # (BLOCK_PW,) bin columns
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,) channels
    j_ok = j < PW
    c_ok = c < C

    b, x1, y1, x2, y2 = scaled_roi_cells(rois_ptr, k, spatial_scale)  # the RoI in whole cells
    h0, h1 = bin_bounds(y1, y2, i, PH, H)  # scalars: the rows of this bin row
    w0, w1 = bin_bounds(x1, x2, j, PW, W)  # (BLOCK_PW,): the columns of each bin
    width = tl.where(j_ok, tl.maximum(w1 - w0, 0), 0)
    max_width = tl.max(width)  # the widest bin of the row sets the steps (others mask)

    best = tl.full((BLOCK_PW, BLOCK_C), float("-inf"), tl.float32)
    best_cell = tl.full((BLOCK_PW, BLOCK_C), -1, tl.int32)  # h * W + w of the max so far
    for h in range(h0, h1):  # the bins' cells in row-major order
        row = (b * H + h) * W  # flat index of cell (b, h, 0) in the channels-last map
        for dw in range(0, max_width):
            w = w0 + dw  # (BLOCK_PW,) this step's column of each bin
            ok = (dw < width)[:, None] & c_ok[None, :]
            v = tl.load(feat_ptr + ((row + w) * C)[:, None] + c[None, :], mask=ok,
                        other=float("-inf"))  # (BLOCK_PW, BLOCK_C): consecutive channels
            better = v > best  # strict: an earlier equal maximum stays
            best = tl.where(better, v, best)
            best_cell = tl.where(better, (h * W + w).to(tl.int32)[:, None], best_cell)

    found = best_cell >= 0  # an empty bin outputs 0 and argmax -1
    argmax = tl.where(found, (b * C + c[None, :]) * H * W + best_cell, -1)
    o = ((k * C + c[None, :]) * PH + i) * PW + j[:, None]  # (BLOCK_PW, BLOCK_C) into (K, C, PH, PW)
    ok = j_ok[:, None] & c_ok[None, :]
    tl.store(out_ptr + o, tl.where(found, best, 0.0), mask=ok)
    tl.store(argmax_ptr + o, argmax, mask=ok)


@triton.jit
def roi_pool_backward_kernel(grad_out_ptr, argmax_ptr, grad_ptr, TOTAL,
                             BLOCK: tl.constexpr):
    """grad.flat[argmax[t]] += grad_out.flat[t] for the BLOCK outputs t of this program."""
    t = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = t < TOTAL
    g = tl.load(grad_out_ptr + t, mask=ok, other=0.0)
    at = tl.load(argmax_ptr + t, mask=ok, other=-1)
    won = ok & (at >= 0)  # empty bins (argmax -1) send nothing
    tl.atomic_add(grad_ptr + tl.where(won, at, 0), g, mask=won, sem="relaxed")


def roi_pool_forward(features, rois, pooled_h, pooled_w, spatial_scale, block_c=64,
                     num_warps=8):
    """RoI max pooling on the device.

    Args:
        features: (N, C, H, W) float32 tensor; stored channels last (torch.channels_last), it is
            read in place, else copied to that layout once.
        rois: (K, 5) float32 tensor (batch index, x1, y1, x2, y2) in image pixels, same device.
        pooled_h, pooled_w: bins per RoI.
        spatial_scale: feature cells per image pixel.
        block_c: channels per program (a power of two).
    Returns:
        out (K, C, pooled_h, pooled_w) float32 and argmax (same shape) int64: the flat index into
        features of each bin's first maximum, -1 for an empty bin.
    """
    features = _launch.tensor(features, "features", torch.float32, 4,
                              contiguous=False)  # any layout: see _launch.channels_last
    rois = _launch.tensor(rois, "rois", torch.float32, 2, last_dim=5)
    _launch.same_device(rois, "rois", features)
    pooled_h, pooled_w = _launch.output_size(pooled_h, pooled_w)
    n, c, h, w = features.shape
    if h * w >= 2 ** 31:  # the kernel keeps a bin's best cell, h * W + w, as an int32
        raise ValueError(f"features: a map of {h} x {w} cells is more than the kernel's 2**31")
    k = rois.shape[0]
    shape = (k, c, pooled_h, pooled_w)
    if k == 0 or c == 0 or h == 0 or w == 0:  # no RoI, or no cell: every bin is empty
        return (torch.zeros(shape, dtype=torch.float32, device=features.device),
                torch.full(shape, -1, dtype=torch.int64, device=features.device))
    out = torch.empty(shape, dtype=torch.float32, device=features.device)  # every bin is written
    argmax = torch.empty(shape, dtype=torch.int64, device=features.device)
    block_c = min(block_c, triton.next_power_of_2(c))
    grid = (k * pooled_h, triton.cdiv(c, block_c))
    roi_pool_forward_kernel[grid](_launch.channels_last(features), rois, out, argmax, c, h, w,
                                  pooled_h, pooled_w, float(spatial_scale),
                                  BLOCK_PW=triton.next_power_of_2(pooled_w), BLOCK_C=block_c,
                                  num_warps=num_warps, enable_fp_fusion=False)
    return out, argmax


def roi_pool_backward(grad_out, argmax, input_shape, block=128):
    """Gradient of roi_pool_forward with respect to its features: scatter-add at argmax.

    Args:
        grad_out: (K, C, ph, pw) float32 tensor.
        argmax: (K, C, ph, pw) int64 tensor from roi_pool_forward, same device.
        input_shape: (N, C, H, W) of the forward's features.
    Returns:
        (N, C, H, W) float32 tensor.  Where several outputs share an argmax, the adds happen in
        atomic order: the interpreter adds in flat order (as np.add.at does); a GPU may not.
    """
    grad_out = _launch.tensor(grad_out, "grad_out", torch.float32, 4)
    argmax = _launch.tensor(argmax, "argmax", torch.int64, 4)
    _launch.same_device(argmax, "argmax", grad_out)
    if argmax.shape != grad_out.shape:
        raise ValueError(f"argmax: expected shape {tuple(grad_out.shape)}, got {tuple(argmax.shape)}")
    grad = torch.zeros(tuple(int(v) for v in input_shape), dtype=torch.float32,
                       device=grad_out.device)  # zeros: the kernel only adds
    total = grad_out.numel()
    if total == 0:
        return grad
    roi_pool_backward_kernel[(triton.cdiv(total, block),)](grad_out, argmax, grad, total,
                                                           BLOCK=block)
    return grad
