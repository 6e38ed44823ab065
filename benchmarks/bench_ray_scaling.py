"""launcher=ray at 8, 50 and 100 clients on a local Ray cluster: round time and memory (docs/scaling.md).

Runs the real program, ``python -m fedplug launcher=ray ...``, once per client
count, and samples every second: the driver's RSS (the server and Ray's driver
side), each client actor's RSS and PSS (``ray::ClientActor`` processes), and
Ray's own processes' PSS (GCS, raylet, agents).  PSS splits shared pages (torch's
libraries) among the processes that map them, so sums of PSS are what the
machine really holds; RSS counts them in every process.

The light clients are ``tests/ray_noop.py``'s detector (a fake installed
distribution written to a temporary folder and put on PYTHONPATH), so what is
measured is fedplug and Ray, not training; ``--model frcnn`` runs the tiny
Faster R-CNN instead.

    python benchmarks/bench_ray_scaling.py                       # 8, 50, 100 light clients, 10 alive at once
    python benchmarks/bench_ray_scaling.py --clients 8 --model frcnn --share 0.25 --per-round 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from ray_noop import write_noop_plugin  # noqa: E402

MB = 1024 * 1024


def _pss(proc: psutil.Process) -> float:
    try:
        return proc.memory_full_info().pss / MB
    except (psutil.Error, AttributeError):
        return 0.0


def sample(driver: psutil.Process, peaks: dict) -> None:
    """One look at the driver, the client actors and Ray's own processes; keeps the peaks in ``peaks``."""
    actors, system = [], []
    for proc in psutil.process_iter(["cmdline", "memory_info"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if cmd.startswith("ray::ClientActor"):
            actors.append(proc)
        elif "ray/core/src" in cmd or cmd.startswith(("ray::", )) or "ray/dashboard" in cmd \
                or "ray/_private" in cmd or "ray/autoscaler" in cmd:
            system.append(proc)
    try:
        peaks["driver_rss_mb"] = max(peaks.get("driver_rss_mb", 0), driver.memory_info().rss / MB)
    except psutil.Error:
        return
    rss = [p.info["memory_info"].rss / MB for p in actors if p.info["memory_info"]]
    pss = [_pss(p) for p in actors]
    peaks["actors_alive_max"] = max(peaks.get("actors_alive_max", 0), len(actors))
    if rss:
        peaks["actor_rss_mb_max"] = max(peaks.get("actor_rss_mb_max", 0), max(rss))
        peaks["actors_pss_mb_sum"] = max(peaks.get("actors_pss_mb_sum", 0), sum(pss))
    peaks["ray_system_pss_mb"] = max(peaks.get("ray_system_pss_mb", 0), sum(_pss(p) for p in system))


def run_one(n: int, args, plugin: Path, work: Path) -> dict:
    run_dir = work / f"run_{n}"
    per_round = min(n, args.per_round)
    overrides = [
        "launcher=ray", "launcher.num_cpus=2", "launcher.object_store_mb=100", "ui.live=false",
        f"launcher.client_resources.num_cpus={args.share}", f"run.num_clients={n}", f"run.min_clients={per_round}",
        f"run.clients_per_round={per_round}", f"run.rounds={args.rounds}", "resource_policy=always",
        "client.torch_threads=1", f"hydra.run.dir={run_dir}",
    ]
    if args.model == "noop":
        overrides += ["model=noop", "data.train_per_client=2", "data.test_per_client=1", "data.image_size=64"]
    else:
        overrides += ["data.train_per_client=8", "data.test_per_client=4", "data.image_size=64", "model.min_size=64",
                      "model.max_size=64", "train.local_epochs=1"]
    env = dict(os.environ, PYTHONPATH=str(plugin), FEDPLUG_CACHE=str(work / "cache"), PYTHONUNBUFFERED="1",
               RAY_USAGE_STATS_ENABLED="0")
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "fedplug", *overrides], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=work)
    driver = psutil.Process(proc.pid)
    peaks: dict = {}
    while proc.poll() is None:
        sample(driver, peaks)
        time.sleep(1.0)
    out = proc.stdout.read()
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{n} clients: exit {proc.returncode}\n{out[-3000:]}")
    history = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    ready = [e["time"] for e in events if e["event"] == "client_ready"]
    return {"clients": n, "per_round": per_round, "wall_s": round(wall, 1),
            "round_s": [round(r["seconds"], 1) for r in history],
            "evaluated_last_round": int(history[-1]["extra"].get("evaluators", 0)),
            "client_starts": len(ready), **{k: round(v, 1) if isinstance(v, float) else v for k, v in peaks.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 50, 100])
    parser.add_argument("--per-round", type=int, default=10, help="run.clients_per_round (at most the clients)")
    parser.add_argument("--share", type=float, default=0.2, help="launcher.client_resources.num_cpus of 2 CPUs")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", choices=("noop", "frcnn"), default="noop")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedplug-ray-bench-") as tmp:
        work = Path(tmp)
        plugin = write_noop_plugin(work / "plugin")
        print(f"# python benchmarks/bench_ray_scaling.py {' '.join(sys.argv[1:])}", flush=True)
        for n in args.clients:
            print(json.dumps(run_one(n, args, plugin, work)), flush=True)


if __name__ == "__main__":
    main()
