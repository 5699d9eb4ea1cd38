"""The `frcnn` command.  Each subcommand is a small function; errors are one clear line."""
import argparse
import sys

import numpy as np


def cmd_anchors(args):
    """Print the k = 9 base anchors and a box-coding round trip (eq. 2)."""
    from .anchors import generate_anchors
    from .box_coding import decode, encode

    anchors = generate_anchors(legacy=args.legacy)
    np.set_printoptions(precision=2, suppress=True)
    print(f"base anchors (base 16, ratios 0.5/1/2, scales 8/16/32, legacy={args.legacy}):")
    print(anchors)
    boxes = np.array([[10, 20, 110, 70], [0, 0, 300, 500]], dtype=np.float32)
    t = encode(boxes, anchors[[0, 4]])
    print("encode(boxes, anchors[[0, 4]]) -> t =")
    print(t)
    back = decode(t, anchors[[0, 4]])
    print("decode(t) ->", back.tolist(), " max error", float(np.abs(back - boxes).max()))
    return 0


def cmd_bench(args):
    from . import bench
    return bench.main(args)


def cmd_kernels(args):
    """Compile every Triton kernel for real GPUs (no GPU needed) and report what the compiler made.

    Exit status 1 if any launch fails to compile or breaks a check (kernels/compile_report.py)."""
    import dataclasses
    import json
    import os
    if "frcnn_scratch.kernels" not in sys.modules:      # kernels defined for the compiler,
        os.environ["TRITON_INTERPRET"] = "0"            # not for the CPU interpreter
    from .kernels import compile_report as report
    missing = report.check_api()
    if missing:
        raise RuntimeError(f"cannot compile the kernels ahead of time: {missing}")
    try:
        archs = tuple(int(a) for a in str(args.arch).split(",") if a.strip())
    except ValueError:
        archs = ()
    if not archs or any(a not in report.SM_LIMITS for a in archs):
        raise ValueError(f"--arch: expected a comma-separated subset of "
                         f"{','.join(map(str, report.SM_LIMITS))}, got {args.arch!r}")
    launches = report.compile_all(archs, select=args.select)
    if not launches:
        raise ValueError(f"--select: no launch matches {args.select!r}")
    print(report.format_report(launches, paper_only=not args.all))
    bad = [launch for launch in launches if launch.problems]
    print(f"\n{len(launches)} kernel launches compiled for "
          f"{', '.join(f'sm_{a}' for a in archs)} through the launchers; {len(bad)} with problems")
    for launch in bad:
        print(f"  {launch.case} / {launch.kernel} sm_{launch.arch}: {'; '.join(launch.problems)}"
              + (f" ({launch.error})" if launch.error else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(launch) for launch in launches], f, indent=1)
    return 1 if bad else 0


# ---- the detector: train / eval / detect / demo ---------------------------------------------------

DEMO_TRAIN_SEED, DEMO_TEST_SEED = 0, 1000  # held-out images come from another seed


def _parse_overrides(pairs):
    """["pooler=pool", "fc_hidden=256"] -> dict of Config fields, values parsed as JSON when they can be."""
    import json
    from .model import Config
    names = {f for f in Config.__dataclass_fields__}
    out = {}
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        if not sep or key not in names:
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE with KEY one of the Config fields "
                             f"({', '.join(sorted(names))})")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        out[key] = tuple(value) if isinstance(value, list) else value
    return out


def _config(args):
    from .model import Config
    return Config(**_parse_overrides(args.set))


# TrainConfig fields set from the command line, and the options as the user types them
TRAIN_OPTIONS = {"iterations": "--iters", "lr": "--lr", "seed": "--seed",
                 "checkpoint_every": "--checkpoint-every"}


def _train_config(args):
    """TrainConfig from the options; a bad value's error names the option (--iters, not iterations)."""
    from .train import TrainConfig
    try:
        return TrainConfig(iterations=args.iters, lr=args.lr, seed=args.seed,
                           checkpoint_every=args.checkpoint_every)
    except ValueError as e:
        for field, option in TRAIN_OPTIONS.items():
            prefix = f"train config.{field}:"
            if str(e).startswith(prefix):
                raise ValueError(option + ":" + str(e)[len(prefix):]) from None
        raise


def _shapes(num_images, seed, what):
    from .data import make_shapes_dataset
    if num_images <= 0:
        raise ValueError(f"--{what}: expected a positive number of images, got {num_images}")
    return make_shapes_dataset(num_images, seed=seed)


def _report(result, class_names):
    print(f"VOC mAP@0.5 = {result['mAP']:.4f}")
    for label, ap in sorted(result["ap"].items()):
        name = class_names[label - 1] if 0 < label <= len(class_names) else str(label)
        print(f"  AP {name:>10s}: {ap:.4f}")


def cmd_train(args):
    """Train on the synthetic shapes dataset; checkpoints go to --checkpoint."""
    from .model import FasterRCNN
    from .train import train
    model = FasterRCNN(_config(args), backend=args.backend)
    tcfg = _train_config(args)                          # check every value before building data
    samples = _shapes(args.train_images, args.data_seed, "train-images")
    history = train(model, samples, tcfg, checkpoint=args.checkpoint,
                    resume=args.resume, progress=not args.quiet)
    if history:
        print(f"final loss {history[-1]['loss']:.4f}; checkpoint {args.checkpoint}")
    return 0


def cmd_eval(args):
    """VOC mAP of a checkpoint on held-out shapes images."""
    from .data import SHAPE_CLASSES
    from .model import FasterRCNN
    from .train import evaluate
    model = FasterRCNN.load(args.checkpoint, backend=args.backend)
    samples = _shapes(args.images, args.data_seed, "images")
    result, _ = evaluate(model, samples, progress=not args.quiet)
    print(f"{len(samples)} images (shapes, seed {args.data_seed})")
    _report(result, SHAPE_CLASSES)
    return 0


def read_image(path):
    """An image file -> (H, W, 3) float32 in [0, 1] (alpha dropped, grey repeated)."""
    import os
    import matplotlib.image as mpimg
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image {path!r} does not exist")
    try:
        image = np.asarray(mpimg.imread(path))
    except Exception as e:  # PIL / matplotlib raise many kinds
        raise ValueError(f"image {path!r} could not be read ({type(e).__name__}: {e})") from None
    # PNG comes back as float in [0, 1]; JPEG (and other 8 / 16-bit files) as ints: scale them
    scale = np.iinfo(image.dtype).max if np.issubdtype(image.dtype, np.integer) else 1.0
    image = image.astype(np.float32) / np.float32(scale)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"image {path!r}: expected an RGB(A) or grey image, got shape {image.shape}")
    return np.ascontiguousarray(image[..., :3])


def detect_image(model, image, min_size, max_size):
    """Rescale (shorter side min_size, longer <= max_size), predict, map boxes back to the image."""
    from .data.transforms import resize
    resized, scale = resize(dict(image=image, boxes=np.zeros((0, 4), np.float32)), min_size, max_size)
    det = model.predict(resized["image"])
    det["boxes"] = det["boxes"] / np.float32(scale)
    return det


def cmd_detect(args):
    """Draw detections on each IMAGE into --out DIR as PNGs."""
    import os
    from .data import SHAPE_CLASSES
    from .model import FasterRCNN
    from .train import blas_threads
    from .viz import save_detections
    if not 0.0 <= args.score <= 1.0:                    # NaN fails too
        raise ValueError(f"--score: expected a number in [0, 1], got {args.score}")
    for option, value in (("--min-size", args.min_size), ("--max-size", args.max_size)):
        if not 0.0 < value < float("inf"):
            raise ValueError(f"{option}: expected a positive number of pixels, got {value}")
    images = [(path, read_image(path)) for path in args.images]  # the images first: a missing one
    model = FasterRCNN.load(args.checkpoint, backend=args.backend)  # is named even without a model
    os.makedirs(args.out, exist_ok=True)
    for path, image in images:
        with blas_threads(1):
            det = detect_image(model, image, args.min_size, args.max_size)
        out = os.path.join(args.out, os.path.splitext(os.path.basename(path))[0] + "_detections.png")
        save_detections(out, image, det, SHAPE_CLASSES, score_threshold=args.score)
        print(f"{path}: {int((det['scores'] >= args.score).sum())} detections -> {out}")
    return 0


def save_demo_figure(path, samples, detections, class_names, score=0.5, cols=4):
    """A grid of test images with their detections (score >= `score`) drawn by viz.draw_boxes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from .viz import draw_boxes, show_image
    rows = max(1, (len(samples) + cols - 1) // cols)
    fig = Figure(figsize=(3 * cols, 3 * rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, sample, det in zip(axes.ravel(), samples, detections):
        keep = det["scores"] >= score
        show_image(ax, sample["image"])
        draw_boxes(ax, det["boxes"][keep], det["labels"][keep], det["scores"][keep], class_names)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def cmd_demo(args):
    """The main job: build shapes data, train, evaluate on held-out images, draw detections."""
    import os
    import time
    from .data import SHAPE_CLASSES
    from .model import FasterRCNN
    from .train import evaluate, train
    start = time.time()
    model = FasterRCNN(_config(args), backend=args.backend)
    tcfg = _train_config(args)                          # check every value before building data
    os.makedirs(args.out, exist_ok=True)
    train_set = _shapes(args.train_images, DEMO_TRAIN_SEED, "train-images")
    test_set = _shapes(args.test_images, DEMO_TEST_SEED, "test-images")
    print(f"shapes data: {len(train_set)} training images (seed {DEMO_TRAIN_SEED}), "
          f"{len(test_set)} held-out images (seed {DEMO_TEST_SEED})")
    checkpoint = os.path.join(args.out, "model.npz")
    train(model, train_set, tcfg, checkpoint=checkpoint, resume=args.resume,
          progress=not args.quiet)
    trained = time.time()
    result, detections = evaluate(model, test_set, progress=not args.quiet)
    print(f"evaluated on {len(test_set)} held-out images")
    _report(result, SHAPE_CLASSES)
    figure = os.path.join(args.out, "detections.png")
    save_demo_figure(figure, test_set[:8], detections[:8], SHAPE_CLASSES)
    print(f"checkpoint {checkpoint}; picture {figure}")
    print(f"train {trained - start:.0f} s, total {time.time() - start:.0f} s")
    return 0


def _add_model_args(p, iters):
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="change a model Config field, e.g. --set pooler=pool (repeatable)")
    p.add_argument("--iters", type=int, default=iters, help="training iterations (one image each)")
    p.add_argument("--lr", type=float, default=0.01, help="peak learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed of image order, flips and sampling")
    p.add_argument("--checkpoint-every", type=int, default=500, help="iterations between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint if it exists")


def _add_common(p):
    p.add_argument("--backend", choices=("numpy", "triton"), default=None,
                   help="ops backend (default: FRCNN_BACKEND or numpy)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser():
    p = argparse.ArgumentParser(prog="frcnn", description="Faster R-CNN from scratch")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("anchors", help="print the base anchors and a box-coding round trip")
    a.add_argument("--legacy", action="store_true", help="the paper code's +1 pixel convention")
    a.set_defaults(func=cmd_anchors)
    b = sub.add_parser("bench", help="time the ops (numpy, triton, torchvision when present)")
    b.add_argument("--repeat", type=int, default=5, help="timed repeats per op (median reported)")
    b.add_argument("--backends", default="numpy,triton,torchvision",
                   help="comma-separated subset of numpy,triton,torchvision")
    b.add_argument("--small", action="store_true", help="small sizes (for the CPU interpreter)")
    b.add_argument("--op", default=None, metavar="WORDS",
                   help="only ops whose name contains one of these comma-separated words "
                        "(box_iou, nms, roi_pool, roi_align, fwd+bwd)")
    b.add_argument("--threads", type=int, default=1,
                   help="threads for numpy's OpenBLAS and for torch alike (default 1)")
    b.set_defaults(func=cmd_bench)
    k = sub.add_parser("kernels", help="compile the Triton kernels for real GPUs (no GPU needed): "
                                       "registers, spills, occupancy, instruction mix, checks")
    k.add_argument("--arch", default="80,90", help="compute capabilities, e.g. 80 or 80,90")
    k.add_argument("--all", action="store_true",
                   help="a line for every launch (default: the paper-size launches)")
    k.add_argument("--select", default=None, metavar="TEXT",
                   help="only the launches whose case name contains TEXT (e.g. roi_align)")
    k.add_argument("--json", default=None, metavar="PATH", help="write every launch as JSON")
    k.set_defaults(func=cmd_kernels)
    t = sub.add_parser("train", help="train on the synthetic shapes dataset")
    _add_model_args(t, iters=3000)
    t.add_argument("--checkpoint", default="frcnn.npz", help="checkpoint path (.npz)")
    t.add_argument("--train-images", type=int, default=1000, help="shapes images to train on")
    t.add_argument("--data-seed", type=int, default=DEMO_TRAIN_SEED, help="seed of the shapes data")
    _add_common(t)
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("eval", help="VOC mAP@0.5 of a checkpoint on held-out shapes images")
    e.add_argument("--checkpoint", default="frcnn.npz", help="checkpoint path (.npz)")
    e.add_argument("--images", type=int, default=200, help="held-out shapes images")
    e.add_argument("--data-seed", type=int, default=DEMO_TEST_SEED, help="seed of the shapes data")
    _add_common(e)
    e.set_defaults(func=cmd_eval)
    d = sub.add_parser("detect", help="draw detections on images")
    d.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG)")
    d.add_argument("--out", required=True, metavar="DIR", help="folder for the PNGs")
    d.add_argument("--checkpoint", default="frcnn.npz", help="checkpoint path (.npz)")
    d.add_argument("--score", type=float, default=0.5, help="draw detections scoring at least this")
    d.add_argument("--min-size", type=float, default=128, help="rescale: shorter side (pixels)")
    d.add_argument("--max-size", type=float, default=256, help="rescale: longest side at most")
    _add_common(d)
    d.set_defaults(func=cmd_detect)
    m = sub.add_parser("demo", help="build shapes data, train, evaluate, draw (the main job)")
    _add_model_args(m, iters=3000)
    m.add_argument("--out", default="frcnn-demo", metavar="DIR", help="folder for checkpoint + picture")
    m.add_argument("--train-images", type=int, default=1000, help="shapes images to train on")
    m.add_argument("--test-images", type=int, default=200, help="held-out shapes images to evaluate on")
    _add_common(m)
    m.set_defaults(func=cmd_demo)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError, KeyError) as e:
        print(f"frcnn {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
