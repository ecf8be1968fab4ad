// Shared helpers of parlance's web pages: storage, fetch with a bearer token and the API's error
// envelope, an SSE reader for streamed completions, number and money formatting, the theme
// toggle, copy buttons and a tiny DOM builder.

/** localStorage that never throws (private windows, disabled storage). */
export const store = {
  get(name, fallback = null) {
    try { const v = localStorage.getItem("parlance." + name); return v === null ? fallback : v; } catch { return fallback; }
  },
  set(name, value) {
    try {
      if (value === null || value === undefined || value === "") localStorage.removeItem("parlance." + name);
      else localStorage.setItem("parlance." + name, value);
    } catch { /* storage unavailable: the value lives for this page only */ }
  },
};

/** An error answer of the API: the envelope's fields plus the HTTP status. */
export class ApiError extends Error {
  constructor(message, { status = 0, type = null, code = null, param = null } = {}) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.type = type;
    this.code = code;
    this.param = param;
  }
}

/** Turns a failed Response into an ApiError, reading `{"error": {...}}` when the body has one. */
export async function errorFromResponse(res) {
  let text = "";
  try { text = await res.text(); } catch { /* body unreadable */ }
  let env = null;
  try { env = JSON.parse(text); } catch { /* not JSON */ }
  const e = env && typeof env === "object" ? env.error : null;
  if (e && typeof e === "object") {
    return new ApiError(e.message || `HTTP ${res.status}`, { status: res.status, type: e.type, code: e.code, param: e.param });
  }
  return new ApiError(text.trim().slice(0, 300) || `HTTP ${res.status} ${res.statusText}`, { status: res.status });
}

/** fetch with `Authorization: Bearer token` (when a token is given) and JSON in and out.
 *  Resolves to the parsed body; rejects with an ApiError for HTTP errors and network failures. */
export async function apiFetch(path, { token = "", method = "GET", body, signal, raw = false } = {}) {
  const headers = {};
  if (token) headers["Authorization"] = "Bearer " + token;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let res;
  try {
    res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), signal });
  } catch (err) {
    if (err && err.name === "AbortError") throw err;
    throw new ApiError("Network error: " + (err && err.message ? err.message : err), { status: 0 });
  }
  if (!res.ok) throw await errorFromResponse(res);
  if (raw) return res;
  return res.status === 204 ? null : res.json();
}

/** Reads a `text/event-stream` body and yields each event's `data` (a string; `[DONE]` included). */
export async function* readSSE(res, signal) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  let data = [];
  const onAbort = () => reader.cancel().catch(() => {});
  if (signal) signal.addEventListener("abort", onAbort, { once: true });
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (signal && signal.aborted) throw signal.reason || new DOMException("The stream was stopped.", "AbortError");
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buf.search(/\r\n|\r|\n/)) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + (buf[nl] === "\r" && buf[nl + 1] === "\n" ? 2 : 1));
        if (line === "") {
          if (data.length) { yield data.join("\n"); data = []; }
        } else if (line.startsWith("data:")) {
          data.push(line.slice(line[5] === " " ? 6 : 5));
        } // comments (":") and other fields (event, id, retry) are not used by the API
      }
    }
    buf += decoder.decode();
    if (buf.startsWith("data:")) data.push(buf.slice(buf[5] === " " ? 6 : 5));
    if (data.length) yield data.join("\n");
  } finally {
    if (signal) signal.removeEventListener("abort", onAbort);
    try { reader.releaseLock(); } catch { /* still reading: cancelled above */ }
  }
}

/** Cost of one request in micro-units: prompt tokens not cached at the prompt price, cached ones
 *  at the cached price, completion at the completion price, per million tokens, rounded up. */
export function costMicros(usage, pricing) {
  if (!usage || !pricing) return 0;
  const prompt = usage.prompt_tokens || 0;
  const cached = (usage.prompt_tokens_details && usage.prompt_tokens_details.cached_tokens) || 0;
  const completion = usage.completion_tokens || 0;
  const n = (prompt - cached) * (pricing.prompt || 0) + cached * (pricing.cached_prompt || 0) + completion * (pricing.completion || 0);
  return Math.ceil(n / 1e6);
}

/** Micro-units as currency units with six decimals, exactly (integer arithmetic): 123 → "0.000123". */
export function fmtMicros(micros) {
  if (micros === null || micros === undefined || Number.isNaN(Number(micros))) return "–";
  const n = Math.round(Number(micros));
  const sign = n < 0 ? "-" : "";
  const a = Math.abs(n);
  const whole = Math.floor(a / 1e6);
  return sign + whole.toLocaleString("en-US") + "." + String(a % 1e6).padStart(6, "0");
}

/** Integers with thousands separators. */
export function fmtInt(n) {
  if (n === null || n === undefined || Number.isNaN(Number(n))) return "–";
  return Math.round(Number(n)).toLocaleString("en-US");
}

/** Short numbers for chart axes: 1200 → 1.2k. */
export function fmtCompact(n) {
  const a = Math.abs(n);
  if (a >= 1e9) return +(n / 1e9).toFixed(1) + "G";
  if (a >= 1e6) return +(n / 1e6).toFixed(1) + "M";
  if (a >= 1e3) return +(n / 1e3).toFixed(1) + "k";
  return String(+n.toFixed(a < 1 && a > 0 ? 6 : 2));
}

/** Milliseconds: "850 ms", "2.41 s". */
export function fmtMs(ms) {
  if (ms === null || ms === undefined || Number.isNaN(Number(ms))) return "–";
  return ms < 1000 ? Math.round(ms) + " ms" : (ms / 1000).toFixed(2) + " s";
}

/** Unix seconds as local date and time. */
export function fmtTime(unix) {
  if (!unix) return "–";
  const d = new Date(unix * 1000);
  const p = (x) => String(x).padStart(2, "0");
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}

/** Builds an element: el("td", {class: "num", dataset: {value: 3}}, "3"). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "dataset") for (const [dk, dv] of Object.entries(v)) { if (dv !== null && dv !== undefined) node.dataset[dk] = String(dv); }
    else if (k.startsWith("on") && typeof v === "function") node.addEventListener(k.slice(2), v);
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

/** An error shown in place: the message, then the HTTP status and code. */
export function errorBanner(err, testid = "error") {
  const status = err && err.status ? `HTTP ${err.status}` : "";
  const code = err && err.code ? err.code : "";
  const meta = [status, code].filter(Boolean).join(" · ");
  return el("div", { class: "banner", role: "alert", dataset: { testid, status: err && err.status ? err.status : "" } },
    el("span", { class: "msg-text" }, (err && err.message) || String(err)),
    meta ? el("span", { class: "meta" }, meta) : null);
}

/** Copies text to the clipboard (falls back to a hidden textarea), and says so on the button. */
export async function copyText(text, button) {
  let ok = false;
  try {
    await navigator.clipboard.writeText(text);
    ok = true;
  } catch {
    const ta = el("textarea", { "aria-hidden": "true" });
    ta.value = text;
    ta.style.position = "fixed";
    ta.style.opacity = "0";
    document.body.append(ta);
    ta.select();
    try { ok = document.execCommand("copy"); } catch { ok = false; }
    ta.remove();
  }
  if (button) {
    const old = button.dataset.label || button.textContent;
    button.dataset.label = old;
    button.textContent = ok ? "Copied" : "Copy failed";
    setTimeout(() => { button.textContent = old; }, 1200);
  }
  return ok;
}

/** The theme toggle: follows the system until clicked, then remembers light or dark. */
export function initTheme(button) {
  const root = document.documentElement;
  const saved = store.get("theme");
  if (saved === "light" || saved === "dark") root.dataset.theme = saved;
  const effective = () => root.dataset.theme || (matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light");
  const label = () => {
    if (!button) return;
    const dark = effective() === "dark";
    button.textContent = dark ? "☀" : "☾";
    button.title = dark ? "Switch to the light theme" : "Switch to the dark theme";
    button.setAttribute("aria-label", button.title);
  };
  label();
  if (button) {
    button.addEventListener("click", () => {
      const next = effective() === "dark" ? "light" : "dark";
      root.dataset.theme = next;
      store.set("theme", next);
      label();
    });
  }
  matchMedia("(prefers-color-scheme: dark)").addEventListener("change", label);
}

/** UTC bucket labels as the usage API writes them. */
export function bucketLabel(unix, unit) {
  const d = new Date(unix * 1000);
  const p = (x) => String(x).padStart(2, "0");
  const day = `${d.getUTCFullYear()}-${p(d.getUTCMonth() + 1)}-${p(d.getUTCDate())}`;
  if (unit === "day") return day;
  if (unit === "hour") return `${day}T${p(d.getUTCHours())}:00Z`;
  return `${day}T${p(d.getUTCHours())}:${p(d.getUTCMinutes())}Z`;
}
