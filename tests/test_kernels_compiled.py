"""The kernels as a GPU compiles them, proven on a machine without one (frcnn_scratch/tools/compile_report.py).

`frcnn kernels` calls every launcher at the paper's sizes, at every specialisation a GPU can meet
(sizes of 1 become compile-time constants, multiples of 16 get divisibility hints) and at sizes
whose flat indices pass 2**31, compiles each launch for sm_80 and sm_90 instead of running it, and
checks the PTX, TTIR and machine code: no FMA or approximate division where results are claimed
bit-equal to NumPy, relaxed atomics only, int64 pointer offsets, no spills at paper sizes.

The second half shows that those checks can fail: small kernels that break each rule, compiled the
same way, must be reported.  Both run in a subprocess, because the kernels must be defined for the
compiler (TRITON_INTERPRET=0), not for the interpreter this test process uses.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from frcnn_scratch.tools import compile_report

MISSING = compile_report.check_api()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"ahead-of-time compile: {MISSING}")

KERNELS = {"box_iou_kernel", "nms_mask_kernel", "nms_scan_kernel", "roi_pool_forward_kernel",
           "roi_pool_backward_kernel", "roi_align_forward_kernel", "roi_align_backward_kernel"}


def compiler_env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("kernels") / "report.json"
    done = subprocess.run([sys.executable, "-m", "frcnn_scratch.cli", "kernels", "--json",
                           str(path)], env=compiler_env(), capture_output=True, text=True,
                          timeout=900)
    launches = json.loads(path.read_text()) if path.exists() else []
    return done, launches


def test_every_launch_compiles_for_sm80_and_sm90_and_passes_the_checks(report):
    done, launches = report
    bad = [f"{l['case']} / {l['kernel']} sm_{l['arch']}: {'; '.join(l['problems'])} {l['error']}"
           for l in launches if l["problems"]]
    assert not bad, "\n".join(bad[:20])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert {l["kernel"] for l in launches} == KERNELS
    for arch in (80, 90):
        cases = {(l["case"], l["kernel"]) for l in launches if l["arch"] == arch}
        assert cases == {(l["case"], l["kernel"]) for l in launches}, f"sm_{arch} misses launches"


def test_paper_sizes_and_specialisations_are_covered(report):
    _, launches = report
    paper = {l["kernel"] for l in launches if l["paper"]}
    assert paper == KERNELS, f"no paper-size launch of {KERNELS - paper}"
    # every integer size argument of the RoI kernels met as the constant 1 and with a /16 hint
    for kernel, args in [("roi_pool_forward_kernel", ["C", "H", "W", "PH", "PW"]),
                         ("roi_align_forward_kernel", ["C", "H", "W", "PH", "PW",
                                                       "sampling_ratio"]),
                         ("roi_align_backward_kernel", ["C", "H", "W", "PH", "PW"])]:
        mine = [l for l in launches if l["kernel"] == kernel]
        for arg in args:
            assert any(l["signature"][arg] == "constexpr" for l in mine), f"{kernel}: {arg} = 1"
            assert any(arg in l["hints"] for l in mine), f"{kernel}: {arg} % 16 == 0"
            assert any(l["signature"][arg] == "i32" and arg not in l["hints"] for l in mine), \
                f"{kernel}: {arg} neither 1 nor a multiple of 16"
    # and the sizes whose products pass 2**31
    assert sum("int64 offsets" in l["case"] for l in launches) >= 8


def test_report_table_names_registers_and_occupancy(report):
    done, _ = report
    head = done.stdout.splitlines()[0].split()
    for column in ("kernel", "regs", "spill", "occup.", "atom", "problems"):
        assert column in head, head
    assert "0 with problems" in done.stdout


BAD_KERNELS = textwrap.dedent('''
    import os
    os.environ["TRITON_INTERPRET"] = "0"
    import torch, triton, triton.language as tl
    from frcnn_scratch.tools import compile_report as cr

    @triton.jit
    def fused(x_ptr, out_ptr, N, BLOCK: tl.constexpr):        # a * b + c may become one FMA
        i = tl.arange(0, BLOCK).to(tl.int64)
        x = tl.load(x_ptr + i, mask=i < N)
        tl.store(out_ptr + i, x * 3.0 + 1.0, mask=i < N)

    @triton.jit
    def divides(x_ptr, out_ptr, N, BLOCK: tl.constexpr):      # '/' is approximate on a GPU
        i = tl.arange(0, BLOCK).to(tl.int64)
        x = tl.load(x_ptr + i, mask=i < N)
        tl.store(out_ptr + i, x / (x + 2.0), mask=i < N)

    @triton.jit
    def fenced(x_ptr, out_ptr, N, BLOCK: tl.constexpr):       # the default atomic is acq_rel
        i = tl.arange(0, BLOCK).to(tl.int64)
        tl.atomic_add(out_ptr + i, tl.load(x_ptr + i, mask=i < N), mask=i < N)

    @triton.jit
    def narrow(x_ptr, out_ptr, N, M, BLOCK: tl.constexpr):    # i * M wraps at 2**31
        i = tl.program_id(0) * M + tl.arange(0, BLOCK)
        tl.store(out_ptr + i, tl.load(x_ptr + i, mask=i < N), mask=i < N)

    @triton.jit
    def size_one(x_ptr, out_ptr, PH, BLOCK: tl.constexpr):    # PH == 1 is a Python int: no .to
        i = tl.arange(0, BLOCK).to(tl.int64)
        tl.store(out_ptr + i, tl.load(x_ptr + i) / PH.to(tl.float32))

    x = torch.zeros(64)
    calls = {"fused": lambda: fused[(1,)](x, x, 64, BLOCK=64, enable_fp_fusion=True),
             "divides": lambda: divides[(1,)](x, x, 64, BLOCK=64),
             "fenced": lambda: fenced[(1,)](x, x, 64, BLOCK=64),
             "narrow": lambda: narrow[(1,)](x, x, 64, 7, BLOCK=64),
             "size_one": lambda: size_one[(1,)](x, x, 1, BLOCK=64)}
    for name, call in calls.items():
        record = []
        with cr.compile_instead_of_launch(90, record):
            call()
        fn, compiled, signature, attrs = record[0]
        launch = cr.Launch(name, fn.__name__, 90, True, True, dict(signature), [])
        if isinstance(compiled, Exception):
            print(name, "| does not compile")
        else:
            import tempfile
            with tempfile.TemporaryDirectory() as d:
                cr.inspect(launch, compiled, d)
            print(name, "|", "; ".join(launch.problems) or "none")
''')


def test_the_checks_catch_each_kind_of_fault(tmp_path):
    script = tmp_path / "bad_kernels.py"  # triton reads a kernel's source from its file
    script.write_text(BAD_KERNELS)
    done = subprocess.run([sys.executable, str(script)], env=compiler_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = dict(line.split(" | ", 1) for line in done.stdout.splitlines() if " | " in line)
    assert "fused multiply-add" in found["fused"], found
    assert "approximate division" in found["divides"], found
    assert "atomic not relaxed" in found["fenced"], found
    assert "i32 pointer offset" in found["narrow"], found
    assert found["size_one"] == "does not compile", found
