"""Fault injection under secure aggregation: SIGKILL a client while it trains, after the key exchange.

Separate processes (``mode=server`` and four ``mode=client``), the tiny Faster
R-CNN, ``secagg.enabled=true``.  The restarted client holds no keys for the
round's session: asked for its update again, it answers ``ok: false``, the
server stops waiting for it at once, and the round completes from the other
clients' masked inputs, its pair masks removed with the others' shares of its
mask key — long before any deadline (300 s here).  (The key, share and unmask
exchanges take a fraction of a second, too short to aim a kill at from outside;
tests/test_secagg_federation.py drops clients in them deterministically.)
"""

import json
import subprocess
import sys

import pytest

from fedplug.outputs import read_events
from test_faults_clients import DEADLINES, GRACE, TINY, _client, kill_and_restart
from test_federation_e2e import _env, _free_port

pytestmark = [pytest.mark.slow, pytest.mark.faults]

def test_a_client_killed_while_training_in_a_secure_round_does_not_stall_or_spoil_it(tmp_path):
    from fedplug.data.synthetic import generate_synthetic_federation

    folders = generate_synthetic_federation(tmp_path / "data", num_clients=4, train_per_client=4,
                                            test_per_client=2, image_size=96, seed=4)
    port, env = _free_port(), _env(tmp_path)
    run_dir = tmp_path / "server"
    server = subprocess.Popen(
        [sys.executable, "-m", "fedplug", "mode=server", f"server.port={port}", "run.rounds=1",
         "run.min_clients=4", "run.clients_per_round=4", "resource_policy=always", "server.quorum=0.75",
         "secagg.enabled=true", "secagg.timeout_s=300", "eval.clients=all", *DEADLINES, *TINY,
         f"hydra.run.dir={run_dir}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    clients = {f"site{i}": _client(f"site{i}", port, folders[i], tmp_path, env) for i in range(4)}
    events_file = run_dir / "events.jsonl"
    # at once: it is fetching the global model in 4 KiB chunks (server.chunk_kb=4), well before its upload
    out, restarted, restarted_out, killed_at = kill_and_restart(server, clients, "site3", "request_update",
                                                                folders[3], port, tmp_path, env, server_timeout=500)
    assert server.returncode == 0, out
    assert restarted.returncode == 0, restarted_out
    history = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round_number"] for r in history] == [1]
    assert history[0]["participants"] == ["site0", "site1", "site2"]  # the others' masked inputs, unmasked
    events = read_events(events_file)
    failed = [e for e in events if e["event"] == "update_failed" and e["client_id"] == "site3"]
    assert failed and "holds no keys" in failed[0]["reason"]  # asked again, it said at once that it cannot
    unmasked = [e for e in events if e["event"] == "secagg_unmasked" and e["round"] == 1]
    assert len(unmasked) == 1  # the round's sum was unmasked once, from the survivors' shares
    round1_end = max(e["time"] for e in events if e["round"] == 1 and e["event"] in ("client_eval", "client_update"))
    assert round1_end - killed_at < GRACE + 60, f"round 1 stalled {round1_end - killed_at:.0f}s after the kill"
    wake_ups = [e for e in events if e["event"] == "client_wake_up" and e["client_id"] == "site3"]
    assert len(wake_ups) == 2
