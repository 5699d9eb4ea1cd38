"""`frcnn bench`: time the hot ops with numpy, triton and (when importable) torchvision.

Sizes are the paper's (test-time proposals): NMS over 6000 boxes (and 2000 / 12000, uniform and
clustered like RPN output), box IoU 20000 x 50, RoI pool and RoI Align of 300 RoIs on a
1 x 512 x 38 x 50 conv5 map (stride 16) into 7 x 7, forward and forward + backward.

Each time is the median over --repeat runs after one warm-up run, in milliseconds.  --threads
(default 1) sets both numpy's OpenBLAS and torch's intra-op thread count, so that the two sides
compete on equal terms; the header states both counts and the load average.  --op keeps only the
lines whose op name contains one of the given words (e.g. --op nms,roi_align).
numpy goes through ops (backend="numpy").  triton calls the kernel launchers on tensors already on
kernels.device(); on a GPU it is timed with triton.testing.do_bench, and under the CPU interpreter
(no GPU) it is skipped at paper size unless --small, since the interpreter runs every program in
Python.  torchvision uses its C++ CPU ops, and its CUDA ops too when a GPU is present (each triton
time is compared with torchvision on the same device).

The triton times leave out what `ops.<op>(..., backend="triton")` adds on top: NumPy in and out,
so copies to the device and back.  The "moves MB" column says how much such a call copies each way
(host -> device / device -> host), counted by running it once (frcnn_scratch/_triton_bridge.py).
"""
import contextlib
import dataclasses
import os
import statistics
import time

import numpy as np

from .. import ops
from ..fast.threads import blas_thread_count, blas_threads

BACKENDS = ("numpy", "triton", "torchvision")


@dataclasses.dataclass
class Case:
    """One line of the table: an op at one size, with a callable per backend (None: not timed)."""
    op: str
    size: str
    numpy: object = None
    triton: object = None       # (fn, device) or None
    torchvision: object = None  # {device: fn}
    ops_triton: object = None   # the same work through ops with backend="triton" (NumPy in / out)


# ---- inputs ----------------------------------------------------------------------------------

def uniform_boxes(rng, n, height=600, width=1000):
    """(n, 4) float32 boxes spread over the image, sides 16..300 px, and (n,) scores."""
    wh = rng.uniform(16, 300, (n, 2))
    xy = rng.uniform(0, 1, (n, 2)) * (np.array([width, height]) - wh)
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    return boxes, rng.random(n).astype(np.float32)


def clustered_boxes(rng, n, objects=40, height=600, width=1000):
    """Like RPN output: many jittered boxes around a few objects, scores highest near each object."""
    centre = rng.uniform([0, 0], [width, height], (objects, 2))
    size = rng.uniform(32, 250, (objects, 2))
    which = rng.integers(0, objects, n)
    noise = rng.normal(0, 0.15, (n, 4))
    c = centre[which] + noise[:, :2] * size[which]
    wh = size[which] * np.exp(noise[:, 2:])
    boxes = np.concatenate([c - wh / 2, c + wh / 2], axis=1)
    boxes = np.clip(boxes, 0, [width, height, width, height]).astype(np.float32)
    scores = np.exp(-np.square(noise).sum(axis=1)) * rng.uniform(0.5, 1, n)
    return boxes, scores.astype(np.float32)


def rois_on_map(rng, k, height, width, stride):
    """(k, 5) float32 RoIs (batch 0) inside a (height * stride, width * stride) image."""
    boxes, _ = uniform_boxes(rng, k, height * stride, width * stride)
    return np.concatenate([np.zeros((k, 1), np.float32), boxes], axis=1)


# ---- timing ----------------------------------------------------------------------------------

def median_ms(fn, repeat):
    """Median wall time of fn() in ms over `repeat` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def device_ms(fn, device, repeat):
    """GPU: triton.testing.do_bench (synchronised, median); CPU: median_ms."""
    if device == "cuda":
        import triton.testing         # lazy, as every torch / triton import here: optional
        return triton.testing.do_bench(fn, return_mode="median")
    return median_ms(fn, repeat)


# ---- the cases -------------------------------------------------------------------------------

def build_cases(small, rng, torch=None, kernels=None, torchvision=None):
    """The table's lines.  torch / kernels / torchvision are the modules, or None when absent."""
    dev = kernels.device() if kernels is not None else None
    tv_devices = []
    if torchvision is not None:
        tv_devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

    def on(device, *arrays):
        return [torch.tensor(a, device=device) for a in arrays]

    cases = []
    # box IoU
    n_iou = 500 if small else 20000
    a, _ = uniform_boxes(rng, n_iou)
    b, _ = uniform_boxes(rng, 50)
    case = Case("box_iou", f"{n_iou} x 50", numpy=lambda: ops.box_iou(a, b, backend="numpy"),
                ops_triton=lambda: ops.box_iou(a, b, backend="triton"))
    if kernels is not None:
        from ..kernels.iou import box_iou as k_iou
        ta, tb = on(dev, a, b)
        case.triton = (lambda: k_iou(ta, tb), dev)
    case.torchvision = {d: (lambda ta, tb: lambda: torchvision.ops.box_iou(ta, tb))(*on(d, a, b))
                        for d in tv_devices}
    cases.append(case)

    # NMS at threshold 0.7 (section 3.3)
    sizes = [(256, "uniform"), (256, "clustered")] if small else \
        [(2000, "uniform"), (2000, "clustered"), (6000, "uniform"), (6000, "clustered"),
         (12000, "uniform"), (12000, "clustered")]
    for n, kind in sizes:
        boxes, scores = (uniform_boxes if kind == "uniform" else clustered_boxes)(rng, n)
        case = Case("nms 0.7", f"{n} {kind}",
                    numpy=lambda bx=boxes, sc=scores: ops.nms(bx, sc, 0.7, backend="numpy"),
                    ops_triton=lambda bx=boxes, sc=scores: ops.nms(bx, sc, 0.7, backend="triton"))
        if kernels is not None:
            from ..kernels.nms import nms as k_nms
            tbx, tsc = on(dev, boxes, scores)
            case.triton = (lambda tbx=tbx, tsc=tsc: k_nms(tbx, tsc, 0.7), dev)
        case.torchvision = {d: (lambda tbx, tsc: lambda: torchvision.ops.nms(tbx, tsc, 0.7))(
            *on(d, boxes, scores)) for d in tv_devices}
        cases.append(case)

    # RoI pool and RoI Align: 300 RoIs, 1 x 512 x 38 x 50, stride 16, 7 x 7
    n_roi, channels, pooled = (4, 16, 3) if small else (300, 512, 7)
    h, w, scale = 38, 50, 1 / 16
    features = rng.standard_normal((1, channels, h, w)).astype(np.float32)
    rois = rois_on_map(rng, n_roi, h, w, 16)
    grad = rng.standard_normal((n_roi, channels, pooled, pooled)).astype(np.float32)
    size = f"{n_roi} RoIs 1x{channels}x{h}x{w} {pooled}x{pooled}"
    cases += roi_cases(features, rois, grad, pooled, scale, size, torch, kernels, torchvision,
                       dev, tv_devices, on)
    return cases


def roi_cases(features, rois, grad, pooled, scale, size, torch, kernels, torchvision, dev,
              tv_devices, on):
    """RoI pool / RoI Align, forward and forward + backward, for every backend present."""
    shape = features.shape

    def pool_fb(backend):
        out, argmax = ops.roi_pool(features, rois, pooled, scale, backend=backend)
        return ops.roi_pool_backward(grad, argmax, shape, backend=backend)

    def align_fb(backend):
        ops.roi_align(features, rois, pooled, scale, backend=backend)
        return ops.roi_align_backward(grad, rois, shape, pooled, scale, backend=backend)

    def pool_f(backend):
        return ops.roi_pool(features, rois, pooled, scale, backend=backend)

    def align_f(backend):
        return ops.roi_align(features, rois, pooled, scale, backend=backend)

    cases = [Case(op, size, numpy=lambda fn=fn: fn("numpy"), ops_triton=lambda fn=fn: fn("triton"))
             for op, fn in (("roi_pool fwd", pool_f), ("roi_pool fwd+bwd", pool_fb),
                            ("roi_align fwd", align_f), ("roi_align fwd+bwd", align_fb))]
    if kernels is not None:
        from ..kernels import roi_align as k_align, roi_pool as k_pool
        tf, tr, tg = on(dev, features, rois, grad)

        def tr_pool_fb():
            out, argmax = k_pool.roi_pool_forward(tf, tr, pooled, pooled, scale)
            return k_pool.roi_pool_backward(tg, argmax, shape)

        def tr_align_fb():
            k_align.roi_align_forward(tf, tr, pooled, pooled, scale)
            return k_align.roi_align_backward(tg, tr, shape, pooled, pooled, scale)

        cases[0].triton = (lambda: k_pool.roi_pool_forward(tf, tr, pooled, pooled, scale), dev)
        cases[1].triton = (tr_pool_fb, dev)
        cases[2].triton = (lambda: k_align.roi_align_forward(tf, tr, pooled, pooled, scale), dev)
        cases[3].triton = (tr_align_fb, dev)
    for d in tv_devices:
        tf, tr, tg = on(d, features, rois, grad)
        tvo = torchvision.ops

        def fwd_bwd(op, tf=tf, tr=tr, tg=tg, **kw):
            def run():
                x = tf.detach().requires_grad_(True)
                op(x, tr, pooled, scale, **kw).backward(tg)
                return x.grad
            return run

        cases[0].torchvision = {**(cases[0].torchvision or {}),
                                d: (lambda tf=tf, tr=tr: tvo.roi_pool(tf, tr, pooled, scale))}
        cases[1].torchvision = {**(cases[1].torchvision or {}), d: fwd_bwd(tvo.roi_pool)}
        cases[2].torchvision = {**(cases[2].torchvision or {}),
                                d: (lambda tf=tf, tr=tr: tvo.roi_align(tf, tr, pooled, scale,
                                                                       sampling_ratio=-1))}
        cases[3].torchvision = {**(cases[3].torchvision or {}),
                                d: fwd_bwd(tvo.roi_align, sampling_ratio=-1)}
    return cases


# ---- the table -------------------------------------------------------------------------------

def _fmt(ms):
    return "-" if ms is None else (f"{ms:.3g}" if ms < 100 else f"{ms:.0f}")


def _ratio(a, b):
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def format_table(header, rows):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(v).ljust(wd) if i < 2 else str(v).rjust(wd)  # noqa: E731
                                for i, (v, wd) in enumerate(zip(r, widths)))
    return "\n".join([line(header), "  ".join("-" * wd for wd in widths)] + [line(r) for r in rows])


def main(args):
    """Entry point of `frcnn bench` (args.repeat, args.backends, args.small)."""
    wanted = [b.strip() for b in str(args.backends).split(",") if b.strip()]
    if not wanted:
        raise ValueError(f"--backends: name at least one of {', '.join(BACKENDS)}")
    unknown = [b for b in wanted if b not in BACKENDS]
    if unknown:
        raise ValueError(f"--backends: unknown {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
    if int(args.repeat) < 1:
        raise ValueError(f"--repeat: expected a positive int, got {args.repeat}")
    repeat = int(args.repeat)
    threads = int(getattr(args, "threads", 1))
    cores = os.cpu_count() or 1
    if not 1 <= threads <= cores:          # OpenBLAS past its compiled maximum crashes at exit
        raise ValueError(f"--threads: expected 1..{cores} (this machine's cores), got {threads}")
    op_words = [w.strip() for w in str(getattr(args, "op", None) or "").split(",") if w.strip()]

    notes = []
    torch = kernels = torchvision = None
    try:
        import torch
    except ImportError:
        notes.append("torch not importable: triton and torchvision columns skipped")
    if torch is not None and "triton" in wanted:
        try:
            from .. import kernels  # sets TRITON_INTERPRET=1 before triton loads when there is no GPU
            import triton  # noqa: F401
        except ImportError as e:
            kernels = None
            notes.append(f"triton not importable ({e}): triton column skipped")
    if torch is not None and "torchvision" in wanted:
        try:
            import torchvision
        except ImportError:
            notes.append("torchvision not importable: torchvision columns and ratios skipped")
    interpreter = kernels is not None and kernels.device() == "cpu"
    skip_triton = interpreter and not args.small
    if skip_triton:
        notes.append("triton runs under the CPU interpreter (no GPU): skipped at paper size; "
                     "use --small to time it on small inputs")
    elif interpreter:
        notes.append("triton runs under the CPU interpreter (no GPU): its times measure Python, "
                     "not a GPU")

    cases = build_cases(args.small, np.random.default_rng(0), torch, kernels, torchvision)
    if op_words:
        cases = [c for c in cases if any(w in c.op for w in op_words)]
        if not cases:
            raise ValueError(f"--op: no op matches {', '.join(op_words)}; the ops are box_iou, "
                             "nms, roi_pool, roi_align")
    tv_devices = sorted({d for c in cases for d in (c.torchvision or {})})
    on_gpu = kernels is not None and kernels.device() == "cuda"
    header = ["op", "size"]
    header += ["numpy ms"] if "numpy" in wanted else []
    header += ["triton ms"] if kernels is not None else []
    header += [f"tv-{d} ms" for d in tv_devices]
    header += ["numpy/tv-cpu"] if "numpy" in wanted and "cpu" in tv_devices else []
    tv_for_triton = "cuda" if on_gpu else "cpu"
    header += [f"triton/tv-{tv_for_triton}"] if kernels is not None and \
        tv_for_triton in tv_devices else []
    header += ["moves MB"] if kernels is not None else []

    device_text = ("cuda: " + torch.cuda.get_device_name()) if on_gpu else "cpu"
    print(f"frcnn bench: {'small' if args.small else 'paper'} sizes, median of {repeat} runs "
          f"(ms), device {device_text}")
    with thread_counts(threads, torch) as counts:
        print(f"threads: numpy (OpenBLAS) {counts['numpy']}, torch {counts['torch']}; "
              f"load average {load_average()}")
        rows = time_cases(cases, wanted, kernels, skip_triton, repeat, tv_devices, tv_for_triton)
    print(format_table(header, rows))
    print(f"load average after: {load_average()}")
    ratios = [float(r[header.index("numpy/tv-cpu")]) for r in rows
              if "numpy/tv-cpu" in header and r[header.index("numpy/tv-cpu")] != "-"]
    if ratios:
        print(f"numpy/tv-cpu: worst {max(ratios):.2f}, {sum(r <= 1.0 for r in ratios)} of "
              f"{len(ratios)} ops at or below 1.0")
    for note in notes:
        print("note:", note)
    return 0


@contextlib.contextmanager
def thread_counts(n, torch=None):
    """Run a block with numpy's OpenBLAS and torch both at `n` threads; yields the counts in use.

    numpy's count is set by fast.threads.blas_threads (which leaves a user's OPENBLAS_NUM_THREADS /
    OMP_NUM_THREADS alone), torch's by torch.set_num_threads; both are restored afterwards.
    """
    previous = torch.get_num_threads() if torch is not None else None
    with blas_threads(n):
        if torch is not None:
            torch.set_num_threads(n)
        try:
            yield {"numpy": blas_thread_count() or "unknown BLAS",
                   "torch": torch.get_num_threads() if torch is not None else "-"}
        finally:
            if torch is not None:
                torch.set_num_threads(previous)


def load_average():
    """The 1, 5 and 15 minute load averages as text (other work on the machine skews times)."""
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except (AttributeError, OSError):
        return "unknown"


def moved_megabytes(ops_call):
    """"in / out": MB one ops call with backend="triton" copies to the device and back."""
    if ops_call is None:
        return "-"
    from .. import _triton_bridge     # lazy: it imports torch
    _triton_bridge.moved_bytes(reset=True)
    ops_call()
    moved = _triton_bridge.moved_bytes(reset=True)
    return f"{moved['to_device'] / 1e6:.3g} / {moved['to_host'] / 1e6:.3g}"


def time_cases(cases, wanted, kernels, skip_triton, repeat, tv_devices, tv_for_triton):
    """One table row per case: the times and the ratios (a dot printed per case)."""
    rows = []
    for case in cases:
        t_np = median_ms(case.numpy, repeat) if "numpy" in wanted else None
        t_tr = None
        if kernels is not None and case.triton is not None and not skip_triton:
            fn, dev = case.triton
            t_tr = device_ms(fn, dev, repeat)
        t_tv = {d: device_ms(fn, d, repeat) for d, fn in (case.torchvision or {}).items()}
        row = [case.op, case.size]
        row += [_fmt(t_np)] if "numpy" in wanted else []
        row += [("skipped" if skip_triton else _fmt(t_tr))] if kernels is not None else []
        row += [_fmt(t_tv.get(d)) for d in tv_devices]
        row += [_ratio(t_np, t_tv.get("cpu"))] if "numpy" in wanted and "cpu" in tv_devices else []
        row += [_ratio(t_tr, t_tv.get(tv_for_triton))] if kernels is not None and \
            tv_for_triton in tv_devices else []
        row += [moved_megabytes(case.ops_triton) if not skip_triton else "-"] \
            if kernels is not None else []
        rows.append(row)
        print(".", end="", flush=True)
    print()
    return rows
