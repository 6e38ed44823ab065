"""What a run leaves in its directory: event log, metrics, checkpoints, resume point.

Layout of ``<run_dir>``::

    config.yaml                 the resolved config
    events.jsonl                one line per protocol event (event, direction, round, client id, time)
    metrics.csv / metrics.jsonl one row per finished round
    checkpoints/last.safetensors  global model after the latest round (metadata: round, metrics)
    checkpoints/best.safetensors  global model of the best evaluated round (highest global mAP@0.5)
    checkpoints/resume.json       + aggregator_state.safetensors: what ``run.resume`` needs
"""

from __future__ import annotations

import csv
import json
import logging
import os
import math
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from fedplug.types import RoundRecord, StateDict
from fedplug.wire import encode_state, read_checkpoint, write_atomic

METRIC_COLUMNS = (
    "round", "participants", "num_participants", "train_loss", "test_loss", "map50", "recall",
    "coco_map", "seconds", "evaluated_by", "eval_images", "eval_coverage",
)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class EventLog:
    """Append-only JSON-lines log of protocol events; safe to call from any thread."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._file = open(self.path, "a", encoding="utf-8", buffering=1)
        self.failed = False  # a write failed (e.g. disk full): later events may be missing
        self._t0 = time.time()
        # live subscribers (the dashboard, the terminal progress view): called with every row as it
        # is written, and with rows published but not logged (transfer progress); never fatal
        self.listeners: list = []

    def write(self, event: str, direction: str, round_number: int | None = None,
              client_id: str | None = None, **extra: Any) -> None:
        row = {"time": round(time.time(), 4), "event": event, "direction": direction,
               "round": round_number, "client_id": client_id}
        row.update({k: _clean(v) for k, v in extra.items()})
        line = json.dumps(row, default=str)
        self._tell(row)
        with self._lock:
            if self._file.closed:
                return
            try:
                self._file.write(line + "\n")
            except OSError as exc:  # disk full: the log is a record, never a reason to stop telling clients
                if not self.failed:
                    self.failed = True
                    logging.getLogger("fedplug.outputs").error("cannot write the event log %s: %s", self.path, exc)

    def publish(self, event: str, **fields: Any) -> None:
        """Tell the live subscribers something not worth a line in the log (e.g. bytes transferred so far)."""
        self._tell({"time": round(time.time(), 4), "event": event, "live": True, **fields})

    def _tell(self, row: dict) -> None:
        for listener in list(self.listeners):
            try:
                listener(row)
            except Exception:  # a broken view must not stop the run or the log
                logging.getLogger("fedplug.outputs").exception("event listener %r failed", listener)

    def close(self) -> None:
        with self._lock:
            try:
                self._file.close()
            except OSError:  # flushing the last line failed: nothing more can be done here
                pass


def read_events(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class RunOutputs:
    """Writes metrics and checkpoints of one run directory."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_csv = self.run_dir / "metrics.csv"
        self.metrics_jsonl = self.run_dir / "metrics.jsonl"

    def write_config(self, resolved: Mapping[str, Any]) -> None:
        from omegaconf import OmegaConf

        write_atomic(self.run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(dict(resolved))).encode())

    def record_round(self, record: RoundRecord) -> None:
        row = {
            "round": record.round_number,
            "participants": " ".join(record.participants),
            "num_participants": len(record.participants),
            "train_loss": record.train_loss,
            "test_loss": record.test_loss,
            "map50": record.map50,
            "recall": record.recall,
            "coco_map": record.extra.get("coco_map"),
            "seconds": round(record.seconds, 3),
            # what the test figures cover: who scored them, on how many images, and which share
            # of the expected test images that was (below 1 when an evaluator dropped out)
            "evaluated_by": record.evaluated_by,
            "eval_images": record.extra.get("eval_images"),
            "eval_coverage": record.extra.get("eval_coverage"),
        }
        new = not self.metrics_csv.exists()
        with open(self.metrics_csv, "a", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
        full = asdict(record)
        full["participants"] = list(record.participants)
        with open(self.metrics_jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps(full, default=_clean) + "\n")

    def commit_round(self, record: RoundRecord, global_weights: StateDict, meta: Mapping[str, Any],
                     is_best: bool, aggregator_state: Mapping[str, Any], history: Sequence[RoundRecord],
                     best: Mapping[str, Any]) -> None:
        """Everything a finished round leaves on disk: checkpoints, resume point, then its metrics row.

        Called by the server once per round, in a worker thread, after aggregation
        and evaluation.  The metrics row comes last, so a failed write never leaves
        a row for a round whose checkpoint is not on disk.
        """
        self.save_checkpoint("last", global_weights, meta)
        if is_best:
            self.save_checkpoint("best", global_weights, meta)
        self.save_resume_point(record.round_number, aggregator_state, history, best)
        self.record_round(record)

    def save_checkpoint(self, name: str, weights: StateDict, meta: Mapping[str, Any]) -> Path:
        path = self.checkpoint_dir / f"{name}.safetensors"
        data = encode_state(weights, {k: json.dumps(_clean(v)) for k, v in meta.items()})
        write_atomic(path, data)
        return path

    def save_resume_point(self, round_number: int, aggregator_state: Mapping[str, Any],
                          history: Sequence[RoundRecord], best: Mapping[str, Any]) -> None:
        """The aggregator's state and the run's history after ``round_number``.

        Tensors go to safetensors, everything else to JSON; the JSON is written
        last, so a crash in between leaves the previous resume point valid.
        """
        tensors = {k: v for k, v in aggregator_state.items() if isinstance(v, torch.Tensor)}
        scalars = {k: v for k, v in aggregator_state.items() if not isinstance(v, torch.Tensor)}
        state_file = f"aggregator_state_{round_number}.safetensors"
        write_atomic(self.checkpoint_dir / state_file, encode_state(tensors))
        doc = {
            "round": round_number,
            "aggregator_state_file": state_file,
            "aggregator_scalars": scalars,
            "history": [asdict(r) for r in history],
            "best": dict(best),
        }
        write_atomic(self.checkpoint_dir / "resume.json", json.dumps(doc, default=_clean).encode())
        for old in self.checkpoint_dir.glob("aggregator_state_*.safetensors"):
            if old.name != state_file:
                old.unlink(missing_ok=True)


def load_resume_point(run_dir: Path) -> tuple[int, StateDict, dict, list[RoundRecord], dict]:
    """Read what :meth:`RunOutputs.save_resume_point` and the last checkpoint wrote.

    Returns (round, global weights, aggregator state, history, best).
    """
    ckpt = Path(run_dir) / "checkpoints"
    resume = ckpt / "resume.json"
    if not resume.is_file():
        raise FileNotFoundError(
            f"run.resume={run_dir}: no {resume} — point run.resume at the directory of a previous run"
        )
    doc = json.loads(resume.read_text())
    weights, meta = read_checkpoint(ckpt / "last.safetensors")
    if int(json.loads(meta.get("round", "0"))) != int(doc["round"]):
        raise ValueError(f"{ckpt}: last.safetensors and resume.json disagree on the round; cannot resume")
    tensors, _ = read_checkpoint(ckpt / doc["aggregator_state_file"])
    state = dict(tensors)
    state.update(doc.get("aggregator_scalars", {}))
    history = []
    for r in doc["history"]:
        r["participants"] = tuple(r["participants"])
        history.append(RoundRecord(**r))
    return int(doc["round"]), weights, state, history, doc.get("best", {})


def format_table(history: Sequence[RoundRecord], best_round: int | None) -> str:
    """The per-round table printed at the end of a run."""

    def f(v: float | None, digits: int = 4) -> str:
        return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"

    lines = [f"{'round':>5}  {'train_loss':>10}  {'test_loss':>9}  {'mAP@0.5':>7}  {'recall':>6}  "
             f"{'clients':>7}  {'time_s':>6}"]
    for r in history:
        mark = "  <- best" if r.round_number == best_round else ""
        lines.append(
            f"{r.round_number:>5}  {f(r.train_loss):>10}  {f(r.test_loss):>9}  {f(r.map50):>7}  "
            f"{f(r.recall):>6}  {len(r.participants):>7}  {r.seconds:>6.1f}{mark}"
        )
    return "\n".join(lines)


class RunDirBusy(RuntimeError):
    """The run directory belongs to another run; the message says which directory to use instead."""


RUN_MARKERS = ("metrics.csv", "resume.json", "checkpoints/last.safetensors")


class RunDirLock:
    """One run per directory: an exclusive lock held for the server's lifetime, and no reuse of a used one.

    Two servers writing one directory interleave their metrics rows and
    overwrite each other's checkpoints; a server restarted into a used directory
    does the same to the run before it.  So the server takes ``.fedplug.lock``
    (``flock``: released by the kernel when the process dies, even by SIGKILL) and
    refuses a directory that already holds a run's outputs unless it resumes
    that very run, in which case the temp files a crashed write left are removed.
    """

    def __init__(self, run_dir: Path, resume_from: Path | None):
        import fcntl

        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.run_dir / ".fedplug.lock", "a+", encoding="utf-8")
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise RunDirBusy(f"run directory {self.run_dir} is in use by another fedplug server ({holder}); "
                             "give this run its own directory (hydra.run.dir=...)") from None
        resuming_here = resume_from is not None and Path(resume_from).resolve() == self.run_dir.resolve()
        used = [m for m in RUN_MARKERS if (self.run_dir / m).exists()]
        if used and not resuming_here:
            self.release()
            raise RunDirBusy(f"run directory {self.run_dir} already holds a run ({', '.join(used)}): to continue "
                             f"it, use run.resume={self.run_dir}; for a new run, choose another hydra.run.dir")
        if resuming_here:
            for stale in self.run_dir.rglob(".*.tmp"):  # half-written files of the crashed run
                stale.unlink(missing_ok=True)
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()}\n")
        self._file.flush()

    def release(self) -> None:
        if not self._file.closed:
            self._file.close()  # closing the descriptor drops the flock
