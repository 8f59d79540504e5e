// The casa-node dashboard: draws what the head node sends over
// server-sent events (a snapshot, then an update about every half second).
// Bounded: at most TASKS_KEPT commands and LOGS_KEPT log lines are held,
// and bars narrower than a pixel are drawn one pixel per row and column.
"use strict";

const TASKS_KEPT = 20000;
const LOGS_KEPT = 5000;
const LOGS_SHOWN = 500;
const LATEST_SHOWN = 15;
const LEVELS = { DEBUG: 0, INFO: 1, WARNING: 2, ERROR: 3, CRITICAL: 4 };
// Which outcome a pixel shared by several commands shows.
const PRIORITY = { success: 1, cancelled: 2, timeout: 3, failure: 4 };

const token = new URLSearchParams(location.search).get("token") || "";
const state = {
  servers: [],
  tasks: new Map(), // id -> task, oldest first
  samples: [],
  logs: [],
  origins: new Set(),
  totals: {},
  offset: 0, // the head node's clock minus this one's, in seconds
  connected: false,
  updates: 0,
};
// For tests and the curious: the state, and where a command's bar is.
window.casaNode = { state, barCenter };

const $ = (id) => document.getElementById(id);
const css = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();
const now = () => Date.now() / 1000 + state.offset;

function connect() {
  const source = new EventSource("events?token=" + encodeURIComponent(token));
  source.addEventListener("snapshot", (e) => { apply(JSON.parse(e.data), true); });
  source.addEventListener("update", (e) => { apply(JSON.parse(e.data), false); });
  source.onopen = () => setLink(true);
  source.onerror = () => setLink(false);
}

function setLink(up) {
  state.connected = up;
  const link = $("link");
  link.className = "link " + (up ? "up" : "down");
  link.textContent = up ? "live" : "reconnecting…";
}

function apply(view, snapshot) {
  state.offset = view.now - Date.now() / 1000;
  if (snapshot) {
    state.tasks.clear();
    state.samples = [];
    state.logs = [];
  }
  state.servers = view.servers;
  state.totals = view.totals;
  for (const task of view.tasks) {
    // A replaced timeout comes again: it moves to the end.
    state.tasks.delete(task.id);
    state.tasks.set(task.id, task);
  }
  while (state.tasks.size > TASKS_KEPT) {
    state.tasks.delete(state.tasks.keys().next().value);
  }
  state.samples.push(...view.samples);
  const lastLog = state.logs.length ? state.logs[state.logs.length - 1].seq : -1;
  if (view.logs_skipped && view.logs.length) {
    state.logs.push({
      seq: view.logs[0].seq - 0.5, time: view.logs[0].time, level: "INFO", origin: "dashboard", rank: 0,
      message: "… " + view.logs_skipped + " records too many to follow live (all are in the log file)",
    });
  }
  for (const line of view.logs) {
    if (line.seq > lastLog) {
      state.logs.push(line);
      if (!state.origins.has(line.origin)) {
        state.origins.add(line.origin);
        const option = document.createElement("option");
        option.value = option.textContent = line.origin;
        $("origin").append(option);
      }
    }
  }
  if (state.logs.length > LOGS_KEPT) state.logs.splice(0, state.logs.length - LOGS_KEPT);
  state.updates += 1;
  setLink(true);
  renderServers();
  renderLatest();
  renderCounts();
  renderLog();
  draw();
}

function seconds(s) {
  if (s < 60) return s.toFixed(1) + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + Math.floor(s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return n.toFixed(i ? 1 : 0) + " " + units[i];
}

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function renderServers() {
  const body = $("servers").tBodies[0];
  const rows = [];
  const t = now();
  for (const s of state.servers) {
    const row = document.createElement("tr");
    row.dataset.rank = s.rank;
    row.dataset.state = s.state;
    cell(row, s.rank);
    cell(row, s.host);
    cell(row, s.state, "state-" + s.state.replace(" ", "-"));
    const command = cell(row, s.command || "", "command");
    command.title = s.command || "";
    cell(row, s.command_start ? seconds(Math.max(0, t - s.command_start)) : "");
    cell(row, bytes(s.rss));
    cell(row, s.restarts);
    cell(row, s.pid + " / " + (s.worker_pid === null ? "-" : s.worker_pid));
    cell(row, s.last_ping ? seconds(Math.max(0, t - s.last_ping)) + " ago" : "-");
    rows.push(row);
  }
  body.replaceChildren(...rows);
  const busy = state.servers.filter((s) => s.state === "busy").length;
  $("summary").textContent = state.servers.length + " servers, " + busy + " busy";
}

function renderLatest() {
  const body = $("latest").tBodies[0];
  const rows = [];
  const all = [...state.tasks.values()];
  for (const task of all.slice(-LATEST_SHOWN).reverse()) {
    const row = document.createElement("tr");
    row.dataset.id = task.id;
    row.dataset.outcome = task.outcome;
    cell(row, task.id);
    cell(row, task.server || "-");
    cell(row, task.outcome, "outcome-" + task.outcome);
    cell(row, task.start ? seconds(Math.max(0, task.stop - task.start)) : "-");
    cell(row, task.command, "command");
    row.addEventListener("click", () => showRecord(task.id));
    rows.push(row);
  }
  body.replaceChildren(...rows);
}

function renderCounts() {
  const t = state.totals;
  const done = t.success || 0;
  const failed = (t.failure || 0) + (t.timeout || 0) + (t.cancelled || 0);
  const s = state.samples;
  let rate = 0;
  if (s.length > 1) {
    const a = s[Math.max(0, s.length - 11)];
    const b = s[s.length - 1];
    if (b.time > a.time) rate = (b.done + b.failed - a.done - a.failed) / (b.time - a.time);
  }
  const items = [
    ["submitted", t.submitted || 0], ["queued", t.queued || 0], ["running", t.running || 0],
    ["done", done], ["failed", failed], ["per second", rate.toFixed(1)],
    ["worker restarts", t.restarts || 0],
  ];
  $("counts").replaceChildren(...items.map(([name, value]) => {
    const div = document.createElement("div");
    div.dataset.count = name;
    const b = document.createElement("b");
    b.textContent = value;
    div.append(b, name);
    return div;
  }));
}

function renderLog() {
  const min = Number($("level").value);
  const origin = $("origin").value;
  const text = $("search").value.toLowerCase();
  const shown = [];
  for (let i = state.logs.length - 1; i >= 0 && shown.length < LOGS_SHOWN; i -= 1) {
    const line = state.logs[i];
    if ((LEVELS[line.level] ?? 1) < min) continue;
    if (origin && line.origin !== origin) continue;
    if (text && !line.message.toLowerCase().includes(text)) continue;
    shown.push(line);
  }
  const box = $("log");
  const atEnd = box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
  box.replaceChildren(...shown.reverse().map((line) => {
    const div = document.createElement("div");
    div.className = line.level;
    const time = new Date(line.time * 1000).toISOString().replace("T", " ").slice(0, 23);
    div.textContent = time + " " + line.level.padEnd(8) + " " + line.origin + " " + line.message;
    return div;
  }));
  if (atEnd) box.scrollTop = box.scrollHeight;
}

// The task stream's geometry, kept for clicks.
let geometry = null;

function draw() {
  drawStream();
  drawProgress();
}

function fitCanvas(canvas, height) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  canvas.style.height = height + "px";
  if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  return { ctx, width };
}

function drawStream() {
  const canvas = $("stream");
  const ranks = state.servers.map((s) => s.rank);
  const rowOf = new Map(ranks.map((r, i) => [r, i]));
  const rowHeight = Math.max(2, Math.min(18, Math.floor(600 / Math.max(1, ranks.length))));
  const label = rowHeight >= 10 ? 40 : 0;
  const axis = 18;
  const height = ranks.length * rowHeight + axis;
  const { ctx, width } = fitCanvas(canvas, height);
  const end = now();
  const chosen = $("window").value;
  let span = Number(chosen);
  if (chosen === "auto" || span === 0) {
    const first = state.tasks.size ? state.tasks.values().next().value.start || end : end;
    const since = state.samples.length ? Math.min(first, state.samples[0].time) : first;
    span = Math.max(30, end - since);
    // The scale stays put while the run fits it: the smallest of these
    // windows that holds it.
    if (chosen === "auto") span = [30, 60, 120, 300].find((w) => w >= span) || 300;
  }
  const start = end - span;
  const plot = width - label;
  const x = (t) => label + ((t - start) / span) * plot;
  geometry = { start, span, label, plot, rowHeight, rowOf, ranks };
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#555";
  if (label) ranks.forEach((r, i) => ctx.fillText("n# " + r, 2, i * rowHeight + rowHeight - 4));
  // Bars wider than a pixel are drawn; thinner ones mark their pixel.
  const pixels = new Map();
  const colours = {
    success: css("--success"), failure: css("--failure"), timeout: css("--timeout"),
    cancelled: css("--cancelled"), running: css("--running"),
  };
  for (const task of state.tasks.values()) {
    const row = rowOf.get(task.server);
    if (row === undefined || !task.start || task.stop < start) continue;
    const x0 = Math.max(label, x(task.start));
    const x1 = x(task.stop);
    if (x1 - x0 >= 1.5) {
      ctx.fillStyle = colours[task.outcome];
      ctx.fillRect(x0, row * rowHeight + 1, x1 - x0 - 0.5, rowHeight - 1);
    } else {
      const key = row * 100000 + Math.floor(x0);
      const seen = pixels.get(key);
      if (!seen || PRIORITY[task.outcome] > PRIORITY[seen]) pixels.set(key, task.outcome);
    }
  }
  for (const [key, outcome] of pixels) {
    ctx.fillStyle = colours[outcome];
    ctx.fillRect(key % 100000, Math.floor(key / 100000) * rowHeight + 1, 1, rowHeight - 1);
  }
  for (const s of state.servers) {
    if (!s.command_start) continue;
    const row = rowOf.get(s.rank);
    const x0 = Math.max(label, x(s.command_start));
    ctx.fillStyle = colours.running;
    ctx.fillRect(x0, row * rowHeight + 1, Math.max(1, x(end) - x0), rowHeight - 1);
  }
  // The time axis: a tick a fifth of the span apart.
  ctx.fillStyle = "#555";
  const top = ranks.length * rowHeight;
  for (let i = 0; i <= 5; i += 1) {
    const t = start + (span * i) / 5;
    const px = label + (plot * i) / 5;
    ctx.fillRect(px, top, 1, 4);
    const text = i === 5 ? "now" : "-" + seconds(end - t);
    ctx.fillText(text, Math.min(px + 2, width - ctx.measureText(text).width - 2), top + 15);
  }
}

/// Where the bar of command `id` is drawn, in CSS pixels of the canvas;
/// null when it is not drawn.
function barCenter(id) {
  const task = state.tasks.get(id);
  if (!task || !geometry || !task.start) return null;
  const row = geometry.rowOf.get(task.server);
  if (row === undefined) return null;
  const { start, span, label, plot, rowHeight } = geometry;
  const mid = (Math.max(task.start, start) + task.stop) / 2;
  return { x: label + ((mid - start) / span) * plot, y: row * rowHeight + rowHeight / 2 };
}

function taskAt(px, py) {
  if (!geometry) return null;
  const { start, span, label, plot, rowHeight, ranks } = geometry;
  const rank = ranks[Math.floor(py / rowHeight)];
  if (rank === undefined || px < label) return null;
  const t = start + ((px - label) / plot) * span;
  const slack = (3 / plot) * span;
  let best = null;
  let distance = Infinity;
  for (const task of state.tasks.values()) {
    if (task.server !== rank || !task.start) continue;
    const d = t < task.start ? task.start - t : t > task.stop ? t - task.stop : 0;
    if (d <= slack && d < distance) { best = task; distance = d; }
  }
  return best;
}

function drawProgress() {
  const canvas = $("progress");
  const { ctx, width } = fitCanvas(canvas, 180);
  const s = state.samples;
  if (s.length < 2) return;
  const series = [["queued", css("--timeout")], ["running", css("--running")],
    ["done", css("--success")], ["failed", css("--failure")]];
  let top = 1;
  for (const p of s) for (const [k] of series) top = Math.max(top, p[k]);
  const t0 = s[0].time;
  const t1 = s[s.length - 1].time;
  const x = (t) => 40 + ((t - t0) / Math.max(1, t1 - t0)) * (width - 50);
  const y = (v) => 165 - (v / top) * 155;
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#555";
  ctx.fillText(String(top), 2, 14);
  ctx.fillText("0", 2, 165);
  ctx.fillText("-" + seconds(t1 - t0), 40, 178);
  ctx.fillText("now", width - 30, 178);
  for (const [key, colour] of series) {
    ctx.strokeStyle = colour;
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    s.forEach((p, i) => (i ? ctx.lineTo(x(p.time), y(p[key])) : ctx.moveTo(x(p.time), y(p[key]))));
    ctx.stroke();
  }
}

async function showRecord(id) {
  const aside = $("detail");
  $("detail-title").textContent = "Command request " + id;
  $("detail-traceback").textContent = "";
  $("detail-record").textContent = "loading…";
  aside.hidden = false;
  try {
    const answer = await fetch("api/record/" + id + "?token=" + encodeURIComponent(token));
    const text = await answer.text();
    if (!answer.ok) {
      $("detail-record").textContent = text;
      return;
    }
    const record = JSON.parse(text);
    $("detail-traceback").textContent = record.traceback || "";
    $("detail-record").textContent = JSON.stringify(record, null, 2);
  } catch (e) {
    $("detail-record").textContent = "could not fetch the record: " + e;
  }
}

function start() {
  $("stream").addEventListener("click", (e) => {
    const box = e.target.getBoundingClientRect();
    const task = taskAt(e.clientX - box.left, e.clientY - box.top);
    if (task) showRecord(task.id);
  });
  $("close").addEventListener("click", () => { $("detail").hidden = true; });
  for (const id of ["level", "origin"]) $(id).addEventListener("change", renderLog);
  $("search").addEventListener("input", renderLog);
  $("window").addEventListener("change", draw);
  window.addEventListener("resize", draw);
  // Running bars grow between updates.
  setInterval(() => { if (state.connected) { drawStream(); } }, 1000);
  connect();
}

start();
