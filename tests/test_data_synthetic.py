"""The synthetic street-camera generator: valid VOC, exact boxes, non-IID, deterministic, cached, concurrency-safe."""

from __future__ import annotations

import json
import multiprocessing
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from fedplug.data import CLASSES, DatasetError, VOCDetection, generate_synthetic_federation
from fedplug.data.synthetic import MARKER_NAME, SHAPES, camera_class_probs, render_image

torch.set_num_threads(1)

SMALL = dict(num_clients=3, train_per_client=10, test_per_client=4, seed=0)


def _saturation(image: np.ndarray) -> np.ndarray:
    return image.max(axis=2).astype(int) - image.min(axis=2).astype(int)


def test_writes_voc_folders_the_loader_reads_back(tmp_path):
    folders = generate_synthetic_federation(tmp_path / "syn", **SMALL)
    assert [f.name for f in folders] == ["camera_00", "camera_01", "camera_02"]
    for folder in folders:
        assert (folder / "ImageSets/Main/train.txt").read_text().split() == [
            f"{folder.name}_{i:05d}" for i in range(10)
        ]
        assert len((folder / "ImageSets/Main/test.txt").read_text().split()) == 4
        assert len(list((folder / "Annotations").glob("*.xml"))) == 14
        assert len(list((folder / "JPEGImages").glob("*.jpg"))) == 14
        train = VOCDetection(folder, "train", CLASSES)
        test = VOCDetection(folder, "test", CLASSES)
        assert (len(train), len(test)) == (10, 4)
        for ds in (train, test):
            for i in range(len(ds)):
                image, target = ds[i]
                assert image.shape == (3, 128, 128) and image.dtype == torch.float32
                n = len(target["labels"])
                assert 1 <= n <= 4
                assert set(target["labels"].tolist()) <= {1, 2, 3}
                assert not target["difficult"].any()
                sides = (target["boxes"][:, 2:] - target["boxes"][:, :2]).max(dim=1).values
                assert ((sides >= 15) & (sides <= 49)).all(), sides


def test_boxes_are_exactly_the_drawn_objects(tmp_path):
    """Independent of the generator's internals: in lossless PNGs, each box is tight around
    saturated (object) pixels, and its object's colour says its class."""
    folders = generate_synthetic_federation(tmp_path / "syn", image_format="png", **SMALL)
    colour_class = {1: 0, 2: 2}  # dominant channel: car red (R), person blue (B); sign is yellow (R and G)
    checked = 0
    for folder in folders:
        ds = VOCDetection(folder, "train", CLASSES)
        for i in range(len(ds)):
            pixels = np.asarray(Image.open(ds.records[i].path).convert("RGB"))
            objects = _saturation(pixels) > 90
            target = ds.annotation(i)
            for box, label in zip(target["boxes"].tolist(), target["labels"].tolist()):
                x0, y0, x1, y1 = (int(v) for v in box)
                assert box == [float(x0), float(y0), float(x1), float(y1)]  # integer pixel edges
                inside = objects[y0:y1, x0:x1]
                # tight: object pixels reach all four edges of the box ...
                assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
                # ... and none lie on the one-pixel ring just outside (objects are >= 2 px apart)
                ring = np.zeros_like(objects)
                ring[max(y0 - 1, 0) : y1 + 1, max(x0 - 1, 0) : x1 + 1] = True
                ring[y0:y1, x0:x1] = False
                assert not (objects & ring).any()
                mean = pixels[y0:y1, x0:x1][inside].mean(axis=0)
                if label == 3:  # yellow sign: red and green high, blue low
                    assert mean[0] > 150 and mean[1] > 150 and mean[2] < 100
                else:
                    assert int(np.argmax(mean)) == colour_class[label]
                checked += 1
    assert checked > 50


def test_classes_differ_in_shape_and_colour():
    styles = [SHAPES[c] for c in CLASSES]
    assert len({s.shape for s in styles}) == len(styles)
    assert len({s.rgb for s in styles}) == len(styles)
    for style in SHAPES.values():  # saturated colours, far from the grey clutter
        assert max(style.rgb) - min(style.rgb) >= 150


def test_camera_class_mixes_differ(tmp_path):
    folders = generate_synthetic_federation(tmp_path / "syn", num_clients=3, train_per_client=40, test_per_client=1)
    counts = np.stack([VOCDetection(f, "train", CLASSES).class_counts() for f in folders])
    shares = counts / counts.sum(axis=1, keepdims=True)
    # camera i is dominated by class i, so the three mixes are clearly different
    assert list(shares.argmax(axis=1)) == [0, 1, 2]
    assert (shares.max(axis=1) > 0.45).all()
    probs = camera_class_probs(3, 3, seed=0, skew=0.5)
    assert np.allclose(probs.sum(axis=1), 1) and list(probs.argmax(axis=1)) == [0, 1, 2]
    assert np.array_equal(camera_class_probs(4, 3, seed=0, skew=1.0), np.eye(3)[[0, 1, 2, 0]])
    with pytest.raises(ValueError, match="class_skew"):
        camera_class_probs(3, 3, skew=1.5)


def test_render_is_deterministic_for_a_seed():
    a = render_image(np.random.default_rng(5), [0.2, 0.3, 0.5])
    b = render_image(np.random.default_rng(5), [0.2, 0.3, 0.5])
    c = render_image(np.random.default_rng(6), [0.2, 0.3, 0.5])
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    one = generate_synthetic_federation(tmp_path / "a", **SMALL)
    two = generate_synthetic_federation(tmp_path / "b", **SMALL)
    other = generate_synthetic_federation(tmp_path / "c", **dict(SMALL, seed=1))
    for f1, f2, f3 in zip(one, two, other):
        for rel in ("Annotations/camera_00_00003.xml".replace("camera_00", f1.name),
                    "JPEGImages/camera_00_00003.jpg".replace("camera_00", f1.name)):
            assert (f1 / rel).read_bytes() == (f2 / rel).read_bytes()
            assert (f1 / rel).read_bytes() != (f3 / rel).read_bytes()


def test_reuses_matching_data_and_regenerates_on_change(tmp_path):
    root = tmp_path / "syn"
    generate_synthetic_federation(root, **SMALL)
    marker = root / MARKER_NAME
    stamp = (marker.stat().st_mtime_ns, marker.stat().st_ino)
    xml = root / "camera_01" / "Annotations" / "camera_01_00002.xml"
    xml_stamp = xml.stat().st_mtime_ns
    generate_synthetic_federation(root, **SMALL)  # same parameters: nothing written
    assert (marker.stat().st_mtime_ns, marker.stat().st_ino) == stamp
    assert xml.stat().st_mtime_ns == xml_stamp

    folders = generate_synthetic_federation(root, **dict(SMALL, train_per_client=12))
    assert json.loads(marker.read_text())["train_per_client"] == 12
    assert len(VOCDetection(folders[0], "train", CLASSES)) == 12
    # no temporary or old folders left beside root
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["syn"]

    # a camera folder deleted by hand: the data is incomplete, so it is rebuilt
    import shutil

    shutil.rmtree(root / "camera_02")
    generate_synthetic_federation(root, **dict(SMALL, train_per_client=12))
    assert len(VOCDetection(root / "camera_02", "train", CLASSES)) == 12


def test_refuses_to_overwrite_a_folder_it_did_not_write(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "precious.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="not written by the synthetic generator"):
        generate_synthetic_federation(root, **SMALL)
    assert (root / "precious.txt").read_text() == "keep me"


def test_rejects_bad_parameters(tmp_path):
    with pytest.raises(DatasetError, match="cannot draw class"):
        generate_synthetic_federation(tmp_path / "x", classes=("car", "unicorn"))
    with pytest.raises(ValueError, match="num_clients"):
        generate_synthetic_federation(tmp_path / "x", num_clients=0)
    with pytest.raises(ValueError, match="image_size"):
        generate_synthetic_federation(tmp_path / "x", image_size=32)


def test_other_classes_and_image_size(tmp_path):
    classes = ("bike", "light", "car", "sign")
    folders = generate_synthetic_federation(
        tmp_path / "s", num_clients=2, train_per_client=6, test_per_client=2, image_size=96, classes=classes
    )
    ds = VOCDetection(folders[1], "train", classes)
    image, target = ds[0]
    assert image.shape == (3, 96, 96)
    assert target["boxes"][:, 2:].max() <= 96 and target["boxes"].min() >= 0


def _race(args):
    root, params = args
    return [str(p) for p in generate_synthetic_federation(root, **params)]


def test_concurrent_threads_generate_once(tmp_path):
    root = tmp_path / "syn"
    results, errors = [], []

    def call():
        try:
            results.append(_race((root, SMALL)))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 3 and results[0] == results[1] == results[2]
    assert len(VOCDetection(root / "camera_00", "train", CLASSES)) == 10
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["syn"]


@pytest.mark.skipif(sys.platform == "win32", reason="uses fork to start the racing processes quickly")
def test_concurrent_processes_with_different_parameters(tmp_path):
    """Two processes race on one root (one of them asking for other data); both finish cleanly
    and the folder ends up complete and consistent with its marker."""
    root = tmp_path / "syn"
    ctx = multiprocessing.get_context("fork")
    jobs = [(root, SMALL), (root, SMALL), (root, dict(SMALL, train_per_client=7))]
    with ctx.Pool(3) as pool:
        out = pool.map(_race, jobs)
    assert all(len(paths) == 3 for paths in out)
    marker = json.loads((root / MARKER_NAME).read_text())
    train = VOCDetection(root / "camera_02", "train", CLASSES)
    assert len(train) == marker["train_per_client"] in (7, 10)
    for i in range(len(train)):
        train.annotation(i)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["syn"]
