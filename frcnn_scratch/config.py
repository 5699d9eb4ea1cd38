"""The settings: `Config`, every choice of the model, and `TrainConfig`, how to train it.

Both check every field when made (a bad value, e.g. from `frcnn train --set`, is one ValueError
naming the field) and normalise it to plain ints, floats and tuples, so that they round-trip
through the JSON a checkpoint stores.
"""
import dataclasses
import json
import math
from dataclasses import dataclass

from ._checks import MAX_SAMPLING_RATIO, bool_field, int_field, number_field, numbers_field


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
    # Fast R-CNN head (Fast R-CNN 2.1-2.3)
    pooler: str = "align"                       # "align" (RoI Align) or "pool" (RoI max pooling)
    pooled_size: int = 7                        # 7 x 7 on VGG-16
    sampling_ratio: int = 2                     # RoI Align samples per bin side (<= 0: adaptive)
    aligned: bool = True                        # RoI Align's half-pixel shift
    fc_hidden: int = 128                        # 4096 on VGG-16
    roi_batch_size: int = 64                    # sampled RoIs per image (64: R = 128 from N = 2)
    roi_fg_fraction: float = 0.25
    roi_fg_iou: float = 0.5
    roi_bg_iou_hi: float = 0.5
    roi_bg_iou_lo: float = 0.0                  # the paper's code uses 0.1; 0.0 also shows plain background
    # test time (the released code's test settings)
    score_threshold: float = 0.05
    nms_threshold: float = 0.5                  # class-wise NMS of the final detections
    max_detections: int = 100
    # input scale (3.3: shorter side 600; at most 1000 long: released code); 0 = as they come
    min_size: float = 0.0
    max_size: float = 0.0
    seed: int = 0                               # weight initialisation

    def __post_init__(self):
        """Check every field: a bad value (e.g. from `--set`) is one ValueError naming config.<field>.

        Values are normalised to plain Python ints, floats and tuples, so the config always
        round-trips through JSON (save / load).
        """
        name = "config.{}".format
        self.channels = numbers_field(self.channels, name("channels"), kind=int, positive=True)
        self.anchor_scales = numbers_field(self.anchor_scales, name("anchor_scales"), positive=True)
        self.anchor_ratios = numbers_field(self.anchor_ratios, name("anchor_ratios"), positive=True)
        self.pixel_mean = numbers_field(self.pixel_mean, name("pixel_mean"), length=3)
        self.pixel_std = numbers_field(self.pixel_std, name("pixel_std"), positive=True, length=3)
        for f in ("num_classes", "rpn_channels", "rpn_batch_size", "rpn_pre_nms_train",
                  "rpn_post_nms_train", "rpn_pre_nms_test", "rpn_post_nms_test", "pooled_size",
                  "fc_hidden", "roi_batch_size", "max_detections"):
            setattr(self, f, int_field(getattr(self, f), name(f), minimum=1))
        self.sampling_ratio = int_field(self.sampling_ratio, name("sampling_ratio"))  # <= 0: adaptive
        if self.sampling_ratio > MAX_SAMPLING_RATIO:
            raise ValueError(f"config.sampling_ratio: expected at most {MAX_SAMPLING_RATIO} samples "
                             f"per bin side (<= 0: adaptive), got {self.sampling_ratio}")
        self.seed = int_field(self.seed, name("seed"), minimum=0)
        for f in ("rpn_pos_iou", "rpn_neg_iou", "rpn_positive_fraction", "rpn_nms_threshold",
                  "roi_fg_fraction", "roi_fg_iou", "roi_bg_iou_hi", "roi_bg_iou_lo",
                  "score_threshold", "nms_threshold"):
            setattr(self, f, number_field(getattr(self, f), name(f), "a number in [0, 1]",
                                          lambda v: 0.0 <= v <= 1.0))
        for f in ("rpn_sigma", "rpn_lambda"):
            setattr(self, f, number_field(getattr(self, f), name(f), "a positive finite number",
                                          lambda v: 0.0 < v < math.inf))
        for f in ("rpn_min_size", "min_size", "max_size"):
            setattr(self, f, number_field(getattr(self, f), name(f), "a finite number >= 0",
                                          lambda v: 0.0 <= v < math.inf))    # NaN fails both
        if (self.min_size > 0) != (self.max_size > 0) or self.max_size < self.min_size:
            raise ValueError(f"config.max_size: expected both sizes 0 (images as they come) or "
                             f"0 < min_size <= max_size, got min_size {self.min_size}, "
                             f"max_size {self.max_size}")
        self.aligned = bool_field(self.aligned, name("aligned"))
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
    rpn_pre_nms_train=12000, rpn_post_nms_train=2000,   # 12000: released code; 2000: 3.3
    rpn_pre_nms_test=6000, rpn_post_nms_test=300,       # 300 proposals: section 4; 6000: code
    pooler="pool", pooled_size=7,                       # Fast R-CNN's RoI max pooling, 7 x 7
    roi_batch_size=64, roi_fg_fraction=0.25,            # Fast R-CNN 2.3: R = 128 RoIs from N = 2
                                                        # images, 64 each (released e2e code: 128)
    roi_fg_iou=0.5, roi_bg_iou_hi=0.5, roi_bg_iou_lo=0.1,   # Fast R-CNN 2.3 (bg in [0.1, 0.5))
    nms_threshold=0.3, score_threshold=0.05, max_detections=100,   # released code's test
)


def parse_overrides(pairs, option="--set"):
    """["pooler=pool", "channels=[8,16]"] -> {"pooler": "pool", "channels": (8, 16)}: Config fields
    as the command line gives them, each value read as JSON where it can be (a list becomes a
    tuple), else kept as text.  Config checks the values; an unknown KEY is refused here, named
    with `option`."""
    names = {f.name for f in dataclasses.fields(Config)}
    out = {}
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        if not sep or key not in names:
            raise ValueError(f"{option} {pair!r}: expected KEY=VALUE with KEY one of the Config "
                             f"fields ({', '.join(sorted(names))})")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        if isinstance(value, float) and value.is_integer() and INT_FIELDS.get(key):
            value = int(value)                    # JSON reads 1e9 as a float: an int field's
        out[key] = tuple(value) if isinstance(value, list) else value
    return out


# Config fields that hold an int (parse_overrides reads a whole float such as 1e9 as one)
INT_FIELDS = {f.name: f.type in (int, "int") for f in dataclasses.fields(Config)}


@dataclass
class TrainConfig:
    """How to train (the model's own choices are in Config)."""
    iterations: int = 3000
    lr: float = 0.01                 # peak learning rate (the paper: 0.001 for VGG-16 on VOC)
    momentum: float = 0.9
    weight_decay: float = 1e-4       # paper: 5e-4
    warmup: int = 100                # iterations of linear warmup from lr / 10
    final_lr_fraction: float = 0.02  # cosine decay from lr down to lr * this
    flip: bool = True                # horizontal-flip augmentation, p = 0.5
    seed: int = 0                    # image order, flips, anchor and RoI sampling
    checkpoint_every: int = 500      # iterations between checkpoints (0: only at the end)

    def __post_init__(self):
        name = "train config.{}".format
        for f in ("iterations", "warmup", "checkpoint_every", "seed"):
            setattr(self, f, int_field(getattr(self, f), name(f), minimum=0))
        self.lr = number_field(self.lr, name("lr"), "a positive number", lambda v: 0 < v < math.inf)
        self.momentum = number_field(self.momentum, name("momentum"), "a number in [0, 1)",
                                     lambda v: 0 <= v < 1)
        self.weight_decay = number_field(self.weight_decay, name("weight_decay"),
                                         "a number >= 0", lambda v: 0 <= v < math.inf)
        self.final_lr_fraction = number_field(self.final_lr_fraction, name("final_lr_fraction"),
                                              "a number in [0, 1] (a fraction of lr)",
                                              lambda v: 0 <= v <= 1)
        self.flip = bool_field(self.flip, name("flip"))
