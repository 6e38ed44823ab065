"""``plots``: a built-in observer drawing the run's learning curves.

After every round it redraws ``<run_dir>/plots/metrics.png`` — global mAP@0.5,
recall, train and test loss per round, with each client's own mAP and loss as
thin lines — so a long run can be watched by reloading one picture, and a
crashed run still leaves its curves behind.  Disable it with
``plugins.disable=[plots]``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from fedplug.hooks import hookimpl
from fedplug.types import RoundRecord

log = logging.getLogger("fedplug.observers.plots")


class PlotsObserver:
    def __init__(self) -> None:
        self.run_dir: Path | None = None
        self.records: list[RoundRecord] = []

    @hookimpl
    def fedplug_run_start(self, config: Mapping[str, Any], run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.records = []

    @hookimpl
    def fedplug_round_end(self, record: RoundRecord, global_weights, previous_weights) -> None:
        self.records.append(record)
        self._draw()

    @hookimpl
    def fedplug_run_end(self, rounds: Sequence[RoundRecord], best_round: int | None, reason: str) -> None:
        if rounds:  # a resumed run's history includes the rounds before the resume
            self.records = list(rounds)
            self._draw(best_round)

    def _draw(self, best_round: int | None = None) -> None:
        if self.run_dir is None or not self.records:
            return
        try:
            self.path = draw_learning_curves(self.records, self.run_dir / "plots" / "metrics.png", best_round)
        except Exception:  # a plotting failure must never end a training run
            log.exception("could not draw the learning curves")


def draw_learning_curves(records: Sequence[RoundRecord], path: Path, best_round: int | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    rounds = [r.round_number for r in records]
    evaluated = [r for r in records if r.map50 is not None]
    ax = axes[0]
    ax.plot([r.round_number for r in evaluated], [r.map50 for r in evaluated], "o-", lw=2, label="global mAP@0.5")
    ax.plot([r.round_number for r in evaluated], [r.recall for r in evaluated], "s--", lw=2, label="global recall")
    clients = sorted({cid for r in records for cid in r.per_client})
    for cid in clients:
        pts = [(r.round_number, r.per_client[cid]["map50"]) for r in evaluated
               if "map50" in r.per_client.get(cid, {})]
        if pts:
            ax.plot(*zip(*pts), lw=0.8, alpha=0.6, label=f"{cid} mAP")
    if best_round is not None:
        ax.axvline(best_round, color="grey", ls=":", label=f"best round {best_round}")
    ax.set(xlabel="round", ylabel="score", ylim=(0, 1), title="detection quality")
    ax.legend(fontsize=7)
    ax = axes[1]
    ax.plot(rounds, [r.train_loss for r in records], "o-", lw=2, label="train loss (weighted)")
    ax.plot([r.round_number for r in evaluated], [r.test_loss for r in evaluated], "s--", lw=2,
            label="test loss (weighted)")
    for cid in clients:
        pts = [(r.round_number, r.per_client[cid]["train_loss"]) for r in records
               if "train_loss" in r.per_client.get(cid, {})]
        if pts:
            ax.plot(*zip(*pts), lw=0.8, alpha=0.6, label=f"{cid} train")
    ax.set(xlabel="round", ylabel="loss", title="loss")
    ax.legend(fontsize=7)
    ax = axes[2]
    ax.bar(rounds, [len(r.participants) for r in records])
    ax.set(xlabel="round", ylabel="clients", title="clients whose update counted")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)  # atomic: a viewer never sees half a picture
    return path


observer = PlotsObserver()  # the instance the entry point names
