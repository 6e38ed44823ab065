"""Issue 9, end to end: a hostile client against the real server, over real sockets (and TLS).

Each test reproduces one thing a client written from docs/protocol.md could do to the server before the
security work — a number that took over FedAvg, a claimed mAP, a stolen or locked-out id, forged
``connect``/``disconnect`` events, a message split into attachments past ``max_message_mb``, idle
connections held for ever, ``/status`` for anyone, no TLS — and checks that it no longer works.
"""

import asyncio
import base64
import json

import aiohttp
import pytest
import socketio
import torch
from socketio import packet as sio_packet
from torch import nn

from fedplug import protocol as P
from fedplug.client import FederationClient
from fedplug.hooks import hookimpl
from fedplug.outputs import read_events
from fedplug.plugins import ActivePlugins, load_plugin, new_manager
from fedplug.security import Credentials
from fedplug.server import FederationServer
from fedplug.types import DetectionStats, EvalResult, TrainResult
from fedplug.wire import decode_state, encode_state
from scripted import ScriptedClient, compose_cfg, toy_plugins

CLASSES = ("car", "person", "sign")
MIB = 1 << 20


class Peer(ScriptedClient):
    """A scripted client that connects with an ``auth`` payload and can answer ``stop_and_eval`` as told."""

    def __init__(self, url, client_id, behaviour="good", auth=None, eval_answer=None, **kwargs):
        super().__init__(url, client_id, behaviour, **kwargs)
        self.auth, self.eval_answer = auth, eval_answer
        self.refused = []
        self.sio.on("connect_error", lambda data: self.refused.append(data))
        if eval_answer is not None:
            self.sio.on(P.STOP_AND_EVAL, self._eval)

    async def _eval(self, data):
        await self.sio.emit(P.CLIENT_EVAL, dict(self.eval_answer, round_number=data["round_number"]))

    async def start(self):
        await self.sio.connect(self.url, auth=self.auth, transports=["websocket"])


def _stats(scores, flags, gt):
    stats = DetectionStats.empty(len(CLASSES), coco=False)
    stats.scores[0], stats.true_positive[0], stats.num_ground_truth[0] = scores, flags, gt
    return stats.to_json()


async def _federation(cfg, tmp_path, peers, timeout=60, during=None):
    """The real server and ``peers`` = {id: Peer kwargs}; returns (status, server, peers)."""
    server = FederationServer(cfg, toy_plugins(), CLASSES, tmp_path, echo=lambda *a: None)
    port = await server.start()
    clients = {cid: Peer(f"http://127.0.0.1:{port}", cid, **kw) for cid, kw in peers.items()}
    try:
        for c in clients.values():
            await c.start()
        run = asyncio.ensure_future(server.run_federation())
        if during is not None:
            await during(server, port, clients)
        status = await asyncio.wait_for(run, timeout)
    finally:
        for c in clients.values():
            await c.close()
        await server.stop()
    return status, server, clients


def _moved(server):
    """How far the round moved the float tensors (every client adds a constant delta)."""
    start = server.round_start_weights
    name = next(k for k, v in server.global_weights.items() if v.is_floating_point())
    return float((server.global_weights[name] - start[name]).flatten()[0])


# ---------------------------------------------------------------------- 1. a number took over FedAvg


def test_train_size_counts_no_more_than_the_declared_num_train(tmp_path):
    cfg = compose_cfg("run.rounds=1", "run.min_clients=2", "run.clients_per_round=2", "run.num_clients=2")

    async def lie(server, port, clients):
        clients["evil"].train_size = 10**9  # declared 10 in client_ready; claims a billion in client_update

    status, server, _ = asyncio.run(_federation(cfg, tmp_path, {
        "honest": {"delta": 1.0, "train_size": 10}, "evil": {"delta": 100.0, "train_size": 10}}, during=lie))
    assert status == 0 and server.history[0].participants == ("evil", "honest")
    # both count 10 images: (10 * 1 + 10 * 100) / 20; honoured, the claim would give ~100
    assert _moved(server) == pytest.approx(50.5, rel=1e-4)
    capped = [e for e in read_events(tmp_path / "events.jsonl") if e["event"] == "train_size_capped"]
    assert capped and capped[0]["client_id"] == "evil" and capped[0]["claimed"] == 10**9 and capped[0]["declared"] == 10


def test_a_train_size_beyond_the_protocol_bound_is_refused_outright(tmp_path):
    cfg = compose_cfg("run.rounds=1", "run.min_clients=2", "run.clients_per_round=2", "run.num_clients=2",
                      "server.update_timeout_s=3")

    async def lie(server, port, clients):
        clients["evil"].train_size = 10**30

    status, server, clients = asyncio.run(_federation(cfg, tmp_path, {
        "honest": {"delta": 1.0}, "evil": {"delta": 100.0}}, during=lie))
    assert status == 0 and server.history[0].participants == ("honest",)
    assert _moved(server) == pytest.approx(1.0)
    assert any("'train_size' must be within [0, 1000000000]" in e["reason"] for e in clients["evil"].errors)


def test_num_train_is_bounded_by_max_client_examples(tmp_path):
    cfg = compose_cfg("run.rounds=1", "run.min_clients=1", "run.clients_per_round=1", "run.num_clients=1",
                      "server.max_client_examples=1000", "server.ready_timeout_s=3")
    status, server, clients = asyncio.run(_federation(cfg, tmp_path, {"big": {"train_size": 5000}}))
    assert status == 1 and server.ready_clients() == []
    assert any("num_train=5000 is over server.max_client_examples=1000" in e["reason"]
               for e in clients["big"].errors)


def test_a_claimed_map_without_statistics_does_not_set_the_rounds_map(tmp_path):
    cfg = compose_cfg("run.rounds=1", "run.min_clients=2", "run.clients_per_round=2", "run.num_clients=2",
                      "eval.clients=all")
    honest = {"round_number": 0, "ok": True, "test_size": 4, "test_loss": 1.0, "test_map": 0.5, "test_recall": 1.0,
              "stats": _stats([0.9, 0.2], [False, True], 1)}  # AP 0.5: the true positive ranks second
    claim = {"round_number": 0, "ok": True, "test_size": 10**9, "test_loss": 0.0, "test_map": 1.0,
             "test_recall": 1.0}  # no statistics, a billion test images
    status, server, _ = asyncio.run(_federation(cfg, tmp_path, {
        "honest": {"eval_answer": honest}, "evil": {"eval_answer": claim}}))
    record = server.history[0]
    assert status == 0 and record.map50 == pytest.approx(0.5) and record.extra["map_exact"] == 1.0
    assert record.extra["claimed_map50"] == 1.0 and record.extra["claimed_clients"] == 1.0
    assert record.extra["claimed_images"] == 4.0  # test_size capped by the declared num_test
    assert record.per_client["evil"]["map50"] == 1.0  # reported as its own figure
    assert record.extra["eval_images"] == 4.0


# ---------------------------------------------------------------------- 2. lock-out and impersonation


def test_an_id_cannot_change_on_a_connection_and_is_released_when_it_leaves(tmp_path):
    cfg = compose_cfg("run.rounds=1")

    async def go():
        server = FederationServer(cfg, toy_plugins(), CLASSES, tmp_path, echo=lambda *a: None)
        port = await server.start()
        errors = []
        sio = socketio.AsyncClient(reconnection=False)
        sio.on(P.PROTOCOL_ERROR, lambda d: errors.append(d["reason"]))
        await sio.connect(f"http://127.0.0.1:{port}", transports=["websocket"])
        await sio.emit(P.CLIENT_WAKE_UP, {"client_id": "victim", "protocol_version": 2})
        await asyncio.sleep(0.3)
        await sio.emit(P.CLIENT_WAKE_UP, {"client_id": "other", "protocol_version": 2})
        await asyncio.sleep(0.3)
        await sio.disconnect()
        await asyncio.sleep(0.3)
        victim = ScriptedClient(f"http://127.0.0.1:{port}", "victim")
        await victim.start()
        await asyncio.wait_for(server.wait_for_clients(1, 10), 15)
        state = ({cid: s.sid is not None for cid, s in server.clients.items()}, server.ready_clients())
        await victim.close()
        await server.stop()
        return errors, state, victim.errors

    errors, (connected, ready), victim_errors = asyncio.run(go())
    assert any("cannot change" in e for e in errors)
    assert "other" not in connected and ready == ["victim"] and victim_errors == []


def _credentials(tmp_path):
    creds = Credentials(path=tmp_path / "creds.yaml")
    secrets = {cid: creds.add(cid) for cid in ("site-a", "site-b")}
    creds.save()
    return tmp_path / "creds.yaml", secrets


def test_per_site_credentials_prove_ids_and_let_a_returning_site_take_over_its_half_open_connection(tmp_path):
    path, secrets = _credentials(tmp_path)
    cfg = compose_cfg("run.rounds=1", "run.min_clients=1", "run.clients_per_round=1", "run.num_clients=1",
                      f"server.credentials_file={path}", "server.auth_max_failures=50")

    async def go():
        server = FederationServer(cfg, toy_plugins(), CLASSES, tmp_path / "run", echo=lambda *a: None)
        port = await server.start()
        url = f"http://127.0.0.1:{port}"
        out = {}
        # no credentials, a wrong secret, another site's secret: refused at connect, before any event
        for name, auth in (("none", None), ("wrong", {"client_id": "site-a", "secret": "guess"}),
                           ("borrowed", {"client_id": "site-a", "secret": secrets["site-b"]})):
            peer = Peer(url, "site-a", auth=auth)
            with pytest.raises(socketio.exceptions.ConnectionError):
                await peer.start()
            out[name] = peer.refused
        # site-b's secret cannot wake up as site-a
        thief = Peer(url, "site-a", auth={"client_id": "site-b", "secret": secrets["site-b"]})
        await thief.start()
        await asyncio.sleep(0.5)
        out["thief"] = thief.errors
        # the genuine site-a, then site-a again while the first connection is still open (half-open after a cut)
        first = Peer(url, "site-a", auth={"client_id": "site-a", "secret": secrets["site-a"]})
        await first.start()
        await asyncio.wait_for(server.wait_for_clients(1, 10), 15)
        old_sid = server.clients["site-a"].sid
        second = Peer(url, "site-a", auth={"client_id": "site-a", "secret": secrets["site-a"]})
        await second.start()
        for _ in range(50):
            if server.clients["site-a"].sid not in (None, old_sid) and server.ready_clients() == ["site-a"]:
                break
            await asyncio.sleep(0.1)
        out["taken_over"] = server.clients["site-a"].sid not in (None, old_sid)
        for _ in range(30):
            if not first.sio.connected:
                break
            await asyncio.sleep(0.1)
        out["first_connected"] = first.sio.connected
        out["events"] = [e["event"] for e in read_events(tmp_path / "run" / "events.jsonl")]
        for p in (thief, first, second):
            await p.close()
        await server.stop()
        return out

    out = asyncio.run(go())
    assert "per-site credentials" in out["none"][0]["message"]
    assert out["wrong"][0]["message"] == out["borrowed"][0]["message"] == "unknown client id or wrong secret"
    assert any("not the id this connection authenticated as ('site-b')" in e["reason"] for e in out["thief"])
    assert out["taken_over"] and not out["first_connected"]
    assert "client_takeover" in out["events"] and out["events"].count("connect_refused") == 3


def test_failed_authentications_lock_the_address_out(tmp_path):
    cfg = compose_cfg("run.rounds=1", "server.token=sesame", "server.auth_max_failures=2", "server.auth_lockout_s=30")

    async def go():
        server = FederationServer(cfg, toy_plugins(), CLASSES, tmp_path, echo=lambda *a: None)
        port = await server.start()
        reasons = []
        for token in ("a", "b", "sesame"):
            peer = Peer(f"http://127.0.0.1:{port}", "x", auth={"token": token})
            try:
                await peer.start()
                reasons.append("connected")
                await peer.close()
            except socketio.exceptions.ConnectionError:
                reasons.append(peer.refused[0]["message"])
        await server.stop()
        return reasons

    reasons = asyncio.run(go())
    assert reasons[:2] == ["wrong token", "wrong token"]
    assert reasons[2].startswith("too many failed authentication attempts")


# ---------------------------------------------------------------------- 3. forged connect / disconnect, any argument count


def test_forged_connect_and_disconnect_events_and_extra_arguments_are_refused(tmp_path):
    cfg = compose_cfg("run.rounds=1")

    async def go():
        server = FederationServer(cfg, toy_plugins(), CLASSES, tmp_path, echo=lambda *a: None)
        port = await server.start()
        peer = ScriptedClient(f"http://127.0.0.1:{port}", "site")
        await peer.start()
        await asyncio.wait_for(server.wait_for_clients(1, 10), 15)
        sio = peer.sio
        for name, args in (("connect", ["10.6.6.6"]), ("disconnect", ["transport close"])):
            await sio._send_packet(sio.packet_class(sio_packet.EVENT, namespace="/", data=[name, *args]))
        await sio.emit(P.CLIENT_READY, ({"client_id": "site", "num_train": 1, "num_test": 1}, {"x": 1}))
        await asyncio.sleep(0.5)
        ready = server.ready_clients()
        await peer.close()
        await server.stop()
        return peer.errors, ready

    errors, ready = asyncio.run(go())
    reasons = {e["event"]: e["reason"] for e in errors}
    assert "reserved event name" in reasons["connect"] and "reserved event name" in reasons["disconnect"]
    assert reasons[P.CLIENT_READY] == "client_ready takes one payload object, got 2 arguments"
    assert ready == ["site"]  # not marked gone by the forged disconnect
    events = read_events(tmp_path / "events.jsonl")
    assert not any(e.get("remote") == "10.6.6.6" for e in events)
    assert sum(1 for e in events if e["event"] == "disconnect") <= 1  # only the real one, at the end


# ---------------------------------------------------------------------- 4. the whole message is bounded


def test_a_message_split_into_attachments_past_max_message_mb_is_refused(tmp_path):
    cfg = compose_cfg("run.rounds=1", "server.max_message_mb=5")

    async def go():
        server = FederationServer(cfg, toy_plugins(), CLASSES, tmp_path, echo=lambda *a: None)
        before = {k: v.clone() for k, v in server.global_weights.items()}
        port = await server.start()
        peer = ScriptedClient(f"http://127.0.0.1:{port}", "site")
        await peer.start()
        await asyncio.wait_for(server.wait_for_clients(1, 10), 15)
        # each 4 MiB frame passes the 5 MiB limit; the message (8 MiB) does not
        await peer.sio.emit(P.CLIENT_UPDATE, {"round_number": 1, "ok": True, "weights": b"\0" * (4 * MIB),
                                              "extra": b"\0" * (4 * MIB), "train_size": 1, "train_loss": 0.1})
        for _ in range(50):
            if not peer.sio.connected:
                break
            await asyncio.sleep(0.1)
        closed = not peer.sio.connected
        again = ScriptedClient(f"http://127.0.0.1:{port}", "site-2")
        await again.start()
        await asyncio.wait_for(server.wait_for_clients(1, 10), 15)
        unchanged = all(torch.equal(before[k], v) for k, v in server.global_weights.items())
        await again.close()
        await peer.close()
        await server.stop()
        return closed, unchanged, peer.errors

    closed, unchanged, errors = asyncio.run(go())
    assert closed and unchanged
    assert any("over 5 MiB (server.max_message_mb)" in e["reason"] for e in errors)


# ---------------------------------------------------------------------- 6. idle connections


def test_connections_that_never_wake_up_are_closed_after_handshake_timeout(tmp_path):
    cfg = compose_cfg("run.rounds=1", "server.handshake_timeout_s=1")

    async def go():
        server = FederationServer(cfg, toy_plugins(), CLASSES, tmp_path, echo=lambda *a: None)
        port = await server.start()
        idle = [socketio.AsyncClient(reconnection=False) for _ in range(5)]
        for sio in idle:
            await sio.connect(f"http://127.0.0.1:{port}", transports=["websocket"])
        awake = ScriptedClient(f"http://127.0.0.1:{port}", "site")
        await awake.start()
        await asyncio.sleep(3)
        state = [sio.connected for sio in idle], awake.sio.connected
        for sio in idle:
            await sio.disconnect()
        await awake.close()
        await server.stop()
        return state

    idle, awake = asyncio.run(go())
    assert idle == [False] * 5 and awake


# ---------------------------------------------------------------------- 7. /status


@pytest.mark.parametrize("overrides, header, code", [
    ((), None, 200),  # no credential configured: open (and bound to 127.0.0.1 by default)
    (("server.token=sesame",), None, 401),
    (("server.token=sesame",), "Bearer wrong", 401),
    (("server.token=sesame",), "Bearer sesame", 200),
    (("server.status_token=viewer",), None, 401),
    (("server.status_token=viewer",), "Bearer viewer", 200),
    (("server.token=sesame",), "Basic " + base64.b64encode(b"me:sesame").decode(), 200),
])
def test_status_needs_the_credential_when_one_is_configured(tmp_path, overrides, header, code):
    cfg = compose_cfg("run.rounds=1", *overrides)

    async def go():
        server = FederationServer(cfg, toy_plugins(), CLASSES, tmp_path, echo=lambda *a: None)
        port = await server.start()
        try:
            async with aiohttp.ClientSession() as http:
                headers = {"Authorization": header} if header else {}
                async with http.get(f"http://127.0.0.1:{port}/status", headers=headers) as resp:
                    return resp.status, resp.headers.get("WWW-Authenticate"), await resp.text()
        finally:
            await server.stop()

    status, challenge, body = asyncio.run(go())
    assert status == code
    if code == 401:
        assert challenge and "Basic" in challenge and "Authorization" in body
    else:
        assert "clients" in json.loads(body)


def test_status_with_per_site_credentials_takes_a_sites_secret(tmp_path):
    path, secrets = _credentials(tmp_path)
    cfg = compose_cfg("run.rounds=1", "mode=server", f"server.credentials_file={path}")

    async def go():
        server = FederationServer(cfg, toy_plugins(), CLASSES, tmp_path / "run", echo=lambda *a: None)
        port = await server.start()
        codes = []
        async with aiohttp.ClientSession() as http:
            for user, secret in (("site-a", secrets["site-a"]), ("site-a", secrets["site-b"])):
                header = "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()
                async with http.get(f"http://127.0.0.1:{port}/status", headers={"Authorization": header}) as resp:
                    codes.append(resp.status)
        await server.stop()
        return codes

    assert asyncio.run(go()) == [200, 401]


# ---------------------------------------------------------------------- 8. TLS and mutual TLS, a real federation


class ToyDetector:
    """A four-weight model that trains by adding 0.01: enough for a federation of real FederationClients."""

    @hookimpl
    def fedplug_build_model(self, config, class_names):
        torch.manual_seed(0)
        return nn.Linear(2, 2)

    @hookimpl
    def fedplug_train_round(self, model, dataset, settings, global_weights, state):
        return TrainResult(weights={k: v + 0.01 for k, v in global_weights.items()}, num_examples=len(dataset),
                           train_loss=0.1)

    @hookimpl
    def fedplug_evaluate(self, model, dataset, settings):
        return EvalResult(num_examples=len(dataset), loss=0.1, map50=0.5, recall=0.5,
                          stats=DetectionStats.empty(len(CLASSES)))


def _plugins(server: bool):
    pm, selected = new_manager(), {}
    for role, name in ((("aggregator", "fedavg"),) if server else ()) + (("resource_policy", "always"),):
        info, obj = load_plugin(role, name)
        pm.register(obj, name=f"{role}:{name}")
        selected[role] = info
    pm.register(ToyDetector(), name="detector:toy")
    return ActivePlugins(pm, selected, [])


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from fedplug.testing.certs import make_pki

    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def site_data(tmp_path_factory):
    from fedplug.data import generate_synthetic_federation

    (folder,) = generate_synthetic_federation(tmp_path_factory.mktemp("data"), num_clients=1, train_per_client=2,
                                              test_per_client=1, image_size=64, seed=0)
    return {"format": "voc", "path": str(folder)}


async def _tls_federation(tmp_path, site_data, server_overrides, clients, scheme="https"):
    """A one-round run over ``wss://``; ``clients`` = {id: client TLS context kwargs}; returns statuses and lines."""
    from fedplug import tls

    cfg = compose_cfg("run.rounds=1", f"run.min_clients={min(2, len(clients))}", "run.clients_per_round=1",
                      "run.num_clients=3", "server.ready_timeout_s=15", "server.host=127.0.0.1", *server_overrides)
    server = FederationServer(cfg, _plugins(server=True), CLASSES, tmp_path / "run", echo=lambda *a: None)
    port = await server.start()
    lines, tasks = [], {}
    for cid, kw in clients.items():
        ctx = tls.client_context(**kw) if scheme == "https" else None
        client = FederationClient(f"{scheme}://localhost:{port}", cid, site_data, echo=lines.append,
                                  ssl_context=ctx, client_cert=bool(kw.get("certfile")), reconnect_timeout_s=10,
                                  reconnect_delay_max_s=1)
        client.activate_plugins = lambda *a, **k: _plugins(server=False)
        tasks[cid] = asyncio.ensure_future(client.run())
    try:
        status = await asyncio.wait_for(server.run_federation(), 60)
        codes = {cid: await asyncio.wait_for(t, 30) for cid, t in tasks.items()}
    finally:
        for t in tasks.values():
            t.cancel()
        await server.stop()
    return status, codes, lines, server


def test_a_federation_runs_over_wss(tmp_path, pki, site_data):
    status, codes, lines, server = asyncio.run(_tls_federation(
        tmp_path, site_data, [f"server.ssl_certfile={pki.server_cert}", f"server.ssl_keyfile={pki.server_key}"],
        {"site-a": {"ca_file": pki.ca_cert}, "site-b": {"ca_file": pki.ca_cert}}))
    assert status == 0 and codes == {"site-a": 0, "site-b": 0} and len(server.history) == 1
    assert server.url_scheme == "https"


def test_mutual_tls_admits_certified_sites_and_refuses_one_without_a_valid_certificate(tmp_path, pki, site_data):
    mtls = [f"server.ssl_certfile={pki.server_cert}", f"server.ssl_keyfile={pki.server_key}",
            f"server.ssl_ca_file={pki.ca_cert}", "server.ssl_client_certs=required"]
    status, codes, lines, server = asyncio.run(_tls_federation(tmp_path, site_data, mtls, {
        "site-a": {"ca_file": pki.ca_cert, "certfile": pki.client_cert, "keyfile": pki.client_key},
        "site-b": {"ca_file": pki.ca_cert, "certfile": pki.client_cert, "keyfile": pki.client_key},
        "no-cert": {"ca_file": pki.ca_cert},
        "rogue": {"ca_file": pki.ca_cert, "certfile": pki.rogue_client_cert, "keyfile": pki.rogue_client_key},
    }))
    assert status == 0 and codes["site-a"] == 0 and codes["site-b"] == 0
    assert codes["no-cert"] == 6 and codes["rogue"] == 6
    assert "no-cert" not in server.clients and "rogue" not in server.clients
    said = " ".join(lines)
    assert "[no-cert] cannot connect" in said and "requires a client certificate" in said
    assert "[rogue] cannot connect" in said and "does not accept this client's certificate" in said


def test_wrong_scheme_and_untrusted_certificates_fail_at_once_saying_which(tmp_path, pki, site_data):
    tls_server = [f"server.ssl_certfile={pki.server_cert}", f"server.ssl_keyfile={pki.server_key}",
                  "server.ready_timeout_s=3"]

    async def go():
        return (await _tls_federation(tmp_path / "a", site_data, tls_server, {"http": {}}, scheme="http"),
                await _tls_federation(tmp_path / "b", site_data, tls_server, {"untrusting": {"ca_file": pki.other_ca_cert}}))

    (_, codes_a, lines_a, _), (_, codes_b, lines_b, _) = asyncio.run(go())
    assert codes_a == {"http": 6} and "speaks TLS" in " ".join(lines_a) and "use https://" in " ".join(lines_a)
    assert codes_b == {"untrusting": 6} and "untrusted certificate" in " ".join(lines_b)


def test_tls_settings_are_never_silently_ignored(tmp_path, pki):
    from fedplug.tls import TLSConfigError

    for overrides, reason in (((f"server.ssl_keyfile={pki.server_key}",), "server.ssl_certfile is not"),
                              ((f"server.ssl_certfile={pki.server_cert}", f"server.ssl_keyfile={pki.client_key}"),
                               "does not match")):
        with pytest.raises(TLSConfigError, match=reason):
            FederationServer(compose_cfg("run.rounds=1", *overrides), toy_plugins(), CLASSES, tmp_path,
                             echo=lambda *a: None)


def test_the_dashboard_needs_the_same_credential_as_status(tmp_path):
    cfg = compose_cfg("run.rounds=1", "server.token=sesame", "dashboard.enabled=true")

    async def go():
        server = FederationServer(cfg, toy_plugins(), CLASSES, tmp_path, echo=lambda *a: None)
        port = await server.start()
        codes = []
        try:
            async with aiohttp.ClientSession() as http:
                for header in ({}, {"Authorization": "Bearer sesame"}):
                    async with http.get(f"http://127.0.0.1:{port}/dashboard/state", headers=header) as resp:
                        codes.append(resp.status)
        finally:
            await server.stop()
        return codes

    assert asyncio.run(go()) == [401, 200]


# ---------------------------------------------------------------------- configuration


@pytest.mark.parametrize("overrides, reason", [
    (("mode=server", "server.credentials_file=/x.yaml", "server.token=t"), "not both"),
    (("server.credentials_file=/x.yaml",), "mode=embedded starts its own clients"),
    (("mode=server", "client.secret=a", "client.secret_file=/s"), "client.secret or client.secret_file"),
    (("run.num_clients=5", "run.min_clients=5", "run.clients_per_round=5", "server.max_connections_per_address=3"),
     "below run.num_clients"),
    (("server.ssl_client_certs=maybe",), "server.ssl_client_certs must be one of none, optional, required"),
    (("server.max_client_examples=10000000000",), "protocol's bound"),
    (("server.handshake_timeout_s=0",), "server.handshake_timeout_s must be > 0"),
])
def test_security_settings_are_checked_at_start_up(overrides, reason):
    from fedplug.config import ConfigError, validate

    with pytest.raises(ConfigError, match=reason):
        validate(compose_cfg(*overrides))


def test_a_client_with_bad_tls_or_secret_files_stops_with_the_key_named(tmp_path, capsys):
    from fedplug.app import run_client

    for overrides, said in (
        (("client.server_url=https://127.0.0.1:1", f"client.ca_file={tmp_path / 'none.pem'}"),
         f"config error: client.ca_file={tmp_path / 'none.pem'}: no such file"),
        (("client.server_url=http://127.0.0.1:1", f"client.ca_file={tmp_path / 'none.pem'}"),
         "client.ca_file is set but client.server_url=http://127.0.0.1:1 is not https://"),
        ((f"client.secret_file={tmp_path / 'none.secret'}",), "client.secret_file="),
    ):
        cfg = compose_cfg("mode=client", f"client.data.path={tmp_path}", *overrides)
        assert run_client(cfg) == 2
        assert said in capsys.readouterr().out
