"""``always``: no resource check; every contacted client that answered takes part."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from fedplug.hooks import hookimpl
from fedplug.types import ResourceDecision, ResourceReport


@hookimpl
def fedplug_measure_resources(config: Mapping[str, Any]) -> ResourceReport:
    return ResourceReport(load=0.0, kind="none")


@hookimpl
def fedplug_select_clients(
    reports: Mapping[str, ResourceReport], contacted: Sequence[str], config: Mapping[str, Any]
) -> ResourceDecision:
    selected = tuple(cid for cid in contacted if cid in reports)
    return ResourceDecision(selected=selected, proceed=bool(selected), reason="no resource check")
