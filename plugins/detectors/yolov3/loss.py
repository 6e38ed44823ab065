"""The YOLOv3 loss, as in the paper and Darknet's ``yolo_layer.c``.

Called by :meth:`~.model.YOLOv3.forward` in train mode with the raw maps
and the batch's targets (already letterboxed).  Returns the torchvision-style
loss dict ``{"loss_box", "loss_obj", "loss_cls"}`` whose sum is what the
engine back-propagates.

* **Assignment.**  Each ground-truth box is the responsibility of exactly one
  prediction: the anchor (of all scales) whose shape best matches it (IoU of
  the boxes centred on each other), in the grid cell holding its centre, at
  that anchor's scale.  Other predictions whose decoded box overlaps some
  ground truth by more than ``ignore_threshold`` (0.5) are *ignored* by the
  objectness loss (neither pushed up nor down).
* **Box.**  ``box_loss: mse`` (default, the original): BCE between
  ``sigmoid(tx), sigmoid(ty)`` and the centre's offset in its cell, plus
  squared error between ``tw, th`` and ``log(w / anchor_w), log(h / anchor_h)``,
  weighted by ``2 - w*h / img_size**2`` (small boxes count more, as in Darknet).
  ``box_loss: giou``: ``1 - GIoU`` of the decoded box with the same weight.
* **Objectness.**  BCE of every non-ignored prediction against 1 (responsible)
  or 0.
* **Class.**  BCE of the responsible prediction's K independent class logits
  against the one-hot class.

Every term is summed and divided by the number of images in the batch, like
Darknet's loss (which sums over the batch), so a term's size does not depend
on the batch size.  ``loss_gains`` scale the three terms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import box_iou, generalized_box_iou_loss

from .decode import MAX_LOG_SCALE, decode_boxes, split_raw


def _shape_iou(wh: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """IoU of ``[N,2]`` box shapes with ``[A,2]`` anchor shapes, both centred at the origin."""
    inter = torch.min(wh[:, None, :], anchors[None, :, :]).prod(-1)
    return inter / (wh.prod(-1)[:, None] + anchors.prod(-1)[None, :] - inter)


def yolo_loss(
    raw_maps: list[torch.Tensor],
    targets: torch.Tensor,
    batch_size: int,
    anchors: torch.Tensor,
    anchor_masks: tuple[tuple[int, ...], ...],
    strides: tuple[int, ...],
    img_size: int,
    num_classes: int,
    ignore_threshold: float = 0.5,
    box_loss: str = "mse",
    gains: dict[str, float] | None = None,
) -> dict[str, torch.Tensor]:
    """The three loss terms for one batch.

    :param raw_maps: the network's ``[B, A*(5+K), H, W]`` maps, one per scale.
    :param targets: ``[N, 6]`` rows ``(image index, class 0..K-1, x1, y1, x2, y2)``
        in letterboxed input pixels.
    :param anchors: ``[num_anchors, 2]`` in input pixels; ``anchor_masks[s]``
        lists the anchors of scale ``s`` (same order as ``raw_maps``).
    """
    gains = gains or {"box": 1.0, "obj": 1.0, "cls": 1.0}
    device = raw_maps[0].device
    zero = raw_maps[0].sum() * 0.0  # keeps the graph connected when a term is empty
    loss_box, loss_obj, loss_cls = zero, zero, zero
    anchors = anchors.to(device=device, dtype=torch.float32)
    targets = targets.to(device=device, dtype=torch.float32)

    num_targets = len(targets)
    img_idx = targets[:, 0].long()
    cls = targets[:, 1].long()
    xyxy = targets[:, 2:6]
    cxcy = (xyxy[:, :2] + xyxy[:, 2:]) / 2
    wh = (xyxy[:, 2:] - xyxy[:, :2]).clamp(min=1e-6)
    # The one anchor (index into all anchors) responsible for each ground truth.
    best_anchor = _shape_iou(wh, anchors).argmax(1) if num_targets else img_idx

    # Ground truths per image, zero-padded (a zero box overlaps nothing), for the ignore mask.
    counts = torch.bincount(img_idx, minlength=batch_size)
    max_gt = int(counts.max()) if num_targets else 0
    gt_padded = torch.zeros(batch_size, max(max_gt, 1), 4, device=device)
    if max_gt:
        order = torch.argsort(img_idx, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(len(targets), device=device) - starts[img_idx[order]]
        gt_padded[img_idx[order], slot] = xyxy[order]

    for raw, mask, stride in zip(raw_maps, anchor_masks, strides):
        p = split_raw(raw, len(mask)).float()
        b, a, h, w, _ = p.shape
        scale_anchors = anchors[list(mask)]

        # Ignore mask: predictions overlapping any ground truth of their image by > threshold.
        with torch.no_grad():
            pred = decode_boxes(p.detach(), scale_anchors, stride).reshape(b, -1, 4)
            if max_gt:
                ious = torch.stack([box_iou(pred[i], gt_padded[i]) for i in range(b)])
                ignore = ious.max(-1).values.view(b, a, h, w) > ignore_threshold
            else:
                ignore = torch.zeros(b, a, h, w, dtype=torch.bool, device=device)

        obj_target = torch.zeros(b, a, h, w, device=device)
        here = best_anchor[:, None] == torch.tensor(mask, device=device)[None, :]  # [N, A]
        if here.any():
            t_idx, a_idx = here.nonzero(as_tuple=True)
            bi = img_idx[t_idx]
            gxy = cxcy[t_idx] / stride
            gi = gxy[:, 0].long().clamp(0, w - 1)
            gj = gxy[:, 1].long().clamp(0, h - 1)
            ps = p[bi, a_idx, gj, gi]  # [n, 5+K]
            t_wh = wh[t_idx]
            weight = 2.0 - t_wh.prod(-1) / float(img_size * img_size)
            if box_loss == "giou":
                centre = (ps[:, :2].sigmoid() + torch.stack([gi, gj], 1)) * stride
                size = ps[:, 2:4].clamp(max=MAX_LOG_SCALE).exp() * scale_anchors[a_idx]
                pred_box = torch.cat([centre - size / 2, centre + size / 2], 1)
                box = generalized_box_iou_loss(pred_box, xyxy[t_idx], reduction="none")
            else:
                offset = gxy - torch.stack([gi, gj], 1)
                log_scale = torch.log(t_wh / scale_anchors[a_idx])
                box = F.binary_cross_entropy_with_logits(ps[:, :2], offset, reduction="none").sum(1)
                box = box + ((ps[:, 2:4] - log_scale) ** 2).sum(1)
            loss_box = loss_box + (weight * box).sum()
            onehot = F.one_hot(cls[t_idx], num_classes).float()
            loss_cls = loss_cls + F.binary_cross_entropy_with_logits(ps[:, 5:], onehot, reduction="sum")
            obj_target[bi, a_idx, gj, gi] = 1.0
        counted = (~ignore) | (obj_target > 0)
        obj = F.binary_cross_entropy_with_logits(p[..., 4], obj_target, reduction="none")
        loss_obj = loss_obj + (obj * counted).sum()

    n = float(max(batch_size, 1))
    return {
        "loss_box": loss_box * (gains["box"] / n),
        "loss_obj": loss_obj * (gains["obj"] / n),
        "loss_cls": loss_cls * (gains["cls"] / n),
    }
