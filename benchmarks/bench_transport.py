"""Detector-scale rounds over real sockets: s/round, peak memory and bytes on the wire, against the floor.

    python benchmarks/bench_transport.py                                   # MobileNet-v3-FPN size, K = 2 and 5
    python benchmarks/bench_transport.py --models r50 --clients 2          # Faster R-CNN R50-FPN size (158 MiB)
    python benchmarks/bench_transport.py --models mobilenet r50 --clients 2 5 10 20 --rounds 4
    python benchmarks/bench_transport.py --peer flower [--flower-python /path/to/venv/bin/python]
    python benchmarks/bench_transport.py --codec fp16                      # the upload through a codec

What runs: fedplug's real server (``python -m fedplug mode=server``) and K real client processes
(``python -m fedplug mode=client``) on 127.0.0.1, with a **no-op detector plugin**
(``benchmarks/transport_noop/fedplug_bench_noop.py``: the state dict of a torchvision Faster R-CNN
R50-FPN, 41.4 M float32 values = 158 MiB, or MobileNet-v3-large-FPN, 19.0 M = 72 MiB; "training" returns the
received weights + 1e-3).  The plugin is declared to both sides exactly as an installed package declares
it: a ``.dist-info`` folder with an ``entry_points.txt`` (group ``fedplug.detectors``) on the processes'
``PYTHONPATH``, written into the benchmark's temporary folder; nothing is pip-installed.  Everything else is
fedplug as a user runs it: FedAvg, protocol v2 chunks, checkpoints and plots every round.

What it prints, per model and K:

* **s/round** -- the median over rounds 2..N of the wall time from one round's start (its
  ``check_client_resource``, from events.jsonl) to the next one's: everything the server does in a round,
  checkpoints included.  Round 1 (warm-up) is left out, and so is the extra last round, which also evaluates.
* **server / client peak RSS** (``VmHWM`` from /proc, Linux) and the server's **growth during the rounds**:
  its peak after round 1 started (the kernel's peak mark is reset then, ``/proc/<pid>/clear_refs``) minus its
  RSS at that moment (torch and the model already loaded), also as a multiple of the model's size.
* **bytes on the wire per round** -- up: the uploads' sizes (``upload_started`` / ``client_update`` in
  events.jsonl, with their chunk counts); down: K x the broadcast's size (the global model's safetensors
  file).  Socket.IO / WebSocket framing (a few bytes per chunk) is not counted.
* **the floor**, measured in this process in the same run: copying the model's bytes K times (memcpy) plus a
  weighted mean of K state dicts -- the work no framework can avoid.  Speed and memory targets are ratios
  against it (and against Flower), because absolute seconds depend on the machine and its load.

With ``--peer flower`` (Flower installed in the interpreter ``--flower-python`` names; never a requirement of
fedplug) the same payloads go through Flower's legacy ``start_server`` / ``start_client`` (gRPC, FedAvg,
evaluation off), also as separate processes, timed the same way (round start to round start, from the
strategy's ``configure_fit``), and the table gives fedplug's speed-up.

Outputs: ``<out-dir>/<tag>.csv`` (one row per system, model and K) and ``<tag>.png`` (s/round and server
growth vs K), plus the printed table and command line.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PLUGIN_DIR = HERE / "transport_noop"
MODELS = {"r50": "resnet50_fpn", "mobilenet": "mobilenet_v3_large_fpn", "toy": "toy"}  # toy: for tests
CLASSES = ("car", "person", "sign")
MIB = 1024 * 1024


# ------------------------------------------------------------------------------------------------ helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_kb(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class Watch(threading.Thread):
    """Samples every process's RSS and keeps its last-seen peak (VmHWM) until it exits."""

    def __init__(self, pids: dict[str, int]):
        super().__init__(daemon=True)
        self.pids = dict(pids)
        self.peak: dict[str, int] = {}
        self.rss: dict[str, int] = {}
        self.round_peak: dict[str, int] = {}  # peaks since start_rounds()
        self.round_peak_from: dict[str, bool] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            time.sleep(0.05)

    def start_rounds(self, name: str) -> int:
        """Round 1 starts: note ``name``'s RSS and reset its peak mark, so later peaks are the rounds' own."""
        self.sample()
        pid = self.pids[name]
        try:  # Linux: "5" resets VmHWM to the current RSS (own child process)
            with open(f"/proc/{pid}/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            pass
        self.round_peak_from[name] = True
        return self.rss.get(name, 0)

    def sample(self) -> None:
        for name, pid in list(self.pids.items()):
            hwm, rss = proc_kb(pid, "VmHWM"), proc_kb(pid, "VmRSS")
            if hwm is not None:
                self.peak[name] = max(self.peak.get(name, 0), hwm * 1024)
                if self.round_peak_from.get(name):
                    self.round_peak[name] = max(self.round_peak.get(name, 0), hwm * 1024)
            if rss is not None:
                self.rss[name] = rss * 1024


def growth(watch: Watch, baseline: dict[str, int]) -> float | None:
    """The server's peak during the rounds above its RSS when round 1 started, in MiB."""
    if "server" not in baseline or "server" not in watch.round_peak:
        return None
    return (watch.round_peak["server"] - baseline["server"]) / MIB


def state_dict_of(model: str):
    sys.path.insert(0, str(PLUGIN_DIR))
    import noop_model  # not the plugin module: Flower's interpreter need not have fedplug

    return noop_model.build(MODELS[model], len(CLASSES) + 1).state_dict()


def median_round(starts: dict[int, float], rounds: int) -> tuple[float, list[float]]:
    """Median of round r's start-to-next-start time for r = 2..rounds (round rounds+1 must have started)."""
    times = [starts[r + 1] - starts[r] for r in range(2, rounds + 1) if r in starts and r + 1 in starts]
    if not times:
        raise RuntimeError(f"no timed round: round starts seen {sorted(starts)}; raise --rounds to at least 2")
    return statistics.median(times), times


# ------------------------------------------------------------------------------------------------ floor


def measure_floor(state, k: int, repeats: int = 3) -> float:
    """memcpy of the model's bytes K times + the weighted mean of K state dicts (float32, in place): best of ``repeats``."""
    import torch

    floats = {n: t for n, t in state.items() if t.is_floating_point()}
    flat = torch.cat([t.reshape(-1) for t in floats.values()])
    dst = torch.empty_like(flat)
    updates = [{n: t + 1e-3 for n, t in floats.items()} for _ in range(k)]
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(k):
            dst.copy_(flat)
        acc = {n: torch.zeros_like(t) for n, t in floats.items()}
        for u in updates:
            for n, t in u.items():
                acc[n].add_(t, alpha=1.0 / k)
        best = min(best, time.perf_counter() - t0)
        del acc
    return best


# ------------------------------------------------------------------------------------------------ fedplug


def plugin_site(root: Path) -> Path:
    """A sys.path folder declaring the no-op detector as an installed distribution would (entry point only)."""
    site = root / "site"
    info = site / "fedplug_bench_noop-0.1.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fedplug-bench-noop\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[fedplug.detectors]\nbench_noop = fedplug_bench_noop\n")
    return site


def child_env(root: Path, threads: int) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               FEDPLUG_CACHE=str(root / "cache"))
    paths = [str(plugin_site(root)), str(PLUGIN_DIR)]
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def run_fedplug(model: str, k: int, args, root: Path, broadcast_bytes: int, model_bytes: int) -> dict:
    from fedplug.data import generate_synthetic_federation

    folders = generate_synthetic_federation(root / "data", num_clients=k, train_per_client=1, test_per_client=1,
                                            image_size=64, seed=0)
    port = free_port()
    run_dir = root / "server"
    env = child_env(root, args.threads)
    server_cmd = [
        sys.executable, "-m", "fedplug", "mode=server", f"server.port={port}", "model.name=bench_noop",
        f"model.backbone={MODELS[model]}", "resource_policy=always", f"run.rounds={args.rounds + 1}",
        f"run.min_clients={k}", f"run.clients_per_round={k}", f"run.eval_every={args.rounds + 1}",
        "eval.on=clients", "eval.clients=round", "server.update_timeout_s=3600", "server.eval_timeout_s=3600",
        "server.ready_timeout_s=3600", f"server.chunk_kb={args.chunk_kb}", f"codec={args.codec}",
        "dashboard.enabled=false", "ui.live=false", f"hydra.run.dir={run_dir}",
    ]
    log = open(root / "server.out", "w")
    server = subprocess.Popen(server_cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                              cwd=root)
    procs = {"server": server}
    watch = Watch({"server": server.pid})
    watch.start()
    baseline: dict[str, int] = {}

    def read_server() -> None:
        for line in server.stdout:
            log.write(line)
            if "round 1/" in line and "server" not in baseline:
                baseline["server"] = watch.start_rounds("server")

    reader = threading.Thread(target=read_server, daemon=True)
    reader.start()
    clients = []
    try:
        for i, folder in enumerate(folders):
            cdir = root / "clients" / f"c{i}"
            cmd = [sys.executable, "-m", "fedplug", "mode=client", f"client.server_url=http://127.0.0.1:{port}",
                   f"client.client_id=c{i}", f"client.data.path={folder}", f"client.torch_threads={args.threads}",
                   "client.call_timeout_s=600", "client.reconnect_timeout_s=120", f"hydra.run.dir={cdir}"]
            cdir.mkdir(parents=True, exist_ok=True)
            p = subprocess.Popen(cmd, stdout=open(cdir / "out.txt", "w"), stderr=subprocess.STDOUT, env=env, cwd=root)
            clients.append(p)
            procs[f"c{i}"] = p
            watch.pids[f"c{i}"] = p.pid
        server.wait(timeout=args.timeout)
        for p in clients:
            p.wait(timeout=60)
    finally:
        watch.stop.set()
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        reader.join(timeout=5)
        log.close()
    if server.returncode != 0:
        raise RuntimeError(f"fedplug server exited {server.returncode}; see {root / 'server.out'}:\n"
                           + (root / "server.out").read_text()[-3000:])
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.strip()]
    starts: dict[int, float] = {}
    for e in events:
        if e["event"] == "check_client_resource" and e["direction"] == "out" and e["round"] not in starts:
            starts[e["round"]] = e["time"]
    s_round, times = median_round(starts, args.rounds)
    timed = set(range(2, args.rounds + 1))
    phases = round_phases(events, starts, timed)
    ups = [e for e in events if e["event"] == "client_update" and e["direction"] == "in" and e["round"] in timed]
    chunks = [e.get("chunks", 0) for e in events if e["event"] == "upload_started" and e["round"] in timed]
    client_peaks = [v for n, v in watch.peak.items() if n != "server"]
    return {
        "system": "fedplug", "s_per_round": s_round, "rounds_timed": len(times),
        "server_peak_mb": watch.peak.get("server", 0) / MIB,
        "server_growth_mb": growth(watch, baseline),
        "client_peak_mb": max(client_peaks) / MIB if client_peaks else None,
        "up_bytes_per_round": sum(e.get("bytes", 0) for e in ups) / max(1, len(times)),
        "down_bytes_per_round": k * broadcast_bytes,
        "up_chunks_per_round": sum(chunks) / max(1, len(times)),
        "phases": phases,
    }


PHASES = (("resource check", "check_client_resource out", "last check_client_resource_done in"),
          ("to the broadcast", "last check_client_resource_done in", "first request_update out"),
          ("download+train+encode", "first request_update out", "last upload_started in"),
          ("upload", "last upload_started in", "last client_update in"),
          ("aggregate+commit", "last client_update in", "round_committed"),
          ("to the next round", "round_committed", "next check_client_resource out"))


def round_phases(events: list[dict], starts: dict[int, float], timed: set[int]) -> dict[str, float]:
    """Median seconds of each phase of a timed round, from events.jsonl: where a round's time goes."""
    marks: dict[int, dict[str, float]] = {}
    for e in events:
        r, t, key = e.get("round"), e["time"], f"{e['event']} {e['direction']}"
        if r not in timed:
            continue
        m = marks.setdefault(r, {})
        if key == "check_client_resource out":
            m.setdefault(key, t)
        elif key == "request_update out":
            m.setdefault("first request_update out", t)
        elif key in ("check_client_resource_done in", "upload_started in", "client_update in"):
            m[f"last {key}"] = t
        elif key == "round_committed local":
            m["round_committed"] = t
    for r, m in marks.items():
        if r + 1 in starts:
            m["next check_client_resource out"] = starts[r + 1]
    out: dict[str, float] = {}
    for name, a, b in PHASES:
        spans = [m[b] - m[a] for m in marks.values() if a in m and b in m]
        if spans:
            out[name] = statistics.median(spans)
    return out


# ------------------------------------------------------------------------------------------------ Flower


def flower_arrays(model: str):
    return [t.numpy() for t in state_dict_of(model).values()]


def flower_server(args) -> None:
    """A child process: Flower's legacy gRPC server with FedAvg, recording each round's start."""
    import flwr as fl
    from flwr.common import ndarrays_to_parameters

    starts: dict[int, float] = {}

    class Timed(fl.server.strategy.FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):
            starts.setdefault(server_round, time.time())
            return super().configure_fit(server_round, parameters, client_manager)

    arrays = flower_arrays(args.flower_model)
    strategy = Timed(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=args.flower_clients,
                     min_available_clients=args.flower_clients, initial_parameters=ndarrays_to_parameters(arrays))
    del arrays
    print("flower server ready", flush=True)
    fl.server.start_server(server_address=f"127.0.0.1:{args.flower_port}",
                           config=fl.server.ServerConfig(num_rounds=args.rounds + 1), strategy=strategy,
                           grpc_max_message_length=1 << 30)
    starts.setdefault(args.rounds + 2, time.time())  # the end of the last round
    Path(args.flower_out).write_text(json.dumps({str(r): t for r, t in starts.items()}))


def flower_client(args) -> None:
    import flwr as fl
    import numpy as np

    class NoOp(fl.client.NumPyClient):
        def get_parameters(self, config):
            return flower_arrays(args.flower_model)

        def fit(self, parameters, config):  # the same no-op as fedplug's plugin: the received weights + 1e-3
            return [p + np.asarray(1e-3, dtype=p.dtype) if p.dtype.kind == "f" else p for p in parameters], 1, {}

        def evaluate(self, parameters, config):
            return 0.0, 1, {}

    fl.client.start_client(server_address=f"127.0.0.1:{args.flower_port}", client=NoOp().to_client(),
                           grpc_max_message_length=1 << 30)


def wait_for_port(port: int, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            return  # it died: the caller reports its exit status and log
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the Flower server did not listen on port {port} within {timeout:g} s")


def run_flower(model: str, k: int, args, root: Path) -> dict:
    python = args.flower_python or sys.executable
    check = subprocess.run([python, "-c", "import flwr; print(flwr.__version__)"], capture_output=True, text=True)
    if check.returncode != 0:
        raise SystemExit(f"--peer flower: flwr cannot be imported by {python}: pip install flwr (into that "
                         "interpreter's environment; fedplug itself never needs it), or pass "
                         "--flower-python /path/to/a/python/with/flwr")
    version = check.stdout.strip()
    port = free_port()
    out = root / "flower_rounds.json"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(args.threads), GRPC_VERBOSITY="ERROR")
    me = [python, str(Path(__file__).resolve()), "--flower-model", model, "--flower-port", str(port),
          "--flower-clients", str(k), "--rounds", str(args.rounds), "--flower-out", str(out)]
    slog = open(root / "flower_server.out", "w")
    server = subprocess.Popen(me + ["--flower-role", "server"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env)
    watch = Watch({"server": server.pid})
    watch.start()
    baseline: dict[str, int] = {}

    def read_server() -> None:
        for line in server.stdout:
            slog.write(line)
            if "[ROUND 1]" in line and "server" not in baseline:
                baseline["server"] = watch.start_rounds("server")

    reader = threading.Thread(target=read_server, daemon=True)
    reader.start()
    clients = []
    try:
        wait_for_port(port, server, args.timeout)  # Flower's legacy client gives up on a refused connection
        for i in range(k):
            p = subprocess.Popen(me + ["--flower-role", "client"], stdout=open(root / f"flower_c{i}.out", "w"),
                                 stderr=subprocess.STDOUT, env=env)
            clients.append(p)
            watch.pids[f"c{i}"] = p.pid
        server.wait(timeout=args.timeout)
        for p in clients:
            p.wait(timeout=120)
    finally:
        watch.stop.set()
        for p in [server, *clients]:
            if p.poll() is None:
                p.kill()
                p.wait()
        reader.join(timeout=5)
        slog.close()
    if server.returncode != 0 or not out.exists():
        raise RuntimeError(f"the Flower server exited {server.returncode}; see {root / 'flower_server.out'}:\n"
                           + (root / "flower_server.out").read_text()[-3000:])
    starts = {int(r): t for r, t in json.loads(out.read_text()).items()}
    s_round, times = median_round(starts, args.rounds)
    client_peaks = [v for n, v in watch.peak.items() if n != "server"]
    return {"system": f"flower {version}", "s_per_round": s_round, "rounds_timed": len(times),
            "server_peak_mb": watch.peak.get("server", 0) / MIB,
            "server_growth_mb": growth(watch, baseline),
            "client_peak_mb": max(client_peaks) / MIB if client_peaks else None}


# ------------------------------------------------------------------------------------------------ main


def fmt(v, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for model in models:
        for system, style in (("fedplug", "o-"), ("flower", "s--"), ("floor", ":")):
            pts = sorted((r["clients"], r) for r in rows if r["model"] == model and r["system"].startswith(system))
            if not pts:
                continue
            ks = [k for k, _ in pts]
            axes[0].plot(ks, [r["s_per_round"] for _, r in pts], style, label=f"{system} {model}")
            growth = [(k, r["server_growth_x_model"]) for k, r in pts if r.get("server_growth_x_model") is not None]
            if growth and system != "floor":
                axes[1].plot([k for k, _ in growth], [g for _, g in growth], style, label=f"{system} {model}")
    for ax in axes:
        ax.set_xticks(sorted({r["clients"] for r in rows}))
    axes[0].set(xlabel="clients K", ylabel="s / round (median of rounds 2..N)", title="round time", yscale="log")
    axes[1].set(xlabel="clients K", ylabel="server RSS growth / model size", title="server memory during rounds")
    axes[1].axhline(3, color="grey", lw=0.8, ls="--")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["mobilenet"])
    parser.add_argument("--clients", nargs="+", type=int, default=[2, 5], help="K values (default 2 5)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds 2..N are N-1 rounds (default N=3); "
                        "one more round runs (evaluating) and is not timed")
    parser.add_argument("--peer", choices=["none", "flower"], default="none")
    parser.add_argument("--flower-python", help="the interpreter with flwr installed (default: this one)")
    parser.add_argument("--codec", default="none", help="fedplug's codec=... for the uploads (default none)")
    parser.add_argument("--chunk-kb", type=int, default=1024, help="server.chunk_kb (default 1024)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one run may take (default 1800)")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    parser.add_argument("--tag", default="transport")
    parser.add_argument("--flower-role", choices=["server", "client"], help=argparse.SUPPRESS)
    parser.add_argument("--flower-model", help=argparse.SUPPRESS)
    parser.add_argument("--flower-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--flower-clients", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--flower-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.flower_role == "server":
        flower_server(args)
        return 0
    if args.flower_role == "client":
        flower_client(args)
        return 0
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (round 1 is a warm-up and is not timed)")
    if any(k < 1 for k in args.clients):
        parser.error("--clients values must be >= 1")
    if sys.platform != "linux":
        parser.error("this benchmark reads peak memory from /proc: run it on Linux")

    import torch

    from fedplug.wire import encode_state

    torch.set_num_threads(max(1, args.threads))
    rows: list[dict] = []
    started = time.time()
    for model in args.models:
        state = state_dict_of(model)
        model_bytes = sum(t.numel() * t.element_size() for t in state.values())
        broadcast = len(encode_state(state))
        print(f"\n{model}: {sum(t.numel() for t in state.values()) / 1e6:.1f} M values, "
              f"{model_bytes / MIB:.1f} MiB", flush=True)
        for k in args.clients:
            floor = measure_floor(state, k)
            base = {"model": model, "clients": k, "model_mb": model_bytes / MIB, "floor_s": floor}
            rows.append({**base, "system": "floor", "s_per_round": floor})
            results = []
            with tempfile.TemporaryDirectory(prefix=f"bench-transport-{model}-{k}-") as tmp:
                print(f"  K={k}: fedplug ...", flush=True)
                results.append(run_fedplug(model, k, args, Path(tmp), broadcast, model_bytes))
            if args.peer == "flower":
                with tempfile.TemporaryDirectory(prefix=f"bench-transport-flower-{model}-{k}-") as tmp:
                    print(f"  K={k}: Flower ...", flush=True)
                    results.append(run_flower(model, k, args, Path(tmp)))
            for r in results:
                growth = r.get("server_growth_mb")
                rows.append({**base, **r, "x_floor": r["s_per_round"] / floor,
                             "server_growth_x_model": growth / (model_bytes / MIB) if growth is not None else None})
            if args.peer == "flower":
                rows[-2]["flower_over_fedplug"] = rows[-1]["s_per_round"] / rows[-2]["s_per_round"]
        del state

    header = (f"{'model':<10}{'K':>3}  {'system':<14}{'s/round':>9}{'x floor':>9}{'server peak':>13}"
              f"{'growth':>9}{'x model':>9}{'client peak':>13}{'up MB/rnd':>11}{'down MB/rnd':>12}")
    lines = ["", header]
    for r in rows:
        if r["system"] == "floor":
            lines.append(f"{r['model']:<10}{r['clients']:>3}  {'floor':<14}{r['s_per_round']:>9.3f}")
            continue
        lines.append(
            f"{r['model']:<10}{r['clients']:>3}  {r['system']:<14}{r['s_per_round']:>9.2f}{r['x_floor']:>9.1f}"
            f"{fmt(r['server_peak_mb'], '.0f'):>10} MB{fmt(r.get('server_growth_mb'), '.0f'):>6} MB"
            f"{fmt(r.get('server_growth_x_model'), '.1f'):>9}{fmt(r.get('client_peak_mb'), '.0f'):>10} MB"
            f"{fmt(r.get('up_bytes_per_round') and r['up_bytes_per_round'] / 1e6, '.1f'):>11}"
            f"{fmt(r.get('down_bytes_per_round') and r['down_bytes_per_round'] / 1e6, '.1f'):>12}")
        if r.get("phases"):
            lines.append(f"{'':<15}where the round goes (median s): "
                         + ", ".join(f"{n} {v:.2f}" for n, v in r["phases"].items()))
        if r.get("flower_over_fedplug"):
            lines.append(f"{'':<15}Flower / fedplug s/round: {r['flower_over_fedplug']:.2f}x")
    command = "python benchmarks/bench_transport.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines += ["", f"s/round: median of rounds 2..{args.rounds}, round start to next round start; the floor is "
              f"memcpy K x the model + a weighted mean of K state dicts, in this process.",
              f"codec={args.codec}, server.chunk_kb={args.chunk_kb}, {args.threads} torch thread(s) per process, "
              f"{os.cpu_count()} CPUs, load average at the end {os.getloadavg()[0]:.1f}; "
              f"took {time.time() - started:.0f} s", f"command: {command}"]
    text = "\n".join(lines)
    print(text)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    fields = ["model", "clients", "system", "s_per_round", "floor_s", "x_floor", "flower_over_fedplug", "model_mb",
              "server_peak_mb", "server_growth_mb", "server_growth_x_model", "client_peak_mb",
              "up_bytes_per_round", "down_bytes_per_round", "up_chunks_per_round", "rounds_timed"]
    with open(args.out_dir / f"{args.tag}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (args.out_dir / f"{args.tag}.txt").write_text(text + "\n")
    plot(rows, args.out_dir / f"{args.tag}.png")
    print(f"wrote {args.out_dir / (args.tag + '.csv')}, .txt and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
