"""What a run leaves in its directory: event log, metrics, checkpoints, resume point.

Layout of ``<run_dir>``::

    config.yaml                 the resolved config
    events.jsonl                one line per protocol event (event, direction, round, client id, time)
    metrics.csv / metrics.jsonl one row per committed round
    checkpoints/manifest.json   the committed round: names the files below, with sizes and SHA-256
    checkpoints/round_000N.safetensors             global model after round N (metadata: round, metrics)
    checkpoints/round_000N.aggregator.safetensors  the aggregator's tensors after round N
    checkpoints/round_000N.resume.json             history, best round, aggregator scalars: for ``run.resume``
    checkpoints/last.safetensors  the latest round's model (a hard link to its round file)
    checkpoints/best.safetensors  the best evaluated round's model (highest global mAP@0.5)

How a round is committed, and resumed, is in :mod:`fedplug.commit`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from fedplug import commit
from fedplug.commit import ResumePoint, RoundStore, find_resume_point, fsync_dir, resume_doc, round_file, write_durable
from fedplug.faults import fault_point
from fedplug.types import RoundRecord, StateDict
from fedplug.wire import SafetensorsLayout, encode_state, write_atomic

METRIC_COLUMNS = (
    "round", "participants", "num_participants", "train_loss", "test_loss", "map50", "recall",
    "coco_map", "seconds", "epsilon", "evaluated_by", "eval_images", "eval_coverage",
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
        if self._file.tell() > 0:  # a resumed run's log: a line a kill cut short must not swallow the next one
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    self._file.write("\n")
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
    """The rows of an event log, skipping a line cut short by a crash (a SIGKILL mid-write)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


class RunOutputs:
    """Writes metrics and checkpoints of one run directory.

    The server makes one at start-up, calls :meth:`adopt` when it resumes a run
    and :meth:`commit_round` once per finished round (in a worker thread).
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.store = RoundStore(self.checkpoint_dir)
        self.metrics_csv = self.run_dir / "metrics.csv"
        self.metrics_jsonl = self.run_dir / "metrics.jsonl"
        # True while the metrics files may lack a round that the history has (a failed write under
        # run.on_write_error=continue): the next commit rewrites them from the history instead of appending
        self._metrics_behind = False

    @property
    def committed_round(self) -> int | None:
        """The last round whose checkpoints and resume point are on disk (None: none yet)."""
        return self.store.committed_round

    def write_config(self, resolved: Mapping[str, Any]) -> None:
        from omegaconf import OmegaConf

        write_atomic(self.run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(dict(resolved))).encode())

    def record_round(self, record: RoundRecord) -> None:
        """Append ``record``'s row to metrics.csv and metrics.jsonl (a header first in a new csv)."""
        n = record.round_number
        new = not self.metrics_csv.exists() or self.metrics_csv.stat().st_size == 0
        _append(self.metrics_csv, (_csv_header() if new else "") + _csv_line(record), "metrics.csv", n)
        _append(self.metrics_jsonl, _jsonl_line(record), "metrics.jsonl", n)

    def rewrite_metrics(self, history: Sequence[RoundRecord]) -> None:
        """Make metrics.csv and metrics.jsonl hold exactly one row per round of ``history``, atomically.

        Called when resuming (a kill between a round's commit and its row, or in
        the middle of the row, left a file a row short or with half a row) and
        after a failed write under ``run.on_write_error=continue``.
        """
        if not history:
            self.metrics_csv.unlink(missing_ok=True)
            self.metrics_jsonl.unlink(missing_ok=True)
            return
        write_durable(self.metrics_csv, (_csv_header() + "".join(_csv_line(r) for r in history)).encode())
        write_durable(self.metrics_jsonl, "".join(_jsonl_line(r) for r in history).encode())
        fsync_dir(self.run_dir)

    def commit_round(self, record: RoundRecord, global_weights: StateDict, meta: Mapping[str, Any],
                     is_best: bool, aggregator_state: Mapping[str, Any], history: Sequence[RoundRecord],
                     best: Mapping[str, Any]) -> None:
        """Everything a finished round leaves on disk, committed as one unit (see :mod:`fedplug.commit`).

        Called by the server once per round (``_write_round``), in a worker
        thread, after aggregation and evaluation; ``history`` ends with
        ``record``.  Order: the round's model, aggregator state and resume
        document under round-numbered names; the manifest switch (the commit);
        the metrics row; ``last``/``best.safetensors``; deleting what no
        manifest names.  An OSError (ENOSPC: disk full) is raised as is; when
        it comes before the switch the previous round stays the committed one
        (:attr:`committed_round` says which), and the metrics files never have
        a row for a round whose checkpoint is not on disk.
        """
        n = record.round_number
        behind, self._metrics_behind = self._metrics_behind, True
        fault_point("commit", "begin", n)
        model = self.save_checkpoint(Path(round_file(n, "model")).stem, global_weights, meta)
        tensors = {k: v for k, v in aggregator_state.items() if isinstance(v, torch.Tensor)}
        scalars = {k: v for k, v in aggregator_state.items() if not isinstance(v, torch.Tensor)}
        aggregator = write_durable(self.checkpoint_dir / round_file(n, "aggregator"), encode_state(tensors),
                                   "aggregator", n)
        doc = resume_doc(n, scalars, [asdict(r) for r in history], dict(best))
        resume = write_durable(self.checkpoint_dir / round_file(n, "resume"),
                               json.dumps(doc, default=_clean).encode(), "resume", n)
        self.store.commit(n, model, aggregator, resume, is_best)
        if behind:
            self.rewrite_metrics(history)
        else:
            self.record_round(record)
        self._metrics_behind = False
        self.store.publish(n)
        self.store.prune(n)
        fault_point("commit", "done", n)

    def save_checkpoint(self, name: str, weights: StateDict, meta: Mapping[str, Any]) -> dict:
        """Write ``checkpoints/<name>.safetensors`` durably (metadata: ``meta`` as JSON); return its manifest entry."""
        path = self.checkpoint_dir / f"{name}.safetensors"
        data = SafetensorsLayout(weights, {k: json.dumps(_clean(v)) for k, v in meta.items()})  # no copy
        rnd = meta.get("round")
        return write_durable(path, data, "model", rnd if isinstance(rnd, int) else None)

    def adopt(self, point: ResumePoint | None) -> None:
        """Make this directory continue ``point`` (from :func:`find_resume_point`); the server's ``_resume`` calls it.

        Resuming in place: ``last``/``best.safetensors`` are pointed at the
        manifest's files, an interrupted commit's leftovers deleted, and the
        metrics files rewritten to exactly the committed history.  Resuming from
        another directory (or a run written before manifests): the point's files
        are first copied in and committed here as its round.  ``None`` (the run
        saved no round): leftovers and metrics files are removed, for a fresh start.
        """
        if point is not None:
            in_place = point.run_dir.resolve() == self.run_dir.resolve()
            if point.manifest is not None and in_place:
                self.store.manifest = point.manifest
            else:
                tensors = {k for k, v in point.aggregator_state.items() if isinstance(v, torch.Tensor)}
                scalars = {k: v for k, v in point.aggregator_state.items() if k not in tensors}
                doc = resume_doc(point.round, scalars, [asdict(r) for r in point.history], point.best)
                self.store.install(point, json.dumps(doc, default=_clean).encode())
            self.store.publish()
        self.store.prune()
        self.rewrite_metrics(point.history if point is not None else [])
        self._metrics_behind = False


def _row(record: RoundRecord) -> dict:
    return {
        "round": record.round_number,
        "participants": " ".join(record.participants),
        "num_participants": len(record.participants),
        "train_loss": record.train_loss,
        "test_loss": record.test_loss,
        "map50": record.map50,
        "recall": record.recall,
        "coco_map": record.extra.get("coco_map"),
        "seconds": round(record.seconds, 3),
        # differential privacy spent so far (fedplug/privacy/ledger.py); empty without a DP aggregator
        "epsilon": record.extra.get("epsilon"),
        # what the test figures cover: who scored them, on how many images, and which share
        # of the expected test images that was (below 1 when an evaluator dropped out)
        "evaluated_by": record.evaluated_by,
        "eval_images": record.extra.get("eval_images"),
        "eval_coverage": record.extra.get("eval_coverage"),
    }


def _csv_text(rows: list[dict], header: bool) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_COLUMNS)
    if header:
        writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buffer.getvalue()


def _csv_header() -> str:
    return _csv_text([], header=True)


def _csv_line(record: RoundRecord) -> str:
    return _csv_text([_row(record)], header=False)


def _jsonl_line(record: RoundRecord) -> str:
    full = asdict(record)
    full["participants"] = list(record.participants)
    return json.dumps(full, default=_clean) + "\n"


def _append(path: Path, text: str, step: str, round_number: int) -> None:
    """Append ``text`` and fsync; a kill half-way leaves half a row, which resuming rewrites away."""
    data = text.encode("utf-8")
    with open(path, "ab", buffering=0) as f:  # unbuffered: a failed write can be truncated away, not re-flushed
        start = f.tell()
        try:
            commit.write_bytes(f, data[: len(data) // 2])
            fault_point("commit", f"{step}_partial", round_number)
            commit.write_bytes(f, data[len(data) // 2:])
            os.fsync(f.fileno())
        except OSError:  # disk full mid-row: leave no half row behind (best effort; resuming rewrites anyway)
            try:
                f.truncate(start)
            except OSError:
                pass
            raise
    fault_point("commit", f"{step}_done", round_number)


def load_resume_point(run_dir: Path) -> tuple[int, StateDict, dict, list[RoundRecord], dict]:
    """(round, global weights, aggregator state, history, best) of ``run_dir``'s last committed round.

    A shorthand for :func:`fedplug.commit.find_resume_point` that raises
    FileNotFoundError where that returns None (a run that saved no round).
    """
    point = find_resume_point(run_dir)
    if point is None:
        raise FileNotFoundError(f"run.resume={run_dir}: the run there stopped before it saved its first round")
    return point.round, point.weights, point.aggregator_state, point.history, point.best


def missing_commit_events(events_path: Path, history: Sequence[RoundRecord]) -> list[int]:
    """Rounds of ``history`` with no ``round_committed`` line in the event log at ``events_path``.

    A server killed after a round's commit but before it logged
    ``round_committed`` leaves such a round; the server's ``_resume`` logs it then,
    so the log names every committed round exactly once.
    """
    try:
        logged = {e.get("round") for e in read_events(events_path) if e.get("event") == "round_committed"}
    except FileNotFoundError:
        logged = set()
    return [r.round_number for r in history if r.round_number not in logged]


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


RUN_MARKERS = ("metrics.csv", "checkpoints/manifest.json", "checkpoints/resume.json", "checkpoints/last.safetensors")


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
