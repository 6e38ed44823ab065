"""The ``yolov3`` detector plugin: YOLOv3, YOLOv3-tiny and a CPU-sized ``nano``, written here.

Selected with ``model=yolov3``; its settings are the ``model`` config group
(``conf/model/yolov3.yaml``), which the server sends to every client in
``init`` so that all sides build the same architecture.  docs/yolov3.md
describes the variants, the loss, decoding, Darknet weight loading and every
config key.

Modules:

* :mod:`.settings` -- the ``model`` config keys, validated, and each variant's defaults;
* :mod:`.network` -- the Darknet-53 / tiny / nano network bodies (Darknet layer order);
* :mod:`.model` -- :class:`~.model.YOLOv3`, the torchvision-style detector (letterbox,
  loss in train mode, decoding + NMS in eval mode) and :func:`~.model.build_yolov3`;
* :mod:`.loss`, :mod:`.decode`, :mod:`.letterbox` -- its parts;
* :mod:`.darknet_weights` -- reading and writing Darknet ``.weights`` files.

Training and evaluation are the shared detector engine's
(:mod:`fedplug_plugins.detectors.engine`), as for every built-in detector.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from torch import nn

from fedplug.hooks import hookimpl
# training and evaluation are the shared engine's: this module re-exports its hooks
from fedplug_plugins.detectors.engine_hooks import fedplug_evaluate, fedplug_train_round  # noqa: F401

from .model import YOLOv3, build_yolov3

__all__ = ["YOLOv3", "build_yolov3", "fedplug_build_model", "fedplug_train_round", "fedplug_evaluate"]


@hookimpl
def fedplug_build_model(config: Mapping[str, Any], class_names: Sequence[str]) -> nn.Module:
    """Build the detector (server at start-up; each client after ``init``).

    Deterministic for ``config["seed"]``; loads ``config["weights"]`` (a local
    Darknet file) when set.  The model carries ``class_names`` for the engine.
    """
    names = tuple(str(c) for c in class_names)
    model = build_yolov3(config, len(names))
    model.class_names = names
    return model

