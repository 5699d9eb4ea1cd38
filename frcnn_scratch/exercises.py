"""Write it yourself: checks for a learner's own version of each stage (the notebooks use them).

Each check_* takes the learner's function, runs it on hand-made cases, random inputs and the
degenerate ones that break careless code (zero-area boxes, identical boxes, ties, empty inputs,
RoIs outside the map), compares with this library's reference, and either returns a line saying
how many cases passed or raises an AssertionError that names the first case that differs, with
the inputs, what came back and what was expected.

    from frcnn_scratch.exercises import check_box_iou
    def my_iou(a, b): ...
    check_box_iou(my_iou)          # 'box_iou: 57 cases passed' or an AssertionError

The learner's function may compute in float64: values are compared to `atol` (1e-5 by default);
indices and labels must be equal.
"""
import numpy as np

from . import ops
from .anchors import generate_anchors
from .box_coding import decode, encode
from .labeling import label_anchors

__all__ = ["check_box_iou", "check_anchors", "check_label_anchors", "check_encode",
           "check_decode", "check_nms", "check_roi_pool"]


def _boxes(rng, n, size=50.0, degenerate=True, grid=True):
    """n random xyxy boxes; with degenerate, some zero-width, zero-area, repeated or touching;
    with grid, on half pixels (so that equal IoUs, hence ties, happen)."""
    xy = rng.uniform(0, size, (n, 2))
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


def _fail(name, case, inputs, got, want):
    shown = "\n".join(f"  {k} = {np.array2string(np.asarray(v), precision=4, threshold=20)}"
                      for k, v in inputs.items())
    raise AssertionError(f"{name}, {case}: your function returned\n  "
                         f"{np.array2string(np.asarray(got), precision=5, threshold=40)}\n"
                         f"expected\n  {np.array2string(np.asarray(want), precision=5, threshold=40)}\n"
                         f"for\n{shown}")


def _compare(name, case, inputs, got, want, atol=None):
    got = np.asarray(got)
    want = np.asarray(want)
    if got.shape != want.shape:
        raise AssertionError(f"{name}, {case}: your function returned shape {got.shape}, "
                             f"expected {want.shape}")
    same = np.array_equal(got, want) if atol is None else \
        np.allclose(got.astype(np.float64), want, rtol=0, atol=atol)
    if not same:
        _fail(name, case, inputs, got, want)


def check_box_iou(fn, trials=40, seed=0, atol=1e-5):
    """fn(boxes1 (N, 4), boxes2 (M, 4)) -> (N, M) IoU, width = x2 - x1, zero union -> 0."""
    rng = np.random.default_rng(seed)
    cases = [("two 2x2 boxes overlapping by 1x1", [[0, 0, 2, 2]], [[1, 1, 3, 3]]),
             ("a box with itself", [[1, 2, 5, 9]], [[1, 2, 5, 9]]),
             ("touching boxes", [[0, 0, 2, 2]], [[2, 0, 4, 2]]),
             ("two points (zero union)", [[1, 1, 1, 1]], [[1, 1, 1, 1]]),
             ("no boxes on one side", np.zeros((0, 4)), [[0, 0, 1, 1]])]
    cases += [(f"random boxes #{t}", _boxes(rng, int(rng.integers(1, 9))),
               _boxes(rng, int(rng.integers(1, 9)))) for t in range(trials)]
    for case, a, b in cases:
        a, b = np.asarray(a, np.float32).reshape(-1, 4), np.asarray(b, np.float32).reshape(-1, 4)
        _compare("box_iou", case, dict(boxes1=a, boxes2=b), fn(a, b), ops.box_iou(a, b), atol)
    return f"box_iou: {len(cases)} cases passed"


def check_anchors(fn, atol=1e-4):
    """fn(base_size, ratios, scales) -> (len(ratios) * len(scales), 4) anchors centred on the
    cell (base_size / 2, base_size / 2), ratio = h / w, ratio-major order (all scales of the
    first ratio first), continuous boxes: generate_anchors(..., legacy=False)."""
    cases = [(16, (0.5, 1, 2), (8, 16, 32)), (8, (1,), (2, 4)), (10, (0.25, 3), (1, 2.5))]
    for base, ratios, scales in cases:
        _compare("anchors", f"base {base}, ratios {ratios}, scales {scales}",
                 dict(base_size=base, ratios=ratios, scales=scales), fn(base, ratios, scales),
                 generate_anchors(base, ratios, scales), atol)
    return f"anchors: {len(cases)} cases passed"


def check_label_anchors(fn, trials=30, seed=0):
    """fn(anchors (A, 4), gt_boxes (G, 4), pos_iou, neg_iou) -> (A,) labels: 1 for (i) the
    anchor(s) of highest IoU with each gt (ties: all of them; not when that IoU is 0) and (ii)
    IoU > pos_iou with any gt; 0 for max IoU < neg_iou; -1 otherwise (section 3.1.2)."""
    rng = np.random.default_rng(seed)
    cases = [("no ground truth", _boxes(rng, 6), np.zeros((0, 4)))]
    for t in range(trials):
        anchors = _boxes(rng, int(rng.integers(1, 30)))
        gts = _boxes(rng, int(rng.integers(1, 4)), degenerate=False)
        if t % 5 == 0:
            gts = np.concatenate([gts, anchors[:1]])  # a gt equal to an anchor: IoU 1
        cases.append((f"random #{t}", anchors, gts))
    for case, anchors, gts in cases:
        anchors, gts = np.asarray(anchors, np.float32), np.asarray(gts, np.float32).reshape(-1, 4)
        want, _ = label_anchors(anchors, gts, pos_iou=0.7, neg_iou=0.3)
        _compare("label_anchors", case, dict(anchors=anchors, gt_boxes=gts),
                 np.asarray(fn(anchors, gts, 0.7, 0.3)).astype(np.int64), want)
    return f"label_anchors: {len(cases)} cases passed"


def _positive_boxes(rng, n):
    xy = rng.uniform(-20, 80, (n, 2))
    return np.concatenate([xy, xy + rng.uniform(1, 60, (n, 2))], axis=1).astype(np.float32)


def check_encode(fn, trials=20, seed=0, atol=1e-4):
    """fn(boxes (N, 4), anchors (N, 4)) -> (N, 4) t = (tx, ty, tw, th) of eq. (2)."""
    rng = np.random.default_rng(seed)
    cases = [("a box equal to its anchor", [[0, 0, 10, 20]], [[0, 0, 10, 20]]),
             ("shifted and twice as wide", [[5, 0, 25, 10]], [[0, 0, 10, 10]])]
    cases += [(f"random #{t}", _positive_boxes(rng, 5), _positive_boxes(rng, 5)) for t in range(trials)]
    for case, b, a in cases:
        b, a = np.asarray(b, np.float32), np.asarray(a, np.float32)
        _compare("encode", case, dict(boxes=b, anchors=a), fn(b, a), encode(b, a), atol)
    return f"encode: {len(cases)} cases passed"


def check_decode(fn, trials=20, seed=0, atol=1e-3):
    """fn(t (N, 4), anchors (N, 4)) -> (N, 4) boxes, the inverse of eq. (2), with tw and th
    clamped at log(1000 / 16) before the exponential (as decode)."""
    rng = np.random.default_rng(seed)
    cases = [("zero deltas give the anchor", np.zeros((1, 4)), [[0, 0, 10, 20]]),
             ("a huge tw is clamped", [[0, 0, 50.0, 0]], [[0, 0, 10, 10]])]
    cases += [(f"random #{t}", rng.normal(0, 0.5, (5, 4)), _positive_boxes(rng, 5)) for t in range(trials)]
    for case, t, a in cases:
        t, a = np.asarray(t, np.float32), np.asarray(a, np.float32)
        _compare("decode", case, dict(t=t, anchors=a), fn(t, a), decode(t, a), atol)
    return f"decode: {len(cases)} cases passed"


def check_nms(fn, trials=40, seed=0):
    """fn(boxes (N, 4), scores (N,), iou_threshold) -> kept indices, best score first (ties:
    lower index first), suppressing IoU > threshold (strictly)."""
    rng = np.random.default_rng(seed)
    chain = np.array([[0, 0, 10, 10], [4, 0, 14, 10], [8, 0, 18, 10]], np.float32)
    cases = [("a chain: A suppresses B, so B cannot suppress C", chain, [0.9, 0.8, 0.7], 0.4),
             ("IoU equal to the threshold survives", [[0, 0, 3, 1], [1, 0, 4, 1]], [0.9, 0.5], 0.5),
             ("equal scores keep the lower index", [[0, 0, 4, 4]] * 3, [1, 1, 1], 0.3),
             ("no boxes", np.zeros((0, 4)), np.zeros(0), 0.5)]
    for t in range(trials):
        n = int(rng.integers(1, 25))
        # off the half-pixel grid: no IoU lands exactly on the threshold, where float32 (this
        # library, torchvision) and float64 (a learner's NumPy) may round to different sides
        cases.append((f"random #{t}", _boxes(rng, n, size=30, grid=False),
                      np.round(rng.random(n), 1), float(rng.choice([0.3, 0.5, 0.7]))))
    for case, b, s, thr in cases:
        b, s = np.asarray(b, np.float32).reshape(-1, 4), np.asarray(s, np.float32)
        got = np.asarray(fn(b, s, thr)).astype(np.int64).reshape(-1)
        _compare("nms", case, dict(boxes=b, scores=s, iou_threshold=thr), got, ops.nms(b, s, thr))
    return f"nms: {len(cases)} cases passed"


def check_roi_pool(fn, trials=20, seed=0, atol=1e-6):
    """fn(features (C, H, W), rois (K, 4) xyxy in image pixels, output_size (ph, pw),
    spatial_scale) -> (K, C, ph, pw) RoI max pooling with torchvision's rounding (corners rounded
    half away from zero, bins floor(i * size / n) .. ceil((i + 1) * size / n), empty bins 0)."""
    rng = np.random.default_rng(seed)
    cases = [("the whole 4 x 4 map into 2 x 2", np.arange(16, dtype=np.float32).reshape(1, 4, 4),
              [[0, 0, 3, 3]], (2, 2), 1.0),
             ("a corner at 2.5 rounds to 3", np.arange(10, dtype=np.float32).reshape(1, 1, 10),
              [[0, 0, 5, 0]], (1, 1), 0.5),
             ("a RoI outside the map: empty bins give 0", np.ones((2, 5, 5), np.float32),
              [[40, 40, 60, 60]], (2, 2), 1.0)]
    for t in range(trials):
        c, h, w = int(rng.integers(1, 4)), int(rng.integers(3, 9)), int(rng.integers(3, 9))
        scale = float(rng.choice([1.0, 0.5, 0.25]))
        rois = _boxes(rng, int(rng.integers(1, 5)), size=max(h, w) / scale, degenerate=False)
        cases.append((f"random #{t}", rng.integers(-3, 4, (c, h, w)).astype(np.float32), rois,
                      (int(rng.integers(1, 4)), int(rng.integers(1, 4))), scale))
    for case, f, rois, size, scale in cases:
        f, rois = np.asarray(f, np.float32), np.asarray(rois, np.float32).reshape(-1, 4)
        rois5 = np.concatenate([np.zeros((len(rois), 1), np.float32), rois], axis=1)
        want, _ = ops.roi_pool(f[None], rois5, size, scale, backend="numpy")
        _compare("roi_pool", case, dict(features=f, rois=rois, output_size=size,
                                        spatial_scale=scale), fn(f, rois, size, scale), want, atol)
    return f"roi_pool: {len(cases)} cases passed"
