"""boxes.py: formats, area, IoU, clip, remove_small_boxes. Hand-computed cases first, then properties."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from frcnn_scratch.boxes import (box_area, box_iou, clip_boxes, cxcywh_to_xyxy, remove_small_boxes,
                                 rchw_to_xyxy, xyxy_to_cxcywh, xyxy_to_rchw)

SETTINGS = settings(max_examples=50, deadline=None)


def boxes_strategy(min_size=0.0, max_rows=6):
    """(N, 4) float32 xyxy boxes with corners in [-50, 50] and sides in [min_size, 40]."""
    coord = st.floats(-50, 50, width=32)
    side = st.floats(min_size, 40, width=32)
    row = st.tuples(coord, coord, side, side)
    def to_boxes(rows):
        r = np.array(rows, np.float32).reshape(-1, 4)
        return np.stack([r[:, 0], r[:, 1], r[:, 0] + r[:, 2], r[:, 1] + r[:, 3]], axis=1)
    return st.lists(row, min_size=0, max_size=max_rows).map(to_boxes)


def iou_by_loops(a, b):
    """A plain float64 double loop: the definition, written out."""
    out = np.zeros((len(a), len(b)))
    for i, p in enumerate(a.astype(np.float64)):
        for j, q in enumerate(b.astype(np.float64)):
            iw = max(min(p[2], q[2]) - max(p[0], q[0]), 0.0)
            ih = max(min(p[3], q[3]) - max(p[1], q[1]), 0.0)
            inter = iw * ih
            union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
            out[i, j] = inter / union if union > 0 else 0.0
    return out


# ---- hand-computed -------------------------------------------------------------------------

def test_iou_hand_computed():
    a = np.array([[0, 0, 10, 10],     # 10 x 10, area 100
                  [0, 0, 2, 2],       # area 4
                  [0, 0, 4, 4]], np.float32)    # area 16
    b = np.array([[5, 0, 15, 10],     # area 100
                  [1, 1, 3, 3],       # area 4
                  [20, 20, 21, 21]], np.float32)  # far away
    # a0-b0: overlap x 5..10, y 0..10 = 50; union 100 + 100 - 50 = 150 -> 1/3
    # a0-b1: b1 lies inside a0: 4 / 100 = 0.04
    # a1-b0: no overlap in x (2 < 5) -> 0
    # a1-b1: overlap 1..2 x 1..2 = 1; union 4 + 4 - 1 = 7 -> 1/7
    # a2-b0: no overlap -> 0
    # a2-b1: b1 inside a2: 4 / 16 = 0.25
    # anything-b2: disjoint -> 0
    expected = np.array([[1 / 3, 0.04, 0],
                         [0, 1 / 7, 0],
                         [0, 0.25, 0]])
    got = box_iou(a, b)
    assert got.dtype == np.float32 and got.shape == (3, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0, err_msg="hand-computed IoU")


def test_iou_touching_edges_is_zero():
    # sharing the edge x = 1 gives an intersection of width 0
    assert box_iou([[0, 0, 1, 1]], [[1, 0, 2, 1]])[0, 0] == 0


def test_iou_zero_union_is_zero_not_nan():
    pt = np.array([[3, 3, 3, 3]], np.float32)           # a point: area 0
    line = np.array([[0, 5, 10, 5]], np.float32)        # a segment: area 0
    big = np.array([[0, 0, 10, 10]], np.float32)
    got = box_iou(np.concatenate([pt, line]), np.concatenate([pt, line, big]))
    assert not np.isnan(got).any(), got
    # point-point and line-line have union 0 -> 0; zero-area vs big: 0 / 100 = 0
    np.testing.assert_array_equal(got, np.zeros((2, 3), np.float32))


def test_iou_empty_shapes():
    e = np.zeros((0, 4), np.float32)
    b = np.array([[0, 0, 1, 1]] * 3, np.float32)
    for x, y, shape in [(e, b, (0, 3)), (b, e, (3, 0)), (e, e, (0, 0))]:
        got = box_iou(x, y)
        assert got.shape == shape and got.dtype == np.float32, (got.shape, got.dtype)


def test_area_hand_computed():
    got = box_area([[0, 0, 10, 4], [1, 1, 1, 9], [-2, -3, 2, 3]])   # 40, 0 (zero width), 4 * 6
    np.testing.assert_array_equal(got, np.array([40, 0, 24], np.float32))
    assert box_area(np.zeros((0, 4))).shape == (0,)


def test_formats_hand_computed():
    b = np.array([[1, 2, 11, 6]], np.float32)            # x 1..11, y 2..6: w 10, h 4
    np.testing.assert_array_equal(xyxy_to_cxcywh(b), [[6, 4, 10, 4]])
    np.testing.assert_array_equal(cxcywh_to_xyxy([[6, 4, 10, 4]]), b)
    np.testing.assert_array_equal(xyxy_to_rchw(b), [[2, 1, 4, 10]])   # row = y1, col = x1, h, w
    np.testing.assert_array_equal(rchw_to_xyxy([[2, 1, 4, 10]]), b)
    for f in (xyxy_to_cxcywh, cxcywh_to_xyxy, xyxy_to_rchw, rchw_to_xyxy):
        out = f(np.zeros((0, 4)))
        assert out.shape == (0, 4) and out.dtype == np.float32, f.__name__


def test_clip_hand_computed():
    boxes = [[-5, 2, 30, 50],      # sticks out left, right and bottom
             [2, 3, 8, 9],         # inside: unchanged
             [25, 45, 30, 50]]     # wholly outside: collapses onto the corner (20, 40)
    got = clip_boxes(boxes, image_shape=(40, 20))        # height 40, width 20
    np.testing.assert_array_equal(got, [[0, 2, 20, 40], [2, 3, 8, 9], [20, 40, 20, 40]])
    assert clip_boxes(np.zeros((0, 4)), (4, 4)).shape == (0, 4)


def test_remove_small_hand_computed():
    boxes = [[0, 0, 20, 20],   # 20 x 20 kept
             [0, 0, 20, 5],    # 5 tall: dropped
             [0, 0, 16, 16],   # exactly 16: kept (>=)
             [0, 0, 15, 30]]   # 15 wide: dropped
    got = remove_small_boxes(boxes, 16)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, [0, 2])
    assert remove_small_boxes(np.zeros((0, 4)), 16).shape == (0,)


# ---- properties ----------------------------------------------------------------------------

@SETTINGS
@given(boxes_strategy(), boxes_strategy())
def test_iou_matches_loops_symmetric_and_in_unit_interval(a, b):
    ab = box_iou(a, b)
    ba = box_iou(b, a)
    np.testing.assert_array_equal(ab, ba.T, err_msg="IoU is not symmetric")
    assert np.all((ab >= 0) & (ab <= 1)), ab
    np.testing.assert_allclose(ab, iou_by_loops(a, b), rtol=0, atol=1e-6,
                               err_msg="vectorised IoU differs from the float64 loop")


@SETTINGS
@given(boxes_strategy(min_size=0.5))
def test_iou_of_a_box_with_itself_is_one(b):
    d = np.diag(box_iou(b, b))
    np.testing.assert_array_equal(d, np.ones(len(b), np.float32))


@SETTINGS
@given(boxes_strategy())
def test_format_round_trips(b):
    np.testing.assert_allclose(cxcywh_to_xyxy(xyxy_to_cxcywh(b)), b, rtol=0, atol=2e-5)
    np.testing.assert_allclose(rchw_to_xyxy(xyxy_to_rchw(b)), b, rtol=0, atol=2e-5)
    np.testing.assert_allclose(box_area(b), np.prod(xyxy_to_cxcywh(b)[:, 2:], axis=1), rtol=1e-6)


@SETTINGS
@given(boxes_strategy(), st.integers(0, 60), st.integers(0, 60))
def test_clip_stays_inside_and_is_idempotent(b, h, w):
    c = clip_boxes(b, (h, w))
    assert np.all(c[:, 0::2] >= 0) and np.all(c[:, 0::2] <= w), c
    assert np.all(c[:, 1::2] >= 0) and np.all(c[:, 1::2] <= h), c
    np.testing.assert_array_equal(clip_boxes(c, (h, w)), c)


@SETTINGS
@given(boxes_strategy(), st.floats(0, 30))
def test_remove_small_keeps_exactly_the_big_ones(b, min_size):
    keep = remove_small_boxes(b, min_size)
    wh = b[:, 2:] - b[:, :2]
    big = (wh >= min_size).all(axis=1)
    np.testing.assert_array_equal(keep, np.flatnonzero(big))


# ---- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize("bad, match", [
    (np.zeros((3,)), r"boxes1: expected shape \(N, 4\)"),
    (np.zeros((2, 5)), r"boxes1: expected shape \(N, 4\)"),
    ([[0, 0, 1, np.nan]], "boxes1: contains NaN or Inf"),
    ([[0, 0, np.inf, 1]], "boxes1: contains NaN or Inf"),
    ([[2, 0, 1, 1]], "boxes1: box 0 has x2 < x1"),
])
def test_iou_bad_first_argument(bad, match):
    with pytest.raises(ValueError, match=match):
        box_iou(bad, [[0, 0, 1, 1]])


def test_iou_bad_second_argument_named():
    with pytest.raises(ValueError, match="boxes2: box 1 has x2 < x1 or y2 < y1"):
        box_iou([[0, 0, 1, 1]], [[0, 0, 1, 1], [0, 2, 1, 1]])


def test_other_bad_inputs_named():
    with pytest.raises(ValueError, match="boxes: box 0 of \\(cx, cy, w, h\\) has a negative size"):
        cxcywh_to_xyxy([[0, 0, -1, 1]])
    with pytest.raises(ValueError, match="boxes: box 0 of \\(r, c, h, w\\) has a negative size"):
        rchw_to_xyxy([[0, 0, 1, -1]])
    with pytest.raises(ValueError, match="image_shape: expected \\(height, width\\)"):
        clip_boxes([[0, 0, 1, 1]], (4, 4, 3))
    with pytest.raises(ValueError, match="image_shape: expected non-negative"):
        clip_boxes([[0, 0, 1, 1]], (-4, 4))
    with pytest.raises(ValueError, match="min_size: expected a finite number >= 0"):
        remove_small_boxes([[0, 0, 1, 1]], -1)
    with pytest.raises(ValueError, match="min_size: expected a finite number >= 0, got 'a'"):
        remove_small_boxes([[0, 0, 1, 1]], "a")
    with pytest.raises(ValueError, match="boxes: box 0 has x2 < x1"):
        box_area([[1, 0, 0, 1]])


def test_docstring_examples_run():
    import doctest
    from frcnn_scratch import boxes as module
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0, f"{result.failed} docstring examples failed"
