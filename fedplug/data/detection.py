"""What every fedplug detection dataset has in common, whatever its file format.

The format loaders (:mod:`~fedplug.data.voc`, :mod:`~fedplug.data.street`,
:mod:`~fedplug.data.coco`) parse their annotation files once, at construction,
into a list of :class:`ImageRecord` (paths and small NumPy arrays; no pixels),
so a malformed dataset fails at start-up; :meth:`DetectionDataset._set_records`
then decode-checks every image (:mod:`~fedplug.data.images`) and fits the boxes
to their image (:mod:`~fedplug.data.checks`).  :class:`DetectionDataset` then serves
``(image, target)`` pairs in torchvision's detection contract, decoding one
image per ``__getitem__``:

- ``image``: ``float32`` tensor ``[3, H, W]`` in ``[0, 1]``;
- ``target["boxes"]``: ``float32`` ``[N, 4]``, ``x0, y0, x1, y1`` in continuous
  pixel coordinates (a box covering pixel columns ``0..9`` spans ``0.0 .. 10.0``);
- ``target["labels"]``: ``int64`` ``[N]`` in ``1..K`` (0 is background);
- ``target["difficult"]``: ``bool`` ``[N]`` (VOC's flag; COCO's ``iscrowd``);
- ``target["image_id"]``: ``int64`` scalar, the image's index in its dataset.

Detector plugins train on these; evaluation reads the ground truth through
:meth:`DetectionDataset.annotation` without decoding images, and the
partitioner reads :meth:`DetectionDataset.image_labels`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from fedplug.data.checks import fit_boxes_to_images
from fedplug.data.errors import DatasetError
from fedplug.data.images import check_images, check_on_bad_image, load_rgb
from fedplug.data.partition import check_group_values

Transform = Callable[[torch.Tensor, dict], "tuple[torch.Tensor, dict]"]


@dataclass
class ImageRecord:
    """One image's path and ground truth, as parsed from the annotation files."""

    path: Path
    boxes: np.ndarray  # float32 [N, 4] continuous xyxy
    labels: np.ndarray  # int64 [N], 1..K
    difficult: np.ndarray  # bool [N]
    name: str = ""  # the dataset's own id for the image (file stem, COCO id, ...)
    groups: Mapping[str, Any] = field(default_factory=dict)  # per-image keys, e.g. {"device1_id": 3}


def drop_degenerate(record: ImageRecord, source: str, dropped: list[str]) -> ImageRecord:
    """Remove boxes with no width or height, noting them in ``dropped`` for one warning later."""
    b = record.boxes
    keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1]) if len(b) else np.zeros(0, bool)
    if len(b) and not keep.all():
        dropped.extend(f"{source}: box {row.tolist()}" for row in b[~keep])
        record.boxes, record.labels, record.difficult = b[keep], record.labels[keep], record.difficult[keep]
    return record


def warn_dropped(dropped: Sequence[str], where: str) -> None:
    if dropped:
        shown = "; ".join(dropped[:3]) + (f"; ... ({len(dropped) - 3} more)" if len(dropped) > 3 else "")
        warnings.warn(f"{where}: dropped {len(dropped)} degenerate box(es) with zero width or height: {shown}")


class DetectionDataset(torch.utils.data.Dataset):
    """A map-style detection dataset over parsed :class:`ImageRecord` s.

    Subclasses parse their format in ``__init__`` and call
    :meth:`_set_records`; everything else is shared.

    :param class_names: the object classes, without background; label ``k``
        means ``class_names[k - 1]``.
    :param transforms: ``f(image, target) -> (image, target)``, e.g. the
        training augmentation of :mod:`fedplug.data.transforms`.
    :param on_bad_image: ``fail`` (an image that does not decode is a
        :class:`DatasetError`) or ``skip`` (it is left out, with one warning,
        and listed in :attr:`skipped`).
    """

    def __init__(
        self, class_names: Sequence[str], transforms: Transform | None = None, on_bad_image: str = "fail"
    ) -> None:
        self.class_names: tuple[str, ...] = tuple(str(c) for c in class_names)
        if not self.class_names or len(set(self.class_names)) != len(self.class_names):
            raise DatasetError(f"class names must be non-empty and unique, got {list(class_names)}")
        self.transforms = transforms
        self.on_bad_image = check_on_bad_image(on_bad_image)
        self.records: list[ImageRecord] = []
        self.skipped: list[ImageRecord] = []  # images left out because they do not decode (on_bad_image=skip)
        self.source = type(self).__name__  # where the data came from, for error messages
        self.objects_hint = ""  # why a split may hold no object, format by format (for the "no objects" error)

    @classmethod
    def empty(cls, class_names: Sequence[str], source: str) -> "DetectionDataset":
        """A dataset with no image, e.g. a client's local test split when the test set is shared."""
        ds = DetectionDataset(class_names)
        ds.source = source
        return ds

    def _set_records(self, records: list[ImageRecord]) -> None:
        """Keep the parsed records whose image decodes, with their boxes fitted to the image.

        Done here, for every format, so unreadable images fail (or are skipped)
        at start-up and every count taken from the dataset is what is used.
        """
        sizes, _ = check_images([r.path for r in records], self.on_bad_image, self.source)
        self.records = [r for r, size in zip(records, sizes) if size is not None]
        self.skipped = [r for r, size in zip(records, sizes) if size is None]
        fit_boxes_to_images(self.records, [size for size in sizes if size is not None], self.source)

    # -- annotations, no pixels ------------------------------------------------

    def __len__(self) -> int:
        return len(self.records)

    def annotation(self, index: int) -> dict[str, torch.Tensor]:
        """Ground truth of image ``index`` (boxes, labels, difficult, image_id) without decoding it."""
        r = self.records[index]
        return {
            "boxes": torch.as_tensor(r.boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.as_tensor(r.labels, dtype=torch.int64),
            "difficult": torch.as_tensor(r.difficult, dtype=torch.bool),
            "image_id": torch.tensor(index, dtype=torch.int64),
        }

    def image_labels(self, index: int) -> np.ndarray:
        """Labels (``1..K``) of image ``index``: what class-aware partitioners look at."""
        return self.records[index].labels

    def image_name(self, index: int) -> str:
        return self.records[index].name

    def group_keys(self, key: str) -> list:
        """Each image's value of the per-image field ``key`` (camera, device id): the ``group`` partition's input."""
        missing = [r.name for r in self.records if key not in r.groups]
        if missing:
            present = sorted(self.records[0].groups) if self.records else []
            raise DatasetError(
                f"{self.source}: {len(missing)} image(s) have no group key {key!r} (first: {missing[0]!r}); "
                f"keys present: {present or 'none'} (partition.group_key)"
            )
        values = [r.groups[key] for r in self.records]
        check_group_values(values, [r.name for r in self.records], key, self.source)
        return values

    def has_group_key(self, key: str) -> bool:
        """Whether any image carries the per-image field ``key`` (a shared test set carries no device id)."""
        return any(key in r.groups for r in self.records)

    def class_counts(self) -> np.ndarray:
        """Objects per class, ``int64 [K]`` (index ``k - 1`` counts label ``k``)."""
        counts = np.zeros(len(self.class_names), np.int64)
        for r in self.records:
            np.add.at(counts, r.labels - 1, 1)
        return counts

    @property
    def num_objects(self) -> int:
        return int(sum(len(r.labels) for r in self.records))

    # -- images ------------------------------------------------------------------

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images")
        index = index % len(self)
        image = load_rgb(self.records[index].path)
        target = self.annotation(index)
        _, height, width = image.shape
        target = clip_target(target, width, height)  # boxes were fitted at start-up; this guards a file replaced since
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images, {self.num_objects} objects, classes={self.class_names})"


def clip_target(target: dict, width: int, height: int) -> dict:
    """Clip boxes to the image and drop those left without area (annotation slightly off the edge)."""
    boxes = target["boxes"].clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    out = dict(target)
    out["boxes"] = boxes[keep]
    for key in ("labels", "difficult"):
        out[key] = target[key][keep]
    return out


class DetectionSubset(torch.utils.data.Dataset):
    """The images ``indices`` of a :class:`DetectionDataset`: one client's partition.

    Unlike ``torch.utils.data.Subset`` it keeps ``class_names`` and the
    annotation accessors, which evaluation and :func:`describe_partition` use.
    ``image_id`` stays the parent's index, so it is unique within the parent.
    """

    def __init__(
        self, dataset: DetectionDataset, indices: Sequence[int], skipped: Sequence[ImageRecord] = ()
    ) -> None:
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        self.class_names = dataset.class_names
        self.source = dataset.source
        self.skipped = list(skipped)  # the parent's unreadable images that belonged to this share

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[self.indices[index]]

    def annotation(self, index: int) -> dict[str, torch.Tensor]:
        return self.dataset.annotation(self.indices[index])

    def image_labels(self, index: int) -> np.ndarray:
        return self.dataset.image_labels(self.indices[index])

    def image_name(self, index: int) -> str:
        return self.dataset.image_name(self.indices[index])

    def class_counts(self) -> np.ndarray:
        counts = np.zeros(len(self.class_names), np.int64)
        for i in self.indices:
            np.add.at(counts, self.dataset.image_labels(i) - 1, 1)
        return counts

    @property
    def num_objects(self) -> int:
        return int(sum(len(self.dataset.image_labels(i)) for i in self.indices))

    def __repr__(self) -> str:
        return f"DetectionSubset({len(self)} of {len(self.dataset)} images, classes={self.class_names})"
