"""Run outputs: event log, metrics files, atomic checkpoints, resume point, the printed table."""

import json

import pytest
import torch

from fedplug.outputs import EventLog, RunOutputs, format_table, load_resume_point, read_events
from fedplug.types import RoundRecord
from fedplug.wire import read_checkpoint, write_atomic


def _record(n, map50=None):
    return RoundRecord(round_number=n, participants=("a", "b"), train_loss=1.0 / n, test_loss=0.5,
                       map50=map50, recall=0.9 if map50 is not None else None, seconds=1.5,
                       extra={"coco_map": 0.3} if map50 is not None else {})


def test_event_log_lines(tmp_path):
    log = EventLog(tmp_path / "events.jsonl")
    log.write("request_update", "out", 1, "a", bytes=10)
    log.write("client_update", "in", 1, "a", loss=float("nan"))
    log.close()
    log.write("late", "out")  # after close: ignored, not an exception
    events = read_events(tmp_path / "events.jsonl")
    assert [e["event"] for e in events] == ["request_update", "client_update"]
    assert events[0]["direction"] == "out" and events[0]["round"] == 1 and events[0]["client_id"] == "a"
    assert events[1]["loss"] is None and "time" in events[1]


def test_metrics_rows_and_checkpoints(tmp_path):
    out = RunOutputs(tmp_path)
    out.record_round(_record(1))
    out.record_round(_record(2, map50=0.7))
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0].split(",")[:4] == ["round", "participants", "num_participants", "train_loss"]
    assert lines[2].split(",")[5] == "0.7"
    assert [json.loads(x)["round_number"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    w = {"a": torch.randn(3), "n": torch.tensor(4)}
    out.save_checkpoint("last", w, {"round": 2, "map50": 0.7})
    back, meta = read_checkpoint(tmp_path / "checkpoints" / "last.safetensors")
    assert torch.equal(back["a"], w["a"]) and json.loads(meta["round"]) == 2
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))


def test_resume_point_round_trip(tmp_path):
    out = RunOutputs(tmp_path)
    w = {"a": torch.randn(3)}
    history = [_record(1), _record(2, 0.5)]
    out.commit_round(history[1], w, {"round": 2}, True, {"m/a": torch.ones(3), "step": 2}, history,
                     {"round": 2, "map50": 0.5})
    rnd, weights, state, hist, best = load_resume_point(tmp_path)
    assert rnd == 2 and torch.equal(weights["a"], w["a"]) and torch.equal(state["m/a"], torch.ones(3))
    assert state["step"] == 2 and [r.round_number for r in hist] == [1, 2] and best["round"] == 2
    assert hist[1].participants == ("a", "b")


def test_resume_from_a_directory_without_one_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="run.resume"):
        load_resume_point(tmp_path)


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "f.bin"
    write_atomic(target, b"old")


    with pytest.raises(TypeError):
        write_atomic(target, object())  # type: ignore[arg-type]
    assert target.read_bytes() == b"old" and not list(tmp_path.glob(".*.tmp"))


def test_table_marks_the_best_round():
    text = format_table([_record(1), _record(2, 0.7)], best_round=2)
    lines = text.splitlines()
    assert "mAP@0.5" in lines[0] and lines[2].endswith("<- best") and " - " in lines[1]
