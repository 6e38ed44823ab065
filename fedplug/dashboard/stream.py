"""Fan-out of live rows to the open dashboard pages, with a bounded queue per page.

The server calls :meth:`Hub.listener` for every event row, from the event
loop *and* from worker threads (aggregation, checkpoint writes).  The
listener does nothing but hand the row to the loop with
``call_soon_threadsafe``, so a run never waits on a viewer.  On the loop,
:meth:`Hub.deliver` updates the shared :class:`~fedplug.dashboard.live.LiveState`,
encodes the message once, and appends it to every :class:`Subscriber`.

A subscriber holds at most ``max_queue`` messages.  A page that reads too
slowly (a stalled browser, a slow link) does not grow the server's memory:
when its queue is full, the queue is emptied and the page is sent a fresh
snapshot instead, which says everything the dropped messages said.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
from typing import Any, Callable, Mapping

from fedplug.dashboard.live import LiveState

log = logging.getLogger("fedplug.dashboard")

RESYNC = object()  # "send a full snapshot": the queue overflowed, or the page just opened
CLOSE = object()   # the server is stopping: end the stream


def jsonable(value: Any) -> Any:
    """``value`` with NaN and infinities as None (a browser's JSON.parse rejects them) and tuples as lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, collections.deque)):
        return [jsonable(v) for v in value]
    return value


def sse(event: str, data: Any) -> bytes:
    """One server-sent-events message: ``event:`` and one ``data:`` line of JSON (which has no newline)."""
    return f"event: {event}\ndata: {json.dumps(jsonable(data), default=str)}\n\n".encode()


class Subscriber:
    """One open page's queue of encoded messages; used on the event loop only."""

    def __init__(self, max_queue: int):
        self.max_queue = max(1, int(max_queue))
        self.queue: collections.deque[bytes] = collections.deque()
        self.resync = True  # the first thing a page gets is the whole picture
        self.closed = False
        self.overflows = 0
        self._wake = asyncio.Event()

    def push(self, message: bytes) -> None:
        if self.resync:
            return  # the snapshot that is due covers this message
        if len(self.queue) >= self.max_queue:
            self.queue.clear()
            self.resync = True
            self.overflows += 1
        else:
            self.queue.append(message)
        self._wake.set()

    def close(self) -> None:
        self.closed = True
        self._wake.set()

    async def next(self, timeout: float) -> bytes | object | None:
        """The next message, :data:`RESYNC`, :data:`CLOSE`, or None after ``timeout`` seconds of quiet."""
        while True:
            if self.closed:
                return CLOSE
            if self.resync:
                self.resync = False
                self.queue.clear()
                return RESYNC
            if self.queue:
                return self.queue.popleft()
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except asyncio.TimeoutError:
                return None


class Hub:
    """The live state and the open pages of one server.

    ``encode`` is called on the loop after each row was applied, with the row
    and the client it changed (or None); it returns the messages to fan out,
    encoded once for every page.  The default sends the row and the client.
    """

    def __init__(self, live: LiveState, max_queue: int = 1000, max_viewers: int = 20,
                 encode: Callable[[Mapping[str, Any], Any], list[bytes]] | None = None):
        self.live = live
        self.max_queue = max_queue
        self.max_viewers = max_viewers
        self.subscribers: set[Subscriber] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.encode = encode or (lambda row, client: [
            sse("row", {"row": row, "client": client.to_json() if client else None})])
        self.stopped = False

    # -- any thread
    def listener(self, row: Mapping[str, Any]) -> None:
        """The function appended to ``server.events.listeners``."""
        loop = self.loop
        if loop is None:  # before the app started there is one thread, and no page open
            self.deliver(row)
            return
        try:
            loop.call_soon_threadsafe(self.deliver, dict(row))
        except RuntimeError:  # the loop is closed: the run is over, nobody is watching
            pass

    # -- the event loop
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def deliver(self, row: Mapping[str, Any]) -> None:
        try:
            client = self.live.apply(row)
            if not self.subscribers:
                return  # nobody is watching: keep the state, skip encoding
            messages = self.encode(row, client)
        except Exception:  # a view must never disturb the run: log and drop the row
            log.exception("dashboard could not take event row %r", row.get("event"))
            return
        for subscriber in list(self.subscribers):
            for message in messages:
                subscriber.push(message)

    def broadcast(self, message: bytes) -> None:
        """Queue one encoded message for every open page (on the loop)."""
        for subscriber in list(self.subscribers):
            subscriber.push(message)

    def subscribe(self) -> Subscriber | None:
        """A new page's queue, or None when ``max_viewers`` pages are already open."""
        if self.stopped or len(self.subscribers) >= self.max_viewers:
            return None
        subscriber = Subscriber(self.max_queue)
        self.subscribers.add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self.subscribers.discard(subscriber)

    def stop(self) -> None:
        """End every stream (the server is shutting down); later rows still update the state."""
        self.stopped = True
        for subscriber in list(self.subscribers):
            subscriber.close()
