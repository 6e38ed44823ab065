"""Time of ``RunOutputs.commit_round`` (a round's checkpoints, resume point and metrics row) per model size.

    python benchmarks/bench_commit_round.py [--model-mb 2.3 40] [--rounds 8] [--dir /tmp/bench-commit]

What it shows: the disk cost the server pays once per round, after aggregation
and evaluation, for writing a round as one durable unit (round-numbered files,
fsynced, then the manifest switched) compared with the raw cost of writing the
model's bytes once with an fsync (the floor, measured in the same run on the
same file system).  Every other round is "best", so half the rounds also move
``best.safetensors``; the aggregator state is a momentum-like copy of the model
(as FedAvgM/FedAdam keep), the worst case for the resume point.

The figures are medians over ``--rounds`` rounds after one warm-up round; the
directory is on the file system of ``--dir`` (pick the disk your runs use: an
fsync on tmpfs is free, on a network disk it is not).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

import torch

from fedplug.outputs import RunOutputs
from fedplug.types import RoundRecord


def _model(mb: float) -> dict[str, torch.Tensor]:
    numel = int(mb * 1024 * 1024 / 4)
    # a few layers of mixed sizes, as a detector has, plus an integer buffer
    sizes = [numel // 2, numel // 4, numel // 8, numel - numel // 2 - numel // 4 - numel // 8]
    state = {f"layer{i}.weight": torch.randn(n) for i, n in enumerate(sizes)}
    state["bn.num_batches_tracked"] = torch.tensor(7)
    return state


def _floor(directory: Path, data: bytes, repeats: int) -> float:
    """Seconds to write ``data`` once and fsync it: what any durable checkpoint costs."""
    times = []
    for i in range(repeats):
        path = directory / f"floor_{i}.bin"
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        times.append(time.perf_counter() - t0)
        path.unlink()
    return statistics.median(times)


def bench(model_mb: float, rounds: int, root: Path) -> dict:
    from fedplug.wire import encode_state

    run_dir = root / f"model_{model_mb:g}mb"
    shutil.rmtree(run_dir, ignore_errors=True)
    outputs = RunOutputs(run_dir)
    weights = _model(model_mb)
    state = {f"m/{k}": v.clone() for k, v in weights.items() if v.is_floating_point()}
    state["step"] = 0
    history: list[RoundRecord] = []
    times = []
    best = {"round": None, "map50": None, "test_loss": None}
    for n in range(1, rounds + 2):
        record = RoundRecord(round_number=n, participants=("a", "b", "c"), train_loss=1.0 / n, test_loss=0.5,
                             map50=0.1 * n if n % 2 else 0.0, recall=0.5, seconds=1.0)
        history.append(record)
        is_best = n % 2 == 1
        if is_best:
            best = {"round": n, "map50": record.map50, "test_loss": record.test_loss}
        meta = {"round": n, "map50": record.map50, "test_loss": record.test_loss, "model": "bench"}
        t0 = time.perf_counter()
        outputs.commit_round(record, weights, meta, is_best, state, history, best)
        if n > 1:  # the first round pays for creating files and directories once
            times.append(time.perf_counter() - t0)
    floor = _floor(run_dir, encode_state(weights), repeats=3)
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"model_mb": model_mb, "commit_s": statistics.median(times), "floor_s": floor}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-mb", type=float, nargs="+", default=[2.3, 40.0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/bench-commit"))
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{'model_MB':>8}  {'commit_round_s':>14}  {'write+fsync_floor_s':>19}  {'ratio':>5}")
    for mb in args.model_mb:
        r = bench(mb, args.rounds, args.dir)
        print(f"{r['model_mb']:>8.1f}  {r['commit_s']:>14.4f}  {r['floor_s']:>19.4f}  "
              f"{r['commit_s'] / r['floor_s']:>5.1f}")
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
