"""`frcnn bench` at --small sizes, numpy only: every op line is printed with a time, the thread
settings are stated, and --op / bad arguments behave.  (Not a timing test: times are not checked.)"""
import re

import pytest

from frcnn_scratch import cli
from frcnn_scratch.tools import bench

OPS = ["box_iou", "nms 0.7", "roi_pool fwd", "roi_pool fwd+bwd", "roi_align fwd", "roi_align fwd+bwd"]


def run_bench(capsys, *extra):
    args = cli.build_parser().parse_args(["bench", "--small", "--backends", "numpy", "--repeat", "1",
                                          *extra])
    assert bench.main(args) == 0
    return capsys.readouterr().out


def table_rows(out):
    """{(op, size): numpy ms} from the printed table."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("op "))
    rows = {}
    for line in lines[start + 2:]:
        if not line.strip() or line.startswith(("load average", "numpy/tv", "note:")):
            break
        parts = re.split(r"\s{2,}", line.strip())
        rows[(parts[0], parts[1])] = parts[2]
    return rows


def test_small_bench_prints_every_op_with_a_time_and_the_threads(capsys):
    out = run_bench(capsys)
    assert re.search(r"threads: numpy \(OpenBLAS\) \S+, torch \S+; load average", out), out
    rows = table_rows(out)
    ops = {op for op, _ in rows}
    assert ops == set(OPS), f"ops printed {sorted(ops)}, expected {OPS}"
    assert {size for op, size in rows if op == "nms 0.7"} == {"256 uniform", "256 clustered"}
    for key, ms in rows.items():
        assert float(ms) > 0, f"{key}: time {ms!r} is not a positive number"


def test_op_filter_keeps_only_matching_lines(capsys):
    rows = table_rows(run_bench(capsys, "--op", "roi_align"))
    assert {op for op, _ in rows} == {"roi_align fwd", "roi_align fwd+bwd"}, rows


def test_paper_sizes_are_the_issue_s_sizes():
    cases = bench.build_cases(False, __import__("numpy").random.default_rng(0))
    sizes = {(c.op, c.size) for c in cases}
    for n in (2000, 6000, 12000):
        for kind in ("uniform", "clustered"):
            assert ("nms 0.7", f"{n} {kind}") in sizes
    assert ("box_iou", "20000 x 50") in sizes
    for op in OPS[2:]:
        assert (op, "300 RoIs 1x512x38x50 7x7") in sizes


@pytest.mark.parametrize("extra, message", [
    (["--backends", "numpy", "--op", "nothing"], "--op: no op matches nothing"),
    (["--backends", "numpy", "--threads", "0"], "--threads: expected 1.."),
    (["--backends", "numpy,fortran"], "--backends: unknown fortran"),
    (["--backends", ""], "--backends: name at least one of numpy, triton, torchvision"),
    (["--backends", "numpy", "--threads", "65536"], "--threads: expected 1.."),
])
def test_bad_arguments_are_clear_errors(capsys, extra, message):
    args = cli.build_parser().parse_args(["bench", "--small", "--repeat", "1", *extra])
    with pytest.raises(ValueError, match=re.escape(message)):
        bench.main(args)
