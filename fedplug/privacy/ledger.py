"""The server's privacy bookkeeping: epsilon in each round's metrics, and the budget stop.

The selected aggregator says which differentially private release it makes in
a round (``fedplug_aggregator_privacy`` -> :class:`~fedplug.types.PrivacyMechanism`);
the ledger composes the rounds so far with opacus' accountant
(:mod:`fedplug.privacy.accountant`) and answers three questions for the server
(``fedplug/server.py``):

* :meth:`PrivacyLedger.spend` -- after a round succeeded: the figures that go
  into its ``RoundRecord.extra`` (``epsilon``, ``delta``, ``dp_noise_multiplier``,
  ``dp_sample_rate``), hence into ``metrics.jsonl``, ``metrics.csv``'s
  ``epsilon`` column and the dashboard;
* :meth:`PrivacyLedger.is_last` -- before a round: will the round after it
  exceed ``privacy.max_epsilon``?  Then this round is the run's last: it is
  evaluated and its ``stop_and_eval`` carries ``STOP``;
* :meth:`PrivacyLedger.exhausted` -- after a round: the reason the run stops
  here, or None.

Resuming rebuilds the ledger from the history's ``dp_*`` figures, so the
budget counts the rounds of the run being resumed.  Config: the ``privacy``
section of ``conf/config.yaml`` (``accountant``, ``delta``, ``max_epsilon``,
``sample_rate``).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from fedplug.privacy.accountant import ACCOUNTANTS, epsilon
from fedplug.types import PrivacyMechanism, RoundRecord


def _is_mechanism(result: Any) -> str | None:
    if result is None or isinstance(result, PrivacyMechanism):
        return None
    return f"returned {type(result).__name__}, expected fedplug.types.PrivacyMechanism or None"


def _number(cfg: Mapping[str, Any], key: str, default: Any, low: float, high: float, *, low_open: bool = True,
            nullable: bool = False) -> float | None:
    value = cfg.get(key, default)
    if value is None and nullable:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and (value > low if low_open else value >= low) and value <= high
    if not ok:
        wanted = f"a number in {'(' if low_open else '['}{low:g}, {high:g}]" + (" or null" if nullable else "")
        raise ValueError(f"privacy.{key} must be {wanted}, got {value!r}; set it with privacy.{key}=<value>")
    return float(value)


class PrivacyLedger:
    """One run's spent privacy; built by the server at start-up (after a resume), used once per round."""

    def __init__(self, privacy_cfg: Mapping[str, Any] | None, plugins: Any, aggregator_cfg: Mapping[str, Any],
                 history: Sequence[RoundRecord] = (), first_round: int = 1, last_round: int | None = None):
        from fedplug.server_hooks import call

        cfg = dict(privacy_cfg or {})
        unknown = sorted(set(cfg) - {"accountant", "delta", "max_epsilon", "sample_rate"})
        if unknown:
            raise ValueError(f"privacy has no setting {', '.join('privacy.' + k for k in unknown)}; its settings are "
                             "accountant, delta, max_epsilon, sample_rate")
        self.accountant = str(cfg.get("accountant", "rdp"))
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"privacy.accountant must be one of {', '.join(ACCOUNTANTS)}, got {self.accountant!r}")
        self.delta = _number(cfg, "delta", 1e-5, 0.0, 1.0)
        self.max_epsilon = _number(cfg, "max_epsilon", None, 0.0, math.inf, nullable=True)
        self.sample_rate = _number(cfg, "sample_rate", 1.0, 0.0, 1.0)
        self._call = lambda rnd: call(plugins, "aggregator", "fedplug_aggregator_privacy", _is_mechanism,
                                      round_number=rnd, config=dict(aggregator_cfg))
        self.aggregator = str(aggregator_cfg.get("name", "?"))
        self.last_round = last_round
        # (noise multiplier, sample rate) of every round spent so far, from the resumed history
        self.rounds: list[tuple[float, float]] = [
            (float(r.extra["dp_noise_multiplier"]), float(r.extra["dp_sample_rate"]))
            for r in history if "dp_noise_multiplier" in r.extra]
        first = self.mechanism(first_round)
        if first is None:
            if self.max_epsilon is not None:
                raise ValueError(f"privacy.max_epsilon={self.max_epsilon:g} is set, but aggregator {self.aggregator!r} "
                                 "adds no differential-privacy noise; choose aggregator=dp_fedavg, dp_fedavg_adaptive "
                                 "or ldp_fedavg, or unset privacy.max_epsilon")
            return
        if self.max_epsilon is not None:
            after = self.epsilon_with([first])
            if after > self.max_epsilon:
                raise ValueError(f"privacy.max_epsilon={self.max_epsilon:g} does not allow round {first_round}: "
                                 f"epsilon would be {after:.4g} after it (delta {self.delta:g}); raise "
                                 "aggregator.noise_multiplier or privacy.max_epsilon")

    def mechanism(self, rnd: int) -> PrivacyMechanism | None:
        return self._call(rnd)

    def _entry(self, mech: PrivacyMechanism) -> tuple[float, float]:
        return float(mech.noise_multiplier), float(mech.sample_rate if mech.sample_rate is not None
                                                   else self.sample_rate)

    def epsilon_with(self, extra_rounds: Sequence[PrivacyMechanism] = ()) -> float:
        """epsilon after the rounds spent so far plus ``extra_rounds``."""
        return epsilon(self.rounds + [self._entry(m) for m in extra_rounds], self.delta, self.accountant)

    def spend(self, rnd: int) -> dict[str, float]:
        """Record round ``rnd`` as spent; its figures for ``RoundRecord.extra`` (empty without DP)."""
        mech = self.mechanism(rnd)
        if mech is None:
            return {}
        z, q = self._entry(mech)
        self.rounds.append((z, q))
        eps = epsilon(self.rounds, self.delta, self.accountant)
        return {"epsilon": eps, "delta": self.delta, "dp_noise_multiplier": z, "dp_sample_rate": q}

    def _next_exceeds(self, spent_extra: Sequence[PrivacyMechanism], next_round: int) -> float | None:
        """epsilon after the next round when that exceeds the budget, else None."""
        if self.max_epsilon is None or (self.last_round is not None and next_round > self.last_round):
            return None
        following = self.mechanism(next_round)
        if following is None:
            return None
        after = self.epsilon_with([*spent_extra, following])
        return after if after > self.max_epsilon else None

    def is_last(self, rnd: int) -> bool:
        """Before round ``rnd``: True when the round after it would exceed ``privacy.max_epsilon``."""
        mech = self.mechanism(rnd)
        return mech is not None and self._next_exceeds([mech], rnd + 1) is not None

    def exhausted(self, rnd: int) -> str | None:
        """After round ``rnd`` was spent: why the run stops here (the budget), or None."""
        after = self._next_exceeds([], rnd + 1)
        if after is None:
            return None
        spent = epsilon(self.rounds, self.delta, self.accountant)
        return (f"privacy budget: epsilon {spent:.4g} spent after round {rnd}; round {rnd + 1} would bring it to "
                f"{after:.4g} > privacy.max_epsilon={self.max_epsilon:g} (delta {self.delta:g})")
