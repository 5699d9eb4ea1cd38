"""Write it yourself: checks for a learner's own version of each stage (the notebooks use them).

Each check_* takes the learner's function, runs it on hand-made cases (each named after the
mistake it is there to catch: an IoU exactly on a threshold, a RoI hanging off the map, tied
scores, ...), random inputs and degenerate ones, and compares with this library's reference.
It returns a line to print, or raises an AssertionError that names the first case that differs,
with the inputs, what came back and what was expected.

    from frcnn_scratch.exercises import check_box_iou
    def my_iou(a, b): ...
    print(check_box_iou(my_iou))   # 'box_iou: 57 cases passed', or an AssertionError

A function that still calls the library's own version of what it should compute (the unedited
placeholder of a notebook cell) is not checked: the line says "not done yet" and names the
library function it called.  The line is a `Result`: a str whose `passed` is True only when the
learner's own code passed every case.

The learner's function may compute in float64: values are compared to a stated tolerance;
indices and labels must be equal.  tests/test_exercises.py lists, for every check, the wrong
implementations (the classic mistakes of its stage) it must catch.
"""
import inspect
import sys

import numpy as np

from . import anchors as _anchors, box_coding as _box_coding, boxes as _boxes
from . import fast as _fast, labeling as _labeling, losses as _losses, nms as _nms, nn, ops
from . import roi_align as _roi_align, roi_head as _roi_head, roi_pool as _roi_pool, rpn as _rpn
from .anchors import generate_anchors
from .box_coding import decode, encode
from .labeling import label_anchors
from .losses import rpn_loss
from .roi_head import HEAD_BOX_WEIGHTS

__all__ = ["Result", "check_box_iou", "check_anchors", "check_label_anchors", "check_encode",
           "check_decode", "check_nms", "check_roi_pool", "check_roi_align", "check_rpn_loss",
           "check_proposal_targets", "check_conv2d", "check_conv2d_backward"]


# ---- what a check returns, and how it tells a placeholder from the learner's own code ----------

class Result(str):
    """The line a check returns (print it); `passed` is True only if the learner's code passed."""

    def __new__(cls, text, passed):
        self = super().__new__(cls, text)
        self.passed = bool(passed)
        return self


def _library(*pairs):
    """[(shown name, function)] -> {code object: shown name}, for the functions a placeholder
    would call.  Names another edit has removed are skipped (pass None)."""
    codes = {}
    for name, fn in pairs:
        fn = getattr(inspect.unwrap(fn), "__func__", fn) if fn is not None else None
        if fn is not None and hasattr(fn, "__code__"):
            codes[fn.__code__] = name
    return codes


class _Learner:
    """Calls the learner's function and notes whether it called the library's own version.

    While the learner's function runs, sys.setprofile sees every Python function called on this
    thread; if one of them is the library's (by its code object, so an alias or a
    `from ... import` is seen too), the work is not the learner's.
    """

    def __init__(self, name, fn, library):
        self.name, self.fn, self.library = name, fn, library
        self.called = None              # the shown name of the library function it called
        self.cases = 0

    def _profile(self, frame, event, arg):
        if event == "call" and self.called is None:
            self.called = self.library.get(frame.f_code)

    def __call__(self, case, *args):
        previous = sys.getprofile()
        sys.setprofile(self._profile)
        try:
            out = self.fn(*args)
        except Exception as e:          # say which case, and keep the learner's traceback
            raise AssertionError(f"{self.name}, {case}: your function raised "
                                 f"{type(e).__name__}: {e}") from e
        finally:
            sys.setprofile(previous)
        self.cases += 1
        return out

    def not_done(self):
        """The result for a function that called the library's own version."""
        who = getattr(self.fn, "__name__", "your function")
        return Result(f"{self.name}: not done yet: {who} calls {self.called}, the library's own "
                      f"version. Replace that line with your own code, then run the check again.",
                      passed=False)

    def passed(self):
        return Result(f"{self.name}: {self.cases} cases passed", passed=True)


# ---- comparing -----------------------------------------------------------------------------------

def _show(v):
    return np.array2string(np.asarray(v), precision=5, threshold=40)


def _fail(name, case, inputs, got, want, note=""):
    shown = "\n".join(f"  {k} = {np.array2string(np.asarray(v), precision=4, threshold=20)}"
                      for k, v in inputs.items())
    raise AssertionError(f"{name}, {case}: your function returned\n  {_show(got)}\n"
                         f"expected\n  {_show(want)}\n{note}for\n{shown}")


def _compare(name, case, inputs, got, want, atol=None, rtol=0.0, what=""):
    """got must equal want (atol None) or be within atol + rtol |want| of it, with want's shape."""
    if got is None:
        raise AssertionError(f"{name}, {case}: your function returned None (a missing return?)")
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        raise AssertionError(f"{name}, {case}: your function returned {what}shape {got.shape}, "
                             f"expected {want.shape}")
    if atol is None:
        same = np.array_equal(got, want)
    else:
        try:
            same = np.allclose(got.astype(np.float64), want, rtol=rtol, atol=atol)
        except (TypeError, ValueError):
            same = False
    if not same:
        _fail(name, case, inputs, got, want, note=f"({what.strip()}) " if what else "")


def _boxes_in(rng, n, size=50.0, degenerate=True, grid=True, low=0.0):
    """n random xyxy boxes with corners from `low` to `size`; with degenerate, some zero-width,
    zero-area, repeated or touching; with grid, on half pixels (so that equal IoUs, hence ties,
    happen)."""
    xy = rng.uniform(low, size, (n, 2))
    wh = rng.uniform(0, size / 2, (n, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    if degenerate and n >= 4:
        boxes[0, 2] = boxes[0, 0]                     # zero width
        boxes[1, 2:] = boxes[1, :2]                   # a point
        boxes[2] = boxes[3]                           # identical to another
        if n >= 6:
            boxes[5, 0] = boxes[4, 2]                 # touching along x: IoU 0
            boxes[5, 2] = boxes[5, 0] + 3
    return np.round(boxes * 2) / 2 if grid else boxes


def _near(rng, boxes, n, spread):
    """n boxes jittered around `boxes` (corners moved by up to `spread` times the box size), so
    that their IoUs with them spread over the whole of [0, 1]; on half pixels."""
    if len(boxes) == 0:
        return np.zeros((0, 4))
    base = boxes[rng.integers(len(boxes), size=n)]
    size = np.tile(base[:, 2:] - base[:, :2], 2)                      # (n, 4): w, h, w, h
    out = base + rng.uniform(-spread, spread, (n, 4)) * size
    out[:, 2:] = np.maximum(out[:, 2:], out[:, :2] + 0.5)
    return np.round(out * 2) / 2


# ---- chapter 2: anchors -----------------------------------------------------------------------

def check_anchors(fn, atol=1e-4):
    """fn(base_size, ratios, scales) -> (len(ratios) * len(scales), 4) anchors centred on the
    cell (base_size / 2, base_size / 2), ratio = h / w, area (base_size * scale)^2, ratio-major
    order (all scales of the first ratio first), continuous boxes: generate_anchors(...,
    legacy=False)."""
    learner = _Learner("anchors", fn, _library(("anchors.generate_anchors", generate_anchors)))
    cases = [(16, (0.5, 1, 2), (8, 16, 32)), (8, (1,), (2, 4)), (10, (0.25, 3), (1, 2.5)),
             (16, (2, 0.5), (4, 1))]
    for base, ratios, scales in cases:
        case = f"base {base}, ratios {ratios}, scales {scales}"
        got = learner(case, base, ratios, scales)
        if learner.called:
            return learner.not_done()
        _compare("anchors", case, dict(base_size=base, ratios=ratios, scales=scales), got,
                 generate_anchors(base, ratios, scales), atol)
    return learner.passed()


# ---- chapter 4: IoU and labels -----------------------------------------------------------------

def check_box_iou(fn, trials=40, seed=0, atol=1e-5):
    """fn(boxes1 (N, 4), boxes2 (M, 4)) -> (N, M) IoU, width = x2 - x1, zero union -> 0."""
    learner = _Learner("box_iou", fn, _library(("ops.box_iou", ops.box_iou),
                                               ("boxes.box_iou", _boxes.box_iou),
                                               ("boxes._box_iou", getattr(_boxes, "_box_iou", None))))
    rng = np.random.default_rng(seed)
    cases = [("two 2x2 boxes overlapping by 1x1", [[0, 0, 2, 2]], [[1, 1, 3, 3]]),
             ("a box with itself", [[1, 2, 5, 9]], [[1, 2, 5, 9]]),
             ("touching boxes", [[0, 0, 2, 2]], [[2, 0, 4, 2]]),
             ("apart along x and y (both overlaps negative)", [[0, 0, 2, 2]], [[5, 6, 8, 9]]),
             ("one box inside another", [[0, 0, 10, 10]], [[2, 3, 4, 8]]),
             ("two points (zero union)", [[1, 1, 1, 1]], [[1, 1, 1, 1]]),
             ("no boxes on one side", np.zeros((0, 4)), [[0, 0, 1, 1]]),
             ("three boxes against two (an (N, M) matrix, not (M, N))",
              [[0, 0, 4, 4], [1, 1, 5, 3], [6, 0, 9, 9]], [[2, 0, 6, 4], [0, 2, 7, 9]])]
    cases += [(f"random boxes #{t}", _boxes_in(rng, int(rng.integers(1, 9))),
               _boxes_in(rng, int(rng.integers(1, 9)))) for t in range(trials)]
    for case, a, b in cases:
        a, b = np.asarray(a, np.float32).reshape(-1, 4), np.asarray(b, np.float32).reshape(-1, 4)
        got = learner(case, a, b)
        if learner.called:
            return learner.not_done()
        _compare("box_iou", case, dict(boxes1=a, boxes2=b), got, ops.box_iou(a, b), atol)
    return learner.passed()


def _label_cases(rng, trials):
    """Hand-made anchors and boxes for check_label_anchors, then random ones whose anchors are
    jittered copies of the boxes (many land in the ignored band) plus random ones."""
    gt10 = [[0, 0, 10, 10]]
    cases = [
        ("no ground truth: every anchor is negative", _boxes_in(rng, 6), np.zeros((0, 4)), 0.7, 0.3),
        ("IoU exactly 0.7 is not 'higher than 0.7', IoU exactly 0.3 not 'lower than 0.3'",
         [[0, 0, 10, 10], [0, 0, 10, 7], [0, 0, 10, 3], [0, 0, 10, 2], [0, 0, 10, 5],
          [0, 0, 10, 8]], gt10, 0.7, 0.3),
        ("negative means IoU < 0.3 with EVERY box (0.5 with one, 0 with the other: ignored)",
         [[0, 0, 10, 10], [0, 0, 10, 5], [20, 0, 30, 10], [20, 0, 30, 4], [40, 0, 50, 10]],
         [[0, 0, 10, 10], [20, 0, 30, 10]], 0.7, 0.3),
        ("tied best anchors of a box are all positive (rule i)",
         [[0, 0, 10, 5], [0, 5, 10, 10], [0, 0, 10, 2], [30, 30, 40, 40]], gt10, 0.7, 0.3),
        ("a box's best anchor is positive even below 0.3 (rule i beats the negative rule)",
         [[0, 0, 16, 16], [20, 20, 36, 36], [40, 0, 56, 16]], [[0, 0, 4, 4]], 0.7, 0.3),
        ("a box that no anchor touches makes no positive (best IoU 0 is no match)",
         [[0, 0, 10, 10], [10, 0, 20, 10], [0, 10, 10, 20]], [[100, 100, 110, 110]], 0.7, 0.3),
        ("each box's best anchor, not each anchor's best box",
         [[0, 0, 10, 10], [1, 0, 11, 10], [20, 0, 30, 10], [22, 0, 31, 10], [50, 50, 60, 60]],
         [[0, 0, 10, 10], [20, 0, 30, 10]], 0.7, 0.3),
        ("other thresholds (0.6 / 0.4) are the function's arguments",
         [[0, 0, 10, 10], [0, 0, 10, 6.5], [0, 0, 10, 5], [0, 0, 10, 3.5], [0, 0, 10, 4.5]],
         gt10, 0.6, 0.4),
    ]
    for t in range(trials):
        gts = _boxes_in(rng, int(rng.integers(1, 4)), degenerate=False)
        gts[:, 2:] = np.maximum(gts[:, 2:], gts[:, :2] + 2)
        anchors = np.concatenate([_near(rng, gts, int(rng.integers(4, 20)), 0.4),
                                  _boxes_in(rng, int(rng.integers(1, 10)))])
        anchors = anchors[rng.permutation(len(anchors))]
        thresholds = (0.7, 0.3) if t % 4 else (0.6, 0.4)
        cases.append((f"random #{t}", anchors, gts) + thresholds)
    return cases


def check_label_anchors(fn, trials=30, seed=0):
    """fn(anchors (A, 4), gt_boxes (G, 4), pos_iou, neg_iou) -> (A,) labels: 1 for (i) the
    anchor(s) of highest IoU with each gt (ties: all of them; not when that IoU is 0) and (ii)
    IoU > pos_iou with any gt; 0 for IoU < neg_iou with every gt (and not positive); -1 otherwise
    (section 3.1.2).  No ground truth: every anchor is 0."""
    learner = _Learner("label_anchors", fn, _library(
        ("labeling.label_anchors", label_anchors),
        ("labeling._label_anchors", getattr(_labeling, "_label_anchors", None)),
        ("rpn.anchor_targets", _rpn.anchor_targets)))
    rng = np.random.default_rng(seed)
    cases = _label_cases(rng, trials)
    ignored = 0
    for case, anchors, gts, pos, neg in cases:
        anchors, gts = np.asarray(anchors, np.float32), np.asarray(gts, np.float32).reshape(-1, 4)
        want, _ = label_anchors(anchors, gts, pos_iou=pos, neg_iou=neg)
        ignored += int(np.sum(want == -1))
        got = learner(case, anchors, gts, pos, neg)
        if learner.called:
            return learner.not_done()
        got = None if got is None else np.asarray(got).astype(np.int64)
        _compare("label_anchors", case, dict(anchors=anchors, gt_boxes=gts, pos_iou=pos,
                                             neg_iou=neg), got, want)
    assert ignored >= 50, f"check_label_anchors: only {ignored} ignored anchors in its cases"
    return learner.passed()


# ---- chapter 3: box coding ---------------------------------------------------------------------

def _positive_boxes(rng, n, low=-20, high=80, size=(1, 60)):
    xy = rng.uniform(low, high, (n, 2))
    return np.concatenate([xy, xy + rng.uniform(*size, (n, 2))], axis=1).astype(np.float32)


def check_encode(fn, trials=20, seed=0, atol=1e-4):
    """fn(boxes (N, 4), anchors (N, 4)) -> (N, 4) t = (tx, ty, tw, th) of eq. (2)."""
    learner = _Learner("encode", fn, _library(
        ("box_coding.encode", encode), ("box_coding._encode", getattr(_box_coding, "_encode", None))))
    rng = np.random.default_rng(seed)
    cases = [("a box equal to its anchor", [[0, 0, 10, 20]], [[0, 0, 10, 20]]),
             ("shifted and twice as wide (centres, not corners)", [[5, 0, 25, 10]], [[0, 0, 10, 10]]),
             ("a tall anchor: tx in units of its width, ty of its height",
              [[3, 10, 9, 50]], [[0, 0, 4, 40]]),
             ("a box smaller than its anchor: negative tw, th", [[10, 10, 14, 12]], [[0, 0, 40, 20]])]
    cases += [(f"random #{t}", _positive_boxes(rng, 5), _positive_boxes(rng, 5)) for t in range(trials)]
    for case, b, a in cases:
        b, a = np.asarray(b, np.float32), np.asarray(a, np.float32)
        got = learner(case, b, a)
        if learner.called:
            return learner.not_done()
        _compare("encode", case, dict(boxes=b, anchors=a), got, encode(b, a), atol)
    return learner.passed()


def check_decode(fn, trials=20, seed=0, atol=1e-3, rtol=1e-5):
    """fn(t (N, 4), anchors (N, 4)) -> (N, 4) boxes, the inverse of eq. (2), with tw and th
    clamped from above (only) at log(1000 / 16) before the exponential, as decode does."""
    learner = _Learner("decode", fn, _library(
        ("box_coding.decode", decode), ("box_coding._decode", getattr(_box_coding, "_decode", None))))
    rng = np.random.default_rng(seed)
    cases = [("zero deltas give the anchor", np.zeros((1, 4)), [[0, 0, 10, 20]]),
             ("a huge tw is clamped", [[0, 0, 50.0, 0]], [[0, 0, 10, 10]]),
             ("a huge th is clamped", [[0, 0, 0, 30.0]], [[0, 0, 10, 10]]),
             ("tw = 4.1 is just below the clamp log(1000 / 16) = 4.135", [[0, 0, 4.1, 0]],
              [[0, 0, 10, 10]]),
             ("a very negative tw and th are not clamped (the clamp is from above only)",
              [[0, 0, -6.0, -9.0]], [[0, 0, 40, 40]]),
             ("a large tx or ty is not clamped", [[6.0, -5.0, 0, 0]], [[0, 0, 10, 20]]),
             ("a non-square anchor: tx scales its width, ty its height", [[0.5, 0.25, 0.3, -0.2]],
              [[4, 2, 10, 30]])]
    cases += [(f"random #{t}", rng.normal(0, 0.5 if t % 2 else 3.0, (5, 4)), _positive_boxes(rng, 5))
              for t in range(trials)]
    for case, t, a in cases:
        t, a = np.asarray(t, np.float32), np.asarray(a, np.float32)
        got = learner(case, t, a)
        if learner.called:
            return learner.not_done()
        _compare("decode", case, dict(t=t, anchors=a), got, decode(t, a), atol, rtol)
    return learner.passed()


# ---- chapter 6: NMS ----------------------------------------------------------------------------

def check_nms(fn, trials=40, seed=0):
    """fn(boxes (N, 4), scores (N,), iou_threshold) -> kept indices, best score first (ties:
    lower index first), suppressing IoU > threshold (strictly), greedily: a suppressed box
    suppresses nothing."""
    learner = _Learner("nms", fn, _library(
        ("ops.nms", ops.nms), ("ops._nms", getattr(ops, "_nms", None)), ("nms.nms", _nms.nms),
        ("nms._nms", getattr(_nms, "_nms", None)), ("nms.nms_reference", _nms.nms_reference),
        ("ops.batched_nms", ops.batched_nms), ("nms.batched_nms", _nms.batched_nms)))
    rng = np.random.default_rng(seed)
    chain = np.array([[0, 0, 10, 10], [4, 0, 14, 10], [8, 0, 18, 10]], np.float32)
    clusters = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [30, 0, 40, 10], [31, 1, 41, 11]], np.float32)
    cases = [("a chain: A suppresses B, so B cannot suppress C", chain, [0.9, 0.8, 0.7], 0.4),
             ("IoU equal to the threshold survives", [[0, 0, 3, 1], [1, 0, 4, 1]], [0.9, 0.5], 0.5),
             ("equal scores keep the lower index", [[0, 0, 4, 4]] * 3, [1, 1, 1], 0.3),
             ("two clusters: the best of each is kept (repeat until no box is left)",
              clusters, [0.9, 0.8, 0.7, 0.95], 0.5),
             ("scores not in index order: the best score goes first",
              [[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]], [0.2, 0.9, 0.5], 0.5),
             ("no boxes", np.zeros((0, 4)), np.zeros(0), 0.5)]
    for t in range(trials):
        n = int(rng.integers(1, 25))
        # off the half-pixel grid: no IoU lands exactly on the threshold, where float32 (this
        # library, torchvision) and float64 (a learner's NumPy) may round to different sides
        cases.append((f"random #{t}", _boxes_in(rng, n, size=30, grid=False),
                      np.round(rng.random(n), 1), float(rng.choice([0.3, 0.5, 0.7]))))
    for case, b, s, thr in cases:
        b, s = np.asarray(b, np.float32).reshape(-1, 4), np.asarray(s, np.float32)
        got = learner(case, b, s, thr)
        if learner.called:
            return learner.not_done()
        got = None if got is None else np.asarray(got).astype(np.int64).reshape(-1)
        _compare("nms", case, dict(boxes=b, scores=s, iou_threshold=thr), got, ops.nms(b, s, thr))
    return learner.passed()


# ---- chapter 7: RoI pooling and RoI Align ------------------------------------------------------

def check_roi_pool(fn, trials=24, seed=0, atol=1e-6):
    """fn(features (C, H, W), rois (K, 4) xyxy in image pixels, output_size (ph, pw),
    spatial_scale) -> (K, C, ph, pw) RoI max pooling with torchvision's rounding (corners rounded
    half away from zero, end - start + 1 cells, bins floor(i * size / n) .. ceil((i + 1) * size / n),
    clipped to the map, empty bins 0)."""
    learner = _Learner("roi_pool", fn, _library(
        ("ops.roi_pool", ops.roi_pool), ("roi_pool.roi_pool_forward", _roi_pool.roi_pool_forward),
        ("roi_pool._roi_pool_forward", getattr(_roi_pool, "_roi_pool_forward", None)),
        ("roi_pool.roi_pool_reference", _roi_pool.roi_pool_reference)))
    rng = np.random.default_rng(seed)
    ramp = np.arange(36, dtype=np.float32).reshape(1, 6, 6)
    cases = [("the whole 4 x 4 map into 2 x 2", np.arange(16, dtype=np.float32).reshape(1, 4, 4),
              [[0, 0, 3, 3]], (2, 2), 1.0),
             ("a corner at 2.5 rounds to 3 (half away from zero)",
              np.arange(10, dtype=np.float32).reshape(1, 1, 10), [[0, 0, 5, 0]], (1, 1), 0.5),
             ("a corner at 1.3 rounds to 1, at 1.7 to 2 (rounded, not truncated)",
              np.arange(10, dtype=np.float32).reshape(1, 1, 10)[:, :, ::-1].copy(),
              [[1.7, 0, 6.6, 0]], (1, 2), 1.0),
             ("7 cells into 3 bins: bins share a cell (floor start, ceil end)",
              np.arange(7, dtype=np.float32).reshape(1, 1, 7), [[0, 0, 6, 0]], (1, 3), 1.0),
             ("a RoI over the top-left corner: negative starts are clipped to 0",
              ramp[:, ::-1, ::-1].copy(), [[-10, -6, 5, 4]], (3, 3), 0.5),
             ("x is the column, y the row", ramp, [[0, 2, 2, 5]], (2, 1), 1.0),
             ("a RoI outside the map: empty bins give 0", np.ones((2, 5, 5), np.float32) * -3,
              [[40, 40, 60, 60]], (2, 2), 1.0),
             ("negative features: the max of a bin, never 0 from an empty start",
              -1 - np.arange(25, dtype=np.float32).reshape(1, 5, 5), [[1, 1, 3, 4]], (2, 2), 1.0)]
    for t in range(trials):
        c, h, w = int(rng.integers(1, 4)), int(rng.integers(3, 9)), int(rng.integers(3, 9))
        scale = float(rng.choice([1.0, 0.5, 0.25]))
        side = max(h, w) / scale
        rois = _boxes_in(rng, int(rng.integers(1, 5)), size=side, degenerate=False, low=-side / 3)
        cases.append((f"random #{t}", rng.integers(-3, 4, (c, h, w)).astype(np.float32), rois,
                      (int(rng.integers(1, 4)), int(rng.integers(1, 4))), scale))
    for case, f, rois, size, scale in cases:
        f, rois = np.asarray(f, np.float32), np.asarray(rois, np.float32).reshape(-1, 4)
        rois5 = np.concatenate([np.zeros((len(rois), 1), np.float32), rois], axis=1)
        want, _ = ops.roi_pool(f[None], rois5, size, scale, backend="numpy")
        got = learner(case, f, rois, size, scale)
        if learner.called:
            return learner.not_done()
        _compare("roi_pool", case, dict(features=f, rois=rois, output_size=size,
                                        spatial_scale=scale), got, want, atol)
    return learner.passed()


def check_roi_align(fn, trials=24, seed=0, atol=2e-5, rtol=1e-5):
    """fn(features (C, H, W), rois (K, 4) xyxy in image pixels, output_size (ph, pw),
    spatial_scale, sampling_ratio, aligned) -> (K, C, ph, pw), RoI Align as torchvision computes
    it: corners times spatial_scale, minus 0.5 when aligned (else the RoI is at least 1 x 1 cell);
    bins of (roi size / bins); in each bin a grid of samples at the centres of a g x g split
    (g = sampling_ratio, or ceil(bin size) when sampling_ratio <= 0); a sample with y < -1 or
    y > H (x the same) reads 0, else y is clamped to >= 0 and one at or past the last row reads
    the last row; bilinear interpolation of the four cells around it; the bin's mean."""
    learner = _Learner("roi_align", fn, _library(
        ("ops.roi_align", ops.roi_align),
        ("roi_align.roi_align_forward", _roi_align.roi_align_forward),
        ("roi_align._roi_align_forward", getattr(_roi_align, "_roi_align_forward", None)),
        ("roi_align.roi_align_reference", _roi_align.roi_align_reference)))
    rng = np.random.default_rng(seed)
    smooth = np.add.outer(np.arange(6.0) ** 2, 3 * np.arange(7.0)).astype(np.float32)[None]  # (1, 6, 7)
    cases = [("one sample at a cell centre reads that cell (aligned: -0.5)", smooth,
              [[2, 3, 3, 4]], (1, 1), 1.0, 1, True),
             ("aligned=False: no half-cell shift", smooth, [[2, 3, 3, 4]], (1, 1), 1.0, 1, False),
             ("aligned=False: a RoI smaller than a cell is stretched to one cell", smooth,
              [[2.2, 1.2, 2.4, 1.5]], (2, 2), 1.0, 2, False),
             ("aligned=True: a RoI smaller than a cell stays small", smooth,
              [[2.2, 1.2, 2.4, 1.5]], (2, 2), 1.0, 2, True),
             ("samples at the centres of a 2 x 2 split of each bin", smooth,
              [[0.5, 0.5, 4.5, 4.5]], (2, 2), 1.0, 2, False),
             ("adaptive sampling: ceil(bin size) = 3 samples a side for bins 2.5 cells wide", smooth,
              [[0, 0, 5, 5]], (2, 2), 1.0, -1, False),
             ("x is the column, y the row", smooth, [[0.5, 1.5, 6.5, 3.5]], (1, 3), 1.0, 2, False),
             ("spatial_scale maps image pixels to cells", smooth, [[4, 2, 20, 18]], (2, 2), 0.25, 2,
              True),
             ("a RoI hanging off the top-left: samples at y < -1 read 0, in [-1, 0) row 0", smooth,
              [[-4, -3.2, 2, 1]], (3, 3), 1.0, 2, False),
             ("a sample at or past the last row / column reads it", smooth,
              [[4, 3, 7.8, 6.6]], (2, 2), 1.0, 2, False),
             ("a RoI wholly outside the map reads 0", smooth, [[20, 20, 30, 30]], (2, 2), 1.0, 2, True)]
    for t in range(trials):
        c, h, w = int(rng.integers(1, 4)), int(rng.integers(3, 9)), int(rng.integers(3, 9))
        scale = float(rng.choice([1.0, 0.5, 0.25]))
        side = max(h, w) / scale
        rois = _boxes_in(rng, int(rng.integers(1, 4)), size=side, degenerate=t % 4 == 0,
                         grid=False, low=-side / 4)
        cases.append((f"random #{t}", rng.normal(size=(c, h, w)).astype(np.float32), rois,
                      (int(rng.integers(1, 4)), int(rng.integers(1, 4))), scale,
                      int(rng.choice([-1, 1, 2])), bool(t % 2)))
    for case, f, rois, size, scale, ratio, aligned in cases:
        f, rois = np.asarray(f, np.float32), np.asarray(rois, np.float32).reshape(-1, 4)
        rois5 = np.concatenate([np.zeros((len(rois), 1), np.float32), rois], axis=1)
        want = ops.roi_align(f[None], rois5, size, scale, ratio, aligned, backend="numpy")
        got = learner(case, f, rois, size, scale, ratio, aligned)
        if learner.called:
            return learner.not_done()
        _compare("roi_align", case, dict(features=f, rois=rois, output_size=size,
                                         spatial_scale=scale, sampling_ratio=ratio,
                                         aligned=aligned), got, want, atol, rtol)
    return learner.passed()


# ---- chapter 5: the loss of eq. (1) ------------------------------------------------------------

def check_rpn_loss(fn, trials=16, seed=0, rtol=1e-6, atol=1e-9):
    """fn(logits (A,), t_pred (A, 4), labels (A,), t_target (A, 4), n_cls, n_reg, lam, sigma)
    -> (loss, grad_logits (A,), grad_t (A, 4)): eq. (1),

        L = 1/N_cls sum_i L_cls(p_i, p_i*) + lam 1/N_reg sum_i p_i* L_reg(t_i, t_i*)

    with p_i = sigmoid(logit_i), L_cls the log loss over the sampled anchors (labels 1 and 0;
    -1 counts nowhere), L_reg = smooth L1 with sigma summed over the 4 entries of t, counted for
    positives only; and the gradients of L.  Inputs are float64."""
    learner = _Learner("rpn_loss", fn, _library(
        ("losses.rpn_loss", rpn_loss), ("losses._rpn_loss", getattr(_losses, "_rpn_loss", None))))
    rng = np.random.default_rng(seed)
    z4 = np.zeros((1, 4))
    cases = [
        ("one positive anchor, logit 0, t = t*: L = log 2 / N_cls", [0.0], z4, [1], z4, 1, 1, 1.0, 3.0),
        ("an ignored anchor (-1) counts in neither term",
         [2.0, -1.5, 0.5], [[0.3, 0, 0, 0], [1, 1, 1, 1], [0, 0.2, 0, 0]], [1, -1, 0],
         np.zeros((3, 4)), 2, 2, 1.0, 3.0),
        ("a negative's box error counts nowhere (the factor p*)",
         [1.0, -1.0], [[0.1, -0.2, 0.05, 0], [2, -2, 3, 1]], [1, 0], np.zeros((2, 4)), 2, 2, 1.0, 3.0),
        ("N_cls = 256 and N_reg = 2400 (the paper's) are not interchangeable",
         [0.5, -0.5, 1.5], [[0.5, -0.4, 0.3, 0.02], [0, 0, 0, 0], [0.1, 0.1, 0.1, 0.1]], [1, 0, 1],
         np.zeros((3, 4)), 256, 2400, 10.0, 3.0),
        ("lambda multiplies the box term and its gradient",
         [0.0, 0.0], [[0.4, -0.6, 0.2, 0.0], [0, 0, 0, 0]], [1, 0], np.zeros((2, 4)), 2, 2, 10.0, 3.0),
        ("sigma = 3: quadratic for |d| < 1/9, linear beyond",
         [0.0] * 4, [[0.05, -0.05, 0.1, -0.1], [0.12, -0.2, 0.5, 0], [1 / 9, -1 / 9, 0.3, 2],
                     [0.02, 0, 0, 0]], [1, 1, 1, 1], np.zeros((4, 4)), 4, 4, 1.0, 3.0),
        ("sigma = 1: quadratic for |d| < 1, linear beyond",
         [0.0] * 2, [[0.5, -0.9, 1.5, -2.0], [0.2, 0, 0, 3]], [1, 1], np.zeros((2, 4)), 2, 2, 1.0, 1.0),
        ("confident logits (+-800): the log loss stays finite (log(1 + e^-|x|), never log 0)",
         [800.0, -800.0, 800.0, -800.0], np.zeros((4, 4)), [1, 1, 0, 0], np.zeros((4, 4)),
         4, 4, 1.0, 3.0),
        ("no sampled anchor: L = 0", [1.0, 2.0], np.ones((2, 4)), [-1, -1], np.zeros((2, 4)), 1, 1,
         1.0, 3.0),
    ]
    for t in range(trials):
        a = int(rng.integers(5, 40))
        labels = rng.choice([-1, 0, 1], size=a, p=[0.4, 0.4, 0.2])
        sampled = max(int(np.count_nonzero(labels >= 0)), 1)
        n_cls, n_reg = (sampled, sampled) if t % 2 else (float(rng.integers(50, 300)),
                                                          float(rng.integers(100, 3000)))
        cases.append((f"random #{t}", rng.normal(0, 3, a), rng.normal(0, 0.5, (a, 4)), labels,
                      rng.normal(0, 0.5, (a, 4)), n_cls, n_reg, float(rng.choice([0.1, 1.0, 10.0])),
                      float(rng.choice([1.0, 3.0]))))
    for case, logits, t_pred, labels, t_target, n_cls, n_reg, lam, sigma in cases:
        logits, t_pred, t_target = (np.asarray(v, np.float64) for v in (logits, t_pred, t_target))
        labels = np.asarray(labels, np.int64)
        want = rpn_loss(logits, t_pred, labels, t_target, n_cls=n_cls, n_reg=n_reg, lam=lam,
                        sigma=sigma)
        inputs = dict(logits=logits, t_pred=t_pred, labels=labels, t_target=t_target, n_cls=n_cls,
                      n_reg=n_reg, lam=lam, sigma=sigma)
        got = learner(case, logits.copy(), t_pred.copy(), labels.copy(), t_target.copy(), n_cls,
                      n_reg, lam, sigma)
        if learner.called:
            return learner.not_done()
        if not isinstance(got, (tuple, list)) or len(got) != 3:
            raise AssertionError(f"rpn_loss, {case}: expected (loss, grad_logits, grad_t), got "
                                 f"{type(got).__name__}")
        for what, g, w in (("the loss", got[0], want["loss"]),
                           ("grad_logits", got[1], want["grad_logits"]),
                           ("grad_t", got[2], want["grad_t"])):
            _compare("rpn_loss", case, inputs, g, w, atol, rtol, what=what + " ")
    return learner.passed()


# ---- chapter 9: proposal targets ---------------------------------------------------------------

def _as_targets(got):
    if not isinstance(got, (tuple, list)) or len(got) != 4:
        raise TypeError(f"expected (rois, labels, bbox_targets, bbox_weights), got "
                        f"{type(got).__name__}")
    rois, labels, targets, weights = (np.asarray(v) for v in got)
    return rois.astype(np.float32).reshape(-1, 4), labels.astype(np.int64).reshape(-1), targets, weights


def _targets_wrong(case, inputs, msg):
    shown = "\n".join(f"  {k} = {np.array2string(np.asarray(v), precision=4, threshold=24)}"
                      for k, v in inputs.items())
    raise AssertionError(f"proposal_targets, {case}: {msg}\nfor\n{shown}")


def _check_targets(case, inputs, got):
    """The rules of Fast R-CNN 2.3 on one answer; sampling is random, so the rules, not one
    draw, are what is compared."""
    p, gt, gl = inputs["proposals"], inputs["gt_boxes"], inputs["gt_labels"]
    num_classes, batch = inputs["num_classes"], inputs["batch_size"]
    fg_iou, hi, lo = (np.float32(inputs[k]) for k in ("fg_iou", "bg_iou_hi", "bg_iou_lo"))
    try:
        rois, labels, targets, weights = _as_targets(got)
    except (TypeError, ValueError) as e:
        _targets_wrong(case, inputs, str(e))
    r, width = len(rois), 4 * (num_classes + 1)
    for name, arr, shape in (("labels", labels, (r,)), ("bbox_targets", targets, (r, width)),
                             ("bbox_weights", weights, (r, width))):
        if arr.shape != shape:
            _targets_wrong(case, inputs, f"{name} has shape {arr.shape}, expected {shape} "
                                         f"({r} RoIs, {num_classes} classes + background)")
    pool = np.concatenate([p, gt]).astype(np.float32)                    # the RoIs to draw from
    iou_pool = ops.box_iou(pool, gt) if len(gt) else np.zeros((len(pool), 0), np.float32)
    best_pool = iou_pool.max(axis=1) if len(gt) else np.zeros(len(pool), np.float32)
    n_fg_pool = int(np.sum(best_pool >= fg_iou))
    n_bg_pool = int(np.sum((best_pool < hi) & (best_pool >= lo)))
    want_fg = min(n_fg_pool, int(round(inputs["fg_fraction"] * batch)))
    want_bg = min(n_bg_pool, batch - want_fg)
    # every RoI is a proposal or a ground-truth box, none drawn more often than it is there
    rows, counts = np.unique(pool, axis=0, return_counts=True)
    for i, roi in enumerate(rois):
        where = np.flatnonzero((rows == roi).all(axis=1))
        if not len(where):
            _targets_wrong(case, inputs, f"RoI {i} {roi.tolist()} is neither a proposal nor a "
                                         f"ground-truth box (the ground truth is added to the "
                                         f"proposals, then RoIs are drawn from both)")
        if np.sum((rois == roi).all(axis=1)) > counts[where[0]]:
            _targets_wrong(case, inputs, f"RoI {roi.tolist()} was drawn more often than it is "
                                         f"there: sample without replacement")
    fg = labels > 0
    if fg.sum() != want_fg or (~fg).sum() != want_bg:
        _targets_wrong(case, inputs, f"{int(fg.sum())} foreground and {int((~fg).sum())} "
                                     f"background RoIs, expected {want_fg} and {want_bg} (of "
                                     f"{n_fg_pool} foreground and {n_bg_pool} background "
                                     f"candidates, proposals and ground truth together; "
                                     f"foreground up to round(fg_fraction * batch_size), "
                                     f"background fills the rest of the batch)")
    iou = ops.box_iou(rois, gt) if len(gt) else np.zeros((r, 0), np.float32)
    best = iou.argmax(axis=1) if len(gt) else np.zeros(r, np.int64)
    best_iou = iou.max(axis=1) if len(gt) else np.zeros(r, np.float32)
    t_want = np.zeros((r, width), np.float32)
    w_want = np.zeros((r, width), np.float32)
    for i in range(r):
        if fg[i]:
            if best_iou[i] < fg_iou:
                _targets_wrong(case, inputs, f"RoI {i} {rois[i].tolist()} is labelled foreground "
                                             f"with best IoU {best_iou[i]:.3f} < fg_iou {fg_iou:g}")
            if labels[i] != gl[best[i]]:
                _targets_wrong(case, inputs, f"RoI {i} {rois[i].tolist()} has label {labels[i]}; "
                                             f"its best box {gt[best[i]].tolist()} is of class "
                                             f"{gl[best[i]]}")
            cols = slice(4 * labels[i], 4 * labels[i] + 4)
            t_want[i, cols] = encode(gt[best[i]][None], rois[i][None], HEAD_BOX_WEIGHTS)[0]
            w_want[i, cols] = 1
        elif not (lo <= best_iou[i] < hi):
            _targets_wrong(case, inputs, f"RoI {i} {rois[i].tolist()} is labelled background with "
                                         f"best IoU {best_iou[i]:.3f}, outside [bg_iou_lo, "
                                         f"bg_iou_hi) = [{lo:g}, {hi:g})")
    _compare("proposal_targets", case, inputs, weights, w_want, 0.0,
             what="bbox_weights (1 in the 4 columns of a foreground RoI's class, else 0) ")
    _compare("proposal_targets", case, inputs, targets, t_want, 1e-4, 1e-5,
             what="bbox_targets (eq. (2) times (10, 10, 5, 5) from the RoI to its best box, in "
                  "its class's 4 columns; 0 elsewhere) ")
    return rois


def check_proposal_targets(fn, trials=12, seed=0):
    """fn(proposals (P, 4), gt_boxes (G, 4), gt_labels (G,), num_classes, batch_size,
    fg_fraction, fg_iou, bg_iou_hi, bg_iou_lo, rng) -> (rois (R, 4), labels (R,),
    bbox_targets (R, 4 (C+1)), bbox_weights (R, 4 (C+1))), Fast R-CNN 2.3's sampling: the
    ground truth joins the proposals; foreground = best IoU >= fg_iou (label: that box's class),
    background = best IoU in [bg_iou_lo, bg_iou_hi) (label 0); up to round(fg_fraction *
    batch_size) foreground drawn at random without replacement, background drawn to fill the
    batch; a foreground RoI's targets are eq. (2) times HEAD_BOX_WEIGHTS (10, 10, 5, 5) in the 4
    columns of its class (weights 1 there), all else 0.  Draw with `rng` (a np.random.Generator):
    the same seed must give the same RoIs, another seed other ones."""
    learner = _Learner("proposal_targets", fn, _library(
        ("roi_head.proposal_targets", _roi_head.proposal_targets),
        ("roi_head._proposal_targets", getattr(_roi_head, "_proposal_targets", None))))
    rng = np.random.default_rng(seed)
    gt1, lab1 = np.array([[0, 0, 10, 20]], np.float32), np.array([2])
    edges = np.array([[0, 0, 10, 10], [0, 0, 10, 2], [0, 0, 10, 1], [0, 0, 10, 19],
                      [0, 0, 10, 9.8]], np.float32)              # IoU 0.5, 0.1, 0.05, 0.95, 0.49
    far = np.array([[60, 60, 80, 90], [100, 0, 120, 30]], np.float32)
    two_gt = np.array([[0, 0, 20, 20], [40, 0, 60, 20]], np.float32)
    cases = [
        ("IoU exactly 0.5 is foreground, exactly 0.1 background, 0.05 neither",
         edges, gt1, lab1, 3, 16, 0.5, 0.5, 0.5, 0.1),
        ("no proposal near the object: the ground truth itself is the foreground",
         far, gt1, lab1, 3, 8, 0.25, 0.5, 0.5, 0.0),
        ("more foreground than 25% of the batch: foreground is capped",
         _near(rng, two_gt, 40, 0.05).astype(np.float32), two_gt, np.array([1, 3]), 3, 8, 0.25,
         0.5, 0.5, 0.0),
        ("little foreground: background fills the batch",
         np.concatenate([_near(rng, gt1, 2, 0.02), _boxes_in(rng, 30, size=120, degenerate=False)
                         + [0, 0, 20, 20]]).astype(np.float32), gt1, lab1, 3, 16, 0.25, 0.5, 0.5, 0.0),
        ("two objects of two classes: each RoI takes its best box's class and targets",
         np.concatenate([_near(rng, two_gt, 10, 0.15), far]).astype(np.float32), two_gt,
         np.array([3, 1]), 4, 32, 0.5, 0.5, 0.5, 0.0),
    ]
    for t in range(trials):
        g = int(rng.integers(1, 4))
        gts = _positive_boxes(rng, g, 0, 80, (8, 40))
        props = np.concatenate([_near(rng, gts, int(rng.integers(3, 30)), 0.3),
                                _positive_boxes(rng, int(rng.integers(0, 20)), 0, 100, (4, 50))])
        cases.append((f"random #{t}", props.astype(np.float32), gts, rng.integers(1, 5, g), 4,
                      int(rng.choice([8, 16, 32])), float(rng.choice([0.25, 0.5])), 0.5, 0.5,
                      float(rng.choice([0.0, 0.1]))))
    for case, p, gt, gl, c, batch, frac, fg_iou, hi, lo in cases:
        inputs = dict(proposals=np.asarray(p, np.float32), gt_boxes=np.asarray(gt, np.float32),
                      gt_labels=np.asarray(gl, np.int64), num_classes=c, batch_size=batch,
                      fg_fraction=frac, fg_iou=fg_iou, bg_iou_hi=hi, bg_iou_lo=lo)
        got = learner(case, *(v.copy() if isinstance(v, np.ndarray) else v for v in inputs.values()),
                      np.random.default_rng(t))
        if learner.called:
            return learner.not_done()
        _check_targets(case, inputs, got)
    # the draws: the rng given, at random
    props = np.concatenate([_near(rng, two_gt, 30, 0.1),
                            _boxes_in(rng, 40, size=100, degenerate=False)]).astype(np.float32)
    inputs = dict(proposals=props, gt_boxes=two_gt, gt_labels=np.array([1, 2]), num_classes=2,
                  batch_size=16, fg_fraction=0.25, fg_iou=0.5, bg_iou_hi=0.5, bg_iou_lo=0.0)
    case = "the same seed gives the same RoIs (draw with the rng you are given)"
    draws = [_as_targets(learner(case, *inputs.values(), np.random.default_rng(s)))[0]
             for s in (7, 7)]
    if learner.called:
        return learner.not_done()
    if not np.array_equal(draws[0], draws[1]):
        _targets_wrong(case, inputs, "two calls with np.random.default_rng(7) returned different "
                                     "RoIs: draw with rng (rng.choice, rng.permutation), not "
                                     "np.random")
    case = "other seeds give other RoIs (a random sample, not the first ones)"
    picks = {tuple(map(tuple, np.sort(_check_targets(case, inputs, learner(
        case, *inputs.values(), np.random.default_rng(s))), axis=0))) for s in range(8)}
    if len(picks) < 2:
        _targets_wrong(case, inputs, "eight seeds drew the very same RoIs: draw the foreground "
                                     "and the background at random (rng.choice(..., "
                                     "replace=False)), not the first or the best ones")
    return learner.passed()


# ---- chapter 8: the convolution ----------------------------------------------------------------

def _conv_cases(rng, trials):
    """(case, x, weight, bias, stride, padding): hand-made, then random, float64."""
    edge = np.array([[[[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.0, -1.0, -3.0]]]])   # (1, 1, 3, 3)
    img = np.arange(25.0).reshape(1, 1, 5, 5) % 7
    cases = [("a 1x1 kernel: a matrix product at every pixel", rng.normal(size=(1, 3, 4, 5)),
              rng.normal(size=(2, 3, 1, 1)), np.array([0.5, -1.0]), 1, 0),
             ("an asymmetric kernel: cross-correlation, the kernel is not flipped", img, edge,
              np.zeros(1), 1, 0),
             ("padding 1 keeps a 3x3 conv's size", img, edge, np.array([2.0]), 1, 1),
             ("stride 2 on an even size: Ho = (H + 2p - k) // s + 1", rng.normal(size=(1, 2, 6, 6)),
              rng.normal(size=(3, 2, 3, 3)), rng.normal(size=3), 2, 0),
             ("stride 2, padding 2, odd size", rng.normal(size=(2, 1, 7, 5)),
              rng.normal(size=(1, 1, 3, 3)), np.array([0.25]), 2, 2),
             ("a 2 x 3 kernel (kh != kw)", rng.normal(size=(1, 2, 5, 6)),
              rng.normal(size=(2, 2, 2, 3)), rng.normal(size=2), 1, 1),
             ("three images, 3 -> 4 channels, one bias per output channel",
              rng.normal(size=(3, 3, 4, 4)), rng.normal(size=(4, 3, 3, 3)),
              np.array([1.0, -2.0, 3.0, 0.5]), 1, 1)]
    for t in range(trials):
        n, c, o = (int(v) for v in rng.integers(1, 4, 3))
        kh, kw = (int(v) for v in rng.integers(1, 4, 2))
        stride, padding = int(rng.integers(1, 3)), int(rng.integers(0, 3))
        h, w = (int(v) for v in rng.integers(max(kh, kw), 8, 2))
        cases.append((f"random #{t}", rng.normal(size=(n, c, h, w)), rng.normal(size=(o, c, kh, kw)),
                      rng.normal(size=o), stride, padding))
    return cases


def check_conv2d(fn, trials=16, seed=0, atol=1e-8, rtol=1e-8):
    """fn(x (N, C, H, W), weight (O, C, kh, kw), bias (O,), stride, padding) -> y (N, O, Ho, Wo):

        y[n, o, i, j] = bias[o] + sum_{c, u, v} weight[o, c, u, v] * xp[n, c, i s + u, j s + v]

    with xp = x zero-padded by `padding` on every side and Ho = (H + 2 padding - kh) // s + 1
    (nn.conv2d_reference).  stride and padding are ints; inputs are float64.  nn.im2col may be
    used."""
    learner = _Learner("conv2d", fn, _library(
        ("nn.conv2d_reference", nn.conv2d_reference), ("nn.Conv2d.forward", nn.Conv2d.forward),
        ("fast.Conv2d.forward", _fast.Conv2d.forward),
        ("fast.ConvPoolReLU.forward", _fast.ConvPoolReLU.forward)))
    rng = np.random.default_rng(seed)
    for case, x, w, b, stride, padding in _conv_cases(rng, trials):
        want = nn.conv2d_reference(x, w, b, stride, padding)
        got = learner(case, x.copy(), w.copy(), b.copy(), stride, padding)
        if learner.called:
            return learner.not_done()
        _compare("conv2d", case, dict(x=x, weight=w, bias=b, stride=stride, padding=padding),
                 got, want, atol, rtol)
    return learner.passed()


def conv2d_gradients(x, weight, bias, dy, stride, padding):
    """The reference for check_conv2d_backward: nn.Conv2d's backward in float64 ->
    (dx, dweight, dbias)."""
    o, c, kh, kw = weight.shape
    layer = nn.Conv2d(c, o, (kh, kw), stride, padding).astype(np.float64)
    layer.params["weight"][...] = weight
    layer.params["bias"][...] = bias
    layer.forward(x)
    dx = layer.backward(dy)
    return dx, layer.grads["weight"], layer.grads["bias"]


def check_conv2d_backward(fn, trials=16, seed=0, atol=1e-8, rtol=1e-8):
    """fn(x, weight, bias, dy, stride, padding) -> (dx (N, C, H, W), dweight (O, C, kh, kw),
    dbias (O,)): the gradients of L = sum(dy * conv2d(x, weight, bias)), summed over the images
    of the batch.  Inputs are float64; nn.im2col may be used, nn.col2im may not (it is the point)."""
    learner = _Learner("conv2d_backward", fn, _library(
        ("nn.Conv2d.backward", nn.Conv2d.backward), ("nn.col2im", nn.col2im),
        ("fast.Conv2d.backward", _fast.Conv2d.backward),
        ("fast.ConvPoolReLU.backward", _fast.ConvPoolReLU.backward)))
    rng = np.random.default_rng(seed)
    for case, x, w, b, stride, padding in _conv_cases(rng, trials):
        y = nn.conv2d_reference(x, w, b, stride, padding)
        dy = rng.normal(size=y.shape)
        want = conv2d_gradients(x, w, b, dy, stride, padding)
        got = learner(case, x.copy(), w.copy(), b.copy(), dy.copy(), stride, padding)
        if learner.called:
            return learner.not_done()
        if not isinstance(got, (tuple, list)) or len(got) != 3:
            raise AssertionError(f"conv2d_backward, {case}: expected (dx, dweight, dbias), got "
                                 f"{type(got).__name__}")
        inputs = dict(x=x, weight=w, bias=b, dy=dy, stride=stride, padding=padding)
        for what, g, wv in zip(("dx", "dweight", "dbias"), got, want):
            _compare("conv2d_backward", case, inputs, g, wv, atol, rtol, what=what + " ")
    return learner.passed()
