"""Detection metrics: PASCAL VOC AP and mAP (the metric the Faster R-CNN paper reports), the
COCO benchmark's AP@[.5:.95], AP50, AP75, AP by size and AR (coco_evaluate, further down), and the
runner that detects on a dataset and scores it (evaluate, at the end).

The rules are those of the VOC development kit (VOCevaldet.m / VOCap.m) and of Everingham et al.,
"The PASCAL Visual Object Classes (VOC) Challenge", IJCV 2010, Section 4.2:

1. Per class, pool the detections of all images and sort them by score, highest first (ties keep
   image order, then detection order: a stable sort).
2. Walk down that list. A detection is compared with the ground truths (gts) of its class in its
   image; take the gt of maximum IoU. If that IoU >= iou_threshold:
     - the gt is "difficult": the detection is ignored (neither true nor false positive);
     - the gt is not yet matched: true positive (TP), and the gt is now matched;
     - the gt is already matched: false positive (FP, a duplicate detection).
   Otherwise (no gt, or IoU too small) it is a false positive.
   As in the devkit, the max-IoU gt is chosen among ALL gts of the class, matched or not, so a
   duplicate on an already matched gt is a FP even when a second gt also overlaps it.
3. recall = cumulative TP / npos, precision = cumulative TP / cumulative (TP + FP), where npos
   counts the non-difficult gts of the class.
4. AP = area under the precision envelope (voc_ap). mAP = mean AP over the classes with npos > 0:
   a class with no (non-difficult) gt has no defined recall and is left out of the mean.

One difference from the devkit: the devkit's IoU treats integer boxes as pixel index ranges and adds
1 to widths and heights; here boxes are continuous (width = x2 - x1), as everywhere in this
project, so IoU is frcnn_scratch.boxes.box_iou.
"""
import numpy as np
from tqdm.auto import tqdm

from ._checks import as_boxes, as_float_array, as_labels, unit_interval
from .boxes import box_iou, xyxy_to_xywh


def _curve(x, name):
    """A 1-D float64 array of finite values in [0, 1] (kept in float64 so k / n stays exact)."""
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a 1-D array of numbers") from None
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected shape (K,), got {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0) or np.any(arr > 1):
        raise ValueError(f"{name}: expected finite values in [0, 1]")
    return arr


def voc_ap(recall, precision, use_07_metric=False):
    """Average precision from a precision-recall curve, with the VOC devkit's two definitions.

    use_07_metric=False (VOC 2010 onward, "all points"): add sentinels (recall 0 and 1, precision 0),
    replace each precision by the maximum precision at any higher recall (the envelope), and sum
    the envelope's precision times each step in recall.
    use_07_metric=True (VOC 2007, "11 points"): mean over t = 0, 0.1, ..., 1 of the maximum
    precision at recall >= t (0 when no point reaches t). The thresholds are computed as k / 10,
    so a recall of exactly 3/10 counts at t = 0.3.

    Args:
        recall: (K,) recall after each ranked detection, non-decreasing, in [0, 1].
        precision: (K,) precision after each ranked detection, in [0, 1].
        use_07_metric: pick the 11-point definition.
    Returns:
        AP as a float in [0, 1]; 0.0 for empty input.

    >>> voc_ap([0.5, 0.5, 1.0], [1.0, 0.5, 2 / 3])
    0.8333333333333333
    """
    rec = _curve(recall, "recall")                      # (K,) float64: exact fractions like 3/10
    prec = _curve(precision, "precision")               # (K,)
    if rec.shape != prec.shape:
        raise ValueError(f"recall, precision: expected the same shape, got {rec.shape} and {prec.shape}")
    if use_07_metric:
        ap = 0.0
        for k in range(11):
            reached = prec[rec >= k / 10]
            ap += (reached.max() if reached.size else 0.0) / 11
        return float(ap)
    mrec = np.concatenate([[0.0], rec, [1.0]])          # (K + 2,) sentinels at both ends
    mpre = np.concatenate([[0.0], prec, [0.0]])         # (K + 2,)
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]      # envelope: max precision to the right
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])       # where recall changes
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def _check_detection(det, i):
    """One image's detections -> (boxes (D, 4) float32, scores (D,) float32, labels (D,) int64)."""
    if not isinstance(det, dict) or not {"boxes", "scores", "labels"} <= set(det):
        raise ValueError(f"detections[{i}]: expected a dict with boxes, scores and labels")
    boxes = as_boxes(det["boxes"], f"detections[{i}]['boxes']")
    scores = as_float_array(det["scores"], f"detections[{i}]['scores']", ndim=1)
    if scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"detections[{i}]['scores']: expected shape ({boxes.shape[0]},) to match the "
                         f"boxes, got {scores.shape}")
    # labels >= 1: 0 is background, never a detection or a ground-truth class
    labels = as_labels(det["labels"], f"detections[{i}]['labels']", 1, None, size=len(boxes))
    return boxes, scores, labels


def _check_ground_truth(gt, i):
    """One image's gts -> (boxes (G, 4) float32, labels (G,) int64, difficult (G,) bool)."""
    if not isinstance(gt, dict) or not {"boxes", "labels"} <= set(gt):
        raise ValueError(f"ground_truths[{i}]: expected a dict with boxes and labels (difficult optional)")
    boxes = as_boxes(gt["boxes"], f"ground_truths[{i}]['boxes']")
    labels = as_labels(gt["labels"], f"ground_truths[{i}]['labels']", 1, None, size=len(boxes))
    difficult = gt.get("difficult")
    if difficult is None:
        difficult = np.zeros(boxes.shape[0], dtype=bool)
    difficult = np.asarray(difficult, dtype=bool)
    if difficult.shape != (boxes.shape[0],):
        raise ValueError(f"ground_truths[{i}]['difficult']: expected shape ({boxes.shape[0]},), "
                         f"got {difficult.shape}")
    return boxes, labels, difficult


def _class_tp_fp(label, dets, gts, iou_threshold):
    """Rank one class's detections and mark each TP, FP or ignored (rules 1-2 of the module doc).

    Returns:
        (tp (D,) float64, fp (D,) float64 in ranked order, npos int)
    """
    scores, owners, ious = [], [], []   # per detection: score, image index, IoU row vs the image's gts
    gt_difficult, npos = [], 0
    for i, ((d_boxes, d_scores, d_labels), (g_boxes, g_labels, g_diff)) in enumerate(zip(dets, gts)):
        d_sel, g_sel = d_labels == label, g_labels == label
        iou = box_iou(d_boxes[d_sel], g_boxes[g_sel])                  # (D_i, G_i)
        scores.append(d_scores[d_sel])
        owners.append(np.full(int(d_sel.sum()), i, dtype=np.int64))
        ious.extend(iou)
        gt_difficult.append(g_diff[g_sel])
        npos += int(np.sum(~g_diff[g_sel]))
    scores = np.concatenate(scores) if scores else np.zeros(0, np.float32)     # (D,)
    owners = np.concatenate(owners) if owners else np.zeros(0, np.int64)       # (D,)
    order = np.argsort(-scores, kind="stable")                                 # rule 1
    matched = [np.zeros(len(d), dtype=bool) for d in gt_difficult]             # per image, per gt
    tp = np.zeros(len(order))
    fp = np.zeros(len(order))
    for rank, d in enumerate(order):                                           # rule 2
        img, iou = owners[d], ious[d]                                          # iou: (G_img,)
        if iou.size == 0 or iou.max() < iou_threshold:
            fp[rank] = 1
            continue
        j = int(np.argmax(iou))
        if gt_difficult[img][j]:
            continue                                                           # ignored
        if matched[img][j]:
            fp[rank] = 1                                                       # duplicate
        else:
            tp[rank] = 1
            matched[img][j] = True
    return tp, fp, npos


def evaluate_detections(detections, ground_truths, iou_threshold=0.5, use_07_metric=False,
                        num_classes=None):
    """VOC mAP of a detector's output against ground truth (rules in the module docstring).

    Args:
        detections: list, one dict per image: boxes (D, 4) xyxy, scores (D,), labels (D,) in 1..C.
        ground_truths: list (same length and order), one dict per image: boxes (G, 4), labels (G,),
            optional difficult (G,) bool. Samples from frcnn_scratch.data work as they are.
        iou_threshold: minimum IoU for a match (0.5 for VOC mAP@0.5).
        use_07_metric: 11-point AP (VOC 2007) instead of all-point AP.
        num_classes: evaluate labels 1..num_classes; None = every label seen in gts or detections.
    Returns:
        dict(mAP=float, ap={label: float}, pr={label: (recall (D,), precision (D,))},
             npos={label: int}). ap, pr and npos list only classes with npos > 0; mAP is their mean,
        NaN when no class has a gt (the devkit's mean of nothing).
    """
    if len(detections) != len(ground_truths):
        raise ValueError(f"detections, ground_truths: expected one entry per image in each, got "
                         f"{len(detections)} and {len(ground_truths)}")
    iou_threshold = unit_interval(iou_threshold, "iou_threshold")
    dets = [_check_detection(d, i) for i, d in enumerate(detections)]
    gts = [_check_ground_truth(g, i) for i, g in enumerate(ground_truths)]
    seen = set()
    for _, _, labels in dets:
        seen.update(labels.tolist())
    for _, labels, _ in gts:
        seen.update(labels.tolist())
    if num_classes is None:
        classes = sorted(seen)
    else:
        num_classes = int(num_classes)
        if seen and max(seen) > num_classes:
            raise ValueError(f"num_classes: got {num_classes}, but label {max(seen)} occurs")
        classes = range(1, num_classes + 1)

    ap, pr, npos_of = {}, {}, {}
    for label in classes:
        tp, fp, npos = _class_tp_fp(label, dets, gts, iou_threshold)
        if npos == 0:
            continue                                                  # undefined recall: left out
        tp, fp = np.cumsum(tp), np.cumsum(fp)                         # rule 3
        recall = tp / npos
        precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        ap[label] = voc_ap(recall, precision, use_07_metric)          # rule 4
        pr[label] = (recall.astype(np.float32), precision.astype(np.float32))
        npos_of[label] = npos
    m_ap = float(np.mean(list(ap.values()))) if ap else float("nan")
    return dict(mAP=m_ap, ap=ap, pr=pr, npos=npos_of)


# ---- COCO metrics: AP@[.5:.95], AP50, AP75, AP by object size, AR@1/10/100 ---------------------

# The detection metrics of the COCO benchmark (Lin et al., "Microsoft COCO: Common Objects in
# Context", 2014, and cocodataset.org/#detection-eval), computed as pycocotools' COCOeval computes
# them (tests/test_evaluate.py checks equality to 1e-6 on random cases).  Where VOC asks one question
# (AP at IoU 0.5, section above), COCO averages over ten IoU thresholds 0.50, 0.55, ..., 0.95, so a
# detector is rewarded for tight boxes, and it also reports AP by object size and average recall.
#
# Per class and per image (coco_match_image), with the detections sorted by score and cut at 100:
#   * IoU as pycocotools computes it on [x, y, w, h] boxes in float64; against a crowd box
#     ("iscrowd", a region of many objects) IoU is intersection / area of the detection, not union.
#   * ground truths that are crowds, or whose area is outside the size range being evaluated, are
#     "ignored"; they are listed after the others.
#   * for each IoU threshold t, each detection in score order takes the unmatched ground truth of
#     highest IoU >= t, preferring non-ignored ones (once a non-ignored match is found, ignored ones
#     are not considered); a crowd can be matched any number of times.  A detection matched to an
#     ignored ground truth is ignored, and so is an unmatched detection outside the size range.
# Per class (coco_precision_recall), over all images, keeping the first 1, 10 or 100 detections of
# each image: sort by score, cumulate TP and FP (ignored detections are neither), recall = TP /
# (number of non-ignored ground truths), precision made non-increasing from the right, then read at
# the 101 recall points 0, 0.01, ..., 1 (0 past the last recall reached).  AP = mean of those 101
# precisions over classes and IoU thresholds; AR = mean of the final recall.  A class with no
# non-ignored ground truth in a size range is left out of that range's means (-1 when none is left).

COCO_IOU_THRESHOLDS = np.linspace(.5, 0.95, int(np.round((0.95 - .5) / .05)) + 1, endpoint=True)
COCO_RECALL_POINTS = np.linspace(.0, 1.00, int(np.round((1.00 - .0) / .01)) + 1, endpoint=True)
COCO_MAX_DETECTIONS = (1, 10, 100)
COCO_AREA_RANGES = {"all": (0.0, 1e5 ** 2), "small": (0.0, 32.0 ** 2),
                    "medium": (32.0 ** 2, 96.0 ** 2), "large": (96.0 ** 2, 1e5 ** 2)}
COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm",
                "ARl")


def coco_iou(det_xywh, gt_xywh, gt_crowd):
    """(D, G) float64 IoU of [x, y, w, h] boxes, as pycocotools' bbIou: against a crowd box the
    denominator is the detection's area alone (a detection inside a crowd region overlaps it fully)."""
    d = np.asarray(det_xywh, np.float64).reshape(-1, 4)
    g = np.asarray(gt_xywh, np.float64).reshape(-1, 4)
    iw = np.minimum(d[:, None, 0] + d[:, None, 2], g[None, :, 0] + g[None, :, 2]) \
        - np.maximum(d[:, None, 0], g[None, :, 0])                              # (D, G)
    ih = np.minimum(d[:, None, 1] + d[:, None, 3], g[None, :, 1] + g[None, :, 3]) \
        - np.maximum(d[:, None, 1], g[None, :, 1])
    inter = np.where((iw > 0) & (ih > 0), iw * ih, 0.0)
    d_area = (d[:, 2] * d[:, 3])[:, None]                                       # (D, 1)
    union = np.where(np.asarray(gt_crowd, bool)[None, :], d_area, d_area + (g[:, 2] * g[:, 3])[None, :] - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(inter > 0, inter / union, 0.0)


def coco_match_image(det_xywh, det_scores, gt_xywh, gt_crowd, gt_area, area_range, max_det=100):
    """Match one image's detections of one class to its ground truths at every IoU threshold.

    Args:
        det_xywh (D, 4), det_scores (D,): the detections, in the order given (ties keep it).
        gt_xywh (G, 4), gt_crowd (G,) bool, gt_area (G,): the ground truths.
        area_range: (lo, hi); ground truths with area outside are ignored, and so are unmatched
            detections with area (w * h) outside.
        max_det: detections kept, best score first.
    Returns:
        None when there is neither a detection nor a ground truth, else dict(scores (D',),
        matched (T, D') bool, det_ignored (T, D') bool, gt_ignored (G,) bool), D' = min(D, max_det),
        detections in score order.
    """
    gt_xywh = np.asarray(gt_xywh, np.float64).reshape(-1, 4)
    gt_crowd = np.asarray(gt_crowd, bool)
    gt_area = np.asarray(gt_area, np.float64)
    if len(det_scores) == 0 and len(gt_xywh) == 0:
        return None
    lo, hi = area_range
    gt_ignored = gt_crowd | (gt_area < lo) | (gt_area > hi)
    gt_order = np.argsort(gt_ignored, kind="mergesort")          # non-ignored first
    gt_xywh, gt_crowd, gt_ignored = gt_xywh[gt_order], gt_crowd[gt_order], gt_ignored[gt_order]
    det_order = np.argsort(-np.asarray(det_scores, np.float64), kind="mergesort")[:max_det]
    dets = np.asarray(det_xywh, np.float64).reshape(-1, 4)[det_order]
    scores = np.asarray(det_scores, np.float64)[det_order]
    ious = coco_iou(dets, gt_xywh, gt_crowd)                     # (D', G)

    T, D, G = len(COCO_IOU_THRESHOLDS), len(dets), len(gt_xywh)
    gt_taken = np.zeros((T, G), bool)
    matched = np.zeros((T, D), bool)
    det_ignored = np.zeros((T, D), bool)
    for t, threshold in enumerate(COCO_IOU_THRESHOLDS):
        for d in range(D if G else 0):
            best, m = min(threshold, 1 - 1e-10), -1
            for g in range(G):
                if gt_taken[t, g] and not gt_crowd[g]:
                    continue                                     # taken (a crowd never is)
                if m > -1 and not gt_ignored[m] and gt_ignored[g]:
                    break                                        # a real match beats any ignored one
                if ious[d, g] < best:
                    continue
                best, m = ious[d, g], g
            if m == -1:
                continue
            matched[t, d], det_ignored[t, d] = True, gt_ignored[m]
            gt_taken[t, m] = True
    det_area = dets[:, 2] * dets[:, 3]
    outside = (det_area < lo) | (det_area > hi)
    det_ignored |= ~matched & outside[None, :]
    return dict(scores=scores, matched=matched, det_ignored=det_ignored, gt_ignored=gt_ignored)


def coco_precision_recall(image_results, max_det):
    """One class over all images: (precision (T, 101), recall (T,)), or None without ground truth.

    image_results: coco_match_image outputs of the images (None entries skipped), in image order.
    """
    results = [r for r in image_results if r is not None]
    if not results:
        return None
    scores = np.concatenate([r["scores"][:max_det] for r in results])
    order = np.argsort(-scores, kind="mergesort")
    matched = np.concatenate([r["matched"][:, :max_det] for r in results], axis=1)[:, order]
    ignored = np.concatenate([r["det_ignored"][:, :max_det] for r in results], axis=1)[:, order]
    n_gt = int(np.count_nonzero(~np.concatenate([r["gt_ignored"] for r in results])))
    if n_gt == 0:
        return None
    tp = np.cumsum(matched & ~ignored, axis=1).astype(np.float64)       # (T, D)
    fp = np.cumsum(~matched & ~ignored, axis=1).astype(np.float64)
    T, R = len(COCO_IOU_THRESHOLDS), len(COCO_RECALL_POINTS)
    precision, recall = np.zeros((T, R)), np.zeros(T)
    for t in range(T):
        rc = tp[t] / n_gt
        pr = tp[t] / (fp[t] + tp[t] + np.spacing(1))
        recall[t] = rc[-1] if len(rc) else 0.0
        pr = np.maximum.accumulate(pr[::-1])[::-1]                      # the envelope
        at = np.searchsorted(rc, COCO_RECALL_POINTS, side="left")       # first point reaching r
        reached = at < len(pr)
        precision[t, reached] = pr[at[reached]]                         # 0 beyond the last recall
    return precision, recall


def _mean_defined(values):
    values = [v for v in values if v is not None]
    stacked = np.concatenate([np.ravel(v) for v in values]) if values else np.zeros(0)
    stacked = stacked[stacked > -1]
    return float(np.mean(stacked)) if stacked.size else -1.0


def coco_evaluate(detections, ground_truths, num_classes=None, image_ids=None):
    """COCO detection metrics of a detector's output (see the comment block above).

    Args:
        detections: list, one dict per image: boxes (D, 4) xyxy, scores (D,), labels (D,) in 1..C;
            boxes_xywh (D, 4) float64, when given, is used instead of boxes (a COCO results file
            holds those: the same numbers as in memory, so file and memory score alike).
        ground_truths: list (same order), one dict per image: boxes (G, 4), labels (G,), and
            optional crowd (G,) bool (default: difficult, else False) and area (G,) (default: the
            box area).
        num_classes: evaluate labels 1..num_classes; None = every label seen.
        image_ids: one id per image; images are taken in increasing id order, which decides ties
            between equal scores of different images (default 1..N, the list order).
    Returns:
        dict with the twelve COCO numbers (COCO_METRICS: AP, AP50, AP75, APs, APm, APl, AR1, AR10,
        AR100, ARs, ARm, ARl; -1 where undefined) and ap_per_class {label: AP@[.5:.95]},
        ap50_per_class {label: AP50}.
    """
    if len(detections) != len(ground_truths):
        raise ValueError(f"detections, ground_truths: expected one entry per image in each, got "
                         f"{len(detections)} and {len(ground_truths)}")
    ids = list(range(1, len(detections) + 1)) if image_ids is None else list(image_ids)
    if len(ids) != len(detections):
        raise ValueError(f"image_ids: expected {len(detections)} ids, got {len(ids)}")
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    dets = [_coco_detection(detections[i], i) for i in order]
    gts = [_coco_ground_truth(ground_truths[i], i) for i in order]
    seen = set()
    for d in dets:
        seen.update(d[2].tolist())
    for g in gts:
        seen.update(g[1].tolist())
    classes = sorted(seen) if num_classes is None else range(1, int(num_classes) + 1)

    T = len(COCO_IOU_THRESHOLDS)
    ap = {name: [] for name in COCO_AREA_RANGES}          # per class: precision (T, 101) or None
    ar = {(name, m): [] for name in COCO_AREA_RANGES for m in COCO_MAX_DETECTIONS}
    ap_per_class, ap50_per_class = {}, {}
    for label in classes:
        for name, area_range in COCO_AREA_RANGES.items():
            per_image = []
            for (d_xywh, d_scores, d_labels), (g_xywh, g_labels, g_crowd, g_area) in zip(dets, gts):
                ds, gs = d_labels == label, g_labels == label
                per_image.append(coco_match_image(d_xywh[ds], d_scores[ds], g_xywh[gs], g_crowd[gs],
                                                  g_area[gs], area_range, COCO_MAX_DETECTIONS[-1]))
            for m in COCO_MAX_DETECTIONS:
                pr = coco_precision_recall(per_image, m)
                ar[name, m].append(None if pr is None else pr[1])
                if m == COCO_MAX_DETECTIONS[-1]:
                    ap[name].append(None if pr is None else pr[0])
                    if name == "all" and pr is not None:
                        ap_per_class[label] = _mean_defined([pr[0]])
                        ap50_per_class[label] = _mean_defined([pr[0][0]])
    at = {float(t): i for i, t in enumerate(COCO_IOU_THRESHOLDS)}
    out = dict(
        AP=_mean_defined(ap["all"]),
        AP50=_mean_defined([p[at[.5]] for p in ap["all"] if p is not None]) if .5 in at else -1.0,
        AP75=_mean_defined([p[at[.75]] for p in ap["all"] if p is not None]) if .75 in at else -1.0,
        APs=_mean_defined(ap["small"]), APm=_mean_defined(ap["medium"]), APl=_mean_defined(ap["large"]),
        AR1=_mean_defined(ar["all", 1]), AR10=_mean_defined(ar["all", 10]),
        AR100=_mean_defined(ar["all", 100]), ARs=_mean_defined(ar["small", 100]),
        ARm=_mean_defined(ar["medium", 100]), ARl=_mean_defined(ar["large", 100]))
    assert set(out) == set(COCO_METRICS) and T == 10
    return dict(out, ap_per_class=ap_per_class, ap50_per_class=ap50_per_class)


def _coco_detection(det, i):
    """One image's detections -> (xywh (D, 4) float64, scores (D,) float64, labels (D,) int64)."""
    if isinstance(det, dict) and "boxes_xywh" in det:           # as a results file holds them
        xywh = np.asarray(det["boxes_xywh"], np.float64).reshape(-1, 4)
        if not np.all(np.isfinite(xywh)) or np.any(xywh[:, 2:] < 0):
            raise ValueError(f"detections[{i}]['boxes_xywh']: expected finite [x, y, w, h] with "
                             f"w, h >= 0")
        scores = np.asarray(det.get("scores", []), np.float64)     # as written: no rounding
        if scores.shape != (len(xywh),) or not np.all(np.isfinite(scores)):
            raise ValueError(f"detections[{i}]['scores']: expected ({len(xywh)},) finite numbers, "
                             f"got shape {scores.shape}")
        labels = as_labels(det.get("labels", []), f"detections[{i}]['labels']", 1, None,
                           size=len(xywh))
        return xywh, scores, labels
    boxes, scores, labels = _check_detection(det, i)
    return xyxy_to_xywh(boxes), scores.astype(np.float64), labels


def _coco_ground_truth(gt, i):
    """One image's gts -> (xywh (G, 4), labels (G,), crowd (G,) bool, area (G,) float64)."""
    boxes, labels, difficult = _check_ground_truth(gt, i)
    crowd = gt.get("crowd")
    crowd = difficult if crowd is None else np.asarray(crowd, bool)
    if crowd.shape != (len(boxes),):
        raise ValueError(f"ground_truths[{i}]['crowd']: expected shape ({len(boxes)},), got {crowd.shape}")
    xywh = xyxy_to_xywh(boxes)
    area = gt.get("area")
    area = xywh[:, 2] * xywh[:, 3] if area is None else np.asarray(area, np.float64)
    if area.shape != (len(boxes),):
        raise ValueError(f"ground_truths[{i}]['area']: expected shape ({len(boxes)},), got {area.shape}")
    return xywh, labels, crowd, area


# ---- the runner: detect on every image of a dataset, then score ------------------------------------

def ground_truths(samples):
    """The objects of every image, in the image's own pixels: a Dataset's ground_truth(i), or a
    list of samples' boxes, labels and difficult flags."""
    if hasattr(samples, "ground_truth"):
        return [samples.ground_truth(i) for i in range(len(samples))]
    return [dict(boxes=s["boxes"], labels=s["labels"], difficult=s.get("difficult"))
            for s in samples]


def image_ids(samples):
    """The ids a results file uses for the images: a Dataset's, else 1..N."""
    return list(samples.image_ids) if hasattr(samples, "image_ids") else list(range(1, len(samples) + 1))


def detect_all(model, samples, progress=False):
    """model.predict on every sample; boxes mapped back to the image's own pixels (/ its scale)."""
    return list(each_detection(model, samples, progress))


def each_detection(model, samples, progress=False):
    """detect_all one image at a time: yields each image's detections as soon as they are made
    (nothing of an image is kept after it: `frcnn detect` writes its picture, then goes on)."""
    items = range(len(samples))
    if progress:
        items = tqdm(items, desc="detect", unit="img", dynamic_ncols=True)
    for i in items:
        sample = samples[i]
        det = model.predict(sample["image"])              # threads: the model's choice per image
        det["boxes"] = (det["boxes"] / np.float32(sample.get("scale", 1.0))).astype(np.float32)
        del sample
        yield det


def score(detections, samples, num_classes, iou_threshold=0.5):
    """VOC AP at iou_threshold (all-point and the VOC07 11-point) and the COCO metrics.

    Returns:
        dict(mAP, ap, pr, npos: VOC all-point; mAP_07, ap_07: 11-point; coco: coco_evaluate's dict).
    """
    truths = ground_truths(samples)
    voc = evaluate_detections(detections, truths, iou_threshold=iou_threshold,
                              num_classes=num_classes)
    voc07 = evaluate_detections(detections, truths, iou_threshold=iou_threshold,
                                use_07_metric=True, num_classes=num_classes)
    coco = coco_evaluate(detections, truths, num_classes=num_classes, image_ids=image_ids(samples))
    return dict(voc, mAP_07=voc07["mAP"], ap_07=voc07["ap"], coco=coco)


def evaluate(model, samples, iou_threshold=0.5, progress=False):
    """Run the model on every sample and score it (`score`: VOC AP and the COCO metrics).

    Args:
        samples: a list of sample dicts, or a data.Dataset (images at the model's scale; detections
            are scored in each image's own pixels).
    Returns:
        (result dict, detections list in the images' own pixels).
    """
    detections = detect_all(model, samples, progress)
    return score(detections, samples, model.config.num_classes, iou_threshold), detections
