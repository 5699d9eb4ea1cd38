"""FasterRCNN: the whole model's gradient against finite differences, overfitting one image,
predict, save / load, config checks, and numpy vs triton on one training step."""
import json
import os

import numpy as np
import pytest

from fixtures.detector_tiny import jittered_proposals, tiny_config, tiny_sample
from frcnn_scratch.checkpoint import model_arrays
from frcnn_scratch.config import Config
from frcnn_scratch.model import FasterRCNN
from frcnn_scratch.nn import SGD
from frcnn_scratch.fast.threads import blas_threads


# ---- the gradient of the whole model -------------------------------------------------------------

def _loss_fn(model, sample, proposals, seed=7):
    """The training loss as a deterministic function of the weights: fixed sampling rng and fixed
    proposals (with the RPN's own proposals the loss jumps when a weight moves a proposal across
    an NMS / top-N decision, and approximate joint training ignores that path on purpose)."""
    def loss():
        return model.loss_and_grads(sample["image"], sample["boxes"], sample["labels"],
                                    np.random.default_rng(seed), proposals=proposals)["loss"]
    return loss


# (parameter, how many entries) across every stage: backbone first and last conv, RPN conv/cls/reg,
# head fc6 (behind RoI Align), fc7, cls_score, bbox_pred.
CHECKED = [("backbone.0.weight", 3), ("backbone.0.bias", 2), ("backbone.6.weight", 3),
           ("rpn.conv.weight", 3), ("rpn.cls.weight", 2), ("rpn.reg.weight", 3), ("rpn.reg.bias", 2),
           ("head.fc6.weight", 3), ("head.fc7.bias", 2), ("head.cls_score.weight", 3),
           ("head.bbox_pred.weight", 3)]


@pytest.mark.parametrize("fast", [True, False])
def test_whole_model_gradient_matches_central_differences_float64(fast):
    """Layers in float64 (model.astype); central differences with eps = 1e-4.

    RPN and head parameters: every operation on their path is float64, so the tolerance is tight,
    |numeric - analytic| <= 1e-8 + 1e-5 |analytic|.  Backbone parameters also reach the loss
    through RoI Align, an ops call that computes in float32: the pooled features carry float32
    rounding, which puts ~1e-9 of noise in the loss and so up to ~1e-5 in a difference quotient
    (1e-9 / 2e-4, seen up to 7e-6 here).  Their tolerance is 3e-5 + 1e-3 |analytic|, still
    below 5% of the checked gradients (~1e-3).  At least one checked entry per parameter is
    non-zero, so the check cannot pass vacuously."""
    model = FasterRCNN(tiny_config(seed=3), fast=fast).astype(np.float64)
    sample = tiny_sample(seed=1)
    proposals = jittered_proposals(sample["boxes"], 32)
    loss = _loss_fn(model, sample, proposals)
    loss()
    analytic = {k: v.copy() for k, v in model.grads().items()}
    params = model.params()
    assert set(analytic) == set(params)
    rng = np.random.default_rng(0)
    eps = 1e-4
    for name, count in CHECKED:
        atol, rtol = (3e-5, 1e-3) if name.startswith("backbone") else (1e-8, 1e-5)
        p, g = params[name].reshape(-1), analytic[name].reshape(-1)
        # prefer entries with a non-zero gradient (many are exactly 0 behind dead ReLUs)
        live = np.flatnonzero(g != 0)
        pick = rng.choice(live if len(live) >= count else np.arange(len(p)), size=count, replace=False)
        nonzero = 0
        for i in pick:
            old = p[i]
            p[i] = old + eps
            up = loss()
            p[i] = old - eps
            down = loss()
            p[i] = old
            numeric = (up - down) / (2 * eps)
            err = abs(numeric - g[i])
            assert err <= atol + rtol * abs(g[i]), (
                f"{name}[{i}]: analytic {g[i]:.8g} vs numeric {numeric:.8g} (diff {err:.3g})")
            nonzero += g[i] != 0
        assert nonzero, f"{name}: every checked gradient entry was 0"


@pytest.mark.parametrize("fast", [True, False])
def test_loss_is_deterministic_given_the_rng(fast):
    model = FasterRCNN(tiny_config(), fast=fast)
    s = tiny_sample(seed=2)
    a = model.loss_and_grads(s["image"], s["boxes"], s["labels"], np.random.default_rng(5))
    ga = {k: v.copy() for k, v in model.grads().items()}
    b = model.loss_and_grads(s["image"], s["boxes"], s["labels"], np.random.default_rng(5))
    assert a == b
    for k, v in model.grads().items():
        np.testing.assert_array_equal(v, ga[k], err_msg=k)


def test_training_step_shapes_and_dtypes():
    model = FasterRCNN(tiny_config())
    s = tiny_sample(seed=4)
    losses = model.loss_and_grads(s["image"], s["boxes"], s["labels"], np.random.default_rng(0))
    assert set(losses) == {"loss", "rpn_cls", "rpn_reg", "head_cls", "head_reg"}
    assert losses["loss"] == pytest.approx(sum(v for k, v in losses.items() if k != "loss"), rel=1e-6)
    params, grads = model.params(), model.grads()
    for k, p in params.items():
        assert p.dtype == np.float32 and grads[k].shape == p.shape, k


def test_image_without_objects_trains_on_background_only():
    model = FasterRCNN(tiny_config())
    image = tiny_sample(seed=0)["image"]
    losses = model.loss_and_grads(image, np.zeros((0, 4)), np.zeros(0, np.int64),
                                  np.random.default_rng(0))
    assert losses["rpn_reg"] == 0 and losses["head_reg"] == 0 and losses["rpn_cls"] > 0
    assert all(np.isfinite(v).all() for v in model.grads().values())


# ---- learning: overfit one image ----------------------------------------------------------------

def test_overfits_a_single_image():
    """200 SGD steps on one 64 x 64 image: the loss falls more than 10x and every object is found
    (one detection scoring >= 0.5 per object, IoU >= 0.5, right class).  The loss is compared
    before and after with the same sampling rng, so anchor / RoI sampling noise does not blur it
    (seen: 27x to 345x over image seeds 11, 13, 14, 15)."""
    from frcnn_scratch.boxes import box_iou
    from frcnn_scratch.data.shapes import make_shapes_sample
    sample = make_shapes_sample(np.random.default_rng(13), image_size=64, shape_size=(16, 32),
                                num_objects=2)
    cfg = tiny_config(channels=(8, 16, 16), anchor_scales=(4.0, 8.0), rpn_channels=16, fc_hidden=32,
                      pooled_size=4, rpn_post_nms_test=20, nms_threshold=0.3)
    model = FasterRCNN(cfg)

    def loss(rng):
        return model.loss_and_grads(sample["image"], sample["boxes"], sample["labels"], rng)["loss"]

    start = loss(np.random.default_rng(123))
    opt = SGD(model.params(), lr=0.01, momentum=0.9, weight_decay=0)
    rng = np.random.default_rng(0)
    with blas_threads(1):                                   # small matrices: 1 thread is faster
        for _ in range(200):
            loss(rng)
            opt.step(model.grads())
    end = loss(np.random.default_rng(123))
    assert end < start / 10, f"loss fell only from {start:.3f} to {end:.3f}"
    det = model.predict(sample["image"])
    top = det["scores"] >= 0.5
    assert top.sum() == len(sample["boxes"]), f"{top.sum()} confident detections, want {len(sample['boxes'])}"
    iou = box_iou(sample["boxes"], det["boxes"][top])
    best = iou.argmax(axis=1)
    assert np.all(iou.max(axis=1) >= 0.5), f"best IoU per object {iou.max(axis=1)}"
    np.testing.assert_array_equal(det["labels"][top][best], sample["labels"])


# ---- predict --------------------------------------------------------------------------------------

def test_predict_returns_sorted_typed_detections():
    model = FasterRCNN(tiny_config(score_threshold=0.0))
    det = model.predict(tiny_sample()["image"])
    assert set(det) == {"boxes", "scores", "labels"}
    assert det["boxes"].dtype == np.float32 and det["boxes"].shape[1:] == (4,)
    assert det["scores"].dtype == np.float32 and det["labels"].dtype == np.int64
    assert np.all(np.diff(det["scores"]) <= 0)
    assert np.all((det["labels"] >= 1) & (det["labels"] <= model.config.num_classes))
    assert np.all(det["boxes"] >= 0) and np.all(det["boxes"] <= 32)


@pytest.mark.parametrize("image, match", [
    (np.zeros((32, 32)), "image: expected"),
    (np.zeros((32, 32, 4)), "image: expected"),
    (np.zeros((2, 2, 3)), "image: expected"),
    (np.full((32, 32, 3), np.nan), "NaN"),
    (np.full((32, 32, 3), 255, np.uint8), r"image: expected values in \[0, 1\].*divide it by 255"),
    (np.full((32, 32, 3), -0.5), r"image: expected values in \[0, 1\]"),
])
def test_predict_rejects_bad_images(image, match):
    with pytest.raises(ValueError, match=match):
        FasterRCNN(tiny_config()).predict(image)


def test_roi_pool_head_runs():
    model = FasterRCNN(tiny_config(pooler="pool"))
    s = tiny_sample()
    losses = model.loss_and_grads(s["image"], s["boxes"], s["labels"], np.random.default_rng(0))
    assert np.isfinite(losses["loss"])
    assert np.abs(model.grads()["backbone.0.weight"]).sum() > 0


# ---- config ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("pooler", "mean"), ("num_classes", 0), ("rpn_pos_iou", 1.5), ("channels", ()),
    ("anchor_scales", (0, 2)), ("fc_hidden", 2.5), ("pixel_std", (1, 1, 0)),
    # not sequences, or not numbers: each a ValueError naming the field, never a TypeError
    ("channels", 16), ("channels", "abc"), ("channels", (16, 1.5)), ("channels", None),
    ("anchor_scales", 2.0), ("anchor_ratios", ("a",)), ("anchor_ratios", (1, np.inf)),
    ("pixel_mean", 0.5), ("pixel_mean", (0.5, np.nan, 0.5)), ("pixel_mean", (0.5, 0.5)),
    ("pixel_std", None), ("sampling_ratio", 1.5), ("sampling_ratio", "2"), ("aligned", 1),
    ("aligned", "yes"), ("rpn_sigma", 0), ("rpn_sigma", "3"), ("rpn_lambda", -1.0),
    ("rpn_lambda", np.inf), ("rpn_min_size", np.nan), ("rpn_min_size", -1.0), ("rpn_min_size", None),
    ("seed", "abc"), ("seed", -1), ("seed", 1.5), ("seed", True), ("rpn_pos_iou", True),
    ("rpn_neg_iou", 0.8), ("roi_bg_iou_lo", 0.6), ("score_threshold", np.nan),
    ("sampling_ratio", 10 ** 6),
])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=f"config.{field}: expected"):
        Config(**{field: value})


def test_config_normalises_to_json_friendly_values():
    cfg = Config(channels=[np.int64(8), 16], pixel_mean=np.array([0.5, 0.4, 0.3]), seed=np.int64(3))
    assert cfg.channels == (8, 16) and type(cfg.channels[0]) is int and type(cfg.seed) is int
    assert cfg.pixel_mean == (0.5, 0.4, 0.3) and type(cfg.pixel_mean[0]) is float
    assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_config_round_trips_through_dict_and_knows_its_stride():
    cfg = Config()
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert cfg.stride == 8 and cfg.num_anchors == 9
    with pytest.raises(ValueError, match="unknown field"):
        Config.from_dict({"no_such_field": 1})


# ---- save / load ----------------------------------------------------------------------------------

def test_save_load_round_trip_gives_identical_predictions(tmp_path):
    model = FasterRCNN(tiny_config(seed=5, score_threshold=0.0))
    path = tmp_path / "m.npz"
    model.save(path)
    assert sorted(os.listdir(tmp_path)) == ["m.npz"]            # no temporary file left behind
    loaded = FasterRCNN.load(path)
    assert loaded.config == model.config
    image = tiny_sample()["image"]
    a, b = model.predict(image), loaded.predict(image)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    other = FasterRCNN(model.config)
    for p in other.params().values():
        p[...] = 0.0                                            # same config, other weights
    other.load_weights(path)
    for k, v in model.params().items():
        np.testing.assert_array_equal(other.params()[k], v, err_msg=k)


def test_load_refuses_another_config(tmp_path):
    path = tmp_path / "m.npz"
    FasterRCNN(tiny_config()).save(path)
    with pytest.raises(ValueError, match="different config.*fc_hidden"):
        FasterRCNN(tiny_config(fc_hidden=32)).load_weights(path)


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FasterRCNN.load(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match=r"bad.npz' is not an .npz archive$"):
        FasterRCNN.load(bad)
    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros(3))
    with pytest.raises(ValueError, match="not a frcnn checkpoint"):
        FasterRCNN.load(other)


@pytest.mark.parametrize("stored, match", [
    ("{not json", "its config is not valid JSON"),
    ("[1, 2]", "its config is JSON but not an object"),
    ('"text"', "its config is JSON but not an object"),
    ('{"channels": 16}', "config.channels: expected"),
])
def test_load_rejects_a_broken_stored_config(tmp_path, stored, match):
    path = tmp_path / "broken.npz"
    arrays = model_arrays(FasterRCNN(tiny_config()))
    arrays["config"] = np.array(stored)
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=f"checkpoint '.*broken.npz'.*{match}"):
        FasterRCNN.load(path)
    if stored.startswith("{"):                     # load_weights: a valid dict is compared instead
        return
    with pytest.raises(ValueError, match=f"checkpoint '.*broken.npz'.*{match}"):
        FasterRCNN(tiny_config()).load_weights(path)


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "m.npz"
    model = FasterRCNN(tiny_config())
    model.save(path)
    before = path.read_bytes()

    def broken_savez(f, **arrays):
        f.write(b"half a file")
        raise OSError("disk full")
    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        model.save(path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.npz"]


# ---- the same step on the triton backend -----------------------------------------------------------

@pytest.mark.parametrize("pooler", ["align", "pool"])
def test_triton_backend_matches_numpy_on_a_training_step(pooler):
    """One training step on a tiny input under backend="triton" (the interpreter without a GPU)
    against backend="numpy".  Both run float32; the kernels may sum in another order (RoI Align
    backward uses atomic adds), so values agree to float32 rounding, not bit for bit: losses
    within rel 1e-5, gradients within 1e-5 + 1e-4 |g| (a rounding difference of ~1e-7 relative
    amplified through a few layers of the backward)."""
    pytest.importorskip("torch")
    from frcnn_scratch import kernels  # noqa: F401  (sets TRITON_INTERPRET=1 without a GPU; must come before triton)
    pytest.importorskip("triton")
    s = tiny_sample(seed=3)
    results = {}
    for backend in ("numpy", "triton"):
        model = FasterRCNN(tiny_config(seed=9, pooler=pooler), backend=backend)
        losses = model.loss_and_grads(s["image"], s["boxes"], s["labels"], np.random.default_rng(2))
        det = model.predict(s["image"])
        results[backend] = (losses, {k: v.copy() for k, v in model.grads().items()}, det)
    (ln, gn, dn), (lt, gt, dt) = results["numpy"], results["triton"]
    for k in ln:
        assert lt[k] == pytest.approx(ln[k], rel=1e-5, abs=1e-7), f"loss {k}: {lt[k]} vs {ln[k]}"
    for k in gn:
        err = np.abs(gt[k] - gn[k])
        tol = 1e-5 + 1e-4 * np.abs(gn[k])
        assert np.all(err <= tol), f"grad {k}: max diff {err.max():.3g}"
    np.testing.assert_array_equal(dt["labels"], dn["labels"])
    np.testing.assert_allclose(dt["boxes"], dn["boxes"], rtol=0, atol=1e-3)


@pytest.mark.parametrize("boxes, labels, match", [
    (np.zeros((2, 3)), [1, 1], "gt_boxes"),
    (np.array([[5, 5, 1, 1]]), [1], "gt_boxes"),
    (np.array([[1, 1, 5, 5]]), [0], "gt_labels"),
    (np.array([[1, 1, 5, 5]]), [9], "gt_labels"),
    (np.array([[1, 1, 5, 5]]), [1, 2], "gt_labels"),
    (np.array([[1, 1, 5, 5]]), [1.5], "gt_labels: expected whole numbers"),
    (np.array([[1, 1, 5, 5]]), ["a"], "gt_labels: expected whole numbers"),
    (np.array([[1, 1, 5, 5]]), [np.nan], "gt_labels: contains NaN"),
])
def test_training_step_rejects_bad_ground_truth(boxes, labels, match):
    with pytest.raises(ValueError, match=match):
        FasterRCNN(tiny_config()).loss_and_grads(tiny_sample()["image"], boxes, labels,
                                                 np.random.default_rng(0))


def test_no_proposals_gives_no_detections_and_still_trains():
    """rpn_min_size larger than the image: the proposal layer keeps nothing."""
    model = FasterRCNN(tiny_config(rpn_min_size=1000.0, rpn_lambda=2.0))
    s = tiny_sample()
    det = model.predict(s["image"])
    assert det["boxes"].shape == (0, 4) and det["scores"].shape == (0,) and det["labels"].shape == (0,)
    losses = model.loss_and_grads(s["image"], s["boxes"], s["labels"], np.random.default_rng(0))
    assert losses["loss"] == pytest.approx(sum(v for k, v in losses.items() if k != "loss"), rel=1e-6)
    assert np.isfinite(losses["loss"])                     # the head trains on the gt boxes alone


def test_no_proposals_and_no_objects_train_the_rpn_only():
    model = FasterRCNN(tiny_config(rpn_min_size=1000.0))
    losses = model.loss_and_grads(tiny_sample()["image"], np.zeros((0, 4)), np.zeros(0, np.int64),
                                  np.random.default_rng(0))
    assert losses["head_cls"] == losses["head_reg"] == 0 and losses["rpn_cls"] > 0
    grads = model.grads()
    assert not grads["head.fc6.weight"].any() and grads["rpn.cls.weight"].any()


def test_training_step_needs_a_seed_or_generator_and_accepts_an_int():
    s = tiny_sample()
    with pytest.raises(ValueError, match="rng: pass a seed"):
        FasterRCNN(tiny_config()).loss_and_grads(s["image"], s["boxes"], s["labels"], None)
    by_int = FasterRCNN(tiny_config()).loss_and_grads(s["image"], s["boxes"], s["labels"], 5)
    by_gen = FasterRCNN(tiny_config()).loss_and_grads(s["image"], s["boxes"], s["labels"],
                                                      np.random.default_rng(5))
    assert by_int == by_gen


def test_constructor_checks_backend_and_config():
    with pytest.raises(ValueError, match="backend: unknown backend 'cuda'"):
        FasterRCNN(tiny_config(), backend="cuda")
    with pytest.raises(ValueError, match="config: expected a Config"):
        FasterRCNN({"num_classes": 3})


def test_parts_choose_which_losses_train_the_network():
    """parts=("rpn",) / ("head",): the other part's layers get zero gradient, the backbone only
    the chosen part's, and the joint gradient is their sum (4-step training, section 3.2)."""
    from fixtures.detector_tiny import tiny_config, tiny_sample
    model = FasterRCNN(tiny_config())
    s = tiny_sample(3)
    grads = {}
    for parts in (("rpn",), ("head",), ("rpn", "head")):
        losses = model.loss_and_grads(s["image"], s["boxes"], s["labels"], 0, parts=parts)
        grads[parts] = {k: v.copy() for k, v in model.grads().items()}
        want = sum(losses[k] for k in ("rpn_cls", "rpn_reg", "head_cls", "head_reg")
                   if k.split("_")[0] in parts)
        assert abs(losses["loss"] - want) < 1e-6 * max(1, want)
    for name in grads["rpn", "head"]:
        if name.startswith("rpn."):
            assert not grads["head",][name].any()
        if name.startswith("head."):
            assert not grads["rpn",][name].any()
        np.testing.assert_allclose(grads["rpn",][name] + grads["head",][name],
                                   grads["rpn", "head"][name], rtol=1e-4, atol=1e-7, err_msg=name)
    assert model.feature_gradients["rpn"] > 0 and model.feature_gradients["head"] > 0
    with pytest.raises(ValueError, match="parts"):
        model.loss_and_grads(s["image"], s["boxes"], s["labels"], 0, parts=("fpn",))


def test_paper_preset_has_the_papers_scale_free_values():
    from frcnn_scratch.config import Config
    c = Config.paper(num_classes=20)
    assert (c.rpn_batch_size, c.roi_batch_size, c.roi_fg_fraction) == (256, 64, 0.25)
    assert (c.rpn_pre_nms_train, c.rpn_post_nms_train, c.rpn_pre_nms_test, c.rpn_post_nms_test) \
        == (12000, 2000, 6000, 300)
    assert (c.pooler, c.pooled_size, c.roi_bg_iou_lo, c.rpn_pos_iou, c.rpn_neg_iou) == ("pool", 7, 0.1, 0.7, 0.3)
    assert c.num_classes == 20 and c.channels == Config().channels    # the network stays ours


@pytest.mark.parametrize("fast", [True, False])
def test_predict_runs_under_no_grad_and_gives_what_the_full_forward_gives(fast):
    """predict keeps nothing for a backward pass (nn.no_grad) and detects exactly what the same
    forward with every cache kept detects; training goes on after it as before."""
    from frcnn_scratch import nn as fnn
    model = FasterRCNN(tiny_config(score_threshold=0.0), fast=fast)
    first_conv = model.backbone[0].conv if fast else model.backbone[0]
    sample = tiny_sample()
    det = model.predict(sample["image"])
    assert first_conv._cache is None and model.rpn.conv._cache is None
    full = model.detections(model.preprocess(sample["image"]))        # outside no_grad
    assert fnn.grad_enabled() and first_conv._cache is not None
    for key in det:
        np.testing.assert_array_equal(det[key], full[key], err_msg=key)
    a = model.loss_and_grads(sample["image"], sample["boxes"], sample["labels"], rng=0)
    model.predict(sample["image"])
    b = model.loss_and_grads(sample["image"], sample["boxes"], sample["labels"], rng=0)
    assert a == b


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # NaN arithmetic is the point
@pytest.mark.parametrize("n_threads, fast", [(1, True), (2, True), (1, False)])
def test_nan_inside_the_network_still_stops_a_step_and_a_prediction(n_threads, fast, monkeypatch):
    """The fast layers do not scan their values; the model's checks of the features and of every
    gradient must catch what a scan would have: NaN weights in the backbone, and a backward that
    overflows.  (The textbook layers scan: they name the first layer that sees the NaN.)"""
    from frcnn_scratch.fast import threads
    sample = tiny_sample()
    nan_error = "features: .*NaN or Inf" if fast else "x: contains NaN or Inf"
    with threads.using(n_threads):
        model = FasterRCNN(tiny_config(), fast=fast)
        model.params()["backbone.3.weight"][0, 0, 1, 1] = np.nan       # a deeper conv layer
        with pytest.raises(ValueError, match=nan_error):
            model.loss_and_grads(sample["image"], sample["boxes"], sample["labels"], rng=0)
        with pytest.raises(ValueError, match=nan_error):
            model.predict(sample["image"])
        model = FasterRCNN(tiny_config(), fast=fast)
        rpn_backward = model.rpn.backward
        monkeypatch.setattr(model.rpn, "backward", lambda *a: rpn_backward(*a) * np.inf)
        with pytest.raises(ValueError, match=r"gradient of backbone\..* NaN or Inf" if fast
                           else "dy: contains NaN or Inf"):
            model.loss_and_grads(sample["image"], sample["boxes"], sample["labels"], rng=0)
        monkeypatch.undo()
        model.loss_and_grads(sample["image"], sample["boxes"], sample["labels"], rng=0)


def test_anchors_of_the_last_map_size_are_kept_read_only():
    from frcnn_scratch.anchors import shift_anchors
    model = FasterRCNN(tiny_config())
    a = model.anchors(4, 6)
    assert model.anchors(4, 6) is a and not a.flags.writeable        # kept, and shared safely
    np.testing.assert_array_equal(a, shift_anchors(model.base_anchors, 4, 6, model.config.stride))
    b = model.anchors(5, 6)                                           # another size: new anchors
    np.testing.assert_array_equal(b, shift_anchors(model.base_anchors, 5, 6, model.config.stride))
    with pytest.raises(ValueError, match="read-only"):
        a[0, 0] = 1


def test_set_reads_a_whole_float_as_an_int_field():
    """JSON reads 1e9 as a float: --set rpn_post_nms_test=1e9 is the int it spells; a fraction
    in an int field is still refused by Config."""
    from frcnn_scratch.config import parse_overrides
    values = parse_overrides(["rpn_post_nms_test=1e9", "rpn_lambda=1e1", "fc_hidden=2.5"])
    assert values["rpn_post_nms_test"] == 10 ** 9 and type(values["rpn_post_nms_test"]) is int
    assert values["rpn_lambda"] == 10.0 and type(values["rpn_lambda"]) is float
    assert Config(rpn_post_nms_test=values["rpn_post_nms_test"]).rpn_post_nms_test == 10 ** 9
    with pytest.raises(ValueError, match="config.fc_hidden"):
        Config(fc_hidden=values["fc_hidden"])
