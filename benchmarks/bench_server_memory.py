"""Server memory during a round, against the model size, for K clients (issue 11: flat in K, <= 3x the model).

Runs ``python -m fedplug mode=server`` with a real detector's global model and
K light protocol-2 clients (benchmarks/light_client.py: numpy, no torch), which
download the model in chunks, add 1e-3 and upload it.  The server's RSS is
sampled from /proc every 20 ms; each round's growth is its peak RSS minus the
RSS when the round started (the global model is held before the round, so it
is not growth).  Heavy observers (plots, TensorBoard) are disabled: they are
plugins, not the protocol path.

    python benchmarks/bench_server_memory.py --model resnet50_fpn --clients 2 5 10 20

Prints a table and writes benchmarks/results/server_memory.csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss(pid: int) -> int:
    return _rss_parts(pid)["VmRSS"]


def _rss_parts(pid: int) -> dict[str, int]:
    """VmRSS and its parts: RssAnon (heap, tensors, buffers) and RssFile (mapped files: received updates)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) * 1024
    return out


def run_once(backbone: str, k: int, rounds: int, chunk_kb: int, workdir: Path) -> dict:
    port = _free_port()
    run_dir = workdir / f"{backbone}-k{k}"
    server = subprocess.Popen(
        [sys.executable, "-m", "fedplug", "mode=server", f"server.port={port}", "model=frcnn",
         f"model.backbone={backbone}", f"run.rounds={rounds}", f"run.min_clients={k}",
         f"run.clients_per_round={k}", "resource_policy=always", "eval.clients=all", f"server.chunk_kb={chunk_kb}",
         "server.update_timeout_s=900", "server.eval_timeout_s=900", "server.ready_timeout_s=600",
         "plugins.disable=[plots,tensorboard]", f"hydra.run.dir={run_dir}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=workdir)
    samples: list[tuple[float, int]] = []
    anon: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample():
        while not stop.is_set() and server.poll() is None:
            try:
                parts = _rss_parts(server.pid)
                samples.append((time.time(), parts["VmRSS"]))
                anon.append((time.time(), parts.get("RssAnon", 0)))
            except (OSError, KeyError):  # the server has exited
                break
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    clients = [subprocess.Popen([sys.executable, str(HERE / "light_client.py"), "--url", f"http://127.0.0.1:{port}",
                                 "--id", f"light{i:03d}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, cwd=workdir) for i in range(k)]
    try:
        out, _ = server.communicate(timeout=3600)
    finally:
        stop.set()
        for c in clients:
            try:
                c.wait(timeout=30)
            except subprocess.TimeoutExpired:
                c.kill()
    if server.returncode != 0:
        raise SystemExit(f"server failed (K={k}):\n{out[-3000:]}")
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.strip()]
    model_bytes = max(e.get("bytes", 0) for e in events if e["event"] == "client_update")
    starts = {}
    for e in events:
        if e["event"] == "check_client_resource" and e["round"] not in starts:
            starts[e["round"]] = e["time"]
    ends = {r: max(e["time"] for e in events if e["round"] == r and e["event"] in ("client_eval", "client_update"))
            for r in starts}
    growth, anon_growth = {}, {}
    for r in sorted(starts):
        for series, into in ((samples, growth), (anon, anon_growth)):
            base = [rss for t, rss in series if t <= starts[r]]
            inside = [rss for t, rss in series if starts[r] <= t <= ends[r] + 0.5]
            if base and inside:
                into[r] = max(inside) - base[-1]
    seconds = [json.loads(x)["seconds"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    worst = max(growth[r] for r in growth if r >= 2) if len(growth) > 1 else max(growth.values())
    worst_anon = max(anon_growth[r] for r in anon_growth if r >= 2) if len(anon_growth) > 1 else max(anon_growth.values())
    return {"backbone": backbone, "clients": k, "model_mb": model_bytes / 2**20,
            "anon_growth_mb": worst_anon / 2**20,
            "peak_rss_mb": max(rss for _, rss in samples) / 2**20, "round_growth_mb": worst / 2**20,
            "growth_x_model": worst / model_bytes, "s_per_round": sorted(seconds[1:] or seconds)[len(seconds[1:] or seconds) // 2]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v3_large_fpn",
                        help="frcnn backbone: resnet50_fpn (158 MiB) | mobilenet_v3_large_fpn | tiny")
    parser.add_argument("--clients", type=int, nargs="+", default=[2, 5])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk-kb", type=int, default=4096)
    parser.add_argument("--out", default=str(HERE / "results" / "server_memory.csv"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedplug-mem-") as tmp:
        for k in args.clients:
            row = run_once(args.model, k, args.rounds, args.chunk_kb, Path(tmp))
            rows.append(row)
            print(f"{row['backbone']:>24}  K={k:<3} model {row['model_mb']:.1f} MiB  round growth "
                  f"{row['round_growth_mb']:.1f} MiB = {row['growth_x_model']:.2f}x the model (anonymous "
                  f"{row['anon_growth_mb']:.1f} MiB)  peak RSS "
                  f"{row['peak_rss_mb']:.0f} MiB  {row['s_per_round']:.2f} s/round", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
