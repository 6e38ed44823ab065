"""Where the global model is evaluated, and how evaluations become a round's metrics.

``eval.on`` chooses who evaluates the global model on an evaluation round:

- ``clients``: every evaluating client gets ``stop_and_eval`` and scores its own
  local test split; their mergeable statistics give the exact mAP over the
  union of those splits (the seed's way);
- ``server``: the server itself scores a held-out test set (``eval.data``, or
  the dataset's shared test set, e.g. the Street release's ``test_label.json``)
  with the detector's own ``fedplug_evaluate``, once per evaluation round,
  instead of N clients scoring identical images (Flower's ``evaluate_fn``);
- ``both``: the server's held-out figures are the round's metrics (they pick
  the best checkpoint), the clients' federated figures are kept beside them
  with a ``clients_`` prefix;
- ``auto`` (the default): ``server`` when a held-out set is available, else ``clients``.

Both paths produce the same *evaluation entry* (test size, loss, mAP, recall,
statistics), so one function, :func:`round_metrics`, turns either into the
figures a :class:`~fedplug.types.RoundRecord` carries, with what they cover.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Mapping, Sequence

from fedplug.types import DetectionStats, EvalResult, EvalSettings

log = logging.getLogger("fedplug.evaluation")

PLACES = ("auto", "server", "clients", "both")
_EVAL_FIELDS = {f.name for f in dataclasses.fields(EvalSettings)}


class EvaluationSetupError(ValueError):
    """``eval.on`` asks for something this run's data cannot give; the message says what to set."""


def eval_settings_from(config: Mapping[str, Any], device: str) -> EvalSettings:
    """The :class:`EvalSettings` of the ``eval`` config section (unknown keys are not settings)."""
    known = {k: v for k, v in dict(config or {}).items() if k in _EVAL_FIELDS and k != "device"}
    return EvalSettings(device=device, **known)


def resolve_place(requested: str, has_held_out: bool, clients_have_test: bool) -> str:
    """Turn ``eval.on`` into ``server``, ``clients`` or ``both``, or say why it cannot work."""
    if requested not in PLACES:
        raise EvaluationSetupError(f"eval.on must be one of {', '.join(PLACES)}, got {requested!r}")
    if requested == "auto":
        return "server" if has_held_out else "clients"
    if requested in ("server", "both") and not has_held_out:
        raise EvaluationSetupError(
            f"eval.on={requested} needs a held-out test set on the server: set eval.data to a dataset spec, "
            "e.g. eval.data={format: voc, path: /data/heldout}, or use data with a shared test set "
            "(the Street release's test_label.json)")
    if requested in ("clients", "both") and not clients_have_test:
        raise EvaluationSetupError(
            f"eval.on={requested}, but this dataset's test set is shared (no client holds test images of its "
            "own): every client would score the same images. Use eval.on=server (the default for it)")
    return requested


def entry_from_result(result: Any, who: str) -> dict[str, Any]:
    """An evaluation entry from a detector's :class:`EvalResult`, checked as strictly as a client's message."""
    if not isinstance(result, EvalResult):
        raise TypeError(f"{who}: fedplug_evaluate returned {type(result).__name__}, expected fedplug.types.EvalResult")
    stats = result.stats
    if stats is not None and not isinstance(stats, DetectionStats):
        raise TypeError(f"{who}: EvalResult.stats is {type(stats).__name__}, expected fedplug.types.DetectionStats")
    loss = float(result.loss)
    return {
        "test_size": int(result.num_examples),
        "test_loss": loss if math.isfinite(loss) else 0.0,
        "map50": float(result.map50),
        "recall": float(result.recall),
        "stats": stats,
        "metrics": {k: float(v) for k, v in dict(result.metrics).items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))},
    }


class HeldOutEvaluator:
    """The server's own copy of the detector, scoring the global model on a held-out test set.

    Built once at start-up (so a broken detector or dataset fails before round
    1); :meth:`evaluate` runs in one of the server's worker threads.
    """

    def __init__(self, hook, model_cfg: Mapping[str, Any], class_names: Sequence[str], dataset: Any,
                 settings: EvalSettings, source: str, detector: str):
        self.hook = hook
        self.dataset = dataset
        self.settings = settings
        self.source = source
        self.detector = detector
        self.model = hook.fedplug_build_model(config=dict(model_cfg), class_names=tuple(class_names))
        if len(dataset) == 0:
            raise EvaluationSetupError(f"the server's held-out test set ({source}) holds no image")

    def __len__(self) -> int:
        return len(self.dataset)

    def evaluate(self, weights: Mapping[str, Any]) -> dict[str, Any]:
        self.model.load_state_dict(dict(weights))
        result = self.hook.fedplug_evaluate(model=self.model, dataset=self.dataset, settings=self.settings)
        return entry_from_result(result, f"detector {self.detector!r} on the server's held-out set")


def _merge(entries: Sequence[Mapping[str, Any]], use_07_metric: bool, trusted: bool = False) -> dict[str, Any]:
    """Weighted test loss and the exact mAP/recall over the union of the entries' test sets.

    Only entries with statistics make the mAP and recall: a client's own figure
    without them cannot be checked, so it never sets the round's mAP (one client
    claiming mAP 1.0 would otherwise pick the best checkpoint).  Such claims are
    reported beside it as ``claimed_map50`` / ``claimed_recall`` / ``claimed_images``.
    ``trusted`` (the server's own held-out evaluation) may use its figures as they are.
    """
    from fedplug import metrics

    total = sum(e["test_size"] for e in entries) or 1
    out: dict[str, Any] = {"test_loss": sum(e["test_loss"] * e["test_size"] for e in entries) / total}
    exact = [e for e in entries if e["stats"] is not None]
    claims = [e for e in entries if e["stats"] is None]
    if exact:
        merged = exact[0]["stats"]
        for e in exact[1:]:
            merged = merged.merge(e["stats"])
        summary = metrics.summarize(merged, use_07_metric=use_07_metric)
        out.update(map50=float(summary["map50"]), recall=float(summary["recall"]), map_exact=1.0)
        if summary.get("coco_map") is not None and math.isfinite(summary["coco_map"]):
            out["coco_map"] = float(summary["coco_map"])
        out["images"] = float(sum(e["test_size"] for e in exact))
    elif trusted:  # the server's own evaluation without statistics: its figures, flagged as not exact
        out.update(map50=sum(e["map50"] * e["test_size"] for e in entries) / total,
                   recall=sum(e["recall"] * e["test_size"] for e in entries) / total, map_exact=0.0,
                   images=float(sum(e["test_size"] for e in entries)))
        claims = []
    else:
        out.update(map50=None, recall=None, map_exact=0.0, images=0.0)
    if claims:
        claimed = sum(e["test_size"] for e in claims) or 1
        out.update(claimed_map50=sum(e["map50"] * e["test_size"] for e in claims) / claimed,
                   claimed_recall=sum(e["recall"] * e["test_size"] for e in claims) / claimed,
                   claimed_images=float(sum(e["test_size"] for e in claims)), claimed_clients=float(len(claims)))
    return out


def round_metrics(place: str, server_entry: Mapping[str, Any] | None, client_entries: Mapping[str, Mapping],
                  expected_client_images: int, use_07_metric: bool,
                  per_client: dict[str, dict]) -> dict[str, Any]:
    """A round's evaluation figures as :class:`RoundRecord` keyword arguments, saying what they cover.

    ``extra`` records ``evaluators`` (how many clients answered), ``eval_images``
    (test images scored) and ``eval_coverage`` (the share of the expected test
    images that were scored: below 1.0 when an evaluator dropped out, so a
    partial mAP is never mistaken for the whole test set's).  ``per_client``
    gains each evaluating client's own figures.
    """
    for cid, e in client_entries.items():
        per_client.setdefault(cid, {}).update({"test_loss": e["test_loss"], "map50": e["map50"],
                                               "recall": e["recall"], "test_size": float(e["test_size"])})
    # an evaluation of no image says nothing about the model: it must not give the round a test loss of 0
    client_entries = {cid: e for cid, e in client_entries.items() if e["test_size"] > 0}
    clients = _merge(list(client_entries.values()), use_07_metric) if client_entries else None
    server = _merge([server_entry], use_07_metric, trusted=True) if server_entry is not None else None
    primary = server if server is not None else clients
    if primary is None:
        return {"evaluated_by": ""}
    extra: dict[str, float] = {"map_exact": primary["map_exact"], "eval_images": primary["images"],
                               "evaluators": float(len(client_entries))}
    if "coco_map" in primary:
        extra["coco_map"] = primary["coco_map"]
    for key in ("claimed_map50", "claimed_recall", "claimed_images", "claimed_clients"):
        if clients is not None and key in clients:  # clients' own figures without statistics: reported, not merged
            extra[key] = clients[key]
    if server is None:  # the clients' figures are the round's: say how much of their test data they cover
        extra["eval_coverage"] = primary["images"] / expected_client_images if expected_client_images else 1.0
    else:
        extra["eval_coverage"] = 1.0
        if clients is not None:
            for key in ("test_loss", "map50", "recall", "coco_map", "images"):
                if clients.get(key) is not None:
                    extra[f"clients_{key}"] = clients[key]
            extra["clients_coverage"] = (clients["images"] / expected_client_images
                                         if expected_client_images else 1.0)
    evaluated_by = "+".join(p for p, r in (("server", server), ("clients", clients)) if r is not None)
    return {"test_loss": primary["test_loss"], "map50": primary["map50"], "recall": primary["recall"],
            "evaluated_by": evaluated_by, "extra": extra}


def safe_call(fn: Callable[[], dict], what: str, echo: Callable[[str], None]) -> dict | None:
    """Run a server-side evaluation; a plugin failure is reported, the round goes on without it."""
    try:
        return fn()
    except Exception as exc:
        log.exception("%s failed", what)
        echo(f"  {what} failed ({type(exc).__name__}: {exc}); this round has no held-out metrics")
        return None
