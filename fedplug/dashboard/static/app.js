// The dashboard page: one EventSource on /dashboard/events, nothing polled.
//
// Messages (see fedplug/dashboard/routes.py): "snapshot" replaces the whole picture (on opening, and
// whenever this page fell behind and the server dropped its queue), "row" is one protocol event with
// the client it changed, "round" a finished round, "status" a phase change no row carried, "bye" the
// server stopping. Rendering is batched to
// one pass per animation frame, so a burst of transfer-progress rows costs one redraw.
// Every value from the server is put in the page as text (textContent), never as markup.

import { drawChart } from "./chart.js";

const MAX_EVENTS = 200;
const PALETTE = ["#2f6fde", "#d9480f", "#2b8a3e", "#9c36b5", "#e8590c", "#1098ad", "#c2255c", "#5c940d",
  "#364fc7", "#a61e4d"];
let snap = null;          // the server's whole picture, kept current by the messages
let clockOffset = 0;      // server time - this browser's time, in seconds
const dirty = new Set();  // which parts need redrawing in the next frame
let frame = 0;

const $ = (id) => document.getElementById(id);

function el(tag, text, attrs) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  return e;
}

function num(v, digits = 4) { return v === null || v === undefined ? "–" : Number(v).toFixed(digits); }

function bytes(n) {
  if (!n) return "0 B";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function seconds(s) {
  if (s === null || s === undefined || !isFinite(s)) return "–";
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  const m = Math.floor(s / 60);
  return m < 60 ? `${m} min ${Math.round(s - 60 * m)} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
}

function clock(t) { return new Date(t * 1000).toLocaleTimeString([], { hour12: false }); }

function serverNow() { return Date.now() / 1000 + clockOffset; }

function invalidate(...parts) {
  for (const p of parts) dirty.add(p);
  if (!frame) frame = requestAnimationFrame(render);
}

// ------------------------------------------------------------------ messages

function onSnapshot(data) {
  snap = data;
  clockOffset = data.now - Date.now() / 1000;
  invalidate("status", "clients", "curves", "rounds", "events", "rejections", "config", "pick");
}

function onRow(data) {
  if (!snap) return;
  snap.phase = data.phase; snap.round = data.round; snap.rounds = data.rounds;
  const row = data.row;
  if (data.client) {
    const i = snap.clients.findIndex((c) => c.client_id === data.client.client_id);
    if (i < 0) { snap.clients.push(data.client); snap.clients.sort((a, b) => (a.client_id < b.client_id ? -1 : 1)); dirty.add("pick"); }
    else snap.clients[i] = data.client;
  }
  if (row.event !== "transfer_progress") {
    snap.events.push(row);
    if (snap.events.length > MAX_EVENTS) snap.events.splice(0, snap.events.length - MAX_EVENTS);
    dirty.add("events");
  }
  if (["protocol_error", "update_rejected", "update_failed"].includes(row.event)) {
    snap.rejections.push(row);
    snap.rejection_count += 1;
    dirty.add("rejections");
  }
  invalidate("status", "clients");
}

function onRound(data) {
  if (!snap) return;
  const rec = data.record;
  const i = snap.history.findIndex((r) => r.round === rec.round);
  if (i < 0) snap.history.push(rec); else snap.history[i] = rec;
  snap.history.sort((a, b) => a.round - b.round);
  snap.best = data.best;
  invalidate("status", "curves", "rounds", "pick");
}

function connect() {
  const source = new EventSource("events");
  const conn = $("connection");
  source.onopen = () => { conn.textContent = "live"; conn.className = "conn conn-live"; };
  source.onerror = () => {
    if (conn.dataset.ended) return;
    conn.textContent = "reconnecting…"; conn.className = "conn conn-wait";  // EventSource retries by itself
  };
  source.addEventListener("snapshot", (e) => onSnapshot(JSON.parse(e.data)));
  source.addEventListener("row", (e) => onRow(JSON.parse(e.data)));
  source.addEventListener("round", (e) => onRound(JSON.parse(e.data)));
  source.addEventListener("status", (e) => {
    const data = JSON.parse(e.data);
    if (!snap) return;
    snap.phase = data.phase; snap.round = data.round; snap.rounds = data.rounds;
    invalidate("status");
  });
  source.addEventListener("bye", (e) => {
    const data = JSON.parse(e.data);
    if (snap) { snap.phase = data.phase; snap.round = data.round; snap.best = data.best; }
    source.close();
    conn.dataset.ended = "1";
    conn.textContent = "server stopped: the page shows the run's last state";
    conn.className = "conn conn-ended";
    invalidate("status");
  });
}

// ------------------------------------------------------------------ rendering

function render() {
  frame = 0;
  if (!snap) return;
  if (dirty.has("status")) renderStatus();
  if (dirty.has("pick")) renderPick();
  if (dirty.has("clients")) renderClients();
  if (dirty.has("curves")) renderCurves();
  if (dirty.has("rounds")) renderRounds();
  if (dirty.has("events")) renderEvents();
  if (dirty.has("rejections")) renderRejections();
  if (dirty.has("config")) $("config").textContent = yaml(snap.config);
  dirty.clear();
}

function renderStatus() {
  $("phase").textContent = snap.phase;
  $("round").textContent = `${snap.round} / ${snap.rounds}`;
  const done = snap.history.length ? snap.history[snap.history.length - 1].round : 0;
  const bar = $("round-progress");
  bar.max = snap.rounds; bar.value = done;
  const best = snap.best || {};
  $("best-round").textContent = best.round ?? "–";
  $("best-map").textContent = num(best.map50);
  $("best-checkpoint").textContent = best.checkpoint || "none yet";
  $("run-dir").textContent = snap.run_dir;
  $("client-count").textContent = snap.clients.length;
  const counts = {};
  for (const c of snap.clients) counts[c.state] = (counts[c.state] || 0) + 1;
  $("client-states").textContent = Object.entries(counts).map(([s, n]) => `${n} ${s}`).join(" · ");
}

function renderClients() {
  const body = $("clients").tBodies[0];
  body.replaceChildren();
  const now = serverNow();
  for (const c of snap.clients) {
    const tr = el("tr", null, { "data-client": c.client_id, "data-state": c.state });
    tr.append(el("td", c.client_id));
    const state = el("span", c.state, { class: `state state-${c.state.replace(/ /g, "-")}` });
    const td = el("td"); td.append(state); tr.append(td);
    tr.append(el("td", c.round ?? "–", { class: "num" }));
    tr.append(el("td", seconds(now - c.since), { class: "num since", "data-since": c.since }));
    const parts = Object.entries(c.durations || {}).map(([s, t]) => `${s} ${seconds(t)}`);
    tr.append(el("td", parts.join(", ") || "–"));
    const transfer = el("td");
    if (c.transfer && c.transfer.bytes_total) {
      const share = Math.min(1, c.transfer.bytes_done / c.transfer.bytes_total);
      const bar = el("span", null, { class: "bar", title: `${c.transfer.direction}: ${bytes(c.transfer.bytes_done)} of ${bytes(c.transfer.bytes_total)}` });
      const fill = el("span"); fill.style.width = `${(100 * share).toFixed(1)}%`; bar.append(fill);
      transfer.append(el("span", c.transfer.direction === "up" ? "↑ " : "↓ "), bar,
        el("span", ` ${Math.round(100 * share)}%`));
    } else transfer.textContent = "–";
    tr.append(transfer);
    tr.append(el("td", bytes(c.bytes_up), { class: "num" }));
    tr.append(el("td", bytes(c.bytes_down), { class: "num" }));
    tr.append(el("td", c.num_train === null || c.num_train === undefined ? "–" : `${c.num_train} / ${c.num_test}`, { class: "num" }));
    tr.append(el("td", c.last_error || "", { class: "wrap" }));
    body.append(tr);
  }
}

function renderPick() {
  const pick = $("client-pick");
  const chosen = pick.value;
  const ids = new Set(snap.clients.map((c) => c.client_id));
  for (const r of snap.history) for (const cid of Object.keys(r.per_client || {})) ids.add(cid);
  pick.replaceChildren(el("option", "all clients", { value: "" }));
  for (const cid of [...ids].sort()) pick.append(el("option", cid, { value: cid }));
  pick.value = ids.has(chosen) ? chosen : "";
}

function points(rows, get) {
  const out = [];
  for (const r of rows) { const v = get(r); if (v !== null && v !== undefined && isFinite(v)) out.push([r.round, v]); }
  return out;
}

function renderCurves() {
  const h = snap.history;
  const quality = [
    { name: "mAP@0.5", color: PALETTE[0], points: points(h, (r) => r.map50) },
    { name: "recall", color: PALETTE[1], points: points(h, (r) => r.recall), dash: "6 3" },
    { name: "COCO mAP", color: PALETTE[2], points: points(h, (r) => r.coco_map), dash: "2 3" },
  ];
  const loss = [
    { name: "train loss", color: PALETTE[0], points: points(h, (r) => r.train_loss) },
    { name: "test loss", color: PALETTE[1], points: points(h, (r) => r.test_loss), dash: "6 3" },
  ];
  if ($("per-client").checked) {
    const chosen = $("client-pick").value;
    const ids = [...new Set(h.flatMap((r) => Object.keys(r.per_client || {})))].sort()
      .filter((cid) => !chosen || cid === chosen);
    ids.forEach((cid, i) => {
      const color = PALETTE[(i + 3) % PALETTE.length];
      const width = chosen ? 2 : 1;
      quality.push({ name: `${cid} mAP@0.5`, color, width, points: points(h, (r) => (r.per_client[cid] || {}).map50) });
      loss.push({ name: `${cid} train loss`, color, width, points: points(h, (r) => (r.per_client[cid] || {}).train_loss) });
      loss.push({ name: `${cid} test loss`, color, width, dash: "6 3", points: points(h, (r) => (r.per_client[cid] || {}).test_loss) });
    });
  }
  drawChart($("chart-quality"), { series: quality, xMax: snap.rounds, yMin: 0, yMax: 1, yLabel: "score" });
  drawChart($("chart-loss"), { series: loss, xMax: snap.rounds, yLabel: "loss" });
}

function renderRounds() {
  const body = $("rounds").tBodies[0];
  body.replaceChildren();
  const best = (snap.best || {}).round;
  for (const r of snap.history) {
    const tr = el("tr", null, { "data-round": r.round });
    if (r.round === best) tr.style.fontWeight = "600";
    tr.append(el("td", r.round === best ? `${r.round} (best)` : r.round));
    tr.append(el("td", r.participants.length, { class: "num", title: r.participants.join(", ") }));
    for (const v of [r.train_loss, r.test_loss, r.map50, r.recall, r.coco_map]) tr.append(el("td", num(v), { class: "num" }));
    tr.append(el("td", num(r.seconds, 1), { class: "num" }));
    tr.append(el("td", r.evaluated_by || "–"));
    tr.append(el("td", r.epsilon == null ? "–" : num(r.epsilon, 3), { class: "num" }));  // DP spent (docs/privacy.md)
    body.append(tr);
  }
}

const ROW_KEYS = new Set(["time", "event", "direction", "round", "client_id", "live", "sid"]);

function details(row) {
  return Object.entries(row).filter(([k]) => !ROW_KEYS.has(k))
    .map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v)
      : typeof v === "number" && !Number.isInteger(v) ? +v.toPrecision(4) : v}`).join(" ");
}

function renderEvents() {
  const body = $("events").tBodies[0];
  body.replaceChildren();
  for (const row of snap.events.slice().reverse()) {
    const tr = el("tr", null, { "data-event": row.event });
    for (const v of [clock(row.time), row.event, row.direction ?? "", row.round ?? "", row.client_id ?? ""]) tr.append(el("td", v));
    tr.append(el("td", details(row), { class: "wrap" }));
    body.append(tr);
  }
}

function renderRejections() {
  const badge = $("rejection-count");
  badge.textContent = snap.rejection_count;
  badge.className = snap.rejection_count ? "badge bad" : "badge";
  const body = $("rejections").tBodies[0];
  body.replaceChildren();
  for (const row of snap.rejections.slice().reverse()) {
    const tr = el("tr");
    for (const v of [clock(row.time), row.client_id ?? "", row.about ?? row.event, row.reason ?? ""]) tr.append(el("td", v, { class: "wrap" }));
    body.append(tr);
  }
}

function scalar(v) {
  if (Array.isArray(v)) return `[${v.map(scalar).join(", ")}]`;
  if (v !== null && typeof v === "object") return "{}";
  if (typeof v === "string" && /^[\w./:@+-][\w ./:@+,-]*$/.test(v) && !/^(true|false|null|[\d.eE+-]+)$/.test(v)) return v;
  return JSON.stringify(v);
}

function yaml(value, indent = "") {  // the resolved config, laid out like config.yaml
  const lines = [];
  for (const [k, v] of Object.entries(value || {})) {
    const nested = v !== null && typeof v === "object";
    if (nested && !Array.isArray(v) && Object.keys(v).length) {
      lines.push(`${indent}${k}:`, yaml(v, indent + "  "));
    } else if (nested && Array.isArray(v) && v.some((x) => x !== null && typeof x === "object")) {
      lines.push(`${indent}${k}:`, ...v.map((x) => `${indent}  - ${JSON.stringify(x)}`));
    } else lines.push(`${indent}${k}: ${scalar(v)}`);
  }
  return lines.join("\n");
}

$("per-client").addEventListener("change", (e) => { $("client-pick").disabled = !e.target.checked; invalidate("curves"); });
$("client-pick").addEventListener("change", () => invalidate("curves"));
setInterval(() => {  // the "for 12 s" column ticks on the page's clock: no request to the server
  if (!snap) return;
  const now = serverNow();
  for (const td of document.querySelectorAll("#clients td.since")) td.textContent = seconds(now - Number(td.dataset.since));
}, 1000);
connect();
