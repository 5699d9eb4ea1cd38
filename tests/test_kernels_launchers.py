"""What the launchers do around the kernels: outputs that every program overwrites are allocated
with torch.empty, not filled first (a fill is a whole extra pass over memory: 90 MB per RoI pool
call at paper size); only the gradients, which the kernels add into, start from zeros.

The kernels themselves are not run here (their launch is replaced by a no-op); a torch dispatch
mode records every torch operation the launcher performs.
"""
from frcnn_scratch import kernels  # noqa: F401  (first: the interpreter without a GPU)

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from frcnn_scratch.kernels import iou, nms, roi_align, roi_pool

FILLS = ("zero_", "fill_", "zeros", "full", "zeros_like", "full_like", "ones", "ones_like")


class Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def no_launch(monkeypatch):
    """Kernel launches do nothing (whatever Triton built them as)."""
    for fn in (iou.box_iou_kernel, nms.nms_mask_kernel, nms.nms_scan_kernel,
               roi_pool.roi_pool_forward_kernel, roi_pool.roi_pool_backward_kernel,
               roi_align.roi_align_forward_kernel, roi_align.roi_align_backward_kernel):
        monkeypatch.setattr(type(fn), "run", lambda self, *a, **k: None)


def fills_in(call):
    with Recorder() as rec:
        call()
    return [op for op in rec.ops if op in FILLS]


def test_forward_outputs_are_not_filled(no_launch):
    f, r = torch.randn(1, 8, 6, 7), torch.tensor([[0, 1.0, 1, 30, 40], [0, 5, 5, 9, 9]])
    boxes = torch.tensor([[0, 0, 10, 10], [2, 2, 9, 9.0]])
    assert fills_in(lambda: iou.box_iou(boxes, boxes)) == []
    assert fills_in(lambda: nms.suppression_mask(boxes, 0.5)) == []
    mask = torch.zeros((2, 1), dtype=torch.int64)
    assert fills_in(lambda: nms.scan_mask(mask)) == []
    assert fills_in(lambda: roi_pool.roi_pool_forward(f, r, 7, 7, 0.25)) == []
    assert fills_in(lambda: roi_align.roi_align_forward(f, r, 7, 7, 0.25, 2)) == []


def test_gradients_start_from_zeros(no_launch):
    """The backwards add into their output: one zero fill each, no more."""
    f, r = torch.randn(1, 8, 6, 7), torch.tensor([[0, 1.0, 1, 30, 40]])
    g = torch.randn(1, 8, 7, 7)
    argmax = torch.zeros((1, 8, 7, 7), dtype=torch.int64)
    assert len(fills_in(lambda: roi_pool.roi_pool_backward(g, argmax, f.shape))) == 1
    assert len(fills_in(lambda: roi_align.roi_align_backward(g, r, f.shape, 7, 7, 0.25, 2))) == 1


def test_channels_last_features_are_read_in_place(no_launch):
    """The RoI forwards read a channels-last map; given one (torch.channels_last), no copy is made."""
    f = torch.randn(1, 8, 6, 7).to(memory_format=torch.channels_last)
    r = torch.tensor([[0, 1.0, 1, 30, 40]])
    for call in (lambda: roi_pool.roi_pool_forward(f, r, 7, 7, 0.25),
                 lambda: roi_align.roi_align_forward(f, r, 7, 7, 0.25, 2)):
        with Recorder() as rec:
            call()
        assert not {"clone", "copy_", "_to_copy", "contiguous"} & set(rec.ops), rec.ops
    nchw = f.contiguous()
    with Recorder() as rec:                   # an ordinary (N, C, H, W) map is copied once
        roi_align.roi_align_forward(nchw, r, 7, 7, 0.25, 2)
    assert rec.ops.count("clone") + rec.ops.count("copy_") == 1, rec.ops


# ---- the shared launcher checks, the names the kernels share with the reference ----------------

import ast
import pathlib

import numpy as np

from frcnn_scratch import nms as reference_nms, roi_align as reference_align
from frcnn_scratch import roi_pool as reference_pool
from frcnn_scratch.kernels import _launch

REPO = pathlib.Path(__file__).resolve().parents[1]
KERNEL_DIR = REPO / "kernels"
KERNEL_FILES = {"iou.py": ("frcnn_scratch/boxes.py", "tests/test_kernels_iou.py", "box_iou"),
                "nms.py": ("frcnn_scratch/nms.py", "tests/test_kernels_nms.py", "nms"),
                "roi_pool.py": ("frcnn_scratch/roi_pool.py", "tests/test_kernels_roi_pool.py",
                                "roi_pool"),
                "roi_align.py": ("frcnn_scratch/roi_align.py", "tests/test_kernels_roi_align.py",
                                 "roi_align")}


@pytest.mark.parametrize("name", sorted(KERNEL_FILES))
def test_each_kernel_file_names_its_reference_test_and_benchmark(name):
    reference, test, op = KERNEL_FILES[name]
    doc = ast.get_docstring(ast.parse((KERNEL_DIR / name).read_text()))
    assert f"NumPy reference: {reference}" in doc, doc
    assert f"Tests:           {test}" in doc, doc
    assert f"`frcnn bench --op {op}` (frcnn_scratch/tools/bench.py)" in doc, doc
    for path in (reference, test, "frcnn_scratch/tools/bench.py"):
        assert (REPO / path).exists(), f"{name} names {path}, which does not exist"


def test_kernels_do_not_import_the_numpy_modules():
    """The kernels stand alone: no import of frcnn_scratch's NumPy stage files (`..nms`, ...)."""
    for path in sorted(KERNEL_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1 and "frcnn_scratch" not in (node.module or ""), \
                    f"{path.name} imports {'.' * node.level}{node.module}"
            elif isinstance(node, ast.Import):
                assert not any("frcnn_scratch" in a.name for a in node.names), path.name


def test_kernel_helpers_share_the_references_names():
    """Where a kernel helper computes what a reference helper computes, it has its name."""
    from frcnn_scratch.kernels import roi_align as k_align, roi_pool as k_pool
    for name in ("roi_geometry", "sample_coordinates", "bilinear_weights"):
        assert hasattr(k_align, name) and hasattr(reference_align, name), name
    for name in ("round_half_away", "scaled_roi_cells", "bin_bounds"):
        assert hasattr(k_pool, name) and hasattr(reference_pool, name), name
    assert not hasattr(k_align, "sample_coord") and not hasattr(k_align, "linear_taps")


@pytest.mark.parametrize("threshold", [0.0, 0.1, 0.3, 1 / 3, 0.5, 0.7, 0.30000001, 1.0,
                                       float(np.float32(0.3)), float(np.nextafter(0.7, 1))])
def test_nms_kernel_threshold_is_the_references(threshold):
    got = nms.float32_threshold(threshold)
    assert got == float(reference_nms.float32_threshold(threshold)), threshold
    assert isinstance(got, float)


def test_launch_checks_name_the_argument():
    x = torch.zeros((2, 4))
    assert _launch.tensor(x, "boxes", torch.float32, 2, last_dim=4) is x
    with pytest.raises(ValueError, match=r"boxes: expected a torch.Tensor, got ndarray"):
        _launch.tensor(np.zeros((2, 4), np.float32), "boxes", torch.float32, 2)
    with pytest.raises(ValueError, match=r"boxes: expected a 2-D torch.float32 tensor, got 2-D torch.float64"):
        _launch.tensor(x.double(), "boxes", torch.float32, 2)
    with pytest.raises(ValueError, match=r"boxes: expected a 2-D torch.float32 tensor, got 1-D"):
        _launch.tensor(x[0], "boxes", torch.float32, 2)
    with pytest.raises(ValueError, match=r"rois: expected shape \(N, 5\), got \(2, 4\)"):
        _launch.tensor(x, "rois", torch.float32, 2, last_dim=5)
    with pytest.raises(ValueError, match=r"scores: expected device cpu, got meta"):
        _launch.same_device(torch.empty(2, device="meta"), "scores", x)
    assert _launch.output_size(7, 3) == (7, 3)
    with pytest.raises(ValueError, match=r"pooled_h, pooled_w: expected positive ints"):
        _launch.output_size(0, 3)
    transposed = x.t()
    assert _launch.tensor(transposed, "x", torch.float32, 2).is_contiguous()
    assert _launch.tensor(transposed, "x", torch.float32, 2, contiguous=False) is transposed


def test_launchers_use_the_shared_checks(monkeypatch):
    """Every launcher checks its tensors through _launch (one place for the rules)."""
    from frcnn_scratch.kernels import iou, roi_align, roi_pool
    seen = []
    real = _launch.tensor
    monkeypatch.setattr(_launch, "tensor", lambda x, name, *a, **k: seen.append(name) or real(
        x, name, *a, **k))
    for fn in (iou.box_iou_kernel, nms.nms_mask_kernel, nms.nms_scan_kernel,
               roi_pool.roi_pool_forward_kernel, roi_pool.roi_pool_backward_kernel,
               roi_align.roi_align_forward_kernel, roi_align.roi_align_backward_kernel):
        monkeypatch.setattr(type(fn), "run", lambda self, *a, **k: None)
    f, r = torch.randn(1, 2, 4, 4), torch.tensor([[0, 0, 0, 3.0, 3]])
    boxes = torch.tensor([[0, 0, 2, 2.0]])
    iou.box_iou(boxes, boxes)
    nms.nms(boxes, torch.ones(1), 0.5)
    roi_pool.roi_pool_forward(f, r, 2, 2, 1.0)
    roi_pool.roi_pool_backward(torch.zeros(1, 2, 2, 2), torch.zeros((1, 2, 2, 2), dtype=torch.int64),
                               f.shape)
    roi_align.roi_align_forward(f, r, 2, 2, 1.0)
    roi_align.roi_align_backward(torch.zeros(1, 2, 2, 2), r, f.shape, 2, 2, 1.0)
    assert seen == ["boxes1", "boxes2", "boxes", "scores", "features", "rois", "grad_out", "argmax",
                    "features", "rois", "grad_out", "rois"]
