"""``fedplug report <run dir> [-o report.html]``: one self-contained HTML page of a finished run.

The page is built from what the run left in its directory — ``config.yaml``,
``metrics.jsonl``, ``events.jsonl``, ``checkpoints/`` — and needs nothing
else: CSS and SVG charts are inline, there are no scripts, fonts or links to
fetch, so it can be mailed, archived or opened offline.  It holds the outcome
(rounds done, best round and its checkpoint), the learning curves (global
and per client), the per-round table, a per-client table, a summary of the
protocol events, every rejection, and the resolved config (secrets hidden).

:func:`load_run` reads a run directory (``fedplug compare`` uses it too);
:func:`render_report` makes the page; :func:`report_command` is the
subcommand registered in :mod:`fedplug.cli`.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import time
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any, Iterable, Sequence

from fedplug.dashboard.live import REJECTION_EVENTS, replay
from fedplug.dashboard.snapshot import redact, round_row
from fedplug.svgchart import PALETTE, Series, line_chart
from fedplug.wire import write_atomic

MAX_REJECTIONS_SHOWN = 500


class RunDirError(ValueError):
    """The directory is not a run directory fedplug can read; the message says what is missing."""


@dataclass
class RunData:
    """What a run left in its directory, read back."""

    run_dir: Path
    config: dict[str, Any]
    rounds: list[dict[str, Any]]          # fedplug.dashboard.snapshot.round_row rows, by round
    events: list[dict[str, Any]]
    overrides: list[str] = field(default_factory=list)  # Hydra's overrides for this job, if recorded
    skipped_lines: int = 0                # unreadable lines (a crash mid-write leaves half a line)

    @property
    def best(self) -> dict[str, Any]:
        """The best evaluated round by global mAP@0.5 (the first of equals, as the server picks it)."""
        best: dict[str, Any] = {"round": None, "map50": None, "checkpoint": None}
        for r in self.rounds:
            if r["map50"] is not None and (best["map50"] is None or r["map50"] > best["map50"]):
                best.update(round=r["round"], map50=r["map50"])
        path = self.run_dir / "checkpoints" / "best.safetensors"
        best["checkpoint"] = str(path) if best["round"] is not None and path.is_file() else None
        return best

    @property
    def planned_rounds(self) -> int | None:
        rounds = (self.config.get("run") or {}).get("rounds")
        return int(rounds) if isinstance(rounds, int) else None


def _json_lines(path: Path) -> tuple[list[dict], int]:
    rows, skipped = [], 0
    if not path.is_file():
        return rows, 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                skipped += 1
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                skipped += 1
    return rows, skipped


def load_run(run_dir: str | Path) -> RunData:
    """Read a run directory; :class:`RunDirError` says what is missing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir} is not a directory: give a fedplug run directory "
                          "(outputs/<date>/<time>, or the hydra.run.dir of the run)")
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise RunDirError(f"{run_dir} has no metrics.jsonl: it is not a fedplug run directory, "
                          "or its run finished no round")
    rows, skipped = _json_lines(metrics)
    by_round: dict[int, dict] = {}
    for row in rows:
        try:
            rec = round_row(row)
        except (KeyError, TypeError, ValueError):
            skipped += 1
            continue
        by_round[rec["round"]] = rec  # a resumed round is written again: the last one counts
    events, skipped_events = _json_lines(run_dir / "events.jsonl")
    config: dict[str, Any] = {}
    if (run_dir / "config.yaml").is_file():
        from omegaconf import OmegaConf

        loaded = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=False)
        config = redact(loaded) if isinstance(loaded, dict) else {}
    overrides: list[str] = []
    if (run_dir / ".hydra" / "overrides.yaml").is_file():
        from omegaconf import OmegaConf

        listed = OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "overrides.yaml"))
        overrides = [str(o) for o in listed] if isinstance(listed, list) else []
    return RunData(run_dir, config, [by_round[k] for k in sorted(by_round)], events, overrides,
                   skipped + skipped_events)


# ---------------------------------------------------------------------- the page

CSS = """
body { margin: 0 auto; max-width: 1200px; padding: 16px 20px; font: 14px/1.4 system-ui, sans-serif; color: #1d2430; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 22px 0 8px; }
.sub { color: #667085; } code, pre { font: 12px ui-monospace, Menlo, Consolas, monospace; }
.cards { display: flex; gap: 12px; flex-wrap: wrap; margin-top: 12px; }
.card { border: 1px solid #d9dee7; border-radius: 6px; padding: 8px 12px; min-width: 150px; }
.card .label { color: #667085; font-size: 12px; } .card .value { font-size: 20px; font-weight: 600; }
table { border-collapse: collapse; width: 100%; } th, td { text-align: left; padding: 3px 8px; border-bottom: 1px solid #e4e7ec; font-size: 13px; }
th { background: #eef1f5; } td.num { text-align: right; font-variant-numeric: tabular-nums; } tr.best td { font-weight: 600; }
td.wrap { word-break: break-word; max-width: 520px; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; } .charts svg { flex: 1; min-width: 420px; max-width: 580px; border: 1px solid #d9dee7; border-radius: 6px; }
svg .axis { stroke: #98a2b3; } svg .grid { stroke: #eef1f5; } svg text { font-size: 11px; fill: #475467; }
svg .title { font-size: 12px; font-weight: 600; fill: #1d2430; } svg .empty { font-size: 13px; fill: #98a2b3; }
pre { background: #f6f7f9; border: 1px solid #d9dee7; padding: 8px; overflow: auto; }
.bad { color: #8a1c12; font-weight: 600; }
"""


def _num(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else escape(str(value))


def _bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], numeric: Sequence[bool] = (),
           classes: Sequence[str] | None = None) -> str:
    """An HTML table; cells are already-escaped HTML."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        cells = "".join(f'<td class="num">{c}</td>' if (numeric[j] if j < len(numeric) else False)
                        else f'<td class="wrap">{c}</td>' for j, c in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _points(rounds: Sequence[dict], get) -> list[tuple[float, float]]:
    out = []
    for r in rounds:
        value = get(r)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out.append((r["round"], float(value)))
    return out


def _charts(run: RunData) -> str:
    rounds, x_max = run.rounds, run.planned_rounds
    clients = sorted({cid for r in rounds for cid in r["per_client"]})
    quality = line_chart([
        Series("mAP@0.5", _points(rounds, lambda r: r["map50"]), PALETTE[0]),
        Series("recall", _points(rounds, lambda r: r["recall"]), PALETTE[1], dash="6 3"),
        Series("COCO mAP", _points(rounds, lambda r: r["coco_map"]), PALETTE[2], dash="2 3"),
    ], "global detection quality", "score", x_max, 0.0, 1.0)
    loss = line_chart([
        Series("train loss", _points(rounds, lambda r: r["train_loss"]), PALETTE[0]),
        Series("test loss", _points(rounds, lambda r: r["test_loss"]), PALETTE[1], dash="6 3"),
    ], "loss", "loss", x_max)
    per_map = line_chart([Series(cid, _points(rounds, lambda r, c=cid: r["per_client"].get(c, {}).get("map50")),
                                 PALETTE[i % len(PALETTE)]) for i, cid in enumerate(clients)],
                         "each client's mAP@0.5 on its own test split", "mAP@0.5", x_max, 0.0, 1.0)
    per_loss = line_chart([Series(cid, _points(rounds, lambda r, c=cid: r["per_client"].get(c, {}).get("train_loss")),
                                  PALETTE[i % len(PALETTE)]) for i, cid in enumerate(clients)],
                          "each client's train loss", "loss", x_max)
    return f'<div class="charts">{quality}{loss}</div><div class="charts">{per_map}{per_loss}</div>'


def _client_table(run: RunData) -> str:
    live = replay(run.events, max_events=1)
    ids = sorted(set(live.clients) | {cid for r in run.rounds for cid in r["per_client"]})
    rejections = collections.Counter(e.get("client_id") for e in run.events if e.get("event") in REJECTION_EVENTS)
    rows = []
    for cid in ids:
        state = live.clients.get(cid)
        took_part = sum(1 for r in run.rounds if cid in r["participants"])
        last = next((r["per_client"][cid] for r in reversed(run.rounds) if cid in r["per_client"]), {})
        last_map = next((r["per_client"][cid]["map50"] for r in reversed(run.rounds)
                         if "map50" in r["per_client"].get(cid, {})), None)
        images = "–" if state is None or state.num_train is None else f"{state.num_train} / {state.num_test}"
        rows.append([escape(cid), str(took_part), escape(images), _num(last.get("train_loss")), _num(last_map),
                     _bytes(state.bytes_up if state else 0), str(state.drops if state else 0),
                     f'<span class="bad">{rejections[cid]}</span>' if rejections[cid] else "0",
                     escape(state.state if state else "–")])
    return _table(["client", "rounds taken part", "images train / test", "last train loss", "last mAP@0.5",
                   "updates sent", "dropped", "rejections", "last state"], rows,
                  [False, True, True, True, True, True, True, True, False])


def _events_summary(run: RunData) -> str:
    if not run.events:
        return "<p>No events.jsonl in this run directory.</p>"
    counts = collections.Counter((e.get("event"), e.get("direction")) for e in run.events)
    times = [e["time"] for e in run.events if isinstance(e.get("time"), (int, float))]
    span = f"{len(run.events)} events from {_clock(min(times))} to {_clock(max(times))} " \
           f"({max(times) - min(times):.1f} s)" if times else f"{len(run.events)} events"
    rows = [[escape(str(ev)), escape(str(d or "")), str(n)] for (ev, d), n in sorted(counts.items(), key=str)]
    return f"<p>{escape(span)}</p>" + _table(["event", "direction", "count"], rows, [False, False, True])


def _rejections(run: RunData) -> str:
    rows = [e for e in run.events if e.get("event") in REJECTION_EVENTS]
    if not rows:
        return "<p>None: every message of the run was accepted.</p>"
    shown = rows[:MAX_REJECTIONS_SHOWN]
    note = f"<p>The first {len(shown)} of {len(rows)} are listed.</p>" if len(rows) > len(shown) else ""
    body = [[escape(_clock(e.get("time"))), escape(str(e.get("round") or "")), escape(str(e.get("client_id") or "")),
             escape(str(e.get("event"))), escape(str(e.get("about") or "")), escape(str(e.get("reason") or ""))[:2000]]
            for e in shown]
    return f'<p class="bad">{len(rows)} rejected or failed message(s).</p>{note}' + _table(
        ["time", "round", "client", "event", "about", "reason"], body)


def _clock(t: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if isinstance(t, (int, float)) else ""


def render_report(run: RunData) -> str:
    """The whole page, as one HTML string."""
    from omegaconf import OmegaConf

    best = run.best
    rounds = run.rounds
    planned = run.planned_rounds
    names = {k: (run.config.get(k) or {}).get("name", "?") for k in ("model", "aggregator", "resource_policy")}
    total_s = sum(r["seconds"] or 0.0 for r in rounds)
    done = rounds[-1]["round"] if rounds else 0
    outcome = f"{done} of {planned} rounds" if planned else f"{done} rounds"
    cards = [("rounds done", outcome), ("best round", best["round"] if best["round"] is not None else "–"),
             ("best mAP@0.5", _num(best["map50"])), ("time in rounds", f"{total_s:.1f} s"),
             ("clients", str(len({c for r in rounds for c in r["participants"]})))]
    card_html = "".join(f'<div class="card"><div class="label">{escape(k)}</div><div class="value">{escape(str(v))}'
                        f"</div></div>" for k, v in cards)
    round_rows = [[str(r["round"]) + (" (best)" if r["round"] == best["round"] else ""), str(len(r["participants"])),
                   escape(", ".join(r["participants"])), _num(r["train_loss"]), _num(r["test_loss"]),
                   _num(r["map50"]), _num(r["recall"]), _num(r["coco_map"]), _num(r["seconds"], 1),
                   escape(r["evaluated_by"] or "–")] for r in rounds]
    round_table = _table(["round", "clients", "participants", "train loss", "test loss", "mAP@0.5", "recall",
                          "COCO mAP", "time (s)", "evaluated by"], round_rows,
                         [False, True, False, True, True, True, True, True, True, False],
                         ["best" if r["round"] == best["round"] else "" for r in rounds])
    config_text = OmegaConf.to_yaml(OmegaConf.create(run.config)) if run.config else "(no config.yaml)"
    overrides = f'<p class="sub">overrides: <code>{escape(" ".join(run.overrides))}</code></p>' \
        if run.overrides else ""
    skipped = f'<p class="bad">{run.skipped_lines} unreadable line(s) in metrics.jsonl / events.jsonl were ' \
              "skipped (a write cut short by a crash).</p>" if run.skipped_lines else ""
    checkpoint = f"<p>Best checkpoint: <code>{escape(best['checkpoint'])}</code></p>" if best["checkpoint"] else ""
    ended = "" if planned is None or done >= planned else \
        f'<p class="bad">The run stopped after round {done} of {planned}: early stopping (run.patience), a failure, ' \
        "a kill, or it is still running; its app.log says which.</p>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fedplug report · {escape(run.run_dir.name)}</title>
<style>{CSS}</style></head>
<body>
<h1>fedplug run report</h1>
<div class="sub"><code>{escape(str(run.run_dir))}</code> · model {escape(str(names['model']))} · aggregator
{escape(str(names['aggregator']))} · resource policy {escape(str(names['resource_policy']))}</div>
{overrides}{ended}{skipped}
<div class="cards">{card_html}</div>
{checkpoint}
<h2>Learning curves</h2>
{_charts(run)}
<h2>Rounds</h2>
{round_table}
<h2>Clients</h2>
{_client_table(run)}
<h2>Protocol events</h2>
{_events_summary(run)}
<h2>Rejections</h2>
{_rejections(run)}
<h2>Resolved config</h2>
<pre>{escape(config_text)}</pre>
<p class="sub">written by <code>fedplug report</code> on {escape(_clock(time.time()))}</p>
</body></html>
"""


def report_command(args: list[str]) -> int:
    """``fedplug report <run dir> [-o out.html]``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="fedplug report",
                                     description="Write one self-contained HTML page of a finished run.")
    parser.add_argument("run_dir", help="the run's directory (outputs/<date>/<time>)")
    parser.add_argument("-o", "--output", help="where to write the page (default: <run dir>/report.html)")
    options = parser.parse_args(args)
    try:
        run = load_run(options.run_dir)
    except RunDirError as exc:
        print(f"fedplug report: {exc}", flush=True)
        return 2
    out = Path(options.output) if options.output else run.run_dir / "report.html"
    try:
        write_atomic(out, render_report(run).encode("utf-8"))
    except OSError as exc:
        print(f"fedplug report: cannot write {out}: {exc.strerror or exc}; choose another path with -o", flush=True)
        return 2
    print(f"wrote {out} ({len(run.rounds)} rounds)", flush=True)
    return 0
