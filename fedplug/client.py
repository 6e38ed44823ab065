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
import socket
import time
from typing import Any, Mapping

import socketio
import torch

from fedplug import protocol as P
from fedplug.plugins import activate
from fedplug.evaluation import eval_settings_from
from fedplug.types import EvalResult, ResourceReport, TrainResult, TrainSettings
from fedplug.wire import WireError, decode_checked, encode_state, spec_of

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
    def __init__(self, server_url: str, client_id: str | None, data_spec: Mapping[str, Any],
                 device: str = "cpu", token: str | None = None, augment: Mapping | None = None,
                 reconnect_attempts: int = 20, max_message_mb: float = 1024, echo=print):
        self.server_url = server_url
        self.client_id = client_id or f"{socket.gethostname()}-{os.getpid()}"
        self.data_spec = dict(data_spec)
        self.augment = dict(augment) if augment else None
        self.device = resolve_device(device)
        self.token = token
        self.echo = echo
        max_bytes = int(max_message_mb * 1024 * 1024)
        self.max_bytes = max_bytes
        self.sio = socketio.AsyncClient(
            reconnection=True, reconnection_attempts=reconnect_attempts, reconnection_delay=0.5,
            reconnection_delay_max=5, logger=False, engineio_logger=False,
            websocket_extra_options={"max_msg_size": max_bytes},
        )
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
        # how this client finds the detector and policy the server names; tests put in-process plugins here
        self.activate_plugins = activate
        self._register_handlers()

    async def _send(self, event: str, payload: dict, wait: float = 120.0) -> None:
        """Emit, waiting (bounded) for a reconnect first: an update trained during an outage is not lost."""
        deadline = time.monotonic() + wait
        while not self.sio.connected and time.monotonic() < deadline and not self.done.is_set():
            await asyncio.sleep(0.2)
        await self.sio.emit(event, payload)

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
            await sio.emit(P.CLIENT_WAKE_UP, {
                "client_id": self.client_id, "protocol_version": P.PROTOCOL_VERSION,
                "token": self.token, "info": {"device": self.device, "host": socket.gethostname()},
            })

        @sio.event
        async def disconnect(*args):
            log.warning("disconnected from the server; python-socketio reconnects unless the run ended")

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

        @sio.on(P.RUN_FINISHED)
        async def run_finished(data):
            self.echo(f"[{self.client_id}] run finished: {(data or {}).get('reason', '')}")
            self.done.set()

        @sio.on(P.PROTOCOL_ERROR)
        async def protocol_error(data):
            self.echo(f"[{self.client_id}] the server rejected {data.get('event')}: {data.get('reason')}")

    # ------------------------------------------------------------------ handlers

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
        async with self.work_lock:
            try:
                num_train, num_test = await self._offload(self._setup, data)
            except Exception as exc:  # a missing plugin, dataset or weights file: say which, and leave
                log.exception("setup failed")
                self.echo(f"[{self.client_id}] cannot take part: {type(exc).__name__}: {exc}")
                self.exit_status = 2
                self.done.set()
                return
            await self.sio.emit(P.CLIENT_READY, {"client_id": self.client_id,
                                                 "num_train": num_train, "num_test": num_test})

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

    def _train(self, rnd: int, weights: bytes, settings: dict) -> dict:
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
            weights = encode_state(result.weights)
        except (HookFailed, WireError, AttributeError, TypeError, ValueError) as exc:  # a failed round, not a dead client
            log.exception("round %d: training failed", rnd)
            return {"round_number": rnd, "ok": False, "train_size": 0, "train_loss": 0.0,
                    "reason": str(exc) if isinstance(exc, HookFailed) else
                    f"the detector's training result cannot be sent: {type(exc).__name__}: {exc}"}
        return {"round_number": rnd, "ok": True, "weights": weights,
                "train_size": int(result.num_examples), "train_loss": loss,
                "seconds": time.monotonic() - t0, "metrics": numeric_metrics(result.metrics)}

    async def _on_request_update(self, data: dict) -> None:
        rnd = int(data["round_number"])
        async with self.work_lock:
            self.echo(f"[{self.client_id}] round {rnd}: training")
            answer = await self._offload(self._train, rnd, data["weights"], data.get("settings") or {})
        if not answer["ok"]:
            self.echo(f"[{self.client_id}] round {rnd}: training failed: {answer['reason']}")
        await self._send(P.CLIENT_UPDATE, answer)

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
        async with self.work_lock:
            answer = await self._offload(self._evaluate, rnd, data["weights"])
        await self._send(P.CLIENT_EVAL, answer)
        if answer["ok"]:
            self.echo(f"[{self.client_id}] round {rnd}: mAP@0.5 {answer['test_map']:.4f} on {answer['test_size']} images")
        else:
            self.echo(f"[{self.client_id}] round {rnd}: evaluation failed: {answer['reason']}")
        if data.get("STOP"):
            self.done.set()

    # ------------------------------------------------------------------ run

    async def run(self, connect_timeout: float = 60.0) -> int:
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                await self.sio.connect(self.server_url, transports=["websocket"], wait_timeout=10)
                break
            except socketio.exceptions.ConnectionError as exc:
                if time.monotonic() > deadline:
                    self.echo(f"[{self.client_id}] cannot reach the server at {self.server_url}: {exc}; "
                              "check client.server_url and that the server runs")
                    return 3
                await asyncio.sleep(1.0)
        waiter = asyncio.get_running_loop().create_task(self.done.wait())
        while not self.done.is_set():
            await asyncio.wait([waiter], timeout=1.0)
            if not self.sio.connected and not self.done.is_set() and self.sio._reconnect_task is None:
                self.echo(f"[{self.client_id}] lost the server at {self.server_url} and could not reconnect")
                self.exit_status = self.exit_status or 4
                break
        try:
            await self.sio.disconnect()
        except Exception:
            pass
        self.pool.shutdown(wait=False, cancel_futures=True)
        return self.exit_status
