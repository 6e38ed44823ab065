"""fedplug's hook contract suites, run over this package's plugins (installed: found by entry point)."""

import csv

import pytest
import torch

from fedplug.testing import AggregatorContract, ObserverContract, simulate_run

pytest_plugins = ["fedplug.testing.plugin"]

torch.set_num_threads(1)


@pytest.mark.parametrize("aggregator_name", ["fedavg_clipped"])
class TestFedAvgClipped(AggregatorContract):
    """Default config (max_norm 10): the suite's updates are within it, so agreement is a fixed point."""


@pytest.mark.parametrize("aggregator_name", ["fedavg_clipped"])
class TestFedAvgClippedEverythingClipped(AggregatorContract):
    """A bound far below the updates' norms: the result moves towards the clients, but not all the way."""

    consensus_is_fixed_point = False

    @pytest.fixture
    def aggregator_config(self):
        return {"name": "fedavg_clipped", "max_norm": 0.05, "server_lr": 1.0}


@pytest.mark.parametrize("observer_name", ["model_drift"])
class TestModelDrift(ObserverContract):
    def test_writes_one_row_per_round(self, observer_manager, observer_run_dir, observer_run_config):
        simulate_run(observer_manager.hook, observer_run_dir, observer_run_config, rounds=3)
        with (observer_run_dir / "model_drift.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert [int(r["round"]) for r in rows] == [1, 2, 3]
        assert all(float(r["l2_change"]) > 0 for r in rows)
