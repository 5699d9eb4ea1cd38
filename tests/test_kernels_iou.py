"""kernels/iou.py against the NumPy reference boxes.box_iou: equal bit for bit (same float32 steps).

Runs under Triton's interpreter when there is no GPU (kernels sets TRITON_INTERPRET=1 on import),
so sizes are small.
"""
from frcnn_scratch import kernels  # noqa: F401  (first: switches the interpreter on before triton is imported)

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import assert_same
from frcnn_scratch import ops
from frcnn_scratch.boxes import box_iou as reference_iou
from frcnn_scratch.kernels.iou import box_iou as kernel_iou

DEV = kernels.device()


def run_kernel(a, b, **blocks):
    out = kernel_iou(torch.tensor(a, device=DEV), torch.tensor(b, device=DEV), **blocks)
    return out.cpu().numpy()


def random_boxes(rng, n, degenerate=True):
    """(n, 4) float32 boxes; with degenerate, some have zero width/height and some repeat."""
    xy = rng.uniform(-20, 60, (n, 2))
    wh = rng.uniform(0, 40, (n, 2))
    if degenerate and n:
        wh[rng.random(n) < 0.15, 0] = 0  # zero width
        wh[rng.random(n) < 0.15, 1] = 0  # zero height
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    if degenerate and n > 2:
        boxes[1::7] = boxes[0]  # identical boxes
    return boxes


# ---- hand-computed cases --------------------------------------------------------------------

def test_hand_computed_values():
    a = np.array([[0, 0, 2, 2], [0, 0, 0, 0], [0, 0, 10, 10]], np.float32)
    b = np.array([[1, 1, 3, 3], [0, 0, 0, 0], [10, 0, 20, 10], [0, 0, 10, 10]], np.float32)
    want = np.array([
        [1 / 7, 0, 0, 0.04],  # overlap 1 of union 7; 4 / 100
        [0, 0, 0, 0],         # a zero-area box: zero union with itself gives 0, not NaN
        [0.04, 0, 0, 1],      # contains b[0]: 4 / 100; touching edges: 0; identical: 1
    ], np.float32)
    got = run_kernel(a, b)
    assert_same(got, want, "kernel IoU vs hand-computed")


def test_zero_union_is_zero_not_nan():
    a = np.array([[5, 5, 5, 5], [3, 1, 3, 9]], np.float32)  # a point and a vertical segment
    got = run_kernel(a, a)
    assert not np.isnan(got).any()
    assert_same(got, np.zeros((2, 2), np.float32), "zero-union IoU")


# ---- the reference, bit for bit --------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 63, 64, 65, 257])
def test_sizes_around_the_block_equal_reference(n):
    rng = np.random.default_rng(n)
    a = random_boxes(rng, n)
    b = random_boxes(rng, 50)
    assert_same(run_kernel(a, b), reference_iou(a, b), f"box_iou {n} x 50")
    assert_same(run_kernel(b, a), reference_iou(b, a), f"box_iou 50 x {n}")


def test_block_shape_does_not_change_bits():
    rng = np.random.default_rng(7)
    a, b = random_boxes(rng, 40), random_boxes(rng, 33)
    want = reference_iou(a, b)
    for bn, bm in [(16, 64), (64, 16), (1, 128)]:
        assert_same(run_kernel(a, b, block_n=bn, block_m=bm), want, f"blocks {bn}x{bm}")


def test_through_ops_with_triton_backend():
    rng = np.random.default_rng(3)
    a, b = random_boxes(rng, 65), random_boxes(rng, 17)
    got = ops.box_iou(a, b, backend="triton")
    assert_same(got, ops.box_iou(a, b, backend="numpy"), "ops.box_iou triton vs numpy")


@pytest.mark.parametrize("n, m", [(0, 3), (3, 0), (0, 0)])
def test_empty_inputs(n, m):
    a, b = np.zeros((n, 4), np.float32), np.zeros((m, 4), np.float32)
    for got in (run_kernel(a, b), ops.box_iou(a, b, backend="triton")):
        assert got.shape == (n, m) and got.dtype == np.float32


# ---- hypothesis: random and degenerate boxes -------------------------------------------------

_half = st.integers(-4, 24).map(lambda v: v / 2)             # half-pixel grid: many exact ties
_side = st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.5, 8.0])
_grid_box = st.tuples(_half, _half, _side, _side)
_float_box = st.tuples(st.floats(-50, 50, width=32), st.floats(-50, 50, width=32),
                       st.floats(0, 30, width=32), st.floats(0, 30, width=32))
_boxes = st.lists(st.one_of(_grid_box, _float_box), max_size=20)


def as_xyxy(rows):
    """(x1, y1, w, h) rows -> (N, 4) float32 xyxy with x2 = x1 + w computed in float32."""
    t = np.array(rows, np.float32).reshape(-1, 4)
    return np.concatenate([t[:, :2], t[:, :2] + t[:, 2:]], axis=1)


@settings(max_examples=25, deadline=None)
@given(a=_boxes, b=_boxes)
def test_property_equals_reference(a, b):
    a, b = as_xyxy(a), as_xyxy(b)
    got = run_kernel(a, b)
    assert_same(got, reference_iou(a, b), "kernel vs numpy on hypothesis boxes")
    assert ((got >= 0) & (got <= 1)).all()


# ---- launcher checks -------------------------------------------------------------------------

def test_launcher_rejects_bad_inputs():
    good = torch.zeros((2, 4), device=DEV)
    with pytest.raises(ValueError, match="boxes1"):
        kernel_iou(torch.zeros((2, 3), device=DEV), good)
    with pytest.raises(ValueError, match="float32"):
        kernel_iou(good, good.double())
    with pytest.raises(ValueError, match="boxes2"):
        kernel_iou(good, np.zeros((2, 4), np.float32))
