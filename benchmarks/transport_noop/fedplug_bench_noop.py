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

from noop_model import BUILDERS, build  # noqa: F401  (no fedplug import there: Flower's venv builds it too)


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
