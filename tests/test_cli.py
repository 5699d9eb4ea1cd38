"""The `frcnn` command: train / eval / detect / demo on tiny settings, and one-line errors."""
import os

import numpy as np
import pytest

from conftest import TINY, one_line as _error_line
from frcnn_scratch.cli import main
from frcnn_scratch.data.images import read_image


def test_demo_trains_evaluates_and_draws(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--iters", "4", "--train-images", "3",
               "--test-images", "2"] + TINY)
    assert rc == 0
    text = capsys.readouterr().out
    assert "VOC mAP@0.5 = " in text and "2 held-out images" in text
    assert sorted(os.listdir(out)) == ["detections.png", "model.npz"]
    assert (out / "detections.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_eval_detect_round_trip(tmp_path, capsys):
    ckpt = str(tmp_path / "m.npz")
    assert main(["train", "--checkpoint", ckpt, "--iters", "3", "--train-images", "2"] + TINY) == 0
    assert main(["train", "--checkpoint", ckpt, "--iters", "5", "--train-images", "2", "--resume"]
                + TINY) == 0
    assert main(["eval", "--checkpoint", ckpt, "--images", "2", "--quiet"]) == 0
    assert "VOC mAP@0.5" in capsys.readouterr().out
    # an image file on disk: a shapes image saved as PNG, read back, detected
    import matplotlib.image as mpimg
    from frcnn_scratch.data import make_shapes_dataset
    image = make_shapes_dataset(1, seed=5)[0]["image"]
    png = tmp_path / "shapes.png"
    mpimg.imsave(png, image)
    np.testing.assert_allclose(read_image(str(png)), image, atol=1 / 255 + 1e-6)
    assert main(["detect", str(png), "--out", str(tmp_path / "det"), "--checkpoint", ckpt,
                 "--score", "0"]) == 0
    assert os.listdir(tmp_path / "det") == ["shapes_detections.png"]


def test_missing_image_is_one_line(tmp_path, capsys):
    ckpt = tmp_path / "m.npz"
    from fixtures.detector_tiny import tiny_config
    from frcnn_scratch.model import FasterRCNN
    FasterRCNN(tiny_config()).save(ckpt)
    assert main(["detect", str(tmp_path / "nope.png"), "--out", str(tmp_path), "--checkpoint",
                 str(ckpt)]) == 2
    assert "nope.png" in _error_line(capsys)


def test_detect_names_a_missing_image_before_loading_the_checkpoint(tmp_path, capsys):
    assert main(["detect", str(tmp_path / "missing.png"), "--out", str(tmp_path / "o"),
                 "--checkpoint", str(tmp_path / "no_model.npz")]) == 2
    assert "image file not found" in (line := _error_line(capsys)) and "missing.png" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, message", [
    (["--score", "1.5"], "--score: expected a number in [0, 1], got 1.5"),
    (["--score", "nan"], "--score: expected a number in [0, 1]"),
    (["--min-size", "-1", "--max-size", "5"], "--min-size: expected a number of pixels >= 0, got -1.0"),
    (["--min-size", "5", "--max-size", "nan"], "--max-size: expected a number of pixels >= 0"),
    (["--min-size", "300", "--max-size", "100"], "0 < --min-size <= --max-size, got 300 and 100"),
    (["--min-size", "100"], "--min-size, --max-size: give both"),
])
def test_detect_checks_its_options_by_the_names_typed(tmp_path, capsys, args, message):
    assert main(["detect", str(tmp_path / "a.png"), "--out", str(tmp_path / "o"),
                 "--checkpoint", str(tmp_path / "m.npz")] + args) == 2
    assert message in _error_line(capsys)


def test_read_image_scales_an_8_bit_jpeg_to_the_unit_range(tmp_path):
    from PIL import Image
    pixels = np.zeros((16, 16, 3), np.uint8)
    pixels[:, :8] = 255
    path = tmp_path / "half.jpg"
    Image.fromarray(pixels).save(path, quality=95)
    image = read_image(str(path))
    assert image.dtype == np.float32 and image.shape == (16, 16, 3)
    assert 0 <= image.min() and image.max() <= 1 and image[:, :4].min() > 0.9 and image[:, 12:].max() < 0.1


def test_unreadable_checkpoint_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    bad.write_text("garbage")
    assert main(["eval", "--checkpoint", str(bad), "--images", "1"]) == 2
    assert "bad.npz' is not an .npz archive" in _error_line(capsys)
    assert main(["eval", "--checkpoint", str(tmp_path / "none.npz")]) == 2
    assert "does not exist" in _error_line(capsys)


def test_unreadable_image_is_one_line(tmp_path, capsys):
    ckpt = tmp_path / "m.npz"
    from fixtures.detector_tiny import tiny_config
    from frcnn_scratch.model import FasterRCNN
    FasterRCNN(tiny_config()).save(ckpt)
    fake = tmp_path / "fake.png"
    fake.write_text("not an image")
    assert main(["detect", str(fake), "--out", str(tmp_path / "o"), "--checkpoint", str(ckpt)]) == 2
    assert "could not be read" in _error_line(capsys)


@pytest.mark.parametrize("args, message", [
    (["--set", "pooler=mean"], "config.pooler"),
    (["--set", "no_such=1"], "--set 'no_such=1'"),
    (["--set", "fc_hidden"], "KEY=VALUE"),
    (["--iters", "-3"], "--iters: expected an int >= 0, got -3"),
    (["--lr", "0"], "--lr: expected a positive number"),
    (["--seed", "-1"], "--seed: expected an int >= 0, got -1"),
    (["--checkpoint-every", "-1"], "--checkpoint-every: expected an int >= 0"),
    (["--train-images", "0"], "--train-images"),
    # --set values that are not of the field's kind: one line naming the field, not a traceback
    (["--set", "channels=16"], "config.channels: expected a sequence of one or more positive ints, got 16"),
    (["--set", "seed=abc"], "config.seed: expected an int >= 0, got 'abc'"),
    (["--set", "anchor_scales=2"], "config.anchor_scales: expected a sequence"),
    (["--set", "pixel_mean=[0.5,0.5]"], "config.pixel_mean: expected a sequence of 3"),
    (["--set", "sampling_ratio=x"], "config.sampling_ratio: expected an int"),
    (["--set", "rpn_min_size=NaN"], "config.rpn_min_size: expected a finite number >= 0"),
    (["--set", "rpn_sigma=0"], "config.rpn_sigma: expected a positive finite number"),
])
def test_bad_values_are_one_line(tmp_path, capsys, args, message):
    rc = main(["train", "--checkpoint", str(tmp_path / "x.npz"), "--iters", "1", "--quiet"] + args)
    assert rc == 2
    assert message in _error_line(capsys)


def test_detect_files_to_json_and_pictures_without_overwriting(tmp_path, capsys):
    import json
    from fixtures.detector_tiny import tiny_config
    from frcnn_scratch.data import make_shapes_dataset
    from frcnn_scratch.data.images import write_image
    from frcnn_scratch.model import FasterRCNN
    ckpt = tmp_path / "m.npz"
    FasterRCNN(tiny_config(score_threshold=0.0)).save(ckpt)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    image = make_shapes_dataset(1, seed=2)[0]["image"]
    write_image(tmp_path / "a" / "x.png", image)
    write_image(tmp_path / "b" / "x.jpg", image, "jpg")          # the same name in two folders
    assert main(["detect", str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.jpg"),
                 "--checkpoint", str(ckpt), "--json", str(tmp_path / "d.json"),
                 "--out", str(tmp_path / "o"), "--score", "0"]) == 0
    results = json.loads((tmp_path / "d.json").read_text())
    assert {r["image_id"] for r in results} <= {1, 2} and {r["file_name"] for r in results} <= {"x.png", "x.jpg"}
    assert all(len(r["bbox"]) == 4 and r["bbox"][2] >= 0 for r in results)
    assert sorted(os.listdir(tmp_path / "o")) == ["x_2_detections.png", "x_detections.png"]
    assert main(["detect", "--checkpoint", str(ckpt), "--out", str(tmp_path / "o")]) == 2
    assert "give image files or --data" in _error_line(capsys)


def test_textbook_option_reaches_the_model_and_its_checkpoint_loads_in_both_modes(tmp_path, capsys,
                                                                                  monkeypatch):
    """--textbook builds (train, demo) or loads (eval, detect) the model with fast=False; a
    checkpoint it trains loads into the fast model and the textbook one alike, with the same
    weights and the same features to float32 rounding."""
    from fixtures.detector_tiny import tiny_sample
    from frcnn_scratch.model import FasterRCNN
    built = []
    real_init = FasterRCNN.__init__

    def recording_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        built.append(self.fast)

    monkeypatch.setattr(FasterRCNN, "__init__", recording_init)
    ckpt = str(tmp_path / "m.npz")
    assert main(["train", "--textbook", "--checkpoint", ckpt, "--iters", "2",
                 "--train-images", "2"] + TINY) == 0
    assert main(["eval", "--textbook", "--checkpoint", ckpt, "--images", "2", "--quiet",
                 "--plot", str(tmp_path / "pr.png")]) == 0
    assert main(["detect", "--textbook", "--checkpoint", ckpt, "--data", "shapes", "--images", "1",
                 "--json", str(tmp_path / "d.json")]) == 0
    assert main(["demo", "--textbook", "--out", str(tmp_path / "demo"), "--iters", "2",
                 "--train-images", "2", "--test-images", "1"] + TINY) == 0
    assert built == [False] * 4, built
    assert main(["eval", "--checkpoint", ckpt, "--images", "1", "--quiet",
                 "--plot", str(tmp_path / "pr.png")]) == 0
    assert built[-1] is True                               # without the option: the fast model
    capsys.readouterr()
    fast, textbook = FasterRCNN.load(ckpt), FasterRCNN.load(ckpt, fast=False)
    assert fast.fast and not textbook.fast
    for name, value in fast.params().items():
        np.testing.assert_array_equal(textbook.params()[name], value, err_msg=name)
    x = fast.preprocess(tiny_sample(seed=1, size=48)["image"])
    np.testing.assert_allclose(textbook.features(x), fast.features(x), rtol=1e-5, atol=1e-5)


def test_help_names_the_textbook_option():
    from frcnn_scratch.cli import build_parser
    for command in ("train", "eval", "detect", "demo"):
        text = build_parser()._subparsers._group_actions[0].choices[command].format_help()
        assert "--textbook" in text and "nn.py's textbook layers" in text, command


def test_detect_on_the_shapes_takes_its_image_count(tmp_path, capsys):
    """--images (how many shapes) and the IMAGE files are two options: neither hides the other."""
    import json
    from fixtures.detector_tiny import tiny_config
    from frcnn_scratch.data import SHAPE_CLASSES
    from frcnn_scratch.model import FasterRCNN
    ckpt = tmp_path / "m.npz"
    FasterRCNN(tiny_config(score_threshold=0.0), class_names=SHAPE_CLASSES).save(ckpt)
    assert main(["detect", "--checkpoint", str(ckpt), "--data", "shapes", "--images", "2",
                 "--json", str(tmp_path / "d.json")]) == 0
    assert "in 2 images" in capsys.readouterr().out
    assert {r["image_id"] for r in json.loads((tmp_path / "d.json").read_text())} <= {1, 2}
