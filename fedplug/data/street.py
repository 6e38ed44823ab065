"""The Street dataset's own JSON release: ``train_label.json`` / ``test_label.json``.

Read by :func:`fedplug.data.open_client_data` for ``format: street_json``
specs (``data=street5 data.format=street_json``).  Expected layout:

.. code-block:: text

    <root>/train_label.json    [{"image_id": "...", "device1_id": 3, "device2_id": 12,
    <root>/test_label.json       "items": [{"class": "chair", "bbox": [xmin, ymin, xmax, ymax]}, ...]}, ...]
    <root>/images/<image_id>   the pictures; image_id with or without its extension
                               (.jpg, .jpeg, .png are tried); the folder may also be
                               called Images/ or JPEGImages/, or set images_dir

``device1_id`` is the 5-way split by camera (Street-5), ``device2_id`` the
20-way split (Street-20); both are kept per image as group keys, which the
``group`` partition uses to give each client its cameras.  As distributed,
``test_label.json`` carries no device ids: it is one test set shared by every
client (see :func:`fedplug.data.prepare_federation`).  ``bbox`` values are
taken as continuous pixel coordinates ``x0, y0, x1, y1`` (no 1-based shift)
and must be 4 finite JSON numbers; an item may carry ``"difficult": 1``.

An entry without ``items`` is an image with no object, unless it carries
another list of ``{class, bbox}`` objects (``objects``, ``item``, ...): that is
a misspelt key and an error, not a silently empty image.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from fedplug.data.checks import box_numbers, case_hint, check_case_clashes
from fedplug.data.detection import DetectionDataset, ImageRecord, Transform, drop_degenerate, warn_dropped
from fedplug.data.errors import DatasetError

IMAGE_DIR_NAMES = ("images", "Images", "JPEGImages", "image")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")
GROUP_KEYS = ("device1_id", "device2_id")
LAYOUT = "<root>/train_label.json, <root>/test_label.json and the pictures in <root>/images/"


def label_file(root: Path, split: str) -> Path:
    return root / f"{split}_label.json"


def read_street_labels(path: Path) -> list[dict]:
    """The records of one Street label file, checked for the fields fedplug needs."""
    if not path.is_file():
        raise DatasetError(f"Street label file {path} is missing: expected {LAYOUT}")
    try:
        records = json.loads(path.read_text(encoding="utf-8-sig"))  # -sig: tolerate a byte-order mark
    except (OSError, ValueError) as exc:
        raise DatasetError(f"Street label file {path} is not readable JSON: {exc}") from exc
    if not isinstance(records, list):
        raise DatasetError(
            f"Street label file {path} must hold a JSON list of {{image_id, device1_id, device2_id, items}}, "
            f"found {type(records).__name__}"
        )
    for n, rec in enumerate(records):
        if not isinstance(rec, dict) or "image_id" not in rec or not isinstance(rec.get("items", []), list):
            raise DatasetError(
                f"Street label file {path}, entry {n}: expected {{image_id, device1_id, device2_id, "
                f"items: [{{class, bbox}}]}}, found {str(rec)[:200]}"
            )
        if "items" not in rec:
            misspelt = [k for k, v in rec.items() if _looks_like_items(v)]
            if misspelt:
                raise DatasetError(
                    f"Street label file {path}, entry {n} (image_id {rec['image_id']!r}): the objects are under "
                    f"{misspelt[0]!r}, but the key must be 'items' ([{{class, bbox}}, ...]); rename it"
                )
    return records


def _looks_like_items(value) -> bool:
    return isinstance(value, list) and any(isinstance(v, dict) and ("bbox" in v or "class" in v) for v in value)


def entry_keys(entries: Sequence[dict]) -> list[str]:
    """Every key used by the entries, sorted: what an error shows when ``items`` is missing."""
    return sorted({k for e in entries for k in e})


def find_images_dir(root: Path, images_dir: str | None) -> Path:
    if images_dir:
        path = Path(images_dir) if Path(images_dir).is_absolute() else root / images_dir
        if not path.is_dir():
            raise DatasetError(f"Street images folder {path} (data.images_dir) does not exist")
        return path
    for name in IMAGE_DIR_NAMES:
        if (root / name).is_dir():
            return root / name
    raise DatasetError(
        f"no images folder under {root}: expected one of {list(IMAGE_DIR_NAMES)} (or set data.images_dir)"
    )


def _image_path(images: Path, image_id: str) -> Path | None:
    candidates = [images / image_id] + [images / f"{image_id}{s}" for s in IMAGE_SUFFIXES]
    return next((c for c in candidates if c.is_file()), None)


class StreetJSONDetection(DetectionDataset):
    """One split of the Street JSON release (all cameras); partition it to get a client's share.

    :param root: the folder holding ``<split>_label.json`` and the images folder.
    :param split: ``train`` or ``test`` (reads ``<root>/<split>_label.json``).
    :param images_dir: the images folder, relative to ``root`` or absolute;
        by default the first of ``images/``, ``Images/``, ``JPEGImages/`` found.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        class_names: Sequence[str],
        transforms: Transform | None = None,
        images_dir: str | None = None,
        drop_difficult: bool = False,
        on_bad_image: str = "fail",
    ) -> None:
        super().__init__(class_names, transforms, on_bad_image)
        self.root = Path(root).expanduser()
        self.split = split
        if not self.root.is_dir():
            raise DatasetError(f"Street dataset folder {self.root} does not exist: expected {LAYOUT}")
        path = label_file(self.root, split)
        self.source = f"Street label file {path}"
        entries = read_street_labels(path)
        images = find_images_dir(self.root, images_dir)
        class_index = {name: k + 1 for k, name in enumerate(self.class_names)}
        records, dropped = [], []
        for n, entry in enumerate(entries):
            image_id = str(entry["image_id"])
            boxes, labels, difficult = [], [], []
            for item in entry.get("items", []):
                name = item.get("class") if isinstance(item, dict) else None
                if name not in class_index:
                    raise DatasetError(
                        f"{path}, image {image_id!r}: class {name!r} is not one of the run's classes "
                        f"{list(self.class_names)}{case_hint(name, self.class_names)}: add it to data.classes "
                        "(or fix the label file)"
                    )
                if "bbox" not in item:
                    raise DatasetError(f"{path}, image {image_id!r}: item {item!r} needs bbox [xmin, ymin, xmax, ymax]")
                boxes.append(box_numbers(item["bbox"], f"{path}, image {image_id!r}"))
                labels.append(class_index[name])
                difficult.append(bool(item.get("difficult", 0)))
            image_path = _image_path(images, image_id)
            if image_path is None:
                raise DatasetError(f"{path}, entry {n}: no image {images / image_id} (tried .jpg, .jpeg, .png)")
            groups = {key: entry[key] for key in entry if key not in ("items", "image_id") and _scalar(entry[key])}
            record = ImageRecord(
                image_path,
                np.asarray(boxes, np.float32).reshape(-1, 4),
                np.asarray(labels, np.int64),
                np.asarray(difficult, bool),
                name=image_id,
                groups=groups,
            )
            if drop_difficult and record.difficult.any():
                keep = ~record.difficult
                record.boxes, record.labels, record.difficult = record.boxes[keep], record.labels[keep], record.difficult[keep]
            records.append(drop_degenerate(record, f"{path} image {image_id!r}", dropped))
        warn_dropped(dropped, f"Street label file {path}")
        keys = entry_keys(entries)
        self.objects_hint = (
            f"every entry's 'items' list is empty" if "items" in keys else
            f"no entry has the key 'items' (the entries have keys {keys}): each entry's objects must be under "
            "'items': [{class, bbox}, ...]"
        )
        self._set_records(records)


def street_class_names(root: str | os.PathLike) -> tuple[str, ...]:
    """Every class named in the label files under ``root``, sorted (when data.classes is not set).

    Names that differ only in case (``Buoy`` beside ``buoy``) are an error.
    """
    root = Path(root).expanduser()
    names: set[str] = set()
    keys: list[str] = []
    for split in ("train", "test"):
        path = label_file(root, split)
        if path.is_file():
            entries = read_street_labels(path)
            keys = keys or entry_keys(entries)
            names.update(str(item.get("class")) for e in entries for item in e.get("items", []) if isinstance(item, dict))
    if not names:
        raise DatasetError(
            f"no classes found under {root}: expected {LAYOUT} with objects under each entry's 'items' "
            f"(the entries have keys {keys or 'none'}), or set data.classes"
        )
    check_case_clashes(names, f"Street label files under {root}")
    return tuple(sorted(names))


def _scalar(value) -> bool:
    return isinstance(value, (str, int, float, bool)) or value is None
