"""The backend switch: the one place that chooses the NumPy reference or the Triton kernels.

Every op below takes NumPy arrays and returns NumPy arrays.  `backend=None` means "the current
backend": set by `set_backend`, `use_backend`, or the environment variable FRCNN_BACKEND
(default "numpy").  With "triton" the arrays become torch tensors (on CUDA when a GPU is
present), `kernels` runs them, and the results come back as NumPy.

Validate at the door (torchvision's ops/roi_align.py): each public op checks its inputs and
dispatches in one statement to the chosen backend's unchecked core (the reference's `_box_iou`,
`_nms`, `_roi_pool_forward`, ... or the triton bridge).  Stages that checked their arrays at
their own door call the `_` twins below (`_box_iou`, `_nms`, `_batched_nms`), which dispatch
without checking again.
"""
import contextlib
import functools
import os
import threading

import numpy as np

from . import _checks
from . import boxes as _boxes_ref, nms as _nms_ref                 # the reference modules
from . import roi_align as _roi_align_ref, roi_pool as _roi_pool_ref

BACKENDS = ("numpy", "triton")
_current = None  # set lazily from FRCNN_BACKEND so that importing never fails


def check_backend(name, allow_none=False):
    """`name` if it is one of BACKENDS (or None, when allow_none); else a ValueError listing the choices.

    Only checks the name: whether triton can be imported is checked when the backend is used.
    """
    if name is None and allow_none:
        return None
    if not isinstance(name, str) or name not in BACKENDS:
        choices = ", ".join(BACKENDS) + (" or None (the current default)" if allow_none else "")
        raise ValueError(f"backend: unknown backend {name!r}; choose one of {choices}")
    return name


def get_backend():
    """The backend ops use when called without `backend=`."""
    global _current
    if _current is None:
        _current = check_backend(os.environ.get("FRCNN_BACKEND", "numpy"))
    return _current


def set_backend(name):
    """Make `name` ("numpy" or "triton") the default backend; checks triton can be imported."""
    global _current
    _impl(name)
    _current = name


@contextlib.contextmanager
def use_backend(name):
    """`with use_backend("triton"): ...` runs the block with another default backend."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


class _NumpyImpl:
    """The readable reference: the unchecked cores of frcnn_scratch's stage files."""
    box_iou = staticmethod(_boxes_ref._box_iou)
    nms = staticmethod(_nms_ref._nms)
    roi_pool = staticmethod(_roi_pool_ref._roi_pool_forward)
    roi_pool_backward = staticmethod(_roi_pool_ref._roi_pool_backward)
    roi_align = staticmethod(_roi_align_ref._roi_align_forward)
    roi_align_backward = staticmethod(_roi_align_ref._roi_align_backward)


@functools.lru_cache(maxsize=None)
def _triton_impl():
    try:
        import torch  # noqa: F401
        from . import kernels  # noqa: F401  (first: sets TRITON_INTERPRET=1 without a GPU, before triton loads)
        import triton  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            f"backend 'triton' needs torch and triton ({e}). Install them with "
            "`pip install torch==2.13.0` (CPU build; or a CUDA build on a GPU machine) and then "
            "`pip install 'frcnn-scratch[triton]'`; the numpy backend works without them."
        ) from None
    from . import _triton_bridge
    return _triton_bridge


def _impl(backend):
    name = get_backend() if backend is None else check_backend(backend)
    return _NumpyImpl if name == "numpy" else _triton_impl()


# Triton's interpreter (no GPU) swaps triton.language's functions for its own while a kernel runs,
# so two threads running kernels at once break each other ("Did you forget to add @triton.jit?").
# The training step runs stages on threads (threads.background), so triton calls take turns.
_TRITON_LOCK = threading.RLock()


def _run(backend, op, *args):
    """impl.op(*args) for the chosen backend; triton calls one at a time."""
    impl = _impl(backend)
    if impl is _NumpyImpl:
        return getattr(impl, op)(*args)
    with _TRITON_LOCK:
        return getattr(impl, op)(*args)


# ---- the public ops: check, then dispatch ----------------------------------------------------

def box_iou(boxes1, boxes2, backend=None):
    """Pairwise IoU of (N, 4) and (M, 4) xyxy boxes -> (N, M) float32; zero union gives 0."""
    return _box_iou(_checks.as_boxes(boxes1, "boxes1"), _checks.as_boxes(boxes2, "boxes2"),
                    backend)


def nms(boxes, scores, iou_threshold, backend=None, max_keep=None):
    """Greedy NMS (section 3.3): int64 indices kept, highest score first, ties by lower index;
    max_keep: at most that many, the first of the whole NMS (nms.nms)."""
    boxes, scores, iou_threshold = _nms_ref.check_nms_inputs(boxes, scores, iou_threshold)
    max_keep = None if max_keep is None else _checks.whole_number(max_keep, "max_keep")
    return _nms(boxes, scores, iou_threshold, backend, max_keep)


def batched_nms(boxes, scores, classes, iou_threshold, backend=None):
    """NMS within each class separately; indices kept, by score over all classes."""
    boxes, scores, iou_threshold = _nms_ref.check_nms_inputs(boxes, scores, iou_threshold)
    classes = _nms_ref.check_classes(classes, len(boxes))
    return _batched_nms(boxes, scores, classes, iou_threshold, backend)


def roi_pool(features, rois, output_size, spatial_scale, backend=None):
    """RoI max pooling (Fast R-CNN 2.1) -> (out (K, C, ph, pw) float32, argmax (K, C, ph, pw) int64).

    argmax holds the flat index into `features` of each bin's maximum (-1 for an empty bin).
    """
    return _run(backend, "roi_pool", *_roi_pool_ref.check_forward_inputs(
        features, rois, output_size, spatial_scale))


def roi_pool_backward(grad_out, argmax, input_shape, backend=None):
    """Gradient of features: each grad_out value goes to the feature its argmax names."""
    return _run(backend, "roi_pool_backward", *_roi_pool_ref.check_backward_inputs(
        grad_out, argmax, input_shape))


def roi_align(features, rois, output_size, spatial_scale, sampling_ratio=-1, aligned=False,
              backend=None):
    """RoI Align (Mask R-CNN 3): mean of bilinear samples per bin -> (K, C, ph, pw) float32."""
    return _run(backend, "roi_align", *_roi_align_ref.check_forward_inputs(
        features, rois, output_size, spatial_scale, sampling_ratio, aligned))


def roi_align_backward(grad_out, rois, input_shape, output_size, spatial_scale,
                       sampling_ratio=-1, aligned=False, backend=None):
    """Gradient of features: grad_out spread back by the same bilinear weights."""
    return _run(backend, "roi_align_backward", *_roi_align_ref.check_backward_inputs(
        grad_out, rois, input_shape, output_size, spatial_scale, sampling_ratio, aligned))


# ---- the same ops on arrays already checked (by a stage's own door) ---------------------------

def _box_iou(boxes1, boxes2, backend=None):
    """box_iou of checked (N, 4), (M, 4) float32 boxes."""
    return _run(backend, "box_iou", boxes1, boxes2)


def _nms(boxes, scores, iou_threshold, backend=None, max_keep=None):
    """nms of checked inputs (nms.check_nms_inputs; max_keep None or an int)."""
    return _run(backend, "nms", boxes, scores, iou_threshold, max_keep)


def _batched_nms(boxes, scores, classes, iou_threshold, backend=None):
    """batched_nms of checked inputs ((N,) int64 classes); each class's NMS on the backend."""
    _impl(backend)                                            # an unknown backend fails here
    return _nms_ref._batched_nms(boxes, scores, classes, iou_threshold,
                             lambda b, s, t: _run(backend, "nms", b, s, t))
