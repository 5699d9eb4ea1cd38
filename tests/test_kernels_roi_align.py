"""kernels/roi_align.py against the NumPy reference roi_align.py.

Forward, exactly: the kernel does the float32 operations of roi_align_reference (the plain loops)
in the same order (coordinates, weights, w1*v1 + w2*v2 + w3*v3 + w4*v4 per sample, samples added
row by row, FMA fusion off), so the two are equal bit for bit.

Against the vectorised roi_align_forward / roi_align_backward, and for the backward (whose atomic
adds land in any order), within a stated tolerance: the same cells with the same float32 weights,
summed in another order (the reference multiplies interpolation matrices, Ay @ F @ Ax.T).  Each
result is a sum of at most a few hundred float32 terms, so any two orders agree to within a few
hundred ulps of the sum of the terms' magnitudes.  We require, elementwise,

    |kernel - numpy| <= RTOL * magnitude + ATOL,   RTOL = 1e-5, ATOL = 1e-6,

where magnitude is the same op applied to |features| (forward) or |grad_out| (backward): the sum
of |terms|.  Observed errors are about 2e-7 of the magnitude, so 1e-5 leaves a 50x margin and still
catches any wrong weight or cell (those are O(1) of the magnitude).
"""
from frcnn_scratch import kernels  # noqa: F401  (first: switches the interpreter on before triton is imported)

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import assert_same
from frcnn_scratch import ops
from frcnn_scratch import roi_align as ref
from frcnn_scratch.kernels.roi_align import roi_align_backward, roi_align_forward

DEV = kernels.device()
RTOL, ATOL = 1e-5, 1e-6


def run_forward(features, rois, ph, pw, scale, sampling_ratio=-1, aligned=False):
    out = roi_align_forward(torch.tensor(features, device=DEV), torch.tensor(rois, device=DEV),
                            ph, pw, scale, sampling_ratio, aligned)
    return out.cpu().numpy()


def run_backward(grad_out, rois, shape, ph, pw, scale, sampling_ratio=-1, aligned=False):
    grad = roi_align_backward(torch.tensor(grad_out, device=DEV), torch.tensor(rois, device=DEV),
                              shape, ph, pw, scale, sampling_ratio, aligned)
    return grad.cpu().numpy()


def assert_close(got, want, magnitude, what):
    assert got.shape == want.shape and got.dtype == np.float32, \
        f"{what}: got {got.shape} {got.dtype}, want {want.shape} float32"
    err = np.abs(got.astype(np.float64) - want)
    bound = RTOL * magnitude + ATOL
    bad = err > bound
    if bad.any():
        i = tuple(int(v) for v in np.argwhere(bad)[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} entries out of tolerance; "
                             f"first at {i}: kernel {got[i]} vs numpy {want[i]} (|diff| {err[i]:.3g},"
                             f" allowed {bound[i]:.3g}); worst |diff| {err.max():.3g}")


def check_against_reference(features, rois, ph, pw, scale, sr, aligned, what, seed=0):
    args = ((ph, pw), scale, sr, aligned)
    out = run_forward(features, rois, ph, pw, scale, sr, aligned)
    assert_same(out, ref.roi_align_reference(features, rois, *args), f"{what}: forward, exact")
    assert_close(out, ref.roi_align_forward(features, rois, *args),
                 ref.roi_align_forward(np.abs(features), rois, *args), f"{what}: forward")
    g = np.random.default_rng(seed).standard_normal(out.shape).astype(np.float32)
    grad = run_backward(g, rois, features.shape, ph, pw, scale, sr, aligned)
    assert_close(grad, ref.roi_align_backward(g, rois, features.shape, *args),
                 ref.roi_align_backward(np.abs(g), rois, features.shape, *args),
                 f"{what}: backward")
    return out, g, grad


def random_case(rng, n=2, c=3, h=7, w=9, k=4, stride=8):
    features = rng.standard_normal((n, c, h, w)).astype(np.float32)
    xy = rng.uniform(-2 * stride, (w + 1) * stride, (k, 2))
    wh = rng.uniform(0, 5 * stride, (k, 2))
    rois = np.concatenate([rng.integers(0, n, (k, 1)), xy, xy + wh], axis=1).astype(np.float32)
    return features, rois


# ---- hand-computed cases --------------------------------------------------------------------

def test_one_bilinear_sample_by_hand():
    features = np.array([[[[1, 2], [3, 4]]]], np.float32)
    rois = np.array([[0, 0.5, 0.5, 1.5, 1.5]], np.float32)  # aligned: cell box (0, 0)-(1, 1)
    out = run_forward(features, rois, 1, 1, 1.0, sampling_ratio=1, aligned=True)
    assert out[0, 0, 0, 0] == 2.5, f"centre of [[1, 2], [3, 4]] reads {out[0, 0, 0, 0]}, want 2.5"
    grad = run_backward(np.ones((1, 1, 1, 1), np.float32), rois, features.shape, 1, 1, 1.0, 1, True)
    assert (grad == 0.25).all(), f"the sample's gradient splits 4 ways, got {grad.ravel()}"


def test_linear_map_reads_bin_centres():
    # bilinear interpolation of f(y, x) = 3y + x + 1 is exact, so a bin's mean is f(bin centre)
    h, w = 6, 8
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    features = (3 * y + x + 1)[None, None]
    rois = np.array([[0, 1, 1, 5, 4]], np.float32)  # aligned=False: cells y 1..4, x 1..5
    out = run_forward(features, rois, 2, 2, 1.0, sampling_ratio=2)
    cy = np.array([1.75, 3.25])[:, None]  # bin centres along y (bins of 1.5 cells)
    cx = np.array([2.0, 4.0])[None, :]    # and along x (bins of 2 cells)
    want = (3 * cy + cx + 1).astype(np.float32)
    assert np.allclose(out[0, 0], want, rtol=0, atol=1e-5), f"{out[0, 0]} vs {want}"


def test_samples_outside_the_map_read_zero():
    features = np.ones((1, 1, 4, 4), np.float32)
    rois = np.array([[0, 100, 100, 120, 120]], np.float32)  # far outside: every sample reads 0
    assert (run_forward(features, rois, 2, 2, 1.0) == 0).all()


def test_huge_roi_reads_zero_not_nan():
    # corners at 1e30 pixels: weights of samples far outside must be 0, not inf * 0 = NaN
    features = np.ones((1, 2, 4, 4), np.float32)
    rois = np.array([[0, -1e30, -1e30, 1e30, 1e30], [0, 1e30, 1e30, 2e30, 2e30]], np.float32)
    out = run_forward(features, rois, 2, 2, 1.0, sampling_ratio=2)
    assert np.isfinite(out).all() and (out == 0).all(), out.ravel()
    grad = run_backward(np.ones_like(out), rois, features.shape, 2, 2, 1.0, 2)
    assert np.isfinite(grad).all() and (grad == 0).all(), grad.ravel()


@pytest.mark.parametrize("sampling_ratio", [-1, 0])
def test_rois_reversed_on_both_axes_have_no_samples(sampling_ratio):
    # aligned, adaptive: x2 < x1 and y2 < y1 by at least the pooled size make both sample counts
    # negative; their product is positive, but no sample exists: out and gradient are 0, as in
    # NumPy and torchvision (the kernel once averaged real cells here)
    rng = np.random.default_rng(3)
    features = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    rois = np.array([[0, 7, 7, 1, 1], [0, 6, 7, 2, 0.5], [0, 5, 5, 1, 5]], np.float32)
    out, g, grad = check_against_reference(features, rois, 2, 2, 1.0, sampling_ratio, True,
                                           "reversed RoIs")
    assert (out[:2] == 0).all(), out[:2].ravel()
    want = ref.roi_align_backward(g[2:], rois[2:], features.shape, 2, 1.0, sampling_ratio, True)
    assert np.allclose(grad, want, rtol=0, atol=1e-6), "reversed RoIs send no gradient"


# ---- the reference, within tolerance ---------------------------------------------------------

@pytest.mark.parametrize("sampling_ratio", [1, 2, -1])
@pytest.mark.parametrize("aligned", [False, True])
def test_random_rois_match_reference(sampling_ratio, aligned):
    rng = np.random.default_rng(10 * abs(sampling_ratio) + aligned)
    features, rois = random_case(rng)
    check_against_reference(features, rois, 2, 3, 1 / 8, sampling_ratio, aligned,
                            f"sr={sampling_ratio} aligned={aligned}")


def test_backward_is_the_adjoint_of_forward():
    """<roi_align(F), G> == <F, roi_align_backward(G)>: the backward is the forward's transpose."""
    rng = np.random.default_rng(4)
    features, rois = random_case(rng)
    out, g, grad = check_against_reference(features, rois, 2, 2, 1 / 8, -1, True, "adjoint")
    lhs = float(np.sum(out.astype(np.float64) * g))
    rhs = float(np.sum(features.astype(np.float64) * grad))
    scale = float(np.sum(np.abs(out.astype(np.float64) * g))) + 1e-12
    assert abs(lhs - rhs) <= RTOL * scale, f"<out, g> = {lhs} vs <F, grad> = {rhs}"


def test_through_ops_with_triton_backend():
    rng = np.random.default_rng(8)
    features, rois = random_case(rng)
    got = ops.roi_align(features, rois, 2, 1 / 8, sampling_ratio=2, backend="triton")
    want = ops.roi_align(features, rois, 2, 1 / 8, sampling_ratio=2, backend="numpy")
    assert_close(got, want, ops.roi_align(np.abs(features), rois, 2, 1 / 8, sampling_ratio=2,
                                          backend="numpy"), "ops.roi_align")
    g = rng.standard_normal(got.shape).astype(np.float32)
    kw = dict(sampling_ratio=2, aligned=True)
    assert_close(ops.roi_align_backward(g, rois, features.shape, 2, 1 / 8, backend="triton", **kw),
                 ops.roi_align_backward(g, rois, features.shape, 2, 1 / 8, backend="numpy", **kw),
                 ops.roi_align_backward(np.abs(g), rois, features.shape, 2, 1 / 8,
                                        backend="numpy", **kw), "ops.roi_align_backward")


def test_empty_rois():
    features = np.ones((1, 3, 4, 4), np.float32)
    rois = np.zeros((0, 5), np.float32)
    out = ops.roi_align(features, rois, (2, 3), 1.0, backend="triton")
    assert out.shape == (0, 3, 2, 3) and out.dtype == np.float32
    grad = ops.roi_align_backward(out, rois, features.shape, (2, 3), 1.0, backend="triton")
    assert grad.shape == features.shape and grad.dtype == np.float32 and not grad.any()


# ---- hypothesis: RoIs outside the map, tiny, zero-size, reversed, on the border ------------

_coord = st.one_of(st.integers(-16, 80).map(float), st.floats(-16, 80, width=32))
_side = st.sampled_from([0.0, 0.5, 4.0, -4.0, -24.0]) | st.floats(-40, 40, width=32)
_roi = st.tuples(st.integers(0, 1), _coord, _coord, _side, _side)  # sides < 0: reversed RoIs


@settings(max_examples=20, deadline=None)
@given(roi_rows=st.lists(_roi, max_size=3), ph=st.integers(1, 2), pw=st.integers(1, 3),
       scale=st.sampled_from([1 / 4, 1 / 8]), sr=st.sampled_from([-1, 1, 2]),
       aligned=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_property_matches_reference(roi_rows, ph, pw, scale, sr, aligned, seed):
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((2, 2, 5, 6)).astype(np.float32)
    t = np.array(roi_rows, np.float32).reshape(-1, 5)
    rois = np.concatenate([t[:, :3], t[:, 1:3] + t[:, 3:]], axis=1)
    check_against_reference(features, rois, ph, pw, scale, sr, aligned, "hypothesis", seed)


# ---- launcher checks -------------------------------------------------------------------------

def test_launcher_rejects_bad_inputs():
    f = torch.zeros((1, 1, 4, 4), device=DEV)
    with pytest.raises(ValueError, match="rois"):
        roi_align_forward(f, torch.zeros((2, 4), device=DEV), 2, 2, 1.0)
    with pytest.raises(ValueError, match="grad_out"):
        roi_align_backward(torch.zeros((1, 1, 3, 3), device=DEV), torch.zeros((1, 5), device=DEV),
                           (1, 1, 4, 4), 2, 2, 1.0)
