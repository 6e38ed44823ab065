"""Buffering a round's updates, for the robust aggregators whose definitions need all of them.

Median, trimmed mean and Krum compare every client's value with every other's,
so unlike FedAvg they cannot fold updates into a running mean: they hold the
round's N updates (N x the model).  Their arithmetic then walks the model in
chunks of :data:`CHUNK` coordinates, stacking the N clients' values of one
chunk at a time in float64, so the working memory on top of the buffered
updates is O(N x CHUNK), not another N float64 copies of the model.  The
robust aggregators say so in their docstrings; FedAvg-like ones use
``_accumulate.py`` instead.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Mapping

import torch

from fedplug.types import ClientUpdate, EmptyRoundError
from fedplug_plugins.aggregators._accumulate import cast_back, check_update_matches

CHUNK = 1 << 16  # coordinates per float64 stack: N x 512 KiB


def collect_updates(
    updates: Iterable[ClientUpdate], template: Mapping[str, torch.Tensor]
) -> list[ClientUpdate]:
    """All updates of the round (the stream is consumed once), checked against the global model."""
    collected = []
    for update in updates:
        check_update_matches(update, template)
        collected.append(update)
    if not collected:
        raise EmptyRoundError("no client update to aggregate in this round")
    return collected


def stacked_chunks(updates: list[ClientUpdate], name: str) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(start, stop, values)`` over tensor ``name`` flattened: ``values`` is the (N, stop - start)
    float64 matrix of the clients' coordinates ``start:stop``."""
    flats = [u.weights[name].detach().reshape(-1) for u in updates]
    numel = flats[0].numel()
    for start in range(0, max(numel, 1), CHUNK):
        stop = min(start + CHUNK, numel)
        yield start, stop, torch.stack([f[start:stop].to(torch.float64) for f in flats])


def reduce_coordinates(
    updates: list[ClientUpdate], name: str, like: torch.Tensor, rule: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Apply ``rule`` ((N, c) float64 -> (c,) float64) chunk by chunk; the result in ``like``'s shape and dtype."""
    out = torch.empty(like.numel(), dtype=torch.float64, device=like.device)
    for start, stop, values in stacked_chunks(updates, name):
        out[start:stop] = rule(values)
    return cast_back(out.reshape(like.shape), like)
