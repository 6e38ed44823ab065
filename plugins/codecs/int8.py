"""``codec=int8``: the update's delta to the global model, quantised to 8 bits with one scale per tensor.

For each floating tensor ``w`` with global value ``g``: ``d = w - g``,
``scale = max|d| / 127`` and ``q = round(d / scale)`` in ``[-127, 127]``
(all zeros when ``d`` is).  The server rebuilds ``g + q * scale`` in the
global dtype.  A quarter of float32's bytes; per element
``|decoded - w| <= scale / 2 = max|d| / 254`` (plus the global dtype's
rounding).  The safetensors container holds, for each floating tensor
``name``, ``q/name`` (``I8``, the tensor's shape) and ``s/name`` (``F32``,
shape ``[]``); integer buffers travel unchanged as ``r/name``.
"""

from __future__ import annotations

import torch

from fedplug.hooks import hookimpl
from fedplug.wire import WireError

from fedplug_plugins.codecs._format import RAW, check_layout, compute_dtype, expect, expect_names, load, save

NAME = "int8"
LEVELS = 127


def _parts(reference):
    for name, ref in reference.items():
        yield from ((f"q/{name}", f"s/{name}") if ref.is_floating_point() else (RAW + name,))


@hookimpl
def fedplug_encode_update(weights, reference):
    check_layout(weights, reference)
    out = {}
    for name, ref in reference.items():
        t = weights[name].detach().to("cpu")
        if not ref.is_floating_point():
            out[RAW + name] = t
            continue
        dtype = compute_dtype(ref.dtype)
        delta = t.to(dtype) - ref.to(dtype)
        amax = float(delta.abs().max()) if delta.numel() else 0.0
        if not torch.isfinite(torch.tensor(amax)):
            raise WireError(f"tensor {name!r} holds NaN or Inf values")
        scale = amax / LEVELS
        if scale > 0:
            q = torch.round(delta / scale).clamp_(-LEVELS, LEVELS).to(torch.int8)
        else:
            q = torch.zeros(ref.shape, dtype=torch.int8)
        out[f"q/{name}"] = q
        out[f"s/{name}"] = torch.tensor(scale, dtype=torch.float32)
    return save(out, NAME)


@hookimpl
def fedplug_decode_update(data, reference, max_bytes):
    parts = load(data, max_bytes, NAME)
    expect_names(parts, _parts(reference), NAME)
    out = {}
    for name, ref in reference.items():
        if not ref.is_floating_point():
            out[name] = parts[RAW + name]
            continue
        q, s = parts[f"q/{name}"], parts[f"s/{name}"]
        expect(q, f"q/{name}", torch.int8, tuple(ref.shape), NAME)
        expect(s, f"s/{name}", torch.float32, (), NAME)
        scale = float(s)
        if not (scale >= 0 and scale < float("inf")):
            raise WireError(f"{NAME} part 's/{name}' must be a finite scale >= 0, got {scale}")
        dtype = compute_dtype(ref.dtype)
        out[name] = (ref.to(dtype) + q.to(dtype) * scale).to(ref.dtype)
    return out
