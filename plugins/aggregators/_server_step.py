"""The shared skeleton of aggregators that step a server optimiser on the FedAvg pseudo-gradient.

``fedavgm`` and the adaptive optimisers (``fedopt.py``) all follow Reddi et
al. 2021 ("Adaptive Federated Optimization", Algorithm 1): the round's
pseudo-gradient is ``delta = mean_k(w^k) - w_t`` (the example-weighted mean of
the clients' weights minus the global weights the clients started from),
and a server optimiser turns it into ``w_{t+1}``.  Only the rule differs, so
each aggregator hands :func:`server_step` a ``rule(name, global, delta,
state) -> new`` callback.

Per-tensor policy (``_policy.py``): floating parameters are stepped by the
rule; BatchNorm running statistics and integer buffers take the plain
weighted mean (FedAvg).

Memory: streaming, like FedAvg: one float64 accumulator, then one tensor at a
time.  The optimiser state (momentum, moments) is an extra 1-2x the model in
float32, kept in ``state``.

State: written only after every tensor was stepped without error, so a
failing round (e.g. state from another model on resume) leaves ``state`` as it was.
"""

from __future__ import annotations

from typing import Callable, Iterable, MutableMapping

import torch

from fedplug.types import ClientUpdate, StateDict
from fedplug_plugins.aggregators._accumulate import cast_back, weighted_mean_of_updates
from fedplug_plugins.aggregators._policy import is_stepped_by_server_optimiser

# rule(name, global_tensor, delta_float64, new_state) -> new weights in float64.
# It reads the previous state from ``state`` and writes its new state into ``new_state``.
Rule = Callable[[str, torch.Tensor, torch.Tensor, dict], torch.Tensor]


def server_step(
    global_weights: StateDict, updates: Iterable[ClientUpdate], state: MutableMapping, rule: Rule
) -> StateDict:
    """Consume ``updates`` (a stream), step every floating parameter with ``rule``; return new weights."""
    mean, _ = weighted_mean_of_updates(updates, global_weights)
    new_state: dict = {}
    out: StateDict = {}
    for name, current in global_weights.items():
        value = mean.pop(name)  # free each float64 mean as soon as it is used
        if is_stepped_by_server_optimiser(name, current):
            delta = value.sub_(current.detach())  # in place: value becomes mean - global
            value = rule(name, current, delta, new_state)
        out[name] = cast_back(value, current)
    state.update(new_state)
    return out
