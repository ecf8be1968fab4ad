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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use common::{client, sse_data, Server};
use futures::StreamExt;
use serde_json::{json, Value};

const UPSTREAM_KEY: &str = "sk-upstream-secret-4242";
const ADMIN: &str = "adm";

/// What the mock saw: hits per upstream model, and the bearer keys it was sent.
#[derive(Default)]
struct Seen {
    hits: HashMap<String, u32>,
    keys: Vec<String>,
}

type Shared = Arc<Mutex<Seen>>;

fn chunk(delta: Value, finish: Option<&str>) -> String {
    let c = json!({"id": "up-1", "object": "chat.completion.chunk", "created": 1, "model": "up",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
    format!("data: {c}\n\n")
}

fn usage_chunk() -> String {
    let c = json!({"id": "up-1", "object": "chat.completion.chunk", "created": 1, "model": "up",
        "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14,
        "prompt_tokens_details": {"cached_tokens": 2}}});
    format!("data: {c}\n\n")
}

fn sse(parts: Vec<(Duration, String)>) -> Response {
    let body = futures::stream::iter(parts).then(|(wait, part)| async move {
        tokio::time::sleep(wait).await;
        Ok::<_, std::convert::Infallible>(part)
    });
    (
        [("content-type", "text/event-stream")],
        axum::body::Body::from_stream(body),
    )
        .into_response()
}

fn hello(first_wait: Duration, with_usage: bool) -> Response {
    let mut parts = vec![
        (
            first_wait,
            chunk(json!({"role": "assistant", "content": "Hello"}), None),
        ),
        (Duration::ZERO, chunk(json!({"content": " from"}), None)),
        (Duration::ZERO, chunk(json!({"content": " upstream"}), None)),
        (Duration::ZERO, chunk(json!({}), Some("stop"))),
    ];
    if with_usage {
        parts.push((Duration::ZERO, usage_chunk()));
    }
    parts.push((Duration::ZERO, "data: [DONE]\n\n".into()));
    sse(parts)
}

async fn completions(
    State(seen): State<Shared>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let model = body["model"].as_str().unwrap_or("").to_owned();
    {
        let mut s = seen.lock().unwrap();
        *s.hits.entry(model.clone()).or_default() += 1;
        if let Some(k) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
            s.keys.push(k.to_owned());
        }
    }
    assert_eq!(
        body["stream"], true,
        "parlance always streams from upstreams"
    );
    match model.as_str() {
        "ok" => hello(Duration::ZERO, true),
        "ok-nousage" => hello(Duration::ZERO, false),
        "slow" => hello(Duration::from_secs(3), true),
        "hang" => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            StatusCode::OK.into_response()
        }
        "fail500" => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": {"message": "boom", "type": "server_error"}})),
        )
            .into_response(),
        "busy429" => (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", "1")],
            Json(json!({"error": {"message": "slow down", "type": "rate_limit_error"}})),
        )
            .into_response(),
        "bad400" => (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": {"message": "temperature is too hot", "type": "invalid_request_error"}})),
        )
            .into_response(),
        "cut" => sse(vec![(
            Duration::ZERO,
            chunk(json!({"role": "assistant", "content": "Half"}), None),
        )]),
        "garbage" => sse(vec![(Duration::ZERO, "data: {not json\n\n".into())]),
        "tools" => sse(vec![
            (Duration::ZERO, chunk(json!({"role": "assistant", "content": null, "tool_calls": [{"index": 0, "id": "call_up", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}), None)),
            (Duration::ZERO, chunk(json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]}), None)),
            (Duration::ZERO, chunk(json!({"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]}), None)),
            (Duration::ZERO, chunk(json!({}), Some("tool_calls"))),
            (Duration::ZERO, usage_chunk()),
            (Duration::ZERO, "data: [DONE]\n\n".into()),
        ]),
        other => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": {"message": format!("no model {other}")}})),
        )
            .into_response(),
    }
}

fn anthropic_event(v: Value) -> (Duration, String) {
    let name = v["type"].as_str().unwrap_or("").to_owned();
    (Duration::ZERO, format!("event: {name}\ndata: {v}\n\n"))
}

/// The mock's Anthropic Messages endpoint.
async fn messages(
    State(seen): State<Shared>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let model = body["model"].as_str().unwrap_or("").to_owned();
    {
        let mut s = seen.lock().unwrap();
        *s.hits.entry(model.clone()).or_default() += 1;
        if let Some(k) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
            s.keys.push(format!("Bearer {k}"));
        }
    }
    assert_eq!(headers["anthropic-version"], "2023-06-01");
    assert_eq!(body["stream"], true);
    assert!(body["max_tokens"].is_u64(), "Anthropic requires max_tokens");
    let start = json!({"type": "message_start", "message": {"id": "msg_up", "type": "message", "role": "assistant",
        "content": [], "model": model, "usage": {"input_tokens": 9, "cache_read_input_tokens": 2, "output_tokens": 1}}});
    match model.as_str() {
        "claude-ok" => sse(vec![
            anthropic_event(start),
            anthropic_event(json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})),
            anthropic_event(json!({"type": "ping"})),
            anthropic_event(json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Bonjour"}})),
            anthropic_event(json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " from Claude"}})),
            anthropic_event(json!({"type": "content_block_stop", "index": 0})),
            anthropic_event(json!({"type": "message_delta", "delta": {"stop_reason": "stop_sequence", "stop_sequence": "END"}, "usage": {"output_tokens": 4}})),
            anthropic_event(json!({"type": "message_stop"})),
        ]),
        "claude-tools" => sse(vec![
            anthropic_event(start),
            anthropic_event(json!({"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "toolu_9", "name": "get_weather", "input": {}}})),
            anthropic_event(json!({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": "{\"city\": "}})),
            anthropic_event(json!({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": "\"Lyon\"}"}})),
            anthropic_event(json!({"type": "content_block_stop", "index": 0})),
            anthropic_event(json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 12}})),
            anthropic_event(json!({"type": "message_stop"})),
        ]),
        "claude-overloaded" => (
            StatusCode::from_u16(529).unwrap(),
            Json(json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})),
        )
            .into_response(),
        other => (
            StatusCode::NOT_FOUND,
            Json(json!({"type": "error", "error": {"type": "not_found_error", "message": format!("no model {other}")}})),
        )
            .into_response(),
    }
}

/// Starts the mock upstream; returns its base URL (with `/v1`) and what it saw.
async fn mock_upstream() -> (String, Shared) {
    let seen: Shared = Arc::default();
    let app = Router::new()
        .route("/v1/chat/completions", post(completions))
        .route("/v1/messages", post(messages))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}/v1"), seen)
}

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
    let text: String = data
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(text, "Hello from upstream");

    // No usage from the upstream: parlance counts it itself.
    let (st, v) = post_json(&s, None, &ask("gpt-nousage")).await;
    assert_eq!(st, 200);
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() > 0, "{v}");

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
    let fragments: Vec<String> = data
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
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
    let args: String = data
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
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
