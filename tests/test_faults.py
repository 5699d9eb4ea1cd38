"""Nothing lost, nothing killed: kill -9 during training (inside a save too) and resume gives the
uninterrupted run bit for bit, with no stray files; detect on a camera-sized photo stays within a
bounded memory."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import TINY
from frcnn_scratch.cli import main

RUN = ["train", "--iters", "16", "--checkpoint-every", "2", "--train-images", "3"] + TINY

# Runs the command line in a child process that kills itself with SIGKILL inside its k-th
# checkpoint save, after the temporary file is written and before it replaces the checkpoint:
# the worst moment for a crash.
KILLER = """
import os, signal, sys
import frcnn_scratch.checkpoint as checkpoint
k = int(sys.argv[1])
calls = [0]
real_replace = os.replace
def replace(src, dst):
    calls[0] += 1
    if calls[0] == k:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst)
checkpoint.os.replace = replace
from frcnn_scratch.cli import main
sys.exit(main(sys.argv[2:]))
"""


def arrays(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def test_kill_minus_nine_then_resume_is_the_uninterrupted_run(tmp_path):
    reference = tmp_path / "ref" / "m.npz"
    assert main(RUN + ["--checkpoint", str(reference)]) == 0

    folder = tmp_path / "faulty"
    folder.mkdir()
    ckpt = str(folder / "m.npz")
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # 1. killed inside its 3rd save (a checkpoint at iteration 4 exists, iteration 6's is a .tmp)
    done = subprocess.run([sys.executable, str(script), "3"] + RUN + ["--checkpoint", ckpt],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert any(name.endswith(".npz") and ".tmp-" in name for name in os.listdir(folder))
    assert int(arrays(ckpt)["iteration"]) == 4
    # 2. resumed, and killed from outside at some moment of its run
    rng = np.random.default_rng(0)
    child = subprocess.Popen([sys.executable, "-m", "frcnn_scratch.cli"] + RUN +
                             ["--checkpoint", ckpt, "--resume"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(float(rng.uniform(1.0, 2.5)))
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    # 3. resumed to the end (however far the killed runs got)
    assert main(RUN + ["--checkpoint", ckpt, "--resume"]) == 0

    got, want = arrays(ckpt), arrays(reference)
    assert got.keys() == want.keys()
    for key in want:                  # weights, optimizer, random state, iteration, data identity
        assert np.array_equal(got[key], want[key]), f"{key} differs from the uninterrupted run"
    assert sorted(os.listdir(folder)) == ["m.npz"], os.listdir(folder)   # no stray temporaries


def test_detect_on_a_camera_photo_stays_within_a_few_hundred_mb(tmp_path):
    from PIL import Image
    from fixtures.detector_tiny import tiny_config
    from frcnn_scratch.model import FasterRCNN
    ckpt = tmp_path / "m.npz"
    FasterRCNN(tiny_config()).save(ckpt)
    photo = np.zeros((4000, 6000, 3), np.uint8)                   # 6000 x 4000, a 24 MP camera
    photo[..., 0] = np.linspace(0, 255, 6000, dtype=np.uint8)[None, :]
    photo[1000:2500, 2000:3600] = (230, 200, 40)
    Image.fromarray(photo).save(tmp_path / "photo.jpg", quality=90)
    del photo
    probe = ("import resource, subprocess, sys; "
             "done = subprocess.run(sys.argv[1:]); "
             "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    done = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "frcnn_scratch.cli",
                           "detect", str(tmp_path / "photo.jpg"), "--checkpoint", str(ckpt),
                           "--out", str(tmp_path / "out"), "--json", str(tmp_path / "d.json")],
                          capture_output=True, text=True, timeout=300)
    rc, peak_kb = (int(v) for v in done.stdout.split()[-2:])
    assert rc == 0, done.stderr[-2000:]
    assert peak_kb < 400 * 1024, f"detect peaked at {peak_kb / 1024:.0f} MB on a 6000 x 4000 photo"
    picture = Image.open(tmp_path / "out" / "photo_detections.png")
    assert max(picture.size) <= 1600
    results = json.loads((tmp_path / "d.json").read_text())
    assert all(0 <= r["bbox"][0] <= 6000 and 0 <= r["bbox"][1] <= 4000 for r in results)
