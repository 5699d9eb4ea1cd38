"""`frcnn bench-model`: the whole detector, one training step and one prediction, at real sizes.

Sizes run from the demo's 96 x 160 to the paper's 600 x 1000 (shorter side 600).  On each size the
NumPy model (model.Config, default or --set) is timed beside the textbook model (`fast=False`:
nn.py's layers and the plain training step, with the same weights; --no-textbook leaves it out)
and against torchvision's FasterRCNN built to the same network (`torchvision_twin`): the same
backbone, the same RPN head, the same 7 x 7 RoI Align and two fc layers, the same anchors per
position, sampling sizes, proposal counts and thresholds, and the same initial weights.
torchvision's resize is switched off (both sides see the image as it is) and its padding is to a
multiple of the stride, which the four sizes already are.

The sides take turns in one process on the same images, in blocks of three calls (three NumPy
steps, three textbook steps, three torch steps, three NumPy predictions, ...), so that a change in
the machine's load hits them all; each time is the median of --repeat calls, not counting the
first of each block (it runs right after another side, whose threads are still busy: `BLOCK`).  A
training step is the forward pass, the four losses, the backward pass and one SGD update; a
prediction is the test-time forward with its NMS.  The header names the kernels numpy's matrix
products run on.

--threads N runs every side with N threads (the NumPy model's team, the textbook's OpenBLAS,
torch's intra-op pool); --threads default leaves each side to its own choice (this library's
`threads.work_threads`, OpenBLAS's and torch's defaults).  --memory also measures the peak memory
of each side in a fresh process per size: the growth of the resident set while it trains and
predicts (Linux: the peak counter is reset after the model is built, then read from
/proc/self/status).
"""
import contextlib
import os
import statistics
import subprocess
import sys
import time

import numpy as np

from ..config import Config, TrainConfig, parse_overrides
from ..data.shapes import make_shapes_sample
from ..fast.threads import (blas_threads, for_image, openblas_kernels, set_threads, usable_cores,
                            work_threads)
from ..memory import check_memory
from ..model import FasterRCNN
from ..train import Trainer
from .bench import format_table, load_average
from .process import keep_freed_memory

SIZES = ((96, 160), (240, 400), (480, 640), (600, 1000))


# ---- inputs ----------------------------------------------------------------------------------

def sample_at(height, width, seed=0):
    """A shapes image of exactly (height, width) with several objects scaled to it (a sample dict)."""
    side = max(height, width)
    lo, hi = max(8, min(height, width) // 8), max(16, min(height, width) // 2)
    s = make_shapes_sample(np.random.default_rng(seed), image_size=side, shape_size=(lo, hi),
                           num_objects=(3, 6))
    boxes = np.clip(s["boxes"], 0, [width, height, width, height])
    keep = ((boxes[:, 2] - boxes[:, 0]) >= 4) & ((boxes[:, 3] - boxes[:, 1]) >= 4)
    if not keep.any():                       # every shape fell in the cropped part: draw again
        return sample_at(height, width, seed + 1000)
    return dict(image=np.ascontiguousarray(s["image"][:height, :width]),
                boxes=boxes[keep].astype(np.float32), labels=s["labels"][keep])


def parse_sizes(text):
    """"96x160,600x1000" -> ((96, 160), (600, 1000)); each side at least 32 pixels."""
    sizes = []
    for part in str(text).split(","):
        try:
            h, w = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise ValueError(f"--sizes: expected HxW[,HxW...] such as 480x640, got {part!r}") from None
        if h < 32 or w < 32:
            raise ValueError(f"--sizes: each side must be at least 32 pixels, got {part!r}")
        sizes.append((h, w))
    return tuple(sizes)


# ---- torchvision's FasterRCNN, built to our Config --------------------------------------------

def torch_layers(model):
    """The model's network as torch modules holding copies of its weights, built from its config
    and params() (the same names for the fast and the textbook model: backbone.0.weight, ...).

    Returns dict(backbone=nn.Sequential (conv3x3 + ReLU per entry of config.channels, a 2x2 max
    pool between entries, at the indices of model.backbone), rpn_conv, rpn_cls, rpn_reg
    (nn.Conv2d), fc6, fc7, cls_score, bbox_pred (nn.Linear)).  Needs torch only.
    """
    import torch                      # lazy: an optional dependency
    params = model.params()

    def weights(module, name):
        """Copy params[name.weight / name.bias] into `module`; a shape that differs is an error."""
        for key in ("weight", "bias"):
            value = np.asarray(params[f"{name}.{key}"], np.float32)
            target = getattr(module, key)
            if tuple(target.shape) != value.shape:
                raise ValueError(f"torch_layers: {name}.{key} is {value.shape}, the config makes "
                                 f"{tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(torch.from_numpy(value))
        return module

    def conv(name, in_ch, out_ch, k):
        """A stride-1 conv that keeps the size (3x3 padding 1, 1x1 none), as the model's."""
        return weights(torch.nn.Conv2d(in_ch, out_ch, k, padding=k // 2), name)

    def linear(name, in_features, out_features):
        return weights(torch.nn.Linear(in_features, out_features), name)

    cfg = model.config
    layers, in_ch = [], 3
    for i, out_ch in enumerate(cfg.channels):          # model.backbone's layout and indices
        layers += [conv(f"backbone.{len(layers)}", in_ch, out_ch, 3), torch.nn.ReLU()]
        if i < len(cfg.channels) - 1:
            layers.append(torch.nn.MaxPool2d(2, 2))
        in_ch = out_ch
    c, k, hidden = cfg.channels[-1], cfg.num_anchors, cfg.fc_hidden
    return dict(backbone=torch.nn.Sequential(*layers),
                rpn_conv=conv("rpn.conv", c, cfg.rpn_channels, 3),
                rpn_cls=conv("rpn.cls", cfg.rpn_channels, k, 1),
                rpn_reg=conv("rpn.reg", cfg.rpn_channels, 4 * k, 1),
                fc6=linear("head.fc6", c * cfg.pooled_size ** 2, hidden),
                fc7=linear("head.fc7", hidden, hidden),
                cls_score=linear("head.cls_score", hidden, cfg.num_classes + 1),
                bbox_pred=linear("head.bbox_pred", hidden, 4 * (cfg.num_classes + 1)))


def torchvision_twin(model, torchvision):
    """torchvision.models.detection.FasterRCNN with the NumPy model's network and initial weights.

    Anchors: the same sizes (stride * scales) and ratios per position; RPN and RoI sampling sizes,
    IoU thresholds, pre / post-NMS counts, NMS thresholds, score threshold and detections per
    image from model.config; RoI Align 7 x 7 with the same sampling ratio; no resize (both sides
    see the image as it is) and padding to a multiple of the stride.
    """
    import torch                      # lazy: optional dependencies
    from torchvision.models.detection import FasterRCNN as TorchFasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    cfg = model.config
    if cfg.pooler != "align":
        raise ValueError("torchvision_twin: torchvision's FasterRCNN pools with RoI Align only; "
                         "bench with config.pooler 'align'")
    t = torch_layers(model)
    backbone = t["backbone"]
    backbone.out_channels = int(cfg.channels[-1])

    class RPNHead(torch.nn.Module):                    # torchvision's, with our mid channels
        def __init__(self):
            super().__init__()
            self.conv, self.cls_logits, self.bbox_pred = t["rpn_conv"], t["rpn_cls"], t["rpn_reg"]

        def forward(self, features):
            hidden = [torch.relu(self.conv(f)) for f in features]
            return [self.cls_logits(h) for h in hidden], [self.bbox_pred(h) for h in hidden]

    sizes = tuple(float(cfg.stride * s) for s in cfg.anchor_scales)
    anchors = AnchorGenerator(sizes=(sizes,), aspect_ratios=(tuple(cfg.anchor_ratios),))
    box_head = TwoMLPHead(int(cfg.channels[-1]) * cfg.pooled_size ** 2, cfg.fc_hidden)
    box_head.fc6, box_head.fc7 = t["fc6"], t["fc7"]
    predictor = FastRCNNPredictor(cfg.fc_hidden, cfg.num_classes + 1)
    predictor.cls_score, predictor.bbox_pred = t["cls_score"], t["bbox_pred"]
    twin = TorchFasterRCNN(
        backbone, num_classes=None, min_size=1, max_size=1 << 30,
        image_mean=list(cfg.pixel_mean), image_std=list(cfg.pixel_std),
        rpn_anchor_generator=anchors, rpn_head=RPNHead(),
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_train, rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_test,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_train,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_test, rpn_nms_thresh=cfg.rpn_nms_threshold,
        rpn_fg_iou_thresh=cfg.rpn_pos_iou, rpn_bg_iou_thresh=cfg.rpn_neg_iou,
        rpn_batch_size_per_image=cfg.rpn_batch_size,
        rpn_positive_fraction=cfg.rpn_positive_fraction,
        box_roi_pool=MultiScaleRoIAlign(["0"], cfg.pooled_size, cfg.sampling_ratio),
        box_head=box_head, box_predictor=predictor, box_score_thresh=cfg.score_threshold,
        box_nms_thresh=cfg.nms_threshold, box_detections_per_img=cfg.max_detections,
        box_fg_iou_thresh=cfg.roi_fg_iou, box_bg_iou_thresh=cfg.roi_bg_iou_hi,
        box_batch_size_per_image=cfg.roi_batch_size, box_positive_fraction=cfg.roi_fg_fraction,
        bbox_reg_weights=(10.0, 10.0, 5.0, 5.0), size_divisible=cfg.stride)
    twin.transform.resize = lambda image, target=None: (image, target)   # no resize, like ours
    return twin


# ---- timing ----------------------------------------------------------------------------------

def textbook_twin(model):
    """FasterRCNN(fast=False), nn.py's layers and the plain step, with a copy of `model`'s weights."""
    twin = FasterRCNN(model.config, backend=model.backend, class_names=model.class_names,
                      fast=False)
    ours = model.params()
    for name, value in twin.params().items():
        value[...] = ours[name]
    return twin


class NumpySide:
    """One training step (Trainer.step) and one prediction of a NumPy model: the fast one on the
    threads it chooses for the image, the textbook one on `blas` OpenBLAS threads (None: as many
    as OpenBLAS chooses)."""

    def __init__(self, model, samples, blas=None):
        self.model, self.blas = model, blas
        self.trainer = Trainer(model, samples, TrainConfig(iterations=1 << 30, flip=False, seed=0))

    def _threads(self, sample):
        if self.model.fast:
            return for_image(*sample["image"].shape[:2])     # as the model itself chooses
        return contextlib.nullcontext() if self.blas is None else blas_threads(self.blas)

    def train(self, sample):
        with self._threads(sample):
            self.trainer.step(sample)

    def predict(self, sample):
        with self._threads(sample):
            self.model.predict(sample["image"])


class TorchSide:
    """The same for torchvision's twin: model(images, targets), loss.backward(), SGD step."""

    def __init__(self, twin, torch, tcfg):
        self.twin, self.torch = twin, torch
        self.optimizer = torch.optim.SGD(twin.parameters(), lr=tcfg.lr, momentum=tcfg.momentum,
                                         weight_decay=tcfg.weight_decay)

    def _inputs(self, sample):
        image = self.torch.from_numpy(np.ascontiguousarray(sample["image"].transpose(2, 0, 1)))
        target = dict(boxes=self.torch.from_numpy(sample["boxes"]),
                      labels=self.torch.from_numpy(sample["labels"]))
        return [image], [target]

    def train(self, sample):
        images, targets = self._inputs(sample)
        self.twin.train()
        losses = self.twin(images, targets)
        self.optimizer.zero_grad()
        sum(losses.values()).backward()
        self.optimizer.step()

    def predict(self, sample):
        images, _ = self._inputs(sample)
        self.twin.eval()
        with self.torch.no_grad():
            self.twin(images)


# Calls per side in a row.  The first call of each block is not timed: it runs right after another
# side, whose leftovers slow it down (torch's OpenMP threads keep spinning on the cores for a while
# after its step ends, libgomp's default wait policy, which a program running torch alone never
# meets; measurements: docs/performance.md).
BLOCK = 3


def interleaved_medians(sides, samples, repeat, block=BLOCK):
    """{(side, "train" | "predict"): median ms of `repeat` calls}.

    The sides take turns in blocks of `block` calls on the same images (so that a change in the
    machine's load hits both); the first call of each block is not timed (see BLOCK).
    """
    if block < 2:
        raise ValueError(f"block: expected an int >= 2 (the first call of a block is not timed), "
                         f"got {block}")
    times = {(name, what): [] for name in sides for what in ("train", "predict")}
    calls = 0
    while min(len(v) for v in times.values()) < repeat:
        for what in ("train", "predict"):
            for name, side in sides.items():
                for b in range(block):
                    sample = samples[(calls + b) % len(samples)]
                    start = time.perf_counter()
                    getattr(side, what)(sample)
                    if b:
                        times[name, what].append(1e3 * (time.perf_counter() - start))
        calls += block
    return {k: statistics.median(v[:repeat]) for k, v in times.items()}


def peak_memory_mb(side, size, threads, overrides, repeat=2):
    """Peak resident memory (MB) a side adds while training and predicting, in a fresh process."""
    code = ("import sys; from frcnn_scratch.tools.bench_model import _memory_child; "
            "print(_memory_child(*sys.argv[1:]))")
    env = dict(os.environ)
    done = subprocess.run([sys.executable, "-c", code, side, f"{size[0]}x{size[1]}", str(threads),
                           ";".join(overrides), str(repeat)], capture_output=True, text=True,
                          env=env)
    if done.returncode != 0:
        return None
    return float(done.stdout.strip().splitlines()[-1])


def _memory_child(side, size, threads, overrides, repeat):
    """Runs in the child of peak_memory_mb: builds the side ("numpy", "textbook" or "torchvision"),
    then steps; returns the MB added, as text."""
    keep_freed_memory()                         # as in the `frcnn` process that asked
    (h, w), = parse_sizes(size)
    threads = None if threads == "default" else int(threads)
    model = _build_model([o for o in overrides.split(";") if o])
    samples = [sample_at(h, w, seed=i) for i in range(2)]
    if side == "numpy":
        set_threads(threads)
        runner = NumpySide(model, samples)
    elif side == "textbook":
        runner = NumpySide(textbook_twin(model), samples, blas=threads)
    else:
        import torch                  # lazy: optional dependencies
        import torchvision
        if threads is not None:
            torch.set_num_threads(threads)
        runner = TorchSide(torchvision_twin(model, torchvision), torch, TrainConfig())
    base = _reset_peak()
    for r in range(int(repeat)):
        runner.train(samples[r % 2])
        runner.predict(samples[r % 2])
    return f"{_status_mb('VmHWM') - base:.1f}"


def _reset_peak():
    """Reset the kernel's peak-RSS counter (Linux: clear_refs 5); returns the RSS now, in MB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS")


def _status_mb(field):
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise OSError(f"/proc/self/status has no {field}")


def _build_model(overrides):
    return FasterRCNN(Config(**parse_overrides(overrides)))


# ---- the command -----------------------------------------------------------------------------

def main(args):
    """Entry point of `frcnn bench-model` (args.sizes, args.repeat, args.threads, args.memory,
    args.set, args.numpy_only, args.no_textbook)."""
    sizes = parse_sizes(args.sizes)
    repeat = int(args.repeat)
    if repeat < 1:
        raise ValueError(f"--repeat: expected a positive int, got {args.repeat}")
    cores = usable_cores()
    if str(args.threads) == "default":
        threads = None
    else:
        try:
            threads = int(args.threads)
        except ValueError:
            raise ValueError(f"--threads: expected 1..{cores} or 'default', got {args.threads!r}") \
                from None
        if not 1 <= threads <= cores:
            raise ValueError(f"--threads: expected 1..{cores} (this machine's cores) or 'default', "
                             f"got {threads}")
    overrides = list(args.set or [])
    textbook = not getattr(args, "no_textbook", False)
    notes = []
    torch = torchvision = None
    if not args.numpy_only:
        try:
            import torch                  # lazy: optional dependencies
            import torchvision
        except Exception as e:                # ImportError, or a torchvision built for another torch
            torch = torchvision = None
            notes.append(f"torchvision not importable ({type(e).__name__}: {str(e)[:80]}): "
                         "NumPy alone")
    if textbook:
        notes.append("textbook: FasterRCNN(fast=False), nn.py's layers and the plain training "
                     "step, with the same weights (--no-textbook leaves it out)")
    model = _build_model(overrides)
    for h, w in sizes:                  # every size before the first is timed: refused, with the
        what = f"--sizes {h}x{w}"       # estimate, where a step cannot fit in memory
        check_memory(model.config, (h, w), training=True, what=what)
        if textbook:
            check_memory(model.config, (h, w), training=True, fast=False,
                         what=f"{what} (the textbook model; --no-textbook leaves it out)")
    previous_threads = torch.get_num_threads() if torch is not None else None
    if torch is not None and threads is not None:
        torch.set_num_threads(threads)
    set_threads(threads)                 # None: the library chooses by the image
    try:
        rows = []
        print(f"frcnn bench-model: median of {repeat} calls, ms; threads "
              f"{'each side its default' if threads is None else threads}; numpy's BLAS: "
              f"{blas_kernels()}"
              + (f"; torch's CPU kernels: {torch_kernels(torch)}" if torch is not None else "")
              + f"; load average {load_average()}", flush=True)
        notes += pinned_kernels_notes()
        for h, w in sizes:
            samples = [sample_at(h, w, seed=i) for i in range(2)]
            numpy_model = FasterRCNN(model.config)            # fresh weights for every size
            sides = {"numpy": NumpySide(numpy_model, samples)}
            if textbook:
                sides["textbook"] = NumpySide(textbook_twin(numpy_model), samples, blas=threads)
            if torch is not None:
                twin = torchvision_twin(numpy_model, torchvision)
                sides["torchvision"] = TorchSide(twin, torch, TrainConfig())
            t = interleaved_medians(sides, samples, repeat)
            row = [f"{h}x{w}", f"{work_threads(h, w)}"]
            for what in ("train", "predict"):
                row += [f"{t['numpy', what]:.1f}"]
                row += [f"{t['textbook', what]:.1f}"] if textbook else []
                if torch is not None:
                    row += [f"{torch.get_num_threads()}"] if what == "train" else []
                    row += [f"{t['torchvision', what]:.1f}",
                            f"{t['numpy', what] / t['torchvision', what]:.2f}"]
            if args.memory:
                mem = {side: peak_memory_mb(side, (h, w), "default" if threads is None else threads,
                                            overrides) for side in sides}
                row += [_mb(mem[side]) for side in sides]
            rows.append(row)
            print(".", end="", flush=True)
        print()
    finally:
        set_threads(None)
        if torch is not None:
            torch.set_num_threads(previous_threads)
    header = ["image", "np threads"]
    for what in ("train", "predict"):
        header += [f"numpy {what}"]
        header += [f"textbook {what}"] if textbook else []
        if torch is not None:
            header += ["torch threads"] if what == "train" else []
            header += [f"tv {what}", f"{what} ratio"]
    if args.memory:
        header += [f"{short} peak MB" for short, on in
                   (("numpy", True), ("textbook", textbook), ("tv", torch is not None)) if on]
    print(format_table(header, rows))
    print(f"load average after: {load_average()}")
    for note in notes:
        print("note:", note)
    return 0


def blas_kernels():
    """Which kernels numpy's matrix products run on, for the table's header: "OpenBLAS Haswell
    kernels", with the OPENBLAS_CORETYPE that chose them if one is set."""
    name = openblas_kernels()
    if name is None:
        return "not OpenBLAS"
    chosen = os.environ.get("OPENBLAS_CORETYPE")
    return f"OpenBLAS {name} kernels" + (f" (OPENBLAS_CORETYPE={chosen})" if chosen else "")


def torch_kernels(torch):
    """The instruction set torch's CPU kernels (oneDNN's convolutions, MKL) run on: "AVX512", ..."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:                      # an older torch
        return "unknown"


def pinned_kernels_notes():
    """A note for the table when OPENBLAS_CORETYPE pins numpy's OpenBLAS to chosen kernels: torch
    does not read it, so on a CPU with newer instructions the two sides run different ones (e.g.
    numpy on AVX2 kernels against torch's AVX-512; docs/performance.md)."""
    chosen = os.environ.get("OPENBLAS_CORETYPE")
    if not chosen or openblas_kernels() is None:
        return []
    return [f"OPENBLAS_CORETYPE={chosen} pins numpy's matrix products to OpenBLAS's {chosen} "
            f"kernels; torch picks its own for this CPU. To compare the two on this CPU's own "
            f"kernels, run this command with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset "
            f"(env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE frcnn bench-model ...)"]


def _mb(value):
    return "-" if value is None else f"{value:.0f}"
