"""mode=server and mode=client on two "hosts": Linux network namespaces joined by a veth pair.

The server listens on 0.0.0.0 inside one namespace; two clients in another
namespace reach it only through the veth link at 10.77.0.1 — not through a
shared loopback — as clients on other machines would.
"""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

from netns import CLIENT_IP, SERVER_IP
from netns import two_hosts as hosts


@pytest.fixture
def two_hosts():
    with hosts() as pair:
        yield pair


def test_server_and_clients_on_separate_hosts(tmp_path, two_hosts):
    from fedplug.data.synthetic import generate_synthetic_federation

    srv, cli = two_hosts
    folders = generate_synthetic_federation(tmp_path / "data", num_clients=2, train_per_client=8,
                                            test_per_client=4, image_size=128, seed=2)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TORCH_HOME=str(tmp_path / "hub"))
    run_dir = tmp_path / "server"
    server = subprocess.Popen(
        ["ip", "netns", "exec", srv, sys.executable, "-m", "fedplug", "mode=server", "server.host=0.0.0.0",
         "server.port=5055", "run.rounds=2", "run.min_clients=2", "run.clients_per_round=2",
         "resource_policy=always", "train.local_epochs=1", "server.ready_timeout_s=120",
         f"hydra.run.dir={run_dir}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    clients = [
        subprocess.Popen(
            ["ip", "netns", "exec", cli, sys.executable, "-m", "fedplug", "mode=client",
             f"client.server_url=http://{SERVER_IP}:5055", f"client.client_id=remote{i}",
             f"client.data.path={folder}", "client.torch_threads=1", f"hydra.run.dir={tmp_path / f'c{i}'}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
        for i, folder in enumerate(folders)]
    try:
        out, _ = server.communicate(timeout=400)
        client_out = [c.communicate(timeout=60)[0] for c in clients]
    finally:
        for p in [server, *clients]:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert server.returncode == 0, out
    assert all(c.returncode == 0 for c in clients), client_out
    history = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round_number"] for r in history] == [1, 2]
    assert all(sorted(r["participants"]) == ["remote0", "remote1"] for r in history)
    # the clients could only have come over the veth link: every connection's peer is the client host
    from fedplug.outputs import read_events

    connects = [e for e in read_events(run_dir / "events.jsonl") if e["event"] == "connect"]
    assert len(connects) >= 2 and {e["remote"] for e in connects} == {CLIENT_IP}
