//! End-to-end: every failure in OpenAI's envelope with the right status, authentication,
//! overload, client disconnect, graceful shutdown, several models at once.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt;
use serde_json::{json, Value};

fn assert_envelope(v: &Value) {
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
    validate_with_spec(&v.to_string());
}

async fn raw(s: &Server, body: &str) -> (u16, Value) {
    let r = client()
        .post(s.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn invalid_requests_get_the_envelope() {
    let s = Server::start(&[]);
    let cases: Vec<(String, u16, Option<&str>, Option<&str>)> = vec![
        ("{not json".into(), 400, None, None),
        ("[]".into(), 400, None, None),
        (json!({"messages": [{"role": "user", "content": "x"}]}).to_string(), 400, Some("model"), None),
        (json!({"model": MODEL}).to_string(), 400, Some("messages"), None),
        (json!({"model": MODEL, "messages": []}).to_string(), 400, Some("messages"), None),
        (json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}).to_string(), 400, Some("temperature"), None),
        (json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 3}).to_string(), 400, Some("temperature"), Some("invalid_value")),
        (json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}).to_string(), 400, Some("stop"), None),
        (json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": true}}).to_string(), 400, Some("stream_options"), None),
        (json!({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]}).to_string(), 400, Some("messages[0].content[0].type"), None),
        (json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logit_bias": {"999999": 5}}).to_string(), 400, Some("logit_bias"), None),
        (json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": []}).to_string(), 400, Some("tools"), None),
        (json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tool_choice": "auto"}).to_string(), 400, Some("tool_choice"), None),
        (json!({"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}).to_string(), 404, Some("model"), Some("model_not_found")),
        (json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}).to_string(), 400, Some("messages"), Some("context_length_exceeded")),
    ];
    for (body, status, param, code) in cases {
        let (got, v) = raw(&s, &body).await;
        assert_eq!(got, status, "{body} -> {v}");
        assert_envelope(&v);
        if let Some(p) = param {
            assert_eq!(v["error"]["param"], p, "{body}");
        }
        if let Some(c) = code {
            assert_eq!(v["error"]["code"], c, "{body}");
        }
    }
    // A prompt longer than the context: 400 context_length_exceeded, never truncation.
    let long = "word ".repeat(3000);
    let (got, v) = raw(
        &s,
        &json!({"model": MODEL, "messages": [{"role": "user", "content": long}]}).to_string(),
    )
    .await;
    assert_eq!(got, 400);
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    let m = v["error"]["message"].as_str().unwrap();
    assert!(
        m.contains("your messages resulted in") && !m.contains("completion)"),
        "{m}"
    );
    // A prompt that fits with a completion that does not: OpenAI's message names both.
    let (got, v) = raw(
        &s,
        &json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}).to_string(),
    )
    .await;
    assert_eq!(got, 400);
    let m = v["error"]["message"].as_str().unwrap();
    let asked = m
        .split("you requested ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("{m}"));
    assert!(
        asked > 100_000 && m.contains("100000 in the completion"),
        "{m}"
    );
    // Unknown routes and methods, in the envelope too.
    let r = client().get(s.url("/v1/nothing")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_envelope(&r.json().await.unwrap());
    let r = client()
        .put(s.url("/v1/chat/completions"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_envelope(&r.json().await.unwrap());
}

#[tokio::test]
async fn invalid_values_can_be_422() {
    let s = Server::start(&["--invalid-value-status", "422"]);
    let (got, v) = raw(
        &s,
        &json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 3})
            .to_string(),
    )
    .await;
    assert_eq!(got, 422, "{v}");
    assert_eq!(v["error"]["param"], "temperature");
    // A malformed body stays 400.
    let (got, _) = raw(&s, "{oops").await;
    assert_eq!(got, 400);
}

#[tokio::test]
async fn api_keys_are_required_when_configured() {
    let s = Server::start(&["--api-key", "sk-test-1", "--api-key", "sk-test-2"]);
    let body =
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    let send = |key: Option<&'static str>| {
        let mut r = client().post(s.url("/v1/chat/completions")).json(&body);
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        r.send()
    };
    let r = send(None).await.unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "authentication_error");
    assert_envelope(&v);
    assert_eq!(send(Some("sk-wrong")).await.unwrap().status(), 401);
    assert_eq!(send(Some("sk-test-2")).await.unwrap().status(), 200);
    let r = client().get(s.url("/v1/models")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    // Health checks need no key.
    assert_eq!(get_status(&s, "/healthz").await, 200);
}

#[tokio::test]
async fn refuses_open_public_address_without_keys() {
    let model = format!("{MODEL}={}", model_path().display());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_parlance"))
        .args(["serve", "--addr", "0.0.0.0:0", "--model", &model])
        .env_remove("PARLANCE_API_KEYS")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--allow-unauthenticated"));
}

/// Reads SSE payloads from a live response until `count` content chunks arrived.
async fn read_chunks(r: reqwest::Response, count: usize) -> impl Sized {
    let mut stream = r.bytes_stream();
    let mut seen = 0;
    while seen < count {
        let b = stream.next().await.unwrap().unwrap();
        seen += String::from_utf8_lossy(&b).matches("\"content\"").count();
    }
    stream
}

/// Starts a 2,000-token stream on `s` and returns it once three chunks have come.
async fn occupy(s: &Server) -> impl Sized {
    read_chunks(send(s, &long_stream()).await, 3).await
}

fn long_stream() -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": "Write a very long story."}],
           "max_tokens": 2000, "ignore_eos": true, "stream": true})
}

#[tokio::test]
async fn full_queue_is_503_at_once_and_disconnect_frees_capacity() {
    // The count bound alone (no bound on the expected wait, which A's 2,000 tokens exceed).
    let s = Server::start(&[
        "--max-sequences",
        "1",
        "--max-queue",
        "1",
        "--max-queue-wait",
        "0",
    ]);
    // A occupies the only sequence; B waits in the only queue place.
    let a = occupy(&s).await;
    let b_body =
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3});
    let base = s.base.clone();
    let b = tokio::spawn(async move {
        client()
            .post(format!("{base}/v1/chat/completions"))
            .json(&b_body)
            .send()
            .await
            .unwrap()
    });
    // Give B time to reach the queue, then C must be refused.
    let mut refused = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let r = client().post(s.url("/v1/chat/completions")).json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "c"}], "max_tokens": 1})).send().await.unwrap();
        if r.status() == 503 {
            refused = Some(r);
            break;
        }
    }
    let r = refused.expect("a third request was never refused");
    assert!(r.headers().contains_key("retry-after"));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "overloaded");
    assert_envelope(&v);
    // Dropping A's connection cancels its generation: B (queued behind it) then completes,
    // long before A's 2000 tokens could have been generated.
    drop(a);
    let b = tokio::time::timeout(Duration::from_secs(60), b)
        .await
        .expect("B never ran: A was not cancelled")
        .unwrap();
    assert_eq!(b.status(), 200);
}

#[tokio::test]
async fn a_request_that_would_wait_too_long_is_refused_at_once() {
    // One sequence, busy with 2,000 tokens: whatever the machine, the next request would wait
    // far longer than a second for it, so it is refused at once rather than queued.
    let s = Server::start(&["--max-sequences", "1", "--max-queue-wait", "1"]);
    let a = occupy(&s).await;
    let (metrics, samples) = scrape(&s).await;
    let wait = samples
        .iter()
        .find(|(series, _)| series.starts_with("parlance_queue_wait_expected_seconds{"))
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("no expected-wait gauge in\n{metrics}"));
    assert!(wait > 1.0, "expected wait behind 2,000 tokens: {wait} s");
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                      "max_tokens": 3});
    // Refused, not queued (a queued request would have waited for A and got 200).
    let (status, headers, v) = post(&s, &body).await;
    assert_eq!(status, 503, "{v}");
    assert!(headers.contains_key("retry-after"));
    assert_eq!(v["error"]["code"], "overloaded");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("would wait about"), "{message}");
    assert_envelope(&v);
    // Once A is gone the same request runs.
    drop(a);
    let mut ok = false;
    for _ in 0..100 {
        let (status, _, _) = post(&s, &body).await;
        if status == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "the request was still refused after A was cancelled");
}

#[tokio::test]
async fn shutdown_lets_in_flight_streams_finish() {
    let s = Server::start(&["--shutdown-grace-seconds", "60"]);
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Tell a story."}],
                      "max_tokens": 60, "ignore_eos": true, "stream": true});
    let r = client()
        .post(s.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut stream = r.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).starts_with("data: "));
    // SIGTERM while the stream runs: it still completes, then the process exits 0.
    s.terminate();
    let mut rest = String::from_utf8_lossy(&first).into_owned();
    while let Some(Ok(b)) = stream.next().await {
        rest.push_str(&String::from_utf8_lossy(&b));
    }
    let data = sse_data(&rest);
    assert_eq!(
        data.last().map(String::as_str),
        Some("[DONE]"),
        "stream was cut by shutdown"
    );
    let mut s = s;
    let status = wait_exit(&mut s.child, Duration::from_secs(30));
    assert_eq!(status.and_then(|s| s.code()), Some(0));
}

fn wait_exit(child: &mut std::process::Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let end = std::time::Instant::now() + limit;
    while std::time::Instant::now() < end {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[tokio::test]
async fn config_file_layered_under_flags() {
    let dir = std::env::temp_dir().join(format!("parlance-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("parlance.toml");
    std::fs::write(
        &cfg,
        format!(
            "addr = \"127.0.0.1:1\"\napi_keys = [\"sk-from-file\"]\ninvalid_value_status = 422\n\n[engine]\nmax_sequences = 2\n\n[[models]]\nname = \"from-file\"\npath = \"{}\"\ncontext_length = 512\n",
            model_path().display()
        ),
    )
    .unwrap();
    // The flag's address wins over the file's; keys from the file and the flag both work.
    let s = Server::start_raw(&[
        "serve",
        "--config",
        cfg.to_str().unwrap(),
        "--addr",
        "127.0.0.1:0",
        "--api-key",
        "sk-from-flag",
        "--exit-on-stdin-eof",
    ]);
    for key in ["sk-from-file", "sk-from-flag"] {
        let r = client()
            .get(s.url("/v1/models"))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{key}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["data"][0]["id"], "from-file");
        assert_eq!(v["data"][0]["context_length"], 512);
    }
    let r = client()
        .post(s.url("/v1/chat/completions"))
        .bearer_auth("sk-from-file")
        .json(&json!({"model": "from-file", "messages": [{"role": "user", "content": "x"}], "top_p": 7}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    drop(s);
    // A typo in the file is an error that names the key.
    std::fs::write(&cfg, "adress = \"127.0.0.1:0\"\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_parlance"))
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("adress"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn more_choices_than_sequences_run_in_waves() {
    let s = Server::start(&["--max-sequences", "2"]);
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                      "max_tokens": 4, "n": 5, "temperature": 0});
    let (status, _, v) = post(&s, &body).await;
    assert_eq!(status, 200, "{v}");
    let choices = v["choices"].as_array().unwrap();
    let idx: Vec<u64> = choices
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    assert_eq!(idx, vec![0, 1, 2, 3, 4]);
    // Greedy: every wave continues the same prompt the same way.
    for c in choices {
        assert_eq!(c["message"]["content"], choices[0]["message"]["content"]);
    }
    assert_eq!(v["usage"]["completion_tokens"], 20);
}

#[tokio::test]
async fn several_models_at_once() {
    let path = model_path();
    let a = format!("alpha={}", path.display());
    let b = format!("beta={}", path.display());
    let s = Server::start_raw(&[
        "serve",
        "--addr",
        "127.0.0.1:0",
        "--exit-on-stdin-eof",
        "--model",
        &a,
        "--model",
        &b,
        "--context-length",
        "1024",
    ]);
    let list: Value = client()
        .get(s.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["alpha", "beta"]);
    assert_eq!(list["data"][0]["context_length"], 1024);
    for m in ["alpha", "beta"] {
        let body =
            json!({"model": m, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3});
        let r = client()
            .post(s.url("/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["model"], m);
    }
}
