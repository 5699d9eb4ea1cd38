"""Greedy non-maximum suppression (Faster R-CNN section 3.3) in the GPU bitmask design.

Greedy NMS visits boxes from the highest score down and keeps a box unless an already kept box
overlaps it with IoU > threshold.  Done literally, that is a sequential loop of IoU rows.  The
bitmask design splits it in two:

1. (parallel, the kernel) For every pair (i, j) of boxes in score order, one bit says
   "box i would suppress box j": IoU(i, j) > threshold and j comes after i.  The bits are packed
   64 to an int64 word: mask[i, w] bit b is about box j = 64 * w + b.  One program computes the
   64 x 64 tile of boxes i in block `pid_i` against boxes j in block `pid_j`, i.e. one word per row.
2. (sequential, host code) Walk the boxes in score order with a running "removed" bit set; keep box
   i if its bit is clear, then OR box i's mask row into the set.

Why the scan runs on the host: it is inherently sequential (each decision depends on all earlier
ones), so a kernel for it would run one program while the rest of the device idles, looping N times
with a reduction per step; copying the N x N/64 words (4.5 MB for N = 6000) and scanning them with
Python's big integers takes about as long and reads far more plainly.  torchvision's CUDA NMS makes
the same choice.

Ordering is the reference's (frcnn_scratch.nms.nms): scores sorted descending with a stable sort,
so ties keep the lower index first; suppression is strict (IoU > threshold).
"""
from . import device  # noqa: F401  (imports the package first: sets TRITON_INTERPRET=1 without CUDA)

import numpy as np
import torch
import triton
import triton.language as tl

from .iou import tile_iou

WORD_BITS = 64  # boxes per mask word (an int64)


@triton.jit
def nms_mask_kernel(boxes_ptr, mask_ptr, N, N_WORDS, iou_threshold,
                    WORD: tl.constexpr):
    """mask[i, pid_j] for the WORD boxes i of block pid_i: bit b set when box i suppresses box
    j = pid_j * WORD + b.  boxes are (N, 4) xyxy, already sorted by score (descending)."""
    rows = tl.program_id(0) * WORD + tl.arange(0, WORD)  # (WORD,) boxes i
    cols = tl.program_id(1) * WORD + tl.arange(0, WORD)  # (WORD,) boxes j
    row_ok = rows < N
    col_ok = cols < N

    # IoU of the tile, in the reference's float32 order (the same code as kernels/iou.py)
    iou = tile_iou(boxes_ptr, rows, row_ok, boxes_ptr, cols, col_ok)  # (WORD, WORD)

    later = cols[None, :] > rows[:, None]  # only a higher-scored box suppresses
    suppress = (iou > iou_threshold) & later & col_ok[None, :]  # (WORD, WORD) bool

    # pack each row's WORD booleans into one int64: bit b <- column b.  The bits are distinct, so
    # their sum is their OR.  Bit 63 is the sign bit: 1 << 63 is INT64_MIN, and INT64_MIN plus
    # bits 0..62 (at most 2**63 - 1) stays in range, so the sum never overflows.
    bit = tl.arange(0, WORD).to(tl.int64)
    words = tl.sum(suppress.to(tl.int64) << bit[None, :], axis=1)  # (WORD,) int64
    tl.store(mask_ptr + rows * N_WORDS + tl.program_id(1), words, mask=row_ok)


def suppression_mask(sorted_boxes, iou_threshold):
    """Launch nms_mask_kernel: (N, 4) boxes in score order -> (N, ceil(N / 64)) int64 bitmask."""
    n = sorted_boxes.shape[0]
    n_words = triton.cdiv(n, WORD_BITS)
    mask = torch.empty((n, n_words), dtype=torch.int64, device=sorted_boxes.device)
    if n == 0:
        return mask
    grid = (n_words, n_words)
    nms_mask_kernel[grid](sorted_boxes, mask, n, n_words, float(iou_threshold),
                          WORD=WORD_BITS, enable_fp_fusion=False)
    return mask


def scan_mask(mask):
    """The greedy pass over the bitmask: (N, W) int64 -> list of kept positions (in score order).

    `removed` is one Python integer whose bit j says box j has been suppressed by a kept box;
    each kept box ORs its row (read as a little-endian N-bit integer) into it.
    """
    rows = np.ascontiguousarray(mask, dtype="<i8")  # (N, W); little-endian words = bit order
    removed = 0
    keep = []
    for i in range(rows.shape[0]):
        if not (removed >> i) & 1:
            keep.append(i)
            removed |= int.from_bytes(rows[i].tobytes(), "little")
    return keep


def nms(boxes, scores, iou_threshold):
    """Greedy NMS on the device.

    Args:
        boxes: (N, 4) float32 tensor, xyxy.
        scores: (N,) float32 tensor on the same device.
        iou_threshold: a box is suppressed by a kept one when their IoU > iou_threshold.
    Returns:
        (K,) int64 tensor on the boxes' device: indices of kept boxes, highest score first
        (ties: lower index first).
    """
    if not isinstance(boxes, torch.Tensor) or not isinstance(scores, torch.Tensor):
        raise ValueError("boxes, scores: expected torch tensors")
    if boxes.dim() != 2 or boxes.shape[1] != 4 or boxes.dtype != torch.float32:
        raise ValueError(f"boxes: expected (N, 4) float32, got {tuple(boxes.shape)} {boxes.dtype}")
    if scores.shape != (boxes.shape[0],) or scores.dtype != torch.float32:
        raise ValueError(f"scores: expected ({boxes.shape[0]},) float32, "
                         f"got {tuple(scores.shape)} {scores.dtype}")
    if scores.device != boxes.device:
        raise ValueError(f"scores: expected device {boxes.device}, got {scores.device}")
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)

    order = torch.sort(scores, descending=True, stable=True).indices  # (N,) ties: lower index first
    sorted_boxes = boxes[order].contiguous()  # (N, 4)
    mask = suppression_mask(sorted_boxes, iou_threshold)  # (N, ceil(N / 64)) int64
    keep = scan_mask(mask.cpu().numpy())
    return order[torch.as_tensor(keep, dtype=torch.int64, device=boxes.device)]
