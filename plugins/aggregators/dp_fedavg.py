"""DP-FedAvg: central differential privacy on the aggregate, with fixed or adaptive clipping.

Definition (McMahan, Ramage, Talwar and Zhang 2018, "Learning Differentially
Private Recurrent Language Models", ICLR, Algorithm 1 with uniform weights and
the fixed-denominator estimator)::

    Delta_k  = clip(w^k - w_t, C)                     (L2 norm at most C)
    Delta    = (sum_k Delta_k + N(0, (z C)^2 I)) / m
    w_{t+1}  = w_t + Delta

``m`` is the *expected* number of clients per round (``expected_clients``,
default ``run.clients_per_round``; the paper's ``qN``), or with
``denominator: actual`` the number that answered (Flower's server-side
variant); the noise on the mean has std ``z C / m``.  Every client counts the
same: weighting by ``num_examples`` would let one client's claimed dataset size
scale its influence past ``C``.  Adding or removing one client changes the sum
by at most ``C``, so each round is a Gaussian mechanism with noise multiplier
``z``; the server's accountant (``fedplug/privacy/ledger.py``) composes the
rounds into (epsilon, delta) from ``fedplug_aggregator_privacy``.

Clipping happens here, on the server (``clipping: server``), or on the clients
(``clipping: client``): the round settings then ask every client to clip its
own update with the ``dp_clip`` update filter before sending it, as secure
aggregation needs (the server cannot clip what it cannot see).  The server
clips again in both cases, which changes nothing for an honest client and keeps
the sensitivity bound against a client that did not.

``dp_fedavg_adaptive`` (Andrew et al. 2021, ``fedplug/privacy/adaptive.py``)
replaces the fixed ``C`` by one that tracks the ``target_quantile`` of the
update norms through a noised count of unclipped updates; it splits ``z``
between the update and the count so that the round still spends ``z``.  Its
clip norm lives in ``state["dp/clip_norm"]`` (checkpointed, resumed).
Adaptive clipping runs on the server only (the clients would need each round's
clip norm, which the round-settings hook cannot see).

Tensors: every floating tensor (parameters and BatchNorm statistics) is part
of the clipped, noised delta.  Integer buffers (``num_batches_tracked``) keep
the global value (``integer_buffers: keep``): their mean would reveal how many
batches the clients ran, unprotected; ``mean`` averages them like FedAvg.

Noise: ``fedplug.privacy.noise``: a ``torch.Generator`` seeded from
``os.urandom`` each round; ``noise_seed`` is the test seam (a known seed makes
the noise known: never in production).  Memory: streaming, one float64 sum.

Entry points ``dp_fedavg`` and ``dp_fedavg_adaptive`` (objects of this module).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch

from fedplug.hooks import hookimpl
from fedplug.privacy.adaptive import next_clip_norm, update_noise_multiplier
from fedplug.privacy.clipping import apply_delta, clip_delta_, delta_of, private_names
from fedplug.privacy.noise import add_gaussian_noise_, gaussian, noise_generator
from fedplug.types import ClientUpdate, EmptyRoundError, PrivacyMechanism, StateDict
from fedplug_plugins.aggregators._accumulate import cast_back, check_update_matches
from fedplug_plugins.aggregators._params import check_keys, number

log = logging.getLogger("fedplug.dp_fedavg")

COMMON = ("noise_multiplier", "clipping", "denominator", "expected_clients", "integer_buffers", "noise_seed")
FIXED = COMMON + ("clip_norm",)
ADAPTIVE = COMMON + ("initial_clip_norm", "target_quantile", "clip_learning_rate", "clipped_count_stddev")
CLIP_STATE_KEY = "dp/clip_norm"


@dataclass(frozen=True)
class RoundFigures:
    """What one DP-FedAvg round did, for logs and tests."""

    clients: int
    unclipped: int
    clip_norm: float
    update_noise_std: float  # std of the noise added to the sum of clipped deltas
    next_clip_norm: float


def _choice(config: Mapping[str, Any], key: str, options: tuple[str, ...]) -> str:
    value = config.get(key, options[0])
    value = options[0] if value is None else value
    if value not in options:
        raise ValueError(f"aggregator.{key} must be one of {', '.join(options)}, got {value!r}; "
                         f"set it with aggregator.{key}=<value>")
    return str(value)


def _seed(config: Mapping[str, Any]) -> int | None:
    seed = config.get("noise_seed")
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"aggregator.noise_seed must be null (production: noise seeded from os.urandom) or an "
                         f"integer (tests only: the noise becomes predictable), got {seed!r}")
    return seed


def dp_fedavg_round(
    global_weights: StateDict,
    updates: Iterable[ClientUpdate],
    *,
    clip_norm: float,
    noise_multiplier: float,
    round_number: int,
    expected_clients: int,
    denominator: str = "expected",
    integer_buffers: str = "keep",
    noise_seed: int | None = None,
    count_stddev: float | None = None,
    target_quantile: float = 0.5,
    clip_learning_rate: float = 0.2,
) -> tuple[StateDict, RoundFigures]:
    """One DP-FedAvg round over the stream ``updates``; adaptive when ``count_stddev`` is given.

    Returns the new global weights and what the round did.  The noise std on the
    *sum* of clipped deltas is ``z C`` (fixed) or ``z_Delta C`` (adaptive).
    """
    names = private_names(global_weights)
    sums = {n: torch.zeros(global_weights[n].shape, dtype=torch.float64, device=global_weights[n].device)
            for n in names}
    int_names = [n for n in global_weights if n not in sums]
    int_sums = {n: torch.zeros(global_weights[n].shape, dtype=torch.float64) for n in int_names}
    clients = unclipped = 0
    for update in updates:
        check_update_matches(update, global_weights)
        delta = delta_of(update.weights, global_weights)
        norm, _ = clip_delta_(delta, clip_norm)
        unclipped += norm <= clip_norm
        for n in names:
            sums[n].add_(delta.pop(n))
        for n in int_names:
            int_sums[n].add_(update.weights[n].detach().to(torch.float64).cpu())
        clients += 1
        del update, delta  # let the consumed update be freed while the next one arrives
    if clients == 0:
        raise EmptyRoundError("no client update to aggregate in this round")

    adaptive = count_stddev is not None
    z_update = update_noise_multiplier(noise_multiplier, count_stddev) if adaptive else noise_multiplier
    std = z_update * clip_norm
    add_gaussian_noise_(sums, std, noise_generator(noise_seed, round_number, "update"), names)
    m = expected_clients if denominator == "expected" else clients
    for s in sums.values():
        s.div_(m)
    result = apply_delta(global_weights, sums)
    if integer_buffers == "mean":
        for n in int_names:
            result[n] = cast_back(int_sums[n].div_(clients), global_weights[n]).to(global_weights[n].device)

    following = clip_norm
    if adaptive:
        noised = (unclipped + gaussian(count_stddev, noise_generator(noise_seed, round_number, "count"))) / m
        following = next_clip_norm(clip_norm, noised, target_quantile, clip_learning_rate)
    figures = RoundFigures(clients, int(unclipped), clip_norm, std, following)
    log.info("round %d: %d update(s), %d within the clip norm %.4g; noise std %.4g on the sum; next clip norm %.4g",
             round_number, clients, unclipped, clip_norm, std, following)
    return result, figures


def _common(config: Mapping[str, Any]) -> dict:
    clipping = _choice(config, "clipping", ("server", "client"))
    return {
        "noise_multiplier": number(config, "noise_multiplier", 1.0, low=0.0),
        "denominator": _choice(config, "denominator", ("expected", "actual")),
        "expected_clients": int(number(config, "expected_clients", 1, low=1, integer=True)),
        "integer_buffers": _choice(config, "integer_buffers", ("keep", "mean")),
        "noise_seed": _seed(config),
        "clipping": clipping,
    }


class DPFedAvg:
    """``aggregator=dp_fedavg``: fixed clip norm ``clip_norm``."""

    parameters = FIXED

    def settings(self, config: Mapping[str, Any]) -> dict:
        check_keys(config, self.parameters)
        return {**_common(config), "clip_norm": number(config, "clip_norm", 1.0, low=0.0, low_open=True)}

    @hookimpl
    def fedplug_aggregate(self, global_weights: StateDict, updates: Iterable[ClientUpdate], round_number: int,
                          config: Mapping[str, Any], state: dict) -> StateDict:
        """Called by the server once per round, in its aggregation worker thread."""
        s = self.settings(config)
        result, _ = dp_fedavg_round(global_weights, updates, clip_norm=s["clip_norm"],
                                    noise_multiplier=s["noise_multiplier"], round_number=round_number,
                                    expected_clients=s["expected_clients"], denominator=s["denominator"],
                                    integer_buffers=s["integer_buffers"], noise_seed=s["noise_seed"])
        return result

    @hookimpl
    def fedplug_aggregator_round_settings(self, round_number: int, config: Mapping[str, Any]):
        """With ``clipping: client``, ask each client to clip its own delta (update filter ``dp_clip``)."""
        s = self.settings(config)
        if s["clipping"] != "client":
            return None
        return {"update_filter": {"name": "dp_clip", "clip_norm": s["clip_norm"]}}

    @hookimpl
    def fedplug_aggregator_privacy(self, round_number: int, config: Mapping[str, Any]) -> PrivacyMechanism:
        s = self.settings(config)
        return PrivacyMechanism("central", s["noise_multiplier"], clip_norm=s["clip_norm"])


class DPFedAvgAdaptive(DPFedAvg):
    """``aggregator=dp_fedavg_adaptive``: the clip norm tracks ``target_quantile`` of the update norms."""

    parameters = ADAPTIVE

    def settings(self, config: Mapping[str, Any]) -> dict:
        check_keys(config, self.parameters)
        s = _common(config)
        if s["clipping"] != "server":
            raise ValueError("aggregator.clipping=client is not available with dp_fedavg_adaptive: the clients "
                             "would need each round's clip norm; use clipping=server, or dp_fedavg for client-side "
                             "clipping with a fixed clip_norm")
        stddev = config.get("clipped_count_stddev")
        s.update(
            initial_clip_norm=number(config, "initial_clip_norm", 0.1, low=0.0, low_open=True),
            target_quantile=number(config, "target_quantile", 0.5, low=0.0, high=1.0),
            clip_learning_rate=number(config, "clip_learning_rate", 0.2, low=0.0),
            clipped_count_stddev=(max(s["expected_clients"] / 20.0, s["noise_multiplier"]) if stddev is None else
                                  number(config, "clipped_count_stddev", 1.0, low=0.0, low_open=True)),
        )
        update_noise_multiplier(s["noise_multiplier"], s["clipped_count_stddev"])  # refuse z >= 2 sigma_b now
        return s

    @hookimpl
    def fedplug_aggregate(self, global_weights: StateDict, updates: Iterable[ClientUpdate], round_number: int,
                          config: Mapping[str, Any], state: dict) -> StateDict:
        """Called by the server once per round; reads and advances ``state["dp/clip_norm"]``."""
        s = self.settings(config)
        clip = float(state.get(CLIP_STATE_KEY, s["initial_clip_norm"]))
        if not (clip > 0 and math.isfinite(clip)):
            raise ValueError(f"aggregator state {CLIP_STATE_KEY!r} is {clip!r}; resume from a matching run or "
                             "start without run.resume")
        result, figures = dp_fedavg_round(
            global_weights, updates, clip_norm=clip, noise_multiplier=s["noise_multiplier"],
            round_number=round_number, expected_clients=s["expected_clients"], denominator=s["denominator"],
            integer_buffers=s["integer_buffers"], noise_seed=s["noise_seed"],
            count_stddev=s["clipped_count_stddev"], target_quantile=s["target_quantile"],
            clip_learning_rate=s["clip_learning_rate"])
        state[CLIP_STATE_KEY] = float(figures.next_clip_norm)
        return result

    @hookimpl
    def fedplug_aggregator_round_settings(self, round_number: int, config: Mapping[str, Any]):
        self.settings(config)
        return None

    @hookimpl
    def fedplug_aggregator_privacy(self, round_number: int, config: Mapping[str, Any]) -> PrivacyMechanism:
        s = self.settings(config)
        return PrivacyMechanism("central", s["noise_multiplier"], clip_norm=None)


dp_fedavg = DPFedAvg()
dp_fedavg_adaptive = DPFedAvgAdaptive()
