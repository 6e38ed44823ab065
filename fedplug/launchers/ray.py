"""``launcher=ray``: the server in this process (the Ray driver), each client a Ray actor, in waves.

``fedplug.app.run_server`` (``mode=embedded launcher=ray``) creates a
:class:`RayClients` once the server listens, awaits :meth:`RayClients.start`
(joins or starts the cluster, sizes it, gives the server its
:class:`RayClientPool`), runs the federation, and awaits
:meth:`RayClients.stop` in its ``finally``.

The pool implements :class:`fedplug.pool.ClientPool`: it holds at most
:attr:`RayClientPool.capacity` actors (:class:`~fedplug.launchers.ray_actor.ClientActor`,
each with ``launcher.client_resources``), and has them serve the client ids
the server's rounds select.  When every client fits, all of them are served
from the start and stay, exactly like ``launcher=local``; otherwise a round's
selected clients are brought up and idle ones released (least recently used
first), and an evaluation phase is visited in waves.

Ray is optional (``pip install 'fedplug[ray]'``): :func:`ray_missing` says how
to install it, and nothing here imports it before :meth:`RayClients.start`.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from fedplug.collect import PhaseCollector

INSTALL_HINT = ("launcher=ray needs Ray, which is not installed here: pip install 'fedplug[ray]' "
                "(or use launcher=local)")


# launcher.client_resources keys are ray.remote()'s argument names; ray.cluster_resources() names them so
RAY_RESOURCE_NAMES = {"num_cpus": "CPU", "num_gpus": "GPU", "memory": "memory"}


class LaunchError(RuntimeError):
    """The clients cannot be started as asked (no cluster at that address, a cluster too small, ...)."""


def ray_missing() -> str | None:
    """One line saying how to install Ray when it is missing, else None.  Called by the app at start-up."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return INSTALL_HINT
    return None


def capacity_of(cluster: Mapping[str, float], per_client: Mapping[str, float], limit: int | None,
                num_clients: int) -> int:
    """How many client actors ``cluster``'s resources hold at once, at most ``limit`` and ``num_clients``.

    ``per_client`` is ``launcher.client_resources``; a resource it asks 0 of
    does not count.  0 means not even one client fits.
    """
    fits = num_clients
    for name, share in per_client.items():
        share = float(share)
        if share > 0:
            # a tiny epsilon: 2 CPUs hold 8 clients of 0.25 even after float rounding
            held = float(cluster.get(RAY_RESOURCE_NAMES.get(name, name), 0.0))
            fits = min(fits, int(math.floor(held / share + 1e-9)))
    if limit is not None:
        fits = min(fits, int(limit))
    return max(0, fits)


@dataclass
class _Slot:
    """One actor and the client it serves now (``None``: idle)."""

    handle: Any
    client_id: str | None = None
    task: asyncio.Task | None = None  # awaits the actor's serve() of client_id
    last_used: float = field(default_factory=time.monotonic)
    killed: bool = False  # ended by the pool (a release that hung, or the run's end), not by a failure


class RayClientPool:
    """:class:`fedplug.pool.ClientPool` over Ray actors; built by :class:`RayClients`, used by the server."""

    def __init__(self, make_actor: Callable[[], Any], specs: Mapping[str, Mapping[str, Any]], capacity: int,
                 ready: Callable[[], Sequence[str]], echo: Callable[[str], None] = print,
                 log_dir: Path | None = None, min_clients: int = 1, abort: Callable[[str], None] | None = None):
        """``make_actor()`` creates one actor; ``specs`` maps client id to its data spec;
        ``ready()`` gives the ids ready at the server now; ``abort(reason)`` (the server's) stops
        its wait for the first clients when fewer than ``min_clients`` can still be started."""
        self._make_actor = make_actor
        self.log_dir = Path(log_dir) if log_dir else None
        self.min_clients = int(min_clients)
        self._abort = abort
        # until the first round asks for clients: a first-wave client that fails is replaced by the next one
        self.warming = True
        self._started_ids: set[str] = set()
        self.specs = {cid: dict(spec) for cid, spec in sorted(specs.items())}
        self._capacity = int(capacity)
        self._ready = ready
        self.echo = echo
        self.slots: list[_Slot] = []
        self.failed: dict[str, str] = {}  # client id -> why it cannot be served again
        self.statuses: dict[str, int] = {}  # client id -> last exit status of its serve()
        self.starts = 0  # how many times a client was started (waves make this larger than the number of clients)

    # ------------------------------------------------------------------ ClientPool

    def client_ids(self) -> list[str]:
        return [cid for cid in self.specs if cid not in self.failed]

    @property
    def capacity(self) -> int:
        return self._capacity

    def alive(self) -> list[str]:
        """The ids being served now (connected, or on their way)."""
        return sorted(s.client_id for s in self.slots if s.client_id is not None)

    async def ensure_ready(self, client_ids: Sequence[str], timeout: float) -> list[str]:
        self.warming = False
        wanted = [cid for cid in client_ids if cid not in self.failed]
        keep = set(wanted)
        started = 0
        for cid in wanted:
            if self._slot_of(cid) is None:
                await self._start(cid, keep)
                started += 1
        if started:
            self.echo(f"  started {started} client(s) on Ray for this round "
                      f"({len(self.alive())} alive, capacity {self.capacity})")
        deadline = time.monotonic() + timeout
        while True:
            ready = set(self._ready())
            waiting = [cid for cid in wanted if cid not in ready and self._slot_of(cid) is not None]
            if not waiting or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.1)
        now = time.monotonic()
        for cid in wanted:
            slot = self._slot_of(cid)
            if slot is not None:
                slot.last_used = now
        late = [cid for cid in wanted if cid not in ready]
        if late:
            self.echo(f"  {len(late)} selected client(s) did not become ready within {timeout:g}s: "
                      f"{', '.join(late[:10])}{' ...' if len(late) > 10 else ''}")
        return [cid for cid in client_ids if cid in ready]

    async def visit(self, client_ids: Sequence[str], collector: PhaseCollector, timeout: float) -> None:
        self.warming = False

        def settled(cid: str) -> bool:
            return cid in collector.answers or cid in collector.given_up

        alive = set(self.alive())
        todo = [cid for cid in client_ids if cid in alive] + [cid for cid in client_ids if cid not in alive]
        asked: dict[str, float] = {}  # client id -> when it was asked (started, or found alive)
        waves = 0
        while not collector.complete:
            now = time.monotonic()
            owing = [cid for cid in asked if not settled(cid)]
            for cid in owing:  # past its deadline, or its client ended without answering: not waited for
                if now - asked[cid] > timeout or cid in self.failed or self._slot_of(cid) is None:
                    collector.give_up(cid)
            owing = [cid for cid in owing if not settled(cid)]
            started = False
            while todo and len(owing) < self.capacity:
                cid = todo.pop(0)
                if settled(cid) or cid in self.failed:
                    if cid in self.failed:
                        collector.give_up(cid)
                    continue
                if self._slot_of(cid) is None:
                    await self._start(cid, keep=set(owing) | {cid})
                    started = True
                asked[cid] = time.monotonic()
                owing.append(cid)
            waves += started
            if not todo and not owing:
                break
            await collector.wait(0.2)
        if waves:
            self.echo(f"  evaluated {len(client_ids)} client(s) on Ray, at most {self.capacity} alive at once")

    # ------------------------------------------------------------------ slots

    def _slot_of(self, client_id: str) -> _Slot | None:
        return next((s for s in self.slots if s.client_id == client_id), None)

    async def _start(self, client_id: str, keep: set[str]) -> None:
        """Serve ``client_id`` on a free slot, a new one while under capacity, or the least recently used idle one."""
        slot = next((s for s in self.slots if s.client_id is None), None)
        if slot is None and len(self.slots) < self.capacity:
            slot = _Slot(self._make_actor())
            self.slots.append(slot)
        if slot is None:
            idle = [s for s in self.slots if s.client_id not in keep]
            if not idle:
                raise RuntimeError(f"no Ray actor is free for client {client_id}: all {len(self.slots)} serve "
                                   "clients this phase needs")  # callers never ask more than capacity at once
            slot = min(idle, key=lambda s: s.last_used)
            await self._release(slot)
            if slot not in self.slots:  # it had to be killed: a fresh actor takes its place
                slot = _Slot(self._make_actor())
                self.slots.append(slot)
        slot.client_id, slot.last_used = client_id, time.monotonic()
        self._started_ids.add(client_id)
        ref = slot.handle.serve.remote(client_id, self.specs[client_id])
        slot.task = asyncio.get_running_loop().create_task(self._watch(slot, client_id, ref))
        self.starts += 1

    async def _watch(self, slot: _Slot, client_id: str, ref: Any) -> None:
        """Wait for a serve() to end; free its slot, and remember a client that cannot be served again."""
        import ray

        try:
            status = int(await ref)
        except ray.exceptions.RayActorError as exc:  # died more than max_restarts times (or was killed)
            if slot in self.slots:
                self.slots.remove(slot)
            if not slot.killed:
                self.failed[client_id] = f"its Ray actor died for good: {str(exc).splitlines()[0]}"
                self.statuses[client_id] = 1
                self.echo(f"  client {client_id}: {self.failed[client_id]}")
                await self._lost(client_id)
            return
        except Exception as exc:  # noqa: BLE001 - an error inside serve(): the client cannot run
            status = 1
            self.failed[client_id] = f"{type(exc).__name__}: {str(exc).splitlines()[-1] if str(exc) else ''}"
            self.echo(f"  client {client_id} failed on Ray: {self.failed[client_id]}")
        else:
            if status != 0:
                self.failed[client_id] = f"exited with status {status}"
                self.echo(f"  client {client_id} exited with status {status} (see its log)")
        self.statuses[client_id] = status
        if slot.client_id == client_id:
            slot.client_id, slot.task = None, None
        if client_id in self.failed:
            await self._lost(client_id)

    async def _lost(self, client_id: str) -> None:
        """A client that cannot be served again: show why, and before round 1 refill the first wave or give up."""
        tail = self._log_tail(client_id)
        if tail:
            self.echo("    " + tail.replace("\n", "\n    "))
        if not self.warming:
            return  # as with local processes: the rounds go on with the clients that are left
        left = self.client_ids()
        if len(left) < self.min_clients:
            if self._abort is not None:
                self._abort(f"only {len(left)} of the {len(self.specs)} clients can still be started on Ray, "
                            f"run.min_clients={self.min_clients}: {len(self.failed)} failed ({client_id}: "
                            f"{self.failed[client_id]}; the clients' logs say why)")
            return
        following = next((cid for cid in left if cid not in self._started_ids), None)
        if following is not None:
            await self._start(following, keep=set())

    def _log_tail(self, client_id: str, lines: int = 1) -> str:  # the client says why in its last line
        if self.log_dir is None:
            return ""
        try:
            text = (self.log_dir / f"{client_id}.out").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    async def _release(self, slot: _Slot, grace: float = 30.0) -> None:
        """Have the slot's client leave and wait for it; kill the actor if it does not within ``grace`` s."""
        import ray

        task = slot.task
        if slot.client_id is None or task is None:
            return
        try:
            await asyncio.wait_for(slot.handle.release.remote(), grace)
            await asyncio.wait_for(asyncio.shield(task), grace)
        except (asyncio.TimeoutError, ray.exceptions.RayError):
            slot.killed = True  # a kill is not a failure of the client
            ray.kill(slot.handle, no_restart=True)
            if slot in self.slots:
                self.slots.remove(slot)
            slot.client_id = None

    async def close(self, grace: float = 20.0) -> None:
        """Release every client and end every actor.  Called once, by :meth:`RayClients.stop`."""
        import ray

        await asyncio.gather(*(self._release(s, grace) for s in list(self.slots)), return_exceptions=True)
        for slot in list(self.slots):
            slot.killed = True
            try:
                ray.kill(slot.handle, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.slots.clear()


class RayClients:
    """The ``launcher=ray`` side of a run: the cluster, the actors' options, and the pool."""

    def __init__(self, cfg: Any, client_specs: Mapping[str, Mapping[str, Any]], run_dir: Path, echo=print,
                 augment: Mapping | None = None):
        """Called by the app after :func:`fedplug.data.prepare_federation`: ``client_specs`` maps each client
        id to its data spec (paths every node must be able to read, never the data itself)."""
        self.cfg = cfg
        self.node = cfg.launcher
        self.specs = dict(client_specs)
        self.run_dir = Path(run_dir)
        self.echo = echo
        self.augment = dict(augment) if augment else None
        self.pool: RayClientPool | None = None
        self._started_cluster = False

    def _plain(self, node: Any) -> Any:
        from omegaconf import OmegaConf

        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node

    def _init_ray(self) -> None:
        import ray

        address = self.node.get("address")
        if ray.is_initialized():  # e.g. a notebook that called ray.init() itself
            return
        try:
            if address:
                ray.init(address=str(address), log_to_driver=bool(self.node.log_to_driver),
                         logging_level="WARNING")
            else:
                mb = int(self.node.object_store_mb)
                # address="local": a new cluster of our own even when another runs on this machine
                ray.init(address="local", num_cpus=self.node.get("num_cpus"), num_gpus=self.node.get("num_gpus"),
                         include_dashboard=bool(self.node.include_dashboard),
                         object_store_memory=mb * 1024 * 1024, log_to_driver=bool(self.node.log_to_driver),
                         logging_level="WARNING")
                self._started_cluster = True
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"the Ray cluster at launcher.address={address}" if address else "a local Ray cluster"
            raise LaunchError(f"cannot start or join {where}: {str(exc).splitlines()[0]}") from None

    def _server_url(self, url: str) -> str:
        """The URL the actors dial: ``launcher.server_address``, or this node's IP for a 0.0.0.0 server."""
        import ray

        scheme, rest = url.split("://", 1)
        port = rest.rsplit(":", 1)[1]
        host = self.node.get("server_address")
        if not host:
            host = str(self.cfg.server.host)
            if host in ("0.0.0.0", "::", ""):
                host = ray.util.get_node_ip_address()
            elif host in ("127.0.0.1", "localhost") and len([n for n in ray.nodes() if n.get("Alive")]) > 1:
                self.echo("warning: the Ray cluster has several nodes but the server listens on "
                          f"{host}: actors on other nodes cannot reach it; set server.host=0.0.0.0")
        return f"{scheme}://{host}:{port}"

    def _client_options(self) -> dict[str, Any]:
        """The FederationClient keyword arguments every actor gets, from ``client.*`` as mode=client reads them."""
        c = self.cfg.client
        return {
            "device": str(c.device), "token": self.cfg.server.token, "augment": self.augment,
            "reconnect_attempts": int(c.reconnect_attempts), "max_message_mb": float(self.cfg.server.max_message_mb),
            "reconnect_timeout_s": float(c.reconnect_timeout_s),
            "reconnect_delay_max_s": float(c.reconnect_delay_max_s), "call_timeout_s": float(c.call_timeout_s),
            "protocol_version": int(c.protocol_version),
        }

    async def start(self, server: Any, url: str) -> RayClientPool:
        """Join or start the cluster, size it, create the pool and hand it to ``server`` (``pool_of_clients``).

        Raises :class:`LaunchError` when the cluster cannot hold one client, or
        fewer than ``run.clients_per_round`` at once (a round's clients must all
        be alive together).
        """
        import ray

        from fedplug.launchers.ray_actor import ClientActor

        self._init_ray()
        resources = {str(k): float(v) for k, v in self._plain(self.node.client_resources).items()}
        cluster = ray.cluster_resources()
        limit = self.node.get("max_alive")
        per_address = self.cfg.server.get("max_connections_per_address")
        if per_address is not None and (limit is None or int(per_address) < int(limit)):
            # a node's actors share its address, and the server refuses more connections from one address
            limit = int(per_address)
        capacity = capacity_of(cluster, resources, limit, len(self.specs))
        per_round = int(self.cfg.run.clients_per_round)
        shares = ", ".join(f"{k}={v:g}" for k, v in resources.items())
        held = ", ".join(f"{k}={cluster.get(RAY_RESOURCE_NAMES.get(k, k), 0):g}" for k in resources)
        if capacity < 1:
            raise LaunchError(f"the Ray cluster ({held}) cannot hold one client of launcher.client_resources "
                              f"({shares}); lower them or add nodes")
        if capacity < min(per_round, len(self.specs)):
            raise LaunchError(
                f"a round's {per_round} clients (run.clients_per_round) must be alive at once, but the Ray "
                f"cluster ({held}) holds {capacity} of launcher.client_resources ({shares})"
                + (f" within launcher.max_alive / server.max_connections_per_address ({limit})"
                   if limit is not None and limit < len(self.specs) else "")
                + "; lower run.clients_per_round or the per-client resources, or add nodes")
        threads = int(self.cfg.client.torch_threads) or max(1, int(resources.get("num_cpus", 1)))
        server_url = self._server_url(url)
        log_dir = str(self.run_dir / "clients") if bool(self.node.get("client_logs", True)) else None
        actor_cls = ray.remote(ClientActor)
        options = {
            "num_cpus": resources.get("num_cpus", 0.0), "num_gpus": resources.get("num_gpus", 0.0),
            "resources": {k: v for k, v in resources.items() if k not in ("num_cpus", "num_gpus", "memory")} or None,
            "max_restarts": int(self.node.max_restarts), "max_task_retries": -1,
            "max_concurrency": 8,  # serve() runs for the whole client; release() and pid() must get in beside it
        }
        if "memory" in resources:
            options["memory"] = resources["memory"]
        client_options = self._client_options()

        def make_actor():
            return actor_cls.options(**options).remote(server_url, client_options, threads, log_dir)

        self.pool = RayClientPool(make_actor, self.specs, capacity, server.ready_clients, self.echo,
                                  log_dir=Path(log_dir) if log_dir else None,
                                  min_clients=int(self.cfg.run.min_clients), abort=server.abort)
        server.pool_of_clients = self.pool
        waves = capacity < len(self.specs)
        self.echo(f"Ray: {len(self.specs)} clients as actors ({shares} each) on a cluster with {held}: "
                  + (f"at most {capacity} alive at once, started in waves" if waves else "all alive at once")
                  + (f"; client logs in {log_dir}" if log_dir else ""))
        # the first wave now (every client when they all fit, as launcher=local would): the server waits
        # for them before round 1, so a round's time is the round's, not the actors' start-up
        for cid in self.pool.client_ids()[:capacity]:
            await self.pool._start(cid, keep=set())
        return self.pool

    async def stop(self) -> dict[str, int]:
        """Release every client, end the actors (and the local cluster this run started); the failed clients' statuses.

        Called by the app once the federation has ended, in its ``finally``.
        """
        failed: dict[str, int] = {}
        if self.pool is not None:
            try:
                await self.pool.close()
            finally:
                failed = {cid: self.pool.statuses.get(cid, 1) or 1 for cid in self.pool.failed}
        if self._started_cluster:
            import ray

            ray.shutdown()
        return failed
