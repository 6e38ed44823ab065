"""The server's terminal output: plain lines when not a terminal, a live rich panel on one, little when quiet."""

import asyncio
import io
import re
import time
from types import SimpleNamespace

from rich.console import Console

from fedplug.progress import TerminalView
from fedplug.types import RoundRecord
from scripted import ScriptedClient, compose_cfg, toy_plugins


class NotATerminal(io.StringIO):
    def isatty(self):
        return False


class Terminal(io.StringIO):
    def isatty(self):
        return True


def _fake_server(**kw):
    events = SimpleNamespace(listeners=[])
    return SimpleNamespace(events=events, history=[], round_number=0, phase="waiting for clients", start_round=1,
                           **kw)


def test_not_a_terminal_prints_the_plain_lines_unchanged():
    out = NotATerminal()
    view = TerminalView(compose_cfg(), stream=out)
    assert not view.live_wanted
    view.attach(_fake_server())
    for line in ("round 1/6: resource check on 3 client(s) [always]", "    update 1/3 from a: 10 images", ""):
        view.echo(line)
    view.close()
    assert out.getvalue() == "round 1/6: resource check on 3 client(s) [always]\n    update 1/3 from a: 10 images\n\n"


def test_auto_means_live_on_a_terminal_and_false_turns_it_off():
    assert TerminalView(compose_cfg(), stream=Terminal()).live_wanted
    assert not TerminalView(compose_cfg("ui.live=false"), stream=Terminal()).live_wanted
    assert TerminalView(compose_cfg("ui.live=true"), stream=NotATerminal()).live_wanted
    assert not TerminalView(compose_cfg("ui.quiet=true"), stream=Terminal()).live_wanted


def test_quiet_prints_only_problems_and_the_outcome():
    out = NotATerminal()
    server = _fake_server()
    view = TerminalView(compose_cfg("ui.quiet=true"), stream=out)
    view.echo("preparing data (synthetic) for 3 clients ...")
    view.echo("cannot start: the port is taken")  # before the server exists: a problem still shows
    view.attach(server)
    view.echo("  client a ready (10 train / 4 test images)")
    view.echo("  round 1 attempt 1 failed: 0 accepted update(s); retrying")
    view.echo("  rejected update from b: shape mismatch")
    server.phase = "finished"
    view.echo("round  train_loss  test_loss  mAP@0.5")
    view.echo("run directory: /tmp/run")
    assert out.getvalue().splitlines() == [
        "cannot start: the port is taken", "  round 1 attempt 1 failed: 0 accepted update(s); retrying",
        "  rejected update from b: shape mismatch", "round  train_loss  test_loss  mAP@0.5", "run directory: /tmp/run"]


def _render(view, width=160):
    console = Console(file=io.StringIO(), width=width, force_terminal=False, color_system=None)
    console.print(view.render())
    return console.file.getvalue()


def test_the_live_panel_shows_rounds_clients_transfers_eta_and_the_round_table():
    terminal = io.StringIO()
    console = Console(file=terminal, force_terminal=True, width=160)
    view = TerminalView(compose_cfg("run.rounds=4"), console=console)
    server = _fake_server()
    view.attach(server)
    try:
        t = time.time()
        for row in (
            {"time": t - 30, "event": "client_wake_up", "direction": "in", "client_id": "site-a"},
            {"time": t - 30, "event": "client_wake_up", "direction": "in", "client_id": "site-b"},
            {"time": t - 20, "event": "check_client_resource", "direction": "out", "client_id": "site-a", "round": 2},
            {"time": t - 19, "event": "request_update", "direction": "out", "client_id": "site-a", "round": 2},
            {"time": t - 1, "event": "transfer_progress", "live": True, "client_id": "site-a", "direction": "up",
             "round": 2, "bytes_done": 1_500_000, "bytes_total": 6_000_000},
            {"time": t - 1, "event": "disconnect", "direction": "in", "client_id": "site-b", "round": 2},
        ):
            server.events.listeners[0](row)
        server.history.append(RoundRecord(1, ("site-a", "site-b"), 0.75, 0.5, 0.25, 0.125, seconds=30.0))
        server.round_number, server.phase = 2, "round 2: training"
        view.echo("  client site-b disconnected")  # scrolls above the panel
        text = _render(view)
    finally:
        view.close()
    assert "round 2/4" in text and "round 2: training" in text
    # ETA: 30 s per round, 3 rounds left, 20 s into round 2 -> 70 s (less the time this test took)
    assert re.search(r"ETA 1m(0[5-9]|10)s", text), text
    lines = {line.split()[0]: line for line in text.splitlines() if line.strip().startswith("site-")}
    assert "uploading" in lines["site-a"] and "1.5 MB/6.0 MB" in lines["site-a"] and "train 18s" in lines["site-a"]
    assert "dropped" in lines["site-b"]
    assert "0.7500" in text and "0.2500" in text  # the round table: train loss, mAP@0.5 of round 1
    assert "client site-b disconnected" in terminal.getvalue()
    assert server.events.listeners == []  # close() unsubscribed


def test_a_real_run_through_the_view_prints_today_s_lines_when_not_a_terminal(tmp_path):
    from fedplug.server import FederationServer

    out = NotATerminal()
    cfg = compose_cfg("run.rounds=2", "run.min_clients=1", "run.clients_per_round=1", "run.num_clients=1")
    view = TerminalView(cfg, stream=out)

    async def go():
        server = FederationServer(cfg, toy_plugins(), ("car", "person", "sign"), tmp_path, echo=view.echo)
        view.attach(server)
        port = await server.start()
        client = ScriptedClient(f"http://127.0.0.1:{port}", "a", "good")
        try:
            await client.start()
            status = await asyncio.wait_for(server.run_federation(), 60)
        finally:
            await client.close()
            view.close()
            await server.stop()
        return status

    assert asyncio.run(go()) == 0
    text = out.getvalue()
    assert "round 1/2: resource check on 1 client(s)" in text and "  round 2 done in" in text
    assert "round  train_loss  test_loss  mAP@0.5  recall  clients  time_s" in text
    assert "\x1b[" not in text  # no terminal control codes in a log file
