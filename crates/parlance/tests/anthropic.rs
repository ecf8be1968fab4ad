//! End-to-end: the Anthropic Messages door on the real binary and model: the same answers as the
//! OpenAI door, Anthropic's shapes, event order, stop reasons and error body.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

mod common;

use common::*;
use serde_json::{json, Value};

async fn messages(s: &Server, body: &Value, key: Option<&str>) -> (u16, String) {
    let mut r = client()
        .post(s.url("/v1/messages"))
        .header("anthropic-version", "2023-06-01")
        .json(body);
    if let Some(k) = key {
        r = r.header("x-api-key", k);
    }
    let r = r.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn messages_plain_streamed_and_errors() {
    let s = Server::start(&["--api-key", "sk-ant-test"]);
    let key = Some("sk-ant-test");
    let body = json!({"model": MODEL, "max_tokens": 12, "temperature": 0,
                      "system": "You are terse.",
                      "messages": [{"role": "user", "content": "Name a color."}]});
    let (status, text) = messages(&s, &body, key).await;
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert!(v["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(v["type"], "message");
    assert_eq!(v["role"], "assistant");
    assert_eq!(v["model"], MODEL);
    assert_eq!(v["content"][0]["type"], "text");
    let answer = v["content"][0]["text"].as_str().unwrap().to_owned();
    assert!(["end_turn", "max_tokens"].contains(&v["stop_reason"].as_str().unwrap()));
    assert!(v["usage"]["input_tokens"].as_u64().unwrap() > 5);

    // The same request through the OpenAI door gives the same text: one pipeline.
    let oai = json!({"model": MODEL, "max_tokens": 12, "temperature": 0, "messages": [
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}]});
    let r = client()
        .post(s.url("/v1/chat/completions"))
        .bearer_auth("sk-ant-test")
        .json(&oai)
        .send()
        .await
        .unwrap();
    let o: Value = r.json().await.unwrap();
    assert_eq!(content(&o), answer);
    assert_eq!(v["usage"]["output_tokens"], o["usage"]["completion_tokens"]);

    // Streamed: Anthropic's event order, and the deltas spell the same text.
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let r = client()
        .post(s.url("/anthropic/v1/messages"))
        .header("x-api-key", "sk-ant-test")
        .json(&sb)
        .send()
        .await
        .unwrap();
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let raw = r.text().await.unwrap();
    let mut kinds = Vec::new();
    let mut streamed = String::new();
    for ev in raw
        .split("\n\n")
        .filter(|e| !e.trim().is_empty() && !e.starts_with(':'))
    {
        let mut lines = ev.lines();
        let kind = lines
            .next()
            .unwrap()
            .strip_prefix("event: ")
            .unwrap()
            .to_owned();
        let data: Value =
            serde_json::from_str(lines.next().unwrap().strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(data["type"], kind.as_str());
        if kind == "content_block_delta" {
            assert_eq!(data["delta"]["type"], "text_delta");
            streamed.push_str(data["delta"]["text"].as_str().unwrap());
        }
        if kind == "message_delta" {
            assert_eq!(data["delta"]["stop_reason"], v["stop_reason"]);
            assert_eq!(data["usage"]["output_tokens"], v["usage"]["output_tokens"]);
        }
        if kinds.last() != Some(&kind) {
            kinds.push(kind);
        }
    }
    assert_eq!(streamed, answer);
    assert_eq!(
        kinds,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );

    // Stop sequences: stop_reason and stop_sequence say which one.
    let full = json!({"model": MODEL, "max_tokens": 40, "temperature": 0,
                      "messages": [{"role": "user", "content": "Write two sentences about cats."}]});
    let (_, t) = messages(&s, &full, key).await;
    let whole: Value = serde_json::from_str(&t).unwrap();
    let whole = whole["content"][0]["text"].as_str().unwrap().to_owned();
    let chars: Vec<char> = whole.chars().collect();
    let stop: String = chars[8..11].iter().collect();
    let mut b = full.clone();
    b["stop_sequences"] = json!(["zzz-never", stop]);
    let (_, t) = messages(&s, &b, key).await;
    let v: Value = serde_json::from_str(&t).unwrap();
    assert_eq!(v["stop_reason"], "stop_sequence");
    assert_eq!(v["stop_sequence"], stop.as_str());
    assert_eq!(
        v["content"][0]["text"],
        &whole[..whole.find(&stop).unwrap()]
    );

    // Errors in Anthropic's shape, 401 included.
    for (b, k, status, kind) in [
        (body.clone(), None, 401, "authentication_error"),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}]}),
            key,
            400,
            "invalid_request_error",
        ),
        (
            json!({"model": "nope", "max_tokens": 3, "messages": [{"role": "user", "content": "x"}]}),
            key,
            404,
            "not_found_error",
        ),
        (
            json!({"model": MODEL, "max_tokens": 3, "temperature": 1.5, "messages": [{"role": "user", "content": "x"}]}),
            key,
            400,
            "invalid_request_error",
        ),
    ] {
        let (got, t) = messages(&s, &b, k).await;
        assert_eq!(got, status, "{t}");
        let e: Value = serde_json::from_str(&t).unwrap();
        assert_eq!(e["type"], "error");
        assert_eq!(e["error"]["type"], kind, "{t}");
        assert!(e["error"]["message"].is_string());
    }
}

#[tokio::test]
async fn tool_use_plain_streamed_and_history() {
    let s = Server::start(&[]);
    let tools = json!([{"name": "get_weather", "description": "Weather in a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                         "required": ["city"], "additionalProperties": false}}]);
    // Greedy and one call, so that the plain and streamed answers are the same call.
    let body = json!({"model": MODEL, "max_tokens": 120, "tools": tools, "temperature": 0,
                      "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
                      "messages": [{"role": "user", "content": "Weather in Paris?"}]});
    let (status, text) = messages(&s, &body, None).await;
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["stop_reason"], "tool_use");
    let call = v["content"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["type"] == "tool_use")
        .unwrap()
        .clone();
    assert!(call["id"].as_str().unwrap().starts_with("toolu_"));
    assert_eq!(call["name"], "get_weather");
    assert!(call["input"]["city"].is_string());

    // Streamed: a tool_use block whose input_json_delta fragments join to the same input.
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let r = client()
        .post(s.url("/v1/messages"))
        .json(&sb)
        .send()
        .await
        .unwrap();
    let raw = r.text().await.unwrap();
    let mut partial = String::new();
    let mut started = None;
    let mut stop = None;
    for ev in raw.split("\n\n").filter(|e| e.starts_with("event: ")) {
        let data: Value =
            serde_json::from_str(ev.lines().nth(1).unwrap().strip_prefix("data: ").unwrap())
                .unwrap();
        match data["type"].as_str().unwrap() {
            "content_block_start" if data["content_block"]["type"] == "tool_use" => {
                started = Some(data["content_block"].clone())
            }
            "content_block_delta" if data["delta"]["type"] == "input_json_delta" => {
                partial.push_str(data["delta"]["partial_json"].as_str().unwrap())
            }
            "message_delta" => stop = Some(data["delta"]["stop_reason"].clone()),
            _ => {}
        }
    }
    assert_eq!(
        started.unwrap_or_else(|| panic!("{raw}"))["name"],
        "get_weather"
    );
    let input: Value = serde_json::from_str(&partial).unwrap();
    assert_eq!(input, call["input"]);
    assert_eq!(stop, Some(json!("tool_use")));

    // The call and its result go back; the model answers in text.
    let follow = json!({"model": MODEL, "max_tokens": 20, "tools": body["tools"], "tool_choice": {"type": "none"},
        "messages": [{"role": "user", "content": "Weather in Paris?"},
                     {"role": "assistant", "content": [call]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call["id"], "content": "Sunny"}]}]});
    let (status, text) = messages(&s, &follow, None).await;
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["content"][0]["type"], "text");
}
