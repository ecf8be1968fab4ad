//! What operators watch, end to end against the real binary and model: JSON logs carrying the
//! request id that the response header also carries, OpenTelemetry spans exported over OTLP to
//! a collector (a real HTTP server here) with one span per request and its children, and no
//! secret in either.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{client, Server, MODEL};
use serde_json::{json, Value};

const KEY: &str = "sk-trace-secret-7731";

/// A collector: keeps every OTLP/JSON export it is sent.
async fn collector() -> (String, Arc<Mutex<Vec<Value>>>) {
    let seen: Arc<Mutex<Vec<Value>>> = Arc::default();
    let s = seen.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let s = s.clone();
            async move {
                let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                s.lock().unwrap().push(v);
                axum::Json(json!({}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), seen)
}

/// Every span exported so far, flattened.
fn spans(seen: &Mutex<Vec<Value>>) -> Vec<Value> {
    let mut out = Vec::new();
    for export in seen.lock().unwrap().iter() {
        for rs in export["resourceSpans"].as_array().into_iter().flatten() {
            for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                out.extend(ss["spans"].as_array().into_iter().flatten().cloned());
            }
        }
    }
    out
}

fn attribute<'a>(span: &'a Value, key: &str) -> Option<&'a Value> {
    span["attributes"]
        .as_array()?
        .iter()
        .rev()
        .find(|a| a["key"] == key)
        .map(|a| &a["value"])
}

#[tokio::test]
async fn requests_are_traced_over_otlp_and_logged_as_json_with_their_id() {
    let (endpoint, seen) = collector().await;
    let s = Server::start_env(
        &[
            "--api-key",
            KEY,
            "--log-format",
            "json",
            "--otlp-endpoint",
            &endpoint,
            "--otlp-protocol",
            "http/json",
        ],
        &[
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            // Chatty, to show that even debug logs carry no secret.
            ("RUST_LOG", "debug,llama-cpp-2=warn,llama_cpp_2=warn"),
        ],
    );
    let r = client()
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .header("x-request-id", "req-trace-0001")
        .json(&json!({"model": MODEL, "max_tokens": 4, "stream": true,
                      "messages": [{"role": "user", "content": "Hello"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-request-id"], "req-trace-0001");
    let _ = r.text().await.unwrap();
    // Without one, the server makes an id and returns it.
    let r = client()
        .get(s.url("/v1/models"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    let made = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(made.starts_with("req_") && made.len() > 10, "{made}");

    // The request span and its children reach the collector.
    let wanted = [
        "request",
        "admission",
        "provider_attempt",
        "first_token",
        "settlement",
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    let all = loop {
        let all = spans(&seen);
        let traced = all.iter().any(|sp| {
            sp["name"] == "request"
                && attribute(sp, "id").map(|v| v["stringValue"] == "req-trace-0001") == Some(true)
        });
        if traced && wanted.iter().all(|w| all.iter().any(|sp| sp["name"] == *w)) {
            break all;
        }
        assert!(Instant::now() < deadline, "spans missing; got {all:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let request = all
        .iter()
        .find(|sp| {
            sp["name"] == "request"
                && attribute(sp, "id").map(|v| v["stringValue"] == "req-trace-0001") == Some(true)
        })
        .unwrap();
    assert_eq!(attribute(request, "model").unwrap()["stringValue"], MODEL);
    // The usage record's id is on the span too (the dashboard shows that one).
    let usage_id = attribute(request, "usage_id").unwrap()["stringValue"]
        .as_str()
        .unwrap();
    assert!(usage_id.len() >= 32, "{usage_id}");
    assert_eq!(
        attribute(request, "route").unwrap()["stringValue"],
        "/v1/chat/completions"
    );
    for child in ["admission", "provider_attempt", "first_token", "settlement"] {
        let sp = all
            .iter()
            .find(|sp| sp["name"] == child && sp["parentSpanId"] == request["spanId"])
            .unwrap_or_else(|| panic!("no {child} span under the request: {all:#?}"));
        assert_eq!(sp["traceId"], request["traceId"]);
    }
    let settlement = all
        .iter()
        .find(|sp| sp["name"] == "settlement" && sp["parentSpanId"] == request["spanId"])
        .unwrap();
    assert_eq!(
        attribute(settlement, "outcome").unwrap()["stringValue"],
        "completed"
    );
    // The request span ends after its settlement: it covers the whole streamed answer.
    let end = |sp: &Value| {
        sp["endTimeUnixNano"]
            .as_str()
            .unwrap()
            .parse::<u128>()
            .unwrap()
    };
    assert!(end(request) >= end(settlement));

    // JSON logs: every line parses, the request's lines carry its id.
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match s
            .stderr
            .lock()
            .unwrap()
            .recv_timeout(Duration::from_millis(300))
        {
            Ok(l) => lines.push(l),
            Err(_) if !lines.is_empty() => break,
            Err(_) => {}
        }
    }
    let logs: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect();
    assert!(
        logs.iter().any(
            |l| l["span"]["id"] == "req-trace-0001" && l["fields"]["message"] == "request done"
        ),
        "no log line with the request id: {lines:#?}"
    );
    let everything = format!("{lines:?}{:?}", seen.lock().unwrap());
    assert!(
        !everything.contains(KEY),
        "the key reached the logs or spans"
    );
    assert!(
        !everything.to_ascii_lowercase().contains("bearer"),
        "the Authorization header reached the logs or spans"
    );
}
