"""box_coding.py, eq. (2): t = (tx, ty, tw, th) of a box relative to an anchor, and back."""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from frcnn_scratch.box_coding import BBOX_CLAMP, decode, encode

SETTINGS = settings(max_examples=50, deadline=None)


def paired_boxes(max_rows=6):
    """Two (N, 4) float32 arrays (boxes, anchors) of the same N, sides in [1, 40], so that
    |log(w / wa)| <= log(40) < BBOX_CLAMP and decode(encode(.)) is exact up to rounding."""
    coord = st.floats(-50, 50, width=32)
    side = st.floats(1, 40, width=32)
    row = st.tuples(coord, coord, side, side, coord, coord, side, side)
    def split(rows):
        r = np.array(rows, np.float32).reshape(-1, 8)
        to_xyxy = lambda q: np.stack([q[:, 0], q[:, 1], q[:, 0] + q[:, 2], q[:, 1] + q[:, 3]], axis=1)
        return to_xyxy(r[:, :4]), to_xyxy(r[:, 4:])
    return st.lists(row, min_size=0, max_size=max_rows).map(split)


weights_strategy = st.tuples(*[st.floats(0.5, 10)] * 4)


# ---- hand-computed -------------------------------------------------------------------------

def test_encode_by_hand():
    anchors = np.array([[0, 0, 10, 10],      # centre (5, 5), 10 x 10
                        [0, 0, 16, 16]],     # centre (8, 8), 16 x 16
                       np.float32)
    boxes = np.array([[2, 0, 12, 20],        # centre (7, 10), 10 x 20
                      [4, 8, 36, 24]],       # centre (20, 16), 32 x 16
                     np.float32)
    # row 0: tx = (7 - 5) / 10 = 0.2, ty = (10 - 5) / 10 = 0.5, tw = log(10/10) = 0, th = log(20/10)
    # row 1: tx = (20 - 8) / 16 = 0.75, ty = (16 - 8) / 16 = 0.5, tw = log(32/16), th = log(16/16) = 0
    expected = np.array([[0.2, 0.5, 0, math.log(2)],
                         [0.75, 0.5, math.log(2), 0]])
    got = encode(boxes, anchors)
    assert got.dtype == np.float32 and got.shape == (2, 4)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7, err_msg="eq. (2) by hand")
    # weights (10, 10, 5, 5) multiply the four targets
    np.testing.assert_allclose(encode(boxes, anchors, (10, 10, 5, 5)), expected * [10, 10, 5, 5],
                               rtol=1e-6, atol=1e-6)


def test_decode_by_hand():
    anchors = np.array([[0, 0, 16, 16]] * 3, np.float32)   # centre (8, 8), 16 x 16
    deltas = np.array([[0, 0, 0, 0],                   # no change: the anchor itself
                       [0.5, -0.25, math.log(2), 0],   # centre (16, 4), 32 x 16 -> [0, -4, 32, 12]
                       [0, 0, 10, 10]],                # clamped: 16 * 1000 / 16 = 1000 wide and tall
                      np.float32)
    expected = np.array([[0, 0, 16, 16],
                         [0, -4, 32, 12],
                         [8 - 500, 8 - 500, 8 + 500, 8 + 500]], np.float32)
    got = decode(deltas, anchors)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-4, err_msg="decode by hand")


def test_clamp_is_log_1000_over_16_and_from_above_only():
    assert BBOX_CLAMP == math.log(1000 / 16)
    anchor = np.array([[0, 0, 16, 16]], np.float32)
    big = decode([[0, 0, BBOX_CLAMP + 5, 0]], anchor)
    np.testing.assert_allclose(big[0, 2] - big[0, 0], 1000, rtol=1e-5, err_msg="tw clamped")
    small = decode([[0, 0, -5, 0]], anchor)             # shrinking is not clamped
    np.testing.assert_allclose(small[0, 2] - small[0, 0], 16 * math.exp(-5), rtol=1e-5)
    with np.errstate(over="raise"):                     # a wild prediction stays finite
        assert np.isfinite(decode([[0, 0, 1e6, 1e6]], anchor)).all()


def test_empty():
    e = np.zeros((0, 4), np.float32)
    for out in (encode(e, e), decode(e, e)):
        assert out.shape == (0, 4) and out.dtype == np.float32


# ---- properties ----------------------------------------------------------------------------

@SETTINGS
@given(paired_boxes(), weights_strategy)
def test_decode_undoes_encode(pair, weights):
    boxes, anchors = pair
    back = decode(encode(boxes, anchors, weights), anchors, weights)
    np.testing.assert_allclose(back, boxes, rtol=0, atol=1e-4, err_msg="decode(encode(b)) != b")


@SETTINGS
@given(paired_boxes(), weights_strategy)
def test_encode_undoes_decode(pair, weights):
    # deltas taken as the encoding of some box, so |tw|, |th| stay below the clamp
    boxes, anchors = pair
    t = encode(boxes, anchors, weights)
    np.testing.assert_allclose(encode(decode(t, anchors, weights), anchors, weights), t,
                               rtol=1e-4, atol=1e-4, err_msg="encode(decode(t)) != t")


@SETTINGS
@given(paired_boxes(), st.floats(-20, 20), st.floats(-20, 20))
def test_encoding_ignores_a_common_translation(pair, dx, dy):
    # t depends only on the box relative to its anchor: moving both changes nothing
    boxes, anchors = pair
    move = np.float32([dx, dy, dx, dy])
    np.testing.assert_allclose(encode(boxes + move, anchors + move), encode(boxes, anchors),
                               rtol=0, atol=2e-4)


# ---- bad input -----------------------------------------------------------------------------

def test_zero_width_anchor_rejected_in_encode():
    with pytest.raises(ValueError, match="anchors: box 1 has zero width or height"):
        encode([[0, 0, 1, 1]] * 2, [[0, 0, 1, 1], [3, 3, 3, 8]])


def test_zero_size_box_rejected_in_encode():
    with pytest.raises(ValueError, match="boxes: box 0 has zero width or height"):
        encode([[0, 0, 1, 0]], [[0, 0, 1, 1]])


@pytest.mark.parametrize("call, match", [
    (lambda: encode([[0, 0, 1, 1]], [[0, 0, 1, 1]] * 2), "boxes and anchors: expected the same number"),
    (lambda: decode([[0, 0, 0, 0]] * 3, [[0, 0, 1, 1]]), "deltas and anchors: expected the same number"),
    (lambda: decode(np.zeros((1, 8)), [[0, 0, 1, 1]]), r"deltas: expected shape \(N, 4\)"),
    (lambda: decode([[0, np.nan, 0, 0]], [[0, 0, 1, 1]]), "deltas: contains NaN or Inf"),
    (lambda: encode([[0, 0, 1, np.inf]], [[0, 0, 1, 1]]), "boxes: contains NaN or Inf"),
    (lambda: encode([[1, 0, 0, 1]], [[0, 0, 1, 1]]), "boxes: box 0 has x2 < x1"),
    (lambda: decode([[0, 0, 0, 0]], [[0, 2, 1, 1]]), "anchors: box 0 has x2 < x1 or y2 < y1"),
    (lambda: encode([[0, 0, 1, 1]], [[0, 0, 1, 1]], (1, 1, 0, 1)), "weights: expected four positive"),
    (lambda: decode([[0, 0, 0, 0]], [[0, 0, 1, 1]], (1, 1, 1)), "weights: expected four positive"),
    (lambda: decode([[0, 0, 0, 0]], [[0, 0, 1, 1]], (1, np.nan, 1, 1)), "weights: expected four positive"),
    (lambda: encode([[0, 0, 1, 1]], [[0, 0, 1, 1]], "abcd"), "weights: expected four positive"),
])
def test_bad_input_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_docstring_examples_run():
    import doctest
    from frcnn_scratch import box_coding as module
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0, f"{result.failed} docstring examples failed"


def test_weights_become_float32_values_as_before():
    """check_weights reads four numbers (no array scan) and keeps them as float32 holds them, so
    a weight like 0.1 codes exactly as it did when the weights were a float32 array."""
    from frcnn_scratch.box_coding import check_weights
    assert check_weights((10, 10, 5, 5)) == (10.0, 10.0, 5.0, 5.0)
    assert check_weights([0.1, 1, 1, 1])[0] == float(np.float32(0.1))
