"""The YOLOv3 detector as a torchvision-style detection model.

Built by ``fedplug_build_model`` (:func:`build_yolov3`); trained and
evaluated by the shared detector engine (``fedplug_plugins.detectors.engine``)
exactly like torchvision's detection models:

* train mode: ``model(images, targets) -> {"loss_box", "loss_obj", "loss_cls"}``;
* eval mode: ``model(images) -> [{"boxes", "scores", "labels"}, ...]``.

``images`` are ``[C,H,W]`` float tensors in [0, 1] of any size; targets hold
``boxes`` (xyxy float pixels of that image) and ``labels`` (int64, 1..K).  The
model letterboxes every image to ``img_size`` itself and maps detections back
to each input image's own pixels, so callers never resize.

Only weights travel: anchors are non-persistent buffers, rebuilt from the
config on every side, so ``state_dict()`` holds parameters and BatchNorm
buffers alone.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .decode import postprocess, split_raw
from .letterbox import boxes_to_input, boxes_to_original, letterbox
from .loss import yolo_loss
from .network import DarknetConv, build_body
from .settings import YOLOv3Settings, parse_settings


class YOLOv3(nn.Module):
    """YOLOv3 (``darknet53``), YOLOv3-tiny (``tiny``) or the CPU ``nano`` variant."""

    def __init__(self, settings: YOLOv3Settings):
        super().__init__()
        self.settings = settings
        per_scale = tuple(len(m) for m in settings.anchor_masks)
        self.body = build_body(settings.variant, per_scale, settings.num_classes, settings.bn_momentum)
        anchors = torch.tensor(settings.anchors, dtype=torch.float32)
        self.register_buffer("anchors", anchors, persistent=False)
        self._init_output_biases()

    # -- construction -----------------------------------------------------

    def _init_output_biases(self) -> None:
        """Start objectness and class probabilities near their priors, not at 0.5.

        With zero biases every one of the thousands of cells starts at
        p(object) = 0.5 and the first steps only push objectness down; starting
        near "a few objects per image" (``8 / cells``, the prior of Ultralytics'
        YOLOv3) and ``0.6 / K`` for classes lets the first steps learn boxes.
        """
        k = self.settings.num_classes
        for conv, stride in zip(self.output_convs(), self.settings.strides):
            cells = (self.settings.img_size / stride) ** 2
            with torch.no_grad():
                b = conv.bias.view(-1, 5 + k)
                b[:, 4] = math.log(8.0 / cells)
                b[:, 5:] = math.log(0.6 / max(k - 0.99, 0.01))

    def darknet_convs(self) -> list[DarknetConv]:
        """The convolutions in Darknet ``.weights`` order (see :mod:`.darknet_weights`)."""
        return self.body.darknet_convs()

    def num_darknet_layers(self) -> int:
        """The number of cfg sections (107 for darknet53, 24 for tiny, 22 for nano): the largest cutoff."""
        return int(self.body.num_layers)

    def output_convs(self) -> list[nn.Conv2d]:
        """The linear 1x1 convs feeding the YOLO layers, coarsest scale first."""
        return [c.conv for c in self.darknet_convs() if c.is_output]

    def anchors_per_scale(self) -> list[torch.Tensor]:
        return [self.anchors[list(m)] for m in self.settings.anchor_masks]

    # -- forward ----------------------------------------------------------

    def forward(
        self,
        images: Sequence[torch.Tensor] | torch.Tensor,
        targets: Sequence[Mapping[str, torch.Tensor]] | None = None,
    ):
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            images = list(images)
        images = list(images)
        batch, placements = letterbox(images, self.settings.img_size)
        raw = self.body(batch)
        if self.training:
            if targets is None:
                raise ValueError("YOLOv3 in train mode needs targets: model(images, targets)")
            return self.loss(raw, self._targets_on_input(targets, placements), len(images))
        return self._detections(raw, placements)

    def loss(self, raw: list[torch.Tensor], targets: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
        s = self.settings
        return yolo_loss(
            raw, targets, batch_size, self.anchors, s.anchor_masks, s.strides, s.img_size,
            s.num_classes, s.ignore_threshold, s.box_loss, dict(s.loss_gains),
        )

    def losses_and_detections(
        self, images: Sequence[torch.Tensor], targets: Sequence[Mapping[str, torch.Tensor]]
    ) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
        """Loss and detections of one forward pass, in whatever mode the model is in.

        For evaluation (call under ``torch.no_grad()`` with the model in eval
        mode): the test loss then uses BatchNorm's running statistics, like the
        detections, instead of switching to train mode to get a loss.
        """
        images = list(images)
        batch, placements = letterbox(images, self.settings.img_size)
        raw = self.body(batch)
        losses = self.loss(raw, self._targets_on_input(targets, placements), len(images))
        return losses, self._detections(raw, placements)

    def _detections(self, raw: list[torch.Tensor], placements) -> list[dict[str, torch.Tensor]]:
        s = self.settings
        dets = postprocess(
            raw, self.anchors_per_scale(), s.strides, s.conf_threshold, s.nms_iou,
            s.max_detections, s.pre_nms_topk,
        )
        for det, place in zip(dets, placements):
            det["boxes"] = boxes_to_original(det["boxes"], place)
            det["labels"] = det["labels"] + 1  # torchvision convention: 0 is background
        return dets

    def _targets_on_input(self, targets, placements) -> torch.Tensor:
        """Rows ``(image, class 0..K-1, x1, y1, x2, y2)`` in letterboxed input pixels."""
        if len(targets) != len(placements):
            raise ValueError(f"YOLOv3 got {len(placements)} images but {len(targets)} targets")
        k = self.settings.num_classes
        rows = []
        for i, (t, place) in enumerate(zip(targets, placements)):
            boxes = torch.as_tensor(t["boxes"], dtype=torch.float32).reshape(-1, 4)
            labels = torch.as_tensor(t["labels"]).reshape(-1)
            if len(labels) != len(boxes):
                raise ValueError(f"target {i}: {len(boxes)} boxes but {len(labels)} labels")
            if labels.numel() and (labels.min() < 1 or labels.max() > k):
                raise ValueError(
                    f"target {i}: labels must be within 1..{k} (0 is background), "
                    f"got {sorted(set(labels.tolist()))}"
                )
            bad = ~(boxes[:, 2:] > boxes[:, :2]).all(1)
            if bad.any():
                raise ValueError(
                    f"target {i}: every box needs x2 > x1 and y2 > y1 (xyxy pixels), got "
                    f"{boxes[bad][:3].tolist()}"
                )
            on_input = boxes_to_input(boxes.to(self.anchors.device), place)
            idx = torch.full((len(boxes), 1), float(i), device=on_input.device)
            cls = (labels.to(on_input.device).float() - 1).reshape(-1, 1)
            rows.append(torch.cat([idx, cls, on_input], 1))
        return torch.cat(rows, 0) if rows else torch.zeros(0, 6, device=self.anchors.device)

    def raw_outputs(self, batch: torch.Tensor) -> list[torch.Tensor]:
        """The network's maps for an already letterboxed ``[B,3,S,S]`` batch, as ``[B,A,H,W,5+K]``."""
        return [split_raw(r, len(m)) for r, m in zip(self.body(batch), self.settings.anchor_masks)]


def build_yolov3(config: Mapping[str, Any], num_classes: int) -> YOLOv3:
    """Build the model the ``model`` config describes, deterministically for ``config["seed"]``.

    Initialises under a private RNG seeded from the config, so the server and
    every client build bit-identical models without touching the process's
    global random state; then loads ``config["weights"]`` (a local Darknet
    ``.weights`` file) when given.
    """
    settings = parse_settings(config, num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = YOLOv3(settings)
    if settings.weights:
        from .darknet_weights import load_darknet_weights

        load_darknet_weights(
            model, settings.weights, cutoff=settings.weights_cutoff,
            reinit_heads=settings.weights_reinit_heads,
        )
    return model
