"""``fedplug report`` (one self-contained HTML page of a run) and ``fedplug compare`` (curves of several runs)."""

import asyncio
import json
import re
import subprocess
import sys
from html import unescape

import pytest

from fedplug.compare import compare_command, draw_comparison, expand, labels
from fedplug.report import RunDirError, load_run, render_report, report_command
from scripted import compose_cfg, run_scripted_federation, toy_plugins

PNG = b"\x89PNG\r\n\x1a\n"


def _scripted_run(run_dir, aggregator="fedavg", behaviours=None, rounds=3):
    n = len(behaviours or "ab")
    cfg = compose_cfg(f"run.rounds={rounds}", f"run.min_clients={n}", f"run.clients_per_round={n}",
                      f"run.num_clients={n}", f"aggregator={aggregator}", "client.token=hunter2")
    status, server, _ = asyncio.run(run_scripted_federation(
        cfg, run_dir, behaviours or {"a": "good", "b": "good"}, plugins=toy_plugins(aggregator=aggregator),
        a={"train_size": 10}, b={"train_size": 30}))
    from omegaconf import OmegaConf

    server.outputs.write_config(OmegaConf.to_container(cfg, resolve=True))  # as fedplug.app does
    return status, server


def test_the_report_holds_each_round_s_numbers_from_metrics_and_stands_alone(tmp_path):
    status, server = _scripted_run(tmp_path / "run")
    assert status == 0
    out = tmp_path / "page.html"
    assert report_command([str(tmp_path / "run"), "-o", str(out)]) == 0
    html = out.read_text(encoding="utf-8")
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = re.findall(r"<tr[^>]*><td[^>]*>(\d+)(?: \(best\))?</td>(.*?)</tr>", html.split("<h2>Rounds</h2>")[1]
                      .split("<h2>")[0])
    assert [int(r[0]) for r in rows] == [m["round_number"] for m in metrics] == [1, 2, 3]
    for (_, cells), m in zip(rows, metrics):
        for key in ("train_loss", "test_loss", "map50", "recall"):
            assert f">{m[key]:.4f}<" in cells, (key, m[key])
    # curves: one point per evaluated round in the global mAP line
    assert re.search(r'data-series="mAP@0.5" data-points="3"', html)
    # clients, events, config with the secret hidden
    assert "<td class=\"wrap\">a</td>" in html and "<td class=\"wrap\">b</td>" in html
    assert "client_update" in html and "hunter2" not in html and "token: &#x27;***&#x27;" in html
    assert "best.safetensors" in html
    # self-contained: nothing to fetch
    for needle in ("<link", "<script", "src=", "href=", "@import", "url("):
        assert needle not in html, needle


def test_the_report_lists_rejections(tmp_path):
    status, _ = _scripted_run(tmp_path / "run", behaviours={"a": "good", "b": "nan"}, rounds=1)
    html = render_report(load_run(tmp_path / "run"))
    section = unescape(html.split("<h2>Rejections</h2>")[1])
    assert "rejected or failed message(s)" in section and "holds NaN or Inf values" in section
    assert ">b<" in section


def test_report_explains_a_directory_that_is_no_run(tmp_path, capsys):
    assert report_command([str(tmp_path / "nowhere")]) == 2
    assert "is not a directory: give a fedplug run directory" in capsys.readouterr().out
    assert report_command([str(tmp_path)]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().out
    with pytest.raises(RunDirError):
        load_run(tmp_path)


def test_a_half_written_last_line_is_skipped_and_said(tmp_path):
    _scripted_run(tmp_path / "run", rounds=2)
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"round_number": 3, "train_lo')
    run = load_run(tmp_path / "run")
    assert [r["round"] for r in run.rounds] == [1, 2] and run.skipped_lines == 1
    assert "1 unreadable line(s)" in render_report(run)


def test_compare_draws_one_curve_per_run(tmp_path):
    for name, aggregator in (("fedavg", "fedavg"), ("fedprox", "fedprox")):
        assert _scripted_run(tmp_path / name, aggregator=aggregator, rounds=2)[0] == 0
    runs = [load_run(tmp_path / n) for n in ("fedavg", "fedprox")]
    drawn = draw_comparison(runs, tmp_path / "both.png")
    assert (tmp_path / "both.png").read_bytes()[:8] == PNG
    names = labels(runs)  # no Hydra overrides recorded: the directories tell the runs apart
    assert names[0].endswith("/fedavg") and names[1].endswith("/fedprox")
    assert drawn == {key: names for key in ("map50", "recall", "train_loss", "test_loss")}
    out = tmp_path / "cli.png"
    assert compare_command([str(tmp_path / "fedavg"), str(tmp_path / "fedprox"), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG


def test_compare_labels_runs_by_the_overrides_that_differ(tmp_path):
    for i, agg in enumerate(("fedavg", "fedprox")):
        _scripted_run(tmp_path / "sweep" / str(i), aggregator=agg, rounds=1)
        hydra = tmp_path / "sweep" / str(i) / ".hydra"
        hydra.mkdir()
        hydra.joinpath("overrides.yaml").write_text(f"- aggregator={agg}\n- run.rounds=1\n")
    dirs = expand([tmp_path / "sweep"])  # a multirun folder stands for its jobs
    assert [d.name for d in dirs] == ["0", "1"]
    assert labels([load_run(d) for d in dirs]) == ["aggregator=fedavg", "aggregator=fedprox"]


def test_compare_refuses_what_it_cannot_use(tmp_path, capsys):
    assert compare_command([str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().out
    _scripted_run(tmp_path / "run", rounds=1)
    assert compare_command([str(tmp_path / "run"), "-o", str(tmp_path / "x.pdf")]) == 2
    assert "must name a .png file" in capsys.readouterr().out


@pytest.mark.slow
def test_hydra_multirun_gives_each_job_its_own_run_dir_and_compare_reads_them(tmp_path):
    """``python -m fedplug -m aggregator=fedavg,fedprox ...`` then ``fedplug compare <sweep dir>``."""
    import os

    env = dict(os.environ, FEDPLUG_CACHE=str(tmp_path / "cache"), TORCH_HOME=str(tmp_path / "torch-hub"))
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "fedplug", "-m", "aggregator=fedavg,fedprox", "run.rounds=1", "run.num_clients=2",
         "run.min_clients=2", "run.clients_per_round=2", "data.train_per_client=6", "data.test_per_client=3",
         "train.local_epochs=1", "resource_policy=always", f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = expand([sweep])
    assert [j.name for j in jobs] == ["0", "1"]
    aggregators = [load_run(j).config["aggregator"]["name"] for j in jobs]
    assert aggregators == ["fedavg", "fedprox"]
    out = tmp_path / "compare.png"
    cli = subprocess.run([sys.executable, "-m", "fedplug", "compare", str(sweep), "-o", str(out)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "2 runs (aggregator=fedavg, aggregator=fedprox)" in cli.stdout and out.read_bytes()[:8] == PNG


def test_the_report_counts_a_client_that_dropped_and_says_a_run_stopped_short(tmp_path):
    status, server = _scripted_run(tmp_path / "run", behaviours={"a": "good", "b": "good", "c": "die"}, rounds=2)
    assert status == 0
    html = render_report(load_run(tmp_path / "run"))
    clients = html.split("<h2>Clients</h2>")[1].split("<h2>")[0]
    row = re.search(r"<tr><td class=\"wrap\">c</td>(.*?)</tr>", clients).group(1)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
    assert cells[5] == "1" and cells[-1] == "dropped"  # dropped once, and never came back
    row_a = re.findall(r"<td[^>]*>(.*?)</td>", re.search(r"<tr><td class=\"wrap\">a</td>(.*?)</tr>", clients).group(1))
    assert row_a[5] == "0" and row_a[-1] == "finished"
    assert "The run stopped after round" not in html
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.write_text(metrics.read_text().splitlines()[0] + "\n")  # as if it had stopped after round 1
    assert "The run stopped after round 1 of 2" in render_report(load_run(tmp_path / "run"))

