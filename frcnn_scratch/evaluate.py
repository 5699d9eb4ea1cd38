"""PASCAL VOC average precision (AP) and mean AP, the metric the Faster R-CNN paper reports.

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

from ._checks import as_boxes, as_float_array, as_labels, unit_interval
from .boxes import box_iou


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
