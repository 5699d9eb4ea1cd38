"""RoI max pooling (Fast R-CNN 2.1): hand-computed cases, properties, torch restatement, gradients."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from frcnn_scratch.roi_pool import (bin_cells, check_backward_inputs, round_half_away,
                                    roi_pool_backward, roi_pool_forward, roi_pool_reference)

# A 4 x 4 map with ties (two 9s, three 8s, two 7s) so the first-maximum rule matters.
MAP = np.array([[1, 9, 3, 0],
                [4, 2, 9, 5],
                [7, 7, 6, 8],
                [0, 1, 8, 2]], dtype=np.float32)[None, None]          # (1, 1, 4, 4)


# ---- hand-computed cases --------------------------------------------------------------------

def test_round_half_away_from_zero():
    got = round_half_away(np.array([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, 2.4], np.float32))
    np.testing.assert_array_equal(got, [1, 2, 3, -1, -3, 0, 2])


def test_hand_computed_bins_overlap_and_first_maximum_wins():
    # Corners round to x 1..3, y 0..3 (2.5 -> 3): a 4 x 3 cell RoI, bins of 2 x 1.5 cells.
    # rows: [0, 2), [2, 4); cols: 1 + [floor(0), ceil(1.5)) = [1, 3), 1 + [floor(1.5), ceil(3)) = [2, 4)
    out, argmax = roi_pool_forward(MAP, [[0, 0.6, 0.4, 3.4, 2.5]], 2, 1.0)
    # bin (0,0): 9 3 / 2 9 -> 9 at (0,1); (0,1): 3 0 / 9 5 -> 9 at (1,2);
    # bin (1,0): 7 6 / 1 8 -> 8 at (3,2); (1,1): 6 8 / 8 2 -> the first 8, at (2,3), not (3,2).
    np.testing.assert_array_equal(out[0, 0], [[9, 9], [8, 8]])
    np.testing.assert_array_equal(argmax[0, 0], [[1, 6], [14, 11]])
    assert out.dtype == np.float32 and argmax.dtype == np.int64


def test_hand_computed_spatial_scale_rounds_half_away_not_to_even():
    # (1, 1, 5, 5) * 0.5 = (0.5, 0.5, 2.5, 2.5) -> cells 1..3 (np.round would give 0..2 and max 9 at 1)
    out, argmax = roi_pool_forward(MAP, [[0, 1, 1, 5, 5]], 1, 0.5)
    assert out[0, 0, 0, 0] == 9 and argmax[0, 0, 0, 0] == 6, (out, argmax)


def test_hand_computed_empty_and_partly_outside_bins():
    # RoI cells 3..4 on a 4-wide map: the one-cell-wide map column 3 is inside, column 4 is not.
    out, argmax = roi_pool_forward(MAP, [[0, 3, 2, 4, 3]], (1, 2), 1.0)
    # 2 x 2 cells, bins of 1 column: col [3, 4) -> max(8, 2) = 8 at (2,3) = 11; col [4, 5) -> empty
    np.testing.assert_array_equal(out[0, 0], [[8, 0]])
    np.testing.assert_array_equal(argmax[0, 0], [[11, -1]])
    out, argmax = roi_pool_forward(MAP, [[0, 10, 10, 12, 12]], 2, 1.0)      # wholly outside
    assert np.all(out == 0) and np.all(argmax == -1)


def test_hand_computed_zero_area_roi_covers_one_cell_and_batch_offset():
    feats = np.concatenate([MAP, MAP + 100], axis=1)                      # (1, 2, 4, 4)
    feats = np.concatenate([feats, -feats], axis=0)                       # (2, 2, 4, 4)
    out, argmax = roi_pool_forward(feats, [[1, 2, 1, 2, 1]], 2, 1.0)       # the single cell (1, 2)
    # every bin of a 1 x 1 RoI is that cell: image 1, channel c, flat ((1*2 + c)*4 + 1)*4 + 2
    np.testing.assert_array_equal(out[0, :, 0, 0], [-9, -109])
    np.testing.assert_array_equal(argmax[0, :, 1, 1], [38, 54])
    np.testing.assert_array_equal(feats.reshape(-1)[argmax], out)


def test_hand_computed_backward_adds_where_bins_share_a_maximum():
    # RoI 0 as above: argmax [[1, 6], [14, 11]]. RoI 1: cells 1..5, bins of 2.5 cells:
    # rows/cols [1, 4) and [3, 6) -> clipped [3, 4); its maxima 9 @ 6, 8 @ 11, 8 @ 14, 2 @ 15.
    out, argmax = roi_pool_forward(MAP, [[0, 0.6, 0.4, 3.4, 2.5], [0, 1, 1, 5, 5]], 2, 1.0)
    np.testing.assert_array_equal(argmax[:, 0], [[[1, 6], [14, 11]], [[6, 11], [14, 15]]])
    grad_out = np.arange(1, 9, dtype=np.float32).reshape(2, 1, 2, 2)
    grad = roi_pool_backward(grad_out, argmax, MAP.shape)
    expect = np.array([[0, 1, 0, 0],
                       [0, 0, 2 + 5, 0],
                       [0, 0, 0, 4 + 6],
                       [0, 0, 3 + 7, 8]], dtype=np.float32)
    assert grad.shape == MAP.shape and grad.dtype == np.float32
    np.testing.assert_array_equal(grad[0, 0], expect)


def test_empty_rois_give_empty_outputs():
    feats = np.ones((2, 3, 4, 5), np.float32)
    out, argmax = roi_pool_forward(feats, np.zeros((0, 5)), (2, 3), 0.25)
    assert out.shape == (0, 3, 2, 3) and argmax.shape == (0, 3, 2, 3)
    assert out.dtype == np.float32 and argmax.dtype == np.int64
    grad = roi_pool_backward(out, argmax, feats.shape)
    assert grad.shape == feats.shape and not grad.any()


# ---- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, name", [
    (dict(features=np.zeros((4, 4))), "features"),
    (dict(features=np.full((1, 1, 4, 4), np.nan)), "features"),
    (dict(rois=np.zeros((1, 4))), "rois"),
    (dict(rois=[[0, 0, 0, np.inf, 1]]), "rois"),
    (dict(rois=[[1, 0, 0, 1, 1]]), "rois"),                               # batch index >= N
    (dict(rois=[[0.5, 0, 0, 1, 1]]), "rois"),
    (dict(output_size=0), "output_size"),
    (dict(output_size=(2, -1)), "output_size"),
    (dict(spatial_scale=0.0), "spatial_scale"),
    (dict(spatial_scale=-1.0), "spatial_scale"),
])
def test_forward_bad_input_names_the_argument(kwargs, name):
    args = dict(features=MAP, rois=[[0, 0, 0, 2, 2]], output_size=2, spatial_scale=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        roi_pool_forward(**args)


@pytest.mark.parametrize("grad_out, argmax, shape, name", [
    (np.zeros((1, 1, 2)), np.zeros((1, 1, 2), np.int64), (1, 1, 4, 4), "grad_out"),
    (np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 2, 2), np.float32), (1, 1, 4, 4), "argmax"),
    (np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 2, 3), np.int64), (1, 1, 4, 4), "argmax"),
    (np.zeros((1, 1, 2, 2)), np.full((1, 1, 2, 2), 16), (1, 1, 4, 4), "argmax"),
    (np.zeros((1, 1, 2, 2)), np.full((1, 1, 2, 2), -2), (1, 1, 4, 4), "argmax"),
    (np.zeros((1, 2, 2, 2)), np.zeros((1, 2, 2, 2), np.int64), (1, 1, 4, 4), "grad_out"),
    (np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 2, 2), np.int64), (1, 1, 4), "input_shape"),
    (np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 2, 2), np.int64), (1, 1, -4, 4), "input_shape"),
])
def test_backward_bad_input_names_the_argument(grad_out, argmax, shape, name):
    with pytest.raises(ValueError, match=name):
        check_backward_inputs(grad_out, argmax, shape)
    with pytest.raises(ValueError, match=name):
        roi_pool_backward(grad_out, argmax, shape)


# ---- a plain-torch restatement (the spec written once more, in differentiable torch ops) -----

def torch_roi_pool(features, rois, pooled, spatial_scale):
    """features (N, C, H, W) torch tensor, rois (K, 5) -> out (K, C, ph, pw), argmax (flat)."""
    N, C, H, W = features.shape
    ph, pw = pooled
    outs, args = [], []
    scale = torch.tensor(spatial_scale, dtype=torch.float32)
    for roi in torch.as_tensor(rois, dtype=torch.float32):
        b = int(roi[0])
        c = (roi[1:] * scale).double()                                  # float32 product, as torchvision
        x1, y1, x2, y2 = (int(torch.sign(v) * torch.floor(v.abs() + 0.5)) for v in c)
        bin_h = torch.tensor(max(y2 - y1 + 1, 1), dtype=torch.float32) / ph
        bin_w = torch.tensor(max(x2 - x1 + 1, 1), dtype=torch.float32) / pw
        for i in range(ph):
            h0 = min(max(int(torch.floor(i * bin_h)) + y1, 0), H)
            h1 = min(max(int(torch.ceil((i + 1) * bin_h)) + y1, 0), H)
            for j in range(pw):
                w0 = min(max(int(torch.floor(j * bin_w)) + x1, 0), W)
                w1 = min(max(int(torch.ceil((j + 1) * bin_w)) + x1, 0), W)
                if h1 <= h0 or w1 <= w0:
                    outs.append(features.new_zeros(C))
                    args.append(torch.full((C,), -1, dtype=torch.int64))
                    continue
                value, first = features[b, :, h0:h1, w0:w1].reshape(C, -1).max(dim=1)
                h, w = h0 + first // (w1 - w0), w0 + first % (w1 - w0)
                outs.append(value)
                args.append(((b * C + torch.arange(C)) * H + h) * W + w)
    K = len(rois)
    if K == 0:
        return features.new_zeros((0, C, ph, pw)), torch.zeros((0, C, ph, pw), dtype=torch.int64)
    out = torch.stack(outs).reshape(K, ph, pw, C).permute(0, 3, 1, 2)
    argmax = torch.stack(args).reshape(K, ph, pw, C).permute(0, 3, 1, 2)
    return out, argmax


@st.composite
def pool_problems(draw, integer_features=False):
    N = draw(st.integers(1, 2))
    C = draw(st.integers(1, 3))
    H, W = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    scale = draw(st.sampled_from([1.0, 0.5, 0.25, 1 / 16, 0.3]))
    K = draw(st.integers(0, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    if integer_features:                       # many ties: exercises the first-maximum rule
        feats = rng.integers(-3, 4, size=(N, C, H, W)).astype(np.float32)
    else:                                      # distinct values, 1 apart: every maximum is unique
        feats = (rng.permutation(N * C * H * W) - N * C * H * W / 2).astype(np.float32)
        feats = feats.reshape(N, C, H, W)
    # corners from -50% to 150% of the map (partly / wholly outside), in image pixels; some
    # RoIs smaller than one cell, some of zero area, some with x2 < x1 (made 1 cell wide).
    lo = np.array([W, H]) * -0.5 / scale
    xy = rng.uniform(lo, -2 * lo, size=(K, 2, 2))
    kind = rng.integers(0, 5, size=K)
    xy[kind == 1, 1] = xy[kind == 1, 0] + rng.uniform(0, 1 / scale, size=((kind == 1).sum(), 2))
    xy[kind == 2, 1] = xy[kind == 2, 0]
    xy[kind == 3] = np.sort(xy[kind == 3], axis=1)
    # reversed on both axes by at least 3 cells
    xy[kind == 4, 1] = xy[kind == 4, 0] - rng.uniform(3, 6, size=((kind == 4).sum(), 2)) / scale
    rois = np.concatenate([rng.integers(0, N, size=(K, 1)), xy.reshape(K, 4)], axis=1)
    pooled = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    return feats, rois.astype(np.float32), pooled, scale


@settings(max_examples=40, deadline=None)
@given(pool_problems(integer_features=True))
def test_forward_matches_torch_restatement_including_ties(problem):
    feats, rois, pooled, scale = problem
    out, argmax = roi_pool_forward(feats, rois, pooled, scale)
    t_out, t_argmax = torch_roi_pool(torch.from_numpy(feats), rois, pooled, scale)
    assert out.shape == (len(rois), feats.shape[1]) + pooled
    np.testing.assert_array_equal(out, t_out.numpy(), err_msg="pooled values differ")
    np.testing.assert_array_equal(argmax, t_argmax.numpy(), err_msg="argmax differs")
    # properties: argmax names the value; an empty bin is exactly (0, -1)
    valid = argmax >= 0
    np.testing.assert_array_equal(feats.reshape(-1)[argmax[valid]], out[valid])
    assert np.all(out[~valid] == 0)


@settings(max_examples=40, deadline=None)
@given(pool_problems(integer_features=True), st.booleans())
def test_vectorised_forward_equals_the_plain_loop_reference(problem, distinct):
    # Bit-exact: both take the same max of the same float32 values, and the same first maximum.
    # Integer features (many ties) test the first-maximum rule; distinct ones the values.
    feats, rois, pooled, scale = problem
    if distinct:
        feats = (np.random.default_rng(feats.size).permutation(feats.size) * 0.37 - 5)
        feats = feats.astype(np.float32).reshape(problem[0].shape)
    out, argmax = roi_pool_forward(feats, rois, pooled, scale)
    ref_out, ref_argmax = roi_pool_reference(feats, rois, pooled, scale)
    assert out.shape == ref_out.shape == (len(rois), feats.shape[1]) + pooled
    assert ref_out.dtype == np.float32 and ref_argmax.dtype == np.int64
    np.testing.assert_array_equal(out, ref_out, err_msg="roi_pool_forward values != the reference")
    np.testing.assert_array_equal(argmax, ref_argmax, err_msg="roi_pool_forward argmax != the reference")


@pytest.mark.parametrize("fn", [roi_pool_forward, roi_pool_reference], ids=["vectorised", "reference"])
@pytest.mark.parametrize("shape", [(1, 2, 0, 3), (1, 2, 3, 0)])
def test_a_map_with_no_cells_gives_empty_bins(fn, shape):
    out, argmax = fn(np.zeros(shape, np.float32), [[0, 0, 0, 2, 2]], 2, 1.0)
    assert out.shape == argmax.shape == (1, 2, 2, 2)
    assert not out.any() and np.all(argmax == -1), (out, argmax)


def test_reference_hand_computed_case_and_empty_rois():
    # The hand-computed ties case above, through the loop version.
    out, argmax = roi_pool_reference(MAP, [[0, 0.6, 0.4, 3.4, 2.5]], 2, 1.0)
    np.testing.assert_array_equal(out[0, 0], [[9, 9], [8, 8]])
    np.testing.assert_array_equal(argmax[0, 0], [[1, 6], [14, 11]])
    out, argmax = roi_pool_reference(MAP, np.zeros((0, 5), np.float32), (2, 3), 1.0)
    assert out.shape == argmax.shape == (0, 1, 2, 3)
    assert out.dtype == np.float32 and argmax.dtype == np.int64
    with pytest.raises(ValueError, match="spatial_scale"):
        roi_pool_reference(MAP, [[0, 0, 0, 1, 1]], 2, 0.0)


@settings(max_examples=30, deadline=None)
@given(pool_problems(integer_features=False))
def test_backward_matches_torch_autograd(problem):
    feats, rois, pooled, scale = problem
    rng = np.random.default_rng(0)
    out, argmax = roi_pool_forward(feats, rois, pooled, scale)
    grad_out = rng.standard_normal(out.shape).astype(np.float32)
    grad = roi_pool_backward(grad_out, argmax, feats.shape)

    t_feats = torch.from_numpy(feats).requires_grad_(True)
    t_out, _ = torch_roi_pool(t_feats, rois, pooled, scale)
    if t_out.requires_grad:
        t_out.backward(torch.from_numpy(grad_out))
    t_grad = t_feats.grad.numpy() if t_feats.grad is not None else np.zeros_like(feats)
    # float32 sums of at most K * ph * pw terms in a different order: 1e-5 relative + absolute
    np.testing.assert_allclose(grad, t_grad, rtol=1e-5, atol=1e-5,
                               err_msg="roi_pool_backward differs from torch.autograd")


@settings(max_examples=30, deadline=None)
@given(pool_problems(integer_features=False))
def test_backward_matches_finite_differences(problem):
    # Values are distinct integers 1 apart, so a perturbation of +-0.25 never changes which
    # entry wins a bin: the loss L = sum(out * G) is linear there and the central difference
    # is exact (all float32 sums below involve quarter-integers and small integer G).
    feats, rois, pooled, scale = problem
    rng = np.random.default_rng(1)
    out, argmax = roi_pool_forward(feats, rois, pooled, scale)
    G = rng.integers(-4, 5, size=out.shape).astype(np.float32)
    grad = roi_pool_backward(G, argmax, feats.shape)

    def loss(x):
        return float(np.sum(roi_pool_forward(x, rois, pooled, scale)[0].astype(np.float64) * G))

    eps = 0.25
    flat = feats.reshape(-1)
    for i in rng.choice(flat.size, size=min(flat.size, 12), replace=False):
        plus, minus = flat.copy(), flat.copy()
        plus[i] += eps
        minus[i] -= eps
        numeric = (loss(plus.reshape(feats.shape)) - loss(minus.reshape(feats.shape))) / (2 * eps)
        assert abs(numeric - grad.reshape(-1)[i]) <= 1e-6, (
            f"entry {i}: finite difference {numeric} vs backward {grad.reshape(-1)[i]}")


def test_realistic_sizes_match_restatement_on_a_sample():
    # stride-16 RoIs on a (1, 8, 38, 50) map; spot-check a few RoIs against the restatement.
    rng = np.random.default_rng(3)
    feats = rng.standard_normal((1, 8, 38, 50)).astype(np.float32)
    xy = np.sort(rng.uniform(-32, 832, size=(6, 2, 2)), axis=1).reshape(6, 4)
    rois = np.concatenate([np.zeros((6, 1)), xy], axis=1).astype(np.float32)
    out, argmax = roi_pool_forward(feats, rois, 7, 1 / 16)
    t_out, t_argmax = torch_roi_pool(torch.from_numpy(feats), rois, (7, 7), 1 / 16)
    np.testing.assert_array_equal(out, t_out.numpy())
    np.testing.assert_array_equal(argmax, t_argmax.numpy())


def test_bin_cells_is_the_geometry_both_versions_pool_over():
    """bin_cells: 7 cells (x 0..6) in 3 bins of 7/3 share cells 2 and 4; rows of a RoI that starts
    above the map are clipped to it at 0, and to the map's height below (None: not below)."""
    rois = np.array([[1, 0, -8, 6, 20]], np.float32)                 # y: -8 .. 20 at scale 1/4: -2 .. 5
    batch, (row_lo, row_hi), (col_lo, col_hi) = bin_cells(rois, (2, 3), 1.0, (4, 9))
    assert batch.tolist() == [1]
    assert col_lo.tolist() == [[0, 2, 4]] and col_hi.tolist() == [[3, 5, 7]]
    assert row_lo.tolist() == [[0, 4]] and row_hi.tolist() == [[4, 4]]    # -8..20 clipped to 0..4
    _, (row_lo, row_hi), _ = bin_cells(rois, (2, 3), 0.25, None)
    assert row_lo.tolist() == [[0, 2]] and row_hi.tolist() == [[2, 6]]    # 8 cells -2..5: 0 clips
    # the forward pools exactly there: on a map rising in row-major order, a bin's max is its last cell
    rising = np.arange(2 * 1 * 4 * 9, dtype=np.float32).reshape(2, 1, 4, 9)
    _, argmax = roi_pool_forward(rising, rois, (2, 3), 1.0)
    _, (row_lo, row_hi), (col_lo, col_hi) = bin_cells(rois, (2, 3), 1.0, (4, 9))
    last = 36 + (row_hi[0, :, None] - 1) * 9 + col_hi[0, None, :] - 1   # image 1 starts at 36
    empty = (row_hi[0, :, None] <= row_lo[0, :, None]) | (col_hi[0] <= col_lo[0])[None, :]
    np.testing.assert_array_equal(argmax[0, 0], np.where(empty, -1, last))
