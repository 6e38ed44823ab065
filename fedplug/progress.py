"""The server's terminal output: a live ``rich`` view on a terminal, plain lines anywhere else.

``fedplug.app.run_server`` makes one :class:`TerminalView` per run and passes
its :meth:`~TerminalView.echo` to the server as ``echo``; every progress line
goes through it.  After :meth:`~TerminalView.attach` the view also hears every
event row (``server.events.listeners``) and keeps each client's state with
:class:`fedplug.dashboard.live.LiveState`, the dashboard's own logic.

* ``ui.live`` = ``auto`` (the default) and stdout is a terminal, or ``true``:
  a live panel at the bottom of the terminal — round N/M with a bar and an
  ETA, each client's state, time in it and transfer bar (bytes so far of the
  bytes in flight, from ``transfer_progress`` rows), and the per-round table
  building up.  Progress lines scroll above it; when the run ends the panel
  goes and the final table is printed as plain text.
* not a terminal (CI, ``> run.log``) or ``ui.live=false``: the plain lines,
  exactly as they always were.
* ``ui.quiet=true``: only problems (lines that say something failed, was
  rejected, could not be done, or died) and the outcome: the final table,
  the best round and the run directory.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from typing import Any, TextIO

from fedplug.dashboard.live import LiveState

# a line with one of these words reports a problem: ui.quiet still prints it
PROBLEM = re.compile(r"fail|error|cannot|could not|reject|died|exited with status|interrupted|warning",
                     re.IGNORECASE)
STATE_STYLE = {"training": "blue", "uploading": "magenta", "evaluating": "yellow", "done": "green",
               "resource check": "cyan", "dropped": "bold red", "failed": "bold red", "finished": "dim"}
SHORT = {"resource check": "check", "training": "train", "uploading": "upload", "evaluating": "eval"}
MAX_CLIENT_ROWS = 24
MAX_ROUND_ROWS = 8


def wants_live(setting: Any, stream: TextIO) -> bool:
    """``ui.live``: True/False as given, ``auto`` when ``stream`` is a terminal."""
    if isinstance(setting, bool):
        return setting
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or odd stream is no terminal
        return False


class TerminalView:
    """One run's terminal output; ``echo`` may be called from any thread."""

    def __init__(self, cfg: Any, stream: TextIO | None = None, console: Any = None):
        ui = cfg.get("ui") or {}
        self.quiet = bool(ui.get("quiet", False))
        self.stream = stream if stream is not None else sys.stdout
        self.live_wanted = (console is not None or wants_live(ui.get("live", "auto"), self.stream)) \
            and not self.quiet
        self.rounds = int(cfg.run.rounds)
        self.server: Any = None
        self.state = LiveState(max_events=1, max_rejections=1)
        self.lock = threading.Lock()
        self.round_started: dict[int, float] = {}
        self.started = time.time()
        self._console = console
        self._live: Any = None

    # ------------------------------------------------------------------ lines

    def echo(self, text: str = "") -> None:
        """Print one progress line (the server's and the app's ``echo``)."""
        finished = self.server is not None and getattr(self.server, "phase", "") == "finished"
        if self.quiet and not finished and not PROBLEM.search(text):
            return
        if finished and self._live is not None:
            self._stop_live()  # the outcome is printed as plain text, below where the panel was
        live = self._live
        if live is not None:
            live.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            print(text, file=self.stream, flush=True)

    # ------------------------------------------------------------------ live view

    def attach(self, server: Any) -> None:
        """Hear ``server``'s event rows and, on a terminal, show the live panel until :meth:`close`."""
        self.server = server
        server.events.listeners.append(self._on_row)
        if self.live_wanted:
            self._start_live()

    def close(self) -> None:
        self._stop_live()
        if self.server is not None and self._on_row in self.server.events.listeners:
            self.server.events.listeners.remove(self._on_row)

    def _on_row(self, row: dict) -> None:  # from the event loop and worker threads
        with self.lock:
            self.state.apply(row)
            rnd = row.get("round")
            if isinstance(rnd, int) and rnd not in self.round_started and row.get("event") != "disconnect":
                self.round_started[rnd] = float(row.get("time") or time.time())

    def _start_live(self) -> None:
        from rich.console import Console
        from rich.live import Live

        console = self._console or Console(file=self.stream)
        redirect = console.file is sys.stdout  # other prints (the app's) then scroll above the panel too
        self._live = Live(get_renderable=self.render, console=console, refresh_per_second=4, transient=True,
                          redirect_stdout=redirect, redirect_stderr=False)
        self._live.start()

    def _stop_live(self) -> None:
        live, self._live = self._live, None
        if live is not None:
            live.stop()

    def render(self) -> Any:
        """The live panel (called by rich's refresh thread, and by tests)."""
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        server = self.server
        history = list(getattr(server, "history", []) or [])
        done = history[-1].round_number if history else 0
        current = int(getattr(server, "round_number", 0) or 0)
        phase = str(getattr(server, "phase", "starting"))
        with self.lock:
            clients = sorted(self.state.clients.values(), key=lambda c: c.client_id)
            clients = [(c.client_id, c.state, c.round, c.since, dict(c.durations), dict(c.transfer or {}),
                        c.bytes_up, c.bytes_down) for c in clients]
            started = dict(self.round_started)
        now = time.time()

        head = Table.grid(padding=(0, 2))
        head.add_row(Text(f"round {current}/{self.rounds}", style="bold"),
                     ProgressBar(total=max(1, self.rounds), completed=done, width=30),
                     Text(phase), Text(f"elapsed {_duration(now - self.started)}"),
                     Text(f"ETA {self._eta(history, current, started, now)}"))

        table = Table(title=None, box=None, padding=(0, 1), header_style="bold")
        # the id and state keep their width on a narrow terminal; the round's timings wrap instead
        table.add_column("client", no_wrap=True, min_width=min(16, max((len(c[0]) for c in clients), default=6)))
        table.add_column("state", no_wrap=True, min_width=14)
        table.add_column("round", justify="right", no_wrap=True)
        table.add_column("for", justify="right", no_wrap=True)
        table.add_column("this round", overflow="fold")
        table.add_column("transfer", no_wrap=True)
        table.add_column("sent", justify="right", no_wrap=True)
        table.add_column("received", justify="right", no_wrap=True)
        for cid, state, rnd, since, durations, transfer, up, down in clients[:MAX_CLIENT_ROWS]:
            table.add_row(cid, Text(state, style=STATE_STYLE.get(state, "")), str(rnd or "-"),
                          _duration(now - since),
                          " ".join(f"{SHORT.get(k, k)} {_duration(v)}" for k, v in durations.items()),
                          _transfer(transfer), _bytes(up), _bytes(down))
        if len(clients) > MAX_CLIENT_ROWS:
            table.add_row(f"… {len(clients) - MAX_CLIENT_ROWS} more", "", "", "", "", "", "", "")

        rounds = Table(box=None, padding=(0, 1), header_style="bold")
        for name in ("round", "train_loss", "test_loss", "mAP@0.5", "recall", "clients", "time_s"):
            rounds.add_column(name, justify="right")
        for r in history[-MAX_ROUND_ROWS:]:
            rounds.add_row(str(r.round_number), _f(r.train_loss), _f(r.test_loss), _f(r.map50), _f(r.recall),
                           str(len(r.participants)), f"{r.seconds:.1f}")
        parts: list[Any] = [head, table]
        if history:
            parts.append(rounds)
        return Group(*parts)

    def _eta(self, history: list, current: int, started: dict[int, float], now: float) -> str:
        """Mean time of this run's finished rounds times the rounds left, less the current one's time so far."""
        start_round = getattr(self.server, "start_round", 1)
        mine = [r.seconds for r in history if r.round_number >= start_round]
        if not mine:
            return "-"
        left = self.rounds - (history[-1].round_number if history else 0)
        if left <= 0:
            return "0s"
        mean = sum(mine) / len(mine)
        in_progress = now - started[current] if current in started and current > history[-1].round_number else 0.0
        return _duration(max(0.0, mean * left - in_progress))


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _bytes(n: int) -> str:
    value, unit = float(n), "B"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            break
        value /= 1000
    return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"


def _transfer(transfer: dict) -> Any:
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    total = int(transfer.get("bytes_total") or 0)
    if not total:
        return ""
    done = min(total, int(transfer.get("bytes_done") or 0))
    grid = Table.grid(padding=(0, 1))
    grid.add_row("↑" if transfer.get("direction") == "up" else "↓", ProgressBar(total=total, completed=done, width=16),
                 f"{_bytes(done)}/{_bytes(total)}")
    return grid


def _duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
