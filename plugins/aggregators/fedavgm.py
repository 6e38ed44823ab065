"""FedAvgM: FedAvg with server momentum.

Definition (Hsu, Qi and Brown 2019, "Measuring the Effects of Non-Identical
Data Distribution for Federated Visual Classification", Sec. 3; the same
update as Flower's ``FedAvgM``)::

    g_t     = w_t - sum_k (n_k / n) w^k        (pseudo-gradient: global minus FedAvg mean)
    v_t     = beta * v_{t-1} + g_t              (v_0 = 0)
    w_{t+1} = w_t - server_lr * v_t

``server_lr = 1, server_momentum = 0`` is FedAvg exactly.  Hsu et al. find the
*effective* rate ``server_lr / (1 - server_momentum)`` is what matters; with
the defaults (1.0, 0.9) consistent pseudo-gradients are amplified up to 10x.
For a steady-state step equal to FedAvg's, set ``server_lr = 1 - server_momentum``.

Policy: floating parameters get the momentum step; BatchNorm running
statistics and integer buffers the plain weighted mean, integers rounded
(``_policy.py``, ``_accumulate.py``).

State: ``momentum/<tensor name>`` (float32) for each stepped tensor, when
``server_momentum > 0``.  Memory: streaming (one float64 accumulator) plus the
momentum buffer (1x the model).

Config (``conf/aggregator/fedavgm.yaml``): ``server_lr`` (> 0, default 1.0),
``server_momentum`` (in [0, 1), default 0.9).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch

from fedplug.hooks import hookimpl
from fedplug.types import ClientUpdate, StateDict
from fedplug_plugins.aggregators._params import check_keys, number
from fedplug_plugins.aggregators._server_step import server_step
from fedplug_plugins.aggregators._state import load_moment, store_moment

PARAMETERS = ("server_lr", "server_momentum")


def fedavgm(
    global_weights: StateDict,
    updates: Iterable[ClientUpdate],
    state: dict,
    *,
    server_lr: float = 1.0,
    server_momentum: float = 0.9,
) -> StateDict:
    """One FedAvgM round; reads and updates ``state`` in place."""

    def rule(name: str, current: torch.Tensor, delta: torch.Tensor, new_state: dict) -> torch.Tensor:
        pseudo_gradient = delta.neg_()  # Hsu et al.'s sign: w_t - mean
        if server_momentum > 0:
            key = f"momentum/{name}"
            velocity = load_moment(state, key, current, 0.0).mul_(server_momentum).add_(pseudo_gradient)
            store_moment(new_state, key, velocity, current)
        else:
            velocity = pseudo_gradient
        return velocity.mul_(-server_lr).add_(current.detach())

    return server_step(global_weights, updates, state, rule)


@hookimpl
def fedplug_aggregate(
    global_weights: StateDict,
    updates: Iterable[ClientUpdate],
    round_number: int,
    config: Mapping[str, Any],
    state: dict,
) -> StateDict:
    """Called by the server once per round, in its aggregation worker thread."""
    check_keys(config, PARAMETERS)
    return fedavgm(
        global_weights,
        updates,
        state,
        server_lr=number(config, "server_lr", 1.0, low=0.0, low_open=True),
        server_momentum=number(config, "server_momentum", 0.9, low=0.0, high=1.0, high_open=True),
    )
