"""An update's change from the global model, its L2 norm, and clipping it to a bound.

DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent
Language Models", Algorithm 1) bounds each client's influence by clipping the
client's *update delta* ``Delta_k = w^k - w_t`` to L2 norm at most ``C``::

    clip(Delta, C) = Delta * min(1, C / ||Delta||_2)

The norm is taken over every floating tensor of the state flattened into one
vector (parameters and BatchNorm running statistics alike: both are computed
from the client's data).  Integer buffers (``num_batches_tracked``) carry no
gradient information and cannot be noised; they are not part of the delta.

Called by the server's DP aggregators (``dp_fedavg``, server-side clipping) and
by the clients' update filters (``dp_clip``, ``dp_local``) before an update is sent.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

StateDict = dict


def private_names(template: Mapping[str, torch.Tensor]) -> list[str]:
    """The tensors that make up the clipped and noised vector: every floating tensor, in state order."""
    return [name for name, t in template.items() if t.is_floating_point()]


def delta_of(weights: Mapping[str, torch.Tensor], global_weights: Mapping[str, torch.Tensor]) -> dict:
    """``weights - global_weights`` in float64 for every floating tensor (new tensors; inputs untouched)."""
    return {name: weights[name].detach().to(torch.float64).sub(global_weights[name].detach().to(torch.float64))
            for name in private_names(global_weights)}


def l2_norm(delta: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of all tensors of ``delta`` taken together as one flat vector."""
    total = 0.0
    for t in delta.values():
        total += float(torch.sum(t.to(torch.float64) * t.to(torch.float64)))
    return math.sqrt(total)


def clip_factor(norm: float, clip_norm: float) -> float:
    """``min(1, C / norm)``: the factor that brings a vector of L2 norm ``norm`` within ``C``."""
    if clip_norm <= 0 or not math.isfinite(clip_norm):
        raise ValueError(f"the clip norm must be a finite number > 0, got {clip_norm!r}")
    return 1.0 if norm <= clip_norm else clip_norm / norm


def clip_delta_(delta: dict, clip_norm: float) -> tuple[float, float]:
    """Clip ``delta`` in place to L2 norm ``clip_norm``; return ``(norm before, factor applied)``."""
    norm = l2_norm(delta)
    factor = clip_factor(norm, clip_norm)
    if factor < 1.0:
        for t in delta.values():
            t.mul_(factor)
    return norm, factor


def apply_delta(global_weights: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> StateDict:
    """``global_weights + delta`` in the global model's names, order and dtypes.

    Tensors absent from ``delta`` (integer buffers) keep the global value.
    """
    out: StateDict = {}
    for name, g in global_weights.items():
        if name in delta:
            out[name] = (g.detach().to(torch.float64) + delta[name]).to(g.dtype)
        else:
            out[name] = g.detach().clone()
    return out
