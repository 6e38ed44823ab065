"""Line charts as inline SVG text, for pages that must stand alone (``fedplug report``).

:func:`line_chart` returns one ``<svg>`` element as a string: axes, grid,
one ``<path>`` per series (with ``data-series`` and ``data-points`` attributes,
like the live dashboard's charts) and a legend.  Every label is escaped, since
client ids come from peers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape
from typing import Sequence

PALETTE = ("#2f6fde", "#d9480f", "#2b8a3e", "#9c36b5", "#e8590c", "#1098ad", "#c2255c", "#5c940d",
           "#364fc7", "#a61e4d")
W, H = 560, 300
LEFT, RIGHT, TOP, BOTTOM = 52, 12, 56, 34  # the title, then the legend, above the plot


@dataclass
class Series:
    name: str
    points: Sequence[tuple[float, float]]
    color: str = PALETTE[0]
    width: float = 2.0
    dash: str = ""


def _nice_step(span: float, ticks: int) -> float:
    raw = span / max(1, ticks)
    magnitude = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    norm = raw / magnitude
    return (1 if norm < 1.5 else 2 if norm < 3 else 5 if norm < 7 else 10) * magnitude


def line_chart(series: Sequence[Series], title: str, y_label: str, x_max: int | None = None,
               y_min: float | None = None, y_max: float | None = None) -> str:
    """An SVG chart of ``series`` over rounds (x from 1); ``y_min``/``y_max`` fixed, else fitted."""
    drawn = [s for s in series if s.points]
    xs = [p[0] for s in drawn for p in s.points]
    ys = [p[1] for s in drawn for p in s.points]
    x1 = max([2, x_max or 0, *xs])
    lo = y_min if y_min is not None else (min(ys) if ys else 0.0)
    hi = y_max if y_max is not None else (max(ys) if ys else 1.0)
    if hi - lo < 1e-9:
        hi, lo = lo + (abs(lo) or 1.0) * 0.1, lo - (abs(lo) or 1.0) * 0.1
    if y_min is None:
        lo = max(0.0, lo - (hi - lo) * 0.05)

    def px(x: float) -> float:
        return LEFT + (x - 1) / (x1 - 1) * (W - LEFT - RIGHT)

    def py(y: float) -> float:
        return H - BOTTOM - (y - lo) / (hi - lo) * (H - TOP - BOTTOM)

    out = [f'<svg viewBox="0 0 {W} {H}" role="img" aria-label="{escape(title)}" class="chart">',
           f'<text x="{LEFT}" y="14" class="title">{escape(title)}</text>']
    step = _nice_step(hi - lo, 5)
    y = math.ceil(lo / step) * step
    while y <= hi + 1e-9:
        out.append(f'<line class="grid" x1="{LEFT}" x2="{W - RIGHT}" y1="{py(y):.1f}" y2="{py(y):.1f}"/>')
        out.append(f'<text x="{LEFT - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.4g}</text>')
        y += step
    xstep = max(1, round(_nice_step(x1 - 1, 8)))
    for x in range(1, int(x1) + 1, xstep):
        out.append(f'<text x="{px(x):.1f}" y="{H - BOTTOM + 16}" text-anchor="middle">{x}</text>')
    out.append(f'<line class="axis" x1="{LEFT}" x2="{W - RIGHT}" y1="{H - BOTTOM}" y2="{H - BOTTOM}"/>')
    out.append(f'<line class="axis" x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{H - BOTTOM}"/>')
    out.append(f'<text x="{(LEFT + W - RIGHT) / 2}" y="{H - 4}" text-anchor="middle">round</text>')
    out.append(f'<text x="8" y="{TOP - 8}">{escape(y_label)}</text>')
    if not drawn:
        out.append(f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle" class="empty">no data</text>')
    legend_x, legend_y = LEFT, 32
    for s in series:
        d = " ".join(f"{'L' if i else 'M'}{px(x):.1f},{py(v):.1f}" for i, (x, v) in enumerate(s.points))
        dash = f' stroke-dasharray="{s.dash}"' if s.dash else ""
        hidden = "" if d else ' visibility="hidden"'
        out.append(f'<path d="{d or "M0,0"}" fill="none" stroke="{s.color}" stroke-width="{s.width}"{dash}{hidden} '
                   f'data-series="{escape(s.name)}" data-points="{len(s.points)}"><title>{escape(s.name)}</title></path>')
        if s.width >= 2:
            for x, v in s.points:
                out.append(f'<circle cx="{px(x):.1f}" cy="{py(v):.1f}" r="3" fill="{s.color}">'
                           f'<title>{escape(s.name)}, round {x:g}: {v:.4f}</title></circle>')
            width = 24 + 7 * len(s.name)
            if legend_x + width > W - RIGHT and legend_x > LEFT:  # next legend line
                legend_x, legend_y = LEFT, legend_y + 12
            out.append(f'<rect x="{legend_x}" y="{legend_y - 9}" width="10" height="10" fill="{s.color}"/>')
            out.append(f'<text x="{legend_x + 14}" y="{legend_y}">{escape(s.name)}</text>')
            legend_x += width
    out.append("</svg>")
    return "\n".join(out)
