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
