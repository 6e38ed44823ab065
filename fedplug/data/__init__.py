"""fedplug's data: the core's one entry point into every dataset format.

Who calls what, and when:

- the embedded launcher (``mode=embedded``) calls :func:`prepare_federation`
  once at start-up with the ``data`` config group: it generates the synthetic
  data if needed, checks the dataset, works out one *client spec* per client
  (a small JSON-able dict) and a printable summary of each client's class counts;
- a stand-alone server (``mode=server``) calls :func:`class_names_of` to learn
  the class list it sends to clients in ``init``;
- every client calls :func:`open_client_data` with its spec (``client.data``
  in ``mode=client``; filled in by the launcher in ``mode=embedded``) and the
  class names from the server, and hands ``ClientData.train`` /
  ``ClientData.test`` to the detector's hooks;
- detector plugins batch with :func:`detection_collate`.

A client spec, by format (paths may be relative to the working directory)::

    {"format": "voc", "path": "/data/site1", "train_split": "train", "test_split": "test"}
    {"format": "street_json", "path": "/data/street", "images_dir": "images",
     "partition": {"method": "group", "group_key": "device1_id", "num_clients": 5, "client_index": 2}}
    {"format": "coco", "path": "/data/coco", "train_ann": "annotations/train.json", "train_images": "train",
     "test_ann": "annotations/test.json", "test_images": "test",
     "partition": {"method": "dirichlet", "alpha": 0.5, "seed": 0, "num_clients": 3, "client_index": 0}}

Optional in every spec: ``partition`` (share one dataset among simulated
clients; see :mod:`fedplug.data.partition`), ``drop_difficult_train`` (leave
``difficult`` objects out of training) and ``augment`` (used when the
``augment`` argument is ``None``).  Everything is documented in ``docs/data.md``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from fedplug.data.coco import COCODetection, coco_class_names
from fedplug.data.detection import DetectionDataset, DetectionSubset, ImageRecord
from fedplug.data.errors import DatasetError
from fedplug.data.partition import (
    METHODS as PARTITION_METHODS,
    describe_partition,
    group_assignment,
    partition_indices,
)
from fedplug.data.street import StreetJSONDetection, street_class_names
from fedplug.data.synthetic import CLASSES, GENERATOR_VERSION, generate_synthetic_federation
from fedplug.data.transforms import build_train_transforms
from fedplug.data.voc import VOCDetection, is_voc_folder

log = logging.getLogger("fedplug.data")

FORMATS = ("synthetic", "voc", "street_json", "coco")
CLIENT_FORMATS = ("voc", "street_json", "coco")
MISSING = "???"  # OmegaConf's mark for a mandatory value


@dataclass
class ClientData:
    """One client's local data: what the detector hooks train and evaluate on."""

    train: Any  # DetectionDataset or DetectionSubset, with the training augmentation
    test: Any  # never augmented
    class_names: tuple[str, ...]


@dataclass
class Federation:
    """What :func:`prepare_federation` found: the classes and one spec per client."""

    class_names: tuple[str, ...]
    client_specs: list[dict]
    client_names: list[str] = field(default_factory=list)
    summary: str = ""  # each client's image and per-class object counts, ready to print


def detection_collate(batch):
    """Batch ``(image, target)`` pairs as torchvision detectors take them: (list of images, list of targets)."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)


# ---------------------------------------------------------------------------
# Config helpers
# ---------------------------------------------------------------------------


def _plain(cfg: Mapping | None, what: str) -> dict:
    """A plain dict from a Hydra/OmegaConf node or a mapping; a missing mandatory value is a clear error."""
    if cfg is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf
        from omegaconf.errors import MissingMandatoryValue

        if isinstance(cfg, DictConfig):
            try:
                return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
            except MissingMandatoryValue as exc:
                key = getattr(exc, "full_key", None) or str(exc)
                raise DatasetError(f"{what}: the mandatory value {key} is not set ({_hint(what)})") from None
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if not isinstance(cfg, Mapping):
        raise DatasetError(f"{what} must be a mapping, got {type(cfg).__name__}")
    return dict(cfg)


def _hint(what: str) -> str:
    return "e.g. data=street5 data.root=/path/to/Street" if what == "data" else "e.g. {format: voc, path: /data/site1}"


def _required(cfg: Mapping, key: str, what: str) -> Any:
    value = cfg.get(key)
    if value is None or value == MISSING or value == "":
        raise DatasetError(f"{what}.{key} is not set ({_hint(what)})")
    return value


def _format_of(cfg: Mapping, what: str, allowed: Sequence[str]) -> str:
    fmt = _required(cfg, "format", what)
    if fmt not in allowed:
        raise DatasetError(f"{what}.format is {fmt!r}; choose one of {list(allowed)}")
    return fmt


def _resolve(root: Path, value: str | None) -> Path | None:
    if value is None:
        return None
    p = Path(value).expanduser()
    return p if p.is_absolute() else root / p


# ---------------------------------------------------------------------------
# Opening one client's data
# ---------------------------------------------------------------------------


def _open_split(spec: Mapping, split: str, class_names, transforms, drop_difficult: bool) -> DetectionDataset:
    fmt = spec["format"]
    root = Path(str(_required(spec, "path", "client.data"))).expanduser()
    if fmt == "voc":
        name = spec.get(f"{split}_split", split)
        return VOCDetection(root, name, class_names, transforms, drop_difficult=drop_difficult)
    if fmt == "street_json":
        name = spec.get(f"{split}_split", split)
        return StreetJSONDetection(
            root, name, class_names, transforms, images_dir=spec.get("images_dir"), drop_difficult=drop_difficult
        )
    # coco
    if not root.is_dir():
        raise DatasetError(f"COCO dataset folder {root} does not exist (data.root / client.data.path)")
    ann = _resolve(root, _required(spec, f"{split}_ann", "client.data"))
    images = _resolve(root, spec.get(f"{split}_images")) or root
    return COCODetection(ann, images, class_names, transforms, drop_difficult=drop_difficult)


def _partition_block(spec: Mapping) -> dict | None:
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


def _split_parts(part: Mapping, train: DetectionDataset, test: DetectionDataset) -> tuple[list, list]:
    """Every client's train and test indices under the partition ``part`` (consistent across splits)."""
    n = part["num_clients"]
    common = dict(alpha=float(part.get("alpha", 0.5)), seed=int(part.get("seed", 0)), min_size=int(part.get("min_size", 1)))
    if part["method"] == "group":
        key = part["group_key"]
        train_keys, test_keys = train.group_keys(key), test.group_keys(key)
        assignment = group_assignment(Counter(train_keys) + Counter(test_keys), n)
        extra = dict(group_keys=None, group_assignment_map=assignment)
        return (
            partition_indices("group", n, [], len(train.class_names), **dict(extra, group_keys=train_keys)),
            partition_indices("group", n, [], len(test.class_names), **dict(extra, group_keys=test_keys)),
        )
    k = len(train.class_names)
    labels_of = lambda ds: [ds.image_labels(i) for i in range(len(ds))]  # noqa: E731
    test_common = dict(common, min_size=0)  # a client may hold no test image; it must hold training data
    return (
        partition_indices(part["method"], n, labels_of(train), k, **common),
        partition_indices(part["method"], n, labels_of(test), k, **test_common),
    )


def open_client_data(
    spec: Mapping, class_names: Sequence[str], augment: Mapping | None = None
) -> ClientData:
    """Open one client's train and test splits as described by ``spec``.

    Called by a client after ``init`` (the server's ``class_names``), before
    it answers ``client_ready``, so a bad dataset fails before training starts.

    :param spec: a client spec (see the module docstring); ``client.data`` in
        ``mode=client``, one of :attr:`Federation.client_specs` in ``mode=embedded``.
    :param class_names: the run's classes, without background, in label order.
    :param augment: training augmentation config (``data.augment``), e.g.
        ``{"hflip": 0.5, "scale_jitter": [0.9, 1.1]}``; ``None`` uses
        ``spec["augment"]`` if present, else none.  Never applied to ``test``.
    :raises DatasetError: missing or malformed data, naming the path and what was expected.
    """
    return _open_client_data(spec, class_names, augment, cache=None)


def _open_client_data(spec: Mapping, class_names: Sequence[str], augment: Mapping | None, cache: dict | None) -> ClientData:
    """:func:`open_client_data`, sharing parsed datasets and partitions through ``cache`` when given.

    :func:`prepare_federation` opens every client of one partitioned dataset;
    the cache makes that one parse and one partition instead of one per client.
    """
    spec = _plain(spec, "client.data")
    _format_of(spec, "client.data", CLIENT_FORMATS)
    class_names = tuple(str(c) for c in class_names)
    transforms = build_train_transforms(augment if augment is not None else spec.get("augment"))
    drop = bool(spec.get("drop_difficult_train", False))
    part = _partition_block(spec)
    key = None
    if cache is not None:
        shared = {k: v for k, v in spec.items() if k not in ("name", "augment")}
        if part is not None:
            shared["partition"] = {k: v for k, v in part.items() if k != "client_index"}
        key = (json.dumps(shared, sort_keys=True, default=str), class_names)
    if key is not None and key in cache:
        train, test, parts = cache[key]
    else:
        train = _open_split(spec, "train", class_names, transforms, drop)
        test = _open_split(spec, "test", class_names, None, False)
        parts = _split_parts(part, train, test) if part is not None else None
        if key is not None:
            cache[key] = (train, test, parts)
    if parts is not None:
        k = part["client_index"]
        train, test = DetectionSubset(train, parts[0][k]), DetectionSubset(test, parts[1][k])
    if len(train) == 0:
        raise DatasetError(f"{train.source}: this client has no training image (check the split file or partition)")
    return ClientData(train=train, test=test, class_names=class_names)


# ---------------------------------------------------------------------------
# The whole federation (embedded mode) and the class list (server)
# ---------------------------------------------------------------------------


def _voc_client_folders(root: Path, clients: Sequence[str] | None) -> list[Path]:
    if not root.is_dir():
        raise DatasetError(
            f"data.root {root} does not exist: expected a folder holding one VOC folder per client "
            "(<client>/Annotations, <client>/JPEGImages, <client>/ImageSets/Main/{train,test}.txt)"
        )
    if clients:
        folders = [root / str(c) for c in clients]
        bad = [str(f) for f in folders if not is_voc_folder(f)]
        if bad:
            raise DatasetError(f"data.clients names folder(s) that are not VOC folders: {bad}")
        return folders
    folders = sorted(p for p in root.iterdir() if p.is_dir() and is_voc_folder(p))
    if not folders:
        raise DatasetError(
            f"no client VOC folders under data.root {root}: expected <client>/Annotations and "
            "<client>/ImageSets/Main in each client's folder"
        )
    return folders


def _voc_class_names(root: Path) -> tuple[str, ...]:
    folders = [root] if is_voc_folder(root) else _voc_client_folders(root, None)
    names: set[str] = set()
    for folder in folders:
        for xml in sorted((folder / "Annotations").glob("*.xml")):
            try:
                names.update((o.findtext("name") or "").strip() for o in ET.parse(xml).getroot().iter("object"))
            except ET.ParseError as exc:
                raise DatasetError(f"annotation {xml} is not readable VOC XML: {exc}") from exc
    names.discard("")
    if not names:
        raise DatasetError(f"no object classes found in the annotations under {root}: set data.classes")
    return tuple(sorted(names))


def class_names_of(data_cfg: Mapping) -> tuple[str, ...]:
    """The run's class list, without background, in label order.

    ``data.classes`` when set; otherwise read from the data (synthetic: its
    default classes; VOC: every ``<name>`` under ``data.root``, sorted; Street
    JSON: every item class, sorted; COCO: categories in id order).  Called by
    the server at start-up; the list travels to clients in ``init``.
    """
    cfg = _plain(data_cfg, "data")
    classes = cfg.get("classes")
    if classes and classes != MISSING:
        if isinstance(classes, str):
            raise DatasetError(f"data.classes must be a list such as [car, person], got the string {classes!r}")
        names = tuple(str(c) for c in classes)
        if len(set(names)) != len(names):
            raise DatasetError(f"data.classes has duplicates: {list(names)}")
        return names
    fmt = _format_of(cfg, "data", FORMATS)
    if fmt == "synthetic":
        return CLASSES
    root = Path(str(_required(cfg, "root", "data"))).expanduser()
    if fmt == "voc":
        return _voc_class_names(root)
    if fmt == "street_json":
        return street_class_names(root)
    return coco_class_names(_resolve(root, _required(cfg, "train_ann", "data")))


def _synthetic_root(cfg: Mapping, params: Mapping) -> Path:
    # One folder per parameter set, so runs with different settings sharing the
    # cache never regenerate (and pull away) each other's data.
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    name = (
        f"{params['num_clients']}cams-{params['train_per_client']}x{params['test_per_client']}"
        f"-{params['image_size']}px-seed{params['seed']}-{digest}"
    )
    return Path(str(_required(cfg, "root", "data"))).expanduser() / name


def _common_spec(cfg: Mapping) -> dict:
    spec = {
        "train_split": cfg.get("train_split", "train"),
        "test_split": cfg.get("test_split", "test"),
        "drop_difficult_train": bool(cfg.get("drop_difficult_train", False)),
    }
    if cfg.get("augment"):
        spec["augment"] = dict(cfg["augment"])
    return spec


def _partitioned_specs(cfg: Mapping, base: dict, num_clients: int | None, default_method: str) -> list[dict]:
    part = dict(cfg.get("partition") or {})
    part.setdefault("method", default_method)
    if part["method"] == "group" and not part.get("group_key"):
        part["group_key"] = cfg.get("split_key")
    if num_clients is None:
        if part["method"] != "group":
            raise DatasetError("run.num_clients must be set to split one dataset among clients")
        probe = _open_split(base, "train", class_names_of(cfg), None, False)
        num_clients = len(set(probe.group_keys(part["group_key"])))
    part = {k: v for k, v in part.items() if v is not None}
    return [dict(base, partition=dict(part, num_clients=num_clients, client_index=k)) for k in range(num_clients)]


def prepare_federation(data_cfg: Mapping, num_clients: int | None) -> Federation:
    """Work out every client's data for a federation run on this machine (``mode=embedded``).

    Called once by the launcher before it starts the server and the client
    processes.  ``data.format`` decides:

    - ``synthetic``: generate (or reuse) ``num_clients`` camera folders under
      ``data.root`` and return one ``voc`` spec per camera;
    - ``voc``: one spec per client VOC folder under ``data.root`` (or those
      named by ``data.clients``); if ``data.root`` is itself one VOC folder,
      it is shared out by ``data.partition`` (IID by default);
    - ``street_json``: split the Street JSON release by ``data.split_key``
      (``device1_id``: 5 clients, ``device2_id``: 20), or by ``data.partition``;
    - ``coco``: split the COCO files by ``data.partition`` (Dirichlet by default).

    Every client's data is opened once here, so a missing or malformed dataset
    fails at start-up; the result's ``summary`` tabulates each client's class counts.

    :param num_clients: ``run.num_clients``; ``None`` means as many as the data
        defines (client folders, or group values).  A mismatch with the
        folders found is an error saying which number to use.
    """
    cfg = _plain(data_cfg, "data")
    fmt = _format_of(cfg, "data", FORMATS)
    class_names = class_names_of(cfg)
    base = _common_spec(cfg)

    if fmt == "synthetic":
        n = int(num_clients or cfg.get("num_clients") or 3)
        params = {
            "num_clients": n,
            "train_per_client": int(cfg.get("train_per_client", 48)),
            "test_per_client": int(cfg.get("test_per_client", 16)),
            "image_size": int(cfg.get("image_size", 128)),
            "seed": int(cfg.get("seed", 0)),
            "classes": list(class_names),
            "class_skew": float(cfg.get("class_skew", 0.5)),
            "image_format": str(cfg.get("image_format", "jpg")),
            "version": GENERATOR_VERSION,
        }
        gen = {k: v for k, v in params.items() if k != "version"}
        folders = generate_synthetic_federation(_synthetic_root(cfg, params), **gen)
        specs = [dict(base, format="voc", path=str(f), train_split="train", test_split="test") for f in folders]
    elif fmt == "voc":
        root = Path(str(_required(cfg, "root", "data"))).expanduser()
        base = dict(base, format="voc", path=str(root))
        if is_voc_folder(root) and not cfg.get("clients"):
            folders = []
            specs = _partitioned_specs(cfg, base, num_clients, "iid")
        else:
            folders = _voc_client_folders(root, cfg.get("clients"))
            if num_clients is not None and num_clients != len(folders):
                raise DatasetError(
                    f"data.root {root} holds {len(folders)} client folder(s) ({', '.join(f.name for f in folders[:8])}"
                    f"{', ...' if len(folders) > 8 else ''}) but run.num_clients={num_clients}: set "
                    f"run.num_clients={len(folders)} or pick folders with data.clients=[...]"
                )
            specs = [dict(base, path=str(f)) for f in folders]
    elif fmt == "street_json":
        root = str(_required(cfg, "root", "data"))
        base = dict(base, format="street_json", path=root)
        if cfg.get("images_dir"):
            base["images_dir"] = str(cfg["images_dir"])
        folders = []
        specs = _partitioned_specs(cfg, base, num_clients, "group")
    else:  # coco
        root = str(_required(cfg, "root", "data"))
        base = dict(base, format="coco", path=root)
        for key in ("train_ann", "test_ann", "train_images", "test_images"):
            if cfg.get(key) is not None:
                base[key] = str(cfg[key])
        folders = []
        specs = _partitioned_specs(cfg, base, num_clients, "dirichlet")

    names = [f.name for f in folders] if folders else [f"client_{k}" for k in range(len(specs))]
    for spec, name in zip(specs, names):
        spec["name"] = name
    summary = _summarise(specs, class_names, names)
    log.info("data: %d clients, classes %s\n%s", len(specs), list(class_names), summary)
    return Federation(class_names=class_names, client_specs=specs, client_names=names, summary=summary)


def _summarise(specs: Sequence[dict], class_names: tuple[str, ...], names: Sequence[str]) -> str:
    """Open every client's data (checking it) and tabulate its class counts per split."""
    cache: dict = {}
    opened = [_open_client_data(spec, class_names, {}, cache) for spec in specs]
    tables = []
    for split in ("train", "test"):
        labels, parts = [], []
        for data in opened:
            ds = getattr(data, split)
            parts.append(list(range(len(labels), len(labels) + len(ds))))
            labels.extend(ds.image_labels(i) for i in range(len(ds)))
        tables.append(f"{split} split (objects per class):\n" + describe_partition(labels, parts, class_names, names))
    return "\n".join(tables)


__all__ = [
    "CLASSES",
    "COCODetection",
    "ClientData",
    "DatasetError",
    "DetectionDataset",
    "DetectionSubset",
    "Federation",
    "ImageRecord",
    "StreetJSONDetection",
    "VOCDetection",
    "class_names_of",
    "detection_collate",
    "generate_synthetic_federation",
    "open_client_data",
    "prepare_federation",
]
