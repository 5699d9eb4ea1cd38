"""NMS (section 3.3): hand-computed cases, then properties over random boxes, then errors."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from frcnn_scratch import nms as nms_module, ops
from frcnn_scratch.boxes import box_iou
from frcnn_scratch.nms import batched_nms, check_nms_inputs, nms, nms_reference

# Five boxes whose IoUs are worked out by hand:
#   A = box 0, B = box 1, C = box 2 overlap; D = box 3, E = box 4 overlap; the two groups are apart.
#   IoU(A, B) = 9*9 / (100 + 100 - 81) = 81/119 = 0.6807
#   IoU(A, C) = 10*5 / (100 + 50 - 50) = 0.5            (C is A's top half)
#   IoU(B, C) = 9*4 / (100 + 50 - 36)  = 36/114 = 0.3158
#   IoU(D, E) = 9*10 / (100 + 100 - 90) = 90/110 = 0.8182
BOXES = np.array([[0, 0, 10, 10],     # A  0.90
                  [1, 1, 11, 11],     # B  0.80
                  [0, 0, 10, 5],      # C  0.85
                  [20, 20, 30, 30],   # D  0.70
                  [21, 20, 31, 30]],  # E  0.95
                 np.float32)
SCORES = np.array([0.9, 0.8, 0.85, 0.7, 0.95], np.float32)
# Score order: E(4), A(0), C(2), B(1), D(3).


def assert_indices(got, want):
    got = np.asarray(got)
    assert got.dtype == np.int64, f"dtype {got.dtype}, expected int64"
    assert got.tolist() == list(want), f"kept {got.tolist()}, expected {list(want)}"


@pytest.mark.parametrize("thr, want", [
    (0.9, [4, 0, 2, 1, 3]),   # nothing overlaps by more than 0.9
    (0.7, [4, 0, 2, 1]),      # E suppresses D (0.818); A-B is only 0.681
    (0.5, [4, 0, 2]),         # A suppresses B (0.681); A-C is exactly 0.5: kept (not > 0.5)
    (0.3, [4, 0]),            # A suppresses C (0.5) and B
    (0.0, [4, 0]),            # any overlap suppresses
])
@pytest.mark.parametrize("fn", [nms, nms_reference], ids=["nms", "nms_reference"])
def test_five_boxes_by_hand(fn, thr, want):
    assert_indices(fn(BOXES, SCORES, thr), want)


def test_ops_nms_numpy_backend_matches_hand_case():
    assert_indices(ops.nms(BOXES, SCORES, 0.5, backend="numpy"), [4, 0, 2])


def test_a_suppressed_box_does_not_suppress():
    # B overlaps A (0.681) and C overlaps B only: with A kept and B gone, C survives even though
    # IoU(B, C) > thr would have removed it had B been kept.
    boxes = np.array([[0, 0, 10, 10], [3, 0, 13, 10], [6, 0, 16, 10]], np.float32)
    # IoU(0,1) = 70/130 = 0.538, IoU(1,2) = 0.538, IoU(0,2) = 40/160 = 0.25
    assert_indices(nms(boxes, [0.9, 0.8, 0.7], 0.5), [0, 2])


def test_equal_scores_keep_the_lower_index():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]], np.float32)
    assert_indices(nms(boxes, [0.5, 0.5, 0.5], 0.5), [0])
    # Ties in the output order: two apart boxes with equal scores come lower index first.
    apart = np.array([[50, 50, 60, 60], [0, 0, 10, 10], [100, 0, 110, 10]], np.float32)
    assert_indices(nms(apart, [0.5, 0.7, 0.5], 0.5), [1, 0, 2])


def test_iou_equal_to_threshold_is_kept():
    boxes = np.array([[0, 0, 4, 1], [0, 0, 1, 1]], np.float32)   # IoU = 1/4 exactly
    assert_indices(nms(boxes, [1.0, 0.5], 0.25), [0, 1])
    assert_indices(nms(boxes, [1.0, 0.5], 0.2499), [0])
    same = np.array([[0, 0, 2, 2], [0, 0, 2, 2]], np.float32)    # IoU = 1
    assert_indices(nms(same, [1.0, 0.5], 1.0), [0, 1])


def test_zero_area_boxes_have_iou_zero_and_suppress_nothing():
    boxes = np.array([[5, 5, 5, 5],       # a point
                      [5, 5, 5, 5],       # the same point: zero union, IoU 0
                      [0, 0, 10, 10],     # a box around it: intersection 0
                      [2, 0, 2, 10]],     # a vertical segment inside the box
                     np.float32)
    assert_indices(nms(boxes, [0.9, 0.8, 0.7, 0.6], 0.0), [0, 1, 2, 3])


def test_empty_and_single():
    assert_indices(nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.5), [])
    assert_indices(nms([[1, 2, 3, 4]], [0.3], 0.5), [0])
    assert_indices(batched_nms(np.zeros((0, 4)), [], [], 0.5), [])
    assert_indices(ops.batched_nms(np.zeros((0, 4)), [], [], 0.5, backend="numpy"), [])


def test_batched_nms_by_hand():
    # Boxes 0 and 1 overlap with IoU 81/119 = 0.68; in different classes both stay.
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [1, 1, 11, 11]], np.float32)
    scores = np.array([0.6, 0.9, 0.8, 0.7], np.float32)
    assert_indices(batched_nms(boxes, scores, [1, 2, 1, 1], 0.5), [1, 2])
    # class 1 keeps 2 (0.8) and suppresses 0 and 3; class 2 keeps 1 alone. Sorted by score: 1, 2.
    assert_indices(batched_nms(boxes, scores, [1, 2, 3, 4], 0.5), [1, 2, 3, 0])
    assert_indices(batched_nms(boxes, scores, np.array([7, 7, 7, 7]), 0.5), [1])


def test_batched_nms_calls_nms_fn_once_per_class_on_that_class():
    calls = []

    def spy(b, s, thr):
        calls.append((b.copy(), s.copy(), thr))
        return nms(b, s, thr)

    boxes = BOXES
    classes = np.array([0, 1, 0, 1, 0])
    batched_nms(boxes, SCORES, classes, 0.5, nms_fn=spy)
    assert len(calls) == 2, f"{len(calls)} calls, expected one per class (2)"
    np.testing.assert_array_equal(calls[0][0], boxes[[0, 2, 4]])
    np.testing.assert_array_equal(calls[1][1], SCORES[[1, 3]])
    assert calls[0][2] == 0.5 and calls[0][0].dtype == np.float32


def test_batched_nms_runs_this_files_nms_on_checked_arrays(monkeypatch):
    """Without nms_fn, each class goes to the unchecked core: the inputs were checked once."""
    calls = []
    core = nms_module._nms
    monkeypatch.setattr(nms_module, "_nms", lambda *a: calls.append(len(a[0])) or core(*a))
    monkeypatch.setattr(nms_module, "check_nms_inputs", lambda *a, real=check_nms_inputs:
                        calls.append("checked") or real(*a))
    keep = batched_nms(BOXES, SCORES, np.array([0, 1, 0, 1, 0]), 0.5)
    assert calls == ["checked", 3, 2], calls
    assert_indices(keep, batched_nms(BOXES, SCORES, np.array([0, 1, 0, 1, 0]), 0.5, nms_fn=nms))


def test_nms_thresholds_are_named_where_they_are_checked():
    from frcnn_scratch.nms import check_iou_threshold
    assert check_iou_threshold(1) == 1.0
    with pytest.raises(ValueError, match=r"nms_threshold: expected a number in \[0, 1\], got nan"):
        check_iou_threshold(float("nan"), "nms_threshold")
    with pytest.raises(ValueError, match=r"iou_threshold: expected a number in \[0, 1\], got 'a'"):
        check_iou_threshold("a")


def test_check_nms_inputs_returns_float32():
    b, s, thr = check_nms_inputs([[0, 0, 1, 1]], np.array([1.0]), 0.5)
    assert b.dtype == np.float32 and s.dtype == np.float32 and isinstance(thr, float)


@pytest.mark.parametrize("boxes, scores, thr, match", [
    (np.zeros(4), np.zeros(1), 0.5, r"boxes: expected shape \(N, 4\)"),
    (np.zeros((2, 5)), np.zeros(2), 0.5, r"boxes: expected shape \(N, 4\)"),
    ([[0, 0, np.nan, 1]], [1.0], 0.5, "boxes: contains NaN or Inf"),
    ([[0, 0, np.inf, 1]], [1.0], 0.5, "boxes: contains NaN or Inf"),
    ([[2, 0, 1, 1]], [1.0], 0.5, "boxes: box 0 has x2 < x1"),
    ([[0, 0, 1, 1], [0, 3, 1, 2]], [1.0, 1.0], 0.5, "boxes: box 1 has x2 < x1 or y2 < y1"),
    ([[0, 0, 1, 1]], [1.0, 2.0], 0.5, r"scores: expected shape \(1,\)"),
    ([[0, 0, 1, 1]], [[1.0]], 0.5, r"scores: expected shape \(N,\)"),
    ([[0, 0, 1, 1]], [np.nan], 0.5, "scores: contains NaN or Inf"),
    ([[0, 0, 1, 1]], [1.0], -0.1, r"iou_threshold: expected a number in \[0, 1\]"),
    ([[0, 0, 1, 1]], [1.0], 1.5, r"iou_threshold: expected a number in \[0, 1\]"),
    ([[0, 0, 1, 1]], [1.0], np.nan, r"iou_threshold: expected a number in \[0, 1\]"),
    ([[0, 0, 1, 1]], [1.0], "high", r"iou_threshold: expected a number in \[0, 1\]"),
    ([[0, 0, 1, 1]], [1.0], None, r"iou_threshold: expected a number in \[0, 1\]"),
])
@pytest.mark.parametrize("fn", [nms, nms_reference, ops.nms], ids=["nms", "nms_reference", "ops.nms"])
def test_bad_inputs_name_the_argument(fn, boxes, scores, thr, match):
    with pytest.raises(ValueError, match=match):
        fn(boxes, scores, thr)


@pytest.mark.parametrize("classes, match", [
    ([0, 1], r"classes: expected shape \(3,\)"),
    ([[0, 1, 2]], r"classes: expected shape \(3,\)"),
    ([0.0, 1.5, 2.0], r"classes: expected whole numbers, got \[1.5\]"),
    ([0.0, np.nan, 2.0], "classes: contains NaN or Inf"),
    (["a", "b", "c"], "classes: expected whole numbers"),
])
def test_batched_nms_bad_classes(classes, match):
    boxes = np.array([[0, 0, 1, 1]] * 3, np.float32)
    with pytest.raises(ValueError, match=match):
        batched_nms(boxes, [0.1, 0.2, 0.3], classes, 0.5)
    with pytest.raises(ValueError, match=match):
        ops.batched_nms(boxes, [0.1, 0.2, 0.3], classes, 0.5, backend="numpy")


@pytest.mark.parametrize("classes", [[-7, 2**40, -7], [-7.0, 3.0, -7.0], np.array([-7, 3, -7], np.int8)])
def test_batched_nms_takes_any_whole_class_labels(classes):
    # Three identical boxes: 0 and 2 share a class, so 2 (score 0.3) suppresses 0; 1 is alone.
    boxes = np.array([[0, 0, 1, 1]] * 3, np.float32)
    got = batched_nms(boxes, [0.1, 0.2, 0.3], classes, 0.5)
    assert got.tolist() == [2, 1], f"classes {classes!r}: kept {got.tolist()}, expected [2, 1]"


# ---- properties over random boxes ------------------------------------------------------------

@st.composite
def box_sets(draw, max_n=25):
    """Random boxes on a small grid (so that exact overlaps, ties and zero areas happen)."""
    n = draw(st.integers(0, max_n))
    coord = st.integers(0, 12)
    rows = draw(st.lists(st.tuples(coord, coord, st.integers(0, 8), st.integers(0, 8)),
                         min_size=n, max_size=n))
    xywh = np.array(rows, np.float32).reshape(n, 4)
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)     # (n, 4)
    scores = np.array(draw(st.lists(st.integers(0, 5), min_size=n, max_size=n)), np.float32) / 5
    thr = draw(st.sampled_from([0.0, 0.1, 0.25, 0.3, 0.5, 0.7, 0.9, 1.0]) | st.floats(0, 1))
    return boxes, scores, thr


PROPS = settings(max_examples=50, deadline=None)


@PROPS
@given(box_sets())
def test_nms_equals_the_plain_loop_reference(data):
    boxes, scores, thr = data
    want = nms_reference(boxes, scores, thr)
    got = nms(boxes, scores, thr)
    assert got.tolist() == want.tolist(), f"nms {got.tolist()} != reference {want.tolist()}"


@PROPS
@given(box_sets(max_n=40), st.sampled_from([1, 2, 3, 7]))
def test_nms_equals_the_reference_whatever_the_block_size(data, block):
    # nms decides BLOCK boxes at a time; small blocks make every case cross block borders.
    boxes, scores, thr = data
    saved = nms_module.BLOCK
    nms_module.BLOCK = block
    try:
        got = nms(boxes, scores, thr)
    finally:
        nms_module.BLOCK = saved
    want = nms_reference(boxes, scores, thr)
    assert got.tolist() == want.tolist(), f"BLOCK={block}: {got.tolist()} != {want.tolist()}"


@PROPS
@given(box_sets(max_n=40), st.sampled_from([1, 3, 64]), st.integers(0, 45))
def test_nms_stopped_at_max_keep_gives_the_first_boxes_of_the_whole_nms(data, block, max_keep):
    """max_keep stops the greedy walk once that many boxes are kept (small blocks: the stop falls
    inside and between blocks); the result is the whole NMS's first max_keep, in ops too."""
    boxes, scores, thr = data
    want = nms_reference(boxes, scores, thr)[:max_keep]
    saved = nms_module.BLOCK
    nms_module.BLOCK = block
    try:
        got = nms(boxes, scores, thr, max_keep=max_keep)
    finally:
        nms_module.BLOCK = saved
    assert got.tolist() == want.tolist(), f"max_keep={max_keep}: {got.tolist()} != {want.tolist()}"
    assert got.dtype == np.int64
    assert ops.nms(boxes, scores, thr, max_keep=max_keep).tolist() == want.tolist()


@pytest.mark.parametrize("max_keep", [-1, 1.5, "3", True])
def test_a_bad_max_keep_is_named(max_keep):
    boxes, scores = np.array([[0, 0, 2, 2]], np.float32), np.ones(1, np.float32)
    for fn in (nms, ops.nms):
        with pytest.raises(ValueError, match="max_keep"):
            fn(boxes, scores, 0.5, max_keep=max_keep)


@PROPS
@given(box_sets())
def test_nms_keeps_no_overlapping_pair_and_each_suppressed_box_has_a_reason(data):
    boxes, scores, thr = data
    keep = nms(boxes, scores, thr)
    iou = box_iou(boxes, boxes).astype(np.float64)      # (n, n) float32 IoUs, compared in float64
    # 1. Kept boxes: pairwise IoU <= thr.
    pair = iou[np.ix_(keep, keep)]
    np.fill_diagonal(pair, 0)
    assert np.all(pair <= thr), f"two kept boxes overlap with IoU {pair.max()} > {thr}"
    # 2. Output order: score descending, ties by lower index.
    order = np.argsort(-scores, kind="stable")
    rank = np.empty(len(boxes), np.int64)
    rank[order] = np.arange(len(boxes))
    assert np.all(np.diff(rank[keep]) > 0), f"kept {keep.tolist()} not in score order"
    # 3. Each suppressed box overlaps a kept box ranked before it by IoU > thr.
    for j in np.setdiff1d(np.arange(len(boxes)), keep):
        before = keep[rank[keep] < rank[j]]
        assert np.any(iou[before, j] > thr), f"box {j} suppressed without a kept box over {thr}"


@PROPS
@given(box_sets(), st.lists(st.integers(0, 3), min_size=25, max_size=25))
def test_batched_nms_equals_nms_per_class_merged_by_score(data, class_pool):
    boxes, scores, thr = data
    classes = np.array(class_pool[:len(boxes)], np.int64)
    want = []
    for c in np.unique(classes):
        members = np.flatnonzero(classes == c)
        want.extend(members[nms_reference(boxes[members], scores[members], thr)])
    want = np.sort(np.array(want, np.int64))
    want = want[np.argsort(-scores[want], kind="stable")]
    got = batched_nms(boxes, scores, classes, thr)
    assert got.tolist() == want.tolist(), f"batched {got.tolist()} != per class {want.tolist()}"
    assert ops.batched_nms(boxes, scores, classes, thr, backend="numpy").tolist() == want.tolist()


def test_many_random_float_boxes_match_reference():
    rng = np.random.default_rng(0)
    centres = rng.uniform(0, 200, (8, 2))
    k = rng.integers(0, 8, 400)
    wh = rng.uniform(10, 60, (400, 2)).astype(np.float32)
    xy = (centres[k] + rng.normal(0, 6, (400, 2)) - wh / 2).astype(np.float32)
    boxes = np.concatenate([xy, xy + wh], axis=1)
    scores = rng.random(400).astype(np.float32)
    for thr in (0.3, 0.5, 0.7):
        got, want = nms(boxes, scores, thr), nms_reference(boxes, scores, thr)
        assert got.tolist() == want.tolist(), f"thr {thr}: {len(got)} kept vs reference {len(want)}"
        assert 8 <= len(got) < 400
