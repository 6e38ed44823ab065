"""FedMedian and trimmed mean: coordinate-wise robust aggregation.

Definitions (Yin, Chen, Ramchandran and Bartlett 2018, "Byzantine-Robust
Distributed Learning: Towards Optimal Statistical Rates", ICML, Sec. 3):

- coordinate-wise median: ``w_{t+1}[i] = median_k w^k[i]`` (for an even number
  of clients, the mean of the two middle values);
- coordinate-wise beta-trimmed mean: for each coordinate, sort the N clients'
  values, drop the ``floor(beta * N)`` largest and the as many smallest, and
  average the rest.  With ``floor(beta * N) = 0`` (few clients) it is the plain
  mean; ``beta`` must be below 0.5 so that something remains.

Both are **unweighted**, as in the paper: weighting by the reported
``num_examples`` would let one Byzantine client outvote the rest by
claiming a huge dataset.

Policy: the rule applies to every tensor, BatchNorm running statistics
included (a Byzantine client can poison those as easily as weights); integer
buffers get the same rule, rounded to the nearest integer (for an odd number
of clients the median is one client's value, exactly).

Memory: **buffers all N updates** of the round, because a coordinate's
median needs every client's value of it; plus an N-row float64 stack of one
chunk of coordinates and its sorted copy (``_buffer.py``).  State: none.

Entry points: ``fedmedian`` and ``trimmed_mean`` are the objects at the
bottom of this module.  Config: ``trimmed_mean`` takes ``beta`` (in [0, 0.5),
default 0.1); ``fedmedian`` has no parameters.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping

import torch

from fedplug.hooks import hookimpl
from fedplug.types import ClientUpdate, StateDict
from fedplug_plugins.aggregators._buffer import collect_updates, reduce_coordinates
from fedplug_plugins.aggregators._params import check_keys, number

DEFAULT_BETA = 0.1


def _sorted_trimmed_mean(values: torch.Tensor, trim: int) -> torch.Tensor:
    """Mean over axis 0 of ``values`` after dropping its ``trim`` smallest and largest entries per coordinate."""
    n = values.shape[0]
    kept = torch.sort(values, dim=0).values[trim : n - trim]
    return kept.mean(dim=0)


def coordinatewise(
    global_weights: StateDict, updates: Iterable[ClientUpdate], trim_of_n: Callable[[int], int]
) -> StateDict:
    """Buffer the round, then per tensor the trimmed mean with ``trim_of_n(N)`` values cut each side."""
    buffered = collect_updates(updates, global_weights)
    trim = trim_of_n(len(buffered))
    return {
        name: reduce_coordinates(buffered, name, like, lambda values: _sorted_trimmed_mean(values, trim))
        for name, like in global_weights.items()
    }


def coordinatewise_median(global_weights: StateDict, updates: Iterable[ClientUpdate]) -> StateDict:
    """Coordinate-wise median (the trimmed mean that keeps only the middle one or two values)."""
    return coordinatewise(global_weights, updates, lambda n: (n - 1) // 2)


def coordinatewise_trimmed_mean(global_weights: StateDict, updates: Iterable[ClientUpdate], beta: float) -> StateDict:
    """Coordinate-wise beta-trimmed mean."""
    return coordinatewise(global_weights, updates, lambda n: math.floor(beta * n))


class _FedMedian:
    @hookimpl
    def fedplug_aggregate(
        self,
        global_weights: StateDict,
        updates: Iterable[ClientUpdate],
        round_number: int,
        config: Mapping[str, Any],
        state: dict,
    ) -> StateDict:
        """Called by the server once per round, in its aggregation worker thread."""
        check_keys(config, ())
        return coordinatewise_median(global_weights, updates)

    def __repr__(self) -> str:
        return "<fedplug aggregator fedmedian>"


class _TrimmedMean:
    @hookimpl
    def fedplug_aggregate(
        self,
        global_weights: StateDict,
        updates: Iterable[ClientUpdate],
        round_number: int,
        config: Mapping[str, Any],
        state: dict,
    ) -> StateDict:
        """Called by the server once per round, in its aggregation worker thread."""
        check_keys(config, ("beta",))
        beta = number(config, "beta", DEFAULT_BETA, low=0.0, high=0.5, high_open=True)
        return coordinatewise_trimmed_mean(global_weights, updates, beta)

    def __repr__(self) -> str:
        return "<fedplug aggregator trimmed_mean>"


fedmedian = _FedMedian()
trimmed_mean = _TrimmedMean()
