//! Thinking on a local model, end to end: the default weights with a chat template that has a
//! thinking mode (`scripts/thinking-model.sh` makes it; the generation prompt opens `<think>`,
//! or closes an empty thought when `reasoning_effort` is `none`). The weights never close the
//! thought themselves, so all they write is reasoning: these tests check the path from the
//! template's switch to `reasoning_content`, `reasoning_tokens` and Anthropic's thinking blocks.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

mod common;

use common::{client, post, post_stream, Server};
use serde_json::{json, Value};

fn thinking_model() -> String {
    std::env::var("PARLANCE_TEST_THINKING_MODEL").unwrap_or_else(|_| {
        panic!("PARLANCE_TEST_THINKING_MODEL is not set: run the tests through scripts/test.sh, or export it from scripts/thinking-model.sh")
    })
}

fn server() -> Server {
    let model = format!("thinker={}", thinking_model());
    Server::start_raw(&[
        "serve",
        "--addr",
        "127.0.0.1:0",
        "--model",
        &model,
        "--exit-on-stdin-eof",
    ])
}

fn ask(effort: Option<&str>) -> Value {
    let mut b = json!({"model": "thinker", "max_tokens": 8, "temperature": 0, "ignore_eos": true,
                       "messages": [{"role": "user", "content": "What is 2+2?"}]});
    if let Some(e) = effort {
        b["reasoning_effort"] = json!(e);
    }
    b
}

#[tokio::test]
async fn the_thought_goes_to_reasoning_content() {
    let s = server();
    let (st, _, v) = post(&s, &ask(None)).await;
    assert_eq!(st, 200, "{v}");
    let m = &v["choices"][0]["message"];
    assert!(!m["reasoning_content"].as_str().unwrap().is_empty(), "{v}");
    assert_eq!(m["content"], "", "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 8);
    assert_eq!(
        v["usage"]["completion_tokens_details"]["reasoning_tokens"],
        8
    );
    common::validate_with_spec(&v.to_string());

    // Streamed: the same thought, as reasoning deltas.
    let mut body = ask(None);
    body["stream"] = json!(true);
    let (_, _, data) = post_stream(&s, &body).await;
    let thought: String =
        common::delta_strings(&data, "/choices/0/delta/reasoning_content").concat();
    assert_eq!(thought, m["reasoning_content"].as_str().unwrap());

    // `none` turns thinking off: the template closes the thought and the words are the answer.
    let (_, _, v) = post(&s, &ask(Some("none"))).await;
    let m = &v["choices"][0]["message"];
    assert!(m.get("reasoning_content").is_none(), "{v}");
    assert!(!m["content"].as_str().unwrap().is_empty(), "{v}");
    assert_eq!(
        v["usage"]["completion_tokens_details"]["reasoning_tokens"],
        0
    );

    // The Anthropic door shows a thinking block.
    let r = client()
        .post(s.url("/v1/messages"))
        .json(&json!({"model": "thinker", "max_tokens": 8,
                      "messages": [{"role": "user", "content": "What is 2+2?"}]}))
        .send()
        .await
        .unwrap();
    let m: Value = r.json().await.unwrap();
    assert_eq!(m["content"][0]["type"], "thinking", "{m}");
}

/// The effort sets a budget: past it the thought is closed for the model and the rest of the
/// tokens are the answer.
#[tokio::test]
async fn the_effort_bounds_the_thought() {
    let s = server();
    let mut body = ask(Some("minimal"));
    body["max_tokens"] = json!(160);
    let (st, _, v) = post(&s, &body).await;
    assert_eq!(st, 200, "{v}");
    let m = &v["choices"][0]["message"];
    let thought = m["reasoning_content"].as_str().unwrap();
    let answer = m["content"].as_str().unwrap();
    assert!(!thought.is_empty() && !answer.is_empty(), "{v}");
    assert!(
        !thought.contains("</think>") && !answer.contains("</think>"),
        "{v}"
    );
    let reasoning = v["usage"]["completion_tokens_details"]["reasoning_tokens"]
        .as_u64()
        .unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 160);
    // About 128 of the 160 tokens thought (apportioned by characters).
    assert!((90..=150).contains(&reasoning), "{v}");
    // `high` has no budget: the whole completion is the thought.
    let (_, _, v) = post(&s, &{
        let mut b = ask(Some("high"));
        b["max_tokens"] = json!(160);
        b
    })
    .await;
    assert_eq!(v["choices"][0]["message"]["content"], "", "{v}");
}
