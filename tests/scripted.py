"""Scripted protocol peers for server tests: Socket.IO clients that answer by a script, not by training.

They let tests drive the real server over real sockets quickly, and misbehave
on purpose (wrong shapes, NaN, duplicates, stale rounds, silence, dying).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import socketio
import torch
from hydra import compose, initialize_config_module
from torch import nn

from fedplug import protocol as P
from fedplug.hooks import hookimpl
from fedplug.plugins import ActivePlugins, load_plugin, new_manager
from fedplug.types import DetectionStats
from fedplug.wire import decode_state, encode_state


class ToyDetector(nn.Module):
    """Big enough to have parameters, a BatchNorm and its integer buffer."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, num_classes + 1)


class ToyDetectorPlugin:
    @hookimpl
    def fedplug_build_model(self, config, class_names):
        torch.manual_seed(0)
        return ToyDetector(len(class_names))


class RecordingObserver:
    def __init__(self):
        self.calls: list[str] = []

    @hookimpl
    def fedplug_run_start(self, config, run_dir):
        self.calls.append("run_start")

    @hookimpl
    def fedplug_client_joined(self, client_id, info):
        self.calls.append("client_joined")

    @hookimpl
    def fedplug_client_left(self, client_id, reason):
        self.calls.append("client_left")

    @hookimpl
    def fedplug_round_start(self, round_number, client_ids):
        self.calls.append("round_start")

    @hookimpl
    def fedplug_round_end(self, record, global_weights, previous_weights):
        self.calls.append("round_end")

    @hookimpl
    def fedplug_run_end(self, rounds, best_round, reason):
        self.calls.append("run_end")


def toy_plugins(aggregator: str = "fedavg", policy: str = "always", observer=None) -> ActivePlugins:
    pm = new_manager()
    selected = {}
    for role, name in (("aggregator", aggregator), ("resource_policy", policy)):
        info, obj = load_plugin(role, name)
        pm.register(obj, name=f"{role}:{name}")
        selected[role] = info
    pm.register(ToyDetectorPlugin(), name="detector:toy")
    if observer is not None:
        pm.register(observer, name="observer:recording")
    return ActivePlugins(pm, selected, [])


def detector_plugins(detector, server: bool = False, name: str = "toy") -> ActivePlugins:
    """The plugins of one side of an in-process federation around the detector object ``detector``.

    The server side also gets FedAvg; both get the ``always`` resource policy.
    """
    pm = new_manager()
    selected = {}
    roles = (("aggregator", "fedavg"), ("resource_policy", "always")) if server else (("resource_policy", "always"),)
    for role, plugin in roles:
        info, obj = load_plugin(role, plugin)
        pm.register(obj, name=f"{role}:{plugin}")
        selected[role] = info
    pm.register(detector, name=f"detector:{name}")
    return ActivePlugins(pm, selected, [])


import os
EXTRA = [f"hydra.searchpath=[file://{os.environ['TCONF']}]"] if os.environ.get("TCONF") else []


def compose_cfg(*overrides: str):
    with initialize_config_module(config_module="fedplug.conf", version_base=None):
        return compose(config_name="config", overrides=[
            *EXTRA, "server.port=0", "resource_policy=always", "server.reconnect_grace_s=1",
            "server.ready_timeout_s=20", "server.update_timeout_s=10", "server.eval_timeout_s=10",
            *overrides])


class ScriptedClient:
    """A protocol peer.  ``behaviour`` says how it answers ``request_update``."""

    def __init__(self, url: str, client_id: str, behaviour: str = "good", delta: float = 1.0,
                 train_size: int = 10, num_classes: int = 3):
        self.url, self.client_id, self.behaviour = url, client_id, behaviour
        self.delta, self.train_size, self.num_classes = delta, train_size, num_classes
        self.sio = socketio.AsyncClient(reconnection=False)
        self.errors: list[dict] = []
        self.received: list[str] = []
        self.finished = asyncio.Event()
        self.reconnected = False
        sio = self.sio

        @sio.event
        async def connect():
            await sio.emit(P.CLIENT_WAKE_UP, {"client_id": client_id, "protocol_version": 1})

        @sio.on(P.INIT)
        async def init(data):
            self.received.append(P.INIT)
            await sio.emit(P.CLIENT_READY, {"client_id": client_id, "num_train": train_size, "num_test": 4})

        @sio.on(P.CHECK_CLIENT_RESOURCE)
        async def check(data):
            self.received.append(P.CHECK_CLIENT_RESOURCE)
            load = 0.95 if self.behaviour == "busy" else 0.1
            await sio.emit(P.CHECK_CLIENT_RESOURCE_DONE, {"round_number": data["round_number"], "load_rate": load})

        @sio.on(P.REQUEST_UPDATE)
        async def request_update(data):
            self.received.append(P.REQUEST_UPDATE)
            asyncio.get_running_loop().create_task(self._answer_update(data))

        @sio.on(P.STOP_AND_EVAL)
        async def stop_and_eval(data):
            self.received.append(P.STOP_AND_EVAL)
            if self.behaviour == "die_at_last_eval" and data["STOP"]:
                await sio.disconnect()
                return
            stats = DetectionStats.empty(self.num_classes)
            stats.scores[0] = [0.9, 0.2]
            stats.true_positive[0] = [True, False]
            stats.num_ground_truth[0] = 1
            payload = {"round_number": data["round_number"], "ok": True, "test_size": 4, "test_loss": 1.0,
                       "test_map": 1.0, "test_recall": 1.0, "stats": stats.to_json()}
            if self.behaviour == "bad_eval":
                payload["test_map"] = 7.0
            await sio.emit(P.CLIENT_EVAL, payload)

        @sio.on(P.RUN_FINISHED)
        async def run_finished(data):
            self.received.append(P.RUN_FINISHED)
            self.finished.set()

        @sio.on(P.PROTOCOL_ERROR)
        async def protocol_error(data):
            self.errors.append(data)

    def make_weights(self, global_state: dict) -> dict:
        out = {}
        for k, v in global_state.items():
            out[k] = v + self.delta if v.is_floating_point() else v + 1
        return out

    async def _answer_update(self, data: dict) -> None:
        rnd = data["round_number"]
        state = decode_state(data["weights"])
        b = self.behaviour
        if b == "silent":
            return
        if b == "die":
            await self.sio.disconnect()
            return
        if b == "forget_once" and not self.reconnected:
            # killed and restarted mid-round: back with the same client_id, the request lost with it
            self.reconnected = True
            await self.sio.disconnect()
            await self.sio.connect(self.url, transports=["websocket"])
            return
        if b == "reconnect" and not self.reconnected:
            # drop the connection mid-round, come back with the same client_id, then answer
            self.reconnected = True
            await self.sio.disconnect()
            await self.sio.connect(self.url, transports=["websocket"])
        if b == "fail":
            await self.sio.emit(P.CLIENT_UPDATE, {"round_number": rnd, "ok": False, "train_size": 0,
                                                  "train_loss": 0.0, "reason": "non-finite loss nan"})
            return
        weights = self.make_weights(state)
        if b == "wrong_shape":
            weights["head.weight"] = torch.zeros(2, 2)
        elif b == "nan":
            weights["conv.weight"][0, 0, 0, 0] = float("nan")
        elif b == "missing":
            weights.pop("bn.running_var")
        elif b == "wrong_dtype":
            weights["conv.weight"] = weights["conv.weight"].double()
        elif b == "garbage":
            await self.sio.emit(P.CLIENT_UPDATE, {"round_number": rnd, "ok": True, "weights": b"\x00garbage",
                                                  "train_size": 5, "train_loss": 0.1})
            return
        msg = {"round_number": rnd, "ok": True, "weights": encode_state(weights),
               "train_size": self.train_size, "train_loss": 0.5}
        if b == "stale":
            msg["round_number"] = rnd + 7
        await self.sio.emit(P.CLIENT_UPDATE, msg)
        if b == "duplicate":
            await self.sio.emit(P.CLIENT_UPDATE, msg)

    async def start(self) -> None:
        await self.sio.connect(self.url, transports=["websocket"])

    async def close(self) -> None:
        if self.sio.connected:
            await self.sio.disconnect()


async def run_scripted_federation(cfg, run_dir: Path, behaviours: dict[str, str], plugins=None,
                                  timeout: float = 60.0, **client_kwargs):
    """Start the real server in-process, connect scripted clients, run; return (status, server, clients)."""
    from fedplug.server import FederationServer

    plugins = plugins or toy_plugins()
    server = FederationServer(cfg, plugins, ("car", "person", "sign"), run_dir, echo=lambda *a: None)
    port = await server.start()
    clients = {cid: ScriptedClient(f"http://127.0.0.1:{port}", cid, b, **client_kwargs.get(cid, {}))
               for cid, b in behaviours.items()}
    try:
        for c in clients.values():
            await c.start()
        status = await asyncio.wait_for(server.run_federation(), timeout)
    finally:
        for c in clients.values():
            await c.close()
        await server.stop()
    return status, server, clients
