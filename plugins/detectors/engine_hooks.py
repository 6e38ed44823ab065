"""The training and evaluation hooks every built-in detector shares.

Both detectors follow torchvision's detection-model convention, so one engine
trains and scores them; a detector plugin module re-exports these two hook
implementations next to its own ``fedplug_build_model``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fedplug.hooks import hookimpl
from fedplug.types import EvalResult, EvalSettings, TrainResult, TrainSettings
from fedplug_plugins.detectors import engine


@hookimpl
def fedplug_train_round(
    model: nn.Module, dataset: Any, settings: TrainSettings, global_weights: dict, state: dict
) -> TrainResult:
    """One round of local training on the client's data (client worker thread)."""
    return engine.train_one_round(model, dataset, settings, global_weights, state)


@hookimpl
def fedplug_evaluate(model: nn.Module, dataset: Any, settings: EvalSettings) -> EvalResult:
    """Evaluation on the client's test split (client worker thread): test loss, mAP@0.5, recall."""
    return engine.evaluate(model, dataset, settings)
