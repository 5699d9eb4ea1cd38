"""kernels/roi_pool.py against the NumPy reference roi_pool.py: values and argmax exactly equal.

Backward: each output's gradient is added at its argmax with tl.atomic_add.  Where several outputs
share an argmax, float32 addition order matters.  Under the interpreter (no GPU) the programs and
the adds within a program run in flat order, exactly as np.add.at does, so the result is
bit-identical; on a GPU the order is not fixed, so random float gradients are compared to within
float32 rounding of the sum of |terms| there, and integer-valued gradients (whose sums are exact
in any order) must be bit-identical everywhere.
"""
from frcnn_scratch import kernels  # noqa: F401  (first: switches the interpreter on before triton is imported)

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import assert_same
from frcnn_scratch import ops
from frcnn_scratch import roi_pool as ref
from frcnn_scratch.kernels.roi_pool import roi_pool_backward, roi_pool_forward

DEV = kernels.device()


def run_forward(features, rois, ph, pw, scale):
    out, argmax = roi_pool_forward(torch.tensor(features, device=DEV),
                                   torch.tensor(rois, device=DEV), ph, pw, scale)
    return out.cpu().numpy(), argmax.cpu().numpy()


def run_backward(grad_out, argmax, shape):
    grad = roi_pool_backward(torch.tensor(grad_out, device=DEV),
                             torch.tensor(argmax, device=DEV), shape)
    return grad.cpu().numpy()


def check_against_reference(features, rois, ph, pw, scale, what):
    out, argmax = run_forward(features, rois, ph, pw, scale)
    want_out, want_argmax = ref.roi_pool_forward(features, rois, (ph, pw), scale)
    assert_same(out, want_out, f"{what}: out")
    assert_same(argmax, want_argmax, f"{what}: argmax")
    # integer-valued gradients: their sums are exact in any order, so bit-identical on any device
    g = np.random.default_rng(0).integers(-8, 9, out.shape).astype(np.float32)
    assert_same(run_backward(g, argmax, features.shape),
                ref.roi_pool_backward(g, want_argmax, features.shape), f"{what}: backward")


def random_case(rng, n=2, c=3, h=8, w=10, k=5, stride=8):
    features = rng.standard_normal((n, c, h, w)).astype(np.float32)
    features[0, :, 1:4, 1:4] = 1.5  # a plateau: ties decided by row-major order
    xy = rng.uniform(-3 * stride, (w + 3) * stride, (k, 2))
    wh = rng.uniform(0, 8 * stride, (k, 2))
    rois = np.concatenate([rng.integers(0, n, (k, 1)), xy, xy + wh], axis=1).astype(np.float32)
    return features, rois


# ---- hand-computed cases --------------------------------------------------------------------

def test_hand_computed_2x2():
    features = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)  # value = flat index
    rois = np.array([[0, 0, 0, 3, 3]], np.float32)                   # the whole 4 x 4 map
    out, argmax = run_forward(features, rois, 2, 2, 1.0)
    assert_same(out, np.array([[[[5, 7], [13, 15]]]], np.float32), "out")
    assert_same(argmax, np.array([[[[5, 7], [13, 15]]]], np.int64), "argmax")
    grad = run_backward(np.ones((1, 1, 2, 2), np.float32), argmax, features.shape)
    want = np.zeros(16, np.float32)
    want[[5, 7, 13, 15]] = 1
    assert_same(grad, want.reshape(1, 1, 4, 4), "backward")


def test_first_maximum_and_empty_bins():
    # all equal: the first cell of a bin wins, also across the kernel's steps of 16 cells (25 here)
    features = np.ones((1, 2, 5, 5), np.float32)
    rois = np.array([[0, 0, 0, 4, 4],            # whole map, 1 x 1 output
                     [0, 10, 10, 20, 20]],       # wholly outside the 5 x 5 map: empty bins
                    np.float32)
    out, argmax = run_forward(features, rois, 1, 1, 1.0)
    assert_same(argmax[0, :, 0, 0], np.array([0, 25], np.int64), "first max (channel planes)")
    assert_same(out[1], np.zeros((2, 1, 1), np.float32), "empty bin value")
    assert_same(argmax[1], np.full((2, 1, 1), -1, np.int64), "empty bin argmax")
    grad = run_backward(np.ones((2, 2, 1, 1), np.float32), argmax, features.shape)
    assert grad.sum() == 2, "empty bins send no gradient"


def test_rois_reversed_on_both_axes_are_one_cell():
    # x2 < x1 and y2 < y1: the RoI is forced to one cell at (y1, x1), as in NumPy and torchvision
    features = np.arange(64, dtype=np.float32).reshape(1, 1, 8, 8)
    rois = np.array([[0, 5, 6, 1, 2]], np.float32)
    check_against_reference(features, rois, 2, 2, 1.0, "reversed RoI")
    out, argmax = run_forward(features, rois, 2, 2, 1.0)
    assert (argmax[0, 0] == 6 * 8 + 5).all() and (out[0, 0] == 53).all(), argmax


def test_rounding_half_away_from_zero():
    # x2 * scale = 2.5 rounds to 3 (C's round; numpy's round-half-even gives 2): the bin reaches
    # column 3, where the largest value sits.
    features = np.zeros((1, 1, 1, 5), np.float32)
    features[0, 0, 0, 3] = 7
    rois = np.array([[0, 0, 0, 5, 0]], np.float32)
    out, argmax = run_forward(features, rois, 1, 1, 0.5)
    assert out[0, 0, 0, 0] == 7 and argmax[0, 0, 0, 0] == 3


# ---- the reference, exactly ------------------------------------------------------------------

@pytest.mark.parametrize("ph, pw, scale", [(2, 2, 1 / 8), (3, 2, 1 / 4), (1, 3, 1 / 16)])
def test_random_rois_equal_reference(ph, pw, scale):
    rng = np.random.default_rng(ph * 10 + pw)
    features, rois = random_case(rng, stride=round(1 / scale))
    check_against_reference(features, rois, ph, pw, scale, f"{ph}x{pw} at scale {scale}")


def test_backward_random_grads():
    """Random float gradients: bit-identical under the interpreter (flat add order, as np.add.at);
    on a GPU the atomic order varies, so within 4 float32 ulps of the sum of |terms|."""
    rng = np.random.default_rng(11)
    features, rois = random_case(rng, k=6)
    rois[3:] = rois[:3]  # repeated RoIs: several outputs share one argmax
    out, argmax = run_forward(features, rois, 2, 2, 1 / 8)
    g = rng.standard_normal(out.shape).astype(np.float32)
    got = run_backward(g, argmax, features.shape)
    want = ref.roi_pool_backward(g, argmax, features.shape)
    if DEV == "cpu":
        assert_same(got, want, "backward, random grads, interpreter")
    else:
        bound = 4 * np.finfo(np.float32).eps * ref.roi_pool_backward(np.abs(g), argmax,
                                                                     features.shape)
        err = np.abs(got - want)
        assert (err <= bound).all(), f"backward: worst excess {float((err - bound).max())}"


def test_through_ops_with_triton_backend():
    rng = np.random.default_rng(2)
    features, rois = random_case(rng)
    out, argmax = ops.roi_pool(features, rois, (2, 3), 1 / 8, backend="triton")
    want_out, want_argmax = ops.roi_pool(features, rois, (2, 3), 1 / 8, backend="numpy")
    assert_same(out, want_out, "ops.roi_pool out")
    assert_same(argmax, want_argmax, "ops.roi_pool argmax")
    g = rng.standard_normal(out.shape).astype(np.float32)
    assert_same(ops.roi_pool_backward(g, argmax, features.shape, backend="triton"),
                ops.roi_pool_backward(g, argmax, features.shape, backend="numpy"),
                "ops.roi_pool_backward")


def test_empty_rois():
    features = np.ones((1, 3, 4, 4), np.float32)
    rois = np.zeros((0, 5), np.float32)
    out, argmax = ops.roi_pool(features, rois, 2, 1.0, backend="triton")
    assert out.shape == (0, 3, 2, 2) and out.dtype == np.float32
    assert argmax.shape == (0, 3, 2, 2) and argmax.dtype == np.int64
    grad = ops.roi_pool_backward(out, argmax, features.shape, backend="triton")
    assert grad.shape == features.shape and not grad.any()


# ---- hypothesis: RoIs outside the map, tiny, zero-size, reversed on both axes -------------

_coord = st.one_of(st.integers(-20, 90).map(float), st.floats(-20, 90, width=32))
_side = st.floats(-60, 60, width=32)  # < 0: RoIs reversed on one axis or both
_roi = st.tuples(st.integers(0, 1), _coord, _coord, _side, _side)


@settings(max_examples=20, deadline=None)
@given(roi_rows=st.lists(_roi, max_size=4), ph=st.integers(1, 3), pw=st.integers(1, 3),
       scale=st.sampled_from([1.0, 0.5, 1 / 8, 1 / 16]), seed=st.integers(0, 2 ** 16))
def test_property_equals_reference(roi_rows, ph, pw, scale, seed):
    rng = np.random.default_rng(seed)
    features = rng.integers(-3, 4, (2, 3, 6, 7)).astype(np.float32)  # small ints: many ties
    t = np.array(roi_rows, np.float32).reshape(-1, 5)
    rois = np.concatenate([t[:, :3], t[:, 1:3] + t[:, 3:]], axis=1)
    check_against_reference(features, rois, ph, pw, scale, "hypothesis roi_pool")


# ---- launcher checks -------------------------------------------------------------------------

def test_launcher_rejects_bad_inputs():
    f = torch.zeros((1, 1, 4, 4), device=DEV)
    with pytest.raises(ValueError, match="rois"):
        roi_pool_forward(f, torch.zeros((2, 4), device=DEV), 2, 2, 1.0)
    with pytest.raises(ValueError, match="features"):
        roi_pool_forward(f[0], torch.zeros((2, 5), device=DEV), 2, 2, 1.0)
    with pytest.raises(ValueError, match="argmax"):
        roi_pool_backward(torch.zeros((1, 1, 2, 2), device=DEV),
                          torch.zeros((1, 1, 2, 2), device=DEV), (1, 1, 4, 4))


def test_argmax_goes_back_without_a_copy():
    """ops.roi_pool (triton) returns a read-only argmax whose device copy is reused by
    ops.roi_pool_backward: the backward moves grad_out only, not argmax (twice its bytes)."""
    from frcnn_scratch import _triton_bridge as bridge
    rng = np.random.default_rng(4)
    features, rois = random_case(rng)
    out, argmax = ops.roi_pool(features, rois, 2, 1 / 8, backend="triton")
    assert not argmax.flags.writeable, "argmax must be read-only so that its device copy stays valid"
    g = rng.standard_normal(out.shape).astype(np.float32)
    bridge.moved_bytes(reset=True)
    got = ops.roi_pool_backward(g, argmax, features.shape, backend="triton")
    assert bridge.moved_bytes()["to_device"] == g.nbytes, bridge.moved_bytes()
    assert_same(got, ops.roi_pool_backward(g, argmax, features.shape, backend="numpy"), "cached")
    # a writable copy is an ordinary input: copied, and still right
    bridge.moved_bytes(reset=True)
    again = ops.roi_pool_backward(g, np.array(argmax), features.shape, backend="triton")
    assert bridge.moved_bytes()["to_device"] == g.nbytes + argmax.nbytes
    assert_same(again, got, "copied argmax")
