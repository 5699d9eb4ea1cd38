"""Your own dataset through the command line: VOC and COCO folders written with the project's
writers (JPEG and PNG files, several image sizes, a grey image, a difficult / crowd object), then
train, eval, detect --json, and eval of that file, which must give the in-process numbers exactly;
pycocotools reads the same file and agrees."""
import contextlib
import io
import json
import os

import numpy as np
import pytest

from conftest import TINY
from frcnn_scratch.cli import main
from frcnn_scratch.data import SHAPE_CLASSES, make_shapes_dataset, write_coco, write_voc

METRIC_LINES = ("VOC mAP@0.5", "COCO:", "AR1", "circle", "square", "triangle", "cross")


def own_samples(seed, n, prefix):
    """Shapes images of several sizes as a user's photos: JPEG and PNG files, one grey image, one
    difficult object."""
    samples = make_shapes_dataset(n, seed=seed)
    for k, s in enumerate(samples):
        s["id"] = f"{prefix}{k:03d}"
        s["format"] = "jpg" if k % 2 else "png"
    samples[1]["image"] = samples[1]["image"].mean(axis=2)               # a grey JPEG
    samples[0]["difficult"] = np.array([True] + [False] * (len(samples[0]["labels"]) - 1))
    return samples


def metric_lines(text):
    return [line for line in text.splitlines() if line.strip().startswith(METRIC_LINES)]


def run(capsys, args):
    capsys.readouterr()
    rc = main(args)
    out = capsys.readouterr()
    assert rc == 0, out.err[-2000:]
    return out.out


@pytest.mark.parametrize("layout", ["voc", "coco"])
def test_train_eval_detect_json_eval_through_the_cli(tmp_path, capsys, layout):
    train_set, test_set = own_samples(1, 6, "tr"), own_samples(2, 4, "te")
    if layout == "voc":
        write_voc(tmp_path / "voc", train_set, SHAPE_CLASSES, split="trainval")
        write_voc(tmp_path / "voc", test_set, SHAPE_CLASSES, split="test")
        train_spec = test_spec = f"voc:{tmp_path / 'voc'}"
    else:
        write_coco(tmp_path / "train.json", tmp_path / "images", train_set, SHAPE_CLASSES)
        write_coco(tmp_path / "test.json", tmp_path / "images", test_set, SHAPE_CLASSES)
        train_spec = f"coco:{tmp_path / 'train.json'}:{tmp_path / 'images'}"
        test_spec = f"coco:{tmp_path / 'test.json'}:{tmp_path / 'images'}"
    ckpt = str(tmp_path / "m.npz")
    scale = ["--min-size", "64", "--max-size", "128"]
    text = run(capsys, ["train", "--data", train_spec, "--checkpoint", ckpt, "--iters", "8"]
               + scale + TINY)
    # VOC files name the classes: sorted; a COCO file lists its categories: in id order
    names = "circle, cross, square, triangle" if layout == "voc" else "circle, square, triangle, cross"
    assert f"6 training images, classes {names}" in text

    low = ["--set", "score_threshold=0.0"]              # a barely trained model: keep everything
    direct = run(capsys, ["eval", "--data", test_spec, "--checkpoint", ckpt, "--quiet",
                          "--plot", str(tmp_path / "pr.png")] + low)
    assert (tmp_path / "pr.png").read_bytes()[:4] == b"\x89PNG"
    out = run(capsys, ["detect", "--data", test_spec, "--checkpoint", ckpt, "--json",
                       str(tmp_path / "det.json"), "--out", str(tmp_path / "pics")] + low)
    assert "detections in 4 images" in out
    results = json.loads((tmp_path / "det.json").read_text())
    assert results and set(results[0]) == {"image_id", "category_id", "bbox", "score"}
    from_file = run(capsys, ["eval", "--data", test_spec, "--checkpoint", ckpt, "--quiet",
                             "--detections", str(tmp_path / "det.json"),
                             "--plot", str(tmp_path / "pr2.png")])
    assert metric_lines(direct) == metric_lines(from_file) and len(metric_lines(direct)) == 7
    assert len(list((tmp_path / "pics").glob("*_detections.png"))) == 4

    if layout == "coco":                                 # any COCO tool reads the file
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO(str(tmp_path / "test.json"))
            e = COCOeval(gt, gt.loadRes(str(tmp_path / "det.json")), "bbox")
            e.evaluate()
            e.accumulate()
            e.summarize()
        coco_line = next(line for line in direct.splitlines() if line.startswith("COCO:"))
        ours = float(coco_line.split()[2])                           # "COCO: AP 0.123 ..."
        assert abs(ours - e.stats[0]) < 5e-4, (coco_line, e.stats[0])


def test_test_time_settings_change_and_network_settings_are_refused(tmp_path, capsys):
    write_voc(tmp_path / "voc", own_samples(3, 3, "a"), SHAPE_CLASSES, split="test")
    spec = f"voc:{tmp_path / 'voc'}"
    ckpt = str(tmp_path / "m.npz")
    run(capsys, ["train", "--data", spec, "--split", "test", "--checkpoint", ckpt, "--iters", "2"]
        + TINY)
    run(capsys, ["eval", "--data", spec, "--checkpoint", ckpt, "--quiet", "--set",
                 "nms_threshold=0.3", "--set", "max_detections=5", "--min-size", "96",
                 "--max-size", "160", "--plot", str(tmp_path / "p.png")])
    capsys.readouterr()
    assert main(["eval", "--data", spec, "--checkpoint", ckpt, "--set", "fc_hidden=32"]) == 2
    err = capsys.readouterr().err
    assert "--set fc_hidden: fixed by the trained network" in err and "\n" not in err.strip()


def test_eval_refuses_data_with_another_class(tmp_path, capsys):
    samples = own_samples(4, 3, "b")
    write_voc(tmp_path / "voc", samples, SHAPE_CLASSES, split="trainval")
    spec = f"voc:{tmp_path / 'voc'}"
    ckpt = str(tmp_path / "m.npz")
    run(capsys, ["train", "--data", spec, "--checkpoint", ckpt, "--iters", "1"] + TINY)
    xml = tmp_path / "voc" / "Annotations" / "b002.xml"
    xml.write_text(xml.read_text().replace("<name>", "<name>hex", 1))
    (tmp_path / "voc" / "ImageSets" / "Main" / "test.txt").write_text("b002\n")
    assert main(["eval", "--data", spec, "--checkpoint", ckpt, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "b002.xml" in err and "unknown class 'hex" in err and "\n" not in err, err


def test_class_names_come_from_the_data_and_label_the_pictures(tmp_path, capsys):
    samples = own_samples(5, 3, "c")
    names = ("ring", "block", "wedge", "plus")
    write_coco(tmp_path / "a.json", tmp_path / "im", samples, names)
    ckpt = str(tmp_path / "m.npz")
    text = run(capsys, ["train", "--data", f"coco:{tmp_path / 'a.json'}:{tmp_path / 'im'}",
                        "--checkpoint", ckpt, "--iters", "1"] + TINY)
    assert "classes ring, block, wedge, plus" in text
    from frcnn_scratch.model import FasterRCNN
    assert FasterRCNN.load(ckpt).class_names == names


def test_a_results_file_of_other_files_is_refused_and_of_the_dataset_files_scored(tmp_path, capsys):
    """eval --detections gives the reader the dataset's file names: a file that `frcnn detect
    a.png b.png` wrote (ids 1, 2 with those names) is refused, not scored against the dataset's
    images 1 and 2; the same command on the dataset's own files, in its order, is scored."""
    samples = own_samples(6, 3, "d")
    write_voc(tmp_path / "voc", samples, SHAPE_CLASSES, split="test")
    spec = f"voc:{tmp_path / 'voc'}"
    ckpt = str(tmp_path / "m.npz")
    run(capsys, ["train", "--data", spec, "--split", "test", "--checkpoint", ckpt, "--iters", "1"]
        + TINY)
    images = tmp_path / "voc" / "JPEGImages"
    own = [str(images / f"d{k:03d}.{'jpg' if k % 2 else 'png'}") for k in range(3)]
    others = tmp_path / "others"
    others.mkdir()
    for k, path in enumerate(own):                      # the same pictures under other names
        (others / f"photo{k}{os.path.splitext(path)[1]}").write_bytes(open(path, "rb").read())
    low = ["--set", "score_threshold=0.0"]
    for files, name in ((sorted(str(p) for p in others.iterdir()), "other.json"),
                        (own, "own.json")):
        run(capsys, ["detect"] + files + ["--checkpoint", ckpt, "--json", str(tmp_path / name)]
            + low)
        assert all("file_name" in r for r in json.loads((tmp_path / name).read_text()))
    capsys.readouterr()
    assert main(["eval", "--data", spec, "--checkpoint", ckpt, "--quiet", "--detections",
                 str(tmp_path / "other.json"), "--plot", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "other.json" in err and "photo0" in err and "\n" not in err, err
    out = run(capsys, ["eval", "--data", spec, "--checkpoint", ckpt, "--quiet", "--detections",
                       str(tmp_path / "own.json"), "--plot", str(tmp_path / "p.png")])
    assert "VOC mAP@0.5" in out and "detections " in out
