"""``codec=topk``: only the largest entries of the update's delta travel (top-k sparsification).

For each floating tensor ``w`` with global value ``g``: ``d = w - g`` (plus,
with ``error_feedback``, what this client left out in earlier rounds), and the
``k = ceil(density * numel)`` entries of largest ``|d|`` are sent as their
flat indices and values; the server rebuilds ``g`` with those entries added.
Sent entries are exact (in the global dtype); every other entry of the round's
update is dropped, so per element ``|decoded - w| <= the k-th largest |d|`` of
its tensor.  With ``error_feedback: true`` (the default) the client keeps the
dropped part (one model-sized float32 buffer) and adds it to the next round's
delta, so nothing is lost for good, only late.

Settings: ``density`` in (0, 0.25] (default 0.01: about 2 % of float32's
bytes, 8 bytes per kept entry), ``error_feedback`` (true).  The safetensors
container holds, for each floating tensor ``name``, ``i/name`` (``I32``,
``[k]``, strictly increasing flat indices in row-major order) and ``v/name``
(the tensor's dtype, ``[k]``), with exactly ``k`` entries for the server's
``density``; integer buffers travel unchanged as ``r/name``.
"""

from __future__ import annotations

import math

import torch

from fedplug.hooks import hookimpl
from fedplug.wire import WireError

from fedplug_plugins.codecs._format import RAW, check_layout, compute_dtype, expect, expect_names, flag, load, \
    number, save

NAME = "topk"
MAX_DENSITY = 0.25  # above it the indices cost more than the bytes saved (8 bytes per float32 entry kept)


def _parts(reference):
    for name, ref in reference.items():
        yield from ((f"i/{name}", f"v/{name}") if ref.is_floating_point() else (RAW + name,))


def kept(numel: int, density: float) -> int:
    """How many entries of a tensor of ``numel`` travel: ``ceil(density * numel)``, at least one."""
    return min(numel, max(1, math.ceil(density * numel))) if numel else 0


@hookimpl
def fedplug_encode_update(weights, reference, config, state):
    density = number(config, "density", 0.01, 0.0, MAX_DENSITY, NAME)
    feedback = flag(config, "error_feedback", True, NAME)
    check_layout(weights, reference)
    residual = state.setdefault("residual", {}) if feedback else None
    out = {}
    for name, ref in reference.items():
        t = weights[name].detach().to("cpu")
        if not ref.is_floating_point():
            out[RAW + name] = t
            continue
        dtype = compute_dtype(ref.dtype)
        delta = (t.to(dtype) - ref.to(dtype)).reshape(-1)
        if residual is not None:
            carried = residual.get(name)
            if carried is not None and carried.shape == delta.shape and carried.dtype == dtype:
                delta += carried
        if not bool(torch.isfinite(delta).all()):
            raise WireError(f"tensor {name!r} holds NaN or Inf values")
        k = kept(delta.numel(), density)
        index = torch.topk(delta.abs(), k, sorted=False).indices.sort().values if k else \
            torch.zeros(0, dtype=torch.int64)
        values = delta[index].to(ref.dtype)
        if residual is not None:
            delta[index] -= values.to(dtype)  # what the server will not see this round
            residual[name] = delta
        out[f"i/{name}"] = index.to(torch.int32)
        out[f"v/{name}"] = values
    return save(out, NAME)


@hookimpl
def fedplug_decode_update(data, reference, config, max_bytes):
    density = number(config, "density", 0.01, 0.0, MAX_DENSITY, NAME)
    parts = load(data, max_bytes, NAME)
    expect_names(parts, _parts(reference), NAME)
    out = {}
    for name, ref in reference.items():
        if not ref.is_floating_point():
            out[name] = parts[RAW + name]
            continue
        index, values = parts[f"i/{name}"], parts[f"v/{name}"]
        expect(index, f"i/{name}", torch.int32, None, NAME)
        expect(values, f"v/{name}", ref.dtype, None, NAME)
        numel, k = ref.numel(), kept(ref.numel(), density)
        if index.dim() != 1 or values.dim() != 1 or index.numel() != k or values.numel() != k:
            raise WireError(f"{NAME} parts of {name!r} must be two 1-D lists of ceil(density x {numel}) = {k} "
                            f"entries (codec.density={density:g}); got {tuple(index.shape)} and "
                            f"{tuple(values.shape)}")
        if index.numel():
            if int(index[0]) < 0 or int(index[-1]) >= numel or not bool((index[1:] > index[:-1]).all()):
                raise WireError(f"{NAME} indices of {name!r} must increase strictly within [0, {numel})")
        dtype = compute_dtype(ref.dtype)
        flat = ref.detach().reshape(-1).to(dtype, copy=True)
        flat[index.long()] += values.to(dtype)
        out[name] = flat.to(ref.dtype).reshape(ref.shape)
    return out
