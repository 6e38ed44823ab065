"""fedplug's data: the core's one entry point into every dataset format.

Who calls what, and when:

- the embedded launcher (``mode=embedded``) calls :func:`prepare_federation`
  once at start-up with the ``data`` config group: it generates the synthetic
  data if needed, checks the dataset, works out one *client spec* per client
  (a small JSON-able dict) and a printable summary of each client's class counts;
  when the test set is shared (the Street release), ``Federation.shared_test``
  describes it;
- a stand-alone server (``mode=server``) calls :func:`class_names_of` to learn
  the class list it sends to clients in ``init``; a server evaluating on a
  held-out set opens it with :func:`open_eval_data`;
- every client calls :func:`open_client_data` with its spec (``client.data``
  in ``mode=client``; filled in by the launcher in ``mode=embedded``) and the
  class names from the server, and hands ``ClientData.train`` /
  ``ClientData.test`` to the detector's hooks;
- detector plugins batch with :func:`detection_collate`.

A client spec, by format (paths may be relative to the working directory)::

    {"format": "voc", "path": "/data/site1", "train_split": "train", "test_split": "test"}
    {"format": "street_json", "path": "/data/street", "images_dir": "images", "test_split": None,
     "partition": {"method": "group", "group_key": "device1_id", "num_clients": 5, "client_index": 2}}
    {"format": "coco", "path": "/data/coco", "train_ann": "annotations/train.json", "train_images": "train",
     "test_ann": "annotations/test.json", "test_images": "test",
     "partition": {"method": "dirichlet", "alpha": 0.5, "seed": 0, "num_clients": 3, "client_index": 0}}

Optional in every spec: ``partition`` (share one dataset among simulated
clients; see :mod:`fedplug.data.partition`), ``drop_difficult_train`` (leave
``difficult`` objects out of training), ``augment`` (used when the
``augment`` argument is ``None``) and ``on_bad_image`` (``fail`` | ``skip`` an
image that does not decode; see :mod:`fedplug.data.images`).  ``test_split:
None`` marks a client whose test set is shared: its ``ClientData.test`` is
empty and the server evaluates on ``Federation.shared_test``.  Everything is
documented in ``docs/data.md``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from fedplug.data.checks import check_case_clashes
from fedplug.data.coco import COCODetection, coco_class_names
from fedplug.data.config import MISSING, format_of, plain, required, resolve_path
from fedplug.data.detection import DetectionDataset, DetectionSubset, ImageRecord
from fedplug.data.errors import DatasetError
from fedplug.data.images import check_on_bad_image
from fedplug.data.layout import detect_format
from fedplug.data.opening import (
    CLIENT_FORMATS,
    SHARED_TEST,
    ClientData,
    open_client_data,
    open_eval_data,
    open_split,
)
from fedplug.data.opening import _open_with_source
from fedplug.data.partition import group_client_names
from fedplug.data.street import StreetJSONDetection, street_class_names
from fedplug.data.summary import shared_test_table, skipped_line, split_table
from fedplug.data.synthetic import CLASSES, GENERATOR_VERSION, generate_synthetic_federation
from fedplug.data.voc import VOCDetection, is_voc_folder

log = logging.getLogger("fedplug.data")

FORMATS = ("auto", "synthetic", "voc", "street_json", "coco")


@dataclass
class Federation:
    """What :func:`prepare_federation` found: the classes and one spec per client."""

    class_names: tuple[str, ...]
    client_specs: list[dict]
    client_names: list[str] = field(default_factory=list)
    summary: str = ""  # each client's image and per-class object counts, ready to print
    # The test set every client shares, as a JSON-able spec for open_eval_data, e.g.
    # {"format": "street_json", "path": root, "split": "test", "on_bad_image": "fail"};
    # None when each client has its own test split.  Client specs then carry test_split: None.
    shared_test: dict | None = None


def detection_collate(batch):
    """Batch ``(image, target)`` pairs as torchvision detectors take them: (list of images, list of targets)."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)


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
            "<client>/ImageSets/Main in each client's folder (for the Street JSON release, "
            "train_label.json and test_label.json, use data.format=street_json or auto)"
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
    check_case_clashes(names, f"the VOC annotations under {root}")
    return tuple(sorted(names))


def _with_format(cfg: dict) -> dict:
    """``cfg`` with ``format: auto`` replaced by the format ``data.root`` holds (:func:`~fedplug.data.layout.detect_format`)."""
    if format_of(cfg, "data", FORMATS) != "auto":
        return cfg
    root = Path(str(required(cfg, "root", "data"))).expanduser()
    return dict(cfg, format=detect_format(root))


def class_names_of(data_cfg: Mapping) -> tuple[str, ...]:
    """The run's class list, without background, in label order.

    ``data.classes`` when set; otherwise read from the data (synthetic: its
    default classes; VOC: every ``<name>`` under ``data.root``, sorted; Street
    JSON: every item class, sorted; COCO: categories in id order; ``auto``:
    whichever of VOC / Street JSON ``data.root`` holds).  Names read from the
    data that differ only in case are an error.  Called by the server at
    start-up; the list travels to clients in ``init``.
    """
    cfg = plain(data_cfg, "data")
    classes = cfg.get("classes")
    if classes and classes != MISSING:
        if isinstance(classes, str):
            raise DatasetError(f"data.classes must be a list such as [car, person], got the string {classes!r}")
        names = tuple(str(c) for c in classes)
        if len(set(names)) != len(names):
            raise DatasetError(f"data.classes has duplicates: {list(names)}")
        return names
    if format_of(cfg, "data", FORMATS) == "synthetic":
        return CLASSES
    cfg = _with_format(cfg)
    fmt = cfg["format"]
    root = Path(str(required(cfg, "root", "data"))).expanduser()
    if fmt == "voc":
        return _voc_class_names(root)
    if fmt == "street_json":
        return street_class_names(root)
    return coco_class_names(resolve_path(root, required(cfg, "train_ann", "data")))


def _synthetic_root(cfg: Mapping, params: Mapping) -> Path:
    # One folder per parameter set, so runs with different settings sharing the
    # cache never regenerate (and pull away) each other's data.
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    name = (
        f"{params['num_clients']}cams-{params['train_per_client']}x{params['test_per_client']}"
        f"-{params['image_size']}px-seed{params['seed']}-{digest}"
    )
    return Path(str(required(cfg, "root", "data"))).expanduser() / name


def _common_spec(cfg: Mapping) -> dict:
    spec = {
        "train_split": cfg.get("train_split", "train"),
        "test_split": cfg.get("test_split", "test"),
        "drop_difficult_train": bool(cfg.get("drop_difficult_train", False)),
        # in every spec, so a client process skips (or refuses) unreadable images as the launcher did
        "on_bad_image": check_on_bad_image(cfg.get("on_bad_image"), "data.on_bad_image"),
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
        probe = open_split(base, "train", class_names_of(cfg), None, False)
        num_clients = len(set(probe.group_keys(part["group_key"])))
    part = {k: v for k, v in part.items() if v is not None}
    return [dict(base, partition=dict(part, num_clients=num_clients, client_index=k)) for k in range(num_clients)]


def _shared_test_spec(spec: Mapping) -> dict:
    """The JSON-able spec of a shared test set, for :func:`open_eval_data` (no training or partition keys)."""
    dropped = ("partition", "name", "augment", "drop_difficult_train", "train_split", "train_ann", "train_images",
               "test_split")
    shared = {k: v for k, v in spec.items() if k not in dropped}
    shared["split"] = spec.get("test_split", "test") if spec["format"] != "coco" else "test"
    return shared


def prepare_federation(data_cfg: Mapping, num_clients: int | None) -> Federation:
    """Work out every client's data for a federation run on this machine (``mode=embedded``).

    Called once by the launcher before it starts the server and the client
    processes.  ``data.format`` decides:

    - ``auto`` (the Street configs): ``street_json`` if ``data.root`` holds
      ``train_label.json``, ``voc`` if it holds VOC folders, else an error
      naming both layouts;
    - ``synthetic``: generate (or reuse) ``num_clients`` camera folders under
      ``data.root`` and return one ``voc`` spec per camera;
    - ``voc``: one spec per client VOC folder under ``data.root`` (or those
      named by ``data.clients``); if ``data.root`` is itself one VOC folder,
      it is shared out by ``data.partition`` (IID by default);
    - ``street_json``: split the Street JSON release by ``data.split_key``
      (``device1_id``: 5 clients, ``device2_id``: 20), or by ``data.partition``;
      clients are named after their device (``device_3``).  A test file whose
      entries carry no ``split_key`` (the release as distributed) is one
      shared test set: it is not split, every client spec gets
      ``test_split: None`` and :attr:`Federation.shared_test` describes it;
    - ``coco``: split the COCO files by ``data.partition`` (Dirichlet by default).

    Every client's data is opened once here (annotations parsed, every image
    decode-checked), so a missing or malformed dataset fails at start-up; the
    result's ``summary`` tabulates each client's class counts as used.

    :param num_clients: ``run.num_clients``; ``None`` means as many as the data
        defines (client folders, or group values).  A mismatch with the
        folders found is an error saying which number to use.
    """
    cfg = _with_format(plain(data_cfg, "data"))
    fmt = cfg["format"]
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
        root = Path(str(required(cfg, "root", "data"))).expanduser()
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
        root = str(required(cfg, "root", "data"))
        base = dict(base, format="street_json", path=root)
        if cfg.get("images_dir"):
            base["images_dir"] = str(cfg["images_dir"])
        folders = []
        specs = _partitioned_specs(cfg, base, num_clients, "group")
    else:  # coco
        root = str(required(cfg, "root", "data"))
        base = dict(base, format="coco", path=root)
        for key in ("train_ann", "test_ann", "train_images", "test_images"):
            if cfg.get(key) is not None:
                base[key] = str(cfg[key])
        folders = []
        specs = _partitioned_specs(cfg, base, num_clients, "dirichlet")

    # Open (and so check) every client's data once; partitioned clients share one parse.
    cache: dict = {}
    opened, sources = zip(*(_open_with_source(spec, class_names, {}, cache) for spec in specs))
    shared = sources[0].shared_test
    shared_test = None
    if shared is not None:
        shared_test = _shared_test_spec(specs[0])
        for spec in specs:
            spec["test_split"] = SHARED_TEST  # the client opens no test split: the server evaluates the shared one
    part = specs[0].get("partition")
    if folders:
        names = [f.name for f in folders]
    elif part and part["method"] == "group" and sources[0].assignment is not None:
        names = group_client_names(part["group_key"], sources[0].assignment, len(specs))
    else:
        names = [f"client_{k}" for k in range(len(specs))]
    for spec, name in zip(specs, names):
        spec["name"] = name
    summary = _summarise(opened, sources, names, class_names, shared)
    log.info("data: %d clients, classes %s\n%s", len(specs), list(class_names), summary)
    return Federation(class_names=class_names, client_specs=specs, client_names=names, summary=summary,
                      shared_test=shared_test)


def _summarise(opened, sources, names, class_names, shared) -> str:
    """Tabulate every client's class counts per split (the shared test set once), and the skipped images."""
    lines = []
    distinct = list({id(s): s for s in sources}.values())
    for split in ("train", "test"):
        if split == "test" and shared is not None:
            lines.append(shared_test_table(shared, class_names))
            continue
        datasets = [getattr(data, split) for data in opened]
        lines.append(split_table(datasets, names, class_names, split))
        parents = [getattr(s, split) for s in distinct if getattr(s, split) is not None]
        unattributed = sum(len(p.skipped) for p in parents) - sum(len(getattr(d, "skipped", ())) for d in datasets)
        line = skipped_line(datasets, names, split, max(0, unattributed))
        if line:
            lines.append(line)
    return "\n".join(lines)


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
    "open_eval_data",
    "prepare_federation",
]
