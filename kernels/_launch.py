"""The checks every kernel launcher makes before a launch, in one place.

They are O(1): the type, dtype, number of dimensions and device of each torch tensor, and the
pooled sizes.  No value is read here: NaN / Inf, x2 < x1 and batch indices are checked once, where
the user calls in (frcnn_scratch.ops and the stage functions), not again on every launch.
"""
import torch


def tensor(x, name, dtype, ndim, last_dim=None, contiguous=True):
    """`x` if it is a torch.Tensor of `dtype` with `ndim` dimensions (and last dimension
    `last_dim` when given); made contiguous unless told not to.  A ValueError naming it otherwise."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype != dtype or x.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D {dtype} tensor, got {x.dim()}-D {x.dtype}")
    if last_dim is not None and x.shape[-1] != last_dim:
        want = "(" + ", ".join(["N"] + ["_"] * (ndim - 2) + [str(last_dim)]) + ")"
        raise ValueError(f"{name}: expected shape {want}, got {tuple(x.shape)}")
    return x.contiguous() if contiguous else x


def same_device(x, name, like):
    """A ValueError naming `x` unless it lives on `like`'s device."""
    if x.device != like.device:
        raise ValueError(f"{name}: expected device {like.device}, got {x.device}")


def output_size(pooled_h, pooled_w):
    """The reference's output_size, (ph, pw): two positive ints."""
    if pooled_h <= 0 or pooled_w <= 0:
        raise ValueError(f"pooled_h, pooled_w: expected positive ints, got {(pooled_h, pooled_w)}")
    return int(pooled_h), int(pooled_w)


def channels_last(features):
    """(N, C, H, W) -> a contiguous (N, H, W, C) tensor: a cell's C values side by side.  A copy,
    unless the features are already stored channels last (torch.channels_last): then a view."""
    return features.permute(0, 2, 3, 1).contiguous()


MAX_SAMPLING_RATIO = 256  # frcnn_scratch._checks.MAX_SAMPLING_RATIO: beyond, a launch runs ~forever


def sampling_ratio(value):
    """RoI Align's samples per bin side: an int at most MAX_SAMPLING_RATIO (<= 0: adaptive)."""
    if int(value) != value or value > MAX_SAMPLING_RATIO:
        raise ValueError(f"sampling_ratio: expected an int at most {MAX_SAMPLING_RATIO} "
                         f"(<= 0: adaptive), got {value!r}")
    return int(value)
