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


class BrokenObserver:
    from fedplug.hooks import hookimpl

    @hookimpl
    def fedplug_round_end(self, record, global_weights, previous_weights):
        raise RuntimeError("observer bug")

    @hookimpl
    def fedplug_run_start(self, config, run_dir):
        raise ValueError("another observer bug")


def test_an_observer_that_raises_never_ends_the_run(tmp_path):
    cfg = compose_cfg("run.rounds=2", "run.min_clients=1", "run.clients_per_round=1", "run.num_clients=1")
    plugins = toy_plugins(observer=BrokenObserver())
    plots = PlotsObserver()
    plugins.pm.register(plots, name="observer:plots")
    status, server, _ = asyncio.run(run_scripted_federation(cfg, tmp_path, {"a": "good"}, plugins=plugins))
    assert status == 0 and len(server.history) == 2
    assert [r.round_number for r in plots.records] == [1, 2]  # the other observer still saw every round
