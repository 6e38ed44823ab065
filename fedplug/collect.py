"""Waiting for one phase's answers: deadlines, quorums, and the update stream.

A :class:`PhaseCollector` gathers the answers of the clients asked in one
phase of one round (``check_client_resource_done``, ``client_update`` or
``client_eval``): it accepts each expected client once, ignores everyone
else, and finishes when every expected client answered or was given up on
(disconnected past the grace period), or when the deadline passes.

An :class:`UpdateStream` is the iterable the aggregation hook consumes in a
worker thread while updates are still arriving on the event loop.
"""

from __future__ import annotations

import asyncio
import queue
from typing import Any, Iterator

from fedplug.types import ClientUpdate

_END = object()


class PhaseCollector:
    def __init__(self, event: str, round_number: int, expected: set[str]):
        self.event = event
        self.round_number = round_number
        self.expected = set(expected)
        self.answers: dict[str, Any] = {}
        self.given_up: set[str] = set()
        self.pending_work = 0  # answers accepted but still being decoded off the loop
        self._done = asyncio.Event()
        self._check()

    def admit(self, client_id: str, round_number: int) -> str | None:
        """Why this answer must be ignored, or None when it is welcome (and now reserved)."""
        if round_number != self.round_number:
            return f"{self.event} for round {round_number}, the server is in round {self.round_number}"
        if client_id not in self.expected:
            return f"{self.event} from {client_id}, which was not asked this round"
        if client_id in self.answers:
            return f"duplicate {self.event} from {client_id} in round {self.round_number}"
        if client_id in self.given_up:
            return f"{self.event} from {client_id} came after it was given up on"
        self.answers[client_id] = None
        return None

    def settle(self, client_id: str, value: Any) -> None:
        self.answers[client_id] = value
        self._check()

    def give_up(self, client_id: str) -> None:
        if client_id in self.expected and client_id not in self.answers:
            self.given_up.add(client_id)
            self._check()

    def begin_work(self) -> None:
        self.pending_work += 1

    def end_work(self) -> None:
        self.pending_work -= 1
        self._check()

    def _check(self) -> None:
        answered = set(self.answers) | self.given_up
        if self.expected <= answered and self.pending_work == 0:
            self._done.set()

    @property
    def complete(self) -> bool:
        return self._done.is_set()

    async def wait(self, timeout: float) -> bool:
        """Wait until complete or ``timeout`` seconds passed; True when complete."""
        try:
            await asyncio.wait_for(self._done.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def values(self) -> dict[str, Any]:
        return {cid: v for cid, v in self.answers.items() if v is not None}


class UpdateStream:
    """A one-shot iterable of accepted :class:`ClientUpdate` values, fed from the event loop."""

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._consumed = False
        self.count = 0

    def put(self, update: ClientUpdate) -> None:
        self.count += 1
        self._queue.put(update)

    def close(self) -> None:
        self._queue.put(_END)

    def __iter__(self) -> Iterator[ClientUpdate]:
        if self._consumed:
            raise RuntimeError("a round's update stream can be consumed only once")
        self._consumed = True
        previous = None
        while True:
            item = self._queue.get()
            if previous is not None:  # the consumer asked for the next: it is done reading the last one
                release = getattr(getattr(previous, "weights", None), "release_pages", None)
                if release is not None:
                    release()  # a received update's file pages (fedplug.wire.MappedState); still readable later
            if item is _END:
                return
            previous = item
            yield item
