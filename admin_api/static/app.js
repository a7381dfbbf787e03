// comet1m admin dashboard. No framework: one SSE stream (read with fetch() so that the
// Authorization header can be sent; EventSource cannot set headers), four uPlot charts, a worker
// table and a broadcast form. The token is kept in sessionStorage (or localStorage when the
// operator ticks "remember"), never in the URL.
"use strict";

const KEY = "comet-admin-token";
const WINDOW_POINTS = 300; // five minutes at one frame per second
const $ = (id) => document.getElementById(id);

let token = sessionStorage.getItem(KEY) || localStorage.getItem(KEY) || "";
let streamAbort = null;
let retryTimer = null;

// ---- formatting ---------------------------------------------------------------------------
const int = (n) => (n == null ? "–" : Math.round(n).toLocaleString("en-US"));
const mib = (b) => (b == null ? "–" : (b / 1048576).toFixed(1));
const fixed = (x, d = 1) => (x == null || Number.isNaN(x) ? "–" : Number(x).toFixed(d));
const dig = (obj, ...path) => path.reduce((o, k) => (o == null ? undefined : o[k]), obj);
function duration(s) {
  if (s == null) return "";
  s = Math.floor(s);
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600);
  const m = Math.floor((s % 3600) / 60), sec = s % 60;
  return "up " + (d ? d + "d " : "") + (d || h ? h + "h " : "") + m + "m " + sec + "s";
}

function setStatus(state, text) {
  $("dash").classList.toggle("stale", state !== "live"); // numbers on screen are old
  const el = $("status");
  el.dataset.state = state;
  el.className = "pill pill-" + state;
  el.textContent = text;
}

// ---- charts -------------------------------------------------------------------------------
const COLORS = ["#4fb3ff", "#3fb950", "#d29922", "#f85149", "#bc8cff"];
const charts = {};
const series = { t: [] };

// labels: series names; a name ending in "@host" goes on a second, right-hand axis (host-wide
// numbers dwarf the service's own, e.g. GiB of host memory against MiB of service RSS).
function fromZero(u, min, max) {
  return [0, max > 0 ? max * 1.1 : 1];
}

// y-axis ticks in a few characters: "1,000,000" did not fit the 60-pixel axis ("1M" does).
const COMPACT = new Intl.NumberFormat("en", { notation: "compact", maximumFractionDigits: 1 });
const compactTicks = (u, splits) => splits.map((v) => (v == null ? "" : COMPACT.format(v)));

function makeChart(id, labels) {
  const el = $(id);
  const axis = { stroke: "#8a96a3", grid: { stroke: "#26303b" }, ticks: { stroke: "#26303b" } };
  const yAxis = { ...axis, size: 60, values: compactTicks };
  const twoScales = labels.some((l) => l.endsWith("@host"));
  const opts = {
    width: Math.max(300, el.clientWidth), height: 200,
    cursor: { drag: { x: false, y: false } },
    legend: { live: false },
    // At least a minute of x axis: one or two points would otherwise stretch over years.
    // Every y axis starts at 0: an auto-scaled 51.052-51.054 MiB axis makes noise look like a step.
    scales: {
      x: { time: true, range: (u, min, max) => [Math.min(min, max - 60), max] },
      y: { range: fromZero },
      host: { range: fromZero },
    },
    axes: [axis, yAxis].concat(twoScales
      ? [{ ...yAxis, scale: "host", side: 1, grid: { show: false } }] : []),
    series: [{}, ...labels.map((label, i) => ({
      label: label.replace("@host", ""), stroke: COLORS[i], width: 1.5, points: { show: false },
      scale: label.endsWith("@host") ? "host" : "y",
    }))],
  };
  const data = [series.t, ...labels.map(() => [])];
  charts[id] = { plot: new uPlot(opts, data, el), data, el };
}

function initCharts() {
  if (charts["chart-conns"]) return;
  makeChart("chart-conns", ["connections"]);
  makeChart("chart-mem", ["service RSS", "host used@host", "host cached@host"]);
  makeChart("chart-cpu", ["service", "host user", "host sys"]);
  makeChart("chart-lag", ["avg", "p90", "max"]);
  const resize = () => {
    for (const c of Object.values(charts)) c.plot.setSize({ width: Math.max(300, c.el.clientWidth),
      height: 200 });
  };
  new ResizeObserver(resize).observe($("dash"));
}

function push(id, values) {
  const c = charts[id];
  values.forEach((v, i) => {
    const arr = c.data[i + 1];
    arr.push(v == null ? null : v);
    if (arr.length > WINDOW_POINTS) arr.shift();
  });
}

// ---- one frame ----------------------------------------------------------------------------
function onFrame(frame) {
  const totals = frame.totals || {};
  const sys = frame.system || {};
  const workers = Array.isArray(frame.workers) ? frame.workers : [];

  $("conns").textContent = int(totals.conns);
  $("conns").dataset.value = String(totals.conns ?? "");
  $("conns-target").textContent = frame.target_connections
    ? "target " + int(frame.target_connections) : "";
  $("workers-n").textContent = int(workers.length);
  $("uptime").textContent = duration(frame.uptime_s);
  $("rss").textContent = mib(totals.rss_bytes) + " MiB";
  $("sysmem").textContent = dig(sys, "mem", "used") != null
    ? "host " + mib(sys.mem.used) + " / " + mib(sys.mem.total) + " MiB" : "";
  $("cpu").textContent = fixed(totals.cpu_percent) + " %";
  $("syscpu").textContent = dig(sys, "cpu", "idle") != null
    ? "host idle " + fixed(sys.cpu.idle) + " %" : "";
  $("lag").textContent = fixed(dig(totals, "lag_ms", "p90"), 2) + " ms";
  $("lagmax").textContent = "max " + fixed(dig(totals, "lag_ms", "max"), 2) + " ms";
  $("msgs").textContent = int(totals.msgs_sent_total);
  $("fds").textContent = dig(sys, "fds", "open") != null
    ? "fds " + int(sys.fds.open) + " / " + int(sys.fds.limit) : "";
  $("node").textContent = frame.node_id ? "node " + frame.node_id : "";

  initCharts();
  series.t.push(frame.t || Date.now() / 1000);
  if (series.t.length > WINDOW_POINTS) series.t.shift();
  push("chart-conns", [totals.conns]);
  const mem = sys.mem || {};
  push("chart-mem", [totals.rss_bytes / 1048576, mem.used / 1048576, mem.cached / 1048576]);
  const cpu = sys.cpu || {};
  push("chart-cpu", [totals.cpu_percent, cpu.user, cpu.sys]);
  const lag = totals.lag_ms || {};
  push("chart-lag", [lag.avg, lag.p90, lag.max]);
  for (const c of Object.values(charts)) c.plot.setData(c.data);

  const body = $("workers").tBodies[0];
  body.replaceChildren(...workers.map((w, i) => {
    const tr = document.createElement("tr");
    const cells = [w.index ?? i, w.pid, w.state, int(w.restarts ?? 0), int(w.conns),
      mib(w.rss_bytes), fixed(w.cpu_percent), fixed(dig(w, "lag_ms", "avg"), 2),
      fixed(dig(w, "lag_ms", "p90"), 2), fixed(dig(w, "lag_ms", "max"), 2),
      int(w.msgs_sent_total)];
    if (w.state && w.state !== "up") tr.className = "down"; // starting, draining, down
    for (const v of cells) {
      const td = document.createElement("td");
      td.textContent = String(v ?? "–"); // textContent: frame values are never parsed as HTML
      tr.appendChild(td);
    }
    return tr;
  }));
  showReload(frame.reload);
  maybeCluster(frame);
}

// ---- reload: its progress from the frame, its answer from POST /api/reload -----------------
function ago(t) {
  const s = Math.max(0, Math.floor(Date.now() / 1000 - t));
  return s < 120 ? s + " s ago" : s < 7200 ? Math.floor(s / 60) + " min ago"
    : Math.floor(s / 3600) + " h ago";
}

function showReload(r) {
  const el = $("reload-state");
  if (!r) { el.textContent = ""; return; }
  const what = int(r.done) + " of " + int(r.workers) + " workers, " + int(r.handed)
    + " connections moved" + (r.failed ? ", " + int(r.failed) + " failed" : "")
    + (r.reconnecting ? ", " + int(r.reconnecting) + " told to reconnect" : "");
  el.dataset.running = String(Boolean(r.running));
  el.textContent = r.running ? "reloading: " + what
    : "last reload " + ago(r.started) + ": " + what
      + " in " + fixed(r.seconds, 1) + " s";
}

$("reload-send").addEventListener("click", async () => {
  const out = $("reload-result");
  const button = $("reload-send");
  button.disabled = true;
  try {
    const r = await post("/api/reload", undefined, out, "reloading…", "Not reloaded");
    if (!r) return;
    out.className = r.failed ? "bad" : "ok";
    out.textContent = int(r.reloaded) + " of " + int(r.workers) + " workers replaced, "
      + int(r.handed) + " connection" + (r.handed === 1 ? "" : "s") + " moved"
      + (r.kept ? ", " + int(r.kept) + " told to reconnect (could not move)" : "")
      + (r.failed ? ", " + int(r.failed) + " failed (the old process serves on)" : "")
      + (r.skipped ? ", " + int(r.skipped) + " skipped (not up)" : "")
      + (r.reconnecting ? ", " + int(r.reconnecting) + " told to reconnect" : "")
      + " in " + fixed(r.seconds, 2) + " s.";
  } finally {
    button.disabled = false;
  }
});

// ---- the cluster (multi-node bus only) -----------------------------------------------------
let clusterAt = 0;
let clusterBusy = false;

function row(cells, tag = "td") {
  const tr = document.createElement("tr");
  for (const v of cells) {
    const td = document.createElement(tag);
    td.textContent = String(v ?? "–");
    tr.appendChild(td);
  }
  return tr;
}

// Frames say which bus a node uses; only a Redis bus has other nodes, so only then is
// /api/cluster asked (every other second, never two requests at once).
async function maybeCluster(frame) {
  const bus = frame.bus;
  $("cluster-card").hidden = !bus;
  if (!bus) return;
  $("cluster-bus").textContent = bus.up ? "redis up" : "redis DOWN: " + (bus.error || "");
  const now = Date.now();
  if (clusterBusy || now - clusterAt < 2000) return;
  clusterBusy = true;
  clusterAt = now;
  try {
    const res = await fetch("/api/cluster", {
      headers: { Authorization: "Bearer " + token }, cache: "no-store",
    });
    if (!res.ok) { $("cluster").tFoot.replaceChildren(row([await errorText(res)])); return; }
    const view = await res.json();
    const cells = (n, t) => [int(t.conns), n, mib(t.rss_bytes), fixed(t.cpu_percent),
      fixed(dig(t, "lag_ms", "p90"), 2), int(t.msgs_sent_total)];
    $("cluster").tBodies[0].replaceChildren(...view.nodes.map((n) => row([n.node_id,
      ...cells(n.workers_up, n.totals || {}), dig(n, "bus", "up") ? "up" : "down",
      fixed(n.age_s)])));
    $("cluster").tFoot.replaceChildren(row(["total (" + view.count + ")",
      ...cells(dig(view, "totals", "workers"), view.totals || {}), "", ""], "th"));
  } catch (e) {
    // The next frame tries again.
  } finally {
    clusterBusy = false;
  }
}

// ---- the stream ---------------------------------------------------------------------------
function showLogin(message) {
  stopStream();
  $("dash").hidden = true;
  $("forget").hidden = true;
  $("login").hidden = false;
  $("token-error").textContent = message || "";
  setStatus("idle", "token needed");
  $("token-input").focus();
}

function stopStream() {
  if (streamAbort) streamAbort.abort();
  streamAbort = null;
  clearTimeout(retryTimer);
}

function retryLater(ms = 2000) {
  clearTimeout(retryTimer);
  retryTimer = setTimeout(startStream, ms);
}

async function errorText(res) {
  try {
    const body = await res.json();
    if (typeof body.detail === "string") return body.detail;
    if (Array.isArray(body.detail)) return body.detail.map((d) => d.msg).join("; ");
  } catch (e) { /* not JSON */ }
  return res.status + " " + res.statusText;
}

function handleEvent(name, data) {
  if (name === "message") {
    onFrame(JSON.parse(data));
    setStatus("live", "live");
  } else if (name === "unavailable") {
    const info = JSON.parse(data);
    setStatus("down", "service unreachable at " + info.control_socket + ": " + (info.error || ""));
  } else if (name === "reconnected") {
    setStatus("wait", "service back, waiting for frames");
  }
}

async function startStream() {
  stopStream();
  const abort = new AbortController();
  streamAbort = abort;
  setStatus("wait", "connecting…");
  let res;
  try {
    res = await fetch("/api/stats/stream", {
      headers: { Authorization: "Bearer " + token, Accept: "text/event-stream" },
      cache: "no-store", signal: abort.signal,
    });
  } catch (e) {
    if (!abort.signal.aborted) { setStatus("down", "admin sidecar unreachable"); retryLater(); }
    return;
  }
  if (res.status === 401) { showLogin("That token was refused."); return; }
  if (!res.ok) {
    setStatus("down", await errorText(res));
    retryLater();
    return;
  }
  $("login").hidden = true;
  $("dash").hidden = false;
  $("forget").hidden = false;
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        let name = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith(":")) continue; // keep-alive comment
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "event") name = val;
          else if (field === "data") data.push(val);
        }
        if (data.length) handleEvent(name, data.join("\n"));
      }
    }
  } catch (e) {
    if (abort.signal.aborted) return;
  }
  if (!abort.signal.aborted) { setStatus("down", "stream ended, reconnecting…"); retryLater(); }
}

// ---- forms --------------------------------------------------------------------------------
$("token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  token = $("token-input").value.trim();
  sessionStorage.setItem(KEY, token);
  if ($("token-remember").checked) localStorage.setItem(KEY, token);
  $("token-input").value = "";
  startStream();
});

$("forget").addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  localStorage.removeItem(KEY);
  token = "";
  showLogin("");
});

// A POST of the page's: its JSON answer, or null once ``out`` says why there is none (a
// refused token shows the login form instead).
async function post(path, body, out, pending, notDone) {
  out.className = "";
  out.textContent = pending;
  const headers = { Authorization: "Bearer " + token };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  try {
    const res = await fetch(path, {
      method: "POST", headers, body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (res.status === 401) { showLogin("That token was refused."); return null; }
    if (!res.ok) {
      out.className = "bad";
      out.textContent = notDone + " (" + res.status + "): " + await errorText(res);
      return null;
    }
    return await res.json();
  } catch (e) {
    out.className = "bad";
    out.textContent = notDone + ": admin sidecar unreachable";
    return null;
  }
}

$("broadcast").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const out = $("bc-result");
  const body = {
    data: $("bc-data").value,
    channel: $("bc-channel").value.trim() || null,
    event: $("bc-event").value.trim() || null,
  };
  const result = await post("/api/broadcast", body, out, "sending…", "Not sent");
  if (!result) return;
  out.className = "ok";
  out.dataset.id = String(result.id);
  out.textContent = "Sent message #" + result.id + " to " + int(result.recipients)
    + " connection" + (result.recipients === 1 ? "" : "s") + ".";
});

if (token) startStream(); else showLogin("");
