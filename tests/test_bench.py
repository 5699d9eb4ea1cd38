"""The tools: `frcnn bench` at --small sizes, numpy only (every op line is printed with a time,
the thread settings are stated, --op and bad arguments behave), and `frcnn bench-model` (the
fast, textbook and torchvision sides, their tables, the torch twin built from a model's weights).
Not timing tests: times are not checked."""
import re

import numpy as np
import pytest

from frcnn_scratch import cli
from frcnn_scratch.config import Config, TrainConfig
from frcnn_scratch.fast import threads
from frcnn_scratch.memory import memory_estimate, parameter_count
from frcnn_scratch.model import FasterRCNN
from frcnn_scratch.tools import bench, bench_model
from frcnn_scratch.tools.process import keep_freed_memory

OPS = ["box_iou", "nms 0.7", "roi_pool fwd", "roi_pool fwd+bwd", "roi_align fwd", "roi_align fwd+bwd"]


def run_bench(capsys, *extra):
    args = cli.build_parser().parse_args(["bench", "--small", "--backends", "numpy", "--repeat", "1",
                                          *extra])
    assert bench.main(args) == 0
    return capsys.readouterr().out


def table_rows(out):
    """{(op, size): numpy ms} from the printed table."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("op "))
    rows = {}
    for line in lines[start + 2:]:
        if not line.strip() or line.startswith(("load average", "numpy/tv", "note:")):
            break
        parts = re.split(r"\s{2,}", line.strip())
        rows[(parts[0], parts[1])] = parts[2]
    return rows


def test_small_bench_prints_every_op_with_a_time_and_the_threads(capsys):
    out = run_bench(capsys)
    assert re.search(r"threads: numpy \(OpenBLAS\) \S+, torch \S+; load average", out), out
    rows = table_rows(out)
    ops = {op for op, _ in rows}
    assert ops == set(OPS), f"ops printed {sorted(ops)}, expected {OPS}"
    assert {size for op, size in rows if op == "nms 0.7"} == {"256 uniform", "256 clustered"}
    for key, ms in rows.items():
        assert float(ms) > 0, f"{key}: time {ms!r} is not a positive number"


def test_op_filter_keeps_only_matching_lines(capsys):
    rows = table_rows(run_bench(capsys, "--op", "roi_align"))
    assert {op for op, _ in rows} == {"roi_align fwd", "roi_align fwd+bwd"}, rows


def test_paper_sizes_are_the_issue_s_sizes():
    cases = bench.build_cases(False, __import__("numpy").random.default_rng(0))
    sizes = {(c.op, c.size) for c in cases}
    for n in (2000, 6000, 12000):
        for kind in ("uniform", "clustered"):
            assert ("nms 0.7", f"{n} {kind}") in sizes
    assert ("box_iou", "20000 x 50") in sizes
    for op in OPS[2:]:
        assert (op, "300 RoIs 1x512x38x50 7x7") in sizes


@pytest.mark.parametrize("extra, message", [
    (["--backends", "numpy", "--op", "nothing"], "--op: no op matches nothing"),
    (["--backends", "numpy", "--threads", "0"], "--threads: expected 1.."),
    (["--backends", "numpy,fortran"], "--backends: unknown fortran"),
    (["--backends", ""], "--backends: name at least one of numpy, triton, torchvision"),
    (["--backends", "numpy", "--threads", "65536"], "--threads: expected 1.."),
])
def test_bad_arguments_are_clear_errors(capsys, extra, message):
    args = cli.build_parser().parse_args(["bench", "--small", "--repeat", "1", *extra])
    with pytest.raises(ValueError, match=re.escape(message)):
        bench.main(args)


# ---- frcnn bench-model (and the command's thread option and allocator setting) ---------------

SMALL = dict(channels=(4, 8, 8), anchor_scales=(2.0, 4.0), anchor_ratios=(1.0,), rpn_channels=8,
             fc_hidden=16, pooled_size=3, rpn_post_nms_test=10)      # a small network, real sizes
TINY_SET = ["--set", "channels=[4,8]", "--set", "fc_hidden=16"]


def bench_model_table(out):
    """[{column: text}] of the rows bench-model printed, and the header line's text."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("image "))
    header = re.split(r"\s{2,}", lines[start].strip())
    rows = []
    for line in lines[start + 2:]:
        if not re.match(r"\d+x\d+ ", line):
            break
        rows.append(dict(zip(header, re.split(r"\s{2,}", line.strip()))))
    return lines[0], header, rows


def test_cli_threads_option_is_checked_and_reset(capsys):
    assert cli.main(["train", "--threads", "0", "--iters", "1", "--checkpoint", "never.npz"]) == 2
    assert "--threads: expected an int in 1.." in capsys.readouterr().err
    assert threads.work_threads(96, 160) == 1                     # nothing left behind


def test_bench_model_times_numpy_and_measures_memory(capsys):
    assert cli.main(["bench-model", "--sizes", "64x96", "--repeat", "1", "--numpy-only", "--memory",
                     "--no-textbook"] + TINY_SET) == 0
    first, header, (row,) = bench_model_table(capsys.readouterr().out)
    assert "numpy's BLAS: " in first
    assert header == ["image", "np threads", "numpy train", "numpy predict", "numpy peak MB"]
    assert row["image"] == "64x96"
    assert float(row["numpy train"]) > 0 and float(row["numpy predict"]) > 0
    assert 0 <= float(row["numpy peak MB"]) < 500


def test_bench_model_times_the_textbook_model_beside_the_fast_one(capsys):
    """The textbook model (fast=False) has its own train, predict and peak memory columns, and a
    note says what it is; --no-textbook leaves them out."""
    assert cli.main(["bench-model", "--sizes", "64x96,32x48", "--repeat", "1", "--numpy-only",
                     "--memory"] + TINY_SET) == 0
    out = capsys.readouterr().out
    _, header, rows = bench_model_table(out)
    assert header == ["image", "np threads", "numpy train", "textbook train", "numpy predict",
                      "textbook predict", "numpy peak MB", "textbook peak MB"]
    assert [r["image"] for r in rows] == ["64x96", "32x48"]
    for row in rows:
        for column in header[2:6]:
            assert float(row[column]) > 0, (column, row)
        assert 0 <= float(row["textbook peak MB"]) < 500, row
    assert "note: textbook: FasterRCNN(fast=False)" in out


def test_textbook_twin_is_the_textbook_model_with_the_same_weights():
    model = FasterRCNN(Config(**SMALL, seed=3))
    params = model.params()
    for value in params.values():
        value += 0.01                               # not the weights a fresh model would get
    twin = bench_model.textbook_twin(model)
    assert model.fast and not twin.fast
    assert twin.config == model.config and twin.class_names == model.class_names
    assert twin.params().keys() == params.keys()
    for name, value in twin.params().items():
        np.testing.assert_array_equal(value, params[name], err_msg=name)
        assert not np.shares_memory(value, params[name]), name


def test_openblas_kernels_names_the_kernels_numpy_runs():
    """The name bench-model prints: OpenBLAS's own, which follows OPENBLAS_CORETYPE where the
    environment sets one."""
    import os
    name = threads.openblas_kernels()
    assert name is None or (isinstance(name, str) and name)
    chosen = os.environ.get("OPENBLAS_CORETYPE")
    if name is not None and chosen:
        assert name.lower() == chosen.lower()


def test_bench_model_says_when_the_environment_pins_numpys_kernels(monkeypatch):
    """torch does not read OPENBLAS_CORETYPE: where it is set, the table's note says that the two
    sides may run different kernels, and how to compare them on the CPU's own; unset, no note."""
    monkeypatch.setattr(bench_model, "openblas_kernels", lambda: "Haswell")
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    (note,) = bench_model.pinned_kernels_notes()
    assert "OPENBLAS_CORETYPE=Haswell" in note and "env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE" in note
    monkeypatch.delenv("OPENBLAS_CORETYPE")
    assert bench_model.pinned_kernels_notes() == []
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    monkeypatch.setattr(bench_model, "openblas_kernels", lambda: None)     # numpy on another BLAS
    assert bench_model.pinned_kernels_notes() == []


def test_sides_take_turns_in_blocks_and_the_call_after_the_other_side_is_not_timed():
    """A side is slow right after the other one ran (torch's spinning threads); the medians are of
    the calls that follow a call of the same side, `repeat` of them per side and kind of call."""
    import time
    log = []

    class Side:
        def __init__(self, name):
            self.name = name

        def _call(self, what):
            after_other = not log or log[-1][0] != self.name     # the first call too
            log.append((self.name, what))
            time.sleep(0.03 if after_other else 0.001)

        def train(self, sample):
            self._call("train")

        def predict(self, sample):
            self._call("predict")

    t = bench_model.interleaved_medians({"a": Side("a"), "b": Side("b")}, [None], repeat=3, block=2)
    assert set(t) == {(n, w) for n in "ab" for w in ("train", "predict")}
    assert all(ms < 15 for ms in t.values()), t            # timed: the slow first calls median 30
    assert log[:4] == [("a", "train")] * 2 + [("b", "train")] * 2
    assert sum(1 for entry in log if entry == ("a", "train")) == 2 * 3   # 3 blocks of 2
    with pytest.raises(ValueError, match="block"):
        bench_model.interleaved_medians({"a": Side("a")}, [None], repeat=1, block=1)


def test_the_command_keeps_freed_memory_on_glibc():
    """frcnn's allocator setting takes effect where the C library is glibc (this CI's), and is a
    quiet no-op elsewhere."""
    import platform
    done = keep_freed_memory()
    assert isinstance(done, bool)
    if platform.libc_ver()[0] == "glibc":
        assert done


def test_memory_estimate_is_above_the_measured_peak_but_not_far():
    """check_memory refuses images by memory.memory_estimate: it must cover what a step really
    holds (measured in a fresh process), and not refuse sizes that fit by being far above it."""
    cfg = Config()
    peak = bench_model.peak_memory_mb("numpy", (240, 400), 1, [], repeat=2)
    assert peak is not None and peak > 5
    estimate = (memory_estimate(cfg, (240, 400)) - parameter_count(cfg) * 4 * 3) / 2 ** 20
    assert peak <= estimate <= 4 * peak + 20, (peak, estimate)


@pytest.mark.parametrize("argv,match", [
    (["--sizes", "64by96"], "--sizes"), (["--sizes", "16x96"], "at least 32"),
    (["--threads", "0"], "--threads"), (["--threads", "many"], "--threads"),
    (["--repeat", "0"], "--repeat"), (["--set", "no_such=1"], "--set 'no_such=1'")])
def test_bench_model_bad_options(argv, match, capsys):
    assert cli.main(["bench-model", "--numpy-only"] + argv) == 2
    assert match in capsys.readouterr().err


def test_sample_at_has_the_exact_size_and_objects_inside():
    for h, w in bench_model.parse_sizes("96x160,240x400"):
        s = bench_model.sample_at(h, w, seed=2)
        assert s["image"].shape == (h, w, 3) and len(s["boxes"]) >= 1
        assert (s["boxes"][:, 2] <= w).all() and (s["boxes"][:, 3] <= h).all()


@pytest.mark.parametrize("fast", [True, False])
def test_torch_layers_compute_what_the_numpy_layers_compute(fast):
    """The twin's layers (torch), built from the config and params(), hold the model's weights:
    same features, RPN outputs and head outputs to float32 rounding, for the fast and the
    textbook model alike."""
    torch = pytest.importorskip("torch")
    model = FasterRCNN(Config(**SMALL), fast=fast)
    t = bench_model.torch_layers(model)
    x = model.preprocess(bench_model.sample_at(64, 96, seed=0)["image"])
    features = model.features(x)
    with torch.no_grad():
        tf = t["backbone"](torch.from_numpy(x))
        np.testing.assert_allclose(tf.numpy(), features, rtol=1e-4, atol=1e-4)
        hidden = torch.relu(t["rpn_conv"](tf))
        logits, deltas = model.rpn.forward(features)
        ours = logits.reshape(features.shape[2], features.shape[3], -1).transpose(2, 0, 1)
        np.testing.assert_allclose(t["rpn_cls"](hidden)[0].numpy(), ours, rtol=1e-4, atol=1e-4)
        ours = deltas.reshape(features.shape[2], features.shape[3], -1).transpose(2, 0, 1)
        np.testing.assert_allclose(t["rpn_reg"](hidden)[0].numpy(), ours, rtol=1e-4, atol=1e-4)
        flat = np.random.default_rng(0).standard_normal((3, t["fc6"].in_features)).astype(np.float32)
        np.testing.assert_allclose(t["fc6"](torch.from_numpy(flat)).numpy(),
                                   model.head.layers["fc6"].forward(flat), rtol=1e-4, atol=1e-4)
    for name in ("fc7", "cls_score", "bbox_pred"):
        np.testing.assert_array_equal(t[name].weight.detach().numpy(),
                                      model.params()[f"head.{name}.weight"], err_msg=name)


def test_torch_layers_refuse_weights_the_config_does_not_make():
    pytest.importorskip("torch")
    model = FasterRCNN(Config(**SMALL))
    model.config = model.config.replace(fc_hidden=32)
    with pytest.raises(ValueError, match=r"torch_layers: head.fc6.weight is \(16, 72\)"):
        bench_model.torch_layers(model)


@pytest.mark.parametrize("fast", [True, False])
def test_torchvision_twin_trains_and_predicts(fast):
    """Where torchvision imports (not on CPU-only CI machines whose wheel is a CUDA build)."""
    torch = pytest.importorskip("torch")
    try:
        import torchvision
    except Exception as e:                       # ImportError, or C ops built for another torch
        pytest.skip(f"torchvision not importable: {type(e).__name__}")
    model = FasterRCNN(Config(**SMALL), fast=fast)
    side = bench_model.TorchSide(bench_model.torchvision_twin(model, torchvision), torch,
                                 TrainConfig())
    sample = bench_model.sample_at(96, 128, seed=0)
    side.train(sample)
    side.predict(sample)
