"""Unreadable images are caught at start-up (data.on_bad_image=fail) or left out and counted (skip)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedplug.data import DatasetError, VOCDetection, generate_synthetic_federation, open_client_data, prepare_federation
from fedplug.data.images import probe_image

torch.set_num_threads(1)

CLASSES = ("car", "person", "sign")


def corrupt(path: Path, how: str) -> None:
    if how == "garbage":
        path.write_bytes(b"\x00not a jpeg at all\xff" * 20)
    else:  # truncated: a real JPEG cut short, as an interrupted copy leaves it
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad") / "sites"
    generate_synthetic_federation(root, num_clients=2, train_per_client=6, test_per_client=2, image_size=64)
    return root


@pytest.fixture
def sites(pristine, tmp_path):
    root = tmp_path / "sites"
    shutil.copytree(pristine, root)
    return root


def _train_image(sites: Path, camera: int, index: int) -> Path:
    folder = sites / f"camera_{camera:02d}"
    image_id = (folder / "ImageSets/Main/train.txt").read_text().split()[index]
    return next((folder / "JPEGImages").glob(f"{image_id}.*"))


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_a_corrupt_image_fails_at_start_up_naming_it(sites, how):
    bad = _train_image(sites, 1, 2)
    corrupt(bad, how)
    with pytest.raises(DatasetError) as info:
        prepare_federation({"format": "voc", "root": str(sites), "classes": list(CLASSES)}, 2)
    message = str(info.value)
    assert str(bad) in message and "1 image(s) cannot be decoded" in message
    assert "data.on_bad_image=skip" in message and "Fix or remove" in message


def test_many_bad_images_are_listed_first_few_and_counted(sites):
    for i in range(5):
        corrupt(_train_image(sites, 0, i), "garbage")
    with pytest.raises(DatasetError, match=r"5 image\(s\) cannot be decoded: .*; \.\.\. and 2 more"):
        VOCDetection(sites / "camera_00", "train", CLASSES)


def test_skip_drops_them_with_one_warning_and_counts_them_per_client(sites):
    corrupt(_train_image(sites, 1, 0), "garbage")
    corrupt(_train_image(sites, 1, 3), "truncated")
    cfg = {"format": "voc", "root": str(sites), "classes": list(CLASSES), "on_bad_image": "skip"}
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image\(s\)"):
        fed = prepare_federation(cfg, 2)
    skipped = [line for line in fed.summary.splitlines() if line.startswith("skipped")]
    assert skipped == ["skipped unreadable images (train, data.on_bad_image=skip): camera_01 2"]
    train_table = fed.summary.split("test split")[0]
    assert [line.split()[1] for line in train_table.splitlines() if line.startswith("camera_")] == ["6", "4"]
    assert all(spec["on_bad_image"] == "skip" for spec in fed.client_specs)  # reaches the client processes
    with pytest.warns(UserWarning, match="skipped 2"):
        data = open_client_data(fed.client_specs[1], fed.class_names)
    assert len(data.train) == 4 and len(data.train.skipped) == 2
    for i in range(len(data.train)):
        data.train[i]  # every image left decodes
    # the same spec with the default policy refuses, as the client would without the key
    with pytest.raises(DatasetError, match="cannot be decoded"):
        open_client_data({k: v for k, v in fed.client_specs[1].items() if k != "on_bad_image"}, fed.class_names)


def test_skipped_images_of_a_shared_out_dataset_are_counted_by_device(tmp_path):
    root = tmp_path / "street"
    (root / "images").mkdir(parents=True)
    entries = []
    for i in range(6):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "images" / f"{i}.jpg")
        entries.append({"image_id": str(i), "device1_id": 1 + i % 3, "items": [{"class": "car", "bbox": [1, 1, 8, 8]}]})
    (root / "train_label.json").write_text(json.dumps(entries))
    (root / "test_label.json").write_text(json.dumps([{"image_id": "0", "items": []}]))
    corrupt(root / "images" / "4.jpg", "garbage")  # device 2
    cfg = {"format": "street_json", "root": str(root), "classes": ["car"], "split_key": "device1_id", "on_bad_image": "skip"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fed = prepare_federation(cfg, 3)
    assert "skipped unreadable images (train, data.on_bad_image=skip): device_2 1" in fed.summary


def test_on_bad_image_must_be_fail_or_skip(sites):
    with pytest.raises(DatasetError, match=r"data\.on_bad_image is 'ignore'; choose one of \['fail', 'skip'\]"):
        prepare_federation({"format": "voc", "root": str(sites), "on_bad_image": "ignore"}, 2)
    with pytest.raises(DatasetError, match=r"client\.data\.on_bad_image is 'warn'"):
        open_client_data({"format": "voc", "path": str(sites / "camera_00"), "on_bad_image": "warn"}, CLASSES)


def test_an_image_broken_mid_run_is_a_dataset_error_naming_it(sites):
    ds = VOCDetection(sites / "camera_00", "train", CLASSES)
    path = ds.records[1].path
    corrupt(path, "garbage")
    with pytest.raises(DatasetError, match=rf"cannot read image {path}.*changed or removed during the run"):
        ds[1]
    path.unlink()
    with pytest.raises(DatasetError, match=rf"cannot read image {path}"):
        ds[1]


def test_verdicts_are_cached_but_a_rewritten_file_is_checked_again(tmp_path):
    path = tmp_path / "a.jpg"
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(path)
    assert probe_image(path) == (12, 10)
    assert probe_image(path) == (12, 10)
    corrupt(path, "garbage")  # new size (and mtime): not the cached verdict
    assert isinstance(probe_image(path), str)
    assert "cannot open" in probe_image(tmp_path / "missing.jpg")
