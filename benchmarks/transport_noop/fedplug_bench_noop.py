"""The no-op detector of benchmarks/bench_transport.py: detector-sized weights, no training.

A detector plugin (entry point ``bench_noop`` in group ``fedplug.detectors``, declared by the
benchmark in a throw-away ``.dist-info`` folder on the processes' ``PYTHONPATH``, exactly as
an installed package declares it) whose model has the state dict of a torchvision detector
(``model.backbone``: ``resnet50_fpn`` or ``mobilenet_v3_large_fpn``, randomly initialised, nothing
downloaded; ``toy``: a 0.3 M-value stand-in for tests) and whose "training" returns the received weights + 1e-3.  Evaluation scores nothing.
So a round costs only what fedplug itself does: serialise, send, receive, check, aggregate, save.
"""

from __future__ import annotations

import torch

from fedplug.hooks import hookimpl
from fedplug.types import DetectionStats, EvalResult, TrainResult

BUILDERS = {
    "resnet50_fpn": "fasterrcnn_resnet50_fpn",
    "mobilenet_v3_large_fpn": "fasterrcnn_mobilenet_v3_large_fpn",
}


def _toy(num_classes: int) -> torch.nn.Module:
    """A 0.3 M-value stand-in with a detector's kinds of tensors (conv, BatchNorm, head), for the script's tests."""
    from torch import nn

    return nn.Sequential(nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64), nn.Conv2d(64, 128, 3), nn.BatchNorm2d(128),
                         nn.Flatten(), nn.Linear(128, 2048), nn.Linear(2048, num_classes * 5))


def build(backbone: str, num_classes: int, seed: int = 0) -> torch.nn.Module:
    import torchvision.models.detection as detection

    if backbone not in (*BUILDERS, "toy"):
        raise ValueError(f"model.backbone must be one of {', '.join(BUILDERS)} or toy for bench_noop, "
                         f"got {backbone!r}")
    with torch.device("meta"):  # the architecture only: torchvision's own init takes ~15 s for R50 on a busy CPU
        model = _toy(num_classes) if backbone == "toy" else \
            getattr(detection, BUILDERS[backbone])(weights=None, weights_backbone=None, num_classes=num_classes)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                t.zero_()
            elif name.endswith("running_var"):
                t.fill_(1.0)
            else:
                t.normal_(0.0, 0.02, generator=g)
    return model


@hookimpl
def fedplug_build_model(config, class_names):
    return build(str(config.get("backbone")), len(class_names) + 1, int(config.get("seed") or 0))


@hookimpl
def fedplug_train_round(dataset, global_weights):
    weights = {k: (v + 1e-3 if v.is_floating_point() else v.clone()) for k, v in global_weights.items()}
    return TrainResult(weights=weights, num_examples=max(1, len(dataset)), train_loss=0.0)


@hookimpl
def fedplug_evaluate(dataset, settings):
    return EvalResult(num_examples=len(dataset), loss=0.0, map50=0.0, recall=0.0, stats=DetectionStats.empty(3))
