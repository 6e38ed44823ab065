"""The Ray actor that hosts fedplug clients: one :class:`~fedplug.client.FederationClient` at a time.

:class:`fedplug.launchers.ray.RayClientPool` (in the driver, next to the server)
creates these actors with ``ray.remote(ClientActor).options(...)`` and the
resources of ``launcher.client_resources``, then asks each to
:meth:`ClientActor.serve` one client id after another.  The actor runs
fedplug's own client, the very code ``mode=client`` runs: the same Socket.IO
protocol to the server, the same plugin hooks, the client's data opened from
the path in its spec on the node the actor runs on.  Nothing but that spec (a
few strings) and the exit status travels through Ray.

An actor is a slot: when a wave needs its place, the pool calls
:meth:`release` and the client disconnects; the next :meth:`serve` builds a
fresh client for another id in the same process, so a wave costs no new
process and no second ``import torch``.

Failures: when the actor's process dies, Ray restarts it (``max_restarts``)
and, because the pool creates it with ``max_task_retries=-1``, runs the
pending :meth:`serve` again: the client reconnects under the same
``client_id`` and the server re-sends what it still owes (docs/protocol.md).

This module does not import Ray, so it loads (and is tested) without it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping


class ClientActor:
    """A Ray actor body (decorated by the pool): serves one fedplug client at a time."""

    def __init__(self, server_url: str, client_options: Mapping[str, Any], torch_threads: int,
                 log_dir: str | None = None):
        """Called by Ray when the pool creates the actor, and again on every restart.

        ``client_options`` are :class:`~fedplug.client.FederationClient` keyword
        arguments (device, token, timeouts, ...); ``log_dir``, when set, gets
        one ``<client_id>.out`` per client, appended to across waves and restarts.
        """
        import torch

        import fedplug.client  # noqa: F401  (imported once per process, not per client)

        self.server_url = server_url
        self.client_options = dict(client_options)
        self.torch_threads = int(torch_threads)
        self.log_dir = Path(log_dir) if log_dir else None
        self.client = None
        torch.set_num_threads(self.torch_threads)  # fixed, so results do not depend on the node's core count

    def pid(self) -> int:
        """This actor's process id (tests kill it to prove a restart)."""
        return os.getpid()

    async def serve(self, client_id: str, data_spec: Mapping[str, Any]) -> int:
        """Run client ``client_id`` on ``data_spec`` until its run ends or :meth:`release`; its exit status.

        Called by the pool when a round (or an evaluation wave) needs this
        client alive.  Statuses are :class:`~fedplug.client.FederationClient`'s:
        0 the run finished or the client was released, 2 it cannot take part
        (setup failed), 3/4 the server was never reached / was lost.
        """
        from fedplug.client import FederationClient

        log_file, handler = None, None
        if self.log_dir is not None:
            try:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                log_file = open(self.log_dir / f"{client_id}.out", "a", buffering=1)
            except OSError:  # a run directory this node cannot write: the lines still reach Ray's log
                log_file = None
        if log_file is not None:
            handler = logging.StreamHandler(log_file)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logging.getLogger("fedplug").addHandler(handler)

        def echo(text: str = "") -> None:
            print(text, flush=True)
            if log_file is not None:
                log_file.write(text + "\n")

        try:
            restarted = _was_restarted()
            echo(f"[{client_id}] served by Ray actor process {os.getpid()}"
                 + (" (restarted by Ray after the previous one died)" if restarted else ""))
            try:
                client = FederationClient(self.server_url, client_id, dict(data_spec), echo=echo,
                                          **self.client_options)
            except ValueError as exc:
                echo(f"[{client_id}] config error: {exc}")
                return 2
            self.client = client
            echo(f"[{client_id}] connecting to {self.server_url}")
            return await client.run()
        finally:
            self.client = None
            if handler is not None:
                logging.getLogger("fedplug").removeHandler(handler)
            if log_file is not None:
                log_file.close()

    async def release(self) -> bool:
        """Ask the client being served to leave (it disconnects within about a second); False if none is.

        Called by the pool only for a client no open phase waits for, to free
        this slot for another client.
        """
        client = self.client
        if client is None:
            return False
        client.done.set()
        return True


def _was_restarted() -> bool:
    try:
        import ray

        return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # noqa: BLE001 - outside Ray (unit tests), or an older Ray without the flag
        return False
