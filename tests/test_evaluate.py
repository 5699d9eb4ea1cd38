"""VOC AP / mAP: hand-computed precision-recall cases first, then properties."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from frcnn_scratch.data.shapes import make_shapes_dataset
from frcnn_scratch.evaluate import evaluate_detections, voc_ap

TOL = 1e-9  # AP is computed in float64 from exact fractions


def det(boxes, scores, labels):
    return dict(boxes=np.array(boxes, np.float32).reshape(-1, 4), scores=np.array(scores, np.float32),
                labels=np.array(labels, np.int64))


def gt(boxes, labels, difficult=None):
    out = dict(boxes=np.array(boxes, np.float32).reshape(-1, 4), labels=np.array(labels, np.int64))
    if difficult is not None:
        out["difficult"] = np.array(difficult, bool)
    return out


G1, G2 = [0, 0, 10, 10], [20, 20, 30, 30]


# ---- voc_ap ---------------------------------------------------------------------------------------

def test_voc_ap_hand_case_both_metrics():
    # ranked: TP, FP, TP with 2 gts -> recall (1/2, 1/2, 1), precision (1, 1/2, 2/3)
    rec, prec = [0.5, 0.5, 1.0], [1.0, 0.5, 2 / 3]
    # all points: envelope (1, 1, 2/3, 2/3); area = 0.5 * 1 + 0.5 * 2/3
    assert abs(voc_ap(rec, prec) - (0.5 + 1 / 3)) < TOL
    # 11 points: t = 0..0.5 (6 thresholds) reach precision 1; t = 0.6..1 (5) reach 2/3
    assert abs(voc_ap(rec, prec, use_07_metric=True) - (6 + 5 * 2 / 3) / 11) < TOL


def test_voc_ap_edge_cases():
    assert voc_ap([], []) == 0.0 and voc_ap([], [], use_07_metric=True) == 0.0
    assert voc_ap([1.0], [1.0]) == 1.0 and abs(voc_ap([1.0], [1.0], True) - 1.0) < TOL
    # recall exactly 3/10 counts at t = 0.3 (thresholds are k / 10, not 0.1 * k)
    assert abs(voc_ap(np.array([3]) / 10, [1.0], use_07_metric=True) - 4 / 11) < TOL
    # precision envelope: a later higher precision lifts the earlier recall step
    assert abs(voc_ap([0.5, 0.5, 1.0], [1.0, 0.5, 1.0]) - 1.0) < TOL
    with pytest.raises(ValueError, match="recall, precision"):
        voc_ap([0.5], [1.0, 0.5])
    with pytest.raises(ValueError, match="precision"):
        voc_ap([0.5], [np.nan])
    with pytest.raises(ValueError, match="recall"):
        voc_ap([1.5], [1.0])


# ---- evaluate_detections: hand cases ----------------------------------------------------------------

def test_three_detections_two_gts_with_a_duplicate():
    dets = [det([G1, G1, G2], [0.9, 0.8, 0.7], [1, 1, 1])]     # TP, duplicate FP, TP
    res = evaluate_detections(dets, [gt([G1, G2], [1, 1])])
    assert abs(res["ap"][1] - (0.5 + 1 / 3)) < TOL, res["ap"]
    np.testing.assert_allclose(res["pr"][1][0], [0.5, 0.5, 1.0], atol=1e-7)
    np.testing.assert_allclose(res["pr"][1][1], [1.0, 0.5, 2 / 3], atol=1e-7)
    res07 = evaluate_detections(dets, [gt([G1, G2], [1, 1])], use_07_metric=True)
    assert abs(res07["mAP"] - (6 + 5 * 2 / 3) / 11) < TOL


def test_difficult_gt_is_neither_tp_nor_fp_and_not_counted():
    # the top detection hits a difficult gt: ignored; then TP on G1, duplicate FP
    dets = [det([G2, G1, G1], [0.95, 0.9, 0.8], [1, 1, 1])]
    res = evaluate_detections(dets, [gt([G1, G2], [1, 1], difficult=[False, True])])
    assert res["npos"][1] == 1
    assert abs(res["ap"][1] - 1.0) < TOL, f"difficult not ignored: AP {res['ap'][1]}"
    # missing a difficult gt costs nothing; missing the same gt when it is not difficult halves AP
    miss = [det([G1], [0.9], [1])]
    assert evaluate_detections(miss, [gt([G1, G2], [1, 1], [False, True])])["ap"][1] == 1.0
    assert abs(evaluate_detections(miss, [gt([G1, G2], [1, 1])])["ap"][1] - 0.5) < TOL


def test_ranking_pools_images_and_false_positive_ranked_first():
    # image 0: one gt found at score 0.6; image 1: no gt, a FP at 0.9 -> rec (0, 1), prec (0, 1/2)
    dets = [det([G1], [0.6], [1]), det([G2], [0.9], [1])]
    gts = [gt([G1], [1]), gt(np.zeros((0, 4)), [])]
    assert abs(evaluate_detections(dets, gts)["mAP"] - 0.5) < TOL
    assert abs(evaluate_detections(dets, gts, use_07_metric=True)["mAP"] - 0.5) < TOL


def test_iou_threshold_is_inclusive():
    # IoU([0,0,10,10], [0,0,10,20]) = 100 / 200 = 0.5 exactly: a match at 0.5 (devkit: ov >= 0.5)
    dets = [det([[0, 0, 10, 20]], [1.0], [1])]
    assert evaluate_detections(dets, [gt([G1], [1])])["mAP"] == 1.0
    assert evaluate_detections(dets, [gt([G1], [1])], iou_threshold=0.51)["mAP"] == 0.0


def test_max_iou_gt_taken_even_when_already_matched():
    # devkit rule: the second detection's best gt is G1 (IoU 0.82), already matched -> FP, although
    # the other gt [0, 3, 10, 13] overlaps it with IoU 0.67.  rec (1/2, 1/2), prec (1, 1/2) -> AP 1/2
    gts = [gt([G1, [0, 3, 10, 13]], [1, 1])]
    dets = [det([G1, [0, 1, 10, 11]], [0.9, 0.8], [1, 1])]
    assert abs(evaluate_detections(dets, gts)["mAP"] - 0.5) < TOL


def test_classes_are_separate_and_classes_without_gt_left_out():
    gts = [gt([G1, G2], [1, 2])]
    # class 1 perfect; class 2 detected with the wrong label -> AP 0 for class 2, FP for class 3
    dets = [det([G1, G2], [0.9, 0.8], [1, 3])]
    res = evaluate_detections(dets, gts, num_classes=4)
    assert res["ap"] == {1: 1.0, 2: 0.0}, res["ap"]
    assert res["mAP"] == 0.5
    assert evaluate_detections(dets, gts)["ap"] == {1: 1.0, 2: 0.0}
    with pytest.raises(ValueError, match="num_classes"):
        evaluate_detections(dets, gts, num_classes=2)


def test_empty_inputs():
    gts = [gt([G1], [1]), gt(np.zeros((0, 4)), [])]
    no_dets = [det(np.zeros((0, 4)), [], []), det(np.zeros((0, 4)), [], [])]
    res = evaluate_detections(no_dets, gts)
    assert res["ap"] == {1: 0.0} and res["mAP"] == 0.0
    res = evaluate_detections([], [])
    assert np.isnan(res["mAP"]) and res["ap"] == {}


def test_bad_inputs_name_the_argument():
    good = det([G1], [0.9], [1])
    with pytest.raises(ValueError, match="detections, ground_truths"):
        evaluate_detections([good], [])
    with pytest.raises(ValueError, match=r"detections\[0\]\['scores'\]"):
        evaluate_detections([det([G1], [0.9, 0.1], [1])], [gt([G1], [1])])
    with pytest.raises(ValueError, match=r"detections\[0\]\['labels'\]"):
        evaluate_detections([det([G1], [0.9], [0])], [gt([G1], [1])])
    with pytest.raises(ValueError, match=r"ground_truths\[0\]\['boxes'\]"):
        evaluate_detections([good], [gt([[5, 0, 1, 1]], [1])])
    with pytest.raises(ValueError, match="iou_threshold"):
        evaluate_detections([good], [gt([G1], [1])], iou_threshold=1.5)


# ---- properties ------------------------------------------------------------------------------------

DATA = make_shapes_dataset(10, seed=4)


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_perfect_detector_scores_one_and_noise_does_not(seed):
    rng = np.random.default_rng(seed)
    perfect = [det(s["boxes"], rng.random(len(s["boxes"])), s["labels"]) for s in DATA]
    for metric in (False, True):
        assert abs(evaluate_detections(perfect, DATA, use_07_metric=metric)["mAP"] - 1.0) < TOL
    # adding low-scoring junk after every true box cannot change an AP of 1 (recall 1 is reached
    # at precision 1); adding it above the true boxes must lower it
    junk = [det(np.vstack([s["boxes"], [[0, 0, 2, 2]]]), np.append(rng.random(len(s["boxes"])) + 1, 0.0),
                np.append(s["labels"], 1)) for s in DATA]
    assert abs(evaluate_detections(junk, DATA)["mAP"] - 1.0) < TOL
    junk_top = [dict(d, scores=np.append(d["scores"][:-1], 5.0).astype(np.float32)) for d in junk]
    assert evaluate_detections(junk_top, DATA)["ap"][1] < 1.0


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_map_ignores_image_order_and_stays_in_unit_interval(seed):
    rng = np.random.default_rng(seed)
    dets = []
    for s in DATA:   # jittered true boxes (some match, some not), wrong labels, and random boxes
        jitter = s["boxes"] + rng.uniform(-6, 6, size=s["boxes"].shape).astype(np.float32)
        jitter[:, 2:] = np.maximum(jitter[:, 2:], jitter[:, :2] + 1)
        rand_xy = rng.uniform(0, 90, size=(3, 2))
        boxes = np.vstack([jitter, np.hstack([rand_xy, rand_xy + rng.uniform(5, 40, size=(3, 2))])])
        labels = np.concatenate([np.where(rng.random(len(jitter)) < 0.8, s["labels"], 1 + rng.integers(4,
                                 size=len(jitter))), 1 + rng.integers(4, size=3)])
        dets.append(det(boxes, rng.random(len(boxes)), labels))   # distinct scores: no ties
    res = evaluate_detections(dets, DATA)
    perm = rng.permutation(len(DATA))
    shuffled = evaluate_detections([dets[i] for i in perm], [DATA[i] for i in perm])
    assert 0.0 <= res["mAP"] <= 1.0
    assert res["ap"].keys() == shuffled["ap"].keys()
    for k in res["ap"]:
        assert abs(res["ap"][k] - shuffled["ap"][k]) < TOL, f"class {k}: AP changed with image order"
        assert 0.0 <= res["ap"][k] <= 1.0


# ---- COCO metrics --------------------------------------------------------------------------------

import contextlib  # noqa: E402
import io  # noqa: E402

from pycocotools.coco import COCO  # noqa: E402  (the dev extra: a plain import, never a silent skip)
from pycocotools.cocoeval import COCOeval  # noqa: E402

from frcnn_scratch.boxes import xyxy_to_xywh  # noqa: E402
from frcnn_scratch.evaluate import COCO_METRICS, coco_evaluate, coco_iou  # noqa: E402


def test_coco_one_detection_by_hand():
    # IoU 0.78: a match at the thresholds 0.50 .. 0.75 (6 of 10), precision 1 there, 0 above
    gt = [dict(boxes=np.array([[0, 0, 10, 10]], np.float32), labels=np.array([1]))]
    det = [dict(boxes=np.array([[0, 0, 10, 7.8]], np.float32), scores=np.array([0.9]),
                labels=np.array([1]))]
    r = coco_evaluate(det, gt)   # (precision = TP / (TP + FP + 2.2e-16), as pycocotools)
    assert abs(r["AP"] - 0.6) < 1e-12 and abs(r["AP50"] - 1) < 1e-12 and abs(r["AP75"] - 1) < 1e-12
    assert abs(r["AR100"] - 0.6) < 1e-12 and abs(r["AR1"] - 0.6) < 1e-12
    assert r["APs"] == r["AP"] and r["APm"] == -1 and r["APl"] == -1   # area 100: small only


def test_coco_crowd_region_absorbs_detections():
    # a crowd box: IoU against it is intersection / detection area, and matches are ignored
    iou = coco_iou([[10, 10, 10, 10]], [[0, 0, 100, 100]], [True])
    assert iou[0, 0] == 1.0, iou
    gt = [dict(boxes=np.array([[0, 0, 100, 100], [200, 200, 240, 240]], np.float32),
               labels=np.array([1, 1]), crowd=np.array([True, False]))]
    det = [dict(boxes=np.array([[10, 10, 20, 20], [30, 30, 40, 40], [200, 200, 240, 240]],
                               np.float32), scores=np.array([0.9, 0.8, 0.7]), labels=np.array([1, 1, 1]))]
    r = coco_evaluate(det, gt)
    # the two inside the crowd are neither TP nor FP
    assert abs(r["AP"] - 1) < 1e-12 and r["AR100"] == 1.0, r


def _random_case(rng, n_images=6, C=3):
    """Images of several sizes, some empty, crowds, jittered and stray detections, tied scores;
    class C has no ground truth."""
    ids = rng.permutation(np.arange(1, n_images + 1) * 7)
    gts, dets = [], []
    for k in range(n_images):
        H, W = rng.integers(50, 400, 2)
        g = int(rng.integers(0, 6)) if k % 3 else 0
        xy = rng.uniform(0, [W, H], (g, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(2, 150, (g, 2))], 1).astype(np.float32)
        labels = rng.integers(1, C, g)
        gts.append(dict(boxes=boxes, labels=labels, crowd=rng.random(g) < 0.2))
        d = int(rng.integers(0, 12)) if k % 4 else 0
        src = rng.integers(0, max(g, 1), d)
        base = boxes[src] if g else np.concatenate([rng.uniform(0, 100, (d, 2)),
                                                   rng.uniform(100, 200, (d, 2))], 1)
        jit = base + rng.normal(0, 6, (d, 4))
        jit[:, 2:] = np.maximum(jit[:, 2:], jit[:, :2] + 0.5)
        own = labels[src] if g else rng.integers(1, C + 1, d)
        dets.append(dict(boxes=jit.astype(np.float32), scores=np.round(rng.random(d), 1),
                         labels=np.where(rng.random(d) < 0.8, own, rng.integers(1, C + 1, d))))
    return ids, gts, dets, C


def _pycocotools_stats(ids, gts, dets, C):
    images, anns, results = [], [], []
    for i, g, d in zip(ids, gts, dets):
        images.append(dict(id=int(i), width=500, height=500, file_name=f"{i}.png"))
        for b, label, crowd in zip(xyxy_to_xywh(g["boxes"]).tolist(), g["labels"].tolist(),
                                   g["crowd"].tolist()):
            anns.append(dict(id=len(anns) + 1, image_id=int(i), category_id=int(label), bbox=b,
                             area=b[2] * b[3], iscrowd=int(crowd)))
        for b, s, label in zip(xyxy_to_xywh(d["boxes"]).tolist(), d["scores"].tolist(),
                               d["labels"].tolist()):
            results.append(dict(image_id=int(i), category_id=int(label), bbox=b, score=s))
    coco = COCO()
    coco.dataset = dict(images=images, annotations=anns,
                        categories=[dict(id=k, name=str(k)) for k in range(1, C + 1)])
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
        e = COCOeval(coco, coco.loadRes(results), "bbox")
        e.evaluate()
        e.accumulate()
        e.summarize()
    return e.stats


@pytest.mark.parametrize("seed", range(25))
def test_coco_metrics_equal_pycocotools(seed):
    rng = np.random.default_rng(seed)
    ids, gts, dets, C = _random_case(rng)
    if not any(len(d["scores"]) for d in dets):
        dets[1] = dict(boxes=np.array([[1, 1, 30, 30]], np.float32), scores=np.array([0.5]),
                       labels=np.array([1]))                   # pycocotools needs one result
    want = _pycocotools_stats(ids, gts, dets, C)
    got = coco_evaluate(dets, gts, num_classes=C, image_ids=ids)
    for name, w in zip(COCO_METRICS, want):
        assert abs(got[name] - w) <= 1e-6, f"seed {seed}: {name} {got[name]} vs pycocotools {w}"
