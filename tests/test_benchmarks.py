"""The learning and GPU benchmarks run end to end (tiny) and write their outputs where they are told.

The benchmarks are scripts, so they are run as a user runs them: as
subprocesses, with ``--smoke`` (and ``--allow-cpu`` for the GPU one on a
machine without CUDA), writing into a temporary folder, never into
benchmarks/results.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _env(tmp_path: Path) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", FEDPLUG_CACHE=str(tmp_path / "cache"))


def _run(args: list[str], tmp_path: Path, timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=tmp_path, env=_env(tmp_path), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_fl_vs_central_splits_partition_the_same_cameras():
    bench = _load("bench_fl_vs_central")
    for grouping in ("roundrobin", "contiguous"):
        for n in (1, 3, 7, 10):
            groups = bench.camera_groups(10, n, grouping)
            assert len(groups) == n and all(groups)
            assert sorted(c for g in groups for c in g) == list(range(10))
    assert bench.camera_groups(10, 3, "contiguous") == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    # round-robin with 3 clients and 3 classes: each client holds the cameras of one dominant class
    assert bench.camera_groups(10, 3, "roundrobin") == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]


@pytest.mark.slow
def test_bench_fl_vs_central_smoke_writes_csv_and_plot(tmp_path):
    out = tmp_path / "out"
    proc = _run([str(BENCH / "bench_fl_vs_central.py"), "--smoke", "--threads", "1", "--out-dir", str(out),
                 "--data-root", str(tmp_path / "data")], tmp_path, timeout=240)
    assert "simulated federation" in proc.stdout and "command:" in proc.stdout
    rows = _rows(out / "fl_vs_central_frcnn.csv")
    got = {(r["setting"], int(r["round"])) for r in rows}
    assert got == {(s, r) for s in ("central", "fedavg-3", "fedavg-10") for r in (0, 1)}
    for r in rows:
        assert 0.0 <= float(r["map50"]) <= 1.0 and 0.0 <= float(r["recall"]) <= 1.0
        assert math.isfinite(float(r["test_loss"]))
    # round 0 is the one initial model, evaluated once for every setting
    assert len({r["map50"] for r in rows if r["round"] == "0"}) == 1
    assert int(next(r for r in rows if r["setting"] == "fedavg-10")["clients"]) == 10
    assert "mAP@0.5" in (out / "fl_vs_central_frcnn.txt").read_text()
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "fl_vs_central_frcnn.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_gpu_without_cuda_says_so_and_exits_0(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: the no-GPU message does not apply")
    bench = _load("bench_gpu")  # in-process: this path only checks for CUDA and prints
    assert bench.main(["--out-dir", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "no CUDA GPU" in printed and "--allow-cpu" in printed
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_bench_gpu_allow_cpu_smoke_runs_every_mode(tmp_path):
    import torch

    out = tmp_path / "out"
    _run([str(BENCH / "bench_gpu.py"), "--allow-cpu", "--smoke", "--threads", "1", "--out-dir", str(out)],
         tmp_path, timeout=300)
    name = "gpu_throughput" if torch.cuda.is_available() else "gpu_throughput_cpu"
    rows = _rows(out / f"{name}.csv")
    modes = {(r["model"], r["mode"]) for r in rows}
    for model in ("frcnn", "yolov3"):
        assert {(model, "train fp32"), (model, "infer fp32"), (model, "federation")} <= modes
    for r in rows:
        assert float(r["images_per_s"]) > 0 and float(r["ms_per_iter"]) > 0
    fed = [r for r in rows if r["mode"] == "federation"]
    assert all("failed" not in r["note"] and "global mAP@0.5" in r["note"] for r in fed)
    assert "images/s" in (out / f"{name}.txt").read_text()
