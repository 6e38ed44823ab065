"""(epsilon, delta) of a sequence of rounds, from opacus' accountants (never hand-written).

Each federated round is one application of the (subsampled) Gaussian mechanism
with noise multiplier ``z`` (noise std / L2 sensitivity) and sampling rate
``q``.  fedplug hands the rounds to opacus -- ``RDPAccountant`` (Renyi DP,
Mironov 2017; the analysis of Abadi et al.'s moments accountant) or
``PRVAccountant`` (Gopi et al. 2021, numerical composition) -- and reports the
epsilon they return for the configured delta.

Called by :class:`fedplug.privacy.ledger.PrivacyLedger` on the server after
every round and when it checks whether the next round fits the budget;
tests compare its figures with opacus' own for the same parameters.
"""

from __future__ import annotations

import functools
from typing import Sequence

ACCOUNTANTS = ("rdp", "prv")


def _compress(rounds: Sequence[tuple[float, float]]) -> list[tuple[float, float, int]]:
    """``[(z, q), ...]`` as opacus' history: consecutive equal rounds become one entry with a step count."""
    history: list[tuple[float, float, int]] = []
    for z, q in rounds:
        if history and history[-1][0] == z and history[-1][1] == q:
            history[-1] = (z, q, history[-1][2] + 1)
        else:
            history.append((float(z), float(q), 1))
    return history


def epsilon(rounds: Sequence[tuple[float, float]], delta: float, accountant: str = "rdp") -> float:
    """epsilon spent after ``rounds`` (each ``(noise_multiplier, sample_rate)``) at ``delta``.

    ``inf`` when a round had no noise (``z == 0``) and ``0.0`` for no rounds.
    """
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"privacy.accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")
    if not rounds:
        return 0.0
    if any(z <= 0 for z, _ in rounds):
        return float("inf")
    return _epsilon_of_history(tuple(_compress(rounds)), float(delta), accountant)


@functools.lru_cache(maxsize=256)
def _epsilon_of_history(history: tuple, delta: float, accountant: str) -> float:
    """Cached: the server asks for the same history twice per round (is the next round affordable; spend)."""
    try:
        from opacus.accountants import PRVAccountant, RDPAccountant
    except ImportError:  # pragma: no cover - opacus is a dependency; a broken install gets this line
        raise RuntimeError("differential privacy needs opacus: pip install 'fedplug[privacy]'") from None
    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))
