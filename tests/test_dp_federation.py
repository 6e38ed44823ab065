"""Differential privacy in a run: epsilon per round in the metrics, the budget stop, resuming.

The real server over real sockets with scripted clients (no training): the
DP aggregator's rounds are accounted by opacus, ``metrics.csv`` has an
``epsilon`` column, and ``privacy.max_epsilon`` ends the run cleanly before a
round that would exceed it, with that last round evaluated and STOP sent.
"""

import asyncio
import csv
import json

import pytest
from opacus.accountants import RDPAccountant

import scripted
from fedplug import protocol as P
from fedplug.server import RunFailed
from scripted import compose_cfg, run_scripted_federation, toy_plugins

DP = ("aggregator=dp_fedavg", "aggregator.noise_multiplier=1.0", "aggregator.clip_norm=0.5",
      "aggregator.noise_seed=5", "run.min_clients=2", "run.clients_per_round=2", "run.num_clients=2")


def _rdp(rounds: int, z: float = 1.0, q: float = 1.0, delta: float = 1e-5) -> float:
    acc = RDPAccountant()
    acc.history = [(z, q, rounds)]
    return acc.get_epsilon(delta=delta)


def _run(cfg, run_dir, behaviours, aggregator="dp_fedavg"):
    return asyncio.run(run_scripted_federation(cfg, run_dir, behaviours, plugins=toy_plugins(aggregator=aggregator)))


def test_epsilon_is_in_every_rounds_metrics_and_the_budget_ends_the_run(tmp_path):
    # z = 1, q = 1, delta 1e-5: epsilon is 4.73, 7.08, 9.01, 10.73 after rounds 1-4; a budget of 10 allows 3
    cfg = compose_cfg(*DP, "run.rounds=8", "run.eval_every=5", "privacy.max_epsilon=10")
    status, server, clients = _run(cfg, tmp_path, {"a": "good", "b": "good"})
    assert status == 0
    assert [r.round_number for r in server.history] == [1, 2, 3]
    for r in server.history:
        assert r.extra["epsilon"] == pytest.approx(_rdp(r.round_number))
        assert r.extra["delta"] == 1e-5 and r.extra["dp_noise_multiplier"] == 1.0
    assert server.history[-1].extra["epsilon"] <= 10 < _rdp(4)
    # the last round is evaluated although eval_every=5, and its stop_and_eval carried STOP
    assert server.history[-1].map50 is not None and server.history[0].map50 is None
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    stops = [e for e in events if e["event"] == "stop_and_eval" and e.get("STOP")]
    assert {e["round"] for e in stops} == {3}
    finished = [e for e in events if e["event"] == "run_finished"]
    assert finished and all(c.finished.is_set() for c in clients.values())
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [float(r["epsilon"]) for r in rows] == pytest.approx([_rdp(k) for k in (1, 2, 3)])
    jsonl = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert jsonl[-1]["extra"]["epsilon"] == pytest.approx(_rdp(3))
    # the dashboard's round rows (live page and snapshot) carry it too
    from fedplug.dashboard.snapshot import round_row

    assert round_row(server.history[-1])["epsilon"] == pytest.approx(_rdp(3))
    assert round_row(jsonl[0])["epsilon"] == pytest.approx(_rdp(1))


def test_the_reason_of_a_budget_stop_reaches_the_clients(tmp_path):
    cfg = compose_cfg(*DP, "run.rounds=8", "privacy.max_epsilon=8")
    reasons = []

    original = scripted.ScriptedClient.__init__

    def spy(self, *a, **kw):
        original(self, *a, **kw)

        @self.sio.on(P.RUN_FINISHED)
        async def run_finished(data):
            reasons.append(data["reason"])
            self.finished.set()

    scripted.ScriptedClient.__init__ = spy
    try:
        status, server, _ = _run(cfg, tmp_path, {"a": "good", "b": "good"})
    finally:
        scripted.ScriptedClient.__init__ = original
    assert status == 0 and len(server.history) == 2
    assert reasons and all("privacy budget" in r and "privacy.max_epsilon=8" in r for r in reasons)


def test_resuming_counts_the_rounds_already_spent(tmp_path):
    first = tmp_path / "first"
    status, _, _ = _run(compose_cfg(*DP, "run.rounds=2"), first, {"a": "good", "b": "good"})
    assert status == 0
    cfg = compose_cfg(*DP, "run.rounds=6", f"run.resume={first}", "privacy.max_epsilon=10")
    status, server, _ = _run(cfg, tmp_path / "second", {"a": "good", "b": "good"})
    assert status == 0
    assert [r.round_number for r in server.history] == [1, 2, 3]  # rounds 1-2 resumed, 3 fits, 4 would not
    assert server.history[-1].extra["epsilon"] == pytest.approx(_rdp(3))


def test_a_budget_without_a_dp_aggregator_is_refused_at_start_up(tmp_path):
    from fedplug.server import FederationServer

    cfg = compose_cfg("run.rounds=2", "privacy.max_epsilon=3")
    with pytest.raises(RunFailed, match="privacy.max_epsilon=3 is set, but aggregator 'fedavg' adds no"):
        FederationServer(cfg, toy_plugins(), ("car",), tmp_path, echo=lambda *a: None)
    cfg = compose_cfg(*DP, "run.rounds=2", "privacy.max_epsilon=1")
    with pytest.raises(RunFailed, match="does not allow round 1"):
        FederationServer(cfg, toy_plugins(aggregator="dp_fedavg"), ("car",), tmp_path / "b", echo=lambda *a: None)
