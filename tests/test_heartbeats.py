"""Heavy work never blocks the event loops: heartbeats flow while a client trains.

With a 1 s ping timeout, a client whose training took 4 s on its event loop
would be dropped by the server; fedplug trains in a worker thread, so the
connection survives and the update counts.
"""

import asyncio
import time

import torch

from fedplug import client as client_module
from fedplug.client import FederationClient
from fedplug.hooks import hookimpl
from fedplug.outputs import read_events
from fedplug.plugins import ActivePlugins, load_plugin, new_manager
from fedplug.server import FederationServer
from fedplug.types import DetectionStats, EvalResult, TrainResult
from scripted import ToyDetector, compose_cfg, toy_plugins

TRAIN_SECONDS = 4.0


class SlowToyDetector:
    @hookimpl
    def fedplug_build_model(self, config, class_names):
        torch.manual_seed(0)
        return ToyDetector(len(class_names))

    @hookimpl
    def fedplug_train_round(self, model, dataset, settings, global_weights, state):
        time.sleep(TRAIN_SECONDS)  # a long local epoch
        return TrainResult(weights={k: v.clone() for k, v in model.state_dict().items()},
                           num_examples=len(dataset), train_loss=0.1)

    @hookimpl
    def fedplug_evaluate(self, model, dataset, settings):
        return EvalResult(num_examples=len(dataset), loss=0.1, map50=0.5, recall=0.5,
                          stats=DetectionStats.empty(3))


def _client_plugins(*args, **kwargs):
    pm = new_manager()
    info, policy = load_plugin("resource_policy", "always")
    pm.register(policy, name="resource_policy:always")
    pm.register(SlowToyDetector(), name="detector:slow")
    return ActivePlugins(pm, {"resource_policy": info}, [])


def test_heartbeats_flow_while_a_client_trains(tmp_path, monkeypatch):
    from fedplug.data import generate_synthetic_federation

    (folder,) = generate_synthetic_federation(tmp_path / "data", num_clients=1, train_per_client=2,
                                              test_per_client=1, image_size=64, seed=0)
    monkeypatch.setattr(client_module, "activate", _client_plugins)
    cfg = compose_cfg("run.rounds=2", "run.min_clients=1", "run.clients_per_round=1", "run.num_clients=1",
                      "server.ping_interval_s=0.5", "server.ping_timeout_s=1")

    async def go():
        server = FederationServer(cfg, toy_plugins(), ("car", "person", "sign"), tmp_path / "run",
                                  echo=lambda *a: None)
        port = await server.start()
        client = FederationClient(f"http://127.0.0.1:{port}", "slow", {"format": "voc", "path": str(folder)},
                                  echo=lambda *a: None)
        task = asyncio.get_running_loop().create_task(client.run())
        try:
            status = await asyncio.wait_for(server.run_federation(), 60)
        finally:
            await server.stop()
        return status, await asyncio.wait_for(task, 30), server

    status, client_status, server = asyncio.run(go())
    assert status == 0 and client_status == 0
    assert [r.participants for r in server.history] == [("slow",), ("slow",)]
    events = read_events(tmp_path / "run" / "events.jsonl")
    wake_ups = [e for e in events if e["event"] == "client_wake_up"]
    assert len(wake_ups) == 1  # never dropped and reconnected during the 2 x 4 s of training
