"""The server's Socket.IO edge: bounds and refusals applied before python-socketio buffers or dispatches.

:class:`GuardedServer` is a ``socketio.AsyncServer`` that the federation
server creates instead of the plain one.  It hooks the three places where
python-socketio (5.x) handles what a peer sends, before any fedplug handler:

- ``_handle_eio_connect`` (a new Engine.IO connection): bounds the open
  connections per address and in all (:class:`fedplug.security.ConnectionCounter`)
  and starts the handshake clock: a connection that has not been admitted
  (``is_admitted``: the server saw its ``client_wake_up``) within
  ``handshake_timeout_s`` is closed;
- ``_handle_eio_message`` (every Engine.IO message: a Socket.IO packet, or one
  binary attachment of the packet before it): bounds the whole message — its
  text and all its attachments together — to ``max_message_bytes``, and the
  attachment count to ``max_attachments``, *before* the attachments are
  buffered (the library itself bounds only each frame); a packet the library
  cannot decode (bad JSON, integers over 4300 digits, deep nesting, a packet
  id over 100 digits, bad attachment placeholders, a binary packet announcing
  no attachment) is answered with ``protocol_error`` — never a traceback — and
  a connection that keeps sending them is closed;
- ``_handle_event``: event names must be 1-64 printable characters and not a
  reserved name (``connect``, ``disconnect``, ``connect_error``, or one the
  server sends), so a client cannot run the server's own ``connect`` /
  ``disconnect`` handlers.

Every refusal goes through ``reject(sid, event, reason)`` (the federation
server's own, which logs it and writes ``events.jsonl``) or, for a
connection without a Socket.IO session yet, is logged here in one line.
Oversized single WebSocket frames, which aiohttp closes with code 1009, are
logged too instead of vanishing.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable

import socketio
from socketio import packet as sio_packet

from fedplug.security import ConnectionCounter

log = logging.getLogger("fedplug.server")

RESERVED_EVENTS = frozenset({"connect", "disconnect", "connect_error", "disconnecting"})
MAX_EVENT_NAME = 64
MAX_LOGGED_REASON = 300


def _short(text: Any, limit: int = MAX_LOGGED_REASON) -> str:
    text = str(text)
    if not text.isprintable():
        text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _event_label(name: Any) -> str:
    """A bounded, printable rendering of a peer's event name for logs and answers."""
    if isinstance(name, str) and 0 < len(name) <= MAX_EVENT_NAME and name.isprintable():
        return name
    return _short(repr(name), MAX_EVENT_NAME + 8)


@dataclass
class EdgeLimits:
    """What a peer may send, from the ``server`` config section (see docs/protocol.md, Limits)."""

    max_message_bytes: int  # server.max_message_mb: one message with all its attachments
    max_attachments: int = 8  # binary attachments of one message (fedplug's messages carry at most one)
    handshake_timeout_s: float = 30.0  # server.handshake_timeout_s
    max_bad_packets: int = 10  # undecodable packets a connection may send before it is closed
    reserved_events: frozenset = field(default_factory=lambda: RESERVED_EVENTS)


Reject = Callable[[str, str, str], Awaitable[None]]


class GuardedServer(socketio.AsyncServer):
    """``socketio.AsyncServer`` with fedplug's edge limits (see the module docstring).

    ``reject(sid, event, reason)`` answers a refused message (default: emit
    ``protocol_error``); ``is_admitted(sid)`` says whether a Socket.IO session
    finished fedplug's handshake (default: once it connected);
    ``connections`` bounds open connections (None: unbounded).
    """

    def __init__(self, *args: Any, limits: EdgeLimits, connections: ConnectionCounter | None = None,
                 reject: Reject | None = None, is_admitted: Callable[[str], bool] | None = None,
                 server_events: Iterable[str] = (), **kwargs: Any):
        kwargs.setdefault("max_http_buffer_size", limits.max_message_bytes)
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.reserved = frozenset(limits.reserved_events) | frozenset(server_events)
        self.connections = connections
        self.reject = reject or self._default_reject
        self.is_admitted = is_admitted or (lambda sid: True)
        self._message_bytes: dict[str, int] = {}  # eio_sid -> bytes of the binary message being received
        self._bad_packets: dict[str, int] = {}
        self._remote: dict[str, str] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._install_frame_logging()

    # ------------------------------------------------------------------ helpers

    def remote_of(self, eio_sid: str) -> str:
        return self._remote.get(eio_sid, "?")

    def _sid_of(self, eio_sid: str) -> str | None:
        try:
            sid = self.manager.sid_from_eio_sid(eio_sid, "/")
        except Exception:  # no session in this namespace
            return None
        return sid if sid is not None and self.manager.is_connected(sid, "/") else None

    async def _default_reject(self, sid: str, event: str, reason: str) -> None:
        log.warning("rejected %s from %s: %s", event, sid, reason)
        await self.emit("protocol_error", {"event": event, "reason": reason}, to=sid)

    async def _refuse(self, eio_sid: str, event: str, reason: str, *, close: bool = False,
                      ack_id: Any = None) -> None:
        """Tell the peer why its message was dropped (protocol_error, and the ack it waits for); maybe close."""
        reason = _short(reason)
        sid = self._sid_of(eio_sid)
        try:
            if sid is not None:
                await self.reject(sid, event, reason)
                if ack_id is not None:
                    await self._send_packet(eio_sid, self.packet_class(
                        sio_packet.ACK, namespace="/", data=[{"ok": False, "reason": reason}], id=ack_id))
            else:
                log.warning("refused %s from %s (no session): %s", event, self.remote_of(eio_sid), reason)
        except Exception as exc:  # the peer is gone already
            log.info("could not answer %s: %s", eio_sid, exc)
        if close:
            await self._close(eio_sid, reason)

    async def close_session(self, sid: str, reason: str) -> None:
        """Close a Socket.IO session and its transport (e.g. a site's half-open connection it took over)."""
        try:
            eio_sid = self.manager.eio_sid_from_sid(sid, "/")
        except Exception:
            eio_sid = None
        if eio_sid is None:
            return
        await self._close(eio_sid, reason)

    async def _close(self, eio_sid: str, reason: str) -> None:
        log.warning("closing the connection of %s (%s): %s", self._sid_of(eio_sid) or eio_sid,
                    self.remote_of(eio_sid), _short(reason))
        sid = self._sid_of(eio_sid)
        try:
            if sid is not None:
                await self.disconnect(sid)  # runs the server's disconnect handler: the client id is released
            await self.eio.disconnect(eio_sid)  # and the transport itself, not only the namespace
        except Exception as exc:
            log.info("closing %s: %s", eio_sid, exc)

    # ------------------------------------------------------------------ connections

    async def _handle_eio_connect(self, eio_sid, environ):
        request = environ.get("aiohttp.request")
        remote = str(getattr(request, "remote", None) or environ.get("REMOTE_ADDR") or "?")
        if self.connections is not None:
            refused = self.connections.acquire(remote)
            if refused is not None:
                log.warning("refused a connection from %s: %s", _short(remote, 64), refused)
                return False
        self._remote[eio_sid] = remote
        timeout = float(self.limits.handshake_timeout_s)
        if timeout > 0:
            loop = asyncio.get_running_loop()
            self._timers[eio_sid] = loop.call_later(
                timeout, lambda: loop.create_task(self._handshake_deadline(eio_sid)))
        return await super()._handle_eio_connect(eio_sid, environ)

    async def _handshake_deadline(self, eio_sid: str) -> None:
        self._timers.pop(eio_sid, None)
        if eio_sid not in self._remote:
            return  # gone already
        sid = self._sid_of(eio_sid)
        if sid is not None and self.is_admitted(sid):
            return
        what = "client_wake_up" if sid is not None else "a Socket.IO connect"
        await self._refuse(eio_sid, "connect", f"no {what} within server.handshake_timeout_s="
                                               f"{self.limits.handshake_timeout_s:g}s", close=True)

    async def _handle_eio_disconnect(self, eio_sid, reason):
        try:
            await super()._handle_eio_disconnect(eio_sid, reason)
        finally:
            timer = self._timers.pop(eio_sid, None)
            if timer is not None:
                timer.cancel()
            self._message_bytes.pop(eio_sid, None)
            self._bad_packets.pop(eio_sid, None)
            remote = self._remote.pop(eio_sid, None)
            if remote is not None and self.connections is not None:
                self.connections.release(remote)

    # ------------------------------------------------------------------ messages

    async def _handle_eio_message(self, eio_sid, data):
        limit = self.limits.max_message_bytes
        size = len(data) if isinstance(data, (bytes, bytearray, str)) else 0
        pending = eio_sid in self._binary_packet
        if pending:
            total = self._message_bytes.get(eio_sid, 0) + size
            if total > limit:
                self._binary_packet.pop(eio_sid, None)
                self._message_bytes.pop(eio_sid, None)
                return await self._refuse(eio_sid, "?", f"a message with its attachments is over "
                                                        f"{limit / 2**20:g} MiB (server.max_message_mb)", close=True)
            self._message_bytes[eio_sid] = total
        try:
            await super()._handle_eio_message(eio_sid, data)
        except Exception as exc:  # the library could not decode or reassemble the packet
            self._binary_packet.pop(eio_sid, None)
            self._message_bytes.pop(eio_sid, None)
            bad = self._bad_packets[eio_sid] = self._bad_packets.get(eio_sid, 0) + 1
            close = bad >= self.limits.max_bad_packets
            reason = f"undecodable Socket.IO packet ({type(exc).__name__}: {_short(exc, 120)})"
            if close:
                reason += f"; {bad} of them: closing the connection"
            return await self._refuse(eio_sid, "?", reason, close=close)
        if eio_sid not in self._binary_packet:
            self._message_bytes.pop(eio_sid, None)
        elif not pending:  # the text part of a binary message: bound it before any attachment is buffered
            pkt = self._binary_packet[eio_sid]
            count = getattr(pkt, "attachment_count", 0)
            if not 0 < count <= self.limits.max_attachments:
                self._binary_packet.pop(eio_sid, None)
                return await self._refuse(eio_sid, _event_label((pkt.data or ["?"])[0] if isinstance(pkt.data, list)
                                                                else "?"),
                                          f"a message may carry 1-{self.limits.max_attachments} binary "
                                          f"attachments, this one announced {count}", close=count > 0)
            self._message_bytes[eio_sid] = size

    async def _handle_event(self, eio_sid, namespace, id, data):
        if not isinstance(data, list) or not data:
            return await self._refuse(eio_sid, "?", "an event must be a list starting with its name", ack_id=id)
        name = data[0]
        if not isinstance(name, str) or not 0 < len(name) <= MAX_EVENT_NAME or not name.isprintable():
            return await self._refuse(eio_sid, _event_label(name), f"event names must be 1-{MAX_EVENT_NAME} "
                                                                   "printable characters", ack_id=id)
        if name in self.reserved:
            return await self._refuse(eio_sid, name, f"{name!r} is a reserved event name; clients may not send it",
                                      ack_id=id)
        return await super()._handle_event(eio_sid, namespace, id, data)

    # ------------------------------------------------------------------ frames

    def _install_frame_logging(self) -> None:
        """Check each WebSocket frame's Engine.IO framing before engine.io decodes it, and log oversized frames.

        engine.io decodes a text frame outside any error handling: an empty
        frame, a non-digit or unknown packet type, or base64 binary (which only
        long polling uses) would end the request with a traceback.  Such a frame
        closes the connection here, with one line logged.  A frame over the size
        limit is closed by aiohttp (code 1009); that is logged too.
        """
        base = self.eio._async.get("websocket") if isinstance(getattr(self.eio, "_async", None), dict) else None
        if base is None or not hasattr(base, "wait"):
            return

        def remote(ws) -> str:
            request = getattr(ws, "environ", {}).get("aiohttp.request")
            return str(getattr(request, "remote", "?"))

        class _CheckedWebSocket(base):
            async def wait(self):  # engine.io's driver interface: the next frame's data, OSError when closed
                sock = getattr(self, "_sock", None)
                if sock is None or not hasattr(sock, "receive"):
                    data = await super().wait()
                else:  # as the base class, reading the message itself to see why a socket closes
                    msg = await sock.receive()
                    data = msg.data
                    if not isinstance(data, (bytes, str)):
                        if getattr(data, "code", None) == 1009:  # aiohttp: MESSAGE_TOO_BIG
                            log.warning("closed the connection of %s: a WebSocket frame over %g MiB "
                                        "(server.max_message_mb)", remote(self),
                                        self.server.max_http_buffer_size / 2**20)
                        raise OSError()
                if isinstance(data, str) and (not data or data[0] not in "0123456"):
                    log.warning("closed the connection of %s: malformed Engine.IO frame %s", remote(self),
                                _short(repr(data[:40])))
                    return None  # engine.io reads None as the peer closing
                return data

        self.eio._async = dict(self.eio._async, websocket=_CheckedWebSocket)
