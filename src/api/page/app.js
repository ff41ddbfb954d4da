// The live page: sensors from /sensors (again every few seconds), a small chart each from
// /readings, and /stream for every reading stored while it is open.
// Plain JavaScript, no build step and nothing fetched from anywhere but this server.
// When the server runs with API keys, open the page as /#key=<read key> (the fragment never
// leaves the browser) or paste the key when asked; it is kept for this tab only.
"use strict";

const MAX_CARDS = 60;      // cards drawn at most (the rest are counted)
const MAX_POINTS = 60;     // points per chart
const HISTORY_FOR = 24;    // cards whose history is fetched
const SENSORS_EVERY_MS = 5000;
const cards = new Map();   // "sensor\u0000kind" -> card state
// Cards go stale after this without a reading (the server's default; its own judgement, from
// /sensors, is shown at load).
const staleMs = 300000;

const $ = (id) => document.getElementById(id);

let apiKey = null;
try {
  const fromUrl = new URLSearchParams(location.hash.slice(1)).get("key");
  if (fromUrl) {
    sessionStorage.setItem("sensorhub-key", fromUrl);
    history.replaceState(null, "", location.pathname + location.search);
  }
  apiKey = sessionStorage.getItem("sensorhub-key");
} catch (_) { /* storage off: ask when needed */ }

function authHeaders(headers) {
  if (apiKey) headers.authorization = "Bearer " + apiKey;
  return headers;
}

// After a 401: asks for a key once per page load.
let asked = false;
function askForKey() {
  if (asked) return false;
  asked = true;
  const key = window.prompt("This sensorhub needs an API key (sensorhub apikey FILE NAME --role read):");
  if (!key) return false;
  apiKey = key.trim();
  try { sessionStorage.setItem("sensorhub-key", apiKey); } catch (_) { /* tab only */ }
  return true;
}

function key(sensor, kind) { return sensor + "\u0000" + kind; }

function ago(ts) {
  const s = Math.max(0, Math.round((Date.now() - Date.parse(ts)) / 1000));
  if (s < 90) return s + " s ago";
  if (s < 5400) return Math.round(s / 60) + " min ago";
  if (s < 129600) return Math.round(s / 3600) + " h ago";
  return Math.round(s / 86400) + " days ago";
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function card(sensor, kind) {
  const k = key(sensor, kind);
  if (cards.has(k)) return cards.get(k);
  if (cards.size >= MAX_CARDS) return null;
  const root = el("article", "card");
  root.dataset.sensor = sensor;
  root.dataset.kind = kind;
  const h = el("h2");
  h.append(el("span", "id", sensor), el("span", "kind", kind));
  const value = el("p", "value", "–");
  const meta = el("div", "when");
  const when = el("span", "", "");
  const badge = el("span", "badge fresh", "live");
  meta.append(when, " ", badge);
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "chart");
  svg.setAttribute("viewBox", "0 0 100 40");
  svg.setAttribute("preserveAspectRatio", "none");
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  svg.append(line);
  root.append(h, value, meta, svg);
  $("sensors").append(root);
  const state = { root, value, when, badge, line, points: [], last: null };
  cards.set(k, state);
  return state;
}

function draw(state) {
  const pts = state.points;
  if (pts.length === 0) return;
  const t0 = pts[0].t, t1 = pts[pts.length - 1].t;
  let lo = Infinity, hi = -Infinity;
  for (const p of pts) { lo = Math.min(lo, p.v); hi = Math.max(hi, p.v); }
  const dt = Math.max(1, t1 - t0), dv = hi - lo || 1;
  state.line.setAttribute("points", pts.map((p) =>
    (((p.t - t0) / dt) * 100).toFixed(2) + "," + (38 - ((p.v - lo) / dv) * 36).toFixed(2)).join(" "));
}

function show(state, reading, flash) {
  const t = Date.parse(reading.timestamp);
  if (state.last === null || t >= state.last) {
    state.last = t;
    state.value.textContent = String(reading.value);
    state.when.textContent = ago(reading.timestamp);
    state.when.dataset.ts = reading.timestamp;
  }
  // The same reading can come from /readings, /sensors and /stream: keep one point per instant.
  if (!state.points.some((p) => p.t === t)) {
    state.points.push({ t, v: reading.value });
    state.points.sort((a, b) => a.t - b.t);
  }
  if (state.points.length > MAX_POINTS) state.points.splice(0, state.points.length - MAX_POINTS);
  draw(state);
  if (flash) {
    state.root.classList.remove("flash");
    void state.root.offsetWidth;
    state.root.classList.add("flash");
  }
}

function staleness() {
  for (const state of cards.values()) {
    const stale = state.last === null || Date.now() - state.last > staleMs;
    state.root.classList.toggle("stale", stale);
    state.badge.className = "badge " + (stale ? "stale" : "fresh");
    state.badge.textContent = stale ? "stale" : "live";
    if (state.when.dataset.ts) state.when.textContent = ago(state.when.dataset.ts);
  }
}

async function json(path) {
  let r = await fetch(path, { headers: authHeaders({ accept: "application/json" }) });
  if (r.status === 401 && askForKey()) {
    r = await fetch(path, { headers: authHeaders({ accept: "application/json" }) });
  }
  if (!r.ok) throw new Error(path + ": " + r.status);
  return r.json();
}

let historyFetched = 0;     // cards whose history has been asked for

// The sensor list: at load, then every SENSORS_EVERY_MS, since sensors that report rarely (or
// whose summary was not yet written when the page opened) reach the page only this way.
async function loadSensors() {
  const page = await json("/sensors?limit=" + MAX_CARDS);
  const sensors = page.sensors;
  const before = new Set(cards.keys());
  let staleCount = 0;
  for (const s of sensors) {
    if (s.stale) staleCount++;
    for (const k of s.by_kind) {
      const state = card(s.sensor_id, k.kind);
      if (state) show(state, { value: k.last_value, timestamp: k.last_seen }, false);
    }
  }
  const more = page.has_more ? " (first " + sensors.length + " shown)" : "";
  $("summary").textContent = sensors.length + " sensors" + more + ", " + staleCount + " stale";
  $("empty").hidden = sensors.length > 0;
  for (const s of sensors) {
    for (const k of s.by_kind) {
      const state = cards.get(key(s.sensor_id, k.kind));
      if (state && s.stale) state.last = Math.min(state.last, Date.now() - staleMs - 1);
    }
  }
  staleness();
  for (const [k, state] of cards) {
    if (before.has(k) || historyFetched >= HISTORY_FOR) continue;
    historyFetched++;
    // The day before the last reading: within any range limit the server sets
    // (--max-range-days is at least 1).
    const last = Date.parse(state.when.dataset.ts);
    const q = "/readings?order=desc&limit=" + MAX_POINTS + "&sensor_id=" +
      encodeURIComponent(state.root.dataset.sensor) + "&kind=" + encodeURIComponent(state.root.dataset.kind) +
      "&start=" + encodeURIComponent(new Date(last - 86400000).toISOString()) +
      "&end=" + encodeURIComponent(new Date(last).toISOString());
    json(q).then((p) => { for (const r of p.readings) show(state, r, false); }).catch(() => {});
  }
}

function live(up) {
  $("live").textContent = up ? "live" : "reconnecting";
  $("live").className = "pill " + (up ? "up" : "down");
}

function arrived(data) {
  const r = JSON.parse(data);
  const state = card(r.sensor_id, r.kind);
  if (!state) return;
  $("empty").hidden = true;
  show(state, r, true);
  staleness();
}

function stream() {
  if (apiKey) { streamWithKey(); return; }
  const source = new EventSource("/stream");
  source.onopen = () => live(true);
  source.onerror = () => live(false);
  source.onmessage = (e) => arrived(e.data);
}

// EventSource cannot send a header: with a key, the same events read from fetch.
async function streamWithKey() {
  let lastId = null;
  for (;;) {
    try {
      const headers = authHeaders({ accept: "text/event-stream" });
      if (lastId) headers["last-event-id"] = lastId;
      const r = await fetch("/stream", { headers });
      if (!r.ok) throw new Error("/stream: " + r.status);
      live(true);
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value.replace(/\r\n?/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          let type = "message";
          const data = [];
          for (const line of event.split("\n")) {
            if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
            else if (line.startsWith("id:")) lastId = line.slice(3).trim();
            else if (line.startsWith("event:")) type = line.slice(6).trim();
          }
          if (type === "message" && data.length > 0) arrived(data.join("\n"));
        }
      }
    } catch (_) { /* reconnect below */ }
    live(false);
    await new Promise((resolve) => setTimeout(resolve, 3000));
  }
}

async function status() {
  try {
    const h = await json("/health");
    for (const dep of ["mongodb", "redis"]) {
      $(dep).textContent = (dep === "mongodb" ? "MongoDB " : "Redis ") + h[dep];
      $(dep).className = "pill " + h[dep];
    }
  } catch (_) { /* the next round tries again */ }
  try {
    const text = await (await fetch("/metrics")).text();
    let dead = 0;
    for (const line of text.split("\n")) {
      if (line.startsWith("sensorhub_dead_letters_total")) dead += Number(line.split(" ").pop()) || 0;
    }
    $("deadletters").textContent = dead + " dead letters";
  } catch (_) { /* idem */ }
}

function refresh() {
  loadSensors().catch((e) => { $("summary").textContent = "Cannot load sensors: " + e.message; });
}

// The list first (it may ask for a key), then the stream; a reading stored between the two
// shows at the next refresh of the list.
loadSensors().catch((e) => { $("summary").textContent = "Cannot load sensors: " + e.message; }).finally(stream);
setInterval(refresh, SENSORS_EVERY_MS);
status();
setInterval(status, 5000);
setInterval(staleness, 1000);
