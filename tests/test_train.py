"""The training loop: learning-rate schedule, flips, same seed -> same run, exact resume."""
import numpy as np
import pytest

from fixtures.detector_tiny import tiny_config, tiny_sample
from frcnn_scratch.data import make_shapes_dataset
from frcnn_scratch.model import FasterRCNN
from frcnn_scratch.config import TrainConfig
from frcnn_scratch.evaluate import evaluate
from frcnn_scratch.train import learning_rate, train, training_sample

SAMPLES = [tiny_sample(seed=s) for s in range(4)]


def _params(model):
    return {k: v.copy() for k, v in model.params().items()}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"parameter {k} differs")


def test_learning_rate_warmup_then_cosine():
    t = TrainConfig(iterations=110, lr=0.1, warmup=10, final_lr_fraction=0.0)
    assert learning_rate(0, t) == pytest.approx(0.01)          # lr / 10
    assert learning_rate(5, t) == pytest.approx(0.01 + 0.09 * 0.5)
    assert learning_rate(10, t) == pytest.approx(0.1)           # peak after warmup
    assert learning_rate(60, t) == pytest.approx(0.05)          # half way down the cosine
    assert learning_rate(110, t) == pytest.approx(0.0, abs=1e-12)


def test_training_sample_flips_about_half_the_time():
    rng = np.random.default_rng(0)
    base = SAMPLES[0]
    flipped = 0
    for _ in range(200):
        s = training_sample([base], rng, flip=True)
        if not np.array_equal(s["image"], base["image"]):
            np.testing.assert_array_equal(s["image"], base["image"][:, ::-1])
            w = base["image"].shape[1]
            np.testing.assert_allclose(s["boxes"][:, [2, 0]], w - base["boxes"][:, [0, 2]])
            flipped += 1
    assert 70 <= flipped <= 130, f"{flipped} of 200 flipped"
    assert all(training_sample([base], rng, flip=False) is base for _ in range(5))


def test_same_seed_same_run_and_another_seed_differs():
    runs = []
    for seed in (3, 3, 4):
        model = FasterRCNN(tiny_config())
        history = train(model, SAMPLES, TrainConfig(iterations=4, warmup=2, seed=seed), progress=False)
        runs.append((history, _params(model)))
    assert runs[0][0] == runs[1][0]
    _assert_same(runs[0][1], runs[1][1])
    assert runs[0][0] != runs[2][0]


def test_resume_continues_exactly(tmp_path):
    """6 iterations in one go == 3 iterations, stop, resume from the checkpoint, 3 more."""
    t = TrainConfig(iterations=6, warmup=2, seed=1, checkpoint_every=3)
    straight = FasterRCNN(tiny_config())
    h_straight = train(straight, SAMPLES, t, checkpoint=tmp_path / "a.npz", progress=False)

    first = FasterRCNN(tiny_config())
    train(first, SAMPLES, TrainConfig(iterations=3, warmup=2, seed=1), checkpoint=tmp_path / "b.npz",
          progress=False)
    resumed = FasterRCNN(tiny_config())                       # fresh weights, overwritten on resume
    h_resumed = train(resumed, SAMPLES, t, checkpoint=tmp_path / "b.npz", resume=True, progress=False)
    assert len(h_resumed) == 3
    assert h_resumed == h_straight[3:]
    _assert_same(_params(resumed), _params(straight))


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path):
    path = tmp_path / "c.npz"
    train(FasterRCNN(tiny_config()), SAMPLES, TrainConfig(iterations=1), checkpoint=path, progress=False)
    with pytest.raises(ValueError, match="different config"):
        train(FasterRCNN(tiny_config(fc_hidden=8)), SAMPLES, TrainConfig(iterations=2),
              checkpoint=path, resume=True, progress=False)


def test_resume_refuses_a_weights_only_file(tmp_path):
    path = tmp_path / "w.npz"
    FasterRCNN(tiny_config()).save(path)
    with pytest.raises(ValueError, match="cannot resume"):
        train(FasterRCNN(tiny_config()), SAMPLES, TrainConfig(iterations=2), checkpoint=path,
              resume=True, progress=False)


@pytest.mark.parametrize("field, value", [("iterations", -1), ("lr", 0.0), ("warmup", 1.5),
                                          ("momentum", float("nan"))])
def test_train_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=f"train config.{field}"):
        TrainConfig(**{field: value})


def test_train_needs_samples():
    with pytest.raises(ValueError, match="samples"):
        train(FasterRCNN(tiny_config()), [], TrainConfig(iterations=1), progress=False)


def test_evaluate_scores_perfect_and_empty_detections():
    class Oracle:
        config = tiny_config()

        def predict(self, image):
            s = next(s for s in SAMPLES if s["image"] is image)
            return dict(boxes=s["boxes"], scores=np.ones(len(s["boxes"]), np.float32), labels=s["labels"])

    result, dets = evaluate(Oracle(), SAMPLES)
    assert result["mAP"] == pytest.approx(1.0) and len(dets) == len(SAMPLES)

    class Blind(Oracle):
        def predict(self, image):
            return dict(boxes=np.zeros((0, 4), np.float32), scores=np.zeros(0, np.float32),
                        labels=np.zeros(0, np.int64))

    assert evaluate(Blind(), SAMPLES)[0]["mAP"] == 0.0


def test_blas_threads_sets_and_restores(monkeypatch):
    from frcnn_scratch.fast import threads
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = threads.blas_thread_count()
    if before is None:
        pytest.skip("numpy's BLAS is not one threadpoolctl controls here")
    with threads.blas_threads(1):
        assert threads.blas_thread_count() == 1
        with threads.blas_threads(2):                         # nested: the inner count, then back
            assert threads.blas_thread_count() == 2
        assert threads.blas_thread_count() == 1
    assert threads.blas_thread_count() == before
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")          # the user's choice wins: untouched
    with threads.blas_threads(1):
        assert threads.blas_thread_count() == before


def test_blas_threads_from_two_threads_hold_the_count_until_the_last_one_ends(monkeypatch):
    """A block ending on one thread while another thread's block runs must not put the count
    back under it (the count is one for the process); the last block to end restores it."""
    import threading
    from frcnn_scratch.fast import threads
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = threads.blas_thread_count()
    if before is None:
        pytest.skip("numpy's BLAS is not one threadpoolctl controls here")
    seen = []

    def other():
        with threads.blas_threads(1):
            seen.append(threads.blas_thread_count())

    with threads.blas_threads(1):
        worker = threading.Thread(target=other)
        worker.start()
        worker.join(10)
        seen.append(threads.blas_thread_count())             # the other block has ended
    assert seen == [1, 1] and threads.blas_thread_count() == before


@pytest.mark.parametrize("change", [dict(seed=2), dict(lr=0.02), dict(momentum=0.8),
                                    dict(weight_decay=0.0), dict(warmup=3), dict(flip=False),
                                    dict(final_lr_fraction=0.5), dict(iterations=9)])
def test_resume_refuses_another_train_config_once_past_the_warmup(tmp_path, change):
    """3 steps with warmup 1 (step 2 is on the cosine): any field that changes a step must match."""
    path = tmp_path / "r.npz"
    base = dict(iterations=6, warmup=1, seed=1, checkpoint_every=3)
    train(FasterRCNN(tiny_config()), SAMPLES[:1], TrainConfig(**{**base, "iterations": 3}),
          checkpoint=path, progress=False)
    with np.load(path) as f:                              # make the checkpoint a 6-step run's
        arrays = dict(f)
    arrays["train_config"] = np.array(str(arrays["train_config"]).replace('"iterations": 3',
                                                                          '"iterations": 6'))
    np.savez(path, **arrays)
    name = next(iter(change))
    with pytest.raises(ValueError, match=f"cannot resume exactly.*{name}: checkpoint"):
        train(FasterRCNN(tiny_config()), SAMPLES[:1], TrainConfig(**{**base, **change}),
              checkpoint=path, resume=True, progress=False)
    # checkpoint_every only says when files are written: it may change
    history = train(FasterRCNN(tiny_config()), SAMPLES[:1], TrainConfig(**{**base, "checkpoint_every": 0}),
                    checkpoint=path, resume=True, progress=False)
    assert len(history) == 3


def test_resume_may_extend_the_total_while_inside_the_warmup(tmp_path):
    """Steps 0..2 with warmup 5: their learning rates do not depend on the total, so a longer
    run resumed from them equals the longer run done straight."""
    path = tmp_path / "w.npz"
    train(FasterRCNN(tiny_config()), SAMPLES, TrainConfig(iterations=3, warmup=5, seed=1),
          checkpoint=path, progress=False)
    longer = TrainConfig(iterations=8, warmup=5, seed=1)
    resumed = FasterRCNN(tiny_config())
    h_resumed = train(resumed, SAMPLES, longer, checkpoint=path, resume=True, progress=False)
    straight = FasterRCNN(tiny_config())
    h_straight = train(straight, SAMPLES, longer, progress=False)
    assert h_resumed == h_straight[3:]
    _assert_same(_params(resumed), _params(straight))


def test_resume_rejects_a_checkpoint_whose_train_config_is_not_json(tmp_path):
    path = tmp_path / "j.npz"
    train(FasterRCNN(tiny_config()), SAMPLES[:1], TrainConfig(iterations=1), checkpoint=path,
          progress=False)
    with np.load(path) as f:
        arrays = dict(f)
    arrays["train_config"] = np.array("{oops")
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=r"j.npz'.*train_config is not valid JSON"):
        train(FasterRCNN(tiny_config()), SAMPLES[:1], TrainConfig(iterations=2), checkpoint=path,
              resume=True, progress=False)


# ---- the step API ------------------------------------------------------------------------------------

def test_train_is_a_loop_over_trainer_step():
    """train() and a hand-written loop of Trainer.step give the same losses and weights, bit for bit."""
    from frcnn_scratch.fast.threads import blas_threads
    from frcnn_scratch.train import Trainer
    samples = make_shapes_dataset(3, seed=1)
    tcfg = TrainConfig(iterations=4, warmup=2, seed=3)
    a = FasterRCNN(tiny_config())
    history = train(a, samples, tcfg, progress=False)
    b = FasterRCNN(tiny_config())
    trainer = Trainer(b, samples, tcfg)
    with blas_threads(1):                   # as train(): the same BLAS threads, the same sums
        mine = [trainer.step() for _ in range(4)]
    assert [h["loss"] for h in history] == [h["loss"] for h in mine]
    for name, p in a.params().items():
        np.testing.assert_array_equal(p, b.params()[name], err_msg=name)
    assert trainer.iteration == 4


def test_trainer_step_updates_only_the_trainable_parameters():
    from frcnn_scratch.train import Trainer
    samples = make_shapes_dataset(2, seed=2)
    model = FasterRCNN(tiny_config())
    before = {k: v.copy() for k, v in model.params().items()}
    trainer = Trainer(model, samples, TrainConfig(iterations=10, seed=0))
    losses = trainer.step(samples[0], trainable=lambda name: name.startswith("rpn."))
    assert set(losses) == {"loss", "rpn_cls", "rpn_reg", "head_cls", "head_reg"}
    for name, p in model.params().items():
        changed = not np.array_equal(p, before[name])
        assert changed == name.startswith("rpn."), f"{name}: changed={changed}"


def test_difficult_objects_are_left_out_of_training_targets():
    from frcnn_scratch.train import training_sample
    s = make_shapes_dataset(1, seed=4)[0]
    s["difficult"] = np.arange(len(s["labels"])) == 0
    got = training_sample([s], np.random.default_rng(0), flip=False)
    assert len(got["labels"]) == len(s["labels"]) - 1 and not got["difficult"].any()
    np.testing.assert_array_equal(got["boxes"], s["boxes"][1:])
