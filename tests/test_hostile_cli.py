"""Hostile input, round three (issue 27), through the command line: special checkpoint paths, two
runs on one path, symlinks, resuming finished runs, empty options, the scale below the stride,
messages that name the option, EPIPE, memory estimates, the metric table, and `detect` over many
files in flat memory.  Each test names the item of the issue it pins."""
import contextlib
import errno
import json
import os
import stat
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import frcnn_scratch
from conftest import TINY, one_line
from frcnn_scratch import cli
from frcnn_scratch.cli import main

TRAIN = ["train", "--iters", "2", "--train-images", "2"] + TINY
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(frcnn_scratch.__file__)))


def child_env():
    """The environment of a child `frcnn` process: this package, not another copy."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([PACKAGE_ROOT] + [p for p in
                                         [env.get("PYTHONPATH")] if p])
    return env


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "m.npz"
    assert main(TRAIN + ["--checkpoint", str(path)]) == 0
    return path


# ---- item 2: a checkpoint path that is not a regular file --------------------------------------

@pytest.fixture
def never_replace(monkeypatch):
    """os.replace fails in these tests: whatever the code under test does, no file (least of all
    a device node) can be replaced by a checkpoint.  The calls are recorded."""
    calls = []

    def refuse(src, dst, *args, **kwargs):
        calls.append(str(dst))
        raise OSError(errno.EPERM, "os.replace is disabled in this test", str(dst))

    monkeypatch.setattr(os, "replace", refuse)
    return calls


@pytest.fixture
def no_work(monkeypatch):
    """Records any data opened and any training step taken (neither may happen)."""
    import frcnn_scratch.train as train_module
    seen = []
    real_open, real_step = cli._open_data, train_module.Trainer.step

    def open_data(*args, **kwargs):
        seen.append("data")
        return real_open(*args, **kwargs)

    def step(self, *args, **kwargs):
        seen.append("step")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(cli, "_open_data", open_data)
    monkeypatch.setattr(train_module.Trainer, "step", step)
    return seen


def special_file(tmp_path, kind):
    """A path that exists and is not a regular file: a FIFO, a character device (a null device
    of our own where we may make one, else /dev/null, which the tests only read or fail to
    replace), or a symlink to a FIFO."""
    if kind == "fifo":
        path = tmp_path / "fifo.npz"
        os.mkfifo(path)
        return str(path)
    if kind == "device":
        path = tmp_path / "null.npz"
        try:
            os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
            return str(path)
        except (PermissionError, OSError, AttributeError):
            return "/dev/null"
    fifo = tmp_path / "target_fifo"
    os.mkfifo(fifo)
    link = tmp_path / "link.npz"
    link.symlink_to(fifo)
    return str(link)


@contextlib.contextmanager
def unblocked(path, after=20.0):
    """If the code under test opens the FIFO `path` for reading, it blocks until a writer comes:
    a writer comes after `after` seconds, so that such a test fails instead of hanging."""
    done = threading.Event()

    def writer():
        if done.wait(after) or not stat.S_ISFIFO(os.stat(path).st_mode):
            return
        while not done.is_set():
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:                        # no reader yet
                time.sleep(0.1)
                continue
            os.close(fd)                           # the reader gets end-of-file
            time.sleep(0.1)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(5)


@pytest.mark.parametrize("kind", ["fifo", "device", "symlink"])
@pytest.mark.parametrize("command", [
    ["train", "--overwrite"], ["train", "--resume"], ["demo", "--overwrite"], ["demo", "--resume"]])
def test_train_and_demo_refuse_a_special_checkpoint_before_any_work(tmp_path, capsys, kind, command,
                                                                     never_replace, no_work):
    path = special_file(tmp_path, kind)
    if command[0] == "demo":                       # demo's checkpoint is OUT/model.npz
        out = tmp_path / "demo"
        out.mkdir()
        os.symlink(path, out / "model.npz")
        args = ["demo", "--out", str(out), "--iters", "2", "--train-images", "2",
                "--test-images", "1"] + command[1:] + TINY
    else:
        args = TRAIN + ["--checkpoint", path] + command[1:]
    with unblocked(path if kind != "symlink" else str(tmp_path / "target_fifo")):
        assert main(args) == 2
    err = one_line(capsys)
    assert "not a regular file" in err and ("--checkpoint" in err or "--out" in err), err
    assert no_work == [] and never_replace == []
    assert stat.S_ISFIFO(os.stat(path).st_mode) or stat.S_ISCHR(os.stat(path).st_mode)


@pytest.mark.parametrize("kind", ["fifo", "device", "symlink"])
def test_eval_and_detect_refuse_a_special_checkpoint_before_reading_anything(tmp_path, capsys,
                                                                             kind, no_work):
    path = special_file(tmp_path, kind)
    from frcnn_scratch.data import make_shapes_dataset
    from frcnn_scratch.data.images import write_image
    image = tmp_path / "a.png"
    write_image(image, make_shapes_dataset(1, seed=3)[0]["image"])
    for args in (["eval", "--checkpoint", path, "--images", "1", "--quiet"],
                 ["detect", "--checkpoint", path, "--data", "shapes", "--images", "1",
                  "--json", str(tmp_path / "d.json")],
                 ["detect", str(image), "--checkpoint", path, "--out", str(tmp_path / "o")]):
        with unblocked(path if kind != "symlink" else str(tmp_path / "target_fifo")):
            assert main(args) == 2, args
        err = one_line(capsys)
        assert "not a regular file" in err, (args, err)
    assert no_work == [] and not (tmp_path / "o").exists() and not (tmp_path / "d.json").exists()


def test_a_checkpoint_of_dev_zero_is_refused_without_reading_it(capsys):
    """(/dev/zero read to the end fills memory: it must be refused before it is opened.)"""
    assert main(["eval", "--checkpoint", "/dev/zero", "--images", "1", "--quiet"]) == 2
    assert "not a regular file" in one_line(capsys)


# ---- item 4: two runs on one new checkpoint path -------------------------------------------------

# `frcnn train` in a child, its steps slowed so that two runs overlap; it says when it opens data
SLOW_TRAIN = """
import sys, time
from frcnn_scratch import cli
import frcnn_scratch.train as train_module
real_step, real_open = train_module.Trainer.step, cli._open_data
def step(self, *a, **k):
    time.sleep(0.05)
    return real_step(self, *a, **k)
def open_data(*a, **k):
    print("opening data", flush=True)
    return real_open(*a, **k)
train_module.Trainer.step, cli._open_data = step, open_data
sys.exit(cli.main(sys.argv[1:]))
"""


def arrays_of(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def test_two_train_runs_on_one_new_path_one_trains_the_other_is_refused(tmp_path):
    """Rounds of two `frcnn train` processes started together on one new path: exactly one trains
    and writes the run a single process writes, bit for bit; the other is refused by name, before
    it opens any data; no lock file is left."""
    run = TRAIN[:1] + ["--iters", "30", "--train-images", "2"] + TINY
    reference = tmp_path / "reference.npz"
    assert main(run + ["--checkpoint", str(reference)]) == 0
    want = arrays_of(reference)
    script = tmp_path / "slow_train.py"
    script.write_text(SLOW_TRAIN)
    for r in range(3):
        folder = tmp_path / f"round{r}"
        path = folder / "m.npz"
        children = [subprocess.Popen([sys.executable, str(script)] + run +
                                     ["--checkpoint", str(path)], env=child_env(), text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                    for _ in range(2)]
        done = [(c.wait(300), *c.communicate()) for c in children]
        codes = sorted(rc for rc, _, _ in done)
        assert codes == [0, 2], [(rc, err[-600:]) for rc, _, err in done]
        (_, won_out, _), = [d for d in done if d[0] == 0]
        (_, lost_out, lost_err), = [d for d in done if d[0] == 2]
        assert "opening data" in won_out and "opening data" not in lost_out, lost_out
        assert lost_err.count("\n") == 1 and "being written by another run" in lost_err, lost_err
        got = arrays_of(path)
        assert got.keys() == want.keys()
        for key in want:
            if key != "data_identity":
                assert np.array_equal(got[key], want[key]), f"round {r}: {key} differs"
        assert sorted(os.listdir(folder)) == ["m.npz"], os.listdir(folder)


def test_a_run_holding_a_path_refuses_a_second_in_the_same_process_thread(tmp_path, capsys):
    """The command line holds the path while it reads data and trains: train() inside holds it
    again (the same thread), and the lock goes when the command ends."""
    path = tmp_path / "m.npz"
    from frcnn_scratch.checkpoint import hold
    with hold(path):
        assert main(TRAIN + ["--checkpoint", str(path)]) == 0      # the holder itself: allowed
        result = []
        worker = threading.Thread(target=lambda: result.append(
            main(TRAIN + ["--checkpoint", str(tmp_path / "m.npz"), "--overwrite"])))
        worker.start()
        worker.join(120)
        assert result == [2] and "being written by another thread" in one_line(capsys)
    assert sorted(os.listdir(tmp_path)) == ["m.npz"]


# ---- item 6: --resume through a symlink ----------------------------------------------------------

def test_resume_through_a_symlink_writes_the_target_and_keeps_the_link(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    target = runs / "x.npz"
    assert main(TRAIN + ["--checkpoint", str(target)]) == 0
    link = tmp_path / "latest.npz"
    link.symlink_to(os.path.join("runs", "x.npz"))
    assert main(["train", "--iters", "4", "--train-images", "2", "--resume",
                 "--checkpoint", str(link)] + TINY) == 0
    assert link.is_symlink() and os.readlink(link) == os.path.join("runs", "x.npz")
    assert int(arrays_of(target)["iteration"]) == 4
    assert sorted(os.listdir(runs)) == ["x.npz"] and sorted(os.listdir(tmp_path)) == [
        "latest.npz", "runs"]


# ---- item 13: a finished run resumed on other data -----------------------------------------------

@pytest.mark.parametrize("change, message", [
    (["--train-images", "3"], "trained on other data"),
    (["--data-seed", "7"], "trained on other data"),
    (["--lr", "0.02"], "cannot resume exactly with another train config"),
    (["--set", "fc_hidden=32"], "saved with a different config")])
def test_resuming_a_finished_run_gets_the_checks_of_an_unfinished_one(checkpoint, capsys, change,
                                                                      message):
    before = checkpoint.read_bytes()
    assert main(TRAIN + ["--checkpoint", str(checkpoint), "--resume"] + change) == 2
    err = one_line(capsys)
    assert message in err and str(checkpoint) in err, err
    assert checkpoint.read_bytes() == before
    assert main(TRAIN + ["--checkpoint", str(checkpoint), "--resume"]) == 0      # the same run
    assert "already at iteration 2 of 2: nothing left to train" in capsys.readouterr().out


# ---- item 14: options silently dropped or ignored ---------------------------------------------

def test_train_takes_the_scale_from_set_as_from_its_options(tmp_path, capsys):
    from frcnn_scratch.model import FasterRCNN
    path = tmp_path / "m.npz"
    assert main(TRAIN + ["--checkpoint", str(path), "--set", "min_size=64",
                         "--set", "max_size=96"]) == 0
    config = FasterRCNN.load(path).config
    assert (config.min_size, config.max_size) == (64.0, 96.0)
    assert main(TRAIN + ["--checkpoint", str(tmp_path / "n.npz"), "--set", "min_size=64",
                         "--min-size", "80", "--max-size", "96"]) == 2
    assert "--min-size, --set min_size: two values (80 and 64)" in one_line(capsys)


@pytest.mark.parametrize("command, option, what", [
    (["detect", "--data", "shapes", "--images", "1", "--out", "O"], "--json", "path"),
    (["detect", "--data", "shapes", "--images", "1", "--json", "D"], "--out", "path"),
    (["eval", "--images", "1", "--quiet"], "--split", "split name"),
    (["eval", "--images", "1", "--quiet"], "--plot", "path"),
    (["eval", "--images", "1", "--quiet"], "--detections", "path"),
    (TRAIN, "--split", "split name"),
    (["demo", "--iters", "1", "--train-images", "1", "--test-images", "1", "--out", "O"] + TINY,
     "--test-split", "split name"),
    (["demo", "--iters", "1", "--train-images", "1", "--test-images", "1", "--out", "O"] + TINY,
     "--test-data", "spec"),
])
def test_an_empty_option_is_refused_not_read_as_absent(checkpoint, tmp_path, capsys, no_work,
                                                       command, option, what):
    args = [str(tmp_path / a) if a in ("O", "D") else a for a in command]
    if command[0] != "demo":
        args += ["--checkpoint", str(checkpoint if command[0] != "train" else tmp_path / "t.npz")]
    assert main(args + [option, ""]) == 2
    assert f"{option}: an empty {what}" in one_line(capsys)
    assert no_work == []
    assert sorted(os.listdir(tmp_path)) == ["m.npz"]


# ---- items 17, 18: the scale below the model's stride, named up front ------------------------------

@pytest.mark.parametrize("scale, name", [(["--min-size", "1", "--max-size", "100"], "--min-size"),
                                         (["--set", "min_size=1", "--set", "max_size=100"],
                                          "--set min_size")])
def test_a_scale_below_the_stride_is_refused_before_any_work(checkpoint, tmp_path, capsys, no_work,
                                                             scale, name):
    assert main(TRAIN + ["--checkpoint", str(tmp_path / "n.npz")] + scale) == 2
    assert f"{name}: expected at least the model's stride, 4 pixels" in one_line(capsys)
    for command in (["eval", "--images", "1", "--quiet"],
                    ["detect", "--data", "shapes", "--images", "1", "--json",
                     str(tmp_path / "d.json")]):
        assert main(command + ["--checkpoint", str(checkpoint)] + scale) == 2
        assert f"{name}: expected at least the model's stride, 4 pixels" in one_line(capsys)
    assert no_work == []


@pytest.mark.parametrize("key, value, command, message", [
    ("data_identity", "[1, 2]", "train", "its data_identity is JSON but not an object or null"),
    ("train_config", "[1]", "train", "its train_config is JSON but not an object"),
    ("iteration", "'5'", "train", "its iteration is not a whole number >= 0"),
    ("rng_state", '{"bit_generator": "PCG64", "state": 5}', "train",
     "its random state cannot be restored"),
    ("config", "null", "eval", "its config is JSON but not an object"),
    ("config", '{"channels": "abc"}', "eval", "config.channels: expected a sequence"),
    ("class_names", "[1, 2, 3, 4]", "eval", "its class_names are not a list of non-empty names"),
])
def test_wrongly_typed_checkpoint_values_are_one_line_naming_file_and_field(checkpoint, capsys,
                                                                            key, value, command,
                                                                            message):
    arrays = arrays_of(checkpoint)
    if key == "iteration":
        arrays[key] = np.array("5")
    elif key == "config" and value != "null":
        arrays[key] = np.array(json.dumps({**json.loads(str(arrays[key])), **json.loads(value)}))
    else:
        arrays[key] = np.array(value)
    np.savez(checkpoint, **arrays)
    args = TRAIN + ["--iters", "4", "--resume"] if command == "train" else \
        ["eval", "--images", "1", "--quiet"]
    assert main(args + ["--checkpoint", str(checkpoint)]) == 2
    err = one_line(capsys)
    assert str(checkpoint) in err and message in err, err


# ---- item 19: messages ----------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["eval", "detect"])
def test_a_bad_set_value_is_blamed_on_set_not_on_the_checkpoint(checkpoint, tmp_path, capsys,
                                                                command):
    args = [command, "--checkpoint", str(checkpoint), "--set", "score_threshold=2"]
    args += ["--images", "1"] + (["--quiet"] if command == "eval" else
                                 ["--data", "shapes", "--json", str(tmp_path / "d.json")])
    assert main(args) == 2
    err = one_line(capsys)
    assert "--set: config.score_threshold: expected a number in [0, 1], got 2" in err
    assert str(checkpoint) not in err and "m.npz" not in err


def test_a_full_disk_names_the_file_and_claims_no_checkpoint_when_none_was_written(tmp_path, capsys,
                                                                                   monkeypatch):
    import frcnn_scratch.checkpoint as checkpoint_module

    def savez(f, **arrays):                        # as np.savez fails on a full disk: no file name
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.np, "savez", savez)
    path = tmp_path / "m.npz"
    assert main(TRAIN + ["--checkpoint", str(path)]) == 2
    err = one_line(capsys)
    assert f"error: {path}: No space left on device" in err and "error::" not in err, err
    assert "intact" not in err and not path.exists()


def test_a_path_ending_with_a_slash_is_refused_before_any_work(checkpoint, tmp_path, capsys,
                                                                no_work):
    assert main(TRAIN + ["--checkpoint", str(tmp_path / "newdir") + "/"]) == 2
    assert "--checkpoint: " in (err := one_line(capsys)) and "is a folder, not a file path" in err
    assert main(["eval", "--checkpoint", str(checkpoint), "--plot", str(tmp_path / "plots") + "/",
                 "--images", "1"]) == 2
    assert "--plot: " in (err := one_line(capsys)) and "is a folder, not a file path" in err
    assert main(["detect", "--checkpoint", str(checkpoint), "--json", str(tmp_path / "j") + "/",
                 "--data", "shapes", "--images", "1"]) == 2
    assert "--json: " in (err := one_line(capsys)) and "is a folder, not a file path" in err
    assert no_work == [] and sorted(os.listdir(tmp_path)) == ["m.npz"]


def test_a_closed_output_pipe_ends_quietly_like_other_unix_tools(tmp_path):
    """`frcnn ... | head -1`: once head has gone, writing fails with EPIPE; the command stops
    with status 141 (128 + SIGPIPE) and prints nothing about it."""
    read_end, write_end = os.pipe()
    os.close(read_end)                             # the reader has gone before anything is written
    try:
        done = subprocess.run([sys.executable, "-m", "frcnn_scratch.cli", "anchors"],
                              stdout=write_end, stderr=subprocess.PIPE, text=True,
                              env=child_env(), timeout=120)
    finally:
        os.close(write_end)
    assert done.returncode == 141 and done.stderr == "", (done.returncode, done.stderr[-800:])


# ---- item 20: bench-model checks the memory of each size first ---------------------------------

def test_bench_model_refuses_a_size_that_cannot_fit_before_allocating(monkeypatch, capsys):
    import frcnn_scratch.memory as memory
    import frcnn_scratch.tools.bench_model as bench_model
    monkeypatch.setattr(memory, "available_memory", lambda: 200 << 20)       # 200 MB

    def no_allocation(*args, **kwargs):
        raise AssertionError("an image was made before the memory check")

    monkeypatch.setattr(bench_model, "sample_at", no_allocation)
    assert main(["bench-model", "--sizes", "96x160,3000x3000", "--numpy-only", "--repeat", "1"]) == 2
    err = one_line(capsys)
    assert "--sizes 3000x3000: needs about" in err and "more than the 0.2 GB available" in err, err


# ---- item 21: the estimate is capped by the anchors there can be ---------------------------------

def test_a_proposal_count_beyond_the_anchors_costs_what_the_anchors_allow(checkpoint, tmp_path,
                                                                          capsys):
    from frcnn_scratch.config import Config
    from frcnn_scratch.memory import memory_estimate
    base = Config()
    cells = (160 // base.stride) * (160 // base.stride) * base.num_anchors
    for field in ("rpn_post_nms_test", "rpn_pre_nms_test"):
        huge = base.replace(**{field: 10 ** 9})
        assert memory_estimate(huge, (160, 160), training=False) == memory_estimate(
            base.replace(**{field: cells}), (160, 160), training=False)
    huge = base.replace(roi_batch_size=10 ** 9, rpn_post_nms_train=10 ** 9)   # proposals: the
    capped = base.replace(roi_batch_size=2 * base.rpn_pre_nms_train,          # pre-NMS top-N,
                          rpn_post_nms_train=base.rpn_pre_nms_train)          # and as many gts
    assert memory_estimate(huge, (160, 160)) == memory_estimate(capped, (160, 160))
    assert main(["eval", "--checkpoint", str(checkpoint), "--images", "2", "--quiet", "--plot",
                 str(tmp_path / "p.png"), "--set", "rpn_post_nms_test=1000000000",
                 "--set", "rpn_pre_nms_test=1000000000"]) == 0
    assert "VOC mAP@0.5" in capsys.readouterr().out


# ---- item 22: an undefined COCO number reads n/a ----------------------------------------------

def test_the_metric_table_prints_na_for_a_size_range_with_no_objects(checkpoint, tmp_path, capsys):
    """The shapes are at most 64 px: no object is COCO-large (> 96 x 96), so APl and ARl are
    undefined (-1 for pycocotools): the table says n/a."""
    assert main(["eval", "--checkpoint", str(checkpoint), "--images", "3", "--quiet", "--plot",
                 str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    assert "APl n/a" in out and "ARl n/a" in out and "-1.000" not in out, out
    from frcnn_scratch.evaluate import coco_evaluate
    result = coco_evaluate([dict(boxes=np.zeros((0, 4)), scores=np.zeros(0), labels=np.zeros(0))],
                           [dict(boxes=np.array([[0, 0, 10, 10]], np.float32),
                                 labels=np.array([1]))], num_classes=1)
    assert result["APl"] == -1.0                   # kept as pycocotools writes it


# ---- item 1: detect one file at a time -----------------------------------------------------------

def photos(folder, count, size=(1500, 2000)):
    """`count` JPEG photos of size (H, W) in `folder` (a few distinct pictures, copied)."""
    from PIL import Image
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    made = []
    for k in range(count):
        path = folder / f"photo{k:03d}.jpg"
        if k < 3:
            pixels = np.zeros(size + (3,), np.uint8)
            pixels[..., k] = np.linspace(0, 255, size[1], dtype=np.uint8)[None, :]
            y, x = rng.integers(0, size[0] // 2), rng.integers(0, size[1] // 2)
            pixels[y:y + size[0] // 3, x:x + size[1] // 3] = (230, 200, 40)
            Image.fromarray(pixels).save(path, quality=90)
        else:
            path.write_bytes(made[k % 3].read_bytes())
        made.append(path)
    return [str(p) for p in made]


def peak_of_detect(args):
    """(exit status, peak resident memory in MB) of `frcnn detect ARGS` in a fresh process."""
    probe = ("import resource, subprocess, sys; "
             "done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); "
             "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    done = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "frcnn_scratch.cli",
                           "detect"] + args, capture_output=True, text=True, timeout=600,
                          env=child_env())
    rc, peak_kb = (int(v) for v in done.stdout.split()[-2:])
    return rc, peak_kb / 1024, done.stderr


def test_detect_over_many_photos_stays_flat_in_memory(tmp_path):
    """Each file is decoded, detected, drawn and written before the next is read: 12 photos of
    2000 x 1500 peak within a few MB of 3 (decoding them all first held ~23 MB each)."""
    from fixtures.detector_tiny import tiny_config
    from frcnn_scratch.model import FasterRCNN
    ckpt = tmp_path / "m.npz"
    FasterRCNN(tiny_config()).save(ckpt)
    files = photos(tmp_path / "photos", 12)
    peaks = {}
    for n in (3, 12):
        out = tmp_path / f"out{n}"
        rc, peaks[n], err = peak_of_detect(files[:n] + ["--checkpoint", str(ckpt), "--out",
                                                        str(out), "--json", str(out / "d.json")])
        assert rc == 0, err[-2000:]
        assert len(list(out.glob("*_detections.png"))) == n
        assert {r["image_id"] for r in json.loads((out / "d.json").read_text())} <= set(
            range(1, n + 1))
    assert peaks[12] - peaks[3] < 40, f"3 photos: {peaks[3]:.0f} MB, 12 photos: {peaks[12]:.0f} MB"
    assert peaks[12] < 400


def test_detect_names_every_missing_file_before_any_is_decoded(tmp_path, capsys, monkeypatch):
    from fixtures.detector_tiny import tiny_config
    from frcnn_scratch.model import FasterRCNN
    ckpt = tmp_path / "m.npz"
    FasterRCNN(tiny_config()).save(ckpt)
    files = photos(tmp_path / "photos", 2, size=(60, 80))
    decoded = []
    real = cli.read_image_reduced
    monkeypatch.setattr(cli, "read_image_reduced", lambda *a: decoded.append(a) or real(*a))
    assert main(["detect"] + files + [str(tmp_path / "missing.jpg"), "--checkpoint", str(ckpt),
                                      "--out", str(tmp_path / "o")]) == 2
    assert "missing.jpg" in one_line(capsys) and decoded == []
    assert not (tmp_path / "o").exists()


def test_detect_on_a_dataset_writes_each_picture_as_it_goes(tmp_path, capsys, monkeypatch):
    """--data with --out: a picture per image, written as each image is detected (the shapes
    too), before the next image is read."""
    from fixtures.detector_tiny import tiny_config
    from frcnn_scratch.data import SHAPE_CLASSES
    from frcnn_scratch.model import FasterRCNN
    ckpt = tmp_path / "m.npz"
    FasterRCNN(tiny_config(score_threshold=0.0), class_names=SHAPE_CLASSES).save(ckpt)
    order = []
    real_save, real_predict = cli.save_detections, FasterRCNN.predict
    monkeypatch.setattr(cli, "save_detections", lambda path, *a, **k: (
        order.append("picture"), real_save(path, *a, **k))[1])
    monkeypatch.setattr(FasterRCNN, "predict", lambda self, image: (
        order.append("predict"), real_predict(self, image))[1])
    assert main(["detect", "--checkpoint", str(ckpt), "--data", "shapes", "--images", "3",
                 "--out", str(tmp_path / "o"), "--json", str(tmp_path / "d.json")]) == 0
    assert order == ["predict", "picture"] * 3
    assert len(os.listdir(tmp_path / "o")) == 3
    assert "in 3 images" in capsys.readouterr().out
