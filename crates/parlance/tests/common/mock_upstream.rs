//! A mock upstream provider that is a real HTTP server: OpenAI's Chat Completions and
//! Anthropic's Messages on loopback, replaying recorded streams and injecting faults chosen by
//! the requested model name (`ok`, `ok-nousage`, `slow`, `hang`, `fail500`, `busy429`,
//! `bad400`, `cut`, `garbage`, `tools`, `agent`, `agent-forever`; `claude-ok`, `claude-tools`,
//! `claude-overloaded`).
//! Used by the upstream tests and, as `examples/mock_upstream.rs`, by the gateway benchmark.

#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use futures::StreamExt;
use serde_json::{json, Value};

/// What the mock saw: hits per upstream model, the bearer keys it was sent, and whether every
/// request asked for a stream.
#[derive(Default)]
pub struct Seen {
    pub hits: HashMap<String, u32>,
    pub keys: Vec<String>,
    pub unstreamed: u32,
    /// The last request body per upstream model.
    pub bodies: HashMap<String, Value>,
}

pub type Shared = Arc<Mutex<Seen>>;

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
        // A zero sleep still waits for the timer's next millisecond tick.
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
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

/// Counts a hit on the requested model and notes the key it came with (as `Bearer KEY`);
/// returns the model.
fn record(seen: &Shared, body: &Value, headers: &HeaderMap, key_header: &str) -> String {
    let model = body["model"].as_str().unwrap_or("").to_owned();
    let mut s = seen.lock().unwrap();
    *s.hits.entry(model.clone()).or_default() += 1;
    s.bodies.insert(model.clone(), body.clone());
    if let Some(k) = headers.get(key_header).and_then(|v| v.to_str().ok()) {
        let k = k.strip_prefix("Bearer ").unwrap_or(k);
        s.keys.push(format!("Bearer {k}"));
    }
    model
}

async fn completions(
    State(seen): State<Shared>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let model = record(&seen, &body, &headers, "authorization");
    if body["stream"] != true {
        seen.lock().unwrap().unstreamed += 1;
        // Asked directly (the benchmark's baseline): one plain answer.
        return Json(json!({"id": "up-1", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from upstream"},
                         "finish_reason": "stop", "logprobs": null}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}}))
        .into_response();
    }
    match model.as_str() {
        "ok" => hello(Duration::ZERO, true),
        "ok-nousage" => hello(Duration::ZERO, false),
        "think" => sse(vec![
            (Duration::ZERO, chunk(json!({"role": "assistant", "content": null, "reasoning_content": "The user"}), None)),
            (Duration::ZERO, chunk(json!({"reasoning_content": " greets me."}), None)),
            (Duration::ZERO, chunk(json!({"content": "Hi!"}), None)),
            (Duration::ZERO, chunk(json!({}), Some("stop"))),
            (Duration::ZERO, format!("data: {}\n\n", json!({"id": "up-1", "object": "chat.completion.chunk", "created": 1,
                "model": "up", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14,
                "completion_tokens_details": {"reasoning_tokens": 7}}}))),
            (Duration::ZERO, "data: [DONE]\n\n".into()),
        ]),
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
        // An agent: reads a tool's result back when it has one, else calls a tool (the one the
        // user names, or the first offered) with the user's words as `q`.
        "agent" | "agent-forever" => {
            let messages = body["messages"].as_array().cloned().unwrap_or_default();
            let last = messages.last().cloned().unwrap_or(Value::Null);
            let tools: Vec<String> = body["tools"]
                .as_array()
                .map(|t| {
                    t.iter()
                        .filter_map(|t| t["function"]["name"].as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            let results = messages.iter().filter(|m| m["role"] == "tool").count();
            let may_call = !tools.is_empty() && body["tool_choice"] != "none";
            let answer = |text: String| {
                sse(vec![
                    (Duration::ZERO, chunk(json!({"role": "assistant", "content": text}), None)),
                    (Duration::ZERO, chunk(json!({}), Some("stop"))),
                    (Duration::ZERO, usage_chunk()),
                    (Duration::ZERO, "data: [DONE]\n\n".into()),
                ])
            };
            if model == "agent" && last["role"] == "tool" {
                return answer(format!("Tool said: {}", last["content"].as_str().unwrap_or("")));
            }
            if !may_call {
                return answer(format!("No more tools after {results} results."));
            }
            let user = messages
                .iter()
                .rev()
                .find(|m| m["role"] == "user")
                .and_then(|m| m["content"].as_str())
                .unwrap_or("")
                .to_owned();
            let name = tools
                .iter()
                .find(|t| user.contains(t.as_str()))
                .unwrap_or(&tools[0])
                .clone();
            let args = json!({"q": user}).to_string();
            sse(vec![
                (Duration::ZERO, chunk(json!({"role": "assistant", "content": null, "tool_calls": [{"index": 0, "id": format!("call_{results}"), "type": "function", "function": {"name": name, "arguments": ""}}]}), None)),
                (Duration::ZERO, chunk(json!({"tool_calls": [{"index": 0, "function": {"arguments": args}}]}), None)),
                (Duration::ZERO, chunk(json!({}), Some("tool_calls"))),
                (Duration::ZERO, usage_chunk()),
                (Duration::ZERO, "data: [DONE]\n\n".into()),
            ])
        }
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
    let model = record(&seen, &body, &headers, "x-api-key");
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
        "claude-think" => sse(vec![
            anthropic_event(start),
            anthropic_event(json!({"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}})),
            anthropic_event(json!({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "Weighing it up"}})),
            anthropic_event(json!({"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "c2ln"}})),
            anthropic_event(json!({"type": "content_block_stop", "index": 0})),
            anthropic_event(json!({"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}})),
            anthropic_event(json!({"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Yes."}})),
            anthropic_event(json!({"type": "content_block_stop", "index": 1})),
            anthropic_event(json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 20}})),
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

/// Starts the mock upstream on a free loopback port; returns its base URL (with `/v1`) and
/// what it saw.
pub async fn mock_upstream() -> (String, Shared) {
    mock_upstream_at("127.0.0.1:0").await
}

/// Starts the mock upstream at `addr`.
pub async fn mock_upstream_at(addr: &str) -> (String, Shared) {
    let seen: Shared = Arc::default();
    let app = Router::new()
        .route("/v1/chat/completions", post(completions))
        .route("/v1/messages", post(messages))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}/v1"), seen)
}
