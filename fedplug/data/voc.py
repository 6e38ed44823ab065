"""Pascal-VOC folders: the Street-5/Street-20 per-client layout and the synthetic data.

Read by :func:`fedplug.data.open_client_data` for ``format: voc`` specs.  One
folder holds one client's data:

.. code-block:: text

    <root>/Annotations/<id>.xml          one per image (VOC XML: <object><name>, <difficult>, <bndbox>)
    <root>/JPEGImages/<id>.jpg           or .jpeg / .png, or the XML's <filename>
    <root>/ImageSets/Main/<split>.txt    image ids of the split, one per line (train.txt, test.txt, ...)

Coordinates: VOC stores 1-based, inclusive pixel indices.  They become
continuous 0-based ``x0, y0, x1, y1`` by subtracting 1 from ``xmin`` and
``ymin`` only (detectron2's convention), so a box whose ``xmin = xmax`` is one
pixel wide, not empty; a box with ``xmax < xmin`` is degenerate and dropped
with a warning.  Boxes beyond the image are clipped, or dropped when wholly
outside, with a warning (:mod:`fedplug.data.checks`).  Split files may start
with a UTF-8 byte-order mark.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Sequence

import numpy as np

from fedplug.data.checks import case_hint, finite_coordinate
from fedplug.data.detection import DetectionDataset, ImageRecord, Transform, drop_degenerate, warn_dropped
from fedplug.data.errors import DatasetError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG", ".bmp")
LAYOUT = "<root>/Annotations/<id>.xml, <root>/JPEGImages/<id>.jpg and <root>/ImageSets/Main/<split>.txt"


def is_voc_folder(path: str | os.PathLike) -> bool:
    """True when ``path`` looks like one VOC client folder (has Annotations/ and ImageSets/Main/)."""
    p = Path(path)
    return (p / "Annotations").is_dir() and (p / "ImageSets" / "Main").is_dir()


def read_split_ids(root: Path, split: str) -> list[str]:
    split_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        present = sorted(p.stem for p in (root / "ImageSets" / "Main").glob("*.txt"))
        raise DatasetError(
            f"split file {split_file} is missing: expected the ids of split {split!r} there, one per line "
            f"(splits present: {present or 'none'})"
        )
    ids = []
    # utf-8-sig: split files written on Windows often start with a byte-order mark, which would
    # otherwise glue an invisible character to the first id.
    for line in split_file.read_text(encoding="utf-8-sig", errors="replace").splitlines():
        parts = line.split()
        # Per-class split files ("<id> 1") carry a flag after the id; -1 means "not in this class".
        if parts and not (len(parts) > 1 and parts[1] == "-1"):
            ids.append(parts[0])
    return ids


def _text(element: ET.Element | None, tag: str, default: str | None = None) -> str | None:
    child = element.find(tag) if element is not None else None
    return child.text.strip() if child is not None and child.text is not None else default


def parse_voc_xml(xml_path: Path, class_index: dict[str, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Parse one annotation into (boxes xyxy continuous, labels 1..K, difficult, info).

    ``info`` holds ``filename``, ``width`` and ``height`` when the XML gives them.
    """
    try:
        tree = ET.parse(xml_path)
    except FileNotFoundError:
        raise DatasetError(f"annotation {xml_path} is missing: the split lists its id, so {LAYOUT} expected") from None
    except (ET.ParseError, OSError) as exc:
        raise DatasetError(f"annotation {xml_path} is not readable VOC XML: {exc}") from exc
    root = tree.getroot()
    boxes, labels, difficult = [], [], []
    for obj in root.iter("object"):
        name = _text(obj, "name")
        if name not in class_index:
            raise DatasetError(
                f"annotation {xml_path} has an object of class {name!r}, which is not one of the run's classes "
                f"{list(class_index)}{case_hint(name, list(class_index))}: add it to data.classes (or fix the annotation)"
            )
        box = obj.find("bndbox")
        if box is None:
            raise DatasetError(
                f"annotation {xml_path}: object {name!r} needs <bndbox> with numeric <xmin>, <ymin>, <xmax>, <ymax>"
            )
        where = f"annotation {xml_path}, object {name!r}"
        xmin, ymin, xmax, ymax = (finite_coordinate(_text(box, tag), tag, where) for tag in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append([xmin - 1.0, ymin - 1.0, xmax, ymax])
        labels.append(class_index[name])
        try:
            difficult.append(bool(int(float(_text(obj, "difficult", "0") or 0))))
        except ValueError:
            raise DatasetError(f"annotation {xml_path}: object {name!r} has a non-numeric <difficult>") from None
    size = root.find("size")
    info: dict = {"filename": _text(root, "filename")}
    try:
        info["width"], info["height"] = int(float(_text(size, "width"))), int(float(_text(size, "height")))
    except (TypeError, ValueError):
        pass  # <size> is optional: the decoded image's size is used instead
    return (
        np.asarray(boxes, np.float32).reshape(-1, 4),
        np.asarray(labels, np.int64),
        np.asarray(difficult, bool),
        info,
    )


def _find_image(images_dir: Path, image_id: str, filename: str | None) -> Path | None:
    candidates = []
    if filename:
        candidates.append(images_dir / filename)
    candidates += [images_dir / f"{image_id}{suffix}" for suffix in IMAGE_SUFFIXES]
    return next((c for c in candidates if c.is_file()), None)


class VOCDetection(DetectionDataset):
    """One Pascal-VOC folder's split as a map-style detection dataset.

    All annotations of the split are parsed and every image is decode-checked
    here, so a missing folder, a missing split file or image, unreadable XML,
    an unknown class or a corrupt image fails now with a :class:`DatasetError`
    naming the path; images are decoded for use one per ``__getitem__``.

    :param root: the VOC folder (one client's data).
    :param split: the split file's stem: ``train``, ``test``, ``trainval``, ...
    :param class_names: classes without background; label ``k`` is ``class_names[k-1]``.
    :param transforms: ``f(image, target) -> (image, target)``, applied in ``__getitem__``.
    :param drop_difficult: leave out objects flagged ``difficult`` (as VOC
        training usually does); by default they are kept with their flag, which
        evaluation uses to ignore them.
    :param on_bad_image: ``fail`` or ``skip`` an image that does not decode
        (every image is decode-checked here; see :mod:`fedplug.data.images`).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        class_names: Sequence[str],
        transforms: Transform | None = None,
        drop_difficult: bool = False,
        on_bad_image: str = "fail",
    ) -> None:
        super().__init__(class_names, transforms, on_bad_image)
        self.root = Path(root).expanduser()
        self.split = split
        self.source = f"VOC folder {self.root} split {split!r}"
        self.objects_hint = "none of its annotations has an <object> (with <name> and <bndbox>)"
        if not self.root.is_dir():
            raise DatasetError(f"VOC folder {self.root} does not exist: expected {LAYOUT}")
        for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
            if not (self.root / sub).is_dir():
                raise DatasetError(f"VOC folder {self.root} has no {sub}/ folder: expected {LAYOUT}")
        class_index = {name: k + 1 for k, name in enumerate(self.class_names)}
        records, dropped = [], []
        images_dir = self.root / "JPEGImages"
        for image_id in read_split_ids(self.root, split):
            xml_path = self.root / "Annotations" / f"{image_id}.xml"
            boxes, labels, difficult, info = parse_voc_xml(xml_path, class_index)
            if drop_difficult and difficult.any():
                boxes, labels, difficult = boxes[~difficult], labels[~difficult], difficult[~difficult]
            image_path = _find_image(images_dir, image_id, info.get("filename"))
            if image_path is None:
                raise DatasetError(
                    f"no image for id {image_id!r} of {xml_path}: expected {images_dir}/{image_id}.jpg "
                    f"(or .png, or the XML's <filename> {info.get('filename')!r})"
                )
            record = ImageRecord(image_path, boxes, labels, difficult, name=image_id)
            records.append(drop_degenerate(record, str(xml_path), dropped))
        warn_dropped(dropped, f"VOC folder {self.root} split {split!r}")
        self._set_records(records)
