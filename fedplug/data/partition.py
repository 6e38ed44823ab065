"""Splitting one dataset among N simulated clients: IID, Dirichlet over classes, or by a group key.

Called by :func:`fedplug.data.open_client_data` when a client spec carries a
``partition`` block (COCO, the Street JSON release, or one VOC folder shared
out among clients), and by :func:`fedplug.data.prepare_federation` to print
each client's class counts.  Every function returns ``num_clients`` lists of
image indices in which every index appears exactly once.

Train and test splits are partitioned separately but consistently: the
Dirichlet class proportions depend only on ``(seed, num_clients, num_classes,
alpha)`` and the group-to-client assignment only on the group values, so a
client's test images follow the same class mix / the same cameras as its
training images.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Hashable, Mapping, Sequence

import numpy as np

from fedplug.data.errors import DatasetError

METHODS = ("iid", "dirichlet", "group")


def iid_partition(num_items: int, num_clients: int, seed: int = 0) -> list[list[int]]:
    """Shuffle and deal the indices into ``num_clients`` parts whose sizes differ by at most one."""
    _check_clients(num_clients)
    order = np.random.default_rng([seed, 1]).permutation(num_items)
    return [sorted(part.tolist()) for part in np.array_split(order, num_clients)]


def dirichlet_proportions(num_clients: int, num_classes: int, alpha: float, seed: int = 0) -> np.ndarray:
    """Each class's share per client, ``[num_clients, num_classes]``, columns summing to 1.

    Smaller ``alpha`` gives more skew (0.1: most of a class on one client;
    100: nearly IID).
    """
    if not alpha > 0:
        raise DatasetError(f"partition.alpha must be > 0, got {alpha}")
    rng = np.random.default_rng([seed, 2])
    return rng.dirichlet(np.full(num_clients, float(alpha)), size=num_classes).T


def primary_labels(image_labels: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """One class per image for class-aware splitting: its most frequent label.

    Ties go to the class that is rarer over the whole dataset (so rare classes
    get skewed too); images with no object get 0.
    """
    totals = np.zeros(num_classes + 1, np.int64)
    for labels in image_labels:
        np.add.at(totals, np.asarray(labels, np.int64), 1)
    primary = np.zeros(len(image_labels), np.int64)
    for i, labels in enumerate(image_labels):
        if len(labels):
            counts = Counter(int(v) for v in labels)
            primary[i] = max(counts, key=lambda c: (counts[c], -totals[c], -c))
    return primary


def dirichlet_partition(
    image_labels: Sequence[np.ndarray],
    num_clients: int,
    num_classes: int,
    alpha: float = 0.5,
    seed: int = 0,
    min_size: int = 1,
) -> list[list[int]]:
    """Non-IID split: the images of each (primary) class go to clients in Dirichlet(``alpha``) shares.

    Images without objects are dealt evenly.  Afterwards any client holding
    fewer than ``min_size`` images receives images from the largest clients,
    so no client is left without training data.
    """
    _check_clients(num_clients)
    primary = primary_labels(image_labels, num_classes)
    shares = dirichlet_proportions(num_clients, num_classes, alpha, seed)
    rng = np.random.default_rng([seed, 3])
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for cls in range(num_classes + 1):
        members = rng.permutation(np.flatnonzero(primary == cls))
        if not len(members):
            continue
        share = np.full(num_clients, 1.0 / num_clients) if cls == 0 else shares[:, cls - 1]
        cuts = (np.cumsum(share)[:-1] * len(members)).round().astype(int)
        for client, chunk in enumerate(np.split(members, cuts)):
            parts[client].extend(chunk.tolist())
    _top_up(parts, min(min_size, len(image_labels) // num_clients), rng)
    return [sorted(p) for p in parts]


def _top_up(parts: list[list[int]], min_size: int, rng: np.random.Generator) -> None:
    for client in range(len(parts)):
        while len(parts[client]) < min_size:
            donor = max(range(len(parts)), key=lambda c: len(parts[c]))
            parts[client].append(parts[donor].pop(int(rng.integers(len(parts[donor])))))


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "number"
    return "string" if isinstance(value, str) else type(value).__name__


def _article(kind: str) -> str:
    return kind if kind == "null" else f"a {kind}"


def check_group_values(
    values: Sequence[Any], names: Sequence[str] | None = None, key: str = "group key", source: str = "",
    items: str = "image(s)",
) -> None:
    """Refuse group values that would silently reshape the group-to-client mapping.

    A ``null`` device id, or a string such as ``"3"`` among integers, is one
    more group: with as many groups as clients it shifts every later camera
    to another client, and ``3`` and ``"3"`` split one camera between two.
    The message names the images (their ids) and the offending values.
    """
    names = list(names) if names is not None else [f"{items.removesuffix('(s)')} {i}" for i in range(len(values))]
    kinds = Counter(_kind(v) for v in values)
    bad_kinds = {"null"} if "null" in kinds else set()
    rest = [k for k in kinds if k != "null"]
    if len(rest) > 1:
        majority = max(rest, key=lambda k: (kinds[k], k == "number"))
        bad_kinds |= {k for k in rest if k != majority}
    if not bad_kinds:
        return
    bad = [(n, v) for n, v in zip(names, values) if _kind(v) in bad_kinds]
    shown = ", ".join(f"{n!r}: {v!r}" for n, v in bad[:5]) + (f", ... ({len(bad) - 5} more)" if len(bad) > 5 else "")
    usual = ", ".join(sorted(k for k in rest if k not in bad_kinds)) or "none"
    where = f"{source}: " if source else ""
    raise DatasetError(
        f"{where}{len(bad)} {items} have a {key} that is {' or '.join(_article(k) for k in sorted(bad_kinds))} while the others are "
        f"{usual}s: {shown}. Every image needs a {key} of the same kind (e.g. all integers) so each camera "
        "goes to exactly one client; fix those entries"
    )


def group_assignment(group_sizes: Mapping[Hashable, int], num_clients: int) -> dict[Hashable, int]:
    """Map each group value (camera, device id, ...) to a client.

    With as many groups as clients, the ``k``-th group in sorted order goes to
    client ``k``.  With more groups, the largest groups are placed first, each on
    the client holding the fewest images so far (balanced, deterministic).
    ``null`` values or values of mixed kinds (``3`` beside ``"3"``) are an
    error (:func:`check_group_values`), never a silent remapping.
    """
    _check_clients(num_clients)
    check_group_values(list(group_sizes), [f"group {v!r}" for v in group_sizes], items="group(s)")
    values = sorted(group_sizes, key=_sort_key)
    if len(values) < num_clients:
        raise DatasetError(
            f"cannot split {len(values)} group(s) {values[:20]} among {num_clients} clients: "
            f"choose at most {len(values)} clients (run.num_clients) or another partition method"
        )
    if len(values) == num_clients:
        return {v: k for k, v in enumerate(values)}
    load = [0] * num_clients
    assignment = {}
    for v in sorted(values, key=lambda v: (-group_sizes[v], _sort_key(v))):
        client = min(range(num_clients), key=lambda c: (load[c], c))
        assignment[v] = client
        load[client] += group_sizes[v]
    return assignment


def group_client_names(key: str, assignment: Mapping[Hashable, int], num_clients: int) -> list[str]:
    """Client names after the groups they hold: ``device_3`` for ``device1_id`` 3, ``device_1-5`` for two devices.

    The prefix is the key without a trailing ``<digits>_id`` / ``_id``
    (``device1_id``, ``device2_id`` -> ``device``; ``camera_id`` -> ``camera``;
    ``location`` stays).  Names are made safe for a command line and a file
    name (letters, digits, ``_ . -``) and unique.
    """
    prefix = re.sub(r"\d*_id$", "", key) or key
    held: list[list] = [[] for _ in range(num_clients)]
    for value, client in assignment.items():
        held[client].append(value)
    names: list[str] = []
    for k, values in enumerate(held):
        label = "-".join(re.sub(r"[^A-Za-z0-9_.]", "_", str(v)) for v in sorted(values, key=_sort_key))
        name = f"{prefix}_{label}" if label else f"client_{k}"
        names.append(name if name not in names else f"{name}_{k}")
    return names


def group_partition(
    keys: Sequence[Hashable], num_clients: int, assignment: Mapping[Hashable, int] | None = None
) -> list[list[int]]:
    """Split by a per-image group key: all images of one group go to one client.

    ``assignment`` (from :func:`group_assignment`) should be computed over the
    union of the train and test keys, so both splits map groups identically;
    by default it is computed from ``keys`` alone.
    """
    if assignment is None:
        assignment = group_assignment(Counter(keys), num_clients)
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for i, key in enumerate(keys):
        if key not in assignment:
            raise DatasetError(f"image {i} has group {key!r}, which no client was assigned")
        parts[assignment[key]].append(i)
    return parts


def _sort_key(value: Any) -> tuple:
    # Numbers sort numerically, before strings; mixed types never raise.
    return (0, float(value), "") if isinstance(value, (int, float)) else (1, 0.0, str(value))


def _check_clients(num_clients: int) -> None:
    if int(num_clients) < 1:
        raise DatasetError(f"the number of clients must be >= 1, got {num_clients}")


def partition_class_counts(
    image_labels: Sequence[np.ndarray], parts: Sequence[Sequence[int]], num_classes: int
) -> np.ndarray:
    """Objects per class in each part, ``int64 [num_parts, num_classes]``."""
    counts = np.zeros((len(parts), num_classes), np.int64)
    for client, indices in enumerate(parts):
        for i in indices:
            np.add.at(counts[client], np.asarray(image_labels[i], np.int64) - 1, 1)
    return counts


def describe_partition(
    image_labels: Sequence[np.ndarray],
    parts: Sequence[Sequence[int]],
    class_names: Sequence[str],
    client_names: Sequence[str] | None = None,
    print_fn=None,
    first_column: str = "client",
) -> str:
    """A table of each client's images and objects per class; printed too when ``print_fn`` is given.

    ``image_labels[i]`` holds image ``i``'s labels (``1..K``); ``parts`` is
    what the partition functions return.
    """
    counts = partition_class_counts(image_labels, parts, len(class_names))
    names = list(client_names) if client_names is not None else [f"client {k}" for k in range(len(parts))]
    header = [first_column, "images", *class_names]
    rows = [
        [names[k], str(len(parts[k])), *(str(int(v)) for v in counts[k])] for k in range(len(parts))
    ]
    rows.append(["total", str(sum(len(p) for p in parts)), *(str(int(v)) for v in counts.sum(axis=0))])
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if c else cell.ljust(w) for c, (cell, w) in enumerate(zip(r, widths)))
             for r in [header, *rows]]
    table = "\n".join(lines)
    if print_fn is not None:
        print_fn(table)
    return table


def partition_indices(
    method: str,
    num_clients: int,
    image_labels: Sequence[np.ndarray],
    num_classes: int,
    *,
    alpha: float = 0.5,
    seed: int = 0,
    min_size: int = 1,
    group_keys: Sequence[Hashable] | None = None,
    group_assignment_map: Mapping[Hashable, int] | None = None,
) -> list[list[int]]:
    """Dispatch to the partition ``method`` (``iid`` | ``dirichlet`` | ``group``)."""
    if method == "iid":
        return iid_partition(len(image_labels), num_clients, seed)
    if method == "dirichlet":
        return dirichlet_partition(image_labels, num_clients, num_classes, alpha, seed, min_size)
    if method == "group":
        if group_keys is None:
            raise DatasetError("partition.method=group needs partition.group_key naming a per-image key")
        return group_partition(group_keys, num_clients, group_assignment_map)
    raise DatasetError(f"unknown partition.method {method!r}; choose one of {list(METHODS)}")
