"""Server peak memory of aggregation vs the number of clients, as ratios of one model's size.

    python benchmarks/bench_aggregation_memory.py [--clients 2 8 32] [--model-mb 10]
        [--aggregators fedavg fedadam fedmedian]

What it shows: FedAvg (and every streaming aggregator) consumes the round's
updates as a stream with one float64 accumulator, so its peak memory stays a
constant multiple of the model however many clients report; a buffering
aggregator (``fedmedian``, whose definition needs every update) grows linearly.

How it measures: each figure comes from a fresh child process (so one
measurement's freed-but-cached memory cannot hide another's).  The child
builds a global model state of ``--model-mb`` float32 megabytes, resets the
kernel's peak-RSS mark (``/proc/self/clear_refs``, Linux), runs one
aggregation whose updates are produced lazily, one at a time, as the server's
stream delivers them, and reports the peak resident memory above the level
before aggregation (``VmHWM - VmRSS``).  The floor is measured the same way
in the same run: the peak of materialising ONE update (one model's worth of
tensors).  tracemalloc cannot be used: torch's CPU allocator bypasses
Python's allocator, so tracemalloc sees none of the tensor memory.

Expected for fedavg: about 3-4 floors at every client count (the float64
running mean is 2 floors, the update being received 1, the result 1, while
the float64 mean is freed tensor by tensor as the result is built).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (this benchmark needs Linux)")


def _reset_peak() -> int:
    """Reset the peak-RSS mark to the current RSS; return that level in kB."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    rss, hwm = _status_kb("VmRSS"), _status_kb("VmHWM")
    if hwm > rss + 1024:
        raise RuntimeError("could not reset the peak-RSS mark (/proc/self/clear_refs); run on Linux >= 4.0")
    return rss


def _model(model_mb: float):
    """A detector-like state: conv weights of a few sizes plus BatchNorm buffers, ``model_mb`` MB of float32."""
    import torch

    g = torch.Generator().manual_seed(0)
    state, total, i = {}, 0, 0
    target = int(model_mb * 1e6)
    while total < target:
        channels = (64, 128, 256)[i % 3]
        numel = min(channels * channels * 9, max((target - total) // 4, 1))
        state[f"layer{i}.conv.weight"] = torch.randn(numel, generator=g) * 0.05
        state[f"layer{i}.bn.weight"] = torch.ones(channels)
        state[f"layer{i}.bn.bias"] = torch.zeros(channels)
        state[f"layer{i}.bn.running_mean"] = torch.zeros(channels)
        state[f"layer{i}.bn.running_var"] = torch.ones(channels)
        state[f"layer{i}.bn.num_batches_tracked"] = torch.tensor(0)
        total += 4 * (numel + 4 * channels) + 8
        i += 1
    return state, total


def _child(aggregator: str, clients: int, model_mb: float) -> dict:
    import torch

    torch.set_num_threads(1)
    from fedplug.plugins import load_plugin, new_manager
    from fedplug.types import ClientUpdate

    global_weights, model_bytes = _model(model_mb)

    def client_update(i: int) -> ClientUpdate:
        # A fresh state per client, like a decoded update: every tensor moved a little.
        weights = {k: (v + 0.01 * (i + 1)) if v.is_floating_point() else v + 1 for k, v in global_weights.items()}
        return ClientUpdate(f"c{i}", 1, weights, 10 + i, 1.0)

    def stream():
        for i in range(clients):
            update = client_update(i)
            yield update
            del update  # the stream itself keeps nothing, as the server's does not

    import ctypes
    import gc

    gc.collect()
    try:  # hand freed heap pages back, so the measurement cannot reuse memory freed while building the model
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    before = _reset_peak()
    if aggregator == "floor":
        one = client_update(0)  # the floor: one model's worth of tensors, made the same way
        del one
    else:
        pm = new_manager()
        pm.register(load_plugin("aggregator", aggregator)[1], name=f"aggregator:{aggregator}")
        result = pm.hook.fedplug_aggregate(
            global_weights=global_weights, updates=stream(), round_number=1,
            config={"name": aggregator}, state={},
        )
        del result
    peak = _status_kb("VmHWM")
    return {"aggregator": aggregator, "clients": clients, "peak_bytes": (peak - before) * 1024,
            "model_bytes": model_bytes}


def _measure(aggregator: str, clients: int, model_mb: float) -> dict:
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", aggregator, str(clients), str(model_mb)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--model-mb", type=float, default=10.0)
    parser.add_argument("--aggregators", nargs="+", default=["fedavg", "fedadam", "fedmedian"])
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child[0], int(args.child[1]), float(args.child[2]))))
        return

    floor = _measure("floor", 1, args.model_mb)
    mb = floor["model_bytes"] / 1e6
    print(f"model: {mb:.1f} MB float32; floor (peak of materialising one update): "
          f"{floor['peak_bytes'] / 1e6:.1f} MB")
    header = f"{'aggregator':<12}" + "".join(f"{f'{n} clients':>14}" for n in args.clients)
    print("server peak memory during aggregation, in floors (one model):")
    print(header)
    for name in args.aggregators:
        row = [_measure(name, n, args.model_mb)["peak_bytes"] / floor["peak_bytes"] for n in args.clients]
        print(f"{name:<12}" + "".join(f"{r:>14.2f}" for r in row))


if __name__ == "__main__":
    main()
