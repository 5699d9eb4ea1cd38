"""Hostile input, as an adversarial user tries it: each case of issue 11 that is not in a test of
its own module, with the clear one-line error (or the right result) it must get."""
import errno
import os

import numpy as np
import pytest

from conftest import TINY, one_line
from frcnn_scratch import ops
from frcnn_scratch.cli import main


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "m.npz"
    assert main(["train", "--checkpoint", str(path), "--iters", "2", "--train-images", "2"] + TINY) == 0
    return path


# ---- data loss ------------------------------------------------------------------------------------

def test_an_existing_checkpoint_is_not_overwritten_without_asking(checkpoint, capsys):
    before = checkpoint.read_bytes()
    assert main(["train", "--checkpoint", str(checkpoint), "--iters", "2", "--train-images", "2"]
                + TINY) == 2
    err = one_line(capsys)
    assert str(checkpoint) in err and "--resume" in err and "--overwrite" in err
    assert checkpoint.read_bytes() == before
    assert main(["train", "--checkpoint", str(checkpoint), "--iters", "3", "--train-images", "2",
                 "--overwrite"] + TINY) == 0


@pytest.mark.parametrize("change", [["--train-images", "3"], ["--data-seed", "7"]])
def test_resume_on_other_data_is_refused(checkpoint, capsys, change):
    assert main(["train", "--checkpoint", str(checkpoint), "--iters", "4", "--train-images", "2",
                 "--resume"] + TINY + change) == 2
    err = one_line(capsys)
    assert "trained on other data" in err and str(checkpoint) in err


def test_checkpoints_get_the_umask_permissions(tmp_path):
    from frcnn_scratch.checkpoint import atomic_savez
    old = os.umask(0o027)
    try:
        atomic_savez(tmp_path / "a.npz", {"x": np.zeros(2)})
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "a.npz").st_mode & 0o777) == 0o640


def test_a_full_disk_during_training_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    import frcnn_scratch.model as model
    real = model.np.savez
    calls = []

    def savez(f, **arrays):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path))
        return real(f, **arrays)

    monkeypatch.setattr(model.np, "savez", savez)
    ckpt = tmp_path / "m.npz"
    assert main(["train", "--checkpoint", str(ckpt), "--iters", "4", "--checkpoint-every", "2",
                 "--train-images", "2"] + TINY) == 2
    err = one_line(capsys)
    assert "No space left on device" in err and "last checkpoint written is intact" in err
    with np.load(ckpt) as f:
        assert int(f["iteration"]) == 2
    assert sorted(os.listdir(tmp_path)) == ["m.npz"]


def test_ctrl_c_says_where_the_last_checkpoint_is(tmp_path, capsys, monkeypatch):
    import frcnn_scratch.train as train_module
    real_step = train_module.Trainer.step

    def step(self, *a, **k):
        if self.iteration == 3:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(train_module.Trainer, "step", step)
    ckpt = tmp_path / "m.npz"
    assert main(["train", "--checkpoint", str(ckpt), "--iters", "6", "--checkpoint-every", "2",
                 "--train-images", "2"] + TINY) == 2
    err = one_line(capsys)
    assert "interrupted" in err and "iteration 2" in err and "--resume" in err


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # the overflow is the point
def test_divergence_names_the_iteration_and_saves_no_nan(tmp_path, capsys):
    ckpt = tmp_path / "m.npz"
    assert main(["train", "--checkpoint", str(ckpt), "--iters", "40", "--checkpoint-every", "1",
                 "--train-images", "2", "--lr", "1e6"] + TINY) == 2
    err = one_line(capsys)
    assert "training diverged at iteration" in err and "--lr" in err
    if ckpt.exists():
        with np.load(ckpt) as f:
            assert all(np.isfinite(f[k]).all() for k in f.files if k.startswith("param/"))


# ---- wrong results ---------------------------------------------------------------------------------

def test_negative_stride_arrays_work_on_the_triton_backend():
    rng = np.random.default_rng(0)
    boxes = np.concatenate([rng.uniform(0, 20, (30, 2)), rng.uniform(20, 40, (30, 2))], 1)
    boxes = boxes.astype(np.float32)[::-1]                  # a view with a negative stride
    scores = rng.random(30).astype(np.float32)[::-1]
    assert np.array_equal(ops.nms(boxes, scores, 0.5, backend="triton"),
                          ops.nms(boxes, scores, 0.5, backend="numpy"))
    assert np.array_equal(ops.box_iou(boxes, boxes[::2], backend="triton"),
                          ops.box_iou(boxes, boxes[::2], backend="numpy"))


@pytest.mark.parametrize("mode, make, want", [
    ("I;16", lambda: np.array([[0, 65535]], np.uint16), [[0, 1]]),
    ("F", lambda: np.array([[0.25, 0.5]], np.float32), [[0.25, 0.5]]),
])
def test_deep_images_are_scaled_by_their_depth(tmp_path, mode, make, want):
    from PIL import Image
    from frcnn_scratch.data.images import read_image
    path = tmp_path / "a.tif"
    image = Image.fromarray(make())
    assert image.mode == mode
    image.save(path)
    np.testing.assert_allclose(read_image(path)[..., 0], want, atol=1e-6)


def test_images_that_cannot_be_shown_are_refused_by_name(tmp_path):
    from PIL import Image
    from frcnn_scratch.data.images import read_image
    Image.fromarray(np.array([[0, 5_000_000]], np.int32)).save(tmp_path / "i.tif")
    with pytest.raises(ValueError, match="i.tif.*32-bit integer"):
        read_image(tmp_path / "i.tif")
    Image.fromarray(np.array([[0, 7.5]], np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(ValueError, match="f.tif.*float pixels outside"):
        read_image(tmp_path / "f.tif")
    with pytest.raises(ValueError, match="is a folder"):
        read_image(tmp_path)
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(ValueError, match="not a regular file"):
        read_image(tmp_path / "pipe")


def test_a_jpeg_named_png_is_read_by_content(tmp_path):
    from PIL import Image
    from frcnn_scratch.data.images import read_image
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(tmp_path / "x.png", format="JPEG")
    assert abs(float(read_image(tmp_path / "x.png").mean()) - 200 / 255) < 0.02


# ---- clear errors, early -----------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--iters", "0"], "--iters: 0 iterations leave nothing to train"),
    (["--data-seed", "-1"], "--data-seed: expected an int >= 0, got -1"),
    (["--set", "fc_hidden=1000000000"], "--set: needs about"),
    (["--min-size", "1000000", "--max-size", "1000000"], "on a 1000000 x 1000000 image"),
    (["--set", "sampling_ratio=1000000000000"], "sampling_ratio"),
])
def test_train_refuses_before_working(tmp_path, capsys, args, message):
    assert main(["train", "--checkpoint", str(tmp_path / "m.npz"), "--quiet"] + args) == 2
    assert message in one_line(capsys)
    assert not (tmp_path / "m.npz").exists()


def test_demo_with_no_iterations_promises_no_checkpoint(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--iters", "0"] + TINY) == 2
    assert "--iters: 0 iterations" in one_line(capsys)


def test_outputs_that_cannot_be_written_are_named_before_the_work(tmp_path, capsys, checkpoint):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    assert main(["train", "--checkpoint", str(folder), "--iters", "1"] + TINY) == 2
    assert "is a folder" in one_line(capsys)
    assert main(["train", "--checkpoint", "", "--iters", "1"] + TINY) == 2
    assert "--checkpoint: an empty path" in one_line(capsys)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", "--checkpoint", str(blocker / "m.npz"), "--iters", "1"] + TINY) == 2
    assert "--checkpoint: cannot write to" in one_line(capsys)
    image = tmp_path / "img.png"
    from frcnn_scratch.data.images import write_image
    write_image(image, np.zeros((40, 40, 3), np.float32))
    assert main(["detect", str(image), "--checkpoint", str(checkpoint), "--out",
                 str(blocker / "out")]) == 2
    assert "--out: cannot write to" in one_line(capsys)
    assert main(["detect", str(image), "--checkpoint", str(checkpoint), "--json", str(folder)]) == 2
    assert "--json" in one_line(capsys)


def test_a_tiny_image_names_its_file_and_size(tmp_path, capsys, checkpoint):
    from frcnn_scratch.data.images import write_image
    write_image(tmp_path / "thin.png", np.zeros((1, 1000, 3), np.float32))
    assert main(["detect", str(tmp_path / "thin.png"), "--checkpoint", str(checkpoint),
                 "--out", str(tmp_path / "o")]) == 2
    err = one_line(capsys)
    assert "thin.png" in err and "1 x 1000 pixels" in err


@pytest.mark.parametrize("corrupt, message", [
    (lambda a: a.update({"param/backbone.0.weight": a["param/backbone.0.weight"].astype(str)}),
     "is <U"),
    (lambda a: a.update({"param/backbone.0.weight": a["param/backbone.0.weight"].astype(np.int64)}),
     "is int64"),
    (lambda a: a.update({"rng_state": np.array('{"bit_generator": "nope"}')}), "random state"),
    (lambda a: a.update({"iteration": np.array([1, 2])}), "iteration is not a whole number"),
    (lambda a: a.update({"iteration": np.array(-3)}), "iteration is not a whole number"),
])
def test_corrupt_checkpoints_are_named(checkpoint, capsys, corrupt, message):
    with np.load(checkpoint) as f:
        arrays = {k: f[k] for k in f.files}
    corrupt(arrays)
    np.savez(checkpoint, **arrays)
    assert main(["train", "--checkpoint", str(checkpoint), "--iters", "4", "--train-images", "2",
                 "--resume"] + TINY) == 2
    err = one_line(capsys)
    assert str(checkpoint) in err and message in err, err


def test_fractional_sizes_are_refused_not_truncated():
    f = np.zeros((1, 1, 4, 4), np.float32)
    r = np.array([[0, 0, 0, 3, 3]], np.float32)
    with pytest.raises(ValueError, match="output_size.*whole numbers"):
        ops.roi_align(f, r, 2.7, 1.0)
    with pytest.raises(ValueError, match="input_shape.*whole numbers"):
        ops.roi_align_backward(np.zeros((1, 1, 2, 2), np.float32), r, (1, 1, 4.5, 4), 2, 1.0)


@pytest.mark.parametrize("field, value", [("lr", True), ("flip", "no"), ("final_lr_fraction", 50),
                                          ("momentum", 1.5)])
def test_train_config_refuses_lookalike_values(field, value):
    from frcnn_scratch.config import TrainConfig
    with pytest.raises(ValueError, match=f"train config.{field}"):
        TrainConfig(**{field: value})


def test_ground_truth_wholly_outside_the_image_is_refused():
    from fixtures.detector_tiny import tiny_config
    from frcnn_scratch.model import FasterRCNN
    model = FasterRCNN(tiny_config())
    with pytest.raises(ValueError, match="gt_boxes: box 1 .* wholly outside the 32 x 32 image"):
        model.loss_and_grads(np.zeros((32, 32, 3), np.float32),
                             np.array([[2, 2, 10, 10], [40, 40, 50, 50]], np.float32),
                             np.array([1, 2]), 0)


def test_a_huge_synthetic_set_is_drawn_lazily():
    from frcnn_scratch.data import open_dataset
    data = open_dataset("shapes", num_images=10 ** 9, seed=3)
    assert len(data) == 10 ** 9
    item = data[123_456_789]
    assert item["image"].ndim == 3 and item["image_id"] == 123_456_790
