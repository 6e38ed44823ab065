"""Silent data problems get a message: no objects, odd device ids, boxes off the image, bad coordinates, BOMs, class case."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedplug.data import (
    COCODetection,
    DatasetError,
    StreetJSONDetection,
    VOCDetection,
    class_names_of,
    open_client_data,
    prepare_federation,
)
from fedplug.data.partition import group_assignment

torch.set_num_threads(1)


def street(root: Path, train: list[dict], test: list[dict] | None = None, size=(24, 20)) -> Path:
    """A Street JSON folder with one small JPEG per entry."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for entry in train + (test or []):
        Image.fromarray(np.zeros((size[1], size[0], 3), np.uint8)).save(root / "images" / f"{entry['image_id']}.jpg")
    (root / "train_label.json").write_text(json.dumps(train))
    (root / "test_label.json").write_text(json.dumps(test or []))
    return root


def entry(i, device=..., items=None, **extra):
    e = {"image_id": f"im{i}", "items": [{"class": "car", "bbox": [1, 1, 8, 8]}] if items is None else items}
    if device is not ...:
        e["device1_id"] = device
    e.update(extra)
    return e


def street_cfg(root, **extra):
    return dict({"format": "street_json", "root": str(root), "classes": ["car"], "split_key": "device1_id"}, **extra)


# -- 1. a training split without a single object ---------------------------------------------------------


def test_every_items_list_empty_is_an_error(tmp_path):
    root = street(tmp_path / "s", [entry(i, 1 + i % 2, items=[]) for i in range(4)])
    with pytest.raises(DatasetError, match=r"training split has no objects in any of its 4 image\(s\): every entry's 'items' list is empty"):
        prepare_federation(street_cfg(root), 2)


@pytest.mark.parametrize("key", ["objects", "item"])
def test_a_misspelt_items_key_is_named(tmp_path, key):
    records = [{"image_id": f"im{i}", "device1_id": 1, key: [{"class": "car", "bbox": [1, 1, 8, 8]}]} for i in range(3)]
    root = street(tmp_path / "s", records)
    with pytest.raises(DatasetError, match=rf"entry 0 \(image_id 'im0'\): the objects are under '{key}', but the key must be 'items'"):
        StreetJSONDetection(root, "train", ["car"])


def test_entries_without_any_items_key_list_the_keys_found(tmp_path):
    root = street(tmp_path / "s", [{"image_id": f"im{i}", "device1_id": 1, "boxes": "n/a"} for i in range(2)])
    with pytest.raises(DatasetError, match=r"no entry has the key 'items' \(the entries have keys \['boxes', 'device1_id', 'image_id'\]\)"):
        open_client_data({"format": "street_json", "path": str(root)}, ["car"])
    with pytest.raises(DatasetError, match=r"no classes found .*the entries have keys \['boxes', 'device1_id', 'image_id'\]"):
        class_names_of({"format": "street_json", "root": str(root)})


def test_a_voc_training_split_without_objects_is_an_error(tmp_path):
    root = tmp_path / "v"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    for i in range(2):
        (root / "Annotations" / f"{i}.xml").write_text("<annotation><objct><name>car</name></objct></annotation>")
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "JPEGImages" / f"{i}.jpg")
    (root / "ImageSets/Main/train.txt").write_text("0\n1\n")
    (root / "ImageSets/Main/test.txt").write_text("0\n")
    with pytest.raises(DatasetError, match=r"training split has no objects.*none of its annotations has an <object>"):
        open_client_data({"format": "voc", "path": str(root)}, ["car"])


# -- 2. device ids that would silently remap the cameras ----------------------------------------------------


@pytest.mark.parametrize("odd", [None, "3"], ids=["null", "string"])
def test_a_null_or_string_device_id_among_integers_is_refused(tmp_path, odd):
    records = [entry(i, 1 + i % 3) for i in range(6)] + [entry(6, odd)]
    root = street(tmp_path / "s", records)
    kind = "null" if odd is None else "a string"
    with pytest.raises(DatasetError, match=rf"1 image\(s\) have a device1_id that is {kind} while the others are "
                                           rf"numbers: 'im6': {odd!r}.*fix those entries"):
        prepare_federation(street_cfg(root), 3)


def test_integer_devices_in_train_and_string_devices_in_test_are_refused(tmp_path):
    root = street(tmp_path / "s", [entry(i, 1 + i % 2) for i in range(4)],
                  [entry(10, "1"), entry(11, "2")])
    with pytest.raises(DatasetError, match=r"device1_id that is a string while the others are numbers: 'im10': '1', 'im11': '2'"):
        prepare_federation(street_cfg(root), 2)


def test_group_assignment_itself_refuses_mixed_values():
    with pytest.raises(DatasetError, match="null"):
        group_assignment({1: 3, 2: 3, None: 1}, 2)
    assert group_assignment({"a": 1, "b": 1}, 2) == {"a": 0, "b": 1}


# -- 3. boxes partly or wholly outside the image ------------------------------------------------------------


def test_boxes_outside_the_image_are_clipped_or_dropped_with_a_warning_and_not_counted(tmp_path):
    items = [
        {"class": "car", "bbox": [-6, 2, 10, 10]},    # partly outside: clipped to x0 = 0
        {"class": "car", "bbox": [30, 30, 40, 40]},   # wholly outside a 24x20 image: dropped
        {"class": "car", "bbox": [20, 15, 24.5, 20]},  # half a pixel over: rounding, clipped quietly
    ]
    root = street(tmp_path / "s", [entry(0, 1, items=items), entry(1, 2)])
    with pytest.warns(UserWarning) as record:
        fed = prepare_federation(street_cfg(root), 2)
    messages = [str(w.message) for w in record if "outside" in str(w.message)]
    assert messages and "1 box(es) partly outside their image were clipped" in messages[0]
    assert "1 wholly outside were dropped" in messages[0] and "im0 [30.0, 30.0, 40.0, 40.0] in 24x20" in messages[0]
    with pytest.warns(UserWarning, match="outside"):  # the client process warns too, in its own log
        data = open_client_data(fed.client_specs[0], fed.class_names)
    assert data.train.annotation(0)["boxes"].tolist() == [[0.0, 2.0, 10.0, 10.0], [20.0, 15.0, 24.0, 20.0]]
    train_table = fed.summary.split("test split")[0]
    assert [line.split() for line in train_table.splitlines()][2:] == [
        ["device_1", "1", "2"], ["device_2", "1", "1"], ["total", "2", "3"]]  # counts what is used


def test_a_box_slightly_over_the_edge_gives_no_warning(tmp_path):
    root = street(tmp_path / "s", [entry(0, 1, items=[{"class": "car", "bbox": [0, 0, 25, 21]}])])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = StreetJSONDetection(root, "train", ["car"])
    assert ds.annotation(0)["boxes"].tolist() == [[0.0, 0.0, 24.0, 20.0]]


# -- 4. coordinates that are not finite numbers -------------------------------------------------------------


@pytest.mark.parametrize("bad", ["nan", "12", float("nan"), float("inf"), None, True], ids=repr)
def test_a_non_numeric_street_coordinate_names_image_and_value(tmp_path, bad):
    root = street(tmp_path / "s", [entry(0, 1, items=[{"class": "car", "bbox": [1, bad, 8, 8]}])])
    with pytest.raises(DatasetError, match=r"image 'im0': bbox must be 4 finite numbers \[xmin, ymin, xmax, ymax\].*"
                                           + re.escape(f"(bad value {bad!r})")):
        StreetJSONDetection(root, "train", ["car"])


def test_a_short_bbox_is_an_error(tmp_path):
    root = street(tmp_path / "s", [entry(0, 1, items=[{"class": "car", "bbox": [1, 2, 8]}])])
    with pytest.raises(DatasetError, match=r"bbox must be 4 finite numbers .*got \[1, 2, 8\]"):
        StreetJSONDetection(root, "train", ["car"])


def _voc(root: Path, objects: str, split_text: str = "a\n") -> Path:
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "Annotations" / "a.xml").write_text(f"<annotation>{objects}</annotation>")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(root / "JPEGImages" / "a.jpg")
    (root / "ImageSets/Main/train.txt").write_bytes(split_text.encode("utf-8"))
    return root


def _obj(name="car", xmin="2"):
    return (f"<object><name>{name}</name><bndbox><xmin>{xmin}</xmin><ymin>2</ymin><xmax>9</xmax>"
            "<ymax>9</ymax></bndbox></object>")


def test_a_nan_voc_coordinate_names_the_annotation_and_value(tmp_path):
    root = _voc(tmp_path / "v", _obj(xmin="nan"))
    with pytest.raises(DatasetError, match=r"a\.xml, object 'car': <xmin> must be a finite number, got 'nan'"):
        VOCDetection(root, "train", ["car"])


def test_a_string_coco_coordinate_is_an_error(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "imgs" / "a.png")
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}], "categories": [{"id": 1, "name": "bus"}],
                               "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, "nan", 5, 5]}]}))
    with pytest.raises(DatasetError, match=r"image 1: bbox must be 4 finite numbers \[x, y, w, h\].*bad value 'nan'"):
        COCODetection(ann, tmp_path / "imgs")


# -- 5. a split file with a UTF-8 byte-order mark ------------------------------------------------------------


def test_a_split_file_with_a_byte_order_mark_is_read(tmp_path):
    root = _voc(tmp_path / "v", _obj(), split_text="\ufeffa\r\n")
    ds = VOCDetection(root, "train", ["car"])
    assert len(ds) == 1 and ds.image_name(0) == "a"


def test_label_files_with_a_byte_order_mark_are_read(tmp_path):
    root = street(tmp_path / "s", [entry(0, 1)])
    path = root / "train_label.json"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert len(StreetJSONDetection(root, "train", ["car"])) == 1


# -- 6. class names that differ only in case -----------------------------------------------------------------


def test_voc_classes_differing_only_in_case_are_refused(tmp_path):
    root = _voc(tmp_path / "v", _obj("Buoy") + _obj("buoy") + _obj("boat"))
    with pytest.raises(DatasetError, match=r"differ only in letter case: 'Buoy' / 'buoy'.*Fix the annotations.*data\.classes"):
        class_names_of({"format": "voc", "root": str(root)})


def test_street_classes_differing_only_in_case_are_refused(tmp_path):
    items = [{"class": "Chair", "bbox": [1, 1, 5, 5]}, {"class": "chair", "bbox": [1, 1, 5, 5]}]
    root = street(tmp_path / "s", [entry(0, 1, items=items)])
    with pytest.raises(DatasetError, match=r"'Chair' / 'chair'"):
        class_names_of({"format": "street_json", "root": str(root)})
    with pytest.raises(DatasetError, match=r"'Chair' / 'chair'"):
        prepare_federation(street_cfg(root, classes=None), 1)


def test_a_listed_class_in_another_case_gets_a_hint(tmp_path):
    root = _voc(tmp_path / "v", _obj("Buoy"))
    with pytest.raises(DatasetError, match=r"class 'Buoy'.*did you mean 'buoy'\? the letter case differs"):
        VOCDetection(root, "train", ["buoy"])
