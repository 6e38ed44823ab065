"""``tensorboard``: a built-in observer writing the run as TensorBoard event files.

It writes ``<run_dir>/tensorboard/`` (``tensorboard --logdir outputs`` shows
every run side by side):

* scalars per round (the step is the round number): ``global/map50``,
  ``global/recall``, ``global/coco_map``, ``global/train_loss``,
  ``global/test_loss``, ``round/seconds``, ``round/participants``, every other
  number the round recorded as ``round/<name>``, and each client's own figures
  as ``clients/<client id>/<name>`` (its ``train_loss``, ``train_size``, and on
  evaluation rounds ``map50``, ``test_loss`` ...);
* the global update of each round, new global weights minus the round's start:
  ``update/norm`` (its L2 norm), ``update/relative_norm`` (that over the norm of
  the start weights) and the histogram ``update/tensor_norms`` (one L2 norm per
  floating-point tensor, so a layer that moves far more than the rest stands out);
* the resolved config as text (``config``, secrets hidden) and the run's outcome
  (``run/outcome``).

It needs the ``tensorboard`` package (``pip install 'fedplug[tensorboard]'``).
Without it, the observer says so once per run and the run goes on; turn it off
with ``plugins.disable=[tensorboard]``.  Called by the server process; the
round hook runs in a worker thread, and writing never raises into the run.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from fedplug.hooks import hookimpl
from fedplug.types import RoundRecord

log = logging.getLogger("fedplug.observers.tensorboard")

INSTALL_HINT = ("no TensorBoard logs for this run: the tensorboard package is not installed "
                "(pip install 'fedplug[tensorboard]'; or plugins.disable=[tensorboard] to stop this message)")


def _summary_writer_class():
    """torch's SummaryWriter, or None when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch raises ImportError naming TensorBoard when the package is absent
        return None
    return SummaryWriter


def update_norms(global_weights: Mapping[str, Any], previous_weights: Mapping[str, Any]) -> dict[str, float]:
    """L2 norm of (new - previous) per floating-point tensor present in both (integer buffers left out)."""
    norms = {}
    for name, new in global_weights.items():
        old = previous_weights.get(name)
        if old is None or not new.is_floating_point() or new.shape != old.shape:
            continue
        norms[name] = float((new.detach().float() - old.detach().float()).norm())
    return norms


class TensorBoardObserver:
    def __init__(self) -> None:
        self.writer = None
        self.log_dir: Path | None = None

    @hookimpl
    def fedplug_run_start(self, config: Mapping[str, Any], run_dir: Path) -> None:
        self._close()
        writer_class = _summary_writer_class()
        if writer_class is None:
            log.warning(INSTALL_HINT)
            return
        self.log_dir = Path(run_dir) / "tensorboard"
        try:
            self.writer = writer_class(log_dir=str(self.log_dir))
            self.writer.add_text("config", _config_text(config), 0)
            self.writer.flush()
        except Exception:  # a logger must never end a training run
            log.exception("could not start the TensorBoard log in %s", self.log_dir)
            self._close()

    @hookimpl
    def fedplug_round_end(self, record: RoundRecord, global_weights, previous_weights) -> None:
        if self.writer is None:
            return
        try:
            self._write_round(record, global_weights, previous_weights)
        except Exception:
            log.exception("could not write round %s to TensorBoard", record.round_number)

    @hookimpl
    def fedplug_run_end(self, rounds: Sequence[RoundRecord], best_round: int | None, reason: str) -> None:
        if self.writer is None:
            return
        try:
            last = rounds[-1].round_number if rounds else 0
            best = f"; best round {best_round}" if best_round is not None else ""
            self.writer.add_text("run/outcome", f"{reason}{best}", last)
        except Exception:
            log.exception("could not write the run's outcome to TensorBoard")
        self._close()

    def _write_round(self, record: RoundRecord, global_weights, previous_weights) -> None:
        w, step = self.writer, record.round_number
        for name in ("map50", "recall", "train_loss", "test_loss"):
            _scalar(w, f"global/{name}", getattr(record, name), step)
        _scalar(w, "global/coco_map", record.extra.get("coco_map"), step)
        _scalar(w, "round/seconds", record.seconds, step)
        _scalar(w, "round/participants", len(record.participants), step)
        for name, value in record.extra.items():
            if name != "coco_map":
                _scalar(w, f"round/{name}", value, step)
        for cid, figures in record.per_client.items():
            for name, value in figures.items():
                _scalar(w, f"clients/{cid}/{name}", value, step)
        norms = update_norms(global_weights, previous_weights)
        if norms:
            import torch

            values = torch.tensor(list(norms.values()), dtype=torch.float64)
            total = float(values.square().sum().sqrt())
            base = math.sqrt(sum(float(previous_weights[n].detach().float().square().sum()) for n in norms))
            _scalar(w, "update/norm", total, step)
            _scalar(w, "update/relative_norm", total / base if base > 0 else None, step)
            w.add_histogram("update/tensor_norms", values.numpy(), step)
        w.flush()  # a crashed run keeps every finished round

    def _close(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception:
                log.exception("could not close the TensorBoard log")
        self.writer = None


def _scalar(writer, tag: str, value: Any, step: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return  # not evaluated this round, or not a number: no point rather than a false zero
    writer.add_scalar(tag, float(value), step)


def _config_text(config: Mapping[str, Any]) -> str:
    from omegaconf import OmegaConf

    from fedplug.dashboard.snapshot import redact

    text = OmegaConf.to_yaml(OmegaConf.create(redact(dict(config))))
    return "\n".join("    " + line for line in text.splitlines())  # markdown code block: shown as written


observer = TensorBoardObserver()  # the instance the entry point names
