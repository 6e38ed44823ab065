"""The small typed values that cross hook boundaries.

Hooks never exchange loose dicts: every result a plugin hands back to the core,
and every bundle of inputs the core hands to a plugin, is one of these
dataclasses.  They hold plain Python values and ``torch.Tensor`` state dicts
only, so they are cheap to build in tests and safe to move between threads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:  # torch is heavy; type hints only
    import torch

StateDict = dict  # dict[str, torch.Tensor]: a model's full state (parameters and buffers)


class EmptyRoundError(ValueError):
    """Raised by an aggregator that received no update for a round.

    The server never calls an aggregator without at least one accepted update,
    so seeing this error means a plugin was called directly (e.g. by a test).
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

    ``scores[c]`` and ``true_positive[c]`` list every detection of class ``c``
    (its confidence, and whether it matched an unmatched non-difficult ground
    truth at IoU >= 0.5); ``num_ground_truth[c]`` counts non-difficult ground
    truth boxes.  Concatenating two clients' lists gives exactly the statistics
    of the union of their test sets, which is why the server can compute the
    exact global mAP instead of averaging per-client mAPs.
    """

    num_classes: int
    scores: list[list[float]]
    true_positive: list[list[bool]]
    num_ground_truth: list[int]

    @classmethod
    def empty(cls, num_classes: int) -> "DetectionStats":
        return cls(
            num_classes,
            [[] for _ in range(num_classes)],
            [[] for _ in range(num_classes)],
            [0] * num_classes,
        )

    def merge(self, other: "DetectionStats") -> "DetectionStats":
        if other.num_classes != self.num_classes:
            raise ValueError(
                f"cannot merge statistics over {other.num_classes} classes into {self.num_classes}"
            )
        return DetectionStats(
            self.num_classes,
            [a + b for a, b in zip(self.scores, other.scores)],
            [a + b for a, b in zip(self.true_positive, other.true_positive)],
            [a + b for a, b in zip(self.num_ground_truth, other.num_ground_truth)],
        )

    def to_json(self) -> dict:
        return {
            "num_classes": self.num_classes,
            "scores": self.scores,
            "true_positive": self.true_positive,
            "num_ground_truth": self.num_ground_truth,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "DetectionStats":
        """Build from a peer's message; raises ``ValueError`` on any inconsistency."""
        try:
            n = int(data["num_classes"])
            scores = [[float(s) for s in row] for row in data["scores"]]
            tps = [[bool(t) for t in row] for row in data["true_positive"]]
            gts = [int(g) for g in data["num_ground_truth"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed detection statistics: {exc}") from None
        if not (len(scores) == len(tps) == len(gts) == n) or any(
            len(s) != len(t) for s, t in zip(scores, tps)
        ):
            raise ValueError("malformed detection statistics: per-class lists disagree in length")
        if any(g < 0 for g in gts):
            raise ValueError("malformed detection statistics: negative ground-truth count")
        return cls(n, scores, tps, gts)


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
