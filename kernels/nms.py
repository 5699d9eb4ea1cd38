"""Greedy non-maximum suppression (Faster R-CNN section 3.3) in the GPU bitmask design.

Greedy NMS visits boxes from the highest score down and keeps a box unless an already kept box
overlaps it with IoU > threshold.  Done literally, that is a sequential loop of IoU rows.  The
bitmask design splits it in two kernels:

1. nms_mask_kernel (parallel): for every pair (i, j) of boxes in score order, one bit says "box i
   would suppress box j": IoU(i, j) > threshold and j comes after i.  The bits are packed 64 to an
   int64 word: mask[i, w] bit b is about box j = 64 * w + b.  Program (r, w) handles the 64 boxes
   i of row block r, one box per lane; each lane walks the 64 boxes j of word w (the same box for
   every lane at each step, so its corners are one broadcast load) and sets bit b when box i
   suppresses box j.  Only words w >= r can hold a bit (j > i), so programs below the diagonal
   return at once and the scan never reads their words.
2. nms_scan_kernel (sequential, one program): walks the boxes 64 at a time with a `removed` bit
   set held in registers.  For block r: the block's own word of `removed` says which of its boxes
   earlier kept boxes suppressed; greedy NMS inside the block is solved on the block's diagonal
   words (see the kernel); then the rows of the block's kept boxes are OR-ed into `removed`, as a
   tile load and a reduction, not one row at a time.  The kept flags are written for the host.

torchvision's CUDA NMS builds the same mask but copies it to the host and scans it in C++; here
the scan stays on the device, so only the kept flags (one byte a box) leave it.

Ordering is the reference's (frcnn_scratch.nms.nms): scores sorted descending with a stable sort,
so ties keep the lower index first; suppression is strict (IoU > threshold), with the float32 IoU
compared to the threshold as a float64 number, as torchvision's CPU nms does.

NumPy reference: frcnn_scratch/nms.py, nms (its core _nms; nms_reference, the plain loops)
Tests:           tests/test_kernels_nms.py (the same indices as the reference)
Benchmark:       `frcnn bench --op nms` (frcnn_scratch/tools/bench.py)
"""
from . import device  # noqa: F401  (imports the package first: sets TRITON_INTERPRET=1 without CUDA)

import numpy as np
import torch
import triton
import triton.language as tl

from . import _launch
from .iou import load_boxes, pair_iou

WORD_BITS = 64  # boxes per mask word (an int64)


def float32_threshold(iou_threshold):
    """The float32 t such that, for every float32 IoU x, x > t exactly when x > iou_threshold
    compared as float64 numbers: float32(threshold), one step down when it rounded up.  The
    reference's function of the same name (frcnn_scratch/nms.py) explains why."""
    t = np.float32(iou_threshold)
    if float(t) > float(iou_threshold):
        t = np.nextafter(t, np.float32(-np.inf))
    return float(t)


@triton.jit
def nms_mask_kernel(boxes_ptr, mask_ptr, N, N_WORDS, iou_threshold, WORD: tl.constexpr):
    """mask[i, w] for the WORD boxes i of row block r = pid 0, word w = pid 1: bit b set when box
    i suppresses box j = w * WORD + b.  boxes are (N, 4) xyxy, already sorted by score
    (descending); iou_threshold is the float32 that compares with float32 IoUs as the float64
    threshold would (see float32_threshold)."""
    r = tl.program_id(0).to(tl.int64)
    w = tl.program_id(1).to(tl.int64)
    if w >= r:  # below the diagonal every j < i: no bit can be set, the scan never reads it
        rows = r * WORD + tl.arange(0, WORD)  # (WORD,) boxes i, one per lane
        row_ok = rows < N
        ax1, ay1, ax2, ay2 = load_boxes(boxes_ptr, rows, row_ok)
        word = tl.zeros((WORD,), tl.int64)
        first = w * WORD  # box j of bit 0
        for b in range(0, tl.minimum(N - first, WORD)):
            j = first + b  # int64: one box j for every lane, four broadcast loads
            bx1 = tl.load(boxes_ptr + j * 4 + 0)
            by1 = tl.load(boxes_ptr + j * 4 + 1)
            bx2 = tl.load(boxes_ptr + j * 4 + 2)
            by2 = tl.load(boxes_ptr + j * 4 + 3)
            iou = pair_iou(ax1, ay1, ax2, ay2, bx1, by1, bx2, by2)  # (WORD,) same float32 steps
            hit = (iou > iou_threshold) & (j > rows)  # only a higher-scored box suppresses
            word = word | (hit.to(tl.int64) << b)
        tl.store(mask_ptr + rows * N_WORDS + w, word, mask=row_ok)


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def nms_scan_kernel(mask_ptr, keep_ptr, N, N_WORDS,
                    WORD: tl.constexpr, BLOCK_W: tl.constexpr, ROWS: tl.constexpr):
    """One program: keep[i] = 1 if greedy NMS keeps box i (in score order), else 0.

    removed (BLOCK_W words >= N_WORDS, in registers): bit b of word w is set once a kept box
    suppresses box w * WORD + b.  For each block of WORD boxes, in order:

    * dead = the block's word of `removed`; the block's candidates are its boxes not in dead.
    * Greedy inside the block.  diag[a] = mask[a, block] has bit b set when box a suppresses box
      b of the same block (only for b > a).  The kept set K must satisfy
          K = {b candidate : no a in K has bit b in diag[a]},
      and this has exactly one solution, the greedy one (box b's fate depends only on boxes
      before it).  Iterating K <- that set from K = all candidates reaches it: after t rounds
      the first t boxes are right, and it stops as soon as a round changes nothing (usually
      after two or three rounds, never more than WORD + 1).
    * removed |= the rows of the kept boxes, for the words after the block: a (ROWS, BLOCK_W) tile
      of the mask (only kept rows are read) OR-reduced over its rows, WORD // ROWS tiles a block.
    """
    words = tl.arange(0, BLOCK_W).to(tl.int64)  # (BLOCK_W,) word numbers
    lane = tl.arange(0, WORD)  # (WORD,) position in a block
    lane64 = lane.to(tl.int64)
    one = tl.full((WORD,), 1, tl.int64)
    removed = tl.zeros((BLOCK_W,), tl.int64)
    for blk32 in range(0, N_WORDS):
        blk = tl.cast(blk32, tl.int64)  # the block's number (its word in every row)
        rows = blk * WORD + lane64  # (WORD,) int64: the block's boxes
        row_ok = rows < N
        dead = tl.sum(tl.where(words == blk, removed, 0))  # the block's word of `removed`
        present = tl.reduce(tl.where(row_ok, one << lane, 0), 0, _bit_or)
        candidates = present & ~dead
        diag = tl.load(mask_ptr + rows * N_WORDS + blk, mask=row_ok, other=0)  # (WORD,)

        kept = candidates
        changed = kept == kept  # True, as a scalar tensor (the loop condition)
        while changed:
            in_kept = ((kept >> lane) & 1) != 0  # (WORD,) box a is in K
            hit = tl.reduce(tl.where(in_kept, diag, 0), 0, _bit_or)  # boxes K suppresses
            new = candidates & ~hit
            changed = new != kept
            kept = new
        tl.store(keep_ptr + rows, ((kept >> lane) & 1).to(tl.int8), mask=row_ok)

        later = (words > blk) & (words < N_WORDS)  # (BLOCK_W,) words the block can still affect
        for r0 in tl.static_range(0, WORD, ROWS):
            sub = r0 + tl.arange(0, ROWS)  # (ROWS,) positions in the block
            sub_rows = blk * WORD + sub.to(tl.int64)  # (ROWS,) int64: their boxes
            take = (((kept >> sub) & 1) != 0) & (sub_rows < N)
            row_words = tl.load(mask_ptr + sub_rows[:, None] * N_WORDS + words[None, :],
                                mask=take[:, None] & later[None, :], other=0)  # (ROWS, BLOCK_W)
            removed = removed | tl.reduce(row_words, 0, _bit_or)


def suppression_mask(sorted_boxes, iou_threshold, num_warps=2):
    """Launch nms_mask_kernel: (N, 4) boxes in score order -> (N, ceil(N / 64)) int64 bitmask.

    Only the words on and above the block diagonal (w >= i // 64) are written; the others are
    left as they were allocated (never read)."""
    n = sorted_boxes.shape[0]
    n_words = triton.cdiv(n, WORD_BITS)
    mask = torch.empty((n, n_words), dtype=torch.int64, device=sorted_boxes.device)
    if n == 0:
        return mask
    grid = (n_words, n_words)
    nms_mask_kernel[grid](sorted_boxes, mask, n, n_words, float32_threshold(iou_threshold),
                          WORD=WORD_BITS, num_warps=num_warps, enable_fp_fusion=False)
    return mask


def scan_mask(mask, tile_words=8192, num_warps=8):
    """Launch nms_scan_kernel: (N, W) int64 bitmask -> (N,) int8 flags, 1 for the boxes kept.

    tile_words bounds the (ROWS, BLOCK_W) tile of mask words the program loads at once (so that
    it stays in registers for any N)."""
    n, n_words = mask.shape
    keep = torch.empty(n, dtype=torch.int8, device=mask.device)
    if n == 0:
        return keep
    block_w = triton.next_power_of_2(n_words)
    rows = max(1, min(WORD_BITS, tile_words // block_w))
    nms_scan_kernel[(1,)](mask, keep, n, n_words, WORD=WORD_BITS, BLOCK_W=block_w, ROWS=rows,
                          num_warps=num_warps)
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
    boxes = _launch.tensor(boxes, "boxes", torch.float32, 2, last_dim=4, contiguous=False)
    scores = _launch.tensor(scores, "scores", torch.float32, 1, contiguous=False)
    if scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"scores: expected shape ({boxes.shape[0]},) to match boxes, "
                         f"got {tuple(scores.shape)}")
    _launch.same_device(scores, "scores", boxes)
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)

    order = torch.sort(scores, descending=True, stable=True).indices  # (N,) ties: lower index first
    sorted_boxes = boxes[order].contiguous()  # (N, 4)
    mask = suppression_mask(sorted_boxes, iou_threshold)  # (N, ceil(N / 64)) int64
    keep = scan_mask(mask)  # (N,) int8, in score order
    return order[keep.bool()]
