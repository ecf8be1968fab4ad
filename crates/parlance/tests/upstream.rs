//! Upstream providers and routing, end to end: parlance in front of a mock OpenAI-compatible
//! upstream that is a real HTTP server on loopback, replaying streams and injecting faults on
//! demand (500, 429 with `Retry-After`, a slow first byte, a hang, a stream cut halfway,
//! malformed JSON, a caller's 400). Each test shows the fall-back taken, what the caller
//! receives, and what is billed.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

mod common;

use std::time::{Duration, Instant};

use common::{client, scrape, sse_data, Server};
use serde_json::{json, Value};

use common::mock_upstream::{mock_upstream, Shared};

const UPSTREAM_KEY: &str = "sk-upstream-secret-4242";
const ADMIN: &str = "adm";

/// parlance with one public model per route: `name = [upstream models in fall-back order]`.
fn gateway(base: &str, routes: &[(&str, &[&str], Option<u64>)]) -> Server {
    let dir = std::env::temp_dir().join(format!("parlance-upstream-{}", common::uuid_like()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg = format!(
        "[[providers]]\nname = \"mock\"\nkind = \"openai\"\nbase_url = \"{base}\"\napi_key = \"{UPSTREAM_KEY}\"\n\n[[providers]]\nname = \"claude\"\nkind = \"anthropic\"\nbase_url = \"{base}\"\napi_key = \"{UPSTREAM_KEY}\"\n"
    );
    for (name, deployments, ttft) in routes {
        cfg.push_str(&format!(
            "\n[[models]]\nname = \"{name}\"\ncontext_length = 4096\nprice = {{ prompt = 1000000, cached_prompt = 500000, completion = 2000000 }}\n"
        ));
        if let Some(t) = ttft {
            cfg.push_str(&format!("max_ttft_ms = {t}\n"));
        }
        // Upstream models named `claude-…` live on the Anthropic provider.
        let ds: Vec<String> = deployments
            .iter()
            .map(|m| {
                let p = if m.starts_with("claude") {
                    "claude"
                } else {
                    "mock"
                };
                format!("{{ provider = \"{p}\", model = \"{m}\" }}")
            })
            .collect();
        cfg.push_str(&format!("deployments = [{}]\n", ds.join(", ")));
    }
    let path = dir.join("parlance.toml");
    std::fs::write(&path, cfg).unwrap();
    Server::start_raw(&[
        "serve",
        "--addr",
        "127.0.0.1:0",
        "--config",
        path.to_str().unwrap(),
        "--admin-token",
        ADMIN,
        "--exit-on-stdin-eof",
    ])
}

async fn post_json(s: &Server, key: Option<&str>, body: &Value) -> (u16, Value) {
    let mut r = client().post(s.url("/v1/chat/completions")).json(body);
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    let r = r.send().await.unwrap();
    let st = r.status().as_u16();
    (st, r.json().await.unwrap_or(Value::Null))
}

fn ask(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 50})
}

fn hits(seen: &Shared, model: &str) -> u32 {
    seen.lock().unwrap().hits.get(model).copied().unwrap_or(0)
}

#[tokio::test]
async fn plain_and_streamed_answers_come_from_the_upstream() {
    let (base, seen) = mock_upstream().await;
    let s = gateway(
        &base,
        &[
            ("gpt", &["ok"], None),
            ("gpt-nousage", &["ok-nousage"], None),
        ],
    );
    let (st, v) = post_json(&s, None, &ask("gpt")).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], "Hello from upstream");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["model"], "gpt");
    assert_eq!(v["usage"]["prompt_tokens"], 11);
    assert_eq!(v["usage"]["completion_tokens"], 3);
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 2);
    common::validate_with_spec(&v.to_string());

    let mut body = ask("gpt");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let (st, _, data) = common::post_stream(&s, &body).await;
    assert_eq!(st, 200);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let text: String = common::delta_strings(&data, "/choices/0/delta/content").concat();
    assert_eq!(text, "Hello from upstream");

    // No usage from the upstream: parlance counts it itself.
    let (st, v) = post_json(&s, None, &ask("gpt-nousage")).await;
    assert_eq!(st, 200);
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() > 0, "{v}");

    // parlance always streams from upstreams (for deadlines and cancellation).
    assert_eq!(seen.lock().unwrap().unstreamed, 0);
    // The upstream got its key; nobody else sees it.
    let seen_keys = seen.lock().unwrap().keys.clone();
    assert!(seen_keys
        .iter()
        .all(|k| k == &format!("Bearer {UPSTREAM_KEY}")));
    let (_, models) = {
        let r = client().get(s.url("/v1/models")).send().await.unwrap();
        (r.status(), r.text().await.unwrap())
    };
    assert!(!models.contains(UPSTREAM_KEY));
    let logs: Vec<String> = s.stderr.lock().unwrap().try_iter().collect();
    assert!(
        !logs.iter().any(|l| l.contains(UPSTREAM_KEY)),
        "the upstream key was logged"
    );
}

#[tokio::test]
async fn failures_fall_back_with_retries_and_backoff() {
    let (base, seen) = mock_upstream().await;
    let s = gateway(
        &base,
        &[
            ("a", &["fail500", "ok"], None),
            ("b", &["busy429", "ok"], None),
            ("c", &["fail500"], None),
            ("d", &["bad400", "ok"], None),
            ("e", &["garbage", "ok"], None),
        ],
    );
    // 500: retried once, then the next deployment answers.
    let (st, v) = post_json(&s, None, &ask("a")).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], "Hello from upstream");
    assert_eq!(hits(&seen, "fail500"), 2);
    assert_eq!(hits(&seen, "ok"), 1);

    // 429 with Retry-After: 1: the retry waits for it.
    let t = Instant::now();
    let (st, _) = post_json(&s, None, &ask("b")).await;
    assert_eq!(st, 200);
    assert!(
        t.elapsed() >= Duration::from_secs(1),
        "Retry-After was not honoured"
    );
    assert_eq!(hits(&seen, "busy429"), 2);

    // Nothing left: a 502 in the envelope.
    let (st, v) = post_json(&s, None, &ask("c")).await;
    assert_eq!(st, 502, "{v}");
    assert_eq!(v["error"]["code"], "upstream_error");

    // The caller's own mistake is not retried elsewhere.
    let before = hits(&seen, "ok");
    let (st, v) = post_json(&s, None, &ask("d")).await;
    assert_eq!(st, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("too hot"));
    assert_eq!(hits(&seen, "bad400"), 1);
    assert_eq!(hits(&seen, "ok"), before);

    // Malformed data before any output: the attempt failed, the next one answers.
    let (st, v) = post_json(&s, None, &ask("e")).await;
    assert_eq!(st, 200, "{v}");
}

#[tokio::test]
async fn max_ttft_abandons_slow_attempts_and_bills_once() {
    let (base, seen) = mock_upstream().await;
    let s = gateway(
        &base,
        &[
            ("fast-enough", &["slow", "ok"], Some(500)),
            ("never", &["slow", "hang"], Some(300)),
            ("patient", &["slow"], None),
        ],
    );
    let (_, acct) = admin_post(&s, "/admin/accounts", json!({"name": "acme"})).await;
    let id = acct["id"].as_str().unwrap().to_owned();
    admin_post(
        &s,
        &format!("/admin/accounts/{id}/credits"),
        json!({"amount": 100_000}),
    )
    .await;
    let (_, k) = admin_post(&s, "/admin/keys", json!({"account": "acme"})).await;
    let key = k["key"].as_str().unwrap().to_owned();

    let t = Instant::now();
    let (st, v) = post_json(&s, Some(&key), &ask("fast-enough")).await;
    assert_eq!(st, 200, "{v}");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "the slow attempt was waited for"
    );
    assert_eq!(hits(&seen, "slow"), 1);
    assert_eq!(hits(&seen, "ok"), 1);

    // The request field overrides the model's default.
    let mut body = ask("patient");
    body["max_ttft_ms"] = json!(200);
    let (st, v) = post_json(&s, Some(&key), &body).await;
    assert_eq!(st, 504, "{v}");
    assert_eq!(v["error"]["code"], "ttft_deadline_exceeded");

    let t = Instant::now();
    let (st, v) = post_json(&s, Some(&key), &ask("never")).await;
    assert_eq!(st, 504, "{v}");
    assert_eq!(v["error"]["type"], "timeout_error");
    assert!(t.elapsed() < Duration::from_secs(2));

    // Billed once: only the attempt that answered (11 prompt, 2 of them cached, 3 completion).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = client()
            .get(s.url(&format!("/admin/accounts/{id}")))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        let a: Value = r.json().await.unwrap();
        if a["reserved"] == 0 {
            assert_eq!(a["balance"], 100_000 - (9 + 1 + 6), "{a}");
            break;
        }
        assert!(Instant::now() < deadline, "never settled: {a}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn admin_post(s: &Server, path: &str, body: Value) -> (u16, Value) {
    let r = client()
        .post(s.url(path))
        .bearer_auth(ADMIN)
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_stream_cut_halfway_ends_in_an_error_event() {
    let (base, _) = mock_upstream().await;
    let s = gateway(&base, &[("cut", &["cut"], None)]);
    let mut body = ask("cut");
    body["stream"] = json!(true);
    let r = client()
        .post(s.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let data = sse_data(&text);
    assert!(data.iter().any(|d| d.contains("Half")), "{text}");
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_error", "{text}");
    assert!(!text.contains("[DONE]"));
    // Not streamed: a 502.
    let (st, v) = post_json(&s, None, &ask("cut")).await;
    assert_eq!(st, 502, "{v}");
}

#[tokio::test]
async fn upstream_tool_calls_reach_the_caller_in_openais_shape() {
    let (base, _) = mock_upstream().await;
    let s = gateway(&base, &[("t", &["tools"], None)]);
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    let mut body = ask("t");
    body["tools"] = tools;
    let (st, v) = post_json(&s, None, &body).await;
    assert_eq!(st, 200, "{v}");
    let call = &v["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["id"], "call_up");
    assert_eq!(call["function"]["name"], "get_weather");
    assert_eq!(call["function"]["arguments"], "{\"city\":\"Paris\"}");
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    common::validate_with_spec(&v.to_string());
    body["stream"] = json!(true);
    let (_, _, data) = common::post_stream(&s, &body).await;
    let fragments =
        common::delta_strings(&data, "/choices/0/delta/tool_calls/0/function/arguments");
    // Passed on fragment by fragment, as the upstream sent them: the naming fragment (empty
    // arguments), then the two argument fragments.
    assert_eq!(fragments, vec!["", "{\"city\":", "\"Paris\"}"]);
}

#[tokio::test]
async fn translation_both_ways_between_the_two_apis() {
    let (base, seen) = mock_upstream().await;
    let s = gateway(
        &base,
        &[
            ("claude", &["claude-ok"], None),
            ("claude-t", &["claude-tools"], None),
            ("busy-claude", &["claude-overloaded", "ok"], None),
            ("gpt", &["ok"], None),
        ],
    );
    // OpenAI door, Anthropic upstream: text, stop sequence, usage with cached tokens.
    let mut body = ask("claude");
    body["stop"] = json!(["END"]);
    let (st, v) = post_json(&s, None, &body).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], "Bonjour from Claude");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["prompt_tokens"], 11);
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 2);
    assert_eq!(v["usage"]["completion_tokens"], 4);
    common::validate_with_spec(&v.to_string());
    // Streamed, with tools: the tool_use block arrives as OpenAI tool-call deltas.
    let mut body = ask("claude-t");
    body["stream"] = json!(true);
    body["tools"] = json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    let (st, _, data) = common::post_stream(&s, &body).await;
    assert_eq!(st, 200);
    let args: String =
        common::delta_strings(&data, "/choices/0/delta/tool_calls/0/function/arguments").concat();
    assert_eq!(args, "{\"city\": \"Lyon\"}");
    assert!(data
        .iter()
        .any(|d| d.contains("\"finish_reason\":\"tool_calls\"")));
    // Anthropic's 529 overloaded: fall back to the next deployment.
    let (st, v) = post_json(&s, None, &ask("busy-claude")).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(hits(&seen, "claude-overloaded"), 2);

    // Anthropic door, OpenAI upstream.
    let r = client()
        .post(s.url("/v1/messages"))
        .json(&json!({"model": "gpt", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let m: Value = r.json().await.unwrap();
    assert_eq!(m["type"], "message");
    assert_eq!(m["content"][0]["text"], "Hello from upstream");
    assert_eq!(m["stop_reason"], "end_turn");
    assert_eq!(m["usage"]["output_tokens"], 3);
    // And both keys went to the upstream only.
    assert!(seen
        .lock()
        .unwrap()
        .keys
        .iter()
        .all(|k| k.ends_with(UPSTREAM_KEY)));
}

#[tokio::test]
async fn a_failing_deployment_is_skipped_once_its_breaker_opens() {
    let (base, seen) = mock_upstream().await;
    let s = gateway(&base, &[("a", &["fail500", "ok"], None)]);
    // Each request fails twice there (one retry) before falling back: after three requests
    // (six failures in a row) the breaker is open.
    for _ in 0..3 {
        let (st, _) = post_json(&s, None, &ask("a")).await;
        assert_eq!(st, 200);
    }
    let failed_before = hits(&seen, "fail500");
    assert_eq!(failed_before, 6);
    for _ in 0..5 {
        let (st, _) = post_json(&s, None, &ask("a")).await;
        assert_eq!(st, 200);
    }
    assert_eq!(
        hits(&seen, "fail500"),
        failed_before,
        "an open breaker still sent traffic"
    );
    assert_eq!(hits(&seen, "ok"), 8);
    // The same story in the metrics: six failed attempts (three retries) and an open breaker on
    // the failing deployment; the other served three requests as a fall-back, then five first.
    let (text, samples) = scrape(&s).await;
    let sample = |name: &str, deployment: &str| -> f64 {
        let series =
            format!("{name}{{model=\"a\",deployment=\"{deployment}\",provider=\"openai\"}}");
        *samples
            .get(&series)
            .unwrap_or_else(|| panic!("{series} missing from:\n{text}"))
    };
    assert_eq!(
        sample("parlance_upstream_attempts_total", "mock/fail500"),
        6.0
    );
    assert_eq!(
        sample("parlance_upstream_errors_total", "mock/fail500"),
        6.0
    );
    assert_eq!(
        sample("parlance_upstream_retries_total", "mock/fail500"),
        3.0
    );
    assert_eq!(sample("parlance_circuit_breaker_open", "mock/fail500"), 1.0);
    assert_eq!(sample("parlance_upstream_attempts_total", "mock/ok"), 8.0);
    assert_eq!(sample("parlance_upstream_errors_total", "mock/ok"), 0.0);
    assert_eq!(sample("parlance_upstream_fallbacks_total", "mock/ok"), 3.0);
    assert_eq!(sample("parlance_circuit_breaker_open", "mock/ok"), 0.0);
    assert!(
        !text.contains(UPSTREAM_KEY),
        "an upstream key reached the metrics"
    );
}

#[tokio::test]
async fn weighted_choice_splits_traffic() {
    let (base, seen) = mock_upstream().await;
    let dir = std::env::temp_dir().join(format!("parlance-weights-{}", common::uuid_like()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = format!(
        "[[providers]]\nname = \"mock\"\nkind = \"openai\"\nbase_url = \"{base}\"\n\n[[models]]\nname = \"w\"\ndeployments = [{{ provider = \"mock\", model = \"ok\", weight = 3 }}, {{ provider = \"mock\", model = \"ok-nousage\", weight = 1 }}]\n"
    );
    let path = dir.join("parlance.toml");
    std::fs::write(&path, cfg).unwrap();
    let s = Server::start_raw(&[
        "serve",
        "--addr",
        "127.0.0.1:0",
        "--config",
        path.to_str().unwrap(),
        "--exit-on-stdin-eof",
    ]);
    for _ in 0..400 {
        let (st, _) = post_json(&s, None, &ask("w")).await;
        assert_eq!(st, 200);
    }
    let (a, b) = (hits(&seen, "ok"), hits(&seen, "ok-nousage"));
    assert_eq!(a + b, 400);
    // 3:1 expected (300 / 100); binomial standard deviation about 8.7.
    assert!((250..=350).contains(&a), "ok got {a}, ok-nousage {b}");
}

#[tokio::test]
async fn reasoning_from_upstreams_reaches_both_doors() {
    let (base, seen) = mock_upstream().await;
    let s = gateway(
        &base,
        &[("r1", &["think"], None), ("c1", &["claude-think"], None)],
    );
    // An OpenAI-compatible upstream that streams `reasoning_content`.
    let mut body = ask("r1");
    body["reasoning_effort"] = json!("high");
    let (st, v) = post_json(&s, None, &body).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], "Hi!");
    assert_eq!(
        v["choices"][0]["message"]["reasoning_content"],
        "The user greets me."
    );
    assert_eq!(
        v["usage"]["completion_tokens_details"]["reasoning_tokens"],
        7
    );
    common::validate_with_spec(&v.to_string());
    assert_eq!(
        seen.lock().unwrap().bodies["think"]["reasoning_effort"],
        "high"
    );
    body["stream"] = json!(true);
    let (_, _, data) = common::post_stream(&s, &body).await;
    let thought: String =
        common::delta_strings(&data, "/choices/0/delta/reasoning_content").concat();
    assert_eq!(thought, "The user greets me.");

    // Anthropic upstream: the effort becomes a thinking budget, thinking comes back as
    // reasoning_content.
    let mut body = ask("c1");
    body["reasoning_effort"] = json!("low");
    body["max_tokens"] = json!(4000);
    let (st, v) = post_json(&s, None, &body).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        v["choices"][0]["message"]["reasoning_content"],
        "Weighing it up"
    );
    assert_eq!(v["choices"][0]["message"]["content"], "Yes.");
    assert!(
        v["usage"]["completion_tokens_details"]["reasoning_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );
    let sent = seen.lock().unwrap().bodies["claude-think"].clone();
    assert_eq!(
        sent["thinking"],
        json!({"type": "enabled", "budget_tokens": 2048})
    );
    assert!(sent.get("temperature").is_none());
    // `none` turns thinking off.
    body["reasoning_effort"] = json!("none");
    post_json(&s, None, &body).await;
    assert!(seen.lock().unwrap().bodies["claude-think"]
        .get("thinking")
        .is_none());

    // The Anthropic door shows the thought as a thinking block, plain and streamed.
    let r = client()
        .post(s.url("/v1/messages"))
        .json(&json!({"model": "r1", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    let m: Value = r.json().await.unwrap();
    assert_eq!(m["content"][0]["type"], "thinking", "{m}");
    assert_eq!(m["content"][0]["thinking"], "The user greets me.");
    assert_eq!(m["content"][1]["text"], "Hi!");
    let r = client()
        .post(s.url("/v1/messages"))
        .json(&json!({"model": "r1", "max_tokens": 50, "stream": true,
                      "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    assert!(text.contains("\"thinking_delta\""), "{text}");
    assert!(text.contains("\"type\":\"thinking\""), "{text}");
}
