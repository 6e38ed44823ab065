"""``launcher=ray``: clients as Ray actors, in waves when the cluster cannot hold them all (docs/scaling.md).

Every federation here is the real program, ``python -m fedplug mode=embedded
launcher=ray``, on a local Ray cluster kept small (2 CPUs, no dashboard, a
small object store).  The light clients use ``tests/ray_noop.py``'s detector,
installed as a fake distribution on ``PYTHONPATH`` (which Ray's workers inherit).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedplug.launchers.ray import capacity_of
from fedplug.outputs import read_events
from ray_noop import write_noop_plugin

RAY = ["launcher=ray", "launcher.num_cpus=2", "launcher.object_store_mb=100", "launcher.include_dashboard=false",
       "launcher.log_to_driver=false"]
LIGHT = ["model=noop", "resource_policy=always", "data.train_per_client=2", "data.test_per_client=1",
         "data.image_size=64", "client.torch_threads=1", "ui.live=false"]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["FEDPLUG_CACHE"] = str(tmp_path / "cache")
    env["PYTHONUNBUFFERED"] = "1"
    env["TORCH_HOME"] = str(tmp_path / "torch-hub")
    env["RAY_USAGE_STATS_ENABLED"] = "0"  # nothing leaves the machine
    env.update(extra)
    return env


def _fedplug(*args: str, tmp_path: Path, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedplug", *args], capture_output=True, text=True, timeout=timeout,
                          env=env or _env(tmp_path), cwd=tmp_path)


def _history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _max_connected(events: list[dict]) -> int:
    """The most clients connected to the server at once, from its event log (wake-up in, disconnect in)."""
    connected, most = set(), 0
    for e in events:
        if e["event"] == "client_wake_up" and e["direction"] == "in":
            connected.add(e["client_id"])
        elif e["event"] == "disconnect" and e.get("client_id"):
            connected.discard(e["client_id"])
        most = max(most, len(connected))
    return most


# ---------------------------------------------------------------------------- without a cluster


def test_capacity_is_the_cluster_over_a_clients_share():
    cpus_only = {"num_cpus": 0.25, "num_gpus": 0}
    assert capacity_of({"CPU": 2.0}, cpus_only, None, 100) == 8  # fractions: 2 CPUs hold 8 quarter-CPU clients
    assert capacity_of({"CPU": 2.0}, cpus_only, None, 5) == 5  # never more actors than clients
    assert capacity_of({"CPU": 2.0}, cpus_only, 3, 100) == 3  # launcher.max_alive
    gpus = {"num_cpus": 1, "num_gpus": 0.25}
    assert capacity_of({"CPU": 16.0, "GPU": 2.0}, gpus, None, 500) == 8  # the GPUs are the limit
    assert capacity_of({"CPU": 16.0}, gpus, None, 500) == 0  # GPU shares on a cluster without GPUs: none fit


def test_fedavg_gives_the_same_bits_whatever_order_the_updates_arrive_in():
    """Why launcher=ray reproduces launcher=local exactly: its clients finish in another order.

    The mean of four float32 values often lies exactly half-way between two
    float32 numbers; an order-dependent float64 rounding error then flips the
    last bit of such weights (it did, for about 1 in 50,000 weights, with an
    incremental mean), and the next round's training amplifies that.
    """
    from fedplug.plugins import load_plugin
    from fedplug.types import ClientUpdate

    _, fedavg = load_plugin("aggregator", "fedavg")
    g = torch.Generator().manual_seed(0)
    base = torch.randn(500_000, generator=g)
    updates = [ClientUpdate(f"c{i}", 1, {"w": base + 1e-3 * torch.randn(500_000, generator=g)}, 8, 1.0)
               for i in range(4)]
    results = [fedavg.fedplug_aggregate(global_weights={"w": base}, updates=[updates[i] for i in order],
                                        round_number=1, config={"name": "fedavg"}, state={})["w"]
               for order in itertools.permutations(range(4))]
    assert all(torch.equal(r, results[0]) for r in results[1:])


def test_launcher_ray_without_ray_installed_says_how_to_install_it(tmp_path):
    hidden = tmp_path / "no_ray"  # a "ray" that cannot be imported, as on a machine without it
    (hidden / "ray").mkdir(parents=True)
    (hidden / "ray" / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    proc = _fedplug("launcher=ray", "run.rounds=1", tmp_path=tmp_path, timeout=120,
                    env=_env(tmp_path, PYTHONPATH=str(hidden)))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "pip install 'fedplug[ray]'" in proc.stdout and "Traceback" not in out
    assert "preparing data" not in proc.stdout  # said before any work is done


def test_a_wrong_launcher_value_is_one_line_naming_the_key(tmp_path):
    proc = _fedplug("launcher=ray", "launcher.max_alive=0", tmp_path=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "launcher.max_alive must be an integer >= 1 or null, got 0" in proc.stdout
    proc = _fedplug("launcher=ray", "launcher.client_resources.num_gpus=-1", tmp_path=tmp_path, timeout=120)
    assert proc.returncode == 2 and "launcher.client_resources.num_gpus must be a number >= 0" in proc.stdout


# ---------------------------------------------------------------------------- on a local Ray cluster

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="launcher=ray needs Ray: pip install 'fedplug[ray]'")


@pytest.mark.slow
@needs_ray
def test_a_cluster_that_cannot_hold_a_rounds_clients_is_refused_at_start_up(tmp_path):
    plugin = write_noop_plugin(tmp_path / "plugin")
    proc = _fedplug(*RAY, *LIGHT, "launcher.client_resources.num_cpus=1", "run.num_clients=4", "run.min_clients=3",
                    "run.clients_per_round=3", "run.rounds=1", f"hydra.run.dir={tmp_path / 'run'}",
                    tmp_path=tmp_path, timeout=180, env=_env(tmp_path, PYTHONPATH=str(plugin)))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("cannot start:"))
    assert "run.clients_per_round" in line and "holds 2" in line
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.slow
@needs_ray
def test_clients_that_cannot_take_part_stop_the_run_at_once_saying_why(tmp_path):
    """Every actor's client refuses to start (client.device=cuda without a GPU): no wait for ready_timeout_s."""
    plugin = write_noop_plugin(tmp_path / "plugin")
    proc = _fedplug(*RAY, *LIGHT, "launcher.client_resources.num_cpus=0.5", "run.num_clients=4", "run.min_clients=3",
                    "run.clients_per_round=3", "run.rounds=1", "client.device=cuda", "server.ready_timeout_s=600",
                    f"hydra.run.dir={tmp_path / 'run'}", tmp_path=tmp_path, timeout=300,
                    env=_env(tmp_path, PYTHONPATH=str(plugin), CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "can still be started on Ray, run.min_clients=3" in proc.stdout
    assert "no CUDA GPU is visible" in proc.stdout  # each failed client's last log line is shown
    assert "became ready within server.ready_timeout_s" not in proc.stdout


TINY_FRCNN = ["run.rounds=3", "run.num_clients=8", "run.min_clients=8", "run.clients_per_round=4",
              "resource_policy=always", "data.train_per_client=8", "data.test_per_client=4", "data.image_size=64",
              "model.min_size=64", "model.max_size=64", "train.local_epochs=1", "client.torch_threads=1",
              "ui.live=false"]


@pytest.mark.slow
@needs_ray
def test_eight_tiny_detector_clients_on_ray_give_the_same_metrics_as_local_processes(tmp_path):
    """Same seed, same data, same sampling: launcher=ray must not change a single figure of the run."""
    env = _env(tmp_path)
    runs = {}
    for launcher, extra in (("local", ["launcher=local"]),
                            ("ray", [*RAY, "launcher.client_resources.num_cpus=0.25"])):
        run_dir = tmp_path / launcher
        t0 = time.monotonic()
        proc = _fedplug(*TINY_FRCNN, *extra, f"hydra.run.dir={run_dir}", tmp_path=tmp_path, timeout=900, env=env)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        print(f"{launcher}: {time.monotonic() - t0:.1f}s")
        runs[launcher] = _history(run_dir)
    fields = ("round_number", "participants", "train_loss", "test_loss", "map50", "recall", "per_client")
    for local, on_ray in zip(runs["local"], runs["ray"], strict=True):
        for name in fields:
            assert local[name] == on_ray[name], (local["round_number"], name, local[name], on_ray[name])
        assert on_ray["extra"]["eval_coverage"] == 1.0
    assert [len(r["participants"]) for r in runs["ray"]] == [4, 4, 4]
    assert runs["ray"][-1]["extra"]["evaluators"] == 8.0  # the last round: every client scored its test split


@pytest.mark.slow
@needs_ray
def test_a_hundred_light_clients_complete_two_rounds_of_ten_in_waves(tmp_path):
    plugin = write_noop_plugin(tmp_path / "plugin")
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    proc = _fedplug(*RAY, *LIGHT, "launcher.client_resources.num_cpus=0.2", "run.num_clients=100",
                    "run.min_clients=10", "run.clients_per_round=10", "run.rounds=2", f"hydra.run.dir={run_dir}",
                    tmp_path=tmp_path, timeout=900, env=_env(tmp_path, PYTHONPATH=str(plugin)))
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    print(f"100 light clients, 2 rounds: {seconds:.1f}s")
    assert "at most 10 alive at once, started in waves" in proc.stdout
    history = _history(run_dir)
    assert [r["round_number"] for r in history] == [1, 2]
    assert [len(r["participants"]) for r in history] == [10, 10]
    events = read_events(run_dir / "events.jsonl")
    # the last round's evaluation reached all 100 clients, though no more than 10 were ever connected at once
    evaluated = {e["client_id"] for e in events if e["event"] == "client_eval" and e["round"] == 2 and e["ok"]}
    assert len(evaluated) == 100
    assert history[-1]["extra"]["evaluators"] == 100.0 and history[-1]["extra"]["eval_coverage"] == 1.0
    assert _max_connected(events) <= 10
    # the same 10 actors served every client: the wave is a new client in a warm process, not a new process
    pids = set()
    for log in (run_dir / "clients").glob("*.out"):
        pids |= set(re.findall(r"served by Ray actor process (\d+)", log.read_text()))
    assert len(pids) <= 10, pids


@pytest.mark.slow
@needs_ray
def test_a_client_actor_killed_mid_round_is_restarted_by_ray_and_its_update_counts(tmp_path):
    plugin = write_noop_plugin(tmp_path / "plugin")
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedplug", *RAY, *LIGHT, "launcher.client_resources.num_cpus=0.5",
         "run.num_clients=3", "run.min_clients=3", "run.clients_per_round=3", "run.rounds=2",
         "+train.train_seconds=4", "server.reconnect_grace_s=60", "server.update_timeout_s=120",
         f"hydra.run.dir={run_dir}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
        env=_env(tmp_path, PYTHONPATH=str(plugin)))
    victim = "camera_01"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            events = read_events(run_dir / "events.jsonl") if (run_dir / "events.jsonl").exists() else []
            if any(e["event"] == "request_update" and e["client_id"] == victim and e["round"] == 1 for e in events):
                break
            time.sleep(0.2)
        log = (run_dir / "clients" / f"{victim}.out").read_text()
        pid = int(re.findall(r"served by Ray actor process (\d+)", log)[-1])
        time.sleep(1.0)  # inside its 4 s of training
        os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out[-4000:]
    history = _history(run_dir)
    assert [r["round_number"] for r in history] == [1, 2]
    assert victim in history[0]["participants"] and len(history[0]["participants"]) == 3, history[0]
    events = read_events(run_dir / "events.jsonl")
    mine = [e["event"] for e in events if e["client_id"] == victim]
    # killed while training round 1, rejoined under its id, was sent the request again and answered it
    first_disconnect = mine.index("disconnect")
    assert "client_wake_up" in mine[first_disconnect:] and "client_update" in mine[first_disconnect:]
    log = (run_dir / "clients" / f"{victim}.out").read_text()
    assert "restarted by Ray after the previous one died" in log
    assert re.findall(r"served by Ray actor process (\d+)", log)[-1] != str(pid)  # a new process
