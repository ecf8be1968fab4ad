//! Content filters end to end: the real binary with `[[filters]]` in its config file, the real
//! default model (prompts whose greedy answers reliably contain the filtered words) and the
//! echo provider (answers with the caller's words, so input redaction is visible), through
//! both doors, streamed and not, and the hits in the usage records.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

mod common;

use std::time::Duration;

use common::{client, delta_strings, model_path, post, post_stream, Server, MODEL};
use serde_json::{json, Value};

const ADMIN: &str = "adm-filters";

fn server() -> Server {
    let dir = std::env::temp_dir().join(format!("parlance-filters-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("parlance.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[[models]]
name = "{MODEL}"
path = "{}"

[[models]]
name = "echo"
provider = "echo"

[[filters]]
name = "fruit"
kind = "terms"
terms = ["banana"]
action = "block"
applies_to = "output"

[[filters]]
name = "day"
kind = "terms"
terms = ["today"]
action = "redact"
applies_to = "output"
replacement = "[DAY]"

[[filters]]
name = "secrets"
kind = "regex"
pattern = "password[0-9]+"
applies_to = "input"

[[filters]]
name = "phones"
kind = "phone"
action = "redact"
applies_to = "input"
"#,
            model_path().display()
        ),
    )
    .unwrap();
    Server::start_raw(&[
        "serve",
        "--config",
        cfg.to_str().unwrap(),
        "--addr",
        "127.0.0.1:0",
        "--admin-token",
        ADMIN,
        "--exit-on-stdin-eof",
    ])
}

fn greedy(content: &str) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": content}],
           "max_tokens": 30, "temperature": 0})
}

/// Content and finish reason of a streamed answer, and its raw payloads.
async fn streamed(s: &Server, body: &Value) -> (String, String, Vec<String>) {
    let mut body = body.clone();
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let (status, _, data) = post_stream(s, &body).await;
    assert_eq!(status, 200);
    let text = delta_strings(&data, "/choices/0/delta/content").concat();
    let finish = delta_strings(&data, "/choices/0/finish_reason").concat();
    (text, finish, data)
}

#[tokio::test]
async fn filters_block_and_redact_input_and_output() {
    let s = server();

    // Output block, plain: nothing from the match on, the generation stopped early, and the
    // usage counts what was generated.
    let body = greedy("Repeat exactly: I like banana bread.");
    let (status, _, v) = post(&s, &body).await;
    assert_eq!(status, 200, "{v}");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!text.to_lowercase().contains("banana"), "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "content_filter", "{v}");
    let used = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..30).contains(&used), "stopped at the match: {v}");
    // Streamed: the same text, the same end, and the word never on the wire.
    let (stext, finish, data) = streamed(&s, &body).await;
    assert_eq!((stext.as_str(), finish.as_str()), (text, "content_filter"));
    assert!(data.iter().all(|d| !d.to_lowercase().contains("banana")));
    let usage: Value = data
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find(|c| c["usage"].is_object())
        .unwrap();
    // The work stops at the next step after the block, so one run may count a token more
    // than another: the usage is what the engine really generated, far short of max_tokens.
    let sused = usage["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(sused.abs_diff(used) <= 2 && sused < 30, "{sused} vs {used}");

    // Output redaction: the greedy answer says "today" (twice); the caller sees "[DAY]".
    let body = greedy("Repeat exactly: contact bob.smith@mail.org today");
    let (_, _, v) = post(&s, &body).await;
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(text.contains("[DAY]"), "{v}");
    assert!(!text.to_lowercase().contains("today"), "{v}");
    assert_ne!(v["choices"][0]["finish_reason"], "content_filter");
    let (stext, _, data) = streamed(&s, &body).await;
    assert_eq!(stext, text, "streamed redaction is the plain one");
    assert!(data.iter().all(|d| !d.to_lowercase().contains("today")));
    // Log probabilities never show a redacted token either (they carry token text): those of
    // text held back with a match are dropped.
    let mut lp = body.clone();
    lp["logprobs"] = json!(true);
    lp["top_logprobs"] = json!(2);
    let (_, _, v) = post(&s, &lp).await;
    assert_eq!(v["choices"][0]["message"]["content"], json!(text), "{v}");
    assert!(v["choices"][0]["logprobs"]["content"].is_array(), "{v}");
    assert!(
        !v["choices"][0]["logprobs"]
            .to_string()
            .to_lowercase()
            .contains("today"),
        "{v}"
    );
    let (_, _, data) = streamed(&s, &lp).await;
    assert!(data.iter().all(|d| !d.to_lowercase().contains("today")));

    // Input block: 400 content_policy_violation before any work, for every provider.
    for model in [MODEL, "echo"] {
        let (status, _, v) = post(
            &s,
            &json!({"model": model, "messages": [
                {"role": "user", "content": "hello"},
                {"role": "user", "content": "my password42 is safe"}]}),
        )
        .await;
        assert_eq!(status, 400, "{v}");
        assert_eq!(v["error"]["code"], "content_policy_violation");
        assert_eq!(v["error"]["param"], "messages[1].content");
        assert!(v["error"]["message"].as_str().unwrap().contains("secrets"));
    }

    // Input redaction: the model gets the redacted text (the echo provider shows it).
    let (status, _, v) = post(
        &s,
        &json!({"model": "echo", "messages": [
            {"role": "user", "content": "call me on +1 415 555 0100 please"}]}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let echoed = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        echoed.contains("[REDACTED]") && !echoed.contains("555"),
        "{v}"
    );

    // Output filters apply to every provider (echo has no tally: drained to its usage), and
    // the Anthropic door reports a blocked answer as a refusal.
    let r = client()
        .post(s.url("/v1/messages"))
        .json(&json!({"model": "echo", "max_tokens": 50,
                      "messages": [{"role": "user", "content": "we sell banana cake"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let m: Value = r.json().await.unwrap();
    assert_eq!(m["stop_reason"], "refusal", "{m}");
    assert!(!m.to_string().contains("banana"), "{m}");
    // Streamed at the same door: the message_delta carries the refusal, no event the word.
    let r = client()
        .post(s.url("/v1/messages"))
        .json(&json!({"model": "echo", "max_tokens": 50, "stream": true,
                      "messages": [{"role": "user", "content": "we sell banana cake"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    assert!(!body.contains("banana"), "{body}");
    let delta = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find(|e| e["type"] == "message_delta")
        .unwrap_or_else(|| panic!("no message_delta in {body}"));
    assert_eq!(delta["delta"]["stop_reason"], "refusal", "{delta}");

    // A project adds its own filters to the server's: "like" is redacted for its requests
    // only, and the server's block still applies.
    let admin = |method: reqwest::Method, path: &str, body: Value| {
        let r = client()
            .request(method, s.url(path))
            .bearer_auth(ADMIN)
            .json(&body);
        async move {
            let r = r.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (st, p) = admin(
        reqwest::Method::POST,
        "/admin/projects",
        json!({"name": "careful", "default_model": MODEL, "filters": [
            {"name": "likes", "kind": "terms", "terms": ["like"], "action": "redact",
             "replacement": "[LIKE]", "applies_to": "output"}]}),
    )
    .await;
    assert_eq!(st, 201, "{p}");
    assert_eq!(p["spec"]["filters"][0]["name"], "likes", "{p}");
    let mut body = greedy("Repeat exactly: I like banana bread.");
    body["model"] = json!("careful");
    let (_, _, v) = post(&s, &body).await;
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.contains("[LIKE]") && !text.contains("like"), "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "content_filter", "{v}");
    // A filter that cannot compile is refused when the project is saved.
    let (st, e) = admin(
        reqwest::Method::POST,
        "/admin/projects",
        json!({"name": "broken", "default_model": MODEL, "filters": [
            {"name": "bad", "kind": "regex", "pattern": "(unclosed"}]}),
    )
    .await;
    assert_eq!(st, 400, "{e}");
    assert_eq!(e["error"]["param"], "filters", "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("bad"),
        "{e}"
    );

    // Hits are in the usage records: 2 output blocks + 2 redacted answers (≥ 2 hits each:
    // "today" twice is the model's greedy answer, counted loosely), 2 input blocks, 1
    // redacted phone number, 2 blocks at the Anthropic door, the project's redaction and block.
    let mut hits = 0;
    for _ in 0..100 {
        let r = client()
            .get(s.url("/admin/usage"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        let u: Value = r.json().await.unwrap();
        hits = u["data"][0]["filter_hits"].as_i64().unwrap_or(0);
        if hits >= 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(hits >= 10, "filter hits recorded: {hits}");
}
