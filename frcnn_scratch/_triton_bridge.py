"""The "triton" backend as ops.py sees it: NumPy in, NumPy out, Triton kernels in between.

ops.py validates every input once (float32 arrays of the right shapes, finite, x2 >= x1, batch
indices that name an image, output_size as (h, w)) and then calls one of these functions with
exactly the signature of the reference's unchecked core (boxes._box_iou, nms._nms,
roi_pool._roi_pool_forward, ...).  Like the cores, they trust their inputs: no value is scanned
again here, and the launchers check only what is O(1) (tensor types, dtypes, shapes, devices).
Each one moves the arrays to torch tensors on kernels.device() (CUDA on a GPU machine, else the
CPU, where Triton's interpreter runs the kernels), calls the kernel launcher, and brings the
result back as NumPy.  Only ops.py imports this module (only ops.py chooses a backend).

What a call moves (on a GPU, host <-> device copies cost more than the kernels):
  box_iou       in: both box sets            out: the (N, M) matrix
  nms           in: boxes, scores            out: the kept indices
  roi_pool      in: features, rois           out: out and argmax (int64, twice out's bytes)
  roi_pool_bwd  in: grad_out (argmax: no, see below)                out: the features' gradient
  roi_align     in: features, rois           out: out
  roi_align_bwd in: grad_out, rois           out: the features' gradient
roi_pool's argmax goes straight back into roi_pool_backward, so the device copy of every array this
module returns is remembered (weakly: it goes when the array goes), and that array, passed back
unchanged, is not copied again.  Returned arrays are read-only so that "unchanged" holds; a
writable copy (np.array(a)) is copied to the device like any input.  moved_bytes() counts the
bytes copied each way, for `frcnn bench`.
"""
import functools
import weakref

import numpy as np
import torch

from . import kernels
from .kernels import iou as _iou, nms as _nms, roi_align as _roi_align, roi_pool as _roi_pool

_moved = {"to_device": 0, "to_host": 0}
_on_device = {}  # id(returned array) -> (weakref to it, its device tensor)


def moved_bytes(reset=False):
    """{"to_device": bytes, "to_host": bytes} copied by the calls so far (reset: start again)."""
    counts = dict(_moved)
    if reset:
        _moved.update(to_device=0, to_host=0)
    return counts


def _to_device(array, dtype=torch.float32):
    """The array as a contiguous torch tensor on the kernels' device: the remembered device copy
    of an array this module returned, else a copy (the kernels never see the caller's memory; the
    interpreter copies a tensor's whole storage, which must not be part of a larger array)."""
    entry = _on_device.get(id(array))
    if entry is not None and entry[0]() is array and not array.flags.writeable:
        return entry[1]
    tensor = torch.tensor(np.ascontiguousarray(array), dtype=dtype, device=kernels.device())
    _moved["to_device"] += tensor.numel() * tensor.element_size()
    return tensor


def _to_numpy(tensor, remember=False):
    """The tensor as a NumPy array (read-only when remembered for _to_device)."""
    array = tensor.detach().cpu().numpy()
    _moved["to_host"] += array.nbytes
    if remember:
        array.flags.writeable = False
        key = id(array)
        _on_device[key] = (weakref.ref(array, lambda _, key=key: _on_device.pop(key, None)),
                           tensor)
    return array


def _out_of_memory(error):
    """Is this torch error an allocation failure (torch.OutOfMemoryError on a GPU, the CPU
    allocator's RuntimeError without one)?"""
    text = str(error)
    return (isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in text
            or "out of memory" in text.lower())


def _memory_errors(op):
    """Let an allocation failure be a MemoryError, as NumPy's is on the numpy backend (not one of
    torch's RuntimeErrors), so callers handle both backends alike."""
    @functools.wraps(op)
    def wrapped(*args, **kwargs):
        try:
            return op(*args, **kwargs)
        except RuntimeError as e:
            if not _out_of_memory(e):
                raise
            raise MemoryError(f"{op.__name__} on the triton backend ({kernels.device()}): "
                              f"{str(e).strip().splitlines()[-1][:200]}") from None
    return wrapped


@_memory_errors
def box_iou(boxes1, boxes2):
    """(N, 4), (M, 4) float32 xyxy -> (N, M) float32 IoU (kernels/iou.py)."""
    return _to_numpy(_iou.box_iou(_to_device(boxes1), _to_device(boxes2)))


@_memory_errors
def nms(boxes, scores, iou_threshold, max_keep=None):
    """(N, 4) boxes, (N,) scores -> (K,) int64 kept indices, best first (kernels/nms.py); the
    kernel suppresses in one pass over all boxes, so max_keep only shortens the result."""
    keep = _nms.nms(_to_device(boxes), _to_device(scores), float(iou_threshold))
    return _to_numpy(keep).astype(np.int64, copy=False)[:max_keep]


@_memory_errors
def roi_pool_forward(features, rois, output_size, spatial_scale):
    """-> (out (K, C, ph, pw) float32, argmax (K, C, ph, pw) int64) (kernels/roi_pool.py)."""
    ph, pw = output_size
    out, argmax = _roi_pool.roi_pool_forward(_to_device(features), _to_device(rois), ph, pw,
                                             float(spatial_scale))
    return _to_numpy(out), _to_numpy(argmax, remember=True)


@_memory_errors
def roi_pool_backward(grad_out, argmax, input_shape):
    """(K, C, ph, pw) grad_out and the forward's argmax -> (N, C, H, W) float32 gradient."""
    grad = _roi_pool.roi_pool_backward(_to_device(grad_out), _to_device(argmax, torch.int64),
                                       tuple(input_shape))
    return _to_numpy(grad)


@_memory_errors
def roi_align_forward(features, rois, output_size, spatial_scale, sampling_ratio=-1,
                      aligned=False):
    """-> (K, C, ph, pw) float32 (kernels/roi_align.py)."""
    ph, pw = output_size
    out = _roi_align.roi_align_forward(_to_device(features), _to_device(rois), ph, pw,
                                       float(spatial_scale), int(sampling_ratio), bool(aligned))
    return _to_numpy(out)


@_memory_errors
def roi_align_backward(grad_out, rois, input_shape, output_size, spatial_scale,
                       sampling_ratio=-1, aligned=False):
    """(K, C, ph, pw) grad_out -> (N, C, H, W) float32 gradient of the features."""
    ph, pw = output_size
    grad = _roi_align.roi_align_backward(_to_device(grad_out), _to_device(rois),
                                         tuple(input_shape), ph, pw, float(spatial_scale),
                                         int(sampling_ratio), bool(aligned))
    return _to_numpy(grad)


# ops.py calls these under the names of its ops: roi_pool / roi_align are the forwards.
roi_pool = roi_pool_forward
roi_align = roi_align_forward
