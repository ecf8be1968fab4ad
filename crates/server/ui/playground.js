// The chat playground: loads the model catalog with the visitor's API key, sends the conversation
// to /v1/chat/completions as a stream (parsed from fetch's ReadableStream), renders the answer as it
// arrives, and shows each turn's tokens, time to first token, speed and cost.

import {
  store, ApiError, apiFetch, errorFromResponse, readSSE, costMicros, fmtMicros, fmtInt, fmtMs, el,
  errorBanner, copyText, initTheme,
} from "/ui/common.js";

const $ = (id) => document.getElementById(id);

const DEFAULT_SCHEMA = JSON.stringify({
  type: "object",
  properties: { answer: { type: "string" } },
  required: ["answer"],
}, null, 2);

const DEFAULT_TOOLS = JSON.stringify([{
  name: "get_weather",
  description: "Current weather in a city",
  parameters: {
    type: "object",
    properties: { city: { type: "string", description: "City name" } },
    required: ["city"],
    additionalProperties: false,
  },
}], null, 2);

/** Inputs whose values are remembered between visits (by element id). */
const REMEMBERED = ["model", "system", "temperature", "top_p", "max_completion_tokens", "seed", "stop",
  "presence_penalty", "frequency_penalty", "schema", "tools", "tool_choice"];

const state = {
  key: store.get("apiKey", ""),
  catalog: new Map(),      // model id → catalog entry (with pricing)
  history: [],             // the `messages` sent with every turn (the system prompt is added on send)
  pendingTools: [],        // tool calls of the last answer still waiting for a result
  controller: null,        // AbortController of the turn in flight
};

class ParamError extends Error {
  constructor(message, field) { super(message); this.field = field; }
}

// ---------------------------------------------------------------- settings

function mode() {
  return document.querySelector('input[name="mode"]:checked').value;
}

function showMode() {
  const m = mode();
  $("schema-box").hidden = m !== "json_schema";
  $("object-box").hidden = m !== "json_object";
  $("tools-box").hidden = m !== "tools";
  clearEditorError();
}

function saveSettings() {
  const s = { mode: mode() };
  for (const id of REMEMBERED) s[id] = $(id).value;
  store.set("playground", JSON.stringify(s));
}

function restoreSettings() {
  let s = {};
  try { s = JSON.parse(store.get("playground", "{}")) || {}; } catch { s = {}; }
  for (const id of REMEMBERED) if (typeof s[id] === "string" && id !== "model") $(id).value = s[id];
  if (!$("schema").value.trim()) $("schema").value = DEFAULT_SCHEMA;
  if (!$("tools").value.trim()) $("tools").value = DEFAULT_TOOLS;
  const radio = document.querySelector(`input[name="mode"][value="${s.mode}"]`);
  if (radio) radio.checked = true;
  showMode();
  return s.model || "";
}

function resetSettings() {
  for (const id of REMEMBERED) if (id !== "model" && id !== "tool_choice") $(id).value = "";
  $("schema").value = DEFAULT_SCHEMA;
  $("tools").value = DEFAULT_TOOLS;
  $("tool_choice").value = "auto";
  document.querySelector('input[name="mode"][value="plain"]').checked = true;
  showMode();
  saveSettings();
}

function showEditorError(message, field) {
  const box = $("editor-error");
  box.textContent = message;
  box.hidden = false;
  for (const t of document.querySelectorAll("[aria-invalid]")) t.removeAttribute("aria-invalid");
  if (field) {
    field.setAttribute("aria-invalid", "true");
    field.focus();
  }
}

function clearEditorError() {
  $("editor-error").hidden = true;
  $("editor-error").textContent = "";
  for (const t of document.querySelectorAll("[aria-invalid]")) t.removeAttribute("aria-invalid");
}

/** A number field: undefined when empty, else a finite number (a whole one if `int`). */
function numberField(id, label, int = false) {
  const field = $(id);
  const raw = field.value.trim();
  if (raw === "") return undefined;
  const n = Number(raw);
  if (!Number.isFinite(n) || (int && !Number.isInteger(n))) {
    throw new ParamError(`${label} must be ${int ? "a whole number" : "a number"}.`, field);
  }
  return n;
}

function parseJSONField(id, label) {
  const field = $(id);
  try {
    return JSON.parse(field.value);
  } catch (e) {
    throw new ParamError(`${label} is not valid JSON: ${e.message}`, field);
  }
}

/** Everything of the request except the messages, read and checked from the settings panel.
 *  Throws a ParamError (shown inline, nothing sent) for a bad value. */
function requestParams() {
  const model = $("model").value;
  if (!model) throw new ParamError("No model selected: enter an API key that can list the models.", $("api-key"));
  const p = { model };
  const numbers = [["temperature", "Temperature"], ["top_p", "Top p"], ["presence_penalty", "Presence penalty"],
    ["frequency_penalty", "Frequency penalty"]];
  for (const [id, label] of numbers) {
    const v = numberField(id, label);
    if (v !== undefined) p[id] = v;
  }
  const max = numberField("max_completion_tokens", "Max tokens", true);
  if (max !== undefined) p.max_completion_tokens = max;
  const seed = numberField("seed", "Seed", true);
  if (seed !== undefined) p.seed = seed;
  const stops = $("stop").value.split("\n").map((s) => s.replace(/\\n/g, "\n")).filter((s) => s !== "");
  if (stops.length > 4) throw new ParamError("At most 4 stop sequences.", $("stop"));
  if (stops.length) p.stop = stops;

  const m = mode();
  if (m === "json_schema") {
    const schema = parseJSONField("schema", "The JSON schema");
    if (!schema || typeof schema !== "object" || Array.isArray(schema)) {
      throw new ParamError("The JSON schema must be a JSON object.", $("schema"));
    }
    p.response_format = { type: "json_schema", json_schema: { name: "answer", schema, strict: true } };
  } else if (m === "json_object") {
    p.response_format = { type: "json_object" };
  } else if (m === "tools") {
    const list = parseJSONField("tools", "The tools");
    if (!Array.isArray(list) || list.length === 0) {
      throw new ParamError("The tools must be a non-empty JSON array of functions.", $("tools"));
    }
    p.tools = list.map((t, i) => {
      const f = t && t.type === "function" && t.function ? t.function : t;
      if (!f || typeof f !== "object" || typeof f.name !== "string" || !f.name) {
        throw new ParamError(`Tool ${i + 1} needs a "name" (a string).`, $("tools"));
      }
      const fn = { name: f.name };
      if (f.description !== undefined) fn.description = f.description;
      if (f.parameters !== undefined) fn.parameters = f.parameters;
      return { type: "function", function: fn };
    });
    p.tool_choice = $("tool_choice").value;
  }
  return p;
}

// ---------------------------------------------------------------- catalog and key

function setKeyStatus(node) {
  $("key-status").replaceChildren(...(node ? [node] : []));
}

async function loadModels(preferred) {
  const select = $("model");
  const keep = preferred || select.value;
  try {
    const list = await apiFetch("/v1/models", { token: state.key });
    state.catalog = new Map((list.data || []).map((m) => [m.id, m]));
    select.replaceChildren(...[...state.catalog.keys()].map((id) => el("option", { value: id }, id)));
    if (keep && state.catalog.has(keep)) select.value = keep;
    setKeyStatus(null);
    showModelInfo();
  } catch (err) {
    state.catalog = new Map();
    select.replaceChildren();
    showModelInfo();
    if (err.status === 401 && !state.key) {
      setKeyStatus(el("div", { class: "hint", dataset: { testid: "key-needed" } }, "Enter your API key (top right) to load the models."));
      return;
    }
    const e = errorBanner(err, "key-error");
    if (err.status === 401) e.prepend(el("strong", {}, "This API key was refused. "));
    setKeyStatus(e);
  }
}

function showModelInfo() {
  const m = state.catalog.get($("model").value);
  const info = $("model-info");
  if (!m) { info.textContent = ""; return; }
  const parts = [];
  if (m.context_length) parts.push(`context ${fmtInt(m.context_length)} tokens`);
  const pr = m.pricing;
  if (pr && (pr.prompt || pr.cached_prompt || pr.completion)) {
    parts.push(`per 1M tokens: prompt ${fmtMicros(pr.prompt)}, cached ${fmtMicros(pr.cached_prompt)}, completion ${fmtMicros(pr.completion)}`);
  } else {
    parts.push("free");
  }
  info.textContent = parts.join(" · ");
}

// ---------------------------------------------------------------- conversation view

function scrolledToBottom() {
  const box = $("messages");
  return box.scrollHeight - box.scrollTop - box.clientHeight < 80;
}

function scrollToBottom() {
  const box = $("messages");
  box.scrollTop = box.scrollHeight;
}

function addMessage(node) {
  $("empty").hidden = true;
  $("messages").append(node);
  scrollToBottom();
  return node;
}

function copyButton(getText) {
  const b = el("button", { type: "button", class: "icon", dataset: { testid: "copy" }, title: "Copy to the clipboard" }, "Copy");
  b.addEventListener("click", () => copyText(getText(), b));
  return b;
}

function userBubble(text, role = "user", title = "You") {
  const body = el("div", { class: "body", dataset: { testid: "msg-content" } }, text);
  return el("div", { class: `msg ${role}`, dataset: { testid: `msg-${role}` } },
    el("div", { class: "who" }, title, el("span", { class: "actions" }, copyButton(() => body.textContent))),
    body);
}

function formatToolCalls(calls) {
  return calls.map((c) => {
    let args = c.function.arguments;
    try { args = JSON.stringify(JSON.parse(args), null, 2); } catch { /* shown as it came */ }
    return `${c.function.name}(${args})\n  id: ${c.id}`;
  }).join("\n\n");
}

/** The assistant's bubble for one turn, with setters the stream calls. */
function assistantBubble(model) {
  const text = document.createTextNode("");
  const body = el("div", { class: "body", dataset: { testid: "msg-content" } }, text);
  const reasoningText = document.createTextNode("");
  const reasoning = el("details", { class: "reasoning", hidden: true, dataset: { testid: "reasoning" } },
    el("summary", {}, "Reasoning"), el("pre", {}, reasoningText));
  const tools = el("pre", { class: "toolcalls", hidden: true, dataset: { testid: "tool-calls" } });
  const stats = el("div", { class: "stats", dataset: { testid: "turn-stats" } });
  const extra = el("div");
  let toolCalls = [];
  const copy = copyButton(() => text.data || formatToolCalls(toolCalls));
  const node = el("div", { class: "msg assistant", dataset: { testid: "msg-assistant", state: "streaming" } },
    el("div", { class: "who" }, `Assistant · ${model}`, el("span", { class: "actions" }, copy)),
    reasoning, body, tools, extra, stats);
  return {
    node,
    appendContent(s) { text.appendData(s); },
    appendReasoning(s) { reasoning.hidden = false; reasoningText.appendData(s); },
    setToolCalls(calls) {
      toolCalls = calls;
      tools.hidden = calls.length === 0;
      tools.textContent = formatToolCalls(calls);
      tools.dataset.count = String(calls.length);
      if (calls.length) tools.dataset.calls = JSON.stringify(calls);
    },
    content() { return text.data; },
    setState(s) { node.dataset.state = s; },
    hideEmptyBody() { if (!text.data) body.hidden = true; },
    addExtra(child) { extra.append(child); },
    stats,
  };
}

function stat(testid, label, shown, value, title) {
  return el("span", { dataset: { testid, value }, title }, `${label} `, el("b", {}, shown));
}

function renderStats(bubble, t) {
  const s = bubble.stats;
  const u = t.usage;
  const d = s.dataset;
  d.ttftMs = t.ttft === null ? "" : String(Math.round(t.ttft));
  d.totalMs = String(Math.round(t.total));
  d.finishReason = t.finish || "";
  const parts = [];
  if (u) {
    const cached = (u.prompt_tokens_details && u.prompt_tokens_details.cached_tokens) || 0;
    d.promptTokens = u.prompt_tokens;
    d.cachedTokens = cached;
    d.completionTokens = u.completion_tokens;
    d.costMicros = t.cost;
    parts.push(stat("stat-prompt", "prompt", fmtInt(u.prompt_tokens), u.prompt_tokens));
    parts.push(stat("stat-cached", "cached", fmtInt(cached), cached));
    parts.push(stat("stat-completion", "completion", fmtInt(u.completion_tokens), u.completion_tokens));
  }
  parts.push(stat("stat-ttft", "TTFT", fmtMs(t.ttft), d.ttftMs, "time to the first token, measured in this browser"));
  parts.push(stat("stat-total", "total", fmtMs(t.total), d.totalMs));
  if (u && u.completion_tokens > 0) {
    // Speed of generation after the first token; an answer that came in one piece (a tool call
    // is sent whole) is measured over the whole request.
    const streamed = t.ttft !== null && t.total - t.ttft >= 50 && u.completion_tokens > 1;
    const gen = streamed
      ? (u.completion_tokens - 1) / ((t.total - t.ttft) / 1000)
      : u.completion_tokens / (t.total / 1000);
    d.tokensPerSecond = gen.toFixed(1);
    parts.push(stat("stat-speed", "", `${gen.toFixed(1)} tok/s`, d.tokensPerSecond,
      streamed ? "completion tokens per second after the first" : "completion tokens per second of the whole request"));
  }
  if (u) parts.push(stat("stat-cost", "cost", t.priced ? fmtMicros(t.cost) : "free", t.cost, "micro-units rounded up, as billed"));
  if (t.finish) parts.push(stat("stat-finish", "finish", t.finish, t.finish));
  if (!u && t.stopped) parts.push(el("span", { class: "note" }, "stopped: the server reports no usage for a stopped stream"));
  s.replaceChildren(...parts);
}

// ---------------------------------------------------------------- a turn

function setBusy(busy, focus = true) {
  $("send").hidden = busy;
  $("stop-btn").hidden = !busy;
  document.body.dataset.busy = busy ? "true" : "false";
  if (!busy && focus) $("input").focus();
}

function updateComposerHint() {
  const input = $("input");
  const hint = $("composer-hint");
  const next = state.pendingTools[0];
  if (next) {
    input.placeholder = `Result of ${next.function.name} (${next.id})…`;
    hint.replaceChildren(`Answer the tool call: your text is sent as its result (${state.pendingTools.length} waiting). `,
      el("button", { type: "button", class: "icon", dataset: { testid: "skip-tools" }, onclick: skipTools }, "Skip"));
  } else {
    input.placeholder = "Send a message…";
    hint.textContent = "Enter to send · Shift+Enter for a new line · Esc to stop";
  }
}

function skipTools() {
  for (const call of state.pendingTools) {
    state.history.push({ role: "tool", tool_call_id: call.id, content: "(no result)" });
  }
  state.pendingTools = [];
  updateComposerHint();
}

async function submit() {
  if (state.controller) return;
  const input = $("input");
  const text = input.value;
  if (!text.trim()) return;
  let params;
  try {
    params = requestParams();
  } catch (err) {
    if (err instanceof ParamError) { showEditorError(err.message, err.field); return; }
    throw err;
  }
  clearEditorError();
  const snapshot = { history: state.history.length, pending: state.pendingTools.slice() };
  input.value = "";
  autosize();
  let bubble;
  if (state.pendingTools.length) {
    const call = state.pendingTools.shift();
    state.history.push({ role: "tool", tool_call_id: call.id, content: text });
    bubble = addMessage(userBubble(text, "tool", `Tool result · ${call.function.name}`));
    updateComposerHint();
    if (state.pendingTools.length) return; // wait for the other results
  } else {
    state.history.push({ role: "user", content: text });
    bubble = addMessage(userBubble(text));
  }
  await runTurn(params, () => {
    // The request failed: its messages are not part of the conversation.
    state.history.length = snapshot.history;
    state.pendingTools = snapshot.pending;
    updateComposerHint();
    bubble.classList.add("unsent");
    bubble.append(el("div", { class: "note" }, "Not sent: not kept in the conversation."));
    if (!input.value) { input.value = text; autosize(); }
  });
}

async function runTurn(params, onFailure) {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.history);
  const body = { ...params, messages, stream: true, stream_options: { include_usage: true } };
  const model = state.catalog.get(params.model);
  const pricing = model && model.pricing;
  const priced = !!(pricing && (pricing.prompt || pricing.cached_prompt || pricing.completion));

  const bubble = assistantBubble(params.model);
  addMessage(bubble.node);
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);

  const t0 = performance.now();
  const t = { ttft: null, total: 0, usage: null, finish: null, cost: 0, priced, stopped: false };
  const calls = [];
  const headers = { "Content-Type": "application/json", Accept: "text/event-stream" };
  if (state.key) headers.Authorization = "Bearer " + state.key;
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST", headers, body: JSON.stringify(body), signal: controller.signal,
    });
    if (!res.ok) throw await errorFromResponse(res);
    let finished = false;
    for await (const data of readSSE(res, controller.signal)) {
      if (data === "[DONE]") { finished = true; break; }
      let chunk;
      try { chunk = JSON.parse(data); } catch { continue; }
      if (chunk.error) {
        const e = chunk.error;
        throw new ApiError(e.message || "The stream failed.", { status: res.status, type: e.type, code: e.code, param: e.param });
      }
      if (chunk.usage) t.usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      const d = choice.delta || {};
      const follow = scrolledToBottom();
      let got = false;
      if (d.reasoning_content) { bubble.appendReasoning(d.reasoning_content); got = true; }
      if (d.content) { bubble.appendContent(d.content); got = true; }
      if (Array.isArray(d.tool_calls) && d.tool_calls.length) {
        for (const frag of d.tool_calls) {
          const i = frag.index ?? calls.length;
          const c = calls[i] || (calls[i] = { id: "", type: "function", function: { name: "", arguments: "" } });
          if (frag.id) c.id = frag.id;
          if (frag.type) c.type = frag.type;
          if (frag.function) {
            if (frag.function.name) c.function.name += frag.function.name;
            if (frag.function.arguments) c.function.arguments += frag.function.arguments;
          }
        }
        bubble.setToolCalls(calls.filter(Boolean));
        got = true;
      }
      if (got && t.ttft === null) t.ttft = performance.now() - t0;
      if (choice.finish_reason) t.finish = choice.finish_reason;
      if (follow) scrollToBottom();
    }
    if (!finished) throw new ApiError("The connection closed before the answer was complete.", { status: res.status });
    t.total = performance.now() - t0;
    t.cost = costMicros(t.usage, pricing);
    bubble.setState("done");
  } catch (err) {
    t.total = performance.now() - t0;
    if (controller.signal.aborted) {
      t.stopped = true;
      bubble.setState("stopped");
      bubble.addExtra(el("div", { class: "note", dataset: { testid: "stopped" } }, "Stopped."));
    } else {
      bubble.setState("error");
      const apiErr = err instanceof ApiError ? err : new ApiError(String(err && err.message ? err.message : err));
      bubble.addExtra(el("div", { class: "error" }, errorBanner(apiErr, "turn-error")));
      bubble.hideEmptyBody();
      state.controller = null;
      setBusy(false);
      onFailure();
      return;
    }
  }
  bubble.hideEmptyBody();
  renderStats(bubble, t);

  // What the model said joins the conversation (a stopped answer too, as far as it went).
  const content = bubble.content();
  const toolCalls = calls.filter(Boolean);
  if (content || toolCalls.length) {
    const msg = { role: "assistant", content: content || null };
    if (toolCalls.length) msg.tool_calls = toolCalls;
    state.history.push(msg);
  }
  state.pendingTools = t.stopped ? [] : toolCalls.slice();
  if (t.stopped && toolCalls.length) {
    // A stopped tool call has no results to wait for: leave it out of the history.
    state.history.pop();
    if (content) state.history.push({ role: "assistant", content });
  }
  updateComposerHint();
  state.controller = null;
  setBusy(false);
}

function stop() {
  if (state.controller) state.controller.abort();
}

function newChat() {
  stop();
  state.history = [];
  state.pendingTools = [];
  for (const n of [...$("messages").children]) if (n.id !== "empty") n.remove();
  $("empty").hidden = false;
  updateComposerHint();
  $("input").focus();
}

function autosize() {
  const input = $("input");
  input.style.height = "auto";
  input.style.height = Math.min(input.scrollHeight + 2, 240) + "px";
}

// ---------------------------------------------------------------- wiring

function init() {
  initTheme($("theme"));
  $("api-key").value = state.key;
  const preferredModel = restoreSettings();
  updateComposerHint();

  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.key = $("api-key").value.trim();
    store.set("apiKey", state.key);
    loadModels();
    $("input").focus();
  });
  $("model").addEventListener("change", () => { showModelInfo(); saveSettings(); });
  for (const id of REMEMBERED) $(id).addEventListener("change", saveSettings);
  for (const id of ["schema", "tools"]) $(id).addEventListener("input", clearEditorError);
  for (const r of document.querySelectorAll('input[name="mode"]')) {
    r.addEventListener("change", () => { showMode(); saveSettings(); });
  }
  $("reset-params").addEventListener("click", resetSettings);
  $("settings-toggle").addEventListener("click", () => {
    const open = $("settings").classList.toggle("open");
    $("settings-toggle").textContent = open ? "Hide" : "Show";
    $("settings-toggle").setAttribute("aria-expanded", String(open));
  });

  $("composer").addEventListener("submit", (e) => { e.preventDefault(); submit(); });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      submit();
    } else if (e.key === "Escape" && state.controller) {
      e.preventDefault();
      stop();
    }
  });
  $("input").addEventListener("input", autosize);
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && state.controller) stop();
  });
  $("stop-btn").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);

  setBusy(false, false);
  loadModels(preferredModel).then(() => { document.body.dataset.ready = "true"; });
}

init();
