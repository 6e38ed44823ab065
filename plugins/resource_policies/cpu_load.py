"""``cpu_load``: the original benchmark's resource check on CPU utilisation.

Clients report their machine's CPU utilisation over a short window, normalised
to 0–1 (``psutil.cpu_percent`` averaged over all cores / 100).  The server
keeps the clients below ``threshold`` (0.4 by default) and starts the round
when more than half of the contacted clients qualify.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import psutil

from fedplug.hooks import hookimpl
from fedplug.types import ResourceDecision, ResourceReport
from fedplug_plugins.resource_policies._threshold import select_below_threshold


@hookimpl
def fedplug_measure_resources(config: Mapping[str, Any]) -> ResourceReport:
    window = float(config.get("sample_seconds", 0.5))
    percent = psutil.cpu_percent(interval=window)
    load = min(max(percent / 100.0, 0.0), 1.0)
    return ResourceReport(
        load=load,
        kind="cpu",
        details={"cpu_percent": float(percent), "cpu_count": float(psutil.cpu_count() or 1)},
    )


@hookimpl
def fedplug_select_clients(
    reports: Mapping[str, ResourceReport], contacted: Sequence[str], config: Mapping[str, Any]
) -> ResourceDecision:
    return select_below_threshold(reports, contacted, config)
