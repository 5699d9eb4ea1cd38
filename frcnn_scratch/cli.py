"""The `frcnn` command.  Each subcommand is a small function; errors are one clear line."""
import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .anchors import generate_anchors
from .box_coding import decode, encode
from .checkpoint import check_regular_file, data_identity, hold, read_npz
from .config import Config, TrainConfig, parse_overrides
from .data.coco import read_coco_results, write_coco_results
from .data.dataset import open_dataset, parse_spec
from .data.images import read_image_reduced, regular_file
from .evaluate import detect_all, each_detection, evaluate, score
from .fast import threads
from .memory import check_memory
from .model import FasterRCNN
from .tools import bench, bench_model
from .tools.process import keep_freed_memory
from .train import Trainer, train
from .viz import MAX_PICTURE_SIDE, draw_boxes, save_detections, save_pr_curves, show_image


def cmd_anchors(args):
    """Print the k = 9 base anchors and a box-coding round trip (eq. 2)."""
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
    return bench.main(args)


def cmd_bench_model(args):
    return bench_model.main(args)


def cmd_kernels(args):
    """Compile every Triton kernel for real GPUs (no GPU needed) and report what the compiler made.

    Exit status 1 if any launch fails to compile or breaks a check (tools/compile_report.py)."""
    if "frcnn_scratch.kernels" not in sys.modules:      # kernels defined for the compiler,
        os.environ["TRITON_INTERPRET"] = "0"            # not for the CPU interpreter
    # lazy: it imports torch and triton, and the kernels must load after TRITON_INTERPRET is set
    from .tools import compile_report as report
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

# TrainConfig fields set from the command line, and the options as the user types them
TRAIN_OPTIONS = {"iterations": "--iters", "lr": "--lr", "seed": "--seed",
                 "checkpoint_every": "--checkpoint-every"}


def _train_config(args):
    """TrainConfig from the options; a bad value's error names the option (--iters, not iterations)."""
    try:
        return TrainConfig(iterations=args.iters, lr=args.lr, seed=args.seed,
                           checkpoint_every=args.checkpoint_every)
    except ValueError as e:
        for field, option in TRAIN_OPTIONS.items():
            prefix = f"train config.{field}:"
            if str(e).startswith(prefix):
                raise ValueError(option + ":" + str(e)[len(prefix):]) from None
        raise


# Images of folder datasets are rescaled by the paper's rule to sizes that suit the default model
# (stride 8, anchors of 16 to 64 pixels); the synthetic shapes already come at such sizes.
FOLDER_MIN_SIZE, FOLDER_MAX_SIZE = 128, 256


def _train_scale(args, data_spec):
    """(min_size, max_size) a model is trained at: --min-size / --max-size (or --set min_size /
    max_size), else 0 / 0 (images as they come) for the shapes and 128 / 256 for VOC and COCO
    folders."""
    folder = parse_spec(data_spec)[0] != "shapes"
    given = _given_scale(args)
    lo = given[0] if given[0] is not None else (FOLDER_MIN_SIZE if folder else 0)
    hi = given[1] if given[1] is not None else (FOLDER_MAX_SIZE if folder else 0)
    names = _scale_names(args)
    scale = _scale_options(lo, hi, names)
    overrides = parse_overrides(args.set)
    overrides.update(min_size=scale[0], max_size=scale[1])
    _check_scale_fits(Config(**overrides), names)        # before the data is read
    return scale


def _given_scale(args):
    """(min_size, max_size) as given by --min-size / --max-size or --set min_size / max_size
    (None where neither gives it); both ways with two values is refused, naming them."""
    overrides = parse_overrides(args.set)
    sizes = []
    for field in ("min_size", "max_size"):
        option, value = "--" + field.replace("_", "-"), getattr(args, field)
        if field in overrides:
            given = overrides[field]
            if isinstance(given, bool) or not isinstance(given, (int, float)):
                raise ValueError(f"--set {field}: expected a number of pixels >= 0, got {given!r}")
            if value is not None and float(value) != float(given):
                raise ValueError(f"{option}, --set {field}: two values ({value:g} and "
                                 f"{given!r}); give one")
            value = float(given)
        sizes.append(value)
    return tuple(sizes)


def _scale_names(args):
    """How the user gave the scale: --min-size / --max-size, or --set min_size / max_size."""
    overrides = parse_overrides(args.set)
    return tuple(f"--set {field}" if field in overrides and getattr(args, field) is None
                 else "--" + field.replace("_", "-") for field in ("min_size", "max_size"))


def _scale_options(lo, hi, names=("--min-size", "--max-size")):
    for option, value in zip(names, (lo, hi)):
        if not 0.0 <= value < float("inf"):               # NaN fails too
            raise ValueError(f"{option}: expected a number of pixels >= 0, got {value}")
    if (lo > 0) != (hi > 0) or hi < lo:
        raise ValueError(f"{names[0]}, {names[1]}: expected both 0 (images as they come) or "
                         f"0 < {names[0]} <= {names[1]}, got {lo:g} and {hi:g}")
    return float(lo), float(hi)


def _check_scale_fits(config, names):
    """A shorter side below the model's stride leaves no feature map: refused before any work,
    naming the option (else every image would fail at its first step)."""
    if 0 < config.min_size < config.stride:
        raise ValueError(f"{names[0]}: expected at least the model's stride, {config.stride} "
                         f"pixels (or 0: images as they come), got {config.min_size:g}")


def _open_data(spec, split, class_names=None, scale=(0, 0), num_images=1000, seed=0,
               images_option="--train-images"):
    """open_dataset with the command line's names in its errors."""
    if parse_spec(spec)[0] == "shapes":
        if num_images <= 0:
            raise ValueError(f"{images_option}: expected a positive number of images, got {num_images}")
        if seed < 0:
            raise ValueError(f"--data-seed: expected an int >= 0, got {seed}")
    return open_dataset(spec, split=split, class_names=class_names, min_size=scale[0] or None,
                        max_size=scale[1] or None, num_images=num_images, seed=seed)


def _check_model_options(args):
    """Every --set value checked before any data is read (a typo, or weights that cannot fit in
    memory, fail at once); the scale (--set min_size / max_size or --min-size / --max-size) is
    checked by _train_scale, with the names the user gave."""
    _given_scale(args)
    overrides = parse_overrides(args.set)
    for field in ("min_size", "max_size"):
        overrides.pop(field, None)
    check_memory(Config(**overrides), what="--set")


def _check_image_memory(config, training, what):
    """Refuse a scale whose images cannot be processed in the memory there is (the estimate of
    model.memory_estimate, at the largest image the scale allows; the shapes' at most 160 px)."""
    side = config.max_size if config.max_size > 0 else 160
    check_memory(config, (side, side), training=training, what=what)


def _model_for(args, data, scale):
    """A new model for `data`: its class names and number of classes, the training scale."""
    overrides = parse_overrides(args.set)
    n = len(data.class_names)
    if overrides.get("num_classes", n) != n:
        raise ValueError(f"--set num_classes={overrides['num_classes']}: the data has {n} classes "
                         f"({', '.join(data.class_names)})")
    overrides.update(num_classes=n, min_size=scale[0], max_size=scale[1])
    config = Config(**overrides)
    _check_image_memory(config, True, "--set, --min-size / --max-size")
    return FasterRCNN(config, backend=args.backend, class_names=data.class_names,
                      fast=not args.textbook)


def _test_overrides(args):
    """--set fields and --min-size / --max-size for a trained model (Config.TEST_TIME_FIELDS)."""
    overrides = parse_overrides(args.set)
    lo, hi = _given_scale(args)             # one of them by --set alone: the model's other one
    if args.min_size is not None or args.max_size is not None:
        names = _scale_names(args)
        if lo is None or hi is None:
            raise ValueError(f"{names[0]}, {names[1]}: give both (or neither: the model's own)")
        overrides["min_size"], overrides["max_size"] = _scale_options(lo, hi, names)
    return overrides


def _load_model(args, overrides):
    """The checkpoint's model with the test-time overrides; a scale it cannot use is refused."""
    model = FasterRCNN.load(args.checkpoint, backend=args.backend, overrides=overrides,
                            fast=not args.textbook)
    _check_scale_fits(model.config, _scale_names(args))
    _check_image_memory(model.config, False, "--set, --min-size / --max-size")
    return model


def _report(result, class_names):
    """The metrics table: VOC AP at IoU 0.5 (all-point and 11-point) and the COCO numbers."""
    coco = result["coco"]
    print(f"VOC mAP@0.5 = {result['mAP']:.4f} (all-point; 11-point VOC07: {result['mAP_07']:.4f})")
    print("COCO: " + "  ".join(f"{k} {_metric(coco[k], 3)}" for k in
                               ("AP", "AP50", "AP75", "APs", "APm", "APl")))
    print("      " + "  ".join(f"{k} {_metric(coco[k], 3)}" for k in
                               ("AR1", "AR10", "AR100", "ARs", "ARm", "ARl")))
    width = max([len(n) for n in class_names] + [5])
    print(f"  {'class':>{width}s}  objects  AP50 VOC  AP50 VOC07  AP@[.5:.95]")
    for label, name in enumerate(class_names, start=1):
        if label not in result["ap"]:
            print(f"  {name:>{width}s}        0         -           -            -")
            continue
        print(f"  {name:>{width}s}  {result['npos'][label]:7d}  {result['ap'][label]:8.4f}  "
              f"{result['ap_07'][label]:10.4f}  {_metric(coco['ap_per_class'].get(label, -1), 4):>11s}")


def _metric(value, digits):
    """A metric as the table shows it: COCO's -1 (no object of that size or class: undefined)
    is "n/a", never a number that reads as a score."""
    return "n/a" if value < 0 else f"{value:.{digits}f}"


def _check_checkpoint_path(path, args, option="--checkpoint"):
    """Before any work: the checkpoint must be a writable file path, and an existing one is
    continued (--resume) or replaced (--overwrite) only when asked.  A path that exists and is
    not a regular file (a device, a FIFO, a folder; a symlink to one) is refused: it would block
    or never end when read, and must never be replaced.  A symlink to a file is written through
    (checkpoint.atomic_savez)."""
    _check_file_path(path, option)
    if os.path.exists(path):
        try:
            check_regular_file(path)
        except ValueError as e:
            raise ValueError(f"{option}: {e}") from None
        if not args.resume and not args.overwrite:
            raise ValueError(f"{option}: {path} exists; --resume to continue its run, or "
                             "--overwrite to replace it")


def _check_file_path(path, option):
    """An output file's path: not empty, not a folder (nor a name ending with '/', a folder to
    be), in a folder where a file can be written (a symlink's: where its target goes)."""
    if not path:
        raise ValueError(f"{option}: an empty path")
    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        raise ValueError(f"{option}: {path!r} is a folder, not a file path")
    _check_writable(os.path.realpath(path), option)


def _check_writable(path, option, folder=False):
    """The folder that will receive `path` (or `path` itself, a folder) exists or can be made,
    and a file can be created there: one line naming the option otherwise, before any work."""
    target = path if folder else (os.path.dirname(os.path.abspath(path)) or ".")
    try:
        os.makedirs(target, exist_ok=True)
        with tempfile.TemporaryFile(dir=target):
            pass
    except OSError as e:
        raise ValueError(f"{option}: cannot write to {target} ({e.strerror or e})") from None


def _training_data_id(args, data, scale):
    shapes = parse_spec(args.data)[0] == "shapes"
    return data_identity(data, data=str(args.data),
                         split=None if shapes else (args.split or "trainval"),
                         data_seed=getattr(args, "data_seed", None) if shapes else None,
                         min_size=scale[0], max_size=scale[1])


def cmd_train(args):
    """Train on --data (shapes, voc:ROOT or coco:ANN.json:IMAGES); checkpoints go to --checkpoint."""
    tcfg = _train_config(args)                          # check every value before building data
    _check_model_options(args)
    _check_checkpoint_path(args.checkpoint, args)
    with hold(args.checkpoint):                         # one run writes it: a second is refused
        return _train(args, tcfg)                       # before it reads any data


def _train(args, tcfg):
    scale = _train_scale(args, args.data)
    data = _open_data(args.data, args.split or "trainval", scale=scale,
                      num_images=args.train_images, seed=args.data_seed)
    model = _model_for(args, data, scale)
    print(f"{args.data}: {len(data)} training images, classes {', '.join(data.class_names)}")
    history = _run_training(model, data, tcfg, args.checkpoint, args,
                            _training_data_id(args, data, scale))
    if history:
        print(f"final loss {history[-1]['loss']:.4f}; checkpoint {args.checkpoint}")
    return 0


def _run_training(model, data, tcfg, checkpoint, args, data_id):
    """train(), with Ctrl-C turned into one line saying where the last checkpoint is."""
    if tcfg.iterations == 0:
        raise ValueError("--iters: 0 iterations leave nothing to train")
    if args.resume and _checkpoint_iteration(checkpoint) >= tcfg.iterations:
        done = Trainer(model, data, tcfg, data_id=data_id).resume(checkpoint)  # the checks of
        print(f"{checkpoint} is already at iteration {done} of {tcfg.iterations}: "  # any resume
              "nothing left to train")
        return []
    try:
        return train(model, data, tcfg, checkpoint=checkpoint, resume=args.resume,
                     progress=not args.quiet, data_id=data_id)
    except KeyboardInterrupt:
        last = _checkpoint_iteration(checkpoint)
        where = (f"the last checkpoint, {checkpoint}, is at iteration {last}; continue with the "
                 "same command and --resume") if last else "no checkpoint was written yet"
        raise RuntimeError(f"interrupted; {where}") from None


def _checkpoint_iteration(path):
    """The iteration a training checkpoint reached, or 0 (none, or unreadable)."""
    try:
        return int(read_npz(path).get("iteration", 0)) if path and os.path.exists(path) else 0
    except (ValueError, OSError, TypeError):
        return 0


def _eval_data(args, model, split):
    return _open_data(args.data, split, class_names=model.class_names,
                      scale=(model.config.min_size, model.config.max_size),
                      num_images=args.images, seed=args.data_seed, images_option="--images")


def cmd_eval(args):
    """VOC AP and COCO metrics of a checkpoint (or of a --detections file) on --data."""
    overrides = _test_overrides(args)
    _check_checkpoint_file(args.checkpoint)
    plot = args.plot if args.plot is not None else os.path.splitext(args.checkpoint)[0] + "_pr.png"
    _check_file_path(plot, "--plot")
    model = _load_model(args, overrides)
    data = _eval_data(args, model, args.split or "test")
    if args.detections:
        detections = read_coco_results(args.detections, data.image_ids, data.category_ids,
                                       file_names=data.file_names)   # `detect FILE...`'s names
        source = f"detections {args.detections}"
    else:
        detections = detect_all(model, data, progress=not args.quiet)
        source = f"checkpoint {args.checkpoint}"
    result = score(detections, data, model.config.num_classes)
    print(f"{len(data)} images ({args.data}), {source}")
    _report(result, model.class_names)
    save_pr_curves(plot, result, model.class_names)
    print(f"precision-recall curves: {plot}")
    return 0


def _check_checkpoint_file(path):
    """A checkpoint to read: it exists and is a regular file (a FIFO would block, /dev/zero would
    fill memory), checked before any image or data is read."""
    if not path:
        raise ValueError("--checkpoint: an empty path")
    check_regular_file(path)


def cmd_detect(args):
    """Detect objects in IMAGE files or in --data; pictures into --out, COCO results into --json.

    Every file is checked before the first is decoded; then each image is decoded, detected,
    drawn and written before the next is read, so memory does not grow with the number of files
    (only the detections, a few kB an image, are kept for --json)."""
    if not 0.0 <= args.score <= 1.0:                    # NaN fails too
        raise ValueError(f"--score: expected a number in [0, 1], got {args.score}")
    if args.out is None and args.json is None:
        raise ValueError("--out, --json: give at least one (pictures, or a COCO results file)")
    if bool(args.image_files) == bool(args.data):
        raise ValueError("IMAGE, --data: give image files or --data, not both (nor neither)")
    overrides = _test_overrides(args)
    for path in args.image_files:                       # a missing file is named before any
        _check_image_file(path)                         # work, even without a model
    _check_checkpoint_file(args.checkpoint)
    if args.out is not None:
        _check_writable(args.out, "--out", folder=True)
    if args.json is not None:
        _check_file_path(args.json, "--json")
    model = _load_model(args, overrides)
    pictures = _Pictures(args.out, model.class_names, args.score) if args.out is not None else None
    kept = []                                           # per image: boxes, scores, labels
    if args.data:
        data = _eval_data(args, model, args.split or "test")
        for i, det in enumerate(each_detection(model, data)):
            if pictures is not None:                    # drawn on a reduced copy of a big file
                image, (fy, fx) = data.picture(i, MAX_PICTURE_SIDE)
                pictures.write(str(data.record(i)["id"]), image,
                               dict(det, boxes=det["boxes"] / np.float32([fx, fy, fx, fy])))
                del image
            if args.json is not None:
                kept.append(det)
        ids, category_ids, names = data.image_ids, data.category_ids, None
    else:
        if model.config.min_size == 0 and "min_size" not in overrides:
            # a model trained on images as they came: rescale files to the default folder sizes
            model.config = model.config.replace(min_size=FOLDER_MIN_SIZE, max_size=FOLDER_MAX_SIZE)
        names = [os.path.basename(path) for path in args.image_files]
        for path, name in zip(args.image_files, names):
            image, (fy, fx) = read_image_reduced(path, MAX_PICTURE_SIDE)   # a big photo comes
            with threads.blas_threads(1):                                  # reduced: boxes on it
                try:
                    det = model.detect(image)
                except ValueError as e:       # e.g. too small at this scale: name the file
                    raise ValueError(f"{path}: {e}") from None
            if pictures is not None:
                pictures.write(name, image, det)
            del image
            if args.json is not None:         # results in the file's own pixels
                kept.append(dict(det, boxes=det["boxes"] * np.float32([fx, fy, fx, fy])))
        ids = list(range(1, len(names) + 1))
        category_ids = list(range(1, model.config.num_classes + 1))
    if args.json is not None:
        results = write_coco_results(args.json, kept, ids, category_ids, file_names=names)
        print(f"{len(results)} detections in {len(kept)} images -> {args.json}")
    return 0


def _check_image_file(path):
    """An IMAGE of detect: it exists and is a regular file (checked before any is decoded)."""
    if not path:
        raise ValueError("IMAGE: an empty path")
    regular_file(path)


class _Pictures:
    """detect's pictures: one PNG per image in `folder`, written as each image is done; two
    inputs of the same name get NAME_detections.png and NAME_2_detections.png."""

    def __init__(self, folder, class_names, score):
        os.makedirs(folder, exist_ok=True)
        self.folder, self.class_names, self.score = folder, class_names, score
        self.written = set()

    def write(self, name, image, det):
        stem = os.path.splitext(name)[0]
        out = os.path.join(self.folder, stem + "_detections.png")
        k = 1
        while out in self.written:
            k += 1
            out = os.path.join(self.folder, f"{stem}_{k}_detections.png")
        self.written.add(out)
        save_detections(out, image, det, self.class_names, score_threshold=self.score)
        print(f"{name}: {int((det['scores'] >= self.score).sum())} detections -> {out}")


def save_demo_figure(path, samples, detections, class_names, score=0.5, cols=4):
    """A grid of test images with their detections (score >= `score`) drawn by viz.draw_boxes."""
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
    """The main job: build (or read) data, train, evaluate on held-out images, draw detections."""
    start = time.time()
    tcfg = _train_config(args)                          # check every value before building data
    _check_model_options(args)
    _check_writable(args.out, "--out", folder=True)
    checkpoint = os.path.join(args.out, "model.npz")
    _check_checkpoint_path(checkpoint, args, option="--out")
    with hold(checkpoint):                              # one run writes it: a second is refused
        return _demo(args, tcfg, checkpoint, start)     # before it reads any data


def _demo(args, tcfg, checkpoint, start):
    scale = _train_scale(args, args.data)
    train_set = _open_data(args.data, args.split or "trainval", scale=scale,
                           num_images=args.train_images, seed=DEMO_TRAIN_SEED)
    model = _model_for(args, train_set, scale)
    test_spec = args.test_data or args.data
    if parse_spec(test_spec)[0] == "coco" and not args.test_data:
        raise ValueError("--test-data: a COCO file has no split; name the held-out images' "
                         "coco:ANNOTATIONS.json:IMAGE_DIR")
    test_set = _open_data(test_spec, args.test_split or "test", class_names=model.class_names,
                          scale=scale, num_images=args.test_images, seed=DEMO_TEST_SEED,
                          images_option="--test-images")
    if parse_spec(args.data)[0] == "shapes":
        print(f"shapes data: {len(train_set)} training images (seed {DEMO_TRAIN_SEED}), "
              f"{len(test_set)} held-out images (seed {DEMO_TEST_SEED})")
    else:
        print(f"{args.data}: {len(train_set)} training images; {test_spec}: {len(test_set)} "
              f"held-out images; classes {', '.join(model.class_names)}")
    _run_training(model, train_set, tcfg, checkpoint, args, _training_data_id(args, train_set, scale))
    trained = time.time()
    result, detections = evaluate(model, test_set, progress=not args.quiet)
    print(f"evaluated on {len(test_set)} held-out images")
    _report(result, model.class_names)
    figure = os.path.join(args.out, "detections.png")
    shown = range(min(8, len(test_set)))
    save_demo_figure(figure, [dict(image=test_set.original_image(i)) for i in shown],
                     [detections[i] for i in shown], model.class_names)
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
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing checkpoint (without it, an existing one is refused)")


def _add_data(p, split, shapes_images, default="shapes"):
    """--data and its options: --split for VOC, the shapes' image count and seed."""
    p.add_argument("--data", default=default, metavar="SPEC",
                   help="shapes or shapes-hard (synthetic), voc:ROOT (VOCdevkit layout) or "
                        "coco:ANNOTATIONS.json:IMAGE_DIR" + (" (default shapes)" if default else ""))
    p.add_argument("--split", default=None,
                   help=f"VOC split, ImageSets/Main/<split>.txt (default {split})")
    option, count, seed = shapes_images
    p.add_argument(option, type=int, default=count, dest=option[2:].replace("-", "_"),
                   help="number of shapes images")
    if seed is not None:
        p.add_argument("--data-seed", type=int, default=seed, help="seed of the shapes data")


def _add_scale(p, what):
    p.add_argument("--min-size", type=float, default=None,
                   help=f"shorter image side in pixels; {what}")
    p.add_argument("--max-size", type=float, default=None, help="longer image side at most")


def _add_common(p):
    p.add_argument("--backend", choices=("numpy", "triton"), default=None,
                   help="ops backend (default: FRCNN_BACKEND or numpy)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--threads", dest="work_threads", type=int, default=None, metavar="N",
                   help="threads to compute with (default: 1 below about 90k pixels, else up to "
                        "6)")
    p.add_argument("--textbook", action="store_true",
                   help="nn.py's textbook layers and the plain training step (fast=False): the "
                        "same results to float32 rounding, slower")


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
    bm = sub.add_parser("bench-model", help="time a whole training step and prediction at image "
                                            "sizes up to 600 x 1000, beside the textbook model "
                                            "and against torchvision's FasterRCNN on the same "
                                            "network when importable")
    bm.add_argument("--sizes", default="96x160,240x400,480x640,600x1000", metavar="HxW,...",
                    help="image sizes (default: the demo's to the paper's)")
    bm.add_argument("--repeat", type=int, default=5, help="timed runs per size (median reported)")
    bm.add_argument("--threads", default="1", metavar="N|default",
                    help="threads for both sides (default 1), or 'default': each side its own")
    bm.add_argument("--memory", action="store_true",
                    help="also the peak memory of each side (a fresh process per size and side)")
    bm.add_argument("--numpy-only", action="store_true", help="leave torchvision out")
    bm.add_argument("--no-textbook", action="store_true",
                    help="leave the textbook model (fast=False) out: several times slower at "
                         "large sizes")
    bm.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="model Config field, repeatable (as for train)")
    bm.set_defaults(func=cmd_bench_model)
    k = sub.add_parser("kernels", help="compile the Triton kernels for real GPUs (no GPU needed): "
                                       "registers, spills, occupancy, instruction mix, checks")
    k.add_argument("--arch", default="80,90", help="compute capabilities, e.g. 80 or 80,90")
    k.add_argument("--all", action="store_true",
                   help="a line for every launch (default: the paper-size launches)")
    k.add_argument("--select", default=None, metavar="TEXT",
                   help="only the launches whose case name contains TEXT (e.g. roi_align)")
    k.add_argument("--json", default=None, metavar="PATH", help="write every launch as JSON")
    k.set_defaults(func=cmd_kernels)
    t = sub.add_parser("train", help="train on the shapes, a VOC folder or a COCO file (--data)")
    _add_model_args(t, iters=3000)
    t.add_argument("--checkpoint", default="frcnn.npz", help="checkpoint path (.npz)")
    _add_data(t, "trainval", shapes_images=("--train-images", 1000, DEMO_TRAIN_SEED))
    _add_scale(t, "train at this scale (default: the shapes as they come; VOC / COCO 128 / 256)")
    _add_common(t)
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("eval", help="VOC AP and COCO metrics of a checkpoint on --data")
    e.add_argument("--checkpoint", default="frcnn.npz", help="checkpoint path (.npz)")
    _add_data(e, "test", shapes_images=("--images", 200, DEMO_TEST_SEED))
    e.add_argument("--detections", default=None, metavar="JSON",
                   help="score this COCO results file (frcnn detect --json) instead of running "
                        "the model")
    e.add_argument("--plot", default=None, metavar="PNG",
                   help="precision-recall curves, one panel per class (default: next to the "
                        "checkpoint, <checkpoint>_pr.png)")
    e.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="change a test-time field, e.g. --set score_threshold=0.01 (repeatable)")
    _add_scale(e, "evaluate at this scale (default: the checkpoint's)")
    _add_common(e)
    e.set_defaults(func=cmd_eval)
    d = sub.add_parser("detect", help="detect objects in image files or in --data")
    d.add_argument("image_files", nargs="*", metavar="IMAGE",       # --images counts shapes
                   help="image files (PNG, JPEG)")
    d.add_argument("--out", default=None, metavar="DIR", help="folder for the PNGs")
    d.add_argument("--json", default=None, metavar="PATH",
                   help="write the detections as a COCO results file (image_id, category_id, "
                        "bbox [x, y, w, h], score)")
    d.add_argument("--checkpoint", default="frcnn.npz", help="checkpoint path (.npz)")
    d.add_argument("--score", type=float, default=0.5, help="draw detections scoring at least this")
    _add_data(d, "test", shapes_images=("--images", 200, DEMO_TEST_SEED), default=None)
    d.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="change a test-time field, e.g. --set nms_threshold=0.3 (repeatable)")
    _add_scale(d, "detect at this scale (default: the checkpoint's; files of a model trained on "
                  "images as they came: 128 / 256)")
    _add_common(d)
    d.set_defaults(func=cmd_detect)
    m = sub.add_parser("demo", help="data, train, evaluate, draw (the main job; shapes by default)")
    _add_model_args(m, iters=3000)
    m.add_argument("--out", default="frcnn-demo", metavar="DIR", help="folder for checkpoint + picture")
    _add_data(m, "trainval", shapes_images=("--train-images", 1000, None))
    m.add_argument("--test-images", type=int, default=200, help="held-out shapes images to evaluate on")
    m.add_argument("--test-data", default=None, metavar="SPEC",
                   help="held-out data (default: the shapes' held-out seed, or --data's --test-split)")
    m.add_argument("--test-split", default=None, help="VOC split to evaluate on (default test)")
    _add_scale(m, "train and evaluate at this scale (default: shapes as they come; VOC / COCO "
                  "128 / 256)")
    _add_common(m)
    m.set_defaults(func=cmd_demo)
    return p


# Options naming a file, folder, split or dataset: an empty value is refused, never read as "not
# given" (`--json ''` wrote nothing, `--split ''` read the default split).
TEXT_OPTIONS = {"checkpoint": ("--checkpoint", "path"), "out": ("--out", "path"),
                "json": ("--json", "path"), "plot": ("--plot", "path"),
                "detections": ("--detections", "path"), "data": ("--data", "spec"),
                "test_data": ("--test-data", "spec"), "split": ("--split", "split name"),
                "test_split": ("--test-split", "split name")}


def _check_text_options(args):
    for dest, (option, what) in TEXT_OPTIONS.items():
        if getattr(args, dest, None) == "":
            raise ValueError(f"{option}: an empty {what}; give one, or leave the option out")


def main(argv=None):
    """The command line; returns the exit status: 0, 2 for an error (one line on stderr), 130 on
    Ctrl-C, 141 (128 + SIGPIPE, as other Unix tools end) when its output pipe is closed, e.g.
    by `| head -1`."""
    try:
        status = _main(argv)
        sys.stdout.flush()                  # a closed pipe shows here, not at exit
        return status
    except BrokenPipeError:
        _drop_stdout()
        return 128 + 13


def _drop_stdout():
    """After EPIPE: point stdout at /dev/null so that the interpreter's last flush at exit does
    not fail again (and print "Exception ignored ... BrokenPipeError")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):   # a stdout with no file (a test's capture)
        pass


def _main(argv):
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    try:
        _check_text_options(args)
        if getattr(args, "work_threads", None) is not None:
            try:
                threads.set_threads(args.work_threads)
            except ValueError as e:
                why = str(e).partition(": ")[2].replace(" or None", "")
                raise ValueError(f"--threads: {why}") from None
        return args.func(args)
    except BrokenPipeError:
        raise
    except (ValueError, FileNotFoundError, RuntimeError, KeyError) as e:
        print(f"frcnn {args.command}: error: {e}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"frcnn {args.command}: error: out of memory; use smaller images (--min-size / "
              "--max-size), fewer images or a smaller model (--set)", file=sys.stderr)
        return 2
    except OSError as e:                  # a full disk, a read-only folder: the path and why
        where = f"{e.filename}: " if e.filename else ""
        print(f"frcnn {args.command}: error: {where}{e.strerror or e}{_checkpoint_note(args)}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"frcnn {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        threads.set_threads(None)             # in-process callers (tests) get the default back


def _checkpoint_note(args):
    """After an OSError in train or demo: where the last checkpoint is, if one is on disk."""
    if args.command == "train":
        path = args.checkpoint
    elif args.command == "demo":
        path = os.path.join(args.out, "model.npz")
    else:
        return ""
    done = _checkpoint_iteration(path)
    return f"; the last checkpoint written is intact: {path}, iteration {done}" if done else ""


if __name__ == "__main__":
    sys.exit(main())
