"""``fedavg_clipped``: FedAvg with server-side L2 clipping of each client's update.

Definition (the server-side clipping step of DP-FedAvg, McMahan et al. 2018,
"Learning Differentially Private Recurrent Language Models", Algorithm 1,
without the noise; used on its own as a defence against a few clients sending
oversized updates, e.g. Sun et al. 2019, "Can You Really Backdoor Federated
Learning?")::

    delta_k   = w^k - w                                   client k's update
    clipped_k = delta_k * min(1, C / ||delta_k||_2)       ||.||_2 over every floating-point tensor
    w'        = w + eta * sum_k n_k * clipped_k / sum_k n_k

with ``C = config["max_norm"]``, ``eta = config["server_lr"]`` and ``n_k`` the
client's ``num_examples``.  With no update clipped and ``eta = 1`` this is
exactly FedAvg.

Tensors: the norm and the clipping cover every floating-point tensor of the
state (parameters *and* BatchNorm running statistics: both are what a client
sends, and a malicious client controls both).  Integer buffers
(``num_batches_tracked``) are not updates of a model: they get FedAvg's
example-weighted mean, rounded to the nearest integer, and keep their dtype.

Memory: streaming.  ``updates`` is consumed once; each update is clipped and
folded into one float64 accumulator, then dropped.

State: none.  Each round's per-client norms are published for the
``model_drift`` observer of this package (see :mod:`fedplug_example.drift`).

Entry point: ``fedavg_clipped = fedplug_example.clipped`` (this module is the plugin).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import torch

from fedplug.hooks import hookimpl
from fedplug.types import ClientUpdate, EmptyRoundError, StateDict
from fedplug_example import norms


class ClippingConfigError(ValueError):
    """A ``fedavg_clipped`` setting out of range; the message names the key."""


def read_config(config: Mapping[str, Any]) -> tuple[float, float]:
    """``(max_norm, server_lr)`` from the aggregator config, checked."""
    values = {}
    for key, default in (("max_norm", 10.0), ("server_lr", 1.0)):
        raw = config.get(key, default)
        try:
            value = float(raw)
        except (TypeError, ValueError):
            value = float("nan")
        if not (math.isfinite(value) and value > 0):
            raise ClippingConfigError(
                f"aggregator.{key} must be a number > 0, got {raw!r} "
                f"(e.g. python -m fedplug aggregator=fedavg_clipped aggregator.{key}={default})"
            )
        values[key] = value
    return values["max_norm"], values["server_lr"]


def update_norm(weights: StateDict, global_weights: StateDict) -> float:
    """``||w^k - w||_2`` over every floating-point tensor, computed in float64."""
    total = 0.0
    for name, g in global_weights.items():
        if g.is_floating_point():
            total += float((weights[name].double() - g.double()).pow(2).sum())
    return math.sqrt(total)


def aggregate_clipped(
    global_weights: StateDict,
    updates: Iterable[ClientUpdate],
    max_norm: float,
    server_lr: float = 1.0,
    round_number: int = 0,
) -> StateDict:
    """The new global weights; see the module docstring for the definition."""
    acc: dict[str, torch.Tensor] = {}
    total_examples = 0
    for update in updates:
        if not acc:
            acc = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in global_weights.items()}
        n = float(update.num_examples)
        norm = update_norm(update.weights, global_weights)
        factor = 1.0 if norm <= max_norm else max_norm / norm
        norms.publish(round_number, update.client_id, norm, factor)
        for name, g in global_weights.items():
            w = update.weights[name].double()
            if g.is_floating_point():
                acc[name].add_((w - g.double()) * (n * factor))
            else:
                acc[name].add_(w * n)
        total_examples += update.num_examples
    if not acc:
        raise EmptyRoundError(f"fedavg_clipped: round {round_number} delivered no client update")
    if total_examples <= 0:
        raise ValueError("fedavg_clipped: the round's updates report no training examples")
    out: StateDict = {}
    for name, g in global_weights.items():
        mean = acc[name] / total_examples
        if g.is_floating_point():
            out[name] = (g.double() + server_lr * mean).to(g.dtype)
        else:
            out[name] = torch.round(mean).to(g.dtype)
    return out


@hookimpl
def fedplug_aggregator_round_settings(round_number: int, config: Mapping[str, Any]) -> None:
    """Called by the server before each round's ``request_update``.

    Clipping needs nothing from the clients; the hook is used to check the
    config before round 1's training rather than after it.
    """
    read_config(config)
    return None


@hookimpl
def fedplug_aggregate(
    global_weights: StateDict,
    updates: Iterable[ClientUpdate],
    round_number: int,
    config: Mapping[str, Any],
    state: dict,
) -> StateDict:
    """Called by the server once per round, in its aggregation worker thread."""
    max_norm, server_lr = read_config(config)
    return aggregate_clipped(global_weights, updates, max_norm, server_lr, round_number)
