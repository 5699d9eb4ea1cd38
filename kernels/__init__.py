"""Triton kernels for the hot paths: pairwise IoU, NMS, RoI pool and RoI Align (fwd + bwd).

Installed as `frcnn_scratch.kernels` (the folder is kernels/ at the top of the repository), so it
can neither shadow nor be shadowed by the unrelated `kernels` package on the package index.

Kernels take and return torch tensors.  With no CUDA device, Triton's interpreter runs them on the
CPU (exact, slow: for tests and learning).  The interpreter must be on before a kernel is defined,
so it is switched on here, before the kernel modules are imported:

* TRITON_INTERPRET unset and no GPU: set it to 1.  If triton was imported already (torchvision and
  torch.optim import it), triton.language's own @triton.jit helpers (tl.cdiv, tl.max, ...) were
  built for the compiler; they are re-wrapped for the interpreter, so import order does not matter.
* TRITON_INTERPRET=1 set by the user: the interpreter, also on a GPU machine.
* TRITON_INTERPRET=0 set by the user: compiled kernels.  `frcnn kernels` does this to compile every
  kernel for real GPUs on a machine without one (frcnn_scratch/tools/compile_report.py); launching them then
  needs a GPU.
"""
import os
import sys

try:
    import torch as _torch
    _HAS_CUDA = _torch.cuda.is_available()
except ImportError:  # the numpy backend works without torch; the kernels need it
    _HAS_CUDA = False


def _interpret_triton_language():
    """Re-wrap the @triton.jit functions that triton.language defined before the interpreter was
    switched on (triton was imported first), so that interpreted kernels can call them."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    for name, module in list(sys.modules.items()):
        if module is None or not (name == "triton.language" or name.startswith("triton.language.")):
            continue
        for attr, value in list(vars(module).items()):
            if isinstance(value, JITFunction):
                setattr(module, attr, InterpretedFunction(value.fn))


if not _HAS_CUDA and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"
    if "triton" in sys.modules:
        try:
            _interpret_triton_language()
        except ImportError as e:  # a triton without these internals: say what to do instead
            raise RuntimeError(
                "frcnn_scratch.kernels: triton was imported before the kernels on a machine "
                f"without a GPU, and this triton cannot switch to its interpreter afterwards ({e}); "
                "import frcnn_scratch.kernels before torchvision / triton, or set "
                "TRITON_INTERPRET=1 in the environment") from None


def interpreted():
    """True when the kernels run in Triton's CPU interpreter (no GPU, or TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def device():
    """Where kernel inputs should live: "cuda" on a GPU machine, else "cpu" (interpreter)."""
    return "cuda" if _HAS_CUDA and not interpreted() else "cpu"
