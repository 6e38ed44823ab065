"""Each update codec's bytes on the wire and its effect on mAP, on the synthetic federation.

    python benchmarks/bench_codecs.py                                   # 3 clients, 4 rounds, every codec
    python benchmarks/bench_codecs.py --codecs none int8 topk --rounds 6 --topk-density 0.05
    python benchmarks/bench_codecs.py --smoke --out-dir /tmp/x          # tiny, to test the script

Each codec gets the same run of ``python -m fedplug`` (mode=embedded: the server and 3 client
processes on 127.0.0.1, real sockets, protocol v2): the default tiny Faster R-CNN on the synthetic
street-camera data (non-IID, seed 0), FedAvg, ``resource_policy=always``, with only ``codec=<name>``
changed.  Clients train with the same seeds, so ``none`` and the lossless ``zstd`` must give identical
mAP: a check of the benchmark itself.  Reported per codec: the mean bytes of one client update on the wire
(``client_update`` in events.jsonl: the encoded upload), its ratio to ``none``'s, the exact global mAP@0.5
after every round (metrics.jsonl; clients' test splits merged) and the final round's difference to
``none``'s.  The broadcast is the exact global model for every codec (codecs encode uploads only).

Outputs: ``<out-dir>/<tag>.csv`` (one row per codec and round) and ``<tag>.txt`` (the table and command).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CODECS = ["none", "fp16", "bf16", "int8", "topk", "zstd"]


def run_one(codec: str, args, root: Path, cache: Path) -> dict:
    run_dir = root / codec
    overrides = [
        f"codec={codec}", f"run.rounds={args.rounds}", f"run.seed={args.seed}",
        f"data.train_per_client={args.train_per_client}", f"data.test_per_client={args.test_per_client}",
        f"train.local_epochs={args.local_epochs}", "resource_policy=always", "dashboard.enabled=false",
        "ui.live=false", f"hydra.run.dir={run_dir}",
    ]
    if codec == "topk":
        overrides.append(f"codec.density={args.topk_density}")
    env = dict(os.environ, PYTHONUNBUFFERED="1", FEDPLUG_CACHE=str(cache))
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "fedplug", *overrides], capture_output=True, text=True, env=env,
                          cwd=root, timeout=args.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"codec={codec}: python -m fedplug exited {proc.returncode}:\n{proc.stdout[-3000:]}"
                           f"\n{proc.stderr[-2000:]}")
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines() if x.strip()]
    sizes = [e["bytes"] for e in events if e["event"] == "client_update" and e.get("ok") and e.get("bytes")]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {"codec": codec, "bytes_per_update": statistics.mean(sizes), "updates": len(sizes),
            "map50": [r.get("map50") for r in rows], "seconds": time.time() - started}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codecs", nargs="+", default=CODECS)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--train-per-client", type=int, default=24)
    parser.add_argument("--test-per-client", type=int, default=8)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--topk-density", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one run may take")
    parser.add_argument("--smoke", action="store_true", help="tiny: 1 round, 4 training images per client")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    parser.add_argument("--tag", default="codecs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.train_per_client, args.test_per_client = 1, 4, 2
    if "none" not in args.codecs:
        args.codecs = ["none", *args.codecs]  # the reference every ratio is taken against
    started = time.time()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-codecs-") as tmp:
        for codec in args.codecs:
            print(f"codec={codec} ...", flush=True)
            results.append(run_one(codec, args, Path(tmp), Path(tmp) / "cache"))
    ref = next(r for r in results if r["codec"] == "none")
    rounds = len(ref["map50"])
    head = f"{'codec':<8}{'bytes/update':>14}{'vs none':>9}" + "".join(f"{f'r{i + 1}':>8}" for i in range(rounds)) \
        + f"{'final - none':>14}{'run s':>8}"
    lines = ["", "exact global mAP@0.5 after each round, and the bytes of one client update", head]
    for r in results:
        final, base = r["map50"][-1], ref["map50"][-1]
        delta = "-" if final is None or base is None else f"{final - base:+.4f}"
        lines.append(f"{r['codec']:<8}{r['bytes_per_update']:>14,.0f}{r['bytes_per_update'] / ref['bytes_per_update']:>9.3f}"
                     + "".join(f"{m:>8.4f}" if m is not None else f"{'-':>8}" for m in r["map50"])
                     + f"{delta:>14}{r['seconds']:>8.0f}")
    command = "python benchmarks/bench_codecs.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines += ["", f"3 clients (synthetic, non-IID), tiny Faster R-CNN, {args.rounds} rounds x {args.local_epochs} local "
              f"epoch(s), {args.train_per_client} training / {args.test_per_client} test images per client, seed "
              f"{args.seed}; topk density {args.topk_density}. Took {time.time() - started:.0f} s.",
              f"command: {command}"]
    text = "\n".join(lines)
    print(text)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with open(args.out_dir / f"{args.tag}.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["codec", "round", "map50", "bytes_per_update", "bytes_vs_none"])
        for r in results:
            for i, m in enumerate(r["map50"]):
                writer.writerow([r["codec"], i + 1, m, round(r["bytes_per_update"]),
                                 round(r["bytes_per_update"] / ref["bytes_per_update"], 4)])
    (args.out_dir / f"{args.tag}.txt").write_text(text + "\n")
    print(f"wrote {args.out_dir / (args.tag + '.csv')} and .txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
