"""Krum and Multi-Krum: pick the update(s) closest to their neighbours.

Definition (Blanchard, El Mhamdi, Guerraoui and Stainer 2017, "Machine
Learning with Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS,
Sec. 4 and 5).  With N updates ``V_1..V_N`` of which at most ``f`` are
Byzantine, the score of update i is

    s(i) = sum_{j in N_i} ||V_i - V_j||^2

over the ``N - f - 2`` updates ``N_i`` closest to ``V_i`` (excluding itself).
Krum returns the update with the lowest score; Multi-Krum returns the plain
mean of the ``m`` updates with the lowest scores (``m = N - f`` by default).
The paper's guarantee needs ``N > 2f + 2``; in a round with fewer updates
(e.g. a quorum-sized round) this plugin logs a warning and scores with
``max(1, N - f - 2)`` neighbours (``N - 1`` if that is fewer), so the round
still completes; with one update that update is returned.  Ties go to the
lower index, i.e. the update that arrived first.

``V_i`` is the client's whole state flattened over its floating tensors
(distances between weights equal distances between weight changes, since
every client started from the same global model); integer buffers take no
part in the distances.  Selection and averaging are **unweighted**, as in the
paper: the reported ``num_examples`` of a Byzantine client cannot be trusted.

Policy: Krum returns the selected client's state as is (BatchNorm statistics
and integer buffers included, so they stay consistent with its weights);
Multi-Krum averages every tensor of the selected clients, integer buffers
rounded to the nearest integer.

Memory: **buffers all N updates** of the round (Krum's scores compare every
pair), plus an N-row float64 stack of one chunk of coordinates at a time
(``_buffer.py``).  Compute is O(N^2 x model).
State: none.

Config (``conf/aggregator/krum.yaml``, ``multikrum.yaml``): ``num_byzantine``
(f, integer >= 0, default 1); Multi-Krum also ``num_selected`` (m, integer
>= 1 or null for ``N - f``; capped at N).
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping

import torch

from fedplug.hooks import hookimpl
from fedplug.types import ClientUpdate, StateDict
from fedplug_plugins.aggregators._accumulate import is_float
from fedplug_plugins.aggregators._buffer import collect_updates, reduce_coordinates, stacked_chunks
from fedplug_plugins.aggregators._params import check_keys, number, optional_count

log = logging.getLogger(__name__)

DEFAULT_NUM_BYZANTINE = 1


def pairwise_squared_distances(updates: list[ClientUpdate], template: StateDict) -> torch.Tensor:
    """(N, N) float64 matrix of ||V_i - V_j||^2 over the floating tensors, accumulated tensor by tensor."""
    n = len(updates)
    dist = torch.zeros(n, n, dtype=torch.float64)
    for name, like in template.items():
        if not is_float(like):
            continue
        for _, _, rows in stacked_chunks(updates, name):
            for i in range(n):
                # Explicit differences rather than |a|^2 + |b|^2 - 2ab: no cancellation for close updates.
                dist[i] += (rows - rows[i]).square_().sum(dim=1).cpu()
    return dist


def krum_scores(dist: torch.Tensor, num_byzantine: int) -> torch.Tensor:
    """Each update's Krum score: the sum of its squared distances to its N - f - 2 nearest others."""
    n = dist.shape[0]
    if n <= 2 * num_byzantine + 2:
        log.warning(
            "Krum with num_byzantine=%d needs more than %d updates for its guarantee, got %d; "
            "scoring with the nearest neighbours available",
            num_byzantine, 2 * num_byzantine + 2, n,
        )
    k = min(max(1, n - num_byzantine - 2), n - 1)
    # Each row's own zero distance sorts first (distances are >= 0); skip it.
    others = torch.sort(dist, dim=1).values[:, 1 : 1 + k]
    return others.sum(dim=1)


def select(updates: list[ClientUpdate], template: StateDict, num_byzantine: int, m: int) -> list[int]:
    """Indices of the ``m`` lowest-scoring updates, best first (ties: lower index)."""
    scores = krum_scores(pairwise_squared_distances(updates, template), num_byzantine)
    order = sorted(range(len(updates)), key=lambda i: (scores[i].item(), i))
    chosen = order[:m]
    log.info(
        "Krum scores %s; selected %s",
        {u.client_id: round(s, 6) for u, s in zip(updates, scores.tolist())},
        [updates[i].client_id for i in chosen],
    )
    return chosen


def krum_aggregate(global_weights: StateDict, updates: Iterable[ClientUpdate], num_byzantine: int) -> StateDict:
    """The single update with the lowest Krum score (a copy of its state)."""
    buffered = collect_updates(updates, global_weights)
    best = buffered[select(buffered, global_weights, num_byzantine, 1)[0]]
    return {name: best.weights[name].detach().clone() for name in global_weights}


def multikrum_aggregate(
    global_weights: StateDict, updates: Iterable[ClientUpdate], num_byzantine: int, num_selected: int | None
) -> StateDict:
    """The plain mean of the ``num_selected`` (default N - f) lowest-scoring updates."""
    buffered = collect_updates(updates, global_weights)
    n = len(buffered)
    m = max(1, n - num_byzantine) if num_selected is None else min(num_selected, n)
    chosen = [buffered[i] for i in select(buffered, global_weights, num_byzantine, m)]
    return {
        name: reduce_coordinates(chosen, name, like, lambda values: values.mean(dim=0))
        for name, like in global_weights.items()
    }


class _Krum:
    def __init__(self, multi: bool):
        self.multi = multi

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
        check_keys(config, ("num_byzantine", "num_selected") if self.multi else ("num_byzantine",))
        f = int(number(config, "num_byzantine", DEFAULT_NUM_BYZANTINE, low=0, integer=True))
        if self.multi:
            return multikrum_aggregate(global_weights, updates, f, optional_count(config, "num_selected"))
        return krum_aggregate(global_weights, updates, f)

    def __repr__(self) -> str:
        return f"<fedplug aggregator {'multikrum' if self.multi else 'krum'}>"


krum = _Krum(multi=False)
multikrum = _Krum(multi=True)
