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

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

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
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise WireError(f"tensor {name!r} holds NaN or Inf values")


def decode_checked(data: bytes, spec: ModelSpec, *, max_bytes: int | None = None) -> StateDict:
    """Decode peer bytes and validate them against the global model's spec."""
    state = decode_state(data, max_bytes=max_bytes)
    check_against_spec(state, spec)
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
