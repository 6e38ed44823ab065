"""The server SIGKILLed mid-round and resumed into the same directory, its clients still running.

A real federation of separate processes (``mode=server`` and two ``mode=client``,
the tiny Faster R-CNN on a few synthetic images): the server dies inside its
checkpoint writes (``FEDPLUG_FAULT_POINT=commit:<step>@2``: exact) or at a random
instant of round 2 (SIGKILL from here), an operator restarts it with
``run.resume=<its run dir>`` on the same port, and the clients, which kept
reconnecting, rejoin it.  Every case must end with the configured round count,
loadable checkpoints, and metrics.csv / events.jsonl naming each round once.

The per-step resumability of every kill point is checked cheaply, without
federations, in tests/test_commit_round.py.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from fedplug.commit import find_resume_point
from fedplug.outputs import read_events
from fedplug.wire import read_checkpoint

pytestmark = [pytest.mark.faults, pytest.mark.slow]

ROUNDS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A fedplug process whose output is collected in a thread (so a full pipe never blocks it)."""

    def __init__(self, args: list[str], cwd, env: dict):
        self.popen = subprocess.Popen([sys.executable, "-m", "fedplug", *args], cwd=cwd, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.lines):
                return
            if self.popen.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"no line with {text!r} within {timeout}s; output:\n{self.output}")

    def wait(self, timeout: float) -> int:
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout}s; output:\n{self.output}") from None
        self._reader.join(10)
        return code

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from fedplug.data.synthetic import generate_synthetic_federation

    return generate_synthetic_federation(tmp_path_factory.mktemp("data"), num_clients=2, train_per_client=6,
                                         test_per_client=3, image_size=128, seed=3)


def _federation_kill_and_resume(tmp_path, folders, fault: str | None = None,
                                kill_at: tuple[str, float] | None = None):
    """Run until the server dies, then resume it.

    It dies at its own fault point ``fault``, or by our SIGKILL ``kill_at[1]``
    seconds after it logs event ``kill_at[0]`` of round 2.

    Returns (the resumed server's output, the round it said it resumed after).
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1", TORCH_HOME=str(tmp_path / "hub"), OMP_NUM_THREADS="1")
    env.pop("FEDPLUG_FAULT_POINT", None)
    port = _free_port()
    run_dir = tmp_path / "server"
    server_args = ["mode=server", f"server.port={port}", f"run.rounds={ROUNDS}", "run.min_clients=2",
                   "run.clients_per_round=2", "resource_policy=always", "train.local_epochs=1",
                   "server.ready_timeout_s=120", "server.update_timeout_s=120", "server.eval_timeout_s=120",
                   "server.reconnect_grace_s=5", "ui.live=false", f"hydra.run.dir={run_dir}"]
    first_env = dict(env, FEDPLUG_FAULT_POINT=fault) if fault else env
    procs: list[Proc] = []
    try:
        server = Proc(server_args, tmp_path, first_env)
        procs.append(server)
        clients = [Proc(["mode=client", f"client.server_url=http://127.0.0.1:{port}", f"client.client_id=site{i}",
                         f"client.data.path={folder}", "client.torch_threads=1", "client.reconnect_timeout_s=240",
                         "client.reconnect_delay_max_s=2", f"hydra.run.dir={tmp_path / f'site{i}'}"],
                        tmp_path, env) for i, folder in enumerate(folders)]
        procs += clients
        if kill_at is not None:
            _wait_for_event(run_dir / "events.jsonl", kill_at[0], 2, server, 300)
            time.sleep(kill_at[1])
            server.popen.send_signal(signal.SIGKILL)
        code = server.wait(300)
        assert code == -signal.SIGKILL, f"the server was not killed ({code}):\n{server.output}"
        assert all(c.popen.poll() is None for c in clients), "a client gave up on the killed server"
        resumed = Proc([*server_args, f"run.resume={run_dir}"], tmp_path, env)
        procs.append(resumed)
        assert resumed.wait(300) == 0, resumed.output
        for client in clients:
            assert client.wait(120) == 0, client.output
    finally:
        for p in procs:
            p.kill()
    said = [line for line in resumed.lines if line.startswith("resuming from")]
    assert len(said) == 1, resumed.output
    return resumed.output, int(said[0].rsplit(" ", 1)[1])


def _wait_for_event(path, event: str, round_number: int, server: Proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.popen.poll() is None:
        if path.exists() and any(e["event"] == event and e["round"] == round_number for e in read_events(path)):
            return
        time.sleep(0.01)
    raise AssertionError(f"the server logged no {event} of round {round_number}:\n{server.output}")


def _check_run(run_dir) -> None:
    csv_rounds = [int(line.split(",")[0]) for line in (run_dir / "metrics.csv").read_text().splitlines()[1:]]
    assert csv_rounds == list(range(1, ROUNDS + 1))
    jsonl = [json.loads(x)["round_number"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert jsonl == list(range(1, ROUNDS + 1))
    events = read_events(run_dir / "events.jsonl")
    assert [e["round"] for e in events if e["event"] == "round_committed"] == list(range(1, ROUNDS + 1))
    assert sum(1 for e in events if e["event"] == "resumed") == 1
    for name in ("last", "best"):
        weights, meta = read_checkpoint(run_dir / "checkpoints" / f"{name}.safetensors")
        assert weights and 1 <= json.loads(meta["round"]) <= ROUNDS
    assert json.loads(read_checkpoint(run_dir / "checkpoints" / "last.safetensors")[1]["round"]) == ROUNDS
    point = find_resume_point(run_dir)
    assert point.round == ROUNDS and [r.round_number for r in point.history] == list(range(1, ROUNDS + 1))


@pytest.mark.parametrize("step, after", [
    ("model.partial", 1),       # half of round 2's model file written
    ("manifest.renamed", 2),    # round 2 committed, its metrics row and round_committed line not yet written
])
def test_server_killed_inside_its_checkpoint_writes_resumes_with_its_clients(tmp_path, folders, step, after):
    output, resumed_after = _federation_kill_and_resume(tmp_path, folders, fault=f"commit:{step}@2")
    assert resumed_after == after, output
    _check_run(tmp_path / "server")


def test_server_killed_at_a_random_instant_of_round_2_resumes_with_its_clients(tmp_path, folders):
    # a random instant inside round 2: shortly after a random one of its protocol steps (training,
    # uploading, evaluating or committing); the seed is in every failure message, to replay it
    seed = int(os.environ.get("FEDPLUG_FAULT_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    kill_at = (rng.choice(["request_update", "client_update", "stop_and_eval", "client_eval"]), rng.uniform(0, 0.2))
    try:
        output, resumed_after = _federation_kill_and_resume(tmp_path, folders, kill_at=kill_at)
        assert resumed_after in (1, 2), output
        _check_run(tmp_path / "server")
    except AssertionError as exc:
        raise AssertionError(f"FEDPLUG_FAULT_SEED={seed} (kill {kill_at[1]:.3f}s after {kill_at[0]}): {exc}") from exc
