"""FedAvg: the new global model is the example-weighted mean of the clients' models.

Definition (McMahan et al. 2017, "Communication-Efficient Learning of Deep
Networks from Decentralized Data", Algorithm 1, server update)::

    w_{t+1} = sum_k (n_k / n) * w_{t+1}^k,     n = sum_k n_k

where ``w^k`` is client k's full state after local training and ``n_k`` its
``num_examples`` (training images).  Applied to every tensor of the state,
parameters and BatchNorm running statistics alike.

Integer buffers (``num_batches_tracked``): the weighted mean rounded to the
nearest integer (ties to even), and bool buffers the weighted majority; see
``_accumulate.py`` for why.  Everything else keeps its own dtype; the mean is
accumulated in float64.

Memory: streaming.  ``updates`` is consumed once and each update is folded
into one float64 running mean and dropped, so the server's memory does not
grow with the number of clients (``benchmarks/bench_aggregation_memory.py``).

State: none.  Config (``conf/aggregator/fedavg.yaml``): no parameters.

Entry point ``fedavg = fedplug_plugins.aggregators.fedavg`` (this module is the plugin).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from fedplug.hooks import hookimpl
from fedplug.types import ClientUpdate, StateDict
from fedplug_plugins.aggregators._accumulate import finish_like, weighted_mean_of_updates
from fedplug_plugins.aggregators._params import check_keys


def fedavg(global_weights: StateDict, updates: Iterable[ClientUpdate]) -> StateDict:
    """The FedAvg weighted mean of ``updates``, with ``global_weights``'s names and dtypes."""
    mean, _ = weighted_mean_of_updates(updates, global_weights)
    return finish_like(mean, global_weights)


@hookimpl
def fedplug_aggregate(
    global_weights: StateDict,
    updates: Iterable[ClientUpdate],
    round_number: int,
    config: Mapping[str, Any],
    state: dict,
) -> StateDict:
    """Called by the server once per round, in its aggregation worker thread."""
    check_keys(config, ())
    return fedavg(global_weights, updates)
