"""The core's entry points into data: configs, prepare_federation, open_client_data, class_names_of."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from PIL import Image

from fedplug.data import (
    ClientData,
    DatasetError,
    DetectionSubset,
    class_names_of,
    detection_collate,
    generate_synthetic_federation,
    open_client_data,
    prepare_federation,
)

torch.set_num_threads(1)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "data"
DATA_CONFIGS = ["synthetic", "voc", "street5", "street20", "coco"]


def _compose(*overrides):
    with initialize_config_module("fedplug.conf", version_base=None):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("name", DATA_CONFIGS)
def test_every_data_config_composes_and_says_how_to_select_it(name):
    text = (CONF_DIR / f"{name}.yaml").read_text()
    assert text.startswith("#") and f"data={name}" in text.splitlines()[0] + text.splitlines()[1]
    cfg = _compose(f"data={name}")
    assert cfg.data.name == name
    assert cfg.data.format in ("auto", "synthetic", "voc", "street_json", "coco")
    assert cfg.data.on_bad_image == "fail"  # every data config states the unreadable-image policy
    if name != "synthetic":
        assert OmegaConf.is_missing(cfg.data, "root")  # mandatory: the user's copy


def test_synthetic_default_works_with_no_arguments(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPLUG_CACHE", str(tmp_path / "cache"))
    cfg = _compose("data.train_per_client=6", "data.test_per_client=3")  # the default data group, smaller
    assert cfg.data.name == "synthetic"
    fed = prepare_federation(cfg.data, int(cfg.run.num_clients))
    assert fed.class_names == ("car", "person", "sign")
    assert fed.client_names == ["camera_00", "camera_01", "camera_02"]
    assert len(fed.client_specs) == cfg.run.num_clients == 3
    for spec in fed.client_specs:
        assert spec["format"] == "voc" and Path(spec["path"]).is_relative_to(tmp_path / "cache" / "synthetic")
        json.dumps(spec)  # specs travel to client processes: plain JSON
    assert "camera_02" in fed.summary and "person" in fed.summary and "test split" in fed.summary

    data = open_client_data(fed.client_specs[1], fed.class_names, augment=OmegaConf.to_container(cfg.data.augment))
    assert isinstance(data, ClientData) and data.class_names == fed.class_names
    assert (len(data.train), len(data.test)) == (6, 3)
    assert data.train.transforms is not None and data.test.transforms is None  # augment the train split only

    # a second run reuses the cached data; other parameters get their own folder
    again = prepare_federation(cfg.data, 3)
    assert again.client_specs == fed.client_specs
    other = prepare_federation(_compose("data.train_per_client=5", "data.test_per_client=3").data, 2)
    assert other.client_specs[0]["path"] != fed.client_specs[0]["path"]
    assert Path(fed.client_specs[0]["path"]).is_dir()  # ... and never pulls the first run's data away


def test_mandatory_root_is_a_clear_error():
    for name in ("street5", "voc", "coco"):
        with pytest.raises(DatasetError, match=r"data\.root is not set.*data=street5 data\.root="):
            prepare_federation(_compose(f"data={name}").data, 5)


@pytest.fixture(scope="module")
def cameras(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc") / "sites"
    generate_synthetic_federation(root, num_clients=3, train_per_client=8, test_per_client=3)
    return root


def test_voc_per_client_folders(cameras):
    cfg = {"format": "voc", "root": str(cameras), "classes": None, "augment": {"hflip": 0.5}}
    assert class_names_of(cfg) == ("car", "person", "sign")  # inferred from the annotations, sorted
    fed = prepare_federation(cfg, 3)
    assert [Path(s["path"]).name for s in fed.client_specs] == ["camera_00", "camera_01", "camera_02"]
    assert fed.client_names == ["camera_00", "camera_01", "camera_02"]
    with pytest.raises(DatasetError, match=r"holds 3 client folder\(s\).*run\.num_clients=2.*run\.num_clients=3"):
        prepare_federation(cfg, 2)
    picked = prepare_federation(dict(cfg, clients=["camera_00", "camera_02"]), 2)
    assert [Path(s["path"]).name for s in picked.client_specs] == ["camera_00", "camera_02"]
    assert len(prepare_federation(cfg, None).client_specs) == 3  # None: as many as the folders


def test_voc_malformed_client_fails_at_start_up(cameras, tmp_path):
    import shutil

    root = tmp_path / "sites"
    shutil.copytree(cameras, root)
    bad = root / "camera_01" / "Annotations" / "camera_01_00002.xml"
    bad.write_text("<annotation><object><name>car")
    with pytest.raises(DatasetError, match=r"camera_01_00002\.xml is not readable"):
        prepare_federation({"format": "voc", "root": str(root), "classes": ["car", "person", "sign"]}, 3)


def test_one_voc_folder_shared_out_by_partition(cameras):
    cfg = {"format": "voc", "root": str(cameras / "camera_00"), "classes": ["car", "person", "sign"],
           "partition": {"method": "iid", "seed": 3}}
    fed = prepare_federation(cfg, 2)
    assert [s["partition"]["client_index"] for s in fed.client_specs] == [0, 1]
    opened = [open_client_data(s, fed.class_names) for s in fed.client_specs]
    train_names = [{d.train.image_name(i) for i in range(len(d.train))} for d in opened]
    assert not (train_names[0] & train_names[1]) and len(train_names[0] | train_names[1]) == 8
    assert all(isinstance(d.train, DetectionSubset) for d in opened)
    assert sum(len(d.test) for d in opened) == 3
    with pytest.raises(DatasetError, match="run.num_clients must be set"):
        prepare_federation(cfg, None)


def _street(root: Path) -> Path:
    """8 train + 4 test images over device1_id {1, 2} and device2_id {1, 2, 3}."""
    (root / "images").mkdir(parents=True)
    records = []
    for i in range(12):
        Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(root / "images" / f"s{i}.jpg")
        records.append({"image_id": f"s{i}", "device1_id": 1 + i % 2, "device2_id": 1 + i % 3,
                        "items": [{"class": ["chair", "table"][i % 2], "bbox": [1, 1, 9, 9]}]})
    (root / "train_label.json").write_text(json.dumps(records[:8]))
    (root / "test_label.json").write_text(json.dumps(records[8:]))
    return root


def test_street_json_split_by_device(tmp_path):
    root = _street(tmp_path / "street")
    cfg = _compose("data=street5", f"data.root={root}", "data.format=street_json", "data.classes=[chair,table]").data
    fed = prepare_federation(cfg, None)  # device1_id has 2 values: 2 clients
    assert len(fed.client_specs) == 2
    for k, spec in enumerate(fed.client_specs):
        assert spec["partition"] == {"method": "group", "group_key": "device1_id", "num_clients": 2, "client_index": k}
        data = open_client_data(spec, fed.class_names)
        devices = {data.train.dataset.records[i].groups["device1_id"] for i in data.train.indices}
        test_devices = {data.test.dataset.records[i].groups["device1_id"] for i in data.test.indices}
        assert devices == test_devices == {k + 1}  # train and test follow the same camera
    # device2_id has 3 values: 2 clients get whole devices, balanced by image count
    fed20 = prepare_federation(dict(OmegaConf.to_container(cfg), split_key="device2_id"), 2)
    seen = [set(open_client_data(s, fed20.class_names).train.dataset.group_keys("device2_id")[i]
                for i in open_client_data(s, fed20.class_names).train.indices) for s in fed20.client_specs]
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == {1, 2, 3}
    with pytest.raises(DatasetError, match="cannot split 3 group"):
        prepare_federation(dict(OmegaConf.to_container(cfg), split_key="device2_id"), 4)


def _coco(root: Path) -> Path:
    (root / "imgs").mkdir(parents=True)
    images, anns = [], []
    for i in range(20):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "imgs" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": 16, "height": 16})
        anns.append({"id": i, "image_id": i, "category_id": 1 + i % 2, "bbox": [1, 1, 5, 5]})
    cats = [{"id": 1, "name": "bus"}, {"id": 2, "name": "tram"}]
    for split, keep in (("train", range(14)), ("val", range(14, 20))):
        (root / f"{split}.json").write_text(json.dumps(
            {"images": [images[i] for i in keep], "annotations": [anns[i] for i in keep], "categories": cats}))
    return root


def test_coco_dirichlet_federation(tmp_path):
    root = _coco(tmp_path / "coco")
    cfg = _compose("data=coco", f"data.root={root}", "data.train_ann=train.json", "data.test_ann=val.json",
                   "data.train_images=imgs", "data.test_images=imgs").data
    assert class_names_of(cfg) == ("bus", "tram")
    fed = prepare_federation(cfg, 3)
    parts = [open_client_data(s, fed.class_names).train.indices for s in fed.client_specs]
    assert sorted(i for p in parts for i in p) == list(range(14))  # every image exactly once
    assert all(len(p) >= 1 for p in parts)
    assert fed.summary.count("client_") == 6  # train and test tables


def test_class_names_of():
    assert class_names_of({"format": "synthetic"}) == ("car", "person", "sign")
    assert class_names_of({"format": "voc", "classes": ["b", "a"]}) == ("b", "a")
    with pytest.raises(DatasetError, match="must be a list"):
        class_names_of({"format": "voc", "classes": "a,b"})
    with pytest.raises(DatasetError, match="duplicates"):
        class_names_of({"format": "voc", "classes": ["a", "a"]})
    with pytest.raises(DatasetError, match=r"data\.format is 'csv'"):
        class_names_of({"format": "csv"})


def test_open_client_data_rejects_bad_specs(cameras):
    good = {"format": "voc", "path": str(cameras / "camera_00")}
    with pytest.raises(DatasetError, match=r"client\.data\.format is not set"):
        open_client_data({"path": "/x"}, ["car"])
    with pytest.raises(DatasetError, match=r"client\.data\.format is 'synthetic'"):
        open_client_data({"format": "synthetic", "path": "/x"}, ["car"])
    with pytest.raises(DatasetError, match=r"client\.data\.path is not set"):
        open_client_data({"format": "voc"}, ["car"])
    with pytest.raises(DatasetError, match="client_index 2 is outside 0..1"):
        open_client_data(dict(good, partition={"method": "iid", "num_clients": 2, "client_index": 2}), ["car", "person", "sign"])
    with pytest.raises(DatasetError, match="unknown key"):
        open_client_data(good, ["car", "person", "sign"], augment={"rotate": 10})
    with pytest.raises(DatasetError, match="class 'person'"):
        open_client_data(good, ["car", "sign"])


def test_collate_batches_client_data(cameras):
    data = open_client_data({"format": "voc", "path": str(cameras / "camera_01")}, ["car", "person", "sign"])
    loader = torch.utils.data.DataLoader(data.train, batch_size=3, shuffle=True, collate_fn=detection_collate)
    images, targets = next(iter(loader))
    assert len(images) == len(targets) == 3
    assert all(im.shape == (3, 128, 128) for im in images)
    assert all(t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64 for t in targets)
