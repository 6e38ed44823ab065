"""Model weights on the wire: safetensors bytes, validated against the global model.

safetensors is a header of names, dtypes and shapes followed by the raw
little-endian tensor bytes, so decoding peer bytes can never execute code
(unlike pickle / ``torch.load``).  Every decoded state is checked against the
global model's *spec* (names, shapes, dtypes) and for non-finite values before
anything else touches it.

All functions here are CPU-heavy on large models and are called from worker
threads, never on the event loop.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedplug.types import StateDict


class WireError(ValueError):
    """Peer bytes that are not an acceptable model state; the message says why."""


@dataclass(frozen=True)
class TensorSpec:
    dtype: torch.dtype
    shape: tuple[int, ...]


ModelSpec = Mapping[str, TensorSpec]


def spec_of(state: StateDict) -> dict[str, TensorSpec]:
    """The names, dtypes and shapes a peer's state must match."""
    return {name: TensorSpec(t.dtype, tuple(t.shape)) for name, t in state.items()}


def encode_state(state: StateDict, metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialise a full state dict (parameters and buffers) to safetensors bytes.

    Tensors are detached, moved to CPU and made contiguous; shared storage
    (tied weights) is cloned because safetensors refuses aliasing tensors.
    """
    plain: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for name, tensor in state.items():
        t = tensor.detach().to("cpu")
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        if ptr in seen_storage or not t.is_contiguous():
            t = t.contiguous().clone()
        elif ptr != -1:
            seen_storage.add(ptr)
        plain[name] = t
    return st_save(plain, metadata=dict(metadata) if metadata else None)


def decode_state(data: bytes, *, max_bytes: int | None = None) -> StateDict:
    """Parse safetensors bytes from a peer.  Raises :class:`WireError`, never anything else."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"weights must be binary safetensors data, got {type(data).__name__}")
    if max_bytes is not None and len(data) > max_bytes:
        raise WireError(f"weights are {len(data)} bytes, over the configured limit of {max_bytes}")
    try:
        return st_load(bytes(data))
    except Exception as exc:  # safetensors raises its own error types for malformed input
        raise WireError(f"weights are not valid safetensors data: {exc}") from None


def check_against_spec(state: StateDict, spec: ModelSpec) -> None:
    """Raise :class:`WireError` unless ``state`` matches ``spec`` exactly and is finite."""
    missing = [n for n in spec if n not in state]
    extra = [n for n in state if n not in spec]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
        if extra:
            parts.append(f"unexpected {len(extra)} tensor(s), e.g. {extra[:3]}")
        raise WireError("tensor names differ from the global model: " + "; ".join(parts))
    for name, expected in spec.items():
        t = state[name]
        if t.dtype != expected.dtype:
            raise WireError(f"tensor {name!r} has dtype {t.dtype}, the global model has {expected.dtype}")
        if tuple(t.shape) != expected.shape:
            raise WireError(
                f"tensor {name!r} has shape {tuple(t.shape)}, the global model has {expected.shape}"
            )
        if t.is_floating_point() and not _finite_in_slices(t, None, 0):
            raise WireError(f"tensor {name!r} holds NaN or Inf values")


def decode_checked(data: bytes | bytearray, spec: ModelSpec, *, max_bytes: int | None = None) -> StateDict:
    """Decode peer bytes and validate them against the global model's spec.

    The tensors are views of ``data`` when it is a ``bytearray`` (a client's download: no
    model-sized copy, twice over, as safetensors' own loader made); other bytes are copied once
    into one.  Raises :class:`WireError`, never anything else.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"weights must be binary safetensors data, got {type(data).__name__}")
    if max_bytes is not None and len(data) > max_bytes:
        raise WireError(f"weights are {len(data)} bytes, over the configured limit of {max_bytes}")
    if len(data) < 8:
        raise WireError(f"weights are not valid safetensors data: {len(data)} bytes")
    buffer = data if isinstance(data, bytearray) else bytearray(data)
    state, _ = _checked_views(buffer, len(buffer), spec)
    return state


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def read_checkpoint(path: Path) -> tuple[StateDict, dict[str, str]]:
    """Load a safetensors checkpoint written by fedplug: (tensors, metadata)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    return tensors, meta


# ------------------------------------------------------------------ zero-copy layouts (protocol v2)

_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_DTYPE_OF = {name: dtype for dtype, name in _ST_DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


class SafetensorsLayout:
    """A state dict laid out as a safetensors file *without* building the file: byte ranges read from the tensors.

    The server offers each round's global model to K clients in chunks; serialising
    it into one more model-sized buffer per broadcast (and once more for evaluation)
    is what made the server's memory grow during a round.  Here chunk reads copy
    only the chunk.  The bytes are a valid safetensors file (tensors in name order,
    8-byte-aligned header); :meth:`to_bytes` materialises it for protocol-1 peers.
    The tensors must not change while the layout is in use (the server replaces
    its global model, never writes into it).
    """

    def __init__(self, state: StateDict, metadata: Mapping[str, str] | None = None):
        self._pieces: list[tuple[int, memoryview]] = []  # (start offset in the file, bytes)
        header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        views = []
        for name in sorted(state):
            tensor = state[name].detach().to("cpu").contiguous()
            if tensor.dtype not in _ST_DTYPES:
                raise WireError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot carry")
            nbytes = tensor.numel() * tensor.element_size()
            header[name] = {"dtype": _ST_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                            "data_offsets": [offset, offset + nbytes]}
            views.append((offset, memoryview(tensor.reshape(-1).view(torch.uint8).numpy()).cast("B") if nbytes else memoryview(b"")))
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-(8 + len(text)) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self.header = len(text).to_bytes(8, "little") + text
        self.size = len(self.header) + offset
        self._pieces = [(0, memoryview(self.header))] + [(len(self.header) + o, v) for o, v in views if len(v)]
        self._starts = [start for start, _ in self._pieces]

    def read(self, start: int, length: int) -> bytes:
        """Bytes ``[start, start + length)`` of the file (fewer at its end)."""
        import bisect

        end = min(self.size, start + length)
        parts = []
        i = max(0, bisect.bisect_right(self._starts, start) - 1)
        while start < end and i < len(self._pieces):
            piece_start, view = self._pieces[i]
            lo = start - piece_start
            if 0 <= lo < len(view):
                take = min(len(view) - lo, end - start)
                parts.append(view[lo:lo + take])
                start += take
            i += 1
        # one copy of the chunk's bytes, straight from the tensors (a bytearray grown and then copied
        # into bytes was two: 2 x the model per client per round, on the server's event loop)
        return bytes(parts[0]) if len(parts) == 1 else b"".join(parts)

    def views(self) -> list[memoryview]:
        """The file's bytes as views, in order: the header, then each tensor's memory."""
        return [view for _, view in self._pieces]

    def sha256(self) -> str:
        import hashlib

        digest = hashlib.sha256()
        for _, view in self._pieces:
            digest.update(view)
        return digest.hexdigest()

    def to_bytes(self) -> bytes:
        return b"".join(bytes(view) for _, view in self._pieces)


class MappedState(dict):
    """A state dict whose tensors are views of a mapped file (see :func:`open_checked`)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], mapping: Any,
                 spans: Mapping[str, tuple[int, int]] | None = None):
        super().__init__(tensors)
        self._mapping = mapping
        self._spans = dict(spans or {})  # name -> (offset, bytes) of each tensor in the mapping

    def release_tensor(self, name: str) -> None:
        """Hand back the pages of one tensor (an aggregator folded it in); it stays valid, like the others."""
        span = self._spans.get(name)
        if span is not None:
            _release_pages(self._mapping, *span)

    def release_pages(self) -> None:
        """Hand the file's pages back to the kernel; the tensors stay valid (they fault back in when read)."""
        import mmap

        try:
            self._mapping.madvise(mmap.MADV_DONTNEED)
        except (AttributeError, OSError, ValueError):
            pass


CHECK_SLICE = 1 << 20  # values checked at a time: isfinite's temporaries stay a few MB, whatever the tensor


def _release_pages(mapping: Any, offset: int, nbytes: int) -> None:
    """``MADV_DONTNEED`` the whole pages inside ``[offset, offset + nbytes)`` of a private file mapping.

    Only pages wholly inside the range: a neighbouring tensor's part of a shared
    page keeps it.  The bytes stay readable (they fault back in from the file).
    """
    import mmap

    first = offset + (-offset) % mmap.PAGESIZE
    last = (offset + nbytes) - (offset + nbytes) % mmap.PAGESIZE
    if last > first:
        try:
            mapping.madvise(mmap.MADV_DONTNEED, first, last - first)
        except (AttributeError, OSError, ValueError):
            pass


def _finite_in_slices(tensor: torch.Tensor, mapping: Any, offset: int) -> bool:
    """Whether every value is finite, read ``CHECK_SLICE`` values at a time.

    ``torch.isfinite`` of a whole tensor makes a full-size ``abs`` copy (51 MB for
    Faster R-CNN's box head); slices keep that small.  With ``mapping`` (the
    tensor is a view of it from ``offset``) each checked slice's pages go back
    to the kernel at once, so checking a file never holds more than a slice of it.
    """
    flat = tensor.reshape(-1)
    size = flat.element_size()
    for start in range(0, flat.numel(), CHECK_SLICE):
        part = flat[start:start + CHECK_SLICE]
        # a NaN or an infinity makes the float64 sum non-finite, and a float64 sum of at most 2^20 finite
        # float32/16 values cannot overflow: one vectorised pass, 4-6x cheaper than isfinite's comparisons
        if not bool(torch.isfinite(part.sum(dtype=torch.float64))):
            if part.dtype != torch.float64 or not bool(torch.isfinite(part).all()):  # float64 sums can overflow
                return False
        if mapping is not None:
            _release_pages(mapping, offset + start * size, part.numel() * size)
    return True


def open_checked(path: Path, spec: ModelSpec, *, unlink: bool = True) -> StateDict:
    """Map a peer's safetensors file and return its tensors as views of the mapping, validated against ``spec``.

    No model-sized copy is made: the tensors read the file's pages, which the
    kernel brings in when an aggregator reads them and drops again afterwards,
    so queued updates cost almost no memory.  The header is parsed here, with
    bounds, rather than by the safetensors library, because the library wants
    the whole file as one bytes object.  Raises :class:`WireError`, never
    anything else.  With ``unlink`` the file is removed at once (its pages
    live as long as the tensors).
    """
    import mmap

    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise WireError(f"weights are {size} bytes: not a safetensors file")
            mapping = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)  # private: never writes the file
    except OSError as exc:
        raise WireError(f"cannot read the received weights: {exc}") from None
    finally:
        if unlink:
            path.unlink(missing_ok=True)
    state, spans = _checked_views(mapping, size, spec, release=True)
    mapped = MappedState(state, mapping, spans)
    mapped.release_pages()  # the checks read every page; the kernel takes them back until an aggregator reads them
    return mapped


def _checked_views(buffer: Any, size: int, spec: ModelSpec, *, release: bool = False
                   ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, int]]]:
    """The tensors of the safetensors bytes in ``buffer`` (a mapping or a bytearray) as views of it, checked.

    The header is parsed here, with bounds, rather than by the safetensors library, because the
    library wants the whole file as one ``bytes`` object and copies every tensor out of it.  Names,
    dtypes and shapes must be ``spec``'s, the tensors must tile the data exactly, and floating values
    must be finite.  With ``release`` (``buffer`` is a private file mapping) each checked slice's pages
    go back to the kernel.  Returns the tensors and each one's ``(offset, bytes)`` in ``buffer``.
    """
    mapping = buffer  # (a mapping or a bytearray: both slice, and torch.frombuffer reads both)
    header_len = int.from_bytes(mapping[:8], "little")
    if not 0 < header_len <= min(MAX_HEADER_BYTES, size - 8):
        raise WireError(f"weights are not valid safetensors data: header length {header_len} for {size} bytes")
    try:
        header = json.loads(bytes(mapping[8:8 + header_len]))
    except ValueError as exc:
        raise WireError(f"weights are not valid safetensors data: header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise WireError("weights are not valid safetensors data: header is not an object")
    header.pop("__metadata__", None)
    data_start, data_len = 8 + header_len, size - 8 - header_len
    missing = [n for n in spec if n not in header]
    extra = [n for n in header if n not in spec]
    if missing or extra:
        parts = ([f"missing {len(missing)} tensor(s), e.g. {missing[:3]}"] if missing else []) + (
            [f"unexpected {len(extra)} tensor(s), e.g. {[str(e)[:80] for e in extra[:3]]}"] if extra else [])
        raise WireError("tensor names differ from the global model: " + "; ".join(parts))
    ranges = []
    for name, expected in spec.items():
        entry = header[name]
        if not isinstance(entry, dict):
            raise WireError(f"weights are not valid safetensors data: entry {name!r} is not an object")
        dtype = _DTYPE_OF.get(entry.get("dtype"))
        if dtype != expected.dtype:
            raise WireError(f"tensor {name!r} has dtype {entry.get('dtype')!r}, the global model has {expected.dtype}")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or tuple(shape) != expected.shape:
            raise WireError(f"tensor {name!r} has shape {shape!r}, the global model has {expected.shape}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise WireError(f"weights are not valid safetensors data: bad data_offsets for {name!r}")
        start, end = offsets
        nbytes = math.prod(expected.shape) * torch.empty((), dtype=dtype).element_size()
        if not 0 <= start <= end <= data_len or end - start != nbytes:
            raise WireError(f"weights are not valid safetensors data: {name!r} spans {offsets}, "
                            f"{nbytes} bytes expected within {data_len}")
        ranges.append((start, end, name, dtype))
    ranges.sort()
    covered = 0
    for start, end, name, _ in ranges:
        if start != covered:
            raise WireError(f"weights are not valid safetensors data: tensor {name!r} overlaps or leaves a gap")
        covered = end
    if covered != data_len:
        raise WireError("weights are not valid safetensors data: trailing bytes after the last tensor")
    state: dict[str, torch.Tensor] = {}
    spans: dict[str, tuple[int, int]] = {}
    for start, end, name, dtype in ranges:
        count = (end - start) // max(1, torch.empty((), dtype=dtype).element_size())
        offset = data_start + start
        if count == 0:
            tensor = torch.empty(spec[name].shape, dtype=dtype)
        elif offset % torch.empty((), dtype=dtype).element_size() == 0:
            tensor = torch.frombuffer(mapping, dtype=dtype, count=count, offset=offset).view(spec[name].shape)
            spans[name] = (offset, end - start)
        else:  # a misaligned tensor (a peer's own writer): copy it rather than hand kernels a bad pointer
            tensor = torch.frombuffer(bytearray(mapping[offset:offset + end - start]), dtype=dtype).view(spec[name].shape)
        if tensor.is_floating_point() and not _finite_in_slices(
                tensor, mapping if release and name in spans else None, offset):
            raise WireError(f"tensor {name!r} holds NaN or Inf values")
        state[name] = tensor
    return state, spans
