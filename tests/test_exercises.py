"""The notebooks' write-it-yourself checks: a right answer passes, each classic mistake is caught."""
import math

import numpy as np
import pytest

from frcnn_scratch import exercises as ex


# ---- right answers, written as a learner would (they are the notebooks' folded solutions) -----

def iou(a, b):
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0)


def anchors(base, ratios, scales, ratio_is_w_over_h=False):
    out = []
    for r in ratios:
        for s in scales:
            area = (base * s) ** 2
            w = math.sqrt(area / r) if not ratio_is_w_over_h else math.sqrt(area * r)
            h = w * r if not ratio_is_w_over_h else w / r
            out.append([base / 2 - w / 2, base / 2 - h / 2, base / 2 + w / 2, base / 2 + h / 2])
    return np.array(out)


def labels(anchors_, gts, pos, neg, rule_i=True):
    lab = np.full(len(anchors_), -1)
    if len(gts) == 0:
        return np.zeros(len(anchors_), int)
    m = iou(anchors_, gts)
    best = m.max(axis=1)
    lab[best < neg] = 0
    if rule_i:
        per_gt = m.max(axis=0)
        lab[((m == per_gt) & (per_gt > 0)).any(axis=1)] = 1
    lab[best > pos] = 1
    return lab


def encode(b, a, log=True):
    wa, ha = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    f = np.log if log else (lambda x: x)
    return np.stack([(b[:, 0] + w / 2 - a[:, 0] - wa / 2) / wa, (b[:, 1] + h / 2 - a[:, 1] - ha / 2) / ha,
                     f(w / wa), f(h / ha)], axis=1)


def decode(t, a, clamp=True):
    wa, ha = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
    cx, cy = a[:, 0] + wa / 2 + t[:, 0] * wa, a[:, 1] + ha / 2 + t[:, 1] * ha
    lim = math.log(1000 / 16) if clamp else np.inf
    w, h = wa * np.exp(np.minimum(t[:, 2], lim)), ha * np.exp(np.minimum(t[:, 3], lim))
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)


def nms(boxes, scores, thr, strict=True, stable=True):
    order = np.argsort(-scores, kind="stable" if stable else "quicksort")
    if not stable:
        order = order[::-1][np.argsort(-scores[order[::-1]], kind="stable")]   # ties: higher index
    keep, dead = [], np.zeros(len(boxes), bool)
    for i in order:
        if dead[i]:
            continue
        keep.append(i)
        o = iou(boxes[i:i + 1], boxes)[0].astype(np.float32)
        dead |= (o > thr) if strict else (o >= thr)
    return np.array(keep, dtype=np.int64)


def roi_pool(features, rois, size, scale, rounding=lambda x: np.sign(x) * np.floor(np.abs(x) + 0.5)):
    c, h, w = features.shape
    ph, pw = size
    out = np.zeros((len(rois), c, ph, pw))
    for k, roi in enumerate(rois):
        x1, y1, x2, y2 = (int(rounding(np.float32(v) * np.float32(scale))) for v in roi)
        bh, bw = max(y2 - y1 + 1, 1) / np.float32(ph), max(x2 - x1 + 1, 1) / np.float32(pw)
        for i in range(ph):
            for j in range(pw):
                r0, r1 = min(max(int(np.floor(np.float32(i * bh))) + y1, 0), h), min(max(int(np.ceil(np.float32((i + 1) * bh))) + y1, 0), h)
                c0, c1 = min(max(int(np.floor(np.float32(j * bw))) + x1, 0), w), min(max(int(np.ceil(np.float32((j + 1) * bw))) + x1, 0), w)
                if r1 > r0 and c1 > c0:
                    out[k, :, i, j] = features[:, r0:r1, c0:c1].max(axis=(1, 2))
    return out


# ---- the checks --------------------------------------------------------------------------------

@pytest.mark.parametrize("check, right, wrong, mistake", [
    (ex.check_box_iou, iou, lambda a, b: iou(np.c_[a[:, :2], a[:, 2:] + 1],
                                             np.c_[b[:, :2], b[:, 2:] + 1]), "+1 widths"),
    (ex.check_anchors, anchors, lambda b, r, s: anchors(b, r, s, True), "ratio as w / h"),
    (ex.check_label_anchors, labels, lambda a, g, p, n: labels(a, g, p, n, rule_i=False),
     "rule (i) left out"),
    (ex.check_encode, encode, lambda b, a: encode(b, a, log=False), "no log"),
    (ex.check_decode, decode, lambda t, a: decode(t, a, clamp=False), "no clamp"),
    (ex.check_nms, nms, lambda b, s, t: nms(b, s, t, strict=False), ">= instead of >"),
    (ex.check_nms, nms, lambda b, s, t: nms(b, s, t, stable=False), "ties by higher index"),
    (ex.check_roi_pool, roi_pool, lambda f, r, s, sc: roi_pool(f, r, s, sc, rounding=np.round),
     "numpy's round half to even"),
])
def test_right_answers_pass_and_each_mistake_is_caught(check, right, wrong, mistake):
    assert "cases passed" in check(right)
    with pytest.raises(AssertionError, match="your function returned"):
        check(wrong)


def test_a_failure_shows_the_inputs_and_both_answers():
    with pytest.raises(AssertionError) as info:
        ex.check_box_iou(lambda a, b: np.zeros((len(a), len(b))))
    text = str(info.value)
    assert "two 2x2 boxes overlapping by 1x1" in text and "expected" in text and "boxes1" in text
    with pytest.raises(AssertionError, match="shape"):
        ex.check_nms(lambda b, s, t: np.zeros((2, 2)))
