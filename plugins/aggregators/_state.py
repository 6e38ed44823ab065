"""Aggregator state kept in the ``state`` dict the server checkpoints.

Server-optimiser aggregators keep one tensor per stepped model tensor (e.g.
``momentum/<name>``, ``m/<name>``, ``v/<name>``) in the ``state`` dict that
``fedplug_aggregate`` receives.  The server saves that dict with the global
model (safetensors: flat string keys, tensors only) and hands it back on
resume, so everything stored here is a plain tensor under a flat key; nothing
lives in module globals.  Stored in float32 (float64 for float64 parameters):
as PyTorch's own optimisers do, moments in the parameter's precision, not
half precision where a squared step would underflow.
"""

from __future__ import annotations

from typing import MutableMapping

import torch


def state_dtype(like: torch.Tensor) -> torch.dtype:
    return torch.float64 if like.dtype == torch.float64 else torch.float32


def load_moment(
    state: MutableMapping, key: str, like: torch.Tensor, initial: float
) -> torch.Tensor:
    """The stored tensor ``state[key]`` as a float64 working copy, or ``initial`` everywhere if absent.

    A stored tensor of another shape means the state comes from another model
    (e.g. a resume point of a different run): a clear error, not a broadcast.
    """
    stored = state.get(key)
    if stored is None:
        return torch.full(like.shape, float(initial), dtype=torch.float64, device=like.device)
    if not isinstance(stored, torch.Tensor) or tuple(stored.shape) != tuple(like.shape):
        shape = tuple(stored.shape) if isinstance(stored, torch.Tensor) else type(stored).__name__
        raise ValueError(
            f"aggregator state {key!r} is {shape} but the model's tensor has shape {tuple(like.shape)}: "
            "the checkpoint being resumed belongs to another model; resume from a matching run "
            "or start without run.resume"
        )
    # copy=True: callers update the working copy in place, and ``state`` must only change
    # when the whole round succeeded (a float64 state tensor would otherwise be returned as is).
    return stored.to(device=like.device, dtype=torch.float64, copy=True)


def store_moment(state: MutableMapping, key: str, value: torch.Tensor, like: torch.Tensor) -> None:
    """Store a copy of a float64 working tensor as ``state[key]``.

    Always a copy, so the caller may keep computing in place on ``value``.
    """
    state[key] = value.to(dtype=state_dtype(like), copy=True)
