"""Secure aggregation in a whole run against the same run without it: seconds per round and bytes per update.

    python benchmarks/bench_secagg_run.py [--clients 3 10] [--rounds 3] [--degree 4] [--out-dir benchmarks/results]

For each client count N, ``python -m fedplug`` (mode=embedded: the server and N
client processes on this machine, the default tiny Faster R-CNN on the
synthetic data, ``resource_policy=always``) runs twice with only
``secagg.enabled`` changed.  s/round is the median of ``metrics.csv``'s
``seconds`` over rounds 2..N (round 1 warms up); bytes are one client's
``client_update`` size from ``events.jsonl``.  Plain FedAvg, measured in the same
invocation, is the floor the ratios are taken against: figures from two
invocations on a shared machine are not comparable.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _run(clients: int, rounds: int, secagg: bool, degree: int | None, run_dir: Path) -> dict:
    args = [sys.executable, "-m", "fedplug", f"run.num_clients={clients}", f"run.min_clients={clients}",
            f"run.clients_per_round={clients}", f"run.rounds={rounds}", "resource_policy=always",
            "data.train_per_client=16", "data.test_per_client=4", "ui.quiet=true", "dashboard.enabled=false",
            f"secagg.enabled={str(secagg).lower()}", f"hydra.run.dir={run_dir}"]
    if secagg and degree is not None and degree < clients - 1:
        args.append(f"secagg.degree={degree}")
    proc = subprocess.run(args, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    seconds = [float(r["seconds"]) for r in rows[1:]] or [float(rows[0]["seconds"])]
    sizes = [json.loads(line).get("bytes") for line in (run_dir / "events.jsonl").read_text().splitlines()
             if '"client_update"' in line and '"in"' in line]
    sizes = [s for s in sizes if s]
    return {"s_per_round": statistics.median(seconds), "bytes_per_update": max(sizes) if sizes else 0,
            "map50": float(rows[-1]["map50"] or "nan")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--degree", type=int, default=4, help="SecAgg+ neighbours when N - 1 is larger")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    lines = [f"command: python benchmarks/bench_secagg_run.py --clients {' '.join(map(str, args.clients))} "
             f"--rounds {args.rounds} --degree {args.degree}", ""]
    with tempfile.TemporaryDirectory(prefix="fedplug-secagg-run-") as tmp:
        for n in args.clients:
            plain = _run(n, args.rounds, False, None, Path(tmp) / f"plain{n}")
            secure = _run(n, args.rounds, True, args.degree, Path(tmp) / f"secure{n}")
            degree = args.degree if args.degree < n - 1 else n - 1
            lines.append(f"{n} clients (degree {degree}): plain {plain['s_per_round']:.2f} s/round, "
                         f"{plain['bytes_per_update'] / 1e6:.2f} MB/update, mAP {plain['map50']:.4f}; "
                         f"secagg {secure['s_per_round']:.2f} s/round, {secure['bytes_per_update'] / 1e6:.2f} "
                         f"MB/update, mAP {secure['map50']:.4f}; ratio time "
                         f"{secure['s_per_round'] / plain['s_per_round']:.2f}x, bytes "
                         f"{secure['bytes_per_update'] / max(1, plain['bytes_per_update']):.2f}x")
            print(lines[-1], flush=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "secagg_run.txt").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
