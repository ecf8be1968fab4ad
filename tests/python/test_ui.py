"""The web pages (the chat playground at /ui/ and the operator dashboard at /ui/dashboard) in a
real browser: Python Playwright driving the system's Chromium (headless; `PARLANCE_CHROMIUM`, else
/usr/bin/chromium; `scripts/bootstrap.sh` installs Debian's `chromium`) against the real binary.

Two servers of their own, each with a priced model, a static API key and an admin token: one for
the playground tests, and one that only the dashboard tests send traffic to, so that what the
dashboard shows can be checked against exactly the requests sent. A screenshot of each state is
saved under target/ui-screenshots/."""

import json
import math
import os
import re
import tempfile
import time
from datetime import datetime, timezone

import httpx
import jsonschema
import pytest

from conftest import ROOT, _binary, _env, _model_path, _start_parlance

KEY = "sk-ui-test"
ADMIN = "adm-ui-test"
MODEL = "smollm2"
PRICE = {"prompt": 150000, "cached_prompt": 75000, "completion": 600000}
SHOTS = ROOT / "target" / "ui-screenshots"
TURN_TIMEOUT_MS = 180_000


# ---------------------------------------------------------------- servers and browser

def _serve(prefix):
    work = tempfile.mkdtemp(prefix=prefix)
    cfg = os.path.join(work, "parlance.toml")
    with open(cfg, "w") as f:
        f.write(f"""
api_keys = ["{KEY}"]
admin_token = "{ADMIN}"

[[models]]
name = "{MODEL}"
path = "{_model_path()}"
price = {{ prompt = {PRICE['prompt']}, cached_prompt = {PRICE['cached_prompt']}, completion = {PRICE['completion']} }}
""")
    # The pages embedded in the binary, or those in $PARLANCE_UI_DIR when set (to test edits
    # without rebuilding: PARLANCE_UI_DIR=crates/server/ui).
    env = _env(work)
    return _start_parlance([_binary(), "serve", "--addr", "127.0.0.1:0", "--exit-on-stdin-eof",
                            "--config", cfg], env)


@pytest.fixture(scope="module")
def ui_server():
    proc, base = _serve("parlance-ui-")
    yield base
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def dash_server():
    proc, base = _serve("parlance-dash-")
    yield base
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    path = os.environ.get("PARLANCE_CHROMIUM", "/usr/bin/chromium")
    if not os.path.exists(path):
        pytest.fail(f"Chromium is missing at {path}: install Debian's `chromium` (scripts/bootstrap.sh "
                    f"does) or point PARLANCE_CHROMIUM at a Chromium binary", pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Python Playwright is missing: pip install -r tests/python/requirements.txt",
                    pytrace=False)
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, headless=True)
        yield b
        b.close()


@pytest.fixture()
def page(browser):
    """A fresh browser context per test (empty storage); uncaught page errors fail the test, and
    every request must stay on the server (the pages work offline)."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 860}, color_scheme="light",
                              permissions=["clipboard-read", "clipboard-write"])
    pg = ctx.new_page()
    pg.set_default_timeout(30_000)
    errors, urls = [], []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("request", lambda r: urls.append(r.url))
    pg.requests_seen = urls
    yield pg
    ctx.close()
    assert not errors, f"errors in the page: {errors}"
    foreign = [u for u in urls if not u.startswith("http://127.0.0.1:")]
    assert not foreign, f"the page fetched from elsewhere: {foreign}"


def shot(pg, name):
    pg.screenshot(path=str(SHOTS / name), full_page=True)


def admin_get(base, path, **params):
    r = httpx.get(base + path, params=params, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
    r.raise_for_status()
    return r.json()


def admin_post(base, path, body):
    r = httpx.post(base + path, json=body, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
    assert r.status_code in (200, 201), r.text
    return r.json()


def wait_for(check, what, timeout=30.0):
    deadline = time.time() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def cost_of(usage):
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    n = ((usage["prompt_tokens"] - cached) * PRICE["prompt"] + cached * PRICE["cached_prompt"]
         + usage["completion_tokens"] * PRICE["completion"])
    return math.ceil(n / 1e6)


def fmt_units(micros):
    return f"{micros // 1_000_000:,}.{micros % 1_000_000:06d}"


# ---------------------------------------------------------------- playground helpers

def open_playground(pg, base, path="/"):
    pg.goto(base + path)
    pg.get_by_test_id("api-key").fill(KEY)
    pg.get_by_test_id("save-key").click()
    pg.wait_for_selector(f'[data-testid="model"] option[value="{MODEL}"]', state="attached")


def set_params(pg, **params):
    ids = {"temperature": "temperature", "max_tokens": "max-tokens", "seed": "seed", "top_p": "top-p"}
    for name, value in params.items():
        pg.get_by_test_id(ids[name]).fill("" if value is None else str(value))


def chat_posts(pg):
    return [u for u in pg.requests_seen if u.endswith("/v1/chat/completions")]


def capture_bodies(pg):
    """The JSON bodies the page posts to /v1/chat/completions, in order."""
    bodies = []
    pg.on("request", lambda r: bodies.append(json.loads(r.post_data))
          if r.url.endswith("/v1/chat/completions") and r.method == "POST" else None)
    return bodies


def send(pg, text):
    box = pg.get_by_test_id("composer")
    box.fill(text)
    box.press("Enter")


def wait_turn(pg, n):
    """Waits for the n-th assistant turn to end (done, stopped or error) and returns its state."""
    pg.wait_for_function(
        """n => { const m = document.querySelectorAll('[data-testid="msg-assistant"]');
                  return m.length >= n && m[n - 1].dataset.state !== 'streaming'; }""",
        arg=n, timeout=TURN_TIMEOUT_MS)
    return turn(pg, n)


def turn(pg, n):
    return pg.evaluate(
        """n => { const m = document.querySelectorAll('[data-testid="msg-assistant"]')[n - 1];
                  const s = m.querySelector('[data-testid="turn-stats"]');
                  const t = m.querySelector('[data-testid="tool-calls"]');
                  const e = m.querySelector('[data-testid="turn-error"]');
                  return { state: m.dataset.state, content: m.querySelector('[data-testid="msg-content"]').textContent,
                           stats: { ...s.dataset }, statsText: s.innerText,
                           cost: (s.querySelector('[data-testid="stat-cost"] b') || {}).textContent || null,
                           toolCalls: t.dataset.calls ? JSON.parse(t.dataset.calls) : [],
                           error: e ? { text: e.innerText, status: e.dataset.status } : null }; }""", n)


def record_lengths(pg):
    """Records the last answer's text length at every DOM change while it streams."""
    pg.evaluate("""() => {
        window.__lengths = [];
        new MutationObserver(() => {
            const all = document.querySelectorAll('[data-testid="msg-assistant"]');
            const m = all[all.length - 1];
            if (m && m.dataset.state === 'streaming')
                window.__lengths.push(m.querySelector('[data-testid="msg-content"]').textContent.length);
        }).observe(document.getElementById('messages'),
                   { subtree: true, childList: true, characterData: true, attributes: true });
    }""")


def ready(pg):
    """The composer is ready for the next message: Send shown, Stop hidden."""
    return pg.get_by_test_id("send").is_visible() and not pg.get_by_test_id("stop").is_visible()


# ---------------------------------------------------------------- playground tests

def test_playground_streams_answer_with_usage_and_cost(ui_server, page):
    pg = page
    bodies = capture_bodies(pg)
    open_playground(pg, ui_server, "/")  # `/` redirects to the playground
    assert pg.url == ui_server + "/ui/"
    set_params(pg, temperature=0, max_tokens=24)
    record_lengths(pg)
    send(pg, "Hi! Who are you?")
    t = wait_turn(pg, 1)
    assert t["state"] == "done", t
    assert t["content"].strip()
    lengths = pg.evaluate("window.__lengths")
    distinct = sorted({n for n in lengths if n > 0})
    assert len(distinct) >= 2, f"the answer did not arrive in pieces: {lengths}"
    assert max(distinct) <= len(t["content"].encode("utf-16-le")) // 2  # JavaScript's length

    s = t["stats"]
    prompt, cached, completion = int(s["promptTokens"]), int(s["cachedTokens"]), int(s["completionTokens"])
    assert prompt > 0 and 0 < completion <= 24 and 0 <= cached <= prompt
    assert 0 <= int(s["ttftMs"]) <= int(s["totalMs"])
    usage = {"prompt_tokens": prompt, "completion_tokens": completion,
             "prompt_tokens_details": {"cached_tokens": cached}}
    assert int(s["costMicros"]) == cost_of(usage)
    assert t["cost"] == fmt_units(cost_of(usage))
    assert "TTFT" in t["statsText"] and "tok/s" in t["statsText"]

    # What was sent: the parameters, a stream with usage, and the user's message.
    b = bodies[0]
    assert b["model"] == MODEL and b["stream"] is True and b["stream_options"] == {"include_usage": True}
    assert b["temperature"] == 0 and b["max_completion_tokens"] == 24
    assert b["messages"] == [{"role": "user", "content": "Hi! Who are you?"}]

    # The server billed what the page shows.
    rec = wait_for(lambda: (admin_get(ui_server, "/admin/requests", limit=1)["data"] or [None])[0],
                   "the usage record")
    assert (rec["prompt_tokens"], rec["cached_tokens"], rec["completion_tokens"]) == (prompt, cached, completion)
    assert rec["cost"] == int(s["costMicros"])
    shot(pg, "playground-answer.png")

    # Copy button: the answer's text goes to the clipboard.
    answer = pg.get_by_test_id("msg-assistant").first
    answer.hover()
    answer.get_by_test_id("copy").click()
    assert pg.evaluate("navigator.clipboard.readText()") == t["content"]

    # The next turn carries the conversation.
    send(pg, "Thank you.")
    t2 = wait_turn(pg, 2)
    assert t2["state"] == "done"
    assert [m["role"] for m in bodies[1]["messages"]] == ["user", "assistant", "user"]
    assert bodies[1]["messages"][1]["content"] == t["content"]
    assert int(t2["stats"]["promptTokens"]) > prompt + completion

    # The theme toggle switches to dark (the browser prefers light here) and is remembered.
    pg.get_by_test_id("theme-toggle").click()
    assert pg.evaluate("document.documentElement.dataset.theme") == "dark"
    assert pg.evaluate("getComputedStyle(document.body).backgroundColor") != "rgb(247, 247, 248)"
    shot(pg, "playground-dark.png")

    # New chat: an empty conversation again.
    pg.get_by_test_id("new-chat").click()
    assert pg.get_by_test_id("msg-assistant").count() == 0
    send(pg, "Hi")
    wait_turn(pg, 1)
    assert bodies[2]["messages"] == [{"role": "user", "content": "Hi"}]


def test_playground_parameters_take_effect(ui_server, page):
    pg = page
    bodies = capture_bodies(pg)
    open_playground(pg, ui_server, "/ui/")
    set_params(pg, temperature=0, max_tokens=3)
    send(pg, "Tell me a long story about the sea.")
    t = wait_turn(pg, 1)
    assert t["state"] == "done"
    assert int(t["stats"]["completionTokens"]) <= 3
    assert t["stats"]["finishReason"] == "length"
    assert bodies[0]["max_completion_tokens"] == 3
    shot(pg, "playground-max-tokens.png")

    # Sampling with a seed: the same seed gives the same answer in two fresh chats.
    answers = []
    for _ in range(2):
        pg.get_by_test_id("new-chat").click()
        set_params(pg, temperature=1.0, seed=42, max_tokens=20)
        send(pg, "Tell me a fun fact.")
        t = wait_turn(pg, 1)
        assert t["state"] == "done"
        answers.append(t["content"])
    assert bodies[-1]["seed"] == 42 and bodies[-1]["temperature"] == 1.0
    assert answers[0] == answers[1] and answers[0]


def test_playground_api_error_is_shown_and_not_kept(ui_server, page):
    pg = page
    bodies = capture_bodies(pg)
    open_playground(pg, ui_server)
    set_params(pg, max_tokens=100000)  # beyond the model's context: 400
    send(pg, "Hello there")
    t = wait_turn(pg, 1)
    assert t["state"] == "error"
    assert t["error"]["status"] == "400"
    assert "HTTP 400" in t["error"]["text"] and "context length" in t["error"]["text"]
    assert pg.get_by_test_id("composer").input_value() == "Hello there"  # given back to edit
    shot(pg, "playground-error.png")
    # The failed message is not part of the next request.
    set_params(pg, max_tokens=5)
    pg.get_by_test_id("composer").press("Enter")
    t = wait_turn(pg, 2)
    assert t["state"] == "done"
    assert bodies[-1]["messages"] == [{"role": "user", "content": "Hello there"}]


def test_playground_json_schema_mode(ui_server, page):
    pg = page
    bodies = capture_bodies(pg)
    open_playground(pg, ui_server)
    set_params(pg, temperature=0, max_tokens=200)
    pg.get_by_test_id("mode-json-schema").check(force=True)
    schema = json.loads(pg.get_by_test_id("schema").input_value())
    send(pg, "What is the capital of France?")
    t = wait_turn(pg, 1)
    assert t["state"] == "done", t
    answer = json.loads(t["content"])
    jsonschema.validate(answer, schema)
    assert bodies[0]["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "answer", "schema": schema, "strict": True}}
    shot(pg, "playground-json-schema.png")

    # A schema that is not JSON: an inline error, and nothing is sent.
    pg.get_by_test_id("schema").fill('{"type": "object", "properties": ')
    posts = len(chat_posts(pg))
    send(pg, "And of Italy?")
    err = pg.get_by_test_id("editor-error")
    err.wait_for(state="visible")
    assert "not valid JSON" in err.inner_text()
    pg.wait_for_timeout(300)
    assert len(chat_posts(pg)) == posts
    assert pg.get_by_test_id("msg-user").count() == 1
    assert pg.get_by_test_id("composer").input_value() == "And of Italy?"
    err.scroll_into_view_if_needed()
    shot(pg, "playground-schema-error.png")


def test_playground_tools_mode(ui_server, page):
    pg = page
    bodies = capture_bodies(pg)
    open_playground(pg, ui_server)
    set_params(pg, temperature=0, max_tokens=300)
    pg.get_by_test_id("mode-tools").check(force=True)
    pg.get_by_test_id("tool-choice").select_option("required")
    send(pg, "What is the weather in Paris?")
    t = wait_turn(pg, 1)
    assert t["state"] == "done", t
    assert t["stats"]["finishReason"] == "tool_calls"
    calls = t["toolCalls"]
    assert calls, t
    for c in calls:
        assert c["function"]["name"] == "get_weather" and c["id"]
        assert isinstance(json.loads(c["function"]["arguments"])["city"], str)
    block = pg.get_by_test_id("tool-calls").first
    assert block.is_visible() and "get_weather(" in block.inner_text()
    assert bodies[0]["tool_choice"] == "required"
    assert bodies[0]["tools"][0]["type"] == "function"
    assert bodies[0]["tools"][0]["function"]["name"] == "get_weather"
    shot(pg, "playground-tools.png")

    # Each call gets its result from the composer; then the model answers with them.
    pg.get_by_test_id("tool-choice").select_option("none")
    for i, c in enumerate(calls):
        assert c["id"] in pg.get_by_test_id("composer").get_attribute("placeholder")
        send(pg, f"Sunny, {20 + i} C")
    t = wait_turn(pg, 2)
    assert t["state"] == "done"
    msgs = bodies[-1]["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant"] + ["tool"] * len(calls)
    assert [m["tool_call_id"] for m in msgs[2:]] == [c["id"] for c in calls]
    assert msgs[1]["tool_calls"] == calls


def test_playground_stop_aborts_the_stream(ui_server, page):
    pg = page
    bodies = capture_bodies(pg)
    open_playground(pg, ui_server)
    set_params(pg, temperature=0, max_tokens=1500)
    send(pg, "Write a very long story about a dragon who learns to cook.")
    pg.get_by_test_id("stop").wait_for(state="visible")
    assert not pg.get_by_test_id("send").is_visible()
    pg.wait_for_function("""() => { const m = document.querySelector('[data-testid="msg-assistant"]');
                                    return m.querySelector('[data-testid="msg-content"]').textContent.length > 0; }""")
    pg.get_by_test_id("stop").click()
    t = wait_turn(pg, 1)
    assert t["state"] == "stopped", t
    assert pg.get_by_test_id("stopped").is_visible()
    assert ready(pg)
    shot(pg, "playground-stopped.png")
    # The server saw the client leave.
    wait_for(lambda: any(r["group"] == "cancelled" and r["requests"] >= 1 for r in
                         admin_get(ui_server, "/admin/usage", group_by="outcome", since=0)["data"]),
             "a cancelled usage record", timeout=60)
    # Ready for the next message, which carries the partial answer.
    set_params(pg, max_tokens=4)
    send(pg, "Thanks.")
    t2 = wait_turn(pg, 2)
    assert t2["state"] == "done"
    assert bodies[-1]["messages"][1] == {"role": "assistant", "content": t["content"]}


# ---------------------------------------------------------------- dashboard

def _chat(base, key, content, **extra):
    body = {"model": extra.pop("model", MODEL), "messages": [{"role": "user", "content": content}],
            "max_tokens": 8, "temperature": 0, **extra}
    return httpx.post(base + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {key}"}, timeout=120)


def card(pg, name):
    return pg.get_by_test_id(f"card-{name}").get_attribute("data-value")


def loads(pg):
    """How many times the dashboard has finished loading (body's data-loads)."""
    return int(pg.evaluate("document.body.dataset.loads || '0'"))


def wait_loaded(pg, before=0):
    pg.wait_for_function("b => document.body.dataset.state === 'loaded' && +(document.body.dataset.loads || 0) > b",
                         arg=before, timeout=60_000)


def reload_with(pg, **selects):
    for testid, value in selects.items():
        before = loads(pg)
        pg.get_by_test_id(testid).select_option(value)
        wait_loaded(pg, before)


def legend(pg):
    return pg.evaluate("""() => Object.fromEntries([...document.querySelectorAll('[data-testid="legend-item"]')]
                           .map(e => [e.dataset.group, { total: +e.dataset.total, requests: +e.dataset.requests,
                                                          tokens: +e.dataset.tokens, cost: +e.dataset.cost }]))""")


def bars(pg):
    return pg.evaluate("""() => [...document.querySelectorAll('[data-testid="ts-bar"]')]
                           .map(e => ({ group: e.dataset.group, bucket: e.dataset.bucket, value: +e.dataset.value }))""")


def test_dashboard_shows_the_traffic_sent(dash_server, page):
    base = dash_server
    # Two accounts with a key each: one with credit, one without (its request is refused: 402).
    admin_post(base, "/admin/accounts", {"name": "acme"})
    admin_post(base, "/admin/accounts/acme/credits", {"amount": 1_000_000})
    acme = admin_post(base, "/admin/keys", {"account": "acme", "name": "acme-key"})
    admin_post(base, "/admin/accounts", {"name": "broke"})
    broke = admin_post(base, "/admin/keys", {"account": "broke", "name": "broke-key"})
    campaign = admin_post(base, "/admin/campaigns", {
        "name": "Greeting", "key": "greeting", "sticky": "none",
        "variants": [{"name": "short", "weight": 1, "params": {"max_tokens": 4}},
                     {"name": "long", "weight": 1, "params": {"max_tokens": 12}}]})

    usages = {"acme": [], "static": [], "campaign": []}
    for i in range(3):
        r = _chat(base, acme["key"], f"Say the number {i}.")
        assert r.status_code == 200, r.text
        usages["acme"].append(r.json()["usage"])
    for i in range(2):
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"Greet person {i}."}],
                "temperature": 0, "ab_campaign": "greeting"}
        r = httpx.post(base + "/v1/chat/completions", json=body,
                       headers={"Authorization": f"Bearer {acme['key']}"}, timeout=120)
        assert r.status_code == 200, r.text
        usages["campaign"].append(r.json()["usage"])
    for i in range(2):
        r = _chat(base, KEY, f"Name a colour, {i}.")
        assert r.status_code == 200, r.text
        usages["static"].append(r.json()["usage"])
    refused = _chat(base, broke["key"], "Hello?")
    assert refused.status_code == 402, refused.text
    # A request for a model that does not exist is answered 404 before the platform sees it: no
    # usage record, so not among the recent (metered) errors; the API errors panel has it.
    missing = _chat(base, KEY, "Hello?", model="no-such-model")
    assert missing.status_code == 404

    every = [u for us in usages.values() for u in us]
    n_requests = len(every) + 1
    prompt = sum(u["prompt_tokens"] for u in every)
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in every)
    completion = sum(u["completion_tokens"] for u in every)
    cost = sum(cost_of(u) for u in every)
    acme_cost = sum(cost_of(u) for u in usages["acme"] + usages["campaign"])
    wait_for(lambda: admin_get(base, "/admin/usage", since=0)["data"][0]["requests"] == n_requests,
             "every usage record")
    wait_for(lambda: admin_get(base, "/admin/accounts/acme")["reserved"] == 0, "settlement")
    records = admin_get(base, "/admin/requests", limit=50)["data"]
    assert len(records) == n_requests

    pg = page
    pg.goto(base + "/ui/dashboard")
    assert pg.get_by_test_id("need-token").is_visible()
    pg.get_by_test_id("admin-token").fill(ADMIN)
    pg.get_by_test_id("save-token").click()
    wait_loaded(pg)
    reload_with(pg, range="hour")  # per-minute buckets over the last hour

    # Totals.
    assert int(card(pg, "requests")) == n_requests
    assert int(card(pg, "errors")) == 1
    assert int(card(pg, "tokens")) == prompt + completion
    tokens_card = pg.get_by_test_id("card-tokens")
    assert (int(tokens_card.get_attribute("data-prompt")), int(tokens_card.get_attribute("data-cached")),
            int(tokens_card.get_attribute("data-completion"))) == (prompt, cached, completion)
    assert int(card(pg, "cost")) == cost
    assert pg.get_by_test_id("card-cost").locator(".value").inner_text() == fmt_units(cost)

    # Requests over time, by model: every request in the minute it was made.
    per_minute = {}
    for r in records:
        label = datetime.fromtimestamp(r["created_at"], timezone.utc).strftime("%Y-%m-%dT%H:%MZ")
        per_minute[label] = per_minute.get(label, 0) + 1
    assert legend(pg)[MODEL]["total"] == n_requests
    drawn = {}
    for b in bars(pg):
        assert b["group"] == MODEL
        drawn[b["bucket"]] = drawn.get(b["bucket"], 0) + b["value"]
    assert drawn == per_minute
    chart = pg.get_by_test_id("timeseries")
    label, count = max(per_minute.items())
    chart.locator(f'[data-testid="ts-col"][data-bucket="{label}"]').hover()
    tip = chart.get_by_test_id("tooltip")
    assert tip.is_visible() and f"{label} · {count} requests" in tip.inner_text()
    shot(pg, "dashboard.png")

    reload_with(pg, metric="tokens")
    assert legend(pg)[MODEL]["total"] == prompt + completion
    assert sum(b["value"] for b in bars(pg)) == prompt + completion
    reload_with(pg, metric="cost")
    assert legend(pg)[MODEL]["total"] == cost

    # By key: the managed keys by id, the static key as static:0.
    reload_with(pg, metric="requests", dimension="key")
    by_key = legend(pg)
    assert by_key[acme["id"]]["requests"] == 5
    assert by_key["static:0"]["requests"] == 2
    assert by_key[broke["id"]]["requests"] == 1
    assert by_key[acme["id"]]["tokens"] == sum(u["prompt_tokens"] + u["completion_tokens"]
                                               for u in usages["acme"] + usages["campaign"])
    rows = {r["group"]: r for r in pg.evaluate(
        "() => [...document.querySelectorAll('[data-testid=\"dim-row\"]')].map(e => ({...e.dataset}))")}
    assert int(rows[acme["id"]]["cost"]) == acme_cost
    assert int(rows[broke["id"]]["errors"]) == 1
    shot(pg, "dashboard-by-key.png")

    # By campaign: the campaign's requests, the others as "(none)".
    reload_with(pg, dimension="campaign")
    by_campaign = legend(pg)
    assert by_campaign[campaign["id"]]["requests"] == 2
    assert by_campaign[""]["requests"] == n_requests - 2

    # Refusals and outcomes.
    status = {e.get_attribute("data-status"): int(e.get_attribute("data-value"))
              for e in pg.get_by_test_id("status-bar").all()}
    assert status == {"429": 0, "402": 1, "503": 0, "other": 0}
    outcome = {e.get_attribute("data-outcome"): int(e.get_attribute("data-value"))
               for e in pg.get_by_test_id("outcome-bar").all()}
    assert outcome == {"completed": n_requests - 1, "error": 0, "cancelled": 0, "refused": 1}

    # Balances and keys.
    accounts = {e.get_attribute("data-name"): e for e in pg.get_by_test_id("account-row").all()}
    assert int(accounts["acme"].get_attribute("data-balance")) == 1_000_000 - acme_cost
    assert int(accounts["broke"].get_attribute("data-balance")) == 0
    assert fmt_units(1_000_000 - acme_cost) in accounts["acme"].inner_text()
    keys = {e.get_attribute("data-id"): e.get_attribute("data-prefix") for e in pg.get_by_test_id("key-row").all()}
    assert keys == {acme["id"]: acme["prefix"], broke["id"]: broke["prefix"]}

    # The campaign report.
    variants = {e.get_attribute("data-variant"): int(e.get_attribute("data-requests"))
                for e in pg.get_by_test_id("variant-row").all()}
    assert sum(variants.values()) == 2 and set(variants) <= {"short", "long"}
    chart = {e.get_attribute("data-variant"): int(e.get_attribute("data-value"))
             for e in pg.get_by_test_id("campaign-bar").all()}
    assert chart == variants

    # Recent errors: the refused request.
    errors = pg.get_by_test_id("error-row").all()
    assert len(errors) == 1
    assert errors[0].get_attribute("data-status") == "402"
    assert errors[0].get_attribute("data-key") == broke["id"]
    [rec] = [r for r in records if r["status"] == 402]
    assert errors[0].get_attribute("data-request-id") == rec["request_id"]

    # API errors (every error response, newest first): the 404, then the 402, as the caller
    # was told them, with the x-request-id the caller got.
    api_errors = pg.get_by_test_id("api-error-row").all()
    assert [(e.get_attribute("data-status"), e.get_attribute("data-code")) for e in api_errors[:2]] == [
        ("404", "model_not_found"), ("402", "insufficient_balance")]
    assert api_errors[0].get_attribute("data-request-id") == missing.headers["x-request-id"]
    assert api_errors[1].get_attribute("data-request-id") == refused.headers["x-request-id"]
    assert "no-such-model" in api_errors[0].inner_text()

    # Refresh picks up new traffic.
    assert _chat(base, KEY, "One more.").status_code == 200
    wait_for(lambda: admin_get(base, "/admin/usage", since=0)["data"][0]["requests"] == n_requests + 1,
             "the new usage record")
    before = loads(pg)
    pg.get_by_test_id("refresh").click()
    wait_loaded(pg, before)
    assert int(card(pg, "requests")) == n_requests + 1
    shot(pg, "dashboard-campaign.png")


def test_dashboard_wrong_admin_token_shows_error_and_no_data(dash_server, page):
    pg = page
    pg.goto(dash_server + "/ui/dashboard")
    pg.get_by_test_id("admin-token").fill("not-the-token")
    pg.get_by_test_id("save-token").click()
    err = pg.get_by_test_id("auth-error")
    err.wait_for(state="visible")
    assert "Incorrect admin token." in err.inner_text()
    assert err.get_attribute("data-status") == "401"
    assert pg.evaluate("document.body.dataset.state") == "error"
    assert not pg.get_by_test_id("content").is_visible()
    for testid in ("dim-row", "ts-bar", "legend-item", "status-bar", "outcome-bar", "account-row",
                   "key-row", "variant-row", "error-row", "api-error-row"):
        assert pg.get_by_test_id(testid).count() == 0, testid
    assert pg.locator(".card[data-value]").count() == 0
    shot(pg, "dashboard-bad-token.png")

    # The right token opens it.
    pg.get_by_test_id("admin-token").fill(ADMIN)
    pg.get_by_test_id("save-token").click()
    wait_loaded(pg)
    assert not pg.get_by_test_id("auth-error").is_visible()
    assert pg.get_by_test_id("card-requests").get_attribute("data-value") is not None
