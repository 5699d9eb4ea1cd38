"""Input checks shared by every stage: fail early, name the argument, say what was expected.

Each public function checks its inputs once, at its door, and then calls an unchecked core that
trusts them (torchvision's pattern: `roi_align` checks, `_roi_align` computes).  The helpers named
in ARRAY_CHECKS read every value of an array (NaN / Inf, x2 < x1, batch indices, label ranges):
they belong at a door, never inside a core (tests/test_checks.py counts them in a training step).
"""
import numpy as np

ARRAY_CHECKS = ("as_float_array", "as_float_values", "as_boxes", "as_rois", "as_features",
                "as_labels")


MAX_COORDINATE = 1e18   # |box and RoI coordinates| at most this: (2e18)**2 * 2 < float32's max,
                        # so areas and unions stay finite on both backends
MAX_SAMPLING_RATIO = 256    # RoI Align samples per bin side at most (65,536 per bin)


def _refuse_non_real(x, name):
    """Complex numbers and strings are not real numbers: NumPy would drop an imaginary part
    (with a warning) or parse "1.5"; refuse them, naming the argument."""
    kind = x.dtype.kind if isinstance(x, np.ndarray) else np.asarray(x).dtype.kind
    if kind == "O":
        flat = np.asarray(x, dtype=object).reshape(-1)
        kind = next(("c" if isinstance(v, complex) else "U" for v in flat
                     if isinstance(v, (complex, str, bytes))), "O")
    if kind in "cUSV":
        what = "complex numbers" if kind == "c" else "text"
        raise ValueError(f"{name}: expected real numbers, got {what}")


def as_float_array(x, name, ndim=None, last_dim=None, allow_empty=True):
    """Return `x` as a float32 array; raise a ValueError naming `name` on a bad shape, NaN/Inf,
    or values that are not real numbers (complex, text)."""
    if not (isinstance(x, np.ndarray) and x.dtype.kind in "fiub"):
        _refuse_non_real(x, name)
    try:
        arr = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: expected an array of numbers, got {type(x).__name__} ({e})") from None
    if ndim is not None and arr.ndim != ndim:
        want = _shape_text(ndim, last_dim)
        raise ValueError(f"{name}: expected shape {want}, got {tuple(arr.shape)}")
    if last_dim is not None and arr.shape[-1] != last_dim:
        want = _shape_text(ndim if ndim is not None else arr.ndim, last_dim)
        raise ValueError(f"{name}: expected shape {want}, got {tuple(arr.shape)}")
    if not allow_empty and arr.size == 0:
        raise ValueError(f"{name}: expected a non-empty array, got shape {tuple(arr.shape)}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: contains NaN or Inf")
    return arr


def as_float_values(x, name, ndim):
    """as_float_array, except that a float64 array stays float64 (the losses run in float64 when
    given float64, so that their gradients can be checked by finite differences)."""
    if not (isinstance(x, np.ndarray) and x.dtype == np.float64):
        return as_float_array(x, name, ndim=ndim)
    if x.ndim != ndim:
        raise ValueError(f"{name}: expected shape {_shape_text(ndim, None)}, got {tuple(x.shape)}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name}: contains NaN or Inf")
    return x


def _shape_text(ndim, last_dim):
    dims = ["N"] + ["_"] * (ndim - 2) if ndim >= 2 else []
    if ndim == 1:
        return "(N,)"
    return "(" + ", ".join(dims + [str(last_dim) if last_dim is not None else "_"]) + ")"


def _check_coordinates(values, name, what, why, limit=MAX_COORDINATE):
    """Every value within +-limit (MAX_COORDINATE unless told), else an error saying `why`."""
    if values.size:
        worst = float(max(-values.min(), values.max()))
        if worst > limit:
            raise ValueError(f"{name}: {what} must lie within +-{limit:.3g} ({why}), "
                             f"got {worst:.3g}")


def as_boxes(x, name, check_order=True):
    """(N, 4) float32 boxes (x1, y1, x2, y2), finite, within +-MAX_COORDINATE, and with
    x2 >= x1, y2 >= y1 unless told not to check."""
    b = as_float_array(x, name, ndim=2, last_dim=4)
    _check_coordinates(b, name, "coordinates", "beyond, areas overflow float32")
    if check_order and b.size:
        bad = (b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{name}: box {i} has x2 < x1 or y2 < y1: {b[i].tolist()}")
    return b


def as_rois(x, name="rois", num_images=None, spatial_scale=1.0):
    """(K, 5) float32 RoIs (batch index, x1, y1, x2, y2); the batch index must name an image,
    and the corners lie within +-MAX_COORDINATE / max(spatial_scale, 1), so that in feature
    cells both backends compute the same integers (beyond, they would overflow).

    x2 < x1 is allowed here, as in torchvision: RoI pool forces such a RoI to one cell and RoI
    Align (aligned=False) to size 1, so proposals never need a special case.
    """
    r = as_float_array(x, name, ndim=2, last_dim=5)
    _check_coordinates(r[:, 1:], name, "corners", "beyond, feature cells overflow the backends' "
                       "integers", MAX_COORDINATE / max(float(spatial_scale), 1.0))
    if r.size:
        idx = r[:, 0]
        if np.any(idx != np.round(idx)) or np.any(idx < 0):
            raise ValueError(f"{name}: column 0 must hold whole, non-negative batch indices")
        if num_images is not None and np.any(idx >= num_images):
            raise ValueError(f"{name}: batch index {int(idx.max())} >= number of images {num_images}")
    return r


def as_features(x, name="features"):
    """(N, C, H, W) float32 feature map."""
    return as_float_array(x, name, ndim=4)


def _whole(v):
    """int(v) for a whole number (2, 2.0, np.int64(2)); None for 2.7, True, "2", NaN."""
    if isinstance(v, (bool, np.bool_, str, bytes)):
        return None
    try:
        as_int = int(v)
        return as_int if as_int == v else None
    except (TypeError, ValueError, OverflowError):
        return None


def as_shape4(shape, name="input_shape"):
    """A 4-tuple (N, C, H, W) of non-negative whole numbers (2.7 is refused, not truncated)."""
    try:
        s = tuple(_whole(v) for v in shape)
    except TypeError:
        raise ValueError(f"{name}: expected (N, C, H, W), got {shape!r}") from None
    if len(s) != 4 or any(v is None or v < 0 for v in s):
        raise ValueError(f"{name}: expected (N, C, H, W) of non-negative whole numbers, got {shape!r}")
    return s


def pair(size, name="output_size"):
    """A whole number or (h, w) of positive whole numbers -> (h, w) (2.7 is refused, as
    torchvision does, not truncated)."""
    if np.isscalar(size):
        size = (size, size)
    try:
        hw = tuple(_whole(v) for v in size)
    except TypeError:
        raise ValueError(f"{name}: expected an int or (h, w), got {size!r}") from None
    if len(hw) != 2 or None in hw:
        raise ValueError(f"{name}: expected an int or (h, w) of whole numbers, got {size!r}")
    h, w = hw
    if h <= 0 or w <= 0:
        raise ValueError(f"{name}: expected positive sizes, got {(h, w)}")
    return h, w


def _float(x, name, want):
    """float(x), or a ValueError naming `name` and saying what was wanted (for "a", None, [1, 2])."""
    try:
        return float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected {want}, got {x!r}") from None


def positive_number(x, name):
    x = _float(x, name, "a positive finite number")
    if not np.isfinite(x) or x <= 0:
        raise ValueError(f"{name}: expected a positive finite number, got {x}")
    return x


def finite_number(x, name, minimum=None):
    """A finite float (>= minimum when given); NaN, Inf and non-numbers are a ValueError naming it."""
    want = ("a finite number" if minimum is None else "a non-negative finite number" if minimum == 0
            else f"a finite number >= {minimum}")
    x = _float(x, name, want)
    if not np.isfinite(x) or (minimum is not None and x < minimum):
        raise ValueError(f"{name}: expected {want}, got {x}")
    return x


def unit_interval(x, name):
    x = _float(x, name, "a number in [0, 1]")
    if not (0.0 <= x <= 1.0):
        raise ValueError(f"{name}: expected a number in [0, 1], got {x}")
    return x


def sampling_ratio(x, name="sampling_ratio"):
    """RoI Align's samples per bin side: an int in 1..MAX_SAMPLING_RATIO, or <= 0 for adaptive
    (ceil(roi / bins)).  Beyond the bound a launch would run practically forever."""
    try:
        ok = not isinstance(x, bool) and int(x) == x
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise ValueError(f"{name}: expected an int, got {x!r}")
    if x > MAX_SAMPLING_RATIO:
        raise ValueError(f"{name}: expected at most {MAX_SAMPLING_RATIO} samples per bin side "
                         f"(or <= 0: adaptive), got {int(x)}")
    return int(x)


def flag(x, name):
    """True or False (numpy's too); a string such as "no" is refused, not read as True."""
    if not isinstance(x, (bool, np.bool_)):
        raise ValueError(f"{name}: expected True or False, got {x!r}")
    return bool(x)


def whole_number(x, name):
    """An int >= 0 (a count, a feature-map side, a batch size); a ValueError naming it otherwise."""
    try:
        ok = not isinstance(x, bool) and int(x) == x and x >= 0
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise ValueError(f"{name}: expected a whole number >= 0, got {x!r}")
    return int(x)


def as_labels(x, name, low, high, allow=None, size=None):
    """(N,) int64 class labels: whole numbers in low..high, or one of the extra values in `allow`.

    Args:
        x: array-like of labels (ints, or floats that are whole numbers).
        name: the argument's name, for the error message.
        low, high: the allowed range, both ends included; high=None means no upper end.
        allow: extra allowed values outside the range (e.g. (-1,) for "ignored"), or None.
        size: the expected length N, or None for any length.
    Returns:
        (N,) int64 array.
    """
    lab = np.asarray(x)
    if lab.ndim != 1 or (size is not None and lab.shape[0] != size):
        raise ValueError(f"{name}: expected shape ({'N' if size is None else size},), got {tuple(lab.shape)}")
    if lab.size and lab.dtype.kind not in "biu":
        if lab.dtype.kind not in "fO":
            raise ValueError(f"{name}: expected whole numbers, got {lab.dtype} values {lab[:3].tolist()}")
        values = as_float_array(lab, name, ndim=1)                     # NaN / Inf / not numbers
        if np.any(values != np.round(values)):
            raise ValueError(f"{name}: expected whole numbers, got {values[values != np.round(values)][:3]}")
        lab = values
    lab = lab.astype(np.int64)
    bad = (lab < low) if high is None else (lab < low) | (lab > high)
    if allow is not None:
        bad &= ~np.isin(lab, np.asarray(allow, np.int64))
    if bad.any():
        want = f"values in [{low}, {high}]" if high is not None else f"values >= {low}"
        extra = "" if allow is None else f" (or {', '.join(str(int(a)) for a in allow)})"
        raise ValueError(f"{name}: expected {want}{extra}, "
                         f"got {int(lab[bad][0])} at index {int(np.flatnonzero(bad)[0])}")
    return lab


# ---- the fields of a settings dataclass (model Config, TrainConfig) ----------------------------
# Stricter than the checks above: a field must already be of the right kind (an int field refuses
# 2.0 and True), so that a config always round-trips through JSON unchanged.

def _is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_number(v):
    return _is_int(v) or isinstance(v, (float, np.floating))


def int_field(value, name, minimum=None):
    """An int (>= minimum when given) -> int; a ValueError naming `name` otherwise."""
    if not _is_int(value) or (minimum is not None and value < minimum):
        want = ("an int" if minimum is None else "a positive int" if minimum == 1
                else f"an int >= {minimum}")
        raise ValueError(f"{name}: expected {want}, got {value!r}")
    return int(value)


def number_field(value, name, want, ok):
    """A number (not a bool, not a string) for which ok(float(value)) holds -> float."""
    if not _is_number(value) or not ok(float(value)):
        raise ValueError(f"{name}: expected {want}, got {value!r}")
    return float(value)


def bool_field(value, name):
    """True or False (numpy's too), nothing else ("yes", 1) -> bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}: expected true or false, got {value!r}")
    return bool(value)


def numbers_field(value, name, kind=float, positive=False, length=None):
    """A sequence -> non-empty tuple of `kind` (finite; > 0 when positive; `length` long when given)."""
    want = ("positive " if positive else "") + ("ints" if kind is int else "finite numbers")
    want = f"a sequence of {length or 'one or more'} {want}"
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError("a string is not a sequence of numbers")
        items = tuple(value)
    except TypeError:
        raise ValueError(f"{name}: expected {want}, got {value!r}") from None
    good = all(_is_int(v) if kind is int else _is_number(v) and np.isfinite(v) for v in items)
    good = good and len(items) == (length or len(items)) > 0
    good = good and (not positive or all(v > 0 for v in items))
    if not good:
        raise ValueError(f"{name}: expected {want}, got {value!r}")
    return tuple(kind(v) for v in items)
