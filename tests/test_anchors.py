"""anchors.py (section 3.1.1): base anchors, their shifts over the feature map, inside-the-image mask."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from frcnn_scratch.anchors import anchors_inside, generate_anchors, shift_anchors

SETTINGS = settings(max_examples=50, deadline=None)

# The output of generate_anchors() in the paper's released code (py-faster-rcnn), as printed in
# its docstring: base 16, ratios (0.5, 1, 2), scales (8, 16, 32), ratio-major.
PAPER_TABLE = np.array([[-84, -40, 99, 55],
                        [-176, -88, 191, 103],
                        [-360, -184, 375, 199],
                        [-56, -56, 71, 71],
                        [-120, -120, 135, 135],
                        [-248, -248, 263, 263],
                        [-36, -80, 51, 95],
                        [-80, -168, 95, 183],
                        [-168, -344, 183, 359]], np.float32)


# ---- generate_anchors ----------------------------------------------------------------------

def test_legacy_reproduces_the_paper_table_exactly():
    got = generate_anchors(legacy=True)
    assert got.dtype == np.float32 and got.shape == (9, 4)
    np.testing.assert_array_equal(got, PAPER_TABLE, err_msg="legacy anchors differ from the paper code")


def test_legacy_first_anchor_by_hand():
    # base box pixels 0..15: w = h = 16, centre 7.5.  Ratio 0.5: area 256 / 0.5 = 512,
    # w = round(sqrt(512)) = round(22.6) = 23, h = round(23 * 0.5) = round(11.5) = 12 (numpy rounds
    # half to even).  Scale 8: 184 x 96, corners 7.5 -/+ (184 - 1) / 2 and 7.5 -/+ (96 - 1) / 2.
    got = generate_anchors(ratios=(0.5,), scales=(8,), legacy=True)
    np.testing.assert_array_equal(got, [[7.5 - 91.5, 7.5 - 47.5, 7.5 + 91.5, 7.5 + 47.5]])


def test_default_anchors_by_hand():
    # ratio 1, scale 8: a 128 x 128 square centred at (8, 8)
    np.testing.assert_array_equal(generate_anchors(ratios=(1,), scales=(8,)), [[-56, -56, 72, 72]])
    # ratio h / w = 4, base 2, scale 1: area 4 -> w = sqrt(4 / 4) = 1, h = 4, centre (1, 1)
    np.testing.assert_array_equal(generate_anchors(base_size=2, ratios=(4,), scales=(1,)),
                                  [[0.5, -1, 1.5, 3]])


def test_default_anchors_area_ratio_centre_and_order():
    ratios, scales = (0.5, 1, 2), (8, 16, 32)
    a = generate_anchors().astype(np.float64)
    w, h = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
    for i, r in enumerate(ratios):                        # ratio-major, scale-minor
        for j, s in enumerate(scales):
            k = i * len(scales) + j
            np.testing.assert_allclose(w[k] * h[k], (16 * s) ** 2, rtol=1e-6, err_msg=f"area of {k}")
            np.testing.assert_allclose(h[k] / w[k], r, rtol=1e-6, err_msg=f"ratio of {k}")
    np.testing.assert_allclose((a[:, :2] + a[:, 2:]) / 2, 8.0, rtol=0, atol=1e-4, err_msg="centres")


@SETTINGS
@given(st.floats(1, 64), st.lists(st.floats(0.2, 5), min_size=1, max_size=4),
       st.lists(st.floats(0.5, 40), min_size=1, max_size=4))
def test_generate_anchors_properties(base, ratios, scales):
    a = generate_anchors(base, ratios, scales).astype(np.float64)
    assert a.shape == (len(ratios) * len(scales), 4)
    w, h = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
    np.testing.assert_allclose(w * h, np.tile((base * np.array(scales)) ** 2, len(ratios)), rtol=1e-5)
    np.testing.assert_allclose(h / w, np.repeat(ratios, len(scales)), rtol=1e-5)
    np.testing.assert_allclose((a[:, :2] + a[:, 2:]) / 2, base / 2, rtol=1e-5, atol=1e-3)


# ---- shift_anchors -------------------------------------------------------------------------

def test_shift_by_hand():
    base = np.array([[0, 0, 4, 4], [-2, -1, 6, 5]], np.float32)   # k = 2
    got = shift_anchors(base, 2, 3, stride=10)                  # H = 2, W = 3
    assert got.shape == (2 * 3 * 2, 4) and got.dtype == np.float32
    # index (y * W + x) * k + a: y = 1, x = 2, a = 1 -> 11, shifted by (20, 10)
    np.testing.assert_array_equal(got[11], [18, 9, 26, 15])
    # y = 0, x = 1, a = 0 -> 2, shifted by (10, 0)
    np.testing.assert_array_equal(got[2], [10, 0, 14, 4])


def test_default_anchors_centred_on_cell_centres():
    a = shift_anchors(generate_anchors(), 3, 4, stride=16).reshape(3, 4, 9, 4)   # (H, W, k, 4)
    centres = (a[..., :2] + a[..., 2:]) / 2                                    # (H, W, k, 2)
    ys, xs = np.meshgrid(np.arange(3), np.arange(4), indexing="ij")
    expected = np.stack([(xs + 0.5) * 16, (ys + 0.5) * 16], axis=-1)[:, :, None, :]
    np.testing.assert_allclose(centres, np.broadcast_to(expected, centres.shape), rtol=0, atol=1e-4)


def test_shift_empty_map():
    for h, w in [(0, 5), (5, 0), (0, 0)]:
        got = shift_anchors(generate_anchors(), h, w, 16)
        assert got.shape == (0, 4) and got.dtype == np.float32


@SETTINGS
@given(st.integers(0, 5), st.integers(0, 5), st.floats(1, 32),
       st.tuples(st.floats(-50, 50), st.floats(-50, 50)))
def test_shift_order_and_translation_invariance(H, W, stride, move):
    base = generate_anchors(ratios=(0.5, 2), scales=(1, 2))           # k = 4
    k = len(base)
    got = shift_anchors(base, H, W, stride).astype(np.float64)
    assert got.shape == (H * W * k, 4)
    for y in range(H):
        for x in range(W):
            for a in range(k):
                want = base[a].astype(np.float64) + [x * stride, y * stride, x * stride, y * stride]
                np.testing.assert_allclose(got[(y * W + x) * k + a], want, rtol=1e-6, atol=1e-4,
                                           err_msg=f"cell (y={y}, x={x}) anchor {a}")
    # moving the base anchors moves every shifted anchor by the same amount
    dx, dy = move
    moved = shift_anchors(base + np.float32([dx, dy, dx, dy]), H, W, stride).astype(np.float64)
    np.testing.assert_allclose(moved - got, np.broadcast_to([dx, dy, dx, dy], got.shape), atol=1e-3)


# ---- anchors_inside ------------------------------------------------------------------------

def test_anchors_inside_by_hand():
    anchors = [[0, 0, 10, 10],     # touches all four edges of a 10 x 10 image: inside
               [-1, 0, 5, 5],      # one pixel out on the left
               [0, 0, 10, 11],     # one pixel out at the bottom
               [2, 2, 3, 3]]       # well inside
    np.testing.assert_array_equal(anchors_inside(anchors, (10, 10)), [True, False, False, True])
    np.testing.assert_array_equal(anchors_inside(anchors, (10, 10), allowed_border=1), [True] * 4)
    # image 10 tall, 20 wide: the third box fits only if height and width are not swapped
    np.testing.assert_array_equal(anchors_inside([[0, 0, 20, 10]], (10, 20)), [True])
    np.testing.assert_array_equal(anchors_inside([[0, 0, 20, 10]], (20, 10)), [False])
    assert anchors_inside(np.zeros((0, 4)), (10, 10)).shape == (0,)


# ---- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(base_size=0), "base_size: expected a positive"),
    (dict(ratios=(0.5, -1)), "ratios: expected positive"),
    (dict(ratios=()), "ratios: expected a non-empty"),
    (dict(scales=(8, 0)), "scales: expected positive"),
    (dict(scales=(8, np.nan)), "scales: contains NaN or Inf"),
    (dict(scales=[[8, 16]]), r"scales: expected shape \(N,\)"),
])
def test_generate_anchors_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_anchors(**kwargs)


@pytest.mark.parametrize("args, match", [
    ((-1, 3, 16), "feat_height: expected a whole number >= 0"),
    ((2, 1.5, 16), "feat_width: expected a whole number >= 0"),
    ((2, 3, 0), "stride: expected a positive"),
    ((2, 3, -16), "stride: expected a positive"),
])
def test_shift_anchors_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        shift_anchors(generate_anchors(), *args)


def test_bad_anchors_named():
    with pytest.raises(ValueError, match=r"base_anchors: expected shape \(N, 4\)"):
        shift_anchors(np.zeros(4), 2, 2, 16)
    with pytest.raises(ValueError, match="anchors: box 0 has x2 < x1"):
        anchors_inside([[5, 0, 0, 5]], (10, 10))
    with pytest.raises(ValueError, match="allowed_border: expected a finite number"):
        anchors_inside([[0, 0, 5, 5]], (10, 10), allowed_border=np.inf)


def test_docstring_examples_run():
    import doctest
    from frcnn_scratch import anchors as module
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0, f"{result.failed} docstring examples failed"


@pytest.mark.parametrize("border", ["a", None, float("nan")])
def test_anchors_inside_bad_border_is_named(border):
    with pytest.raises(ValueError, match="allowed_border: expected a finite number"):
        anchors_inside([[0, 0, 1, 1]], (4, 4), allowed_border=border)
