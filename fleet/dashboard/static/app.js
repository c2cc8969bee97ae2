// edgefleet dashboard: plain JavaScript, no framework, no build step, nothing fetched from
// elsewhere. Reads the REST API with the token this tab keeps (sessionStorage) and stays
// live on the controller's server-sent events (/api/v1/stream). An operator acts from it
// through the same POST endpoints the CLI uses, each action confirmed in a dialog first;
// text from outside (names, reasons, errors) is only ever set as text, never as HTML.
"use strict";

(() => {
  const TOKEN_KEY = "edgefleet-token";
  const WINDOW_MS = 15 * 60 * 1000; // what the charts show
  const SHOWN_ROLLOUTS = 4; // cards; older rollouts go into a short table
  const MAX_TILES = 400;
  const FEED = 40;
  const PALETTE = ["#4cc9f0", "#f72585", "#b5e48c", "#ffb703", "#9d7bff", "#06d6a0",
    "#ff7b00", "#8ecae6", "#e9c46a", "#ff99c8"];
  const SETTLED = new Set(["IDLE", "COMMITTED"]);
  const TROUBLED = new Set(["FAILED", "ROLLED_BACK"]);
  const STATE_CLASS = {
    // rollouts
    PENDING: "s-idle", RUNNING: "s-busy", PAUSED: "s-warn", SUCCEEDED: "s-ok",
    ABORTED: "s-bad", ROLLED_BACK: "s-back", WAITING: "s-idle",
    // a device in a rollout
    INCOMPATIBLE: "s-idle", TARGETED: "s-info", UPDATING: "s-busy", PROBATION: "s-warn",
    COMMITTING: "s-busy", FAILED: "s-bad", TIMED_OUT: "s-bad", CANCELLED: "s-idle",
    ROLLING_BACK: "s-back",
    // a device's own update state
    IDLE: "s-ok", COMMITTED: "s-ok", DOWNLOADING: "s-busy", VERIFYING: "s-busy",
    STAGED: "s-busy", HEALTH_CHECK: "s-busy", SWITCHING: "s-busy",
  };
  const FINISHED = new Set(["SUCCEEDED", "ABORTED", "ROLLED_BACK"]);
  const ROLLOUT_ORDER = ["SUCCEEDED", "COMMITTING", "PROBATION", "UPDATING", "TARGETED",
    "ROLLING_BACK", "ROLLED_BACK", "FAILED", "TIMED_OUT", "INCOMPATIBLE", "CANCELLED", "PENDING"];
  const CHARTS = [
    { key: "p50_ms", title: "Latency p50", unit: "ms" },
    { key: "p95_ms", title: "Latency p95", unit: "ms" },
    { key: "error_pct", title: "Error rate", unit: "%", max: 100 },
    { key: "agreement_pct", title: "Agreement", unit: "%", max: 100 },
  ];

  const HISTORY = 15; // lines of the history shown
  const S = {
    fleet: "", bucketMs: 5000, overview: null, devices: [], devicesRev: null,
    rollouts: new Map(), details: new Map(), series: new Map(), events: new Map(), feed: [],
    colors: new Map(), messages: 0, lastMessage: 0, connected: false, ingest: null,
    ingestRate: null, drift: { firing: 0, alerts: [] }, history: [],
    me: { name: "", role: "viewer" }, // the token's, from /api/v1/whoami
  };
  const canAct = () => ["operator", "admin"].includes(S.me.role);

  // --- small helpers ------------------------------------------------------------------

  const $ = (id) => document.getElementById(id);

  function h(tag, props, ...children) {
    return fill(document.createElement(tag), props, children);
  }

  function svg(tag, props, ...children) {
    return fill(document.createElementNS("http://www.w3.org/2000/svg", tag), props, children);
  }

  function fill(el, props, children) {
    for (const [k, v] of Object.entries(props || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") el.setAttribute("class", v);
      else if (k === "style") el.style.cssText = v; // CSSOM: allowed by the page's CSP
      else if (k === "dataset") Object.assign(el.dataset, v);
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? "" : String(v));
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : String(child));
    }
    return el;
  }

  function put(id, ...children) {
    const el = $(id);
    el.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined));
    return el;
  }

  const cls = (state) => STATE_CLASS[state] || "s-idle";
  const pad = (n) => String(n).padStart(2, "0");
  const hms = (ms) => { const d = new Date(ms); return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`; };
  const deviceHref = (id) => `#/device/${encodeURIComponent(id)}`;

  function ago(ms) {
    if (!ms) return "never";
    const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
    if (s < 60) return `${s}s ago`;
    if (s < 3600) return `${Math.floor(s / 60)}m ago`;
    if (s < 86400) return `${Math.floor(s / 3600)}h ago`;
    return `${Math.floor(s / 86400)}d ago`;
  }

  function fmt(value, unit) {
    if (value === null || value === undefined || Number.isNaN(value)) return "–";
    const digits = Math.abs(value) >= 100 ? 0 : Math.abs(value) >= 10 ? 1 : 2;
    return `${value.toFixed(digits)}${unit === "%" ? "%" : unit ? " " + unit : ""}`;
  }

  function colorOf(version) {
    if (version === "none") return "#56657a";
    if (!S.colors.has(version)) S.colors.set(version, PALETTE[S.colors.size % PALETTE.length]);
    return S.colors.get(version);
  }

  function versionLabel(key) {
    const i = key.lastIndexOf(":");
    return i < 0 ? key : `${key.slice(0, i)} ${key.slice(i + 1)}`;
  }

  // --- data ---------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message, hint, field) {
      super(message);
      this.status = status;
      this.hint = hint || "";
      this.field = field || "";
    }
  }

  const token = () => sessionStorage.getItem(TOKEN_KEY) || "";

  async function api(path) {
    return answer(await fetch(path, {
      headers: { Authorization: `Bearer ${token()}` }, cache: "no-store", credentials: "omit",
    }));
  }

  // A write: the token in the Authorization header only (never in the address, never a
  // cookie), JSON in and out, the same endpoint the CLI calls.
  async function send(path, body) {
    return answer(await fetch(path, {
      method: "POST", cache: "no-store", credentials: "omit",
      headers: { Authorization: `Bearer ${token()}`, "Content-Type": "application/json" },
      body: JSON.stringify(body || {}),
    }));
  }

  async function answer(response) {
    if (response.ok) return response.json();
    let error = {};
    try { error = await response.json(); } catch (_) { /* not JSON */ }
    throw new ApiError(response.status, error.error || `${response.status} ${response.statusText}`,
      error.hint, error.field);
  }

  async function loadAll() {
    const [overview, devices, rollouts] = await Promise.all([
      api("/api/v1/overview"), api("/api/v1/devices"), api("/api/v1/rollouts")]);
    S.overview = overview;
    S.fleet = overview.fleet;
    Object.keys(overview.versions).sort().forEach(colorOf);
    S.devices = devices;
    S.rollouts = new Map(rollouts.map((r) => [r.id, r]));
    render();
    await Promise.all([...shownRollouts().map((r) => loadDetail(r.id)), loadHistory()]);
  }

  let historyTimer = 0;
  function scheduleHistory() {
    if (!historyTimer) historyTimer = setTimeout(() => {
      historyTimer = 0;
      loadHistory().catch(report);
    }, 400);
  }

  async function loadHistory() {
    S.history = await api(`/api/v1/history?limit=${HISTORY}`);
    renderHistory();
  }

  let devicesLoading = false;
  let devicesAgain = false;
  async function loadDevices() {
    if (devicesLoading) { devicesAgain = true; return; }
    devicesLoading = true;
    try {
      S.devices = await api("/api/v1/devices");
      schedule();
    } finally {
      devicesLoading = false;
      if (devicesAgain) { devicesAgain = false; loadDevices().catch(report); }
    }
  }

  const detailTimers = new Map();
  function scheduleDetail(id) {
    if (detailTimers.has(id)) return;
    detailTimers.set(id, setTimeout(() => {
      loadDetail(id).catch(report).finally(() => detailTimers.delete(id));
    }, 250));
  }

  async function loadDetail(id) {
    const detail = await api(`/api/v1/rollouts/${encodeURIComponent(id)}`);
    S.details.set(id, detail);
    const { devices, ...summary } = detail;
    const known = S.rollouts.get(id);
    if (!known || (known.updated_ms || 0) <= (summary.updated_ms || 0)) S.rollouts.set(id, summary);
    schedule();
  }

  function shownRollouts() {
    const all = [...S.rollouts.values()].sort((a, b) => b.created_ms - a.created_ms);
    const live = all.filter((r) => !FINISHED.has(r.state));
    const done = all.filter((r) => FINISHED.has(r.state));
    return [...live, ...done.slice(0, Math.max(0, SHOWN_ROLLOUTS - live.length))]
      .sort((a, b) => b.created_ms - a.created_ms);
  }

  function addEvent(event, fresh) {
    const list = S.events.get(event.device) || [];
    if (list.some((e) => e.seq === event.seq && e.ts === event.ts)) return;
    list.push(event);
    list.sort((a, b) => a.ts - b.ts || a.seq - b.seq);
    if (list.length > 50) list.splice(0, list.length - 50);
    S.events.set(event.device, list);
    S.feed.push({ ...event, fresh });
    S.feed.sort((a, b) => a.ts - b.ts);
    if (S.feed.length > FEED) S.feed.splice(0, S.feed.length - FEED);
  }

  function mergeSeries(series) {
    const horizon = Date.now() - 2 * WINDOW_MS;
    for (const [key, points] of Object.entries(series)) {
      const known = S.series.get(key) || new Map();
      for (const point of points) known.set(point.t, point);
      for (const t of known.keys()) if (t < horizon) known.delete(t);
      S.series.set(key, known);
    }
  }

  // --- the live stream ----------------------------------------------------------------

  let source = null; // the open event stream
  let reconnecting = 0;
  function connect() {
    // EventSource sends no header: this GET alone takes the token in its address
    source = new EventSource(`/api/v1/stream?token=${encodeURIComponent(token())}`);
    const on = (kind, handle) => source.addEventListener(kind, (message) => {
      S.messages += 1;
      S.lastMessage = Date.now();
      try { handle(JSON.parse(message.data)); } catch (error) { report(error); }
    });
    on("hello", (data) => {
      S.connected = true;
      S.fleet = data.fleet;
      S.bucketMs = data.bucket_ms;
      for (const event of data.events) addEvent(event, false);
      loadAll().catch(report);
    });
    on("snapshot", (data) => {
      const points = data.overview.telemetry_points;
      if (S.ingest) {
        const seconds = (data.ts - S.ingest.ts) / 1000;
        if (seconds > 0) S.ingestRate = Math.max(0, points - S.ingest.points) / seconds;
      }
      S.ingest = { points, ts: data.ts };
      S.overview = data.overview;
      mergeSeries(data.series);
      if (data.drift) S.drift = data.drift;
      if (data.devices_rev !== S.devicesRev) {
        // the first snapshot too: the list loaded on connect may predate it
        S.devicesRev = data.devices_rev;
        loadDevices().catch(report);
      }
      schedule();
    });
    on("rollout", (summary) => {
      const known = S.rollouts.get(summary.id);
      if (!known || (known.updated_ms || 0) <= summary.updated_ms) S.rollouts.set(summary.id, summary);
      if (shownRollouts().some((r) => r.id === summary.id)) scheduleDetail(summary.id);
      scheduleHistory();
      schedule();
    });
    on("event", (event) => { addEvent(event, true); schedule(); });
    on("resync", () => loadAll().catch(report));
    source.onerror = () => {
      S.connected = false;
      renderLive();
      // the browser retries by itself unless the answer was an error (a 401 among them):
      // ask a plain read why, then open the stream again
      if (source.readyState === EventSource.CLOSED && !reconnecting) {
        reconnecting = setTimeout(() => {
          reconnecting = 0;
          api("/api/v1/whoami").then(() => { if (token()) connect(); }, (error) => {
            report(error);
            if (token()) connect();
          });
        }, 2000);
      }
    };
    source.onopen = () => { S.connected = true; renderLive(); };
  }

  // The controller does not know the token (revoked, or the controller restarted with
  // other tokens): forget it, stop the stream, and ask for one in the form.
  const UNKNOWN_TOKEN = "The controller does not know this token (any more): enter a token.";
  function forgetToken() {
    sessionStorage.removeItem(TOKEN_KEY);
    if (source) source.close();
    source = null;
    clearTimeout(reconnecting);
    reconnecting = 0;
    closeDialog();
    $("sign-out").hidden = true;
    $("whoami").hidden = true;
    showLogin(UNKNOWN_TOKEN);
  }

  function report(error) {
    if (error instanceof ApiError && error.status === 401) { forgetToken(); return; }
    console.warn("dashboard:", error);
  }

  // --- rendering ----------------------------------------------------------------------

  let frame = 0;
  function schedule() {
    if (!frame) frame = setTimeout(() => { frame = 0; render(); }, 80);
  }

  function render() {
    renderLive();
    $("fleet-name").textContent = S.fleet;
    if (!S.overview) return;
    const online = S.overview.online;
    document.title = `edgefleet · ${S.fleet} · ${online}/${S.overview.devices} online`;
    if (route().device !== null) { renderDevicePage(route().device); return; }
    renderKpis();
    renderVersions();
    renderStates();
    renderRollouts();
    renderCharts();
    renderDrift();
    renderDevices();
    renderFeed();
    renderHistory();
  }

  function renderLive() {
    const live = $("live");
    const fresh = S.connected && Date.now() - S.lastMessage < 10000;
    live.className = fresh ? "live" : "live off";
    live.dataset.messages = String(S.messages);
    $("live-text").textContent = fresh ? `live · ${hms(S.lastMessage)}` :
      S.messages ? "reconnecting" : "connecting";
  }

  function kpi(id, label, value, sub, tone) {
    return h("div", { class: `kpi ${tone || ""}`, id },
      h("div", { class: "label" }, label), h("div", { class: "value" }, value),
      h("div", { class: "sub" }, sub));
  }

  function renderKpis() {
    const o = S.overview;
    const offline = o.devices - o.online;
    const updating = S.devices.filter((d) => statesOf(d).some((s) => !SETTLED.has(s) &&
      !TROUBLED.has(s))).length;
    const troubled = S.devices.filter((d) => statesOf(d).some((s) => TROUBLED.has(s))).length;
    const live = [...S.rollouts.values()].filter((r) => !FINISHED.has(r.state)).length;
    put("kpis",
      kpi("kpi-online", "Online", [String(o.online), h("small", {}, ` / ${o.devices}`)],
        `${o.devices ? Math.round((100 * o.online) / o.devices) : 0}% of the fleet`,
        o.devices && offline === 0 ? "ok" : ""),
      kpi("kpi-offline", "Offline", String(offline), offline ? "devices not reporting" : "all reporting",
        offline ? "bad" : "ok"),
      kpi("kpi-updating", "Updating", String(updating), "devices mid-update", updating ? "busy" : ""),
      kpi("kpi-failed", "Failed / rolled back", String(troubled), "last update on the device",
        troubled ? "bad" : ""),
      kpi("kpi-rollouts", "Live rollouts", String(live), `${S.rollouts.size} in total`, live ? "busy" : ""),
      kpi("kpi-ingest", "Telemetry", S.ingestRate === null ? "–" : [String(Math.round(S.ingestRate)),
        h("small", {}, " /s")], `${o.telemetry_points.toLocaleString()} points · ${o.rejected} rejected`,
        "info"));
  }

  function renderVersions() {
    const versions = Object.entries(S.overview.versions).sort((a, b) => b[1] - a[1]);
    const total = versions.reduce((n, [, c]) => n + c, 0);
    if (!total) { put("versions", h("div", { class: "empty" }, "No devices yet")); return; }
    put("versions",
      h("div", { class: "stack" }, versions.map(([key, n]) =>
        h("span", { style: `width:${(100 * n) / total}%;background:${colorOf(key)}`, title: key }))),
      h("div", { class: "legend" }, versions.map(([key, n]) =>
        h("div", { class: "legend-item", dataset: { version: key } },
          h("span", { class: "swatch", style: `background:${colorOf(key)}` }),
          h("span", {}, key === "none" ? "no model" : versionLabel(key)),
          h("span", { class: "n" }, String(n)),
          h("span", { class: "pct" }, `${Math.round((100 * n) / total)}%`)))));
  }

  function renderStates() {
    const states = Object.entries(S.overview.update_states).sort((a, b) => b[1] - a[1]);
    put("states", states.length ? states.map(([state, n]) =>
      h("span", { class: `chip ${cls(state)}`, dataset: { state } },
        h("span", { class: "swatch", style: "background:var(--c)" }), state.replace("_", " "),
        h("b", {}, String(n)))) : h("div", { class: "empty" }, "No devices yet"));
  }

  // rollouts

  function waveBounds(waves, total) {
    let reached = 0;
    return waves.map((wave) => {
      const percent = wave.endsWith("%");
      const value = parseFloat(wave);
      const count = percent ? Math.ceil((value * total) / 100 - 1e-9) : Math.floor(value);
      reached = Math.min(total, Math.max(reached, count));
      return reached;
    });
  }

  function countsOf(devices) {
    const counts = {};
    for (const d of devices) counts[d.state] = (counts[d.state] || 0) + 1;
    return counts;
  }

  function progressBar(counts, total) {
    return h("div", { class: "progress" }, ROLLOUT_ORDER.filter((s) => counts[s]).map((state) =>
      h("span", { class: cls(state), style: `width:${(100 * counts[state]) / Math.max(total, 1)}%`,
        title: `${state}: ${counts[state]}` })));
  }

  function countsText(counts) {
    return ROLLOUT_ORDER.filter((s) => counts[s]).map((s) => `${counts[s]} ${s.toLowerCase().replace("_", " ")}`)
      .join(" · ") || "no devices yet";
  }

  function gateChips(spec) {
    const g = spec.gates;
    const chips = [
      ["failures ≤", `${g.max_failures_pct}%`], ["success ≥", `${g.min_success_pct}%`],
      g.max_p95_ratio !== null && ["p95 ≤", `${g.max_p95_ratio}× baseline`],
      g.max_error_rate_pct !== null && ["errors ≤", `${g.max_error_rate_pct}%`],
      g.min_agreement_pct !== null && ["agreement ≥", `${g.min_agreement_pct}%`],
      ["min samples", String(g.min_samples)], ["soak", `${spec.soak_s}s`],
      ["device timeout", `${spec.device_timeout_s}s`],
      spec.rate_per_min !== null && ["rate", `${spec.rate_per_min}/min ×${spec.exponential}`],
    ].filter(Boolean);
    return h("div", { class: "gates" }, chips.map(([label, value]) =>
      h("span", { class: "gate" }, `${label} `, h("b", {}, value))));
  }

  function waveBoxes(rollout, detail) {
    const bounds = waveBounds(rollout.spec.waves, rollout.total);
    return h("div", { class: "waves" }, rollout.spec.waves.map((wave, i) => {
      const devices = detail ? detail.devices.filter((d) => d.wave === i) : [];
      const counts = countsOf(devices);
      const state = i < rollout.wave || FINISHED.has(rollout.state) ? "done" :
        i === rollout.wave ? "current" : "next";
      const planned = bounds[i] - (i ? bounds[i - 1] : 0);
      return h("div", { class: `wave ${state}`, dataset: { wave: String(i), state } },
        h("div", { class: "wave-title" }, `Wave ${i + 1}`, h("span", {}, `${wave} · ${devices.length || planned} dev`)),
        progressBar(counts, devices.length || planned),
        h("div", { class: "wave-counts" }, detail ? countsText(counts) : "…"));
    }));
  }

  function rolloutCard(rollout) {
    const detail = S.details.get(rollout.id);
    const counts = rollout.counts || {};
    const succeeded = counts.SUCCEEDED || 0;
    const model = rollout.spec.model;
    return h("article", { class: `rollout ${cls(rollout.state)}`, id: `rollout-${rollout.id}`,
      dataset: { rollout: rollout.id, state: rollout.state, wave: String(rollout.wave) } },
    h("div", { class: "rollout-head" },
      h("span", { class: "badge" }, rollout.state.replace("_", " ")),
      h("span", { class: "model" }, `${model.name} → ${model.version}`),
      h("span", { class: "rid" }, rollout.id),
      h("span", { class: "meta" }, `${rollout.spec.selectors.join(", ")} · by ${rollout.created_by || "?"} · ${ago(rollout.created_ms)}`),
      actionButtons(rollout)),
    progressBar(counts, rollout.total),
    h("div", { class: "progress-text" },
      h("span", {}, h("b", { class: "done-count" }, `${succeeded} / ${rollout.total}`), " succeeded · ",
        `wave ${Math.min(rollout.wave + 1, rollout.waves)} of ${rollout.waves}`),
      h("span", {}, countsText(counts))),
    waveBoxes(rollout, detail),
    gateChips(rollout.spec),
    rollout.reason ? h("div", { class: "reason muted" }, rollout.reason) : null);
  }

  // A re-render keeps the nodes whose content did not change (a card, or a card's buttons
  // when the rest of it changed): a button pressed while the stream speaks stays the same
  // element, so the click is not lost.
  function keepUnchanged(container, fresh) {
    const old = new Map([...container.children].filter((c) => c.id).map((c) => [c.id, c]));
    const nodes = fresh.map((node) => {
      const was = node.id ? old.get(node.id) : null;
      if (!was) return node;
      if (was.isEqualNode(node)) return was;
      const [before, after] = [was.querySelector(".actions"), node.querySelector(".actions")];
      if (before && after && before.isEqualNode(after)) after.replaceWith(before);
      return node;
    });
    const same = nodes.length === container.children.length &&
      nodes.every((node, i) => node === container.children[i]);
    if (!same) container.replaceChildren(...nodes);
  }

  function renderRollouts() {
    const container = $("rollouts");
    container.dataset.renders = String(Number(container.dataset.renders || 0) + 1);
    const shown = shownRollouts();
    if (!shown.length) { put("rollouts", h("div", { class: "empty" }, "No rollouts yet")); return; }
    const ids = new Set(shown.map((r) => r.id));
    const older = [...S.rollouts.values()].filter((r) => !ids.has(r.id))
      .sort((a, b) => b.created_ms - a.created_ms).slice(0, 8);
    keepUnchanged(container, [...shown.map(rolloutCard), older.length ? h("table", { class: "older", id: "older-rollouts" },
      older.map((r) => h("tr", { class: cls(r.state) },
        h("td", {}, h("span", { class: "badge" }, r.state.replace("_", " "))),
        h("td", {}, `${r.spec.model.name} → ${r.spec.model.version}`),
        h("td", { class: "muted" }, r.id), h("td", { class: "muted" }, ago(r.created_ms)),
        h("td", {}, actionButtons(r))))) : null].filter(Boolean));
  }

  // charts

  function niceMax(value) {
    if (!(value > 0)) return 1;
    const step = 10 ** Math.floor(Math.log10(value));
    // the axis has four steps: tops whose quarters read well
    for (const m of [1.2, 1.6, 2, 2.4, 3.2, 4, 6, 8, 10]) if (m * step >= value) return m * step;
    return 10 * step;
  }

  function chartLines(key) {
    const lines = [];
    for (const [version, points] of S.series) {
      const values = [...points.values()].filter((p) => p[key] !== null && p[key] !== undefined)
        .sort((a, b) => a.t - b.t);
      if (values.length) lines.push({ version, values });
    }
    return lines;
  }

  function lineChart(spec, lines, width) {
    const height = 230;
    const m = { left: 56, right: 14, top: 12, bottom: 30 };
    const now = Date.now();
    const latestT = Math.max(now, ...lines.flatMap((l) => l.values.map((p) => p.t + S.bucketMs)));
    const firstT = Math.min(...lines.flatMap((l) => l.values.map((p) => p.t)));
    const x0 = Math.min(Math.max(firstT, latestT - WINDOW_MS), latestT - 6 * S.bucketMs);
    const values = lines.flatMap((l) => l.values.map((p) => p[spec.key]));
    const top = Math.min(spec.max || Infinity, niceMax(Math.max(...values) * 1.15));
    // agreement lives near 100%: start the axis a little below the lowest value
    const bottom = spec.key === "agreement_pct" ?
      Math.max(0, Math.floor(Math.min(...values) / 10) * 10 - 10) : 0;
    const X = (t) => m.left + ((t - x0) / (latestT - x0)) * (width - m.left - m.right);
    const Y = (v) => m.top + (1 - (v - bottom) / (top - bottom || 1)) * (height - m.top - m.bottom);
    const grid = [0, 0.25, 0.5, 0.75, 1].map((f) => bottom + f * (top - bottom));
    const ticks = [0, 1, 2, 3].map((i) => x0 + (i * (latestT - x0)) / 3);
    const gap = 3 * S.bucketMs;
    return svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": spec.title },
      grid.map((v) => [
        svg("line", { class: "grid", x1: m.left, x2: width - m.right, y1: Y(v), y2: Y(v) }),
        svg("text", { x: m.left - 8, y: Y(v) + 5, "text-anchor": "end" }, String(Number(v.toPrecision(3))))]),
      ticks.map((t, i) => svg("text", { x: X(t), y: height - 8,
        "text-anchor": i === 0 ? "start" : i === 3 ? "end" : "middle" },
        latestT - x0 < 600000 ? hms(t) : hms(t).slice(0, 5))),
      lines.map(({ version, values }) => {
        let d = "";
        let previous = null;
        for (const p of values) {
          if (p.t < x0) continue;
          d += `${previous === null || p.t - previous > gap ? "M" : "L"}${X(p.t + S.bucketMs / 2).toFixed(1)},${Y(p[spec.key]).toFixed(1)}`;
          previous = p.t;
        }
        const last = values[values.length - 1];
        return svg("g", { dataset: { version } },
          svg("path", { class: "line", d, stroke: colorOf(version) }),
          svg("circle", { cx: X(last.t + S.bucketMs / 2), cy: Y(last[spec.key]), r: 5, fill: colorOf(version) }));
      }));
  }

  function renderCharts() {
    const container = $("charts");
    if (container.children.length !== CHARTS.length) {
      container.replaceChildren(...CHARTS.map((spec) => h("section", { class: "chart", id: `chart-${spec.key}` },
        h("div", { class: "chart-head" }, h("h2", {}, `${spec.title} (${spec.unit})`), h("div", { class: "chart-latest" })),
        h("div", { class: "chart-body" }))));
    }
    CHARTS.forEach((spec, i) => {
      const section = container.children[i];
      const lines = chartLines(spec.key);
      const current = lines.filter((l) => Date.now() - l.values[l.values.length - 1].t < 6 * S.bucketMs);
      section.querySelector(".chart-latest").replaceChildren(...current.map((l) =>
        h("div", { class: "latest", title: l.version },
          h("small", {}, versionLabel(l.version)),
          h("span", { style: `color:${colorOf(l.version)}` }, fmt(l.values[l.values.length - 1][spec.key], spec.unit)))));
      const body = section.querySelector(".chart-body");
      const width = Math.max(260, Math.round(body.clientWidth || 400));
      body.replaceChildren(lines.length ? lineChart(spec, lines, width) :
        h("div", { class: "empty" }, spec.key === "agreement_pct" ?
          "Measured while a device is in probation" : "No telemetry yet"));
      section.dataset.lines = String(lines.length);
    });
  }

  // devices and events

  function renderDrift() {
    const { firing, alerts } = S.drift;
    $("drift-count").textContent = firing ? `${firing} firing` : "";
    if (!alerts.length) {
      put("drift", h("p", { class: "muted", id: "drift-none" },
        "No drift: every device's inputs and outputs look like the model's reference data."));
      return;
    }
    const row = (a) => h("tr", { class: "drift-alert", "data-alert-device": a.device },
      h("td", {}, h("a", { href: `#/device/${encodeURIComponent(a.device)}` }, a.device)),
      h("td", {}, a.model), h("td", {}, a.feature),
      h("td", { class: "num bad" }, a.psi.toFixed(3)), h("td", { class: "num" }, String(a.threshold)),
      h("td", { class: "num" }, String(a.samples)), h("td", {}, ago(a.since_ms)));
    put("drift", h("table", { class: "list" },
      h("thead", {}, h("tr", {}, ...["device", "model", "feature", "PSI", "threshold", "samples",
        "since"].map((t) => h("th", {}, t)))),
      h("tbody", {}, ...alerts.map(row))));
  }

  function deviceTone(d) {
    if (!d.online) return "s-bad";
    return cls(stateOf(d));
  }

  // each model's update state (a device of one model, or of none: its own)
  function statesOf(d) {
    const names = d.models ? Object.keys(d.models).sort() : [];
    return names.length ? names.map((n) => d.models[n].update_state) : [d.update_state];
  }

  // what says most of a device of several models: a failure, else an update on its way
  function stateOf(d) {
    const states = statesOf(d);
    return states.find((s) => TROUBLED.has(s)) || states.find((s) => !SETTLED.has(s)) || states[0];
  }

  // "name:version" of every model a device serves, the keys of the overview's versions
  function versionKeysOf(d) {
    if (!d.models) return d.active ? [`${d.active.name}:${d.active.version}`] : [];
    return Object.keys(d.models).sort().filter((n) => d.models[n].active)
      .map((n) => `${n}:${d.models[n].active.version}`);
  }

  // "name version" of every model a device serves (a device of one model: its active one)
  function modelsOf(d) {
    if (!d.models) return d.active ? [`${d.active.name} ${d.active.version}`] : [];
    return Object.keys(d.models).sort().filter((n) => d.models[n].active)
      .map((n) => `${n} ${d.models[n].active.version}`);
  }

  function renderDevices() {
    const devices = S.devices;
    $("devices-count").textContent = String(devices.length);
    if (!devices.length) { put("devices", h("div", { class: "empty" }, "No device has reported yet")); return; }
    put("devices", devices.slice(0, MAX_TILES).map((d) => {
      const keys = versionKeysOf(d);
      const version = keys.length ? keys.join(" ") : "none";
      const state = stateOf(d);
      return h("a", { class: `device ${deviceTone(d)} ${d.online ? "" : "offline"}`, href: deviceHref(d.id),
        dataset: { device: d.id, state, version, online: String(d.online) } },
      h("div", { class: "id" }, h("span", { class: `online-dot ${d.online ? "" : "off"}` }), d.id),
      h("div", { class: "ver" }, ...(keys.length ? keys : ["none"]).map((key) =>
        h("span", { class: "swatch", style: `background:${colorOf(key)}`, title: key })),
        modelsOf(d).join(" · ") || "no model"),
      h("div", { class: "st" }, d.online ? state.replace("_", " ") : "OFFLINE"));
    }), devices.length > MAX_TILES ? h("div", { class: "empty" }, `+ ${devices.length - MAX_TILES} more`) : null);
  }

  function eventText(e) {
    const about = e.detail || (e.state && e.version ? `update to ${e.version}` : e.kind);
    return [h("b", {}, e.state || e.kind.replace("_", " ")), about];
  }

  function renderFeed() {
    const feed = [...S.feed].reverse();
    put("feed", feed.length ? feed.map((e) => h("div", { class: `event-row ${e.fresh ? "fresh" : ""} ${cls(e.state)}` },
      h("span", { class: "t" }, hms(e.ts)),
      h("a", { class: "dev", href: deviceHref(e.device) }, e.device),
      h("span", { class: "what", title: e.detail }, eventText(e)))) :
      h("div", { class: "empty" }, "No events since the controller started"));
    for (const e of S.feed) e.fresh = false;
  }

  // the device page

  function fact(label, value, sub) {
    return h("div", { class: "fact" }, h("div", { class: "label" }, label),
      h("div", { class: "value" }, value), sub ? h("div", { class: "sub" }, sub) : null);
  }

  function renderDevicePage(id) {
    const d = S.devices.find((x) => x.id === id);
    if (!d) {
      put("device", h("div", { class: "device-head" }, h("h1", {}, id)),
        h("div", { class: "empty" }, "This device is not known to the controller (yet)."));
      return;
    }
    document.title = `edgefleet · ${id}`;
    const ref = (r) => (r ? `${r.name} ${r.version}` : "–");
    const parts = [...S.details.values()].flatMap((r) => r.devices.filter((x) => x.device === id)
      .map((x) => ({ rollout: r, item: x })));
    const events = [...(S.events.get(id) || [])].reverse();
    put("device",
      h("div", { class: "device-head" }, h("h1", {}, id),
        h("span", { class: `badge ${d.online ? "s-ok" : "s-bad"}` }, d.online ? "ONLINE" : "OFFLINE"),
        h("span", { class: `badge ${cls(stateOf(d))}` }, stateOf(d).replace("_", " "))),
      h("div", { class: "facts" },
        d.models && Object.keys(d.models).length > 1
          ? fact("Models", modelsOf(d).join(", ") || "–", Object.keys(d.models).sort()
            .map((n) => `${n}: ${d.models[n].update_state.replace("_", " ")}`).join(", "))
          : fact("Model", ref(d.active), d.active ? d.active.sha256.slice(0, 12) : null),
        fact("Previous", ref(d.previous), "rollback target"),
        fact("Update", d.update_state.replace("_", " "), d.update_detail || null),
        fact("Last seen", ago(d.last_seen_ms), d.last_seen_ms ? hms(d.last_seen_ms) : null),
        fact("Profile", d.profile || "–", `agent ${d.agent_version || "?"}`),
        fact("Runtimes", Object.entries(d.runtimes).map(([k, v]) => `${k} ${v}`).join(", ") || "–"),
        fact("Group", d.group || "–"),
        fact("Tags", d.tags.join(", ") || "–")),
      h("section", { class: "panel" }, h("h2", {}, "Rollouts"), parts.length ?
        h("table", { class: "list" }, h("tr", {}, ["Rollout", "Model", "Wave", "State", "Since", "Reason"].map((t) => h("th", {}, t))),
          parts.map(({ rollout, item }) => h("tr", { class: cls(item.state) },
            h("td", { class: "mono" }, rollout.id), h("td", {}, `${rollout.spec.model.name} ${rollout.spec.model.version}`),
            h("td", {}, String(item.wave + 1)), h("td", {}, h("span", { class: "badge" }, item.state.replace("_", " "))),
            h("td", { class: "mono" }, item.since_ms ? hms(item.since_ms) : "–"), h("td", {}, item.reason || "")))) :
        h("div", { class: "empty" }, "Not part of a recent rollout")),
      h("section", { class: "panel", id: "device-events", style: "margin-top:22px" },
        h("h2", {}, "Recent events ", h("span", { class: "count" }, String(events.length))), events.length ?
          h("table", { class: "list" }, h("tr", {}, ["Time", "#", "Event", "State", "Detail", "Version"].map((t) => h("th", {}, t))),
            events.map((e) => h("tr", { class: `event ${cls(e.state)}`, dataset: { seq: String(e.seq) } },
              h("td", { class: "mono" }, hms(e.ts)), h("td", { class: "mono" }, String(e.seq)), h("td", {}, e.kind),
              h("td", {}, e.state ? h("span", { class: "badge" }, e.state.replace("_", " ")) : "–"),
              h("td", {}, e.detail || ""), h("td", {}, e.version || "")))) :
          h("div", { class: "empty" }, "No events from this device since the controller started")));
  }

  function renderHistory() {
    if (!S.history.length) { put("history", h("div", { class: "empty" }, "Nothing done yet")); return; }
    const who = (e) => {
      const role = e.role || (e.detail && e.detail.role);
      return role ? `${e.actor} (${role})` : e.actor;
    };
    put("history", h("table", { class: "list" },
      h("thead", {}, h("tr", {}, ["Time", "Who", "Action", "Target", "Outcome", "What"].map((t) => h("th", {}, t)))),
      h("tbody", {}, S.history.map((e) => h("tr", {
        class: `history-entry ${e.outcome === "ok" ? "" : "s-bad"}`,
        dataset: { action: e.action, target: e.target, actor: e.actor, outcome: e.outcome } },
      h("td", { class: "mono" }, hms(e.ts_ms)), h("td", {}, who(e)), h("td", {}, e.action),
      h("td", { class: "mono" }, e.target),
      h("td", {}, e.outcome === "ok" ? "ok" : h("span", { class: "badge" }, e.outcome)),
      h("td", {}, (e.detail && e.detail.summary) || ""))))));
  }

  // --- acting on the fleet ------------------------------------------------------------
  // Every action is asked for in the dialog first, with what it will do, then sent to the
  // endpoint the CLI uses; the controller checks it, writes it to the history under the
  // token's name, and its refusal (error and hint) is shown in the dialog.

  const modelText = (r) => `${r.spec.model.name} ${r.spec.model.version}`;
  const VERBS = {
    pause: {
      label: "Pause", from: ["RUNNING"], done: "paused",
      what: (r) => [`No device is sent ${modelText(r)} and none is committed until the rollout is resumed.`,
        "Devices in probation wait there, serving the new version with the previous one ready; the gates still fire."],
    },
    resume: {
      label: "Resume", from: ["PAUSED"], done: "resumed",
      what: (r) => [`The controller goes on sending ${modelText(r)} wave by wave and committing devices after their soak, as the gates allow.`],
    },
    abort: {
      label: "Abort", from: ["PENDING", "RUNNING", "PAUSED"], done: "aborted",
      what: (r) => ["Devices of the rollout that have not committed are rolled back; devices not sent the bundle yet are cancelled.",
        `Devices of earlier waves keep ${modelText(r)}: roll the rollout back for them. An aborted rollout cannot be resumed.`],
    },
    rollback: {
      label: "Roll back", from: ["PENDING", "RUNNING", "PAUSED", "SUCCEEDED", "ABORTED"], done: "rolled back",
      what: (r) => [`Every device this rollout touched (of its ${r.total}) returns to the bundle it ran before ${modelText(r)}; devices still on their way are rolled back when they reach probation, pending ones are cancelled.`,
        "This cannot be undone: create a new rollout to go forward again."],
    },
  };

  function actionButtons(rollout) {
    if (!canAct()) return null; // a viewer's token: the controller would refuse with 403
    const verbs = Object.entries(VERBS).filter(([, v]) => v.from.includes(rollout.state));
    if (!verbs.length) return null;
    return h("div", { class: "actions" }, verbs.map(([verb, v]) => h("button", {
      type: "button", class: `small act-${verb}`, dataset: { verb, rollout: rollout.id } }, v.label)));
  }

  function notice(text) {
    const el = $("notice");
    el.textContent = text;
    el.hidden = false;
  }

  let pending = null; // the action the open dialog asks for
  function ask({ title, lines, button, run, done }) {
    const dialog = $("confirm");
    $("confirm-title").textContent = title;
    put("confirm-text", lines.map((line) => (line instanceof Node ? line : h("p", {}, line))));
    $("confirm-error").textContent = "";
    $("confirm-hint").textContent = "";
    const ok = $("confirm-ok");
    ok.textContent = button;
    ok.disabled = false;
    pending = { run, done };
    dialog.dataset.state = "asking";
    if (!dialog.open) dialog.showModal();
    $("confirm-cancel").focus(); // Enter alone does not act
  }

  // the dialog closed (its "close" event comes later, in a task of its own): nothing pending
  function closeDialog() {
    const dialog = $("confirm");
    if (dialog.open) dialog.close();
    pending = null;
    dialog.dataset.state = "closed";
  }

  async function confirmed() {
    if (!pending) return;
    const { run, done } = pending;
    const dialog = $("confirm");
    $("confirm-ok").disabled = true;
    dialog.dataset.state = "sending";
    try {
      const result = await run();
      closeDialog();
      done(result);
    } catch (error) {
      if (error instanceof ApiError && error.status === 401) { forgetToken(); return; }
      const text = error instanceof ApiError ?
        `The controller refused (${error.status}): ${error.message}` :
        `The controller did not answer: ${error.message}`;
      if (!dialog.open) { notice(`${text} ${error.hint || ""}`); return; } // closed meanwhile
      dialog.dataset.state = "refused";
      $("confirm-error").textContent = text;
      $("confirm-hint").textContent = error.hint || "";
      $("confirm-ok").disabled = false;
      if (error.field) markField(error.field);
    }
  }

  function took(result, text) {
    const { devices, ...summary } = result;
    S.rollouts.set(result.id, summary);
    S.details.set(result.id, result);
    notice(text);
    schedule();
    loadHistory().catch(report);
  }

  function askVerb(verb, id) {
    const rollout = S.rollouts.get(id);
    const v = VERBS[verb];
    if (!rollout || !v) return;
    ask({
      title: `${v.label} rollout ${id}?`,
      lines: [h("p", { class: "subject" }, `${modelText(rollout)} → ${rollout.spec.selectors.join(", ")} · ${rollout.state.replace("_", " ")} · wave ${Math.min(rollout.wave + 1, rollout.waves)} of ${rollout.waves}`),
        ...v.what(rollout)],
      button: `${v.label} ${id}`,
      run: () => send(`/api/v1/rollouts/${encodeURIComponent(id)}/${verb}`),
      done: (result) => took(result, `Rollout ${id} ${v.done}: ${result.reason || result.state}`),
    });
  }

  // the new-rollout form: the controller checks every value (the page sends what was typed)

  const FIELDS = { // API field -> input
    model: "create-model", selectors: "create-selectors", waves: "create-waves",
    soak_s: "create-soak", device_timeout_s: "create-timeout", rate_per_min: "create-rate",
    "gates.max_failures_pct": "create-max-failures", "gates.min_success_pct": "create-min-success",
    "gates.max_error_rate_pct": "create-max-error-rate", "gates.min_agreement_pct": "create-min-agreement",
    "gates.max_p95_ratio": "create-max-p95-ratio",
  };

  function markField(field) {
    const input = $(FIELDS[field] || FIELDS[field.split(".")[0]] || "");
    if (input) input.setAttribute("aria-invalid", "true");
  }

  // Decimal digits with an optional fraction, nothing else (Number() would take 0x1, 0b11,
  // 1e1 or " "); no field of the form takes a negative number.
  const DECIMAL = /^\d+(\.\d+)?$/;
  class FieldError extends Error {
    constructor(id, message) { super(message); this.id = id; }
  }

  function numberIn(id, text) {
    if (DECIMAL.test(text)) return Number(text);
    const label = $(id).closest("label").firstChild.textContent.trim();
    throw new FieldError(id, `${label}: "${text}" is not a number: write decimal digits, with a fraction after a point if needed (such as 30 or 2.5).`);
  }
  const listOf = (text, separator) => text.split(separator).map((x) => x.trim()).filter(Boolean);

  function createBody() {
    const body = { model: $("create-model").value, selectors: listOf($("create-selectors").value, "\n") };
    const waves = listOf($("create-waves").value, ",");
    if (waves.length) body.waves = waves;
    const gates = {};
    for (const [field, id] of Object.entries(FIELDS)) {
      const text = $(id).value.trim();
      if (!text || ["model", "selectors", "waves"].includes(field)) continue;
      if (field.startsWith("gates.")) gates[field.slice(6)] = numberIn(id, text);
      else body[field] = numberIn(id, text);
    }
    if (Object.keys(gates).length) body.gates = gates;
    return body;
  }

  function matching(selectors) {
    const parsed = selectors.map((s) => [s.slice(0, s.indexOf(":")), s.slice(s.indexOf(":") + 1)]);
    if (!parsed.length || parsed.some(([kind]) => !["group", "tag", "device"].includes(kind))) return null;
    return S.devices.filter((d) => parsed.some(([kind, name]) => (kind === "group" ? d.group === name :
      kind === "tag" ? d.tags.includes(name) : d.id === name))).length;
  }

  function createLines(body) {
    const g = body.gates || {};
    const failures = g.max_failures_pct ?? 0;
    const count = matching(body.selectors);
    return [
      h("p", { class: "subject" }, `${versionLabel(body.model || "no model chosen")}`),
      h("p", {}, "To the devices of ", body.selectors.length ?
        body.selectors.map((sel, i) => [i ? ", " : "", h("code", {}, sel)]) : "no selector",
      count === null ? "" : ` (${count} of the devices listed here match now)`),
      `In waves ${(body.waves || ["100%"]).join(", ")} (a last 100% is added if missing).`,
      `Aborts when more than ${failures}% of the devices of the waves so far fail; the next wave starts when at least ${g.min_success_pct ?? Number((100 - failures).toFixed(6))}% of a wave succeeded.`,
      ...[["max_error_rate_pct", "error rate at most", "%"], ["min_agreement_pct", "agreement at least", "%"],
        ["max_p95_ratio", "p95 latency at most", "× the previous version's"]]
        .filter(([k]) => g[k] !== undefined).map(([k, what, unit]) => `Quality gate: ${what} ${g[k]}${unit}.`),
      ...[["soak_s", "Soak", "s in probation before the commit"], ["device_timeout_s", "Device timeout", "s"],
        ["rate_per_min", "Rate", " devices a minute"]]
        .filter(([k]) => body[k] !== undefined).map(([k, what, unit]) => `${what}: ${body[k]}${unit}.`),
      "The controller starts it at once.",
    ];
  }

  function askCreate(event) {
    event.preventDefault();
    for (const el of $("create-form").querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
    $("create-error").textContent = "";
    let body;
    try {
      body = createBody();
    } catch (error) {
      if (!(error instanceof FieldError)) throw error;
      $(error.id).setAttribute("aria-invalid", "true");
      $("create-error").textContent = error.message; // nothing is sent
      $(error.id).focus();
      return;
    }
    ask({
      title: "Create this rollout?", lines: createLines(body), button: "Create rollout",
      run: () => send("/api/v1/rollouts", body),
      done: (result) => {
        $("create-panel").hidden = true;
        took(result, `Rollout ${result.id} created: ${modelText(result)} to ${result.spec.selectors.join(", ")}`);
      },
    });
  }

  async function openCreate() {
    $("create-panel").hidden = false;
    const select = $("create-model");
    const chosen = select.value;
    try {
      const models = await api("/api/v1/models");
      models.sort((a, b) => b.pushed_ms - a.pushed_ms);
      select.replaceChildren(...models.map((m) => h("option", { value: `${m.name}:${m.version}` },
        `${m.name} ${m.version} (${m.format})`)));
      if (chosen) select.value = chosen;
    } catch (error) {
      notice(`The model list could not be read: ${error.message}`);
    }
    $("create-selectors").focus();
  }

  function bindActions() {
    $("rollouts").addEventListener("click", (event) => {
      const button = event.target.closest("button[data-verb]");
      if (button) askVerb(button.dataset.verb, button.dataset.rollout);
    });
    $("new-rollout").addEventListener("click", () => { openCreate().catch(report); });
    $("create-cancel").addEventListener("click", () => { $("create-panel").hidden = true; });
    $("create-form").addEventListener("submit", askCreate);
    $("confirm-ok").addEventListener("click", () => { confirmed().catch(report); });
    $("confirm-cancel").addEventListener("click", closeDialog);
    $("confirm").addEventListener("close", () => { if (!$("confirm").open) closeDialog(); }); // Escape
    $("sign-out").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      location.reload();
    });
  }

  // --- routing, login, start ----------------------------------------------------------

  function route() {
    const match = /^#\/device\/(.+)$/.exec(location.hash);
    return { device: match ? decodeURIComponent(match[1]) : null };
  }

  function showView() {
    const device = route().device;
    $("fleet-view").hidden = device !== null;
    $("device-view").hidden = device === null;
    $("login").hidden = true;
    render();
    window.scrollTo(0, 0);
  }

  function showLogin(message) {
    $("fleet-view").hidden = true;
    $("device-view").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
  }

  function tick() {
    $("clock").textContent = hms(Date.now());
    renderLive();
  }

  const ADDRESS_TOKEN = "A token in the page's address is not used: the browser keeps every " +
    "address (its history, its session files). Enter the token in the form instead.";

  // a token in the page's own address: out of it at once, and not used
  function dropAddressToken() {
    const params = new URLSearchParams(location.search);
    if (!params.has("token")) return false;
    params.delete("token");
    const rest = params.toString();
    history.replaceState(null, "", location.pathname + (rest ? `?${rest}` : "") + location.hash);
    return true;
  }

  function showMe() {
    const me = $("whoami");
    me.replaceChildren(h("b", {}, S.me.name), ` · ${S.me.role}`);
    me.dataset.role = S.me.role;
    me.hidden = false;
    $("new-rollout").hidden = !canAct();
  }

  async function start() {
    const fromAddress = dropAddressToken();
    $("login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      sessionStorage.setItem(TOKEN_KEY, $("login-token").value.trim());
      location.reload();
    });
    tick();
    setInterval(tick, 1000);
    if (!token()) { showLogin(fromAddress ? ADDRESS_TOKEN : ""); return; }
    try {
      S.me = await api("/api/v1/whoami");
    } catch (error) {
      if (error instanceof ApiError && error.status === 401) { forgetToken(); return; }
      showLogin(error instanceof ApiError ? `The controller said: ${error.message}` : String(error));
      return;
    }
    if (fromAddress) notice(ADDRESS_TOKEN);
    showMe();
    $("sign-out").hidden = false;
    bindActions();
    window.addEventListener("hashchange", showView);
    let resizing = 0;
    window.addEventListener("resize", () => {
      clearTimeout(resizing);
      resizing = setTimeout(render, 150);
    });
    showView();
    connect();
  }

  start();
})();
