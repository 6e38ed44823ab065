"""FedAdam, FedYogi and FedAdagrad: adaptive server optimisers.

Definition (Reddi et al. 2021, "Adaptive Federated Optimization", ICLR,
Algorithm 2), per coordinate, for round t::

    delta_t = sum_k (n_k / n) (w^k - w_t)                 pseudo-gradient
    m_t     = beta1 * m_{t-1} + (1 - beta1) * delta_t        (m_{-1} = 0)
    v_t     = v_{t-1} + delta_t^2                            FedAdagrad
    v_t     = v_{t-1} - (1 - beta2) delta_t^2 sign(v_{t-1} - delta_t^2)   FedYogi
    v_t     = beta2 * v_{t-1} + (1 - beta2) * delta_t^2      FedAdam
                                                             (v_{-1} = tau^2)
    w_{t+1} = w_t + eta * m_t / (sqrt(v_t) + tau)

As in the paper there is no bias correction, and ``v`` starts at ``tau^2``
(the paper asks for ``v_{-1} >= tau^2``).  Algorithm 2 writes ``delta_t`` as
the uniform mean over the round's clients; fedplug weights it by
``num_examples`` as FedAvg does, so that all FedAvg-family aggregators agree
on what a round's mean is.  ``eta_l`` (the client learning rate) is the
clients' ``train.lr``; the server needs only ``eta``.

Policy: floating parameters get the adaptive step; BatchNorm running
statistics and integer buffers the plain weighted mean, integers rounded
(``_policy.py``).

State: ``m/<tensor name>`` and ``v/<tensor name>`` (float32) for each stepped
tensor.  Memory: streaming (one float64 accumulator) plus the two moments
(2x the model).

Config (``conf/aggregator/fedadam.yaml`` etc.): ``eta`` (> 0, server learning
rate, default 0.01), ``beta1`` (in [0, 1), default 0.9), ``beta2`` (in [0, 1),
default 0.99; not used by FedAdagrad), ``tau`` (> 0, adaptivity, default 1e-3).

Entry points: ``fedadam``, ``fedyogi``, ``fedadagrad`` are the objects at the
bottom of this module; each has its own ``@hookimpl`` method.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch

from fedplug.hooks import hookimpl
from fedplug.types import ClientUpdate, StateDict
from fedplug_plugins.aggregators._params import check_keys, number
from fedplug_plugins.aggregators._server_step import server_step
from fedplug_plugins.aggregators._state import load_moment, store_moment

DEFAULTS = {"eta": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}


def _second_moment(variant: str, v: torch.Tensor, delta_sq: torch.Tensor, beta2: float) -> torch.Tensor:
    """v_t from v_{t-1} (modified in place) and delta_t^2, per Reddi et al. Algorithm 2."""
    if variant == "adagrad":
        return v.add_(delta_sq)
    if variant == "yogi":
        return v.sub_(torch.sign(v - delta_sq).mul_(delta_sq), alpha=1.0 - beta2)
    if variant == "adam":
        return v.mul_(beta2).add_(delta_sq, alpha=1.0 - beta2)
    raise ValueError(f"unknown FedOpt variant {variant!r}")


def fedopt(
    global_weights: StateDict,
    updates: Iterable[ClientUpdate],
    state: dict,
    *,
    variant: str,
    eta: float = DEFAULTS["eta"],
    beta1: float = DEFAULTS["beta1"],
    beta2: float = DEFAULTS["beta2"],
    tau: float = DEFAULTS["tau"],
) -> StateDict:
    """One FedOpt round (``variant``: adam, yogi or adagrad); reads and updates ``state`` in place."""

    def rule(name: str, current: torch.Tensor, delta: torch.Tensor, new_state: dict) -> torch.Tensor:
        m = load_moment(state, f"m/{name}", current, 0.0).mul_(beta1).add_(delta, alpha=1.0 - beta1)
        v = load_moment(state, f"v/{name}", current, tau * tau)
        v = _second_moment(variant, v, delta.mul_(delta), beta2)  # delta is ours: square it in place
        store_moment(new_state, f"m/{name}", m, current)
        store_moment(new_state, f"v/{name}", v, current)
        return m.div_(v.sqrt_().add_(tau)).mul_(eta).add_(current.detach())

    return server_step(global_weights, updates, state, rule)


class FedOpt:
    """One adaptive server optimiser as a plugin object (pluggy registers its ``@hookimpl`` methods)."""

    def __init__(self, variant: str):
        self.variant = variant
        self.parameters = ("eta", "beta1", "tau") if variant == "adagrad" else ("eta", "beta1", "beta2", "tau")

    def settings(self, config: Mapping[str, Any]) -> dict[str, float]:
        check_keys(config, self.parameters)
        out = {
            "eta": number(config, "eta", DEFAULTS["eta"], low=0.0, low_open=True),
            "beta1": number(config, "beta1", DEFAULTS["beta1"], low=0.0, high=1.0, high_open=True),
            "tau": number(config, "tau", DEFAULTS["tau"], low=0.0, low_open=True),
        }
        if "beta2" in self.parameters:
            out["beta2"] = number(config, "beta2", DEFAULTS["beta2"], low=0.0, high=1.0, high_open=True)
        return out

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
        return fedopt(global_weights, updates, state, variant=self.variant, **self.settings(config))

    def __repr__(self) -> str:
        return f"<fedplug aggregator fed{self.variant}>"


fedadam = FedOpt("adam")
fedyogi = FedOpt("yogi")
fedadagrad = FedOpt("adagrad")
