"""The Street JSON and COCO loaders, on tiny files the tests write."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedplug.data import COCODetection, DatasetError, StreetJSONDetection
from fedplug.data.coco import coco_class_names
from fedplug.data.street import street_class_names

torch.set_num_threads(1)

STREET_CLASSES = ("basket", "chair", "table")


def _image(path: Path, w=32, h=24):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(path)


def make_street(root: Path, images_dir="images") -> Path:
    """Six images, device1_id in {1, 2}, device2_id in {10, 11, 12}; test has two."""
    train, test = [], []
    for i in range(8):
        record = {
            "image_id": f"img{i}" + (".jpg" if i % 2 else ""),  # with and without the extension
            "device1_id": 1 + i % 2,
            "device2_id": 10 + i % 3,
            "items": [{"class": STREET_CLASSES[i % 3], "bbox": [1, 2, 11.5, 12]}]
            + ([{"class": "table", "bbox": [3, 3, 9, 9], "difficult": 1}] if i == 0 else []),
        }
        (train if i < 6 else test).append(record)
        _image(root / images_dir / f"img{i}.jpg")
    (root / "train_label.json").write_text(json.dumps(train))
    (root / "test_label.json").write_text(json.dumps(test))
    return root


def test_street_json_loads_boxes_classes_and_device_ids(tmp_path):
    root = make_street(tmp_path / "street")
    ds = StreetJSONDetection(root, "train", STREET_CLASSES)
    assert len(ds) == 6 and StreetJSONDetection(root, "test", STREET_CLASSES).__len__() == 2
    image, target = ds[0]
    assert image.shape == (3, 24, 32)
    assert target["boxes"].tolist() == [[1.0, 2.0, 11.5, 12.0], [3.0, 3.0, 9.0, 9.0]]  # taken as is
    assert target["labels"].tolist() == [1, 3] and target["difficult"].tolist() == [False, True]
    assert ds[1][1]["labels"].tolist() == [2]
    assert ds.group_keys("device1_id") == [1, 2, 1, 2, 1, 2]
    assert ds.group_keys("device2_id") == [10, 11, 12, 10, 11, 12]
    assert StreetJSONDetection(root, "train", STREET_CLASSES, drop_difficult=True).annotation(0)["labels"].tolist() == [1]
    assert street_class_names(root) == STREET_CLASSES


def test_street_json_finds_other_image_folder_names(tmp_path):
    root = make_street(tmp_path / "s", images_dir="JPEGImages")
    assert len(StreetJSONDetection(root, "train", STREET_CLASSES)) == 6
    root2 = make_street(tmp_path / "s2", images_dir="pics")
    assert len(StreetJSONDetection(root2, "train", STREET_CLASSES, images_dir="pics")) == 6
    with pytest.raises(DatasetError, match=r"no images folder under .*s2.*data\.images_dir"):
        StreetJSONDetection(root2, "train", STREET_CLASSES)


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda r: (r / "train_label.json").unlink(), r"train_label\.json is missing"),
        (lambda r: (r / "train_label.json").write_text("{not json"), "not readable JSON"),
        (lambda r: (r / "train_label.json").write_text('{"a": 1}'), "must hold a JSON list"),
        (lambda r: (r / "train_label.json").write_text('[{"items": []}]'), r"entry 0: expected \{image_id"),
        (lambda r: (r / "train_label.json").write_text('[{"image_id": "img0", "items": [{"class": "sofa", "bbox": [1,1,2,2]}]}]'),
         r"class 'sofa' is not one of the run's classes"),
        (lambda r: (r / "train_label.json").write_text('[{"image_id": "img0", "items": [{"class": "chair"}]}]'),
         r"needs bbox"),
        (lambda r: (r / "images" / "img3.jpg").unlink(), r"no image .*img3"),
    ],
    ids=["missing", "bad-json", "not-a-list", "no-image-id", "unknown-class", "no-bbox", "missing-image"],
)
def test_street_json_errors_are_clear(tmp_path, breakage, message):
    root = make_street(tmp_path / "street")
    breakage(root)
    with pytest.raises(DatasetError, match=message):
        StreetJSONDetection(root, "train", STREET_CLASSES)


def make_coco(root: Path, name="train", extra_image_field=True) -> Path:
    images = [{"id": 7, "file_name": "a.jpg", "width": 32, "height": 24},
              {"id": 9, "file_name": "sub/b.png", "width": 32, "height": 24},
              {"id": 11, "file_name": "c.jpg", "width": 32, "height": 24}]
    if extra_image_field:
        for img, cam in zip(images, ["north", "south", "north"]):
            img["location"] = cam
    for img in images:
        _image(root / name / img["file_name"])
    data = {
        "images": images,
        # listed out of id order on purpose: labels follow category id order
        "categories": [{"id": 5, "name": "truck"}, {"id": 2, "name": "bus"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 5, "bbox": [2, 3, 10, 5], "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 2, "bbox": [1, 1, 4, 4], "iscrowd": 1},
            {"id": 3, "image_id": 9, "category_id": 2, "bbox": [0.5, 0, 8, 8]},
            {"id": 4, "image_id": 9, "category_id": 5, "bbox": [3, 3, 0, 5]},  # zero width: dropped
        ],
    }
    ann = root / "annotations" / f"{name}.json"
    ann.parent.mkdir(parents=True, exist_ok=True)
    ann.write_text(json.dumps(data))
    return ann


def test_coco_maps_categories_and_boxes(tmp_path):
    ann = make_coco(tmp_path)
    assert coco_class_names(ann) == ("bus", "truck")
    with pytest.warns(UserWarning, match="dropped 1 degenerate"):
        ds = COCODetection(ann, tmp_path / "train")
    assert ds.class_names == ("bus", "truck") and len(ds) == 3
    _, target = ds[0]
    assert target["boxes"].tolist() == [[2.0, 3.0, 12.0, 8.0], [1.0, 1.0, 5.0, 5.0]]  # xywh -> xyxy
    assert target["labels"].tolist() == [2, 1]
    assert target["difficult"].tolist() == [False, True]  # iscrowd
    image, target = ds[1]
    assert target["labels"].tolist() == [1] and image.shape == (3, 24, 32)
    assert ds.annotation(2)["boxes"].shape == (0, 4)  # an image without annotations stays as a negative
    assert ds.group_keys("location") == ["north", "south", "north"]
    with pytest.raises(DatasetError, match="no group key 'camera'"):
        ds.group_keys("camera")


def test_coco_follows_the_runs_class_order(tmp_path):
    ann = make_coco(tmp_path)
    with pytest.warns(UserWarning):
        ds = COCODetection(ann, tmp_path / "train", class_names=("truck", "car", "bus"))
    assert ds.annotation(0)["labels"].tolist() == [1, 3]
    with pytest.raises(DatasetError, match=r"category 'bus' \(id 2\) is not one of"):
        COCODetection(ann, tmp_path / "train", class_names=("truck",))


def test_coco_errors_are_clear(tmp_path):
    ann = make_coco(tmp_path)
    with pytest.raises(DatasetError, match="missing"):
        COCODetection(tmp_path / "nope.json", tmp_path / "train")
    with pytest.raises(DatasetError, match="images folder .* does not exist"):
        COCODetection(ann, tmp_path / "nowhere")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(DatasetError, match="lists 'images', 'annotations' and 'categories'"):
        COCODetection(bad, tmp_path / "train")
    data = json.loads(ann.read_text())
    data["annotations"][0]["image_id"] = 999
    bad.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="unknown image 999"):
        COCODetection(bad, tmp_path / "train")
    (tmp_path / "train" / "a.jpg").unlink()
    with pytest.raises(DatasetError, match=r"a\.jpg is missing"):
        COCODetection(ann, tmp_path / "train")
