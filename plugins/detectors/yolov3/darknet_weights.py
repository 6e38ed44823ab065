"""Reading (and writing) Darknet ``.weights`` files, from local disk only.

Called by :func:`~.model.build_yolov3` when ``model.weights`` names a file;
:func:`save_darknet_weights` writes the same format (tests use it for a round
trip; users may export a trained model to Darknet tools).  Nothing is ever
downloaded.

The format (Darknet's ``save_weights`` / ``load_weights``):

* header: ``major``, ``minor``, ``revision`` as int32, then ``seen`` (images
  seen in training) as int64 when ``major * 10 + minor >= 2`` (and both are
  below 1000), else as int32;
* then, for every ``[convolutional]`` layer in cfg order: with batch norm
  ``biases`` (BN beta), ``scales`` (BN gamma), ``rolling_mean``,
  ``rolling_variance`` (``out`` values each), else the conv's ``biases``
  (``out`` values); then the conv weights (``out x in x k x k``); all
  little-endian float32.

A file may end early on purpose: ``darknet53.conv.74`` holds only the layers
before cfg layer 74 (the Darknet-53 backbone), ``yolov3-tiny.conv.15`` the
first 15 tiny layers.  ``cutoff`` (``model.weights_cutoff``) says how many cfg
layers to load; when it is not given, a file named ``*.conv.N`` gets ``N``.
Without a cutoff the file must match the model exactly.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .network import DarknetConv


class DarknetWeightsError(ValueError):
    """The Darknet weights file is missing, malformed, or does not fit the model."""


@dataclass(frozen=True)
class DarknetHeader:
    major: int
    minor: int
    revision: int
    seen: int

    @property
    def seen_is_int64(self) -> bool:
        return _seen_is_int64(self.major, self.minor)

    @property
    def nbytes(self) -> int:
        return 12 + (8 if self.seen_is_int64 else 4)


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_darknet_weights` did."""

    path: str
    header: DarknetHeader
    convs_loaded: int
    cutoff: int | None
    values_read: int
    values_in_file: int
    heads_reinitialised: int = 0
    file_num_classes: int | None = None


def _seen_is_int64(major: int, minor: int) -> bool:
    return (major * 10 + minor) >= 2 and major < 1000 and minor < 1000


def _conv_shapes(c: DarknetConv) -> list[tuple[str, tuple[int, ...]]]:
    """The arrays of one conv layer in file order."""
    out = c.conv.out_channels
    pre = ["bn.bias", "bn.weight", "bn.running_mean", "bn.running_var"] if c.bn is not None else ["conv.bias"]
    return [(name, (out,)) for name in pre] + [("conv.weight", tuple(c.conv.weight.shape))]


def _conv_size(c: DarknetConv) -> int:
    return sum(int(np.prod(shape)) for _, shape in _conv_shapes(c))


def read_header(path: str | Path) -> DarknetHeader:
    """The header of a Darknet weights file."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(20)
    if len(raw) < 16:
        raise DarknetWeightsError(
            f"{path} is not a Darknet .weights file: it has {len(raw)} bytes, fewer than a header"
        )
    major, minor, revision = struct.unpack("<3i", raw[:12])
    if _seen_is_int64(major, minor):
        if len(raw) < 20:
            raise DarknetWeightsError(f"{path} is not a Darknet .weights file: its header is cut short")
        (seen,) = struct.unpack("<q", raw[12:20])
    else:
        (seen,) = struct.unpack("<i", raw[12:16])
    if major < 0 or minor < 0 or revision < 0 or seen < 0:
        raise DarknetWeightsError(
            f"{path} is not a Darknet .weights file: header (major {major}, minor {minor}, "
            f"revision {revision}, seen {seen}) has negative fields"
        )
    return DarknetHeader(major, minor, revision, seen)


def cutoff_from_name(path: str | Path) -> int | None:
    """``darknet53.conv.74`` -> 74: Darknet's ``partial`` names its output files this way."""
    m = re.search(r"\.conv\.(\d+)$", Path(path).name)
    return int(m.group(1)) if m else None


def load_darknet_weights(
    model: nn.Module,
    path: str | Path,
    cutoff: int | None = None,
    reinit_heads: bool = False,
) -> LoadReport:
    """Load a local Darknet ``.weights`` file into a :class:`~.model.YOLOv3` (in place).

    :param cutoff: load the conv layers of cfg layers ``0 .. cutoff-1`` only (a
        Darknet layer count, as in ``darknet partial``); ``None``: from a
        ``*.conv.N`` file name, else every layer, and then the file must hold
        exactly what the model needs.
    :param reinit_heads: load every layer except the linear output convs
        before the YOLO layers, which keep their fresh initialisation; the
        file's class count is inferred from its size (e.g. the 80-class COCO
        ``yolov3.weights`` into a 7-class model).
    :raises DarknetWeightsError: missing file, bad header, a file too short
        (truncated, or for a larger model) or too long (another architecture
        or class count), non-finite values.  The model is left untouched.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DarknetWeightsError(
            f"model.weights: {path} does not exist. YOLOv3 never downloads weights: put a Darknet "
            ".weights file there (e.g. darknet53.conv.74 for the backbone, with model.weights_cutoff=74) "
            "or set model.weights=null to start from random weights"
        )
    header = read_header(path)
    body_bytes = path.stat().st_size - header.nbytes
    if body_bytes % 4:
        raise DarknetWeightsError(
            f"{path}: {body_bytes} bytes after the header is not a whole number of float32 values: "
            "the file is truncated, damaged or not a Darknet .weights file"
        )
    total = body_bytes // 4
    explicit_cutoff = cutoff if cutoff is not None else cutoff_from_name(path)
    convs: list[DarknetConv] = list(model.darknet_convs())
    selected = [c for c in convs if explicit_cutoff is None or c.layer < explicit_cutoff]
    if not selected:
        raise DarknetWeightsError(f"model.weights_cutoff={explicit_cutoff} selects no conv layer of this model")
    num_classes = int(model.settings.num_classes)
    variant = model.settings.variant

    # Sizes per selected conv, in file order; output convs may differ in class count.
    sizes = [_conv_size(c) for c in selected]
    outputs = [i for i, c in enumerate(selected) if c.is_output]
    file_classes = None
    if reinit_heads and outputs:
        if explicit_cutoff is not None and explicit_cutoff <= max(selected[i].layer for i in outputs):
            raise DarknetWeightsError(
                "model.weights_reinit_heads needs the whole file (the class count is inferred from its "
                "size): set model.weights_cutoff=null"
            )
        fixed = sum(s for i, s in enumerate(sizes) if i not in outputs)
        unit = 0  # values per (5 + K) entry summed over the output convs
        for i in outputs:
            c = selected[i]
            anchors = c.conv.out_channels // (5 + num_classes)
            unit += anchors * (c.conv.in_channels + 1)
        per_anchor, rest = divmod(total - fixed, unit)
        if rest or per_anchor < 6:
            raise DarknetWeightsError(
                f"{path} holds {total} float32 values; without its output layers this {variant} model "
                f"needs {fixed}, and the remaining {total - fixed} fit no class count: the file is "
                "truncated or for another architecture"
            )
        file_classes = per_anchor - 5
        for i in outputs:
            c = selected[i]
            sizes[i] = c.conv.out_channels // (5 + num_classes) * per_anchor * (c.conv.in_channels + 1)
    needed = sum(sizes)

    where = f"variant {variant!r} with {num_classes} classes"
    if total < needed:
        consumed, ends_in = 0, selected[-1]
        for c, s in zip(selected, sizes):
            if consumed + s > total:
                ends_in = c
                break
            consumed += s
        raise DarknetWeightsError(
            f"{path} is too short: it holds {total} float32 values after its header, but the "
            f"{len(selected)} conv layers to load (cfg layers < {explicit_cutoff if explicit_cutoff else convs[-1].layer + 1}) "
            f"of YOLOv3 {where} need {needed}; it ends inside cfg layer {ends_in.layer}. The file is "
            "truncated, or was written for a smaller model (another variant, or fewer classes: then "
            "model.weights_reinit_heads=true keeps all but the output layers)"
        )
    if total > needed and explicit_cutoff is None:
        raise DarknetWeightsError(
            f"{path} holds {total} float32 values but YOLOv3 {where} needs exactly {needed}: the "
            "file was written for another architecture or class count. To load only the backbone set "
            "model.weights_cutoff (74 for darknet53.conv.74 or yolov3.weights with variant darknet53; 15 "
            "for tiny), or to keep every layer but the class-dependent outputs set "
            "model.weights_reinit_heads=true"
        )

    data = np.fromfile(path, dtype="<f4", count=needed, offset=header.nbytes)
    if not np.isfinite(data).all():
        raise DarknetWeightsError(f"{path} holds non-finite values (NaN or inf) in the layers to load")
    new_values: list[tuple[torch.Tensor, np.ndarray]] = []
    offset, skipped = 0, 0
    for c, size in zip(selected, sizes):
        if c.is_output and file_classes is not None:
            offset += size  # another class count: keep this layer's fresh initialisation
            skipped += 1
            continue
        for name, shape in _conv_shapes(c):
            n = int(np.prod(shape))
            module, attr = (c.bn, name[3:]) if name.startswith("bn.") else (c.conv, name[5:])
            new_values.append((getattr(module, attr), data[offset : offset + n].reshape(shape)))
            offset += n
    with torch.no_grad():  # everything was checked: now write, all or nothing
        for tensor, values in new_values:
            tensor.copy_(torch.from_numpy(values.copy()))
    return LoadReport(
        str(path), header, len(selected) - skipped, explicit_cutoff, needed, total, skipped, file_classes,
    )


def save_darknet_weights(
    model: nn.Module,
    path: str | Path,
    cutoff: int | None = None,
    version: tuple[int, int, int] = (0, 2, 0),
    seen: int = 0,
) -> int:
    """Write the model's conv layers (those of cfg layers ``< cutoff``) as a Darknet ``.weights`` file.

    :return: the number of float32 values written after the header.
    """
    major, minor, revision = version
    parts = [struct.pack("<3i", major, minor, revision)]
    parts.append(struct.pack("<q" if _seen_is_int64(major, minor) else "<i", seen))
    written = 0
    arrays = []
    for c in model.darknet_convs():
        if cutoff is not None and c.layer >= cutoff:
            continue
        for name, _ in _conv_shapes(c):
            module, attr = (c.bn, name[3:]) if name.startswith("bn.") else (c.conv, name[5:])
            a = getattr(module, attr).detach().to("cpu", torch.float32).numpy().astype("<f4").ravel()
            arrays.append(a)
            written += a.size
    with open(path, "wb") as f:
        f.write(b"".join(parts))
        for a in arrays:
            f.write(a.tobytes())
    return written
