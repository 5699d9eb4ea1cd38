"""RPN (section 3.1): head layout and gradient, anchor targets, the proposal layer."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from frcnn_scratch.anchors import shift_anchors
from frcnn_scratch.box_coding import encode
from frcnn_scratch import ops
from frcnn_scratch.box_coding import decode
from frcnn_scratch.boxes import clip_boxes, remove_small_boxes
from frcnn_scratch.losses import sigmoid
from frcnn_scratch.rpn import RPNHead, anchor_targets, generate_proposals, top_n


# ---- the head ------------------------------------------------------------------------------------

def test_head_outputs_follow_the_anchor_order():
    """Row (y * W + x) * k + a of the outputs is anchor a at cell (y, x): the cls conv's channel a
    and the reg conv's channels 4a..4a+3 at that cell."""
    rng = np.random.default_rng(0)
    head = RPNHead(in_channels=3, mid_channels=5, num_anchors=2, rng=rng)
    feats = rng.normal(size=(1, 3, 4, 6)).astype(np.float32)
    logits, deltas = head.forward(feats)
    assert logits.shape == (1, 4 * 6 * 2) and deltas.shape == (1, 4 * 6 * 2, 4)
    hidden = np.maximum(head.conv.forward(feats), 0)
    cls, reg = head.cls.forward(hidden), head.reg.forward(hidden)   # (1, 2, 4, 6), (1, 8, 4, 6)
    for y, x, a in [(0, 0, 0), (0, 0, 1), (2, 5, 1), (3, 1, 0)]:
        i = (y * 6 + x) * 2 + a
        assert logits[0, i] == cls[0, a, y, x]
        np.testing.assert_array_equal(deltas[0, i], reg[0, 4 * a:4 * a + 4, y, x])


def test_head_init_std_is_small_for_cls_and_reg():
    head = RPNHead(16, 32, 9, np.random.default_rng(0))
    for layer in (head.cls, head.reg):
        assert abs(layer.params["weight"].std() - 0.01) < 0.002
        assert np.all(layer.params["bias"] == 0)


def test_head_backward_matches_finite_differences_float64():
    """Loss = sum(logits * A) + sum(deltas * B); float64, central differences, eps = 1e-6,
    tolerance 1e-7 + 1e-6 |grad| (float64 rounding of sums of ~100 terms)."""
    rng = np.random.default_rng(1)
    head = RPNHead(2, 3, 2, rng)
    for layer in head.layers.values():
        layer.astype(np.float64)
    x = rng.normal(size=(1, 2, 3, 4))
    a, b = rng.normal(size=(1, 24)), rng.normal(size=(1, 24, 4))

    def loss(x):
        lg, dl = head.forward(x)
        return float((lg * a).sum() + (dl * b).sum())

    loss(x)
    gx = head.backward(a, b)
    grads = {k: v.copy() for k, v in head.conv.grads.items()}
    eps = 1e-6
    for idx in [(0, 0, 0, 0), (0, 1, 2, 3), (0, 0, 1, 2)]:
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        num = (loss(xp) - loss(xm)) / (2 * eps)
        assert abs(num - gx[idx]) <= 1e-7 + 1e-6 * abs(gx[idx]), f"dx{idx}: {gx[idx]} vs {num}"
    w = head.conv.params["weight"]
    for idx in [(0, 0, 0, 0), (2, 1, 1, 2)]:
        old = w[idx]
        w[idx] = old + eps
        up = loss(x)
        w[idx] = old - eps
        down = loss(x)
        w[idx] = old
        num = (up - down) / (2 * eps)
        g = grads["weight"][idx]
        assert abs(num - g) <= 1e-7 + 1e-6 * abs(g), f"dW{idx}: {g} vs {num}"


# ---- anchor targets (3.1.2) ------------------------------------------------------------------------

ANCHORS = np.array([[0, 0, 16, 16],      # the ground truth itself: positive, t* = 0
                    [16, 0, 32, 16],     # IoU 0 with it: negative
                    [2, 0, 18, 16],      # IoU 14/18 = 0.78: positive
                    [8, 0, 24, 16],      # IoU 1/3: ignored (between 0.3 and 0.7)
                    [-8, 0, 8, 16]],     # crosses the border: ignored
                   dtype=np.float32)
GT = np.array([[0, 0, 16, 16]], dtype=np.float32)


def test_anchor_targets_by_hand():
    labels, targets = anchor_targets(ANCHORS, GT, image_shape=(32, 32), batch_size=256,
                                     rng=np.random.default_rng(0))
    np.testing.assert_array_equal(labels, [1, 0, 1, -1, -1])
    assert labels.dtype == np.int64 and targets.dtype == np.float32
    np.testing.assert_allclose(targets[0], 0, atol=1e-7)
    np.testing.assert_allclose(targets[2], encode(GT, ANCHORS[2:3])[0], rtol=1e-6)
    np.testing.assert_allclose(targets[2], [-2 / 16, 0, 0, 0], atol=1e-6)
    assert np.all(targets[[1, 3, 4]] == 0)


def test_anchor_targets_without_ground_truth_are_all_negative():
    labels, targets = anchor_targets(ANCHORS, np.zeros((0, 4)), (32, 32), rng=np.random.default_rng(0))
    np.testing.assert_array_equal(labels, [0, 0, 0, 0, -1])
    assert targets.shape == (5, 4) and np.all(targets == 0)


def test_anchor_targets_sample_the_batch_and_are_seeded():
    anchors = shift_anchors(np.array([[0, 0, 8, 8], [-4, -4, 12, 12]], np.float32), 8, 8, 8)
    gt = np.array([[4, 4, 20, 20], [30, 30, 60, 50]], np.float32)
    a = anchor_targets(anchors, gt, (64, 64), batch_size=16, positive_fraction=0.25,
                       rng=np.random.default_rng(3))
    b = anchor_targets(anchors, gt, (64, 64), batch_size=16, positive_fraction=0.25,
                       rng=np.random.default_rng(3))
    np.testing.assert_array_equal(a[0], b[0])
    assert (a[0] >= 0).sum() == 16 and 1 <= (a[0] == 1).sum() <= 4


# ---- the proposal layer ----------------------------------------------------------------------------

def test_proposals_by_hand_decode_clip_small_nms_topn():
    anchors = np.array([[0, 0, 10, 10],       # score 0.9, kept first
                        [1, 0, 11, 10],       # IoU 0.82 with the first: suppressed
                        [20, 20, 30, 30],     # kept second
                        [40, 40, 41, 41],     # 1 px: dropped as small
                        [35, 35, 55, 55]],    # clipped to 35..40
                       dtype=np.float32)
    logits = np.array([2.0, 1.0, 0.5, 5.0, 0.0], np.float32)
    deltas = np.zeros((5, 4), np.float32)
    boxes, scores = generate_proposals(anchors, logits, deltas, (40, 40), pre_nms_top_n=10,
                                       post_nms_top_n=10, nms_threshold=0.7, min_size=2)
    np.testing.assert_allclose(boxes, [[0, 0, 10, 10], [20, 20, 30, 30], [35, 35, 40, 40]])
    np.testing.assert_allclose(scores, 1 / (1 + np.exp(-np.array([2.0, 0.5, 0.0]))), rtol=1e-6)
    # top-N before NMS keeps the best 2 (anchors 0 and 1); NMS leaves 1
    boxes, _ = generate_proposals(anchors, logits, deltas, (40, 40), 2, 10, 0.7, 2)
    np.testing.assert_allclose(boxes, [[0, 0, 10, 10]])
    # top-N after NMS
    boxes, _ = generate_proposals(anchors, logits, deltas, (40, 40), 10, 2, 0.7, 2)
    assert len(boxes) == 2


def proposals_in_the_papers_order(anchors, logits, deltas, image_shape, pre, post, thr, min_size):
    """The plain proposal layer: decode every anchor, clip, drop small, top-N, NMS, top-N."""
    boxes = clip_boxes(decode(deltas, anchors), image_shape)
    keep = remove_small_boxes(boxes, min_size)
    boxes, logits = boxes[keep], logits[keep]
    order = top_n(logits, pre)
    boxes, logits = boxes[order], logits[order]
    keep = ops.nms(boxes, logits, thr)[:post]
    return boxes[keep], sigmoid(logits[keep])


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 400), st.integers(0, 300), st.integers(0, 60), st.floats(0, 40),
       st.integers(0, 2 ** 32 - 1))
def test_proposals_equal_decoding_every_anchor(num_anchors, pre, post, min_size, seed):
    """generate_proposals decodes only the best-ranked anchors (more when the size test drops
    many): its boxes and scores equal the paper's order, decode all -> clip -> drop small -> top-N
    -> NMS, bit for bit.  Tied logits, tiny and huge boxes, t past the clamp, min sizes that drop
    most boxes."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(-20, 120, (num_anchors, 2))
    wh = rng.choice([0.5, 3.0, 12.0, 40.0, 300.0], (num_anchors, 2))
    wh *= rng.uniform(0.5, 1.5, (num_anchors, 2))
    anchors = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    logits = np.round(rng.normal(0, 2, num_anchors), 1).astype(np.float32)      # many ties
    deltas = rng.normal(0, 1.5, (num_anchors, 4)).astype(np.float32)
    deltas[rng.random(num_anchors) < 0.1, 2:] = 20.0                         # past the clamp
    got = generate_proposals(anchors, logits, deltas, (100, 150), pre, post, 0.7, min_size)
    want = proposals_in_the_papers_order(anchors, logits, deltas, (100, 150), pre, post, 0.7,
                                         min_size)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1].astype(np.float32))


def test_proposals_apply_the_deltas():
    anchors = np.array([[0, 0, 10, 10]], np.float32)
    deltas = np.array([[0.1, 0.0, np.log(2), 0.0]], np.float32)   # centre +1 px, width x2
    boxes, _ = generate_proposals(anchors, np.zeros(1), deltas, (50, 50), 10, 10)
    # decoded (-4, 0, 16, 10), then clipped to the image: x1 = 0
    np.testing.assert_allclose(boxes, [[0, 0, 16, 10]], atol=1e-5)


def test_proposals_of_nothing_are_empty():
    boxes, scores = generate_proposals(np.zeros((0, 4), np.float32), np.zeros(0), np.zeros((0, 4)),
                                       (10, 10), 5, 5)
    assert boxes.shape == (0, 4) and scores.shape == (0,)
    assert boxes.dtype == np.float32 and scores.dtype == np.float32


def test_proposal_scores_do_not_overflow_for_very_negative_logits():
    anchors = np.array([[0, 0, 10, 10]], np.float32)
    with np.errstate(over="raise"):
        _, scores = generate_proposals(anchors, np.array([-1000.0]), np.zeros((1, 4)), (20, 20), 5, 5)
    assert scores[0] == 0.0


def test_anchor_targets_reject_bad_boxes():
    with pytest.raises(ValueError, match="gt_boxes"):
        anchor_targets(ANCHORS, np.array([[5, 5, 1, 1]]), (32, 32))


def test_proposals_check_that_rows_match_the_anchors():
    anchors = np.array([[0, 0, 10, 10], [5, 5, 9, 9]], np.float32)
    with pytest.raises(ValueError, match="one row per anchor"):
        generate_proposals(anchors, np.zeros(3), np.zeros((2, 4)), (20, 20), 5, 5)
    with pytest.raises(ValueError, match="deltas"):
        generate_proposals(anchors, np.zeros(2), np.zeros((2, 3)), (20, 20), 5, 5)


@pytest.mark.parametrize("pre, post, match", [
    (-1, 5, "pre_nms_top_n: expected a whole number >= 0"),
    (2.5, 5, "pre_nms_top_n: expected a whole number >= 0"),
    ("a", 5, "pre_nms_top_n: expected a whole number >= 0"),
    (5, None, "post_nms_top_n: expected a whole number >= 0"),
    (5, -3, "post_nms_top_n: expected a whole number >= 0"),
])
def test_proposals_check_the_top_n_counts(pre, post, match):
    anchors = np.array([[0, 0, 10, 10]], np.float32)
    with pytest.raises(ValueError, match=match):
        generate_proposals(anchors, np.zeros(1), np.zeros((1, 4)), (20, 20), pre, post)


def test_proposals_with_zero_top_n_are_empty():
    anchors = np.array([[0, 0, 10, 10]], np.float32)
    for pre, post in ((0, 5), (5, 0)):
        boxes, scores = generate_proposals(anchors, np.zeros(1), np.zeros((1, 4)), (20, 20), pre, post)
        assert boxes.shape == (0, 4) and scores.shape == (0,)


def test_docstring_states_the_strict_positive_rule_the_code_uses():
    """rpn.py's summary of 3.1.2 must match label_anchors' default (IoU strictly above 0.7)."""
    from frcnn_scratch import rpn
    from frcnn_scratch.labeling import label_anchors
    assert "IoU > 0.7" in rpn.__doc__ and "IoU >= 0.7" not in rpn.__doc__
    gt = np.array([[0, 0, 10, 10]], np.float32)
    anchors = np.array([[0, 0, 10, 10], [0, 0, 7, 10]], np.float32)   # IoU 1 (best) and exactly 0.7
    labels, _ = label_anchors(anchors, gt)
    assert labels.tolist() == [1, -1]                  # 0.7 is not above 0.7: ignored, not positive


@pytest.mark.parametrize("kwargs, match", [
    (dict(nms_threshold=1.5), r"nms_threshold: expected a number in \[0, 1\]"),
    (dict(nms_threshold="a"), r"nms_threshold: expected a number in \[0, 1\]"),
    (dict(min_size=-1), "min_size: expected a finite number >= 0"),
    (dict(min_size=None), "min_size: expected a finite number >= 0"),
    (dict(image_shape=(20,)), r"image_shape: expected \(height, width\)"),
])
def test_proposals_check_their_settings_at_the_door(kwargs, match):
    """generate_proposals checks every input once, before any work (the NMS inside trusts them)."""
    args = dict(anchors=np.array([[0, 0, 10, 10]], np.float32), logits=np.zeros(1),
                deltas=np.zeros((1, 4)), image_shape=(20, 20), pre_nms_top_n=5, post_nms_top_n=5)
    with pytest.raises(ValueError, match=match):
        generate_proposals(**{**args, **kwargs})


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=-1), "batch_size: expected a whole number"),
    (dict(positive_fraction=2), r"positive_fraction: expected a number in \[0, 1\]"),
    (dict(pos_iou=0.2, neg_iou=0.3), "neg_iou: expected at most pos_iou"),
    (dict(image_shape=(np.nan, 3)), "image_shape: expected non-negative finite"),
])
def test_anchor_targets_check_their_settings_at_the_door(kwargs, match):
    with pytest.raises(ValueError, match=match):
        anchor_targets(**{**dict(anchors=ANCHORS, gt_boxes=ANCHORS[:1], image_shape=(32, 32), rng=0),
                          **kwargs})


def test_anchor_targets_without_an_image_shape_use_every_anchor():
    """image_shape=None: no anchor crosses a border, so the last anchor (x from -8) may match."""
    labels, targets = anchor_targets(ANCHORS, ANCHORS[4:], None, batch_size=len(ANCHORS), rng=0)
    assert labels[4] == 1 and np.array_equal(targets[4], np.zeros(4, np.float32))
    labels, _ = anchor_targets(ANCHORS, ANCHORS[4:], (32, 32), batch_size=len(ANCHORS), rng=0)
    assert labels[4] == -1
