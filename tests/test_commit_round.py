"""A round is committed as one unit: a kill at any step of commit_round leaves round N or N-1 resumable.

The kill-point tests run ``RunOutputs.commit_round`` in a forked child that
SIGKILLs itself at one step (``FEDPLUG_FAULT_POINT=commit:<step>@<round>``, every
step of :data:`fedplug.commit.COMMIT_STEPS`), or is SIGKILLed from outside at a
random instant; the parent then resumes the directory as the server does
(``RunDirLock`` + ``find_resume_point`` + ``RunOutputs.adopt``), finishes the run
and checks what a user relies on: the exact rounds, loadable checkpoints with the
right weights, and metrics rows with no lost or duplicated round.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import random
import signal
import time

import pytest
import torch

from fedplug import commit
from fedplug.commit import COMMIT_STEPS, COMMITTED_FROM, ResumeError, find_resume_point
from fedplug.outputs import EventLog, RunDirLock, RunOutputs, missing_commit_events, read_events
from fedplug.types import RoundRecord
from fedplug.wire import read_checkpoint

pytestmark = pytest.mark.faults

ROUNDS = 3
BEST_ROUNDS = {1, 3}  # rounds whose mAP beats every earlier one (round 2 is worse than round 1)


def _weights(n: int, numel: int = 2000) -> dict[str, torch.Tensor]:
    """The global model after round ``n``: distinct per round, so a mixed-up file is caught."""
    g = torch.Generator().manual_seed(n)
    return {"conv.weight": torch.randn(numel, generator=g), "bn.num_batches_tracked": torch.tensor(n)}


def _state(n: int) -> dict:
    return {"momentum/conv.weight": torch.full((5,), float(n)), "step": n}


def _record(n: int) -> RoundRecord:
    return RoundRecord(round_number=n, participants=("a", "b"), train_loss=1.0 / n, test_loss=0.5,
                       map50={1: 0.5, 2: 0.3, 3: 0.7}.get(n, 0.1), recall=0.9, seconds=1.0,
                       extra={"coco_map": 0.2}, evaluated_by="clients")


def _commit(out: RunOutputs, n: int, history: list[RoundRecord], best: dict, numel: int = 2000) -> dict:
    """What the server's _write_round does for round ``n`` (history already ends with its record)."""
    record = history[-1]
    is_best = best.get("map50") is None or record.map50 > best["map50"]
    if is_best:
        best = {"round": n, "map50": record.map50, "test_loss": record.test_loss}
    out.commit_round(record, _weights(n, numel), {"round": n, "map50": record.map50}, is_best, _state(n),
                     history, best)
    return best


def _run_rounds(run_dir, first: int, last: int, history=None, best=None, report=None, numel: int = 2000):
    out = RunOutputs(run_dir)
    history = list(history or [])
    best = dict(best or {"round": None, "map50": None})
    for n in range(first, last + 1):
        history.append(_record(n))
        best = _commit(out, n, history, best, numel)
        if report is not None:
            report.send(n)


def _child(run_dir, fault: str | None, last: int, conn=None, numel: int = 2000) -> None:
    if fault:
        os.environ["FEDPLUG_FAULT_POINT"] = fault
    _run_rounds(run_dir, 1, last, report=conn, numel=numel)
    os._exit(0)


def _fork(target, *args) -> multiprocessing.Process:
    proc = multiprocessing.get_context("fork").Process(target=target, args=args)
    proc.start()
    return proc


def _resume_and_finish(run_dir) -> int | None:
    """Resume ``run_dir`` as the server does, run it to round ROUNDS, check everything; the round resumed after."""
    lock = RunDirLock(run_dir, run_dir)  # removes the killed writer's temp files
    try:
        point = find_resume_point(run_dir)
        out = RunOutputs(run_dir)
        out.adopt(point)
        after = 0 if point is None else point.round
        if point is not None:
            # the resume point is exactly round `after` as committed: weights, aggregator state, history
            assert torch.equal(point.weights["conv.weight"], _weights(after)["conv.weight"])
            assert torch.equal(point.aggregator_state["momentum/conv.weight"], _state(after)["momentum/conv.weight"])
            assert point.aggregator_state["step"] == after
            assert [r.round_number for r in point.history] == list(range(1, after + 1))
            # metrics already agree with the committed history, before any new round
            assert _csv_rounds(run_dir) == list(range(1, after + 1))
        _run_rounds(run_dir, after + 1, ROUNDS, point.history if point else [], point.best if point else None)
    finally:
        lock.release()
    _check_finished_run(run_dir)
    return after


def _csv_rounds(run_dir) -> list[int]:
    path = run_dir / "metrics.csv"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    assert lines[0].startswith("round,")
    return [int(line.split(",")[0]) for line in lines[1:]]


def _check_finished_run(run_dir) -> None:
    ckpt = run_dir / "checkpoints"
    assert _csv_rounds(run_dir) == list(range(1, ROUNDS + 1))
    jsonl = [json.loads(x)["round_number"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert jsonl == list(range(1, ROUNDS + 1))
    last, meta = read_checkpoint(ckpt / "last.safetensors")
    assert json.loads(meta["round"]) == ROUNDS and torch.equal(last["conv.weight"], _weights(ROUNDS)["conv.weight"])
    best, meta = read_checkpoint(ckpt / "best.safetensors")
    best_round = max(BEST_ROUNDS)
    assert json.loads(meta["round"]) == best_round
    assert torch.equal(best["conv.weight"], _weights(best_round)["conv.weight"])
    point = find_resume_point(run_dir)
    assert point.round == ROUNDS and point.best["round"] == best_round
    # nothing but the committed round's files (and the user-facing links) is left
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == sorted({"manifest.json", "last.safetensors", "best.safetensors", "round_0003.safetensors",
                            "round_0003.aggregator.safetensors", "round_0003.resume.json"}), names


# --------------------------------------------------------------------------- the plain path


def test_rounds_commit_through_one_manifest_and_old_files_go(tmp_path):
    _run_rounds(tmp_path, 1, ROUNDS)
    _check_finished_run(tmp_path)
    manifest = json.loads((tmp_path / "checkpoints" / "manifest.json").read_text())
    assert manifest["round"] == 3 and manifest["model"]["file"] == "round_0003.safetensors"
    assert manifest["best"]["round"] == 3 and manifest["best"]["file"] == "round_0003.safetensors"
    # last.safetensors is the round file itself (a hard link: no second copy on disk)
    assert os.path.samefile(tmp_path / "checkpoints" / "last.safetensors",
                            tmp_path / "checkpoints" / "round_0003.safetensors")


def test_the_best_round_file_is_kept_while_later_rounds_are_worse(tmp_path):
    _run_rounds(tmp_path, 1, 2)
    ckpt = tmp_path / "checkpoints"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["round"] == 2 and manifest["best"]["file"] == "round_0001.safetensors"
    best, meta = read_checkpoint(ckpt / "best.safetensors")
    assert json.loads(meta["round"]) == 1 and torch.equal(best["conv.weight"], _weights(1)["conv.weight"])
    assert (ckpt / "round_0001.safetensors").exists() and not (ckpt / "round_0001.resume.json").exists()


# --------------------------------------------------------------------------- kills at every step


@pytest.mark.parametrize("step", COMMIT_STEPS)
def test_a_kill_at_any_step_of_round_2_leaves_round_1_or_2_resumable(tmp_path, step):
    child = _fork(_child, tmp_path, f"commit:{step}@2", ROUNDS)
    child.join(60)
    assert child.exitcode == -signal.SIGKILL, f"the fault point commit:{step} was never reached"
    expected = 2 if COMMIT_STEPS.index(step) >= COMMITTED_FROM else 1
    assert find_resume_point(tmp_path).round == expected
    assert _resume_and_finish(tmp_path) == expected


@pytest.mark.parametrize("step", ["begin", "model.partial", "resume.renamed", "manifest.written",
                                  "manifest.renamed", "metrics.csv_partial", "done"])
def test_a_kill_in_the_first_round_resumes_as_a_fresh_start_or_after_round_1(tmp_path, step):
    (tmp_path / "events.jsonl").write_text("")  # what a server leaves from its first second on
    child = _fork(_child, tmp_path, f"commit:{step}@1", ROUNDS)
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    committed = COMMIT_STEPS.index(step) >= COMMITTED_FROM
    point = find_resume_point(tmp_path)
    assert (point is None) if not committed else (point.round == 1)
    assert _resume_and_finish(tmp_path) == (1 if committed else 0)


def test_kills_at_random_instants_leave_the_last_reported_round_or_the_next(tmp_path):
    """SIGKILL from outside at random times while rounds of a ~4 MB model are being committed."""
    rng = random.Random(10)
    for case in range(8):
        run_dir = tmp_path / f"run{case}"
        run_dir.mkdir()
        (run_dir / "events.jsonl").write_text("")  # a server's first trace: a kill before round 1 is a fresh start
        parent_end, child_end = multiprocessing.get_context("fork").Pipe(duplex=False)
        child = _fork(_child, run_dir, None, 10_000, child_end, 1_000_000)
        reported = 0
        deadline = time.monotonic() + rng.uniform(0.05, 0.6)
        while time.monotonic() < deadline:
            if parent_end.poll(0.01):
                reported = parent_end.recv()
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
        while parent_end.poll():
            reported = parent_end.recv()
        point = find_resume_point(run_dir)
        resumed = 0 if point is None else point.round
        # every round the child finished committing is on disk; at most the one in progress is more
        assert reported <= resumed <= reported + 1, (case, reported, resumed)
        if point is not None:
            assert torch.equal(point.weights["conv.weight"], _weights(resumed, 1_000_000)["conv.weight"])
            assert [r.round_number for r in point.history] == list(range(1, resumed + 1))
        lock = RunDirLock(run_dir, run_dir)
        out = RunOutputs(run_dir)
        out.adopt(point)
        lock.release()
        assert _csv_rounds(run_dir) == list(range(1, resumed + 1))
        assert not list(run_dir.rglob(".*.tmp"))


# --------------------------------------------------------------------------- disk full


def _full_disk_at(monkeypatch, nth: int) -> list[int]:
    """Make the ``nth`` write of commit's bytes (counted from now) fail with ENOSPC."""
    calls = [0]
    real = commit.write_bytes

    def write_bytes(f, data):
        calls[0] += 1
        if calls[0] == nth:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, data)

    monkeypatch.setattr(commit, "write_bytes", write_bytes)
    return calls


def _writes_per_round(tmp_path, monkeypatch) -> int:
    _run_rounds(tmp_path / "count", 1, 1)
    calls = _full_disk_at(monkeypatch, nth=0)
    out = RunOutputs(tmp_path / "count")
    _commit(out, 2, [_record(1), _record(2)], {"round": 1, "map50": 0.5})
    monkeypatch.undo()
    return calls[0]


def test_disk_full_at_every_write_of_a_round_keeps_the_previous_round_and_recovers(tmp_path, monkeypatch):
    writes = _writes_per_round(tmp_path, monkeypatch)
    assert writes >= 10  # two halves of model, aggregator state, resume doc, manifest, metrics.csv, .jsonl
    for nth in range(1, writes + 1):
        run_dir = tmp_path / f"full{nth}"
        _run_rounds(run_dir, 1, 1)
        out = RunOutputs(run_dir)
        history = [_record(1), _record(2)]
        _full_disk_at(monkeypatch, nth)
        with pytest.raises(OSError) as info:
            _commit(out, 2, history, {"round": 1, "map50": 0.5})
        monkeypatch.undo()
        assert info.value.errno == errno.ENOSPC
        point = find_resume_point(run_dir)
        # before the manifest switch round 1 stays the committed one, after it round 2 is; never neither
        assert point.round == out.committed_round in (1, 2)
        assert torch.equal(point.weights["conv.weight"], _weights(point.round)["conv.weight"])
        # no metrics row for a round that is not on disk, and no half row
        assert _csv_rounds(run_dir) == list(range(1, point.round + 1))[: len(_csv_rounds(run_dir))]
        assert not list(run_dir.rglob(".*.tmp"))
        # space is freed; the run goes on (run.on_write_error=continue): the next commit writes everything
        best = {"round": 1, "map50": 0.5}
        history.append(_record(3))
        _commit(out, 3, history, best)
        assert _csv_rounds(run_dir) == [1, 2, 3], nth
        jsonl = [json.loads(x)["round_number"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert jsonl == [1, 2, 3]
        assert find_resume_point(run_dir).round == 3


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 3 MiB file system that fills up (tmpfs; needs root, skipped where mounting is refused)."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    import subprocess

    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.stdout.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def test_a_really_full_disk_keeps_the_previous_round_resumable(small_tmpfs):
    run_dir = small_tmpfs / "run"
    _run_rounds(run_dir, 1, 1, numel=100_000)  # 400 kB per model file
    filler = small_tmpfs / "filler"
    with open(filler, "wb") as f:  # someone else fills the disk
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    out = RunOutputs(run_dir)
    history = [_record(1), _record(2)]
    with pytest.raises(OSError) as info:
        _commit(out, 2, history, {"round": 1, "map50": 0.5}, numel=100_000)
    assert info.value.errno == errno.ENOSPC
    point = find_resume_point(run_dir)
    assert point.round == 1 and torch.equal(point.weights["conv.weight"], _weights(1, 100_000)["conv.weight"])
    assert _csv_rounds(run_dir) == [1]
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(("round_0002", "."))]
    filler.unlink()  # the operator frees space and resumes
    lock = RunDirLock(run_dir, run_dir)
    RunOutputs(run_dir).adopt(point)
    lock.release()
    _run_rounds(run_dir, 2, ROUNDS, point.history, point.best, numel=100_000)
    assert _csv_rounds(run_dir) == [1, 2, 3] and find_resume_point(run_dir).round == 3


# --------------------------------------------------------------------------- what resuming reads


def test_resuming_a_directory_that_is_no_run_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="run.resume=.*no such directory"):
        find_resume_point(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="run.resume=.*no other trace of a fedplug run"):
        find_resume_point(tmp_path)


def test_a_changed_or_missing_checkpoint_file_is_named(tmp_path):
    _run_rounds(tmp_path, 1, 2)
    ckpt = tmp_path / "checkpoints"
    state_file = ckpt / "round_0002.aggregator.safetensors"
    data = bytearray(state_file.read_bytes())
    data[-1] ^= 0xFF
    state_file.write_bytes(bytes(data))
    with pytest.raises(ResumeError, match="round_0002.aggregator.safetensors does not match"):
        find_resume_point(tmp_path)
    state_file.unlink()
    with pytest.raises(ResumeError, match="round_0002.aggregator.safetensors is missing"):
        find_resume_point(tmp_path)


def test_resuming_into_another_directory_copies_the_committed_round(tmp_path):
    _run_rounds(tmp_path / "first", 1, 2)
    point = find_resume_point(tmp_path / "first")
    second = tmp_path / "second"
    out = RunOutputs(second)
    out.adopt(point)
    assert out.committed_round == 2 and _csv_rounds(second) == [1, 2]
    _run_rounds(second, 3, ROUNDS, point.history, point.best)
    _check_finished_run(second)
    assert find_resume_point(tmp_path / "first").round == 2  # the first run is untouched


def test_a_run_written_before_manifests_resumes_and_is_converted(tmp_path):
    """The layout fedplug wrote before: resume.json, last/best.safetensors, aggregator_state_<N>.safetensors."""
    from dataclasses import asdict

    from fedplug.wire import encode_state

    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    (ckpt / "last.safetensors").write_bytes(encode_state(_weights(2), {"round": "2"}))
    (ckpt / "best.safetensors").write_bytes(encode_state(_weights(1), {"round": "1"}))
    (ckpt / "aggregator_state_2.safetensors").write_bytes(encode_state({"momentum/conv.weight": torch.full((5,), 2.0)}))
    (ckpt / "resume.json").write_text(json.dumps({
        "round": 2, "aggregator_state_file": "aggregator_state_2.safetensors", "aggregator_scalars": {"step": 2},
        "history": [asdict(_record(1)), asdict(_record(2))], "best": {"round": 1, "map50": 0.5}}))
    assert _resume_and_finish(tmp_path) == 2
    assert not (ckpt / "resume.json").exists() and not (ckpt / "aggregator_state_2.safetensors").exists()


def test_the_event_log_names_each_committed_round_once_after_a_kill(tmp_path):
    log = EventLog(tmp_path / "events.jsonl")
    log.write("round_committed", "local", 1)
    log.close()
    with open(tmp_path / "events.jsonl", "a") as f:
        f.write('{"time": 1, "event": "request_upd')  # the line a SIGKILL cut short
    history = [_record(1), _record(2)]
    assert missing_commit_events(tmp_path / "events.jsonl", history) == [2]
    log = EventLog(tmp_path / "events.jsonl")  # the resumed server's log starts on a line of its own
    log.write("round_committed", "local", 2, recovered=True)
    log.close()
    rows = read_events(tmp_path / "events.jsonl")
    assert [r["round"] for r in rows if r["event"] == "round_committed"] == [1, 2]
    assert missing_commit_events(tmp_path / "events.jsonl", history) == []


# --------------------------------------------------------------------------- through the server


def _serve(run_dir, *overrides, rounds: int = 3):
    """The real server in-process with two scripted clients; returns (status, server, printed lines)."""
    import asyncio

    from scripted import ScriptedClient, compose_cfg, toy_plugins

    from fedplug.server import FederationServer

    cfg = compose_cfg(f"run.rounds={rounds}", "run.min_clients=2", "run.clients_per_round=2", "run.num_clients=2",
                      *overrides)
    lines: list[str] = []

    async def main():
        server = FederationServer(cfg, toy_plugins(), ("car", "person", "sign"), run_dir, echo=lines.append)
        port = await server.start()
        clients = [ScriptedClient(f"http://127.0.0.1:{port}", cid) for cid in ("a", "b")]
        try:
            for c in clients:
                await c.start()
            status = await asyncio.wait_for(server.run_federation(), 60)
        finally:
            for c in clients:
                await c.close()
            await server.stop()
        return status, server

    lock = RunDirLock(run_dir, run_dir if any("run.resume" in o for o in overrides) else None)
    try:
        status, server = asyncio.run(main())
    finally:
        lock.release()
    return status, server, lines


def _disk_full_in_round(monkeypatch, rounds: set[int]) -> None:
    """Every write of the rounds in ``rounds`` fails with ENOSPC, as on a full disk."""
    full = [False]
    real_commit, real_write = RunOutputs.commit_round, commit.write_bytes

    def commit_round(self, record, *args, **kwargs):
        full[0] = record.round_number in rounds
        return real_commit(self, record, *args, **kwargs)

    def write_bytes(f, data):
        if full[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(f, data)

    monkeypatch.setattr(RunOutputs, "commit_round", commit_round)
    monkeypatch.setattr(commit, "write_bytes", write_bytes)


def _logged_rounds(run_dir, event: str) -> list[int]:
    return [e["round"] for e in read_events(run_dir / "events.jsonl") if e["event"] == event]


def test_disk_full_stops_the_run_saying_so_and_it_resumes_after_the_saved_round(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    _disk_full_in_round(monkeypatch, {2})
    status, server, lines = _serve(run_dir)
    monkeypatch.undo()
    assert status == 1
    failure = [line for line in lines if "could not write round 2" in line]
    assert failure and "the disk is full" in failure[0] and "round 1 stays saved and resumable" in failure[0]
    assert f"run.resume={run_dir}" in failure[0]
    assert _csv_rounds(run_dir) == [1] and find_resume_point(run_dir).round == 1
    assert _logged_rounds(run_dir, "write_failed") == [2] and _logged_rounds(run_dir, "round_committed") == [1]
    # the operator frees space and resumes into the same directory
    status, server, lines = _serve(run_dir, f"run.resume={run_dir}")
    assert status == 0 and [r.round_number for r in server.history] == [1, 2, 3]
    assert f"resuming from {run_dir} after round 1" in lines
    assert _csv_rounds(run_dir) == [1, 2, 3] and _logged_rounds(run_dir, "round_committed") == [1, 2, 3]
    weights, meta = read_checkpoint(run_dir / "checkpoints" / "last.safetensors")
    assert json.loads(meta["round"]) == 3 and torch.equal(weights["conv.weight"], server.global_weights["conv.weight"])


def test_on_write_error_continue_goes_on_and_the_next_round_writes_everything(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    _disk_full_in_round(monkeypatch, {2})
    status, server, lines = _serve(run_dir, "run.on_write_error=continue")
    assert status == 0 and [r.round_number for r in server.history] == [1, 2, 3]
    assert any("could not write round 2" in line and "going on without it" in line for line in lines)
    assert _csv_rounds(run_dir) == [1, 2, 3]  # round 2's row comes back with round 3's commit
    assert _logged_rounds(run_dir, "write_failed") == [2] and _logged_rounds(run_dir, "round_committed") == [1, 3]
    assert find_resume_point(run_dir).round == 3


def test_on_write_error_continue_still_fails_a_run_whose_last_round_is_not_saved(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    _disk_full_in_round(monkeypatch, {2})
    status, server, lines = _serve(run_dir, "run.on_write_error=continue", rounds=2)
    assert status == 1 and find_resume_point(run_dir).round == 1
    assert any("could not write round 2" in line for line in lines)


def test_a_run_killed_before_its_first_commit_resumes_as_a_fresh_start(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "events.jsonl").write_text('{"event": "request_update", "round": 1}\n')
    (run_dir / "checkpoints" / "round_0001.safetensors").write_bytes(b"half a model")  # the killed commit's
    status, server, lines = _serve(run_dir, f"run.resume={run_dir}", rounds=2)
    assert status == 0 and [r.round_number for r in server.history] == [1, 2]
    assert any("stopped before it saved its first round; starting at round 1" in line for line in lines)
    assert _csv_rounds(run_dir) == [1, 2] and find_resume_point(run_dir).round == 2


def test_on_write_error_must_be_stop_or_continue():
    from scripted import compose_cfg

    from fedplug.config import ConfigError, validate

    with pytest.raises(ConfigError, match="run.on_write_error must be one of stop, continue, got 'retry'"):
        validate(compose_cfg("run.on_write_error=retry"))
