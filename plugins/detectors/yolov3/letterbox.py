"""Letterboxing: any-size images to the square network input, and boxes back.

Called by :meth:`~.model.YOLOv3.forward` on every batch.  As in Darknet,
an image is scaled so that its longer side becomes ``img_size`` (aspect
ratio kept) and centred on a grey (0.5) square; target boxes follow the same
scale and offset, and detections are mapped back to each input image's own
pixel coordinates.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F


class Placement(NamedTuple):
    """Where one image landed on the square input: ``input = original * scale + (left, top)``."""

    scale: float
    left: int
    top: int
    height: int  # the original image's size
    width: int


def letterbox(images: Sequence[torch.Tensor], size: int) -> tuple[torch.Tensor, list[Placement]]:
    """Stack ``[C,H,W]`` images (values in [0, 1]) into one ``[B,3,size,size]`` batch."""
    batch = images[0].new_full((len(images), 3, size, size), 0.5) if images else None
    if batch is None:
        raise ValueError("YOLOv3 got an empty list of images")
    placements = []
    for i, img in enumerate(images):
        if img.dim() != 3 or img.shape[0] not in (1, 3):
            raise ValueError(
                f"YOLOv3 expects images as [C,H,W] tensors with C = 1 or 3, got shape {tuple(img.shape)}"
            )
        if not img.is_floating_point():
            raise ValueError(
                f"YOLOv3 expects float images with values in [0, 1], got dtype {img.dtype} "
                "(convert with torchvision.transforms.v2.functional.to_dtype(img, scale=True))"
            )
        h, w = int(img.shape[1]), int(img.shape[2])
        scale = size / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        if (nh, nw) != (h, w):
            img = F.interpolate(img[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
        top, left = (size - nh) // 2, (size - nw) // 2
        batch[i, :, top : top + nh, left : left + nw] = img  # a grey image broadcasts to 3 channels
        placements.append(Placement(scale, left, top, h, w))
    return batch, placements


def boxes_to_input(boxes: torch.Tensor, p: Placement) -> torch.Tensor:
    """Original-image xyxy pixels -> letterboxed input pixels."""
    offset = boxes.new_tensor([p.left, p.top, p.left, p.top])
    return boxes * p.scale + offset


def boxes_to_original(boxes: torch.Tensor, p: Placement) -> torch.Tensor:
    """Letterboxed input xyxy pixels -> the original image's pixels, clipped to the image."""
    offset = boxes.new_tensor([p.left, p.top, p.left, p.top])
    out = (boxes - offset) / p.scale
    out[:, 0::2] = out[:, 0::2].clamp(0, p.width)
    out[:, 1::2] = out[:, 1::2].clamp(0, p.height)
    return out
