"""The ``frcnn`` detector plugin: torchvision's Faster R-CNN with a selectable backbone.

Selected with ``model=frcnn`` (the default); its settings are the ``model``
config group (``conf/model/frcnn.yaml``), which the server sends to every
client in ``init`` so that all sides build the same architecture.

Backbones (``model.backbone``):

* ``tiny`` (default): :class:`~fedplug_plugins.detectors.backbones.TinyBackbone`,
  a ~0.1 M-parameter stride-8 conv net, with one anchor level sized for
  12-50 px objects, small RPN/ROI sampling and a 128-unit box head: it trains
  usefully on one CPU thread at 128 px;
* ``mobilenet_v3_large_fpn``, ``mobilenet_v3_large_320_fpn``, ``resnet50_fpn``:
  torchvision's full-size models (``fasterrcnn_<backbone>``) with their own
  anchors and sampling unless the config overrides them.

Pretrained weights are opt-in and never downloaded: ``model.weights`` (whole
detector) and ``model.weights_backbone`` (ImageNet backbone) take a
torchvision weight-enum name (``DEFAULT``, ``COCO_V1``, ``IMAGENET1K_V1``, ...)
that must already be in the torch hub cache, or ``model.weights`` a local file
(safetensors or a ``torch.save``-d state dict).  docs/detectors.md lists every
key.

Training and evaluation are the shared engine's (:mod:`.engine`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import urlparse

import torch
from torch import nn

from fedplug.hooks import hookimpl
# training and evaluation are the shared engine's: this module re-exports its hooks
from fedplug_plugins.detectors.engine_hooks import fedplug_evaluate, fedplug_train_round  # noqa: F401
from fedplug_plugins.detectors.backbones import TinyBackbone

BACKBONES = ("tiny", "mobilenet_v3_large_fpn", "mobilenet_v3_large_320_fpn", "resnet50_fpn")

# Every key of the ``model`` group this plugin understands.  ``None`` means
# "the backbone's own default": TINY_DEFAULTS for ``tiny``, torchvision's for the others.
DEFAULTS: dict[str, Any] = {
    "name": "frcnn",
    "backbone": "tiny",
    "seed": 0,
    "weights": None,
    "weights_backbone": None,
    "trainable_backbone_layers": None,
    "min_size": None,
    "max_size": None,
    "tiny_channels": None,
    "tiny_blocks": None,
    "anchor_sizes": None,
    "aspect_ratios": None,
    "representation_size": None,
    "roi_sampling_ratio": None,
    "rpn_batch_size_per_image": None,
    "rpn_pre_nms_top_n_train": None,
    "rpn_post_nms_top_n_train": None,
    "rpn_pre_nms_top_n_test": None,
    "rpn_post_nms_top_n_test": None,
    "rpn_fg_iou_thresh": None,
    "box_batch_size_per_image": None,
    "box_score_thresh": None,
    "box_nms_thresh": None,
    "box_detections_per_img": None,
}

# The tiny model's defaults: sized for 128 px images with 12-50 px objects.
TINY_DEFAULTS: dict[str, Any] = {
    "min_size": 128,
    "max_size": 128,
    "tiny_channels": [16, 32, 64],
    "tiny_blocks": [0, 1, 1],
    "anchor_sizes": [16, 32, 48],
    "aspect_ratios": [0.5, 1.0, 2.0],
    "representation_size": 128,
    "roi_sampling_ratio": 1,  # one bilinear sample per 7x7 bin: RoIAlign backward dominated the CPU step
    "rpn_batch_size_per_image": 64,
    "rpn_pre_nms_top_n_train": 600,
    "rpn_post_nms_top_n_train": 300,
    "rpn_pre_nms_top_n_test": 300,
    "rpn_post_nms_top_n_test": 100,
    "rpn_fg_iou_thresh": 0.7,
    "box_batch_size_per_image": 32,
    "box_score_thresh": 0.01,
    "box_nms_thresh": 0.5,
    "box_detections_per_img": 100,
}

# Keys passed straight to torchvision's FasterRCNN (when set) for every backbone.
_FASTERRCNN_KWARGS = (
    "min_size", "max_size", "rpn_batch_size_per_image", "rpn_pre_nms_top_n_train",
    "rpn_post_nms_top_n_train", "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test",
    "rpn_fg_iou_thresh", "box_batch_size_per_image", "box_score_thresh", "box_nms_thresh",
    "box_detections_per_img",
)
_TINY_ONLY = (
    "tiny_channels", "tiny_blocks", "anchor_sizes", "aspect_ratios", "representation_size", "roi_sampling_ratio",
)

_TORCHVISION_BUILDERS = {
    "mobilenet_v3_large_fpn": ("fasterrcnn_mobilenet_v3_large_fpn", "mobilenet_v3_large"),
    "mobilenet_v3_large_320_fpn": ("fasterrcnn_mobilenet_v3_large_320_fpn", "mobilenet_v3_large"),
    "resnet50_fpn": ("fasterrcnn_resnet50_fpn", "resnet50"),
}


class PretrainedWeightsUnavailable(RuntimeError):
    """Pretrained weights were asked for but are neither cached nor a readable local file."""


# ----------------------------------------------------------------------------- config


def resolve_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The plugin's settings: defaults, then ``config``; unknown keys and bad values are errors."""
    cfg = dict(DEFAULTS)
    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:
        raise ValueError(
            f"model.{unknown[0]} is not a frcnn setting (unknown: {unknown}); known keys: {sorted(DEFAULTS)}"
        )
    cfg.update({k: v for k, v in config.items()})
    if cfg["backbone"] not in BACKBONES:
        raise ValueError(f"model.backbone={cfg['backbone']!r} is not one of {', '.join(BACKBONES)}")
    if cfg["backbone"] == "tiny":
        for k, v in TINY_DEFAULTS.items():
            if cfg[k] is None:
                cfg[k] = v
    else:
        set_tiny = [k for k in _TINY_ONLY if cfg[k] is not None]
        if set_tiny:
            raise ValueError(
                f"model.{set_tiny[0]} applies to backbone=tiny only (backbone is {cfg['backbone']}); remove it"
            )
    for key in ("min_size", "max_size", "rpn_batch_size_per_image", "box_batch_size_per_image",
                "rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train", "rpn_pre_nms_top_n_test",
                "rpn_post_nms_top_n_test", "box_detections_per_img", "representation_size",
                "roi_sampling_ratio"):
        if cfg[key] is not None and (not isinstance(cfg[key], int) or cfg[key] < 1):
            raise ValueError(f"model.{key} must be a positive integer, got {cfg[key]!r}")
    for key in ("box_score_thresh", "box_nms_thresh", "rpn_fg_iou_thresh"):
        if cfg[key] is not None and not 0.0 <= float(cfg[key]) <= 1.0:
            raise ValueError(f"model.{key} must be within [0, 1], got {cfg[key]!r}")
    if cfg["backbone"] == "tiny":
        if not cfg["anchor_sizes"] or min(cfg["anchor_sizes"]) <= 0:
            raise ValueError(f"model.anchor_sizes must be positive pixel sizes, got {cfg['anchor_sizes']!r}")
        if not cfg["aspect_ratios"] or min(cfg["aspect_ratios"]) <= 0:
            raise ValueError(f"model.aspect_ratios must be positive (height/width), got {cfg['aspect_ratios']!r}")
    return cfg


# ----------------------------------------------------------------------------- pretrained weights


def _weights_enum(builder: str, name: str, key: str):
    from torchvision.models import get_model_weights

    enum_cls = get_model_weights(builder)
    try:
        return enum_cls[name]
    except KeyError:
        raise ValueError(
            f"model.{key}={name!r} is neither a local file nor one of {builder}'s weights: "
            f"{', '.join(['DEFAULT'] + [w.name for w in enum_cls])}"
        ) from None


def cached_weights_path(weights) -> Path:
    """Where torch hub keeps (or would keep) a torchvision weight enum's file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def _require_cached(weights, key: str) -> None:
    path = cached_weights_path(weights)
    if not path.is_file():
        raise PretrainedWeightsUnavailable(
            f"model.{key}={weights} needs the file {path.name}, which is not in the torch hub cache "
            f"({path.parent}); fedplug never downloads at run time. Either download {weights.url} on a "
            f"machine with network access and copy it to {path} (or set TORCH_HOME to a folder holding "
            f"checkpoints/{path.name}), or set model.weights to the path of a local weights file "
            "(.safetensors, or a state dict saved with torch.save), or set model.weights=null to train from scratch."
        )


def _read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is the same user error
        raise PretrainedWeightsUnavailable(
            f"model.weights={str(path)!r} could not be read as a state dict ({type(exc).__name__}: {exc}); "
            "give a .safetensors file or a state dict saved with torch.save"
        ) from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # torchvision references' checkpoints
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise PretrainedWeightsUnavailable(f"model.weights={str(path)!r} does not hold a state dict of tensors")
    return state


def _load_local_weights(model: nn.Module, path: Path) -> None:
    """Load a state dict file; only the class-specific box predictor may differ (it is then kept fresh)."""
    state = _read_weights_file(path)
    own = model.state_dict()
    predictor = "roi_heads.box_predictor."
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
    skipped = [k for k in mismatched if k.startswith(predictor)]
    bad = [k for k in mismatched if not k.startswith(predictor)]
    missing = [k for k in own if k not in state and not (k.startswith(predictor) and skipped)]
    unexpected = [k for k in state if k not in own]
    if bad or missing or unexpected:
        raise ValueError(
            f"model.weights={str(path)!r} does not fit this frcnn model (backbone and class count from the "
            f"config): {len(bad)} shape mismatch(es) {bad[:3]}, {len(missing)} missing {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}"
        )
    model.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=not skipped)


# ----------------------------------------------------------------------------- building


def _build_tiny(cfg: Mapping[str, Any], num_classes: int) -> nn.Module:
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    backbone = TinyBackbone(cfg["tiny_channels"], cfg["tiny_blocks"])
    anchors = AnchorGenerator(
        sizes=(tuple(float(s) for s in cfg["anchor_sizes"]),),
        aspect_ratios=(tuple(float(a) for a in cfg["aspect_ratios"]),),
    )
    pool = MultiScaleRoIAlign(featmap_names=["0"], output_size=7, sampling_ratio=int(cfg["roi_sampling_ratio"]))
    rep = int(cfg["representation_size"])
    box_head = TwoMLPHead(backbone.out_channels * 7 * 7, rep)
    kwargs = {k: cfg[k] for k in _FASTERRCNN_KWARGS if cfg[k] is not None}
    return FasterRCNN(
        backbone,
        num_classes=None,
        rpn_anchor_generator=anchors,
        box_roi_pool=pool,
        box_head=box_head,
        box_predictor=FastRCNNPredictor(rep, num_classes + 1),
        **kwargs,
    )


def _build_torchvision(cfg: Mapping[str, Any], num_classes: int) -> nn.Module:
    import torchvision.models.detection as det
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

    builder_name, backbone_name = _TORCHVISION_BUILDERS[cfg["backbone"]]
    builder = getattr(det, builder_name)
    kwargs = {k: cfg[k] for k in _FASTERRCNN_KWARGS if cfg[k] is not None}
    if cfg["trainable_backbone_layers"] is not None:
        kwargs["trainable_backbone_layers"] = int(cfg["trainable_backbone_layers"])
    weights = weights_backbone = None
    local_file = None
    if cfg["weights"] is not None:
        candidate = Path(str(cfg["weights"])).expanduser()
        if candidate.is_file():
            local_file = candidate
        elif os.sep in str(cfg["weights"]) or candidate.suffix:
            raise PretrainedWeightsUnavailable(
                f"model.weights={str(cfg['weights'])!r} looks like a file path but no such file exists; "
                "give the path of a local weights file or a torchvision weight name such as DEFAULT"
            )
        else:
            weights = _weights_enum(builder_name, str(cfg["weights"]), "weights")
            _require_cached(weights, "weights")
    if cfg["weights_backbone"] is not None:
        weights_backbone = _weights_enum(backbone_name, str(cfg["weights_backbone"]), "weights_backbone")
        _require_cached(weights_backbone, "weights_backbone")
    if weights is not None:
        # COCO-trained detectors come with 91 classes: load them, then give the
        # model a fresh predictor for this federation's classes (fine-tuning).
        model = builder(weights=weights, weights_backbone=None, **kwargs)
        in_features = model.roi_heads.box_predictor.cls_score.in_features
        model.roi_heads.box_predictor = FastRCNNPredictor(in_features, num_classes + 1)
    else:
        model = builder(weights=None, weights_backbone=weights_backbone, num_classes=num_classes + 1, **kwargs)
    if local_file is not None:
        _load_local_weights(model, local_file)
    return model


def build_frcnn(config: Mapping[str, Any], class_names: Sequence[str]) -> nn.Module:
    """Build the Faster R-CNN for ``class_names`` (background added), deterministically for ``config["seed"]``.

    :raises ValueError: a bad config value (naming the ``model.<key>``).
    :raises PretrainedWeightsUnavailable: pretrained weights asked for but not
        available offline; the message says how to provide them.
    """
    cfg = resolve_config(config)
    class_names = tuple(str(c) for c in class_names)
    if not class_names:
        raise ValueError("frcnn needs at least one object class (class_names is empty)")
    if cfg["backbone"] == "tiny" and cfg["weights_backbone"] is not None:
        raise ValueError("model.weights_backbone: the tiny backbone has no torchvision weights; use model.weights=<file>")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg["seed"] or 0))
        if cfg["backbone"] == "tiny":
            model = _build_tiny(cfg, len(class_names))
            if cfg["weights"] is not None:
                path = Path(str(cfg["weights"])).expanduser()
                if not path.is_file():
                    raise PretrainedWeightsUnavailable(
                        f"model.weights={str(cfg['weights'])!r}: the tiny backbone has no torchvision weights, "
                        "so model.weights must be the path of a local weights file, and none exists there"
                    )
                _load_local_weights(model, path)
        else:
            model = _build_torchvision(cfg, len(class_names))
    model.class_names = class_names
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- hooks


@hookimpl
def fedplug_build_model(config: Mapping[str, Any], class_names: Sequence[str]) -> nn.Module:
    """Build the detector (server at start-up; each client after ``init``)."""
    return build_frcnn(config, class_names)

