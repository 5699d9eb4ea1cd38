"""Triton kernels for the hot paths: pairwise IoU, NMS, RoI pool and RoI Align (fwd + bwd).

Kernels take and return torch tensors.  With no CUDA device, Triton's interpreter runs them
on the CPU; it must be switched on before any kernel is defined, so it is done here, first.
"""
import os
import sys

try:
    import torch as _torch
    _HAS_CUDA = _torch.cuda.is_available()
except ImportError:  # the numpy backend works without torch; the kernels need it
    _HAS_CUDA = False

if not _HAS_CUDA:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        # triton.language's own jit functions (tl.sum, ...) were defined without the interpreter
        raise RuntimeError("kernels: triton was imported before kernels on a machine without a "
                           "GPU; import kernels (or frcnn_scratch's triton backend) before triton, "
                           "or set TRITON_INTERPRET=1 in the environment")
    os.environ.setdefault("TRITON_INTERPRET", "1")


def device():
    """Where kernel inputs should live: "cuda" on a GPU machine, else "cpu" (interpreter)."""
    return "cuda" if _HAS_CUDA else "cpu"
