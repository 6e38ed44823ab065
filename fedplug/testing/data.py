"""Small, deterministic inputs for the contract suites: state dicts, client updates, images.

Everything here is built in memory in milliseconds, so a plugin's contract tests
need no dataset on disk and no download.  The shapes mimic what the core really
hands to plugins: a state dict with float parameters, BatchNorm statistics and
an ``int64`` ``num_batches_tracked`` buffer; detection samples in torchvision's
format (image float ``[C,H,W]`` in ``[0,1]``, target ``boxes`` xyxy float and
``labels`` int64 from 1).
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import torch

from fedplug.types import ClientUpdate, StateDict

# Pure, well separated colours so that a detector can tell the classes apart.
_CLASS_COLOURS = (
    (0.9, 0.1, 0.1),
    (0.1, 0.8, 0.1),
    (0.1, 0.2, 0.9),
    (0.9, 0.8, 0.1),
    (0.8, 0.1, 0.8),
    (0.1, 0.8, 0.8),
)


def sample_state_dict(seed: int = 0) -> StateDict:
    """A tiny conv-BN-linear model's full state: float parameters, BN statistics, an int64 buffer.

    ``seed`` only changes the float values; names, shapes and dtypes are fixed.
    """
    g = torch.Generator().manual_seed(seed)
    return {
        "backbone.conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "backbone.conv.bias": torch.randn(4, generator=g),
        "backbone.bn.weight": 1.0 + 0.1 * torch.randn(4, generator=g),
        "backbone.bn.bias": 0.1 * torch.randn(4, generator=g),
        "backbone.bn.running_mean": 0.1 * torch.randn(4, generator=g),
        "backbone.bn.running_var": 1.0 + 0.1 * torch.rand(4, generator=g),
        "backbone.bn.num_batches_tracked": torch.tensor(100, dtype=torch.int64),
        "head.weight": torch.randn(2, 4, generator=g),
        "head.bias": torch.randn(2, generator=g),
    }


def perturbed(weights: StateDict, seed: int, scale: float = 0.1, steps: int = 10) -> StateDict:
    """A client's result after local training: float tensors moved by noise, counters advanced.

    Integer buffers advance by ``steps`` (as ``num_batches_tracked`` does during
    training); running variances stay positive.
    """
    g = torch.Generator().manual_seed(10_000 + seed)
    out = {}
    for name, t in weights.items():
        if t.is_floating_point():
            moved = t + scale * torch.randn(t.shape, generator=g, dtype=t.dtype)
            if name.endswith("running_var"):
                moved = moved.abs() + 1e-3
            out[name] = moved
        else:
            out[name] = t + steps
    return out


def make_update(
    weights: StateDict, client_id: str = "client-0", num_examples: int = 10, round_number: int = 1,
    train_loss: float = 1.0,
) -> ClientUpdate:
    """A :class:`~fedplug.types.ClientUpdate` as the server hands it to an aggregator."""
    return ClientUpdate(
        client_id=client_id,
        round_number=round_number,
        weights=weights,
        num_examples=num_examples,
        train_loss=train_loss,
    )


def make_updates(
    global_weights: StateDict, count: int = 3, round_number: int = 1, scale: float = 0.1
) -> list[ClientUpdate]:
    """``count`` distinct updates around ``global_weights`` with unequal example counts (10, 20, 30...)."""
    return [
        make_update(
            perturbed(global_weights, seed=i, scale=scale, steps=10 * (i + 1)),
            client_id=f"client-{i}",
            num_examples=10 * (i + 1),
            round_number=round_number,
            train_loss=1.0 + i,
        )
        for i in range(count)
    ]


def clone_state(weights: StateDict) -> StateDict:
    return {k: v.detach().clone() for k, v in weights.items()}


def clone_updates(updates: Iterable[ClientUpdate]) -> list[ClientUpdate]:
    """Deep copies, so a check can compare against what the aggregator was given."""
    return [
        ClientUpdate(
            client_id=u.client_id,
            round_number=u.round_number,
            weights=clone_state(u.weights),
            num_examples=u.num_examples,
            train_loss=u.train_loss,
            metrics=dict(u.metrics),
        )
        for u in updates
    ]


class CountingStream:
    """A one-shot iterator over updates that records how far it was consumed.

    It is *not* a list: no ``len()``, no indexing, and a second ``iter()``
    yields nothing more, exactly like the server's stream of arriving updates.
    """

    def __init__(self, updates: Sequence[ClientUpdate]):
        self._items = list(updates)
        self._it = iter(self._items)
        self.consumed = 0
        self.iter_calls = 0

    def __iter__(self) -> Iterator[ClientUpdate]:
        self.iter_calls += 1
        return self

    def __next__(self) -> ClientUpdate:
        item = next(self._it)
        self.consumed += 1
        return item

    @property
    def exhausted(self) -> bool:
        return self.consumed == len(self._items)


def synthetic_detection_samples(
    count: int = 2,
    num_classes: int = 2,
    size: tuple[int, int] = (80, 96),
    seed: int = 0,
) -> list[tuple[torch.Tensor, dict]]:
    """``count`` images of coloured rectangles on a noisy grey background, with their targets.

    Each image holds one rectangle per class (class ``c`` is drawn in its own
    colour and labelled ``c + 1``), so every class has ground truth in every
    image.  ``size`` is ``(height, width)``.
    """
    if num_classes > len(_CLASS_COLOURS):
        raise ValueError(f"at most {len(_CLASS_COLOURS)} classes are supported, got {num_classes}")
    h, w = size
    g = torch.Generator().manual_seed(seed)
    samples = []
    for index in range(count):
        image = 0.45 + 0.1 * torch.rand(3, h, w, generator=g)
        boxes, labels = [], []
        for c in range(num_classes):
            bw = int(w * (0.3 + 0.15 * torch.rand(1, generator=g).item()))
            bh = int(h * (0.3 + 0.15 * torch.rand(1, generator=g).item()))
            x0 = int(torch.randint(0, w - bw, (1,), generator=g).item())
            y0 = int(torch.randint(0, h - bh, (1,), generator=g).item())
            colour = torch.tensor(_CLASS_COLOURS[c]).view(3, 1, 1)
            image[:, y0 : y0 + bh, x0 : x0 + bw] = colour
            boxes.append([float(x0), float(y0), float(x0 + bw), float(y0 + bh)])
            labels.append(c + 1)
        box_t = torch.tensor(boxes, dtype=torch.float32)
        target = {
            "boxes": box_t,
            "labels": torch.tensor(labels, dtype=torch.int64),
            "image_id": torch.tensor(index, dtype=torch.int64),
            "area": (box_t[:, 2] - box_t[:, 0]) * (box_t[:, 3] - box_t[:, 1]),
            "iscrowd": torch.zeros(len(labels), dtype=torch.int64),
            "difficult": torch.zeros(len(labels), dtype=torch.bool),
        }
        samples.append((image.clamp(0.0, 1.0), target))
    return samples


class SyntheticDetectionDataset(torch.utils.data.Dataset):
    """A map-style dataset over :func:`synthetic_detection_samples`, as a client's split looks."""

    def __init__(
        self, count: int = 2, num_classes: int = 2, size: tuple[int, int] = (80, 96), seed: int = 0
    ):
        self.num_classes = num_classes
        self.samples = synthetic_detection_samples(count, num_classes, size, seed)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        image, target = self.samples[index]
        # Copies: a detector that augments in place must not alter the next epoch's sample.
        return image.clone(), {k: v.clone() for k, v in target.items()}

    def ground_truth_per_class(self) -> list[int]:
        """Non-difficult ground-truth boxes per class index (label - 1)."""
        counts = [0] * self.num_classes
        for _, target in self.samples:
            for label, difficult in zip(target["labels"].tolist(), target["difficult"].tolist()):
                if not difficult:
                    counts[label - 1] += 1
        return counts
