"""Pairwise IoU of two box sets as a Triton kernel, one 2-D block of the (N, M) matrix per program.

NumPy reference: frcnn_scratch/boxes.py, box_iou (its core _box_iou)
Tests:           tests/test_kernels_iou.py (bit-equal to the reference)
Benchmark:       `frcnn bench --op box_iou` (frcnn_scratch/tools/bench.py)

IoU(a, b) = area(a ∩ b) / area(a ∪ b), with area(a ∪ b) = area(a) + area(b) - area(a ∩ b).
Boxes are (x1, y1, x2, y2) with width = x2 - x1 (no +1).  A zero union gives 0, never NaN.

The arithmetic is done in the same float32 order as the NumPy reference (frcnn_scratch.boxes.box_iou):
areas, then the intersection's width and height clamped at 0, then inter / (area_a + area_b - inter).
Division is IEEE round-to-nearest (`div_rn`) and FMA fusion is switched off at launch, so a GPU gives
the same bits as NumPy, not just close ones (`frcnn kernels` checks the compiled code for it).

Memory: a program reads BLOCK_N + BLOCK_M boxes and writes a BLOCK_N x BLOCK_M block of the output,
whose rows are contiguous, so consecutive lanes store to consecutive addresses.  Offsets are int64:
N * M passes 2**31 at 46341 x 46341 boxes.
"""
from . import device  # noqa: F401  (imports the package first: sets TRITON_INTERPRET=1 without CUDA)

import torch
import triton
import triton.language as tl

from . import _launch


@triton.jit
def load_boxes(ptr, idx, ok):
    """The four corners of boxes `idx` (int64, masked by `ok`) of an (N, 4) xyxy array."""
    x1 = tl.load(ptr + idx * 4 + 0, mask=ok, other=0.0)
    y1 = tl.load(ptr + idx * 4 + 1, mask=ok, other=0.0)
    x2 = tl.load(ptr + idx * 4 + 2, mask=ok, other=0.0)
    y2 = tl.load(ptr + idx * 4 + 3, mask=ok, other=0.0)
    return x1, y1, x2, y2


@triton.jit
def pair_iou(ax1, ay1, ax2, ay2, bx1, by1, bx2, by2):
    """IoU of boxes a and b, broadcasting as NumPy does (a as a column against b as a row gives
    the matrix; a vector against one box gives a vector), in the reference's float32 order.
    kernels/nms.py builds its suppression bits with the same function."""
    area_a = (ax2 - ax1) * (ay2 - ay1)
    area_b = (bx2 - bx1) * (by2 - by1)
    # the overlap: larger top-left to smaller bottom-right corner, sides clamped at 0
    iw = tl.minimum(ax2, bx2) - tl.maximum(ax1, bx1)
    ih = tl.minimum(ay2, by2) - tl.maximum(ay1, by1)
    inter = tl.maximum(iw, 0.0) * tl.maximum(ih, 0.0)
    union = area_a + area_b - inter
    safe_union = tl.where(union > 0.0, union, 1.0)
    return tl.where(union > 0.0, tl.math.div_rn(inter, safe_union), 0.0)


@triton.jit
def box_iou_kernel(a_ptr, b_ptr, out_ptr, N, M,
                   BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """out[i, j] = IoU(a[i], b[j]) for the BLOCK_N x BLOCK_M block at program id (pid_n, pid_m)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) into a
    cols = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) into b
    row_ok = rows < N
    col_ok = cols < M
    ax1, ay1, ax2, ay2 = load_boxes(a_ptr, rows, row_ok)
    bx1, by1, bx2, by2 = load_boxes(b_ptr, cols, col_ok)
    iou = pair_iou(ax1[:, None], ay1[:, None], ax2[:, None], ay2[:, None],
                   bx1[None, :], by1[None, :], bx2[None, :], by2[None, :])  # (BLOCK_N, BLOCK_M)
    out_mask = row_ok[:, None] & col_ok[None, :]
    tl.store(out_ptr + rows[:, None] * M + cols[None, :], iou, mask=out_mask)


def box_iou(boxes1, boxes2, block_n=32, block_m=32):
    """Pairwise IoU on the device.

    Args:
        boxes1: (N, 4) float32 tensor, xyxy.
        boxes2: (M, 4) float32 tensor, xyxy, on the same device.
        block_n, block_m: block of the output matrix each program computes (powers of two).
    Returns:
        (N, M) float32 tensor; entries with zero union are 0.
    """
    a = _launch.tensor(boxes1, "boxes1", torch.float32, 2, last_dim=4)
    b = _launch.tensor(boxes2, "boxes2", torch.float32, 2, last_dim=4)
    _launch.same_device(b, "boxes2", a)
    n, m = a.shape[0], b.shape[0]
    out = torch.empty((n, m), dtype=torch.float32, device=a.device)
    if n == 0 or m == 0:
        return out
    block_m = min(block_m, triton.next_power_of_2(m))  # a narrow matrix: fewer idle lanes
    block_n = min(block_n, triton.next_power_of_2(n))
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    box_iou_kernel[grid](a, b, out, n, m, BLOCK_N=block_n, BLOCK_M=block_m,
                         enable_fp_fusion=False)
    return out
