"""Measure a YOLOv3 variant on this CPU: seconds per image per thread, and mAP after N epochs.

Run by hand (docs/yolov3.md quotes its output)::

    python -m fedplug_plugins.detectors.yolov3.measure --variant nano --epochs 8

It times training steps (forward, backward, optimiser step) and inference
(eval mode, decoding and NMS included) on one thread, then trains the model
centrally through the shared engine on the synthetic street data (the
embedded federation's default data, all cameras pooled) with the training
defaults of ``conf/model/yolov3.yaml`` (Adam 1e-3, batch 8, cosine over all
epochs) and prints mAP@0.5 on the pooled test split after every epoch.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from fedplug.types import EvalSettings, TrainSettings


def seconds_per_image(model, size: int, batch: int, repeats: int, train: bool) -> tuple[float, float]:
    """Median (wall, CPU) seconds per image of one batch; CPU time is this process's, on one thread,
    so it stays meaningful when other jobs share the cores."""
    images = [torch.rand(3, size, size) for _ in range(batch)]
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 40.0, 30.0], [60.0, 50.0, 90.0, 100.0]]) * size / 128,
         "labels": torch.tensor([1, 2])}
        for _ in range(batch)
    ]
    opt = torch.optim.Adam(model.parameters(), lr=1e-6)
    walls, cpus = [], []
    for i in range(repeats + 1):  # the first run warms up allocators and kernels
        t0, c0 = time.perf_counter(), time.process_time()
        if train:
            model.train()
            loss = sum(model(images, targets).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
        else:
            model.eval()
            with torch.inference_mode():
                model(images)
        if i:
            walls.append((time.perf_counter() - t0) / batch)
            cpus.append((time.process_time() - c0) / batch)
    return statistics.median(walls), statistics.median(cpus)


def main(argv=None) -> None:
    from fedplug.data.synthetic import CLASSES, generate_synthetic_federation
    from fedplug.data.voc import VOCDetection
    from fedplug_plugins.detectors import yolov3 as plugin

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", default="nano")
    ap.add_argument("--img-size", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--clients", type=int, default=3, help="synthetic cameras pooled into one training set")
    ap.add_argument("--root", default=None, help="where the synthetic data goes (default: a temporary folder)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    config = {"name": "yolov3", "variant": args.variant}
    if args.img_size:
        config["img_size"] = args.img_size
    model = plugin.fedplug_build_model(config=config, class_names=CLASSES)
    size = model.settings.img_size
    n_params = sum(p.numel() for p in model.parameters())
    train_s = seconds_per_image(model, size, args.batch_size, 5, train=True)
    infer_s = seconds_per_image(model, size, args.batch_size, 5, train=False)
    print(f"{args.variant} @ {size} px, {n_params:,} parameters, 1 thread, batch {args.batch_size}: "
          f"train step {train_s[1] * 1000:.1f} ms CPU ({train_s[0] * 1000:.1f} ms wall) per image, "
          f"inference {infer_s[1] * 1000:.1f} ms CPU ({infer_s[0] * 1000:.1f} ms wall) per image")

    with tempfile.TemporaryDirectory() as tmp:
        roots = generate_synthetic_federation(args.root or f"{tmp}/synthetic", num_clients=args.clients)
        train = torch.utils.data.ConcatDataset([VOCDetection(r, "train", CLASSES) for r in roots])
        test = torch.utils.data.ConcatDataset([VOCDetection(r, "test", CLASSES) for r in roots])
        model = plugin.fedplug_build_model(config=config, class_names=CLASSES)
        ev = EvalSettings(batch_size=16)
        print(f"epoch 0: mAP@0.5 {plugin.fedplug_evaluate(model=model, dataset=test, settings=ev).map50:.3f}")
        t0 = time.monotonic()
        for epoch in range(1, args.epochs + 1):
            # conf/model/yolov3.yaml's train defaults, one epoch per "round", cosine over all epochs
            settings = TrainSettings(round_number=epoch, local_epochs=1, batch_size=args.batch_size,
                                     optimizer="adam", lr=args.lr, weight_decay=0.0, warmup_iters=10,
                                     lr_schedule="cosine", max_grad_norm=10.0,
                                     extra={"total_rounds": args.epochs, "min_lr_ratio": 0.05})
            result = plugin.fedplug_train_round(model=model, dataset=train, settings=settings,
                                                global_weights=model.state_dict(), state={})
            if not result.ok:
                raise SystemExit(f"training failed: {result.reason}")
            r = plugin.fedplug_evaluate(model=model, dataset=test, settings=ev)
            print(f"epoch {epoch}: train loss {result.train_loss:.2f}  test loss {r.loss:.2f}  "
                  f"mAP@0.5 {r.map50:.3f}  recall {r.recall:.3f}  ({time.monotonic() - t0:.0f} s, "
                  f"{len(train)} train / {len(test)} test images)", flush=True)


if __name__ == "__main__":
    main()
