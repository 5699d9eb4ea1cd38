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


# a model small enough that the command line trains, evaluates and detects in a second
TINY = ["--set", "channels=[4,8,8]", "--set", "anchor_scales=[2,4]", "--set", "anchor_ratios=[1]",
        "--set", "rpn_channels=8", "--set", "fc_hidden=16", "--set", "pooled_size=3",
        "--set", "rpn_post_nms_test=10", "--quiet"]


def one_line(capsys):
    """What a failed command printed on stderr: exactly one line, never a traceback."""
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err
