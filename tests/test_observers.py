"""The built-in ``plots`` observer draws the learning curves of a run."""

import asyncio

from fedplug_plugins.observers.plots import PlotsObserver
from scripted import compose_cfg, run_scripted_federation, toy_plugins


def test_plots_observer_draws_the_curves_every_round(tmp_path):
    cfg = compose_cfg("run.rounds=2", "run.min_clients=2", "run.clients_per_round=2", "run.num_clients=2")
    observer = PlotsObserver()
    status, server, _ = asyncio.run(run_scripted_federation(cfg, tmp_path, {"a": "good", "b": "good"},
                                                            plugins=toy_plugins(observer=observer)))
    png = tmp_path / "plots" / "metrics.png"
    assert status == 0 and png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r.round_number for r in observer.records] == [1, 2]
    assert not list((tmp_path / "plots").glob("*.tmp.png"))
