"""Shared test helpers (pytest loads this file first; test files import from it by name)."""
import numpy as np


def assert_same(got, want, what):
    """Exact equality of two arrays, shape and dtype included; on failure say how many entries
    differ, where the first one is, and by how much."""
    assert got.shape == want.shape and got.dtype == want.dtype, \
        f"{what}: got {got.shape} {got.dtype}, want {want.shape} {want.dtype}"
    diff = got != want
    if diff.any():
        i = tuple(int(v) for v in np.argwhere(diff)[0])
        raise AssertionError(f"{what}: {int(diff.sum())} of {diff.size} entries differ; first at "
                             f"{i}: kernel {got[i]!r} vs numpy {want[i]!r}; max |diff| "
                             f"{float(np.abs(got.astype(np.float64) - want).max())}")
