"""Client-side differential-privacy filters: ``dp_clip`` (clip) and ``dp_local`` (clip and noise).

Both work on the round's *delta* ``Delta = w^k - w_t`` over every floating
tensor (``fedplug/privacy/clipping.py``) and send ``w_t + filtered Delta``;
integer buffers (``num_batches_tracked``) are reset to the global value, as
they would reveal the number of local batches.

* ``dp_clip`` -- ``Delta * min(1, C / ||Delta||)``: DP-FedAvg with client-side
  clipping (``aggregator=dp_fedavg aggregator.clipping=client``), the form
  secure aggregation needs, since the server cannot clip masked updates.
* ``dp_local`` -- clip, then add ``N(0, (z C)^2)`` to every coordinate: local
  DP (``aggregator=ldp_fedavg``).  Each update the client sends is a Gaussian
  mechanism with noise multiplier ``z`` against anyone who reads it, the
  server included.

Config (from the aggregator, via ``request_update``'s settings): ``clip_norm``
(C > 0), and for ``dp_local`` ``noise_multiplier`` (z >= 0) and ``noise_seed``
(tests only; null: the noise is seeded from ``os.urandom``).

Called by the client through ``fedplug_filter_update``, after training.
Entry points ``dp_clip`` and ``dp_local`` (objects of this module).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Mapping

from fedplug.hooks import hookimpl
from fedplug.privacy.clipping import apply_delta, clip_delta_, delta_of
from fedplug.privacy.noise import add_gaussian_noise_, noise_generator
from fedplug.types import StateDict, TrainResult, TrainSettings


def _positive(config: Mapping[str, Any], key: str, *, allow_zero: bool = False) -> float:
    value = config.get(key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok or value != value or value == float("inf"):
        raise ValueError(f"update filter {config.get('name')!r} needs {key} a finite number "
                         f"{'>= 0' if allow_zero else '> 0'}, got {value!r} (it comes from the aggregator's settings)")
    return float(value)


class ClipFilter:
    """``dp_clip``: clip the update's change to ``clip_norm``."""

    noisy = False

    @hookimpl
    def fedplug_filter_update(self, result: TrainResult, global_weights: StateDict, settings: TrainSettings,
                              config: Mapping[str, Any]) -> TrainResult:
        clip = _positive(config, "clip_norm")
        delta = delta_of(result.weights, global_weights)
        norm, factor = clip_delta_(delta, clip)
        if self.noisy:
            z = _positive(config, "noise_multiplier", allow_zero=True)
            seed = config.get("noise_seed")
            # a seeded (test) run still gives each client its own noise: mix in what differs between clients
            stream = "local/" + hashlib.sha256(f"{result.num_examples}/{result.train_loss!r}".encode()).hexdigest()
            add_gaussian_noise_(delta, z * clip, noise_generator(seed, settings.round_number, stream))
        return dataclasses.replace(result, weights=apply_delta(global_weights, delta))


class LocalDPFilter(ClipFilter):
    """``dp_local``: clip, then add Gaussian noise of std ``noise_multiplier * clip_norm``."""

    noisy = True


dp_clip = ClipFilter()
dp_local = LocalDPFilter()
