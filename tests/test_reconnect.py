"""Clients that notice and recover: chunked transfers across cuts, rejoining owing an answer, giving up.

The server runs in-process; clients are the real :class:`FederationClient`
(in-process too, with an in-process toy detector), some reaching the server
through :class:`Relay`, a TCP relay that can freeze — a cut link with no reset:
nothing arrives, sends block once the kernel buffers are full.
"""

import asyncio
import re
import time

import pytest
import torch
from torch import nn

from fedplug import client as client_module
from fedplug import protocol as P
from fedplug.client import FederationClient
from fedplug.hooks import hookimpl
from fedplug.outputs import read_events
from fedplug.server import FederationServer
from fedplug.types import DetectionStats, EvalResult, TrainResult
from scripted import detector_plugins, ScriptedClient, compose_cfg

CLASSES = ("car", "person", "sign")


class SizedToy(nn.Module):
    def __init__(self, num_classes: int, values: int):
        super().__init__()
        self.head = nn.Linear(4, num_classes + 1)
        self.bulk = nn.Parameter(torch.zeros(values))  # makes the model as big as a test needs


class SizedToyDetector:
    """Trains by adding 0.01; ``values`` float32s of bulk set the size on the wire."""

    def __init__(self, values: int = 1000, train_seconds: float = 0.0):
        self.values, self.train_seconds = values, train_seconds

    @hookimpl
    def fedplug_build_model(self, config, class_names):
        torch.manual_seed(0)
        return SizedToy(len(class_names), self.values)

    @hookimpl
    def fedplug_train_round(self, model, dataset, settings, global_weights, state):
        time.sleep(self.train_seconds)
        return TrainResult(weights={k: v + 0.01 for k, v in global_weights.items()},
                           num_examples=len(dataset), train_loss=0.1)

    @hookimpl
    def fedplug_evaluate(self, model, dataset, settings):
        return EvalResult(num_examples=len(dataset), loss=0.1, map50=0.5, recall=0.5,
                          stats=DetectionStats.empty(len(CLASSES)))


class Relay:
    """127.0.0.1 TCP relay to ``port``; :meth:`freeze` stalls every byte both ways without closing anything."""

    def __init__(self, port: int):
        self.port = port
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.listen_port = None
        self._server = None
        self._writers = []

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.listen_port = self._server.sockets[0].getsockname()[1]
        return self.listen_port

    def freeze(self):
        self.flowing.clear()

    def thaw(self):
        self.flowing.set()

    async def _serve(self, reader, writer):
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            writer.close()
            return
        self._writers += [writer, up_writer]

        async def pump(src, dst):
            try:
                while True:
                    await self.flowing.wait()
                    data = await src.read(65536)
                    if not data:
                        break
                    await self.flowing.wait()  # a frozen link holds what it read, too
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    async def close(self):
        self.thaw()
        for w in self._writers:
            w.close()
        if self._server is not None:
            self._server.close()


def _folder(tmp_path):
    from fedplug.data import generate_synthetic_federation

    (folder,) = generate_synthetic_federation(tmp_path / "data", num_clients=1, train_per_client=2,
                                              test_per_client=1, image_size=64, seed=0)
    return folder


async def _federation(tmp_path, detector, clients, *overrides, timeout=90, during=None):
    """Run a server and ``clients`` = {id: kwargs for FederationClient (+ via_relay)}; return what happened."""
    cfg = compose_cfg(*overrides)
    lines = []
    server = FederationServer(cfg, detector_plugins(detector, server=True, name="sized"), CLASSES, tmp_path / "run",
                              echo=lines.append)
    port = await server.start()
    relay = Relay(port)
    relay_port = await relay.start()
    folder = _folder(tmp_path)
    made, tasks, outs = {}, {}, {}
    for cid, kwargs in clients.items():
        kwargs = dict(kwargs)
        target = relay_port if kwargs.pop("via_relay", False) else port
        outs[cid] = []
        made[cid] = FederationClient(f"http://127.0.0.1:{target}", cid, {"format": "voc", "path": str(folder)},
                                     echo=outs[cid].append, **kwargs)
        made[cid].activate_plugins = lambda *a, **k: detector_plugins(detector, name="sized")
        tasks[cid] = asyncio.get_running_loop().create_task(made[cid].run())
    side = asyncio.get_running_loop().create_task(during(server, relay, made, outs)) if during else None
    try:
        status = await asyncio.wait_for(server.run_federation(), timeout)
    finally:
        await server.stop()
        await relay.close()
    codes = {cid: await asyncio.wait_for(t, 30) for cid, t in tasks.items()}
    if side is not None:
        await asyncio.wait_for(side, 30)
    return status, codes, server, outs, lines


def test_v2_chunked_and_v1_inline_clients_train_together(tmp_path):
    detector = SizedToyDetector(values=40_000)  # 160 kB: 40 chunks of 4 KiB
    rows = []

    async def watch(server, relay, made, outs):
        server.events.listeners.append(rows.append)

    status, codes, server, outs, _ = asyncio.run(_federation(
        tmp_path, detector, {"new": {}, "old": {"protocol_version": 1}},
        "run.rounds=2", "run.min_clients=2", "run.clients_per_round=2", "server.chunk_kb=4",
        during=watch))
    assert status == 0 and codes == {"new": 0, "old": 0}
    assert [r.participants for r in server.history] == [("new", "old"), ("new", "old")]
    # both computed the same update from the same global model: FedAvg of the two is that update
    assert torch.allclose(server.global_weights["bulk"], torch.full((40_000,), 0.02))
    progress = [r for r in rows if r.get("event") == "transfer_progress"]
    assert {r["client_id"] for r in progress} == {"new"}  # the v1 client gets weights inline
    ups = [r for r in progress if r["direction"] == "up"]
    assert len(ups) >= 2 * 39 and max(r["bytes_done"] for r in ups) == ups[0]["bytes_total"]
    events = read_events(tmp_path / "run" / "events.jsonl")
    updates = {e["client_id"]: e["bytes"] for e in events if e["event"] == "client_update"}
    assert updates["new"] == updates["old"] > 160_000


def test_v3_v2_and_v1_clients_train_together_and_each_is_spoken_to_in_its_version(tmp_path):
    detector = SizedToyDetector(values=40_000)
    status, codes, server, outs, _ = asyncio.run(_federation(
        tmp_path, detector, {"v3": {}, "v2": {"protocol_version": 2}, "v1": {"protocol_version": 1}},
        "run.rounds=2", "run.min_clients=3", "run.clients_per_round=3", "server.chunk_kb=4"))
    assert status == 0 and codes == {"v3": 0, "v2": 0, "v1": 0}
    assert [r.participants for r in server.history] == [("v1", "v2", "v3")] * 2
    assert {cid: slot.protocol_version for cid, slot in server.clients.items()} == {"v1": 1, "v2": 2, "v3": 3}
    assert torch.allclose(server.global_weights["bulk"], torch.full((40_000,), 0.02))


def test_a_v3_client_speaks_v2_to_a_server_that_lists_only_1_and_2(tmp_path, monkeypatch):
    """An older server refuses protocol 3 and lists what it speaks: the client wakes up again with 2."""
    monkeypatch.setattr(P, "SUPPORTED_VERSIONS", (1, 2))
    detector = SizedToyDetector(values=20_000)
    status, codes, server, outs, _ = asyncio.run(_federation(
        tmp_path, detector, {"site": {}}, "run.rounds=1", "run.min_clients=1", "run.clients_per_round=1",
        "server.chunk_kb=4"))
    assert status == 0 and codes == {"site": 0}
    assert server.clients["site"].protocol_version == 2
    assert any("does not speak protocol version 3; using version 2" in line for line in outs["site"])


def test_an_upload_cut_midway_resumes_from_the_last_acknowledged_chunk(tmp_path):
    detector = SizedToyDetector(values=50_000)
    cut = {"done": False}

    async def cut_once(server, relay, made, outs):
        client = made["site"]
        real_call = client._call

        async def call(event, payload):
            if event == "upload_chunk" and payload["index"] == 20 and not cut["done"]:
                cut["done"] = True
                client._abort_transport()  # the link dies under the upload
            return await real_call(event, payload)

        client._call = call

    status, codes, server, outs, _ = asyncio.run(_federation(
        tmp_path, detector, {"site": {}}, "run.rounds=1", "run.min_clients=1", "run.clients_per_round=1",
        "server.chunk_kb=4", "server.reconnect_grace_s=20", "server.quorum=1.0", during=cut_once))
    assert cut["done"] and status == 0 and codes == {"site": 0}
    assert server.history[0].participants == ("site",)
    events = read_events(tmp_path / "run" / "events.jsonl")
    resumed = [e for e in events if e["event"] == "upload_resumed"]
    assert len(resumed) == 1 and resumed[0]["next_index"] >= 20  # not from chunk 0
    assert sum(e["event"] == "client_wake_up" for e in events) == 2
    assert any("reconnected to the server" in line for line in outs["site"])


def test_a_client_that_rejoins_owing_an_update_is_asked_again_at_once(tmp_path):
    """Killed and restarted (it lost the request): the round does not wait for its deadline."""
    from scripted import toy_plugins

    cfg = compose_cfg("run.rounds=1", "run.min_clients=1", "run.clients_per_round=1", "server.quorum=1.0",
                      "server.update_timeout_s=60", "server.reconnect_grace_s=30")

    async def go():
        server = FederationServer(cfg, toy_plugins(), CLASSES, tmp_path / "run", echo=lambda *a: None)
        port = await server.start()
        client = ScriptedClient(f"http://127.0.0.1:{port}", "site", "forget_once")
        await client.start()
        t0 = time.monotonic()
        try:
            status = await asyncio.wait_for(server.run_federation(), 60)
        finally:
            await client.close()
            await server.stop()
        return status, time.monotonic() - t0, client

    status, seconds, client = asyncio.run(go())
    assert status == 0 and client.received.count("request_update") == 2
    assert seconds < 20  # not the 60 s update deadline
    events = read_events(tmp_path / "run" / "events.jsonl")
    asked = [e for e in events if e["event"] == "request_update"]
    assert len(asked) == 2 and asked[0]["round"] == asked[1]["round"] == 1


def test_a_cut_link_is_noticed_within_the_heartbeat_time_even_while_a_send_is_blocked(tmp_path):
    # a v1 client sends its 24 MB update as one frame into a frozen link: the send blocks on a full buffer
    detector = SizedToyDetector(values=6_000_000, train_seconds=1.5)
    seen = {}

    async def cut_during_upload(server, relay, made, outs):
        client = made["far"]
        while client.jobs.get(("update", 1)) != "working":
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)  # mid-training: the 24 MB frame will go into a dead link
        relay.freeze()
        frozen_at = time.monotonic()
        seen["limit"] = client.heartbeat_limit()
        while not any("no heartbeat" in line for line in outs["far"]) and time.monotonic() - frozen_at < 60:
            await asyncio.sleep(0.1)
        seen["noticed_after"] = time.monotonic() - frozen_at
        relay.thaw()

    status, codes, server, outs, _ = asyncio.run(_federation(
        tmp_path, detector, {"far": {"protocol_version": 1, "via_relay": True}},
        "run.rounds=1", "run.min_clients=1", "run.clients_per_round=1", "server.quorum=1.0",
        "server.ping_interval_s=1", "server.ping_timeout_s=2", "server.reconnect_grace_s=40",
        "server.update_timeout_s=80", "server.eval_timeout_s=60", timeout=150, during=cut_during_upload))
    assert seen["noticed_after"] <= seen["limit"] + 3, seen
    assert status == 0 and codes == {"far": 0}
    assert server.history[0].participants == ("far",)  # it came back and its update counted
    assert any(re.search(r"no heartbeat from the server for \d+s", line) for line in outs["far"])


def test_a_client_whose_server_stays_gone_gives_up_with_one_line_and_status_4(tmp_path):
    cfg = compose_cfg("run.rounds=1", "run.min_clients=1")
    from scripted import toy_plugins

    async def go():
        server = FederationServer(cfg, toy_plugins(), CLASSES, tmp_path / "run", echo=lambda *a: None)
        port = await server.start()
        lines = []
        client = FederationClient(f"http://127.0.0.1:{port}", "site", {"format": "voc", "path": str(_folder(tmp_path))},
                                  echo=lines.append, reconnect_timeout_s=4, reconnect_delay_max_s=1)
        client.activate_plugins = lambda *a, **k: detector_plugins(SizedToyDetector(), name="sized")
        task = asyncio.get_running_loop().create_task(client.run())
        await asyncio.wait_for(server.wait_for_clients(1, 20), 30)
        await server.runner.cleanup()  # the server is gone (its process died): no run_finished
        await server.sio.shutdown()
        t0 = time.monotonic()
        status = await asyncio.wait_for(task, 60)
        return status, time.monotonic() - t0, lines

    status, seconds, lines = asyncio.run(go())
    assert status == 4 and seconds < 20
    give_up = [line for line in lines if "giving up" in line]
    assert len(give_up) == 1 and "client.reconnect_timeout_s=4" in give_up[0]
    assert not any("Traceback" in line or "BadNamespaceError" in line for line in lines)


def test_a_server_that_is_never_reached_ends_the_client_with_status_3(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lines = []
    client = FederationClient(f"http://127.0.0.1:{port}", "site", {"format": "voc", "path": "/nowhere"},
                              echo=lines.append, reconnect_timeout_s=2, reconnect_delay_max_s=0.5)
    assert asyncio.run(asyncio.wait_for(client.run(), 30)) == 3
    assert len(lines) == 1 and "cannot reach the server" in lines[0]
