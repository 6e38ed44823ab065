"""A round's checkpoint files as one unit: durable writes, the manifest that commits them, and resuming from it.

:class:`fedplug.outputs.RunOutputs` calls this module once per round (the
server's ``_write_round`` -> ``RunOutputs.commit_round``, in a worker thread),
and the server calls :func:`find_resume_point` once at start-up for
``run.resume``.

Why a manifest: a round leaves several files (the global model, the
aggregator's state, the history needed to resume, the best model).  Each can
be replaced atomically, but not all of them together, so a server killed
between two replacements used to leave files from two different rounds and a
run that could not be resumed.  Now a round N is written in two steps:

1. its files under round-numbered names that no earlier round uses
   (``round_000N.safetensors``, ``round_000N.aggregator.safetensors``,
   ``round_000N.resume.json``), each fsynced, then the directory fsynced;
2. ``manifest.json`` — naming those files with their sizes and SHA-256 — written
   to a temp file, fsynced, and ``os.replace``-d over the previous manifest,
   then the directory fsynced.  That rename is the commit.

Until the rename the old manifest names round N-1's files, which nothing has
touched; after it the new one names round N's, all durable.  So a kill at any
instant leaves round N or round N-1 resumable.  Only then are the user-facing
``last.safetensors`` / ``best.safetensors`` pointed at the new files (hard
links, a copy where the file system has none) and the files no manifest names
any more deleted.  Resuming reads only the manifest and the files it names,
verified, and ignores everything else in the directory.

Every step calls :func:`fedplug.faults.fault_point` (``commit:<step>``; the
steps are :data:`COMMIT_STEPS`), so the tests can SIGKILL the server at each.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedplug.faults import fault_point
from fedplug.types import RoundRecord, StateDict

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "fedplug.round-manifest/1"
LEGACY_RESUME = "resume.json"  # fedplug before the manifest: resume.json + last.safetensors + aggregator_state_N

# The instants of a round's commit, in order; FEDPLUG_FAULT_POINT=commit:<step>[@round] kills the server there.
# <file>.partial: half its bytes are in the temp file; .written: all, fsynced; .renamed: under its final name.
COMMIT_STEPS = (
    "begin",
    "model.partial", "model.written", "model.renamed",
    "aggregator.partial", "aggregator.written", "aggregator.renamed",
    "resume.partial", "resume.written", "resume.renamed",
    "round_files.synced",
    "manifest.partial", "manifest.written", "manifest.renamed", "manifest.synced",  # .renamed: committed
    "metrics.csv_partial", "metrics.csv_done", "metrics.jsonl_partial", "metrics.jsonl_done",
    "last.linked", "best.linked",
    "pruned_one", "done",
)
# steps after which the round is committed (a resume continues after it, not before)
COMMITTED_FROM = COMMIT_STEPS.index("manifest.renamed")

_ROUND_FILE = re.compile(r"^round_\d+(\.aggregator\.safetensors|\.resume\.json|\.safetensors)$")
_LEGACY_FILE = re.compile(r"^(resume\.json|aggregator_state_\d+\.safetensors)$")
# what any fedplug server leaves in its run directory from its first second on (the lock, Hydra's
# .hydra/, the event log): a directory with one of these and no manifest is a run that saved no round
RUN_TRACES = (".fedplug.lock", ".hydra", "events.jsonl", "config.yaml", "checkpoints")


class ResumeError(ValueError):
    """A resume point that cannot be used; the message names the file and says what to do."""


def round_file(round_number: int, kind: str) -> str:
    """The name of round ``round_number``'s file of ``kind`` (model | aggregator | resume)."""
    suffix = {"model": ".safetensors", "aggregator": ".aggregator.safetensors", "resume": ".resume.json"}[kind]
    return f"round_{round_number:04d}{suffix}"


def fsync_dir(directory: Path) -> None:
    """Make the names created, replaced or deleted in ``directory`` durable (a file's fsync does not)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(f: Any, data: bytes | memoryview | list) -> None:
    """The one place a commit's bytes reach a file (tests patch it to make the disk full at the Nth write).

    ``data`` is bytes or a list of byte views written in turn.  Loops because an
    unbuffered file may take only part of the bytes (the disk filling up
    mid-write); the next write then raises ENOSPC.
    """
    for part in (data if isinstance(data, list) else [data]):
        view = memoryview(part)
        while view:
            view = view[f.write(view):]


def _halves(data: Any) -> tuple[list, list, int, str]:
    """``data`` (bytes, or a :class:`fedplug.wire.SafetensorsLayout`) as two lists of views, its size and SHA-256.

    A layout is written from the tensors themselves: a checkpoint costs no
    model-sized buffer (server memory during a round stays flat).
    """
    views = [memoryview(data)] if isinstance(data, (bytes, bytearray, memoryview)) else list(data.views())
    size = sum(len(v) for v in views)
    digest = hashlib.sha256()
    for view in views:
        digest.update(view)
    first, second, taken = [], [], 0
    for view in views:
        cut = max(0, min(len(view), size // 2 - taken))
        if cut:
            first.append(view[:cut])
        if cut < len(view):
            second.append(view[cut:])
        taken += len(view)
    return first, second, size, digest.hexdigest()


def write_durable(path: Path, data: Any, step: str | None = None, round_number: int | None = None) -> dict:
    """Write ``data`` to ``path`` via a fsynced temp file and ``os.replace``; return its manifest entry.

    Readers see the old file or the new one, never a part.  The directory is
    not fsynced here (the caller does it once for several files).  ``step``
    names the fault points ``commit:<step>.partial|.written|.renamed``.  On any
    error the temp file is removed and the error raised (ENOSPC included), so a
    failed write leaves the previous file as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    # os.open, not mkstemp: mkstemp makes the file 0600, checkpoints are as readable as the umask allows
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        first, second, size, digest = _halves(data)
        with os.fdopen(fd, "wb") as f:
            write_bytes(f, first)
            if step:
                f.flush()
                fault_point("commit", f"{step}.partial", round_number)
            write_bytes(f, second)
            f.flush()
            os.fsync(f.fileno())
        if step:
            fault_point("commit", f"{step}.written", round_number)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if step:
        fault_point("commit", f"{step}.renamed", round_number)
    return {"file": path.name, "bytes": size, "sha256": digest}


def read_manifest(checkpoint_dir: Path) -> dict | None:
    """The committed manifest of ``checkpoint_dir`` (not verified), or None when no round was committed."""
    path = Path(checkpoint_dir) / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        # cannot come from a crash (the manifest is only ever renamed into place whole): someone edited it
        raise ResumeError(f"{path} is not a fedplug round manifest (damaged or edited by hand); restore it "
                          "from a backup or start a new run")
    return doc


def read_verified(checkpoint_dir: Path, entry: dict) -> bytes:
    """The bytes of a file a manifest names, after checking its size and SHA-256 against the entry."""
    path = Path(checkpoint_dir) / entry["file"]
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ResumeError(f"{path} is missing, but {checkpoint_dir / MANIFEST} names it; the run cannot be "
                          "resumed from this directory (was the file deleted or moved?)") from None
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ResumeError(f"{path} does not match {checkpoint_dir / MANIFEST} ({len(data)} bytes, expected "
                          f"{entry['bytes']}, or different content): the file was changed after it was saved; "
                          "the run cannot be resumed from it")
    return data


@dataclass
class ResumePoint:
    """What ``run.resume`` continues from: the last committed round of a run directory."""

    run_dir: Path
    round: int
    weights: StateDict
    aggregator_state: dict
    history: list[RoundRecord]
    best: dict
    # the source files, for copying this point into another run directory: model / aggregator / best
    files: dict[str, Path] = field(default_factory=dict)
    manifest: dict | None = None  # None: a run written before manifests existed (resume.json)


def find_resume_point(run_dir: Path) -> ResumePoint | None:
    """The newest committed round of ``run_dir``; None if the run there saved no round yet.

    Reads ``checkpoints/manifest.json`` and the files it names (sizes and
    hashes verified); files no manifest names are leftovers of an interrupted
    commit and are ignored.  Raises FileNotFoundError when ``run_dir`` is not a
    fedplug run directory at all, :class:`ResumeError` when a named file is
    missing or changed.
    """
    try:
        return _find_resume_point(Path(run_dir))
    except (ResumeError, FileNotFoundError):
        raise
    except OSError as exc:  # e.g. the previous run's files belong to another user
        raise ResumeError(f"run.resume={run_dir}: cannot read {exc.filename or run_dir} ({exc.strerror or exc}); "
                          "check that this user may read the previous run's directory") from None


def _find_resume_point(run_dir: Path) -> ResumePoint | None:
    from safetensors.torch import load as st_load

    ckpt = run_dir / "checkpoints"
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run.resume={run_dir}: no such directory — point run.resume at the directory "
                                "of a previous run")
    manifest = read_manifest(ckpt)
    if manifest is None:
        if (ckpt / LEGACY_RESUME).is_file():
            return _legacy_resume_point(run_dir)
        if any((run_dir / name).exists() for name in RUN_TRACES):
            return None
        raise FileNotFoundError(f"run.resume={run_dir}: no {ckpt / MANIFEST} and no other trace of a fedplug run "
                                "there — point run.resume at the directory of a previous run")
    model = st_load(read_verified(ckpt, manifest["model"]))
    tensors = st_load(read_verified(ckpt, manifest["aggregator_state"]))
    doc = json.loads(read_verified(ckpt, manifest["resume"]))
    files = {"model": ckpt / manifest["model"]["file"], "aggregator": ckpt / manifest["aggregator_state"]["file"]}
    if manifest.get("best"):
        read_verified(ckpt, manifest["best"])
        files["best"] = ckpt / manifest["best"]["file"]
    state = dict(tensors)
    state.update(doc.get("aggregator_scalars", {}))
    return ResumePoint(run_dir, int(manifest["round"]), model, state, _history(doc["history"]),
                       dict(doc.get("best") or {}), files, manifest)


def _history(rows: list[dict]) -> list[RoundRecord]:
    history = []
    for r in rows:
        r = dict(r)
        r["participants"] = tuple(r["participants"])
        history.append(RoundRecord(**r))
    return history


def _legacy_resume_point(run_dir: Path) -> ResumePoint:
    """A run written before manifests: resume.json, last.safetensors and aggregator_state_N must agree."""
    from fedplug.wire import read_checkpoint

    ckpt = run_dir / "checkpoints"
    doc = json.loads((ckpt / LEGACY_RESUME).read_text())
    weights, meta = read_checkpoint(ckpt / "last.safetensors")
    if int(json.loads(meta.get("round", "0"))) != int(doc["round"]):
        raise ResumeError(f"{ckpt}: last.safetensors and resume.json disagree on the round (a run written by an "
                          "older fedplug and interrupted while saving); it cannot be resumed")
    tensors, _ = read_checkpoint(ckpt / doc["aggregator_state_file"])
    state = dict(tensors)
    state.update(doc.get("aggregator_scalars", {}))
    files = {"model": ckpt / "last.safetensors", "aggregator": ckpt / doc["aggregator_state_file"]}
    best = dict(doc.get("best") or {})
    if best.get("round") is not None and (ckpt / "best.safetensors").is_file():
        files["best"] = ckpt / "best.safetensors"
    return ResumePoint(run_dir, int(doc["round"]), weights, state, _history(doc["history"]), best, files, None)


class RoundStore:
    """The checkpoint directory of one run: round files, the manifest, last/best, pruning.

    Owned by :class:`fedplug.outputs.RunOutputs`, which encodes what a round
    leaves and calls :meth:`commit`, then :meth:`publish` and :meth:`prune`.
    """

    def __init__(self, checkpoint_dir: Path):
        self.dir = Path(checkpoint_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            self.manifest = read_manifest(self.dir)  # what the previous commit (or an adopted run) left
        except ResumeError:
            self.manifest = None  # a new run never reads it; resuming reports it (find_resume_point)

    @property
    def committed_round(self) -> int | None:
        return None if self.manifest is None else int(self.manifest["round"])

    def commit(self, round_number: int, model: dict, aggregator: dict, resume: dict, is_best: bool) -> dict:
        """Switch the manifest to round ``round_number``'s files (already written and fsynced by the caller).

        ``model``/``aggregator``/``resume`` are the entries :func:`write_durable`
        returned.  The best model is this round's when ``is_best``, else the one
        the previous manifest named.
        """
        fsync_dir(self.dir)
        fault_point("commit", "round_files.synced", round_number)
        if is_best:
            best = dict(model, round=round_number)
        else:  # a round that was not written cannot be the best one, so the previous best file is on disk
            best = None if self.manifest is None else self.manifest.get("best")
        manifest = {"format": MANIFEST_FORMAT, "round": round_number, "model": model, "best": best,
                    "aggregator_state": aggregator, "resume": resume}
        write_durable(self.dir / MANIFEST, json.dumps(manifest, indent=1).encode(), "manifest", round_number)
        fsync_dir(self.dir)
        fault_point("commit", "manifest.synced", round_number)
        self.manifest = manifest
        return manifest

    def publish(self, round_number: int | None = None) -> None:
        """Point ``last.safetensors`` (and ``best.safetensors``) at the committed manifest's model files.

        Only the manifest counts for resuming; these are for people and
        scripts that load "the latest model", so a kill before they are updated
        costs nothing (the next commit or resume updates them).
        """
        if self.manifest is None:
            return
        for name, entry in (("last", self.manifest["model"]), ("best", self.manifest.get("best"))):
            if entry:
                self._point(self.dir / f"{name}.safetensors", self.dir / entry["file"])
                fault_point("commit", f"{name}.linked", round_number)

    def _point(self, link: Path, target: Path) -> None:
        try:
            if os.path.samefile(link, target):
                return
        except FileNotFoundError:
            pass
        tmp = link.with_name(f".{link.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.link(target, tmp)  # a second name for the same bytes: no copy, no extra space
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EMLINK, errno.EOPNOTSUPP):
                raise
            try:  # a file system without hard links: a copy, fsynced
                shutil.copyfile(target, tmp)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        try:
            os.replace(tmp, link)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def prune(self, round_number: int | None = None) -> None:
        """Delete round files the committed manifest does not name (older rounds, an interrupted commit's).

        Called only after the manifest naming the current files is durable, so
        nothing a resume could need is ever deleted.
        """
        keep = set()
        if self.manifest is not None:
            keep = {self.manifest[k]["file"] for k in ("model", "aggregator_state", "resume")}
            if self.manifest.get("best"):
                keep.add(self.manifest["best"]["file"])
        first = True
        for path in self.dir.iterdir():
            if path.name in keep:
                continue
            if _ROUND_FILE.match(path.name) or (self.manifest is not None and _LEGACY_FILE.match(path.name)):
                path.unlink(missing_ok=True)
                if first:
                    first = False
                    fault_point("commit", "pruned_one", round_number)

    def install(self, point: ResumePoint, resume_doc: bytes) -> None:
        """Make ``point`` (another directory's, or an old-format one) this directory's committed round.

        Its files are copied under this directory's round names and a manifest
        written, so later commits, pruning and resuming work as for a round
        committed here.
        """
        n = point.round
        model = _copy_durable(point.files["model"], self.dir / round_file(n, "model"))
        aggregator = _copy_durable(point.files["aggregator"], self.dir / round_file(n, "aggregator"))
        resume = write_durable(self.dir / round_file(n, "resume"), resume_doc)
        best_round = point.best.get("round")
        best = None
        if "best" in point.files and best_round is not None:
            best = model if best_round == n else _copy_durable(point.files["best"],
                                                               self.dir / round_file(int(best_round), "model"))
        fsync_dir(self.dir)
        manifest = {"format": MANIFEST_FORMAT, "round": n, "model": model,
                    "best": None if best is None else dict(best, round=int(best_round)),
                    "aggregator_state": aggregator, "resume": resume}
        write_durable(self.dir / MANIFEST, json.dumps(manifest, indent=1).encode())
        fsync_dir(self.dir)
        self.manifest = manifest


def _copy_durable(source: Path, target: Path) -> dict:
    return write_durable(target, Path(source).read_bytes())


def resume_doc(round_number: int, aggregator_scalars: dict, history: list[dict], best: dict) -> dict[str, Any]:
    """The JSON a round's ``round_N.resume.json`` holds: what resuming needs besides the tensors."""
    return {"round": round_number, "aggregator_scalars": aggregator_scalars, "history": history, "best": best}


def write_error_message(exc: OSError, round_number: int, committed: int | None, run_dir: Path) -> str:
    """One line for an operator: what failed writing round ``round_number``, what is safe on disk, what to do.

    ``committed`` is the last committed round after the failure (it equals
    ``round_number`` when only the metrics row or last/best failed).
    """
    if exc.errno == errno.ENOSPC:
        what = f"the disk is full ({exc.strerror})"
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        what = f"the run directory is not writable ({exc.strerror})"
    else:
        what = str(exc)
    where = f" at {exc.filename}" if getattr(exc, "filename", None) else ""
    if committed == round_number:
        kept = f"round {round_number} itself is saved; only its metrics row or last/best link failed"
    elif committed is None:
        kept = "no round is saved yet"
    else:
        kept = f"round {committed} stays saved and resumable"
    return (f"could not write round {round_number}'s outputs in {run_dir}: {what}{where}; {kept} — free space "
            f"or fix the directory, then continue with run.resume={run_dir}")
