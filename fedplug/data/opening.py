"""Opening data from a spec: one client's train/test (:func:`open_client_data`) or a held-out set (:func:`open_eval_data`).

A *spec* is a small JSON-able dict (see :mod:`fedplug.data`).  A client spec
whose ``test_split`` is ``None`` (:data:`SHARED_TEST`) has no local test
split: the test set is shared by every client and evaluated on by the server
(:attr:`fedplug.data.Federation.shared_test`), so ``ClientData.test`` is an
empty dataset.  The same happens when a ``group`` partition meets a test split
whose entries carry no group key (the Street release's ``test_label.json``
has no device ids).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from fedplug.data.coco import COCODetection
from fedplug.data.config import format_of, plain, required, resolve_path
from fedplug.data.detection import DetectionDataset, DetectionSubset, ImageRecord
from fedplug.data.errors import DatasetError
from fedplug.data.images import check_on_bad_image
from fedplug.data.partition import METHODS as PARTITION_METHODS, check_group_values, group_assignment, partition_indices
from fedplug.data.street import StreetJSONDetection
from fedplug.data.transforms import build_train_transforms
from fedplug.data.voc import VOCDetection

log = logging.getLogger("fedplug.data")

CLIENT_FORMATS = ("voc", "street_json", "coco")
SHARED_TEST = None  # a client spec's test_split when the test set is shared and evaluated by the server
NO_LOCAL_TEST = "no local test split: the test set is shared by all clients and evaluated by the server"


@dataclass
class ClientData:
    """One client's local data: what the detector hooks train and evaluate on."""

    train: Any  # DetectionDataset or DetectionSubset, with the training augmentation
    test: Any  # never augmented; empty (len 0) when the test set is shared
    class_names: tuple[str, ...]


@dataclass
class _Source:
    """One spec's datasets, parsed once, and how they are shared out among clients.

    ``test`` is ``None`` when the test set is shared; ``shared_test`` then holds
    it if it was opened here (detected from the data), for the start-up table.
    """

    train: DetectionDataset
    test: DetectionDataset | None
    shared_test: DetectionDataset | None = None
    train_parts: list | None = None  # train_parts[k]: client k's image indices
    test_parts: list | None = None
    assignment: dict | None = None  # group value -> client index (group partition)


def open_split(
    spec: Mapping, split: str, class_names, transforms, drop_difficult: bool, what: str = "client.data"
) -> DetectionDataset:
    """The ``train`` or ``test`` split named by ``spec`` (its ``<split>_split``; COCO: ``<split>_ann``/``_images``)."""
    fmt = spec["format"]
    on_bad = check_on_bad_image(spec.get("on_bad_image"), f"{what}.on_bad_image")
    root = Path(str(required(spec, "path", what))).expanduser()
    options = dict(drop_difficult=drop_difficult, on_bad_image=on_bad)
    if fmt == "voc":
        return VOCDetection(root, spec.get(f"{split}_split", split), class_names, transforms, **options)
    if fmt == "street_json":
        name = spec.get(f"{split}_split", split)
        return StreetJSONDetection(root, name, class_names, transforms, images_dir=spec.get("images_dir"), **options)
    # coco
    if not root.is_dir():
        raise DatasetError(f"COCO dataset folder {root} does not exist (data.root / {what}.path)")
    ann = resolve_path(root, required(spec, f"{split}_ann", what))
    images = resolve_path(root, spec.get(f"{split}_images")) or root
    return COCODetection(ann, images, class_names, transforms, **options)


def partition_block(spec: Mapping) -> dict | None:
    part = spec.get("partition")
    if not part:
        return None
    part = dict(part)
    method = part.get("method", "iid")
    if method not in PARTITION_METHODS:
        raise DatasetError(f"partition.method is {method!r}; choose one of {list(PARTITION_METHODS)}")
    for key in ("num_clients", "client_index"):
        if not isinstance(part.get(key), int):
            raise DatasetError(f"client.data.partition.{key} must be an integer, got {part.get(key)!r}")
    if not 0 <= part["client_index"] < part["num_clients"]:
        raise DatasetError(
            f"client.data.partition.client_index {part['client_index']} is outside 0..{part['num_clients'] - 1}"
        )
    if method == "group" and not part.get("group_key"):
        raise DatasetError("partition.method=group needs partition.group_key (e.g. device1_id)")
    part["method"] = method
    return part


def _names(ds: DetectionDataset) -> list[str]:
    return [ds.image_name(i) for i in range(len(ds))]


def _split_parts(part: Mapping, train: DetectionDataset, test: DetectionDataset | None) -> tuple[list, list | None, dict | None]:
    """Every client's train and test indices under ``part`` (consistent across splits), and the group assignment."""
    n, k = part["num_clients"], len(train.class_names)
    if part["method"] == "group":
        key = part["group_key"]
        train_keys = train.group_keys(key)
        test_keys = test.group_keys(key) if test is not None else []
        # One check over both splits: device 3 in train beside "3" in test would split a camera too.
        check_group_values(train_keys + test_keys, _names(train) + (_names(test) if test is not None else []),
                           key, f"{train.source} (with its test split)")
        assignment = group_assignment(Counter(train_keys) + Counter(test_keys), n)
        by_group = lambda keys: partition_indices("group", n, [], k, group_keys=keys, group_assignment_map=assignment)  # noqa: E731
        return by_group(train_keys), (by_group(test_keys) if test is not None else None), assignment
    common = dict(alpha=float(part.get("alpha", 0.5)), seed=int(part.get("seed", 0)), min_size=int(part.get("min_size", 1)))
    labels_of = lambda ds: [ds.image_labels(i) for i in range(len(ds))]  # noqa: E731
    train_parts = partition_indices(part["method"], n, labels_of(train), k, **common)
    if test is None:
        return train_parts, None, None
    # a client may hold no test image; it must hold training data
    return train_parts, partition_indices(part["method"], n, labels_of(test), k, **dict(common, min_size=0)), None


def _open_source(spec: Mapping, class_names, transforms, drop: bool, part: dict | None) -> _Source:
    train = open_split(spec, "train", class_names, transforms, drop)
    if len(train) and train.num_objects == 0:
        raise DatasetError(
            f"{train.source}: the training split has no objects in any of its {len(train)} image(s)"
            + (f": {train.objects_hint}" if train.objects_hint else "")
        )
    source = _Source(train, None)
    if "test_split" in spec and spec["test_split"] is SHARED_TEST:
        pass  # the launcher found the test set shared: the server evaluates it, not this client
    else:
        test = open_split(spec, "test", class_names, None, False)
        if part is not None and part["method"] == "group" and len(test) and not test.has_group_key(part["group_key"]):
            # As distributed, the Street test set has no device ids: one global set, not this client's share.
            log.info("%s carries no %r: it is a test set shared by every client, not split among them",
                     test.source, part["group_key"])
            source.shared_test = test
        else:
            source.test = test
    if part is not None:
        source.train_parts, source.test_parts, source.assignment = _split_parts(part, train, source.test)
    return source


def _skipped_share(ds: DetectionDataset, part: Mapping, assignment: dict | None, client: int) -> list[ImageRecord]:
    """The unreadable images that would have been this client's: only knowable by their group (device)."""
    if part["method"] != "group" or assignment is None:
        return []
    key = part["group_key"]
    return [r for r in ds.skipped if r.groups.get(key) is not None and assignment.get(r.groups.get(key)) == client]


def _client_share(source: _Source, part: dict | None, class_names: tuple[str, ...]) -> ClientData:
    train, test = source.train, source.test
    if part is not None:
        k = part["client_index"]
        train = DetectionSubset(train, source.train_parts[k], _skipped_share(train, part, source.assignment, k))
        if test is not None:
            test = DetectionSubset(test, source.test_parts[k], _skipped_share(test, part, source.assignment, k))
    if test is None:
        test = DetectionDataset.empty(class_names, NO_LOCAL_TEST)
    if len(train) == 0:
        raise DatasetError(f"{train.source}: this client has no training image (check the split file or partition)")
    return ClientData(train=train, test=test, class_names=class_names)


def open_client_data(spec: Mapping, class_names: Sequence[str], augment: Mapping | None = None) -> ClientData:
    """Open one client's train and test splits as described by ``spec``.

    Called by a client after ``init`` (the server's ``class_names``), before
    it answers ``client_ready``, so a bad dataset fails before training starts.

    :param spec: a client spec (see :mod:`fedplug.data`); ``client.data`` in
        ``mode=client``, one of :attr:`Federation.client_specs` in ``mode=embedded``.
        ``test_split: None`` means the test set is shared: ``ClientData.test``
        is then empty (len 0, same ``class_names``).
    :param class_names: the run's classes, without background, in label order.
    :param augment: training augmentation config (``data.augment``), e.g.
        ``{"hflip": 0.5, "scale_jitter": [0.9, 1.1]}``; ``None`` uses
        ``spec["augment"]`` if present, else none.  Never applied to ``test``.
    :raises DatasetError: missing or malformed data, naming the path and what was expected.
    """
    return open_client_data_cached(spec, class_names, augment, cache=None)


def open_client_data_cached(
    spec: Mapping, class_names: Sequence[str], augment: Mapping | None, cache: dict | None
) -> ClientData:
    """:func:`open_client_data`, sharing parsed datasets and partitions through ``cache`` when given.

    :func:`fedplug.data.prepare_federation` opens every client of one
    partitioned dataset; the cache makes that one parse and one partition
    instead of one per client.  The cached :class:`_Source` is reachable as
    ``cache[key]`` for the start-up table.
    """
    client_data, _ = _open_with_source(spec, class_names, augment, cache)
    return client_data


def _open_with_source(spec, class_names, augment, cache) -> tuple[ClientData, _Source]:
    spec = plain(spec, "client.data")
    format_of(spec, "client.data", CLIENT_FORMATS)
    class_names = tuple(str(c) for c in class_names)
    transforms = build_train_transforms(augment if augment is not None else spec.get("augment"))
    drop = bool(spec.get("drop_difficult_train", False))
    part = partition_block(spec)
    key = None
    if cache is not None:
        shared = {k: v for k, v in spec.items() if k not in ("name", "augment")}
        if part is not None:
            shared["partition"] = {k: v for k, v in part.items() if k != "client_index"}
        key = (json.dumps(shared, sort_keys=True, default=str), class_names)
    if key is not None and key in cache:
        source = cache[key]
    else:
        source = _open_source(spec, class_names, transforms, drop, part)
        if key is not None:
            cache[key] = source
    return _client_share(source, part, class_names), source


def open_eval_data(spec: Mapping, class_names: Sequence[str]) -> DetectionDataset:
    """Open a held-out test set to evaluate on (never augmented, never partitioned).

    ``spec`` is :attr:`fedplug.data.Federation.shared_test`, e.g.
    ``{"format": "street_json", "path": "/data/street", "split": "test", "on_bad_image": "fail"}``,
    or any client-style spec such as ``{"format": "voc", "path": "/data/heldout", "test_split": "test"}``.
    The split opened is ``spec["split"]`` if given, else ``spec["test_split"]``
    (default ``test``): ``ImageSets/Main/<split>.txt`` for VOC,
    ``<split>_label.json`` for Street JSON; for COCO ``split`` is ``train`` or
    ``test`` and picks ``<split>_ann`` / ``<split>_images``.  A ``partition``
    block is ignored: the whole split is opened.

    :raises DatasetError: as :func:`open_client_data`; also for a client spec
        whose ``test_split`` is ``None`` (it has no test split of its own).
    """
    spec = plain(spec, "eval.data")
    fmt = format_of(spec, "eval.data", CLIENT_FORMATS)
    class_names = tuple(str(c) for c in class_names)
    split = spec["split"] if "split" in spec else spec.get("test_split", "test")
    if split is SHARED_TEST:
        raise DatasetError(
            "eval.data: this spec's test_split is null, which marks a client whose test set is shared: "
            "open Federation.shared_test instead (or name the split with split: test)"
        )
    if fmt == "coco":
        if split not in ("train", "test"):
            raise DatasetError(f"eval.data.split is {split!r}; for COCO choose train or test (<split>_ann, <split>_images)")
        return open_split(spec, str(split), class_names, None, False, what="eval.data")
    return open_split(dict(spec, test_split=str(split)), "test", class_names, None, False, what="eval.data")
