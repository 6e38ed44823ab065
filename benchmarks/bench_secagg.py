"""Secure aggregation's cost per round against plain FedAvg: time, server memory, bytes per client.

    python benchmarks/bench_secagg.py [--params 1000000] [--clients 5 10] [--degree 4] [--out-dir benchmarks/results]

For each client count N, one aggregation of N random model deltas of
``--params`` float32 parameters, in this one process:

* plain FedAvg: ``fedplug_plugins.aggregators.fedavg.fedavg`` over the N
  updates (the server's whole aggregation work);
* SecAgg+ (``fedplug.secagg.protocol``, complete graph or ``--degree``
  neighbours, threshold about half the neighbourhood): every client's work
  (keys, Shamir shares, masking: reported per client, as clients run in
  parallel in a real federation) and the server's (routing, summing, unmasking
  with one client dropped after its masked input, so a self-mask is recovered
  from shares).

Memory: the peak of traced allocations during the whole simulated SecAgg
round (``tracemalloc`` sees numpy's buffers; server and clients share this
process, so it is an upper bound of the server's: the server itself keeps one
uint64 running sum, and while unmasking a copy of it, one mask at a time and
the float64 result), and the FedAvg accumulator for comparison (one float64 per
parameter; ``bench_aggregation_memory.py`` measures FedAvg's whole peak).  Bytes: what one client uploads.  The figures
are a shared 2-core machine's; compare them with each other, not across runs.
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    from fedplug.secagg.protocol import SecAggClient, SecAggServer, fedavg_from_sum, fedavg_input
    from fedplug.types import ClientUpdate
    from fedplug_plugins.aggregators.fedavg import fedavg

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", type=int, default=1_000_000)
    p.add_argument("--clients", type=int, nargs="+", default=[5, 10])
    p.add_argument("--degree", type=int, default=None, help="SecAgg+ neighbours (even); default: all (SecAgg)")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    shown = sys.argv[1:] if argv is None else list(argv)
    lines = [f"command: python benchmarks/bench_secagg.py {' '.join(shown)}", f"model: {args.params:,} float32 parameters"]
    print(lines[-1])
    for n in args.clients:
        g = torch.Generator().manual_seed(n)
        global_w = {"w": torch.randn(args.params, generator=g)}
        trained = [{"w": global_w["w"] + 0.01 * torch.randn(args.params, generator=g)} for _ in range(n)]
        sizes = [10 + 5 * k for k in range(n)]
        t0 = time.perf_counter()
        plain = fedavg(global_w, [ClientUpdate(f"c{k}", 1, trained[k], sizes[k], 0.0) for k in range(n)])
        t_fedavg = time.perf_counter() - t0

        ids = [f"c{k:02d}" for k in range(n)]
        degree = args.degree if args.degree is not None and args.degree < n - 1 else n - 1
        threshold = max(2, degree // 2 + 1)
        inputs = {cid: fedavg_input(trained[k], global_w, sizes[k]) for k, cid in enumerate(ids)}
        length = len(inputs[ids[0]])
        server_s = client_s = 0.0
        tracemalloc.start()
        tracemalloc.reset_peak()
        t = time.perf_counter()
        server = SecAggServer(ids, length, threshold, degree=degree, graph_seed=0)
        setup = server.setup()
        server_s += time.perf_counter() - t
        clients, client_time = {}, dict.fromkeys(ids, 0.0)
        for cid in ids:
            t = time.perf_counter()
            clients[cid] = SecAggClient(cid, setup)
            msg = clients[cid].advertise_keys()
            client_time[cid] += time.perf_counter() - t
            t = time.perf_counter()
            server.receive_keys(msg)
            server_s += time.perf_counter() - t
        share_bytes = 0
        for cid in ids:
            t = time.perf_counter()
            env = clients[cid].share_keys(server.keys_for(cid))
            client_time[cid] += time.perf_counter() - t
            share_bytes = max(share_bytes, sum(len(e) for e in env.values()))
            t = time.perf_counter()
            server.receive_shares(cid, env)
            server_s += time.perf_counter() - t
        for cid in ids:
            t = time.perf_counter()
            y = clients[cid].masked_input(server.envelopes_for(cid), inputs[cid])
            client_time[cid] += time.perf_counter() - t
            t = time.perf_counter()
            server.receive_masked_input(cid, y)
            server_s += time.perf_counter() - t
            del y
        dropped = ids[-1]  # drops after its masked input: its self-mask comes back from the others' shares
        for cid in ids[:-1]:
            t = time.perf_counter()
            shares = clients[cid].unmask(server.survivors)
            client_time[cid] += time.perf_counter() - t
            t = time.perf_counter()
            server.receive_unmask(cid, shares)
            server_s += time.perf_counter() - t
        t = time.perf_counter()
        secure = fedavg_from_sum(server.unmasked_sum(), global_w)
        server_s += time.perf_counter() - t
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        error = float((secure["w"].double() - plain["w"].double()).abs().max())
        client_s = max(client_time.values())
        upload_plain = 4 * args.params
        upload_secagg = 8 * length + share_bytes + 64
        rows = [
            f"\n{n} clients (degree {degree}, threshold {threshold}; {dropped} drops before unmasking)",
            f"  plain FedAvg     server {t_fedavg:7.2f} s                      accumulator {8 * args.params / 1e6:7.1f} MB"
            f"   upload/client {upload_plain / 1e6:7.2f} MB",
            f"  SecAgg+ FedAvg   server {server_s:7.2f} s  slowest client {client_s:6.2f} s"
            f"   round peak {peak / 1e6:7.1f} MB   upload/client {upload_secagg / 1e6:7.2f} MB",
            f"  ratios: server time {server_s / t_fedavg:.1f}x, upload {upload_secagg / upload_plain:.2f}x; "
            f"max |SecAgg - FedAvg| = {error:.2e}",
        ]
        for line in rows:
            print(line, flush=True)
        lines += rows
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / "secagg.txt"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
