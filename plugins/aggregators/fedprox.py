"""FedProx: FedAvg on the server, a proximal term on the clients.

Definition (Li et al. 2020, "Federated Optimization in Heterogeneous
Networks", Algorithm 2): each client k approximately minimises

    h_k(w; w_t) = F_k(w) + (mu / 2) * ||w - w_t||^2

starting from the global weights ``w_t``; the server then aggregates like
FedAvg.  (The paper's Algorithm 2 averages uniformly over clients sampled with
probability ``p_k``; with all clients of a round it is the example-weighted
mean, as fedplug's FedAvg, which is what this plugin does.)

Server side this plugin is :mod:`~fedplug_plugins.aggregators.fedavg`
(streaming, same integer-buffer policy, no state) plus
``fedplug_aggregator_round_settings`` returning ``{"proximal_mu": mu}``, which
the server sends with every ``request_update``; the client's detector adds
the proximal term (``TrainSettings.proximal_mu``).  ``mu = 0`` is FedAvg.

Config (``conf/aggregator/fedprox.yaml``): ``proximal_mu`` (>= 0, default 0.01).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from fedplug.hooks import hookimpl
from fedplug.types import ClientUpdate, StateDict
from fedplug_plugins.aggregators._params import check_keys, number
from fedplug_plugins.aggregators.fedavg import fedavg

PARAMETERS = ("proximal_mu",)
DEFAULT_MU = 0.01


def proximal_mu(config: Mapping[str, Any]) -> float:
    check_keys(config, PARAMETERS)
    return number(config, "proximal_mu", DEFAULT_MU, low=0.0)


@hookimpl
def fedplug_aggregator_round_settings(round_number: int, config: Mapping[str, Any]) -> Mapping[str, Any]:
    """Called by the server before each round's ``request_update``: the clients' proximal weight."""
    return {"proximal_mu": proximal_mu(config)}


@hookimpl
def fedplug_aggregate(
    global_weights: StateDict,
    updates: Iterable[ClientUpdate],
    round_number: int,
    config: Mapping[str, Any],
    state: dict,
) -> StateDict:
    """Called by the server once per round, in its aggregation worker thread: FedAvg."""
    proximal_mu(config)  # a bad value fails here too, not only when the settings are sent
    return fedavg(global_weights, updates)
