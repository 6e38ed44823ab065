"""The small typed values that cross hook boundaries.

Hooks never exchange loose dicts: every result a plugin hands back to the core,
and every bundle of inputs the core hands to a plugin, is one of these
dataclasses.  They hold plain Python values and ``torch.Tensor`` state dicts
only, so they are cheap to build in tests and safe to move between threads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

if TYPE_CHECKING:  # torch is heavy; type hints only
    import torch

StateDict = dict  # dict[str, torch.Tensor]: a model's full state (parameters and buffers)


class EmptyRoundError(ValueError):
    """Raised by an aggregator that received no update for a round.

    The server starts the aggregation hook when ``request_update`` goes out,
    before any update arrived, so the stream can end empty (every client failed
    or missed the deadline): raise this then.  The server treats it as a missed
    quorum (the round is retried or the run fails), not as a plugin defect.
    """


@dataclass(frozen=True)
class ClientUpdate:
    """One client's answer to ``request_update``, already decoded and validated.

    ``weights`` has exactly the names, shapes and dtypes of the global model and
    holds only finite values: the server checked that before any aggregator sees it.
    """

    client_id: str
    round_number: int
    weights: StateDict
    num_examples: int
    train_loss: float
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainSettings:
    """What a client's detector needs to train one round.

    Built by the client from the server's ``request_update`` message
    (``round_settings``) and its own local config.
    """

    round_number: int
    local_epochs: int = 1
    batch_size: int = 4
    lr: float = 0.01
    optimizer: str = "sgd"  # sgd | adam
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 0
    grad_accum_steps: int = 1
    lr_schedule: str = "constant"  # constant | cosine | step
    device: str = "cpu"
    amp: bool = False
    keep_optimizer_state: bool = False
    proximal_mu: float = 0.0  # FedProx: weight of (mu/2)·||w - w_global||², 0 disables
    max_grad_norm: float = 0.0  # 0 disables clipping
    num_workers: int = 0
    seed: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalSettings:
    """How a client evaluates a model on its local test split."""

    batch_size: int = 4
    device: str = "cpu"
    iou_threshold: float = 0.5
    use_07_metric: bool = False  # VOC2007 11-point interpolation instead of all-point
    score_threshold: float = 0.0  # detections below this score are dropped before matching
    num_workers: int = 0


@dataclass(frozen=True)
class TrainResult:
    """What a detector's ``fedplug_train_round`` hands back to the client.

    ``ok=False`` means the round failed (``reason`` says why, e.g. a non-finite
    loss): the client reports a failed update and the server goes on without it.
    """

    weights: StateDict | None
    num_examples: int
    train_loss: float
    ok: bool = True
    reason: str = ""
    seconds: float = 0.0
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass
class DetectionStats:
    """Mergeable per-class detection statistics of one test set.

    Built by :func:`fedplug.metrics.match_detections` on a client, sent to the
    server in ``client_eval`` (``to_json``), validated there (``from_json``),
    merged over clients and summarised by :func:`fedplug.metrics.summarize`.

    Pascal-VOC lists (at the evaluation's IoU threshold, 0.5 by default):
    ``scores[c]`` and ``true_positive[c]`` list every detection of class ``c``
    that was not matched to a ``difficult`` ground truth (its confidence, and
    whether it matched a still-unmatched non-difficult ground truth);
    ``num_ground_truth[c]`` counts non-difficult ground-truth boxes.

    COCO lists (optional, ``None`` when the producer did not compute them):
    ``coco_scores[c]`` lists *every* detection of class ``c``; bit ``k`` of
    ``coco_true_positive[c][i]`` says whether detection ``i`` is a true positive
    at IoU threshold ``COCO_IOU_THRESHOLDS[k]`` (0.50, 0.55, ..., 0.95), and bit
    ``k`` of ``coco_ignored[c][i]`` whether it matched a difficult box there
    (neither true nor false positive).  Matching differs per threshold, which
    is why one flag per threshold is kept.

    Concatenating two clients' lists gives exactly the statistics of the union
    of their test sets (matching is per image, and no image is in two test
    sets), which is why the server can compute the exact global mAP instead of
    averaging per-client mAPs.
    """

    num_classes: int
    scores: list[list[float]]
    true_positive: list[list[bool]]
    num_ground_truth: list[int]
    coco_scores: list[list[float]] | None = None
    coco_true_positive: list[list[int]] | None = None
    coco_ignored: list[list[int]] | None = None

    # IoU thresholds of the COCO lists' bits: 0.50, 0.55, ..., 0.95, the very floats of
    # pycocotools' ``np.linspace(.5, .95, 10)`` (tests/test_metrics.py checks that).
    COCO_IOU_THRESHOLDS: ClassVar[tuple[float, ...]] = tuple(
        [0.5 + k * ((0.95 - 0.5) / 9) for k in range(9)] + [0.95]
    )

    @property
    def has_coco(self) -> bool:
        return self.coco_scores is not None

    @classmethod
    def empty(cls, num_classes: int, coco: bool = True) -> "DetectionStats":
        def lists():
            return [[] for _ in range(num_classes)]

        return cls(
            num_classes,
            lists(),
            lists(),
            [0] * num_classes,
            lists() if coco else None,
            lists() if coco else None,
            lists() if coco else None,
        )

    def merge(self, other: "DetectionStats") -> "DetectionStats":
        """The statistics of both test sets together (the COCO lists only if both have them)."""
        if other.num_classes != self.num_classes:
            raise ValueError(
                f"cannot merge statistics over {other.num_classes} classes into {self.num_classes}"
            )

        def cat(a, b):
            return [x + y for x, y in zip(a, b)]

        coco = self.has_coco and other.has_coco
        return DetectionStats(
            self.num_classes,
            cat(self.scores, other.scores),
            cat(self.true_positive, other.true_positive),
            [a + b for a, b in zip(self.num_ground_truth, other.num_ground_truth)],
            cat(self.coco_scores, other.coco_scores) if coco else None,
            cat(self.coco_true_positive, other.coco_true_positive) if coco else None,
            cat(self.coco_ignored, other.coco_ignored) if coco else None,
        )

    def to_json(self) -> dict:
        data = {
            "num_classes": self.num_classes,
            "scores": self.scores,
            "true_positive": self.true_positive,
            "num_ground_truth": self.num_ground_truth,
        }
        if self.has_coco:
            data["coco_scores"] = self.coco_scores
            data["coco_true_positive"] = self.coco_true_positive
            data["coco_ignored"] = self.coco_ignored
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "DetectionStats":
        """Build from a peer's message; raises ``ValueError`` on any inconsistency."""
        bits = 1 << len(cls.COCO_IOU_THRESHOLDS)

        def score_rows(rows):
            out = [[float(s) for s in row] for row in rows]
            if any(not math.isfinite(s) for row in out for s in row):
                raise ValueError("non-finite score")
            return out

        def flag_rows(rows):
            out = []
            for row in rows:
                vals = []
                for t in row:
                    if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < bits:
                        raise ValueError(f"COCO flags must be integers in [0, {bits}), got {t!r}")
                    vals.append(t)
                out.append(vals)
            return out

        def bool_rows(rows):
            out = []
            for row in rows:
                if any(not isinstance(t, (bool, int)) or t not in (0, 1) for t in row):
                    raise ValueError("true_positive entries must be booleans")
                out.append([bool(t) for t in row])
            return out

        try:
            n = int(data["num_classes"])
            scores = score_rows(data["scores"])
            tps = bool_rows(data["true_positive"])
            gts = [int(g) for g in data["num_ground_truth"]]
            coco_keys = ("coco_scores", "coco_true_positive", "coco_ignored")
            present = [k in data and data[k] is not None for k in coco_keys]
            if any(present) and not all(present):
                raise ValueError(f"either all or none of {', '.join(coco_keys)}")
            coco = (
                (score_rows(data["coco_scores"]), flag_rows(data["coco_true_positive"]),
                 flag_rows(data["coco_ignored"]))
                if all(present)
                else (None, None, None)
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed detection statistics: {exc}") from None
        if n < 0 or not (len(scores) == len(tps) == len(gts) == n) or any(
            len(s) != len(t) for s, t in zip(scores, tps)
        ):
            raise ValueError("malformed detection statistics: per-class lists disagree in length")
        if coco[0] is not None and (
            not (len(coco[0]) == len(coco[1]) == len(coco[2]) == n)
            or any(not (len(s) == len(t) == len(i)) for s, t, i in zip(*coco))
        ):
            raise ValueError("malformed detection statistics: COCO lists disagree in length")
        if any(g < 0 for g in gts):
            raise ValueError("malformed detection statistics: negative ground-truth count")
        if any(sum(t) > g for t, g in zip(tps, gts)):
            raise ValueError("malformed detection statistics: more true positives than ground truth")
        return cls(n, scores, tps, gts, *coco)


@dataclass(frozen=True)
class EvalResult:
    """What a detector's ``fedplug_evaluate`` hands back for one test set."""

    num_examples: int
    loss: float
    map50: float
    recall: float
    stats: DetectionStats | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ResourceReport:
    """A client's measured load, 0 (idle) to 1 (saturated), with its details."""

    load: float
    kind: str = ""
    details: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (0.0 <= float(self.load) <= 1.0):
            raise ValueError(f"load must be within [0, 1], got {self.load!r}")


@dataclass(frozen=True)
class ResourceDecision:
    """A resource policy's verdict on one resource check.

    ``proceed`` says whether the round starts now with ``selected`` (a subset
    of the contacted clients); otherwise the server backs off and asks again.
    """

    selected: tuple[str, ...]
    proceed: bool
    reason: str = ""


@dataclass(frozen=True)
class RoundRecord:
    """One finished round as observers see it."""

    round_number: int
    participants: tuple[str, ...]
    train_loss: float | None
    test_loss: float | None = None
    map50: float | None = None
    recall: float | None = None
    seconds: float = 0.0
    per_client: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    extra: Mapping[str, float] = field(default_factory=dict)
    # who produced test_loss/map50/recall: "server" (a held-out set), "clients" (their local
    # test splits, merged), "server+clients" (eval.on=both; the clients' figures are in extra
    # as clients_*), or "" on a round that was not evaluated
    evaluated_by: str = ""


@dataclass(frozen=True)
class PrivacyMechanism:
    """The differentially private release a plugin makes each round, for the server's accountant.

    Returned by an aggregator's ``fedplug_aggregator_privacy``.  ``kind``:
    ``"central"`` -- Gaussian noise on the aggregate (DP-FedAvg; protects against
    whoever sees the global model); ``"local"`` -- each client noises its own
    update before sending it (protects against the server too).
    ``noise_multiplier`` is the round's noise std divided by its L2 sensitivity
    (the clip norm), the figure the accountant needs; ``sample_rate`` the
    probability that a given client takes part in a round (``None``: the
    server's ``privacy.sample_rate``).
    """

    kind: str
    noise_multiplier: float
    clip_norm: float | None = None
    sample_rate: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("central", "local"):
            raise ValueError(f"PrivacyMechanism.kind must be 'central' or 'local', got {self.kind!r}")
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"PrivacyMechanism.noise_multiplier must be a finite number >= 0, "
                             f"got {self.noise_multiplier!r}")
        if self.sample_rate is not None and not 0 < self.sample_rate <= 1:
            raise ValueError(f"PrivacyMechanism.sample_rate must be in (0, 1], got {self.sample_rate!r}")
