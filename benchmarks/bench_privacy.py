"""mAP against epsilon: FedAvg vs DP-FedAvg at a few noise levels, and local DP, on the synthetic data.

    python benchmarks/bench_privacy.py [--rounds 6] [--clients 3] [--noise 0.1 0.5 1.0] [--local-noise 0.1]
        [--clip auto|<C>] [--no-baseline] [--delta 1e-5] [--threads 2] [--out-dir benchmarks/results] [--tag T]
        [--smoke]

What runs.  The same simulated federation as ``bench_fl_vs_central.py`` (its
helpers: one pool of synthetic street-camera images, whole cameras dealt to
``--clients`` clients, the tiny Faster R-CNN, clients trained one after the
other in this process) with the code a real run uses for privacy: the
aggregator plugin (``fedavg``, ``dp_fedavg``, ``ldp_fedavg``), its round
settings turned into each client's update filter (``fedplug.update_filter``:
``dp_local`` clips and noises on the "client"), and the server's
``PrivacyLedger`` for epsilon (opacus RDP, ``privacy.sample_rate`` 1: every
client in every round).

The clip norm.  ``--clip auto`` runs plain FedAvg first and takes the median
L2 norm of the clients' round-1 update deltas as ``C`` for every DP setting
(the usual tuning practice; that choice itself is not private).

Outputs (``--out-dir``): ``privacy_frcnn.csv`` (setting, round, epsilon,
mAP@0.5, recall, test loss) and ``privacy_frcnn.txt`` (the printed summary).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_fl_vs_central as fl  # noqa: E402  (its data pool, camera groups and federated evaluation)

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="mAP against epsilon for FedAvg, DP-FedAvg and local DP (simulated).")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--noise", type=float, nargs="*", default=[0.1, 0.5, 1.0], help="DP-FedAvg noise multipliers")
    p.add_argument("--local-noise", type=float, nargs="*", default=[0.1], help="local-DP noise multipliers")
    p.add_argument("--clip", default="auto", help="clip norm C, or auto (median round-1 update norm of FedAvg)")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the plain FedAvg run (needs a numeric --clip; e.g. to add noise levels to a past run)")
    p.add_argument("--tag", default="", help="suffix of the output names: privacy_frcnn_<tag>.*")
    p.add_argument("--smoke", action="store_true", help="1 round, 2 train + 1 test images per camera")
    args = p.parse_args(argv)
    args.model, args.local_epochs, args.cameras = "frcnn", 1, 10
    args.train_per_camera, args.test_per_camera, args.image_size, args.class_skew = 24, 8, 128, 0.7
    args.grouping, args.aggregator, args.lr, args.batch_size = "roundrobin", "fedavg", None, None
    args.no_augment, args.device, args.seed, args.data_root = False, "cpu", 0, None
    if args.smoke:
        args.rounds, args.train_per_camera, args.test_per_camera = 1, 2, 1
    if args.clip != "auto":
        try:
            args.clip = float(args.clip)
        except ValueError:
            p.error(f"--clip must be auto or a number > 0, got {args.clip!r}")
        if not args.clip > 0:
            p.error(f"--clip must be > 0, got {args.clip}")
    if args.no_baseline and args.clip == "auto":
        p.error("--no-baseline needs a numeric --clip (auto measures it in the baseline run)")
    if args.rounds < 1 or not 1 <= args.clients <= args.cameras:
        p.error(f"--rounds must be >= 1 and --clients between 1 and {args.cameras}")
    return args


def run(name: str, agg_cfg: dict, hook, build, pool, groups, settings, eval_settings, args, log) -> tuple[list, list]:
    """One federation; returns (rows, round-1 update norms)."""
    from fedplug.plugins import activate
    from fedplug.privacy.clipping import delta_of, l2_norm
    from fedplug.privacy.ledger import PrivacyLedger
    from fedplug.types import ClientUpdate
    from fedplug.update_filter import apply_update_filter

    plugins = activate({"aggregator": agg_cfg["name"]}, observers=False)
    agg = plugins.hook
    ledger = PrivacyLedger({"delta": args.delta}, plugins, agg_cfg, last_round=args.rounds)
    model = build()
    train = [fl.concat([pool.train[c] for c in cams]) for cams in groups]
    test = [fl.concat([pool.test[c] for c in cams]) for cams in groups]
    global_w = fl._clone_state(model)
    state: dict = {}
    rows, norms = [], []
    names = {f.name for f in dataclasses.fields(settings)}
    for r in range(1, args.rounds + 1):
        extra = dict(agg.fedplug_aggregator_round_settings(round_number=r, config=agg_cfg) or {})
        rs = dataclasses.replace(settings, round_number=r, **{k: v for k, v in extra.items() if k in names},
                                 extra={**settings.extra, **{k: v for k, v in extra.items() if k not in names}})

        def updates():
            for k, data in enumerate(train):
                model.load_state_dict(global_w)
                res = hook.fedplug_train_round(model=model, dataset=data,
                                               settings=dataclasses.replace(rs, seed=args.seed * 1000 + k),
                                               global_weights=global_w, state={})
                if not res.ok:
                    log(f"  {name} round {r}: client {k} failed: {res.reason}")
                    continue
                if r == 1:
                    norms.append(l2_norm(delta_of(res.weights, global_w)))
                res = apply_update_filter(res, global_w, rs)  # what the client would send
                yield ClientUpdate(f"client_{k}", r, res.weights, res.num_examples, res.train_loss)

        global_w = agg.fedplug_aggregate(global_weights=global_w, updates=updates(), round_number=r,
                                         config=agg_cfg, state=state)
        spent = ledger.spend(r)
        model.load_state_dict(global_w)
        ev = fl.evaluate_global(hook, model, test, eval_settings)
        eps = spent.get("epsilon", math.inf)
        rows.append({"setting": name, "round": r, "epsilon": eps, **ev})
        log(f"  {name:14s} round {r}: epsilon {eps:8.3f}  mAP@0.5 {ev['map50']:.3f}  recall {ev['recall']:.3f}  "
            f"test loss {ev['test_loss']:.3f}")
    return rows, norms


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from fedplug.plugins import activate
    from fedplug.types import EvalSettings

    lines: list[str] = []

    def log(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    t0 = time.monotonic()
    log("command: python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]))
    cfg = fl.compose_config(args)
    settings = fl.train_settings(cfg["train"], "cpu")
    eval_settings = EvalSettings(batch_size=8, device="cpu")
    hook = activate({"detector": "frcnn"}, observers=False).hook
    pool = fl.make_pool(args, cfg["data"].get("augment"))
    groups = fl.camera_groups(args.cameras, args.clients, "roundrobin")

    def build():
        return hook.fedplug_build_model(config=cfg["model"], class_names=fl.CLASSES)

    log(f"{args.clients} clients (cameras {groups}), {args.rounds} rounds, tiny frcnn, delta {args.delta}, "
        f"sample rate 1 (every client every round), RDP accountant")
    rows, norms = [], []
    if not args.no_baseline:
        rows, norms = run("fedavg", {"name": "fedavg"}, hook, build, pool, groups, settings, eval_settings, args, log)
    clip = statistics.median(norms) if args.clip == "auto" else args.clip
    log(f"round-1 update norms {[round(n, 3) for n in norms] or 'not measured'}; clip norm C = {clip:.4g}; "
        f"model of {sum(t.numel() for t in build().state_dict().values() if t.is_floating_point()):,} floats")
    for z in args.noise:
        cfg_dp = {"name": "dp_fedavg", "clip_norm": clip, "noise_multiplier": z, "expected_clients": args.clients}
        rows += run(f"dp_fedavg z={z:g}", cfg_dp, hook, build, pool, groups, settings, eval_settings, args, log)[0]
    for z in args.local_noise:
        cfg_ldp = {"name": "ldp_fedavg", "clip_norm": clip, "noise_multiplier": z}
        rows += run(f"ldp_fedavg z={z:g}", cfg_ldp, hook, build, pool, groups, settings, eval_settings, args, log)[0]

    log("\nfinal round: setting, epsilon (delta %g), mAP@0.5, recall" % args.delta)
    for name in dict.fromkeys(r["setting"] for r in rows):
        last = [r for r in rows if r["setting"] == name][-1]
        log(f"  {name:16s} epsilon {last['epsilon']:9.3f}  mAP@0.5 {last['map50']:.3f}  recall {last['recall']:.3f}")
    log(f"wall time {time.monotonic() - t0:.0f} s on {args.threads} thread(s)")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / ("privacy_frcnn" + ("_smoke" if args.smoke else "") + (f"_{args.tag}" if args.tag else ""))
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    stem.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem.with_suffix('.csv')}, {stem.with_suffix('.txt')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
