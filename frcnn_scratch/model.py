"""Faster R-CNN (Ren, He, Girshick, Sun 2015), the whole model in one file that reads like Figure 2.

    image (H, W, 3) in [0, 1]
      -> normalise, NCHW                                   (1, 3, H, W)
      -> backbone: [conv3x3 (+ maxpool) + ReLU] x L        (1, C, H/s, W/s)    the shared conv layers
      -> RPN head -> objectness logits, t per anchor       (A,), (A, 4)        section 3.1
      -> proposal layer (decode, clip, top-N, NMS)         (P, 4)              section 3.1
      -> (train) proposal targets: sample R RoIs           (R, 4)              section 3.2
      -> RoI Align / RoI pool -> fc -> fc                  (R, hidden)         Fast R-CNN
      -> cls_score (C+1), bbox_pred 4 (C+1)                (R, C+1), (R, 4 (C+1))
      -> (train) four losses: RPN cls + reg, head cls + reg; backward by hand
      -> (test) per-class decode + NMS -> detections

Training is "approximate joint training" (section 3.2): one backward pass through both networks,
with the proposal boxes treated as constants (no gradient through their coordinates).

The hot ops (IoU, NMS, RoI pool / align and their backwards) go through frcnn_scratch.ops with
the model's `backend`, so the same model runs on the NumPy reference or the Triton kernels.
"""
import dataclasses
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field

import numpy as np

from . import _checks, nn, ops, rpn as _rpn, threads
from .anchors import generate_anchors, shift_anchors
from .losses import rpn_loss
from .nn import BAND_BYTES, BLOCK_SIZE, Conv2d, MaxPool2d, ReLU, Sequential
from .roi_head import (HEAD_BOX_WEIGHTS, FastRCNNHead, fast_rcnn_loss, postprocess_detections,
                       proposal_targets)


# ---- the configuration -------------------------------------------------------------------------

@dataclass
class Config:
    """Every choice of the model, sized for the shapes dataset on a laptop CPU.

    Paper values (VGG-16 on 600 px images) are in the comments; the small ones here keep one
    training step near tens of milliseconds.
    """
    num_classes: int = 4                        # C object classes; background is class 0
    pixel_mean: tuple = (0.5, 0.5, 0.5)         # images are normalised: (x - mean) / std
    pixel_std: tuple = (0.25, 0.25, 0.25)
    # backbone: one conv3x3 + ReLU per entry, a 2x2 max pool between entries -> stride 2^(L-1)
    channels: tuple = (16, 32, 64, 64)          # VGG-16: 13 convs, 512 channels, stride 16
    # anchors (3.1.1): base_size = stride, so anchor sides are stride * scale * ratio^(+-1/2)
    anchor_scales: tuple = (2.0, 4.0, 8.0)      # paper: (8, 16, 32) at stride 16 -> 128..512 px
    anchor_ratios: tuple = (0.5, 1.0, 2.0)      # ratio = h / w
    # RPN (3.1)
    rpn_channels: int = 64                      # the 3x3 "intermediate layer" (512 for VGG-16)
    rpn_pos_iou: float = 0.7
    rpn_neg_iou: float = 0.3
    rpn_batch_size: int = 128                   # sampled anchors per image (256)
    rpn_positive_fraction: float = 0.5
    rpn_sigma: float = 3.0                      # smooth L1's sigma for the RPN
    rpn_lambda: float = 1.0                     # eq. (1) balance, with N_cls = N_reg = sampled anchors
    rpn_nms_threshold: float = 0.7
    rpn_min_size: float = 4.0                   # px; boxes smaller than this are dropped (16)
    rpn_pre_nms_train: int = 600                # 12000
    rpn_post_nms_train: int = 150               # 2000
    rpn_pre_nms_test: int = 300                 # 6000
    rpn_post_nms_test: int = 50                 # 300
    # Fast R-CNN head (3.2)
    pooler: str = "align"                       # "align" (RoI Align) or "pool" (RoI max pooling)
    pooled_size: int = 7                        # 7 x 7 on VGG-16
    sampling_ratio: int = 2                     # RoI Align samples per bin side (<= 0: adaptive)
    aligned: bool = True                        # RoI Align's half-pixel shift
    fc_hidden: int = 128                        # 4096 on VGG-16
    roi_batch_size: int = 64                    # sampled RoIs per image (128)
    roi_fg_fraction: float = 0.25
    roi_fg_iou: float = 0.5
    roi_bg_iou_hi: float = 0.5
    roi_bg_iou_lo: float = 0.0                  # the paper's code uses 0.1; 0.0 also shows plain background
    # test time (3.3)
    score_threshold: float = 0.05
    nms_threshold: float = 0.5                  # class-wise NMS of the final detections
    max_detections: int = 100
    # input scale (section 4: shorter side 600, longer at most 1000); 0 = images as they come
    min_size: float = 0.0
    max_size: float = 0.0
    seed: int = 0                               # weight initialisation

    def __post_init__(self):
        """Check every field: a bad value (e.g. from `--set`) is one ValueError naming config.<field>.

        Values are normalised to plain Python ints, floats and tuples, so the config always
        round-trips through JSON (save / load).
        """
        self.channels = _numbers(self.channels, "channels", kind=int, positive=True)
        self.anchor_scales = _numbers(self.anchor_scales, "anchor_scales", positive=True)
        self.anchor_ratios = _numbers(self.anchor_ratios, "anchor_ratios", positive=True)
        self.pixel_mean = _numbers(self.pixel_mean, "pixel_mean", length=3)
        self.pixel_std = _numbers(self.pixel_std, "pixel_std", positive=True, length=3)
        positive_ints = ("num_classes", "rpn_channels", "rpn_batch_size", "rpn_pre_nms_train",
                         "rpn_post_nms_train", "rpn_pre_nms_test", "rpn_post_nms_test",
                         "pooled_size", "fc_hidden", "roi_batch_size", "max_detections")
        for name in positive_ints:
            setattr(self, name, _integer(getattr(self, name), name, minimum=1))
        self.sampling_ratio = _integer(self.sampling_ratio, "sampling_ratio")   # <= 0: adaptive
        self.seed = _integer(self.seed, "seed", minimum=0)
        fractions = ("rpn_pos_iou", "rpn_neg_iou", "rpn_positive_fraction", "rpn_nms_threshold",
                     "roi_fg_fraction", "roi_fg_iou", "roi_bg_iou_hi", "roi_bg_iou_lo",
                     "score_threshold", "nms_threshold")
        for name in fractions:
            setattr(self, name, _number(getattr(self, name), name, "a number in [0, 1]",
                                        lambda v: 0.0 <= v <= 1.0))
        for name in ("rpn_sigma", "rpn_lambda"):
            setattr(self, name, _number(getattr(self, name), name, "a positive finite number",
                                        lambda v: 0.0 < v < np.inf))
        for name in ("rpn_min_size", "min_size", "max_size"):
            setattr(self, name, _number(getattr(self, name), name, "a finite number >= 0",
                                        lambda v: 0.0 <= v < np.inf))    # NaN fails both tests
        if (self.min_size > 0) != (self.max_size > 0) or self.max_size < self.min_size:
            raise ValueError(f"config.max_size: expected both sizes 0 (images as they come) or "
                             f"0 < min_size <= max_size, got min_size {self.min_size}, "
                             f"max_size {self.max_size}")
        if not isinstance(self.aligned, (bool, np.bool_)):
            raise ValueError(f"config.aligned: expected true or false, got {self.aligned!r}")
        self.aligned = bool(self.aligned)
        if self.pooler not in ("align", "pool"):
            raise ValueError(f"config.pooler: expected 'align' or 'pool', got {self.pooler!r}")
        if self.rpn_neg_iou > self.rpn_pos_iou:
            raise ValueError(f"config.rpn_neg_iou: expected at most config.rpn_pos_iou = "
                             f"{self.rpn_pos_iou}, got {self.rpn_neg_iou}")
        if self.roi_bg_iou_lo > self.roi_bg_iou_hi:
            raise ValueError(f"config.roi_bg_iou_lo: expected at most config.roi_bg_iou_hi = "
                             f"{self.roi_bg_iou_hi}, got {self.roi_bg_iou_lo}")

    # Fields a trained model may change: they act after the network (NMS, thresholds, how many
    # detections) or before it (the input scale), never on what the weights compute.  `frcnn eval
    # / detect --set` may change these; FasterRCNN.load refuses a change of any other field.
    TEST_TIME_FIELDS = ("score_threshold", "nms_threshold", "max_detections", "rpn_pre_nms_test",
                        "rpn_post_nms_test", "rpn_nms_threshold", "rpn_min_size", "min_size",
                        "max_size")
    # Fields only training reads (sampling, loss weights, train-time proposal counts, the seed of
    # the initial weights): weights trained with other values load all the same.
    TRAINING_FIELDS = ("rpn_pos_iou", "rpn_neg_iou", "rpn_batch_size", "rpn_positive_fraction",
                       "rpn_sigma", "rpn_lambda", "rpn_pre_nms_train", "rpn_post_nms_train",
                       "roi_batch_size", "roi_fg_fraction", "roi_fg_iou", "roi_bg_iou_hi",
                       "roi_bg_iou_lo", "seed")

    @property
    def stride(self):
        """Feature-map stride: each max pool halves the map."""
        return 2 ** (len(self.channels) - 1)

    @property
    def num_anchors(self):
        """k, anchors per feature-map position."""
        return len(self.anchor_scales) * len(self.anchor_ratios)

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        """Build a Config from a dict (e.g. read back from JSON); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"config: unknown field(s) {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def paper(cls, **changes):
        """The paper's values where they do not depend on the image or network size (sections
        3.1.2, 3.1.3, 3.3, and the released code where the paper is silent, see PAPER_VALUES),
        the rest as this Config's defaults; `changes` on top."""
        return cls(**{**PAPER_VALUES, **changes})

    def replace(self, **changes):
        """A copy with some fields changed (checked like a new Config)."""
        return Config.from_dict({**self.to_dict(), **changes})


# The paper's (and its released code's) scale-free settings.  Not here: the backbone (VGG-16),
# image sizes (600 / 1000) and anchor sizes (128 - 512 px) and rpn_min_size (16 px), which depend
# on the image scale; and lambda, whose value goes with its normalisation (the paper: lambda 10
# with N_reg ~ 2400 anchor locations; here both terms are divided by the sampled anchors, and
# lambda 1 weighs them alike; see losses.rpn_loss).
PAPER_VALUES = dict(
    rpn_pos_iou=0.7, rpn_neg_iou=0.3,                   # 3.1.2
    rpn_batch_size=256, rpn_positive_fraction=0.5,      # 3.1.3: 256 anchors, up to 1:1
    rpn_sigma=3.0,                                      # released code (smooth L1 sigma)
    rpn_nms_threshold=0.7,                              # 3.3
    rpn_pre_nms_train=12000, rpn_post_nms_train=2000,   # released code
    rpn_pre_nms_test=6000, rpn_post_nms_test=300,       # 300 proposals: section 4; 6000: code
    pooler="pool", pooled_size=7,                       # Fast R-CNN's RoI max pooling, 7 x 7
    roi_batch_size=128, roi_fg_fraction=0.25,           # Fast R-CNN 2.3: 128 RoIs, 25% fg
    roi_fg_iou=0.5, roi_bg_iou_hi=0.5, roi_bg_iou_lo=0.1,   # Fast R-CNN 2.3 (bg in [0.1, 0.5))
    nms_threshold=0.3, score_threshold=0.05, max_detections=100,   # released code's test
)


def _is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_number(v):
    return _is_int(v) or isinstance(v, (float, np.floating))


def _integer(value, name, minimum=None):
    """An int field of Config (>= minimum when given) -> int; a ValueError naming config.<name>."""
    if not _is_int(value) or (minimum is not None and value < minimum):
        want = "an int" if minimum is None else "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"config.{name}: expected {want}, got {value!r}")
    return int(value)


def _number(value, name, want, ok):
    """A float field of Config for which ok(value) holds -> float; a ValueError naming config.<name>."""
    if not _is_number(value) or not ok(float(value)):
        raise ValueError(f"config.{name}: expected {want}, got {value!r}")
    return float(value)


def _numbers(value, name, kind=float, positive=False, length=None):
    """A sequence field of Config -> non-empty tuple of `kind` (finite; > 0 when positive)."""
    want = ("positive " if positive else "") + ("ints" if kind is int else "finite numbers")
    want = f"a sequence of {length or 'one or more'} {want}"
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError("a string is not a sequence of numbers")
        items = tuple(value)
    except TypeError:
        raise ValueError(f"config.{name}: expected {want}, got {value!r}") from None
    good = all(_is_int(v) if kind is int else _is_number(v) and np.isfinite(v) for v in items)
    good = good and len(items) == (length or len(items)) > 0 and (not positive or all(v > 0 for v in items))
    if not good:
        raise ValueError(f"config.{name}: expected {want}, got {value!r}")
    return tuple(kind(v) for v in items)


# ---- what a config costs in memory, before anything is allocated -------------------------------

def parameter_count(cfg):
    """The number of weights a Config builds (backbone, RPN head, Fast R-CNN head)."""
    n, c_in = 0, 3
    for c in cfg.channels:                                   # 3x3 convs
        n += 9 * c_in * c + c
        c_in = c
    k, r, h = cfg.num_anchors, cfg.rpn_channels, cfg.fc_hidden
    n += 9 * c_in * r + r + r * k + k + r * 4 * k + 4 * k    # RPN: 3x3 conv, 1x1 cls and reg
    n += c_in * cfg.pooled_size ** 2 * h + h + h * h + h     # fc6, fc7
    n += (h + 1) * (cfg.num_classes + 1) * 5                 # cls_score, bbox_pred
    return n


def memory_estimate(cfg, image_hw, training=True):
    """Bytes a training step (or a detection) on one image of image_hw pixels needs, roughly.

    Weights (with training: their gradients and SGD's momentum too), and the float32 activations:
    per conv layer the padded input it keeps for its backward, its output and (training) the
    gradient of it; im2col columns one band at a time (nn.BAND_BYTES, with their gradient, on
    each thread); the RPN's anchors, the pooled RoIs and fc layers, and RoI Align's sampling
    points.  Measured peaks (`frcnn bench-model --memory`) are 40-70% of it (480 x 640: 43-78 MB
    added by training and predicting, against 114 MB): it refuses the impossible, not what fits.
    """
    h, w = (float(v) for v in image_hw)
    grads = 2 if training else 1
    weights = parameter_count(cfg) * 4 * (3 if training else 1)
    acts, c_in = 3 * h * w * 4 * 2, 3                        # the image, normalised
    for i, c in enumerate(cfg.channels):
        cells = (h / 2 ** i) * (w / 2 ** i)
        acts += cells * (c_in + grads * c) * 4               # padded input, output (+ gradient)
        c_in = c
    acts += BAND_BYTES * grads * threads.work_threads(h, w)  # the columns of one band per thread
    cells = (h / cfg.stride) * (w / cfg.stride)
    anchors = cells * cfg.num_anchors
    acts += anchors * 4 * 4 * 6                              # anchors, deltas, decoded boxes ...
    rois = cfg.roi_batch_size if training else cfg.rpn_post_nms_test
    pooled = cfg.pooled_size ** 2
    acts += rois * (c_in * pooled + 2 * cfg.fc_hidden) * 4 * grads
    side = max(h, w) / cfg.stride                            # adaptive sampling: up to the map
    grid = cfg.sampling_ratio if cfg.sampling_ratio > 0 else max(side / cfg.pooled_size, 1)
    acts += rois * cfg.pooled_size * grid * 4 * 8 * grads    # sampling points, both axes
    return int(weights + acts)


def available_memory():
    """Bytes of memory available to a new allocation now (MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(cfg, image_hw=None, training=True, what="config"):
    """Refuse, with the estimate, a config (and image size) that cannot fit in memory now."""
    need = parameter_count(cfg) * 4 * (3 if training else 1) if image_hw is None else \
        memory_estimate(cfg, image_hw, training)
    have = available_memory()
    if have is not None and need > have:
        size = "" if image_hw is None else f" on a {int(image_hw[0])} x {int(image_hw[1])} image"
        raise ValueError(f"{what}: needs about {need / 2 ** 30:.1f} GB{size} "
                         f"({parameter_count(cfg):,} weights), more than the "
                         f"{have / 2 ** 30:.1f} GB available; use smaller sizes (fc_hidden, "
                         f"pooled_size, channels, num_classes, sampling_ratio, --min-size / "
                         f"--max-size)")
    return need


# ---- the shared convolutional layers ------------------------------------------------------------

def _image_size(image):
    """(height, width) of an image-like input for the thread choice; (1, 1) when it has no such
    shape (the model's own checks then name what is wrong)."""
    shape = np.shape(image)
    return (int(shape[0]), int(shape[1])) if len(shape) >= 2 else (1, 1)


def _checked_features(features):
    """The backbone's output, refused if it holds NaN or Inf (weights that overflowed); the
    layers themselves run under nn.no_finite_checks, and any NaN on the way ends up here."""
    if not np.isfinite(features).all():
        raise ValueError("features: the backbone's output contains NaN or Inf (do the weights "
                         "hold NaN or Inf, or did they overflow?)")
    return features


def _sum_and_norms(a, b):
    """a + b, and the Euclidean norms of a and b (summed in float64), for (1, C, H, W) gradients:
    in blocks of channels on threads (at 600 x 1000 one pass took 1.1 ms while the other threads
    waited).  The blocks depend on the size only: the norms do not depend on the thread count."""
    total = np.empty(np.broadcast_shapes(a.shape, b.shape), np.result_type(a, b))

    def block(channels):                                  # -> the block's sums of squares
        c0, c1 = channels
        np.add(a[:, c0:c1], b[:, c0:c1], out=total[:, c0:c1])
        return [float(np.sum(np.square(g[:, c0:c1], dtype=np.float64))) for g in (a, b)]

    parts = threads.parallel(block, threads.chunks(total.shape[1], 8))
    return total, [float(np.sqrt(sum(p[k] for p in parts))) for k in (0, 1)]


def build_backbone(channels, rng):
    """conv3x3(pad 1) + ReLU per entry of `channels`, with a 2x2 max pool between entries.

    Where a pool follows, it comes before the ReLU: conv -> max pool -> ReLU computes exactly
    what VGG's conv -> ReLU -> max pool does, since ReLU keeps order (max of ReLUs = ReLU of the
    max), and the gradients are the same too (a window whose max is <= 0 passes none either way).
    The ReLU then touches a quarter of the values.  The first conv's input is the image, whose
    gradient nothing uses: need_input_grad=False makes its backward stop after the weight and
    bias gradients.
    """
    layers, in_ch = [], 3
    for i, out_ch in enumerate(channels):
        layers.append(Conv2d(in_ch, int(out_ch), 3, padding=1, rng=rng, need_input_grad=i > 0))
        if i < len(channels) - 1:
            layers.append(MaxPool2d(2, 2))
        layers.append(ReLU(inplace=True))           # its input feeds nothing else
        in_ch = int(out_ch)
    return Sequential(*layers)


def atomic_savez(path, arrays):
    """np.savez to `path` through a temporary file in the same folder and os.replace.

    A crash or kill mid-write leaves the old file (or none), never a truncated one: the data is
    fsync'ed before the rename and the folder after it, so a power loss cannot leave a renamed but
    empty file either.  The temporary file is named after the checkpoint and the writing process
    (.NAME.tmp-PID-XXXX.npz); those of processes that are gone (a killed run) are removed on the
    next save.  The file gets the permissions the umask gives new files (mkstemp's are 0600).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    prefix = f".{os.path.basename(path)}.tmp-"
    _remove_stale_temporaries(folder, prefix)
    fd, tmp = tempfile.mkstemp(prefix=f"{prefix}{os.getpid()}-", suffix=".npz", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        _fsync_folder(folder)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask():
    mask = os.umask(0o022)      # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def _fsync_folder(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:             # a folder that cannot be opened (some platforms): nothing to sync
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_stale_temporaries(folder, prefix):
    """Remove .NAME.tmp-PID-*.npz files left by processes that no longer run."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".npz")):
            continue
        pid = name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:             # alive, but another user's
        return True
    return True


def read_npz(path):
    """All arrays of an .npz file as a dict; an unreadable file is one clear ValueError."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if not zipfile.is_zipfile(path):                  # np.load would suggest allow_pickle: not helpful
        raise ValueError(f"checkpoint {path!r} is not an .npz archive")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except Exception as e:  # zipfile.BadZipFile, OSError, EOFError, ValueError, ...
        raise ValueError(f"checkpoint {path!r} is not a readable .npz file ({type(e).__name__}: {e})") from None


def stored_dict(arrays, key, source):
    """The JSON object saved under `key` of a checkpoint's arrays, as a dict.

    A missing key, text that is not JSON, or JSON that is not an object is one ValueError naming
    `source` (the checkpoint path).
    """
    if key not in arrays:
        raise ValueError(f"{source}: no {key} in the file; not a frcnn checkpoint")
    try:
        value = json.loads(str(arrays[key]))
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: its {key} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{source}: its {key} is JSON but not an object of fields: {value!r:.80}")
    return value


# ---- the model ------------------------------------------------------------------------------------

class FasterRCNN:
    """Backbone + RPN + Fast R-CNN head, trained jointly, with a hand-written backward.

    Args:
        config: a Config (defaults if None).
        backend: "numpy", "triton", or None (the current default of frcnn_scratch.ops);
            passed unchanged to every ops.* call.
        class_names: the names of labels 1..C (saved with the weights); default "class 1", ...
    """

    def __init__(self, config=None, backend=None, class_names=None):
        self.config = cfg = Config() if config is None else config
        if not isinstance(cfg, Config):
            raise ValueError(f"config: expected a model.Config, got {type(cfg).__name__}")
        self.backend = ops.check_backend(backend, allow_none=True)
        check_memory(cfg, what="config")               # before the weights are allocated
        if class_names is None:
            class_names = tuple(f"class {k}" for k in range(1, cfg.num_classes + 1))
        self.class_names = tuple(str(n) for n in class_names)
        if len(self.class_names) != cfg.num_classes or len(set(self.class_names)) != cfg.num_classes:
            raise ValueError(f"class_names: expected {cfg.num_classes} distinct names "
                             f"(config.num_classes), got {list(self.class_names)}")
        rng = np.random.default_rng(cfg.seed)
        self.backbone = build_backbone(cfg.channels, rng)
        c = int(cfg.channels[-1])
        self.rpn = _rpn.RPNHead(c, cfg.rpn_channels, cfg.num_anchors, rng)
        self.head = FastRCNNHead(c, cfg.pooled_size, cfg.fc_hidden, cfg.num_classes,
                                 spatial_scale=1.0 / cfg.stride, pooler=cfg.pooler,
                                 sampling_ratio=cfg.sampling_ratio, aligned=cfg.aligned,
                                 rng=rng, backend=backend)
        # anchors at the origin cell, (k, 4); shifted over each feature map as needed
        self.base_anchors = generate_anchors(base_size=cfg.stride, ratios=cfg.anchor_ratios,
                                             scales=cfg.anchor_scales)
        self._anchors = None                 # ((H', W'), anchors) of the last map size

    # -- parameters: one flat dict "part.layer.name" -> array (the arrays the layers use) --

    def _parts(self):
        yield "backbone", self.backbone.params, lambda: self.backbone.grads
        for part, layers in (("rpn", self.rpn.layers), ("head", self.head.layers)):
            for name, layer in layers.items():
                yield f"{part}.{name}", layer.params, (lambda layer=layer: layer.grads)

    def params(self):
        """dict name -> parameter array (the layers' own arrays: updating them updates the model)."""
        return {f"{part}.{k}": v for part, params, _ in self._parts() for k, v in params.items()}

    def grads(self):
        """dict name -> gradient of the last `loss_and_grads` call (same keys as params())."""
        return {f"{part}.{k}": v for part, _, grads in self._parts() for k, v in grads().items()}

    def astype(self, dtype):
        """Cast every layer's parameters (float64 for gradient checks); returns self.

        The RoI ops stay float32 (ops works in float32); everything else follows `dtype`.
        """
        self.backbone.astype(dtype)
        for layers in (self.rpn.layers, self.head.layers):
            for layer in layers.values():
                layer.astype(dtype)
        return self

    # -- the forward pass, stage by stage --

    def preprocess(self, image):
        """(H, W, 3) float in [0, 1] -> normalised (1, 3, H, W) float32."""
        image = np.asarray(image, np.float32)
        if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < self.config.stride:
            raise ValueError(f"image: expected (H, W, 3) with H, W >= {self.config.stride}, "
                             f"got {image.shape}")
        mean = np.asarray(self.config.pixel_mean, np.float32)
        std = np.asarray(self.config.pixel_std, np.float32)
        x = np.empty((1, 3) + image.shape[:2], np.float32)                # (1, 3, H, W)

        def rows(part):                                     # a block of rows, on threads
            block = image[part]                                            # (rows, W, 3)
            for c in range(3):                  # channel by channel: 5x faster than one
                np.divide(block[..., c] - mean[c], std[c], out=x[0, c, part])  # transposed copy
            return bool(np.isfinite(block).all()), block.min(), block.max()

        pieces = max(threads.workers(), image.size // BLOCK_SIZE)         # blocks that fit in cache
        blocks = threads.parallel(rows, [slice(a, b) for a, b in
                                         threads.chunks(image.shape[0], pieces)])
        if not all(finite for finite, _, _ in blocks):
            raise ValueError("image: contains NaN or Inf")
        low, high = min(b[1] for b in blocks), max(b[2] for b in blocks)
        if low < 0.0 or high > 1.0:
            raise ValueError(f"image: expected values in [0, 1], got {float(low):g}.."
                             f"{float(high):g} (an 8-bit image? divide it by 255)")
        return x

    def anchors(self, feat_height, feat_width):
        """All anchors of a (feat_height, feat_width) map, (H' W' k, 4), index (y W' + x) k + a;
        those of the last size asked for are kept (read-only)."""
        key = (int(feat_height), int(feat_width))
        last = self._anchors                 # a step needs them twice; a run, on every step
        if last is None or last[0] != key:
            anchors = shift_anchors(self.base_anchors, *key, self.config.stride)
            anchors.setflags(write=False)    # shared: no caller may change them
            self._anchors = last = (key, anchors)
        return last[1]

    def feature_size(self, height, width):
        """(H', W') of the backbone's map for a (height, width) image: the 3x3 convs keep the
        size (padding 1), each 2x2 pool halves it, rounding down."""
        for layer in self.backbone:
            if isinstance(layer, (Conv2d, MaxPool2d)):
                (kh, kw), (sh, sw) = layer.kernel_size, layer.stride
                ph, pw = layer.padding if isinstance(layer, Conv2d) else (0, 0)
                height, width = (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1
        return height, width

    def features(self, x):
        """The shared conv layers: (1, 3, H, W) -> (1, C, H/s, W/s)."""
        return self.backbone.forward(x)

    def propose(self, features, image_shape, training):
        """RPN head + proposal layer -> (logits (A,), deltas (A, 4), anchors (A, 4), proposals (P, 4))."""
        logits, deltas = self.rpn.forward(features)                        # (1, A), (1, A, 4)
        proposals = self._proposals(features, logits[0], deltas[0], image_shape, training)
        return logits[0], deltas[0], self.anchors(*features.shape[2:]), proposals

    def _proposals(self, features, logits, deltas, image_shape, training):
        """The proposal layer on the RPN's outputs for this feature map -> (P, 4) boxes."""
        cfg = self.config
        anchors = self.anchors(*features.shape[2:])                        # (A, 4)
        pre, post = ((cfg.rpn_pre_nms_train, cfg.rpn_post_nms_train) if training
                     else (cfg.rpn_pre_nms_test, cfg.rpn_post_nms_test))
        return _rpn.generate_proposals(anchors, logits, deltas, image_shape, pre, post,
                                       cfg.rpn_nms_threshold, cfg.rpn_min_size,
                                       backend=self.backend)[0]           # (P, 4)

    # -- training: forward, the four losses, backward --

    def loss_and_grads(self, image, gt_boxes, gt_labels, rng, proposals=None,
                       parts=("rpn", "head")):
        """One training step's forward and backward on one image (the paper's mini-batch).

        Args:
            image: (H, W, 3) float in [0, 1].
            gt_boxes: (G, 4) xyxy in image pixels.  gt_labels: (G,) int64 in 1..C.
            rng: np.random.Generator or int seed for the anchor and RoI sampling (required: an
                unseeded step could not be repeated).
            proposals: optional (P, 4) boxes to use instead of the RPN's: fixed proposals, as
                the paper's 4-step training gives the detector (and a test hook: with fixed
                proposals the loss is a smooth function of the weights).
            parts: the losses whose gradient flows back: ("rpn", "head") is approximate joint
                training; ("rpn",) trains the RPN alone and ("head",) the detector alone, the
                steps of 4-step alternating training (section 3.2).  All four losses are
                reported either way; the other part's gradients are zero.
        Returns:
            dict of floats: loss (of the chosen parts), rpn_cls, rpn_reg, head_cls, head_reg.
            The gradients of `loss` are left in the layers (read them with grads()), and
            feature_gradients holds the norm of the gradient each part sent into the shared
            feature map (how much of the backbone's learning comes from each).
        """
        # The layers skip their own NaN / Inf scans: the image, the feature map and the gradients
        # are checked here instead (a NaN anywhere in between reaches them: 0 * NaN is NaN).
        with threads.for_image(*_image_size(image)), nn.no_finite_checks():
            losses = self._loss_and_grads(image, gt_boxes, gt_labels, rng, proposals, parts)
        for name, grad in self.grads().items():
            if not np.isfinite(grad).all():
                raise ValueError(f"the gradient of {name} contains NaN or Inf: the step "
                                 f"overflowed (is the learning rate too high?)")
        return losses

    def _loss_and_grads(self, image, gt_boxes, gt_labels, rng, proposals, parts):
        cfg = self.config
        if rng is None:
            raise ValueError("rng: pass a seed (int) or a np.random.Generator; an unseeded training "
                             "step cannot be repeated")
        rng = np.random.default_rng(rng)                                   # a Generator passes through
        unknown = set(parts) - {"rpn", "head"}
        if unknown or not parts:
            raise ValueError(f"parts: expected 'rpn' and / or 'head', got {tuple(parts)!r}")
        use_rpn, use_head = "rpn" in parts, "head" in parts
        gt_boxes = _checks.as_boxes(gt_boxes, "gt_boxes")                   # (G, 4)
        gt_labels = _checks.as_labels(gt_labels, "gt_labels", 1, cfg.num_classes,
                                      size=len(gt_boxes))                  # (G,) int64
        x = self.preprocess(image)                                         # (1, 3, H, W)
        image_shape = x.shape[2:]
        h, w = image_shape
        outside = (gt_boxes[:, 0] >= w) | (gt_boxes[:, 2] <= 0) | (gt_boxes[:, 1] >= h) | \
            (gt_boxes[:, 3] <= 0)
        if outside.any():
            k = int(np.argmax(outside))
            raise ValueError(f"gt_boxes: box {k} {gt_boxes[k].tolist()} lies wholly outside the "
                             f"{w} x {h} image: no anchor can learn it")
        # The anchors' labels and targets (3.1.2) need only the boxes and the map's size: with
        # threads they are worked out beside the backbone (the same rng draws, in the same order)
        labelling = threads.background(_rpn.anchor_targets, self.anchors(*self.feature_size(h, w)),
                                       gt_boxes, image_shape, cfg.rpn_pos_iou, cfg.rpn_neg_iou,
                                       cfg.rpn_batch_size, cfg.rpn_positive_fraction, rng)
        try:
            features = _checked_features(self.features(x))                # (1, C, H', W')
            logits, deltas = self.rpn.forward(features)                    # RPN (3.1): (1, A), ...
        except BaseException:
            threads.wait(labelling)            # it draws from rng: never left running after us
            raise
        # The two heads meet again only in the gradient of the feature map: with threads, the
        # detector's side (proposals, RoI sampling, head, its loss and backward) runs beside the
        # RPN's (its loss and backward).  The detector samples its RoIs after the anchor labelling
        # has drawn from rng, so the draws come in the same order on any number of threads.
        # The detector's side runs on a helper of the team, which joins the RPN's backward when
        # the detector is done (threads.background): the threads never outnumber workers().
        detector = threads.background(self._detector_step, features, logits[0], deltas[0],
                                      image_shape, gt_boxes, gt_labels, rng, proposals,
                                      labelling, use_head)
        try:
            labels, targets = labelling.result()                           # (A,), (A, 4)
            rpn = rpn_loss(logits[0], deltas[0], labels, targets, lam=cfg.rpn_lambda,
                           sigma=cfg.rpn_sigma)
            g_rpn = self.rpn.backward(rpn["grad_logits"][None] * use_rpn,
                                      rpn["grad_t"][None] * use_rpn)      # (1, C, H', W')
        except BaseException:
            threads.wait(detector)             # it draws from rng too
            raise
        head, g_head = detector.result()
        # backward: both heads send gradient into the shared feature map, then the backbone
        g_features, norms = _sum_and_norms(g_rpn, g_head)
        self.feature_gradients = dict(rpn=norms[0], head=norms[1])
        self.backbone.backward(g_features)
        loss = rpn["loss"] * use_rpn + head["loss"] * use_head
        return dict(loss=float(loss), rpn_cls=float(rpn["loss_cls"]),
                    rpn_reg=float(cfg.rpn_lambda * rpn["loss_reg"]), head_cls=float(head["loss_cls"]),
                    head_reg=float(head["loss_reg"]))

    def _detector_step(self, features, logits, deltas, image_shape, gt_boxes, gt_labels, rng,
                       proposals, labelling, use_head):
        """Fast R-CNN's side of a training step (3.2): proposals (unless given), RoI sampling,
        head, its loss and backward -> (the loss dict, the gradient of the features)."""
        with nn.no_finite_checks():                           # (on a thread of its own)
            return self._detector_losses(features, logits, deltas, image_shape, gt_boxes,
                                         gt_labels, rng, proposals, labelling, use_head)

    def _detector_losses(self, features, logits, deltas, image_shape, gt_boxes, gt_labels, rng,
                         proposals, labelling, use_head):
        cfg = self.config
        if proposals is None:                                              # constants from here on
            proposals = self._proposals(features, logits, deltas, image_shape, training=True)
        labelling.result()                     # its rng draws come before the RoI sampling's
        rois, roi_labels, roi_targets, roi_weights = proposal_targets(
            proposals, gt_boxes, gt_labels, cfg.num_classes, cfg.roi_batch_size,
            cfg.roi_fg_fraction, cfg.roi_fg_iou, cfg.roi_bg_iou_hi, cfg.roi_bg_iou_lo,
            HEAD_BOX_WEIGHTS, rng, backend=self.backend)                  # (R, 4), (R,), ...
        rois5 = np.concatenate([np.zeros((len(rois), 1), np.float32), rois], axis=1)  # (R, 5)
        cls_logits, bbox_deltas = self.head.forward(features, rois5)       # (R, C+1), (R, 4 (C+1))
        head = fast_rcnn_loss(cls_logits, bbox_deltas, roi_labels, roi_targets, roi_weights)
        g_head = self.head.backward(head["grad_cls"] * use_head, head["grad_bbox"] * use_head)
        return head, g_head

    # -- inference --

    def predict(self, image):
        """Detect objects in one image.

        Args:
            image: (H, W, 3) float in [0, 1].
        Returns:
            dict(boxes (D, 4) float32 xyxy in image pixels, scores (D,) float32, labels (D,) int64
            in 1..C), best score first, after class-wise NMS.
        """
        with threads.for_image(*_image_size(image)), nn.no_grad(), nn.no_finite_checks():
            return self._predict(image)                # (no backward; checked as it goes)

    def _predict(self, image):
        cfg = self.config
        x = self.preprocess(image)                                         # (1, 3, H, W)
        features = _checked_features(self.features(x))                     # (1, C, H', W')
        _, _, _, proposals = self.propose(features, x.shape[2:], training=False)  # (P, 4)
        rois5 = np.concatenate([np.zeros((len(proposals), 1), np.float32), proposals], axis=1)
        cls_logits, bbox_deltas = self.head.forward(features, rois5)       # (P, C+1), (P, 4 (C+1))
        return postprocess_detections(proposals, cls_logits, bbox_deltas, x.shape[2:],
                                      cfg.score_threshold, cfg.nms_threshold, cfg.max_detections,
                                      HEAD_BOX_WEIGHTS, backend=self.backend)

    def detect(self, image):
        """`predict` on an image of any size: rescaled by config.min_size / max_size (the paper's
        rule, when set), detected, and the boxes mapped back to the image's own pixels."""
        from .data.transforms import compute_scale, resize_image
        cfg = self.config
        image = np.asarray(image, np.float32)
        scale = 1.0
        if cfg.min_size > 0 and image.ndim == 3:
            scale, h, w = compute_scale(image.shape[0], image.shape[1], cfg.min_size, cfg.max_size)
            if min(h, w) < cfg.stride:
                raise ValueError(f"image: {image.shape[0]} x {image.shape[1]} pixels become "
                                 f"{h} x {w} at min_size {cfg.min_size:g} / max_size "
                                 f"{cfg.max_size:g}; the model needs {cfg.stride} pixels a side")
            if (h, w) != image.shape[:2]:
                image = resize_image(image, h, w)
        det = self.predict(image)
        det["boxes"] = (det["boxes"] / np.float32(scale)).astype(np.float32)
        return det

    # -- save / load: weights and config in one .npz --

    def state_arrays(self):
        """The arrays `save` writes: every parameter under "param/<name>" and the config as JSON."""
        arrays = {f"param/{k}": v for k, v in self.params().items()}
        arrays["config"] = np.array(json.dumps(self.config.to_dict()))
        arrays["class_names"] = np.array(json.dumps(list(self.class_names)))
        return arrays

    def save(self, path):
        """Write weights + config to `path` (.npz), atomically."""
        atomic_savez(path, self.state_arrays())

    def load_state_arrays(self, arrays, source="checkpoint", strict=True):
        """Copy parameters from `arrays` (as written by state_arrays) after checking the config.

        strict: every config field must match (resuming a run); else only the fields that make
        the network what it is (not Config.TEST_TIME_FIELDS or Config.TRAINING_FIELDS).
        """
        saved = stored_dict(arrays, "config", source)
        saved = {**Config().to_dict(), **saved}     # files from before a field existed: its default
        mine = json.loads(json.dumps(self.config.to_dict()))
        free = () if strict else Config.TEST_TIME_FIELDS + Config.TRAINING_FIELDS
        differ = sorted(k for k in set(saved) | set(mine)
                        if saved.get(k) != mine.get(k) and k not in free)
        if differ:
            detail = ", ".join(f"{k}: file {saved.get(k)!r} vs model {mine.get(k)!r}" for k in differ[:4])
            raise ValueError(f"{source}: saved with a different config ({detail})")
        for name, param in self.params().items():
            key = f"param/{name}"
            if key not in arrays or arrays[key].shape != param.shape:
                raise ValueError(f"{source}: parameter {name!r} missing or of another shape")
            value = arrays[key]
            if value.dtype != param.dtype:
                raise ValueError(f"{source}: parameter {name!r} is {value.dtype}, not {param.dtype}")
            if not np.all(np.isfinite(value)):
                raise ValueError(f"{source}: parameter {name!r} holds NaN or Inf")
            param[...] = value

    def load_weights(self, path):
        """Load weights saved by `save`; refuses a file whose network differs (any config field
        but the test-time and training-only ones)."""
        self.load_state_arrays(read_npz(path), source=f"checkpoint {os.fspath(path)!r}",
                               strict=False)

    @classmethod
    def load(cls, path, backend=None, overrides=None):
        """A new model built from the config and class names stored in `path`, with its weights.

        overrides: dict of Config.TEST_TIME_FIELDS to change (score and NMS thresholds, test-time
            proposal counts, max detections, the input scale); a field that changes the network
            is refused, named.
        """
        arrays = read_npz(path)
        source = f"checkpoint {os.fspath(path)!r}"
        saved = stored_dict(arrays, "config", source)
        overrides = dict(overrides or {})
        fixed = sorted(k for k in overrides if k not in Config.TEST_TIME_FIELDS)
        if fixed:
            raise ValueError(f"--set {', '.join(fixed)}: fixed by the trained network; a trained "
                             f"model can change only {', '.join(Config.TEST_TIME_FIELDS)}")
        try:
            config = Config.from_dict({**saved, **overrides})
        except ValueError as e:                           # names the field; add the file
            raise ValueError(f"{source}: {e}") from None
        names = None
        if "class_names" in arrays:
            try:
                names = json.loads(str(arrays["class_names"]))
            except json.JSONDecodeError as e:
                raise ValueError(f"{source}: its class_names are not valid JSON ({e})") from None
            if not isinstance(names, list):
                raise ValueError(f"{source}: its class_names are not a list of names")
        try:
            model = cls(config, backend=backend, class_names=names)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
        model.load_state_arrays(arrays, source=source, strict=False)
        return model
