"""What the GPU compiler makes of each kernel, on a machine without a GPU (`frcnn kernels`).

Triton's interpreter runs the kernels on a CPU, but it hides what the GPU compiler does: an integer
argument equal to 1 becomes a compile-time constant, index arithmetic is 32-bit unless told
otherwise, atomics get a memory order, a * b + c may fuse into one FMA.  Triton can compile for a
GPU it does not have: this module calls the project's own launchers (the code a user with a GPU
runs) with CPU or "meta" tensors while `JITFunction.run` is replaced by a function that binds the
arguments exactly as a launch would (the same specialisations: a value of 1 -> constexpr, multiples
of 16 -> divisibility hints, values >= 2**31 -> int64) and compiles for a chosen target instead of
launching.  ptxas and cuobjdump, bundled with the triton wheel, then give registers, spills, shared
memory and the machine code.

Each compiled launch is checked:
  * it compiles (for sm_80 and sm_90 by default);
  * `exact` kernels (IoU, NMS, RoI pool forward, RoI Align forward, whose results are claimed equal
    to NumPy's bit for bit, and the backwards, whose weights must be the reference's): the PTX has
    no fused multiply-add and no approximate division or reciprocal;
  * atomics are relaxed (no acquire / release ordering, no fences or memory barriers);
  * every pointer offset is int64 unless it is a compile-time constant (tt.addptr in the TTIR),
    so no index product can wrap at 2**31;
  * at paper sizes, no register spills (no local-memory loads or stores in the machine code).

Must run in a process where the kernels were defined for the compiler (TRITON_INTERPRET=0 before
frcnn_scratch.kernels is first imported); `frcnn kernels` starts with that.  Relies on triton
internals: `triton.runtime.jit.JITFunction` with `_pack_args`, `create_function_from_signature`,
`triton.compiler.ASTSource`, `make_backend` and `triton.backends.compiler.GPUTarget` (used as in
triton 3.6 and 3.9, both checked: 3.9 comes with torch 2.13, 3.6 with the CUDA torch 2.11 of the
GPU machine the figures were measured on); `check_api()` says what is missing on another version,
and the tests skip with that reason.
"""
import contextlib
import dataclasses
import math
import os
import re
import subprocess
import tempfile

import torch

ARCHS = (80, 90)
# per-SM limits used for occupancy (CUDA occupancy calculator data for compute capability 8.0 / 9.0)
SM_LIMITS = {80: dict(regs=65536, warps=64, blocks=32, smem=167936),
             90: dict(regs=65536, warps=64, blocks=32, smem=233472)}
RESERVED_SMEM = 1024  # shared memory the driver reserves per block on sm_80 and later


def check_api():
    """None if this triton has what the report needs, else a sentence saying what is missing."""
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource, make_backend  # noqa: F401
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401
    except ImportError as e:
        return f"this triton lacks the ahead-of-time compile API ({e})"
    if not hasattr(JITFunction, "_pack_args"):
        return f"triton {triton.__version__}: JITFunction has no _pack_args (binding changed)"
    if not os.path.exists(_tool("ptxas")) or not os.path.exists(_tool("cuobjdump")):
        return "this triton wheel has no bundled ptxas / cuobjdump (triton/backends/nvidia/bin)"
    return None


def _tool(name):
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def require_compiler_mode():
    """The kernels must have been defined as compiled (not interpreted) kernels."""
    from triton.runtime.jit import JITFunction

    from ..kernels import iou
    if not isinstance(iou.box_iou_kernel, JITFunction):
        raise RuntimeError("kernels: the kernels were defined for Triton's interpreter; the compile "
                           "report needs TRITON_INTERPRET=0 set before frcnn_scratch.kernels is first "
                           "imported (run `frcnn kernels`, which starts a fresh process that way)")


# ---- compile instead of launch -------------------------------------------------------------

@dataclasses.dataclass
class Launch:
    """One launcher call's kernel, compiled for one architecture."""
    case: str            # which launcher call (e.g. "roi_align fwd paper sr=2")
    kernel: str          # the @triton.jit function's name
    arch: int            # 80, 90
    exact: bool          # results claimed bit-equal to NumPy: no FMA, IEEE division
    paper: bool          # a paper-size launch: spills are a failure
    signature: dict      # argument -> type as bound ('constexpr' for specialised 1s)
    hints: list          # arguments with a divisibility-by-16 hint
    num_warps: int = 0
    registers: int = 0
    stack: int = 0
    shared: int = 0
    occupancy: float = 0.0
    mix: dict = dataclasses.field(default_factory=dict)
    problems: list = dataclasses.field(default_factory=list)
    error: str = ""      # compile error, if any


@contextlib.contextmanager
def compile_instead_of_launch(arch, record):
    """Within the block, every kernel launch binds its arguments as a real launch would, compiles
    for sm_<arch> and appends (jit function, compiled kernel or exception, signature, attrs) to
    `record`; nothing runs."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    original = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        bind = create_function_from_signature(self.signature, self.params, backend)
        bound, specialization, options = bind(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound,
                                                                specialization, options)
        try:
            compiled = triton.compile(ASTSource(self, signature, constexprs, attrs),
                                      target=target, options=options.__dict__)
        except Exception as e:  # a CompilationError is a finding, not a crash of the report
            compiled = e
        record.append((self, compiled, signature, attrs))
        return None

    JITFunction.run = compile_only
    try:
        yield
    finally:
        JITFunction.run = original


# ---- the launcher calls --------------------------------------------------------------------

def _boxes(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand((n, 2), generator=g) * 900
    return torch.cat([xy, xy + 16 + torch.rand((n, 2), generator=g) * 300], dim=1)


def _rois(k, seed=0):
    return torch.cat([torch.zeros((k, 1)), _boxes(k, seed)], dim=1)


def cases():
    """(name, exact, paper, call) for every launcher call the report compiles: the paper's sizes,
    every specialisation a GPU can meet (sizes of 1, a one-cell map, one channel, multiples of 16
    and not), and sizes whose flat indices pass 2**31 (meta tensors: nothing is allocated)."""
    from ..kernels import iou, nms, roi_align, roi_pool

    out = []

    def add(name, exact, paper, call):
        out.append((name, exact, paper, call))

    add("box_iou paper 20000x50", True, True, lambda: iou.box_iou(_boxes(20000), _boxes(50)))
    add("box_iou 1x1", True, False, lambda: iou.box_iou(_boxes(1), _boxes(1)))
    add("box_iou 48x32", True, False, lambda: iou.box_iou(_boxes(48), _boxes(32)))
    add("box_iou 37x5", True, False, lambda: iou.box_iou(_boxes(37), _boxes(5)))
    add("box_iou 50000x50000 (int64 offsets)", True, False,
        lambda: iou.box_iou(torch.empty((50000, 4), device="meta"),
                            torch.empty((50000, 4), device="meta")))
    for n in (2000, 6000, 12000):
        add(f"nms paper {n}", True, True, lambda n=n: nms.nms(_boxes(n), torch.rand(n), 0.7))
    for n in (1, 64, 65, 100):
        add(f"nms {n}", True, False, lambda n=n: nms.nms(_boxes(n), torch.rand(n), 0.5))

    paper_map = torch.randn((1, 512, 38, 50))
    paper_rois = _rois(300)

    def pool_pair(features, rois, ph, pw):
        out_, argmax = roi_pool.roi_pool_forward(features, rois, ph, pw, 1 / 16)
        roi_pool.roi_pool_backward(out_, argmax, features.shape)

    def align_pair(features, rois, ph, pw, sr, aligned):
        out_ = roi_align.roi_align_forward(features, rois, ph, pw, 1 / 16, sr, aligned)
        roi_align.roi_align_backward(out_, rois, features.shape, ph, pw, 1 / 16, sr, aligned)

    add("roi_pool paper 300 RoIs 1x512x38x50 7x7", True, True,
        lambda: pool_pair(paper_map, paper_rois, 7, 7))
    for aligned in (False, True):
        for sr in (2, -1):
            add(f"roi_align paper 300 RoIs 1x512x38x50 7x7 sr={sr} aligned={aligned}", True, True,
                lambda sr=sr, aligned=aligned: align_pair(paper_map, paper_rois, 7, 7, sr, aligned))
    # specialisations: (map shape, pooled h, pooled w, number of RoIs)
    shapes = [((1, 1, 1, 1), 1, 1, 1),        # every size 1: all constexpr
              ((1, 3, 1, 9), 1, 7, 3),        # one-row map, pooled 1 x 7
              ((2, 5, 7, 1), 7, 1, 5),        # one-column map, pooled 7 x 1
              ((1, 16, 16, 32), 16, 16, 16),  # multiples of 16 everywhere
              ((2, 48, 19, 23), 3, 5, 7)]     # none
    for shape, ph, pw, k in shapes:
        features = torch.randn(shape)
        rois = _rois(k)
        tag = f"{'x'.join(map(str, shape))} {ph}x{pw} K={k}"
        add(f"roi_pool {tag}", True, False, lambda f=features, r=rois, ph=ph, pw=pw:
            pool_pair(f, r, ph, pw))
        for sr in ((16, -1) if ph == 16 else (1, -1)):  # a sampling ratio of 1, 16, adaptive
            add(f"roi_align {tag} sr={sr}", True, False,
                lambda f=features, r=rois, ph=ph, pw=pw, sr=sr: align_pair(f, r, ph, pw, sr, True))
    # 300000 RoIs x 512 channels x 7 x 7 = 7.5e9 outputs: flat indices past 2**31
    big_map = torch.empty((1, 512, 38, 50), device="meta")
    big_rois = torch.empty((300000, 5), device="meta")
    add("roi_pool 300000 RoIs (int64 offsets)", True, False,
        lambda: roi_pool.roi_pool_forward(big_map, big_rois, 7, 7, 1 / 16))
    add("roi_pool bwd 300000 RoIs (int64 offsets)", True, False,
        lambda: roi_pool.roi_pool_backward(torch.empty((300000, 512, 7, 7), device="meta"),
                                           torch.empty((300000, 512, 7, 7), dtype=torch.int64,
                                                       device="meta"), big_map.shape))
    add("roi_align 300000 RoIs (int64 offsets)", True, False,
        lambda: align_pair(big_map, big_rois, 7, 7, 2, False))
    return out


# ---- reading the compiled code -------------------------------------------------------------

_SASS_GROUPS = {
    "global load": ("LDG",), "global store": ("STG",), "atomic": ("RED", "REDG", "ATOM", "ATOMG"),
    "shared": ("LDS", "STS", "LDSM", "STSM"), "spill (local)": ("LDL", "STL"),
    "shuffle": ("SHFL",), "barrier": ("BAR", "MEMBAR", "FENCE"),
    "fp32": ("FADD", "FMUL", "FFMA", "FMNMX", "FSETP", "FSEL", "FCHK", "MUFU", "FRND"),
    "int": ("IMAD", "IADD3", "LOP3", "SHF", "ISETP", "LEA", "IABS", "IMNMX", "SEL", "IMUL",
            "PRMT", "POPC", "FLO", "BREV", "LEA.HI", "IADD", "VIADD", "VIMNMX", "ISCADD"),
    "convert": ("F2I", "I2F", "F2F", "I2FP", "F2IP"),
    "control": ("BRA", "EXIT", "BSSY", "BSYNC", "CALL", "RET", "WARPSYNC", "BMOV", "JMP"),
}


def _sass_mix(sass):
    """Static instruction counts of the machine code, by group."""
    mix = {group: 0 for group in _SASS_GROUPS}
    mix["other"] = 0
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if not m:
            continue
        op = m.group(2)
        group = next((g for g, ops in _SASS_GROUPS.items() if op in ops), "other")
        mix[group] += 1
    mix["total"] = sum(mix.values())
    return mix


def _resources(cubin_path):
    """(registers, stack bytes) from cuobjdump -res-usage."""
    text = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin_path], capture_output=True,
                          text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", text).group(1))
    stack = int(re.search(r"STACK:(\d+)", text).group(1))
    return regs, stack


def occupancy(arch, registers, shared, num_warps):
    """Fraction of the SM's warp slots a kernel can fill, limited by registers, shared memory,
    warps and blocks per SM (the CUDA occupancy calculator's rules, registers allocated per warp
    in units of 256)."""
    lim = SM_LIMITS[arch]
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_regs = (lim["regs"] // regs_per_warp) // num_warps
    by_warps = lim["warps"] // num_warps
    by_smem = lim["smem"] // (math.ceil((shared + RESERVED_SMEM) / 128) * 128)
    blocks = min(lim["blocks"], by_regs, by_warps, by_smem)
    return blocks * num_warps / lim["warps"]


def _ptx_problems(ptx, exact):
    problems = []
    if exact and re.search(r"^\s*(@%p\d+\s+)?fma\.rn(\.ftz)?\.f32", ptx, re.M):
        problems.append("fused multiply-add (fma.*.f32) in a kernel claimed bit-equal to NumPy")
    if exact and re.search(r"\b(div|rcp|sqrt)\.(approx|full)\.", ptx):
        problems.append("approximate division / reciprocal in a kernel claimed bit-equal to NumPy")
    for line in ptx.splitlines():
        if re.search(r"\b(atom|red)\.", line) and not re.search(r"\.relaxed\b", line):
            problems.append(f"atomic not relaxed: {line.strip()}")
            break
    if re.search(r"\b(fence\.(sc|acq_rel)|membar\.)", ptx):
        problems.append("memory fence / barrier (fence.sc, fence.acq_rel, membar)")
    return problems


def _ttir_problems(ttir):
    """Pointer offsets that are 32-bit and not compile-time constants."""
    constants = set(re.findall(r"(%[\w.]+) = arith\.constant", ttir))
    problems = []
    for m in re.finditer(r"tt\.addptr (%[\w.#]+), (%[\w.#]+) : [^,]+, (tensor<[^>]*x(i\d+)>|(i\d+))",
                         ttir):
        width = m.group(4) or m.group(5)
        if width != "i64" and m.group(2) not in constants:
            problems.append(f"{width} pointer offset {m.group(2)} (products can pass 2**31)")
    return sorted(set(problems))


def inspect(launch, compiled, workdir):
    """Fill registers, spills, shared memory, occupancy, instruction mix and problems."""
    ptx = compiled.asm["ptx"]
    cubin = os.path.join(workdir, f"{launch.kernel}-{launch.arch}-{abs(hash(ptx))}.cubin")
    with open(cubin, "wb") as f:
        f.write(compiled.asm["cubin"])
    sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True,
                          check=True).stdout
    launch.num_warps = compiled.metadata.num_warps
    launch.shared = compiled.metadata.shared
    launch.registers, launch.stack = _resources(cubin)
    launch.occupancy = occupancy(launch.arch, launch.registers, launch.shared, launch.num_warps)
    launch.mix = _sass_mix(sass)
    launch.problems = _ptx_problems(ptx, launch.exact) + _ttir_problems(compiled.asm["ttir"])
    if launch.paper and (launch.mix["spill (local)"] or launch.stack):
        launch.problems.append(f"register spills at paper size ({launch.mix['spill (local)']} "
                               f"local loads/stores, {launch.stack}-byte stack)")
    return launch


def compile_all(archs=ARCHS, select=None):
    """Compile every case (or those whose name contains `select`) for each arch: [Launch]."""
    require_compiler_mode()
    launches = []
    with tempfile.TemporaryDirectory() as workdir:
        for arch in archs:
            for name, exact, paper, call in cases():
                if select and select not in name:
                    continue
                record = []
                with compile_instead_of_launch(arch, record):
                    call()
                for fn, compiled, signature, attrs in record:
                    hints = sorted(name_ for (index,), value in attrs.items()
                                   for name_ in [fn.arg_names[index]]
                                   if any(a[0] == "tt.divisibility" for a in value))
                    launch = Launch(name, fn.__name__, arch, exact, paper, dict(signature), hints)
                    if isinstance(compiled, Exception):
                        cause = compiled
                        while cause.__cause__ is not None:  # the innermost error says why
                            cause = cause.__cause__
                        launch.error = f"{type(cause).__name__}: {str(cause).strip()[-600:]}"
                        launch.problems.append("does not compile")
                    else:
                        inspect(launch, compiled, workdir)
                    launches.append(launch)
    return launches


def format_report(launches, paper_only=True):
    """A table: one line per kernel and arch at paper size (or every launch)."""
    rows = [l for l in launches if l.paper or not paper_only]
    seen, table = set(), []
    header = ["kernel", "case", "sm", "warps", "regs", "spill", "smem B", "occup.", "ld", "st",
              "atom", "shfl", "bar", "fp32", "int", "instr", "problems"]
    for l in rows:
        key = (l.kernel, l.case, l.arch)
        if key in seen:
            continue
        seen.add(key)
        m = l.mix or {}
        table.append([l.kernel, l.case, l.arch, l.num_warps, l.registers,
                      m.get("spill (local)", "-"), l.shared, f"{l.occupancy:.0%}",
                      m.get("global load", "-"), m.get("global store", "-"), m.get("atomic", "-"),
                      m.get("shuffle", "-"), m.get("barrier", "-"), m.get("fp32", "-"),
                      m.get("int", "-"), m.get("total", "-"),
                      "; ".join(l.problems) if l.problems else "none"])
    widths = [max(len(str(r[i])) for r in [header] + table) for i in range(len(header))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip()
             for r in [header] + table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
