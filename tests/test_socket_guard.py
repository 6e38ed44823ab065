"""fedplug.socket_guard: the Socket.IO edge, driven by a raw WebSocket peer that writes Engine.IO/Socket.IO frames
by hand — what a hostile client can send that python-socketio's own client never would.

After every attack the server still serves (a well-formed event is handled), and no traceback is logged.
"""

import asyncio
import json
import logging

import aiohttp
import pytest
from aiohttp import web

from fedplug.security import ConnectionCounter
from fedplug.socket_guard import EdgeLimits, GuardedServer

MIB = 1 << 20


class App:
    """A GuardedServer with two events: ``hello`` admits the socket, ``echo`` records (and acknowledges) its payload."""

    def __init__(self, **limits):
        self.limits = EdgeLimits(**{"max_message_bytes": 5 * MIB, "handshake_timeout_s": 30.0, **limits})
        self.admitted, self.received, self.connects, self.disconnects = set(), [], [], []
        self.sio = GuardedServer(async_mode="aiohttp", limits=self.limits, transports=["websocket"],
                                 connections=ConnectionCounter(max_per_address=3, max_total=50),
                                 is_admitted=lambda sid: sid in self.admitted, server_events=["init"],
                                 ping_interval=5, ping_timeout=20)

        @self.sio.event
        async def connect(sid, environ, auth=None):
            self.connects.append(sid)

        @self.sio.event
        async def disconnect(sid, *args):
            self.disconnects.append(sid)

        @self.sio.on("hello")
        async def hello(sid, *args):
            self.admitted.add(sid)

        @self.sio.on("echo")
        async def echo(sid, *args):
            self.received.append(args)
            return {"ok": True, "n": len(args)}

    async def __aenter__(self):
        app = web.Application()
        self.sio.attach(app)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        await self.runner.cleanup()


class Peer:
    """A WebSocket speaking Engine.IO v4 / Socket.IO v5 by hand."""

    def __init__(self, port):
        self.url = f"http://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket"
        self.errors = []

    async def open(self, socketio_connect=True):
        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(self.url, max_msg_size=0)
        opened = await self.ws.receive(timeout=5)
        assert opened.data.startswith("0"), opened
        if socketio_connect:
            await self.ws.send_str("40")
            assert (await self.next_event(kind="40"))
        return self

    async def close(self):
        await self.ws.close()
        await self.session.close()

    async def next_event(self, kind="42", timeout=5.0):
        """The next Socket.IO packet of ``kind`` (answering pings); None when the connection closes first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"no {kind} packet within {timeout}s")
            try:
                msg = await self.ws.receive(timeout=left)
            except asyncio.TimeoutError:
                raise TimeoutError(f"no {kind} packet within {timeout}s") from None
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                return None
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            if msg.data == "2":
                await self.ws.send_str("3")
                continue
            if msg.data == "1":  # engine.io close
                return None
            if msg.data.startswith(kind):
                return msg.data[len(kind):]

    async def protocol_error(self, timeout=5.0):
        body = await self.next_event("42", timeout)
        assert body is not None, "connection closed instead of a protocol_error"
        name, payload = json.loads(body)
        assert name == "protocol_error", body
        return payload

    async def closed(self, timeout=5.0):
        try:
            while True:
                if await self.next_event("42", timeout) is None:
                    return True
        except TimeoutError:
            return False


@pytest.fixture
def no_tracebacks(caplog):
    caplog.set_level(logging.INFO)
    yield caplog
    tracebacks = [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert not tracebacks, [r.getMessage() for r in tracebacks]


def run(coro, timeout=60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def still_serves(app):
    peer = await Peer(app.port).open()
    await peer.ws.send_str('421["echo",{"x":1}]')
    ack = await peer.next_event("43")
    assert json.loads(ack[1:]) == [{"ok": True, "n": 1}]
    await peer.close()


def test_well_formed_events_pass_with_any_argument_count(no_tracebacks):
    async def go():
        async with App() as app:
            peer = await Peer(app.port).open()
            await peer.ws.send_str('42["echo"]')
            await peer.ws.send_str('42["echo",1,2,3]')
            await peer.ws.send_str('451-["echo",{"w":{"_placeholder":true,"num":0}}]')
            await peer.ws.send_bytes(b"\x00" * 100)
            for _ in range(50):
                if len(app.received) == 3:
                    break
                await asyncio.sleep(0.05)
            assert app.received[0] == () and app.received[1] == (1, 2, 3)
            assert app.received[2] == ({"w": b"\x00" * 100},)
            await peer.close()

    run(go())


@pytest.mark.parametrize("name", ["connect", "disconnect", "connect_error", "init"])
def test_reserved_event_names_are_refused_and_run_no_handler(name, no_tracebacks):
    async def go():
        async with App() as app:
            peer = await Peer(app.port).open()
            await peer.ws.send_str(json.dumps([name, "10.6.6.6"]).join(["42", ""]))
            error = await peer.protocol_error()
            assert error["event"] == name and "reserved" in error["reason"]
            assert len(app.connects) == 1 and app.disconnects == []  # the handlers did not run
            await peer.ws.send_str('42["echo"]')  # and the connection goes on
            await asyncio.sleep(0.2)
            assert app.received == [()]
            await peer.close()

    run(go())


@pytest.mark.parametrize("frame, reason", [
    ('42{"not":"a list"}', "list starting with its name"),
    ("42[]", "list starting with its name"),
    ("42[12,1]", "event names"),
    ('42["' + "e" * 100 + '"]', "event names"),
    ('42["a\\nb"]', "event names"),
    ("42[\"echo\", " + "9" * 5000 + "]", "undecodable"),  # over python's 4300-digit int limit
    ("42" + "[" * 50_000 + "]" * 50_000, "undecodable"),  # nesting deeper than the JSON decoder's recursion
    ("42" + "1" * 150 + '["echo"]', "undecodable"),  # a packet id of 150 digits
    ('42["echo",{', "undecodable"),
    ("49", "undecodable"),  # no such Socket.IO packet type
])
def test_undecodable_or_malformed_packets_get_a_protocol_error(frame, reason, no_tracebacks):
    async def go():
        async with App() as app:
            peer = await Peer(app.port).open()
            await peer.ws.send_str(frame)
            error = await peer.protocol_error()
            assert reason in error["reason"] and len(error["reason"]) <= 300
            await peer.close()
            await still_serves(app)

    run(go())


def test_bad_attachment_placeholders_and_empty_binary_messages_do_not_wedge_the_connection(no_tracebacks):
    async def go():
        async with App() as app:
            peer = await Peer(app.port).open()
            await peer.ws.send_str('451-["echo",{"_placeholder":true,"num":7}]')  # no attachment 7
            await peer.ws.send_bytes(b"abc")
            assert "undecodable" in (await peer.protocol_error())["reason"]
            await peer.ws.send_str('451-["echo",{"_placeholder":true,"num":"x"}]')
            await peer.ws.send_bytes(b"abc")
            assert "undecodable" in (await peer.protocol_error())["reason"]
            await peer.ws.send_str('450-["echo"]')  # binary, with no attachment: would swallow every later frame
            assert "1-8 binary attachments" in (await peer.protocol_error())["reason"]
            await peer.ws.send_str('421["echo",{"still":"here"}]')
            assert json.loads((await peer.next_event("43"))[1:]) == [{"ok": True, "n": 1}]
            await peer.close()

    run(go())


def test_a_message_is_bounded_with_all_its_attachments_before_they_are_buffered(no_tracebacks):
    async def go():
        async with App() as app:  # 5 MiB limit, 4 MiB frames: each frame alone passes
            peer = await Peer(app.port).open()
            placeholders = ",".join('{"_placeholder":true,"num":%d}' % i for i in range(2))
            await peer.ws.send_str(f'452-["echo",[{placeholders}]]')
            await peer.ws.send_bytes(b"\x00" * (4 * MIB))
            await peer.ws.send_bytes(b"\x00" * (4 * MIB))
            error = await peer.protocol_error()
            assert "over 5 MiB" in error["reason"] and "server.max_message_mb" in error["reason"]
            assert await peer.closed()
            assert app.received == []
            await peer.close()
            await still_serves(app)

    run(go())


def test_a_header_announcing_a_billion_attachments_is_refused_at_once(no_tracebacks):
    async def go():
        async with App() as app:
            peer = await Peer(app.port).open()
            await peer.ws.send_str('451000000000-["echo",{"_placeholder":true,"num":0}]')
            error = await peer.protocol_error()
            assert "announced 1000000000" in error["reason"]
            assert await peer.closed()
            assert not app.sio._binary_packet  # nothing held for it
            await peer.close()
            await still_serves(app)

    run(go())


def test_an_oversized_single_frame_closes_the_connection_with_a_reason_logged(no_tracebacks):
    async def go():
        async with App(max_message_bytes=1 * MIB) as app:
            peer = await Peer(app.port).open()
            await peer.ws.send_str('42["echo","' + "x" * (2 * MIB) + '"]')
            assert await peer.closed()
            await peer.close()
            await still_serves(app)

    run(go())
    assert any("WebSocket frame over 1 MiB" in r.getMessage() for r in no_tracebacks.records)


@pytest.mark.parametrize("frame", ["", "x", "9", "b!!!"])
def test_malformed_engine_io_frames_close_the_connection_without_a_traceback(frame, no_tracebacks):
    async def go():
        async with App() as app:
            peer = await Peer(app.port).open()
            await peer.ws.send_str(frame)
            assert await peer.closed()
            await peer.close()
            await still_serves(app)

    run(go())
    assert any("malformed Engine.IO frame" in r.getMessage() for r in no_tracebacks.records)


def test_connections_that_do_not_finish_the_handshake_in_time_are_closed(no_tracebacks):
    async def go():
        async with App(handshake_timeout_s=0.5) as app:
            silent = await Peer(app.port).open(socketio_connect=False)  # engine.io only
            connected = await Peer(app.port).open()  # socket.io connect, but no hello
            greeted = await Peer(app.port).open()
            await greeted.ws.send_str('42["hello"]')
            assert await silent.closed(timeout=5) and await connected.closed(timeout=5)
            assert not await greeted.closed(timeout=1.5)
            assert len(app.disconnects) == 1  # the connected one ran the disconnect handler
            for p in (silent, connected, greeted):
                await p.close()

    run(go())


def test_connections_per_address_are_bounded_and_freed_on_close(no_tracebacks):
    async def go():
        async with App() as app:
            peers = [await Peer(app.port).open(socketio_connect=False) for _ in range(3)]
            with pytest.raises(aiohttp.WSServerHandshakeError):
                await Peer(app.port).open(socketio_connect=False)
            await peers[0].close()
            await asyncio.sleep(0.3)
            peers[0] = await Peer(app.port).open(socketio_connect=False)
            for p in peers:
                await p.close()
            await asyncio.sleep(0.3)
            assert app.sio.connections.total == 0

    run(go())
    assert any("server.max_connections_per_address" in r.getMessage() for r in no_tracebacks.records)


def test_events_waiting_for_an_ack_get_a_refusal_as_their_ack(no_tracebacks):
    async def go():
        async with App() as app:
            peer = await Peer(app.port).open()
            await peer.ws.send_str('427["disconnect"]')
            ack = await peer.next_event("43")
            assert ack.startswith("7") and json.loads(ack[1:])[0]["ok"] is False
            await peer.close()

    run(go())


# ---------------------------------------------------------------------- fuzzing raw packets

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


class BackgroundApp:
    """An App on its own loop in a thread, so that hypothesis examples can share one server."""

    def __init__(self):
        import threading

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.app = self.call(self._start())

    async def _start(self):
        return await App(max_message_bytes=64 * 1024, max_bad_packets=3).__aenter__()

    def call(self, coro, timeout=30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.call(self.app.__aexit__(None, None, None))

        async def cancel_the_rest():  # engine.io's ping tasks of closed sockets
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.call(cancel_the_rest())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


_json_text = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8),
              st.just({"_placeholder": True, "num": 0}), st.just({"_placeholder": True, "num": 99})),
    lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=5), c, max_size=4)),
    max_leaves=12).map(lambda v: json.dumps(v))
_packet = st.builds(
    lambda kind, count, ns, ack, body: f"4{kind}{count}{ns}{ack}{body}",
    st.sampled_from(list("0123456789x")),
    st.one_of(st.just(""), st.integers(0, 12).map(lambda n: f"{n}-"), st.just("99999999999-")),
    st.sampled_from(["", "/", "/admin,", "/x?y=1,"]),
    st.one_of(st.just(""), st.integers(0, 10**6).map(str), st.just("9" * 120)),
    st.one_of(_json_text, st.text(max_size=30), _json_text.map(lambda j: f'["echo",{j}]'),
              _json_text.map(lambda j: f'["connect",{j}]')),
)
_frames = st.lists(st.one_of(_packet, st.binary(max_size=300), st.text(max_size=10)), min_size=1, max_size=6)


@pytest.fixture(scope="module")
def shared_app():
    app = BackgroundApp()
    yield app
    app.close()


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                               HealthCheck.too_slow])
@given(frames=_frames)
def test_fuzz_raw_packets_never_crash_or_leak(shared_app, caplog, frames):
    caplog.set_level(logging.INFO)

    async def attack():
        peer = await Peer(shared_app.app.port).open()
        for frame in frames:
            if peer.ws.closed:
                break
            if isinstance(frame, bytes):
                await peer.ws.send_bytes(frame)
            else:
                await peer.ws.send_str(frame)
        await asyncio.sleep(0.05)
        await peer.close()
        await still_serves(shared_app.app)

    shared_app.call(attack())
    tracebacks = [r.getMessage() for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert not tracebacks

    async def settled():  # every connection of the example is gone, and with it everything held for it
        for _ in range(100):
            sio = shared_app.app.sio
            if not sio._remote and not sio._binary_packet and not sio._message_bytes and sio.connections.total == 0:
                return True
            await asyncio.sleep(0.05)
        return False

    assert shared_app.call(settled())
