"""RoI Align (Mask R-CNN 3): hand-computed cases, properties, torch restatement, gradients."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from frcnn_scratch.roi_align import (bilinear_weights, roi_align_backward,
                                     roi_align_backward_reference, roi_align_forward,
                                     roi_align_reference)

# A linear ramp F[y, x] = 2y + x: bilinear interpolation reproduces it exactly inside the map,
# and the mean of a bin's symmetric sampling grid is the ramp at the bin's centre.
RAMP = (2 * np.arange(6)[:, None] + np.arange(6)[None, :]).astype(np.float32)[None, None]


# ---- hand-computed cases --------------------------------------------------------------------

@pytest.mark.parametrize("roi_align_forward", [roi_align_forward, roi_align_reference],
                         ids=["vectorised", "reference"])
def test_hand_computed_ramp_is_sampled_exactly(roi_align_forward):
    # RoI x 1..4, y 1..3 -> bins of 1.5 (x) by 1 (y); bin centres y 1.5, 2.5 and x 1.75, 3.25
    out = roi_align_forward(RAMP, [[0, 1, 1, 4, 3]], 2, 1.0, sampling_ratio=2)
    np.testing.assert_allclose(out[0, 0], [[4.75, 6.25], [6.75, 8.25]], rtol=0, atol=1e-6)
    # aligned=True shifts by -0.5: centres y 1.0, 2.0 and x 1.25, 2.75
    out = roi_align_forward(RAMP, [[0, 1, 1, 4, 3]], 2, 1.0, sampling_ratio=2, aligned=True)
    np.testing.assert_allclose(out[0, 0], [[3.25, 4.75], [5.25, 6.75]], rtol=0, atol=1e-6)
    # adaptive sampling (ceil(3 / 2) = 2 by ceil(2 / 2) = 1) and spatial_scale 0.5 give the same
    out = roi_align_forward(RAMP, [[0, 2, 2, 8, 6]], 2, 0.5, sampling_ratio=-1)
    np.testing.assert_allclose(out[0, 0], [[4.75, 6.25], [6.75, 8.25]], rtol=0, atol=1e-6)


@pytest.mark.parametrize("y, x, expected", [
    (0.5, 0.5, 2.5),       # the centre of the 2 x 2 map: mean of 1, 2, 3, 4
    (-0.5, 0.5, 1.5),      # y in [-1, 0): clamped to row 0 -> (1 + 2) / 2
    (2.0, 1.0, 4.0),       # y = H is still inside; the last row and column are read with weight 1
    (1.5, 0.25, 3.25),     # past the last row (y_low >= H - 1): row 1 only, 0.75 * 3 + 0.25 * 4
    (2.5, 0.5, 0.0),       # y > H: the sample reads 0
    (-1.5, 0.5, 0.0),      # y < -1: 0
    (0.5, 2.01, 0.0),      # x > W: 0
])
def test_hand_computed_single_samples_at_the_border(y, x, expected):
    feats = np.array([[1, 2], [3, 4]], dtype=np.float32)[None, None]
    # a 1 x 1 RoI with one bin and one sample: the sample sits at the RoI's centre (y, x)
    roi = [[0, x - 0.5, y - 0.5, x + 0.5, y + 0.5]]
    for fn in (roi_align_forward, roi_align_reference):
        out = fn(feats, roi, 1, 1.0, 1)
        assert abs(out[0, 0, 0, 0] - expected) <= 1e-6, (fn.__name__, out, expected)


def test_bilinear_weights_hand_computed():
    low, high, w_low, w_high = bilinear_weights(np.array([0.25, -0.5, 3.0, 2.5, 4.5, -1.5],
                                                         np.float32), 4)
    np.testing.assert_array_equal(low, [0, 0, 3, 2, 3, 0])
    np.testing.assert_array_equal(high, [1, 1, 3, 3, 3, 1])
    np.testing.assert_array_equal(w_low, [0.75, 1, 1, 0.5, 0, 0])
    np.testing.assert_array_equal(w_high, [0.25, 0, 0, 0.5, 0, 0])


@pytest.mark.parametrize("roi_align_backward", [roi_align_backward, roi_align_backward_reference],
                         ids=["vectorised", "reference"])
def test_hand_computed_backward_spreads_by_the_same_weights(roi_align_backward):
    feats_shape = (1, 1, 2, 2)
    # one sample at (y, x) = (0.5, 0.25): weights 0.5 * 0.75, 0.5 * 0.25 on each row
    grad = roi_align_backward(np.full((1, 1, 1, 1), 8, np.float32), [[0, -0.25, 0, 0.75, 1]],
                              feats_shape, 1, 1.0, 1)
    np.testing.assert_allclose(grad[0, 0], [[3, 1], [3, 1]], rtol=0, atol=1e-6)
    # four samples (2 x 2 grid): grad_out / 4 each, then the bilinear weights
    grad = roi_align_backward(np.full((1, 1, 1, 1), 8, np.float32), [[0, 0, 0, 1, 1]],
                              feats_shape, 1, 1.0, 2)
    # samples at 0.25 and 0.75 on each axis: row weights (0.75 + 0.25, 0.25 + 0.75) / 2 = 0.5
    np.testing.assert_allclose(grad[0, 0], [[2, 2], [2, 2]], rtol=0, atol=1e-6)


@pytest.mark.parametrize("forward, backward", [
    (roi_align_forward, roi_align_backward),
    (roi_align_reference, roi_align_backward_reference)], ids=["vectorised", "reference"])
def test_empty_rois_give_empty_outputs(forward, backward):
    feats = np.ones((2, 3, 4, 5), np.float32)
    out = forward(feats, np.zeros((0, 5)), (2, 3), 0.25)
    assert out.shape == (0, 3, 2, 3) and out.dtype == np.float32
    grad = backward(out, np.zeros((0, 5)), feats.shape, (2, 3), 0.25)
    assert grad.shape == feats.shape and grad.dtype == np.float32 and not grad.any()


@pytest.mark.parametrize("forward, backward", [
    (roi_align_forward, roi_align_backward),
    (roi_align_reference, roi_align_backward_reference)], ids=["vectorised", "reference"])
@pytest.mark.parametrize("shape", [(1, 2, 0, 3), (1, 2, 3, 0)])
def test_a_map_with_no_cells_reads_zeros(forward, backward, shape):
    out = forward(np.zeros(shape, np.float32), [[0, 0, 0, 2, 2]], 2, 1.0)
    assert out.shape == (1, 2, 2, 2) and out.dtype == np.float32 and not out.any()
    grad = backward(np.ones((1, 2, 2, 2), np.float32), [[0, 0, 0, 2, 2]], shape, 2, 1.0)
    assert grad.shape == shape and grad.dtype == np.float32


# ---- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, name", [
    (dict(features=np.zeros((4, 4))), "features"),
    (dict(features=np.full((1, 1, 4, 4), np.inf)), "features"),
    (dict(rois=np.zeros((2, 6))), "rois"),
    (dict(rois=[[0, 0, np.nan, 1, 1]]), "rois"),
    (dict(rois=[[3, 0, 0, 1, 1]]), "rois"),
    (dict(output_size=(0, 2)), "output_size"),
    (dict(spatial_scale=0), "spatial_scale"),
    (dict(sampling_ratio=1.5), "sampling_ratio"),
])
def test_forward_bad_input_names_the_argument(kwargs, name):
    args = dict(features=RAMP, rois=[[0, 0, 0, 2, 2]], output_size=2, spatial_scale=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        roi_align_forward(**args)


@pytest.mark.parametrize("kwargs, name", [
    (dict(grad_out=np.zeros((1, 1, 3, 2))), "grad_out"),
    (dict(grad_out=np.full((1, 1, 2, 2), np.nan)), "grad_out"),
    (dict(input_shape=(1, 1, 6)), "input_shape"),
    (dict(rois=[[1, 0, 0, 2, 2]]), "rois"),
    (dict(spatial_scale=-0.5), "spatial_scale"),
    (dict(output_size="a"), "output_size"),
])
def test_backward_bad_input_names_the_argument(kwargs, name):
    args = dict(grad_out=np.zeros((1, 1, 2, 2)), rois=[[0, 0, 0, 2, 2]], input_shape=RAMP.shape,
                output_size=2, spatial_scale=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        roi_align_backward(**args)


# ---- a plain-torch restatement: sample by sample, as the paper describes it --------------------

def torch_roi_align(features, rois, pooled, spatial_scale, sampling_ratio, aligned):
    """features (N, C, H, W) torch float32 tensor -> (K, C, ph, pw), differentiable."""
    N, C, H, W = features.shape
    ph, pw = pooled
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731

    def bilinear(plane, y, x):                              # plane (C, H, W); y, x float32 scalars
        if y < -1.0 or y > H or x < -1.0 or x > W:
            return plane.new_zeros(C)
        y, x = torch.clamp(y, min=0.0), torch.clamp(x, min=0.0)
        y_low, x_low = int(y), int(x)
        if y_low >= H - 1:
            y_low = y_high = H - 1
            y = f32(float(y_low))
        else:
            y_high = y_low + 1
        if x_low >= W - 1:
            x_low = x_high = W - 1
            x = f32(float(x_low))
        else:
            x_high = x_low + 1
        ly, lx = y - y_low, x - x_low
        hy, hx = 1.0 - ly, 1.0 - lx
        return (hy * hx * plane[:, y_low, x_low] + hy * lx * plane[:, y_low, x_high]
                + ly * hx * plane[:, y_high, x_low] + ly * lx * plane[:, y_high, x_high])

    outs = []
    offset = f32(0.5 if aligned else 0.0)
    for roi in torch.as_tensor(rois, dtype=torch.float32):
        x1, y1, x2, y2 = roi[1:] * f32(spatial_scale) - offset
        roi_w, roi_h = x2 - x1, y2 - y1
        if not aligned:
            roi_w, roi_h = torch.clamp(roi_w, min=1.0), torch.clamp(roi_h, min=1.0)
        bin_h, bin_w = roi_h / ph, roi_w / pw
        gh = sampling_ratio if sampling_ratio > 0 else int(torch.ceil(roi_h / ph))
        gw = sampling_ratio if sampling_ratio > 0 else int(torch.ceil(roi_w / pw))
        count = max(gh * gw, 1)
        plane = features[int(roi[0])]
        for i in range(ph):
            for j in range(pw):
                total = features.new_zeros(C)
                for iy in range(gh):
                    y = y1 + i * bin_h + f32(iy + 0.5) * bin_h / gh
                    for ix in range(gw):
                        x = x1 + j * bin_w + f32(ix + 0.5) * bin_w / gw
                        total = total + bilinear(plane, y, x)
                outs.append(total / count)
    K = len(rois)
    if K == 0:
        return features.new_zeros((0, C, ph, pw))
    return torch.stack(outs).reshape(K, ph, pw, C).permute(0, 3, 1, 2)


@st.composite
def align_problems(draw):
    N = draw(st.integers(1, 2))
    C = draw(st.integers(1, 3))
    H, W = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    scale = draw(st.sampled_from([1.0, 0.5, 0.25, 1 / 16, 0.3]))
    K = draw(st.integers(0, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    feats = rng.standard_normal((N, C, H, W)).astype(np.float32)
    # corners from -50% to 150% of the map (partly / wholly outside); some RoIs smaller than
    # a cell, some of zero area, some with x2 < x1; some on the half-cell grid (exact borders).
    lo = np.array([W, H]) * -0.5 / scale
    xy = rng.uniform(lo, -2 * lo, size=(K, 2, 2))
    kind = rng.integers(0, 6, size=K)
    xy[kind == 1, 1] = xy[kind == 1, 0] + rng.uniform(0, 1 / scale, size=((kind == 1).sum(), 2))
    xy[kind == 2, 1] = xy[kind == 2, 0]
    xy[kind == 3] = np.sort(xy[kind == 3], axis=1)
    xy[kind == 4] = np.round(np.sort(xy[kind == 4], axis=1) * scale * 2) / (scale * 2)
    # reversed on both axes by at least 3 cells (more than a pooled size): no samples if aligned
    xy[kind == 5, 1] = xy[kind == 5, 0] - rng.uniform(3, 6, size=((kind == 5).sum(), 2)) / scale
    rois = np.concatenate([rng.integers(0, N, size=(K, 1)), xy.reshape(K, 4)], axis=1)
    pooled = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    sampling_ratio = draw(st.sampled_from([-1, 0, 1, 2, 3]))
    aligned = draw(st.booleans())
    return feats, rois.astype(np.float32), pooled, scale, sampling_ratio, aligned


@settings(max_examples=40, deadline=None)
@given(align_problems())
def test_forward_and_backward_match_torch_restatement(problem):
    feats, rois, pooled, scale, sampling_ratio, aligned = problem
    out = roi_align_forward(feats, rois, pooled, scale, sampling_ratio, aligned)
    t_feats = torch.from_numpy(feats).requires_grad_(True)
    t_out = torch_roi_align(t_feats, rois, pooled, scale, sampling_ratio, aligned)
    assert out.shape == (len(rois), feats.shape[1]) + pooled and out.dtype == np.float32
    # float32 sums of the same terms in another order: 1e-5 relative and absolute
    np.testing.assert_allclose(out, t_out.detach().numpy(), rtol=1e-5, atol=1e-5,
                               err_msg="roi_align_forward differs from the torch restatement")

    grad_out = np.random.default_rng(0).standard_normal(out.shape).astype(np.float32)
    grad = roi_align_backward(grad_out, rois, feats.shape, pooled, scale, sampling_ratio, aligned)
    if t_out.requires_grad:
        t_out.backward(torch.from_numpy(grad_out))
    t_grad = t_feats.grad.numpy() if t_feats.grad is not None else np.zeros_like(feats)
    np.testing.assert_allclose(grad, t_grad, rtol=1e-5, atol=1e-5,
                               err_msg="roi_align_backward differs from torch.autograd")


@settings(max_examples=40, deadline=None)
@given(align_problems())
def test_vectorised_equals_the_plain_loop_reference(problem):
    # The same float32 products summed in another order (matrix products vs sample by sample):
    # values of size ~1 (standard normal features) agree to 1e-5 relative and absolute.
    feats, rois, pooled, scale, sampling_ratio, aligned = problem
    args = (pooled, scale, sampling_ratio, aligned)
    out = roi_align_forward(feats, rois, *args)
    ref = roi_align_reference(feats, rois, *args)
    assert ref.shape == out.shape == (len(rois), feats.shape[1]) + pooled
    assert ref.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5,
                               err_msg="roi_align_forward differs from roi_align_reference")
    grad_out = np.random.default_rng(2).standard_normal(out.shape).astype(np.float32)
    grad = roi_align_backward(grad_out, rois, feats.shape, *args)
    ref_grad = roi_align_backward_reference(grad_out, rois, feats.shape, *args)
    assert ref_grad.shape == feats.shape and ref_grad.dtype == np.float32
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-5,
                               err_msg="roi_align_backward differs from roi_align_backward_reference")


@settings(max_examples=30, deadline=None)
@given(align_problems())
def test_backward_matches_finite_differences(problem):
    # RoI Align is linear in the features, so a central difference with a large step (1.0) has
    # no truncation error; what is left is float32 rounding of the outputs (~1e-7 relative),
    # summed in float64: tolerance 1e-4 absolute on gradients of size ~1.
    feats, rois, pooled, scale, sampling_ratio, aligned = problem
    args = (pooled, scale, sampling_ratio, aligned)
    rng = np.random.default_rng(1)
    G = rng.standard_normal((len(rois), feats.shape[1]) + pooled).astype(np.float32)
    grad = roi_align_backward(G, rois, feats.shape, *args)

    def loss(x):
        return float(np.sum(roi_align_forward(x, rois, *args).astype(np.float64) * G))

    eps = 1.0
    flat = feats.reshape(-1)
    for i in rng.choice(flat.size, size=min(flat.size, 10), replace=False):
        plus, minus = flat.copy(), flat.copy()
        plus[i] += eps
        minus[i] -= eps
        numeric = (loss(plus.reshape(feats.shape)) - loss(minus.reshape(feats.shape))) / (2 * eps)
        assert abs(numeric - grad.reshape(-1)[i]) <= 1e-4, (
            f"entry {i}: finite difference {numeric} vs backward {grad.reshape(-1)[i]}")
    # and the adjoint identity of a linear map: <G, forward(F)> == <backward(G), F>
    lhs = float(np.sum(roi_align_forward(feats, rois, *args).astype(np.float64) * G))
    rhs = float(np.sum(grad.astype(np.float64) * feats))
    assert abs(lhs - rhs) <= 1e-4 * (1 + abs(lhs)), f"<G, f(F)> = {lhs} but <f*(G), F> = {rhs}"


def test_realistic_sizes_match_restatement_on_a_sample():
    rng = np.random.default_rng(3)
    feats = rng.standard_normal((1, 4, 38, 50)).astype(np.float32)
    xy = np.sort(rng.uniform(-32, 832, size=(3, 2, 2)), axis=1).reshape(3, 4)
    rois = np.concatenate([np.zeros((3, 1)), xy], axis=1).astype(np.float32)
    for aligned in (False, True):
        out = roi_align_forward(feats, rois, 7, 1 / 16, 2, aligned)
        t_out = torch_roi_align(torch.from_numpy(feats), rois, (7, 7), 1 / 16, 2, aligned)
        np.testing.assert_allclose(out, t_out.numpy(), rtol=1e-5, atol=1e-5)
