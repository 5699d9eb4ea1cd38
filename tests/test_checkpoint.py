"""Checkpoint files against hostile paths and archives: special files refused before they are
opened, arrays read only when needed and size-checked before they are decompressed, symlinks
written through, one writer per path."""
import json
import os
import subprocess
import sys
import time
import tracemalloc
import zipfile

import numpy as np
import pytest

from fixtures.detector_tiny import tiny_config, tiny_sample
from frcnn_scratch import checkpoint
from frcnn_scratch.checkpoint import atomic_savez, hold, model_arrays, read_npz
from frcnn_scratch.config import TrainConfig
from frcnn_scratch.model import FasterRCNN
from frcnn_scratch.train import Trainer


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "m.npz"
    FasterRCNN(tiny_config()).save(path)
    return path


@pytest.fixture
def no_replace(monkeypatch):
    """Any os.replace in checkpoint.py fails the test: a refused path must never be replaced."""
    def replace(src, dst):
        raise AssertionError(f"os.replace({src!r}, {dst!r}) was called")
    monkeypatch.setattr(checkpoint.os, "replace", replace)


def test_a_fifo_is_refused_before_it_is_opened(tmp_path, no_replace):
    fifo = tmp_path / "pipe.npz"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        FasterRCNN.load(fifo)                                       # would block on open
    with pytest.raises(ValueError, match="not a regular file"):
        FasterRCNN(tiny_config()).save(fifo)
    assert fifo.is_fifo()


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom", "/dev/null"])
def test_a_device_is_refused_for_reading_and_never_replaced(device, no_replace):
    if not os.path.exists(device):
        pytest.skip(f"no {device} here")
    with pytest.raises(ValueError, match="not a regular file"):
        FasterRCNN.load(device)
    with pytest.raises(ValueError, match="not a regular file"):
        atomic_savez(device, {"x": np.zeros(1)})


def test_a_folder_is_refused(tmp_path, no_replace):
    with pytest.raises(ValueError, match="is a folder"):
        FasterRCNN.load(tmp_path)
    with pytest.raises(ValueError, match="is a folder"):
        atomic_savez(tmp_path, {"x": np.zeros(1)})


def test_an_extra_compressed_array_is_never_decompressed(saved, tmp_path):
    """A small file with an extra array of 200 MB of zeros (compressed to a few hundred kB):
    loading reads only the arrays the model needs."""
    with np.load(saved) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["junk"] = np.zeros(50_000_000, np.float32)
    bomb = tmp_path / "bomb.npz"
    np.savez_compressed(bomb, **arrays)
    del arrays
    assert bomb.stat().st_size < 5_000_000
    tracemalloc.start()
    model = FasterRCNN.load(bomb)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20_000_000, f"loading peaked at {peak / 1e6:.0f} MB"
    assert model.config == tiny_config()


def _forged(tmp_path, name, header_shape, payload_bytes):
    """An .npz whose member `name` declares header_shape float32 but holds payload_bytes."""
    path = tmp_path / "forged.npz"
    src = FasterRCNN(tiny_config())
    arrays = model_arrays(src)
    np.savez(path, **{k: v for k, v in arrays.items() if k != name})
    header = {"descr": "<f4", "fortran_order": False, "shape": header_shape}
    with zipfile.ZipFile(path, "a") as z, z.open(name + ".npy", "w") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(b"\0" * payload_bytes)
    return path


def test_a_parameter_of_another_shape_is_refused_before_it_is_read(tmp_path):
    path = _forged(tmp_path, "param/head.fc6.weight", (100_000, 100_000), 16)
    with pytest.raises(ValueError, match=r"'param/head.fc6.weight' has shape \(100000, 100000\)"):
        FasterRCNN.load(path)


def test_a_truncated_parameter_is_refused(tmp_path):
    shape = FasterRCNN(tiny_config()).params()["head.fc6.weight"].shape
    path = _forged(tmp_path, "param/head.fc6.weight", shape, 16)
    with pytest.raises(ValueError, match="fc6.weight.*truncated"):
        FasterRCNN.load(path)


def test_a_huge_text_field_is_refused(tmp_path):
    path = _forged(tmp_path, "class_names", (10_000_000,), 16)
    with pytest.raises(ValueError, match="'class_names' declares 40,000,000 bytes"):
        FasterRCNN.load(path)


def test_a_symlinked_checkpoint_is_written_through(tmp_path):
    target_dir = tmp_path / "runs"
    target_dir.mkdir()
    target = target_dir / "x.npz"
    link = tmp_path / "latest.npz"
    first = FasterRCNN(tiny_config(seed=1))
    first.save(target)
    link.symlink_to(target)
    second = FasterRCNN(tiny_config(seed=2))
    second.save(link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    with np.load(target) as f:
        np.testing.assert_array_equal(f["param/head.fc6.weight"], second.params()["head.fc6.weight"])


def test_resume_through_a_symlink_writes_the_target(tmp_path):
    samples = [tiny_sample(seed=i) for i in range(2)]
    target = tmp_path / "run.npz"
    link = tmp_path / "latest.npz"
    tcfg = TrainConfig(iterations=2, warmup=1, checkpoint_every=1)
    trainer = Trainer(FasterRCNN(tiny_config()), samples, tcfg)
    trainer.step()
    trainer.save(target)
    link.symlink_to(target)
    again = Trainer(FasterRCNN(tiny_config()), samples, tcfg)
    assert again.resume(link) == 1
    again.step()
    again.save(link)
    assert link.is_symlink()
    with read_npz(target) as arrays:
        assert int(arrays["iteration"]) == 2


def test_a_second_writer_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
    path = tmp_path / "m.npz"
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from frcnn_scratch.checkpoint import hold\n"
        "with hold(sys.argv[1]):\n    print('held', flush=True); time.sleep(30)"), str(path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=f"being written by another run \\(process {child.pid}"):
            with hold(path):
                pass
    finally:
        child.kill()
        child.wait()
    lock = tmp_path / ".m.npz.lock"
    assert lock.exists()                                            # killed: a stale lock is left
    with hold(path):                                                # and taken over
        assert lock.read_text() == str(os.getpid())
    assert not lock.exists()


def test_two_training_runs_on_one_new_checkpoint_path_cannot_both_write_it(tmp_path):
    """The first run holds the path; the second one is refused while the first trains."""
    from frcnn_scratch.train import train
    path = tmp_path / "m.npz"
    code = ("import sys, time\n"
            "sys.path.insert(0, sys.argv[2])\n"
            "from fixtures.detector_tiny import tiny_config, tiny_sample\n"
            "from frcnn_scratch.config import TrainConfig\n"
            "from frcnn_scratch.model import FasterRCNN\n"
            "from frcnn_scratch import train as t\n"
            "step = t.Trainer.step\n"
            "def slow(self, *a, **k):\n"
            "    print('step', flush=True); time.sleep(0.5); return step(self, *a, **k)\n"
            "t.Trainer.step = slow\n"
            "t.train(FasterRCNN(tiny_config()), [tiny_sample()], TrainConfig(iterations=20),\n"
            "        checkpoint=sys.argv[1], progress=False)\n")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    child = subprocess.Popen([sys.executable, "-c", code, str(path), tests_dir],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "step"
        with pytest.raises(ValueError, match="being written by another run"):
            train(FasterRCNN(tiny_config()), [tiny_sample()], TrainConfig(iterations=1),
                  checkpoint=path, progress=False)
    finally:
        child.kill()
        child.wait()


def test_a_checkpoint_from_before_a_tuple_field_existed_loads(saved, tmp_path):
    with np.load(saved) as f:
        arrays = {k: f[k] for k in f.files}
    config = json.loads(str(arrays["config"]))
    del config["pixel_mean"], config["pixel_std"]               # tuple fields, at their defaults
    arrays["config"] = np.array(json.dumps(config))
    old = tmp_path / "old.npz"
    np.savez(old, **arrays)
    FasterRCNN.load(old)
    FasterRCNN(tiny_config()).load_weights(old)


@pytest.mark.parametrize("key, value, match", [
    ("data_identity", "[1, 2]", "its data_identity is JSON but not an object or null"),
    ("rng_state", "[]", "its rng_state is JSON but not an object"),
    ("train_config", "5", "its train_config is JSON but not an object"),
    ("class_names", '"abc"', "its class_names is JSON but not a list"),
    ("config", "[" * 100_000, "its config is not valid JSON"),
])
def test_wrongly_typed_stored_values_are_one_clear_error(tmp_path, key, value, match):
    samples = [tiny_sample()]
    tcfg = TrainConfig(iterations=2, warmup=1)
    trainer = Trainer(FasterRCNN(tiny_config()), samples, tcfg, data_id={"data": "x"})
    trainer.step()
    path = tmp_path / "run.npz"
    trainer.save(path)
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    arrays[key] = np.array(value)
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=match):
        if key in ("class_names",):
            FasterRCNN.load(path)
        else:
            Trainer(FasterRCNN(tiny_config()), samples, tcfg, data_id={"data": "x"}).resume(path)


def test_a_bad_set_value_is_blamed_on_set_not_on_the_file(saved):
    with pytest.raises(ValueError, match=r"^--set: config.score_threshold: expected"):
        FasterRCNN.load(saved, overrides={"score_threshold": 2.0})


def test_the_holder_may_hold_again_and_another_thread_is_refused(tmp_path):
    """The command line holds the path before it reads data, then train() holds it again on the
    same thread: allowed, and the lock stays until the outer hold ends.  Another thread of the
    same process is refused like another run."""
    import threading
    path = tmp_path / "m.npz"
    lock = tmp_path / ".m.npz.lock"
    with hold(path):
        with hold(path):
            assert lock.read_text() == str(os.getpid())
        assert lock.exists()                                        # the outer hold keeps it
        errors = []

        def other():
            try:
                with hold(path):
                    pass
            except ValueError as e:
                errors.append(str(e))

        worker = threading.Thread(target=other)
        worker.start()
        worker.join(30)
        assert len(errors) == 1 and "being written by another thread of this process" in errors[0]
        assert lock.exists()
    assert not lock.exists()
    with hold(path):                                                # free again, for anyone
        pass


def test_a_failed_write_that_names_no_file_is_given_the_checkpoint_path(tmp_path, monkeypatch):
    """np.savez on a full disk raises an OSError with no file name: the error names the
    checkpoint, and no temporary file is left."""
    import errno

    def savez(f, **arrays):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", savez)
    with pytest.raises(OSError) as caught:
        atomic_savez(tmp_path / "m.npz", {"x": np.zeros(2)})
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path / "m.npz")
    assert os.listdir(tmp_path) == []
