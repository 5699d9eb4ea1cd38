"""The notebooks' write-it-yourself checks, graded like a grader would: a right answer passes, each
classic mistake of the stage is caught, and an unedited placeholder (a function that hands back
the library's own result) is reported as not done, never as passed.

MISTAKES lists, per check, the wrong implementations it must catch: each is the right answer
below with one mistake put in.  The right answers are written as a learner would; the notebooks'
own folded solutions are checked too (test_the_notebooks_folded_solutions_pass).
"""
import math
import pathlib
import re

import nbformat
import numpy as np
import pytest

from frcnn_scratch import exercises as ex, nn, ops
from frcnn_scratch.anchors import generate_anchors
from frcnn_scratch.box_coding import decode as lib_decode, encode as lib_encode
from frcnn_scratch.labeling import label_anchors as lib_label_anchors
from frcnn_scratch.losses import rpn_loss as lib_rpn_loss
from frcnn_scratch.roi_head import proposal_targets as lib_proposal_targets

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"


# ---- right answers, written as a learner would; each keyword puts in one mistake ----------------

def iou(a, b, plus_one=0, clip_product=False, no_minus=False, nan_guard=True, enclosing=False,
        transposed=False, over_min=False):
    area_a = (a[:, 2] - a[:, 0] + plus_one) * (a[:, 3] - a[:, 1] + plus_one)
    area_b = (b[:, 2] - b[:, 0] + plus_one) * (b[:, 3] - b[:, 1] + plus_one)
    lo, hi = (np.minimum, np.maximum) if enclosing else (np.maximum, np.minimum)
    iw = hi(a[:, None, 2], b[None, :, 2]) - lo(a[:, None, 0], b[None, :, 0]) + plus_one
    ih = hi(a[:, None, 3], b[None, :, 3]) - lo(a[:, None, 1], b[None, :, 1]) + plus_one
    inter = np.clip(iw * ih, 0, None) if clip_product else np.clip(iw, 0, None) * np.clip(ih, 0, None)
    union = area_a[:, None] + area_b[None, :] - (0 if no_minus else inter)
    if over_min:
        union = np.minimum(area_a[:, None], area_b[None, :])
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(union > 0, inter / np.where(union > 0, union, 1), 0) if nan_guard else inter / union
    return out.T if transposed else out


def anchors(base, ratios, scales, w_over_h=False, centre=None, scale_major=False, legacy_round=False,
            no_sqrt=False):
    c = base / 2 if centre is None else centre
    pairs = [(r, s) for s in scales for r in ratios] if scale_major else \
        [(r, s) for r in ratios for s in scales]
    out = []
    for r, s in pairs:
        if w_over_h:
            r = 1 / r
        if no_sqrt:
            w, h = base * s / r, base * s
        elif legacy_round:
            w0 = np.round(math.sqrt(base * base / r))
            w, h = w0 * s, np.round(w0 * r) * s
        else:
            w, h = base * s / math.sqrt(r), base * s * math.sqrt(r)
        out.append([c - w / 2, c - h / 2, c + w / 2, c + h / 2])
    return np.array(out)


def labels(anchors_, gts, pos, neg, rule_i=True, neg_any=False, pos_ge=False, neg_le=False,
           zero_match=False, one_per_box=False, negatives_last=False, per_anchor=False,
           empty=0):
    if len(gts) == 0:
        return np.full(len(anchors_), empty)
    m = iou(anchors_, gts)
    best = m.min(axis=1) if neg_any else m.max(axis=1)
    lab = np.full(len(anchors_), -1)
    negative = (best <= neg) if neg_le else (best < neg)
    if not negatives_last:
        lab[negative] = 0
    if rule_i:
        if per_anchor:
            lab[(m == m.max(axis=1, keepdims=True)).any(axis=1)] = 1
        elif one_per_box:
            per_gt = m.max(axis=0)
            lab[m.argmax(axis=0)[per_gt > 0]] = 1
        else:
            per_gt = m.max(axis=0)
            lab[((m == per_gt) & ((per_gt > 0) | zero_match)).any(axis=1)] = 1
    top = m.max(axis=1)
    lab[(top >= pos) if pos_ge else (top > pos)] = 1
    if negatives_last:
        lab[negative] = 0
    return lab


def encode(b, a, log=True, corners=False, by_box=False, plus_one=0, inverted=False, swap_wh=False):
    wa, ha = a[:, 2] - a[:, 0] + plus_one, a[:, 3] - a[:, 1] + plus_one
    w, h = b[:, 2] - b[:, 0] + plus_one, b[:, 3] - b[:, 1] + plus_one
    if corners:
        dx, dy = b[:, 0] - a[:, 0], b[:, 1] - a[:, 1]
    else:
        dx, dy = b[:, 0] + w / 2 - a[:, 0] - wa / 2, b[:, 1] + h / 2 - a[:, 1] - ha / 2
    ux, uy = (w, h) if by_box else ((ha, wa) if swap_wh else (wa, ha))
    f = np.log if log else (lambda v: v - 1)
    rw, rh = (wa / w, ha / h) if inverted else (w / wa, h / ha)
    return np.stack([dx / ux, dy / uy, f(rw), f(rh)], axis=1)


def decode(t, a, clamp="above", limit=math.log(1000 / 16), plus_one=0, by_new_width=False,
           no_exp=False, centre_size=False):
    t = t.astype(np.float64)
    if clamp == "all":
        t = np.minimum(t, limit)
    wa, ha = a[:, 2] - a[:, 0] + plus_one, a[:, 3] - a[:, 1] + plus_one
    tw, th = t[:, 2], t[:, 3]
    if clamp == "above" or clamp == "all":
        tw, th = np.minimum(tw, limit), np.minimum(th, limit)
    elif clamp == "both":
        tw, th = np.clip(tw, -limit, limit), np.clip(th, -limit, limit)
    w, h = (wa * (1 + tw), ha * (1 + th)) if no_exp else (wa * np.exp(tw), ha * np.exp(th))
    cx = a[:, 0] + wa / 2 + t[:, 0] * (w if by_new_width else wa)
    cy = a[:, 1] + ha / 2 + t[:, 1] * (h if by_new_width else ha)
    if centre_size:
        return np.stack([cx, cy, w, h], axis=1)
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2 - plus_one, cy + h / 2 - plus_one], axis=1)


def nms(boxes, scores, thr, strict=True, stable=True, sort=True, any_better=False, one_round=False,
        index_order=False, ascending=False):
    if not sort:
        order = np.arange(len(scores))
    elif ascending:
        order = np.argsort(scores, kind="stable")
    elif stable:
        order = np.argsort(-scores, kind="stable")
    else:                                                    # ties: the higher index first
        order = np.arange(len(scores))[::-1][np.argsort(-scores[::-1], kind="stable")]
    o = iou(boxes, boxes).astype(np.float32)
    over = (o > thr) if strict else (o >= thr)
    keep, dead = [], np.zeros(len(boxes), bool)
    for rank, i in enumerate(order):
        if any_better:
            if not any(over[j, i] for j in order[:rank]):
                keep.append(i)
            continue
        if dead[i]:
            continue
        keep.append(i)
        dead |= over[i]
        if one_round:
            keep += [j for j in order if not dead[j] and j != i]
            break
    keep = np.array(keep, dtype=np.int64)
    return np.sort(keep) if index_order else keep


def half_away(v):
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


def roi_pool(features, rois, size, scale, rounding=half_away, clip=True, end_floor=False,
             plus_one=1, use_scale=True, swap_xy=False, average=False, start_from_zero=False):
    c, h, w = features.shape
    ph, pw = size
    out = np.zeros((len(rois), c, ph, pw))
    s = np.float32(scale) if use_scale else np.float32(1)
    for k, roi in enumerate(rois):
        x1, y1, x2, y2 = (int(rounding(np.float32(v) * s)) for v in roi)
        if swap_xy:
            x1, y1, x2, y2 = y1, x1, y2, x2
        bh = np.float32(max(y2 - y1 + plus_one, 1)) / np.float32(ph)
        bw = np.float32(max(x2 - x1 + plus_one, 1)) / np.float32(pw)
        end = np.floor if end_floor else np.ceil
        box = (lambda v, n: min(max(v, 0), n)) if clip else (lambda v, n: min(v, n))
        for i in range(ph):
            for j in range(pw):
                r0 = box(int(np.floor(np.float32(i) * bh)) + y1, h)
                r1 = box(int(end(np.float32(i + 1) * bh)) + y1, h)
                c0 = box(int(np.floor(np.float32(j) * bw)) + x1, w)
                c1 = box(int(end(np.float32(j + 1) * bw)) + x1, w)
                if r1 > r0 and c1 > c0:
                    cell = features[:, r0:r1, c0:c1]
                    if average:
                        out[k, :, i, j] = cell.mean(axis=(1, 2))
                    elif start_from_zero:
                        out[k, :, i, j] = np.maximum(cell.max(axis=(1, 2)), 0)
                    else:
                        out[k, :, i, j] = cell.max(axis=(1, 2))
    return out


def _bilinear(f, y, x, zero_outside=True, clamp_low=True, swap_weights=False, nearest=False):
    _, h, w = f.shape
    if zero_outside and (y < -1 or y > h or x < -1 or x > w):
        return np.zeros(f.shape[0])
    if clamp_low:
        y, x = max(y, 0.0), max(x, 0.0)
    y, x = min(y, h - 1.0) if not zero_outside else y, min(x, w - 1.0) if not zero_outside else x
    y0, x0 = int(np.floor(y)), int(np.floor(x))
    if y0 >= h - 1:
        y0 = y1 = h - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= w - 1:
        x0 = x1 = w - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    if nearest:
        return f[:, int(round(y)) if round(y) < h else h - 1, int(round(x)) if round(x) < w else w - 1]
    ly, lx = y - y0, x - x0
    hy, hx = 1 - ly, 1 - lx
    if swap_weights:
        ly, hy = hy, ly
    return hy * hx * f[:, y0, x0] + hy * lx * f[:, y0, x1] + ly * hx * f[:, y1, x0] + ly * lx * f[:, y1, x1]


def roi_align(features, rois, size, scale, ratio, aligned, shift=-0.5, shift_always=False,
              min_one=True, corners=False, floor_adaptive=False, mean=True, use_scale=True,
              swap_xy=False, **bilinear):
    c = features.shape[0]
    ph, pw = size
    out = np.zeros((len(rois), c, ph, pw))
    off = shift if (aligned or shift_always) else 0.0
    s = scale if use_scale else 1.0
    for k, roi in enumerate(rois.astype(np.float64)):
        x1, y1, x2, y2 = roi[[1, 0, 3, 2]] if swap_xy else roi
        x1, y1, x2, y2 = x1 * s + off, y1 * s + off, x2 * s + off, y2 * s + off
        rw, rh = x2 - x1, y2 - y1
        if not aligned and min_one:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bh, bw = rh / ph, rw / pw
        adapt = (lambda v: max(int(v), 1)) if floor_adaptive else (lambda v: int(math.ceil(v)))
        gh = ratio if ratio > 0 else adapt(bh)
        gw = ratio if ratio > 0 else adapt(bw)
        at = (lambda i: i) if corners else (lambda i: i + 0.5)
        for i in range(ph):
            for j in range(pw):
                total = np.zeros(c)
                for sy in range(gh):
                    y = y1 + i * bh + at(sy) * bh / gh
                    for sx in range(gw):
                        x = x1 + j * bw + at(sx) * bw / gw
                        total += _bilinear(features, y, x, **bilinear)
                out[k, :, i, j] = total / max(gh * gw, 1) if mean else total
    return out


def rpn_loss(logits, t_pred, labels_, t_target, n_cls, n_reg, lam, sigma, ignored_negative=False,
             reg_negatives=False, swap_n=False, lam_in_grad=True, zone_sigma=False,
             sigma_unsquared=False, naive_log=False, flip_sign=False, grad_unnormalised=False,
             mean_of_four=False):
    if swap_n:
        n_cls, n_reg = n_reg, n_cls
    sampled = np.ones(len(logits), bool) if ignored_negative else labels_ >= 0
    y = (labels_ == 1).astype(np.float64)
    x = logits
    if naive_log:
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            p = 1 / (1 + np.exp(-x))
            per = -y * np.log(p) - (1 - y) * np.log(1 - p)
    else:
        per = np.maximum(x, 0) - y * x + np.log1p(np.exp(-np.abs(x)))
    p = np.where(x >= 0, 1 / (1 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1 + np.exp(-np.abs(x))))
    loss_cls = per[sampled].sum() / n_cls
    g = (y - p) if flip_sign else (p - y)
    grad_logits = np.where(sampled, g, 0) / (1 if grad_unnormalised else n_cls)
    s2 = sigma * sigma
    d = t_pred - t_target
    inside = np.abs(d) < (1 / sigma if zone_sigma else 1 / s2)
    quad = 0.5 * sigma * d * d if sigma_unsquared else 0.5 * s2 * d * d
    per_t = np.where(inside, quad, np.abs(d) - 0.5 / s2)
    gt_ = np.where(inside, (sigma if sigma_unsquared else s2) * d, np.sign(d))
    counted = sampled if reg_negatives else labels_ == 1
    reduce = (lambda v: v.mean(axis=1)) if mean_of_four else (lambda v: v.sum(axis=1))
    loss_reg = reduce(per_t)[counted].sum() / n_reg
    grad_t = np.where(counted[:, None], gt_, 0) * ((lam if lam_in_grad else 1) / n_reg)
    if mean_of_four:
        grad_t = grad_t / 4
    return loss_cls + lam * loss_reg, grad_logits, grad_t


def proposal_targets(proposals, gt, gl, num_classes, batch, frac, fg_iou, hi, lo, rng, add_gt=True,
                     fg_strict=False, bg_inclusive=False, no_lo=False, no_cap=False, no_fill=False,
                     first_label=False, no_background_column=False, no_weights=False,
                     first_n=False, replace=False, swapped=False, global_random=False):
    rois = np.concatenate([proposals, gt]) if add_gt else proposals
    m = ops.box_iou(rois, gt)
    best, top = m.argmax(axis=1), m.max(axis=1)
    fg = np.flatnonzero(top > fg_iou if fg_strict else top >= fg_iou)
    bg_mask = (top <= hi) if bg_inclusive else (top < hi)
    bg = np.flatnonzero(bg_mask if no_lo else bg_mask & (top >= lo))
    n_fg = len(fg) if no_cap else min(len(fg), int(round(frac * batch)))
    n_bg = min(len(bg), int(batch - round(frac * batch)) if no_fill else batch - n_fg)
    draw = np.random.default_rng() if global_random else rng

    def pick(idx, n):
        if first_n:
            return idx[:n]
        return draw.choice(idx, n, replace=replace and len(idx) > 0) if n else idx[:0]

    keep = np.concatenate([pick(fg, n_fg), pick(bg, n_bg)]).astype(np.int64)
    out_labels = np.zeros(len(keep), np.int64)
    out_labels[:n_fg] = gl[0] if first_label else gl[best[keep[:n_fg]]]
    targets = np.zeros((len(keep), 4 * (num_classes + 1)), np.float32)
    weights = np.zeros_like(targets)
    w = (1, 1, 1, 1) if no_weights else (10, 10, 5, 5)
    for i in range(n_fg):
        r = keep[i]
        t = (lib_encode(rois[r][None], gt[best[r]][None], w) if swapped else
             lib_encode(gt[best[r]][None], rois[r][None], w))[0]
        col = 4 * (out_labels[i] - 1) if no_background_column else 4 * out_labels[i]
        targets[i, col:col + 4] = t
        weights[i, col:col + 4] = 1
    return rois[keep], out_labels, targets, weights


def _windows(xp, u, v, ho, wo, s):
    return xp[:, :, u:u + s * ho:s, v:v + s * wo:s]                     # (N, C, Ho, Wo)


def conv2d(x, w, b, stride, padding, flipped=False, no_pad=False, no_stride=False, no_bias=False,
           bias_per_input=False, swap_kernel=False, ceil_size=False, one_side=False,
           depthwise=False):
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    if swap_kernel:
        w = w.reshape(o, c, kw, kh)
        kh, kw = kw, kh
    p = 0 if no_pad else padding
    xp = np.pad(x, ((0, 0), (0, 0), (0, 2 * p), (0, 2 * p))) if one_side else \
        np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    size = (lambda full, k: -(-(full - k) // stride) + 1) if ceil_size else \
        (lambda full, k: (full - k) // stride + 1)
    ho, wo = size(h + 2 * p, kh), size(wd + 2 * p, kw)
    y = np.zeros((n, o, ho, wo))
    for u in range(kh):
        for v in range(kw):
            patch = xp[:, :, u:u + ho, v:v + wo] if no_stride else _windows(xp, u, v, ho, wo, stride)
            k = w[:, :, kh - 1 - u, kw - 1 - v] if flipped else w[:, :, u, v]
            if depthwise:
                y += k[:, :1, None, None] * patch[:, None, 0]
            else:
                y += np.einsum("oc,nchw->nohw", k, patch)
    if not no_bias:
        y += b[None, :, None, None] * (c if bias_per_input else 1)
    return y


def conv2d_backward(x, w, b, dy, stride, padding, first_image=False, mean_over_images=False,
                    db_batch_only=False, assign=False, keep_padding=False, flipped=False,
                    scatter_no_stride=False, first_out_channel=False, transposed_dw=False):
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    _, _, ho, wo = dy.shape
    p, s = padding, stride
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    dxp = np.zeros_like(xp)
    dw = np.zeros_like(w)
    for u in range(kh):
        for v in range(kw):
            patch = _windows(xp, u, v, ho, wo, s)
            images = slice(0, 1) if first_image else slice(None)
            g = np.einsum("nohw,nchw->oc", dy[images], patch[images])
            if transposed_dw:
                g = np.einsum("nohw,nchw->co", dy, patch).reshape(o, c)
            dw[:, :, u, v] = g / (n if mean_over_images else 1)
            k = w[:, :, kh - 1 - u, kw - 1 - v] if flipped else w[:, :, u, v]
            back = np.einsum("c,nhw->nchw", k[0], dy[:, 0]) if first_out_channel else \
                np.einsum("oc,nohw->nchw", k, dy)
            where = (slice(None), slice(None), slice(u, u + ho), slice(v, v + wo)) if scatter_no_stride \
                else (slice(None), slice(None), slice(u, u + s * ho, s), slice(v, v + s * wo, s))
            if assign:
                dxp[where] = back
            else:
                dxp[where] += back
    db = dy.sum(axis=0) if db_batch_only else dy.sum(axis=(0, 2, 3))
    dx = dxp if keep_padding else dxp[:, :, p:p + h, p:p + wd]
    return dx, dw, db


def kw(fn, **options):
    """`fn` with one mistake put in (keyword options)."""
    return lambda *args: fn(*args, **options)


# ---- per check: the right answer, the placeholder, and the mistakes it must catch ---------------

def _conv_placeholder_backward(x, w, b, dy, stride, padding):
    layer = nn.Conv2d(x.shape[1], w.shape[0], w.shape[2:], stride, padding).astype(np.float64)
    layer.params["weight"][...], layer.params["bias"][...] = w, b
    layer.forward(x)
    return layer.backward(dy), layer.grads["weight"], layer.grads["bias"]


CHECKS = {
    "check_box_iou": dict(right=iou, placeholder=lambda a, b: ops.box_iou(a, b), mistakes={
        "+1 in widths and heights (the legacy convention)": kw(iou, plus_one=1),
        "the product of the overlaps clipped, not each overlap (two negatives make a positive)":
            kw(iou, clip_product=True),
        "the union without minus the intersection": kw(iou, no_minus=True),
        "zero union divides by zero (NaN)": kw(iou, nan_guard=False),
        "min and max swapped: the enclosing box, not the intersection": kw(iou, enclosing=True),
        "the matrix transposed: (M, N)": kw(iou, transposed=True),
        "intersection over the smaller area": kw(iou, over_min=True),
    }),
    "check_anchors": dict(right=anchors, placeholder=lambda b, r, s: generate_anchors(b, r, s), mistakes={
        "ratio read as w / h": kw(anchors, w_over_h=True),
        "centred on the legacy 7.5 (base / 2 - 0.5)": lambda b, r, s: anchors(b, r, s, centre=b / 2 - 0.5),
        "centred on the origin": lambda b, r, s: anchors(b, r, s, centre=0.0),
        "scale-major order": kw(anchors, scale_major=True),
        "sides rounded to whole pixels (the released code)": kw(anchors, legacy_round=True),
        "no square root: w = b s / r, h = b s (the area changes)": kw(anchors, no_sqrt=True),
    }),
    "check_label_anchors": dict(
        right=labels,
        placeholder=lambda a, g, p, n: lib_label_anchors(a, g, pos_iou=p, neg_iou=n)[0],
        mistakes={
            "rule (i) left out": kw(labels, rule_i=False),
            "negative when IoU < 0.3 with ANY box, not with every box": kw(labels, neg_any=True),
            "IoU >= 0.7 positive (the released code, not the paper)": kw(labels, pos_ge=True),
            "IoU <= 0.3 negative": kw(labels, neg_le=True),
            "rule (i) matches boxes that no anchor touches (best IoU 0)": kw(labels, zero_match=True),
            "rule (i) takes one anchor per box (argmax), not every tied one": kw(labels, one_per_box=True),
            "negatives assigned last, clobbering rule (i)'s positives below 0.3":
                kw(labels, negatives_last=True),
            "rule (i) per anchor (each anchor's best box), not per box": kw(labels, per_anchor=True),
            "no ground truth: everything ignored instead of negative": kw(labels, empty=-1),
        }),
    "check_encode": dict(right=encode, placeholder=lambda b, a: lib_encode(b, a), mistakes={
        "no log: tw = w / wa - 1": kw(encode, log=False),
        "corners instead of centres": kw(encode, corners=True),
        "divided by the box's size, not the anchor's": kw(encode, by_box=True),
        "+1 in widths and heights": kw(encode, plus_one=1),
        "log(wa / w): the ratio inverted": kw(encode, inverted=True),
        "tx divided by the anchor's height, ty by its width": kw(encode, swap_wh=True),
    }),
    "check_decode": dict(right=decode, placeholder=lambda t, a: lib_decode(t, a), mistakes={
        "no clamp": kw(decode, clamp=None),
        "a symmetric clamp, np.clip(t, -c, c)": kw(decode, clamp="both"),
        "clamped at 4 instead of log(1000 / 16)": kw(decode, limit=4.0),
        "tx and ty clamped too": kw(decode, clamp="all"),
        "+1 in widths and heights": kw(decode, plus_one=1),
        "the centre moved by the new width, not the anchor's": kw(decode, by_new_width=True),
        "no exponential: w = wa (1 + tw)": kw(decode, no_exp=True),
        "returns (cx, cy, w, h), not corners": kw(decode, centre_size=True),
    }),
    "check_nms": dict(right=nms, placeholder=lambda b, s, t: ops.nms(b, s, t), mistakes={
        ">= instead of >": kw(nms, strict=False),
        "ties: the higher index first (an unstable sort)": kw(nms, stable=False),
        "no sort: boxes in index order": kw(nms, sort=False),
        "suppress what overlaps any better box, kept or not (not greedy)": kw(nms, any_better=True),
        "one round: keep the best and whatever does not overlap it": kw(nms, one_round=True),
        "kept indices returned in index order": kw(nms, index_order=True),
        "ascending sort: the worst box first": kw(nms, ascending=True),
    }),
    "check_roi_pool": dict(
        right=roi_pool,
        placeholder=lambda f, r, s, sc: ops.roi_pool(
            f[None], np.concatenate([np.zeros((len(r), 1), np.float32), r], axis=1), s, sc)[0],
        mistakes={
            "numpy's round half to even": kw(roi_pool, rounding=np.round),
            "truncation int(x) instead of rounding": kw(roi_pool, rounding=np.trunc),
            "negative starts not clipped (a slice from -2 wraps around)": kw(roi_pool, clip=False),
            "bin ends floored, not ceiled": kw(roi_pool, end_floor=True),
            "the RoI end - start cells, not end - start + 1": kw(roi_pool, plus_one=0),
            "spatial_scale not applied": kw(roi_pool, use_scale=False),
            "x and y swapped": kw(roi_pool, swap_xy=True),
            "average pooling": kw(roi_pool, average=True),
            "the max started from 0 (negative features)": kw(roi_pool, start_from_zero=True),
        }),
    "check_roi_align": dict(
        right=roi_align,
        placeholder=lambda f, r, s, sc, ratio, al: ops.roi_align(
            f[None], np.concatenate([np.zeros((len(r), 1), np.float32), r], axis=1), s, sc, ratio, al),
        mistakes={
            "aligned=True without the half-cell shift": kw(roi_align, shift=0.0),
            "the half-cell shift applied with aligned=False too": kw(roi_align, shift_always=True),
            "the shift +0.5 instead of -0.5": kw(roi_align, shift=0.5),
            "aligned=False without forcing the RoI to 1 x 1 cell": kw(roi_align, min_one=False),
            "samples at the bins' corners, not at the centres of a g x g split": kw(roi_align, corners=True),
            "adaptive sampling floored, not ceil(bin size)": kw(roi_align, floor_adaptive=True),
            "samples outside [-1, size] read the border instead of 0": kw(roi_align, zero_outside=False),
            "samples in [-1, 0) not clamped to 0": kw(roi_align, clamp_low=False),
            "bilinear weights of the two rows swapped": kw(roi_align, swap_weights=True),
            "the sum of the samples, not their mean": kw(roi_align, mean=False),
            "spatial_scale not applied": kw(roi_align, use_scale=False),
            "x and y swapped": kw(roi_align, swap_xy=True),
            "nearest cell instead of bilinear interpolation": kw(roi_align, nearest=True),
        }),
    "check_rpn_loss": dict(
        right=rpn_loss,
        placeholder=lambda *a: (lambda r: (r["loss"], r["grad_logits"], r["grad_t"]))(
            lib_rpn_loss(*a[:4], n_cls=a[4], n_reg=a[5], lam=a[6], sigma=a[7])),
        mistakes={
            "ignored anchors (-1) counted as negatives": kw(rpn_loss, ignored_negative=True),
            "the box loss of negatives counted (no p*)": kw(rpn_loss, reg_negatives=True),
            "N_cls and N_reg swapped": kw(rpn_loss, swap_n=True),
            "lambda left out of the box gradient": kw(rpn_loss, lam_in_grad=False),
            "the quadratic zone |d| < 1/sigma, not 1/sigma^2": kw(rpn_loss, zone_sigma=True),
            "0.5 sigma d^2, sigma not squared": kw(rpn_loss, sigma_unsquared=True),
            "log(sigmoid(x)) taken naively: inf for confident logits": kw(rpn_loss, naive_log=True),
            "the log loss's gradient with the wrong sign (y - p)": kw(rpn_loss, flip_sign=True),
            "the log loss's gradient not divided by N_cls": kw(rpn_loss, grad_unnormalised=True),
            "smooth L1 averaged over t's 4 entries, not summed": kw(rpn_loss, mean_of_four=True),
        }),
    "check_proposal_targets": dict(
        right=proposal_targets,
        placeholder=lambda p, g, l, c, b, f, fi, hi, lo, rng: lib_proposal_targets(
            p, g, l, c, b, f, fi, hi, lo, rng=rng),
        mistakes={
            "the ground truth not added to the proposals": kw(proposal_targets, add_gt=False),
            "foreground at IoU > 0.5, not >= 0.5": kw(proposal_targets, fg_strict=True),
            "background up to IoU 0.5 inclusive": kw(proposal_targets, bg_inclusive=True),
            "background's lower bound (bg_iou_lo) ignored": kw(proposal_targets, no_lo=True),
            "foreground not capped at fg_fraction of the batch": kw(proposal_targets, no_cap=True),
            "background not filling the batch when foreground is short": kw(proposal_targets, no_fill=True),
            "every foreground RoI labelled with the first box's class": kw(proposal_targets, first_label=True),
            "targets in columns 4 (l - 1), forgetting background's": kw(proposal_targets, no_background_column=True),
            "targets without the weights (10, 10, 5, 5)": kw(proposal_targets, no_weights=True),
            "the first RoIs taken, not a random sample": kw(proposal_targets, first_n=True),
            "drawn with replacement": kw(proposal_targets, replace=True),
            "encode(RoI, box): the box coded relative to the RoI, swapped": kw(proposal_targets, swapped=True),
            "np.random instead of the rng given": kw(proposal_targets, global_random=True),
        }),
    "check_conv2d": dict(
        right=conv2d, placeholder=lambda x, w, b, s, p: nn.conv2d_reference(x, w, b, s, p),
        mistakes={
            "a true convolution: the kernel flipped": kw(conv2d, flipped=True),
            "padding ignored": kw(conv2d, no_pad=True),
            "the windows taken at every pixel, stride ignored": kw(conv2d, no_stride=True),
            "no bias": kw(conv2d, no_bias=True),
            "the bias added once per input channel": kw(conv2d, bias_per_input=True),
            "kh and kw swapped": kw(conv2d, swap_kernel=True),
            "the output size rounded up": kw(conv2d, ceil_size=True),
            "padding on one side only": kw(conv2d, one_side=True),
            "no sum over the input channels": kw(conv2d, depthwise=True),
        }),
    "check_conv2d_backward": dict(
        right=conv2d_backward, placeholder=_conv_placeholder_backward,
        mistakes={
            "dW from the first image only": kw(conv2d_backward, first_image=True),
            "dW averaged over the images": kw(conv2d_backward, mean_over_images=True),
            "db summed over the images only": kw(conv2d_backward, db_batch_only=True),
            "dx assigned, not added: overlapping windows lose their share": kw(conv2d_backward, assign=True),
            "dx returned with its padding": kw(conv2d_backward, keep_padding=True),
            "dx through the flipped kernel": kw(conv2d_backward, flipped=True),
            "dx scattered without the stride": kw(conv2d_backward, scatter_no_stride=True),
            "dx from the first output channel only": kw(conv2d_backward, first_out_channel=True),
            "dW transposed, (C, O) read as (O, C)": kw(conv2d_backward, transposed_dw=True),
        }),
}
NEW_CHECKS = ("check_rpn_loss", "check_proposal_targets", "check_roi_align", "check_conv2d",
              "check_conv2d_backward")


def test_every_check_is_graded_here():
    """Every check_* of the module has its right answer, placeholder and mistakes above; the new
    stages list at least six mistakes, the others at least five."""
    assert set(CHECKS) == {name for name in ex.__all__ if name.startswith("check_")}
    for name, spec in CHECKS.items():
        assert len(spec["mistakes"]) >= (6 if name in NEW_CHECKS else 5), name


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_the_right_answer_passes(name):
    result = getattr(ex, name)(CHECKS[name]["right"])
    assert result.passed and "cases passed" in result, result


@pytest.mark.parametrize("name, mistake", [(name, m) for name in sorted(CHECKS)
                                           for m in CHECKS[name]["mistakes"]])
def test_each_classic_mistake_is_caught(name, mistake):
    wrong = CHECKS[name]["mistakes"][mistake]
    with pytest.raises(AssertionError, match=r"your function (returned|raised)|RoI|expected") as info:
        getattr(ex, name)(wrong)
    assert name.removeprefix("check_") in str(info.value)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_an_unedited_placeholder_is_not_done_never_passed(name):
    """The notebooks' cells start with a placeholder that returns the library's own result: the
    check must say so, not count its cases as passed."""
    result = getattr(ex, name)(CHECKS[name]["placeholder"])
    assert not result.passed and "not done yet" in result and "passed" not in result, result


def test_a_placeholder_is_seen_however_the_library_is_reached():
    """Through an alias, a `from ... import`, or halfway through the cases."""
    from frcnn_scratch.boxes import box_iou as imported
    alias = ops.box_iou
    assert not ex.check_box_iou(lambda a, b: imported(a, b)).passed
    assert not ex.check_box_iou(lambda a, b: alias(a, b)).passed
    late = lambda a, b: ops.box_iou(a, b) if len(a) > 2 else iou(a, b)        # noqa: E731
    assert "not done" in ex.check_box_iou(late)
    # using another library function is fine: NMS may call ops.box_iou
    assert ex.check_nms(lambda b, s, t: nms(b, s, t)).passed
    assert ex.check_nms(lambda b, s, t: _nms_with_library_iou(b, s, t)).passed


def _nms_with_library_iou(boxes, scores, thr):
    order, keep = np.argsort(-scores, kind="stable"), []
    while len(order):
        best, order = order[0], order[1:]
        keep.append(best)
        order = order[ops.box_iou(boxes[[best]], boxes[order])[0] <= thr]
    return np.array(keep, np.int64)


def test_a_failure_shows_the_inputs_and_both_answers():
    with pytest.raises(AssertionError) as info:
        ex.check_box_iou(lambda a, b: np.zeros((len(a), len(b))))
    text = str(info.value)
    assert "two 2x2 boxes overlapping by 1x1" in text and "expected" in text and "boxes1" in text
    with pytest.raises(AssertionError, match="shape"):
        ex.check_nms(lambda b, s, t: np.zeros((2, 2)))
    with pytest.raises(AssertionError, match="returned None"):
        ex.check_encode(lambda b, a: None)
    with pytest.raises(AssertionError, match="raised ZeroDivisionError"):
        ex.check_encode(lambda b, a: 1 / 0)


def test_label_cases_hold_many_ignored_anchors_and_the_exact_thresholds():
    """The issue this answers: the random cases held one ignored anchor in all, and no IoU sat
    exactly on 0.7 or 0.3."""
    cases = ex._label_cases(np.random.default_rng(0), 30)
    ignored, on_threshold = 0, set()
    for _, a, g, pos, neg in cases:
        a, g = np.asarray(a, np.float32), np.asarray(g, np.float32).reshape(-1, 4)
        if len(g):
            m = ops.box_iou(a, g)
            on_threshold |= {v for v in (pos, neg) if np.any(m == np.float32(v))}
        ignored += int(np.sum(lib_label_anchors(a, g, pos_iou=pos, neg_iou=neg)[0] == -1))
    assert ignored >= 100 and on_threshold >= {0.7, 0.3}


# ---- the notebooks' folded solutions pass their checks ----------------------------------------

def _solutions():
    """(notebook, check name, function name, code) for every write-it-yourself cell: the code of
    the folded "A solution" above it, and the check the cell prints."""
    found = []
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != "markdown" or "<summary>A solution" not in cell.source:
                continue
            code = re.search(r"```python\n(.*?)```", cell.source, re.S).group(1)
            calls = re.findall(r"(check_\w+)\((\w+)\)", nb.cells[i + 1].source)
            assert calls, f"{path.stem} cell {i + 1}: no check_*(...) call after the solution"
            found += [(path.stem, check, fn, code) for check, fn in calls]
    return found


SOLUTIONS = _solutions()


def test_every_check_has_a_write_it_yourself_cell():
    assert {check for _, check, _, _ in SOLUTIONS} == set(CHECKS)


@pytest.mark.parametrize("notebook, check, fn, code", SOLUTIONS,
                         ids=[f"{s[0]}-{s[1]}" for s in SOLUTIONS])
def test_the_notebooks_folded_solutions_pass(notebook, check, fn, code):
    from frcnn_scratch.box_coding import BBOX_CLAMP
    from frcnn_scratch.roi_head import HEAD_BOX_WEIGHTS
    namespace = dict(np=np, math=math, ops=ops, nn=nn, BBOX_CLAMP=BBOX_CLAMP, encode=lib_encode,
                     HEAD_BOX_WEIGHTS=HEAD_BOX_WEIGHTS)
    exec(compile(code, f"<{notebook} solution>", "exec"), namespace)
    result = getattr(ex, check)(namespace[fn])
    assert result.passed, result
