"""Checks that turn silent data problems into a message: coordinates, boxes off the image, class spelling.

Used by every loader (:mod:`~fedplug.data.voc`, :mod:`~fedplug.data.street`,
:mod:`~fedplug.data.coco`) and by :func:`fedplug.data.class_names_of`.

Box policy (applied once, when a dataset is built, so the start-up table counts
exactly the boxes that are trained and evaluated on):

- a coordinate that is not a finite number is an error naming the image;
- a box partly outside its image is clipped to the image;
- a box wholly outside its image (nothing left after clipping) is dropped;
- one warning per dataset counts both, with a few examples.  Overhangs of at
  most :data:`EDGE_TOLERANCE` pixels are clipped without a warning: they are
  rounding (``xmax = width + 1`` in 1-based tools), not annotation errors.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np

from fedplug.data.errors import DatasetError

EDGE_TOLERANCE = 1.0  # pixels


def box_numbers(values: object, where: str, form: str = "[xmin, ymin, xmax, ymax]") -> list[float]:
    """A JSON bbox as 4 floats; anything but 4 finite JSON numbers is an error naming the bad value."""
    if not isinstance(values, (list, tuple)) or len(values) != 4:
        raise DatasetError(f"{where}: bbox must be 4 finite numbers {form}, got {values!r}")
    for v in values:
        # bool is an int to Python but never a coordinate; "12" or "nan" is a string, not a number.
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise DatasetError(
                f"{where}: bbox must be 4 finite numbers {form}, got {values!r} (bad value {v!r})"
            )
    return [float(v) for v in values]


def finite_coordinate(text: str | None, tag: str, where: str) -> float:
    """One VOC ``<bndbox>`` coordinate; missing, non-numeric, ``nan`` or ``inf`` is an error naming the value."""
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise DatasetError(f"{where}: <{tag}> must be a finite number, got {text!r} (bbox must be 4 finite numbers)")
    return value


def fit_boxes_to_images(records: Sequence, sizes: Sequence[tuple[int, int]], source: str) -> None:
    """Clip each record's boxes to its image and drop those wholly outside (in place), warning once with a count."""
    clipped, dropped = [], []
    for record, (width, height) in zip(records, sizes):
        b = record.boxes
        if not len(b):
            continue
        fitted = b.copy()
        fitted[:, 0::2] = fitted[:, 0::2].clip(0, width)
        fitted[:, 1::2] = fitted[:, 1::2].clip(0, height)
        inside = (fitted[:, 2] > fitted[:, 0]) & (fitted[:, 3] > fitted[:, 1])
        overhang = np.maximum.reduce(
            [-b[:, 0], -b[:, 1], b[:, 2] - width, b[:, 3] - height, np.zeros(len(b), b.dtype)]
        )
        label = record.name or str(record.path)
        for row in np.flatnonzero(~inside):
            dropped.append(f"{label} {b[row].tolist()} in {width}x{height}")
        for row in np.flatnonzero(inside & (overhang > EDGE_TOLERANCE)):
            clipped.append(f"{label} {b[row].tolist()} in {width}x{height}")
        record.boxes = fitted[inside]
        record.labels, record.difficult = record.labels[inside], record.difficult[inside]
    if clipped or dropped:
        examples = (dropped + clipped)[:3]
        more = len(dropped) + len(clipped) - len(examples)
        warnings.warn(
            f"{source}: {len(clipped)} box(es) partly outside their image were clipped to it and "
            f"{len(dropped)} wholly outside were dropped (the counts printed at start-up are after this), e.g. "
            + "; ".join(examples) + (f"; ... ({more} more)" if more > 0 else "")
        )


def case_clashes(names: Iterable[str]) -> list[list[str]]:
    """Groups of class names equal but for letter case, e.g. ``[["Buoy", "buoy"]]``."""
    by_folded: dict[str, set[str]] = defaultdict(set)
    for name in names:
        by_folded[name.casefold()].add(name)
    return [sorted(group) for _, group in sorted(by_folded.items()) if len(group) > 1]


def check_case_clashes(names: Iterable[str], where: str) -> None:
    """Refuse class names read from the data that differ only in case: they would become separate classes."""
    clashes = case_clashes(names)
    if clashes:
        shown = ", ".join(" / ".join(repr(n) for n in group) for group in clashes)
        raise DatasetError(
            f"{where}: class names differ only in letter case: {shown}; each spelling would become a class "
            "of its own. Fix the annotations to one spelling, or set data.classes to the list you mean"
        )


def case_hint(name: object, class_names: Sequence[str]) -> str:
    """``" (did you mean 'buoy'? the case differs)"`` when ``name`` matches a run class but for case, else ``""``."""
    if not isinstance(name, str):
        return ""
    same = [c for c in class_names if c.casefold() == name.casefold()]
    return f" (did you mean {same[0]!r}? the letter case differs)" if same else ""
