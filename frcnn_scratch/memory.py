"""What a config costs in memory, estimated before anything is allocated, so that settings whose
weights or activations cannot fit are refused with the estimate instead of failing half-way."""
import os

from .fast import threads
from .fast.conv import BAND_BYTES


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


def memory_estimate(cfg, image_hw, training=True, fast=True):
    """Bytes a training step (or a detection) on one image of image_hw pixels needs, roughly.

    Weights (with training: their gradients and SGD's momentum too), and the float32 activations:
    per conv layer the padded input it keeps for its backward, its output and (training) the
    gradient of it; the im2col columns (fast: one band at a time on each thread, with their
    gradient; the textbook layers keep every layer's columns for the backward pass); the RPN's
    anchors, the pooled RoIs and fc layers, and RoI Align's sampling points.  Measured peaks
    are well under it (docs/performance.md, "Memory"): it refuses the impossible, not what fits.
    """
    h, w = (float(v) for v in image_hw)
    grads = 2 if training else 1
    weights = parameter_count(cfg) * 4 * (3 if training else 1)
    acts, c_in = 3 * h * w * 4 * 2, 3                        # the image, normalised
    for i, c in enumerate(cfg.channels):
        cells = (h / 2 ** i) * (w / 2 ** i)
        acts += cells * (c_in + grads * c) * 4               # padded input, output (+ gradient)
        c_in = c
    if fast:                                                 # one band per thread
        acts += BAND_BYTES * grads * threads.work_threads(h, w)
    else:                                # every 3 x 3 layer's (kh * kw = 9 x its input), kept
        inputs = (3,) + cfg.channels[:-1]                    # backbone layer i at stride 2^i
        acts += sum(9 * c * h * w / 4 ** i * 4 * grads for i, c in enumerate(inputs))
        cells = h * w / cfg.stride ** 2                      # the RPN's 3 x 3 and 1 x 1 convs
        acts += (9 * cfg.channels[-1] + 2 * cfg.rpn_channels) * cells * 4 * grads
    cells = (h / cfg.stride) * (w / cfg.stride)
    anchors = cells * cfg.num_anchors
    acts += anchors * 4 * 4 * 6                              # anchors, deltas, decoded boxes ...
    rois = roi_count(cfg, anchors, training)
    pooled = cfg.pooled_size ** 2
    acts += rois * (c_in * pooled + 2 * cfg.fc_hidden) * 4 * grads
    side = max(h, w) / cfg.stride                            # adaptive sampling: up to the map
    grid = cfg.sampling_ratio if cfg.sampling_ratio > 0 else max(side / cfg.pooled_size, 1)
    acts += rois * cfg.pooled_size * grid * 4 * 8 * grads    # sampling points, both axes
    return int(weights + acts)


def roi_count(cfg, anchors, training):
    """The RoIs the head can see on a map with `anchors` anchors, at most: proposals are kept
    from the anchors (pre-NMS top-N, then post-NMS top-N), so a count set above the anchors
    (rpn_post_nms_test=1e9) costs what the anchors allow, not what the setting says.  Training
    samples roi_batch_size RoIs from the proposals and the ground truth boxes (whose number is
    not known here: counted as many as the proposals)."""
    if training:
        proposals = min(cfg.rpn_pre_nms_train, cfg.rpn_post_nms_train, anchors)
        return min(cfg.roi_batch_size, 2 * proposals)
    return min(cfg.rpn_pre_nms_test, cfg.rpn_post_nms_test, anchors)


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


def check_memory(cfg, image_hw=None, training=True, what="config", fast=True):
    """Refuse, with the estimate, a config (and image size) that cannot fit in memory now."""
    need = parameter_count(cfg) * 4 * (3 if training else 1) if image_hw is None else \
        memory_estimate(cfg, image_hw, training, fast)
    have = available_memory()
    if have is not None and need > have:
        size = "" if image_hw is None else f" on a {int(image_hw[0])} x {int(image_hw[1])} image"
        raise ValueError(f"{what}: needs about {need / 2 ** 30:.1f} GB{size} "
                         f"({parameter_count(cfg):,} weights), more than the "
                         f"{have / 2 ** 30:.1f} GB available; use smaller sizes (fc_hidden, "
                         f"pooled_size, channels, num_classes, sampling_ratio, --min-size / "
                         f"--max-size)")
    return need
