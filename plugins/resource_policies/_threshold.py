"""The original benchmark's selection rule, shared by the load-based policies.

A client qualifies when its reported load is below ``threshold``; the round
starts when *more than* ``min_fraction`` of the contacted clients qualify
(the original: more than half), with the qualifying clients only.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from fedplug.types import ResourceDecision, ResourceReport


def select_below_threshold(
    reports: Mapping[str, ResourceReport],
    contacted: Sequence[str],
    config: Mapping[str, Any],
) -> ResourceDecision:
    threshold = float(config.get("threshold", 0.4))
    min_fraction = float(config.get("min_fraction", 0.5))
    qualified = tuple(
        cid for cid in contacted if cid in reports and float(reports[cid].load) < threshold
    )
    proceed = len(contacted) > 0 and len(qualified) > min_fraction * len(contacted)
    loads = ", ".join(f"{cid}={reports[cid].load:.2f}" for cid in contacted if cid in reports)
    missing = [cid for cid in contacted if cid not in reports]
    reason = (
        f"{len(qualified)}/{len(contacted)} contacted clients below load {threshold:g} "
        f"(need more than {min_fraction:g} of them); loads: {loads or 'none'}"
        + (f"; no answer from {', '.join(missing)}" if missing else "")
    )
    return ResourceDecision(selected=qualified, proceed=proceed, reason=reason)
