"""The dashboard's HTTP routes on the server's own port, and :func:`attach`, which adds them.

``FederationServer.__init__`` calls :func:`attach` when ``dashboard.enabled``
is true, after ``/status`` is routed and before the aiohttp app starts:

=========================  ==================================================
``GET /``                  redirects to ``/dashboard/``
``GET /dashboard/``        the page (plain HTML, JS modules and CSS, shipped
                           with fedplug: it works with no internet)
``GET /dashboard/static/…``  its scripts and style sheet
``GET /dashboard/state``   the whole picture once, as JSON (for scripts)
``GET /dashboard/events``  server-sent events: ``snapshot`` (the whole
                           picture: on opening, and again whenever this page
                           fell behind), ``row`` (one event row, the client it
                           changed, phase and round), ``round`` (a finished
                           round and the best one so far), ``status``
                           (phase or round changed with no row to carry
                           it), ``bye`` (the server is stopping)
=========================  ==================================================

Everything is read-only.  Who may look is decided by one function,
:func:`check_access`: the server's ``authorize_http(request)`` when it has
one (the same check ``/status`` uses), else everyone who reaches the port.
A dashboard that fails to start logs a warning and leaves the run alone.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from importlib import resources
from typing import Any, Mapping

from aiohttp import web

from fedplug.dashboard.live import ClientState, LiveState
from fedplug.dashboard.snapshot import best_of, plain_config, round_row, snapshot, status
from fedplug.dashboard.stream import CLOSE, RESYNC, Hub, jsonable, sse

log = logging.getLogger("fedplug.dashboard")

STATIC_TYPES = {"app.js": "text/javascript", "chart.js": "text/javascript", "style.css": "text/css"}
KEEPALIVE_S = 15.0  # a comment line this often lets both ends notice a dead connection
STATUS_CHECK_S = 0.5  # how often the phase is compared with what the pages were last told
# the rows the server writes once a finished round is in server.history: its outputs were
# committed, or their write failed and the run went on (run.on_write_error=continue)
ROUND_DONE_EVENTS = ("round_committed", "write_failed")


def attach(server: Any) -> "Dashboard | None":
    """Serve the dashboard of ``server`` on ``server.app``; returns it, or None if it could not start."""
    try:
        dashboard = Dashboard(server)
        dashboard.install()
    except Exception as exc:  # the page is a view: a missing file or odd setting must not stop a run
        log.warning("the dashboard is off for this run: %s", exc, exc_info=True)
        return None
    return dashboard


async def check_access(server: Any, request: web.Request) -> None:
    """Raise an HTTP error unless ``request`` may read the run: the one access decision of the dashboard.

    ``server.authorize_http(request)`` decides when the server has it (it may be
    a coroutine function): it may raise an ``aiohttp.web.HTTPException`` itself, or
    return False to refuse; anything else admits.  Without it the dashboard is
    open to whoever reaches the port, exactly like ``/status``.
    """
    authorize = getattr(server, "authorize_http", None)
    if authorize is None:
        return
    verdict = authorize(request)
    if inspect.isawaitable(verdict):
        verdict = await verdict
    if verdict is False:
        raise web.HTTPUnauthorized(text="not authorized to view this run: use the credentials /status accepts")


class Dashboard:
    """One server's dashboard: its live state, open pages and handlers."""

    def __init__(self, server: Any):
        options = server.cfg.get("dashboard") or {}
        self.server = server
        self.live = LiveState(max_events=int(options.get("recent_events", 200)))
        self.hub = Hub(self.live, max_queue=int(options.get("max_queue", 1000)),
                       max_viewers=int(options.get("max_viewers", 20)), encode=self._encode)
        self.static = {name: _read_static(name) for name in ("index.html", *STATIC_TYPES)}
        self._config: Mapping[str, Any] | None = None
        self._status_task: asyncio.Task | None = None

    def install(self) -> None:
        app = self.server.app
        app.router.add_get("/", self._redirect)
        app.router.add_get("/dashboard", self._redirect)
        app.router.add_get("/dashboard/", self._page)
        app.router.add_get("/dashboard/static/{name}", self._static)
        app.router.add_get("/dashboard/state", self._state)
        app.router.add_get("/dashboard/events", self._events)
        app.on_startup.append(self._startup)
        app.on_shutdown.append(self._shutdown)
        self.server.events.listeners.append(self.hub.listener)

    # ------------------------------------------------------------------ lifecycle

    async def _startup(self, app: web.Application) -> None:
        self.hub.start(asyncio.get_running_loop())
        self._status_task = asyncio.get_running_loop().create_task(self._watch_status())

    async def _shutdown(self, app: web.Application) -> None:
        if self._status_task is not None:
            self._status_task.cancel()
        # open streams would hold the server's shutdown for its whole timeout: end them now
        self.hub.stop()

    async def _watch_status(self) -> None:
        """Tell the pages when the phase changes without an event row (e.g. ``finished`` after the last one).

        Rows carry the phase too; this catches the changes no row follows.  It
        reads two attributes twice a second: nothing a run would notice.
        """
        told = status(self.server)
        while True:
            await asyncio.sleep(STATUS_CHECK_S)
            now = status(self.server)
            if now != told:
                told = now
                self.hub.broadcast(sse("status", now))

    # ------------------------------------------------------------------ what is sent

    def config(self) -> Mapping[str, Any]:
        if self._config is None:  # resolved once: the config does not change during a run
            self._config = plain_config(self.server)
        return self._config

    def snapshot(self) -> dict[str, Any]:
        return snapshot(self.server, self.live, self.config())

    def _client_json(self, client: ClientState | None) -> dict[str, Any] | None:
        if client is None:
            return None
        slot = (getattr(self.server, "clients", None) or {}).get(client.client_id)
        return {**client.to_json(), "connected": slot is not None and slot.sid is not None}

    def _encode(self, row: Mapping[str, Any], client: ClientState | None) -> list[bytes]:
        """The messages one row becomes (called on the loop by :class:`Hub`)."""
        messages = [sse("row", {"row": row, "client": self._client_json(client), **status(self.server)})]
        if row.get("event") in ROUND_DONE_EVENTS:
            history = getattr(self.server, "history", [])
            record = next((r for r in reversed(history) if r.round_number == row.get("round")), None)
            if record is not None:
                messages.append(sse("round", {"record": round_row(record), "best": best_of(self.server)}))
        return messages

    # ------------------------------------------------------------------ handlers

    async def _redirect(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/dashboard/")

    async def _page(self, request: web.Request) -> web.Response:
        await check_access(self.server, request)
        return web.Response(body=self.static["index.html"], content_type="text/html", charset="utf-8",
                            headers={"Cache-Control": "no-cache"})

    async def _static(self, request: web.Request) -> web.Response:
        await check_access(self.server, request)
        name = request.match_info["name"]
        if name not in STATIC_TYPES:  # a fixed list: no path from the request ever reaches the file system
            raise web.HTTPNotFound(text=f"no dashboard file {name!r}")
        return web.Response(body=self.static[name], content_type=STATIC_TYPES[name], charset="utf-8",
                            headers={"Cache-Control": "no-cache"})

    async def _state(self, request: web.Request) -> web.Response:
        await check_access(self.server, request)
        return web.Response(body=json.dumps(jsonable(self.snapshot()), default=str).encode(), content_type="application/json")

    async def _events(self, request: web.Request) -> web.StreamResponse:
        await check_access(self.server, request)
        subscriber = self.hub.subscribe()
        if subscriber is None:
            raise web.HTTPServiceUnavailable(
                text=f"{self.hub.max_viewers} dashboard pages are already open (dashboard.max_viewers), "
                     "or the server is stopping; close one and reload")
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            await response.prepare(request)
            await response.write(b"retry: 2000\n\n")  # the browser reconnects after 2 s if the line drops
            while True:
                item = await subscriber.next(KEEPALIVE_S)
                if item is CLOSE:
                    await response.write(sse("bye", {**status(self.server), "best": best_of(self.server)}))
                    break
                if item is RESYNC:
                    await response.write(sse("snapshot", self.snapshot()))
                elif item is None:
                    await response.write(b": keep-alive\n\n")
                else:
                    await response.write(item)
        except (ConnectionError, RuntimeError):  # the page went away (closed tab, dropped link)
            pass
        finally:
            self.hub.unsubscribe(subscriber)
        return response


def _read_static(name: str) -> bytes:
    return (resources.files("fedplug.dashboard") / "static" / name).read_bytes()
