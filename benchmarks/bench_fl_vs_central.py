"""Centralised training vs FedAvg with 3 and 10 clients, on the same non-IID data and epoch budget.

    python benchmarks/bench_fl_vs_central.py [--model frcnn|yolov3] [--rounds 6] [--local-epochs 1]
        [--cameras 10] [--train-per-camera 24] [--test-per-camera 8] [--clients 3 10]
        [--threads 2] [--seed 0] [--out-dir benchmarks/results] [--smoke]

What it compares.  One fixed pool of synthetic street-camera images
(:func:`fedplug.data.generate_synthetic_federation`: ``--cameras`` VOC folders,
camera ``i`` drawing ``--class-skew`` of its objects from class ``i mod 3``
plus its own background palette) is generated once and trained on in three
ways:

* ``central``: one model trained on the union of every camera's training
  images; one "round" is ``--local-epochs`` epochs over the union, and the
  optimiser state carries over from round to round (that is what centralised
  training is);
* ``fedavg-3`` / ``fedavg-10`` (``--clients``): the cameras are dealt to N
  clients, whole cameras only, so every setting partitions the *same* images.
  ``--grouping roundrobin`` (default) gives camera ``i`` to client ``i mod N``:
  with 3 clients and 3 classes that groups the cameras by their dominant
  class (strongly non-IID), with 10 clients each client is one camera;
  ``--grouping contiguous`` gives cameras 0-3 / 4-6 / 7-9.  Every round each
  client trains ``--local-epochs`` epochs on its own images from the global
  model, then ``--aggregator`` (FedAvg) combines the updates.

So after round ``r`` every setting has made ``r × local_epochs`` passes over
the same images, with the same batch size, learning rate and optimiser (the
model's defaults from ``conf/model/<model>.yaml``), and with equal batch
counts per pass when the image counts divide by the batch size.

How it evaluates.  After every round (round 0 is the initial model) the global
model is evaluated on the union of all cameras' test splits with the project's
exact federated metric: each client evaluates its own test split through the
detector's ``fedplug_evaluate`` hook, the per-class statistics are merged
(``DetectionStats.merge``) and summarised (:func:`fedplug.metrics.summarize`),
which equals a centralised evaluation of the same model over all test images.
The figures: Pascal-VOC mAP@0.5, recall, COCO mAP@[.5:.95] and the test loss
(test-size-weighted mean).

Simulated federation: everything runs in this one process and the clients
train one after another on the same CPU threads (no sockets, no client
processes); the learning is the same as in ``python -m fedplug``, the wall
times are not a deployment's.

Outputs (``--out-dir``): ``fl_vs_central_<model>.csv`` (one row per setting and
round), ``fl_vs_central_<model>.png`` (mAP@0.5, recall and test loss per round;
needs matplotlib, otherwise skipped with a message) and
``fl_vs_central_<model>.txt`` (the printed summary, with the command line);
``--tag`` adds a suffix to those names.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

CLASSES = ("car", "person", "sign")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
CSV_FIELDS = (
    "model", "setting", "clients", "round", "epochs_over_data", "map50", "recall", "coco_map",
    "test_loss", "train_loss", "failed_updates", "train_seconds", "eval_seconds",
)


# ----------------------------------------------------------------------------- arguments


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Centralised training vs FedAvg with 3 and 10 clients on the same synthetic non-IID data "
        "and the same total number of local epochs (simulated federation, in one process).",
    )
    p.add_argument("--model", choices=("frcnn", "yolov3"), default="frcnn",
                   help="detector, with its conf/model/<model>.yaml defaults (tiny Faster R-CNN / YOLOv3 nano)")
    p.add_argument("--rounds", type=int, default=6, help="rounds (for central: blocks of --local-epochs epochs)")
    p.add_argument("--local-epochs", type=int, default=1, help="local epochs per round (every setting)")
    p.add_argument("--cameras", type=int, default=10, help="camera folders in the image pool")
    p.add_argument("--train-per-camera", type=int, default=24, help="training images per camera")
    p.add_argument("--test-per-camera", type=int, default=8, help="test images per camera")
    p.add_argument("--image-size", type=int, default=128, help="synthetic image side in px")
    p.add_argument("--class-skew", type=float, default=0.7,
                   help="share of each camera's objects from its dominant class (0 = no skew)")
    p.add_argument("--clients", type=int, nargs="+", default=[3, 10], help="federation sizes to compare")
    p.add_argument("--grouping", choices=("roundrobin", "contiguous"), default="roundrobin",
                   help="how cameras are dealt to clients (see the module docstring)")
    p.add_argument("--aggregator", default="fedavg", help="aggregator plugin for the federated settings")
    p.add_argument("--no-central", action="store_true", help="skip the centralised setting")
    p.add_argument("--lr", type=float, default=None, help="override the model's train.lr")
    p.add_argument("--batch-size", type=int, default=None, help="override the model's train.batch_size")
    p.add_argument("--no-augment", action="store_true", help="no training augmentation (default: data=synthetic's)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0, help="data, initial weights and shuffling")
    p.add_argument("--data-root", type=Path, default=None,
                   help="where the synthetic images go (default: $FEDPLUG_CACHE or ~/.cache/fedplug, "
                   "subfolder bench_fl_vs_central/<parameters>)")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where the CSV/PNG/TXT go")
    p.add_argument("--tag", default="", help="suffix of the output names: fl_vs_central_<model>_<tag>.*")
    p.add_argument("--smoke", action="store_true",
                   help="tiny run to test the script: 1 round, 2 train + 1 test images per camera")
    args = p.parse_args(argv)
    if args.smoke:
        args.rounds, args.train_per_camera, args.test_per_camera = 1, 2, 1
    problems = []
    for key in ("rounds", "local_epochs", "cameras", "train_per_camera", "threads"):
        if getattr(args, key) < 1:
            problems.append(f"--{key.replace('_', '-')} must be >= 1")
    if args.test_per_camera < 1:
        problems.append("--test-per-camera must be >= 1 (the benchmark evaluates on the test images)")
    bad = [n for n in args.clients if not 1 <= n <= args.cameras]
    if bad:
        problems.append(f"--clients {bad}: each must be between 1 and --cameras ({args.cameras}), "
                        "because clients receive whole cameras")
    if problems:
        p.error("; ".join(problems))
    return args


# ----------------------------------------------------------------------------- configuration


def compose_config(args: argparse.Namespace) -> dict:
    """The config ``python -m fedplug model=<model> aggregator=<aggregator>`` composes, resolved, as a dict.

    Hydra's compose API over the packaged ``fedplug.conf``, with ``run.seed``
    and ``run.rounds`` set to the benchmark's (a run-wide lr schedule such as
    YOLOv3's cosine spans ``run.rounds``), then the flags.
    """
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    overrides = [f"model={args.model}", f"aggregator={args.aggregator}", "data=synthetic",
                 f"run.seed={args.seed}", f"run.rounds={args.rounds}", f"train.local_epochs={args.local_epochs}"]
    if args.lr is not None:
        overrides.append(f"train.lr={args.lr}")
    if args.batch_size is not None:
        overrides.append(f"train.batch_size={args.batch_size}")
    with initialize_config_module(config_module="fedplug.conf", version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def train_settings(train: Mapping[str, Any], device: str):
    from fedplug.types import TrainSettings

    names = {f.name for f in dataclasses.fields(TrainSettings)}
    known = {k: v for k, v in train.items() if k in names}
    extra = {k: v for k, v in train.items() if k not in names}
    return TrainSettings(round_number=1, device=device, extra=extra, **known)


def data_root(args: argparse.Namespace) -> Path:
    if args.data_root is not None:
        return args.data_root
    cache = Path(os.environ.get("FEDPLUG_CACHE", Path.home() / ".cache" / "fedplug"))
    name = (f"c{args.cameras}_n{args.train_per_camera}_t{args.test_per_camera}_px{args.image_size}"
            f"_k{args.class_skew:g}_s{args.seed}")
    return cache / "bench_fl_vs_central" / name


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass
class Pool:
    """The fixed image pool: per camera, its training split (augmented) and its test split."""

    train: list  # DetectionDataset per camera
    test: list


def make_pool(args: argparse.Namespace, augment: Mapping | None) -> Pool:
    from fedplug.data import generate_synthetic_federation, open_client_data

    folders = generate_synthetic_federation(
        data_root(args), num_clients=args.cameras, train_per_client=args.train_per_camera,
        test_per_client=args.test_per_camera, image_size=args.image_size, seed=args.seed,
        classes=CLASSES, class_skew=args.class_skew,
    )
    opened = [open_client_data({"format": "voc", "path": str(f)}, CLASSES, augment) for f in folders]
    return Pool(train=[d.train for d in opened], test=[d.test for d in opened])


def camera_groups(num_cameras: int, num_clients: int, grouping: str) -> list[list[int]]:
    """Which cameras each client holds; every camera goes to exactly one client."""
    if grouping == "roundrobin":
        return [list(range(k, num_cameras, num_clients)) for k in range(num_clients)]
    # np.array_split's sizes (larger parts first), e.g. 10 cameras / 3 clients = 0-3, 4-6, 7-9
    sizes = [num_cameras // num_clients + (1 if k < num_cameras % num_clients else 0) for k in range(num_clients)]
    bounds = [sum(sizes[:k]) for k in range(num_clients + 1)]
    return [list(range(bounds[k], bounds[k + 1])) for k in range(num_clients)]


def concat(datasets: Sequence) -> Any:
    import torch

    return datasets[0] if len(datasets) == 1 else torch.utils.data.ConcatDataset(list(datasets))


def class_table(pool: Pool, groups: Sequence[Sequence[int]], names: Sequence[str]) -> str:
    """Each client's training images and objects per class (shows how non-IID the split is)."""
    from fedplug.data.partition import describe_partition

    labels, parts = [], []
    for cams in groups:
        start = len(labels)
        for c in cams:
            ds = pool.train[c]
            labels.extend(ds.image_labels(i) for i in range(len(ds)))
        parts.append(list(range(start, len(labels))))
    return describe_partition(labels, parts, CLASSES, names)


# ----------------------------------------------------------------------------- evaluation


def evaluate_global(hook, model, test_sets: Sequence, eval_settings) -> dict[str, float]:
    """Each client's test split evaluated, statistics merged: the exact figures over the union."""
    from fedplug import metrics

    t0 = time.monotonic()
    results = [hook.fedplug_evaluate(model=model, dataset=ds, settings=eval_settings) for ds in test_sets]
    merged = results[0].stats
    for r in results[1:]:
        merged = merged.merge(r.stats)
    summary = metrics.summarize(merged)
    n = sum(r.num_examples for r in results)
    return {
        "map50": float(summary["map50"]),
        "recall": float(summary["recall"]),
        "coco_map": float(summary["coco_map"]),
        "test_loss": sum(r.loss * r.num_examples for r in results) / n,
        "eval_seconds": time.monotonic() - t0,
    }


# ----------------------------------------------------------------------------- the three settings


def _clone_state(model) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def run_central(hook, build, pool: Pool, settings, eval_settings, rounds: int, log: Callable) -> list[dict]:
    """One model on the union; round r = settings.local_epochs more epochs; optimiser state kept."""
    model = build()
    union = concat(pool.train)
    test_union = [concat(pool.test)]
    central = dataclasses.replace(settings, keep_optimizer_state=True)
    state: dict = {}
    rows = []
    for r in range(1, rounds + 1):
        res = hook.fedplug_train_round(
            model=model, dataset=union, settings=dataclasses.replace(central, round_number=r),
            global_weights={}, state=state,  # no proximal term: nothing to stay close to
        )
        if not res.ok:
            raise RuntimeError(f"central, round {r}: training failed: {res.reason}")
        ev = evaluate_global(hook, model, test_union, eval_settings)
        rows.append(dict(ev, round=r, train_loss=res.train_loss, failed_updates=0, train_seconds=res.seconds))
        log(f"  central   round {r:2d}: mAP@0.5 {ev['map50']:.3f}  recall {ev['recall']:.3f}  "
            f"test loss {ev['test_loss']:.3f}  train loss {res.train_loss:.3f}  ({res.seconds:.0f} s train)")
    return rows


def run_federated(hook, agg_hook, agg_cfg: Mapping, build, pool: Pool, groups: Sequence[Sequence[int]],
                  settings, eval_settings, rounds: int, seed: int, label: str, log: Callable) -> list[dict]:
    """FedAvg (or ``--aggregator``) over ``len(groups)`` clients, trained one after another in this process."""
    from fedplug.types import ClientUpdate, EmptyRoundError

    model = build()
    client_train = [concat([pool.train[c] for c in cams]) for cams in groups]
    client_test = [concat([pool.test[c] for c in cams]) for cams in groups]
    client_state: list[dict] = [{} for _ in groups]
    agg_state: dict = {}
    names = {f.name for f in dataclasses.fields(settings)}
    global_w = _clone_state(model)
    rows = []
    for r in range(1, rounds + 1):
        extra = dict(agg_hook.fedplug_aggregator_round_settings(round_number=r, config=agg_cfg) or {})
        round_settings = dataclasses.replace(settings, round_number=r, **{k: v for k, v in extra.items() if k in names})
        record = {"losses": [], "sizes": [], "failed": 0, "seconds": 0.0}

        def updates():
            # The aggregator consumes this stream as the server's would: each client is
            # trained only when the aggregator asks for its update.
            for k, data in enumerate(client_train):
                model.load_state_dict(global_w)
                res = hook.fedplug_train_round(
                    model=model, dataset=data,
                    settings=dataclasses.replace(round_settings, seed=seed * 1000 + k),
                    global_weights=global_w, state=client_state[k],
                )
                record["seconds"] += res.seconds
                if not res.ok:  # the server carries on without a failed update
                    record["failed"] += 1
                    log(f"  {label} round {r}: client {k} failed: {res.reason}")
                    continue
                record["losses"].append(res.train_loss)
                record["sizes"].append(res.num_examples)
                yield ClientUpdate(client_id=f"client_{k}", round_number=r, weights=res.weights,
                                   num_examples=res.num_examples, train_loss=res.train_loss)

        try:
            global_w = agg_hook.fedplug_aggregate(global_weights=global_w, updates=updates(), round_number=r,
                                                  config=agg_cfg, state=agg_state)
        except EmptyRoundError:
            raise RuntimeError(f"{label} round {r}: every client's training failed (see above); "
                               "try a lower --lr") from None
        model.load_state_dict(global_w)
        ev = evaluate_global(hook, model, client_test, eval_settings)
        n = sum(record["sizes"])
        train_loss = sum(l * s for l, s in zip(record["losses"], record["sizes"])) / n
        rows.append(dict(ev, round=r, train_loss=train_loss, failed_updates=record["failed"],
                         train_seconds=record["seconds"]))
        log(f"  {label:9s} round {r:2d}: mAP@0.5 {ev['map50']:.3f}  recall {ev['recall']:.3f}  "
            f"test loss {ev['test_loss']:.3f}  train loss {train_loss:.3f}  ({record['seconds']:.0f} s train)")
    return rows


# ----------------------------------------------------------------------------- outputs


def write_csv(path: Path, rows: Sequence[Mapping]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def plot(path: Path, rows: Sequence[Mapping], title: str) -> bool:
    """mAP@0.5, recall and test loss per round, one line per setting; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return False
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for setting in settings:
        mine = [r for r in rows if r["setting"] == setting]
        x = [r["epochs_over_data"] for r in mine]
        for ax, key in zip(axes, ("map50", "recall", "test_loss")):
            ax.plot(x, [r[key] for r in mine], marker="o", label=setting)
    for ax, name in zip(axes, ("mAP@0.5 (exact, all test images)", "recall", "test loss")):
        ax.set_xlabel("epochs over the data (= round x local epochs)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylim(0, 1)
    axes[1].set_ylim(0, 1)
    axes[0].legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def summary_table(rows: Sequence[Mapping], key: str) -> str:
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    rounds = sorted({r["round"] for r in rows})
    by = {(r["setting"], r["round"]): r for r in rows}
    header = ["round", "epochs"] + settings
    lines = [header]
    for rnd in rounds:
        first = next(by[(s, rnd)] for s in settings if (s, rnd) in by)
        lines.append([str(rnd), str(first["epochs_over_data"])]
                     + [f"{by[(s, rnd)][key]:.3f}" if (s, rnd) in by else "-" for s in settings])
    widths = [max(len(line[c]) for line in lines) for c in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines)


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.monotonic()
    import torch

    torch.set_num_threads(args.threads)
    from fedplug.plugins import activate
    from fedplug.types import EvalSettings

    out_lines: list[str] = []

    def log(line: str = "") -> None:
        print(line, flush=True)
        out_lines.append(line)

    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    log(f"command: {command}")
    log("simulated federation: one process, clients trained sequentially on the same "
        f"{args.threads} torch thread(s); wall times are not a deployment's, the mAP figures are what matters")

    cfg = compose_config(args)
    model_cfg, agg_cfg = cfg["model"], cfg["aggregator"]
    augment = None if args.no_augment else cfg["data"].get("augment")
    settings = train_settings(cfg["train"], args.device)
    eval_settings = EvalSettings(batch_size=8, device=settings.device)
    hook = activate({"detector": args.model}, observers=False).hook
    agg_hook = activate({"aggregator": args.aggregator}, observers=False).hook

    pool = make_pool(args, augment)
    n_train = sum(len(d) for d in pool.train)
    n_test = sum(len(d) for d in pool.test)
    log(f"data: {args.cameras} cameras x ({args.train_per_camera} train + {args.test_per_camera} test) "
        f"images of {args.image_size} px, classes {list(CLASSES)}, class skew {args.class_skew}, seed {args.seed} "
        f"({n_train} training / {n_test} test images in all; {data_root(args)})")
    log(f"model: {args.model} " + ", ".join(f"{k}={v}" for k, v in model_cfg.items() if v is not None))
    log(f"training: {args.rounds} rounds x {args.local_epochs} local epoch(s); optimizer {settings.optimizer} "
        f"lr {settings.lr} batch {settings.batch_size} weight decay {settings.weight_decay} "
        f"schedule {settings.lr_schedule} {dict(settings.extra) or ''} warm-up {settings.warmup_iters} steps; "
        f"augmentation {augment or 'off'}; "
        f"clients reset the optimiser each round (keep_optimizer_state={settings.keep_optimizer_state}), "
        "central keeps it")

    def build():
        return hook.fedplug_build_model(config=model_cfg, class_names=CLASSES)

    plans = []
    if not args.no_central:
        plans.append(("central", 1, None))
    for n in args.clients:
        groups = camera_groups(args.cameras, n, args.grouping)
        plans.append((f"{args.aggregator}-{n}", n, groups))
        log(f"\n{args.aggregator}-{n}: cameras per client {groups} (grouping {args.grouping}); training images:")
        log(class_table(pool, groups, [f"client {k}" for k in range(n)]))

    initial = evaluate_global(hook, build(), [concat(pool.test)], eval_settings)
    log(f"\nround 0 (initial model, the same for every setting): mAP@0.5 {initial['map50']:.3f} "
        f"recall {initial['recall']:.3f} test loss {initial['test_loss']:.3f}")
    rows: list[dict] = []
    times: dict[str, float] = {}
    for name, n, groups in plans:
        log(f"\n== {name} ==")
        t0 = time.monotonic()
        if groups is None:
            result = run_central(hook, build, pool, settings, eval_settings, args.rounds, log)
        else:
            result = run_federated(hook, agg_hook, agg_cfg, build, pool, groups, settings, eval_settings,
                                   args.rounds, args.seed, name, log)
        times[name] = time.monotonic() - t0
        rows.append(dict(initial, model=args.model, setting=name, clients=n, round=0, epochs_over_data=0,
                         train_loss=math.nan, failed_updates=0, train_seconds=0.0))
        for row in result:
            rows.append(dict(row, model=args.model, setting=name, clients=n,
                             epochs_over_data=row["round"] * args.local_epochs))

    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / (f"fl_vs_central_{args.model}" + (f"_{args.tag}" if args.tag else ""))
    write_csv(stem.with_suffix(".csv"), rows)
    title = (f"{args.model}: central vs {args.aggregator} ({', '.join(str(n) for n in args.clients)} clients), "
             f"{args.cameras} cameras x {args.train_per_camera} imgs, skew {args.class_skew}, "
             f"{args.local_epochs} local epoch(s)/round, seed {args.seed}")
    plotted = plot(stem.with_suffix(".png"), rows, title)

    wall = time.monotonic() - t_start
    log("\nmAP@0.5 (exact, over all test images) per round:")
    log(summary_table(rows, "map50"))
    log("\nrecall per round:")
    log(summary_table(rows, "recall"))
    log("\ntest loss per round:")
    log(summary_table(rows, "test_loss"))
    log("\nwall time per setting: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
        + f"; total {wall:.0f} s on {args.threads} thread(s) (a shared machine: timings are noisy)")
    log(f"wrote {stem.with_suffix('.csv')}"
        + (f", {stem.with_suffix('.png')}" if plotted else " (no plot: pip install matplotlib)")
        + f", {stem.with_suffix('.txt')}")
    log(f"command: {command}")
    stem.with_suffix(".txt").write_text("\n".join(out_lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
