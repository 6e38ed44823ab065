"""``fedplug compare <run dirs…> [-o compare.png]``: several runs' learning curves on one figure.

Give it run directories, or a Hydra multirun directory (``multirun/<date>/<time>``,
whose numbered job folders are each a run).  Each run is one curve in each
panel — global mAP@0.5, recall, train loss, test loss — labelled by what sets
it apart: the Hydra overrides that differ between the runs (``aggregator=fedprox``),
else the directory name.  ``python -m fedplug -m aggregator=fedavg,fedprox,fedadam``
followed by ``fedplug compare multirun/<date>/<time>`` is the usual pair.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from fedplug.report import RunData, RunDirError, load_run

PANELS = (("map50", "global mAP@0.5"), ("recall", "global recall"), ("train_loss", "train loss (weighted)"),
          ("test_loss", "test loss (weighted)"))


def expand(paths: Sequence[str | Path]) -> list[Path]:
    """Run directories from ``paths``: a multirun folder stands for its job folders, in job order."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir() and not (p / "metrics.jsonl").is_file():
            jobs = sorted((d for d in p.iterdir() if d.is_dir() and (d / "metrics.jsonl").is_file()),
                          key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else 0, d.name))
            if jobs:
                out.extend(jobs)
                continue
        out.append(p)
    return out


def labels(runs: Sequence[RunData]) -> list[str]:
    """What tells each run apart: its overrides that not every run shares, else its directory."""
    common = set.intersection(*(set(r.overrides) for r in runs)) if runs else set()
    out = []
    for run in runs:
        own = [o for o in run.overrides if o not in common]
        out.append(" ".join(own) if own else _short_path(run.run_dir))
    if len(set(out)) < len(out):  # two runs with the same overrides: the directory tells them apart
        out = [f"{label} ({_short_path(run.run_dir)})" for label, run in zip(out, runs)]
    return out


def _short_path(path: Path) -> str:
    return "/".join(path.parts[-2:])


def draw_comparison(runs: Sequence[RunData], out: Path) -> dict[str, list[str]]:
    """Draw the figure to ``out`` (PNG); returns, per panel, the labels of the curves drawn in it."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = labels(runs)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4.2))
    drawn: dict[str, list[str]] = {}
    for ax, (key, title) in zip(axes, PANELS):
        drawn[key] = []
        for run, name in zip(runs, names):
            pts = [(r["round"], r[key]) for r in run.rounds if r[key] is not None]
            if pts:
                ax.plot(*zip(*pts), "o-", lw=1.8, ms=3, label=name)
                drawn[key].append(name)
        ax.set(xlabel="round", title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
        if key in ("map50", "recall"):
            ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(out)  # atomic: a viewer never sees half a picture
    return drawn


def compare_command(args: list[str]) -> int:
    """``fedplug compare <dirs…> [-o out.png]``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="fedplug compare",
                                     description="Draw several runs' learning curves on one figure.")
    parser.add_argument("run_dirs", nargs="+", help="run directories, or a Hydra multirun directory")
    parser.add_argument("-o", "--output", default="compare.png", help="the PNG to write (default: compare.png)")
    options = parser.parse_args(args)
    runs = []
    for path in expand(options.run_dirs):
        try:
            runs.append(load_run(path))
        except RunDirError as exc:
            print(f"fedplug compare: {exc}", flush=True)
            return 2
    out = Path(options.output)
    if out.suffix.lower() != ".png":
        print(f"fedplug compare: -o {out} must name a .png file", flush=True)
        return 2
    try:
        drawn = draw_comparison(runs, out)
    except OSError as exc:
        print(f"fedplug compare: cannot write {out}: {exc.strerror or exc}; choose another path with -o", flush=True)
        return 2
    print(f"wrote {out}: {len(runs)} runs ({', '.join(drawn['train_loss']) or 'no rounds'})", flush=True)
    return 0
