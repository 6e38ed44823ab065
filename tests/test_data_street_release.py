"""The Street dataset exactly as distributed: format auto-detection, clients per device, one shared test set."""

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
    DatasetError,
    DetectionDataset,
    Federation,
    class_names_of,
    generate_synthetic_federation,
    open_client_data,
    open_eval_data,
    prepare_federation,
)
from fedplug.launcher import hydra_literal

torch.set_num_threads(1)

STREET_CLASSES = ["basket", "carton", "chair", "electrombile", "gastank", "sunshade", "table"]


def _compose(*overrides):
    with initialize_config_module("fedplug.conf", version_base=None):
        return compose("config", overrides=list(overrides))


def make_release(root: Path, num_train=20, num_test=4) -> Path:
    """The release's own form: train entries carry device1_id (5 values) and device2_id (20); test entries none."""
    (root / "images").mkdir(parents=True)
    train, test = [], []
    for i in range(num_train + num_test):
        Image.fromarray(np.full((20, 24, 3), 40 + i, np.uint8)).save(root / "images" / f"{i:04d}.jpg")
        entry = {"image_id": f"{i:04d}.jpg",
                 "items": [{"class": STREET_CLASSES[i % 7], "bbox": [2, 3, 12, 15]}]}
        if i < num_train:
            train.append({"image_id": entry["image_id"], "device1_id": 1 + i % 5, "device2_id": 1 + i, "items": entry["items"]})
        else:
            test.append(entry)
    (root / "train_label.json").write_text(json.dumps(train))
    (root / "test_label.json").write_text(json.dumps(test))
    return root


@pytest.fixture
def release(tmp_path):
    return make_release(tmp_path / "Street")


def _devices(data, key="device1_id"):
    return {data.train.dataset.records[i].groups[key] for i in data.train.indices}


def test_street5_on_the_release_as_distributed(release):
    cfg = _compose("data=street5", f"data.root={release}")  # the whole command, as a user types it
    assert cfg.data.format == "auto"
    fed = prepare_federation(cfg.data, int(cfg.run.num_clients))
    assert isinstance(fed, Federation) and fed.class_names == tuple(STREET_CLASSES)
    assert fed.client_names == [f"device_{d}" for d in range(1, 6)]
    assert fed.shared_test == {"format": "street_json", "path": str(release), "split": "test", "on_bad_image": "fail"}
    json.dumps(fed.shared_test)
    seen = set()
    for k, spec in enumerate(fed.client_specs):
        json.dumps(spec)  # travels to a client process as ++client.data.<key>=...
        assert spec["format"] == "street_json" and spec["name"] == f"device_{k + 1}"
        assert spec["test_split"] is None and spec["on_bad_image"] == "fail"
        assert spec["partition"]["group_key"] == "device1_id"
        data = open_client_data(spec, fed.class_names)
        assert _devices(data) == {k + 1}  # one camera, one client
        assert len(data.train) == 4
        seen |= {data.train.image_name(i) for i in range(len(data.train))}
        assert len(data.test) == 0 and data.test.class_names == fed.class_names  # the test set is not split
    assert len(seen) == 20
    shared = open_eval_data(fed.shared_test, fed.class_names)
    assert isinstance(shared, DetectionDataset) and shared.transforms is None
    assert [shared.image_name(i) for i in range(len(shared))] == [f"{i:04d}.jpg" for i in range(20, 24)]
    # the start-up table shows the shared test set once, not per-client test counts
    assert "shared test set" in fed.summary and "test split" not in fed.summary
    assert fed.summary.count("device_") == 5


def test_street20_splits_by_device2_id(release):
    cfg = _compose("data=street20", f"data.root={release}")
    fed = prepare_federation(cfg.data, int(cfg.run.num_clients))
    assert fed.client_names == [f"device_{d}" for d in range(1, 21)]
    assert fed.shared_test is not None
    data = open_client_data(fed.client_specs[6], fed.class_names)
    assert _devices(data, "device2_id") == {7} and len(data.test) == 0


def test_the_shared_spec_survives_the_client_command_line(release):
    """The launcher passes each spec as ++client.data.<key>=<literal>; test_split: None must arrive as None."""
    fed = prepare_federation(_compose("data=street5", f"data.root={release}").data, 5)
    spec = fed.client_specs[2]
    client_cfg = _compose("mode=client", *(f"++client.data.{k}={hydra_literal(v)}" for k, v in spec.items()))
    data = open_client_data(client_cfg.client.data, fed.class_names)
    assert _devices(data) == {3} and len(data.test) == 0


def test_fewer_clients_than_devices_names_each_client_after_its_devices(release):
    cfg = _compose("data=street5", f"data.root={release}", "run.num_clients=2")
    fed = prepare_federation(cfg.data, 2)
    assert len(fed.client_names) == 2 and all(n.startswith("device_") for n in fed.client_names)
    held = [_devices(open_client_data(s, fed.class_names)) for s in fed.client_specs]
    assert held[0].isdisjoint(held[1]) and held[0] | held[1] == {1, 2, 3, 4, 5}
    assert fed.client_names == ["device_" + "-".join(str(d) for d in sorted(h)) for h in held]


def test_a_test_file_with_device_ids_is_still_split_by_device(release):
    entries = json.loads((release / "test_label.json").read_text())
    for n, e in enumerate(entries):
        e["device1_id"] = 1 + n % 5 if n < 4 else 1
    (release / "test_label.json").write_text(json.dumps(entries))
    fed = prepare_federation(_compose("data=street5", f"data.root={release}").data, 5)
    assert fed.shared_test is None and all(s["test_split"] == "test" for s in fed.client_specs)
    tests = [open_client_data(s, fed.class_names).test for s in fed.client_specs]
    assert [len(t) for t in tests] == [1, 1, 1, 1, 0]
    assert "test split (objects per class)" in fed.summary and "shared test set" not in fed.summary


def test_a_hand_written_client_spec_also_treats_the_keyless_test_set_as_shared(release):
    """mode=client with client.data={format: street_json, partition: {method: group, ...}}: no crash on the test file."""
    spec = {"format": "street_json", "path": str(release),
            "partition": {"method": "group", "group_key": "device1_id", "num_clients": 5, "client_index": 0}}
    data = open_client_data(spec, STREET_CLASSES)
    assert _devices(data) == {1} and len(data.test) == 0


def test_auto_detects_per_client_voc_folders(tmp_path):
    root = tmp_path / "Street_5"
    generate_synthetic_federation(root, num_clients=5, train_per_client=2, test_per_client=1, image_size=64,
                                  classes=("car", "person"))
    cfg = _compose("data=street5", f"data.root={root}", "data.classes=[car,person]")
    fed = prepare_federation(cfg.data, 5)
    assert fed.client_names == [f"camera_{k:02d}" for k in range(5)] and fed.shared_test is None
    assert all(s["format"] == "voc" for s in fed.client_specs)
    assert class_names_of(OmegaConf.merge(cfg.data, {"classes": None})) == ("car", "person")  # read from the VOC files


def test_auto_reads_class_names_from_the_release(release):
    cfg = _compose("data=street5", f"data.root={release}", "data.classes=null")
    assert class_names_of(cfg.data) == tuple(STREET_CLASSES)


def test_server_mode_class_names_need_no_data(tmp_path):
    """mode=server calls class_names_of: with the listed classes it never looks at (or detects) the data."""
    cfg = _compose("data=street5", f"data.root={tmp_path / 'not-here'}")
    assert class_names_of(cfg.data) == tuple(STREET_CLASSES)


def test_auto_names_both_layouts_when_the_folder_holds_neither(tmp_path):
    root = tmp_path / "downloads"
    (root / "pictures").mkdir(parents=True)
    (root / "readme.txt").write_text("hi")
    with pytest.raises(DatasetError, match=r"cannot tell the layout.*pictures/.*train_label\.json.*Annotations"
                                           r".*data\.format=street_json / data\.format=voc"):
        prepare_federation(_compose("data=street5", f"data.root={root}").data, 5)
    with pytest.raises(DatasetError, match=r"data\.root .*nowhere does not exist.*train_label\.json.*VOC"):
        prepare_federation(_compose("data=street5", f"data.root={tmp_path / 'nowhere'}").data, 5)


def test_open_eval_data_opens_any_held_out_folder(tmp_path):
    site = generate_synthetic_federation(tmp_path / "sites", num_clients=1, train_per_client=3, test_per_client=2,
                                         image_size=64)[0]
    classes = ("car", "person", "sign")
    held_out = open_eval_data({"format": "voc", "path": str(site), "test_split": "test"}, classes)
    assert len(held_out) == 2 and held_out.transforms is None
    assert len(open_eval_data({"format": "voc", "path": str(site)}, classes)) == 2  # test_split defaults to test
    assert len(open_eval_data({"format": "voc", "path": str(site), "split": "train"}, classes)) == 3
    with pytest.raises(DatasetError, match="test_split is null.*Federation.shared_test"):
        open_eval_data({"format": "voc", "path": str(site), "test_split": None}, classes)
    with pytest.raises(DatasetError, match=r"eval\.data\.path is not set"):
        open_eval_data({"format": "voc"}, classes)


def test_open_eval_data_coco(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "imgs" / "a.png")
    (tmp_path / "val.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png"}], "categories": [{"id": 1, "name": "bus"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}]}))
    spec = {"format": "coco", "path": str(tmp_path), "test_ann": "val.json", "test_images": "imgs"}
    assert len(open_eval_data(spec, ["bus"])) == 1
    with pytest.raises(DatasetError, match="for COCO choose train or test"):
        open_eval_data(dict(spec, split="val"), ["bus"])
