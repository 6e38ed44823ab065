"""The server over real sockets, driven by scripted clients (fast: no training).

Covers the protocol's repairs: round numbers, who may answer and how often,
deadlines and quorum, rejected updates, observer hooks, outputs, exit.
"""

import asyncio
import json

import pytest
import torch

from fedplug.outputs import read_events
from fedplug.wire import read_checkpoint
from scripted import RecordingObserver, compose_cfg, run_scripted_federation, toy_plugins


def _run(cfg, tmp_path, behaviours, **kw):
    return asyncio.run(run_scripted_federation(cfg, tmp_path, behaviours, **kw))


def test_rounds_are_exact_and_fedavg_is_the_weighted_mean(tmp_path):
    cfg = compose_cfg("run.rounds=3", "run.min_clients=2", "run.clients_per_round=2", "run.num_clients=2")
    observer = RecordingObserver()
    status, server, clients = _run(cfg, tmp_path, {"a": "good", "b": "good"},
                                   plugins=toy_plugins(observer=observer),
                                   a={"delta": 1.0, "train_size": 10}, b={"delta": 4.0, "train_size": 30})
    assert status == 0
    assert [r.round_number for r in server.history] == [1, 2, 3]
    # each round moves every float tensor by (10*1 + 30*4) / 40 = 3.25
    start = {k: v for k, v in server.round_start_weights.items()}
    for k, v in server.global_weights.items():
        if v.is_floating_point():
            assert torch.allclose(v, start[k] + 3.25, atol=1e-5), k
    assert server.global_weights["bn.num_batches_tracked"].dtype == torch.long
    # the exact global mAP from merged statistics: one TP at 0.9 over 2 GT per... (1 GT per client, 2 clients)
    last = server.history[-1]
    assert last.map50 == pytest.approx(1.0) and last.recall == pytest.approx(1.0)
    # outputs
    events = read_events(tmp_path / "events.jsonl")
    names = [e["event"] for e in events]
    order = ["connect", "client_wake_up", "init", "client_ready", "check_client_resource",
             "check_client_resource_done", "request_update", "client_update", "stop_and_eval", "client_eval",
             "run_finished"]
    positions = [names.index(n) for n in order]
    assert positions == sorted(positions)
    assert sum(1 for e in events if e["event"] == "request_update") == 3 * 2
    assert (tmp_path / "metrics.csv").read_text().count("\n") == 4
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    weights, meta = read_checkpoint(tmp_path / "checkpoints" / "last.safetensors")
    assert json.loads(meta["round"]) == 3 and torch.equal(weights["conv.weight"], server.global_weights["conv.weight"])
    assert (tmp_path / "checkpoints" / "best.safetensors").exists()
    assert all(c.finished.is_set() for c in clients.values())
    for hook in ("run_start", "client_joined", "round_start", "round_end", "run_end"):
        assert hook in observer.calls


@pytest.mark.parametrize("bad", ["wrong_shape", "nan", "missing", "wrong_dtype", "garbage"])
def test_a_bad_update_is_rejected_and_the_round_goes_on(tmp_path, bad):
    cfg = compose_cfg("run.rounds=2", "run.min_clients=2", "run.clients_per_round=2", "run.num_clients=2")
    status, server, clients = _run(cfg, tmp_path, {"good": "good", "evil": bad})
    assert status == 0 and len(server.history) == 2
    assert all(r.participants == ("good",) for r in server.history)
    assert all(torch.isfinite(v.float()).all() for v in server.global_weights.values())
    assert clients["evil"].errors and "rejected" in clients["evil"].errors[0]["reason"]
    events = read_events(tmp_path / "events.jsonl")
    assert any(e["event"] == "update_rejected" and e["client_id"] == "evil" for e in events)


@pytest.mark.parametrize("bad, reason", [("duplicate", "duplicate"), ("stale", "round")])
def test_duplicates_and_other_rounds_are_ignored(tmp_path, bad, reason):
    cfg = compose_cfg("run.rounds=1", "run.min_clients=2", "run.clients_per_round=2", "run.num_clients=2",
                      "server.update_timeout_s=3")
    status, server, clients = _run(cfg, tmp_path, {"a": "good", "b": bad}, a={"delta": 1.0}, b={"delta": 1.0})
    assert status == 0
    assert any(reason in e["reason"] for e in clients["b"].errors)
    if bad == "duplicate":  # counted once: the mean of +1 and +1 is +1, not skewed
        assert server.history[0].participants == ("a", "b")


def test_a_client_dying_mid_round_does_not_hang_the_run(tmp_path):
    cfg = compose_cfg("run.rounds=2", "run.min_clients=3", "run.clients_per_round=3", "run.num_clients=3")
    status, server, _ = _run(cfg, tmp_path, {"a": "good", "b": "good", "c": "die"}, timeout=40)
    assert status == 0 and len(server.history) == 2
    assert server.history[0].participants == ("a", "b")
    assert server.history[1].participants == ("a", "b")  # c is gone: not contacted any more


def test_silent_clients_hit_the_deadline_and_a_missed_quorum_fails_clearly(tmp_path):
    cfg = compose_cfg("run.rounds=2", "run.min_clients=2", "run.clients_per_round=2", "run.num_clients=2",
                      "server.update_timeout_s=1", "server.quorum=1.0", "server.round_retries=1")
    status, server, clients = _run(cfg, tmp_path, {"a": "good", "b": "silent"}, timeout=30)
    assert status == 1 and server.history == []
    events = read_events(tmp_path / "events.jsonl")
    assert sum(1 for e in events if e["event"] == "request_update") == 4  # 2 attempts x 2 clients
    assert all(c.finished.is_set() for c in clients.values())  # told to stop


def test_a_failed_update_is_reported_and_skipped(tmp_path):
    cfg = compose_cfg("run.rounds=1", "run.min_clients=2", "run.clients_per_round=2", "run.num_clients=2")
    status, server, _ = _run(cfg, tmp_path, {"a": "good", "b": "fail"})
    assert status == 0 and server.history[0].participants == ("a",)
    assert any(e["event"] == "update_failed" for e in read_events(tmp_path / "events.jsonl"))


def test_hostile_messages_get_a_protocol_error_and_change_nothing(tmp_path):
    import socketio

    from fedplug.server import FederationServer

    async def go():
        cfg = compose_cfg("run.rounds=1")
        server = FederationServer(cfg, toy_plugins(), ("a", "b", "c"), tmp_path, echo=lambda *a: None)
        before = {k: v.clone() for k, v in server.global_weights.items()}
        port = await server.start()
        errors = []
        sio = socketio.AsyncClient(reconnection=False)
        sio.on("protocol_error", lambda d: errors.append(d["reason"]))
        await sio.connect(f"http://127.0.0.1:{port}", transports=["websocket"])
        await sio.emit("client_ready", {"client_id": "x", "num_train": 1, "num_test": 1})  # before wake-up
        await sio.emit("client_wake_up", {"client_id": 5})
        await sio.emit("client_wake_up", "not a dict")
        await sio.emit("bogus_event", {"a": 1})
        await sio.emit("client_update", {"round_number": 1, "ok": True, "weights": b"x", "train_size": 1,
                                         "train_loss": 0.1})
        await sio.emit("client_wake_up", {"client_id": "x", "protocol_version": 99})
        for _ in range(50):
            if len(errors) >= 6:
                break
            await asyncio.sleep(0.1)
        await sio.disconnect()
        await server.stop()
        return errors, before, server

    errors, before, server = asyncio.run(go())
    assert len(errors) == 6, errors
    assert any("send client_wake_up first" in e for e in errors)
    assert any("unknown event" in e for e in errors)
    assert any("protocol version 99" in e for e in errors)
    assert all(torch.equal(before[k], v) for k, v in server.global_weights.items())


def test_early_stopping_on_the_global_test_loss(tmp_path):
    cfg = compose_cfg("run.rounds=6", "run.min_clients=1", "run.clients_per_round=1", "run.num_clients=1",
                      "run.patience=2")
    status, server, _ = _run(cfg, tmp_path, {"a": "good"})
    # the scripted test loss never improves (always 1.0): stop after 1 + 2 evaluations
    assert status == 0 and len(server.history) == 3


def test_eval_every_k_rounds_and_always_the_last(tmp_path):
    cfg = compose_cfg("run.rounds=5", "run.min_clients=1", "run.clients_per_round=1", "run.num_clients=1",
                      "run.eval_every=2")
    status, server, _ = _run(cfg, tmp_path, {"a": "good"})
    assert status == 0
    assert [r.round_number for r in server.history if r.map50 is not None] == [2, 4, 5]


def test_resume_continues_after_the_last_round(tmp_path):
    first = tmp_path / "first"
    cfg = compose_cfg("run.rounds=2", "run.min_clients=1", "run.clients_per_round=1", "run.num_clients=1")
    status, server, _ = _run(cfg, first, {"a": "good"})
    assert status == 0
    after_two = {k: v.clone() for k, v in server.global_weights.items()}
    cfg2 = compose_cfg("run.rounds=3", "run.min_clients=1", "run.clients_per_round=1", "run.num_clients=1",
                       f"run.resume={first}")
    status, server2, _ = _run(cfg2, tmp_path / "second", {"a": "good"})
    assert status == 0 and [r.round_number for r in server2.history] == [1, 2, 3]
    assert torch.allclose(server2.global_weights["conv.weight"], after_two["conv.weight"] + 1.0)


def test_ready_timeout_fails_with_a_clear_message(tmp_path):
    cfg = compose_cfg("run.rounds=1", "run.min_clients=2", "run.clients_per_round=2", "run.num_clients=2",
                      "server.ready_timeout_s=1")
    status, server, _ = _run(cfg, tmp_path, {"a": "good"})
    assert status == 1 and server.history == []


def test_the_global_model_is_serialised_once_per_send_not_once_per_client(tmp_path, monkeypatch):
    from fedplug import server as server_module

    from fedplug.wire import SafetensorsLayout

    calls, whole = [], []
    real, real_bytes = server_module._layout_of, SafetensorsLayout.to_bytes
    monkeypatch.setattr(server_module, "_layout_of", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(SafetensorsLayout, "to_bytes", lambda self: whole.append(1) or real_bytes(self))
    cfg = compose_cfg("run.rounds=2", "run.min_clients=4", "run.clients_per_round=4", "run.num_clients=4")
    status, server, _ = _run(cfg, tmp_path, {c: "good" for c in "abcd"})  # protocol-1 peers: weights inline
    assert status == 0
    assert len(calls) == 2 * 2  # per round: one for request_update, one for stop_and_eval — for 4 clients
    assert len(whole) == 2 * 2  # and each built into one inline message once, not once per client


def test_a_client_that_reconnects_mid_round_keeps_its_identity_and_its_update_counts(tmp_path):
    cfg = compose_cfg("run.rounds=2", "run.min_clients=2", "run.clients_per_round=2", "run.num_clients=2",
                      "server.reconnect_grace_s=5")
    status, server, clients = _run(cfg, tmp_path, {"a": "good", "b": "reconnect"})
    assert status == 0 and clients["b"].reconnected
    assert [r.participants for r in server.history] == [("a", "b"), ("a", "b")]
    events = read_events(tmp_path / "events.jsonl")
    assert sum(1 for e in events if e["event"] == "client_wake_up" and e["client_id"] == "b") == 2
    assert list(server.clients) == ["a", "b"]  # one slot per client id, not per socket


@pytest.mark.parametrize("outcome", ["fail", "proceed"])
def test_a_resource_check_that_never_passes_backs_off_then_ends_clearly(tmp_path, outcome):
    import time

    cfg = compose_cfg("run.rounds=1", "run.min_clients=2", "run.clients_per_round=2", "run.num_clients=2",
                      "resource_policy=cpu_load", "server.resource_max_attempts=2",
                      f"server.on_resource_exhausted={outcome}", "server.round_retries=0")
    plugins = toy_plugins(policy="cpu_load")
    t0 = time.monotonic()
    status, server, _ = _run(cfg, tmp_path, {"a": "busy", "b": "busy"}, plugins=plugins)
    elapsed = time.monotonic() - t0
    events = read_events(tmp_path / "events.jsonl")
    checks = [e for e in events if e["event"] == "check_client_resource"]
    assert len(checks) == 2 * 2  # two attempts, two clients, with a back-off between them
    assert elapsed >= 1.0
    if outcome == "fail":
        assert status == 1 and server.history == []
    else:
        assert status == 0 and server.history[0].participants == ("a", "b")


def test_status_api_reports_phase_clients_and_history(tmp_path):
    import aiohttp

    from fedplug.server import FederationServer
    from scripted import ScriptedClient

    async def go():
        cfg = compose_cfg("run.rounds=1", "run.min_clients=1", "run.clients_per_round=1", "run.num_clients=1")
        server = FederationServer(cfg, toy_plugins(), ("a", "b", "c"), tmp_path, echo=lambda *a: None)
        port = await server.start()
        client = ScriptedClient(f"http://127.0.0.1:{port}", "site", "good")
        await client.start()
        try:
            status = await asyncio.wait_for(server.run_federation(), 30)
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{port}/status") as resp:
                    return status, resp.status, await resp.json()
        finally:
            await client.close()
            await server.stop()

    status, http_status, body = asyncio.run(go())
    assert status == 0 and http_status == 200
    assert body["phase"] == "finished" and body["rounds"] == 1 and "site" in body["clients"]
    assert [h["round"] for h in body["history"]] == [1] and body["history"][0]["map50"] == 1.0


def test_a_client_dying_during_the_last_evaluation_is_given_up_after_the_grace_period(tmp_path):
    import time

    cfg = compose_cfg("run.rounds=1", "run.min_clients=2", "run.clients_per_round=2", "run.num_clients=2",
                      "server.eval_timeout_s=120", "server.reconnect_grace_s=1")
    t0 = time.monotonic()
    status, server, _ = _run(cfg, tmp_path, {"a": "good", "b": "die_at_last_eval"}, timeout=60)
    assert status == 0 and time.monotonic() - t0 < 30  # not the 120 s evaluation deadline
    assert server.history[0].extra["evaluators"] == 1.0


def test_an_answer_event_without_payload_gets_a_protocol_error(tmp_path):
    import socketio

    from fedplug.server import FederationServer

    async def go():
        server = FederationServer(compose_cfg("run.rounds=1"), toy_plugins(), ("a", "b", "c"), tmp_path,
                                  echo=lambda *a: None)
        port = await server.start()
        errors = []
        sio = socketio.AsyncClient(reconnection=False)
        sio.on("protocol_error", lambda d: errors.append(d["reason"]))
        await sio.connect(f"http://127.0.0.1:{port}", transports=["websocket"])
        await sio.emit("client_wake_up")
        for _ in range(50):
            if errors:
                break
            await asyncio.sleep(0.1)
        await sio.disconnect()
        await server.stop()
        return errors

    assert any("payload must be an object" in e for e in asyncio.run(go()))
