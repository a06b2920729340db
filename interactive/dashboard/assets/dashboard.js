// The esker dashboard: reads the node's public HTTP API only, with the API
// token saved in this browser (if any) as a bearer token on every call.
"use strict";

// Counters whose per-second rates are shown, as the node names them in
// GET /metrics: this list is the only place that knows metric names. Each
// row of the table is one combination of the `by` labels; other labels are
// summed.
const RATE_COUNTERS = [
  { name: "esker_commands_total", title: "commands", by: ["type", "outcome"] },
  { name: "esker_transactions_total", title: "transactions", by: ["result"] },
  { name: "esker_projection_events_total", title: "projection events", by: ["projection", "outcome"] },
  { name: "esker_sideeffect_events_total", title: "side-effect events", by: ["consumer", "outcome"] },
  { name: "esker_sink_events_total", title: "sink events", by: ["sink"] },
  { name: "esker_forwarded_requests_total", title: "forwarded requests", by: ["outcome"] },
  { name: "esker_rebalances_total", title: "rebalances", by: [] },
];

const REFRESH_MS = 2000;      // cluster map and rates
const HISTORY_SIZE = 50;      // events shown per entity
const TOKEN_KEY = "esker.apiToken";
const PALETTE = ["#2563eb", "#16a34a", "#d97706", "#9333ea", "#dc2626", "#0891b2", "#db2777", "#65a30d"];

const $ = (id) => document.getElementById(id);

// el builds an element; strings among children become text (never HTML).
function el(tag, props = {}, ...children) {
  const e = Object.assign(document.createElement(tag), props);
  e.append(...children.filter((c) => c !== null && c !== undefined));
  return e;
}

function setStatus(id, level, text) {
  const s = $(id);
  s.className = "status " + level;
  s.textContent = text;
}

// ---- API calls ----

class APIError extends Error {
  constructor(status, message, retryAfter) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter; // seconds, or NaN
  }
}

function api(path, init = {}) {
  const headers = new Headers(init.headers);
  const token = localStorage.getItem(TOKEN_KEY);
  if (token) headers.set("Authorization", "Bearer " + token);
  return fetch(path, { ...init, headers, cache: "no-store" });
}

// failure turns a non-2xx answer into an APIError with the API's message.
async function failure(res) {
  let msg = res.statusText;
  try {
    msg = (await res.json()).error || msg;
  } catch { /* not JSON */ }
  if (res.status === 401 || res.status === 403) msg += " (set the API token above)";
  return new APIError(res.status, `${res.status}: ${msg}`, Number(res.headers.get("Retry-After")));
}

async function getJSON(path, signal) {
  const res = await api(path, { signal, headers: { Accept: "application/json" } });
  if (!res.ok) throw await failure(res);
  return res.json();
}

const sleep = (ms, signal) => new Promise((resolve) => {
  const t = setTimeout(resolve, ms);
  signal?.addEventListener("abort", () => { clearTimeout(t); resolve(); }, { once: true });
});

// ---- cluster map ----

let knownTypes = "", knownProjections = "";

function memberLabel(m) {
  try { return new URL(m.url).host; } catch { return m.id; }
}

async function refreshCluster() {
  let c;
  try {
    c = await getJSON("/v1/cluster");
  } catch (e) {
    setStatus("status", e.status === 503 ? "warn" : "bad", e.message);
    return;
  }
  setStatus("status", "ok", "up");
  $("self").textContent = c.self;
  $("generation").textContent = `generation ${c.generation} · ${c.partitions} partitions`;

  const color = new Map(), label = new Map();
  c.members.forEach((m, i) => {
    color.set(m.id, PALETTE[i % PALETTE.length]);
    label.set(m.id, memberLabel(m));
  });
  const name = (id) => label.get(id) || id || "?";

  $("members").tBodies[0].replaceChildren(...c.members.map((m) => el("tr",
    { className: m.url === c.self ? "self" : "", title: m.id },
    el("td", {}, el("span", { className: "swatch", style: `background:${color.get(m.id)}` })),
    el("td", {}, name(m.id)),
    el("td", {}, el("a", { href: m.url + "/", textContent: m.url })),
    el("td", { className: "num" }, String(c.tasks.filter((t) => t.active === m.id).length)),
    el("td", { className: "num" }, String(c.tasks.filter((t) => t.standbys.includes(m.id)).length)),
  )));

  $("partitions").replaceChildren(...c.tasks.map((t) => {
    const moving = t.active === "";
    const local = t.local;
    const box = el("div", {
      className: "part" + (moving ? " moving" : "") + (local && !local.restored ? " restoring" : ""),
      style: `border-left-color:${moving ? "#aaa" : color.get(t.active)}`,
    },
    el("b", {}, `p${t.partition} `),
    moving ? `moving → ${name(t.pending)}` : name(t.active),
    t.standbys.length ? el("div", { className: "role" }, "standby " + t.standbys.map(name).join(", ")) : null,
    local ? el("div", { className: "role" },
      `here: ${local.role}, ${local.restored ? "restored" : "restoring"}` + (local.lag ? `, lag ${local.lag}` : "")) : null);
    box.dataset.partition = t.partition;
    return box;
  }));

  const procs = c.processors || [];
  $("processors").tBodies[0].replaceChildren(...procs.map((p) => el("tr", {},
    el("td", {}, p.kind), el("td", {}, p.name),
    el("td", {}, p.partitions.join(", ")),
    el("td", { className: "num" }, String(p.lag)),
    el("td", { className: p.error ? "error" : "" }, p.error || "running"),
  )));

  const types = c.aggregateTypes || [];
  if (types.join() !== knownTypes) {
    knownTypes = types.join();
    fillSelect($("entity-type"), types);
  }
  const projections = procs.filter((p) => p.kind === "projection").map((p) => p.name);
  if (projections.join() !== knownProjections) {
    knownProjections = projections.join();
    fillSelect($("projection-name"), projections);
  }
}

function fillSelect(sel, names) {
  const keep = sel.value;
  sel.replaceChildren(...names.map((n) => el("option", { value: n, textContent: n })));
  if (names.includes(keep)) sel.value = keep;
}

// ---- rates from GET /metrics ----

// parseMetrics reads the Prometheus text format: [{name, labels, value}].
function parseMetrics(text) {
  const out = [];
  for (const line of text.split("\n")) {
    if (line === "" || line.startsWith("#")) continue;
    const m = /^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const labels = {};
    for (const [, k, v] of (m[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) {
      labels[k] = v.replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
    }
    out.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return out;
}

// counterTotals sums each RATE_COUNTERS entry by its labels: "title\tlabel" → value.
function counterTotals(samples) {
  const totals = new Map();
  for (const c of RATE_COUNTERS) {
    for (const s of samples) {
      if (s.name !== c.name) continue;
      const key = c.title + "\t" + c.by.map((l) => s.labels[l] ?? "").join(" · ");
      totals.set(key, (totals.get(key) || 0) + s.value);
    }
  }
  return totals;
}

let lastRates = null; // {time, totals}

async function refreshRates() {
  let totals;
  try {
    const res = await api("/metrics", { headers: { Accept: "text/plain" } });
    if (!res.ok) throw await failure(res);
    totals = counterTotals(parseMetrics(await res.text()));
  } catch (e) {
    $("rate-table").tBodies[0].replaceChildren(el("tr", {}, el("td", { colSpan: 4, className: "error" }, "metrics: " + e.message)));
    return;
  }
  const now = performance.now(), prev = lastRates;
  lastRates = { time: now, totals };
  // Counters still at 0 are left out: they say nothing yet.
  const counting = [...totals].filter(([, value]) => value > 0);
  if (counting.length === 0) {
    $("rate-table").tBodies[0].replaceChildren(el("tr", {}, el("td", { colSpan: 4, className: "hint" }, "nothing counted yet")));
    return;
  }
  $("rate-table").tBodies[0].replaceChildren(...counting.map(([key, value]) => {
    const [title, label] = key.split("\t");
    const before = prev?.totals.get(key);
    const rate = before === undefined || value < before ? "–" : ((value - before) * 1000 / (now - prev.time)).toFixed(1);
    const row = el("tr", {}, el("td", {}, title), el("td", {}, label),
      el("td", { className: "num" }, rate), el("td", { className: "num" }, String(value)));
    row.dataset.counter = key;
    return row;
  }));
}

// ---- one entity: state, history, live watch ----

let entityWatch = null; // AbortController of the entity on show
let shownVersion = 0;

function entityPath(type, id) {
  return `/v1/aggregates/${encodeURIComponent(type)}/${encodeURIComponent(id)}`;
}

function showEntityError(msg) {
  const p = $("entity-error");
  p.textContent = msg;
  p.hidden = !msg;
}

function showState(version, state, time) {
  shownVersion = version;
  $("entity-view").hidden = false;
  $("entity-version").textContent = String(version);
  $("entity-updated").textContent = time ? "updated " + new Date(time).toLocaleString() : "";
  $("entity-state").textContent = JSON.stringify(state, null, 2);
}

// addEvent inserts an event into the history, newest first, once.
function addEvent(ev, fresh) {
  const body = $("history").tBodies[0];
  const rows = [...body.rows];
  if (rows.some((r) => Number(r.dataset.version) === ev.version)) return;
  const row = el("tr", { className: fresh ? "fresh" : "" },
    el("td", { className: "num" }, String(ev.version)),
    el("td", {}, ev.type),
    el("td", {}, new Date(ev.time).toLocaleString()),
    el("td", { className: "data" }, JSON.stringify(ev.data)));
  row.dataset.version = ev.version;
  body.insertBefore(row, rows.find((r) => Number(r.dataset.version) < ev.version) || null);
  while (body.rows.length > HISTORY_SIZE) body.deleteRow(-1);
}

async function lookUpEntity(type, id) {
  entityWatch?.abort();
  const ctl = (entityWatch = new AbortController());
  const path = entityPath(type, id);
  shownVersion = 0;
  showEntityError("");
  $("entity-view").hidden = true;
  $("history").tBodies[0].replaceChildren();
  setStatus("watch-status", "", "");
  try {
    const st = await getJSON(path, ctl.signal);
    showState(st.version, st.state, st.updatedAt);
    const from = Math.max(1, st.version - HISTORY_SIZE + 1);
    const page = await getJSON(`${path}/events?from=${from}&limit=${HISTORY_SIZE}`, ctl.signal);
    page.events.forEach((ev) => addEvent(ev, false));
  } catch (e) {
    if (ctl.signal.aborted) return;
    showEntityError(e.message);
    if (e.status !== 404) return; // 404: no events yet; the watch shows the first
  }
  watchEntity(path, shownVersion, ctl.signal);
}

// watchEntity follows GET …/watch (Server-Sent Events, read with fetch so
// that it carries the token) and shows each new version. It reconnects with
// Last-Event-ID after the stream ends or the node answers 503, and stops for
// good on any other error or when signal aborts.
async function watchEntity(path, last, signal) {
  let retryMs = 1000;
  while (!signal.aborted) {
    setStatus("watch-status", "warn", "connecting…");
    try {
      const headers = { Accept: "text/event-stream" };
      let url = path + "/watch";
      if (last > 0) headers["Last-Event-ID"] = String(last);
      else url += "?fromVersion=1";
      const res = await api(url, { signal, headers });
      if (!res.ok) {
        const e = await failure(res);
        if (res.status !== 503 && res.status !== 502 && res.status !== 504) {
          setStatus("watch-status", "bad", "watch: " + e.message);
          return;
        }
        if (e.retryAfter > 0) retryMs = e.retryAfter * 1000;
        setStatus("watch-status", "warn", "watch: " + e.message + "; retrying");
      } else {
        setStatus("watch-status", "ok", "● live");
        for await (const block of readSSE(res.body)) {
          if (block.retry !== undefined) retryMs = block.retry;
          if (block.event === "end") {
            const end = JSON.parse(block.data);
            setStatus("watch-status", "warn", `watch ended (${end.reason}); reconnecting`);
            continue;
          }
          if (block.id) last = Number(block.id);
          if (block.data === undefined) continue;
          const v = JSON.parse(block.data);
          if (v.version > shownVersion) {
            showEntityError("");
            showState(v.version, v.state, v.time);
          }
          addEvent(v, true);
        }
      }
    } catch (e) {
      if (signal.aborted) return;
      setStatus("watch-status", "warn", "watch: " + e.message + "; reconnecting");
    }
    await sleep(retryMs, signal);
  }
}

// readSSE yields the blocks of a Server-Sent Events body:
// {id?, event?, data?, retry?}; comments are skipped.
async function* readSSE(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "", block = {};
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += value;
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl).replace(/\r$/, "");
        buf = buf.slice(nl + 1);
        if (line === "") {
          if (Object.keys(block).length) yield block;
          block = {};
          continue;
        }
        if (line.startsWith(":")) continue;
        const i = line.indexOf(":");
        const field = i < 0 ? line : line.slice(0, i);
        const val = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
        if (field === "data") block.data = block.data === undefined ? val : block.data + "\n" + val;
        else if (field === "id" || field === "event") block[field] = val;
        else if (field === "retry" && /^\d+$/.test(val)) block.retry = Number(val);
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

// ---- projections ----

async function lookUpProjection(name, key, limit) {
  const err = $("projection-error"), table = $("rows");
  err.hidden = true;
  try {
    const base = `/v1/projections/${encodeURIComponent(name)}`;
    const rows = key
      ? [await getJSON(`${base}/${encodeURIComponent(key)}`)]
      : (await getJSON(`${base}?limit=${limit}`)).rows;
    table.tBodies[0].replaceChildren(...rows.map((r) => el("tr", {},
      el("td", {}, r.key),
      el("td", { className: "num" }, String(r.version)),
      el("td", { className: "data" }, JSON.stringify(r.value)),
      el("td", {}, r.updatedAt ? new Date(r.updatedAt).toLocaleString() : ""))));
    table.hidden = false;
  } catch (e) {
    table.hidden = true;
    err.textContent = e.message;
    err.hidden = false;
  }
}

// ---- wiring ----

async function refresh() {
  if (!document.hidden) await Promise.all([refreshCluster(), refreshRates()]);
  setTimeout(refresh, REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  $("token").value = localStorage.getItem(TOKEN_KEY) || "";
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const t = $("token").value.trim();
    if (t) localStorage.setItem(TOKEN_KEY, t);
    else localStorage.removeItem(TOKEN_KEY);
    refreshCluster();
  });
  $("entity-form").addEventListener("submit", (e) => {
    e.preventDefault();
    lookUpEntity($("entity-type").value, $("entity-id").value.trim());
  });
  $("projection-form").addEventListener("submit", (e) => {
    e.preventDefault();
    lookUpProjection($("projection-name").value, $("projection-key").value.trim(), $("projection-limit").value || 20);
  });
  refresh();
});
