"""benchmarks/bench_transport.py and bench_codecs.py run end to end (tiny) and report what they claim to.

Run as a user runs them, as subprocesses writing into a temporary folder: the transport benchmark with its
``toy`` model (0.3 M values) over real fedplug server and client processes, the codec benchmark with
``--smoke``.  The pieces they are built from (the no-op plugin found through its entry point, the round
timing, the floor) are checked directly.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _run(args: list[str], tmp_path: Path, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", FEDPLUG_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_the_noop_detector_is_found_through_its_entry_point(tmp_path):
    bench = _load("bench_transport")
    site = bench.plugin_site(tmp_path)
    found = [ep for dist in metadata.distributions(path=[str(site)]) for ep in dist.entry_points
             if ep.group == "fedplug.detectors"]
    assert [(ep.name, ep.value) for ep in found] == [("bench_noop", "fedplug_bench_noop")]


def test_noop_training_returns_the_weights_plus_a_thousandth():
    sys.path.insert(0, str(BENCH / "transport_noop"))
    import fedplug_bench_noop as noop

    model = noop.build("toy", 4)
    state = model.state_dict()
    result = noop.fedplug_train_round(dataset=[1, 2], global_weights=state)
    for name, t in state.items():
        expected = t + 1e-3 if t.is_floating_point() else t
        assert (result.weights[name] == expected).all(), name
    with pytest.raises(ValueError, match="model.backbone must be one of"):
        noop.build("resnet18", 4)


def test_round_time_is_the_median_from_round_2_start_to_start():
    bench = _load("bench_transport")
    starts = {1: 0.0, 2: 10.0, 3: 13.0, 4: 20.0, 5: 21.0}
    median, times = bench.median_round(starts, 4)
    assert times == [3.0, 7.0, 1.0] and median == 3.0  # round 1 (warm-up) and the evaluating round 5 left out
    with pytest.raises(RuntimeError, match="no timed round"):
        bench.median_round({1: 0.0}, 3)


def test_floor_grows_with_the_clients():
    import torch

    bench = _load("bench_transport")
    state = {"w": torch.randn(2_000_000), "n": torch.tensor(1)}
    one, eight = bench.measure_floor(state, 1), bench.measure_floor(state, 8)
    assert 0 < one < eight


@pytest.mark.slow
def test_bench_transport_toy_run_writes_its_table(tmp_path):
    out = tmp_path / "out"
    proc = _run([str(BENCH / "bench_transport.py"), "--models", "toy", "--clients", "2", "--rounds", "2",
                 "--out-dir", str(out), "--tag", "t", "--timeout", "300"], tmp_path, timeout=420)
    assert "command:" in proc.stdout and "x floor" in proc.stdout
    rows = list(csv.DictReader(open(out / "t.csv")))
    assert {r["system"] for r in rows} == {"floor", "fedplug"}
    fed = next(r for r in rows if r["system"] == "fedplug")
    assert float(fed["s_per_round"]) > float(fed["floor_s"]) > 0
    assert int(fed["rounds_timed"]) == 1
    model_bytes = float(fed["model_mb"]) * 1024 * 1024
    # two uploads and two downloads of the model per round, each its raw bytes plus a header
    assert 2 * model_bytes < float(fed["up_bytes_per_round"]) < 2 * model_bytes * 1.05
    assert 2 * model_bytes < float(fed["down_bytes_per_round"]) < 2 * model_bytes * 1.05
    assert float(fed["server_peak_mb"]) > 100 and float(fed["client_peak_mb"]) > 100  # torch is loaded in each
    assert (out / "t.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_bench_codecs_smoke_compares_with_none(tmp_path):
    out = tmp_path / "out"
    proc = _run([str(BENCH / "bench_codecs.py"), "--smoke", "--codecs", "zstd", "int8", "--out-dir", str(out),
                 "--tag", "c"], tmp_path, timeout=600)
    assert "command:" in proc.stdout
    rows = list(csv.DictReader(open(out / "c.csv")))
    by = {r["codec"]: r for r in rows}
    assert set(by) == {"none", "zstd", "int8"}  # none is always run: it is the reference
    assert float(by["none"]["bytes_vs_none"]) == 1.0
    assert float(by["int8"]["bytes_vs_none"]) < 0.3
    assert by["zstd"]["map50"] == by["none"]["map50"]  # lossless, same seeds: the same model
