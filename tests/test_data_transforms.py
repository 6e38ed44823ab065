"""Training augmentation: boxes move with the pixels and stay inside the image."""

from __future__ import annotations

import pytest
import torch

from fedplug.data import DatasetError
from fedplug.data.transforms import (
    Compose,
    RandomHorizontalFlip,
    RandomScaleJitter,
    build_train_transforms,
)

torch.set_num_threads(1)


def _scene(h=60, w=80):
    """A black image with two white rectangles, and their exact boxes."""
    image = torch.zeros(3, h, w)
    boxes = torch.tensor([[10.0, 5.0, 30.0, 25.0], [50.0, 30.0, 75.0, 58.0]])
    for x0, y0, x1, y1 in boxes.int().tolist():
        image[:, y0:y1, x0:x1] = 1.0
    target = {
        "boxes": boxes,
        "labels": torch.tensor([1, 2]),
        "difficult": torch.tensor([False, True]),
        "image_id": torch.tensor(3),
    }
    return image, target


def _bright_box(image):
    ys, xs = torch.nonzero(image[0] > 0.5, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_hflip_moves_boxes_with_the_pixels():
    image, target = _scene()
    flipped, out = RandomHorizontalFlip(p=1.0)(image, target)
    assert torch.equal(flipped, image.flip(-1))
    assert out["boxes"].tolist() == [[50.0, 5.0, 70.0, 25.0], [5.0, 30.0, 30.0, 58.0]]
    for box in out["boxes"].int().tolist():  # each flipped box frames its flipped rectangle exactly
        x0, y0, x1, y1 = box
        assert _bright_box(flipped[:, y0:y1, x0:x1]) == [0, 0, x1 - x0, y1 - y0]
    assert out["labels"].tolist() == [1, 2] and int(out["image_id"]) == 3
    assert target["boxes"][0, 0] == 10.0  # the input target is not modified
    same, kept = RandomHorizontalFlip(p=0.0)(image, target)
    assert same is image and kept is target


def test_hflip_probability_is_respected():
    torch.manual_seed(0)
    image, target = _scene()
    flip = RandomHorizontalFlip(p=0.3)
    flips = sum(not torch.equal(flip(image, target)[0], image) for _ in range(400))
    assert 80 < flips < 160


@pytest.mark.parametrize("scale", [0.6, 0.85, 1.2, 1.5])
def test_scale_jitter_keeps_canvas_and_boxes_inside(scale):
    torch.manual_seed(1)
    image, target = _scene()
    jitter = RandomScaleJitter(scale, scale)
    for _ in range(10):
        out_image, out = jitter(image, target)
        assert out_image.shape == image.shape
        boxes = out["boxes"]
        assert ((boxes[:, 0] >= 0) & (boxes[:, 1] >= 0) & (boxes[:, 2] <= 80) & (boxes[:, 3] <= 60)).all()
        assert ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()
        assert len(out["labels"]) == len(boxes) == len(out["difficult"])
        if scale < 1:  # zoom out: both objects stay, each box frames its (resized) rectangle
            assert len(boxes) == 2
            for box in boxes.tolist():
                x0, y0, x1, y1 = (round(v) for v in box)
                inner = out_image[0, y0 + 1 : y1 - 1, x0 + 1 : x1 - 1]
                assert inner.min() > 0.5  # inside is object
            first = boxes[0]
            assert abs((first[2] - first[0]).item() - 20 * scale) < 1.01


def test_scale_jitter_drops_boxes_that_leave_the_crop():
    image, target = _scene()
    torch.manual_seed(0)
    seen_drop = False
    for _ in range(30):
        _, out = RandomScaleJitter(2.5, 2.5)(image, target)
        seen_drop |= len(out["boxes"]) < 2
        # what remains of a kept box is at least 40% of its zoomed area: no slivers
        full_area = {1: (20 * 2.5) * (20 * 2.5), 2: (25 * 2.5) * (28 * 2.5)}
        for box, label in zip(out["boxes"].tolist(), out["labels"].tolist()):
            assert (box[2] - box[0]) * (box[3] - box[1]) >= 0.4 * full_area[label] - 1e-3
    assert seen_drop


def test_build_from_config():
    t = build_train_transforms({"hflip": 0.5, "scale_jitter": [0.9, 1.1]})
    assert isinstance(t, Compose)
    assert [type(x) for x in t.transforms] == [RandomHorizontalFlip, RandomScaleJitter]
    assert build_train_transforms(None) is None and build_train_transforms({}) is None
    assert build_train_transforms({"hflip": 0.0, "scale_jitter": [1.0, 1.0]}) is None
    assert build_train_transforms({"hflip": None}) is None


@pytest.mark.parametrize(
    "augment, message",
    [
        ({"flip": 0.5}, r"unknown key\(s\) \['flip'\]"),
        ({"hflip": 1.5}, "hflip must be a probability"),
        ({"hflip": "often"}, "hflip must be a probability"),
        ({"scale_jitter": [1.2]}, "scale_jitter must be a pair"),
        ({"scale_jitter": [1.2, 0.8]}, "0 < low <= high"),
        ({"scale_jitter": [0.0, 1.0]}, "0 < low <= high"),
    ],
)
def test_bad_config_is_a_clear_error(augment, message):
    with pytest.raises(DatasetError, match=message):
        build_train_transforms(augment)
