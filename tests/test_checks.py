"""frcnn_scratch/_checks.py: every helper turns bad input into one ValueError that names the argument;
and every public function checks each array once, at its door."""
import collections
import sys
import threading

import numpy as np
import pytest

from fixtures.detector_tiny import tiny_config, tiny_sample
from frcnn_scratch import _checks, box_coding, boxes, labeling, losses, nms, ops, roi_head, rpn
from frcnn_scratch.model import FasterRCNN


@pytest.mark.parametrize("call", [
    lambda v: _checks.positive_number(v, "spatial_scale"),
    lambda v: _checks.finite_number(v, "spatial_scale"),
    lambda v: _checks.unit_interval(v, "spatial_scale"),
    lambda v: _checks.sampling_ratio(v, "spatial_scale"),
    lambda v: _checks.as_shape4(v, "spatial_scale"),
    lambda v: _checks.whole_number(v, "spatial_scale"),
])
@pytest.mark.parametrize("value", ["a", None, [1.0, 2.0], "abcd"])
def test_conversion_errors_name_the_argument(call, value):
    with pytest.raises(ValueError, match="spatial_scale: expected"):
        call(value)


def test_number_helpers_hand_cases():
    assert _checks.positive_number("2.5", "x") == 2.5
    assert _checks.finite_number(-3, "x") == -3.0
    assert _checks.finite_number(0, "x", minimum=0) == 0.0
    with pytest.raises(ValueError, match=r"x: expected a non-negative finite number, got -1.0"):
        _checks.finite_number(-1, "x", minimum=0)
    with pytest.raises(ValueError, match="x: expected a non-negative finite number, got nan"):
        _checks.finite_number(float("nan"), "x", minimum=0)
    with pytest.raises(ValueError, match=r"x: expected a finite number >= 2, got 1.0"):
        _checks.finite_number(1, "x", minimum=2)
    assert _checks.sampling_ratio(-1) == -1 and _checks.sampling_ratio(2.0) == 2
    with pytest.raises(ValueError, match="sampling_ratio: expected an int"):
        _checks.sampling_ratio(1.5)
    assert _checks.as_shape4([1, 2, 3, 4]) == (1, 2, 3, 4)


def test_as_labels_hand_cases():
    out = _checks.as_labels([1, 2.0, 4], "gt_labels", 1, 4)
    assert out.dtype == np.int64 and out.tolist() == [1, 2, 4]
    assert _checks.as_labels([], "gt_labels", 1, 4).dtype == np.int64
    assert _checks.as_labels([-1, 0, 1], "labels", 0, 1, allow=(-1,)).tolist() == [-1, 0, 1]
    assert _checks.as_labels([7], "labels", 1, None).tolist() == [7]


@pytest.mark.parametrize("labels, kwargs, message", [
    ([1.5], {}, r"gt_labels: expected whole numbers"),
    (["a"], {}, r"gt_labels: expected whole numbers"),
    (["1"], {}, r"gt_labels: expected whole numbers"),
    ([np.nan], {}, r"gt_labels: contains NaN or Inf"),
    ([0], {}, r"gt_labels: expected values in \[1, 4\], got 0 at index 0"),
    ([1, 5], {}, r"gt_labels: expected values in \[1, 4\], got 5 at index 1"),
    ([[1]], {}, r"gt_labels: expected shape \(N,\), got \(1, 1\)"),
    ([1, 2], {"size": 3}, r"gt_labels: expected shape \(3,\), got \(2,\)"),
    ([-2], {"allow": (-1,)}, r"gt_labels: expected values in \[1, 4\] \(or -1\), got -2"),
])
def test_as_labels_rejects(labels, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _checks.as_labels(labels, "gt_labels", 1, 4, **kwargs)


def test_as_labels_without_upper_end():
    with pytest.raises(ValueError, match=r"labels: expected values >= 1, got 0 at index 1"):
        _checks.as_labels([3, 0], "labels", 1, None)


# ---- validate once, at the door ----------------------------------------------------------------
# Each public function checks its arrays once and hands them to an unchecked core; stages that
# call other stages call the cores.  These tests count the helpers that read every value of an
# array (_checks.ARRAY_CHECKS) wherever frcnn_scratch holds them (`from ._checks import as_boxes`
# makes a module-level name of its own); a check that calls another one counts once.


@pytest.fixture
def array_checks(monkeypatch):
    """A Counter name -> calls of the array-scanning checks, outermost calls only (threads too)."""
    counts = collections.Counter()
    lock, local = threading.Lock(), threading.local()
    originals = {name: getattr(_checks, name) for name in _checks.ARRAY_CHECKS}

    def counted(name, fn):
        def check(*args, **kwargs):
            depth = getattr(local, "depth", 0)
            if depth == 0:
                with lock:
                    counts[name] += 1
            local.depth = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                local.depth = depth
        return check

    wrapped = {name: counted(name, fn) for name, fn in originals.items()}
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("frcnn_scratch"):
            for name, fn in originals.items():
                if getattr(module, name, None) is fn:
                    monkeypatch.setattr(module, name, wrapped[name])
    return counts


@pytest.mark.parametrize("name, args", [
    ("as_float_array", ([1.0, np.nan], "x")),
    ("as_float_values", (np.array([1.0, np.nan]), "x", 1)),
    ("as_boxes", ([[0, 0, 1, np.nan]], "x")),
    ("as_rois", ([[0, 0, 0, 1, np.nan]], "x")),
    ("as_features", (np.full((1, 1, 2, 2), np.nan), "x")),
    ("as_labels", ([1.0, np.nan], "x", 0, 1)),
])
def test_the_array_checks_read_every_value(name, args):
    """ARRAY_CHECKS names exactly the helpers that read every value (the ones counted below)."""
    assert name in _checks.ARRAY_CHECKS
    with pytest.raises(ValueError, match="x: contains NaN or Inf"):
        getattr(_checks, name)(*args)


def test_array_checks_are_all_listed_above():
    assert len(_checks.ARRAY_CHECKS) == 6


BOX = np.array([[0, 0, 10, 10], [5, 5, 20, 20], [30, 30, 40, 44]], np.float32)
FEATURES = np.arange(2 * 3 * 6 * 7, dtype=np.float32).reshape(2, 3, 6, 7)
ROIS = np.array([[0, 0, 0, 20, 16], [1, 4, 4, 12, 24]], np.float32)
ANCHORS = np.concatenate([BOX, BOX + 2, BOX + 7]).astype(np.float32)
LOGITS = np.linspace(-2, 2, len(ANCHORS)).astype(np.float32)
DELTAS = np.zeros((len(ANCHORS), 4), np.float32)
GT = np.array([[1, 1, 11, 12], [29, 30, 40, 45]], np.float32)


def _rpn_loss():
    labels = np.array([1, 0, -1] * 3)
    return losses.rpn_loss(LOGITS, DELTAS, labels, DELTAS)


def _fast_rcnn_loss():
    cls, bbox = np.zeros((3, 3), np.float32), np.zeros((3, 12), np.float32)
    return roi_head.fast_rcnn_loss(cls, bbox, [1, 0, -1], bbox, np.ones((3, 12), np.float32))


# (call, how many arrays it takes): each is checked once, no more
ONE_CHECK_PER_ARRAY = [
    ("ops.box_iou", lambda: ops.box_iou(BOX, BOX), 2),
    ("ops.nms", lambda: ops.nms(BOX, [0.9, 0.8, 0.7], 0.5), 2),
    ("ops.batched_nms", lambda: ops.batched_nms(BOX, [0.9, 0.8, 0.7], [1, 1, 2], 0.5), 3),
    ("ops.roi_pool", lambda: ops.roi_pool(FEATURES, ROIS, 2, 0.25), 2),
    ("ops.roi_pool_backward", lambda: ops.roi_pool_backward(
        np.ones((2, 3, 2, 2), np.float32), np.zeros((2, 3, 2, 2), np.int64), FEATURES.shape), 1),
    ("ops.roi_align", lambda: ops.roi_align(FEATURES, ROIS, 2, 0.25, 2), 2),
    ("ops.roi_align_backward", lambda: ops.roi_align_backward(
        np.ones((2, 3, 2, 2), np.float32), ROIS, FEATURES.shape, 2, 0.25, 2), 2),
    ("boxes.box_iou", lambda: boxes.box_iou(BOX, BOX), 2),
    ("boxes.clip_boxes", lambda: boxes.clip_boxes(BOX, (20, 20)), 1),
    ("boxes.remove_small_boxes", lambda: boxes.remove_small_boxes(BOX, 2), 1),
    ("box_coding.encode", lambda: box_coding.encode(BOX, BOX + 1), 2),
    ("box_coding.decode", lambda: box_coding.decode(DELTAS[:3], BOX, (10, 10, 5, 5)), 2),
    ("nms.nms", lambda: nms.nms(BOX, [0.9, 0.8, 0.7], 0.5), 2),
    ("nms.batched_nms", lambda: nms.batched_nms(BOX, [0.9, 0.8, 0.7], [1, 1, 2], 0.5), 3),
    ("labeling.label_anchors", lambda: labeling.label_anchors(ANCHORS, GT, (50, 50)), 2),
    ("labeling.sample_labels", lambda: labeling.sample_labels([1, 0, -1], 2, rng=0), 1),
    ("rpn.anchor_targets", lambda: rpn.anchor_targets(ANCHORS, GT, (50, 50), rng=0), 2),
    ("rpn.generate_proposals", lambda: rpn.generate_proposals(
        ANCHORS, LOGITS, DELTAS, (50, 50), 6, 3, 0.7, 1.0), 3),
    ("roi_head.proposal_targets", lambda: roi_head.proposal_targets(
        ANCHORS, GT, [1, 2], 2, batch_size=8, rng=0), 3),
    ("roi_head.postprocess_detections", lambda: roi_head.postprocess_detections(
        BOX, np.zeros((3, 3), np.float32), np.zeros((3, 12), np.float32), (50, 50), 0.0), 3),
    ("losses.binary_log_loss", lambda: losses.binary_log_loss(LOGITS, [1, 0, -1] * 3), 2),
    ("losses.softmax_cross_entropy", lambda: losses.softmax_cross_entropy(
        np.zeros((2, 3)), [0, 2]), 2),
    ("losses.smooth_l1", lambda: losses.smooth_l1(DELTAS, DELTAS, 3.0, np.ones(len(DELTAS))), 3),
    ("losses.rpn_loss", _rpn_loss, 4),
    ("roi_head.fast_rcnn_loss", _fast_rcnn_loss, 5),
]


@pytest.mark.parametrize("name, call, arrays", ONE_CHECK_PER_ARRAY,
                         ids=[c[0] for c in ONE_CHECK_PER_ARRAY])
def test_a_public_function_checks_each_array_once(array_checks, name, call, arrays):
    call()
    got = sum(array_checks.values())
    assert got == arrays, f"{name}: {got} array checks for {arrays} arrays: {dict(array_checks)}"


@pytest.mark.parametrize("name, call, arrays", [c for c in ONE_CHECK_PER_ARRAY
                                                if c[0].startswith("ops.")],
                         ids=[c[0] for c in ONE_CHECK_PER_ARRAY if c[0].startswith("ops.")])
def test_the_triton_bridge_checks_nothing_again(array_checks, name, call, arrays):
    pytest.importorskip("triton")
    with ops.use_backend("triton"):
        call()
    assert sum(array_checks.values()) == arrays, dict(array_checks)


# Measured with the pre-restructuring code (each op checked by ops, again by the reference, stage
# functions re-checking what the stage before them checked): 58 in a training step, 35 in a
# prediction.  Now: the model's own door (gt boxes and labels), then each public stage function
# once per array: anchor_targets 2, rpn_loss 4, generate_proposals 3, proposal_targets 3,
# roi_align 2, fast_rcnn_loss 5, roi_align_backward 2; a prediction: generate_proposals 3,
# roi_align 2, postprocess_detections 3.
STEP_CHECKS, PREDICT_CHECKS = 23, 8


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "textbook"])
def test_a_training_step_and_a_prediction_check_each_array_once(array_checks, fast):
    model = FasterRCNN(tiny_config(), fast=fast)
    sample = tiny_sample(seed=0)
    model.loss_and_grads(sample["image"], sample["boxes"], sample["labels"], rng=0)  # anchors made
    array_checks.clear()
    model.loss_and_grads(sample["image"], sample["boxes"], sample["labels"], rng=1)
    step = sum(array_checks.values())
    assert step <= STEP_CHECKS, f"a training step made {step} array checks: {dict(array_checks)}"
    array_checks.clear()
    model.predict(sample["image"])
    predict = sum(array_checks.values())
    assert predict <= PREDICT_CHECKS, f"a prediction made {predict} array checks: {dict(array_checks)}"
