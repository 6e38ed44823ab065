"""Decoding image files, and checking up front that every image of a dataset decodes.

Every loader calls :func:`check_images` when it is built (through
:meth:`fedplug.data.detection.DetectionDataset._set_records`), so a corrupt or
truncated file is reported at start-up -- or left out and counted, with
``on_bad_image: skip`` -- instead of killing its client in round 1.  The check
also yields each image's size, which the box policy
(:func:`fedplug.data.checks.fit_boxes_to_images`) needs.

Verdicts are cached in-process per ``(path, file size, mtime)``: the embedded
launcher and a client opening the same files in one process (tests, the
in-process benchmarks) decode each image once, and a file rewritten in place
is checked again.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from fedplug.data.errors import DatasetError

ON_BAD_IMAGE = ("fail", "skip")
# What PIL raises for a file that is not a decodable image: unidentified or
# truncated data (OSError), bad headers (SyntaxError, ValueError), absurd sizes.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

_verdicts: dict[tuple[str, int, int], tuple[int, int] | str] = {}


def check_on_bad_image(value: object, where: str = "data.on_bad_image") -> str:
    """The validated ``on_bad_image`` policy (``fail`` when unset)."""
    value = "fail" if value is None else str(value)
    if value not in ON_BAD_IMAGE:
        raise DatasetError(f"{where} is {value!r}; choose one of {list(ON_BAD_IMAGE)}")
    return value


def probe_image(path: Path) -> tuple[int, int] | str:
    """``(width, height)`` if ``path`` decodes completely, else the reason it does not (a string)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"cannot open: {exc.strerror or exc}"
    key = (str(path), st.st_size, st.st_mtime_ns)
    verdict = _verdicts.get(key)
    if verdict is None:
        verdict = _decode_check(path)
        _verdicts[key] = verdict
    return verdict


def _decode_check(path: Path) -> tuple[int, int] | str:
    try:
        with Image.open(path) as img:
            size = img.size
            if img.format == "JPEG":
                # Decode at 1/8 scale: libjpeg still reads every coefficient, so a
                # truncated or corrupt stream fails as in a full decode, but skips the full-size IDCT.
                img.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
            img.load()
    except DECODE_ERRORS as exc:
        return str(exc) or type(exc).__name__
    if size[0] < 1 or size[1] < 1:
        return f"empty image ({size[0]}x{size[1]})"
    return size


def check_images(paths: Sequence[Path], on_bad_image: str, source: str) -> tuple[list[tuple[int, int] | None], list[str]]:
    """Decode-check every image: each one's size (``None`` if unreadable) and the descriptions of the unreadable ones.

    ``on_bad_image="fail"`` raises a :class:`DatasetError` naming the first few
    unreadable files and how many there are; ``"skip"`` warns once and lets
    the caller drop them.
    """
    sizes, bad = [], []
    for path in paths:
        verdict = probe_image(Path(path))
        if isinstance(verdict, str):
            sizes.append(None)
            bad.append(f"{path} ({verdict})")
        else:
            sizes.append(verdict)
    if bad:
        shown = "; ".join(bad[:3]) + (f"; ... and {len(bad) - 3} more" if len(bad) > 3 else "")
        if on_bad_image == "fail":
            raise DatasetError(
                f"{source}: {len(bad)} image(s) cannot be decoded: {shown}. Fix or remove them, or set "
                "data.on_bad_image=skip (client.data.on_bad_image in mode=client) to leave them out"
            )
        warnings.warn(f"{source}: skipped {len(bad)} unreadable image(s) (data.on_bad_image=skip): {shown}")
    return sizes, bad


def load_rgb(path: Path) -> torch.Tensor:
    """Decode an image file as a float32 ``[3, H, W]`` tensor in ``[0, 1]``."""
    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except DECODE_ERRORS as exc:
        raise DatasetError(
            f"cannot read image {path}: {exc} (it decoded when the dataset was opened: "
            "was it changed or removed during the run?)"
        ) from exc
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)
