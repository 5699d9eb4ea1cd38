"""frcnn_scratch/_checks.py: every helper turns bad input into one ValueError that names the argument."""
import numpy as np
import pytest

from frcnn_scratch import _checks


@pytest.mark.parametrize("call", [
    lambda v: _checks.positive_number(v, "spatial_scale"),
    lambda v: _checks.finite_number(v, "spatial_scale"),
    lambda v: _checks.unit_interval(v, "spatial_scale"),
    lambda v: _checks.sampling_ratio(v, "spatial_scale"),
    lambda v: _checks.as_shape4(v, "spatial_scale"),
    lambda v: _checks.whole_number(v, "spatial_scale"),
])
@pytest.mark.parametrize("value", ["a", None, [1.0, 2.0], "abcd"])
def test_conversion_errors_name_the_argument(call, value):
    with pytest.raises(ValueError, match="spatial_scale: expected"):
        call(value)


def test_number_helpers_hand_cases():
    assert _checks.positive_number("2.5", "x") == 2.5
    assert _checks.finite_number(-3, "x") == -3.0
    assert _checks.finite_number(0, "x", minimum=0) == 0.0
    with pytest.raises(ValueError, match=r"x: expected a non-negative finite number, got -1.0"):
        _checks.finite_number(-1, "x", minimum=0)
    with pytest.raises(ValueError, match="x: expected a non-negative finite number, got nan"):
        _checks.finite_number(float("nan"), "x", minimum=0)
    with pytest.raises(ValueError, match=r"x: expected a finite number >= 2, got 1.0"):
        _checks.finite_number(1, "x", minimum=2)
    assert _checks.sampling_ratio(-1) == -1 and _checks.sampling_ratio(2.0) == 2
    with pytest.raises(ValueError, match="sampling_ratio: expected an int"):
        _checks.sampling_ratio(1.5)
    assert _checks.as_shape4([1, 2, 3, 4]) == (1, 2, 3, 4)


def test_as_labels_hand_cases():
    out = _checks.as_labels([1, 2.0, 4], "gt_labels", 1, 4)
    assert out.dtype == np.int64 and out.tolist() == [1, 2, 4]
    assert _checks.as_labels([], "gt_labels", 1, 4).dtype == np.int64
    assert _checks.as_labels([-1, 0, 1], "labels", 0, 1, allow=(-1,)).tolist() == [-1, 0, 1]
    assert _checks.as_labels([7], "labels", 1, None).tolist() == [7]


@pytest.mark.parametrize("labels, kwargs, message", [
    ([1.5], {}, r"gt_labels: expected whole numbers"),
    (["a"], {}, r"gt_labels: expected whole numbers"),
    (["1"], {}, r"gt_labels: expected whole numbers"),
    ([np.nan], {}, r"gt_labels: contains NaN or Inf"),
    ([0], {}, r"gt_labels: expected values in \[1, 4\], got 0 at index 0"),
    ([1, 5], {}, r"gt_labels: expected values in \[1, 4\], got 5 at index 1"),
    ([[1]], {}, r"gt_labels: expected shape \(N,\), got \(1, 1\)"),
    ([1, 2], {"size": 3}, r"gt_labels: expected shape \(3,\), got \(2,\)"),
    ([-2], {"allow": (-1,)}, r"gt_labels: expected values in \[1, 4\] \(or -1\), got -2"),
])
def test_as_labels_rejects(labels, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _checks.as_labels(labels, "gt_labels", 1, 4, **kwargs)


def test_as_labels_without_upper_end():
    with pytest.raises(ValueError, match=r"labels: expected values >= 1, got 0 at index 1"):
        _checks.as_labels([3, 0], "labels", 1, None)
