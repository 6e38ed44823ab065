"""``model_drift``: an observer that records how far the global model moves each round.

After every aggregated round it appends one row to ``<run_dir>/model_drift.csv``:

==================  =========================================================
column              meaning
==================  =========================================================
round               the round number
participants        clients whose updates were aggregated
l2_change           ``||w_new - w_prev||_2`` over every floating-point tensor
relative_change     ``l2_change / ||w_prev||_2``
max_abs_change      largest absolute change of any single value
train_loss          the round's mean training loss (empty if unknown)
clients_clipped     updates ``fedavg_clipped`` scaled down (empty with other aggregators)
max_client_delta    largest ``||w^k - w_prev||_2`` among the clients (same)
==================  =========================================================

With the ``fedavg_clipped`` aggregator of this package it also writes one row
per client and round to ``<run_dir>/model_drift_clients.csv`` (``round,
client_id, delta_l2, clip_factor``): the figures to choose ``max_norm`` from,
and to spot a client whose updates are consistently larger than the others'.

A sudden jump of ``l2_change`` is the usual first sign of a diverging run or a
misbehaving client.  Writing is cheap (one pass over the weights, in the
server's worker thread) and never stops the run: an unwritable file is logged
and skipped.  Disable with ``plugins.disable=[model_drift]``.

Entry point: ``model_drift = fedplug_example.drift`` (this module is the plugin).
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from fedplug.hooks import hookimpl
from fedplug.types import RoundRecord, StateDict
from fedplug_example import norms

log = logging.getLogger(__name__)

ROUND_COLUMNS = (
    "round", "participants", "l2_change", "relative_change", "max_abs_change",
    "train_loss", "clients_clipped", "max_client_delta",
)
CLIENT_COLUMNS = ("round", "client_id", "delta_l2", "clip_factor")
ROUND_FILE = "model_drift.csv"
CLIENT_FILE = "model_drift_clients.csv"


class _Run:
    """Where the current run writes; set by ``fedplug_run_start``."""

    run_dir: Path | None = None


_run = _Run()


def drift(new: StateDict, previous: StateDict) -> tuple[float, float, float]:
    """``(l2_change, relative_change, max_abs_change)`` over floating-point tensors, in float64."""
    sq_change = sq_prev = 0.0
    max_abs = 0.0
    for name, p in previous.items():
        if not p.is_floating_point():
            continue
        diff = new[name].double() - p.double()
        sq_change += float(diff.pow(2).sum())
        sq_prev += float(p.double().pow(2).sum())
        if diff.numel():
            max_abs = max(max_abs, float(diff.abs().max()))
    l2 = math.sqrt(sq_change)
    return l2, (l2 / math.sqrt(sq_prev) if sq_prev > 0 else 0.0), max_abs


def _append(path: Path, columns: Sequence[str], rows: list[Sequence[Any]]) -> None:
    new_file = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if new_file:
            writer.writerow(columns)
        writer.writerows(rows)


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


@hookimpl
def fedplug_run_start(config: Mapping[str, Any], run_dir: Path) -> None:
    """Called by the server once, before round 1: remember the run directory.

    An existing ``model_drift.csv`` (a resumed run) is appended to.
    """
    _run.run_dir = Path(run_dir)
    norms.clear()


@hookimpl
def fedplug_round_end(record: RoundRecord, global_weights: StateDict, previous_weights: StateDict) -> None:
    """Called by the server after each aggregated round (worker thread): append this round's rows."""
    run_dir = _run.run_dir
    if run_dir is None:  # registered by hand without a run_start: nowhere to write
        return
    l2, relative, max_abs = drift(global_weights, previous_weights)
    clients = norms.take(record.round_number)
    clipped = sum(1 for c in clients if c.clip_factor < 1.0) if clients else None
    largest = max(c.delta_l2 for c in clients) if clients else None
    try:
        _append(run_dir / ROUND_FILE, ROUND_COLUMNS, [[
            record.round_number, len(record.participants), _fmt(l2), _fmt(relative), _fmt(max_abs),
            _fmt(record.train_loss), "" if clipped is None else clipped, _fmt(largest),
        ]])
        if clients:
            _append(run_dir / CLIENT_FILE, CLIENT_COLUMNS, [
                [record.round_number, c.client_id, _fmt(c.delta_l2), _fmt(c.clip_factor)]
                for c in sorted(clients, key=lambda c: c.client_id)
            ])
    except OSError as exc:
        log.warning("model_drift: could not write to %s: %s", run_dir, exc)


@hookimpl
def fedplug_run_end(rounds: Sequence[RoundRecord], best_round: int | None, reason: str) -> None:
    """Called by the server once when the run ends: forget the run directory."""
    _run.run_dir = None
    norms.clear()
