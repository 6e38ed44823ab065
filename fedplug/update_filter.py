"""Client side: the update filter a round's settings ask for, applied between training and sending.

An update filter (role ``update_filter``, entry-point group
``fedplug.update_filters``, hook ``fedplug_filter_update``) transforms a
client's :class:`~fedplug.types.TrainResult` before it leaves the site: the
built-in ``dp_clip`` clips the update's change to an L2 bound (DP-FedAvg with
client-side clipping) and ``dp_local`` clips and adds Gaussian noise (local
differential privacy).  Which filter runs is the *aggregator's* decision: its
``fedplug_aggregator_round_settings`` returns ``{"update_filter": {"name":
<filter>, ...its settings}}``, which reaches the client in ``request_update``'s
settings (``TrainSettings.extra["update_filter"]``).  The server stays the one
source of truth for what is applied, and the mechanism the server accounts
for (``fedplug_aggregator_privacy``) is the one the clients run.

Called by the client (``FederationClient._train``, worker thread) after every
successful ``fedplug_train_round`` and before the weights are encoded.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from fedplug.plugins import PluginError, activate
from fedplug.types import StateDict, TrainResult, TrainSettings

log = logging.getLogger("fedplug.update_filter")

SETTINGS_KEY = "update_filter"


def requested_filter(settings: TrainSettings) -> Mapping[str, Any] | None:
    """The filter config the round's settings carry, or None; a malformed one is an error naming the key."""
    spec = settings.extra.get(SETTINGS_KEY) if settings.extra else None
    if spec is None:
        return None
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
        raise ValueError(f"the round's settings carry {SETTINGS_KEY}={spec!r}; it must be a mapping with a 'name' "
                         "(the update filter plugin), sent by the aggregator's fedplug_aggregator_round_settings")
    return spec


def apply_update_filter(result: TrainResult, global_weights: StateDict, settings: TrainSettings) -> TrainResult:
    """``result`` through the filter the settings name (unchanged when they name none).

    Raises the client's ``HookFailed`` (naming the filter and its package) when
    the filter cannot be loaded, raises, or returns something else than a
    ``TrainResult`` with weights of the model's layout: the client then reports
    a failed round instead of sending an unfiltered update.
    """
    from fedplug.client import HookFailed  # the client's failed-round signal (lazy: client imports us)

    spec = requested_filter(settings)
    if spec is None:
        return result
    name = spec["name"]
    try:
        plugins = activate({"update_filter": name}, observers=False)
    except PluginError as exc:
        raise HookFailed(f"the aggregator asked for update filter {name!r}, which cannot be used here: {exc}") \
            from None
    who = f"update_filter {plugins.selected['update_filter'].describe()}"
    try:
        filtered = plugins.hook.fedplug_filter_update(result=result, global_weights=global_weights,
                                                      settings=settings, config=dict(spec))
    except Exception as exc:
        log.exception("%s failed in fedplug_filter_update", who)
        raise HookFailed(f"{who} raised {type(exc).__name__} in fedplug_filter_update: {exc}") from exc
    if not isinstance(filtered, TrainResult) or filtered.weights is None \
            or set(filtered.weights) != set(result.weights or {}):
        raise HookFailed(f"{who} returned {type(filtered).__name__} from fedplug_filter_update, expected a "
                         "fedplug.types.TrainResult with weights of the model's layout")
    return filtered
