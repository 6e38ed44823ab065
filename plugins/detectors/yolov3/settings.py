"""The YOLOv3 plugin's model settings, read from the ``model`` config group.

``fedplug_build_model`` (server and clients) calls :func:`parse_settings` on
the ``model`` config dict it receives; :class:`~.model.YOLOv3` keeps the
result.  Every key is checked here, so a wrong value stops the run at start-up
with the key's name and what is allowed, instead of deep inside training.

The three variants and their defaults:

* ``darknet53`` -- YOLOv3 of the paper: Darknet-53 backbone, FPN-style neck,
  three scales (strides 32/16/8) and the nine COCO anchors, at 416 px.
* ``tiny`` -- YOLOv3-tiny (``yolov3-tiny.cfg``): a 7-conv backbone with
  max-pooling, two scales (strides 32/16) and six anchors, at 416 px.
* ``nano`` -- fedplug's CPU variant: the tiny topology with one stage fewer
  (strides 16/8) and narrow layers, at 128 px, anchors for 12-50 px objects.

Anchors are in input pixels and, as in Darknet, the same at every ``img_size``
(``yolov3.cfg`` runs at 608 px with the anchors it has at 416).
``model.scale_anchors: true`` scales the variant's anchors by
``img_size / anchors_at`` (416 for darknet53 and tiny, 128 for nano) instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

# Anchors of the published cfg files, in input pixels, smallest first.  Darknet uses them
# as they are at any input size (yolov3.cfg's width=608 keeps them); they were chosen at 416.
COCO_ANCHORS_416 = (
    (10, 13), (16, 30), (33, 23),
    (30, 61), (62, 45), (59, 119),
    (116, 90), (156, 198), (373, 326),
)
TINY_ANCHORS_416 = ((10, 14), (23, 27), (37, 58), (81, 82), (135, 169), (344, 319))
# nano: sized for the 12-50 px objects of fedplug's synthetic 128-px street scenes
# (k-means with IoU distance over 1,300 of their boxes, rounded; mean best IoU 0.81).
NANO_ANCHORS = ((10, 22), (20, 18), (26, 23), (17, 37), (31, 30), (41, 39))

# Which anchors each detection layer uses, in the order the network emits its
# outputs (coarsest scale first, as in the cfg files).  yolov3-tiny.cfg gives
# its stride-16 layer anchors 1,2,3 (not 0,1,2): kept, so that the published
# yolov3-tiny.weights decode as trained.
VARIANTS: dict[str, dict[str, Any]] = {
    "darknet53": {
        "img_size": 416,
        "strides": (32, 16, 8),
        "anchors": COCO_ANCHORS_416,
        "anchor_masks": ((6, 7, 8), (3, 4, 5), (0, 1, 2)),
        "anchors_at": 416,  # the input size the anchors were chosen for (model.scale_anchors)
    },
    "tiny": {
        "img_size": 416,
        "strides": (32, 16),
        "anchors": TINY_ANCHORS_416,
        "anchor_masks": ((3, 4, 5), (1, 2, 3)),
        "anchors_at": 416,
    },
    "nano": {
        "img_size": 128,
        "strides": (16, 8),
        "anchors": NANO_ANCHORS,
        "anchor_masks": ((3, 4, 5), (0, 1, 2)),
        "anchors_at": 128,
    },
}

BOX_LOSSES = ("mse", "giou")

# Every key of the ``model`` group this plugin understands (a typo is an error, not a silent default).
KNOWN_KEYS = frozenset({
    "name", "variant", "img_size", "anchors", "anchor_masks", "scale_anchors", "conf_threshold",
    "nms_iou", "max_detections", "pre_nms_topk", "ignore_threshold", "box_loss", "loss_gains",
    "bn_momentum", "weights", "weights_cutoff", "weights_reinit_heads", "seed",
})


class ConfigError(ValueError):
    """A ``model`` config value the YOLOv3 plugin cannot use; the message names the key."""


@dataclass(frozen=True)
class YOLOv3Settings:
    """Everything the model needs to know, validated (see ``docs/yolov3.md``)."""

    variant: str = "nano"
    num_classes: int = 1
    img_size: int = 128
    anchors: tuple[tuple[float, float], ...] = NANO_ANCHORS
    anchor_masks: tuple[tuple[int, ...], ...] = ((3, 4, 5), (0, 1, 2))
    scale_anchors: bool = False
    strides: tuple[int, ...] = (16, 8)
    conf_threshold: float = 0.01
    nms_iou: float = 0.45
    max_detections: int = 100
    pre_nms_topk: int = 1000
    ignore_threshold: float = 0.5
    box_loss: str = "mse"
    loss_gains: Mapping[str, float] = field(
        default_factory=lambda: {"box": 1.0, "obj": 1.0, "cls": 1.0}
    )
    bn_momentum: float = 0.1
    weights: str | None = None
    weights_cutoff: int | None = None
    weights_reinit_heads: bool = False
    seed: int = 0

    @property
    def max_stride(self) -> int:
        return max(self.strides)


def _number(cfg: Mapping[str, Any], key: str, default, kind=float, lo=None, hi=None):
    value = cfg.get(key, default)
    if value is None:
        value = default
    try:
        if kind is int and (isinstance(value, bool) or float(value) != int(value)):
            raise ValueError
        value = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"model.{key} must be a {kind.__name__}, got {value!r}") from None
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ConfigError(f"model.{key} must be within [{lo}, {hi}], got {value!r}")
    return value


def _anchors(value: Any) -> tuple[tuple[float, float], ...]:
    """Accept ``[[w, h], ...]`` or the cfg files' flat ``[w, h, w, h, ...]``."""
    try:
        flat = [float(v) for v in value] if not hasattr(value[0], "__len__") else None
        pairs = (
            [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]
            if flat is not None
            else [(float(w), float(h)) for w, h in value]
        )
        if flat is not None and len(flat) % 2:
            raise ValueError
    except (TypeError, ValueError, IndexError, KeyError):
        raise ConfigError(
            f"model.anchors must be a list of [width, height] pairs in pixels, got {value!r}"
        ) from None
    if not pairs or any(w <= 0 or h <= 0 for w, h in pairs):
        raise ConfigError(f"model.anchors must be positive [width, height] pairs, got {value!r}")
    return tuple(pairs)


def parse_settings(config: Mapping[str, Any], num_classes: int) -> YOLOv3Settings:
    """Validate the ``model`` config group and fill in the variant's defaults.

    Called by ``fedplug_build_model``.  ``anchors`` are the variant's own, in
    input pixels at any ``img_size`` as in Darknet, or scaled by ``img_size /
    anchors_at`` when ``scale_anchors`` is true; ``anchors`` given in the
    config are used as given (pixels of the ``img_size`` input).
    """
    cfg = dict(config or {})
    unknown = sorted(set(cfg) - KNOWN_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown YOLOv3 setting(s) model.{', model.'.join(unknown)}; "
            f"known keys: {', '.join(sorted(KNOWN_KEYS))}"
        )
    variant = cfg.get("variant") or "nano"
    if variant not in VARIANTS:
        raise ConfigError(
            f"model.variant must be one of {', '.join(VARIANTS)}, got {variant!r}"
        )
    spec = VARIANTS[variant]
    if int(num_classes) < 1:
        raise ConfigError("YOLOv3 needs at least one object class (the data's class list is empty)")
    img_size = _number(cfg, "img_size", spec["img_size"], int, lo=32)
    stride = max(spec["strides"])
    if img_size % stride:
        raise ConfigError(
            f"model.img_size must be a multiple of {stride} for variant {variant!r}, got {img_size}"
            f" (e.g. {max(stride, img_size // stride * stride)})"
        )
    scale_anchors = cfg.get("scale_anchors")
    if scale_anchors is None:
        scale_anchors = False
    if not isinstance(scale_anchors, bool):
        raise ConfigError(f"model.scale_anchors must be true or false, got {scale_anchors!r}")
    if cfg.get("anchors") is not None:
        if scale_anchors:
            raise ConfigError(
                "model.scale_anchors=true scales the variant's own anchors, but model.anchors are given "
                "(used as given, in input pixels): set one or the other"
            )
        anchors = _anchors(cfg["anchors"])
    elif scale_anchors:
        ref = spec["anchors_at"]
        anchors = tuple((w * img_size / ref, h * img_size / ref) for w, h in spec["anchors"])
    else:
        anchors = tuple((float(w), float(h)) for w, h in spec["anchors"])
    masks = cfg.get("anchor_masks")
    if masks is None:
        masks = spec["anchor_masks"]
    try:
        masks = tuple(tuple(int(i) for i in m) for m in masks)
    except (TypeError, ValueError):
        raise ConfigError(f"model.anchor_masks must be lists of anchor indices, got {masks!r}") from None
    if len(masks) != len(spec["strides"]) or any(not m for m in masks):
        raise ConfigError(
            f"model.anchor_masks must give {len(spec['strides'])} non-empty lists (one per detection "
            f"scale, coarsest first) for variant {variant!r}, got {masks!r}"
        )
    if len({len(m) for m in masks}) != 1:
        raise ConfigError(f"model.anchor_masks lists must all have the same length, got {masks!r}")
    if any(i < 0 or i >= len(anchors) for m in masks for i in m):
        raise ConfigError(
            f"model.anchor_masks refer to anchors 0..{len(anchors) - 1} only, got {masks!r}"
        )
    box_loss = cfg.get("box_loss") or "mse"
    if box_loss not in BOX_LOSSES:
        raise ConfigError(f"model.box_loss must be one of {', '.join(BOX_LOSSES)}, got {box_loss!r}")
    gains = {"box": 1.0, "obj": 1.0, "cls": 1.0}
    raw_gains = cfg.get("loss_gains") or {}
    for key, value in dict(raw_gains).items():
        if key not in gains:
            raise ConfigError(f"model.loss_gains keys are box, obj, cls; got {key!r}")
        gains[key] = _number(dict(raw_gains), key, 1.0, float, lo=0.0)
    weights = cfg.get("weights")
    cutoff = cfg.get("weights_cutoff")
    return YOLOv3Settings(
        variant=variant,
        num_classes=int(num_classes),
        img_size=img_size,
        anchors=anchors,
        anchor_masks=masks,
        scale_anchors=scale_anchors,
        strides=tuple(spec["strides"]),
        conf_threshold=_number(cfg, "conf_threshold", 0.01, float, lo=0.0, hi=1.0),
        nms_iou=_number(cfg, "nms_iou", 0.45, float, lo=0.0, hi=1.0),
        max_detections=_number(cfg, "max_detections", 100, int, lo=1),
        pre_nms_topk=_number(cfg, "pre_nms_topk", 1000, int, lo=1),
        ignore_threshold=_number(cfg, "ignore_threshold", 0.5, float, lo=0.0, hi=1.0),
        box_loss=box_loss,
        loss_gains=gains,
        bn_momentum=_number(cfg, "bn_momentum", 0.1, float, lo=0.0, hi=1.0),
        weights=str(weights) if weights not in (None, "") else None,
        weights_cutoff=None if cutoff is None else _number(cfg, "weights_cutoff", None, int, lo=1),
        weights_reinit_heads=bool(cfg.get("weights_reinit_heads", False)),
        seed=_number(cfg, "seed", 0, int),
    )

