"""COCO JSON detection annotations (``instances_*.json``).

Read by :func:`fedplug.data.open_client_data` for ``format: coco`` specs.  One
annotation file describes one split; a ``partition`` block in the spec shares
it out among clients.  Conventions:

- categories are sorted by their ``id`` and the ``k``-th becomes label ``k``
  (1..K), unless the run's ``class_names`` are given, in which case each
  category is mapped to its name's position there (so client and server agree
  whatever order the file lists them in);
- ``bbox`` ``[x, y, w, h]`` becomes ``[x, y, x + w, y + h]`` (continuous pixels);
- ``iscrowd: 1`` annotations become ``difficult`` (ignored by VOC-style
  evaluation, as crowd regions are in COCO's own);
- images without annotations stay in (negatives);
- any scalar field of an image (``location``, ``camera_id``, ...) is kept as a
  group key for the ``group`` partition.

Parsed with the standard ``json`` module: pycocotools is not needed to load data.
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


def read_coco(ann_file: Path) -> dict:
    if not ann_file.is_file():
        raise DatasetError(f"COCO annotation file {ann_file} is missing: expected a COCO instances JSON there")
    try:
        data = json.loads(ann_file.read_text(encoding="utf-8-sig"))  # -sig: tolerate a byte-order mark
    except (OSError, ValueError) as exc:
        raise DatasetError(f"COCO annotation file {ann_file} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "categories")):
        raise DatasetError(
            f"COCO annotation file {ann_file} must be an object with lists 'images', 'annotations' and 'categories'"
        )
    return data


def coco_class_names(ann_file: str | os.PathLike) -> tuple[str, ...]:
    """Category names in category-id order: label ``k`` is the ``k``-th.  Names differing only in case are an error."""
    data = read_coco(Path(ann_file).expanduser())
    names = tuple(str(c["name"]) for c in sorted(data["categories"], key=lambda c: c["id"]))
    check_case_clashes(names, f"COCO annotation file {ann_file}")
    return names


class COCODetection(DetectionDataset):
    """One COCO annotation file as a map-style detection dataset.

    :param ann_file: the ``instances_*.json`` file.
    :param images_dir: the folder the images' ``file_name`` entries are relative to.
    :param class_names: the run's classes; ``None`` takes the file's categories
        in id order.  A category missing from ``class_names`` is an error.
    """

    def __init__(
        self,
        ann_file: str | os.PathLike,
        images_dir: str | os.PathLike,
        class_names: Sequence[str] | None = None,
        transforms: Transform | None = None,
        drop_difficult: bool = False,
        on_bad_image: str = "fail",
    ) -> None:
        self.ann_file = Path(ann_file).expanduser()
        self.images_dir = Path(images_dir).expanduser()
        data = read_coco(self.ann_file)
        categories = sorted(data["categories"], key=lambda c: c["id"])
        if class_names is None:
            class_names = [str(c["name"]) for c in categories]
        super().__init__(class_names, transforms, on_bad_image)
        self.source = f"COCO annotation file {self.ann_file}"
        self.objects_hint = "its 'annotations' list names none of its images"
        position = {name: k + 1 for k, name in enumerate(self.class_names)}
        label_of_category = {}
        for cat in categories:
            if str(cat.get("name")) not in position:
                raise DatasetError(
                    f"COCO annotation file {self.ann_file}: category {cat.get('name')!r} (id {cat.get('id')}) "
                    f"is not one of the run's classes {list(self.class_names)}"
                    f"{case_hint(str(cat.get('name')), self.class_names)}: add it to data.classes"
                )
            label_of_category[cat["id"]] = position[str(cat["name"])]
        if not self.images_dir.is_dir():
            raise DatasetError(f"COCO images folder {self.images_dir} does not exist (the 'file_name's are relative to it)")

        by_image: dict = {img["id"]: [] for img in data["images"]}
        for ann in data.get("annotations", []):
            if ann.get("image_id") not in by_image:
                raise DatasetError(f"COCO annotation file {self.ann_file}: annotation {ann.get('id')} names unknown image {ann.get('image_id')}")
            if ann.get("category_id") not in label_of_category:
                raise DatasetError(f"COCO annotation file {self.ann_file}: annotation {ann.get('id')} has unknown category_id {ann.get('category_id')}")
            by_image[ann["image_id"]].append(ann)

        records, dropped = [], []
        for img in data["images"]:
            path = self.images_dir / str(img.get("file_name", ""))
            if not path.is_file():
                raise DatasetError(f"COCO annotation file {self.ann_file}: image {img.get('id')} file {path} is missing")
            anns = by_image[img["id"]]
            where = f"COCO annotation file {self.ann_file}: image {img['id']}"
            if any("bbox" not in a for a in anns):
                raise DatasetError(f"{where} has an annotation without a numeric bbox [x, y, w, h]")
            xywh = np.asarray([box_numbers(a["bbox"], where, "[x, y, w, h]") for a in anns], np.float32).reshape(-1, 4)
            boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
            labels = np.asarray([label_of_category[a["category_id"]] for a in anns], np.int64)
            difficult = np.asarray([bool(a.get("iscrowd", 0)) for a in anns], bool)
            if drop_difficult and difficult.any():
                boxes, labels, difficult = boxes[~difficult], labels[~difficult], difficult[~difficult]
            groups = {k: v for k, v in img.items() if isinstance(v, (str, int, float, bool)) and k != "file_name"}
            record = ImageRecord(path, boxes, labels, difficult, name=str(img["id"]), groups=groups)
            records.append(drop_degenerate(record, f"{self.ann_file} image {img['id']}", dropped))
        warn_dropped(dropped, f"COCO annotation file {self.ann_file}")
        self._set_records(records)
