"""VOCDetection: the torchvision detection contract, VOC conventions, and clear errors for bad folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedplug.data import DatasetError, VOCDetection, detection_collate

torch.set_num_threads(1)

CLASSES = ("cat", "dog")


def _object(name, box, difficult=None):
    diff = f"<difficult>{difficult}</difficult>" if difficult is not None else ""
    xmin, ymin, xmax, ymax = box
    return (
        f"<object><name>{name}</name>{diff}<bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
        f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>"
    )


def make_voc(root: Path, images: dict, splits: dict, size=(40, 30), filename_tags=None, suffix=".jpg") -> Path:
    """Write a tiny VOC folder: images = {id: [object xml, ...]}, splits = {name: [ids]}."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    w, h = size
    for image_id, objects in images.items():
        fname = (filename_tags or {}).get(image_id)
        tag = f"<filename>{fname}</filename>" if fname else ""
        (root / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation>{tag}<size><width>{w}</width><height>{h}</height><depth>3</depth></size>"
            + "".join(objects)
            + "</annotation>"
        )
        pixels = np.full((h, w, 3), 10 * (len(image_id) % 20), np.uint8)
        pixels[:8, :8] = (255, 0, 0)  # a red corner: checks RGB order (a block, as JPEG blurs single pixels)
        Image.fromarray(pixels).save(root / "JPEGImages" / (fname or f"{image_id}{suffix}"))
    for split, ids in splits.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


@pytest.fixture
def voc(tmp_path):
    return make_voc(
        tmp_path / "site1",
        {
            "a": [_object("cat", (1, 1, 10, 20)), _object("dog", (5, 6, 40, 30), difficult=1)],
            "b": [_object("dog", (11, 2, 11, 2))],  # one pixel: xmin == xmax is a valid 1-px box
            "c": [],
        },
        {"train": ["a", "b"], "test": ["c"]},
    )


def test_getitem_follows_torchvision_detection_contract(voc):
    ds = VOCDetection(voc, "train", CLASSES)
    assert ds.class_names == CLASSES and len(ds) == 2
    image, target = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 30, 40)
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert torch.allclose(image[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]), atol=0.1)  # RGB order, not BGR
    assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (2, 4)
    # VOC is 1-based inclusive: xmin-1, ymin-1, xmax, ymax in continuous 0-based coordinates
    assert target["boxes"].tolist() == [[0.0, 0.0, 10.0, 20.0], [4.0, 5.0, 40.0, 30.0]]
    assert target["labels"].dtype == torch.int64 and target["labels"].tolist() == [1, 2]
    assert target["difficult"].dtype == torch.bool and target["difficult"].tolist() == [False, True]
    assert target["image_id"].dtype == torch.int64 and int(target["image_id"]) == 0
    _, target_b = ds[1]
    assert target_b["boxes"].tolist() == [[10.0, 1.0, 11.0, 2.0]]
    assert int(ds[-1][1]["image_id"]) == 1
    with pytest.raises(IndexError):
        ds[2]


def test_image_without_objects_gives_empty_tensors(voc):
    image, target = VOCDetection(voc, "test", CLASSES)[0]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["difficult"].shape == (0,)


def test_drop_difficult_and_annotation_without_decoding(voc):
    ds = VOCDetection(voc, "train", CLASSES, drop_difficult=True)
    assert ds.annotation(0)["labels"].tolist() == [1]
    assert ds.class_counts().tolist() == [1, 1] and ds.num_objects == 2
    assert ds.image_labels(1).tolist() == [2] and ds.image_name(1) == "b"


def test_transforms_are_applied(voc):
    def mark(image, target):
        return image * 0, dict(target, marked=True)

    image, target = VOCDetection(voc, "train", CLASSES, transforms=mark)[0]
    assert float(image.abs().sum()) == 0 and target["marked"]


def test_collate_and_dataloader(voc):
    ds = VOCDetection(voc, "train", CLASSES)
    images, targets = next(iter(torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=detection_collate)))
    assert isinstance(images, list) and len(images) == 2 and len(targets) == 2
    assert detection_collate([]) == ([], [])


def test_filename_tag_png_and_per_class_split_lines(tmp_path):
    root = make_voc(
        tmp_path / "v",
        {"x1": [_object("cat", (2, 2, 8, 8))], "x2": [_object("dog", (2, 2, 8, 8))]},
        {"train": ["x1  1", "x2 -1", ""]},  # per-class split file: -1 means "not in the class"
        filename_tags={"x1": "picture one.png"},
        suffix=".png",
    )
    ds = VOCDetection(root, "train", CLASSES)
    assert len(ds) == 1 and ds.records[0].path.name == "picture one.png"


def test_boxes_beyond_the_image_are_clipped_or_dropped_with_a_warning(tmp_path):
    root = make_voc(tmp_path / "v", {"a": [_object("cat", (30, 20, 60, 45)), _object("dog", (50, 40, 60, 45))]},
                    {"train": ["a"]})
    with pytest.warns(UserWarning, match=r"1 box\(es\) partly outside their image were clipped to it and 1 wholly "
                                         r"outside were dropped.*a \[49\.0, 39\.0, 60\.0, 45\.0\] in 40x30"):
        ds = VOCDetection(root, "train", CLASSES)
    assert ds.num_objects == 1 and ds.class_counts().tolist() == [1, 0]  # what is used, before any decoding
    _, target = ds[0]
    assert target["boxes"].tolist() == [[29.0, 19.0, 40.0, 30.0]]


def test_degenerate_box_dropped_with_warning(tmp_path):
    root = make_voc(
        tmp_path / "v",
        {"a": [_object("cat", (10, 5, 8, 9)), _object("dog", (1, 1, 4, 4))]},  # xmax < xmin: no width
        {"train": ["a"]},
    )
    with pytest.warns(UserWarning, match="dropped 1 degenerate box"):
        ds = VOCDetection(root, "train", CLASSES)
    assert ds.annotation(0)["labels"].tolist() == [2]


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda r: r.rename(r.parent / "gone"), "does not exist"),
        (lambda r: (r / "JPEGImages").rename(r / "imgs"), "has no JPEGImages/ folder"),
        (lambda r: (r / "ImageSets/Main/train.txt").unlink(), r"split file .*train\.txt is missing.*splits present: \['test'\]"),
        (lambda r: (r / "Annotations/a.xml").write_text("<annotation><object>"), r"a\.xml is not readable VOC XML"),
        (lambda r: (r / "Annotations/a.xml").unlink(), r"annotation .*a\.xml is missing"),
        (lambda r: (r / "JPEGImages/a.jpg").unlink(), r"no image for id 'a'"),
        (
            lambda r: (r / "Annotations/a.xml").write_text(f"<annotation>{_object('horse', (1, 1, 2, 2))}</annotation>"),
            r"a\.xml has an object of class 'horse'.*\['cat', 'dog'\].*data\.classes",
        ),
        (
            lambda r: (r / "Annotations/a.xml").write_text("<annotation><object><name>cat</name></object></annotation>"),
            r"needs <bndbox>",
        ),
    ],
    ids=["missing-root", "missing-images-dir", "missing-split", "bad-xml", "missing-xml", "missing-image",
         "unknown-class", "no-bndbox"],
)
def test_bad_folders_raise_clear_errors(voc, breakage, message):
    breakage(voc)
    with pytest.raises(DatasetError, match=message) as info:
        VOCDetection(voc, "train", CLASSES)
    assert str(voc) in str(info.value)  # the message names the path


def test_class_names_must_be_unique_and_non_empty(voc):
    with pytest.raises(DatasetError, match="unique"):
        VOCDetection(voc, "train", ("cat", "cat"))
    with pytest.raises(DatasetError, match="non-empty"):
        VOCDetection(voc, "train", ())
