"""Each client's live state, derived from the server's event rows.

The server writes one row per protocol event to ``events.jsonl`` and hands
every row (plus the unlogged ``transfer_progress`` rows) to the listeners in
``server.events.listeners``.  :class:`LiveState` turns that stream into what a
person watching the run wants to know: which state each client is in, since
when, how long its previous states took this round, and how many bytes went
each way.  The web dashboard (:mod:`fedplug.dashboard.routes`) and the
terminal view (:mod:`fedplug.progress`) both feed it the same rows.

:class:`LiveState` is not thread-safe: its owner serialises calls (the
dashboard applies rows on the event loop, the terminal view under a lock).

State of a client, by the row that moves it there::

    client_wake_up in            connected      (handshake done, not ready yet)
    client_ready in              ready          (idle, waiting for the server)
    check_client_resource out    resource check
    check_client_resource_done in  ready
    request_update out           training       (download progress shows beside it)
    transfer_progress up         uploading
    client_update in             done           (ok=false: failed)
    update_rejected / update_failed in  failed
    stop_and_eval out            evaluating
    client_eval in               done
    run_finished out             finished
    disconnect in                dropped        (finished, once run_finished went out, or once the
                                                 client answered the last stop_and_eval, STOP=true)
"""

from __future__ import annotations

import collections
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

STATES = ("connected", "ready", "resource check", "training", "uploading", "evaluating", "done", "failed",
          "finished", "dropped")

# the row (event, direction) that puts a client in a state; transfer rows are handled apart
_TRANSITIONS = {
    ("client_wake_up", "in"): "connected",
    ("client_ready", "in"): "ready",
    ("check_client_resource", "out"): "resource check",
    ("check_client_resource_done", "in"): "ready",
    ("request_update", "out"): "training",
    ("client_update", "in"): "done",
    ("update_failed", "in"): "failed",
    ("update_rejected", "in"): "failed",
    ("stop_and_eval", "out"): "evaluating",
    ("client_eval", "in"): "done",
    ("run_finished", "out"): "finished",
    ("disconnect", "in"): "dropped",
}
# rows about the protocol itself going wrong: kept apart so a page can list them all
REJECTION_EVENTS = ("protocol_error", "update_rejected", "update_failed")


@dataclass
class ClientState:
    """One client as a viewer sees it; every time is the server's Unix time in seconds."""

    client_id: str
    state: str = "connected"
    since: float = 0.0               # when the client entered ``state``
    round: int | None = None         # the round the state belongs to
    num_train: int | None = None
    num_test: int | None = None
    # seconds spent in each finished state of ``round`` (training, uploading, evaluating, resource check)
    durations: dict[str, float] = field(default_factory=dict)
    bytes_up: int = 0                # every update received from it, over the run
    bytes_down: int = 0              # every model sent to it, as far as transfer progress told
    transfer: dict[str, Any] | None = None  # the transfer in flight: direction, bytes_done, bytes_total
    last_error: str | None = None
    drops: int = 0                   # times it went away mid-run (killed, network lost)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class LiveState:
    """Client states plus the last protocol events and rejections, from event rows.

    ``max_events`` bounds the recent-events list and ``max_rejections`` the
    rejection list, so a long run (or a hostile client flooding rejections)
    costs a fixed amount of memory.
    """

    def __init__(self, max_events: int = 200, max_rejections: int = 100):
        self.clients: dict[str, ClientState] = {}
        self.events: collections.deque[dict] = collections.deque(maxlen=max_events)
        self.rejections: collections.deque[dict] = collections.deque(maxlen=max_rejections)
        self.rejection_count = 0
        self.finished_sent: set[str] = set()  # clients done with the run: their disconnect is no drop
        self._stop_round: dict[str, Any] = {}  # the round whose stop_and_eval told a client STOP

    def apply(self, row: Mapping[str, Any]) -> ClientState | None:
        """Take one row; return the client whose state it changed (or None)."""
        event, direction = row.get("event"), row.get("direction")
        if event != "transfer_progress":  # progress rows come by the hundred: they are not "events"
            self.events.append(_short(row))
        if event in REJECTION_EVENTS:
            self.rejection_count += 1
            self.rejections.append(_short(row))
        cid = row.get("client_id")
        if not cid:
            return None
        now = float(row.get("time") or time.time())
        if event == "transfer_progress":
            return self._transfer(str(cid), row, now)
        target = _TRANSITIONS.get((event, direction))
        if target is None:
            return None
        client = self.clients.get(cid)
        if client is None:
            if event == "disconnect":
                return None  # a socket that never said who it was
            client = self.clients[cid] = ClientState(str(cid), since=now)
        if event == "run_finished":
            self.finished_sent.add(cid)
        if event == "stop_and_eval" and row.get("STOP"):
            self._stop_round[cid] = row.get("round")
        if event == "client_eval" and cid in self._stop_round and self._stop_round[cid] == row.get("round"):
            self.finished_sent.add(cid)  # it answered the last evaluation: it may leave now
        if event == "disconnect" and cid in self.finished_sent:
            target = "finished"
        if event == "client_ready":
            client.num_train, client.num_test = row.get("num_train"), row.get("num_test")
        if event == "client_update" and row.get("bytes"):
            client.bytes_up += int(row["bytes"])
        if event == "client_update" and row.get("ok") is False:
            target = "failed"
        if target == "failed":
            client.last_error = str(row.get("reason") or "update failed")
        self._move(client, target, now, row.get("round"))
        return client

    def _move(self, client: ClientState, target: str, now: float, rnd: Any) -> None:
        rnd = int(rnd) if isinstance(rnd, int) else client.round
        if rnd != client.round:
            client.durations = {}
        elif client.state in ("resource check", "training", "uploading", "evaluating"):
            # how long the state it leaves took, added up over a round's repeats (resource re-checks)
            took = max(0.0, now - client.since)
            client.durations[client.state] = round(client.durations.get(client.state, 0.0) + took, 3)
        client.transfer = None  # a new state's transfer, if any, is reported after it
        if target == "dropped" and client.state != "dropped":
            client.drops += 1
        client.state, client.since, client.round = target, now, rnd

    def _transfer(self, cid: str, row: Mapping[str, Any], now: float) -> ClientState | None:
        client = self.clients.get(cid)
        if client is None:
            return None
        direction = str(row.get("direction") or "")
        done, total = int(row.get("bytes_done") or 0), int(row.get("bytes_total") or 0)
        previous = client.transfer or {}
        if direction == "down":
            # a fetch reports the bytes so far of one model; count what is new since its last report
            same = previous.get("direction") == "down" and previous.get("bytes_total") == total
            client.bytes_down += max(0, done - (int(previous.get("bytes_done", 0)) if same else 0))
        if direction == "up" and client.state == "training":
            self._move(client, "uploading", now, row.get("round"))
        client.transfer = {"direction": direction, "bytes_done": done, "bytes_total": total}
        return client

    def client_list(self) -> list[dict[str, Any]]:
        return [c.to_json() for c in sorted(self.clients.values(), key=lambda c: c.client_id)]

    def counts(self) -> dict[str, int]:
        """How many clients are in each state (states with none left out)."""
        return dict(collections.Counter(c.state for c in self.clients.values()))


def _short(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row as kept for display: long strings (a hostile 10 MB reason) cut to a readable length."""
    out = {}
    for key, value in row.items():
        if isinstance(value, str) and len(value) > 500:
            value = value[:500] + "…"
        out[key] = value
    return out


def replay(rows: Iterable[Mapping[str, Any]], max_events: int = 200) -> LiveState:
    """A :class:`LiveState` after every row of a finished run (``fedplug report`` uses it)."""
    state = LiveState(max_events=max_events)
    for row in rows:
        state.apply(row)
    return state
