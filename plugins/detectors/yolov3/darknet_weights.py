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

Sizes are checked exactly, since a file carries no shapes: a ``*.conv.N`` file
must hold exactly the float count of the model's first ``N`` layers; without a
cutoff the file must match the whole model; an explicit ``model.weights_cutoff``
may take the first layers of a longer file only when that file is a
this-variant file (of any class count, when the output layers are not loaded).
A cutoff beyond the model's last cfg layer is refused.  When a file does not
fit, the error says which known variant (darknet53, tiny, nano), cutoff and
class count it does fit (:func:`describe_file_size`).
"""

from __future__ import annotations

import functools
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .network import DarknetConv, build_body
from .settings import VARIANTS


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


# Published Darknet files, by (variant, cutoff) and (variant, classes of a whole file).
KNOWN_CUTOFF_FILES = {("darknet53", 74): "darknet53.conv.74", ("tiny", 15): "yolov3-tiny.conv.15"}
KNOWN_FULL_FILES = {("darknet53", 80): "yolov3.weights", ("tiny", 80): "yolov3-tiny.weights"}
MAX_GUESSED_CLASSES = 1000  # a file size "fitting" more classes than this is taken as a coincidence


@dataclass(frozen=True)
class _Layout:
    """The float counts of a variant's conv layers, as a function of the class count K.

    Conv ``i`` holds ``fixed[i] + unit[i] * (5 + K)`` values (``unit`` is non-zero for
    the output convs only).
    """

    variant: str
    num_layers: int
    layers: tuple[int, ...]
    fixed: tuple[int, ...]
    unit: tuple[int, ...]

    def fits(self, total: int) -> list[tuple[int, int, int | None]]:
        """``(convs, cutoff, K)`` for every prefix of ``convs`` layers holding ``total`` values
        (``K`` None when no output conv is in the prefix); ``cutoff`` is the smallest one."""
        out, fixed, unit = [], 0, 0
        for j, layer in enumerate(self.layers):
            fixed += self.fixed[j]
            unit += self.unit[j]
            if unit == 0:
                if total == fixed:
                    out.append((j + 1, layer + 1, None))
            elif total > fixed and (total - fixed) % unit == 0:
                k = (total - fixed) // unit - 5
                if 1 <= k <= MAX_GUESSED_CLASSES:
                    out.append((j + 1, layer + 1, k))
        return out


def _layout(convs: list[DarknetConv], num_classes: int, variant: str, num_layers: int) -> _Layout:
    fixed, unit = [], []
    for c in convs:
        if c.is_output:
            anchors = c.conv.out_channels // (5 + num_classes)
            w = c.conv.weight
            fixed.append(0)
            unit.append(anchors * (int(np.prod(w.shape[1:])) + 1))
        else:
            fixed.append(_conv_size(c))
            unit.append(0)
    return _Layout(variant, num_layers, tuple(c.layer for c in convs), tuple(fixed), tuple(unit))


@functools.lru_cache(maxsize=None)
def _variant_layout(variant: str) -> _Layout:
    """A variant's layout with its default anchors, from a body built on the meta device (no memory)."""
    per_scale = tuple(len(m) for m in VARIANTS[variant]["anchor_masks"])
    with torch.device("meta"):
        body = build_body(variant, per_scale, 1, 0.1)
    return _layout(body.darknet_convs(), 1, variant, body.num_layers)


def _num_layers(model: nn.Module, convs: list[DarknetConv]) -> int:
    if hasattr(model, "num_darknet_layers"):
        return int(model.num_darknet_layers())
    return convs[-1].layer + 2  # every variant ends with an output conv and its [yolo]


def _describe_fit(variant: str, layout: _Layout, convs: int, cutoff: int, k: int | None) -> str:
    if convs == len(layout.layers):
        text = f"the whole {variant} model with {k} classes"
        name = KNOWN_FULL_FILES.get((variant, k))
    else:
        text = f"{variant} with cutoff {cutoff}" + (f" and {k} classes" if k is not None else "")
        name = KNOWN_CUTOFF_FILES.get((variant, cutoff))
    return text + (f" ({name})" if name else "")


def describe_file_size(total: int, model_variant: str | None = None, own: _Layout | None = None,
                       num_classes: int | None = None) -> str:
    """What a Darknet weights file of ``total`` float32 values (after the header) fits.

    Tries every known variant (darknet53, tiny, nano; ``own`` for the model's
    own, e.g. with its anchor masks) at every cutoff and class count, and says
    which fits, with a hint for a model of ``model_variant``.  A fit without
    output layers, with the model's class count or a published file's counts
    beats one that needs some other class count.
    """
    found = []  # (rank, variant, layout, convs, cutoff, k)
    for variant in VARIANTS:
        layout = own if (own is not None and variant == model_variant) else _variant_layout(variant)
        for convs, cutoff, k in layout.fits(total):
            full = convs == len(layout.layers)
            published = (variant, k) in KNOWN_FULL_FILES if full else (variant, cutoff) in KNOWN_CUTOFF_FILES
            rank = 0 if (k is None or k == num_classes or published) else 1
            found.append((rank, variant, layout, convs, cutoff, k))
    if not found:
        return (
            f"a file of {total} float32 values fits none of the known variants ({', '.join(VARIANTS)}) at any "
            "cutoff or class count: it is truncated, damaged or written for another architecture"
        )
    best = min(f[0] for f in found)
    found = [f for f in found if f[0] == best][:4]
    text = "this file fits " + " or ".join(_describe_fit(v, lay, n, c, k) for _, v, lay, n, c, k in found)
    hints = []
    others = [v for _, v, *_ in found if v != model_variant]
    if model_variant is not None and others:
        hints.append(
            f"the model is {model_variant}: set model.variant={others[0]} or use a file for {model_variant}"
        )
    for _, v, lay, n, c, k in found:
        if v != model_variant:
            continue
        if n == len(lay.layers) and k != num_classes:
            hints.append(
                f"it holds {k} classes, the model {num_classes}: model.weights_reinit_heads=true loads all "
                "but its output layers"
            )
        elif n < len(lay.layers):
            hints.append(f"for this model set model.weights_cutoff={c} (or name the file *.conv.{c})")
    return text + ("; " + "; ".join(dict.fromkeys(hints)) if hints else "")


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
        Darknet layer count, as in ``darknet partial``; at most the model's
        number of cfg layers).  The file may be longer only when it is a file
        of the model's variant (e.g. ``yolov3.weights`` with cutoff 74).
        ``None``: from a ``*.conv.N`` file name, and the file must then hold
        exactly the first ``N`` layers; else every layer, and the file must
        hold exactly what the model needs.
    :param reinit_heads: load every layer except the linear output convs
        before the YOLO layers, which keep their fresh initialisation; the
        file's class count is inferred from its size (e.g. the 80-class COCO
        ``yolov3.weights`` into a 7-class model).
    :raises DarknetWeightsError: missing file, bad header, a file too short
        (truncated, or for a larger model) or too long (another architecture
        or class count), a ``*.conv.N`` file not holding exactly the model's
        first ``N`` layers, a cutoff beyond the model's cfg layers, an explicit
        cutoff into a longer file that is no file of this variant, non-finite
        values.  The message says which variant, cutoff and class count the
        file fits.  The model is left untouched.
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
    name_cutoff = cutoff_from_name(path)
    explicit_cutoff = cutoff if cutoff is not None else name_cutoff
    source = "model.weights_cutoff" if cutoff is not None else f"the file name (*.conv.{name_cutoff})"
    convs: list[DarknetConv] = list(model.darknet_convs())
    num_classes = int(model.settings.num_classes)
    variant = model.settings.variant
    num_layers = _num_layers(model, convs)
    own = _layout(convs, num_classes, variant, num_layers)

    def fit() -> str:
        return describe_file_size(total, variant, own, num_classes)

    if explicit_cutoff is not None and explicit_cutoff > num_layers:
        raise DarknetWeightsError(
            f"{path}: cutoff {explicit_cutoff} (from {source}) is beyond this model: YOLOv3 {variant} has "
            f"{num_layers} cfg layers (0-{num_layers - 1}), so a cutoff can be at most {num_layers}. The file "
            f"holds {total} float32 values; {fit()}"
        )
    selected = [c for c in convs if explicit_cutoff is None or c.layer < explicit_cutoff]
    if not selected:
        raise DarknetWeightsError(f"model.weights_cutoff={explicit_cutoff} selects no conv layer of this model")

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
                f"truncated or for another architecture ({fit()})"
            )
        file_classes = per_anchor - 5
        for i in outputs:
            c = selected[i]
            sizes[i] = c.conv.out_channels // (5 + num_classes) * per_anchor * (c.conv.in_channels + 1)
    needed = sum(sizes)

    where = f"variant {variant!r} with {num_classes} classes"
    layers_text = f"cfg layers < {explicit_cutoff if explicit_cutoff else num_layers}"
    if total < needed:
        consumed, ends_in = 0, selected[-1]
        for c, s in zip(selected, sizes):
            if consumed + s > total:
                ends_in = c
                break
            consumed += s
        raise DarknetWeightsError(
            f"{path} is too short: it holds {total} float32 values after its header, but the "
            f"{len(selected)} conv layers to load ({layers_text}) "
            f"of YOLOv3 {where} need {needed}; it ends inside cfg layer {ends_in.layer}. The file is "
            "truncated, or was written for a smaller model (another variant, or fewer classes: then "
            f"model.weights_reinit_heads=true keeps all but the output layers); {fit()}"
        )
    if total > needed and explicit_cutoff is None:
        advice = (
            ". To load only the backbone set model.weights_cutoff (74 for darknet53.conv.74 or "
            "yolov3.weights with variant darknet53; 15 for tiny), or to keep every layer but the "
            "class-dependent outputs set model.weights_reinit_heads=true"
        ) if own.fits(total) else ""
        raise DarknetWeightsError(
            f"{path} holds {total} float32 values but YOLOv3 {where} needs exactly {needed}: the "
            f"file was written for another architecture or class count; {fit()}{advice}"
        )
    if total > needed and cutoff is None:
        raise DarknetWeightsError(
            f"{path} is named as a cutoff file (*.conv.{name_cutoff}), so it must hold exactly the "
            f"{needed} float32 values of the first {name_cutoff} cfg layers of YOLOv3 {where}, but it holds "
            f"{total}; {fit()}"
        )
    if total > needed:
        # An explicit cutoff may take the first layers of a longer file of this very architecture
        # (e.g. the backbone of a yolov3.weights trained for another class count), nothing else.
        loads_outputs = bool(outputs)
        prefix_of_own = any(
            n >= len(selected) and (k is None or not loads_outputs or k == num_classes)
            for n, _, k in own.fits(total)
        )
        if not prefix_of_own:
            raise DarknetWeightsError(
                f"{path} holds {total} float32 values: more than the {needed} of the {len(selected)} conv "
                f"layers to load ({layers_text}) of YOLOv3 {where}, but it is no {variant} file (of any "
                f"cutoff or class count) that starts with those layers; {fit()}"
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
