"""The federation server: python-socketio ``AsyncServer`` on aiohttp, driving the rounds.

One coroutine, :meth:`FederationServer.run_federation`, walks the protocol in
the original's order for every round::

    check_client_resource -> check_client_resource_done -> (resource policy decides)
    request_update -> client_update (streamed into the aggregation hook)
    stop_and_eval -> client_eval -> exact global metrics, checkpoints, next round or stop

Event handlers only validate messages and hand them to the phase collector
of the current round; everything heavy (decoding and checking weights,
aggregation, serialisation, checkpoint writes) runs in a thread pool so the
event loop keeps answering heartbeats.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import socketio
import torch
from aiohttp import web

from fedplug import protocol as P
from fedplug import schemas as S
from fedplug import tls
from fedplug.allocator import return_freed_memory_promptly
from fedplug.codecs import open_codec
from fedplug.collect import PhaseCollector, UpdateStream
from fedplug.evaluation import HeldOutEvaluator, eval_settings_from, resolve_place, round_metrics, safe_call
from fedplug.outputs import EventLog, RunOutputs, format_table, load_resume_point
from fedplug.plugins import ActivePlugins
from fedplug.security import (AuthFailed, Authenticator, ConnectionCounter, Credentials, FailedAttemptLimiter,
                              Identity, loose_permissions)
from fedplug.secagg.protocol import SecAggError
from fedplug.secagg.run import SecureRound, masked_size_bound
from fedplug.socket_guard import EdgeLimits, GuardedServer
from fedplug.transfer import DEFAULT_CHUNK_BYTES, Downloads, TransferError, Uploads
from fedplug.server_hooks import PluginFailed, call, dry_run, is_decision, is_round_settings, model_checker
from fedplug.types import ClientUpdate, DetectionStats, EmptyRoundError, ResourceReport, RoundRecord
from fedplug.wire import (SafetensorsLayout, WireError, check_against_spec, decode_checked, encode_state,
                          open_checked, spec_of)

log = logging.getLogger("fedplug.server")


class RunFailed(RuntimeError):
    """The run cannot go on (e.g. a round missed its quorum after every retry)."""


@dataclass
class ClientSlot:
    client_id: str
    sid: str | None
    ready: bool = False
    num_train: int = 0
    num_test: int = 0
    info: dict = field(default_factory=dict)
    disconnected_at: float | None = None
    protocol_version: int = P.PROTOCOL_VERSION
    declared_sid: str | None = None  # the connection that declared num_train / num_test (once per connection)


def _plain(cfg: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def _authenticator(server_cfg: Any) -> Authenticator:
    """Who may connect, from ``server.credentials_file`` / ``server.token`` (fedplug.security)."""
    path = server_cfg.get("credentials_file")
    credentials = Credentials.load(Path(str(path)).expanduser()) if path else None
    if credentials is not None and loose_permissions(credentials.path):
        log.warning("credentials file %s is readable by other users; chmod 600 it", credentials.path)
    lockout = float(server_cfg.get("auth_lockout_s", 60))
    limiter = FailedAttemptLimiter(max_failures=int(server_cfg.get("auth_max_failures", 5)),
                                   window_s=max(lockout, 1.0), lockout_s=lockout)
    return Authenticator(credentials, server_cfg.get("token"), limiter)


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _layout_of(state: Mapping[str, torch.Tensor], downloads: Downloads) -> tuple[SafetensorsLayout, list[bytes]]:
    """A broadcast of ``state`` and its chunk digests: chunks are read from its tensors (worker thread:
    hashing takes ~0.1 s per 158 MiB)."""
    layout = SafetensorsLayout(state)
    return layout, downloads.digests(layout)


def _encoded_size_bound(state: Mapping[str, torch.Tensor]) -> int:
    """The most bytes a well-formed safetensors file of this model can take: its tensors plus a header."""
    raw = sum(t.numel() * t.element_size() for t in state.values())
    return raw + 64 * 1024 + 512 * len(state)


class FederationServer:
    """Runs one federated training run.  Create, :meth:`start`, then :meth:`run_federation`."""

    def __init__(self, cfg: Any, plugins: ActivePlugins, class_names: tuple[str, ...], run_dir: Path,
                 echo=print, held_out: Any = None, held_out_source: str = "", clients_have_test: bool = True):
        """``held_out`` is a test dataset the server scores itself (``eval.on=server|both``);
        ``clients_have_test`` is False when the data's test set is shared, not split among clients."""
        return_freed_memory_promptly()  # a model-sized accumulator each round must not stay in the heap
        self.cfg = cfg
        self.run_cfg = cfg.run
        self.server_cfg = cfg.server
        self.plugins = plugins
        self.hook = plugins.hook
        self.class_names = tuple(class_names)
        self.run_dir = Path(run_dir)
        self.echo = echo
        self.outputs = RunOutputs(self.run_dir)
        self.events = EventLog(self.run_dir / "events.jsonl")
        self.max_bytes = int(float(self.server_cfg.max_message_mb) * 1024 * 1024)
        # who may connect (per-site secrets, a shared token, or anyone) and over what (TLS or plain HTTP)
        self.authenticator = _authenticator(self.server_cfg)
        self.ssl_context = tls.server_context_from(self.server_cfg)
        self.url_scheme = "https" if self.ssl_context is not None else "http"
        self.identities: dict[str, Identity] = {}  # sid -> what its connect's auth proved
        self.auth_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedplug-auth")
        self.max_client_examples = int(self.server_cfg.get("max_client_examples", S.MAX_EXAMPLES))
        self.max_clients = int(self.server_cfg.get("max_clients", 1000))
        # the Socket.IO edge: whole-message bounds, undecodable packets, reserved names, handshake deadline,
        # connections per address (fedplug/socket_guard.py); WebSocket only (no long-polling bodies to parse)
        self.sio = GuardedServer(
            async_mode="aiohttp",
            limits=EdgeLimits(max_message_bytes=self.max_bytes,
                              handshake_timeout_s=float(self.server_cfg.get("handshake_timeout_s", 30))),
            connections=ConnectionCounter(int(self.server_cfg.get("max_connections_per_address", 64)),
                                          int(self.server_cfg.get("max_connections", 1024))),
            reject=self._reject,
            is_admitted=lambda sid: sid in self.sid_to_client,
            server_events=P.SERVER_EVENTS,
            transports=["websocket"],
            max_http_buffer_size=self.max_bytes,
            ping_interval=float(self.server_cfg.ping_interval_s),
            ping_timeout=float(self.server_cfg.ping_timeout_s),
            logger=False,
            engineio_logger=False,
        )
        self.app = web.Application(client_max_size=self.max_bytes)
        self.sio.attach(self.app)
        self.app.router.add_get("/status", self._http_status)
        dashboard = cfg.get("dashboard")
        if dashboard is not None and bool(dashboard.get("enabled", False)):
            from fedplug.dashboard import attach  # routes on this server's own port, fed by self.events.listeners

            attach(self)
        self.runner: web.AppRunner | None = None
        self.port: int | None = None
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="fedplug-server")
        # uploaded chunks are hashed and written here, not on the event loop: hashlib and pwrite release
        # the GIL, so the loop reads the next chunks (of every client) meanwhile
        self.chunk_pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="fedplug-chunks")
        self._decode_slot = asyncio.Semaphore(1)

        self.clients: dict[str, ClientSlot] = {}
        self.sid_to_client: dict[str, str] = {}
        self.collectors: dict[str, PhaseCollector] = {}  # the open phase per answer event
        self.closed_collectors: dict[str, PhaseCollector] = {}  # the last closed one, for precise rejections
        self.stream: UpdateStream | None = None
        self.phase = "starting"
        self.round_number = 0
        self.history: list[RoundRecord] = []
        self.best: dict[str, Any] = {"round": None, "map50": None, "test_loss": None}
        self.aggregator_state: dict = {}
        self._ready_changed = asyncio.Event()
        self._finished = False
        self._abort_reason: str | None = None
        self._stop_sent = False  # the last stop_and_eval went out: clients' disconnects are expected
        self.rng = random.Random(int(self.run_cfg.seed))
        # a launcher that starts clients on demand, in waves, sets this (fedplug/pool.py); None: clients come by themselves
        self.pool_of_clients = None

        self.model_cfg = _plain(cfg.model)
        self.aggregator_cfg = _plain(cfg.aggregator)
        self.policy_cfg = _plain(cfg.resource_policy)
        try:
            model = self.hook.fedplug_build_model(config=self.model_cfg, class_names=self.class_names)
        except Exception as exc:  # e.g. pretrained weights asked for but not on this machine
            raise RunFailed(f"detector {self.model_cfg.get('name')!r} could not be built: {exc}") from None
        if model is None:
            raise RunFailed(f"detector {self.model_cfg.get('name')!r} built no model")
        self.global_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.spec = spec_of(self.global_weights)
        # how client updates travel (codec=<name>, announced in init); a bad codec.* value stops the run here
        self.codec = open_codec(cfg.get("codec"))
        self.num_parameters = sum(p.numel() for p in model.parameters())
        self.round_start_weights = self.global_weights
        # protocol v2 transfers: the round's broadcasts, and each client's upload in progress
        self.chunk_bytes = int(float(self.server_cfg.get("chunk_kb", DEFAULT_CHUNK_BYTES // 1024)) * 1024)
        self.downloads = Downloads(self.chunk_bytes)
        # uploads spill to files under the run directory: server memory stays flat in the number of clients
        # secure aggregation (secagg.enabled): the open round's SecAgg+ session, None between rounds or when off
        self.secagg_cfg = dict(_plain(cfg.get("secagg") or {}))
        self.secure: SecureRound | None = None
        upload_bound = _encoded_size_bound(self.global_weights)
        if self.secagg_cfg.get("enabled"):
            upload_bound = max(upload_bound, masked_size_bound(self.global_weights))
        self.uploads = Uploads(self.chunk_bytes, max_bytes=upload_bound, spill_dir=self.run_dir / ".uploads")
        # answer event -> (request event, payload or cid -> payload) of the open phase, re-sent to a client that
        # rejoins owing it
        self.phase_requests: dict[str, tuple[str, Any]] = {}
        self.eval_place = resolve_place(str(cfg.eval.get("on", "auto")), held_out is not None, clients_have_test)
        self.held_out: HeldOutEvaluator | None = None
        if held_out is not None and self.eval_place in ("server", "both"):
            from fedplug.client import resolve_device

            settings = eval_settings_from(_plain(cfg.eval), resolve_device(str(cfg.eval.get("device", "cpu"))))
            try:
                self.held_out = HeldOutEvaluator(self.hook, self.model_cfg, self.class_names, held_out, settings,
                                                 held_out_source, str(self.model_cfg.get("name")))
            except Exception as exc:
                raise RunFailed(f"the server's evaluation on {held_out_source} cannot start: {exc}") from None
        self.start_round = 1
        if self.run_cfg.resume:
            self._resume(Path(str(self.run_cfg.resume)))
        try:  # deterministic plugin defects stop the run here, not after a round of client training
            dry_run(plugins, self.global_weights, self.spec, self.aggregator_cfg, self.policy_cfg,
                    int(self.run_cfg.clients_per_round), self.aggregator_state)
        except PluginFailed as exc:
            raise RunFailed(f"start-up check of the plugins failed: {exc}") from None
        try:  # epsilon per round and the privacy.max_epsilon stop (fedplug/privacy/ledger.py)
            from fedplug.privacy.ledger import PrivacyLedger

            self.privacy = PrivacyLedger(_plain(cfg.get("privacy")), plugins, self.aggregator_cfg, self.history,
                                         self.start_round, int(self.run_cfg.rounds))
        except (ValueError, PluginFailed, RuntimeError) as exc:
            raise RunFailed(f"privacy: {exc}") from None
        self._register_handlers()

    # ------------------------------------------------------------------ lifecycle

    def _resume(self, previous: Path) -> None:
        """Continue ``previous``'s last committed round (fedplug.commit); a run that saved none starts afresh."""
        from fedplug.commit import find_resume_point
        from fedplug.outputs import missing_commit_events

        point = find_resume_point(previous)
        if point is not None:
            check_against_spec(point.weights, self.spec)
        self.outputs.adopt(point)  # last/best and the metrics files as the committed round has them
        if point is None:
            self.echo(f"run.resume={previous}: that run stopped before it saved its first round; starting at round 1")
            self.events.write("resumed", "local", 0, None, source=str(previous))
            return
        self.global_weights = point.weights
        self.aggregator_state = point.aggregator_state
        self.history = point.history
        self.best = point.best or self.best
        self.start_round = point.round + 1
        for rnd in missing_commit_events(self.events.path, self.history):  # killed between commit and log line
            self.events.write("round_committed", "local", rnd, None, recovered=True)
        self.events.write("resumed", "local", point.round, None, source=str(previous))
        self.echo(f"resuming from {previous} after round {point.round}")

    async def start(self) -> int:
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        host = str(self.server_cfg.host)
        site = web.TCPSite(self.runner, host, int(self.server_cfg.port), ssl_context=self.ssl_context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # the real port when port=0
        if not _is_loopback(host):
            if not self.authenticator.required:
                self.echo(f"warning: server.host={host} accepts other hosts and no credential is set: anyone who "
                          "reaches this port can join as any client id. Set server.credentials_file (see "
                          "`fedplug credentials add`) or server.token (docs/security.md)")
            if self.ssl_context is None:
                self.echo(f"warning: server.host={host} without TLS: weights and credentials cross the network in "
                          "clear. Set server.ssl_certfile and server.ssl_keyfile (docs/security.md)")
        return self.port

    async def stop(self) -> None:
        self._finished = True
        for sid in list(self.sid_to_client):
            try:
                await self.sio.disconnect(sid)
            except Exception:  # already gone
                pass
        if self.runner is not None:
            await self.runner.cleanup()
        self.events.close()
        self.pool.shutdown(wait=True)
        self.chunk_pool.shutdown(wait=True)
        self.auth_pool.shutdown(wait=False, cancel_futures=True)

    async def _offload(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # ------------------------------------------------------------------ messaging

    async def _emit(self, event: str, client_id: str, payload: dict) -> bool:
        """Send ``payload`` to one client; a ``weights`` :class:`~fedplug.transfer.Blob` goes inline (v1) or as a ref (v2)."""
        slot = self.clients.get(client_id)
        if slot is None or slot.sid is None:
            return False
        blob = payload.get("weights")
        if blob is not None and not isinstance(blob, (bytes, bytearray)):
            payload = dict(payload)
            if slot.protocol_version >= 2:
                del payload["weights"]
                payload["weights_ref"] = blob.ref(slot.protocol_version)
            else:
                payload["weights"] = blob.data
        flags = {"STOP": payload["STOP"]} if "STOP" in payload else {}
        self.events.write(event, "out", payload.get("round_number"), client_id, **flags)
        try:
            await self.sio.emit(event, payload, to=slot.sid)
            return True
        except Exception as exc:
            log.warning("could not send %s to %s: %s", event, client_id, exc)
            return False

    async def _reject(self, sid: str, event: str, reason: str, client_id: str | None = None,
                      round_number: int | None = None) -> None:
        log.warning("rejected %s from %s: %s", event, client_id or sid, reason)
        self.events.write(P.PROTOCOL_ERROR, "out", round_number, client_id, about=event, reason=reason)
        try:
            await self.sio.emit(P.PROTOCOL_ERROR, {"event": event, "reason": reason}, to=sid)
        except Exception:
            pass

    def _client_of(self, sid: str) -> str | None:
        return self.sid_to_client.get(sid)

    def _register_handlers(self) -> None:
        sio = self.sio

        @sio.event
        async def connect(sid, environ, auth=None):
            # engine.io's aiohttp driver fills REMOTE_ADDR with a constant; the request knows the peer
            request = environ.get("aiohttp.request")
            remote = getattr(request, "remote", None) or environ.get("REMOTE_ADDR")
            self.events.write("connect", "in", None, None, sid=sid, remote=remote)
            try:  # before any event of this socket is handled: python-socketio holds them until we return
                self.identities[sid] = await self._authenticate(auth, remote)
            except AuthFailed as exc:
                log.warning("refused a connection from %s: %s", remote, exc.reason)
                self.events.write("connect_refused", "in", None, None, sid=sid, remote=remote, reason=exc.reason)
                raise socketio.exceptions.ConnectionRefusedError(exc.reason) from None

        @sio.event
        async def disconnect(sid, *args):
            self.identities.pop(sid, None)
            cid = self.sid_to_client.pop(sid, None)
            self.events.write("disconnect", "in", self.round_number or None, cid, sid=sid)
            if cid is None:
                return
            slot = self.clients.get(cid)
            if slot is not None and slot.sid == sid:
                slot.sid = None
                slot.ready = False
                slot.disconnected_at = time.monotonic()
                self._ready_changed.set()
                self._notify("fedplug_client_left", client_id=cid, reason="disconnected")
                if not self._finished:
                    if not self._stop_sent:  # after STOP, clients leave once they answered: no news
                        self.echo(f"  client {cid} disconnected")
                    asyncio.get_running_loop().create_task(self._give_up_later(cid, sid))

        # each answer event goes to its validating handler; a message without a payload reaches it as None
        for event, handler in ((P.CLIENT_WAKE_UP, self._on_wake_up), (P.CLIENT_READY, self._on_ready),
                               (P.CHECK_CLIENT_RESOURCE_DONE, self._on_resource_done),
                               (P.CLIENT_UPDATE, self._on_update), (P.CLIENT_EVAL, self._on_eval),
                               (P.BEGIN_UPLOAD, self._on_begin_upload), (P.UPLOAD_CHUNK, self._on_upload_chunk),
                               (P.FETCH_CHUNK, self._on_fetch_chunk),
                               *((e, self._secagg_handler(e)) for e in P.SECAGG_CLIENT_EVENTS)):
            sio.on(event, self._one_payload(event, handler))

        @sio.on("*")
        async def unknown(event, sid, *args):  # event names are bounded by the GuardedServer
            await self._reject(sid, str(event), f"unknown event {event!r}", self._client_of(sid))

    def _one_payload(self, event: str, handler):
        """The handler for ``event`` taking any argument count: more than one payload is refused, not a TypeError."""
        async def guarded(sid, *args):
            if len(args) > 1:
                reason = f"{event} takes one payload object, got {len(args)} arguments"
                if event in P.TRANSFER_EVENTS:  # acknowledged: the refusal is the acknowledgement
                    return {"ok": False, "reason": reason}
                return await self._reject(sid, event, reason, self._client_of(sid))
            return await handler(sid, args[0] if args else None)

        return guarded

    async def _authenticate(self, auth: Any, remote: Any) -> Identity:
        """What a connection's ``auth`` payload proves; :class:`AuthFailed` with the reason the peer is told."""
        try:
            fields = S.parse_auth(auth)
        except P.ProtocolError as exc:
            self.authenticator.limiter.failure(remote)
            raise AuthFailed(str(exc)) from None
        if self.authenticator.method == "credentials":  # scrypt: tens of ms, off the event loop
            if self.authenticator.credentials.path is not None:
                try:
                    self.authenticator.credentials.refresh()  # `fedplug credentials add` takes effect now
                except ValueError as exc:
                    log.error("%s", exc)
            return await asyncio.get_running_loop().run_in_executor(
                self.auth_pool, self.authenticator.check, fields, remote)
        return self.authenticator.check(fields, remote)

    async def authorize_http(self, request: web.Request) -> bool:
        """Whether ``request`` may read the run (``GET /status``, the dashboard); raises 401 / 429 otherwise.

        Open when no credential is configured at all (``server.host`` then keeps it
        local by default); else it needs ``Authorization: Bearer <server.status_token
        or server.token>`` or ``Basic <client_id>:<secret>`` of a site (docs/security.md).
        """
        status_token = self.server_cfg.get("status_token")
        if not self.authenticator.required and not status_token:
            return True
        header = request.headers.get("Authorization")
        try:
            ok = await asyncio.get_running_loop().run_in_executor(
                self.auth_pool, self.authenticator.check_http, header, request.remote,
                str(status_token) if status_token else None)
        except AuthFailed as exc:
            raise web.HTTPTooManyRequests(text=exc.reason, headers={"Retry-After": str(int(exc.retry_after or 1))})
        if not ok:
            raise web.HTTPUnauthorized(
                text="this run needs a credential: Authorization: Bearer <server.status_token or server.token>, "
                     "or Basic <client_id>:<secret> of a site",
                headers={"WWW-Authenticate": 'Basic realm="fedplug", charset="UTF-8"'})
        return True

    async def _give_up_later(self, client_id: str, sid: str) -> None:
        """A client still gone after the grace period no longer holds up the current phase."""
        await asyncio.sleep(float(self.server_cfg.reconnect_grace_s))
        slot = self.clients.get(client_id)
        if slot is not None and slot.sid is None:
            for collector in self.collectors.values():
                collector.give_up(client_id)

    def _admit(self, event: str, cid: str | None, rnd: int) -> tuple[PhaseCollector | None, str | None]:
        """The open collector for this answer, or why the answer is ignored."""
        if cid is None:
            return None, "send client_wake_up first"
        collector = self.collectors.get(event)
        if collector is not None:
            return collector, collector.admit(cid, rnd)
        closed = self.closed_collectors.get(event)
        if closed is None:
            return None, f"no {event} expected now"
        # answer to a phase that already closed: say precisely why it is too late
        return None, closed.admit(cid, rnd) or f"{event} for round {rnd} came after its phase closed"

    def _close(self, event: str) -> None:
        self.phase_requests.pop(event, None)
        collector = self.collectors.pop(event, None)
        if collector is not None:
            self.closed_collectors[event] = collector

    def _notify(self, hook_name: str, **kwargs: Any) -> None:
        """Call an observer hook on every observer; one that raises is logged, never fatal."""
        for impl in getattr(self.hook, hook_name).get_hookimpls():
            try:
                impl.function(*[kwargs[name] for name in impl.argnames])
            except Exception:
                log.exception("observer %s failed in %s; the run goes on", impl.plugin_name, hook_name)

    async def _on_wake_up(self, sid: str, data: Any = None) -> None:
        try:
            msg = S.parse(P.CLIENT_WAKE_UP, data)
        except P.ProtocolError as exc:
            return await self._reject(sid, P.CLIENT_WAKE_UP, str(exc), self._client_of(sid))
        cid = msg["client_id"]
        self.events.write(P.CLIENT_WAKE_UP, "in", None, cid, sid=sid)
        version = msg["protocol_version"]
        if version not in P.SUPPORTED_VERSIONS:
            await self._reject(sid, P.CLIENT_WAKE_UP,
                               f"protocol version {version} is not supported; this server speaks versions "
                               f"{', '.join(map(str, P.SUPPORTED_VERSIONS))}", cid)
            return await self.sio.disconnect(sid)
        # the token or secret was checked when this socket connected (self.identities)
        identity = self.identities.get(sid, Identity("none"))
        if identity.client_id is not None and cid != identity.client_id:
            return await self._reject(sid, P.CLIENT_WAKE_UP, f"client_id {cid!r} is not the id this connection "
                                      f"authenticated as ({identity.client_id!r})", identity.client_id)
        bound = self.sid_to_client.get(sid)
        if bound is not None and bound != cid:
            return await self._reject(sid, P.CLIENT_WAKE_UP, f"this connection is client {bound!r}; a connection's "
                                      "client id cannot change (connect again to be another client)", bound)
        slot = self.clients.get(cid)
        if slot is not None and slot.sid is not None and slot.sid != sid:
            if not identity.proven:
                await self._reject(sid, P.CLIENT_WAKE_UP, f"client id {cid!r} is already connected", cid)
                return await self.sio.close_session(sid, f"client id {cid!r} is already connected")
            # the site's own secret: it is back on a new connection while its old one is half-open
            self.echo(f"  client {cid} connected again (its secret proves it); closing its previous connection")
            self.events.write("client_takeover", "in", None, cid, sid=sid, previous=slot.sid)
            await self.sio.close_session(slot.sid, f"client {cid} connected again with its secret")
        if slot is None:
            if len(self.clients) >= self.max_clients:
                self._forget_idle_clients()
            if len(self.clients) >= self.max_clients:
                await self._reject(sid, P.CLIENT_WAKE_UP, f"the server already knows {self.max_clients} clients "
                                   "(server.max_clients)", cid)
                return await self.sio.close_session(sid, "server.max_clients reached")
            slot = self.clients[cid] = ClientSlot(cid, sid)
        slot.sid, slot.disconnected_at, slot.protocol_version = sid, None, version
        slot.info = dict(msg.get("info") or {})
        self.sid_to_client[sid] = cid
        await self._emit(P.INIT, cid, {
            "protocol_version": version,
            **({"transfer": {"chunk_bytes": self.chunk_bytes}} if version >= 2 else {}),
            "client_id": cid,
            "round_number": self.round_number,
            "model": self.model_cfg,
            "class_names": list(self.class_names),
            "resource_policy": self.policy_cfg,
            "eval": dict(_plain(self.cfg.eval), on=self.eval_place),
            "codec": self.codec.config,  # encode client_update with it (docs/protocol.md, "Update codecs")
            "secagg": bool(self.secagg_cfg.get("enabled")),  # rounds run secagg_* (docs/protocol.md)
        })

    def _forget_idle_clients(self) -> None:
        """Drop table entries of clients that are gone and were never ready: they hold nothing of the run."""
        for cid in [c for c, s in self.clients.items() if s.sid is None and s.declared_sid is None]:
            del self.clients[cid]

    async def _on_ready(self, sid: str, data: Any = None) -> None:
        cid = self._client_of(sid)
        if cid is None:
            return await self._reject(sid, P.CLIENT_READY, "send client_wake_up first")
        try:
            msg = S.parse(P.CLIENT_READY, data)
        except P.ProtocolError as exc:
            return await self._reject(sid, P.CLIENT_READY, str(exc), cid)
        if msg["client_id"] != cid:
            return await self._reject(sid, P.CLIENT_READY, "client_id differs from client_wake_up", cid)
        for key in ("num_train", "num_test"):
            if msg[key] > self.max_client_examples:
                return await self._reject(sid, P.CLIENT_READY, f"{key}={msg[key]} is over "
                                          f"server.max_client_examples={self.max_client_examples}", cid)
        slot = self.clients[cid]
        if slot.declared_sid == sid and (slot.num_train, slot.num_test) != (msg["num_train"], msg["num_test"]):
            return await self._reject(sid, P.CLIENT_READY, f"num_train and num_test are declared once per connection "
                                      f"({slot.num_train} / {slot.num_test} on this one)", cid)
        slot.declared_sid = sid
        slot.ready, slot.num_train, slot.num_test = True, msg["num_train"], msg["num_test"]
        self.events.write(P.CLIENT_READY, "in", None, cid, num_train=slot.num_train, num_test=slot.num_test)
        self.echo(f"  client {cid} ready ({slot.num_train} train / {slot.num_test} test images)")
        self._notify("fedplug_client_joined", client_id=cid, info={"num_train": slot.num_train,
                                                             "num_test": slot.num_test, **slot.info})
        self._ready_changed.set()
        await self._resend_owed(cid)

    async def _resend_owed(self, cid: str) -> None:
        """A client that (re)joins while an open phase still expects its answer gets that phase's request again.

        Without this a client that lost the request with its connection (killed and
        restarted, or a cut link) would sit idle while the round waits its whole deadline.
        """
        for answer_event, (request_event, payload) in list(self.phase_requests.items()):
            collector = self.collectors.get(answer_event)
            if collector is None or cid not in collector.expected or cid in collector.answers \
                    or cid in collector.given_up:
                continue
            self.echo(f"  client {cid} rejoined owing {answer_event} for round {collector.round_number}; "
                      f"sending {request_event} again")
            await self._emit(request_event, cid, payload(cid) if callable(payload) else payload)

    async def _on_resource_done(self, sid: str, data: Any = None) -> None:
        cid = self._client_of(sid)
        try:
            msg = S.parse(P.CHECK_CLIENT_RESOURCE_DONE, data)
        except P.ProtocolError as exc:
            return await self._reject(sid, P.CHECK_CLIENT_RESOURCE_DONE, str(exc), cid)
        self.events.write(P.CHECK_CLIENT_RESOURCE_DONE, "in", msg["round_number"], cid, load=msg["load_rate"])
        collector, reason = self._admit(P.CHECK_CLIENT_RESOURCE_DONE, cid, msg["round_number"])
        if reason:
            return await self._reject(sid, P.CHECK_CLIENT_RESOURCE_DONE, reason, cid, msg["round_number"])
        if msg.get("reason"):
            self.echo(f"  client {cid} could not measure its load: {msg['reason']}")
        details = {k: float(v) for k, v in (msg.get("details") or {}).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        collector.settle(cid, ResourceReport(float(msg["load_rate"]), str((msg.get("details") or {}).get("kind", "")), details))

    # ------------------------------------------------------------------ v2 transfers (acknowledged)

    def _transfer_client(self, sid: str, event: str, data: Any) -> tuple[str, dict]:
        cid = self._client_of(sid)
        if cid is None:
            raise TransferError(f"{event}: send client_wake_up first")
        if self.clients[cid].protocol_version < 2:
            raise TransferError(f"{event} is protocol version 2; this connection woke up with version 1")
        try:
            return cid, S.parse(event, data)
        except P.ProtocolError as exc:
            raise TransferError(str(exc)) from None

    async def _on_begin_upload(self, sid: str, data: Any = None) -> dict:
        try:
            cid, msg = self._transfer_client(sid, P.BEGIN_UPLOAD, data)
            collector = self.collectors.get(P.CLIENT_UPDATE)
            if collector is None or cid not in collector.expected or msg["round_number"] != collector.round_number:
                raise TransferError(f"begin_upload: no update is expected from this client for round "
                                    f"{msg['round_number']}")
            upload = self.uploads.begin(cid, msg["round_number"], msg["size"], msg["sha256"],
                                        self.clients[cid].protocol_version)
        except TransferError as exc:
            return {"ok": False, "reason": str(exc)}
        if upload.connection is None:
            self.events.write("upload_started", "in", upload.round_number, cid, bytes=upload.size,
                              chunks=upload.num_chunks)
        elif upload.next_index and upload.connection != sid:
            self.events.write("upload_resumed", "in", upload.round_number, cid, next_index=upload.next_index,
                              bytes=upload.received_bytes)
        upload.connection = sid
        return {"ok": True, "upload_id": upload.id, "chunk_bytes": upload.chunk_bytes,
                "next_index": upload.next_index, "num_chunks": upload.num_chunks}

    async def _on_upload_chunk(self, sid: str, data: Any = None) -> dict:
        try:
            cid, msg = self._transfer_client(sid, P.UPLOAD_CHUNK, data)
            try:
                upload = self.uploads.get(cid, msg["upload_id"])
            except TransferError as exc:
                return {"ok": False, "restart": True, "reason": str(exc)}
            if upload.connection not in (None, sid) and upload.next_index:
                self.events.write("upload_resumed", "in", upload.round_number, cid, next_index=upload.next_index,
                                  bytes=upload.received_bytes)
            upload.connection = sid
            next_index = await asyncio.get_running_loop().run_in_executor(
                self.chunk_pool, upload.accept, msg["index"], msg["data"], msg["sha256"])
        except TransferError as exc:
            return {"ok": False, "reason": str(exc)}
        self.events.publish("transfer_progress", client_id=cid, direction="up", round=upload.round_number,
                            bytes_done=upload.received_bytes, bytes_total=upload.size)
        return {"ok": True, "next_index": next_index, "complete": upload.complete}

    async def _on_fetch_chunk(self, sid: str, data: Any = None) -> dict:
        try:
            cid, msg = self._transfer_client(sid, P.FETCH_CHUNK, data)
            chunk, blob = self.downloads.chunk(msg["weights_id"], msg["index"])
        except TransferError as exc:
            return {"ok": False, "reason": str(exc)}
        self.events.publish("transfer_progress", client_id=cid, direction="down", round=self.round_number,
                            bytes_done=min(blob.size, (msg["index"] + 1) * blob.chunk_bytes),
                            bytes_total=blob.size)
        return {"ok": True, "index": msg["index"], "data": chunk, "sha256": blob.chunk_sha256(msg["index"])}

    async def _on_update(self, sid: str, data: Any = None) -> None:
        cid = self._client_of(sid)
        try:
            msg = S.parse(P.CLIENT_UPDATE, data)
        except P.ProtocolError as exc:
            return await self._reject(sid, P.CLIENT_UPDATE, str(exc), cid)
        rnd = msg["round_number"]
        received: Path | None = None  # v2: the weights came before, in chunks, into this file
        if msg["ok"] and msg.get("weights_ref") is not None and cid is not None:
            try:
                received = self.uploads.take(cid, msg["weights_ref"], rnd)
            except TransferError as exc:
                return await self._reject(sid, P.CLIENT_UPDATE, f"update rejected: {exc}", cid, rnd)
        try:
            await self._take_update(sid, cid, msg, received)
        finally:
            if received is not None:
                received.unlink(missing_ok=True)  # mapped (or refused) by now: the pages live with the tensors

    async def _take_update(self, sid: str, cid: str | None, msg: dict, received: Path | None) -> None:
        rnd = msg["round_number"]
        size = received.stat().st_size if received is not None else len(msg.get("weights") or b"")
        self.events.write(P.CLIENT_UPDATE, "in", rnd, cid, ok=msg["ok"], bytes=size)
        collector, reason = self._admit(P.CLIENT_UPDATE, cid, rnd)
        if reason:
            return await self._reject(sid, P.CLIENT_UPDATE, reason, cid, rnd)
        if not msg["ok"]:
            self.echo(f"  client {cid} reported a failed update: {msg.get('reason', 'no reason given')}")
            self.events.write("update_failed", "in", rnd, cid, reason=msg.get("reason", ""))
            return collector.settle(cid, {"accepted": False, "reason": msg.get("reason", "")})
        # the FedAvg weight: never more than the training images this client declared in client_ready
        train_size = self._capped(cid, rnd, "train_size", msg["train_size"], self.clients[cid].num_train, "num_train")
        if train_size <= 0:
            await self._reject(sid, P.CLIENT_UPDATE, "train_size must be positive (and at most the num_train "
                               "declared in client_ready)", cid, rnd)
            return collector.settle(cid, {"accepted": False, "reason": "train_size <= 0"})
        if self.secure is not None:
            return await self._take_masked(sid, cid, msg, received, collector, size)
        collector.begin_work()
        stream = self.stream
        try:
            # one update decoded and checked at a time: K uploads finishing together would otherwise
            # hold K updates' pages at once, and server memory would grow with K
            async with self._decode_slot:
                if self.codec.name != "none":  # the codec's encoding, relative to the round's global model
                    weights = await self._offload(self.codec.decode, received or msg["weights"],
                                                  self.round_start_weights, self.spec)
                else:
                    weights = await (self._offload(open_checked, received, self.spec) if received is not None
                                     else self._offload(decode_checked, msg["weights"], self.spec))
        except WireError as exc:
            await self._refuse_update(sid, cid, rnd, collector, f"update from {cid}", exc)
        else:
            update = ClientUpdate(cid, rnd, weights, int(train_size), float(msg["train_loss"]),
                                  metrics=dict(msg.get("metrics") or {}))
            if stream is not None and self.collectors.get(P.CLIENT_UPDATE) is collector:
                stream.put(update)
            collector.settle(cid, {"accepted": True, "train_size": update.num_examples,
                                   "train_loss": update.train_loss, "seconds": msg.get("seconds")})
            done = sum(1 for a in collector.values().values() if a.get("accepted"))
            self.echo(f"    update {done}/{len(collector.expected)} from {cid}: {update.num_examples} images, "
                      f"loss {update.train_loss:.4f}, {size / 1e6:.1f} MB")
        finally:
            collector.end_work()

    async def _refuse_update(self, sid: str, cid: str, rnd: int, collector: PhaseCollector, what: str,
                             exc: Exception) -> None:
        """An update that fails its checks: told to the client, logged, and settled as not accepted."""
        self.echo(f"  rejected {what}: {exc}")
        await self._reject(sid, P.CLIENT_UPDATE, f"update rejected: {exc}", cid, rnd)
        self.events.write("update_rejected", "in", rnd, cid, reason=str(exc))
        collector.settle(cid, {"accepted": False, "reason": str(exc)})

    async def _take_masked(self, sid: str, cid: str, msg: dict, received: Path | None, collector: PhaseCollector,
                           size: int) -> None:
        """A secure round's update: the masked input goes into the running sum, and is not kept."""
        secure = self.secure
        # the n inside the masked input must be this (checked on the unmasked sum): never more than declared
        train_size = self._capped(cid, msg["round_number"], "train_size", msg["train_size"],
                                  self.clients[cid].num_train, "num_train")
        collector.begin_work()
        try:
            async with self._decode_slot:
                await self._offload(secure.take_masked, cid, received or msg["weights"], train_size)
        except Exception as exc:  # SecAggError: the input does not fit; anything else is a bug, never fatal
            if not isinstance(exc, SecAggError):
                log.exception("round %d: the masked update from %s could not be added", msg["round_number"], cid)
                exc = SecAggError(f"the server could not add it ({type(exc).__name__}: {exc})")
            await self._refuse_update(sid, cid, msg["round_number"], collector, f"masked update from {cid}", exc)
        else:
            collector.settle(cid, {"accepted": True, "train_size": max(1, train_size),
                                   "train_loss": float(msg["train_loss"]), "seconds": msg.get("seconds")})
            done = sum(1 for a in collector.values().values() if a.get("accepted"))
            self.echo(f"    masked update {done}/{len(collector.expected)} from {cid}, {size / 1e6:.1f} MB")
        finally:
            collector.end_work()

    def _secagg_handler(self, event: str):
        """The handler of one of the clients' ``secagg_*`` answers: parse, admit, pass to the round's session."""
        take = {P.SECAGG_KEYS: "take_keys", P.SECAGG_SHARES: "take_shares", P.SECAGG_UNMASK_SHARES: "take_unmask"}[event]

        async def handle(sid: str, data: Any = None) -> None:
            cid = self._client_of(sid)
            try:
                msg = S.parse(event, data)
            except P.ProtocolError as exc:
                return await self._reject(sid, event, str(exc), cid)
            rnd = msg["round_number"]
            self.events.write(event, "in", rnd, cid, ok=msg["ok"])
            collector, reason = self._admit(event, cid, rnd)
            secure = self.secure
            if not reason and (secure is None or msg["session"] != secure.session):
                reason = f"{event}: session {msg['session']} is not this round's"
            if reason:
                return await self._reject(sid, event, reason, cid, rnd)
            if not msg["ok"]:
                self.echo(f"  client {cid} left the secure aggregation: {msg.get('reason', 'no reason given')}")
                return collector.settle(cid, {"accepted": False, "reason": msg.get("reason", "")})
            try:
                getattr(secure, take)(cid, msg)
            except SecAggError as exc:
                await self._reject(sid, event, str(exc), cid, rnd)
                return collector.settle(cid, {"accepted": False, "reason": str(exc)})
            collector.settle(cid, {"accepted": True})

        return handle

    async def _secagg_phase(self, rnd: int, answer_event: str, request_event: str, clients: list[str],
                            request_for) -> list[str]:
        """Send ``request_event`` to ``clients`` and wait (``secagg.timeout_s``); the ones whose answer was taken."""
        collector = PhaseCollector(answer_event, rnd, set(clients))
        self.collectors[answer_event] = collector
        self.phase_requests[answer_event] = (request_event, request_for)
        for cid in clients:
            await self._emit(request_event, cid, request_for(cid))
        await collector.wait(float(self.secagg_cfg.get("timeout_s", 120)))
        self._close(answer_event)
        return sorted(cid for cid, a in collector.values().items() if a.get("accepted"))

    async def _secagg_share_keys(self, rnd: int, selected: list[str]) -> list[str]:
        """Rounds 1 and 2 of SecAgg+ among ``selected``: the clients that shared their keys (they train next)."""
        secure = self.secure = SecureRound(rnd, selected, self.global_weights, self.secagg_cfg)
        self.phase = f"round {rnd}: secure aggregation keys"
        self.echo(f"  secure aggregation: {len(selected)} client(s), threshold {secure.threshold}, "
                  f"session {secure.session}")
        advertised = await self._secagg_phase(rnd, P.SECAGG_KEYS, P.SECAGG_SETUP, selected, secure.setup_for)
        if len(advertised) < secure.threshold + 1:
            raise RunFailed(f"secure aggregation: {len(advertised)} client(s) advertised keys; at least "
                            f"{secure.threshold + 1} are needed (secagg.threshold + 1)")
        shared = await self._secagg_phase(rnd, P.SECAGG_SHARES, P.SECAGG_PEER_KEYS, advertised,
                                          secure.peer_keys_for)
        if len(shared) < secure.threshold + 1:
            raise RunFailed(f"secure aggregation: {len(shared)} client(s) shared their keys; at least "
                            f"{secure.threshold + 1} are needed (secagg.threshold + 1)")
        self.events.write("secagg_keys_shared", "out", rnd, None, clients=len(shared), session=secure.session)
        return shared

    async def _secagg_aggregate(self, rnd: int, survivors: list[str], start_weights, state: dict):
        """Round 4 of SecAgg+ and the aggregation of the unmasked mean: ``(weights, error)`` like :meth:`_aggregate`."""
        secure = self.secure
        problem = secure.unmask_problem()
        if problem is not None:  # nobody is asked to reveal a share for a sum that cannot be unmasked
            return None, f"secure aggregation cannot unmask this round: {problem}"
        self.phase = f"round {rnd}: secure aggregation unmasking"
        await self._secagg_phase(rnd, P.SECAGG_UNMASK_SHARES, P.SECAGG_UNMASK, survivors,
                                 lambda cid: secure.unmask_request())
        try:
            mean, count = await self._offload(secure.mean, start_weights)
        except SecAggError as exc:
            return None, f"secure aggregation could not unmask the sum: {exc}"
        self.events.write("secagg_unmasked", "out", rnd, None, clients=len(survivors), examples=count)
        stream = UpdateStream()  # the aggregator sees the round's mean as its one update
        stream.put(ClientUpdate("secagg", rnd, mean, count, 0.0))
        stream.close()
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._aggregate, start_weights, stream,
                                                                rnd, state)

    async def _on_eval(self, sid: str, data: Any = None) -> None:
        cid = self._client_of(sid)
        try:
            msg = S.parse(P.CLIENT_EVAL, data)
            stats = None
            if msg["ok"] and msg.get("stats") is not None:
                stats = DetectionStats.from_json(msg["stats"])
                if stats.num_classes != len(self.class_names):
                    raise P.ProtocolError(
                        f"client_eval: statistics over {stats.num_classes} classes, the model has "
                        f"{len(self.class_names)}")
        except (P.ProtocolError, ValueError) as exc:
            return await self._reject(sid, P.CLIENT_EVAL, str(exc), cid)
        rnd = msg["round_number"]
        self.events.write(P.CLIENT_EVAL, "in", rnd, cid, ok=msg["ok"], map50=msg["test_map"])
        collector, reason = self._admit(P.CLIENT_EVAL, cid, rnd)
        if reason:
            return await self._reject(sid, P.CLIENT_EVAL, reason, cid, rnd)
        if not msg["ok"]:
            self.echo(f"  client {cid} could not evaluate: {msg.get('reason', '')}")
            return collector.settle(cid, None)
        metrics = {k: float(v) for k, v in (msg.get("metrics") or {}).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        test_size = self._capped(cid, rnd, "test_size", msg["test_size"], self.clients[cid].num_test, "num_test")
        collector.settle(cid, {"test_size": test_size, "test_loss": float(msg["test_loss"]),
                               "map50": float(msg["test_map"]), "recall": float(msg["test_recall"]),
                               "stats": stats, "metrics": metrics})

    def _capped(self, cid: str, rnd: int, key: str, claimed: int, declared: int, declared_key: str) -> int:
        """A size a client claims for this round, capped by what it declared in client_ready (and logged if so)."""
        if claimed <= declared:
            return claimed
        self.echo(f"  client {cid} claims {key}={claimed} but declared {declared_key}={declared}; counting {declared}")
        self.events.write(f"{key}_capped", "in", rnd, cid, claimed=claimed, declared=declared)
        return declared

    async def _http_status(self, request: web.Request) -> web.Response:
        await self.authorize_http(request)
        return web.json_response({
            "phase": self.phase,
            "round": self.round_number,
            "rounds": int(self.run_cfg.rounds),
            "clients": {cid: {"connected": s.sid is not None, "ready": s.ready,
                              "num_train": s.num_train, "num_test": s.num_test}
                        for cid, s in self.clients.items()},
            "best": self.best,
            "history": [{"round": r.round_number, "train_loss": r.train_loss, "test_loss": r.test_loss,
                         "map50": r.map50, "recall": r.recall, "clients": len(r.participants)}
                        for r in self.history],
        })

    # ------------------------------------------------------------------ the run

    def abort(self, reason: str) -> None:
        """Stop waiting for clients (e.g. the local client processes crashed)."""
        self._abort_reason = reason
        self._ready_changed.set()


    def ready_clients(self) -> list[str]:
        return sorted(cid for cid, s in self.clients.items() if s.ready and s.sid is not None)

    def _candidates(self) -> list[str]:
        """The clients a round may select: the ready ones, or with a pool every one it can start."""
        return self.ready_clients() if self.pool_of_clients is None else self.pool_of_clients.client_ids()

    async def wait_for_clients(self, needed: int, timeout: float, purpose: str = "") -> None:
        """Wait until ``needed`` clients are ready; ``purpose`` says what for, in the failure message."""
        if self.pool_of_clients is not None:  # it registers clients and starts them itself (fedplug/pool.py)
            if len(self.pool_of_clients.client_ids()) < needed:
                raise RunFailed(f"only {len(self.pool_of_clients.client_ids())} client(s) can be started, "
                                f"{needed} are needed ({purpose or f'run.min_clients={needed}'})")
            needed = min(needed, self.pool_of_clients.capacity)  # the launcher starts that many at once
        deadline = time.monotonic() + timeout
        while len(self.ready_clients()) < needed:
            if self._abort_reason:
                raise RunFailed(self._abort_reason)
            left = deadline - time.monotonic()
            if left <= 0:
                what = purpose or f"run.min_clients={needed}"
                raise RunFailed(
                    f"only {len(self.ready_clients())} of the {needed} client(s) needed ({what}) became ready "
                    f"within server.ready_timeout_s={timeout:g}s; start more clients"
                    + ("" if purpose else " or lower run.min_clients"))
            self._ready_changed.clear()
            try:
                await asyncio.wait_for(self._ready_changed.wait(), min(left, 1.0))
            except asyncio.TimeoutError:
                pass

    async def run_federation(self) -> int:
        """Run every round; return the process exit status (0 on success)."""
        rounds = int(self.run_cfg.rounds)
        self._notify("fedplug_run_start", config=_plain(self.cfg), run_dir=self.run_dir)
        # what clients and observers are told: the true outcome, which is "completed" only once it is
        reason = "failed: the server stopped on an unexpected error (see app.log)"
        status = 1
        try:
            self.phase = "waiting for clients"
            self.echo(f"waiting for {self.run_cfg.min_clients} clients (run.min_clients) ...")
            await self.wait_for_clients(int(self.run_cfg.min_clients), float(self.server_cfg.ready_timeout_s))
            patience_left = int(self.run_cfg.patience)
            for rnd in range(self.start_round, rounds + 1):
                self.round_number = rnd
                record = await self._run_round_with_retries(rnd)
                self.history.append(record)
                stop_early = False
                if record.test_loss is not None and int(self.run_cfg.patience) > 0:
                    best_loss = min((r.test_loss for r in self.history[:-1] if r.test_loss is not None),
                                    default=math.inf)
                    if record.test_loss < best_loss:
                        patience_left = int(self.run_cfg.patience)
                    else:
                        patience_left -= 1
                        stop_early = patience_left <= 0
                await self._offload(self._finish_round, record, self.global_weights, self.round_start_weights,
                                    self.aggregator_state, self.history)
                self._print_round(record)
                if stop_early:
                    reason = (f"early stop: the global test loss did not improve for "
                              f"{self.run_cfg.patience} evaluations (run.patience)")
                    self.echo(reason)
                    break
                budget = await self._offload(self.privacy.exhausted, rnd)  # opacus can take a second: off the loop
                if budget is not None:
                    reason = budget
                    self.echo(reason)
                    break
            else:
                reason = "completed"
            last = self.history[-1] if self.history else None
            if last is not None and last.round_number >= self.start_round and not last.evaluated_by:
                # the last round is always evaluated: no figures means every evaluator failed
                raise RunFailed(f"round {last.round_number}'s evaluation produced no figures (every evaluator "
                                "failed; their reasons are above), so the run cannot report a result")
            status = 0  # every round ran (or early stopping ended the run as asked)
        except RunFailed as exc:
            reason, status = f"failed: {exc}", 1
            self.echo(f"run failed: {exc}")
        except PluginFailed as exc:  # labelled by server_hooks; the global model is the last good round's
            reason, status = f"failed: {exc}", 1
            self.echo(f"run failed: {exc}; the global model and checkpoints keep the last completed round")
        finally:
            self.phase = "finished"
            self._finished = True
            for cid in list(self.clients):
                await self._emit(P.RUN_FINISHED, cid, {"round_number": self.round_number, "reason": reason,
                                                      "best_round": self.best.get("round")})
            self._notify("fedplug_run_end", rounds=list(self.history), best_round=self.best.get("round"),
                                      reason=reason)
        self.echo("")
        self.echo(format_table(self.history, self.best.get("round")))
        if self.best.get("round") is not None:
            self.echo(f"best round: {self.best['round']} (mAP@0.5 {self.best['map50']:.4f}); "
                      f"checkpoints in {self.outputs.checkpoint_dir}")
        self.echo(f"run directory: {self.run_dir}")
        return status

    async def _run_round_with_retries(self, rnd: int) -> RoundRecord:
        retries = int(self.server_cfg.round_retries)
        t0 = time.monotonic()  # a round's time includes its failed attempts
        for attempt in range(retries + 1):
            try:
                record = await self._run_round(rnd)
                return dataclasses.replace(record, seconds=time.monotonic() - t0,
                                           extra={**record.extra, "attempts": float(attempt + 1),
                                                  **await self._offload(self.privacy.spend, rnd)})
            except RunFailed as exc:
                if attempt == retries:
                    raise RunFailed(f"round {rnd} failed after {retries + 1} attempt(s): {exc}") from None
                self.echo(f"  round {rnd} attempt {attempt + 1} failed: {exc}; retrying")
                await self.wait_for_clients(1, float(self.server_cfg.ready_timeout_s), f"to retry round {rnd}")
        raise AssertionError("unreachable")

    def _quorum(self, n: int) -> int:
        return max(1, math.ceil(float(self.server_cfg.quorum) * n))

    async def _run_round(self, rnd: int) -> RoundRecord:
        t0 = time.monotonic()
        rounds = int(self.run_cfg.rounds)
        ready = self._candidates()
        if not ready:
            raise RunFailed("no client is connected and ready")
        k = min(int(self.run_cfg.clients_per_round), len(ready))
        contacted = sorted(self.rng.sample(ready, k))
        if self.pool_of_clients is not None:  # waves: start the sampled clients first (fedplug/pool.py)
            contacted = await self.pool_of_clients.ensure_ready(contacted, float(self.server_cfg.ready_timeout_s))
            if not contacted:
                raise RunFailed("none of the round's sampled clients became ready within server.ready_timeout_s")
        self.echo(f"round {rnd}/{rounds}: resource check on {len(contacted)} client(s) "
                  f"[{self.policy_cfg.get('name')}]")
        selected = await self._resource_check(rnd, contacted)
        self.secure = None
        if self.secagg_cfg.get("enabled"):
            selected = await self._secagg_share_keys(rnd, selected)
        settings = dict(_plain(self.cfg.train))
        extra = call(self.plugins, "aggregator", "fedplug_aggregator_round_settings", is_round_settings,
                     round_number=rnd, config=self.aggregator_cfg)
        settings.update(dict(extra or {}))
        settings["seed"] = int(self.run_cfg.seed) * 100003 + rnd
        settings.setdefault("total_rounds", rounds)  # lets a client's lr schedule span the whole run
        self.round_start_weights = round_start_weights = self.global_weights
        layout, digests = await self._offload(_layout_of, round_start_weights, self.downloads)  # once, no copy
        blob = self.downloads.offer(layout, f"r{rnd}-global", digests)
        self.uploads.drop_before(rnd)
        self.echo(f"  training on {len(selected)} client(s): {', '.join(selected)}")

        self.stream = stream = UpdateStream()
        collector = PhaseCollector(P.CLIENT_UPDATE, rnd, set(selected))
        self.collectors[P.CLIENT_UPDATE] = collector
        work_state = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in self.aggregator_state.items()}
        secure = self.secure
        if secure is None:  # FedAvg and friends consume the updates as they arrive
            aggregation = asyncio.get_running_loop().run_in_executor(
                self.pool, self._aggregate, round_start_weights, stream, rnd, work_state)
        self.phase = f"round {rnd}: training"
        self._notify("fedplug_round_start", round_number=rnd, client_ids=list(selected))
        request = {"round_number": rnd, "model_id": str(self.model_cfg.get("name")),
                   "settings": settings, "weights": blob}
        request_for = (lambda cid: request) if secure is None else \
            (lambda cid: {**request, "secagg": secure.envelopes_for(cid)})  # each one's envelopes
        self.phase_requests[P.CLIENT_UPDATE] = (P.REQUEST_UPDATE, request_for)
        for cid in selected:
            await self._emit(P.REQUEST_UPDATE, cid, request_for(cid))
        await collector.wait(float(self.server_cfg.update_timeout_s))
        self._close(P.CLIENT_UPDATE)
        self.stream = None
        stream.close()
        if secure is None:
            new_weights, agg_error = await aggregation
        else:
            survivors = sorted(cid for cid, a in collector.values().items() if a.get("accepted"))
            new_weights, agg_error = await self._secagg_aggregate(rnd, survivors, round_start_weights, work_state)
            self.secure = None
        if isinstance(agg_error, PluginFailed):
            raise agg_error
        answers = collector.values()
        accepted = {cid: a for cid, a in answers.items() if a.get("accepted")}
        missing = sorted(set(selected) - set(answers))
        if missing:
            self.echo(f"  no update from {', '.join(missing)} (deadline or disconnect)")
        needed = self._quorum(len(selected))
        if len(accepted) < needed or new_weights is None:
            detail = f"; aggregation: {agg_error}" if agg_error else ""
            raise RunFailed(f"{len(accepted)} accepted update(s), quorum is {needed} of {len(selected)}{detail}")
        self.global_weights = new_weights
        self.aggregator_state = work_state
        total = sum(a["train_size"] for a in accepted.values())
        train_loss = sum(a["train_loss"] * a["train_size"] for a in accepted.values()) / total
        per_client = {cid: {"train_loss": a["train_loss"], "train_size": float(a["train_size"])}
                      for cid, a in accepted.items()}

        record_kwargs: dict[str, Any] = {}
        last = rnd == rounds or await self._offload(self.privacy.is_last, rnd)  # the privacy budget can end the run
        evaluate = rnd % int(self.run_cfg.eval_every) == 0 or last
        if evaluate:
            record_kwargs = await self._evaluate(rnd, stop=last, per_client=per_client,
                                                 participants=sorted(accepted))
        return RoundRecord(round_number=rnd, participants=tuple(sorted(accepted)), train_loss=train_loss,
                           seconds=time.monotonic() - t0, per_client=per_client, **record_kwargs)

    def _aggregate(self, start_weights, stream: UpdateStream, rnd: int, state: dict):
        """New global weights, or ``(None, why)``; a plugin defect comes back as the :class:`PluginFailed` itself."""
        try:
            result = call(self.plugins, "aggregator", "fedplug_aggregate", model_checker(self.spec),
                          global_weights=start_weights, updates=stream, round_number=rnd,
                          config=self.aggregator_cfg, state=state)
        except EmptyRoundError as exc:
            return None, f"no update to aggregate ({exc})"
        except PluginFailed as exc:  # a plugin bug must not take the global model with it
            log.error("%s", exc, exc_info=exc.__cause__)
            return None, exc
        return result, None

    async def _resource_check(self, rnd: int, contacted: list[str]) -> list[str]:
        attempts = int(self.server_cfg.resource_max_attempts)
        for attempt in range(1, attempts + 1):
            self.phase = f"round {rnd}: resource check"
            collector = PhaseCollector(P.CHECK_CLIENT_RESOURCE_DONE, rnd, set(contacted))
            self.collectors[P.CHECK_CLIENT_RESOURCE_DONE] = collector
            self.phase_requests[P.CHECK_CLIENT_RESOURCE_DONE] = (
                P.CHECK_CLIENT_RESOURCE, {"round_number": rnd, "attempt": attempt})
            for cid in contacted:
                await self._emit(P.CHECK_CLIENT_RESOURCE, cid, {"round_number": rnd, "attempt": attempt})
            await collector.wait(float(self.server_cfg.resource_timeout_s))
            self._close(P.CHECK_CLIENT_RESOURCE_DONE)
            reports = collector.values()
            decision = call(self.plugins, "resource_policy", "fedplug_select_clients", is_decision,
                            reports=reports, contacted=list(contacted), config=self.policy_cfg)
            selected = [cid for cid in decision.selected if cid in contacted]
            if decision.proceed and selected:
                return selected
            backoff = min(float(attempt), 10.0)  # the original: 1 s more each time, up to 10 s
            self.echo(f"  resource check {attempt}/{attempts} did not pass: {decision.reason}"
                      + (f"; asking again in {backoff:g}s" if attempt < attempts else ""))
            if attempt < attempts:
                await asyncio.sleep(backoff)
                contacted = [cid for cid in contacted if cid in self.ready_clients()] or self.ready_clients()
        if str(self.server_cfg.on_resource_exhausted) == "proceed":
            answered = [cid for cid in contacted if cid in self.ready_clients()]
            self.echo(f"  resource check never passed in {attempts} attempts; proceeding with "
                      f"{len(answered)} client(s) (server.on_resource_exhausted=proceed)")
            if answered:
                return answered
        raise RunFailed(f"the resource check did not pass in {attempts} attempts "
                        f"(server.resource_max_attempts); last verdict: {decision.reason}")

    def _evaluators(self, participants: list[str]) -> list[str]:
        """The clients sent ``stop_and_eval``: ``eval.clients`` = all | round (this round's trainers) | <n>."""
        ready = self._candidates()
        choice = str(self.cfg.eval.get("clients", "all"))
        if choice == "round":
            return [cid for cid in participants if cid in ready] or ready
        if choice.isdigit():
            return sorted(self.rng.sample(ready, min(int(choice), len(ready))))
        return ready

    async def _evaluate(self, rnd: int, stop: bool, per_client: dict, participants: list[str]) -> dict[str, Any]:
        """Score the new global model where ``eval.on`` says: the server's held-out set, the clients', or both."""
        self.phase = f"round {rnd}: evaluation"
        weights = self.global_weights
        server_eval = None
        if self.held_out is not None:
            what = f"the server's evaluation on {self.held_out.source}"
            server_eval = asyncio.get_running_loop().run_in_executor(
                self.pool, safe_call, lambda: self.held_out.evaluate(weights), what, self.echo)
        client_entries: dict[str, dict] = {}
        expected_images = 0
        if self.eval_place in ("clients", "both"):
            # the last round's stop_and_eval carries STOP: every client must hear it
            evaluators = self._candidates() if stop else self._evaluators(participants)
            layout, digests = await self._offload(_layout_of, weights, self.downloads)
            blob = self.downloads.offer(layout, f"r{rnd}-eval", digests)
            collector = PhaseCollector(P.CLIENT_EVAL, rnd, set(evaluators))
            self.collectors[P.CLIENT_EVAL] = collector
            self._stop_sent = stop
            request = {"round_number": rnd, "weights": blob, "STOP": stop}
            self.phase_requests[P.CLIENT_EVAL] = (P.STOP_AND_EVAL, request)
            for cid in evaluators:
                await self._emit(P.STOP_AND_EVAL, cid, request)
            if self.pool_of_clients is None:
                await collector.wait(float(self.server_cfg.eval_timeout_s))
            else:  # waves: the pool brings the evaluators up a capacity at a time (fedplug/pool.py)
                await self.pool_of_clients.visit(evaluators, collector, float(self.server_cfg.eval_timeout_s))
            self._close(P.CLIENT_EVAL)
            # after the wait: in waves, a client's test size is known once it joined; one never seen is not counted
            expected_images = sum(self.clients[cid].num_test for cid in evaluators if cid in self.clients)
            client_entries = {cid: e for cid, e in collector.values().items() if e is not None}
            if len(client_entries) < len(evaluators):
                self.echo(f"  only {len(client_entries)} of {len(evaluators)} clients evaluated; "
                          "the round's client metrics cover only their test images")
        server_entry = await server_eval if server_eval is not None else None
        if server_entry is not None:
            self.events.write("server_eval", "local", rnd, None, map50=server_entry["map50"],
                              images=server_entry["test_size"])
        return await self._offload(round_metrics, self.eval_place, server_entry, client_entries, expected_images,
                                   bool(self.cfg.eval.use_07_metric), per_client)

    def _finish_round(self, record: RoundRecord, global_weights, previous_weights, aggregator_state,
                      history: list[RoundRecord]) -> None:
        """Commit the round's checkpoints, resume point and metrics row, then tell observers; in a worker thread.

        A write error (disk full, read-only) ends the run with the committed round named, or
        with ``run.on_write_error=continue`` is reported and the run goes on (the next round's
        commit writes everything again); the last round's outputs must be written either way.
        """
        from fedplug.commit import write_error_message

        rnd = record.round_number
        try:
            self._write_round(record, global_weights, aggregator_state, history)
        except OSError as exc:
            message = write_error_message(exc, rnd, self.outputs.committed_round, self.run_dir)
            self.events.write("write_failed", "local", rnd, None, reason=str(exc))
            last = rnd >= int(self.run_cfg.rounds)
            if str(self.run_cfg.get("on_write_error", "stop")) != "continue" or last:
                raise RunFailed(message) from None
            self.echo(f"  {message}; going on without it (run.on_write_error=continue)")
        else:
            self.events.write("round_committed", "local", rnd, None)
        self._notify("fedplug_round_end", record=record, global_weights=global_weights,
                     previous_weights=previous_weights)

    def _write_round(self, record: RoundRecord, global_weights, aggregator_state, history) -> None:
        meta = {"round": record.round_number, "map50": record.map50, "test_loss": record.test_loss,
                "model": self.model_cfg.get("name"), "class_names": list(self.class_names)}
        is_best = record.map50 is not None and (self.best.get("map50") is None or record.map50 > self.best["map50"])
        best = {"round": record.round_number, "map50": record.map50, "test_loss": record.test_loss} if is_best \
            else self.best
        self.outputs.commit_round(record, global_weights, meta, is_best, aggregator_state, history, best)
        self.best = best

    def _print_round(self, r: RoundRecord) -> None:
        def f(v):
            return "-" if v is None else f"{v:.4f}"

        self.echo(f"  round {r.round_number} done in {r.seconds:.1f}s: train_loss {f(r.train_loss)}  "
                  f"test_loss {f(r.test_loss)}  mAP@0.5 {f(r.map50)}  recall {f(r.recall)}  "
                  f"clients {len(r.participants)}")
