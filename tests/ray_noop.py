"""A light detector plugin for federations of many clients: a fake installed distribution written at test time.

``write_noop_plugin(root)`` writes ``fedplug-noop-detector`` (a ``*.dist-info`` with
entry points, exactly what pip leaves behind) and its package under ``root``;
with ``root`` on ``PYTHONPATH`` (inherited by Ray's workers on a local cluster)
``model=noop`` selects it in the server and in every client, through the same
entry-point discovery as any pip-installed plugin.  Nothing is installed.

The detector is one ``Linear`` layer: training moves every weight by an amount
that depends only on the client's number of images (so FedAvg has real work
and the result is reproducible), optionally after sleeping ``model.train_seconds``
(so a test can kill a client mid-round); evaluation counts the test images and
returns empty statistics.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

DETECTOR = textwrap.dedent('''
    """fedplug-noop-detector: a detector that trains and evaluates in microseconds (tests, scaling runs)."""
    import time

    import torch
    from torch import nn

    from fedplug.hooks import hookimpl
    from fedplug.types import DetectionStats, EvalResult, TrainResult


    class Noop(nn.Module):
        def __init__(self, num_classes):
            super().__init__()
            self.head = nn.Linear(4, num_classes + 1)


    @hookimpl
    def fedplug_build_model(config, class_names):
        torch.manual_seed(int(config.get("seed") or 0))
        return Noop(len(class_names))


    @hookimpl
    def fedplug_train_round(model, dataset, settings, global_weights, state):
        time.sleep(float(settings.extra.get("train_seconds", 0.0)))
        n = len(dataset)
        weights = {k: v + 0.001 * n for k, v in model.state_dict().items()}
        return TrainResult(weights=weights, num_examples=n, train_loss=1.0 / (1.0 + n))


    @hookimpl
    def fedplug_evaluate(model, dataset, settings):
        stats = DetectionStats.empty(model.head.out_features - 1)
        return EvalResult(num_examples=len(dataset), loss=0.5, map50=0.0, recall=0.0, stats=stats)
''')

MODEL_YAML = textwrap.dedent('''\
    # @package _global_
    model:
      name: noop
      seed: ${run.seed}
''')


def write_noop_plugin(root: Path) -> Path:
    """Write the distribution under ``root`` (created) and return ``root``, the folder for ``PYTHONPATH``."""
    root = Path(root)
    package = root / "fedplug_noop"
    (package / "conf" / "model").mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(DETECTOR)
    (package / "conf" / "__init__.py").write_text("")
    (package / "conf" / "model" / "__init__.py").write_text("")
    (package / "conf" / "model" / "noop.yaml").write_text(MODEL_YAML)
    info = root / "fedplug_noop_detector-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fedplug-noop-detector\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[fedplug.detectors]\nnoop = fedplug_noop\n\n[fedplug.conf]\nfedplug_noop = fedplug_noop.conf\n")
    return root
