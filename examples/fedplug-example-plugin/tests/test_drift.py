"""model_drift: the figures it writes, checked against an independent computation."""

import csv
import math

import torch

from fedplug import plugins
from fedplug.testing.data import make_updates, perturbed, sample_state_dict
from fedplug.types import RoundRecord
from fedplug_example import clipped, drift

torch.set_num_threads(1)


def observer():
    pm = plugins.new_manager()
    _, module = plugins.load_plugin("observer", "model_drift")
    plugins.register_object(pm, "observer", "model_drift", module)
    return pm.hook


def rows(path):
    with path.open() as f:
        return list(csv.DictReader(f))


def test_global_figures(tmp_path):
    hook = observer()
    hook.fedplug_run_start(config={}, run_dir=tmp_path)
    prev = sample_state_dict(0)
    new = perturbed(prev, seed=1)
    record = RoundRecord(round_number=1, participants=("a", "b"), train_loss=0.5)
    hook.fedplug_round_end(record=record, global_weights=new, previous_weights=prev)
    (row,) = rows(tmp_path / "model_drift.csv")
    floats = [k for k in prev if prev[k].is_floating_point()]
    diff = torch.cat([(new[k] - prev[k]).double().flatten() for k in floats])
    base = torch.cat([prev[k].double().flatten() for k in floats])
    assert int(row["participants"]) == 2
    assert math.isclose(float(row["l2_change"]), float(diff.norm()), rel_tol=1e-5)
    assert math.isclose(float(row["relative_change"]), float(diff.norm() / base.norm()), rel_tol=1e-5)
    assert math.isclose(float(row["max_abs_change"]), float(diff.abs().max()), rel_tol=1e-5)
    assert row["clients_clipped"] == "" and row["max_client_delta"] == ""  # not fedavg_clipped
    assert not (tmp_path / "model_drift_clients.csv").exists()


def test_per_client_figures_with_fedavg_clipped(tmp_path):
    hook = observer()
    hook.fedplug_run_start(config={}, run_dir=tmp_path)
    g = sample_state_dict(0)
    updates = make_updates(g, count=3, round_number=1)
    new = clipped.aggregate_clipped(g, iter(updates), max_norm=0.5, round_number=1)
    record = RoundRecord(round_number=1, participants=tuple(u.client_id for u in updates), train_loss=1.0)
    hook.fedplug_round_end(record=record, global_weights=new, previous_weights=g)
    clients = rows(tmp_path / "model_drift_clients.csv")
    assert [c["client_id"] for c in clients] == ["client-0", "client-1", "client-2"]
    clipped_count = sum(float(c["clip_factor"]) < 1.0 for c in clients)
    (row,) = rows(tmp_path / "model_drift.csv")
    assert int(row["clients_clipped"]) == clipped_count > 0
    assert math.isclose(float(row["max_client_delta"]), max(float(c["delta_l2"]) for c in clients), rel_tol=1e-5)


def test_resumed_run_appends(tmp_path):
    hook = observer()
    g = sample_state_dict(0)
    for r in (1, 2):  # two "processes" writing into one run directory
        hook.fedplug_run_start(config={}, run_dir=tmp_path)
        hook.fedplug_round_end(record=RoundRecord(r, ("a",), 1.0), global_weights=perturbed(g, r), previous_weights=g)
        hook.fedplug_run_end(rounds=[], best_round=None, reason="completed")
    assert [int(r["round"]) for r in rows(tmp_path / "model_drift.csv")] == [1, 2]
    assert (tmp_path / "model_drift.csv").read_text().count("round,") == 1


def test_unwritable_run_dir_does_not_stop_the_run(tmp_path, caplog):
    hook = observer()
    missing = tmp_path / "gone"
    hook.fedplug_run_start(config={}, run_dir=missing)
    g = sample_state_dict(0)
    hook.fedplug_round_end(record=RoundRecord(1, ("a",), 1.0), global_weights=perturbed(g, 1), previous_weights=g)
    assert "could not write" in caplog.text
    assert drift.ROUND_FILE == "model_drift.csv"
