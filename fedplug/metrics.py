"""Detection metrics: Pascal-VOC AP/mAP@0.5, recall and COCO mAP@[.5:.95], mergeable across clients.

Who calls what, and when:

* a client's detector evaluation (``plugins/detectors/engine.py``: ``evaluate``)
  turns its model's predictions on the local test split into
  :class:`~fedplug.types.DetectionStats` with :func:`match_detections`, then
  :func:`summarize` gives that client's own mAP and recall;
* the server merges every client's statistics (``DetectionStats.merge``) and
  calls :func:`summarize` on the merge: the *exact* global mAP over the union of
  all clients' test sets, not an average of per-client figures.

One definition serves every detector (docs/metrics.md has the details):

* matching, per image and class, at IoU threshold ``t`` (0.5 for VOC):
  detections in decreasing score order; each takes the unmatched non-difficult
  ground truth it overlaps most if that IoU >= ``t`` (true positive); failing
  that, a detection overlapping a ``difficult`` box by >= ``t`` is ignored
  (neither true nor false positive); otherwise it is a false positive.
  Difficult boxes are not counted as ground truth.
* AP per class: area under the interpolated precision/recall curve, all-point
  interpolation (VOC2010+) by default, 11-point (VOC2007) as an option;
  mAP@0.5 is the mean over the classes that have ground truth.
* recall: micro recall = matched non-difficult ground truths / all
  non-difficult ground truths, counting every detection the model outputs.
* COCO mAP@[.5:.95]: the same matching at IoU 0.50, 0.55, ..., 0.95, 101-point
  interpolated AP per threshold and class (pycocotools' accumulate), averaged.

IoU is computed on continuous coordinates (area = w·h, no "+1" pixel), as
torchvision and pycocotools do.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from fedplug.types import DetectionStats

COCO_IOU_THRESHOLDS = np.asarray(DetectionStats.COCO_IOU_THRESHOLDS)
# pycocotools' recall thresholds for its 101-point interpolation.
COCO_RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1)


def _as_array(value: Any, dtype, shape_tail: tuple[int, ...], what: str) -> np.ndarray:
    """A tensor/array/list as a numpy array of ``dtype`` with a checked shape."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
        value = value.detach().cpu().numpy()
    arr = np.asarray(value, dtype=dtype)
    if arr.size == 0:
        arr = arr.reshape((0,) + shape_tail)
    if arr.ndim != 1 + len(shape_tail) or arr.shape[1:] != shape_tail:
        raise ValueError(f"{what} must have shape (N{''.join(', ' + str(s) for s in shape_tail)}), got {arr.shape}")
    return arr


def box_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """IoU matrix ``[len(a), len(b)]`` of xyxy boxes; a degenerate pair has IoU 0."""
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / union, 0.0)
    return iou


def _match_one(
    det_boxes: np.ndarray, gt_boxes: np.ndarray, gt_difficult: np.ndarray, thresholds: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy matching of one image's detections of one class (already in score order).

    Returns ``(tp, ignored)``, both bool ``[len(thresholds), num_detections]``.
    """
    num_t, num_d = len(thresholds), len(det_boxes)
    tp = np.zeros((num_t, num_d), dtype=bool)
    ignored = np.zeros((num_t, num_d), dtype=bool)
    if num_d == 0 or len(gt_boxes) == 0:
        return tp, ignored
    ious = box_iou(det_boxes, gt_boxes)
    matched = np.zeros((num_t, len(gt_boxes)), dtype=bool)
    rows = np.arange(num_t)
    for d in range(num_d):
        overlaps = ious[d][None, :] >= thresholds[:, None]  # [T, G]
        candidates = overlaps & ~matched & ~gt_difficult[None, :]
        best = np.where(candidates, ious[d][None, :], -1.0)
        j = best.argmax(axis=1)
        hit = best[rows, j] >= 0.0
        matched[rows[hit], j[hit]] = True
        tp[:, d] = hit
        # A detection of a difficult object is neither rewarded nor punished (VOC rule).
        ignored[:, d] = ~hit & (overlaps & gt_difficult[None, :]).any(axis=1)
    return tp, ignored


def match_detections(
    predictions: Sequence[Mapping[str, Any]],
    targets: Sequence[Mapping[str, Any]],
    num_classes: int,
    iou_threshold: float = 0.5,
    coco: bool = True,
) -> DetectionStats:
    """Match one test set's detections to its ground truth, per image and class.

    :param predictions: per image, ``boxes`` (xyxy ``[N,4]``), ``scores`` ``[N]``
        and ``labels`` ``[N]`` (1..num_classes), as tensors or arrays, in the
        same coordinates as the targets.  Every detection counts: filter by
        score before calling if wanted.
    :param targets: per image, ``boxes`` and ``labels`` as above, optionally
        ``difficult`` (bool ``[M]``); ``iscrowd`` boxes are treated as difficult.
    :param num_classes: K, the number of object classes (background excluded).
    :param iou_threshold: the VOC lists' IoU threshold (0.5 for mAP@0.5).
    :param coco: also fill the per-threshold COCO lists (needed for ``coco_map``).
    :return: the mergeable statistics; classes are indexed ``label - 1``.
    :raises ValueError: on mismatched lengths, bad shapes or labels out of range.
    """
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets: one each per image")
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    stats = DetectionStats.empty(num_classes, coco=coco)
    thresholds = np.concatenate([[iou_threshold], COCO_IOU_THRESHOLDS if coco else []])
    powers = (1 << np.arange(len(COCO_IOU_THRESHOLDS))).astype(np.int64)
    for index, (pred, target) in enumerate(zip(predictions, targets)):
        where = f"image {index}"
        p_boxes = _as_array(pred["boxes"], np.float64, (4,), f"{where}: prediction boxes")
        p_scores = _as_array(pred["scores"], np.float64, (), f"{where}: prediction scores")
        p_labels = _as_array(pred["labels"], np.int64, (), f"{where}: prediction labels")
        t_boxes = _as_array(target["boxes"], np.float64, (4,), f"{where}: target boxes")
        t_labels = _as_array(target["labels"], np.int64, (), f"{where}: target labels")
        difficult = np.zeros(len(t_labels), dtype=bool)
        for key in ("difficult", "iscrowd"):
            if key in target and target[key] is not None:
                difficult |= _as_array(target[key], bool, (), f"{where}: target {key}")
        if not (len(p_boxes) == len(p_scores) == len(p_labels)):
            raise ValueError(f"{where}: prediction boxes, scores and labels differ in length")
        if not (len(t_boxes) == len(t_labels) == len(difficult)):
            raise ValueError(f"{where}: target boxes, labels and difficult flags differ in length")
        if not np.all(np.isfinite(p_scores)) or not np.all(np.isfinite(p_boxes)):
            raise ValueError(f"{where}: non-finite prediction boxes or scores")
        for name, labels in (("prediction", p_labels), ("target", t_labels)):
            if labels.size and (labels.min() < 1 or labels.max() > num_classes):
                raise ValueError(
                    f"{where}: {name} labels must be in 1..{num_classes} (0 is background), "
                    f"got {sorted(set(labels.tolist()))}"
                )
        for c in np.union1d(p_labels, t_labels):
            k = int(c) - 1
            gt_sel = t_labels == c
            stats.num_ground_truth[k] += int((~difficult[gt_sel]).sum())
            det_sel = np.flatnonzero(p_labels == c)
            if det_sel.size == 0:
                continue
            det_sel = det_sel[np.argsort(-p_scores[det_sel], kind="mergesort")]
            tp, ignored = _match_one(p_boxes[det_sel], t_boxes[gt_sel], difficult[gt_sel], thresholds)
            scores = p_scores[det_sel]
            keep = ~ignored[0]
            stats.scores[k].extend(scores[keep].tolist())
            stats.true_positive[k].extend(tp[0][keep].tolist())
            if coco:
                stats.coco_scores[k].extend(scores.tolist())
                stats.coco_true_positive[k].extend((tp[1:].T.astype(np.int64) @ powers).tolist())
                stats.coco_ignored[k].extend((ignored[1:].T.astype(np.int64) @ powers).tolist())
    return stats


def _pr_curve(scores: Sequence[float], tps: Sequence[bool], num_gt: int) -> tuple[np.ndarray, np.ndarray]:
    """Recall and precision after each distinct score, highest score first.

    Detections with equal scores enter together (one point per distinct score,
    as in scikit-learn), so the curve does not depend on the order in which
    tied detections were listed - and therefore not on the order clients'
    statistics were merged.
    """
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(tps, dtype=bool)
    order = np.argsort(-s, kind="mergesort")
    s, t = s[order], t[order]
    ctp = np.cumsum(t, dtype=np.float64)
    cfp = np.cumsum(~t, dtype=np.float64)
    last_of_group = np.r_[s[1:] != s[:-1], True] if len(s) else np.zeros(0, dtype=bool)
    ctp, cfp = ctp[last_of_group], cfp[last_of_group]
    recall = ctp / num_gt
    precision = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
    return recall, precision


def average_precision(
    scores: Sequence[float], tps: Sequence[bool], num_gt: int, use_07_metric: bool = False
) -> float:
    """Pascal-VOC average precision of one class.

    :param scores: every (non-ignored) detection's confidence.
    :param tps: whether each detection is a true positive.
    :param num_gt: non-difficult ground-truth boxes of the class.
    :param use_07_metric: VOC2007's 11-point interpolation (mean of the
        interpolated precision at recall 0, 0.1, ..., 1) instead of the
        all-point area under the interpolated curve (VOC2010 and later).
    :return: AP in [0, 1]; ``nan`` when ``num_gt`` is 0 (the class is then
        left out of the mean); 0 when there are ground truths but no detections.
    """
    if len(scores) != len(tps):
        raise ValueError(f"{len(scores)} scores for {len(tps)} true-positive flags")
    if num_gt <= 0:
        return math.nan
    if len(scores) == 0:
        return 0.0
    recall, precision = _pr_curve(scores, tps, num_gt)
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            above = precision[recall >= t]
            ap += (above.max() if above.size else 0.0) / 11.0
        return float(ap)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # the precision envelope
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def coco_average_precision(scores: Sequence[float], tps: Sequence[bool], num_gt: int) -> float:
    """101-point interpolated AP of one class at one IoU threshold (pycocotools' ``accumulate``).

    ``scores``/``tps`` exclude ignored detections.  ``nan`` when ``num_gt`` is 0.
    """
    if num_gt <= 0:
        return math.nan
    if len(scores) == 0:
        return 0.0
    recall, precision = _pr_curve(scores, tps, num_gt)
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    idx = np.searchsorted(recall, COCO_RECALL_THRESHOLDS, side="left")
    q = np.where(idx < len(precision), precision[np.minimum(idx, len(precision) - 1)], 0.0)
    return float(q.mean())


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(sum(finite) / len(finite)) if finite else 0.0


def summarize(stats: DetectionStats, use_07_metric: bool = False) -> dict:
    """The figures of one test set (a client's, or the merge of all clients').

    :return: a dict with

        * ``map50``: mean VOC AP over the classes that have ground truth (0.0
          when no class has any), at the IoU threshold the statistics were
          matched with (0.5 by default);
        * ``recall``: micro recall, matched / all non-difficult ground truths
          (0.0 without ground truth);
        * ``ap``: per-class AP list (``nan`` for classes without ground truth);
        * ``recall_per_class``: likewise;
        * ``coco_map``, ``coco_map50``, ``coco_map75``: COCO AP averaged over
          IoU 0.50:0.95, at 0.50 and at 0.75 (``nan`` when the statistics carry
          no COCO lists);
        * ``coco_ap``: per-class COCO AP over 0.50:0.95;
        * ``num_ground_truth``, ``num_detections``: totals.
    """
    k_range = range(stats.num_classes)
    ap = [
        average_precision(stats.scores[k], stats.true_positive[k], stats.num_ground_truth[k], use_07_metric)
        for k in k_range
    ]
    total_gt = sum(stats.num_ground_truth)
    total_tp = sum(sum(1 for t in stats.true_positive[k] if t) for k in k_range)
    recall_per_class = [
        (sum(1 for t in stats.true_positive[k] if t) / stats.num_ground_truth[k])
        if stats.num_ground_truth[k] > 0
        else math.nan
        for k in k_range
    ]
    out = {
        "map50": _nanmean(ap),
        "recall": total_tp / total_gt if total_gt else 0.0,
        "ap": ap,
        "recall_per_class": recall_per_class,
        "num_ground_truth": total_gt,
        "num_detections": sum(len(s) for s in stats.scores),
        "coco_map": math.nan,
        "coco_map50": math.nan,
        "coco_map75": math.nan,
        "coco_ap": [math.nan] * stats.num_classes,
    }
    if stats.has_coco:
        per_t = np.full((len(COCO_IOU_THRESHOLDS), stats.num_classes), np.nan)
        for k in k_range:
            if stats.num_ground_truth[k] <= 0:
                continue
            scores = np.asarray(stats.coco_scores[k], dtype=np.float64)
            tp_bits = np.asarray(stats.coco_true_positive[k], dtype=np.int64)
            ig_bits = np.asarray(stats.coco_ignored[k], dtype=np.int64)
            for t in range(len(COCO_IOU_THRESHOLDS)):
                keep = (ig_bits >> t) & 1 == 0
                per_t[t, k] = coco_average_precision(
                    scores[keep], ((tp_bits >> t) & 1)[keep].astype(bool), stats.num_ground_truth[k]
                )
        with_gt = [k for k in k_range if stats.num_ground_truth[k] > 0]
        if with_gt:
            out["coco_map"] = float(per_t[:, with_gt].mean())
            out["coco_map50"] = float(per_t[0, with_gt].mean())
            out["coco_map75"] = float(per_t[5, with_gt].mean())
            out["coco_ap"] = [float(per_t[:, k].mean()) if k in with_gt else math.nan for k in k_range]
        else:
            out["coco_map"] = out["coco_map50"] = out["coco_map75"] = 0.0
    return out
