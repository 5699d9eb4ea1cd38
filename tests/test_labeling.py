"""labeling.py (section 3.1.2): anchor labels and the 256-anchor mini-batch sample."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from frcnn_scratch import labeling, ops
from frcnn_scratch.boxes import box_iou
from frcnn_scratch.labeling import label_anchors, sample_labels

SETTINGS = settings(max_examples=50, deadline=None)
GT = np.array([[0, 0, 10, 10]], np.float32)             # one 10 x 10 ground-truth box, area 100


def boxes_strategy(min_rows=0, max_rows=8):
    """(N, 4) float32 xyxy boxes on a coarse integer grid, so that IoU ties really happen."""
    row = st.tuples(st.integers(-4, 30), st.integers(-4, 30), st.integers(0, 16), st.integers(0, 16))
    def to_boxes(rows):
        r = np.array(rows, np.float32).reshape(-1, 4)
        return np.stack([r[:, 0], r[:, 1], r[:, 0] + r[:, 2], r[:, 1] + r[:, 3]], axis=1)
    return st.lists(row, min_size=min_rows, max_size=max_rows).map(to_boxes)


def labels_by_rules(anchors, gt, inside, pos_iou=0.7, neg_iou=0.3):
    """Section 3.1.2 written as loops over anchors: the specification label_anchors must meet."""
    A, G = len(anchors), len(gt)
    iou = box_iou(anchors, gt) if G else np.zeros((A, 0), np.float32)
    labels = np.full(A, -1)
    for i in range(A):
        if not inside[i]:
            continue
        best = iou[i].max() if G else 0.0
        # rule (i): anchor i is (one of) the highest-IoU inside anchors of some gt, IoU > 0
        rule_i = any(iou[i, j] > 0 and iou[i, j] == max(iou[k, j] for k in range(A) if inside[k])
                     for j in range(G))
        rule_ii = best > np.float32(pos_iou)
        if rule_i or rule_ii:
            labels[i] = 1
        elif best < np.float32(neg_iou):
            labels[i] = 0
    return labels


# ---- label_anchors, by hand ----------------------------------------------------------------

def test_labels_by_hand():
    anchors = np.array([[0, 0, 10, 10],     # IoU 1                         -> positive
                        [0, 0, 10, 20],     # 100 / 200 = 0.5               -> ignored
                        [20, 20, 30, 30],   # no overlap                    -> negative
                        [0, 0, 10, 13],     # 100 / 130 = 0.769 > 0.7       -> positive (ii)
                        [0, 0, 10, 40]],    # 100 / 400 = 0.25 < 0.3        -> negative
                       np.float32)
    labels, matched = label_anchors(anchors, GT)
    assert labels.dtype == np.int64 and matched.dtype == np.int64
    np.testing.assert_array_equal(labels, [1, -1, 0, 1, 0])
    np.testing.assert_array_equal(matched, [0, 0, 0, 0, 0])


def test_rule_i_rescues_a_low_iou_best_anchor():
    anchors = np.array([[0, 0, 10, 40],     # 100 / 400 = 0.25: the best this gt gets -> positive (i)
                        [5, 5, 30, 30]],    # 25 / (100 + 625 - 25) = 0.036              -> negative
                       np.float32)
    labels, _ = label_anchors(anchors, GT)
    np.testing.assert_array_equal(labels, [1, 0])


def test_rule_i_includes_ties():
    anchors = np.array([[0, 0, 10, 20],     # 100 / 200 = 0.5  } tied best for the gt: both positive
                        [0, -10, 10, 10],   # 100 / 200 = 0.5  }
                        [0, 0, 10, 30]],    # 100 / 300 = 0.33 -> ignored (between 0.3 and 0.7)
                       np.float32)
    labels, _ = label_anchors(anchors, GT)
    np.testing.assert_array_equal(labels, [1, 1, -1])


def test_rule_i_needs_some_overlap():
    # no anchor touches the gt: its "best" IoU is 0, which makes no anchor positive
    anchors = np.array([[20, 20, 30, 30], [40, 0, 50, 10]], np.float32)
    labels, matched = label_anchors(anchors, GT)
    np.testing.assert_array_equal(labels, [0, 0])
    np.testing.assert_array_equal(matched, [0, 0])


def test_rule_ii_strict_by_default_inclusive_on_request():
    # [0, 0, 7, 10] inside the gt: 70 / 100 = 0.7 exactly (the same float32 as 0.7)
    # [0, 0, 10, 10.5]: 100 / 105 = 0.95 -> the gt's best anchor, so rule (i) does not apply to the first
    anchors = np.array([[0, 0, 7, 10], [0, 0, 10, 10.5]], np.float32)
    strict, _ = label_anchors(anchors, GT)
    inclusive, _ = label_anchors(anchors, GT, pos_inclusive=True)
    np.testing.assert_array_equal(strict, [-1, 1])      # 0.7 is not "higher than 0.7"
    np.testing.assert_array_equal(inclusive, [1, 1])    # the released code's >=


def test_negative_threshold_is_strict():
    # [0, 0, 3, 10]: 30 / 100 = 0.3 exactly -> not below 0.3 -> ignored
    anchors = np.array([[0, 0, 3, 10], [0, 0, 10, 10]], np.float32)
    labels, _ = label_anchors(anchors, GT)
    np.testing.assert_array_equal(labels, [-1, 1])


def test_matched_gt_is_best_iou_lowest_index_on_ties():
    gt = np.array([[0, 0, 10, 10], [10, 0, 20, 10], [0, 0, 10, 10]], np.float32)   # gt 2 = gt 0
    anchors = np.array([[1, 0, 11, 10],     # IoU 90/110 with gt 0 and 2, 10/190 with gt 1 -> 0
                        [9, 0, 19, 10],     # 10/190 with gt 0 and 2, 90/110 with gt 1     -> 1
                        [5, 0, 15, 10]],    # 50/150 with all three                         -> 0
                       np.float32)
    labels, matched = label_anchors(anchors, gt)
    np.testing.assert_array_equal(matched, [0, 1, 0])
    # anchor 0 and 1 above 0.7 (0.82); anchor 2 (1/3) is no gt's best -> ignored
    np.testing.assert_array_equal(labels, [1, 1, -1])


def test_border_anchors_ignored_and_excluded_from_rule_i():
    anchors = np.array([[-5, 0, 10, 10],    # crosses the left border: ignored though IoU 100/150
                        [0, 0, 10, 30],     # inside, 100 / 300 = 0.33: the best INSIDE anchor -> (i)
                        [30, 30, 40, 40],   # inside, far away -> negative
                        [45, 0, 55, 10]],   # crosses the right border (width 50) -> ignored
                       np.float32)
    labels, matched = label_anchors(anchors, GT, image_shape=(50, 50))
    np.testing.assert_array_equal(labels, [-1, 1, 0, -1])
    np.testing.assert_array_equal(matched, [0, 0, 0, 0])
    # a border allowance of 5 pixels lets both border anchors in: anchor 0 (100 / 150 = 0.67) is
    # now the gt's best -> positive (i); anchor 1 (0.33) is neither best nor below 0.3 -> ignored;
    # anchor 3 does not touch the gt -> negative
    labels, _ = label_anchors(anchors, GT, image_shape=(50, 50), allowed_border=5)
    np.testing.assert_array_equal(labels, [1, -1, 0, 0])


def test_no_gt_all_inside_negative():
    anchors = np.array([[0, 0, 10, 10], [-1, 0, 5, 5], [3, 3, 3, 3]], np.float32)
    labels, matched = label_anchors(anchors, np.zeros((0, 4)))
    np.testing.assert_array_equal(labels, [0, 0, 0])
    np.testing.assert_array_equal(matched, [-1, -1, -1])
    labels, _ = label_anchors(anchors, np.zeros((0, 4)), image_shape=(10, 10))
    np.testing.assert_array_equal(labels, [0, -1, 0])   # the border-crossing one stays ignored


def test_empty_anchors_and_zero_area_boxes():
    labels, matched = label_anchors(np.zeros((0, 4)), GT)
    assert labels.shape == (0,) and matched.shape == (0,) and labels.dtype == np.int64
    # a zero-area gt overlaps nothing: no positives, everything negative, no NaN trouble
    labels, matched = label_anchors([[0, 0, 10, 10], [2, 2, 2, 2]], [[5, 5, 5, 5]])
    np.testing.assert_array_equal(labels, [0, 0])
    np.testing.assert_array_equal(matched, [0, 0])


def test_labeling_goes_through_ops_box_iou(monkeypatch):
    """label_anchors checks its boxes at its door, then dispatches through ops._box_iou (the
    backend switch, without checking the boxes again)."""
    calls = []
    def spy(a, b, backend=None):
        calls.append((len(a), len(b)))
        return box_iou(a, b)
    monkeypatch.setattr(ops, "_box_iou", spy)
    monkeypatch.setattr(ops, "box_iou", lambda *a, **k: pytest.fail("boxes checked twice"))
    label_anchors([[0, 0, 10, 10]] * 3, GT)
    assert calls == [(1, 3)], "label_anchors must call ops._box_iou (the backend dispatch point)"
    assert labeling.ops is ops


# ---- label_anchors, properties -------------------------------------------------------------

@SETTINGS
@given(boxes_strategy(), boxes_strategy(max_rows=4), st.booleans())
def test_labels_follow_the_rules(anchors, gt, use_image):
    image_shape = (30, 30) if use_image else None
    labels, matched = label_anchors(anchors, gt, image_shape=image_shape)
    assert labels.shape == matched.shape == (len(anchors),)
    assert set(np.unique(labels)) <= {-1, 0, 1}
    if use_image:
        from frcnn_scratch.anchors import anchors_inside
        inside = anchors_inside(anchors, image_shape)
    else:
        inside = np.ones(len(anchors), bool)
    expected = labels_by_rules(anchors, gt, inside)
    np.testing.assert_array_equal(labels, expected, err_msg="labels differ from the loop spec")
    if len(gt):
        np.testing.assert_array_equal(matched, box_iou(anchors, gt).argmax(axis=1))
    else:
        assert (matched == -1).all()


@SETTINGS
@given(boxes_strategy(min_rows=1), boxes_strategy(min_rows=1, max_rows=4))
def test_every_touched_gt_gets_a_positive_anchor(anchors, gt):
    labels, _ = label_anchors(anchors, gt)
    iou = box_iou(anchors, gt)                           # (A, G)
    for j in range(len(gt)):
        if iou[:, j].max() > 0:
            best = np.flatnonzero(iou[:, j] == iou[:, j].max())
            assert (labels[best] == 1).all(), f"gt {j}: best anchors {best} labels {labels[best]}"


# ---- sample_labels -------------------------------------------------------------------------

def test_sample_by_hand():
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 0, -1])
    out = sample_labels(labels, batch_size=4, rng=np.random.default_rng(0))
    assert out.dtype == np.int64
    # at most 4 * 0.5 = 2 positives (of 3), then 4 - 2 = 2 negatives (of 5)
    assert (out == 1).sum() == 2 and (out == 0).sum() == 2
    assert (labels[out == 1] == 1).all() and (labels[out == 0] == 0).all()
    assert out[8] == -1


def test_sample_fills_with_negatives_when_positives_are_few():
    labels = np.array([1] + [0] * 10)
    out = sample_labels(labels, batch_size=6, rng=1)     # 1 positive, then 6 - 1 = 5 negatives
    assert out[0] == 1 and (out == 0).sum() == 5 and (out == -1).sum() == 5


def test_sample_keeps_everything_when_the_batch_is_large():
    labels = np.array([1, 0, -1, 0])
    np.testing.assert_array_equal(sample_labels(labels, batch_size=256, rng=0), labels)
    assert sample_labels(np.zeros(0, np.int64), rng=0).shape == (0,)


def test_sample_seeding():
    labels = np.array([1] * 300 + [0] * 3000 + [-1] * 50)
    a = sample_labels(labels, rng=np.random.default_rng(7))
    b = sample_labels(labels, rng=np.random.default_rng(7))
    c = sample_labels(labels, rng=7)                     # an int seed means default_rng(seed)
    d = sample_labels(labels, rng=np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    assert (a != d).any(), "different seeds picked the same 256 of 3300 anchors"
    assert labels.sum() == 300 - 50, "the input labels were modified"
    # both pools are sampled at random, not taken from the front
    for pool in (np.zeros(3000, np.int64), np.ones(3000, np.int64)):
        first, second = sample_labels(pool, rng=7), sample_labels(pool, rng=8)
        assert (first != second).any(), f"seeds 7 and 8 sampled the same anchors of {pool[:1]}s"
        assert (first[256:] >= 0).any(), "only the first anchors were ever sampled"


@SETTINGS
@given(st.lists(st.sampled_from([-1, 0, 1]), max_size=80), st.integers(0, 40), st.floats(0, 1),
       st.integers(0, 2 ** 31))
def test_sample_sizes(labels, batch_size, fraction, seed):
    labels = np.array(labels, np.int64)
    out = sample_labels(labels, batch_size, fraction, rng=np.random.default_rng(seed))
    P, N = (labels == 1).sum(), (labels == 0).sum()
    want_pos = min(P, int(batch_size * fraction))
    want_neg = min(N, batch_size - want_pos)
    assert (out == 1).sum() == want_pos and (out == 0).sum() == want_neg, (out, labels)
    kept = out >= 0
    np.testing.assert_array_equal(out[kept], labels[kept], err_msg="a sampled label changed")
    np.testing.assert_array_equal(out, sample_labels(labels, batch_size, fraction, rng=seed))


# ---- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize("call, match", [
    (lambda: label_anchors(np.zeros(4), GT), r"anchors: expected shape \(N, 4\)"),
    (lambda: label_anchors([[0, 0, 1, 1]], [[0, 0, np.nan, 1]]), "gt_boxes: contains NaN or Inf"),
    (lambda: label_anchors([[0, 0, 1, 1]], [[5, 0, 1, 1]]), "gt_boxes: box 0 has x2 < x1"),
    (lambda: label_anchors([[0, 0, 1, 1]], GT, pos_iou=1.5), "pos_iou: expected a number in"),
    (lambda: label_anchors([[0, 0, 1, 1]], GT, neg_iou=0.8), "neg_iou: expected at most pos_iou"),
    (lambda: label_anchors([[0, 0, 1, 1]], GT, image_shape=(5,)), r"image_shape: expected \(height"),
    (lambda: sample_labels(np.zeros((2, 2))), r"labels: expected shape \(N,\), got \(2, 2\)"),
    (lambda: sample_labels([0, 2, 1]), r"labels: expected values in \[-1, 1\], got 2 at index 1"),
    (lambda: sample_labels([0, 0.5]), "labels: expected whole numbers"),
    (lambda: sample_labels([0, 1], batch_size=-1), "batch_size: expected a whole number"),
    (lambda: sample_labels([0, 1], positive_fraction=1.5), "positive_fraction: expected a number"),
])
def test_bad_input_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_docstring_examples_run():
    import doctest
    from frcnn_scratch import labeling as module
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0, f"{result.failed} docstring examples failed"
