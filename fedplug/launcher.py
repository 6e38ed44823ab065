"""The embedded federation: this process serves, N client processes train.

``python -m fedplug`` (mode=embedded) starts the server on 127.0.0.1 at a free
port, then starts each client as its own ``python -m fedplug mode=client ...``
process — the very program a remote site runs — so the embedded default
exercises the real protocol over real sockets.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence


def hydra_literal(value: Any) -> str:
    """Render a value as a Hydra override literal (dicts, lists, strings, numbers)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{hydra_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_literal(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def client_command(server_url: str, client_id: str, spec: Mapping[str, Any], run_dir: Path,
                   torch_threads: int, augment: Mapping | None, device: str, token: str | None,
                   passthrough: Sequence[str] = ()) -> list[str]:
    args = [
        sys.executable, "-m", "fedplug", "mode=client",
        f"client.server_url={server_url}",
        f"client.client_id={client_id}",
        # one ++key=value each: a dataset spec may carry keys the default client.data lacks
        *(f"++client.data.{key}={hydra_literal(value)}" for key, value in spec.items()),
        f"client.augment={hydra_literal(dict(augment) if augment else None)}",
        f"client.torch_threads={torch_threads}",
        f"client.device={device}",
        f"client.parent_pid={os.getpid()}",  # the client stops when this server process is gone
        f"hydra.run.dir={hydra_literal(str(run_dir / 'clients' / client_id))}",
    ]
    if token:
        args.append(f"client.token={hydra_literal(str(token))}")
    args.extend(passthrough)  # e.g. the parent's hydra.searchpath, so clients compose the same groups
    return args


class ClientProcesses:
    """The local client processes of an embedded run; always stopped on exit."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: list = []

    def start(self, commands: Mapping[str, Sequence[str]], log_dir: Path) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        for cid, cmd in commands.items():
            log = open(log_dir / f"{cid}.out", "w")
            self.logs.append(log)
            self.procs[cid] = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, env=env)

    def exited_with_error(self) -> dict[str, int]:
        """Client processes that already ended with a non-zero status."""
        return {cid: p.returncode for cid, p in self.procs.items() if p.poll() not in (None, 0)}

    def alive(self) -> int:
        return sum(1 for p in self.procs.values() if p.poll() is None)

    def log_tail(self, client_id: str, log_dir: Path, lines: int = 15) -> str:
        try:
            text = (log_dir / f"{client_id}.out").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def stop(self, grace: float = 20.0) -> dict[str, int | None]:
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self.logs:
            log.close()
        return {cid: p.returncode for cid, p in self.procs.items()}
