"""The backend switch in ops.py: set_backend / get_backend / use_backend / FRCNN_BACKEND / backend=,
unknown names, and a clear message when triton cannot be imported."""
from frcnn_scratch import kernels  # noqa: F401  (first: switches the interpreter on before triton is imported)

import builtins
import os
import subprocess
import sys

import numpy as np
import pytest

import frcnn_scratch as fr
from frcnn_scratch import ops

BOXES = np.array([[0, 0, 2, 2], [1, 1, 3, 3]], np.float32)


@pytest.fixture(autouse=True)
def fresh_backend(monkeypatch):
    """Each test starts with no backend chosen and no FRCNN_BACKEND, and leaves none behind."""
    monkeypatch.delenv("FRCNN_BACKEND", raising=False)
    monkeypatch.setattr(ops, "_current", None)
    ops._triton_impl.cache_clear()
    yield
    ops._triton_impl.cache_clear()


@pytest.fixture
def spy_triton(monkeypatch):
    """Record calls that reach the triton bridge's box_iou."""
    from frcnn_scratch import _triton_bridge
    calls = []
    real = _triton_bridge.box_iou

    def spy(a, b):
        calls.append(len(a))
        return real(a, b)
    monkeypatch.setattr(_triton_bridge, "box_iou", spy)
    return calls


def test_default_is_numpy():
    assert fr.get_backend() == "numpy"


def test_set_backend_changes_the_default(spy_triton):
    fr.set_backend("triton")
    assert fr.get_backend() == "triton"
    got = ops.box_iou(BOXES, BOXES)
    assert spy_triton == [2], "ops.box_iou without backend= should have used triton"
    assert np.array_equal(got, ops.box_iou(BOXES, BOXES, backend="numpy"))
    fr.set_backend("numpy")
    ops.box_iou(BOXES, BOXES)
    assert spy_triton == [2], "after set_backend('numpy') triton should not be called"


def test_backend_argument_overrides_the_default(spy_triton):
    ops.box_iou(BOXES, BOXES, backend="triton")
    assert fr.get_backend() == "numpy" and spy_triton == [2]


def test_use_backend_restores_the_previous_one_even_on_error(spy_triton):
    with fr.use_backend("triton"):
        assert fr.get_backend() == "triton"
        ops.box_iou(BOXES, BOXES)
    assert fr.get_backend() == "numpy" and spy_triton == [2]
    with pytest.raises(KeyError):
        with fr.use_backend("triton"):
            raise KeyError("inside the block")
    assert fr.get_backend() == "numpy"


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("FRCNN_BACKEND", "triton")
    assert fr.get_backend() == "triton"


def test_environment_variable_in_a_fresh_process():
    env = dict(os.environ, FRCNN_BACKEND="triton")
    code = "import frcnn_scratch as fr; print(fr.get_backend())"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "triton"


@pytest.mark.parametrize("call", [
    lambda: fr.set_backend("cuda"),
    lambda: ops.box_iou(BOXES, BOXES, backend="torch"),
    lambda: ops.nms(BOXES, np.ones(2), 0.5, backend="Numpy"),
])
def test_unknown_name_lists_the_choices(call):
    with pytest.raises(ValueError, match="numpy, triton"):
        call()
    assert fr.get_backend() == "numpy", "a rejected name must not become the default"


def test_unknown_environment_value_lists_the_choices(monkeypatch):
    monkeypatch.setenv("FRCNN_BACKEND", "gpu")
    with pytest.raises(ValueError, match="'gpu'.*numpy, triton"):
        fr.get_backend()


def test_missing_triton_says_how_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_triton(name, *args, **kwargs):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("No module named 'triton'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_triton)
    monkeypatch.delitem(sys.modules, "triton")  # restored by monkeypatch afterwards
    ops._triton_impl.cache_clear()
    with pytest.raises(RuntimeError, match="pip install") as info:
        fr.set_backend("triton")
    assert "triton" in str(info.value) and "numpy backend" in str(info.value)
    assert fr.get_backend() == "numpy", "a failed set_backend must leave the default alone"
    with pytest.raises(RuntimeError, match="pip install"):
        ops.box_iou(BOXES, BOXES, backend="triton")
    assert np.array_equal(ops.box_iou(BOXES, BOXES), ops.box_iou(BOXES, BOXES, backend="numpy"))


def test_bad_input_is_rejected_before_dispatch():
    with pytest.raises(ValueError, match="boxes1"):
        ops.box_iou(np.zeros((2, 3)), BOXES, backend="triton")
    with pytest.raises(ValueError, match="x2 < x1"):
        ops.nms(np.array([[2, 0, 1, 1]]), np.ones(1), 0.5, backend="triton")


IMPORT_ORDER_SCRIPT = """
import triton                          # first, as `import torchvision` or torch.optim would
import numpy as np
from frcnn_scratch import ops
rng = np.random.default_rng(0)
xy = rng.uniform(0, 50, (70, 2)).astype(np.float32)
boxes = np.concatenate([xy, xy + rng.uniform(1, 20, (70, 2)).astype(np.float32)], axis=1)
scores = rng.random(70).astype(np.float32)
features = rng.standard_normal((1, 3, 6, 7)).astype(np.float32)
rois = np.concatenate([np.zeros((5, 1), np.float32), boxes[:5] / 8], axis=1)
for name, args in [("box_iou", (boxes, boxes)), ("nms", (boxes, scores, 0.5)),
                   ("roi_pool", (features, rois, 2, 1.0)), ("roi_align", (features, rois, 2, 1.0))]:
    got = getattr(ops, name)(*args, backend="triton")
    want = getattr(ops, name)(*args, backend="numpy")
    for g, w in zip(got if isinstance(got, tuple) else [got], want if isinstance(want, tuple) else [want]):
        assert np.allclose(g, w, rtol=1e-5, atol=1e-6) if name == "roi_align" else np.array_equal(g, w), name
print("same results")
"""


@pytest.mark.skipif(kernels.device() == "cuda", reason="the interpreter is only used without a GPU")
def test_triton_imported_before_the_kernels_still_works():
    """Triton imported before the kernels (torchvision and torch.optim import it): the kernels
    still switch to the interpreter and give the reference's results."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", IMPORT_ORDER_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "same results" in done.stdout, done.stderr[-2000:]


def test_kernels_are_not_a_top_level_package():
    """Installed as frcnn_scratch.kernels: no top-level `kernels` to collide with the package of
    that name on the index (run from another folder, so the checkout itself is not on the path)."""
    done = subprocess.run([sys.executable, "-c", "import frcnn_scratch.kernels, importlib.util; "
                           "print(importlib.util.find_spec('kernels'))"],
                          capture_output=True, text=True, timeout=120, cwd=os.path.dirname(sys.executable))
    assert done.returncode == 0 and done.stdout.strip() == "None", done.stdout + done.stderr[-500:]


def test_triton_ops_from_several_threads_at_once_are_right():
    """The training step runs stages on threads; without a GPU Triton's interpreter swaps
    triton.language's functions while a kernel runs, so two threads' kernels broke each other
    (InterpreterError).  ops runs triton calls one at a time: every result equals NumPy's."""
    import threading
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 50, (120, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 20, (120, 2))], 1).astype(np.float32)
    scores = rng.random(120).astype(np.float32)
    want_iou = ops.box_iou(boxes, boxes[:5], backend="numpy")
    want_nms = ops.nms(boxes, scores, 0.5, backend="numpy")
    errors = []

    def work(kind):
        try:
            for _ in range(6):
                if kind:
                    got = ops.nms(boxes, scores, 0.5, backend="triton")
                    ok = np.array_equal(got, want_nms)
                else:
                    ok = np.array_equal(ops.box_iou(boxes, boxes[:5], backend="triton"), want_iou)
                if not ok:
                    errors.append("wrong result")
        except Exception as e:                     # noqa: BLE001 (collected, asserted below)
            errors.append(repr(e))

    workers = [threading.Thread(target=work, args=(k % 2,)) for k in range(4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert errors == []
