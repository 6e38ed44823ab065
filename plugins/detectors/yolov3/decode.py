"""Turning raw YOLO maps into boxes, and boxes into detections.

:func:`split_raw` and :func:`decode_boxes` are used by both the loss
(:mod:`.loss`, for the ignore mask) and inference (:func:`postprocess`,
called by :meth:`~.model.YOLOv3.forward` in eval mode).

A raw map of one scale is ``[B, A*(5+K), H, W]`` with Darknet's channel
layout ``anchor * (5+K) + entry``, entries ``tx, ty, tw, th, objectness,
class_1..class_K``.  Decoded, as in the paper: ``x = (sigmoid(tx) + cx) *
stride``, ``w = anchor_w * exp(tw)``; objectness and class scores are
sigmoids (YOLOv3's independent logistic classifiers), and a detection's score
is ``objectness * class score``.
"""

from __future__ import annotations

import torch
from torchvision.ops import batched_nms

# exp(tw) above this would only make boxes far larger than any input: clamping
# keeps an untrained or diverging net from producing inf boxes.
MAX_LOG_SCALE = 8.0


def split_raw(raw: torch.Tensor, num_anchors: int) -> torch.Tensor:
    """``[B, A*(5+K), H, W]`` -> ``[B, A, H, W, 5+K]`` (a view, no copy of the data layout's meaning)."""
    b, c, h, w = raw.shape
    return raw.view(b, num_anchors, c // num_anchors, h, w).permute(0, 1, 3, 4, 2)


def decode_boxes(p: torch.Tensor, anchors: torch.Tensor, stride: int) -> torch.Tensor:
    """``p`` ``[B, A, H, W, 5+K]`` -> boxes ``[B, A, H, W, 4]`` xyxy in letterboxed input pixels.

    ``anchors`` is ``[A, 2]`` (width, height) in input pixels.
    """
    _, _, h, w, _ = p.shape
    ys, xs = torch.meshgrid(
        torch.arange(h, device=p.device, dtype=p.dtype),
        torch.arange(w, device=p.device, dtype=p.dtype),
        indexing="ij",
    )
    cx = (p[..., 0].sigmoid() + xs) * stride
    cy = (p[..., 1].sigmoid() + ys) * stride
    wh = p[..., 2:4].clamp(max=MAX_LOG_SCALE).exp() * anchors.view(1, -1, 1, 1, 2)
    half_w, half_h = wh[..., 0] / 2, wh[..., 1] / 2
    return torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=-1)


def postprocess(
    raw_maps: list[torch.Tensor],
    anchors_per_scale: list[torch.Tensor],
    strides: tuple[int, ...],
    conf_threshold: float,
    nms_iou: float,
    max_detections: int,
    pre_nms_topk: int,
) -> list[dict[str, torch.Tensor]]:
    """Detections per image in letterboxed input pixels, labels 0-based (the model adds 1).

    Every (box, class) pair whose score ``objectness * class`` exceeds
    ``conf_threshold`` is a candidate (multi-label, as YOLOv3's classifiers
    are independent); the ``pre_nms_topk`` best go through class-wise NMS
    (``torchvision.ops.batched_nms`` at ``nms_iou``) and the
    ``max_detections`` best survivors are returned.
    """
    boxes_all, scores_all = [], []
    for raw, anchors, stride in zip(raw_maps, anchors_per_scale, strides):
        p = split_raw(raw, anchors.shape[0])
        b = p.shape[0]
        boxes_all.append(decode_boxes(p, anchors, stride).reshape(b, -1, 4))
        scores = p[..., 4:5].sigmoid() * p[..., 5:].sigmoid()
        scores_all.append(scores.reshape(b, -1, scores.shape[-1]))
    boxes = torch.cat(boxes_all, 1)
    scores = torch.cat(scores_all, 1)
    num_classes = scores.shape[-1]
    results = []
    for i in range(boxes.shape[0]):
        flat = scores[i].flatten()  # index = box * K + class
        keep = (flat > conf_threshold).nonzero().squeeze(1)
        if keep.numel() > pre_nms_topk:
            keep = keep[flat[keep].topk(pre_nms_topk).indices]
        box_idx, labels = keep // num_classes, keep % num_classes
        cand_boxes, cand_scores = boxes[i, box_idx], flat[keep]
        kept = batched_nms(cand_boxes, cand_scores, labels, nms_iou)[:max_detections]
        results.append({"boxes": cand_boxes[kept], "scores": cand_scores[kept], "labels": labels[kept]})
    return results
