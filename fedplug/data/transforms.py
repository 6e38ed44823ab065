"""Training augmentation built from the ``data.augment`` config, applied to train splits only.

Called by :func:`fedplug.data.open_client_data`, which hands the result to the
training dataset as its ``transforms``; test splits are never augmented.
Each transform takes and returns ``(image, target)`` in torchvision's detection
contract and moves the boxes with the pixels.  Randomness comes from torch's
global generator, so a seeded client (and ``DataLoader`` workers, which torch
seeds per worker) is reproducible.

Config keys (all optional)::

    augment:
      hflip: 0.5               # probability of a horizontal flip
      scale_jitter: [0.9, 1.1] # zoom factor range; the canvas keeps its size

Why scale jitter keeps the canvas size: torchvision's detectors resize every
input to a fixed ``min_size``, which would undo a plain resize.  Zooming the
content inside an unchanged canvas (crop when zooming in, pad with the image's
mean colour when zooming out) really changes the objects' apparent size.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from fedplug.data.errors import DatasetError

# A box that loses more than this share of its area to a zoom-in crop is dropped:
# what is left would teach the detector to fire on a sliver of an object.
MIN_VISIBLE_FRACTION = 0.4


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"


class RandomHorizontalFlip:
    """Mirror the image left-right with probability ``p``; boxes ``x0, x1`` become ``W - x1, W - x0``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = float(p)

    def __call__(self, image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        if self.p <= 0 or torch.rand(()) >= self.p:
            return image, target
        width = image.shape[-1]
        boxes = target["boxes"].clone()
        boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
        return image.flip(-1), dict(target, boxes=boxes)

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomScaleJitter:
    """Zoom the content by a factor drawn uniformly from ``[low, high]``, keeping the canvas size.

    ``s > 1``: the image is enlarged and a random ``H x W`` window is cropped;
    boxes are shifted, clipped to the window, and dropped when less than
    :data:`MIN_VISIBLE_FRACTION` of them stays visible.  ``s < 1``: the image is
    shrunk and placed at a random offset on a canvas of its mean colour.
    """

    def __init__(self, low: float = 0.9, high: float = 1.1) -> None:
        self.low, self.high = float(low), float(high)

    def __call__(self, image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        scale = self.low + (self.high - self.low) * float(torch.rand(()))
        _, height, width = image.shape
        new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
        if (new_h, new_w) == (height, width):
            return image, target
        resized = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
        boxes = target["boxes"] * torch.tensor([new_w / width, new_h / height] * 2)
        if new_h >= height and new_w >= width:
            top = int(torch.randint(0, new_h - height + 1, ()))
            left = int(torch.randint(0, new_w - width + 1, ()))
            out = resized[:, top : top + height, left : left + width]
        else:
            # Zooming out (both sides shrink together, since one scale serves both).
            top = -int(torch.randint(0, height - new_h + 1, ()))
            left = -int(torch.randint(0, width - new_w + 1, ()))
            out = image.mean(dim=(1, 2), keepdim=True).expand(-1, height, width).clone()
            out[:, -top : -top + new_h, -left : -left + new_w] = resized
        shifted = boxes - torch.tensor([left, top, left, top], dtype=boxes.dtype)
        clipped = shifted.clone()
        clipped[:, 0::2] = clipped[:, 0::2].clamp(0, width)
        clipped[:, 1::2] = clipped[:, 1::2].clamp(0, height)
        area = (shifted[:, 2] - shifted[:, 0]) * (shifted[:, 3] - shifted[:, 1])
        visible = (clipped[:, 2] - clipped[:, 0]).clamp(min=0) * (clipped[:, 3] - clipped[:, 1]).clamp(min=0)
        keep = (visible > 0) & (visible >= MIN_VISIBLE_FRACTION * area)
        new_target = dict(target)
        new_target["boxes"] = clipped[keep]
        for key in ("labels", "difficult"):
            if key in target:
                new_target[key] = target[key][keep]
        return out.contiguous(), new_target

    def __repr__(self) -> str:
        return f"RandomScaleJitter({self.low}, {self.high})"


AUGMENT_KEYS = ("hflip", "scale_jitter")


def build_train_transforms(augment: Mapping[str, Any] | None) -> Compose | None:
    """The training augmentation described by ``augment`` (``data.augment``), or ``None`` for none.

    :raises DatasetError: an unknown key or a value out of range, naming the
        ``data.augment`` key to fix.
    """
    if not augment:
        return None
    unknown = sorted(set(augment) - set(AUGMENT_KEYS))
    if unknown:
        raise DatasetError(f"data.augment has unknown key(s) {unknown}; known: {list(AUGMENT_KEYS)}")
    transforms: list = []
    hflip = augment.get("hflip")
    if hflip is not None and hflip is not False:
        try:
            p = float(hflip)
        except (TypeError, ValueError):
            raise DatasetError(f"data.augment.hflip must be a probability in [0, 1], got {hflip!r}") from None
        if not 0.0 <= p <= 1.0:
            raise DatasetError(f"data.augment.hflip must be a probability in [0, 1], got {hflip!r}")
        if p > 0:
            transforms.append(RandomHorizontalFlip(p))
    jitter = augment.get("scale_jitter")
    if jitter is not None and jitter is not False:
        try:
            low, high = (float(v) for v in jitter)
        except (TypeError, ValueError):
            raise DatasetError(
                f"data.augment.scale_jitter must be a pair [low, high] such as [0.9, 1.1], got {jitter!r}"
            ) from None
        if not 0.0 < low <= high:
            raise DatasetError(f"data.augment.scale_jitter needs 0 < low <= high, got {jitter!r}")
        if (low, high) != (1.0, 1.0):
            transforms.append(RandomScaleJitter(low, high))
    return Compose(transforms) if transforms else None
