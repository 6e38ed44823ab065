// A small SVG line chart for the dashboard's learning curves (no library: the page must work offline).
//
// drawChart(svg, {series, xMax, yMin, yMax, yLabel}) redraws `svg` (a viewBox of 560 x 300) from scratch.
// Each series is {name, color, points: [[round, value], ...], width, dash}. Every line is a <path> with
// data-series (its name) and data-points (how many points it has), so tests and scripts can read the chart.

const NS = "http://www.w3.org/2000/svg";
const W = 560, H = 300, M = { left: 48, right: 12, top: 30, bottom: 34 };

function node(tag, attrs, text) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;  // text, never markup: client ids come from peers
  return el;
}

function niceStep(span, ticks) {
  const raw = span / Math.max(1, ticks);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const norm = raw / mag;
  return (norm < 1.5 ? 1 : norm < 3 ? 2 : norm < 7 ? 5 : 10) * mag;
}

export function drawChart(svg, { series, xMax, yMin, yMax, yLabel }) {
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const drawn = series.filter((s) => s.points.length > 0);
  const xs = drawn.flatMap((s) => s.points.map((p) => p[0]));
  const ys = drawn.flatMap((s) => s.points.map((p) => p[1]));
  const x1 = Math.max(2, xMax || 0, ...xs);
  let lo = yMin !== undefined ? yMin : Math.min(...ys, Infinity);
  let hi = yMax !== undefined ? yMax : Math.max(...ys, -Infinity);
  if (!isFinite(lo) || !isFinite(hi)) { lo = 0; hi = 1; }
  if (hi - lo < 1e-9) { hi = lo + (Math.abs(lo) || 1) * 0.1; lo = lo - (hi - lo); }
  if (yMin === undefined) lo = Math.max(0, lo - (hi - lo) * 0.05);
  const px = (x) => M.left + ((x - 1) / (x1 - 1)) * (W - M.left - M.right);
  const py = (y) => H - M.bottom - ((y - lo) / (hi - lo)) * (H - M.top - M.bottom);

  const ystep = niceStep(hi - lo, 5);
  for (let y = Math.ceil(lo / ystep) * ystep; y <= hi + 1e-9; y += ystep) {
    svg.append(node("line", { class: "grid", x1: M.left, x2: W - M.right, y1: py(y), y2: py(y) }));
    svg.append(node("text", { x: M.left - 6, y: py(y) + 4, "text-anchor": "end" }, +y.toFixed(4)));
  }
  const xstep = Math.max(1, Math.round(niceStep(x1 - 1, 8)));
  for (let x = 1; x <= x1; x += xstep) {
    svg.append(node("text", { x: px(x), y: H - M.bottom + 16, "text-anchor": "middle" }, x));
  }
  svg.append(node("line", { class: "axis", x1: M.left, x2: W - M.right, y1: H - M.bottom, y2: H - M.bottom }));
  svg.append(node("line", { class: "axis", x1: M.left, x2: M.left, y1: M.top, y2: H - M.bottom }));
  svg.append(node("text", { x: (M.left + W - M.right) / 2, y: H - 4, "text-anchor": "middle" }, "round"));
  if (yLabel) svg.append(node("text", { x: 12, y: M.top - 10 }, yLabel));
  if (drawn.length === 0) {
    svg.append(node("text", { class: "empty", x: W / 2, y: H / 2, "text-anchor": "middle" },
      "the curves start when the first round is done"));
  }

  let legendX = M.left;
  for (const s of series) {
    const d = s.points.map((p, i) => `${i ? "L" : "M"}${px(p[0]).toFixed(1)},${py(p[1]).toFixed(1)}`).join(" ");
    const path = node("path", {
      d: d || "M0,0", fill: "none", stroke: s.color, "stroke-width": s.width || 2,
      "data-series": s.name, "data-points": s.points.length,
    });
    if (s.dash) path.setAttribute("stroke-dasharray", s.dash);
    if (!d) path.setAttribute("visibility", "hidden");
    path.append(node("title", {}, s.name));
    svg.append(path);
    if ((s.width || 2) >= 2) {
      for (const p of s.points) {
        const dot = node("circle", { cx: px(p[0]), cy: py(p[1]), r: 3, fill: s.color });
        dot.append(node("title", {}, `${s.name}, round ${p[0]}: ${(+p[1]).toFixed(4)}`));
        svg.append(dot);
      }
      svg.append(node("rect", { x: legendX, y: 8, width: 10, height: 10, fill: s.color }));
      const label = node("text", { x: legendX + 14, y: 17 }, s.name);
      svg.append(label);
      legendX += 24 + 7 * s.name.length;
    }
  }
}
