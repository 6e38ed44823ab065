"""The start-up table :func:`fedplug.data.prepare_federation` prints: what each client really uses.

Counts are taken from the opened datasets, after unreadable images were
skipped and boxes outside their image clipped or dropped, so the table is
what training and evaluation see.  A shared test set is shown once, not as
per-client test counts; skipped images are counted per client where they can
be attributed (their own folder, or their device under a ``group`` partition).
"""

from __future__ import annotations

from typing import Sequence

from fedplug.data.partition import describe_partition


def _labels_and_parts(datasets: Sequence) -> tuple[list, list]:
    labels, parts = [], []
    for ds in datasets:
        parts.append(list(range(len(labels), len(labels) + len(ds))))
        labels.extend(ds.image_labels(i) for i in range(len(ds)))
    return labels, parts


def split_table(datasets: Sequence, names: Sequence[str], class_names: Sequence[str], split: str) -> str:
    labels, parts = _labels_and_parts(datasets)
    return f"{split} split (objects per class):\n" + describe_partition(labels, parts, class_names, names)


def skipped_line(datasets: Sequence, names: Sequence[str], split: str, unattributed: int = 0) -> str:
    """``"skipped unreadable images (train): device_1 2, device_4 1"``, or ``""`` when none was skipped."""
    per_client = [(name, len(getattr(ds, "skipped", ()))) for ds, name in zip(datasets, names)]
    parts = [f"{name} {n}" for name, n in per_client if n]
    if unattributed:
        parts.append(f"{unattributed} in the dataset shared out among the clients")
    if not parts:
        return ""
    return f"skipped unreadable images ({split}, data.on_bad_image=skip): " + ", ".join(parts)


def shared_test_table(dataset, class_names: Sequence[str]) -> str:
    """One row for the test set every client's model is evaluated on (it is not split among clients)."""
    labels, parts = _labels_and_parts([dataset])
    table = describe_partition(labels, parts, class_names, ["shared test set"], first_column="set")
    table = "\n".join(table.splitlines()[:-1])  # one row: its "total" row would repeat it
    lines = [f"shared test set (not split among clients; {dataset.source}):", table]
    if getattr(dataset, "skipped", None):
        lines.append(f"skipped unreadable images (shared test set, data.on_bad_image=skip): {len(dataset.skipped)}")
    return "\n".join(lines)
