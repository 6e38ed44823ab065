"""Local-DP FedAvg: every client clips and noises its own update; the server takes the plain mean.

Each client sends ``w_t + clip(Delta_k, C) + N(0, (z C)^2 I)`` (the ``dp_local``
update filter, which this aggregator requests in every round's settings), so
each update is a Gaussian mechanism with noise multiplier ``z`` against anyone
who reads it -- the server included (Dwork and Roth 2014, Sec. 3.5; the
"local model").  The server averages uniformly (``num_examples`` would let a
client's claimed size weight its noise): ``w_{t+1} = mean_k(w^k)`` over
floating tensors; integer buffers keep the global value.  The noise on the mean
has std ``z C / sqrt(n)``, sqrt(n) times central DP's ``z C / n`` for the same
epsilon: local DP costs much more accuracy (docs/privacy.md).

The epsilon the server reports is each client's own, against the server, after
the rounds so far, counting every round (``sample_rate`` 1: a client may be in
all of them).

Config (``conf/aggregator/ldp_fedavg.yaml``): ``clip_norm`` (C > 0),
``noise_multiplier`` (z >= 0), ``noise_seed`` (tests only).  Streaming, no state.
Entry point ``ldp_fedavg = fedplug_plugins.aggregators.ldp_fedavg`` (this module).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch

from fedplug.hooks import hookimpl
from fedplug.privacy.clipping import apply_delta, delta_of, private_names
from fedplug.types import ClientUpdate, EmptyRoundError, PrivacyMechanism, StateDict
from fedplug_plugins.aggregators._accumulate import cast_back, check_update_matches
from fedplug_plugins.aggregators._params import check_keys, number

PARAMETERS = ("clip_norm", "noise_multiplier", "noise_seed", "integer_buffers")


def _settings(config: Mapping[str, Any]) -> dict:
    check_keys(config, PARAMETERS)
    seed = config.get("noise_seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"aggregator.noise_seed must be null (production) or an integer (tests only), got {seed!r}")
    buffers = config.get("integer_buffers") or "keep"
    if buffers not in ("keep", "mean"):
        raise ValueError(f"aggregator.integer_buffers must be one of keep, mean, got {buffers!r}")
    return {"clip_norm": number(config, "clip_norm", 1.0, low=0.0, low_open=True),
            "noise_multiplier": number(config, "noise_multiplier", 1.0, low=0.0), "noise_seed": seed,
            "integer_buffers": buffers}


def uniform_mean(global_weights: StateDict, updates: Iterable[ClientUpdate], integer_buffers: str = "keep") -> StateDict:
    """``global + mean_k(w^k - global)`` over floating tensors; integer buffers keep the global value
    (``keep``; the ``dp_local`` filter already sent the global value) or get the rounded mean (``mean``)."""
    names = private_names(global_weights)
    sums = {n: torch.zeros(global_weights[n].shape, dtype=torch.float64, device=global_weights[n].device)
            for n in names}
    int_sums = {n: torch.zeros(t.shape, dtype=torch.float64) for n, t in global_weights.items() if n not in sums}
    count = 0
    for update in updates:
        check_update_matches(update, global_weights)
        delta = delta_of(update.weights, global_weights)
        for n in names:
            sums[n].add_(delta.pop(n))
        for n, acc in int_sums.items():
            acc.add_(update.weights[n].detach().to(torch.float64).cpu())
        count += 1
        del update, delta
    if count == 0:
        raise EmptyRoundError("no client update to aggregate in this round")
    result = apply_delta(global_weights, {n: s.div_(count) for n, s in sums.items()})
    if integer_buffers == "mean":
        for n, acc in int_sums.items():
            result[n] = cast_back(acc.div_(count), global_weights[n]).to(global_weights[n].device)
    return result


@hookimpl
def fedplug_aggregate(global_weights: StateDict, updates: Iterable[ClientUpdate], round_number: int,
                      config: Mapping[str, Any], state: dict) -> StateDict:
    """Called by the server once per round, in its aggregation worker thread."""
    return uniform_mean(global_weights, updates, _settings(config)["integer_buffers"])


@hookimpl
def fedplug_aggregator_round_settings(round_number: int, config: Mapping[str, Any]) -> Mapping[str, Any]:
    """Every client clips and noises its update with the ``dp_local`` filter."""
    s = _settings(config)
    return {"update_filter": {"name": "dp_local", "clip_norm": s["clip_norm"],
                              "noise_multiplier": s["noise_multiplier"], "noise_seed": s["noise_seed"]}}


@hookimpl
def fedplug_aggregator_privacy(round_number: int, config: Mapping[str, Any]) -> PrivacyMechanism:
    s = _settings(config)
    return PrivacyMechanism("local", s["noise_multiplier"], clip_norm=s["clip_norm"], sample_rate=1.0)
