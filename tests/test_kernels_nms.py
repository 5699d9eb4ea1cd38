"""kernels/nms.py against the NumPy reference nms.nms: the same kept indices, exactly.

The bitmask kernel packs "box i suppresses box j" into int64 words; the tests include sizes at and
around the 64-box word (1, 63, 64, 65, 257), a word whose bit 63 (the sign bit) is set, the scan
kernel on hand-made masks (suppression chains inside a block and across blocks), and an IoU equal
to float32(threshold), which the float64 comparison must suppress.
"""
from frcnn_scratch import kernels  # noqa: F401  (first: switches the interpreter on before triton is imported)

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from frcnn_scratch import ops
from frcnn_scratch.nms import nms as reference_nms
from frcnn_scratch.kernels.nms import nms as kernel_nms, scan_mask, suppression_mask
from frcnn_scratch.nms import nms_reference

DEV = kernels.device()


def run_kernel(boxes, scores, thr):
    keep = kernel_nms(torch.tensor(boxes, device=DEV), torch.tensor(scores, device=DEV), thr)
    assert keep.dtype == torch.int64
    return keep.cpu().numpy()


def assert_same_keep(got, want, what):
    assert got.dtype == np.int64, f"{what}: dtype {got.dtype}, want int64"
    if not np.array_equal(got, want):
        n = min(len(got), len(want))
        first = next((i for i in range(n) if got[i] != want[i]), n)
        raise AssertionError(f"{what}: kernel kept {len(got)}, numpy kept {len(want)}; first "
                             f"difference at position {first}: kernel {got[first:first + 5]} vs "
                             f"numpy {want[first:first + 5]}")


def clustered_boxes(rng, n):
    """(n, 4) boxes jittered around a few centres (like RPN proposals) plus repeats."""
    centres = rng.uniform(0, 100, (max(n // 8, 1), 2))
    c = centres[rng.integers(0, len(centres), n)] + rng.normal(0, 3, (n, 2))
    wh = rng.uniform(5, 30, (n, 2))
    boxes = np.concatenate([c - wh / 2, c + wh / 2], axis=1).astype(np.float32)
    if n > 3:
        boxes[2::9] = boxes[0]       # identical boxes
        boxes[3::11, 2] = boxes[3::11, 0]  # zero width
    return boxes


# ---- hand-computed cases --------------------------------------------------------------------

def test_hand_computed_keep():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30]], np.float32)
    got = run_kernel(boxes, np.array([0.9, 0.8, 0.7], np.float32), 0.5)  # IoU(0, 1) = 9 / 11
    assert_same_keep(got, np.array([0, 2]), "hand case")


def test_iou_equal_to_threshold_survives():
    boxes = np.array([[0, 0, 3, 1], [1, 0, 4, 1]], np.float32)  # IoU exactly 2 / 4
    scores = np.array([0.5, 0.9], np.float32)
    assert_same_keep(run_kernel(boxes, scores, 0.5), np.array([1, 0]), "IoU == threshold")
    assert_same_keep(run_kernel(boxes, scores, 0.49), np.array([1]), "IoU > threshold")


def test_equal_scores_keep_lower_index():
    boxes = np.tile(np.array([[0, 0, 4, 4]], np.float32), (5, 1))
    assert_same_keep(run_kernel(boxes, np.ones(5, np.float32), 0.3), np.array([0]), "ties")


def test_bit_63_of_a_word():
    # 64 boxes in score order; box 0 overlaps only box 63, so row 0's word is exactly bit 63.
    boxes = np.array([[3 * i, 1000, 3 * i + 1, 1001] for i in range(64)], np.float32)
    boxes[0] = boxes[63] = [0, 0, 10, 10]
    mask = suppression_mask(torch.tensor(boxes, device=DEV), 0.5).cpu().numpy()
    assert mask.shape == (64, 1) and mask.dtype == np.int64
    assert mask[0, 0] == np.iinfo(np.int64).min, f"row 0 word {mask[0, 0]:#x}, want bit 63 only"
    assert (mask[1:] == 0).all(), "no other box suppresses anything"
    scores = np.linspace(1, 0, 64).astype(np.float32)
    assert_same_keep(run_kernel(boxes, scores, 0.5), reference_nms(boxes, scores, 0.5), "bit 63")


def scan(words):
    """The scan kernel on a hand-made (N, W) mask -> the kept positions."""
    flags = scan_mask(torch.tensor(np.array(words, np.int64), device=DEV)).cpu().numpy()
    assert flags.dtype == np.int8 and set(np.unique(flags)) <= {0, 1}
    return np.flatnonzero(flags).tolist()


def test_scan_mask_by_hand():
    # 3 boxes: 0 suppresses 1 (bit 1), 1 would suppress 2 (bit 2) but 1 is gone -> keep 0, 2
    assert scan([[0b010], [0b100], [0]]) == [0, 2]
    # a chain inside one word: 0 -> 1 -> 2 -> 3 -> 4: keep 0, 2, 4 (the fixed point needs rounds)
    assert scan([[0b10], [0b100], [0b1000], [0b10000], [0]]) == [0, 2, 4]


def test_scan_mask_across_words():
    # 130 boxes in 3 words.  Box 0 suppresses box 64 (word 1, bit 0) and box 129 (word 2, bit 1);
    # box 64 would suppress box 128, but it is gone, so box 128 stays; box 65 suppresses box 66.
    # Words below the diagonal block are never read: fill them with garbage (all ones).
    n, garbage = 130, -1
    mask = np.zeros((n, 3), np.int64)
    mask[64:, 0] = garbage
    mask[128:, 1] = garbage
    mask[0, 1] = 1          # box 0 -> box 64
    mask[0, 2] = 0b10       # box 0 -> box 129
    mask[64, 2] = 0b1       # box 64 -> box 128 (box 64 is suppressed: no effect)
    mask[65, 1] = 0b100     # box 65 -> box 66
    keep = scan(mask)
    assert keep == [i for i in range(n) if i not in (64, 66, 129)], keep


def test_iou_equal_to_float32_threshold_is_suppressed():
    # IoU = 3 / 10 exactly as float32, which is float32(0.3) = 0.30000001: above 0.3, so box 1
    # goes (torchvision compares the float32 IoU with the float64 threshold); at 0.30000002 it stays
    boxes = np.array([[0, 0, 6, 1], [3, 0, 10, 1]], np.float32)  # inter 3, union 6 + 7 - 3
    scores = np.array([0.9, 0.8], np.float32)
    assert np.float32(3) / np.float32(10) == np.float32(0.3) and float(np.float32(0.3)) > 0.3
    for thr, want in ((0.3, [0]), (float(np.float32(0.3)), [0, 1])):
        assert_same_keep(run_kernel(boxes, scores, thr), np.array(want), f"kernel thr={thr!r}")
        for fn in (reference_nms, nms_reference):
            assert_same_keep(fn(boxes, scores, thr), np.array(want), f"{fn.__name__} thr={thr!r}")


def test_suppression_chain_end_to_end():
    # A suppresses B, so B cannot suppress C: keep A and C (the greedy order matters)
    boxes = np.array([[0, 0, 10, 10], [4, 0, 14, 10], [8, 0, 18, 10]], np.float32)
    scores = np.array([0.9, 0.8, 0.7], np.float32)  # IoU(A, B) = IoU(B, C) = 6/14, IoU(A, C) 2/18
    assert_same_keep(run_kernel(boxes, scores, 0.4), np.array([0, 2]), "chain")


# ---- the reference, exactly ------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 63, 64, 65, 257])
@pytest.mark.parametrize("thr", [0.0, 0.5, 0.7])
def test_sizes_around_the_word_equal_reference(n, thr):
    rng = np.random.default_rng(n)
    boxes = clustered_boxes(rng, n)
    scores = rng.integers(0, 6, n).astype(np.float32)  # many equal scores
    assert_same_keep(run_kernel(boxes, scores, thr), reference_nms(boxes, scores, thr),
                     f"nms n={n} thr={thr}")


def test_identical_boxes_across_words():
    boxes = np.tile(np.array([[1, 2, 5, 9]], np.float32), (130, 1))
    scores = np.zeros(130, np.float32)
    assert_same_keep(run_kernel(boxes, scores, 0.7), np.array([0]), "130 identical boxes")


def test_through_ops_with_triton_backend():
    rng = np.random.default_rng(5)
    boxes = clustered_boxes(rng, 70)
    scores = rng.random(70).astype(np.float32)
    assert_same_keep(ops.nms(boxes, scores, 0.5, backend="triton"),
                     ops.nms(boxes, scores, 0.5, backend="numpy"), "ops.nms")
    for max_keep in (0, 3, 1000):                 # the proposal layer's post-NMS top N
        assert_same_keep(ops.nms(boxes, scores, 0.5, backend="triton", max_keep=max_keep),
                         ops.nms(boxes, scores, 0.5, backend="numpy", max_keep=max_keep),
                         f"ops.nms max_keep={max_keep}")
    classes = rng.integers(0, 3, 70)
    assert_same_keep(ops.batched_nms(boxes, scores, classes, 0.5, backend="triton"),
                     ops.batched_nms(boxes, scores, classes, 0.5, backend="numpy"),
                     "ops.batched_nms")


def test_empty_inputs():
    empty = np.zeros((0, 4), np.float32)
    for got in (run_kernel(empty, np.zeros(0, np.float32), 0.5),
                ops.nms(empty, np.zeros(0), 0.5, backend="triton")):
        assert got.shape == (0,) and got.dtype == np.int64


# ---- hypothesis: random and degenerate boxes, tied scores ------------------------------------

_half = st.integers(0, 16).map(lambda v: v / 2)   # small half-pixel grid: overlaps, ties, points
_side = st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0, 6.0])
_box = st.one_of(st.tuples(_half, _half, _side, _side),
                 st.tuples(st.floats(0, 20, width=32), st.floats(0, 20, width=32),
                           st.floats(0, 10, width=32), st.floats(0, 10, width=32)))
_score = st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(-5, 5, width=32))


@settings(max_examples=25, deadline=None)
@given(rows=st.lists(st.tuples(_box, _score), max_size=70),
       thr=st.one_of(st.sampled_from([0.0, 1 / 3, 0.5, 0.7, 1.0]), st.floats(0, 1)))
def test_property_equals_reference(rows, thr):
    t = np.array([b for b, _ in rows], np.float32).reshape(-1, 4)
    boxes = np.concatenate([t[:, :2], t[:, :2] + t[:, 2:]], axis=1)
    scores = np.array([s for _, s in rows], np.float32)
    assert_same_keep(run_kernel(boxes, scores, thr), reference_nms(boxes, scores, thr),
                     f"hypothesis nms thr={thr}")


# ---- launcher checks -------------------------------------------------------------------------

def test_launcher_rejects_bad_inputs():
    boxes = torch.zeros((3, 4), device=DEV)
    with pytest.raises(ValueError, match="scores"):
        kernel_nms(boxes, torch.zeros(2, device=DEV), 0.5)
    with pytest.raises(ValueError, match="boxes"):
        kernel_nms(torch.zeros((3, 5), device=DEV), torch.zeros(3, device=DEV), 0.5)
