"""GPU throughput of the full-size detectors: train steps, inference and a two-client federation round.

    python benchmarks/bench_gpu.py [--models frcnn yolov3] [--batch 2] [--warmup 3] [--steps 10]
        [--fed-images 8] [--no-amp] [--out-dir benchmarks/results]
    python benchmarks/bench_gpu.py --allow-cpu --smoke     # no GPU: the same code path, tiny, on the CPU

For a machine with a CUDA GPU (it uses ``cuda:0`` only).  Without one it
prints a message and exits 0, unless ``--allow-cpu`` asks it to run the same
measurements on the CPU at tiny scale (64 px), which is how the tests
exercise this script on machines without a GPU.

The models, randomly initialised (nothing is downloaded):

* ``frcnn``: torchvision's Faster R-CNN ResNet-50-FPN (``model.backbone=resnet50_fpn``)
  at its paper size, images resized by the model to 800 px (``min_size=800``,
  ``max_size=1333``);
* ``yolov3``: fedplug's YOLOv3 with the Darknet-53 backbone, three scales and
  nine anchors (``model.variant=darknet53``) at 416 px.

Measured per model, each after ``--warmup`` untimed iterations, between
``torch.cuda.synchronize()`` calls:

* ``train fp32`` / ``train amp``: ``--steps`` optimiser steps (SGD, momentum
  0.9) on a fixed batch of ``--batch`` synthetic street images (the project's
  generator, 416 px; the Faster R-CNN resizes them to 800 px): forward with
  losses, backward, gradient clipping, step.  ``amp`` is float16 autocast with
  gradient scaling, as the training engine does on CUDA (skipped on the CPU
  and with ``--no-amp``);
* ``infer fp32`` / ``infer amp``: ``--steps`` eval-mode forward passes
  (including decoding/NMS) on the same batch, under ``torch.inference_mode``;
* ``federation``: a short federation on the device, in this process: two
  clients with ``--fed-images`` training images each train one round (one
  local epoch, through the detector's ``fedplug_train_round`` hook: the
  project's engine, AMP on CUDA unless ``--no-amp``), FedAvg combines them,
  and each client evaluates the global model on its test images, merged into
  the exact global mAP.  images/s counts training images over the whole
  round (training, aggregation and evaluation); the mAP of a randomly
  initialised model after one round is near zero and only shows the path runs.

Output: a table of images/s, ms per iteration and peak GPU memory per model
and mode, printed, and written as ``gpu_throughput.csv`` / ``.txt`` in
``--out-dir`` (``gpu_throughput_cpu.*`` for a ``--allow-cpu`` run).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

CLASSES = ("car", "person", "sign")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
CPU_PX = 64  # --allow-cpu: input and image size, small enough for a 1-thread test of the script
NO_CUDA_MESSAGE = (
    "bench_gpu: no CUDA GPU is visible to torch (torch.cuda.is_available() is False), so there is nothing to "
    "measure here. Run it on a machine with a CUDA GPU, or pass --allow-cpu to run the same code on the CPU at "
    "tiny scale (a test of the script, not a benchmark)."
)
CSV_FIELDS = ("model", "mode", "device", "input_px", "batch", "iterations", "images_per_s", "ms_per_iter",
              "peak_mem_mb", "loss", "note")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Full-size Faster R-CNN ResNet-50-FPN (800 px) and YOLOv3 Darknet-53 (416 px) on one CUDA "
        "GPU: train steps, inference and a two-client federation round, in images/s.",
    )
    p.add_argument("--models", nargs="+", choices=("frcnn", "yolov3"), default=["frcnn", "yolov3"])
    p.add_argument("--batch", type=int, default=2, help="images per train/inference step")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations before each timing")
    p.add_argument("--steps", type=int, default=10, help="timed iterations per mode")
    p.add_argument("--fed-images", type=int, default=8, help="training images per client in the federation round")
    p.add_argument("--fed-test-images", type=int, default=4, help="test images per client in the federation round")
    p.add_argument("--no-amp", action="store_true", help="skip the mixed-precision modes; federation in fp32")
    p.add_argument("--allow-cpu", action="store_true",
                   help=f"without a GPU, run on the CPU at tiny scale ({CPU_PX} px) instead of exiting")
    p.add_argument("--smoke", action="store_true", help="tiny: 1 timed step, no warm-up, 2 images per client")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where the CSV/TXT go")
    args = p.parse_args(argv)
    if args.smoke:
        args.warmup, args.steps, args.fed_images, args.fed_test_images = 0, 1, 2, 1
    problems = [f"--{k.replace('_', '-')} must be >= 1" for k in ("batch", "steps", "fed_images", "fed_test_images")
                if getattr(args, k) < 1]
    if args.warmup < 0:
        problems.append("--warmup must be >= 0")
    if problems:
        p.error("; ".join(problems))
    return args


# ----------------------------------------------------------------------------- models and data


def model_config(name: str, on_gpu: bool, seed: int) -> dict[str, Any]:
    """The ``model`` config group of the full-size model (tiny input size on the CPU)."""
    if name == "frcnn":
        size = 800 if on_gpu else CPU_PX
        return {"name": "frcnn", "backbone": "resnet50_fpn", "min_size": size, "max_size": 1333 if on_gpu else size,
                "seed": seed}
    return {"name": "yolov3", "variant": "darknet53", "img_size": 416 if on_gpu else CPU_PX, "seed": seed}


def input_px(cfg: dict) -> int:
    return int(cfg.get("min_size") or cfg.get("img_size"))


class Sync:
    """Wall-clock timing that waits for the device's queued work first."""

    def __init__(self, device):
        import torch

        self.cuda = device.type == "cuda"
        self._sync = torch.cuda.synchronize if self.cuda else (lambda: None)

    def now(self) -> float:
        self._sync()
        return time.perf_counter()


def _peak_reset(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device) -> float:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else math.nan


def _to(images, targets, device):
    return ([i.to(device) for i in images],
            [{k: v.to(device) for k, v in t.items() if k in ("boxes", "labels")} for t in targets])


def time_train(model, images, targets, device, amp: bool, warmup: int, steps: int) -> dict[str, float]:
    """Optimiser steps on one fixed batch: forward with losses, backward, clip, step."""
    import torch

    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    clock = Sync(device)
    _peak_reset(device)
    loss_value = math.nan
    t0 = None
    for i in range(warmup + steps):
        if i == warmup:
            t0 = clock.now()
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
            loss = sum(model(images, targets).values())
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        loss_value = float(loss.detach())
    seconds = clock.now() - t0
    return {"seconds": seconds, "peak_mem_mb": _peak_mb(device), "loss": loss_value}


def time_inference(model, images, device, amp: bool, warmup: int, steps: int) -> dict[str, float]:
    """Eval-mode forward passes (with decoding and NMS) on one fixed batch."""
    import torch

    model.to(device).eval()
    clock = Sync(device)
    _peak_reset(device)
    t0 = None
    with torch.inference_mode():
        for i in range(warmup + steps):
            if i == warmup:
                t0 = clock.now()
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
                model(images)
    seconds = clock.now() - t0
    return {"seconds": seconds, "peak_mem_mb": _peak_mb(device), "loss": math.nan}


def federation_round(hook, agg_hook, model, initial: dict, clients, device, amp: bool, batch: int,
                     seed: int) -> dict[str, float]:
    """From ``initial`` weights, two clients train one round each on the device, FedAvg, each evaluates.

    The clients share ``model`` (loading the global weights before training, as
    a client does); the global mAP is the exact one over both test splits.
    """
    from fedplug import metrics
    from fedplug.types import ClientUpdate, EvalSettings, TrainSettings

    global_w = initial
    settings = TrainSettings(round_number=1, local_epochs=1, batch_size=batch, lr=1e-3, optimizer="sgd",
                             momentum=0.9, weight_decay=1e-4, max_grad_norm=10.0, device=str(device), amp=amp,
                             seed=seed)
    clock = Sync(device)
    _peak_reset(device)
    t0 = clock.now()
    results = []

    def updates():
        for k, data in enumerate(clients):
            model.load_state_dict(global_w)
            res = hook.fedplug_train_round(model=model, dataset=data.train, global_weights=global_w, state={},
                                           settings=dataclasses.replace(settings, seed=seed + k))
            results.append(res)
            if res.ok:
                yield ClientUpdate(client_id=f"client_{k}", round_number=1, weights=res.weights,
                                   num_examples=res.num_examples, train_loss=res.train_loss)

    new_w = agg_hook.fedplug_aggregate(global_weights=global_w, updates=updates(), round_number=1,
                                       config={"name": "fedavg"}, state={})
    model.load_state_dict(new_w)
    es = EvalSettings(batch_size=batch, device=str(device))
    evals = [hook.fedplug_evaluate(model=model, dataset=data.test, settings=es) for data in clients]
    seconds = clock.now() - t0
    merged = evals[0].stats
    for e in evals[1:]:
        merged = merged.merge(e.stats)
    summary = metrics.summarize(merged)
    failed = [r.reason for r in results if not r.ok]
    ok = [r for r in results if r.ok]
    return {
        "seconds": seconds,
        "train_images": sum(len(d.train) for d in clients),
        "train_seconds": sum(r.seconds for r in results),
        "peak_mem_mb": _peak_mb(device),
        "loss": sum(r.train_loss for r in ok) / len(ok) if ok else math.nan,
        "map50": float(summary["map50"]),
        "failed": failed,
    }


# ----------------------------------------------------------------------------- main


def table(rows: Sequence[dict]) -> str:
    header = ["model", "mode", "input px", "batch", "images/s", "ms/iter", "peak MB", "note"]
    lines = [header]
    for r in rows:
        lines.append([r["model"], r["mode"], str(r["input_px"]), str(r["batch"]), f"{r['images_per_s']:.2f}",
                      f"{r['ms_per_iter']:.1f}",
                      "-" if math.isnan(r["peak_mem_mb"]) else f"{r['peak_mem_mb']:.0f}", r["note"]])
    widths = [max(len(line[c]) for line in lines) for c in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if c in (0, 1, 7) else cell.rjust(w)
                               for c, (cell, w) in enumerate(zip(line, widths))).rstrip() for line in lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.allow_cpu:
        print(NO_CUDA_MESSAGE, flush=True)
        return 0
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda:0" if on_gpu else "cpu")
    amp_modes = [False] + ([True] if on_gpu and not args.no_amp else [])
    if on_gpu:
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels

    from fedplug.data import generate_synthetic_federation, open_client_data
    from fedplug.plugins import activate

    out_lines: list[str] = []

    def log(line: str = "") -> None:
        print(line, flush=True)
        out_lines.append(line)

    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    log(f"command: {command}")
    if on_gpu:
        props = torch.cuda.get_device_properties(device)
        log(f"device: {torch.cuda.get_device_name(device)} ({props.total_memory / 2**30:.0f} GiB), torch "
            f"{torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    else:
        log(f"device: CPU ({torch.get_num_threads()} threads), torch {torch.__version__} -- NO GPU: --allow-cpu "
            "runs the full-size architectures at "
            f"{CPU_PX} px to test this script; these are not GPU figures")

    image_px = 416 if on_gpu else CPU_PX
    agg_hook = activate({"aggregator": "fedavg"}, observers=False).hook
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="fedplug-bench-gpu-") as tmp:
        t0 = time.perf_counter()
        folders = generate_synthetic_federation(
            Path(tmp) / "data", num_clients=2, train_per_client=max(args.fed_images, args.batch),
            test_per_client=args.fed_test_images, image_size=image_px, seed=args.seed, classes=CLASSES)
        clients = [open_client_data({"format": "voc", "path": str(f)}, CLASSES) for f in folders]
        log(f"data: 2 clients x ({len(clients[0].train)} train + {args.fed_test_images} test) synthetic images of "
            f"{image_px} px ({time.perf_counter() - t0:.1f} s to generate)")
        batch = [clients[0].train[i] for i in range(args.batch)]
        images, targets = _to([b[0] for b in batch], [b[1] for b in batch], device)

        for name in args.models:
            cfg = model_config(name, on_gpu, args.seed)
            hook = activate({"detector": name}, observers=False).hook

            model = hook.fedplug_build_model(config=cfg, class_names=CLASSES)
            # Every mode starts from these same fresh weights (rebuilding a ResNet-50 costs seconds on a CPU).
            initial = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            n_params = sum(p.numel() for p in model.parameters())
            log(f"\n{name}: {cfg} -- {n_params / 1e6:.2f} M parameters ({len(CLASSES)} classes)")
            px = input_px(cfg)

            def add(mode: str, m: dict, images_done: int, iters: int, note: str = "") -> None:
                row = {"model": name, "mode": mode, "device": str(device), "input_px": px, "batch": args.batch,
                       "iterations": iters, "images_per_s": images_done / m["seconds"],
                       "ms_per_iter": 1000 * m["seconds"] / iters, "peak_mem_mb": m["peak_mem_mb"],
                       "loss": m["loss"], "note": note}
                rows.append(row)
                log(f"  {mode:12s} {row['images_per_s']:8.2f} images/s  {row['ms_per_iter']:8.1f} ms/iter"
                    + (f"  peak {row['peak_mem_mb']:.0f} MB" if not math.isnan(row["peak_mem_mb"]) else "")
                    + (f"  ({note})" if note else ""))

            for amp in amp_modes:
                model.load_state_dict(initial)
                mode = "train amp" if amp else "train fp32"
                m = time_train(model, images, targets, device, amp, args.warmup, args.steps)
                add(mode, m, args.batch * args.steps, args.steps,
                    f"loss {m['loss']:.3g}" if math.isfinite(m["loss"]) else "loss not finite (random init)")
            model.load_state_dict(initial)
            for amp in amp_modes:
                m = time_inference(model, images, device, amp, args.warmup, args.steps)
                add("infer amp" if amp else "infer fp32", m, args.batch * args.steps, args.steps)
            fed_amp = on_gpu and not args.no_amp
            m = federation_round(hook, agg_hook, model, initial, clients, device, fed_amp, args.batch, args.seed)
            del model, initial
            note = (f"2 clients, 1 round, {'amp' if fed_amp else 'fp32'}: {m['seconds']:.1f} s incl. FedAvg + "
                    f"eval; global mAP@0.5 {m['map50']:.3f}")
            if m["failed"]:
                note += f"; {len(m['failed'])} failed update(s): {m['failed'][0]}"
            add("federation", m, m["train_images"], 1, note)
            if on_gpu:
                torch.cuda.empty_cache()

    log("\n" + table(rows))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / ("gpu_throughput" if on_gpu else "gpu_throughput_cpu")
    with open(stem.with_suffix(".csv"), "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    log(f"\nwrote {stem.with_suffix('.csv')}, {stem.with_suffix('.txt')}")
    stem.with_suffix(".txt").write_text("\n".join(out_lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
