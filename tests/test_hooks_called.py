"""Every hook in fedplug/hooks.py is called by the core during one real round.

The server and two real clients (tiny Faster R-CNN, synthetic data) run in
this process over real sockets; pluggy's call monitoring records which hooks
the core called on each side.
"""

import asyncio
import inspect

import pytest

from fedplug import client as client_module
from fedplug import update_filter as update_filter_module
from fedplug import hooks
from fedplug.client import FederationClient
from fedplug.plugins import activate
from fedplug.server import FederationServer
from scripted import RecordingObserver, compose_cfg

pytestmark = pytest.mark.slow

ALL_HOOKS = {name for name, fn in inspect.getmembers(hooks, inspect.isfunction) if name.startswith("fedplug_")}


def _monitor(active, called):
    active.pm.add_hookcall_monitoring(lambda name, impls, kwargs: called.add(name), lambda *a: None)
    return active


def test_every_hook_is_called_in_a_real_round(tmp_path, monkeypatch):
    import torch

    from fedplug.data import generate_synthetic_federation

    torch.set_num_threads(1)
    folders = generate_synthetic_federation(tmp_path / "data", num_clients=2, train_per_client=6,
                                            test_per_client=3, image_size=128, seed=3)
    called: set[str] = set()
    real_activate = client_module.activate
    monkeypatch.setattr(client_module, "activate", lambda *a, **k: _monitor(real_activate(*a, **k), called))
    # the update filter the aggregator asks for is loaded by fedplug.update_filter, on the client
    monkeypatch.setattr(update_filter_module, "activate", lambda *a, **k: _monitor(real_activate(*a, **k), called))
    # the codec (server and clients) is loaded by fedplug.codecs.open_codec through fedplug.plugins.activate
    import fedplug.plugins as plugins_module

    monkeypatch.setattr(plugins_module, "activate", lambda *a, **k: _monitor(real_activate(*a, **k), called))

    cfg = compose_cfg("run.rounds=1", "run.min_clients=2", "run.clients_per_round=2", "run.num_clients=2",
                      "resource_policy=cpu_load", "server.resource_max_attempts=1", "train.local_epochs=1",
                      "server.update_timeout_s=300", "server.eval_timeout_s=300",
                      # a DP aggregator with client-side clipping: its round settings make the clients
                      # call the dp_clip update filter, and the server asks it for its privacy mechanism
                      "aggregator=dp_fedavg", "aggregator.clipping=client", "aggregator.noise_multiplier=0",
                      "codec=fp16")  # a codec that encodes: its two hooks run on every update
    server_plugins = activate({"aggregator": "dp_fedavg", "detector": "frcnn", "resource_policy": "cpu_load"},
                              observers=False)
    observer = RecordingObserver()  # observer hooks are called one plugin at a time (see FederationServer._notify)
    server_plugins.pm.register(observer, name="observer:recording")
    _monitor(server_plugins, called)

    async def go():
        server = FederationServer(cfg, server_plugins, ("car", "person", "sign"), tmp_path / "run",
                                  echo=lambda *a: None)
        port = await server.start()
        clients = [FederationClient(f"http://127.0.0.1:{port}", f"c{i}", {"format": "voc", "path": str(f)},
                                    echo=lambda *a: None) for i, f in enumerate(folders)]
        tasks = [asyncio.get_running_loop().create_task(c.run()) for c in clients]
        try:
            status = await asyncio.wait_for(server.run_federation(), 400)
        finally:
            await server.stop()
        codes = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        return status, codes, server

    status, codes, server = asyncio.run(go())
    assert status == 0 and codes == [0, 0] and len(server.history) == 1
    called |= {f"fedplug_{name}" for name in observer.calls}
    assert called == ALL_HOOKS, f"never called: {sorted(ALL_HOOKS - called)}"
