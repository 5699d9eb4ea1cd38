"""Fast R-CNN head (section 3.2): proposal targets, the head's layers and gradient, its loss,
and the test-time post-processing."""
import numpy as np
import pytest

from frcnn_scratch.roi_head import (FastRCNNHead, fast_rcnn_loss, postprocess_detections,
                                    proposal_targets)

GT = np.array([[10, 10, 30, 30], [40, 40, 60, 80]], np.float32)
GT_LABELS = np.array([2, 3], np.int64)


# ---- proposal targets ------------------------------------------------------------------------------

def test_proposal_targets_by_hand():
    proposals = np.array([[12, 10, 32, 30],     # IoU 18/22 = 0.82 with gt 0: foreground, class 2
                          [70, 0, 90, 20],      # IoU 0: background (bg_lo = 0)
                          [20, 10, 40, 30]],    # IoU 1/3 with gt 0: background
                         np.float32)
    rois, labels, targets, weights = proposal_targets(
        proposals, GT, GT_LABELS, num_classes=3, batch_size=16, fg_fraction=0.5, bg_iou_lo=0.0,
        rng=np.random.default_rng(0))
    # the ground truth boxes join the proposals: 3 foreground (2 gt + 1), 2 background
    assert len(rois) == 5 and labels.dtype == np.int64
    np.testing.assert_array_equal(np.sort(labels[:3]), [2, 2, 3])
    np.testing.assert_array_equal(labels[3:], [0, 0])
    assert targets.shape == weights.shape == (5, 16)
    # the shifted proposal: tx = 10 * (20 - 22) / 20 = -1, the rest 0, in class 2's columns 8..11
    row = int(np.flatnonzero((rois == proposals[0]).all(axis=1))[0])
    np.testing.assert_allclose(targets[row], np.r_[np.zeros(8), [-1, 0, 0, 0], np.zeros(4)], atol=1e-6)
    np.testing.assert_array_equal(weights[row], np.r_[np.zeros(8), np.ones(4), np.zeros(4)])
    assert np.all(weights[3:] == 0) and np.all(targets[3:] == 0)
    # a gt box as its own RoI has zero targets, weight 1 in its class's columns
    for g, lab in zip(GT, GT_LABELS):
        r = int(np.flatnonzero((rois == g).all(axis=1))[0])
        assert np.all(targets[r] == 0) and weights[r, 4 * lab:4 * lab + 4].sum() == 4


def test_proposal_targets_background_window():
    proposals = np.array([[70, 0, 90, 20], [20, 10, 40, 30]], np.float32)   # IoU 0 and 1/3
    rois, labels, _, _ = proposal_targets(proposals, GT, GT_LABELS, 3, batch_size=8,
                                          bg_iou_lo=0.1, rng=np.random.default_rng(0))
    # bg in [0.1, 0.5): the IoU-0 box is not used; fg are the two gt boxes
    assert len(rois) == 3 and (labels == 0).sum() == 1
    np.testing.assert_array_equal(rois[labels == 0], [[20, 10, 40, 30]])


def test_proposal_targets_cap_the_foreground_fraction_and_are_seeded():
    rng = np.random.default_rng(5)
    jitter = rng.uniform(-1, 1, size=(40, 4)).astype(np.float32)
    proposals = np.concatenate([GT[0] + jitter[:20], GT[1] + jitter[20:],
                                rng.uniform(0, 10, size=(30, 2)) @ np.array([[1, 0, 1, 0], [0, 1, 0, 1]])
                                + np.array([100, 100, 110, 110])]).astype(np.float32)
    out_a = proposal_targets(proposals, GT, GT_LABELS, 3, batch_size=16, fg_fraction=0.25,
                             rng=np.random.default_rng(1), bg_iou_lo=0.0)
    out_b = proposal_targets(proposals, GT, GT_LABELS, 3, batch_size=16, fg_fraction=0.25,
                             rng=np.random.default_rng(1), bg_iou_lo=0.0)
    for a, b in zip(out_a, out_b):
        np.testing.assert_array_equal(a, b)
    labels = out_a[1]
    assert len(labels) == 16 and (labels > 0).sum() == 4


def test_proposal_targets_without_ground_truth():
    proposals = np.array([[0, 0, 5, 5], [3, 3, 9, 9]], np.float32)
    rois, labels, targets, weights = proposal_targets(proposals, np.zeros((0, 4)), np.zeros(0), 3,
                                                      bg_iou_lo=0.0, rng=np.random.default_rng(0))
    assert len(rois) == 2 and np.all(labels == 0) and not weights.any()
    rois, labels, targets, weights = proposal_targets(np.zeros((0, 4)), np.zeros((0, 4)), np.zeros(0), 3)
    assert rois.shape == (0, 4) and labels.shape == (0,) and targets.shape == (0, 16)


def test_proposal_targets_check_their_inputs():
    with pytest.raises(ValueError, match="gt_labels"):
        proposal_targets(GT, GT, np.array([1]), 3)
    with pytest.raises(ValueError, match="proposals"):
        proposal_targets(np.array([[5, 5, 1, 1]]), GT, GT_LABELS, 3)


# ---- the head and its loss --------------------------------------------------------------------------

def _head(pooler="align", dtype=np.float32):
    head = FastRCNNHead(in_channels=3, pooled_size=2, hidden=6, num_classes=2, spatial_scale=0.5,
                        pooler=pooler, rng=np.random.default_rng(0))
    for layer in head.layers.values():
        layer.astype(dtype)
    return head


def test_head_shapes_and_init():
    head = _head()
    feats = np.random.default_rng(0).normal(size=(1, 3, 8, 8)).astype(np.float32)
    rois = np.array([[0, 0, 0, 8, 8], [0, 4, 2, 14, 12]], np.float32)
    cls, bbox = head.forward(feats, rois)
    assert cls.shape == (2, 3) and bbox.shape == (2, 12)
    assert abs(head.cls_score.params["weight"].std() - 0.01) < 0.01
    assert abs(head.bbox_pred.params["weight"].std() - 0.001) < 0.001
    g = head.backward(np.ones_like(cls), np.ones_like(bbox))
    assert g.shape == feats.shape


@pytest.mark.parametrize("pooler", ["align", "pool"])
def test_head_gradient_matches_finite_differences(pooler):
    """fc layers in float64, the RoI op float32 (ops works in float32).  Parameters: exact float64
    path, eps = 1e-6, tolerance 1e-8 + 1e-6 |g|.  Features (float32 input): eps = 1e-3, divided
    by the step actually taken in float32; RoI Align's float32 output rounding (~6e-8 relative)
    over 2 eps gives tolerance 2e-5 + 1e-3 |g|.  RoI pool copies a feature (no rounding); an
    eps small enough not to switch a bin's maximum is what its check needs."""
    head = _head(pooler, np.float64)
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(1, 3, 8, 8)).astype(np.float32)
    rois = np.array([[0, 0, 0, 8, 8], [0, 4, 2, 14, 12]], np.float32)
    labels = np.array([1, 0])
    targets = rng.normal(size=(2, 12))
    weights = np.zeros((2, 12))
    weights[0, 4:8] = 1

    def loss(f=feats):
        cls, bbox = head.forward(f, rois)
        return fast_rcnn_loss(cls, bbox, labels, targets, weights)

    out = loss()
    gf = head.backward(out["grad_cls"], out["grad_bbox"])
    gw = head.fc6.grads["weight"].copy()
    w = head.fc6.params["weight"]
    eps = 1e-6
    for idx in [(0, 0), (3, 5), (5, 11)]:
        old = w[idx]
        w[idx] = old + eps
        up = loss()["loss"]
        w[idx] = old - eps
        down = loss()["loss"]
        w[idx] = old
        num = (up - down) / (2 * eps)
        assert abs(num - gw[idx]) <= 1e-8 + 1e-6 * abs(gw[idx]), f"fc6{idx}: {gw[idx]} vs {num}"
    eps = 1e-3
    checked = 0
    chosen = [(0, 0, 1, 1), (0, 2, 3, 4)] + [tuple(i) for i in np.argwhere(gf != 0)[::7][:3]]
    for idx in chosen:
        if pooler == "pool" and gf[idx] == 0:
            continue                                   # not a bin maximum: nothing to compare
        fp, fm = feats.copy(), feats.copy()
        fp[idx] += eps
        fm[idx] -= eps
        step = float(fp[idx]) - float(fm[idx])         # 2 eps, as float32 rounded it
        num = (loss(fp)["loss"] - loss(fm)["loss"]) / step
        assert abs(num - gf[idx]) <= 2e-5 + 1e-3 * abs(gf[idx]), f"features{idx}: {gf[idx]} vs {num}"
        checked += gf[idx] != 0
    assert checked >= 1


def test_fast_rcnn_loss_against_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    cls = rng.normal(size=(4, 3))
    bbox = rng.normal(size=(4, 12))
    labels = np.array([1, 2, 0, 0])
    targets = rng.normal(size=(4, 12))
    weights = np.zeros((4, 12))
    weights[0, 4:8] = weights[1, 8:12] = 1
    out = fast_rcnn_loss(cls, bbox, labels, targets, weights)
    tc = torch.tensor(cls, requires_grad=True)
    tb = torch.tensor(bbox, requires_grad=True)
    ce = torch.nn.functional.cross_entropy(tc, torch.tensor(labels))
    w = torch.tensor(weights)
    reg = (torch.nn.functional.smooth_l1_loss(tb * w, torch.tensor(targets) * w, beta=1.0,
                                              reduction="sum")) / 4
    (ce + reg).backward()
    assert out["loss_cls"] == pytest.approx(ce.item(), rel=1e-9)
    assert out["loss_reg"] == pytest.approx(reg.item(), rel=1e-9)
    np.testing.assert_allclose(out["grad_cls"], tc.grad.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(out["grad_bbox"], tb.grad.numpy(), rtol=1e-9, atol=1e-12)


def test_head_rejects_an_unknown_pooler():
    with pytest.raises(ValueError, match="pooler"):
        FastRCNNHead(3, 2, 4, 2, 0.5, pooler="mean", rng=np.random.default_rng(0))


# ---- post-processing ------------------------------------------------------------------------------

def test_postprocess_by_hand():
    rois = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 40, 40]], np.float32)
    cls = np.array([[0, 8, 0], [0, 6, 0], [0, 0, 9]], np.float32)       # classes 1, 1, 2
    bbox = np.zeros((3, 12), np.float32)
    bbox[2, 8] = 1.0                                       # class 2's tx: +0.1 width = +2 px
    det = postprocess_detections(rois, cls, bbox, image_shape=(50, 50), score_threshold=0.5,
                                 nms_threshold=0.5)
    # roi 1 overlaps roi 0 (IoU 0.82) in the same class: suppressed
    np.testing.assert_array_equal(det["labels"], [2, 1])
    np.testing.assert_allclose(det["boxes"], [[22, 20, 42, 40], [0, 0, 10, 10]], atol=1e-5)
    p = np.exp([9.0, 8.0]) / (np.exp([9.0, 8.0]) + 2)
    np.testing.assert_allclose(det["scores"], p, rtol=1e-6)
    assert det["boxes"].dtype == np.float32 and det["labels"].dtype == np.int64


def test_postprocess_keeps_overlaps_of_different_classes_and_caps_the_count():
    rois = np.array([[0, 0, 10, 10]] * 2, np.float32)
    cls = np.array([[0, 5, 4], [0, 4, 5]], np.float32)
    det = postprocess_detections(rois, cls, np.zeros((2, 12), np.float32), (20, 20),
                                 score_threshold=0.1, nms_threshold=0.5)
    assert sorted(det["labels"].tolist()) == [1, 2]
    det = postprocess_detections(rois, cls, np.zeros((2, 12), np.float32), (20, 20),
                                 score_threshold=0.1, nms_threshold=0.5, max_detections=1)
    assert len(det["boxes"]) == 1


def test_postprocess_of_nothing():
    det = postprocess_detections(np.zeros((0, 4), np.float32), np.zeros((0, 3), np.float32),
                                 np.zeros((0, 12), np.float32), (20, 20))
    assert det["boxes"].shape == (0, 4) and det["scores"].shape == (0,) and det["labels"].shape == (0,)


def test_proposal_targets_accept_an_int_seed_like_a_generator():
    proposals = np.concatenate([GT + 1, GT - 1, GT + 30]).astype(np.float32)
    by_int = proposal_targets(proposals, GT, GT_LABELS, 3, batch_size=4, rng=7)
    by_gen = proposal_targets(proposals, GT, GT_LABELS, 3, batch_size=4, rng=np.random.default_rng(7))
    for a, b in zip(by_int, by_gen):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("labels, match", [
    ([1.5, 2], "gt_labels: expected whole numbers"),
    (["a", "b"], "gt_labels: expected whole numbers"),
    ([0, 2], r"gt_labels: expected values in \[1, 3\]"),
    ([2, 4], r"gt_labels: expected values in \[1, 3\]"),
])
def test_proposal_targets_check_the_label_values(labels, match):
    with pytest.raises(ValueError, match=match):
        proposal_targets(GT, GT, labels, 3, rng=0)


@pytest.mark.parametrize("rois, cls, bbox, match", [
    (np.zeros((2, 4)), np.zeros((2, 3)), np.zeros((2, 8)), r"bbox_deltas: expected shape \(2, 12\)"),
    (np.zeros((2, 4)), np.zeros((2, 3)), np.zeros((3, 12)), r"bbox_deltas: expected shape \(2, 12\)"),
    (np.zeros((2, 4)), np.zeros((2, 3)), np.zeros(24), r"bbox_deltas: expected shape"),
    (np.zeros((2, 4)), np.zeros((3, 3)), np.zeros((3, 12)), r"cls_logits: expected shape \(2, C\+1\)"),
    (np.zeros((2, 4)), np.zeros(6), np.zeros((2, 12)), r"cls_logits: expected shape"),
    (np.zeros((2, 5)), np.zeros((2, 3)), np.zeros((2, 12)), r"rois: expected shape"),
])
def test_postprocess_names_a_wrongly_shaped_argument(rois, cls, bbox, match):
    with pytest.raises(ValueError, match=match):
        postprocess_detections(rois, cls, bbox, (20, 20))


@pytest.mark.parametrize("kwargs, match", [
    (dict(fg_iou=0), r"fg_iou: expected a number in \(0, 1\]"),
    (dict(fg_iou=1.5), r"fg_iou: expected a number in \[0, 1\]"),
    (dict(bg_iou_lo=-0.1), r"bg_iou_lo: expected a number in \[0, 1\]"),
    (dict(fg_fraction="x"), r"fg_fraction: expected a number in \[0, 1\]"),
    (dict(batch_size=2.5), "batch_size: expected a whole number"),
    (dict(weights=(10, 10, 5)), "weights: expected four positive numbers"),
])
def test_proposal_targets_check_their_settings_at_the_door(kwargs, match):
    with pytest.raises(ValueError, match=match):
        proposal_targets(GT, GT, GT_LABELS, 3, rng=0, **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(score_threshold=np.nan), "score_threshold: expected a finite number"),
    (dict(nms_threshold=-0.5), r"nms_threshold: expected a number in \[0, 1\]"),
    (dict(max_detections=-1), "max_detections: expected a whole number"),
    (dict(weights=(10, 10, 5, np.inf)), "weights: expected four positive numbers"),
    (dict(image_shape=(-1, 5)), "image_shape: expected non-negative finite"),
])
def test_postprocess_checks_its_settings_at_the_door(kwargs, match):
    args = dict(rois=np.zeros((2, 4)), cls_logits=np.zeros((2, 3)), bbox_deltas=np.zeros((2, 12)),
                image_shape=(20, 20))
    with pytest.raises(ValueError, match=match):
        postprocess_detections(**{**args, **kwargs})


@pytest.mark.parametrize("shapes, match", [
    (((2, 3), (2, 8), (2, 12), (2, 12)), r"bbox_deltas: expected shape \(2, 12\)"),
    (((2, 3), (2, 12), (2, 8), (2, 12)), r"bbox_targets: expected shape \(2, 12\)"),
    (((2, 3), (2, 12), (2, 12), (3, 12)), r"bbox_weights: expected shape \(2, 12\)"),
    (((2, 0), (2, 0), (2, 0), (2, 0)), "cls_logits: expected at least one class column"),
])
def test_fast_rcnn_loss_names_a_wrongly_shaped_argument(shapes, match):
    cls, bbox, targets, weights = (np.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        fast_rcnn_loss(cls, bbox, [1, 0], targets, weights)


def test_fast_rcnn_loss_checks_labels_and_weights():
    cls, bbox = np.zeros((2, 3)), np.zeros((2, 12))
    with pytest.raises(ValueError, match=r"labels: expected values in \[-1, 2\], got 3"):
        fast_rcnn_loss(cls, bbox, [3, 0], bbox, bbox)
    with pytest.raises(ValueError, match="bbox_weights: expected non-negative values"):
        fast_rcnn_loss(cls, bbox, [1, 0], bbox, -np.ones((2, 12)))
    with pytest.raises(ValueError, match="cls_logits: contains NaN or Inf"):
        fast_rcnn_loss(np.full((2, 3), np.nan), bbox, [1, 0], bbox, bbox)
