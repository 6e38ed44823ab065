"""What the built-in codecs share: their safetensors container and the checks of what they decode.

The lossy codecs (fp16, bf16, int8, topk) write a safetensors file whose
tensor names carry a one-letter role prefix (``q/``, ``s/``, ``i/``, ``v/``,
``r/``) in front of the model's own names, so no name of the model can clash
with another part of the encoding.  Peer bytes are parsed by safetensors
(no code runs, sizes are checked against the buffer) and then every part is
checked against the global model before any arithmetic touches it.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import torch

from fedplug.wire import WireError, decode_state, encode_state

RAW = "r/"  # integer and bool buffers (num_batches_tracked) travel unchanged under this prefix


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a delta of a ``dtype`` tensor is computed in: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def check_layout(weights: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> None:
    """Refuse trained weights whose names, shapes or dtypes differ from the global model (no value check)."""
    if not isinstance(weights, Mapping):
        raise WireError(f"the trained weights must be a state dict, got {type(weights).__name__}")
    missing = [n for n in reference if n not in weights]
    extra = [n for n in weights if n not in reference]
    if missing or extra:
        raise WireError(f"the trained weights differ from the global model: missing {missing[:3]}, "
                        f"unexpected {extra[:3]}")
    for name, ref in reference.items():
        t = weights[name]
        if not isinstance(t, torch.Tensor) or t.dtype != ref.dtype or tuple(t.shape) != tuple(ref.shape):
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise WireError(f"trained tensor {name!r} is {got}; the global model's is {ref.dtype} "
                            f"{tuple(ref.shape)}")


def save(tensors: Mapping[str, torch.Tensor], codec: str) -> bytes:
    return encode_state(tensors, {"fedplug_codec": codec})


def load(data: Any, max_bytes: int, codec: str) -> dict[str, torch.Tensor]:
    """Parse a codec's safetensors container from a peer (sizes bounded by ``max_bytes``)."""
    try:
        return decode_state(data, max_bytes=max_bytes)
    except WireError as exc:
        raise WireError(f"not a {codec} encoding: {exc}") from None


def expect_names(parts: Mapping[str, torch.Tensor], expected: Iterable[str], codec: str) -> None:
    expected = set(expected)
    missing = sorted(expected - set(parts))
    extra = sorted(set(parts) - expected)
    if missing or extra:
        detail = "; ".join(p for p in (f"missing {missing[:3]}" if missing else "",
                                       f"unexpected {extra[:3]}" if extra else "") if p)
        raise WireError(f"the {codec} encoding does not hold the parts of this model's tensors: {detail}")


def expect(part: torch.Tensor, name: str, dtype: torch.dtype, shape: tuple[int, ...] | None, codec: str) -> None:
    """One part must have exactly this dtype (and shape, unless ``None``)."""
    if part.dtype != dtype or (shape is not None and tuple(part.shape) != tuple(shape)):
        want = f"{dtype}" + (f" {tuple(shape)}" if shape is not None else "")
        raise WireError(f"{codec} part {name!r} is {part.dtype} {tuple(part.shape)}, expected {want}")


def number(config: Mapping[str, Any], key: str, default: float, low: float, high: float, codec: str,
           *, open_low: bool = True, integer: bool = False) -> float:
    """A numeric setting of ``codec.<key>``, with the error a user can act on."""
    value = config.get(key, default)
    kind = "an integer" if integer else "a number"
    ok = (isinstance(value, int) if integer else isinstance(value, (int, float))) and not isinstance(value, bool)
    if ok:
        ok = math.isfinite(value) and (value > low if open_low else value >= low) and value <= high
    if not ok:
        bound = f"{'(' if open_low else '['}{low:g}, {high:g}]"
        raise WireError(f"codec.{key} must be {kind} in {bound} for codec={codec}, got {value!r}")
    return value


def flag(config: Mapping[str, Any], key: str, default: bool, codec: str) -> bool:
    value = config.get(key, default)
    if not isinstance(value, bool):
        raise WireError(f"codec.{key} must be true or false for codec={codec}, got {value!r}")
    return value
