"""Per-client update norms, handed from the ``fedavg_clipped`` aggregator to the ``model_drift`` observer.

Both plugins run in the server process: the aggregator in the server's
aggregation worker thread, the observer's ``fedplug_round_end`` afterwards.
Observers are not shown the clients' weights, so the aggregator, which measures
each update's norm anyway, leaves the figures here for the observer to take.
With another aggregator nothing is published and the observer writes only the
global figures.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class ClientNorm:
    client_id: str
    delta_l2: float  # ||w^k - w|| before clipping
    clip_factor: float  # 1.0 when the update was within max_norm


_lock = threading.Lock()
_by_round: dict[int, list[ClientNorm]] = {}
_KEEP_ROUNDS = 8  # rounds never taken (no observer installed) are dropped after this many


def publish(round_number: int, client_id: str, delta_l2: float, clip_factor: float) -> None:
    with _lock:
        _by_round.setdefault(round_number, []).append(ClientNorm(client_id, delta_l2, clip_factor))
        for old in sorted(_by_round)[:-_KEEP_ROUNDS]:
            del _by_round[old]


def take(round_number: int) -> list[ClientNorm]:
    """The norms published for ``round_number`` (removed), one per client; empty if none.

    A round the server retried may have been aggregated twice: a client's
    latest figure wins.
    """
    with _lock:
        latest = {n.client_id: n for n in _by_round.pop(round_number, [])}
    return list(latest.values())


def clear() -> None:
    with _lock:
        _by_round.clear()
