"""The live dashboard: routes on the server's port, the server-sent-event stream, its bounds and access.

Fast: the real server over real sockets with scripted clients (no training).
The browser itself is driven in tests/test_dashboard_browser.py.
"""

import asyncio
import json
import threading
import time

import aiohttp
import pytest

from fedplug.config import ConfigError, validate
from fedplug.dashboard import routes
from fedplug.dashboard.live import LiveState
from fedplug.dashboard.stream import CLOSE, RESYNC, Hub, Subscriber
from fedplug.server import FederationServer
from scripted import ScriptedClient, compose_cfg, toy_plugins

CLASSES = ("car", "person", "sign")


async def _collect_sse(session, url, into: list, opened: asyncio.Event | None = None):
    """Read a server-sent-event stream into ``into`` as (event, data) until the server ends it."""
    async with session.get(url) as response:
        assert response.status == 200 and response.content_type == "text/event-stream"
        if opened is not None:
            opened.set()
        event = None
        async for raw in response.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event:"):
                event = line[len("event:"):].strip()
            elif line.startswith("data:"):
                into.append((event, json.loads(line[len("data:"):])))


async def _federation_with_a_viewer(cfg, run_dir, behaviours):
    """Run a scripted federation while one page is subscribed; return (status, server, messages, state)."""
    server = FederationServer(cfg, toy_plugins(), CLASSES, run_dir, echo=lambda *a: None)
    port = await server.start()
    base = f"http://127.0.0.1:{port}"
    messages: list = []
    async with aiohttp.ClientSession() as session:
        opened = asyncio.Event()
        reader = asyncio.create_task(_collect_sse(session, base + "/dashboard/events", messages, opened))
        await asyncio.wait_for(opened.wait(), 10)
        clients = [ScriptedClient(base, cid, b) for cid, b in behaviours.items()]
        try:
            for c in clients:
                await c.start()
            status = await asyncio.wait_for(server.run_federation(), 60)
            async with session.get(base + "/dashboard/state") as r:
                state = await r.json()
        finally:
            for c in clients:
                await c.close()
            t0 = time.monotonic()
            await server.stop()
            stop_s = time.monotonic() - t0
        await asyncio.wait_for(reader, 10)  # the server ended the stream itself ("bye")
    return status, server, messages, state, stop_s


def test_the_stream_pushes_every_row_client_state_and_finished_round(tmp_path):
    cfg = compose_cfg("run.rounds=2", "run.min_clients=2", "run.clients_per_round=2", "run.num_clients=2",
                      "client.token=hunter2")
    status, server, messages, state, stop_s = asyncio.run(
        _federation_with_a_viewer(cfg, tmp_path, {"a": "good", "b": "good"}))
    assert status == 0
    kinds = [k for k, _ in messages]
    assert kinds[0] == "snapshot" and kinds[-1] == "bye"
    rows = [d for k, d in messages if k == "row"]
    # every row of the event log reached the page, in order
    logged = [json.loads(line)["event"] for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [d["row"]["event"] for d in rows] == logged[:len(rows)] and len(rows) >= len(logged) - 2
    # a client's state follows the protocol: training when asked, done when its update came
    a_states = [(d["row"]["event"], d["client"]["state"]) for d in rows if d["row"].get("client_id") == "a" and d["client"]]
    assert ("request_update", "training") in a_states and ("client_update", "done") in a_states
    assert ("stop_and_eval", "evaluating") in a_states and ("run_finished", "finished") in a_states
    done = next(d["client"] for d in rows if d["row"]["event"] == "client_update" and d["row"]["client_id"] == "a")
    assert done["bytes_up"] == next(d["row"]["bytes"] for d in rows
                                    if d["row"]["event"] == "client_update" and d["row"]["client_id"] == "a")
    assert "training" in done["durations"]
    # each finished round is announced with its figures, as the server recorded them
    rounds = [d for k, d in messages if k == "round"]
    assert [r["record"]["round"] for r in rounds] == [1, 2]
    assert [r["record"]["map50"] for r in rounds] == [rec.map50 for rec in server.history]
    assert rounds[-1]["best"]["checkpoint"].endswith("best.safetensors")
    assert [d["round"] for d in rows][-1] == 2 and rows[-1]["rounds"] == 2
    # the one-shot state: the whole picture, secrets hidden
    assert [r["round"] for r in state["history"]] == [1, 2]
    assert {c["client_id"] for c in state["clients"]} == {"a", "b"}
    assert state["config"]["client"]["token"] == "***" and "hunter2" not in json.dumps(state)
    assert stop_s < 5, "an open page held up the server's shutdown"


def test_the_page_and_its_files_are_served_from_the_server_port(tmp_path):
    cfg = compose_cfg("run.rounds=1")

    async def go():
        server = FederationServer(cfg, toy_plugins(), CLASSES, tmp_path, echo=lambda *a: None)
        port = await server.start()
        base = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession() as s:
                async with s.get(base + "/", allow_redirects=False) as r:
                    assert r.status == 302 and r.headers["Location"] == "/dashboard/"
                async with s.get(base + "/dashboard/") as r:
                    page = await r.text()
                    assert r.status == 200 and r.content_type == "text/html"
                for name in ("app.js", "chart.js"):
                    async with s.get(base + f"/dashboard/static/{name}") as r:
                        assert r.status == 200 and r.content_type == "text/javascript"  # JS modules need it
                async with s.get(base + "/dashboard/static/style.css") as r:
                    assert r.status == 200 and r.content_type == "text/css"
                for bad in ("secret.txt", "..%2F..%2Fserver.py", "index.html"):
                    async with s.get(base + f"/dashboard/static/{bad}") as r:
                        assert r.status == 404, bad
                async with s.get(base + "/status") as r:
                    assert r.status == 200  # the dashboard leaves /status alone
        finally:
            await server.stop()
        return page

    page = asyncio.run(go())
    # offline: nothing is fetched from anywhere but this server
    assert "http://" not in page and "https://" not in page and 'src="static/app.js"' in page


def test_access_is_the_servers_authorize_http_when_it_has_one(tmp_path):
    cfg = compose_cfg("run.rounds=1")

    async def go():
        server = FederationServer(cfg, toy_plugins(), CLASSES, tmp_path, echo=lambda *a: None)
        calls = []

        async def authorize_http(request):  # the issue-9 check: may be a coroutine function
            calls.append(request.path)
            return request.headers.get("X-Key") == "letmein"

        server.authorize_http = authorize_http
        port = await server.start()
        base = f"http://127.0.0.1:{port}"
        codes = {}
        try:
            async with aiohttp.ClientSession() as s:
                for path in ("/dashboard/", "/dashboard/state", "/dashboard/events", "/dashboard/static/app.js"):
                    async with s.get(base + path) as r:
                        codes[path] = r.status
                async with s.get(base + "/dashboard/state", headers={"X-Key": "letmein"}) as r:
                    codes["with key"] = r.status
        finally:
            await server.stop()
        return codes, calls

    codes, calls = asyncio.run(go())
    assert codes.pop("with key") == 200
    assert set(codes.values()) == {401}, codes
    assert "/dashboard/events" in calls


def test_a_dashboard_that_cannot_start_leaves_the_run_alone(tmp_path, monkeypatch, caplog):
    from scripted import run_scripted_federation

    def missing(name):
        raise FileNotFoundError(f"static/{name} is not installed")

    monkeypatch.setattr(routes, "_read_static", missing)
    cfg = compose_cfg("run.rounds=1", "run.min_clients=1", "run.clients_per_round=1", "run.num_clients=1")
    with caplog.at_level("WARNING", logger="fedplug.dashboard"):
        status, server, _ = asyncio.run(run_scripted_federation(cfg, tmp_path, {"a": "good"}))
    assert status == 0 and len(server.history) == 1
    assert "the dashboard is off for this run" in caplog.text
    assert server.events.listeners == []


def test_dashboard_enabled_false_serves_no_page(tmp_path):
    cfg = compose_cfg("run.rounds=1", "dashboard.enabled=false")

    async def go():
        server = FederationServer(cfg, toy_plugins(), CLASSES, tmp_path, echo=lambda *a: None)
        port = await server.start()
        try:
            async with aiohttp.ClientSession() as s:
                async with s.get(f"http://127.0.0.1:{port}/dashboard/") as r:
                    return r.status, list(server.events.listeners)
        finally:
            await server.stop()

    status, listeners = asyncio.run(go())
    assert status == 404 and listeners == []


def test_more_pages_than_max_viewers_are_told_why(tmp_path):
    cfg = compose_cfg("run.rounds=1", "dashboard.max_viewers=1")

    async def go():
        server = FederationServer(cfg, toy_plugins(), CLASSES, tmp_path, echo=lambda *a: None)
        port = await server.start()
        url = f"http://127.0.0.1:{port}/dashboard/events"
        async with aiohttp.ClientSession() as s:
            first: list = []
            try:
                opened = asyncio.Event()
                reader = asyncio.create_task(_collect_sse(s, url, first, opened))
                await asyncio.wait_for(opened.wait(), 10)
                async with s.get(url) as r:
                    second = r.status, await r.text()
            finally:
                await server.stop()
            await asyncio.wait_for(reader, 10)  # the first page was told "bye"
        return second, first

    (code, text), first = asyncio.run(go())
    assert code == 503 and "dashboard.max_viewers" in text
    assert first[0][0] == "snapshot" and first[-1][0] == "bye"


# ---------------------------------------------------------------------- bounds, threads


def test_a_page_that_stops_reading_costs_at_most_max_queue_messages():
    async def go():
        hub = Hub(LiveState(), max_queue=16)
        hub.start(asyncio.get_running_loop())
        slow = hub.subscribe()
        assert await slow.next(0.1) is RESYNC  # a new page gets the whole picture first
        sizes = []
        for i in range(5000):  # the page never reads
            hub.deliver({"time": float(i), "event": "transfer_progress", "client_id": "a", "direction": "up",
                         "bytes_done": i, "bytes_total": 5000})
            sizes.append(len(slow.queue))
        assert max(sizes) <= 16 and slow.overflows > 0
        # when it reads again it gets a fresh snapshot, then only what is new
        assert await slow.next(0.1) is RESYNC
        hub.deliver({"time": 1.0, "event": "client_ready", "direction": "in", "client_id": "a"})
        message = await slow.next(0.1)
        assert b"client_ready" in message
        assert await slow.next(0.05) is None  # quiet: the handler sends a keep-alive
        hub.stop()
        assert await slow.next(0.1) is CLOSE

    asyncio.run(go())


def test_rows_from_worker_threads_reach_the_page_through_the_loop():
    async def go():
        hub = Hub(LiveState(max_events=10_000))
        loop = asyncio.get_running_loop()
        hub.start(loop)
        seen_on = set()
        encode = hub.encode

        def recording_encode(row, client):
            seen_on.add(threading.get_ident())
            return encode(row, client)

        hub.encode = recording_encode
        page = hub.subscribe()
        await page.next(0.1)

        def worker(k):
            for i in range(200):
                hub.listener({"time": time.time(), "event": "client_update", "direction": "in",
                              "client_id": f"c{k}", "round": 1, "ok": True, "bytes": 10})

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        await asyncio.sleep(0.2)
        return hub, seen_on, len(page.queue)

    hub, seen_on, queued = asyncio.run(go())
    assert seen_on == {threading.main_thread().ident}  # applied on the loop only
    assert {cid: c.bytes_up for cid, c in hub.live.clients.items()} == {f"c{k}": 2000 for k in range(4)}
    assert queued == 800


def test_subscriber_queue_resyncs_instead_of_growing():
    async def go():
        s = Subscriber(max_queue=3)
        assert await s.next(0) is RESYNC
        for i in range(3):
            s.push(b"m%d" % i)
        s.push(b"overflow")
        return s

    s = asyncio.run(go())
    assert len(s.queue) == 0 and s.resync and s.overflows == 1


# ---------------------------------------------------------------------- client states


def test_client_states_follow_the_event_rows():
    live = LiveState()
    t = 1000.0

    def row(event, direction, cid="a", rnd=None, dt=1.0, **extra):
        nonlocal t
        t += dt
        return live.apply({"time": t, "event": event, "direction": direction, "round": rnd, "client_id": cid, **extra})

    row("client_wake_up", "in")
    assert live.clients["a"].state == "connected"
    row("client_ready", "in", num_train=12, num_test=6)
    assert (live.clients["a"].state, live.clients["a"].num_train) == ("ready", 12)
    row("check_client_resource", "out", rnd=1)
    row("check_client_resource_done", "in", rnd=1, dt=0.5)
    row("request_update", "out", rnd=1)
    asked = t
    live.apply({"time": asked + 0.2, "event": "transfer_progress", "client_id": "a", "direction": "down", "round": 1,
                "bytes_done": 400, "bytes_total": 400})
    assert live.clients["a"].bytes_down == 400 and live.clients["a"].state == "training"
    live.apply({"time": asked + 5.0, "event": "transfer_progress", "client_id": "a", "direction": "up", "round": 1,
                "bytes_done": 50, "bytes_total": 300})
    c = live.clients["a"]
    assert c.state == "uploading" and c.transfer == {"direction": "up", "bytes_done": 50, "bytes_total": 300}
    assert c.durations == {"resource check": pytest.approx(0.5), "training": pytest.approx(5.0)}
    t = asked + 6.0
    row("client_update", "in", rnd=1, dt=0.0, ok=True, bytes=300)
    assert (c.state, c.bytes_up, c.transfer) == ("done", 300, None)
    assert c.durations["uploading"] == pytest.approx(1.0)
    row("stop_and_eval", "out", rnd=1)
    assert c.state == "evaluating"
    row("disconnect", "in", rnd=1)
    assert c.state == "dropped"
    row("client_wake_up", "in")
    row("update_rejected", "in", rnd=2, reason="shape mismatch")
    assert c.state == "failed" and c.last_error == "shape mismatch" and live.rejection_count == 1
    row("run_finished", "out", rnd=2)
    row("disconnect", "in", rnd=2)
    assert c.state == "finished"  # leaving after the end is no drop
    assert live.apply({"time": t, "event": "disconnect", "direction": "in", "client_id": None}) is None


def test_the_recent_events_and_rejections_are_bounded_and_cut_long_reasons():
    live = LiveState(max_events=5, max_rejections=3)
    for i in range(50):
        live.apply({"time": float(i), "event": "protocol_error", "direction": "out", "client_id": "x",
                    "reason": "A" * 100_000})
    assert len(live.events) == 5 and len(live.rejections) == 3 and live.rejection_count == 50
    assert all(len(r["reason"]) <= 501 for r in live.rejections)


# ---------------------------------------------------------------------- config


@pytest.mark.parametrize("override, message", [
    ("dashboard.enabled=maybe", "dashboard.enabled must be true or false, got 'maybe'"),
    ("dashboard.max_queue=2", "dashboard.max_queue must be an integer >= 16, got 2"),
    ("dashboard.max_viewers=0", "dashboard.max_viewers must be an integer >= 1, got 0"),
    ("ui.live=sometimes", "ui.live must be auto, true or false, got 'sometimes'"),
    ("ui.quiet=2", "ui.quiet must be true or false, got 2"),
])
def test_wrong_view_settings_stop_the_run_at_start_up(override, message):
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg(override))
    assert str(info.value) == message


def test_the_view_settings_default_to_an_enabled_dashboard_and_auto_terminal():
    cfg = compose_cfg()
    validate(cfg)
    assert cfg.dashboard.enabled is True and cfg.ui.live == "auto" and cfg.ui.quiet is False


def test_leaving_after_answering_the_last_evaluation_is_no_drop_but_dying_before_is():
    live = LiveState()
    for cid in ("a", "b"):
        live.apply({"time": 1.0, "event": "client_wake_up", "direction": "in", "client_id": cid})
        live.apply({"time": 2.0, "event": "stop_and_eval", "direction": "out", "client_id": cid, "round": 3,
                    "STOP": True})
    live.apply({"time": 3.0, "event": "client_eval", "direction": "in", "client_id": "a", "round": 3})
    for cid in ("a", "b"):
        live.apply({"time": 4.0, "event": "disconnect", "direction": "in", "client_id": cid, "round": 3})
    assert live.clients["a"].state == "finished" and live.clients["b"].state == "dropped"


def test_a_phase_change_that_no_row_carries_still_reaches_the_page(tmp_path):
    cfg = compose_cfg("run.rounds=1")

    async def go():
        server = FederationServer(cfg, toy_plugins(), CLASSES, tmp_path, echo=lambda *a: None)
        port = await server.start()
        messages: list = []
        async with aiohttp.ClientSession() as s:
            opened = asyncio.Event()
            reader = asyncio.create_task(_collect_sse(s, f"http://127.0.0.1:{port}/dashboard/events", messages,
                                                      opened))
            try:
                await asyncio.wait_for(opened.wait(), 10)
                server.phase = "finished"  # as after the last client left: no row follows
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline and not any(k == "status" for k, _ in messages):
                    await asyncio.sleep(0.1)
            finally:
                await server.stop()
            await asyncio.wait_for(reader, 10)
        return messages

    messages = asyncio.run(go())
    assert ("status", {"phase": "finished", "round": 0, "rounds": 1}) in messages


def test_every_file_of_the_page_is_package_data_so_a_wheel_installs_it():
    import fnmatch
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    mine = patterns.get("fedplug.dashboard", [])
    static = sorted(p.relative_to(root / "fedplug" / "dashboard").as_posix()
                    for p in (root / "fedplug" / "dashboard" / "static").iterdir())
    assert static == ["static/app.js", "static/chart.js", "static/index.html", "static/style.css"]
    missing = [f for f in static if not any(fnmatch.fnmatch(f, p) for p in mine)]
    assert not missing, f"add to [tool.setuptools.package-data] \"fedplug.dashboard\": {missing}"
    assert set(routes.STATIC_TYPES) | {"index.html"} == {Path(f).name for f in static}
