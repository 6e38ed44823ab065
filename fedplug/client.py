"""A federation client: ``socketio.AsyncClient`` holding one site's data and a local model.

The client brings only the server's URL, its own id (and token) and its data.
Everything else — which detector to build with which settings, the class list,
the resource policy, the training settings of each round — comes from the
server in ``init`` and ``request_update``.  Training, evaluation and weight
(de)serialisation run in a worker thread, one job at a time, so the Socket.IO
heartbeats keep flowing while a long local epoch runs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import math
import os
import random
import re
import socket
import time
from typing import Any, Mapping

import socketio
import torch

from fedplug import protocol as P
from fedplug import tls
from fedplug import transfer
from fedplug.codecs import ActiveCodec, open_codec
from fedplug.plugins import activate
from fedplug.secagg.protocol import SecAggError
from fedplug.secagg.run import ClientSessions
from fedplug.evaluation import eval_settings_from
from fedplug.types import EvalResult, ResourceReport, TrainResult, TrainSettings
from fedplug.update_filter import apply_update_filter
from fedplug.wire import WireError, decode_checked, spec_of

log = logging.getLogger("fedplug.client")

_TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainSettings)}


class HookFailed(RuntimeError):
    """A plugin hook raised or returned the wrong type; the text names the plugin and the hook."""


def numeric_metrics(metrics: Any) -> dict[str, float]:
    """The finite numeric entries of a result's ``metrics``, bounded as the protocol allows."""
    out: dict[str, float] = {}
    for key, value in dict(metrics or {}).items():
        if len(out) >= P.MAX_METRICS:
            break
        if (isinstance(key, str) and 0 < len(key) <= P.MAX_METRIC_NAME and key.isprintable() and isinstance(value, (int, float))
                and not isinstance(value, bool) and math.isfinite(float(value))):
            out[key] = float(value)
    return out


def resolve_device(requested: str) -> str:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is a clear error."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"client.device={requested} but no CUDA GPU is visible; use client.device=cpu or auto")
    if requested != "cpu" and not requested.startswith("cuda"):
        raise ValueError(f"client.device={requested!r} is not one of auto, cpu, cuda")
    return requested


def train_settings_from(message: Mapping[str, Any], round_number: int, device: str) -> TrainSettings:
    known = {k: v for k, v in message.items() if k in _TRAIN_FIELDS and k not in ("extra", "device")}
    extra = {k: v for k, v in message.items() if k not in _TRAIN_FIELDS}
    known["round_number"] = round_number
    return TrainSettings(device=device, extra=extra, **known)


class FederationClient:
    """One site.  :meth:`run` connects, keeps reconnecting, answers the server, and returns the exit status.

    Exit statuses: 0 the run finished; 2 this site cannot take part (setup failed);
    3 the server was never reached; 4 the server was lost and did not come back
    within ``reconnect_timeout_s``; 5 the embedded server that started this
    process is gone; 6 the server refused this client's credentials, or TLS is
    set up wrong (the message says which: scheme, certificate, hostname, client
    certificate) — retrying cannot help.

    ``secret`` is this site's own secret (per-site credentials), ``token`` the
    shared one; ``ssl_context`` (:func:`fedplug.tls.client_context`) is used for
    an ``https://`` server, presenting a client certificate when
    ``client_cert`` says it holds one.
    """

    def __init__(self, server_url: str, client_id: str | None, data_spec: Mapping[str, Any],
                 device: str = "cpu", token: str | None = None, augment: Mapping | None = None,
                 reconnect_attempts: int = 0, max_message_mb: float = 1024, echo=print,
                 reconnect_timeout_s: float = 86400.0, reconnect_delay_max_s: float = 30.0,
                 call_timeout_s: float = 120.0, protocol_version: int = P.PROTOCOL_VERSION,
                 parent_pid: int | None = None, secret: str | None = None, ssl_context: Any = None,
                 client_cert: bool = False):
        self.server_url = server_url
        self.client_id = client_id or f"{socket.gethostname()}-{os.getpid()}"
        self.data_spec = dict(data_spec)
        self.augment = dict(augment) if augment else None
        self.device = resolve_device(device)
        self.token = token
        self.secret = secret
        self.ssl_context = ssl_context
        self.client_cert = client_cert
        self._refused: str | None = None  # the server's reason when it refused the last connect
        self.echo = echo
        max_bytes = int(max_message_mb * 1024 * 1024)
        self.max_bytes = max_bytes
        # reconnecting is ours, not python-socketio's: its loop gives up silently after its attempts
        # (leaving a task behind that hides the give-up), and has no notion of a day-long outage
        self.reconnect_timeout_s = float(reconnect_timeout_s)
        self.reconnect_delay_max_s = float(reconnect_delay_max_s)
        self.reconnect_attempts = int(reconnect_attempts)  # 0: bounded by time only
        self.call_timeout_s = float(call_timeout_s)
        self.protocol_version = int(protocol_version)
        self.parent_pid = parent_pid
        ws_options: dict[str, Any] = {"max_msg_size": max_bytes}
        if ssl_context is not None:
            ws_options["ssl"] = ssl_context  # aiohttp's ws_connect: verify the server, present our certificate
        self.sio = socketio.AsyncClient(reconnection=False, logger=False, engineio_logger=False,
                                        websocket_extra_options=ws_options)
        self._last_rx = time.monotonic()  # last packet of any kind (heartbeats included) from the server
        self._watch_heartbeats()
        self.joined = asyncio.Event()  # connected and greeted (init handled): answers may be sent
        self._link_lost = asyncio.Event()  # a fresh one per connection, set when that connection goes
        self._lost_at: float | None = None
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedplug-client")
        self.work_lock = asyncio.Lock()
        self.done = asyncio.Event()
        self.exit_status = 0
        self.plugins = None
        self.model = None
        self.spec = None
        self.data = None
        self.init_config: dict | None = None
        self.train_state: dict = {}
        # (phase, round) -> "working" | "sending" | "sent", and the answer to re-deliver when the
        # server asks again (it re-sends a phase's request to a client that rejoins owing the answer)
        self.jobs: dict[tuple[str, int], str] = {}
        self.answers: dict[tuple[str, int], tuple[dict, bytes | None]] = {}
        self._weights_cache: tuple[str, bytearray] | None = None  # (sha256, bytes) of the last download
        self.chunk_bytes: int | None = None  # init.transfer.chunk_bytes: protocol 3 uploads hash chunks of this size
        # how this client finds the detector and policy the server names; tests put in-process plugins here
        self.activate_plugins = activate
        self.open_codec = open_codec  # how this client loads the codec named in init.codec
        self.codec: ActiveCodec | None = None  # encodes each round's update (init.codec; none by default)
        self.secure = ClientSessions(self.client_id)  # this round's SecAgg+ keys and shares (secagg_* events)
        self._register_handlers()

    # ------------------------------------------------------------------ connection

    def _watch_heartbeats(self) -> None:
        """Stamp every packet the server sends, so :meth:`_check_heartbeat` can tell a dead link.

        Engine.IO's own read timeout cannot be trusted here: when the link dies while a send
        is blocked on a full TCP buffer, its read loop waits for the blocked writer for ever.
        """
        eio = self.sio.eio
        receive = eio._receive_packet

        async def stamped(pkt):
            self._last_rx = time.monotonic()
            return await receive(pkt)

        eio._receive_packet = stamped

    def heartbeat_limit(self) -> float:
        """Seconds of silence after which the server counts as gone: its ping interval + timeout + 5 s."""
        eio = self.sio.eio
        return float(eio.ping_interval or 25) + float(eio.ping_timeout or 20) + 5.0

    def _check_heartbeat(self) -> None:
        if not self.sio.connected:
            return
        silent = time.monotonic() - self._last_rx
        if silent > self.heartbeat_limit():
            self.echo(f"[{self.client_id}] no heartbeat from the server for {silent:.0f}s; "
                      "dropping the connection to reconnect")
            self._abort_transport()

    def _abort_transport(self) -> None:
        """Close the TCP connection under the WebSocket at once, unblocking a send stuck on a dead link."""
        ws = getattr(self.sio.eio, "ws", None)
        transport = getattr(getattr(ws, "_writer", None), "transport", None)
        if transport is not None:
            transport.abort()
        else:
            asyncio.get_running_loop().create_task(self.sio.eio.disconnect(abort=True))

    async def _wait_joined(self) -> bool:
        """Wait until connected and greeted again; False when the run ended or the server stays gone."""
        while not self.joined.is_set():
            if self.done.is_set():
                return False
            try:
                await asyncio.wait_for(self.joined.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
        return True

    async def _send(self, event: str, payload: dict) -> bool:
        """Emit once connected and greeted: an answer computed during an outage goes out after it."""
        while await self._wait_joined():
            try:
                await self.sio.emit(event, payload)
                return True
            except (socketio.exceptions.BadNamespaceError, socketio.exceptions.ConnectionError):
                self.joined.clear()  # the connection went in between; wait for the next one
        return False

    async def _call(self, event: str, payload: dict) -> Any:
        """An acknowledged request (v2 transfers), retried across reconnects until the run ends.

        A request whose connection dies is asked again on the next connection at once,
        not after its acknowledgement timeout (python-socketio would wait that long).
        """
        while await self._wait_joined():
            lost = self._link_lost  # set when *this* connection goes
            call = asyncio.ensure_future(self.sio.call(event, payload, timeout=self.call_timeout_s))
            gone = asyncio.ensure_future(lost.wait())
            await asyncio.wait({call, gone}, return_when=asyncio.FIRST_COMPLETED)
            gone.cancel()
            if not call.done():
                call.cancel()
                continue
            try:
                return call.result()
            except socketio.exceptions.TimeoutError:
                log.warning("%s: no acknowledgement within %.0fs; asking again", event, self.call_timeout_s)
            except (socketio.exceptions.BadNamespaceError, socketio.exceptions.ConnectionError):
                self.joined.clear()
        raise asyncio.CancelledError("the run ended during a transfer")

    async def _offload(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def _call_hook(self, role: str, hook_name: str, expected: type, **kwargs: Any) -> Any:
        """Call a plugin hook; an exception or a wrong return type becomes :class:`HookFailed`.

        The traceback goes to this client's log; the message, which the server
        shows, names the plugin, its package and the hook.
        """
        info = self.plugins.selected.get(role) if self.plugins is not None else None
        who = f"{role} {info.describe()}" if info is not None else role
        try:
            result = getattr(self.plugins.hook, hook_name)(**kwargs)
        except Exception as exc:
            log.exception("%s failed in %s", who, hook_name)
            raise HookFailed(f"{who} raised {type(exc).__name__} in {hook_name}: {exc}") from exc
        if not isinstance(result, expected):
            raise HookFailed(f"{who} returned {type(result).__name__} from {hook_name}, "
                             f"expected fedplug.types.{expected.__name__}")
        return result

    def _spawn(self, coro) -> None:
        """Run a handler's work as its own task so the Socket.IO reader is never blocked."""
        task = asyncio.get_running_loop().create_task(coro)
        task.add_done_callback(self._report_crash)

    def _report_crash(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("client task failed", exc_info=exc)
            self.echo(f"[{self.client_id}] error: {type(exc).__name__}: {exc}")
            self.exit_status = 1
            self.done.set()

    def _register_handlers(self) -> None:
        sio = self.sio

        @sio.event
        async def connect():
            log.info("connected to %s", self.server_url)
            self._last_rx = time.monotonic()
            self._link_lost = asyncio.Event()
            await sio.emit(P.CLIENT_WAKE_UP, {
                "client_id": self.client_id, "protocol_version": self.protocol_version,
                "info": {"device": self.device, "host": socket.gethostname()[:200]},
            })

        @sio.event
        async def connect_error(data=None):
            # the server's refusal arrives as {"message": reason}; a transport failure as a bare string
            if isinstance(data, dict) and data.get("message"):
                self._refused = str(data["message"])[:300]

        @sio.event
        async def disconnect(*args):
            self.joined.clear()
            self._link_lost.set()
            if self.done.is_set():
                return
            self._lost_at = time.monotonic()
            self.echo(f"[{self.client_id}] lost the server at {self.server_url}; reconnecting "
                      f"(for up to {self.reconnect_timeout_s:g}s, client.reconnect_timeout_s)")

        @sio.on(P.INIT)
        async def init(data):
            self._spawn(self._on_init(data))

        @sio.on(P.CHECK_CLIENT_RESOURCE)
        async def check_client_resource(data):
            self._spawn(self._on_check_resource(data))

        @sio.on(P.REQUEST_UPDATE)
        async def request_update(data):
            self._spawn(self._on_request_update(data))

        @sio.on(P.STOP_AND_EVAL)
        async def stop_and_eval(data):
            self._spawn(self._on_stop_and_eval(data))

        for request_event, answer_event, method in (
                (P.SECAGG_SETUP, P.SECAGG_KEYS, "on_setup"),
                (P.SECAGG_PEER_KEYS, P.SECAGG_SHARES, "on_peer_keys"),
                (P.SECAGG_UNMASK, P.SECAGG_UNMASK_SHARES, "on_unmask")):
            sio.on(request_event, self._secagg_responder(answer_event, method))

        @sio.on(P.RUN_FINISHED)
        async def run_finished(data):
            self.echo(f"[{self.client_id}] run finished: {(data or {}).get('reason', '')}")
            self.done.set()

        @sio.on(P.PROTOCOL_ERROR)
        async def protocol_error(data):
            data = data if isinstance(data, dict) else {}
            reason = str(data.get("reason"))
            if data.get("event") == P.CLIENT_WAKE_UP and "protocol version" in reason and self.protocol_version > 1:
                # an older server: speak the newest version it lists ("... speaks versions 1, 2") next time
                spoken = [int(v) for v in re.findall(r"\d+", reason.partition("speaks versions")[2])]
                older = [v for v in spoken if v in P.SUPPORTED_VERSIONS and v < self.protocol_version]
                refused, self.protocol_version = self.protocol_version, max(older, default=1)
                self.echo(f"[{self.client_id}] the server does not speak protocol version {refused}; "
                          f"using version {self.protocol_version}")
                return
            self.echo(f"[{self.client_id}] the server rejected {data.get('event')}: {data.get('reason')}")

    # ------------------------------------------------------------------ handlers

    def _secagg_responder(self, answer_event: str, method: str):
        """Answer one of the server's ``secagg_*`` requests with ``self.secure.<method>`` (off the loop)."""
        async def respond(data):
            async def work():
                msg = data if isinstance(data, dict) else {}
                try:
                    answer = await self._offload(getattr(self.secure, method), msg)
                except (SecAggError, KeyError, TypeError, ValueError) as exc:
                    self.echo(f"[{self.client_id}] secure aggregation: cannot answer {answer_event}: {exc}")
                    answer = self.secure.refusal(msg, exc)
                await self._send(answer_event, answer)

            self._spawn(work())

        return respond

    def _setup(self, message: dict) -> tuple[int, int]:
        """Build the detector the server named and open the local data (worker thread)."""
        from fedplug.data import open_client_data

        model_cfg = message["model"]
        policy_cfg = message["resource_policy"]
        if self.init_config is not None and self.init_config == {"model": model_cfg, "policy": policy_cfg,
                                                                 "classes": message["class_names"]}:
            return len(self.data.train), len(self.data.test)  # a reconnect: keep model and data
        self.plugins = self.activate_plugins({"detector": model_cfg["name"], "resource_policy": policy_cfg["name"]},
                                             observers=False)
        class_names = tuple(message["class_names"])
        self.data = open_client_data(self.data_spec, class_names, augment=self.augment)
        torch.manual_seed(int(model_cfg.get("seed", 0)))
        self.model = self.plugins.hook.fedplug_build_model(config=model_cfg, class_names=class_names)
        self.spec = spec_of(self.model.state_dict())
        self.eval_settings = eval_settings_from(message.get("eval") or {}, self.device)
        self.init_config = {"model": model_cfg, "policy": policy_cfg, "classes": message["class_names"]}
        return len(self.data.train), len(self.data.test)

    async def _on_init(self, data: dict) -> None:
        if isinstance(data, dict) and data.get("protocol_version") in P.SUPPORTED_VERSIONS:
            self.protocol_version = int(data["protocol_version"])  # what the server agreed to speak
        transfer_cfg = data.get("transfer") if isinstance(data, dict) else None
        chunk = transfer_cfg.get("chunk_bytes") if isinstance(transfer_cfg, dict) else None
        self.chunk_bytes = chunk if isinstance(chunk, int) and not isinstance(chunk, bool) and chunk > 0 else None
        if self.data is not None and self.init_config is not None:
            # a reconnect: setup is cheap then, and must not wait behind a training job holding the lock
            num_train, num_test = await self._offload_setup(data)
        else:
            async with self.work_lock:
                num_train, num_test = await self._offload_setup(data)
        if num_train < 0:
            return
        await self.sio.emit(P.CLIENT_READY, {"client_id": self.client_id,
                                             "num_train": num_train, "num_test": num_test})
        self.joined.set()

    async def _offload_setup(self, data: dict) -> tuple[int, int]:
        try:
            self._use_codec(data.get("codec") if isinstance(data, dict) else None)
            if self.init_config is not None and self._same_setup(data):
                return len(self.data.train), len(self.data.test)
            return await self._offload(self._setup, data)
        except Exception as exc:  # a missing plugin, dataset or weights file: say which, and leave
            log.exception("setup failed")
            self.echo(f"[{self.client_id}] cannot take part: {type(exc).__name__}: {exc}")
            self.exit_status = 2
            self.done.set()
            return -1, -1

    def _use_codec(self, config: Any) -> ActiveCodec:
        """The codec ``init.codec`` names (``None``: the plain ``none``), loaded once and kept while it is the same."""
        if self.codec is None or self.codec.config != (config or {"name": "none"}):
            self.codec = self.open_codec(config)
        return self.codec

    def _same_setup(self, message: dict) -> bool:
        return self.init_config == {"model": message.get("model"), "policy": message.get("resource_policy"),
                                    "classes": message.get("class_names")}

    def _load_global(self, weights: bytes) -> dict:
        state = decode_checked(weights, self.spec, max_bytes=self.max_bytes)
        self.model.load_state_dict(state)
        return state

    async def _on_check_resource(self, data: dict) -> None:
        rnd = int(data["round_number"])
        try:
            report = await self._offload(lambda: self._call_hook(
                "resource_policy", "fedplug_measure_resources", ResourceReport, config=self.init_config["policy"]))
        except HookFailed as exc:
            # no load figure to give: report full load, so the policy leaves this client out, and say why
            self.echo(f"[{self.client_id}] round {rnd}: {exc}")
            return await self.sio.emit(P.CHECK_CLIENT_RESOURCE_DONE, {
                "round_number": rnd, "load_rate": 1.0, "details": {"kind": "error"}, "reason": str(exc)})
        await self.sio.emit(P.CHECK_CLIENT_RESOURCE_DONE, {
            "round_number": rnd, "load_rate": float(report.load),
            "details": {"kind": report.kind, **numeric_metrics(report.details)},
        })

    def _train(self, rnd: int, weights: bytes, settings: dict, secagg: Mapping | None = None) -> dict:
        t0 = time.monotonic()
        try:
            global_state = self._load_global(weights)
        except WireError as exc:
            return {"round_number": rnd, "ok": False, "train_size": 0, "train_loss": 0.0,
                    "reason": f"the global weights from the server were rejected: {exc}"}
        ts = train_settings_from(settings, rnd, self.device)
        try:
            result = self._call_hook("detector", "fedplug_train_round", TrainResult, model=self.model,
                                     dataset=self.data.train, settings=ts, global_weights=global_state,
                                     state=self.train_state)
            loss = float(result.train_loss)
            if not result.ok or result.weights is None or not math.isfinite(loss):
                reason = result.reason or f"non-finite training loss {loss}"
                return {"round_number": rnd, "ok": False, "train_size": 0, "train_loss": 0.0, "reason": reason}
            result = apply_update_filter(result, global_state, ts)  # what the aggregator asked for (clip, DP noise)
            if secagg is not None:  # the server gets n * (w - w_global) and n, masked: never the weights
                num_examples = min(int(result.num_examples), len(self.data.train))
                weights = self.secure.masked_upload(secagg, result.weights, global_state, num_examples)
            else:
                weights = (self.codec or self._use_codec(None)).encode_for_upload(result.weights, global_state)
        except SecAggError as exc:
            log.exception("round %d: secure aggregation failed", rnd)
            return {"round_number": rnd, "ok": False, "train_size": 0, "train_loss": 0.0,
                    "reason": f"secure aggregation: {exc}"}
        except (HookFailed, WireError, AttributeError, TypeError, ValueError) as exc:  # a failed round, not a dead client
            log.exception("round %d: training failed", rnd)
            return {"round_number": rnd, "ok": False, "train_size": 0, "train_loss": 0.0,
                    "reason": str(exc) if isinstance(exc, HookFailed) else
                    f"the detector's training result cannot be sent: {type(exc).__name__}: {exc}"}
        return {"round_number": rnd, "ok": True, "weights": weights,
                "train_size": int(result.num_examples), "train_loss": loss,
                "seconds": time.monotonic() - t0, "metrics": numeric_metrics(result.metrics)}

    async def _weights_of(self, data: dict, rnd: int, what: str) -> bytes:
        """The global weights of a request: inline (v1) or fetched in chunks (v2), with the last one cached."""
        ref = data.get("weights_ref")
        if ref is None:
            return data["weights"]
        digest = ref.get("sha256") if isinstance(ref, dict) else None
        chunk = ref.get("chunk_bytes") if isinstance(ref, dict) else None
        if self._weights_cache is not None and self._weights_cache[0] == digest and isinstance(chunk, int) \
                and chunk > 0:
            # the same weights asked again (a re-sent request): kept, unless a detector wrote into the
            # tensors it was handed (they are views of this buffer) -- then they are fetched again
            if transfer.blob_sha256(self._weights_cache[1], chunk, self.protocol_version) == digest:
                return self._weights_cache[1]
        started, size = time.monotonic(), ref.get("size") if isinstance(ref, dict) else None
        weights = await transfer.download(self._call, ref, self.max_bytes, version=self.protocol_version)
        self._weights_cache = (digest, weights)
        log.info("round %d: %s weights, %s bytes, downloaded in %.1fs", rnd, what, size, time.monotonic() - started)
        return weights

    def _claim(self, key: tuple[str, int]) -> bool:
        """Start the job ``key`` unless it already runs or its answer is on its way (a re-sent request)."""
        state = self.jobs.get(key)
        if state in ("working", "sending"):
            log.info("%s round %d: asked again while %s; the answer will follow", key[0], key[1], state)
            return False
        if state == "sent" and key in self.answers and self.answers[key][0].get("ok"):
            return False  # caller re-delivers the kept answer; a failed one is worth another try
        for old in [k for k in self.jobs if k[1] < key[1] - 1]:  # keep only recent rounds' answers
            self.jobs.pop(old, None)
            self.answers.pop(old, None)
        self.jobs[key] = "working"
        return True

    async def _on_request_update(self, data: dict) -> None:
        rnd = int(data["round_number"])
        key = ("update", rnd)
        if not self._claim(key):
            if self.jobs.get(key) == "sent":
                self.echo(f"[{self.client_id}] round {rnd}: the server asked again; re-sending the update")
                await self._deliver_update(key, *self.answers[key])
            return
        try:
            weights = await self._weights_of(data, rnd, "global")
        except transfer.TransferError as exc:
            answer, blob = {"round_number": rnd, "ok": False, "train_size": 0, "train_loss": 0.0,
                            "reason": f"the global weights could not be downloaded: {exc}"}, None
        else:
            async with self.work_lock:
                self.echo(f"[{self.client_id}] round {rnd}: training")
                answer = await self._offload(self._train, rnd, weights, data.get("settings") or {},
                                             data.get("secagg"))
            blob = answer.pop("weights", None)
        if not answer["ok"]:
            self.echo(f"[{self.client_id}] round {rnd}: training failed: {answer['reason']}")
        self.answers[key] = (answer, blob)
        await self._deliver_update(key, answer, blob)

    async def _deliver_update(self, key: tuple[str, int], answer: dict, blob: bytes | None) -> None:
        """Send a round's update: the weights inline (v1), or uploaded in chunks first (v2)."""
        self.jobs[key] = "sending"
        message = dict(answer)
        if blob is not None:
            if self.protocol_version >= 2:
                try:
                    message["weights_ref"] = await transfer.upload(self._call, blob, key[1],
                                                                   version=self.protocol_version,
                                                                   chunk_bytes=self.chunk_bytes)
                except transfer.TransferError as exc:
                    self.echo(f"[{self.client_id}] round {key[1]}: the upload failed: {exc}")
                    self.jobs[key] = "sent"
                    return
            else:
                message["weights"] = blob if isinstance(blob, bytes) else blob.to_bytes()
        sent = await self._send(P.CLIENT_UPDATE, message)
        self.jobs[key] = "sent" if sent else "working"

    def _evaluate(self, rnd: int, weights: bytes) -> dict:
        try:
            self._load_global(weights)
        except WireError as exc:
            return {"round_number": rnd, "ok": False, "test_size": 0, "test_loss": 0.0, "test_map": 0.0,
                    "test_recall": 0.0, "reason": f"the global weights were rejected: {exc}"}
        try:
            result = self._call_hook("detector", "fedplug_evaluate", EvalResult, model=self.model,
                                     dataset=self.data.test, settings=self.eval_settings)
            stats = result.stats.to_json() if result.stats is not None else None
            for name in ("map50", "recall"):
                if not 0.0 <= float(getattr(result, name)) <= 1.0:
                    raise HookFailed(f"detector {self.plugins.selected['detector'].describe()} returned "
                                     f"EvalResult.{name}={getattr(result, name)!r} from fedplug_evaluate; "
                                     "it must be within [0, 1]")
        except (HookFailed, AttributeError, TypeError, ValueError) as exc:
            log.exception("round %d: evaluation failed", rnd)
            return {"round_number": rnd, "ok": False, "test_size": 0, "test_loss": 0.0, "test_map": 0.0,
                    "test_recall": 0.0, "reason": str(exc)}
        metrics = numeric_metrics(result.metrics)
        return {"round_number": rnd, "ok": True, "test_size": int(result.num_examples),
                "test_loss": float(result.loss) if math.isfinite(result.loss) else 0.0,
                "test_map": float(result.map50), "test_recall": float(result.recall),
                "stats": stats, "metrics": metrics}

    async def _on_stop_and_eval(self, data: dict) -> None:
        rnd = int(data["round_number"])
        key = ("eval", rnd)
        if not self._claim(key):
            if self.jobs.get(key) == "sent":
                await self._send(P.CLIENT_EVAL, self.answers[key][0])
            return
        try:
            weights = await self._weights_of(data, rnd, "evaluation")
        except transfer.TransferError as exc:
            answer = {"round_number": rnd, "ok": False, "test_size": 0, "test_loss": 0.0, "test_map": 0.0,
                      "test_recall": 0.0, "reason": f"the global weights could not be downloaded: {exc}"}
        else:
            async with self.work_lock:
                answer = await self._offload(self._evaluate, rnd, weights)
        self.answers[key] = (answer, None)
        self.jobs[key] = "sending"
        self.jobs[key] = "sent" if await self._send(P.CLIENT_EVAL, answer) else "working"
        if answer["ok"]:
            self.echo(f"[{self.client_id}] round {rnd}: mAP@0.5 {answer['test_map']:.4f} on {answer['test_size']} images")
        else:
            self.echo(f"[{self.client_id}] round {rnd}: evaluation failed: {answer['reason']}")
        if data.get("STOP"):
            self.done.set()

    # ------------------------------------------------------------------ run

    def auth_payload(self) -> dict[str, str]:
        """The Socket.IO ``connect`` ``auth``: the site's id with its secret, or the shared token (docs/security.md)."""
        auth = {"client_id": self.client_id}
        if self.secret:
            auth["secret"] = self.secret
        elif self.token:
            auth["token"] = str(self.token)
        return auth

    async def _hopeless(self, failures: int) -> str | None:
        """Why connecting cannot succeed by trying again: credentials refused, or TLS set up wrong; else None."""
        refused = self._refused
        if refused is not None and "too many failed" not in refused:  # a lock-out ends by itself: keep trying
            return f"the server refused this client: {refused}"
        if failures == 1 or failures % 10 == 0:  # one TLS probe per streak of failures, not one per retry
            why = await asyncio.get_running_loop().run_in_executor(
                None, tls.diagnose, self.server_url, self.ssl_context, 5.0, self.client_cert)
            if why is not None:
                return why
        return None

    async def run(self) -> int:
        """Connect, and reconnect with capped exponential back-off and jitter until the run ends.

        A server that is gone longer than ``reconnect_timeout_s`` ends this client with
        one line and status 3 (never reached) or 4 (lost).
        """
        waiter = asyncio.get_running_loop().create_task(self.done.wait())
        first_try = time.monotonic()
        ever_connected = False
        failures = 0
        while not self.done.is_set():
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                self.echo(f"[{self.client_id}] the fedplug server that started this client has exited; stopping")
                self.exit_status = self.exit_status or 5
                break
            if not self.sio.connected and self.sio.eio.state == "disconnected":
                since = self._lost_at if ever_connected and self._lost_at is not None else first_try
                if time.monotonic() - since > self.reconnect_timeout_s or (
                        self.reconnect_attempts and failures >= self.reconnect_attempts):
                    if ever_connected:
                        self.echo(f"[{self.client_id}] lost the server at {self.server_url} and could not "
                                  f"reconnect within {time.monotonic() - since:.0f}s "
                                  f"(client.reconnect_timeout_s={self.reconnect_timeout_s:g}); giving up")
                        self.exit_status = self.exit_status or 4
                    else:
                        self.echo(f"[{self.client_id}] cannot reach the server at {self.server_url} "
                                  f"(tried for {time.monotonic() - since:.0f}s); check client.server_url "
                                  "and that the server runs")
                        self.exit_status = self.exit_status or 3
                    break
                try:
                    self._refused = None
                    await self.sio.connect(self.server_url, auth=self.auth_payload(), transports=["websocket"],
                                           wait_timeout=10)
                except (socketio.exceptions.ConnectionError, OSError, asyncio.TimeoutError) as exc:
                    failures += 1
                    refusal = await self._hopeless(failures)
                    if refusal is not None:
                        self.echo(f"[{self.client_id}] cannot connect to {self.server_url}: {refusal}")
                        self.exit_status = self.exit_status or 6
                        break
                    delay = min(self.reconnect_delay_max_s, 0.5 * 2 ** min(failures, 16)) * random.uniform(0.5, 1.0)
                    log.info("connecting to %s failed (%s); next try in %.1fs", self.server_url, exc, delay)
                    await asyncio.wait([waiter], timeout=delay)
                    continue
                if ever_connected and self._lost_at is not None:
                    self.echo(f"[{self.client_id}] reconnected to the server after "
                              f"{time.monotonic() - self._lost_at:.0f}s")
                ever_connected, failures = True, 0
            await asyncio.wait([waiter], timeout=1.0)
            self._check_heartbeat()
        try:
            await asyncio.wait_for(self.sio.disconnect(), 5.0)
        except Exception:  # a dead link: just drop it
            self._abort_transport()
        self.pool.shutdown(wait=False, cancel_futures=True)
        return self.exit_status
