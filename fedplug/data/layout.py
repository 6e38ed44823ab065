"""``data.format: auto``: tell a dataset's format from what its folder holds.

The Street configs (``data=street5``, ``data=street20``) use it, so
``python -m fedplug data=street5 data.root=<folder>`` works both for the
Street release as distributed (``train_label.json``, ``test_label.json``,
``images/``) and for the per-client VOC folders.  Called by
:func:`fedplug.data.class_names_of` and :func:`fedplug.data.prepare_federation`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fedplug.data.errors import DatasetError
from fedplug.data.street import label_file
from fedplug.data.voc import is_voc_folder

log = logging.getLogger("fedplug.data")

STREET_LAYOUT = "the Street JSON release (<root>/train_label.json, <root>/test_label.json, <root>/images/)"
VOC_LAYOUT = (
    "one Pascal-VOC folder per client (<root>/<client>/Annotations, <client>/JPEGImages, "
    "<client>/ImageSets/Main/{train,test}.txt), or <root> itself one VOC folder"
)


def detect_format(root: Path) -> str:
    """``street_json`` if ``root`` holds ``train_label.json``; ``voc`` if it is or holds VOC folders; else an error."""
    if not root.is_dir():
        raise DatasetError(f"data.root {root} does not exist: expected {STREET_LAYOUT} or {VOC_LAYOUT}")
    if label_file(root, "train").is_file():
        fmt = "street_json"
    elif is_voc_folder(root) or any(p.is_dir() and is_voc_folder(p) for p in root.iterdir()):
        fmt = "voc"
    else:
        found = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
        shown = ", ".join(found[:10]) + (f", ... ({len(found) - 10} more)" if len(found) > 10 else "")
        raise DatasetError(
            f"data.format=auto cannot tell the layout of data.root {root} (it holds: {shown or 'nothing'}): "
            f"expected {STREET_LAYOUT}, or {VOC_LAYOUT}. Point data.root at one of these, or set "
            "data.format=street_json / data.format=voc"
        )
    log.info("data.format=auto: %s looks like %s", root, "the Street JSON release" if fmt == "street_json" else "VOC")
    return fmt
