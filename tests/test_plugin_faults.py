"""Misbehaving plugins at run time: labelled, never a dead process, never a round retried for nothing.

A real server and real :class:`FederationClient` s talk over 127.0.0.1 in one
process; the plugins are small in-process objects with one defect each.
"""

from __future__ import annotations

import asyncio

import pytest

from fedplug.client import FederationClient
from fedplug.hooks import hookimpl
from fedplug.outputs import read_events
from fedplug.plugins import ActivePlugins, PluginInfo, load_plugin, new_manager
from fedplug.server import FederationServer, RunFailed
from fedplug.types import DetectionStats, EvalResult, ResourceDecision, TrainResult
from scripted import ToyDetectorPlugin, compose_cfg

CLASSES = ("car", "person", "sign")
FAKE = PluginInfo("detector", "toy", "toy:Toy", "fedplug-test-plugins", "0.0")


def _stats(hit: bool) -> DetectionStats:
    """One ground-truth car, found (AP 1) or not (AP 0)."""
    stats = DetectionStats.empty(len(CLASSES))
    stats.num_ground_truth[0] = 1
    if hit:
        stats.scores[0].append(0.9)
        stats.true_positive[0].append(True)
    return stats


class ToyTrainer(ToyDetectorPlugin):
    """A detector that trains by nudging weights and reports ``steps``; ``fail_rounds`` raise."""

    def __init__(self, fail_rounds=(), bad_eval=False, hit=True, fail_first=0):
        self.fail_rounds = set(fail_rounds)
        self.fail_first = fail_first  # this many training calls raise, whatever their round
        self.bad_eval = bad_eval
        self.hit = hit

    @hookimpl
    def fedplug_train_round(self, model, dataset, settings, global_weights, state):
        if settings.round_number in self.fail_rounds or self.fail_first > 0:
            self.fail_first -= 1
            raise RuntimeError("CUDA out of memory (simulated)")
        weights = {k: (v + 0.01 if v.is_floating_point() else v.clone()) for k, v in model.state_dict().items()}
        return TrainResult(weights=weights, num_examples=len(dataset), train_loss=0.5,
                           metrics={"steps": 7.0, "lr": 0.01})

    @hookimpl
    def fedplug_evaluate(self, model, dataset, settings):
        if self.bad_eval:
            return {"map50": 0.5}  # a dict, not an EvalResult
        return EvalResult(num_examples=max(1, len(dataset)), loss=0.25, map50=float(self.hit),
                          recall=float(self.hit), stats=_stats(self.hit))


class BrokenPolicy:
    @hookimpl
    def fedplug_measure_resources(self, config):
        raise KeyError("gpu_index")

    @hookimpl
    def fedplug_select_clients(self, reports, contacted, config):
        return ResourceDecision(tuple(contacted), True, "all")


class RecordingFedAvg:
    """FedAvg that remembers each update's metrics (what FedNova-style methods need)."""

    def __init__(self):
        self.seen: list[dict] = []
        _, self.inner = load_plugin("aggregator", "fedavg")

    @hookimpl
    def fedplug_aggregate(self, global_weights, updates, round_number, config, state):
        def tap():
            for u in updates:
                if not u.client_id.startswith("dry-run"):
                    self.seen.append(dict(u.metrics))
                yield u
        return self.inner.fedplug_aggregate(global_weights=global_weights, updates=tap(),
                                            round_number=round_number, config=config, state=state)


def _plugins(detector, aggregator=None, policy=None) -> ActivePlugins:
    pm = new_manager()
    selected = {"detector": FAKE}
    if policy is None:
        info, policy = load_plugin("resource_policy", "always")
        selected["resource_policy"] = info
    pm.register(policy, name="resource_policy:x")
    if aggregator is None:
        info, aggregator = load_plugin("aggregator", "fedavg")
        selected["aggregator"] = info
    pm.register(aggregator, name="aggregator:x")
    pm.register(detector, name="detector:toy")
    return ActivePlugins(pm, selected, [])


@pytest.fixture
def folders(tmp_path):
    from fedplug.data import generate_synthetic_federation

    return generate_synthetic_federation(tmp_path / "data", num_clients=2, train_per_client=2,
                                         test_per_client=1, image_size=64, seed=0)


def _federate(tmp_path, folders, server_plugins, client_detectors, *overrides, held_out=None, policy=None):
    """Run a whole federation; return (server status, client statuses, server, echoed lines)."""
    n = len(client_detectors)
    cfg = compose_cfg(f"run.num_clients={n}", f"run.min_clients={n}", f"run.clients_per_round={n}",
                      "run.rounds=2", "server.round_retries=0", "server.reconnect_grace_s=2", *overrides)
    lines: list[str] = []

    def client_plugins_for(det):
        def make(*args, **kwargs):
            return _plugins(det, policy=policy)
        return make

    async def go():
        server = FederationServer(cfg, server_plugins, CLASSES, tmp_path / "run", echo=lines.append,
                                  held_out=held_out, held_out_source="a held-out set")
        port = await server.start()
        clients = []
        for k, det in enumerate(client_detectors):
            c = FederationClient(f"http://127.0.0.1:{port}", f"site{k}", {"format": "voc", "path": str(folders[k])},
                                 echo=lines.append)
            c.activate_plugins = client_plugins_for(det)
            clients.append(c)
        runs = [asyncio.get_running_loop().create_task(c.run()) for c in clients]
        try:
            status = await asyncio.wait_for(server.run_federation(), 90)
        finally:
            await server.stop()
        codes = [await asyncio.wait_for(r, 30) for r in runs]
        return status, codes, server

    status, codes, server = asyncio.run(go())
    return status, codes, server, lines


def test_a_training_hook_that_raises_fails_that_round_only_and_the_client_stays(tmp_path, folders):
    status, codes, server, lines = _federate(
        tmp_path, folders, _plugins(ToyTrainer()), [ToyTrainer(), ToyTrainer(fail_rounds={1})])
    assert status == 0 and codes == [0, 0]
    assert [r.participants for r in server.history] == [("site0",), ("site0", "site1")]
    failed = [e for e in read_events(tmp_path / "run" / "events.jsonl") if e["event"] == "update_failed"]
    assert len(failed) == 1 and failed[0]["client_id"] == "site1"
    # the reason names the plugin, its package and the hook
    assert "fedplug-test-plugins" in failed[0]["reason"] and "fedplug_train_round" in failed[0]["reason"]
    assert "RuntimeError" in failed[0]["reason"]
    wake_ups = [e for e in read_events(tmp_path / "run" / "events.jsonl") if e["event"] == "client_wake_up"]
    assert len(wake_ups) == 2  # nobody died and came back


def test_an_evaluate_hook_with_a_wrong_return_type_is_reported_not_fatal(tmp_path, folders):
    status, codes, server, lines = _federate(
        tmp_path, folders, _plugins(ToyTrainer()), [ToyTrainer(), ToyTrainer(bad_eval=True)])
    assert status == 0 and codes == [0, 0]
    assert all(r.extra["evaluators"] == 1.0 for r in server.history)
    assert any("returned dict from fedplug_evaluate, expected fedplug.types.EvalResult" in line for line in lines)
    # the round's record says its figures cover only part of the clients' test images
    assert all(r.extra["eval_coverage"] < 1.0 for r in server.history)


def test_a_resource_measurement_that_raises_is_a_full_load_with_its_reason(tmp_path, folders):
    status, codes, server, lines = _federate(
        tmp_path, folders, _plugins(ToyTrainer()), [ToyTrainer(), ToyTrainer()], policy=BrokenPolicy())
    assert status == 0 and codes == [0, 0]
    assert any("could not measure its load" in line and "KeyError" in line and "fedplug_measure_resources" in line
               for line in lines)


def test_aggregators_receive_each_clients_train_metrics(tmp_path, folders):
    aggregator = RecordingFedAvg()
    status, codes, server, _ = _federate(
        tmp_path, folders, _plugins(ToyTrainer(), aggregator=aggregator), [ToyTrainer(), ToyTrainer()])
    assert status == 0
    assert len(aggregator.seen) == 4 and all(m == {"steps": 7.0, "lr": 0.01} for m in aggregator.seen)


class _Held:
    """A held-out 'dataset' the toy detector scores: only its length matters."""

    def __len__(self):
        return 5


@pytest.mark.parametrize("place", ["server", "both"])
def test_the_server_scores_a_held_out_set(tmp_path, folders, place):
    # the server's toy detector finds the car, the clients' does not: the figures show whose they are
    status, codes, server, lines = _federate(
        tmp_path, folders, _plugins(ToyTrainer(hit=True)), [ToyTrainer(hit=False), ToyTrainer(hit=False)],
        f"eval.on={place}", held_out=_Held())
    assert status == 0 and codes == [0, 0]
    events = read_events(tmp_path / "run" / "events.jsonl")
    stop_and_evals = [e for e in events if e["event"] == "stop_and_eval"]
    assert len([e for e in events if e["event"] == "server_eval"]) == 2
    for r in server.history:
        assert r.map50 == 1.0 and r.extra["eval_images"] == 5
        if place == "server":
            assert r.evaluated_by == "server" and "clients_map50" not in r.extra
        else:
            assert r.evaluated_by == "server+clients" and r.extra["clients_map50"] == 0.0
    assert len(stop_and_evals) == (0 if place == "server" else 4)
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",")[-3:] == ["evaluated_by", "eval_images", "eval_coverage"]


def test_eval_on_server_without_a_held_out_set_is_refused_at_start(tmp_path):
    cfg = compose_cfg("eval.on=server")
    with pytest.raises(ValueError, match="eval.on=server needs a held-out test set"):
        FederationServer(cfg, _plugins(ToyTrainer()), CLASSES, tmp_path / "run", echo=lambda *a: None)


class WrongTypeAggregator:
    @hookimpl
    def fedplug_aggregate(self, global_weights, updates, round_number, config, state):
        return [v for v in global_weights.values()]  # a list, not a state dict


class ConfigKeyAggregator:
    @hookimpl
    def fedplug_aggregate(self, global_weights, updates, round_number, config, state):
        return {k: v * config["server_lr"] for k, v in global_weights.items()}


class RaisingPolicy(BrokenPolicy):
    @hookimpl
    def fedplug_select_clients(self, reports, contacted, config):
        return {"selected": list(contacted)}  # a dict, not a ResourceDecision


@pytest.mark.parametrize("plugins, words", [
    (lambda: _plugins(ToyTrainer(), aggregator=WrongTypeAggregator()),
     ["aggregator", "returned list", "fedplug_aggregate"]),
    (lambda: _plugins(ToyTrainer(), aggregator=ConfigKeyAggregator()),
     ["aggregator", "KeyError", "server_lr", "fedplug_aggregate"]),
    (lambda: _plugins(ToyTrainer(), policy=RaisingPolicy()),
     ["resource_policy", "returned dict", "ResourceDecision", "fedplug_select_clients"]),
])
def test_deterministic_server_side_defects_stop_the_run_before_round_1(tmp_path, plugins, words):
    cfg = compose_cfg()
    with pytest.raises(RunFailed) as info:
        FederationServer(cfg, plugins(), CLASSES, tmp_path / "run", echo=lambda *a: None)
    for word in words:
        assert word in str(info.value)


# --------------------------------------------------------------------------- honest outcomes


def test_a_failed_checkpoint_write_ends_the_run_with_the_true_reason_and_no_partial_record(
        tmp_path, folders, monkeypatch):
    from fedplug.outputs import RunOutputs

    real = RunOutputs.save_checkpoint

    def disk_full_in_round_2(self, name, weights, meta):
        if meta["round"] == 2:
            raise OSError(28, "No space left on device")
        return real(self, name, weights, meta)

    monkeypatch.setattr(RunOutputs, "save_checkpoint", disk_full_in_round_2)
    status, codes, server, lines = _federate(
        tmp_path, folders, _plugins(ToyTrainer()), [ToyTrainer(), ToyTrainer()], "run.rounds=3")
    assert status == 1
    told = [line for line in lines if "run finished:" in line]
    assert len(told) == 2 and all("failed" in t and "No space left on device" in t for t in told)
    rows = (tmp_path / "run" / "metrics.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1"]  # no row for the round whose checkpoint failed


def test_a_round_time_includes_its_failed_attempts(tmp_path, folders):
    # the only client fails its first try at round 1 (quorum 1 of 1), the retry succeeds
    status, codes, server, _ = _federate(
        tmp_path, folders, _plugins(ToyTrainer()), [ToyTrainer(fail_first=1)], "server.round_retries=1",
        "server.quorum=1.0")
    assert status == 0 and codes == [0]
    first = server.history[0]
    assert first.extra["attempts"] == 2.0
    events = read_events(tmp_path / "run" / "events.jsonl")
    asked = [e["time"] for e in events if e["event"] == "request_update" and e["round"] == 1]
    answered = [e["time"] for e in events if e["event"] == "client_update" and e["round"] == 1]
    assert len(asked) == 2 and first.seconds >= max(answered) - min(asked)


def test_one_run_per_directory(tmp_path):
    import subprocess
    import sys

    from fedplug.outputs import RunDirBusy, RunDirLock

    run_dir = tmp_path / "run"
    first = RunDirLock(run_dir, None)
    # a second server (another process) is refused while the first holds the directory
    probe = ("import sys; from pathlib import Path; from fedplug.outputs import RunDirLock, RunDirBusy\n"
             "try:\n    RunDirLock(Path(sys.argv[1]), None)\nexcept RunDirBusy as e:\n    print(e); sys.exit(3)")
    proc = subprocess.run([sys.executable, "-c", probe, str(run_dir)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3 and "in use by another fedplug server" in proc.stdout
    (run_dir / "metrics.csv").write_text("round\n1\n")
    (run_dir / "checkpoints").mkdir()
    stale = run_dir / "checkpoints" / ".last.safetensors.abc.tmp"
    stale.write_bytes(b"half")
    first.release()
    # a used directory is refused for a new run ...
    with pytest.raises(RunDirBusy, match="run.resume="):
        RunDirLock(run_dir, None)
    # ... and taken when resuming that very run, which clears the crashed run's temp files
    again = RunDirLock(run_dir, run_dir)
    assert not stale.exists()
    again.release()


class ReadingTrainer(ToyTrainer):
    """Reads every training image, as a real detector does."""

    @hookimpl
    def fedplug_train_round(self, model, dataset, settings, global_weights, state):
        for i in range(len(dataset)):
            dataset[i]
        return super().fedplug_train_round(model=model, dataset=dataset, settings=settings,
                                           global_weights=global_weights, state=state)


class CorruptAfterRound1:
    """An observer that breaks one of site1's JPEGs once round 1 is done (a disk going bad mid-run)."""

    def __init__(self, folder):
        self.folder = folder

    @hookimpl
    def fedplug_round_end(self, record, global_weights, previous_weights):
        if record.round_number == 1:
            for jpg in sorted((self.folder / "JPEGImages").glob("*.jpg")):
                jpg.write_bytes(b"\xff\xd8 not a jpeg any more")


def test_data_that_breaks_mid_run_fails_that_round_and_the_client_stays(tmp_path, folders):
    server_plugins = _plugins(ToyTrainer())
    server_plugins.pm.register(CorruptAfterRound1(folders[1]), name="observer:corrupt")
    status, codes, server, lines = _federate(
        tmp_path, folders, server_plugins, [ReadingTrainer(), ReadingTrainer()], "run.rounds=2")
    assert status == 0 and codes == [0, 0]
    assert [r.participants for r in server.history] == [("site0", "site1"), ("site0",)]
    failed = [e for e in read_events(tmp_path / "run" / "events.jsonl") if e["event"] == "update_failed"]
    assert len(failed) == 1 and failed[0]["client_id"] == "site1" and failed[0]["round"] == 2
    assert "DatasetError" in failed[0]["reason"] and ".jpg" in failed[0]["reason"]


def test_a_run_whose_evaluations_all_fail_does_not_exit_0(tmp_path, folders):
    status, codes, server, lines = _federate(
        tmp_path, folders, _plugins(ToyTrainer()), [ToyTrainer(bad_eval=True), ToyTrainer(bad_eval=True)])
    assert status == 1
    assert any("evaluation produced no figures" in line for line in lines)
    assert all("run finished: failed" in line for line in lines if "run finished:" in line)
