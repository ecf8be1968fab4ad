// The operator dashboard: reads /admin/usage, /admin/accounts, /admin/keys, /admin/campaigns and
// /admin/requests with the admin token and draws totals, usage over time (stacked SVG bars per
// model, key, project or campaign), refusals, outcomes, balances, keys, campaign reports and
// recent errors. Every chart element carries a data-testid and its number in data-value.

import { apiFetch, ApiError, fmtInt, fmtMicros, fmtMs, fmtTime, fmtCompact, el, errorBanner, initTheme, bucketLabel, store } from "/ui/common.js";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["var(--c1)", "var(--c2)", "var(--c3)", "var(--c4)", "var(--c5)", "var(--c6)", "var(--c7)"];
const TOP = 6;
const AUTO_MS = 15000;

/** A range: buckets of `unit`, `count` of them, the last one holding now (UTC). */
const RANGES = {
  hour: { unit: "minute", step: 60, count: 60 },
  day: { unit: "hour", step: 3600, count: 24 },
  month: { unit: "day", step: 86400, count: 30 },
};

const METRICS = {
  requests: { label: "requests", of: (r) => r.requests || 0, fmt: fmtInt, axis: fmtCompact },
  tokens: { label: "tokens", of: (r) => (r.prompt_tokens || 0) + (r.completion_tokens || 0), fmt: fmtInt, axis: fmtCompact },
  cost: { label: "cost", of: (r) => r.cost || 0, fmt: fmtMicros, axis: (v) => fmtCompact(v / 1e6) },
};

const OUTCOMES = ["completed", "error", "cancelled", "refused"];

const session = {
  get() { try { return sessionStorage.getItem("parlance.adminToken") || ""; } catch { return ""; } },
  set(v) { try { if (v) sessionStorage.setItem("parlance.adminToken", v); else sessionStorage.removeItem("parlance.adminToken"); } catch { /* unavailable */ } },
};

const state = {
  token: session.get(),
  generation: 0,
  names: { key: new Map(), account: new Map(), project: new Map(), campaign: new Map() },
  byDim: [],        // rows of group_by=<dimension> for the range
  series: null,     // the last time series drawn (to redraw on a metric change without fetching)
  campaigns: [],
  report: null,     // the campaign report shown
  timer: null,
};

// ---------------------------------------------------------------- fetching

function admin(path, signal) {
  return apiFetch(path, { token: state.token, signal });
}

function rangeWindow() {
  const r = RANGES[$("range").value] || RANGES.day;
  const now = Math.floor(Date.now() / 1000);
  const last = Math.floor(now / r.step) * r.step;
  const since = last - (r.count - 1) * r.step;
  const buckets = [];
  for (let i = 0; i < r.count; i++) buckets.push(bucketLabel(since + i * r.step, r.unit));
  return { ...r, since, buckets };
}

function qs(params) {
  const u = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== "") u.set(k, v);
  return u.toString();
}

/** Rows of a time-grouped usage answer spread over the range's buckets (missing ones are zero). */
function fillBuckets(rows, buckets) {
  const by = new Map(rows.map((r) => [r.group, r]));
  return buckets.map((b) => by.get(b) || { group: b, requests: 0, errors: 0, prompt_tokens: 0, cached_tokens: 0, completion_tokens: 0, cost: 0 });
}

function groupName(dim, group) {
  if (group === null || group === undefined || group === "") return "(none)";
  const n = state.names[dim] && state.names[dim].get(group);
  return n ? n : group;
}

async function refresh() {
  const my = ++state.generation;
  if (!state.token) {
    showNoData(null);
    return;
  }
  document.body.dataset.state = "loading";
  $("refresh").disabled = true;
  const w = rangeWindow();
  const dim = $("dimension").value;
  const since = w.since;
  const calls = {
    total: admin(`/admin/usage?${qs({ since })}`),
    dim: admin(`/admin/usage?${qs({ group_by: dim, since })}`),
    status: admin(`/admin/usage?${qs({ group_by: "status", since })}`),
    outcome: admin(`/admin/usage?${qs({ group_by: "outcome", since })}`),
    accounts: admin("/admin/accounts"),
    keys: admin("/admin/keys"),
    projects: admin("/admin/projects"),
    campaigns: admin("/admin/campaigns"),
    errors: admin("/admin/requests?status=error&limit=50"),
    apiErrors: admin("/admin/errors?limit=50"),
  };
  const names = Object.keys(calls);
  const settled = await Promise.allSettled(Object.values(calls));
  if (my !== state.generation) return;
  const got = {};
  const failed = {};
  settled.forEach((s, i) => { if (s.status === "fulfilled") got[names[i]] = s.value; else failed[names[i]] = s.reason; });
  const authErr = Object.values(failed).find((e) => e instanceof ApiError && (e.status === 401 || e.status === 403));
  if (authErr) {
    session.set("");
    showNoData(authErr);
    $("refresh").disabled = false;
    return;
  }

  rememberNames(got);
  $("dash-error").hidden = true;
  $("need-token").hidden = true;
  $("content").hidden = false;

  section("total", got, failed, () => renderTotals(got.total.data[0]));
  section("dim", got, failed, () => { state.byDim = got.dim.data || []; renderDimTable(dim); });
  section("status", got, failed, () => renderStatuses(got.status.data || []));
  section("outcome", got, failed, () => renderOutcomes(got.outcome.data || []));
  section("accounts", got, failed, () => renderAccounts(got.accounts.data || []));
  section("keys", got, failed, () => renderKeys(got.keys.data || []));
  section("errors", got, failed, () => renderErrors(got.errors.data || []));
  section("apiErrors", got, failed, () => renderApiErrors(got.apiErrors.data || []));
  if (got.campaigns) state.campaigns = got.campaigns.data || [];
  else showSectionError("campaigns", failed.campaigns);

  // The time series: the top groups one by one, and the rest (other groups, or records without
  // one, e.g. no project) as the total minus those.
  try {
    if (failed.dim) throw failed.dim;
    await Promise.all([loadSeries(my, w, dim), got.campaigns ? loadCampaignReport(my) : null]);
  } catch (err) {
    if (my !== state.generation) return;
    if (err instanceof ApiError && (err.status === 401 || err.status === 403)) { showNoData(err); return; }
    $("timeseries").replaceChildren(errorBanner(err, "section-error"));
    $("legend").replaceChildren();
  }
  if (my !== state.generation) return;
  $("updated").textContent = "Updated " + new Date().toLocaleTimeString();
  document.body.dataset.loads = String(Number(document.body.dataset.loads || 0) + 1);
  document.body.dataset.state = "loaded";
  $("refresh").disabled = false;
}

function section(name, got, failed, render) {
  if (got[name]) {
    try { render(); } catch (err) { showSectionError(name, err); }
  } else {
    showSectionError(name, failed[name]);
  }
}

const SECTION_TARGET = {
  total: "cards", dim: "dimension-rows", status: "statuses", outcome: "outcomes", accounts: "accounts-rows",
  keys: "keys-rows", errors: "errors-rows", apiErrors: "api-errors-rows", campaigns: "campaign-report",
};

function showSectionError(name, err) {
  const target = document.querySelector(`[data-testid="${SECTION_TARGET[name]}"]`) || $(SECTION_TARGET[name]);
  if (!target) return;
  const banner = errorBanner(err || new Error("failed"), "section-error");
  if (target.tagName === "TBODY") {
    const cols = target.closest("table").querySelectorAll("thead th").length;
    target.replaceChildren(el("tr", {}, el("td", { colspan: cols }, banner)));
  } else if (name === "total") {
    target.before(banner);
  } else {
    target.replaceChildren(banner);
  }
}

function rememberNames(got) {
  const n = state.names;
  if (got.accounts) n.account = new Map((got.accounts.data || []).map((a) => [a.id, a.name]));
  if (got.keys) n.key = new Map((got.keys.data || []).map((k) => [k.id, `${k.name || k.id} (${k.prefix}…)`]));
  if (got.projects) n.project = new Map((got.projects.data || []).map((p) => [p.id, p.name]));
  if (got.campaigns) n.campaign = new Map((got.campaigns.data || []).map((c) => [c.id, c.name || c.key || c.id]));
}

/** Wrong token, no token: an error (if any) and no data anywhere on the page. */
function showNoData(err) {
  state.generation++;
  $("content").hidden = true;
  for (const id of ["dimension-rows", "accounts-rows", "keys-rows", "errors-rows", "api-errors-rows", "timeseries", "legend", "statuses", "status-summary", "outcomes", "campaign-report"]) {
    $(id).replaceChildren();
  }
  for (const card of document.querySelectorAll(".card")) {
    card.removeAttribute("data-value");
    card.querySelector(".value").textContent = "";
    card.querySelector(".sub").textContent = "";
  }
  for (const b of document.querySelectorAll('[data-testid="section-error"]')) b.remove();
  $("campaign").replaceChildren();
  state.byDim = [];
  state.series = null;
  state.report = null;
  redraws.clear();
  $("dash-error").hidden = !err;
  $("dash-error").replaceChildren(...(err ? [errorBanner(err, "auth-error")] : []));
  $("need-token").hidden = !!err;
  $("updated").textContent = "";
  $("refresh").disabled = false;
  document.body.dataset.state = err ? "error" : "idle";
}

// ---------------------------------------------------------------- cards and tables

function card(testid, value, shown, sub, extra = {}) {
  const c = document.querySelector(`[data-testid="${testid}"]`);
  c.dataset.value = String(value);
  for (const [k, v] of Object.entries(extra)) c.dataset[k] = String(v);
  c.querySelector(".value").textContent = shown;
  c.querySelector(".sub").textContent = sub;
}

function renderTotals(t) {
  t = t || {};
  const requests = t.requests || 0;
  const prompt = t.prompt_tokens || 0;
  const cached = t.cached_tokens || 0;
  const completion = t.completion_tokens || 0;
  card("card-requests", requests, fmtInt(requests), `${fmtInt(t.filter_hits || 0)} filter hits`);
  const rate = requests ? ((t.errors || 0) / requests * 100).toFixed(1) + "% of requests" : "";
  card("card-errors", t.errors || 0, fmtInt(t.errors || 0), rate);
  card("card-tokens", prompt + completion, fmtInt(prompt + completion),
    `prompt ${fmtInt(prompt)} (cached ${fmtInt(cached)}) · completion ${fmtInt(completion)}`,
    { prompt, cached, completion });
  card("card-cost", t.cost || 0, fmtMicros(t.cost || 0), "micro-units ÷ 1,000,000");
  card("card-latency", t.avg_latency_ms ?? "", fmtMs(t.avg_latency_ms), `TTFT ${fmtMs(t.avg_ttft_ms)}`, { ttft: t.avg_ttft_ms ?? "" });
}

function numCell(v, shown) {
  return el("td", { class: "num" }, shown === undefined ? fmtInt(v) : shown);
}

function emptyRow(tbody, text) {
  const cols = tbody.closest("table").querySelectorAll("thead th").length;
  tbody.replaceChildren(el("tr", {}, el("td", { class: "none", colspan: cols }, text)));
}

function renderDimTable(dim) {
  $("dim-col").textContent = dim;
  const tbody = $("dimension-rows");
  const rows = state.byDim;
  if (!rows.length) { emptyRow(tbody, "No requests in this range."); return; }
  tbody.replaceChildren(...rows.map((r) => el("tr", {
    dataset: {
      testid: "dim-row", group: r.group ?? "", requests: r.requests, errors: r.errors, promptTokens: r.prompt_tokens,
      cachedTokens: r.cached_tokens, completionTokens: r.completion_tokens, cost: r.cost,
    },
  },
  el("td", { title: r.group ?? "" }, groupName(dim, r.group)),
  numCell(r.requests), numCell(r.errors), numCell(r.prompt_tokens), numCell(r.cached_tokens),
  numCell(r.completion_tokens), numCell(r.cost, fmtMicros(r.cost)),
  numCell(r.avg_latency_ms, fmtMs(r.avg_latency_ms)), numCell(r.avg_ttft_ms, fmtMs(r.avg_ttft_ms)))));
}

function renderAccounts(list) {
  const tbody = $("accounts-rows");
  if (!list.length) { emptyRow(tbody, "No accounts."); return; }
  tbody.replaceChildren(...list.map((a) => el("tr", {
    dataset: { testid: "account-row", id: a.id, name: a.name, balance: a.balance, reserved: a.reserved },
  },
  el("td", { title: a.id }, a.name), numCell(a.balance, fmtMicros(a.balance)), numCell(a.reserved, fmtMicros(a.reserved)),
  el("td", {}, fmtTime(a.created_at)))));
}

function renderKeys(list) {
  const tbody = $("keys-rows");
  if (!list.length) { emptyRow(tbody, "No managed keys."); return; }
  tbody.replaceChildren(...list.map((k) => el("tr", {
    class: k.revoked_at ? "revoked" : null,
    title: k.revoked_at ? `revoked ${fmtTime(k.revoked_at)}` : k.id,
    dataset: { testid: "key-row", id: k.id, name: k.name ?? "", prefix: k.prefix, revoked: k.revoked_at ? "true" : "false" },
  },
  el("td", {}, k.name || "–"), el("td", { class: "mono" }, k.prefix + "…"),
  el("td", {}, state.names.account.get(k.account_id) || k.account_id || "–"),
  numCell(k.rpm, k.rpm ?? "–"), numCell(k.tpm, k.tpm ?? "–"), el("td", {}, fmtTime(k.created_at)))));
}

function renderErrors(list) {
  const tbody = $("errors-rows");
  if (!list.length) { emptyRow(tbody, "No errors recorded."); return; }
  tbody.replaceChildren(...list.map((r) => el("tr", {
    dataset: { testid: "error-row", requestId: r.request_id, status: r.status, outcome: r.outcome, model: r.model ?? "", key: r.key_id ?? "" },
  },
  el("td", {}, fmtTime(r.created_at)), el("td", { class: "num status-err" }, r.status), el("td", {}, r.outcome || "–"),
  el("td", {}, r.model || "–"), el("td", { title: r.key_id || "" }, groupName("key", r.key_id)),
  el("td", {}, r.account_id ? groupName("account", r.account_id) : "–"),
  numCell(r.latency_ms, fmtMs(r.latency_ms)), el("td", { class: "mono" }, r.request_id))));
}

// Every error response, from /admin/errors: what the caller was told, by route.
function renderApiErrors(list) {
  const tbody = $("api-errors-rows");
  if (!list.length) { emptyRow(tbody, "No error responses since the server started."); return; }
  tbody.replaceChildren(...list.map((e) => el("tr", {
    dataset: { testid: "api-error-row", requestId: e.request_id, status: e.status, route: e.route, code: e.code ?? "" },
  },
  el("td", {}, fmtTime(e.created_at)), el("td", { class: "num status-err" }, e.status),
  el("td", { class: "mono" }, `${e.method} ${e.route}`), el("td", { class: "mono" }, e.code || "–"),
  el("td", {}, e.message || "–"), el("td", { class: "mono" }, e.request_id))));
}

// ---------------------------------------------------------------- SVG

function svg(tag, attrs = {}, ...children) {
  const n = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined) continue;
    if (k === "dataset") for (const [dk, dv] of Object.entries(v)) n.dataset[dk] = String(dv);
    else n.setAttribute(k, String(v));
  }
  for (const c of children) if (c) n.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return n;
}

/** Round axis steps for whole numbers (every metric is one): at most 4 gridlines above zero. */
function niceMax(max) {
  if (max <= 0) return { top: 4, step: 1 };
  const raw = max / 4;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = Math.max(1, [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw));
  return { top: Math.max(step, Math.ceil(max / step) * step), step };
}

/** Charts are drawn at their container's width (text stays at its size); redrawn on resize. */
const redraws = new Map();
function remember(container, draw) { redraws.set(container, draw); }
let resizeTimer = null;
window.addEventListener("resize", () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(() => {
    for (const [container, draw] of redraws) {
      if (!container.isConnected) redraws.delete(container);
      else if (container.offsetParent) draw();
    }
  }, 150);
});

function swatch(color) {
  const i = el("i");
  i.style.background = color;
  return i;
}

function tooltip(container) {
  let tip = container.querySelector(".tooltip");
  if (!tip) { tip = el("div", { class: "tooltip", hidden: true, dataset: { testid: "tooltip" } }); container.append(tip); }
  return {
    show(evt, children) {
      tip.replaceChildren(...children);
      tip.hidden = false;
      const box = container.getBoundingClientRect();
      let x = evt.clientX - box.left + 12;
      const y = evt.clientY - box.top + 12;
      if (x + tip.offsetWidth > box.width) x = Math.max(0, evt.clientX - box.left - tip.offsetWidth - 12);
      tip.style.left = x + "px";
      tip.style.top = y + "px";
    },
    hide() { tip.hidden = true; },
  };
}

function tickLabel(label, unit) {
  if (unit === "day") return label.slice(5);            // MM-DD
  return label.slice(11, 16);                           // HH:MM (UTC)
}

/** Stacked bars: one column per bucket, one segment per series. */
function drawStacked(container, legend, w, series, metricName) {
  remember(container, () => drawStacked(container, legend, w, series, metricName));
  const metric = METRICS[metricName];
  const W = Math.max(320, container.clientWidth || 820), H = 240, L = 52, R = 8, T = 10, B = 26;
  const n = w.buckets.length;
  const totals = w.buckets.map((_, i) => series.reduce((s, x) => s + x.values[i], 0));
  const max = Math.max(0, ...totals);
  const { top, step } = niceMax(max);
  const y = (v) => T + (H - T - B) * (1 - v / top);
  const bw = (W - L - R) / n;
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `${metric.label} per ${w.unit}`, dataset: { testid: "ts-svg", max, unit: w.unit, metric: metricName } });
  for (let v = 0; v <= top + step / 2; v += step) {
    root.append(svg("line", { class: v === 0 ? "axis" : "grid", x1: L, x2: W - R, y1: y(v), y2: y(v) }));
    root.append(svg("text", { x: L - 6, y: y(v) + 3.5, "text-anchor": "end" }, metric.axis(v)));
  }
  const every = Math.ceil(n / Math.max(3, Math.floor(W / 90)));
  w.buckets.forEach((b, i) => {
    if (i % every === 0 || i === n - 1) {
      root.append(svg("text", { x: L + bw * (i + 0.5), y: H - 8, "text-anchor": "middle" }, tickLabel(b, w.unit)));
    }
  });
  const gap = Math.min(2, bw * 0.2);
  const tip = tooltip(container);
  w.buckets.forEach((b, i) => {
    let acc = 0;
    for (const s of series) {
      const v = s.values[i];
      if (v > 0) {
        const y0 = y(acc), y1 = y(acc + v);
        root.append(svg("rect", {
          x: L + bw * i + gap / 2, width: Math.max(0.5, bw - gap), y: y1, height: Math.max(0.5, y0 - y1),
          fill: s.color, dataset: { testid: "ts-bar", group: s.group ?? "", bucket: b, value: v },
        }));
      }
      acc += v;
    }
    const col = svg("rect", { class: "hover-col", x: L + bw * i, width: bw, y: T, height: H - T - B, dataset: { testid: "ts-col", bucket: b, total: totals[i] } });
    col.addEventListener("mousemove", (evt) => tip.show(evt, [
      el("b", {}, `${b} · ${metric.fmt(totals[i])} ${metric.label}`),
      ...series.filter((s) => s.values[i] > 0).map((s) => el("div", {}, swatch(s.color), `${s.label}: ${metric.fmt(s.values[i])}`)),
    ]));
    col.addEventListener("mouseleave", () => tip.hide());
    root.append(col);
  });
  if (max === 0) root.append(svg("text", { class: "nodata", x: (L + W) / 2, y: H / 2, "text-anchor": "middle" }, "No traffic in this range"));
  container.replaceChildren(root, container.querySelector(".tooltip") || "");

  legend.replaceChildren(...series.map((s) => {
    const sw = swatch(s.color);
    const total = s.values.reduce((a, b) => a + b, 0);
    return el("span", {
      dataset: { testid: "legend-item", group: s.group ?? "", total, requests: s.totals.requests, tokens: s.totals.tokens, cost: s.totals.cost },
      title: s.group ?? "",
    }, sw, `${s.label} · ${metric.fmt(total)}`);
  }));
}

/** Horizontal bars: label, bar, number. */
function drawHBars(container, items, testid, key) {
  remember(container, () => drawHBars(container, items, testid, key));
  const W = Math.max(260, container.clientWidth || 420), row = 26, labelW = Math.min(130, W * 0.35), numW = 80;
  const max = Math.max(1, ...items.map((i) => i.value));
  const root = svg("svg", { viewBox: `0 0 ${W} ${items.length * row + 4}`, role: "img" });
  const tip = tooltip(container);
  items.forEach((it, i) => {
    const y = i * row + 4;
    const width = (W - labelW - numW) * it.value / max;
    root.append(svg("text", { x: 0, y: y + 15 }, it.label));
    root.append(svg("rect", { x: labelW, y: y + 4, width: W - labelW - numW, height: 14, fill: "var(--panel-2)", rx: 3 }));
    const bar = svg("rect", {
      x: labelW, y: y + 4, width: Math.max(it.value > 0 ? 2 : 0, width), height: 14, fill: it.color, rx: 3,
      dataset: { testid, [key]: it.key, value: it.value },
    });
    bar.addEventListener("mousemove", (evt) => tip.show(evt, [el("b", {}, it.label), it.detail || it.shown]));
    bar.addEventListener("mouseleave", () => tip.hide());
    root.append(bar);
    root.append(svg("text", { x: W, y: y + 15, "text-anchor": "end" }, it.shown));
  });
  container.replaceChildren(root, container.querySelector(".tooltip") || "");
}

// ---------------------------------------------------------------- charts

async function loadSeries(my, w, dim) {
  const metricName = $("metric").value;
  const metric = METRICS[metricName];
  const groups = state.byDim
    .filter((r) => r.group !== null && r.group !== undefined && r.group !== "")
    .sort((a, b) => metric.of(b) - metric.of(a) || b.requests - a.requests)
    .slice(0, TOP);
  const since = w.since;
  const answers = await Promise.all([
    admin(`/admin/usage?${qs({ group_by: w.unit, since })}`),
    ...groups.map((g) => admin(`/admin/usage?${qs({ group_by: w.unit, since, [dim]: g.group })}`)),
  ]);
  if (my !== state.generation) return;
  const total = fillBuckets(answers[0].data || [], w.buckets);
  const perGroup = answers.slice(1).map((a) => fillBuckets(a.data || [], w.buckets));
  const rest = total.map((t, i) => {
    const o = { group: t.group };
    for (const f of ["requests", "errors", "prompt_tokens", "cached_tokens", "completion_tokens", "cost"]) {
      o[f] = Math.max(0, (t[f] || 0) - perGroup.reduce((s, g) => s + (g[i][f] || 0), 0));
    }
    return o;
  });
  const series = groups.map((g, i) => ({ group: g.group, label: groupName(dim, g.group), color: COLORS[i], rows: perGroup[i] }));
  if (rest.some((r) => r.requests || r.prompt_tokens || r.completion_tokens || r.cost)) {
    const hasNull = state.byDim.some((r) => r.group === null || r.group === undefined || r.group === "");
    const more = state.byDim.length - groups.length - (hasNull ? 1 : 0) > 0;
    const label = hasNull && more ? "(none) and others" : hasNull ? "(none)" : "others";
    series.push({ group: null, label, color: COLORS[6], rows: rest });
  }
  state.series = { w, dim, series };
  drawSeries();
}

function drawSeries() {
  if (!state.series) return;
  const metricName = $("metric").value;
  const metric = METRICS[metricName];
  const { w, series } = state.series;
  const drawn = series.map((s) => ({
    ...s,
    values: s.rows.map(metric.of),
    totals: {
      requests: s.rows.reduce((a, r) => a + METRICS.requests.of(r), 0),
      tokens: s.rows.reduce((a, r) => a + METRICS.tokens.of(r), 0),
      cost: s.rows.reduce((a, r) => a + METRICS.cost.of(r), 0),
    },
  }));
  drawStacked($("timeseries"), $("legend"), w, drawn, metricName);
}

function renderStatuses(rows) {
  const count = (pred) => rows.filter((r) => pred(Number(r.group))).reduce((s, r) => s + r.requests, 0);
  const total = rows.reduce((s, r) => s + r.requests, 0);
  const known = new Set([429, 402, 503]);
  const others = rows.filter((r) => Number(r.group) >= 400 && !known.has(Number(r.group)));
  const items = [
    { key: "429", label: "429 rate limited", value: count((s) => s === 429), color: "var(--c2)" },
    { key: "402", label: "402 no credit", value: count((s) => s === 402), color: "var(--c4)" },
    { key: "503", label: "503 overloaded", value: count((s) => s === 503), color: "var(--c5)" },
    {
      key: "other", label: "other errors", value: count((s) => s >= 400 && !known.has(s)), color: "var(--c7)",
      detail: others.length ? others.map((r) => `${r.group}: ${fmtInt(r.requests)}`).join(", ") : "none",
    },
  ];
  for (const it of items) it.shown = `${fmtInt(it.value)}${total ? ` (${(it.value / total * 100).toFixed(1)}%)` : ""}`;
  drawHBars($("statuses"), items, "status-bar", "status");
  const ok = count((s) => s < 400);
  $("status-summary").replaceChildren(el("div", { class: "hint", dataset: { testid: "status-summary", ok, total } },
    `${fmtInt(ok)} of ${fmtInt(total)} requests answered without an error` +
    (others.length ? ` · other statuses: ${others.map((r) => `${r.group} × ${fmtInt(r.requests)}`).join(", ")}` : "")));
}

function renderOutcomes(rows) {
  const by = new Map(rows.map((r) => [r.group, r.requests]));
  const keys = [...OUTCOMES, ...rows.map((r) => r.group).filter((g) => !OUTCOMES.includes(g))];
  const colors = { completed: "var(--c3)", error: "var(--c4)", cancelled: "var(--c6)", refused: "var(--c2)" };
  const items = keys.map((k) => ({
    key: k ?? "", label: k ?? "(none)", value: by.get(k) || 0, color: colors[k] || "var(--c7)",
    shown: fmtInt(by.get(k) || 0),
  }));
  drawHBars($("outcomes"), items, "outcome-bar", "outcome");
}

// ---------------------------------------------------------------- campaigns

function fillCampaignSelect() {
  const select = $("campaign");
  const keep = select.value || store.get("dashCampaign", "");
  select.replaceChildren(...state.campaigns.map((c) => el("option", { value: c.id }, c.name || c.key || c.id)));
  if (state.campaigns.some((c) => c.id === keep)) select.value = keep;
}

async function loadCampaignReport(my) {
  fillCampaignSelect();
  const box = $("campaign-report");
  const id = $("campaign").value;
  if (!id) { box.replaceChildren(el("p", { class: "hint" }, "No campaigns yet (POST /admin/campaigns).")); return; }
  let report;
  try {
    report = await admin(`/admin/campaigns/${encodeURIComponent(id)}/report?${qs({ since: rangeWindow().since })}`);
  } catch (err) {
    if (my !== state.generation) return;
    if (err instanceof ApiError && (err.status === 401 || err.status === 403)) throw err;
    box.replaceChildren(errorBanner(err, "section-error"));
    return;
  }
  if (my !== state.generation) return;
  state.report = report;
  drawCampaign();
}

function drawCampaign() {
  const box = $("campaign-report");
  const report = state.report;
  if (!report) return;
  const variants = report.variants || [];
  const metric = $("campaign-metric").value;
  const fmt = metric === "cost" ? fmtMicros : metric === "avg_latency_ms" ? fmtMs : metric === "avg_score" ? (v) => (v === null || v === undefined ? "–" : Number(v).toFixed(2)) : fmtInt;
  const items = variants.map((v, i) => ({
    key: v.variant, label: v.variant, value: Number(v[metric]) || 0, shown: fmt(v[metric]), color: COLORS[i % COLORS.length],
  }));
  const chart = el("div", { class: "chart", dataset: { testid: "campaign-chart" } });
  const headers = ["variant", "weight", "requests", "errors", "prompt", "cached", "completion", "cost", "latency", "TTFT", "feedback", "score"];
  const table = el("table", { dataset: { testid: "campaign-table" } },
    el("thead", {}, el("tr", {}, headers.map((h, i) => el("th", { class: i > 0 ? "num" : null }, h)))),
    el("tbody", {}, variants.length ? variants.map((v) => el("tr", {
      dataset: {
        testid: "variant-row", variant: v.variant, requests: v.requests, errors: v.errors, promptTokens: v.prompt_tokens,
        cachedTokens: v.cached_tokens, completionTokens: v.completion_tokens, cost: v.cost,
      },
      title: v.labels && Object.keys(v.labels).length ? "labels: " + Object.entries(v.labels).map(([k, n]) => `${k} ${n}`).join(", ") : null,
    },
    el("td", {}, v.variant), numCell(v.weight, v.weight ?? "–"), numCell(v.requests), numCell(v.errors),
    numCell(v.prompt_tokens), numCell(v.cached_tokens), numCell(v.completion_tokens), numCell(v.cost, fmtMicros(v.cost)),
    numCell(v.avg_latency_ms, fmtMs(v.avg_latency_ms)), numCell(v.avg_ttft_ms, fmtMs(v.avg_ttft_ms)),
    numCell(v.feedback), numCell(v.avg_score, v.avg_score === null || v.avg_score === undefined ? "–" : Number(v.avg_score).toFixed(2)))) :
      el("tr", {}, el("td", { class: "none", colspan: headers.length }, "No variants."))));
  box.replaceChildren(chart, el("div", { class: "table-wrap" }, table));
  if (items.length) drawHBars(chart, items, "campaign-bar", "variant");
}

// ---------------------------------------------------------------- wiring

function setAuto(on) {
  if (state.timer) { clearInterval(state.timer); state.timer = null; }
  if (on) state.timer = setInterval(() => { if (!document.hidden && state.token) refresh(); }, AUTO_MS);
  store.set("dashAuto", on ? "1" : "");
}

function init() {
  initTheme($("theme"));
  $("admin-token").value = state.token;
  for (const [id, name] of [["range", "dashRange"], ["dimension", "dashDim"], ["metric", "dashMetric"], ["campaign-metric", "dashCampaignMetric"]]) {
    const saved = store.get(name, "");
    if (saved && [...$(id).options].some((o) => o.value === saved)) $(id).value = saved;
    $(id).addEventListener("change", () => store.set(name, $(id).value));
  }
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.token = $("admin-token").value.trim();
    session.set(state.token);
    refresh();
  });
  $("refresh").addEventListener("click", refresh);
  $("range").addEventListener("change", refresh);
  $("dimension").addEventListener("change", refresh);
  $("metric").addEventListener("change", () => {
    // The top groups depend on the metric: fetch again (cheap) so the chart shows the right ones.
    refresh();
  });
  $("campaign").addEventListener("change", () => { store.set("dashCampaign", $("campaign").value); loadCampaignReport(state.generation); });
  $("campaign-metric").addEventListener("change", drawCampaign);
  $("auto").checked = store.get("dashAuto", "") === "1";
  $("auto").addEventListener("change", () => setAuto($("auto").checked));
  setAuto($("auto").checked);
  refresh();
}

init();
