"""Buffering a round's updates, for the robust aggregators whose definitions need all of them.

Median, trimmed mean and Krum compare every client's value with every other's,
so unlike FedAvg they cannot fold updates into a running sum: they hold the
round's N updates (N x the model) and, while processing one tensor, an
N-row float64 stack of that tensor.  The robust aggregators say so in their
docstrings; FedAvg-like ones use ``_accumulate.py`` instead.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch

from fedplug.types import ClientUpdate, EmptyRoundError
from fedplug_plugins.aggregators._accumulate import check_update_matches


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


def stack(updates: list[ClientUpdate], name: str) -> torch.Tensor:
    """Tensor ``name`` of every update, stacked along a new first axis, in float64."""
    return torch.stack([u.weights[name].detach().to(torch.float64) for u in updates])


def flat_float_rows(updates: list[ClientUpdate], names: Iterable[str]) -> Iterable[torch.Tensor]:
    """For each tensor name, the (N, numel) float64 matrix of the clients' values."""
    for name in names:
        yield stack(updates, name).reshape(len(updates), -1)
