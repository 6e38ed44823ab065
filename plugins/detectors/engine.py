"""The training and evaluation engine every built-in detector plugin delegates to.

A detector plugin's ``fedplug_train_round`` calls :func:`train_one_round` and
its ``fedplug_evaluate`` calls :func:`evaluate` (the ``frcnn`` and ``yolov3``
plugins both do), so local training and evaluation behave the same whatever
the architecture.  The only thing the engine asks of a model is torchvision's
detection-model convention:

* train mode: ``model(images, targets) -> dict[str, Tensor]`` of losses, where
  ``images`` is a list of ``[C,H,W]`` float tensors in [0, 1] and ``targets`` a
  list of dicts with ``boxes`` (xyxy float) and ``labels`` (int64, 1..K);
* eval mode: ``model(images) -> list[dict(boxes, scores, labels)]`` in the input
  images' pixel coordinates.

The model does its own resizing and normalisation.  It may carry a
``class_names`` attribute (the plugins set it at build time); otherwise the
dataset's ``class_names`` gives the number of classes for evaluation.

docs/detectors.md describes the training options, the optimiser-state policy
and how the test loss is computed.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from fedplug import metrics
from fedplug.types import EvalResult, EvalSettings, TrainResult, TrainSettings

try:  # the data package's collate, when present (it is the same three lines)
    from fedplug.data import detection_collate
except ImportError:  # pragma: no cover - only while fedplug.data is being written

    def detection_collate(batch):
        images, targets = zip(*batch) if batch else ((), ())
        return list(images), list(targets)


OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("constant", "cosine", "step")
# The test loss's RPN/ROI sampling seed: fixed, so the same model on the same data
# always reports the same loss (and two models are compared on equal terms).
TEST_LOSS_SEED = 20240613
# Defaults of the schedule settings a detector's ``train`` config may add
# (they reach the engine through ``TrainSettings.extra``).
EXTRA_DEFAULTS: dict[str, Any] = {
    "total_rounds": 0,  # > 0: the lr schedule spans the whole run instead of one round
    "warmup_factor": 0.001,  # lr multiplier at the first warm-up step (torchvision references)
    "lr_gamma": 0.1,  # step schedule: lr multiplier at each milestone
    "lr_milestones": (0.7, 0.9),  # step schedule: milestones as fractions of the schedule
    "min_lr_ratio": 0.0,  # cosine schedule: final lr / initial lr
}


# ----------------------------------------------------------------------------- helpers


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when there is a GPU; ``cuda`` without one is a clear error."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} but no CUDA GPU is visible; use device=cpu or device=auto")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"device={name!r} is not one of auto, cpu, cuda (or cuda:N)")


def _extra(settings: TrainSettings, key: str) -> Any:
    return (settings.extra or {}).get(key, EXTRA_DEFAULTS[key])


def _check_train_settings(settings: TrainSettings) -> None:
    problems = []
    if settings.optimizer not in OPTIMIZERS:
        problems.append(f"train.optimizer={settings.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if settings.lr_schedule not in LR_SCHEDULES:
        problems.append(f"train.lr_schedule={settings.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
    for key in ("local_epochs", "batch_size", "grad_accum_steps"):
        if int(getattr(settings, key)) < 1:
            problems.append(f"train.{key} must be >= 1, got {getattr(settings, key)}")
    for key in ("lr", "proximal_mu", "max_grad_norm", "weight_decay", "warmup_iters", "momentum"):
        value = float(getattr(settings, key))
        if not math.isfinite(value) or value < 0:
            problems.append(f"train.{key} must be a finite number >= 0, got {getattr(settings, key)}")
    if problems:
        raise ValueError("; ".join(problems))


def _rng_devices(device: torch.device) -> list[int]:
    if device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []


def _round_seed(seed: int, round_number: int) -> int:
    # Distinct, reproducible streams per (seed, round): a client re-running a round
    # draws the same batches and the same RPN/ROI samples.
    return (int(seed) * 1_000_003 + int(round_number) * 7919) % (2**63 - 1)


def _to_device(images: Sequence[torch.Tensor], targets: Sequence[Mapping], device: torch.device):
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [
        {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
        for t in targets
    ]
    return images, targets


def _loader(dataset, batch_size: int, num_workers: int, generator: torch.Generator | None):
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=int(batch_size),
        shuffle=generator is not None,
        generator=generator,
        num_workers=int(num_workers),
        collate_fn=detection_collate,
        drop_last=False,
    )


def lr_factor(settings: TrainSettings, step: int, steps_per_round: int) -> float:
    """The lr multiplier for optimiser step ``step`` (0-based) of this round.

    The schedule runs over one round (every round restarts it) unless
    ``extra["total_rounds"]`` is set, in which case it runs over the whole
    federation: the step's position is ``(round_number - 1) * steps_per_round +
    step``.  Warm-up covers the first ``warmup_iters`` steps of that position,
    so with a run-wide schedule only round 1 warms up.
    """
    total_rounds = int(_extra(settings, "total_rounds") or 0)
    if total_rounds > 0:
        position = (max(1, int(settings.round_number)) - 1) * steps_per_round + step
        horizon = max(1, total_rounds * steps_per_round)
    else:
        position, horizon = step, max(1, steps_per_round)
    progress = min(1.0, position / horizon)
    if settings.lr_schedule == "cosine":
        floor = float(_extra(settings, "min_lr_ratio"))
        factor = floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    elif settings.lr_schedule == "step":
        passed = sum(1 for m in _extra(settings, "lr_milestones") if progress >= float(m))
        factor = float(_extra(settings, "lr_gamma")) ** passed
    else:
        factor = 1.0
    warmup = int(settings.warmup_iters)
    if warmup > 0 and position < warmup:
        start = float(_extra(settings, "warmup_factor"))
        factor *= start + (1.0 - start) * position / warmup
    return factor


def _make_optimizer(settings: TrainSettings, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if settings.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
        )
    cls = torch.optim.Adam if settings.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=settings.lr, weight_decay=settings.weight_decay)


def _cpu_copy(obj: Any) -> Any:
    """A detached CPU copy of a (nested) optimiser state, safe to keep across rounds."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


def _restore_optimizer(optimizer: torch.optim.Optimizer, settings: TrainSettings, state: dict) -> bool:
    """Load the previous round's optimiser state when the policy keeps it and it still fits."""
    saved = state.get("optimizer")
    if not settings.keep_optimizer_state or saved is None or state.get("optimizer_kind") != settings.optimizer:
        return False
    try:
        optimizer.load_state_dict(saved)
    except (ValueError, KeyError, RuntimeError):
        return False  # the parameter set changed: start afresh rather than mis-assign moments
    # Hyper-parameters come from this round's settings, not from the saved state.
    for group in optimizer.param_groups:
        group["lr"] = settings.lr
        group["weight_decay"] = settings.weight_decay
        if "momentum" in group:
            group["momentum"] = settings.momentum
    return True


def _failure(reason: str, num_examples: int, t0: float, steps: int) -> TrainResult:
    return TrainResult(
        weights=None,
        num_examples=num_examples,
        train_loss=float("nan"),
        ok=False,
        reason=reason,
        seconds=time.monotonic() - t0,
        metrics={"steps": float(steps)},
    )


# ----------------------------------------------------------------------------- training


def train_one_round(
    model: nn.Module,
    dataset: Any,
    settings: TrainSettings,
    global_weights: Mapping[str, torch.Tensor] | None = None,
    state: dict | None = None,
) -> TrainResult:
    """Train ``model`` on ``dataset`` for ``settings.local_epochs`` epochs: one federated round.

    Called by a detector plugin's ``fedplug_train_round`` (in the client's
    worker thread), after the client loaded the round's global weights.

    * optimiser: ``sgd`` (with ``momentum``), ``adam`` or ``adamw``, over the
      parameters that require gradients, with ``weight_decay``;
    * lr: ``settings.lr`` × :func:`lr_factor` (linear warm-up over
      ``warmup_iters`` optimiser steps; ``constant``/``cosine``/``step``);
    * ``grad_accum_steps`` micro-batches per optimiser step; each micro-batch
      loss is divided by the number of micro-batches in its group, so the step
      equals one on the concatenated batch for mean-reduced losses;
    * AMP (float16 autocast + gradient scaling) when ``settings.amp`` and the
      device is CUDA; ignored on CPU;
    * ``max_grad_norm > 0`` clips the gradient norm;
    * FedProx: with ``proximal_mu > 0`` the gradient of
      ``mu/2·||w − w_global||²`` (that is ``mu·(w − w_global)``) is added to
      every trainable parameter's gradient before each step;
    * optimiser state: kept in ``state["optimizer"]`` across rounds when
      ``keep_optimizer_state``, otherwise every round starts fresh;
    * determinism: the shuffling and all of the model's random sampling are
      seeded from ``(settings.seed, settings.round_number)``; the caller's
      global RNG state is restored afterwards.

    A non-finite loss or gradient norm, or non-finite weights after training,
    stops the round and returns ``TrainResult(ok=False, reason=...)``.

    :return: the trained full state (parameters and buffers) as CPU tensors,
        the number of training images, the mean training loss per batch and
        ``metrics`` with each loss component's mean, the last lr, the steps
        taken and the throughput.
    :raises ValueError: invalid settings, an empty dataset, or a parameter
        missing from ``global_weights`` while ``proximal_mu > 0``.
    """
    t0 = time.monotonic()
    _check_train_settings(settings)
    state = {} if state is None else state
    num_examples = len(dataset)
    if num_examples == 0:
        raise ValueError("the training split is empty: this client has no images to train on")
    device = resolve_device(settings.device)
    model.to(device)
    use_amp = bool(settings.amp) and device.type == "cuda"

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    if not params:
        raise ValueError("the model has no trainable parameters")
    mu = float(settings.proximal_mu)
    anchors: list[torch.Tensor] = []
    if mu > 0:
        if global_weights is None:
            raise ValueError("proximal_mu > 0 needs the round's global weights")
        missing = [n for n, _ in named if n not in global_weights]
        if missing:
            raise ValueError(f"global weights lack {len(missing)} trainable parameter(s), e.g. {missing[:3]}")
        anchors = [global_weights[n].detach().to(device=device, dtype=p.dtype) for n, p in named]

    optimizer = _make_optimizer(settings, params)
    restored = _restore_optimizer(optimizer, settings, state)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    batches_per_epoch = math.ceil(num_examples / int(settings.batch_size))
    accum = int(settings.grad_accum_steps)
    steps_per_epoch = math.ceil(batches_per_epoch / accum)
    steps_per_round = steps_per_epoch * int(settings.local_epochs)
    full_groups_end = (batches_per_epoch // accum) * accum  # batches after this form a short group

    seed = _round_seed(settings.seed, settings.round_number)
    loss_sum, loss_batches, images_seen, step = 0.0, 0, 0, 0
    component_sums: dict[str, float] = {}
    prox_sum, lr_now = 0.0, settings.lr * lr_factor(settings, 0, steps_per_round)

    with torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        loader = _loader(dataset, settings.batch_size, settings.num_workers, generator)
        model.train()
        optimizer.zero_grad(set_to_none=True)
        for epoch in range(int(settings.local_epochs)):
            for b, (images, targets) in enumerate(loader):
                images, targets = _to_device(images, targets, device)
                with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                    loss_dict = model(images, targets)
                    loss = sum(loss_dict.values())
                if not torch.isfinite(loss):
                    parts = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in loss_dict.items())
                    optimizer.zero_grad(set_to_none=True)
                    return _failure(
                        f"non-finite training loss at epoch {epoch + 1}, batch {b + 1} ({parts}); "
                        "lower train.lr or set train.max_grad_norm",
                        num_examples, t0, step,
                    )
                group_size = accum if b < full_groups_end else batches_per_epoch - full_groups_end
                scaler.scale(loss / group_size).backward()
                loss_sum += float(loss.detach())
                loss_batches += 1
                images_seen += len(images)
                for k, v in loss_dict.items():
                    component_sums[k] = component_sums.get(k, 0.0) + float(v.detach())
                if (b + 1) % accum != 0 and b + 1 != batches_per_epoch:
                    continue
                # ---- one optimiser step
                scaler.unscale_(optimizer)
                if mu > 0:
                    with torch.no_grad():
                        sq = 0.0
                        for p, w0 in zip(params, anchors):
                            diff = p.detach() - w0
                            sq += float(diff.pow(2).sum())
                            if p.grad is None:
                                p.grad = mu * diff
                            else:
                                p.grad.add_(diff, alpha=mu)
                        prox_sum += 0.5 * mu * sq
                if settings.max_grad_norm > 0:
                    norm = torch.nn.utils.clip_grad_norm_(params, float(settings.max_grad_norm))
                    if not torch.isfinite(norm) and not use_amp:  # AMP skips such steps by design
                        optimizer.zero_grad(set_to_none=True)
                        return _failure(
                            f"non-finite gradient norm at epoch {epoch + 1}, batch {b + 1}",
                            num_examples, t0, step,
                        )
                lr_now = settings.lr * lr_factor(settings, step, steps_per_round)
                for group in optimizer.param_groups:
                    group["lr"] = lr_now
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1

    with torch.no_grad():
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            return _failure("the weights became non-finite during training", num_examples, t0, step)
    if settings.keep_optimizer_state:
        state["optimizer"] = _cpu_copy(optimizer.state_dict())
        state["optimizer_kind"] = settings.optimizer
    else:
        state.pop("optimizer", None)
        state.pop("optimizer_kind", None)

    seconds = time.monotonic() - t0
    weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    out_metrics = {(k if k.startswith("loss") else f"loss_{k}"): v / loss_batches for k, v in component_sums.items()}
    out_metrics.update(
        lr=float(lr_now),
        steps=float(step),
        images_per_second=images_seen / seconds if seconds > 0 else 0.0,
        optimizer_state_restored=float(restored),
    )
    if mu > 0:
        out_metrics["proximal_term"] = prox_sum / max(1, step)
    return TrainResult(
        weights=weights,
        num_examples=num_examples,
        train_loss=loss_sum / loss_batches,
        ok=True,
        seconds=seconds,
        metrics=out_metrics,
    )


# ----------------------------------------------------------------------------- evaluation


@contextlib.contextmanager
def loss_mode(model: nn.Module) -> Iterator[None]:
    """Train mode (so the model computes its losses) with normalisation and dropout frozen.

    BatchNorm-like layers use their running statistics and do not update them,
    and dropout is off, so computing a test loss changes nothing in the model
    and does not depend on the batch composition.  Every module's mode is
    restored afterwards.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.train()
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd)):
            m.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _class_names(model: nn.Module, dataset: Any, class_names: Sequence[str] | None) -> tuple[str, ...]:
    names = class_names or getattr(model, "class_names", None) or getattr(dataset, "class_names", None)
    if not names:
        raise ValueError(
            "cannot tell the number of classes: give class_names, or a model/dataset with a class_names attribute"
        )
    return tuple(names)


def evaluate(
    model: nn.Module,
    dataset: Any,
    settings: EvalSettings,
    class_names: Sequence[str] | None = None,
    compute_loss: bool = True,
) -> EvalResult:
    """Evaluate ``model`` on ``dataset``: test loss, VOC mAP, recall, COCO mAP and mergeable statistics.

    Called by a detector plugin's ``fedplug_evaluate`` (client worker thread,
    after ``stop_and_eval`` loaded the aggregated weights) and by centralised
    evaluations.  Per batch:

    1. predictions in eval mode (BatchNorm uses running statistics) under
       ``torch.inference_mode``; detections scoring below
       ``settings.score_threshold`` are dropped; the rest are matched to the
       ground truth (including ``difficult`` flags) by
       :func:`fedplug.metrics.match_detections` at ``settings.iou_threshold``;
    2. the test loss: the same training objective the model optimises,
       computed without gradients in :func:`loss_mode` (train mode with
       normalisation and dropout frozen), with the model's random sampling
       (e.g. Faster R-CNN's RPN/ROI sampling) seeded by ``TEST_LOSS_SEED`` so
       it is reproducible.  ``loss`` is its mean per image.

    The model's train/eval mode and the caller's RNG state are restored.

    :return: an :class:`~fedplug.types.EvalResult`; ``metrics`` holds
        ``coco_map``, ``coco_map50``, ``coco_map75``, ``ap/<class>`` for
        classes with ground truth, ``num_detections`` and ``seconds``.
    """
    t0 = time.monotonic()
    names = _class_names(model, dataset, class_names)
    num_classes = len(names)
    if len(dataset) == 0:
        stats = metrics.match_detections([], [], num_classes, settings.iou_threshold)
        return EvalResult(0, 0.0, 0.0, 0.0, stats, {"num_detections": 0.0, "seconds": 0.0})
    device = resolve_device(settings.device)
    model.to(device)
    was_training = model.training
    predictions: list[dict] = []
    ground_truth: list[dict] = []
    loss_total, threshold = 0.0, float(settings.score_threshold)
    loader = _loader(dataset, settings.batch_size, settings.num_workers, None)
    try:
        with torch.random.fork_rng(devices=_rng_devices(device)):
            torch.manual_seed(TEST_LOSS_SEED)
            for images, targets in loader:
                images_dev, targets_dev = _to_device(images, targets, device)
                model.eval()
                with torch.inference_mode():
                    outputs = model(images_dev)
                for out in outputs:
                    keep = out["scores"] >= threshold
                    predictions.append({k: out[k][keep].detach().float().cpu() for k in ("boxes", "scores", "labels")})
                for t in targets:
                    gt = {"boxes": t["boxes"], "labels": t["labels"]}
                    if "difficult" in t:
                        gt["difficult"] = t["difficult"]
                    ground_truth.append(gt)
                if compute_loss:
                    with loss_mode(model), torch.no_grad():
                        loss_dict = model(images_dev, targets_dev)
                    loss_total += float(sum(loss_dict.values())) * len(images)
    finally:
        model.train(was_training)
    stats = metrics.match_detections(predictions, ground_truth, num_classes, settings.iou_threshold)
    summary = metrics.summarize(stats, use_07_metric=settings.use_07_metric)
    out = {
        "coco_map": summary["coco_map"],
        "coco_map50": summary["coco_map50"],
        "coco_map75": summary["coco_map75"],
        "num_detections": float(summary["num_detections"]),
        "seconds": time.monotonic() - t0,
    }
    for name, ap in zip(names, summary["ap"]):
        if not math.isnan(ap):
            out[f"ap/{name}"] = ap
    loss = loss_total / len(dataset) if compute_loss else float("nan")
    return EvalResult(
        num_examples=len(dataset),
        loss=loss,
        map50=summary["map50"],
        recall=summary["recall"],
        stats=stats,
        metrics=out,
    )
