// rootscale dashboard: reads api/state once, then follows api/stream (server-sent events). No build step, no
// external resources: everything it needs is served by the same process.
"use strict";

const MAX_FRAMES = 300;
const CHART_SECONDS = 120;
const VERDICTS = ["root-cause", "network", "saturated", "delegated", "healthy", "idle", "insufficient-data"];
const state = { title: "", source: "", frames: [], events: [], updates: 0 };

function esc(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
function colour(verdict) {
  return VERDICTS.includes(verdict) ? `var(--${verdict})` : "var(--none)";
}
function fmt(ms) {
  if (ms === null || ms === undefined || Number.isNaN(ms)) return "–";
  return ms >= 100 ? ms.toFixed(0) : ms.toFixed(1);
}

async function load() {
  const response = await fetch("api/state", { cache: "no-store" });
  const snapshot = await response.json();
  state.title = snapshot.title;
  state.source = snapshot.source;
  state.frames = snapshot.frames.slice(-MAX_FRAMES);
  state.events = snapshot.events;
  render();
}

function connect() {
  const status = document.getElementById("status");
  const stream = new EventSource("api/stream");
  let opened = false;
  stream.onopen = () => {
    status.textContent = "live";
    status.classList.remove("offline");
    // Back after a break (the server restarted, the network dropped): what happened meanwhile is in the state.
    if (opened) load();
    opened = true;
  };
  stream.onerror = () => {
    status.textContent = "reconnecting…";
    status.classList.add("offline");
  };
  stream.addEventListener("frame", (message) => {
    state.frames.push(JSON.parse(message.data));
    if (state.frames.length > MAX_FRAMES) state.frames.shift();
    bump();
  });
  stream.addEventListener("event", (message) => {
    state.events.push(JSON.parse(message.data));
    bump();
  });
  // The stream lagged behind and dropped updates: start again from the full state.
  stream.addEventListener("resync", () => load().then(bump));
}

function bump() {
  state.updates += 1;
  document.body.dataset.updates = String(state.updates);
  render();
}

function render() {
  document.getElementById("title").textContent = state.title;
  const frame = state.frames[state.frames.length - 1];
  document.getElementById("headline").textContent = frame ? frame.headline : "waiting for the first window…";
  renderGraph(frame);
  renderTimeline();
  renderServices();
}

// Layers by longest call path from the entry services; services without calls seen stay in the first layer.
function layout(frame) {
  const names = frame.services.map((s) => s.name);
  const depth = new Map(names.map((n) => [n, 0]));
  for (let round = 0; round < names.length; round++) {
    let changed = false;
    for (const edge of frame.edges) {
      if (!depth.has(edge.from) || !depth.has(edge.to)) continue;
      const wanted = depth.get(edge.from) + 1;
      if (wanted > depth.get(edge.to) && wanted < names.length) {
        depth.set(edge.to, wanted);
        changed = true;
      }
    }
    if (!changed) break;
  }
  const columns = new Map();
  for (const name of names) {
    const d = depth.get(name);
    if (!columns.has(d)) columns.set(d, []);
    columns.get(d).push(name);
  }
  return { depth, columns };
}

function renderGraph(frame) {
  const svg = document.getElementById("graph");
  if (!frame) {
    svg.innerHTML = "";
    return;
  }
  const width = svg.clientWidth || 900;
  const { columns } = layout(frame);
  const deepest = Math.max(0, ...columns.keys());
  const tallest = Math.max(1, ...[...columns.values()].map((c) => c.length));
  const height = Math.max(360, tallest * 62 + 30);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.style.height = `${height}px`;
  const nodeWidth = Math.min(170, width / (deepest + 1) - 40);
  const nodeHeight = 44;
  const position = new Map();
  for (const [d, column] of columns) {
    const x = 10 + (d * (width - nodeWidth - 20)) / Math.max(1, deepest);
    column.sort();
    column.forEach((name, i) => position.set(name, { x, y: ((i + 1) * height) / (column.length + 1) - nodeHeight / 2 }));
  }
  const onPath = new Set((frame.path || []).map(([from, to]) => `${from}>${to}`));
  let out = "";
  for (const edge of frame.edges) {
    const a = position.get(edge.from);
    const b = position.get(edge.to);
    if (!a || !b) continue;
    const [x1, y1, x2, y2] = [a.x + nodeWidth, a.y + nodeHeight / 2, b.x, b.y + nodeHeight / 2];
    const path = onPath.has(`${edge.from}>${edge.to}`);
    out += `<g class="edge${path ? " path" : ""}" data-from="${esc(edge.from)}" data-to="${esc(edge.to)}">` +
      `<line x1="${x1}" y1="${y1}" x2="${x2}" y2="${y2}"/>` +
      `<text x="${(x1 + x2) / 2}" y="${(y1 + y2) / 2 - 4}" text-anchor="middle">${edge.rps.toFixed(0)}/s</text></g>`;
  }
  for (const service of frame.services) {
    const p = position.get(service.name);
    const verdict = service.verdict || "none";
    const replicas = service.desired !== null && service.desired !== undefined && service.desired !== service.replicas
      ? `×${service.replicas}→${service.desired}` : `×${service.replicas}`;
    out += `<g class="node ${esc(verdict)}" data-service="${esc(service.name)}" data-verdict="${esc(verdict)}" data-replicas="${service.replicas}">` +
      `<title>${esc(service.name)}: ${esc(verdict)} ${esc(service.detail)}</title>` +
      `<rect x="${p.x}" y="${p.y}" width="${nodeWidth}" height="${nodeHeight}" fill="${colour(verdict)}"/>` +
      `<text x="${p.x + 8}" y="${p.y + 18}">${esc(service.name)} ${replicas}</text>` +
      `<text class="sub" x="${p.x + 8}" y="${p.y + 35}">${esc(verdict)} ${esc(service.detail)}</text></g>`;
  }
  svg.innerHTML = out;
  document.getElementById("legend").innerHTML = VERDICTS.map((v) => `<span style="--c:${colour(v)}">${v}</span>`).join("");
}

function renderTimeline() {
  const list = document.getElementById("timeline");
  const events = state.events.slice(-200).reverse();
  list.innerHTML = events.length === 0 ? "<li class=\"empty\">No decisions yet.</li>" : events.map((e) =>
    `<li class="${esc(e.kind)}" data-kind="${esc(e.kind)}" data-service="${esc(e.service)}">` +
    `<span class="at">${new Date(e.unix_ms).toLocaleTimeString()}</span><span class="kind">${esc(e.kind)}</span>` +
    `${esc(e.text)}${e.reason ? `<span class="why">${esc(e.reason)}</span>` : ""}</li>`).join("");
}

function chart(name) {
  const now = state.frames.length ? state.frames[state.frames.length - 1].unix_ms : 0;
  const points = [];
  for (const frame of state.frames) {
    if (now - frame.unix_ms > CHART_SECONDS * 1000) continue;
    const s = frame.services.find((x) => x.name === name);
    if (s) points.push({ t: (frame.unix_ms - now) / 1000, s });
  }
  const width = 300;
  const height = 90;
  const top = Math.max(1, ...points.map((p) => Math.max(p.s.latency_ms, p.s.target_ms || 0))) * 1.1;
  const x = (t) => ((t + CHART_SECONDS) / CHART_SECONDS) * (width - 30) + 28;
  const y = (v) => height - 12 - (Math.min(v, top) / top) * (height - 18);
  const line = (cls, pick) => {
    const ps = points.filter((p) => pick(p.s) !== null && pick(p.s) !== undefined);
    return ps.length ? `<polyline class="${cls}" points="${ps.map((p) => `${x(p.t).toFixed(1)},${y(pick(p.s)).toFixed(1)}`).join(" ")}"/>` : "";
  };
  return `<svg class="chart" viewBox="0 0 ${width} ${height}" preserveAspectRatio="none">` +
    `<text x="0" y="10">${fmt(top)}</text><text x="0" y="${height - 12}">0</text>` +
    `<text x="${width - 60}" y="${height - 1}">last ${CHART_SECONDS}s</text>` +
    line("target", (s) => s.target_ms) + line("local", (s) => s.local_wait_ms) + line("net", (s) => s.net_wait_ms) +
    line("remote", (s) => s.remote_wait_ms) + line("latency", (s) => s.latency_ms) + "</svg>";
}

function renderServices() {
  const frame = state.frames[state.frames.length - 1];
  const container = document.getElementById("services");
  if (!frame) {
    container.innerHTML = "";
    return;
  }
  container.innerHTML = frame.services.map((s) => {
    const verdict = s.verdict || "none";
    return `<div class="card" data-service="${esc(s.name)}" style="--c:${colour(verdict)}">` +
      `<div class="head"><span class="name">${esc(s.name)}${s.group ? ` <small>${esc(s.group)}</small>` : ""}</span>` +
      `<span class="verdict">${esc(verdict)} ${esc(s.detail)}</span></div>` +
      `<div class="numbers">×${s.replicas} · ${s.rps.toFixed(0)} req/s · latency ${fmt(s.latency_ms)}` +
      `${s.target_ms ? ` / ${fmt(s.target_ms)}` : ""} ms · local ${fmt(s.local_wait_ms)} · net ${fmt(s.net_wait_ms)} · remote ${fmt(s.remote_wait_ms)}</div>` +
      chart(s.name) + "</div>";
  }).join("");
}

load().then(connect, (error) => {
  document.getElementById("status").textContent = `cannot load: ${error}`;
  connect();
});
