// gossipfl live page: reads /info, /metrics?since=T and /cluster from the server that sent it
// (a node, or `gossipfl sim --live`) and draws them. Read-only: it only ever GETs.
"use strict";

const POLL_MS = 1000, GRAPH_MS = 2000;
const state = { kind: null, info: null, since: null, points: [], charts: {}, lastCluster: null };

function $(id) { return document.getElementById(id); }

async function getJSON(path, timeoutMs = 4000) {
  const ctl = new AbortController();
  const timer = setTimeout(() => ctl.abort(), timeoutMs);
  try {
    const r = await fetch(path, { signal: ctl.signal, cache: "no-store" });
    if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
    return await r.json();
  } finally { clearTimeout(timer); }
}

function connected(ok, text) {
  const c = $("conn");
  c.className = "conn " + (ok ? "ok" : "bad");
  c.textContent = text || (ok ? "live" : "disconnected");
}

function fmt(v, digits = 3) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  return Number(v).toFixed(digits);
}
function sci(v) {
  if (v === null || v === undefined) return "–";
  if (v === 0) return "0";
  return Number(v).toExponential(2);
}
function bytes(n) {
  if (n === null || n === undefined) return "–";
  const u = ["B", "KB", "MB", "GB", "TB"]; let i = 0; let x = n;
  while (x >= 1000 && i < u.length - 1) { x /= 1000; i++; }
  return `${x.toFixed(i ? 1 : 0)} ${u[i]}`;
}

// accuracy 0..1 -> a red-yellow-green ramp (the legend's)
const RAMP = [[215, 48, 39], [252, 141, 89], [254, 224, 139], [145, 207, 96], [26, 152, 80]];
function colour(acc) {
  if (acc === null || acc === undefined) return "#cccccc";
  const x = Math.min(1, Math.max(0, acc)) * (RAMP.length - 1);
  const i = Math.min(RAMP.length - 2, Math.floor(x)), f = x - i;
  const c = RAMP[i].map((a, k) => Math.round(a + f * (RAMP[i + 1][k] - a)));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

function makeChart(el, series, opts = {}) {
  const width = Math.max(300, el.clientWidth || 400);
  const o = {
    width, height: 230,
    scales: { x: { time: false }, ...(opts.scales || {}) },
    axes: opts.axes || [{ label: opts.xlabel || "" }, { label: opts.ylabel || "" }],
    series: [{ label: opts.xlabel || "x" }, ...series],
    legend: { live: true },
    cursor: { drag: { x: true, y: false } },
  };
  const data = [[], ...series.map(() => [])];
  const chart = new uPlot(o, data, el);
  chart._nseries = series.length;
  return chart;
}

// a log axis's ticks as powers of ten (uPlot's default rounds small values to 0)
const LOG_TICKS = (u, vals) => vals.map(v => v === null ? "" : Number(v).toExponential(0).replace("e+", "e"));

function positive(v) { return (v === null || v === undefined || !(v > 0)) ? null : v; }

// ------------------------------------------------------------------ node page

function setupNode(info) {
  $("title").textContent = `node ${info.id} · cluster ${info.cluster} · ${info.algorithm} · ${info.address}`;
  $("served-by").textContent = "node";
  state.charts.acc = makeChart($("chart-acc"), [
    { label: "accuracy", stroke: "#2f6fdf", width: 2, scale: "acc" },
    { label: "test loss", stroke: "#e08a1e", width: 1.5, scale: "loss" },
  ], { xlabel: "time (s)", scales: { acc: { range: [0, 1] }, loss: {} },
       axes: [{ label: "time since start (s)" }, { scale: "acc", label: "accuracy" },
              { scale: "loss", side: 1, label: "test loss", grid: { show: false } }] });
  state.charts.cons = makeChart($("chart-cons"), [
    { label: "spread of the models seen", stroke: "#7b3fb8", width: 2 },
  ], { xlabel: "time (s)", scales: { y: { distr: 3 } },
       axes: [{ label: "time since start (s)" }, { label: "mean |x − x̄|²", values: LOG_TICKS, size: 60 }] });
  $("cons-sub").textContent = "estimate: this node's model and its neighbours' newest";
  $("third-title").textContent = "Messages per second";
  state.charts.third = makeChart($("chart-third"), [
    { label: "out", stroke: "#1a9850", width: 2 },
    { label: "in", stroke: "#d73027", width: 2 },
  ], { xlabel: "time (s)", axes: [{ label: "time since start (s)" }, { label: "messages / s" }] });
  $("table-title").textContent = "Neighbours and peers";
}

function nodeCharts() {
  const p = state.points;
  const t = p.map(q => q.t);
  state.charts.acc.setData([t, p.map(q => q.accuracy), p.map(q => q.loss)]);
  state.charts.cons.setData([t, p.map(q => positive(q.consensus_estimate))]);
  const out = [], inn = [];
  for (let i = 0; i < p.length; i++) {
    if (i === 0) { out.push(null); inn.push(null); continue; }
    const dt = p[i].t - p[i - 1].t;
    out.push(dt > 0 ? (p[i].msgs_out - p[i - 1].msgs_out) / dt : null);
    inn.push(dt > 0 ? (p[i].msgs_in - p[i - 1].msgs_in) / dt : null);
  }
  state.charts.third.setData([t, out, inn]);
  const last = p[p.length - 1];
  if (last) {
    setBig("accuracy", last.accuracy, fmt(last.accuracy));
    $("acc-sub").textContent = `step ${last.step} · loss ${fmt(last.loss)}`;
    setBig("consensus", last.consensus_estimate, sci(last.consensus_estimate));
    const o = out[out.length - 1], i = inn[inn.length - 1];
    $("third-value").textContent = `${fmt(o, 1)} out · ${fmt(i, 1)} in`;
    $("third-sub").textContent = `${bytes(last.bytes_out)} sent · ${bytes(last.bytes_in)} received`;
  }
}

function nodeTable(status) {
  const rows = [`<tr><th>peer</th><th>address</th><th>neighbour</th><th class="num">msgs out</th>` +
                `<th class="num">msgs in</th><th class="num">sent</th><th class="num">received</th></tr>`];
  const nbs = new Set(status.neighbours || []);
  for (const peer of status.peers || []) {
    const t = (status.traffic || {})[peer.id] || {};
    rows.push(`<tr><td>${esc(peer.id)}</td><td>${esc(peer.address)}</td><td>${nbs.has(peer.id) ? "yes" : ""}</td>` +
              `<td class="num">${t.msgs_out || 0}</td><td class="num">${t.msgs_in || 0}</td>` +
              `<td class="num">${bytes(t.bytes_out || 0)}</td><td class="num">${bytes(t.bytes_in || 0)}</td></tr>`);
  }
  if (!(status.peers || []).length) rows.push(`<tr><td colspan="7">no peers known yet</td></tr>`);
  $("details").innerHTML = rows.join("");
  const rej = status.rejected || {};
  const parts = Object.keys(rej).sort().map(k => `${esc(k)} ${rej[k]}`);
  const extra = [];
  if (status.clipped !== undefined) extra.push(`clipped ${status.clipped}`);
  if (status.discarded !== undefined) extra.push(`discarded ${status.discarded}`);
  $("rejected").textContent = `rejected messages: ${parts.length ? parts.join(" · ") : "none"} · ` +
    `dropped ${status.dropped || 0} · mean step lag of merged models ${status.staleness === null ? "–" : fmt(status.staleness, 1)}` +
    ` (our step minus the sender's: negative when senders run ahead)` +
    (extra.length ? " · " + extra.join(" · ") : "") + (status.finished ? " · finished" : "");
}

// ------------------------------------------------------------------ simulation page

function setupSim(info) {
  $("title").textContent = `simulation · ${info.nodes} nodes · ${info.engine} (${info.schedule}) · ` +
    `${info.algorithm} · ${info.topology}`;
  $("served-by").textContent = "simulation";
  state.charts.acc = makeChart($("chart-acc"), [
    { label: "mean accuracy", stroke: "#2f6fdf", width: 2 },
    { label: "min accuracy", stroke: "#d73027", width: 1.5, dash: [6, 4] },
    { label: "averaged model", stroke: "#1a9850", width: 1.5 },
  ], { xlabel: "mean step", scales: { y: { range: [0, 1] } },
       axes: [{ label: "mean step (local steps per node)" }, { label: "accuracy" }] });
  const cons = [{ label: "measured", stroke: "#7b3fb8", width: 2 }];
  if (info.rho !== null && info.rho !== undefined) {
    cons.push({ label: `theory ρ² = ${info.rho ** 2 < 1e-3 ? sci(info.rho ** 2) : fmt(info.rho ** 2, 4)} per round`,
                stroke: "#888", width: 1.5, dash: [5, 5] });
  }
  state.charts.cons = makeChart($("chart-cons"), cons, { xlabel: "mean step", scales: { y: { distr: 3 } },
    axes: [{ label: "mean step (rounds)" }, { label: "mean |x − x̄|²", values: LOG_TICKS, size: 60 }] });
  $("cons-sub").textContent = info.rho === null ? "no closed-form rate for this setting" : "with the mixing-only theory line";
  $("third-title").textContent = "Simulated vs wall time";
  state.charts.third = makeChart($("chart-third"), [
    { label: "simulated time", stroke: "#2f6fdf", width: 2 },
  ], { xlabel: "wall (s)", axes: [{ label: "wall-clock time (s)" }, { label: "simulated time (s)" }] });
  $("table-title").textContent = "Run";
}

function simCharts() {
  const p = state.points, info = state.info;
  const s = p.map(q => q.mean_step);
  state.charts.acc.setData([s, p.map(q => q.mean_accuracy), p.map(q => q.min_accuracy), p.map(q => q.avg_model_accuracy)]);
  const measured = p.map(q => positive(q.consensus_distance));
  const data = [s, measured];
  if (state.charts.cons._nseries > 1) {
    const first = p.findIndex(q => positive(q.consensus_distance) !== null);
    const r2 = info.rho ** 2;
    data.push(p.map(q => {
      if (first < 0) return null;
      const v = p[first].consensus_distance * Math.pow(r2, q.mean_step - p[first].mean_step);
      return v > 1e-30 ? v : null;
    }));
  }
  state.charts.cons.setData(data);
  state.charts.third.setData([p.map(q => q.wall), p.map(q => q.t)]);
  const last = p[p.length - 1];
  if (!last) return;
  setBig("accuracy", last.mean_accuracy, fmt(last.mean_accuracy));
  $("acc-sub").textContent = `mean · min ${fmt(last.min_accuracy)} · step ${fmt(last.mean_step, 0)}` +
    (info.steps ? ` of ${info.steps}` : "");
  setBig("consensus", last.consensus_distance, sci(last.consensus_distance));
  const rate = last.node_steps_per_s;
  $("third-value").textContent = rate === null || rate === undefined ? "–" : `${Math.round(rate).toLocaleString()} node-steps/s`;
  $("third-sub").textContent = `simulated ${fmt(last.t, 1)} s in ${fmt(last.wall, 1)} s wall`;
  const rows = [["nodes", info.nodes], ["engine", `${info.engine} (${info.schedule})`], ["algorithm", info.algorithm],
                ["topology", info.topology], ["steps", info.steps ?? "–"],
                ["ρ = ‖W − J‖₂", info.rho === null ? "–" : fmt(info.rho, 4)],
                ["graph drawn", `${info.drawn} of ${info.nodes} nodes`],
                ["metric points", `${p.length}`]];
  $("details").innerHTML = rows.map(([k, v]) => `<tr><th>${esc(k)}</th><td>${esc(String(v))}</td></tr>`).join("");
}

// ------------------------------------------------------------------ shared

function esc(s) {
  return String(s).replace(/[&<>"']/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

function setBig(id, value, text) {
  const el = $(id);
  el.textContent = text;
  el.dataset.value = value === null || value === undefined ? "" : String(value);
}

function drawGraph(c) {
  const svg = $("graph"), W = 640, H = 420;
  const n = c.nodes.length;
  const r = n > 150 ? 3.5 : n > 40 ? 6 : 13;
  const pos = {};
  for (const v of c.nodes) pos[v.id] = [20 + v.x * (W - 40), 20 + v.y * (H - 40)];
  const maxMsgs = Math.max(1, ...c.edges.map(e => e.msgs || 0));
  const parts = [];
  for (const e of c.edges) {
    const a = pos[e.a], b = pos[e.b];
    if (!a || !b) continue;
    const w = e.msgs === undefined ? 1 : 0.8 + 4 * (e.msgs / maxMsgs);
    parts.push(`<line class="edge" x1="${a[0].toFixed(1)}" y1="${a[1].toFixed(1)}" x2="${b[0].toFixed(1)}" ` +
               `y2="${b[1].toFixed(1)}" stroke-width="${w.toFixed(2)}"><title>${esc(e.a)} – ${esc(e.b)}` +
               (e.msgs === undefined ? "" : `: ${e.msgs} messages, ${bytes(e.bytes)}`) + `</title></line>`);
  }
  for (const v of c.nodes) {
    const [x, y] = pos[v.id];
    const cls = ["node", v.id === c.self ? "self" : "", v.attacker ? "attacker" : ""].join(" ").trim();
    parts.push(`<circle class="${cls}" data-id="${esc(v.id)}" data-accuracy="${v.accuracy ?? ""}" cx="${x.toFixed(1)}" ` +
               `cy="${y.toFixed(1)}" r="${r}" fill="${colour(v.accuracy)}"><title>${esc(v.id)}: accuracy ` +
               `${fmt(v.accuracy)}, step ${v.step ?? "–"}${v.rejected ? `, rejected ${v.rejected}` : ""}</title></circle>`);
    if (n <= 40) parts.push(`<text x="${(x + r + 3).toFixed(1)}" y="${(y + 4).toFixed(1)}">${esc(v.id)}</text>`);
  }
  for (const id of c.unreachable || []) parts.push(`<title>${esc(id)} unreachable</title>`);
  svg.innerHTML = parts.join("");
  const shown = n === 1 ? "1 node" : `${n} nodes`;
  $("node-count").textContent = c.sampled ? `${shown} drawn (a sample)` : shown;
  $("node-count").dataset.count = String(n);
  const notes = [];
  if (c.unreachable && c.unreachable.length) notes.push(`${c.unreachable.length} peer(s) unreachable`);
  if (c.models_seen) notes.push(`consensus estimate over ${c.models_seen} models`);
  if (state.kind === "node") notes.push("edge width: messages on the link");
  $("graph-note").textContent = notes.join(" · ");
}

async function pollMetrics() {
  try {
    const q = state.since === null ? "" : `?since=${state.since}`;
    const m = await getJSON(`/metrics${q}`);
    if (m.points.length) {
      state.points.push(...m.points);
      if (state.points.length > 5000) state.points = state.points.slice(-5000);
      state.since = state.points[state.points.length - 1].t;
    }
    if (state.kind === "node") {
      const info = await getJSON("/info");
      nodeTable(info.status);
      nodeCharts();
      connected(true, info.status.finished ? "finished" : "live");
    } else {
      simCharts();
      connected(true);
    }
  } catch (err) {
    connected(false, state.kind === "sim" ? "disconnected (run over?)" : "disconnected");
  }
  setTimeout(pollMetrics, document.hidden ? 4 * POLL_MS : POLL_MS);  // a background tab polls less
}

async function pollCluster() {
  try {
    const c = await getJSON("/cluster", 6000);
    const key = JSON.stringify(c);
    if (key !== state.lastCluster) { state.lastCluster = key; drawGraph(c); }  // redraw only what changed
  } catch (err) { /* the next poll retries */ }
  setTimeout(pollCluster, document.hidden ? 4 * GRAPH_MS : GRAPH_MS);
}

async function main() {
  let info = null;
  while (info === null) {
    try { info = await getJSON("/info"); } catch (err) { connected(false); await new Promise(r => setTimeout(r, 1000)); }
  }
  state.kind = info.kind; state.info = info;
  if (info.kind === "sim") setupSim(info); else setupNode(info);
  window.addEventListener("resize", () => {
    for (const ch of Object.values(state.charts)) ch.setSize({ width: ch.root.parentElement.clientWidth, height: 230 });
  });
  pollMetrics();
  pollCluster();
}

main();
