"""fedplug.metrics: hand-worked cases, agreement with pycocotools, and the exact-merge property."""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest

from fedplug.metrics import (
    COCO_IOU_THRESHOLDS,
    average_precision,
    box_iou,
    coco_average_precision,
    match_detections,
    summarize,
)
from fedplug.types import DetectionStats


def _pred(boxes, scores, labels):
    return {
        "boxes": np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        "scores": np.asarray(scores, dtype=np.float64),
        "labels": np.asarray(labels, dtype=np.int64),
    }


def _target(boxes, labels, difficult=None):
    t = {"boxes": np.asarray(boxes, dtype=np.float64).reshape(-1, 4), "labels": np.asarray(labels, dtype=np.int64)}
    if difficult is not None:
        t["difficult"] = np.asarray(difficult, dtype=bool)
    return t


# --------------------------------------------------------------------------- hand-worked cases


def test_box_iou_known_values():
    a = np.array([[0, 0, 10, 10]])
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 0, 0]])
    np.testing.assert_allclose(box_iou(a, b), [[1.0, 50 / 150, 0.0, 0.0]])


def test_average_precision_hand_worked():
    # 2 ground truths; detections TP(0.9), FP(0.8), TP(0.7):
    # PR points (0.5, 1), (0.5, 0.5), (1, 2/3).
    scores, tps = [0.9, 0.8, 0.7], [True, False, True]
    assert average_precision(scores, tps, 2) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # VOC2007: recall 0..0.5 (6 points) at precision 1, 0.6..1.0 (5 points) at 2/3.
    assert average_precision(scores, tps, 2, use_07_metric=True) == pytest.approx((6 + 5 * 2 / 3) / 11)
    # COCO 101-point: recall 0..0.50 (51 points) at 1, 0.51..1.00 (50 points) at 2/3.
    assert coco_average_precision(scores, tps, 2) == pytest.approx((51 + 50 * 2 / 3) / 101)
    # Order of the input lists does not matter; only scores do.
    assert average_precision(scores[::-1], tps[::-1], 2) == pytest.approx(0.5 + 1 / 3)


def test_average_precision_edge_cases():
    assert math.isnan(average_precision([], [], 0))
    assert average_precision([], [], 3) == 0.0
    assert average_precision([0.5], [False], 1) == 0.0
    assert average_precision([0.5], [True], 1) == pytest.approx(1.0)
    assert average_precision([0.5], [True], 4) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        average_precision([0.5], [True, False], 1)


def test_ties_enter_together():
    # Two tied detections, one TP one FP, 1 GT: a single PR point (1, 0.5) -> AP 0.5,
    # whichever way round they are listed (a listing-order-dependent curve would give 1.0 or 0.5).
    assert average_precision([0.7, 0.7], [True, False], 1) == pytest.approx(0.5)
    assert average_precision([0.7, 0.7], [False, True], 1) == pytest.approx(0.5)


def test_match_duplicates_difficult_and_unmatched_preference():
    gt = _target([[0, 0, 10, 10], [100, 100, 110, 110], [50, 50, 60, 60]], [1, 1, 1], [False, False, True])
    pred = _pred(
        [
            [0, 0, 10, 10],  # TP on gt0
            [0, 0, 10, 11],  # duplicate of gt0 -> FP
            [50, 50, 60, 60],  # on the difficult box -> ignored
            [51, 50, 60, 60],  # also on the difficult box -> ignored too
            [200, 200, 210, 210],  # nothing there -> FP
        ],
        [0.9, 0.8, 0.95, 0.7, 0.6],
        [1, 1, 1, 1, 1],
    )
    stats = match_detections([pred], [gt], num_classes=2)
    assert stats.num_ground_truth == [2, 0]  # the difficult box is not counted
    assert sorted(zip(stats.scores[0], stats.true_positive[0])) == [(0.6, False), (0.8, False), (0.9, True)]
    assert stats.coco_scores[0] and len(stats.coco_scores[0]) == 5  # COCO lists keep every detection
    s = summarize(stats)
    assert s["recall"] == pytest.approx(0.5)
    # TP(0.9), FP(0.8), FP(0.6) with 2 GT: PR (0.5,1) -> AP 0.5; class 2 has no GT -> left out.
    assert s["map50"] == pytest.approx(0.5)
    assert s["ap"][0] == pytest.approx(0.5) and math.isnan(s["ap"][1])


def test_match_takes_best_unmatched_ground_truth():
    # gt A and gt B overlap; the first detection sits on A. The second overlaps A more than B
    # (IoU 0.81 vs 0.53) but A is taken, so it matches B: a true positive, not a duplicate.
    gt = _target([[0, 0, 10, 10], [3, 0, 13, 10]], [1, 1])
    pred = _pred([[0, 0, 10, 10], [1, 0, 11, 10]], [0.9, 0.8], [1, 1])
    stats = match_detections([pred], [gt], num_classes=1)
    assert stats.true_positive[0] == [True, True]
    assert summarize(stats)["map50"] == pytest.approx(1.0)


def test_iou_threshold_is_inclusive_and_configurable():
    gt = _target([[0, 0, 10, 10]], [1])
    pred = _pred([[0, 0, 10, 5]], [0.5], [1])  # IoU exactly 0.5
    assert match_detections([pred], [gt], 1).true_positive[0] == [True]
    assert match_detections([pred], [gt], 1, iou_threshold=0.6).true_positive[0] == [False]
    # COCO bits: TP only at the 0.50 threshold.
    assert match_detections([pred], [gt], 1).coco_true_positive[0] == [1]


def test_class_with_ground_truth_but_no_detection_scores_zero():
    gts = [_target([[0, 0, 10, 10], [20, 20, 30, 30]], [1, 2])]
    preds = [_pred([[0, 0, 10, 10]], [0.9], [1])]
    s = summarize(match_detections(preds, gts, 2))
    assert s["ap"] == [pytest.approx(1.0), 0.0]
    assert s["map50"] == pytest.approx(0.5)
    assert s["recall"] == pytest.approx(0.5)
    assert s["coco_map"] == pytest.approx(0.5)


def test_match_rejects_bad_input():
    gt = _target([[0, 0, 10, 10]], [1])
    with pytest.raises(ValueError, match="labels must be in 1..1"):
        match_detections([_pred([[0, 0, 1, 1]], [0.5], [2])], [gt], 1)
    with pytest.raises(ValueError, match="labels must be in 1..1"):
        match_detections([_pred([], [], [])], [_target([[0, 0, 1, 1]], [0])], 1)
    with pytest.raises(ValueError, match="one each per image"):
        match_detections([], [gt], 1)
    with pytest.raises(ValueError, match="shape"):
        match_detections([{"boxes": np.zeros((1, 3)), "scores": [0.1], "labels": [1]}], [gt], 1)
    with pytest.raises(ValueError, match="non-finite"):
        match_detections([_pred([[0, 0, 1, 1]], [float("nan")], [1])], [gt], 1)


def test_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    gt = {"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([1])}
    pred = {"boxes": torch.tensor([[0.0, 0, 10, 10]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}
    assert summarize(match_detections([pred], [gt], 1))["map50"] == pytest.approx(1.0)


# --------------------------------------------------------------------------- random, seeded test sets


def _random_set(seed: int, num_images: int = 40, num_classes: int = 4, tie_decimals: int | None = None):
    """Ground truth and imperfect predictions: jittered hits, duplicates, misses, clutter, label confusions."""
    rng = np.random.default_rng(seed)
    preds, gts = [], []
    for _ in range(num_images):
        n = int(rng.integers(0, 6))
        xy = rng.uniform(0, 200, size=(n, 2))
        wh = rng.uniform(8, 80, size=(n, 2))
        boxes = np.concatenate([xy, xy + wh], axis=1)
        labels = rng.integers(1, num_classes + 1, size=n)
        gts.append(_target(boxes, labels))
        p_boxes, p_labels = [], []
        for b, lab in zip(boxes, labels):
            for _ in range(int(rng.choice([0, 1, 1, 1, 2]))):  # miss, hit, or hit + duplicate
                jitter = rng.normal(0, 0.12, size=4) * np.r_[b[2] - b[0], b[3] - b[1], b[2] - b[0], b[3] - b[1]]
                p_boxes.append(b + jitter)
                p_labels.append(lab if rng.random() > 0.1 else int(rng.integers(1, num_classes + 1)))
        for _ in range(int(rng.integers(0, 4))):  # clutter
            xy = rng.uniform(0, 200, size=2)
            p_boxes.append(np.r_[xy, xy + rng.uniform(8, 80, size=2)])
            p_labels.append(int(rng.integers(1, num_classes + 1)))
        p_boxes = np.asarray(p_boxes, dtype=np.float64).reshape(-1, 4)
        p_boxes[:, 2:] = np.maximum(p_boxes[:, 2:], p_boxes[:, :2] + 1.0)
        scores = rng.uniform(0.01, 1.0, size=len(p_boxes))
        if tie_decimals is not None:
            scores = np.round(scores, tie_decimals)
        preds.append(_pred(p_boxes, scores, p_labels))
    return preds, gts


def _pycocotools_eval(preds, gts, num_classes, iou_thrs):
    """Run pycocotools' COCOeval on the same data: returns (evaluator, precision array)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns, dets = [], [], []
    for img_id, (p, g) in enumerate(zip(preds, gts), start=1):
        images.append({"id": img_id, "width": 300, "height": 300})
        for b, lab in zip(g["boxes"], g["labels"]):
            w, h = b[2] - b[0], b[3] - b[1]
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": int(lab),
                         "bbox": [b[0], b[1], w, h], "area": w * h, "iscrowd": 0})
        for b, s, lab in zip(p["boxes"], p["scores"], p["labels"]):
            dets.append({"image_id": img_id, "category_id": int(lab),
                         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": float(s)})
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {"images": images, "annotations": anns,
                           "categories": [{"id": k} for k in range(1, num_classes + 1)]}
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.iouThrs = np.asarray(iou_thrs, dtype=np.float64)
        ev.params.areaRng = [[0.0, 1e10]]
        ev.params.areaRngLbl = ["all"]
        ev.params.maxDets = [10_000]  # no per-image cap: fedplug counts every detection
        ev.evaluate()
        ev.accumulate()
    return ev, ev.eval["precision"][:, :, :, 0, 0]  # [T, R, K]


def test_coco_thresholds_are_pycocotools_floats():
    from pycocotools.cocoeval import Params

    np.testing.assert_array_equal(COCO_IOU_THRESHOLDS, Params(iouType="bbox").iouThrs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coco_map_equals_pycocotools(seed):
    preds, gts = _random_set(seed)
    _, precision = _pycocotools_eval(preds, gts, 4, COCO_IOU_THRESHOLDS)
    ours = summarize(match_detections(preds, gts, 4))
    valid = precision > -1
    assert valid.any()
    assert ours["coco_map"] == pytest.approx(float(precision[valid].mean()), abs=1e-12)
    p50 = precision[0]
    assert ours["coco_map50"] == pytest.approx(float(p50[p50 > -1].mean()), abs=1e-12)
    p75 = precision[5]
    assert ours["coco_map75"] == pytest.approx(float(p75[p75 > -1].mean()), abs=1e-12)
    assert 0.05 < ours["coco_map"] < ours["coco_map50"] < 1.0  # the data are neither trivial nor hopeless


@pytest.mark.parametrize("seed", [3, 4])
def test_voc_matching_and_ap_against_pycocotools_at_iou_half(seed):
    preds, gts = _random_set(seed)
    ev, precision = _pycocotools_eval(preds, gts, 4, [0.5])
    stats = match_detections(preds, gts, 4)
    # Same true/false-positive decisions as pycocotools, detection by detection.
    for k in range(4):
        theirs = []
        for e in ev.evalImgs:
            if e is not None and e["category_id"] == k + 1:
                theirs += [(s, bool(m)) for s, m in zip(e["dtScores"], e["dtMatches"][0])]
        assert sorted(theirs) == sorted(zip(stats.scores[k], stats.true_positive[k]))
    # All-point AP vs COCO's 101-point AP of the same curve: equal up to the interpolation grid.
    ours = summarize(stats)
    coco50 = float(precision[0][precision[0] > -1].mean())
    assert ours["map50"] == pytest.approx(coco50, abs=0.01)
    assert ours["coco_map50"] == pytest.approx(coco50, abs=1e-12)


@pytest.mark.parametrize("tie_decimals", [None, 1])
def test_merged_client_stats_equal_the_union(tie_decimals):
    preds, gts = _random_set(7, num_images=30, tie_decimals=tie_decimals)
    union = summarize(match_detections(preds, gts, 4))
    a = match_detections(preds[:11], gts[:11], 4)
    b = match_detections(preds[11:], gts[11:], 4)
    for merged in (a.merge(b), b.merge(a)):
        got = summarize(merged)
        for key in ("map50", "recall", "coco_map", "coco_map50", "coco_map75"):
            assert got[key] == pytest.approx(union[key], abs=1e-12), key
    # The merge of per-client statistics is not the mean of per-client mAPs.
    per_client = (summarize(a)["map50"] + summarize(b)["map50"]) / 2
    assert per_client != pytest.approx(union["map50"], abs=1e-9)


def _list_order_ap(scores, tps, num_gt, use_07=False):
    """AP the VOC devkit's way: one curve point per detection, ties left in list order."""
    t = np.asarray(tps, dtype=bool)[np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")]
    tp, fp = np.cumsum(t), np.cumsum(~t)
    if use_07:
        rec, prec = tp / num_gt, tp / (tp + fp)
        return float(sum(prec[rec >= r].max() if (rec >= r).any() else 0.0 for r in np.arange(0.0, 1.1, 0.1)) / 11)
    mrec = np.r_[0.0, tp / num_gt, 1.0]
    mpre = np.r_[0.0, tp / (tp + fp), 0.0]
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def test_tied_scores_count_together_unlike_list_order():
    """docs/metrics.md: ties give fedplug the references' value for tied false positives listed first,
    whatever the merge order; a list-order AP (pycocotools', the devkit's) depends on the merge order."""
    preds, gts = _random_set(7, num_images=30, tie_decimals=1)
    a = match_detections(preds[:11], gts[:11], 4, coco=False)
    b = match_detections(preds[11:], gts[11:], 4, coco=False)
    ab, ba = a.merge(b), b.merge(a)
    list_order_differs = False
    for k in range(4):
        s, t, n = np.asarray(ab.scores[k]), np.asarray(ab.true_positive[k], dtype=bool), ab.num_ground_truth[k]
        assert n > 0 and len(set(s.tolist())) < len(s)  # the class has ground truth and tied scores
        pessimistic = np.lexsort((t, -s))  # by score, false positives first among ties
        for use_07 in (False, True):
            ours = average_precision(s, t, n, use_07)
            assert ours == average_precision(ba.scores[k], ba.true_positive[k], n, use_07)
            assert ours == pytest.approx(_list_order_ap(s[pessimistic], t[pessimistic], n, use_07), abs=1e-12)
        assert coco_average_precision(s, t, n) == pytest.approx(
            _coco_list_order_ap(s[pessimistic], t[pessimistic], n), abs=1e-12)
        list_order_differs |= _list_order_ap(s, t, n) != _list_order_ap(ba.scores[k], ba.true_positive[k], n)
    assert list_order_differs


def _coco_list_order_ap(scores, tps, num_gt):
    """pycocotools' 101-point AP (accumulate): stable sort, one point per detection."""
    t = np.asarray(tps, dtype=bool)[np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")]
    tp, fp = np.cumsum(t), np.cumsum(~t)
    rc, pr = tp / num_gt, np.maximum.accumulate((tp / (tp + fp))[::-1])[::-1]
    idx = np.searchsorted(rc, np.linspace(0.0, 1.0, 101), side="left")
    return float(np.where(idx < len(pr), pr[np.minimum(idx, len(pr) - 1)], 0.0).mean())


def test_use_07_metric_flows_through_summarize():
    preds, gts = _random_set(5)
    stats = match_detections(preds, gts, 4)
    s07, s12 = summarize(stats, use_07_metric=True), summarize(stats)
    for k in range(4):
        assert s07["ap"][k] == pytest.approx(
            average_precision(stats.scores[k], stats.true_positive[k], stats.num_ground_truth[k], True)
        )
    assert s07["map50"] != s12["map50"]


# --------------------------------------------------------------------------- the wire form


def test_stats_json_round_trip_and_validation():
    preds, gts = _random_set(11, num_images=6)
    stats = match_detections(preds, gts, 4)
    wire = json.loads(json.dumps(stats.to_json()))
    assert DetectionStats.from_json(wire) == stats
    no_coco = match_detections(preds, gts, 4, coco=False)
    assert not no_coco.has_coco and DetectionStats.from_json(no_coco.to_json()) == no_coco
    assert math.isnan(summarize(no_coco)["coco_map"])
    assert not stats.merge(no_coco).has_coco

    def broken(**change):
        data = json.loads(json.dumps(stats.to_json()))
        data.update(change)
        return data

    k = next(i for i in range(4) if stats.coco_scores[i])
    bad_bits = [list(r) for r in stats.coco_true_positive]
    bad_bits[k][0] = 1 << 10
    nan_scores = [list(r) for r in stats.scores]
    nan_scores[k] = [float("nan")] * len(nan_scores[k])
    short = [list(r) for r in stats.coco_ignored]
    short[k] = short[k][:-1]
    too_many_tp = [[True] * len(r) for r in stats.true_positive]
    for bad in (
        broken(coco_true_positive=bad_bits),
        broken(scores=nan_scores),
        broken(coco_ignored=short),
        broken(coco_scores=None),
        broken(num_ground_truth=[-1, 0, 0, 0]),
        broken(num_ground_truth=[0, 0, 0, 0], true_positive=too_many_tp),
        broken(num_classes=3),
        {"num_classes": 1},
    ):
        with pytest.raises(ValueError, match="malformed detection statistics"):
            DetectionStats.from_json(bad)


def test_an_evaluation_of_no_image_gives_the_round_no_figures():
    """A client answering client_eval ok with test_size 0 scored nothing: no test loss of 0, no coverage."""
    from fedplug.evaluation import round_metrics

    empty = {"test_size": 0, "test_loss": 0.0, "map50": 0.0, "recall": 0.0, "stats": None}
    scored = {"test_size": 4, "test_loss": 2.0, "map50": 0.5, "recall": 0.5, "stats": DetectionStats.empty(3)}
    assert round_metrics("clients", None, {"a": empty}, 4, False, {}) == {"evaluated_by": ""}
    both = round_metrics("clients", None, {"a": empty, "b": scored}, 8, False, {})
    assert both["test_loss"] == 2.0 and both["extra"]["evaluators"] == 1.0
    assert both["extra"]["eval_coverage"] == 0.5
