//! End-to-end: the real binary, the real default model, real HTTP. Chat completions in
//! OpenAI's shape, plain and streamed, and every request field of the contract.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::sync::OnceLock;

/// One server shared by the tests of this file (they do not change its state).
fn shared() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| Server::start(&[]))
}

fn greedy(content: &str, max_tokens: u32) -> Value {
    let mut b = chat(content);
    b["temperature"] = json!(0);
    b["max_tokens"] = json!(max_tokens);
    b
}

#[tokio::test]
async fn plain_completion_has_openais_shape() {
    let s = shared();
    let (status, _, v) = post(s, &greedy("What is the capital of France?", 24)).await;
    assert_eq!(status, 200, "{v}");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], MODEL);
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    let choice = &v["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert!(choice["message"].get("refusal").is_some_and(Value::is_null));
    assert!(choice.get("logprobs").is_some_and(Value::is_null));
    assert!(!content(&v).is_empty());
    let u = &v["usage"];
    let (p, c) = (
        u["prompt_tokens"].as_u64().unwrap(),
        u["completion_tokens"].as_u64().unwrap(),
    );
    assert!(p > 10 && c > 0, "{u}");
    assert_eq!(u["total_tokens"].as_u64().unwrap(), p + c);
    assert!(u["prompt_tokens_details"]["cached_tokens"].is_u64());
    assert_eq!(u["completion_tokens_details"]["reasoning_tokens"], 0);
    let fp = v["system_fingerprint"].as_str().unwrap();
    assert!(fp.starts_with("fp_"));
    // Stable for the same model file and build.
    let (_, _, v2) = post(s, &greedy("Hello", 2)).await;
    assert_eq!(v2["system_fingerprint"], fp);
    validate_with_spec(&v.to_string());
}

#[tokio::test]
async fn greedy_is_deterministic_and_max_tokens_gives_length() {
    let s = shared();
    let (_, _, a) = post(s, &greedy("Tell me about the sea.", 12)).await;
    let (_, _, b) = post(s, &greedy("Tell me about the sea.", 12)).await;
    assert_eq!(content(&a), content(&b));
    assert_eq!(a["choices"][0]["finish_reason"], "length");
    assert_eq!(a["usage"]["completion_tokens"], 12);

    // max_completion_tokens wins over max_tokens.
    let mut body = greedy("Tell me about the sea.", 12);
    body["max_completion_tokens"] = json!(5);
    let (_, _, c) = post(s, &body).await;
    assert_eq!(c["usage"]["completion_tokens"], 5);
    assert_eq!(c["choices"][0]["finish_reason"], "length");
    assert!(content(&a).starts_with(&content(&c)));
}

#[tokio::test]
async fn natural_end_is_stop() {
    let s = shared();
    let (_, _, v) = post(s, &greedy("Say hi.", 200)).await;
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() < 200);
}

#[tokio::test]
async fn stop_string_cuts_text_and_is_not_included() {
    let s = shared();
    let (_, _, v) = post(s, &greedy("Write three sentences about dogs.", 40)).await;
    let full = content(&v);
    // A stop string from the middle of the greedy text, possibly spanning tokens.
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() > 20, "{full}");
    let stop: String = chars[10..14].iter().collect();
    let expected = &full[..full.find(&stop).unwrap()];
    for stream in [false, true] {
        let mut body = greedy("Write three sentences about dogs.", 40);
        body["stop"] = json!([stop, "never-appears-xyz"]);
        let (text, finish) = if stream {
            body["stream"] = json!(true);
            let (_, _, data) = post_stream(s, &body).await;
            collect_stream(&data)
        } else {
            let (_, _, r) = post(s, &body).await;
            (
                content(&r),
                r["choices"][0]["finish_reason"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            )
        };
        assert_eq!(text, expected, "stream={stream}");
        assert_eq!(finish, "stop");
    }
}

/// Text and finish reason of choice 0 from SSE payloads.
fn collect_stream(data: &[String]) -> (String, String) {
    let mut text = String::new();
    let mut finish = String::new();
    for d in data {
        if d == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(d).unwrap();
        for c in v["choices"].as_array().unwrap() {
            if c["index"] == 0 {
                if let Some(t) = c["delta"]["content"].as_str() {
                    text.push_str(t);
                }
                if let Some(f) = c["finish_reason"].as_str() {
                    finish = f.to_owned();
                }
            }
        }
    }
    (text, finish)
}

#[tokio::test]
async fn seed_reproduces_sampled_text() {
    let s = shared();
    let body = |seed: u64| {
        let mut b = chat("Invent a name for a cat.");
        b["temperature"] = json!(1.2);
        b["seed"] = json!(seed);
        b["max_tokens"] = json!(16);
        b
    };
    let (_, _, a) = post(s, &body(42)).await;
    let (_, _, b) = post(s, &body(42)).await;
    assert_eq!(content(&a), content(&b));
    let mut differs = false;
    for seed in [1, 2, 3] {
        let (_, _, c) = post(s, &body(seed)).await;
        differs |= content(&c) != content(&a);
    }
    assert!(differs, "different seeds all gave the same text");
}

#[tokio::test]
async fn n_choices_share_the_prompt_and_sum_usage() {
    let s = shared();
    let mut body = chat("Name a fruit.");
    body["n"] = json!(3);
    body["max_tokens"] = json!(6);
    body["ignore_eos"] = json!(true);
    body["seed"] = json!(5);
    let (status, _, v) = post(s, &body).await;
    assert_eq!(status, 200, "{v}");
    let choices = v["choices"].as_array().unwrap();
    let idx: Vec<u64> = choices
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    assert_eq!(idx, vec![0, 1, 2]);
    assert_eq!(v["usage"]["completion_tokens"], 18);
    let (_, _, one) = post(s, &greedy("Name a fruit.", 1)).await;
    assert_eq!(v["usage"]["prompt_tokens"], one["usage"]["prompt_tokens"]);
    validate_with_spec(&v.to_string());

    // Greedy choices continue the one shared prompt evaluation: all equal the n = 1 answer.
    let mut g = greedy("Name a fruit.", 10);
    let (_, _, single) = post(s, &g).await;
    g["n"] = json!(3);
    let (_, _, many) = post(s, &g).await;
    for c in many["choices"].as_array().unwrap() {
        assert_eq!(
            c["message"]["content"],
            single["choices"][0]["message"]["content"]
        );
    }

    // Streamed: each choice gets its role once and its own finish chunk.
    body["stream"] = json!(true);
    let (_, _, data) = post_stream(s, &body).await;
    let mut roles = [0; 3];
    let mut finishes = [0; 3];
    for d in data.iter().filter(|d| *d != "[DONE]") {
        let c: Value = serde_json::from_str(d).unwrap();
        for ch in c["choices"].as_array().unwrap() {
            let i = ch["index"].as_u64().unwrap() as usize;
            if ch["delta"].get("role").is_some() {
                roles[i] += 1;
            }
            if !ch["finish_reason"].is_null() {
                finishes[i] += 1;
                assert_eq!(ch["delta"], json!({}));
            }
        }
    }
    assert_eq!(roles, [1, 1, 1]);
    assert_eq!(finishes, [1, 1, 1]);
}

#[tokio::test]
async fn streaming_wire_format() {
    let s = shared();
    let mut body = greedy("Count from one to five.", 20);
    let (_, _, plain) = post(s, &body).await;
    body["stream"] = json!(true);
    let r = client()
        .post(s.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let raw = r.text().await.unwrap();
    let data = sse_data(&raw);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let id = chunks[0]["id"].clone();
    assert!(id.as_str().unwrap().starts_with("chatcmpl-"));
    for (i, c) in chunks.iter().enumerate() {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], id);
        assert_eq!(c["created"], chunks[0]["created"]);
        assert_eq!(c["model"], MODEL);
        assert!(c.get("usage").is_none(), "usage without include_usage: {c}");
        let has_role = c["choices"][0]["delta"].get("role").is_some();
        assert_eq!(has_role, i == 0, "role only on the first chunk");
    }
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["delta"], json!({}));
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    let (text, _) = collect_stream(&data);
    assert_eq!(text, content(&plain), "streamed text equals the plain text");
    validate_with_spec(&raw);

    // With include_usage: one more chunk with empty choices and the usage.
    body["stream_options"] = json!({"include_usage": true});
    let (_, _, data) = post_stream(s, &body).await;
    let usage_chunk: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    // The same counts (what the prefix cache reused may differ from one request to the next).
    let counts = |u: &Value| {
        json!([
            u["prompt_tokens"],
            u["completion_tokens"],
            u["total_tokens"],
            u["completion_tokens_details"]
        ])
    };
    assert_eq!(counts(&usage_chunk["usage"]), counts(&plain["usage"]));
    assert!(
        usage_chunk["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64()
            < usage_chunk["usage"]["prompt_tokens"].as_u64()
    );
    for d in &data[..data.len() - 2] {
        let c: Value = serde_json::from_str(d).unwrap();
        assert!(c["usage"].is_null());
    }
}

#[tokio::test]
async fn multibyte_text_is_never_split() {
    let s = shared();
    let mut body = chat("Écris une phrase en français avec des accents, puis des emojis 🎉🌍.");
    body["max_tokens"] = json!(60);
    body["seed"] = json!(11);
    body["stream"] = json!(true);
    let (_, _, data) = post_stream(s, &body).await;
    for d in data.iter().filter(|d| *d != "[DONE]") {
        let v: Value = serde_json::from_str(d).unwrap();
        if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
            assert!(
                !t.contains('\u{fffd}'),
                "a split character became U+FFFD: {t:?}"
            );
        }
    }
}

#[tokio::test]
async fn sampling_fields_are_honoured() {
    let s = shared();
    // A +100 bias on one token makes greedy decoding repeat it.
    let mut body = greedy("Hello", 5);
    body["logit_bias"] = json!({"1000": 100});
    let (status, _, v) = post(s, &body).await;
    assert_eq!(status, 200, "{v}");
    let t = content(&v);
    assert!(!t.is_empty());
    let unit = &t[..t.len() / 5];
    assert_eq!(t, unit.repeat(5), "{t:?}");

    // top_k = 1 is greedy even at a high temperature.
    let (_, _, g) = post(s, &greedy("Describe the moon.", 12)).await;
    let mut body = chat("Describe the moon.");
    body["temperature"] = json!(2);
    body["top_k"] = json!(1);
    body["max_tokens"] = json!(12);
    let (_, _, k) = post(s, &body).await;
    assert_eq!(content(&k), content(&g));

    // The other extensions and penalties are accepted and change nothing they should not.
    let mut body = greedy("Describe the moon.", 12);
    for (f, v) in [
        ("min_p", json!(0.1)),
        ("top_p", json!(0.9)),
        ("presence_penalty", json!(0.0)),
        ("frequency_penalty", json!(0.0)),
        ("repetition_penalty", json!(1.0)),
    ] {
        body[f] = v;
    }
    body["user"] = json!("user-1");
    body["metadata"] = json!({"team": "a"});
    let (_, _, same) = post(s, &body).await;
    assert_eq!(content(&same), content(&g));
    // A strong frequency penalty changes a repetitive greedy answer.
    body["frequency_penalty"] = json!(2.0);
    body["max_tokens"] = json!(40);
    let (_, _, pen) = post(s, &body).await;
    let (_, _, base) = post(s, &greedy("Describe the moon.", 40)).await;
    assert_ne!(content(&pen), content(&base));
}

#[tokio::test]
async fn roles_parts_and_history() {
    let s = shared();
    let body = json!({"model": MODEL, "max_tokens": 8, "temperature": 0, "messages": [
        {"role": "developer", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?", "name": "bob"},
    ]});
    let (status, _, v) = post(s, &body).await;
    assert_eq!(status, 200, "{v}");
    // A trailing assistant message is a finished turn, not a prefill to continue: the answer
    // is a new turn, so it equals the answer to the same history with that turn completed.
    let prefill = json!({"model": MODEL, "max_tokens": 8, "temperature": 0, "messages": [
        {"role": "user", "content": "Say a word."},
        {"role": "assistant", "content": "The word is"},
    ]});
    let (status, _, v) = post(s, &prefill).await;
    assert_eq!(status, 200, "{v}");
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn api_prefix_alias_and_models() {
    let s = shared();
    let r = client()
        .post(s.url("/api/v1/chat/completions"))
        .json(&greedy("Hi", 2))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let list: Value = client()
        .get(s.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["object"], "list");
    let m = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == MODEL)
        .unwrap()
        .clone();
    assert_eq!(m["object"], "model");
    assert_eq!(m["context_length"], 2048);
    validate_with_spec(&list.to_string());
    let one: Value = client()
        .get(s.url(&format!("/v1/models/{MODEL}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(one, m);
    let r = client().get(s.url("/v1/models/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "model_not_found");
    assert_eq!(get_status(s, "/healthz").await, 200);
    assert_eq!(get_status(s, "/readyz").await, 200);
}

/// The text and each token's log probability, exactly as sent.
fn tokens_and_logprobs(v: &Value) -> (String, Vec<(String, f64)>) {
    let lp = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    let each = lp
        .iter()
        .map(|t| {
            (
                t["token"].as_str().unwrap().to_string(),
                t["logprob"].as_f64().unwrap(),
            )
        })
        .collect();
    (content(v), each)
}

#[tokio::test]
async fn concurrent_greedy_matches_solo() {
    batch_invariance(shared(), 32).await;
}

#[tokio::test]
async fn concurrent_greedy_matches_solo_with_plain_attention() {
    // 8-way: this server shares the two cores with the file's other one.
    let s = Server::start(&["--no-flash-attention"]);
    batch_invariance(&s, 8).await;
    // Another attention, other last bits: another fingerprint.
    let fp = |v: Value| v["system_fingerprint"].as_str().unwrap().to_string();
    let body = greedy("Hello", 1);
    assert_ne!(
        fp(post(&s, &body).await.2),
        fp(post(shared(), &body).await.2)
    );
}

/// A greedy request with a prompt of some 330 tokens (40 facts), log probabilities on.
fn facts_body() -> Value {
    let facts: String = (1..=40)
        .map(|i| format!("Fact {i}: the number {i} squared is {}. ", i * i))
        .collect();
    let mut body = greedy(&format!("{facts}\nSummarise these facts."), 40);
    body["logprobs"] = json!(true);
    body
}

/// Prompts of `--long-prompt-tokens` (512) tokens or more run in a second context, with the
/// plain attention: a long prompt's output is the plain attention's (to the last bit of every
/// log probability, as from a server with only the plain attention), a short one's the flash
/// attention's. (`concurrent_greedy_matches_solo` runs both contexts at once.)
#[tokio::test]
async fn long_prompts_take_the_plain_attention_context() {
    let plain = Server::start(&["--no-flash-attention"]);
    let flash = Server::start(&["--long-prompt-tokens", "0"]);
    let long = facts_body();
    let (status, _, v) = post(shared(), &long).await;
    assert_eq!(status, 200, "{v}");
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() >= 512);
    let lanes = tokens_and_logprobs(&v);
    assert_eq!(lanes, tokens_and_logprobs(&post(&plain, &long).await.2));
    assert_ne!(lanes.1, tokens_and_logprobs(&post(&flash, &long).await.2).1);
    let mut short = greedy("Write a poem about the number 3.", 12);
    short["logprobs"] = json!(true);
    assert_eq!(
        tokens_and_logprobs(&post(shared(), &short).await.2),
        tokens_and_logprobs(&post(&flash, &short).await.2)
    );
    // The threshold decides outputs, so it is part of the fingerprint.
    let fp = |v: Value| v["system_fingerprint"].as_str().unwrap().to_string();
    assert_ne!(
        fp(post(shared(), &short).await.2),
        fp(post(&flash, &short).await.2)
    );
}

/// api-contract 32: the same greedy request alone and under `n`-way concurrency gives the same
/// output, compared here to the last bit of every log probability. The prompt is long (some 700
/// tokens: past 256, where a lone sequence and a batch of them could take different attention
/// paths, and past 512, so that with the defaults it runs in the plain-attention context while
/// the short ones run in the flash attention's), and the other requests come and go while it
/// runs.
async fn batch_invariance(s: &Server, n: u32) {
    let body = facts_body();
    let (status, _, v) = post(s, &body).await;
    assert_eq!(status, 200, "{v}");
    assert!(
        v["usage"]["prompt_tokens"].as_u64().unwrap() > 300,
        "{}",
        v["usage"]
    );
    let solo = tokens_and_logprobs(&v);
    assert_eq!(solo.1.len(), 40);
    // Short prompts that arrive together are computed several to a pass: two of them alone.
    let poem = |i: u32| {
        let mut b = greedy(&format!("Write a poem about the number {i}."), 8 + 3 * i);
        b["logprobs"] = json!(true);
        b
    };
    let mut poems_solo = Vec::new();
    for i in [1, 2] {
        poems_solo.push(tokens_and_logprobs(&post(s, &poem(i)).await.2));
    }
    let mut tasks = Vec::new();
    for i in 0..n {
        let b = if i % 4 == 0 { body.clone() } else { poem(i) };
        let base = s.base.clone();
        tasks.push(tokio::spawn(async move {
            let r = client()
                .post(format!("{base}/v1/chat/completions"))
                .json(&b)
                .send()
                .await
                .unwrap();
            (i, r.json::<Value>().await.unwrap())
        }));
    }
    for t in tasks {
        let (i, v) = t.await.unwrap();
        assert!(v["choices"][0]["message"]["content"].is_string(), "{v}");
        if i % 4 == 0 {
            assert_eq!(
                tokens_and_logprobs(&v),
                solo,
                "request {i} under concurrency"
            );
        } else if i < 3 {
            let want = &poems_solo[i as usize - 1];
            assert_eq!(&tokens_and_logprobs(&v), want, "poem {i} under concurrency");
        }
    }
}

/// A long prompt that arrives while a stream decodes is computed in chunks between that
/// stream's tokens (at most `--max-prompt-stall-ms` of prompt work a step, here the floor of 16
/// rows), not in passes of up to `batch_size` (512) tokens that hold the stream: the running
/// stream keeps getting tokens until the long prompt's first one. Chunking changes no output.
#[tokio::test]
async fn a_long_prompt_does_not_stall_a_running_stream() {
    use futures::StreamExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    const TOKEN: &str = "\"delta\":{\"content\"";
    let s = Server::start(&["--max-prompt-stall-ms", "1"]);
    let mut running = greedy("Tell me a long story about a lighthouse keeper.", 1200);
    running["stream"] = json!(true);
    running["ignore_eos"] = json!(true);
    let r = send(&s, &running).await;
    assert_eq!(r.status(), 200);
    let tokens = Arc::new(AtomicUsize::new(0));
    let counted = tokens.clone();
    let reader = tokio::spawn(async move {
        let mut body = r.bytes_stream();
        while let Some(Ok(c)) = body.next().await {
            let n = String::from_utf8_lossy(&c).matches(TOKEN).count();
            counted.fetch_add(n, Ordering::SeqCst);
        }
    });
    while tokens.load(Ordering::SeqCst) < 2 {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let facts: String = (1..=80)
        .map(|i| format!("Fact {i}: the number {i} squared is {}. ", i * i))
        .collect();
    let mut long = greedy(&format!("{facts}\nWhich number squared is 400?"), 8);
    long["stream"] = json!(true);
    let before = tokens.load(Ordering::SeqCst);
    let r = send(&s, &long).await;
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let (mut text, mut during) = (String::new(), None);
    while let Some(c) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&c.unwrap()));
        if during.is_none() && text.contains(TOKEN) {
            during = Some(tokens.load(Ordering::SeqCst) - before);
        }
    }
    let during = during.expect("the long prompt's answer has text");
    assert!(
        !reader.is_finished(),
        "the running stream ended before the long prompt was computed"
    );
    reader.abort();
    // The same request alone (its prompt now served from the prefix cache) says the same.
    long["stream"] = json!(false);
    let (status, _, solo) = post(&s, &long).await;
    assert_eq!(status, 200, "{solo}");
    let prompt = solo["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
    assert!(prompt > 900, "{}", solo["usage"]);
    let streamed: String = delta_strings(&sse_data(&text), "/choices/0/delta/content").concat();
    assert_eq!(streamed, content(&solo));
    // 16 prompt rows a step give the running stream about one token per 16 prompt tokens;
    // chunks of up to 511 would give it 2 or 3.
    assert!(
        during >= prompt / 32,
        "the running stream got {during} tokens while a {prompt}-token prompt was computed"
    );
}

/// A request that arrives while a step computes another prompt joins that step's prompt passes:
/// its first token comes before the other request's streams get their second (in the next
/// step's decoding pass), where it used to wait for the step to end and that pass.
#[tokio::test]
async fn a_request_arriving_during_a_step_joins_its_prompt_passes() {
    use futures::StreamExt;
    use std::sync::{Arc, Mutex};
    const TOKEN: &str = "\"delta\":{\"content\"";
    let s = Server::start(&[]);
    // (request, its tokens so far) in the order the client saw them, read as they come.
    let seen: Arc<Mutex<Vec<(usize, usize)>>> = Arc::default();
    let stream = |i: usize, body: Value| {
        let (seen, url) = (seen.clone(), s.url("/v1/chat/completions"));
        tokio::spawn(async move {
            let r = client().post(url).json(&body).send().await.expect("send");
            assert_eq!(r.status(), 200);
            let (mut n, mut body) = (0, r.bytes_stream());
            while let Some(Ok(c)) = body.next().await {
                for _ in 0..String::from_utf8_lossy(&c).matches(TOKEN).count() {
                    n += 1;
                    seen.lock().unwrap().push((i, n));
                }
            }
        })
    };
    let streamed = |content: &str, n: u32| {
        let mut b = greedy(content, 4);
        b["stream"] = json!(true);
        b["ignore_eos"] = json!(true);
        b["n"] = json!(n);
        b
    };
    // About 430 prompt tokens: one pass, the whole of its step, with room left in the step's
    // 512 rows for a short prompt. Its 16 choices make the next decoding pass a long one.
    let facts: String = (1..=24)
        .map(|i| format!("Fact {i}: the number {i} squared is {}. ", i * i))
        .collect();
    let first = stream(0, streamed(&format!("{facts}\nSummarise these facts."), 16));
    // Once it runs (admitted: its pass is under way), a short request arrives.
    let running = format!("parlance_running_sequences{{model=\"{MODEL}\"}} 16");
    loop {
        let metrics = client().get(s.url("/metrics")).send().await.unwrap();
        if metrics.text().await.unwrap().contains(&running) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let second = stream(1, streamed("Say hello.", 1));
    first.await.unwrap();
    second.await.unwrap();
    let seen = seen.lock().unwrap().clone();
    let at = |e: (usize, usize)| seen.iter().position(|&x| x == e).unwrap();
    assert_eq!(seen.len(), 16 * 4 + 4, "{seen:?}");
    assert!(
        at((1, 1)) < at((0, 17)),
        "the short request's first token came after the next decoding pass: {seen:?}"
    );
}

#[tokio::test]
async fn logprobs_plain_and_streamed() {
    let s = shared();
    let mut body = greedy("Name three colors.", 12);
    // Every generated token is content (no end-of-turn token, which has no entry).
    body["ignore_eos"] = json!(true);
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(3);
    let (status, _, v) = post(s, &body).await;
    assert_eq!(status, 200, "{v}");
    let lp = &v["choices"][0]["logprobs"];
    assert!(lp["refusal"].is_null());
    let entries = lp["content"].as_array().unwrap();
    assert_eq!(
        entries.len() as u64,
        v["usage"]["completion_tokens"].as_u64().unwrap()
    );
    let mut joined = Vec::new();
    for t in entries {
        let logprob = t["logprob"].as_f64().unwrap();
        assert!(logprob <= 0.0);
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        // Raw distribution, most likely first; greedy picks the best token that is not banned
        // (`ignore_eos` bans the end of turn), and where it is listed its figure is the same.
        assert!(top[0]["logprob"].as_f64() >= top[1]["logprob"].as_f64());
        assert!(top[1]["logprob"].as_f64() >= top[2]["logprob"].as_f64());
        assert!(top[0]["logprob"].as_f64().unwrap() >= logprob);
        if let Some(same) = top.iter().find(|x| x["token"] == t["token"]) {
            assert!((same["logprob"].as_f64().unwrap() - logprob).abs() < 1e-6);
        }
        joined.extend(
            t["bytes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap() as u8),
        );
    }
    // The tokens' bytes spell the content.
    assert_eq!(String::from_utf8(joined).unwrap(), content(&v));
    validate_with_spec(&v.to_string());

    // Streamed: the same entries, spread over the chunks that carry their text.
    body["stream"] = json!(true);
    let (_, _, data) = post_stream(s, &body).await;
    let mut streamed = Vec::new();
    for d in data.iter().filter(|d| *d != "[DONE]") {
        let c: Value = serde_json::from_str(d).unwrap();
        if let Some(entries) = c["choices"][0]["logprobs"]["content"].as_array() {
            streamed.extend(entries.iter().cloned());
        }
    }
    assert_eq!(&streamed, entries);

    // logprobs alone: no alternatives; not asked: null.
    let mut body = greedy("Hi", 3);
    body["logprobs"] = json!(true);
    let (_, _, v) = post(s, &body).await;
    assert_eq!(
        v["choices"][0]["logprobs"]["content"][0]["top_logprobs"],
        json!([])
    );
    let (_, _, v) = post(s, &greedy("Hi", 3)).await;
    assert!(v["choices"][0]["logprobs"].is_null());
}

fn person_schema() -> Value {
    json!({"type": "object", "additionalProperties": false,
           "required": ["name", "age", "tags"],
           "properties": {"name": {"type": "string", "maxLength": 20},
                          "age": {"type": "integer", "minimum": 0, "maximum": 150},
                          "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "maxItems": 3}}})
}

/// Checks a value against `person_schema` by hand.
fn is_person(v: &Value) -> bool {
    let Some(o) = v.as_object() else { return false };
    o.len() == 3
        && o["name"].as_str().is_some_and(|s| s.chars().count() <= 20)
        && o["age"].as_i64().is_some_and(|a| (0..=150).contains(&a))
        && o["tags"].as_array().is_some_and(|t| {
            t.len() <= 3
                && t.iter()
                    .all(|x| ["a", "b", "c"].contains(&x.as_str().unwrap_or("")))
        })
}

#[tokio::test]
async fn structured_output_is_valid_by_construction() {
    let s = shared();
    let rf = json!({"type": "json_schema", "json_schema": {"name": "person", "strict": true, "schema": person_schema()}});
    // Sampled outputs, many seeds: every one that ends naturally parses and validates.
    let mut checked = 0;
    for seed in 0..10 {
        let mut body = chat("Describe someone.");
        body["response_format"] = rf.clone();
        body["n"] = json!(10);
        body["seed"] = json!(seed);
        body["temperature"] = json!(1.0);
        body["max_tokens"] = json!(200);
        let (status, _, v) = post(s, &body).await;
        assert_eq!(status, 200, "{v}");
        for c in v["choices"].as_array().unwrap() {
            assert_eq!(c["finish_reason"], "stop", "{c}");
            let text = c["message"]["content"].as_str().unwrap();
            let parsed: Value =
                serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
            assert!(is_person(&parsed), "{text}");
            checked += 1;
        }
    }
    assert_eq!(checked, 100);

    // Streamed: the joined deltas are the same JSON as the plain answer for the same seed.
    let mut body = chat("Describe someone.");
    body["response_format"] = rf.clone();
    body["seed"] = json!(9);
    body["max_tokens"] = json!(200);
    let (_, _, plain) = post(s, &body).await;
    body["stream"] = json!(true);
    let (_, _, data) = post_stream(s, &body).await;
    let (streamed, finish) = collect_stream(&data);
    assert_eq!(streamed, content(&plain));
    assert_eq!(finish, "stop");

    // json_object: any JSON object.
    let mut body = chat("Give me data.");
    body["response_format"] = json!({"type": "json_object"});
    body["max_tokens"] = json!(300);
    body["seed"] = json!(1);
    let (_, _, v) = post(s, &body).await;
    if v["choices"][0]["finish_reason"] == "stop" {
        let parsed: Value = serde_json::from_str(&content(&v)).unwrap();
        assert!(parsed.is_object());
    }

    // Schemas that cannot be enforced are refused before any work; no $ref leaves the schema.
    for schema in [
        json!({"type": "nonsense"}),
        json!({"$ref": "http://127.0.0.1:9/x.json"}),
        json!({"$ref": "file:///etc/passwd"}),
    ] {
        let mut body = chat("x");
        body["response_format"] =
            json!({"type": "json_schema", "json_schema": {"name": "r", "schema": schema}});
        let (status, _, v) = post(s, &body).await;
        assert_eq!(status, 400, "{v}");
        assert_eq!(v["error"]["param"], "response_format.json_schema.schema");
    }
}

fn weather_tools() -> Value {
    json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                           "required": ["city"], "additionalProperties": false}}},
           {"type": "function", "function": {"name": "get_time", "description": "Time in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                           "required": ["city"], "additionalProperties": false}}}])
}

#[tokio::test]
async fn tool_calls_required_named_none_and_streamed() {
    let s = shared();
    let ask = |choice: Value, seed: u64| {
        let mut b = chat("What is the weather in Paris?");
        b["tools"] = weather_tools();
        b["tool_choice"] = choice;
        b["seed"] = json!(seed);
        b["max_tokens"] = json!(80);
        b
    };
    // required: always calls. The array of calls has no bound, so a sampled answer may keep
    // adding calls until `max_tokens` (some seeds do on some CPUs, whose kernels round
    // differently): it then ends with `length`, never with the array as text, but with the
    // calls as far as they got (the last one's arguments may be unfinished JSON). The others
    // end with `tool_calls`, and their arguments parse and match the schema.
    let mut completed = 0;
    for seed in 0..5 {
        let (status, _, v) = post(s, &ask(json!("required"), seed)).await;
        assert_eq!(status, 200, "{v}");
        let c = &v["choices"][0];
        if c["finish_reason"] == "length" {
            assert!(c["message"]["content"].is_null(), "{v}");
            let calls = c["message"]["tool_calls"].as_array().unwrap();
            assert!(!calls.is_empty(), "{v}");
            for call in calls {
                let name = call["function"]["name"].as_str().unwrap();
                assert!(["get_weather", "get_time"].contains(&name), "{v}");
                assert!(call["function"]["arguments"].is_string(), "{v}");
            }
            validate_with_spec(&v.to_string());
            continue;
        }
        completed += 1;
        assert_eq!(c["finish_reason"], "tool_calls", "{v}");
        assert!(c["message"]["content"].is_null());
        let calls = c["message"]["tool_calls"].as_array().unwrap();
        assert!(!calls.is_empty());
        for call in calls {
            assert!(call["id"].as_str().unwrap().starts_with("call_"));
            assert_eq!(call["type"], "function");
            assert!(
                ["get_weather", "get_time"].contains(&call["function"]["name"].as_str().unwrap())
            );
            let args: Value =
                serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
            assert!(
                args["city"].is_string() && args.as_object().unwrap().len() == 1,
                "{args}"
            );
        }
        validate_with_spec(&v.to_string());
    }
    assert!(
        completed >= 3,
        "{completed} of 5 answers completed their calls"
    );
    // parallel_tool_calls: false gives at most one call.
    let mut b = ask(json!("required"), 3);
    b["parallel_tool_calls"] = json!(false);
    let (_, _, v) = post(s, &b).await;
    assert_eq!(
        v["choices"][0]["message"]["tool_calls"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // Named: exactly that function, finish_reason stop.
    let named = json!({"type": "function", "function": {"name": "get_time"}});
    let (_, _, v) = post(s, &ask(named.clone(), 1)).await;
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let calls = v["choices"][0]["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["function"]["name"], "get_time");
    // none: never a call.
    let (_, _, v) = post(s, &ask(json!("none"), 1)).await;
    assert!(v["choices"][0]["message"].get("tool_calls").is_none());
    assert!(v["choices"][0]["message"]["content"].is_string());

    // Streamed: first fragment carries index, id, type, name and empty arguments; the joined
    // arguments equal the plain response's for the same seed.
    let (_, _, plain) = post(s, &ask(named.clone(), 7)).await;
    let mut sb = ask(named, 7);
    sb["stream"] = json!(true);
    let (_, _, data) = post_stream(s, &sb).await;
    let mut first = None;
    let mut joined = String::new();
    let mut finish = None;
    for d in data.iter().filter(|d| *d != "[DONE]") {
        let c: Value = serde_json::from_str(d).unwrap();
        if let Some(tc) = c["choices"][0]["delta"]["tool_calls"].as_array() {
            let tc = &tc[0];
            assert_eq!(tc["index"], 0);
            if first.is_none() {
                assert_eq!(tc["function"]["arguments"], "");
                assert_eq!(tc["type"], "function");
                first = Some(tc.clone());
            } else {
                assert!(tc.get("id").is_none());
            }
            joined.push_str(tc["function"]["arguments"].as_str().unwrap());
        }
        if let Some(f) = c["choices"][0]["finish_reason"].as_str() {
            finish = Some(f.to_owned());
        }
    }
    let first = first.unwrap();
    let pcall = &plain["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(first["function"]["name"], pcall["function"]["name"]);
    assert_eq!(joined, pcall["function"]["arguments"].as_str().unwrap());
    assert_eq!(finish.as_deref(), Some("stop"));
    let raw = data
        .iter()
        .map(|d| format!("data: {d}\n\n"))
        .collect::<String>();
    validate_with_spec(&raw);

    // History round trip: the assistant's call and the tool's answer render and the model
    // answers in text.
    let body = json!({"model": MODEL, "max_tokens": 20, "tools": weather_tools(), "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [pcall]},
        {"role": "tool", "tool_call_id": pcall["id"], "content": "Sunny, 24 C"}],
        "tool_choice": "none"});
    let (status, _, v) = post(s, &body).await;
    assert_eq!(status, 200, "{v}");
    assert!(v["choices"][0]["message"]["content"].is_string());
}

#[tokio::test]
async fn auto_with_strict_tools_is_text_or_a_valid_call() {
    let s = shared();
    let mut tools = json!([weather_tools()[0].clone()]);
    tools[0]["function"]["strict"] = json!(true);
    // One earlier call in the conversation: the 135M model then calls about one time in eight
    // (asked cold, about one in a hundred).
    let mut body = chat("What is the weather in Paris?");
    body["messages"] = json!([
        {"role": "user", "content": "What is the weather in Rome?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 24 C"},
        {"role": "assistant", "content": "It is sunny in Rome, 24 C."},
        {"role": "user", "content": "What is the weather in Paris?"},
    ]);
    body["tools"] = tools.clone();
    body["tool_choice"] = json!("auto");
    body["n"] = json!(8);
    body["max_tokens"] = json!(60);
    let mut calls_seen = 0;
    let mut total = 0;
    let mut choices: Vec<Value> = Vec::new();
    // Sample until the model has both answered and called, at most 12 × 8 choices.
    for seed in 1..=12 {
        body["seed"] = json!(seed);
        let (status, _, v) = post(s, &body).await;
        assert_eq!(status, 200, "{v}");
        choices.extend(v["choices"].as_array().unwrap().iter().cloned());
        let calls = choices
            .iter()
            .filter(|c| c["message"]["tool_calls"].is_array())
            .count();
        if calls > 0 && calls < choices.len() {
            break;
        }
    }
    for c in &choices {
        total += 1;
        match c["message"]["tool_calls"].as_array() {
            Some(calls) => {
                calls_seen += 1;
                assert_eq!(c["finish_reason"], "tool_calls");
                for call in calls {
                    let args: Value =
                        serde_json::from_str(call["function"]["arguments"].as_str().unwrap())
                            .unwrap();
                    assert!(
                        args["city"]
                            .as_str()
                            .is_some_and(|c| c.chars().count() <= 30),
                        "{args}"
                    );
                }
            }
            None => {
                let text = c["message"]["content"].as_str().unwrap();
                assert!(!text.starts_with("<tool_call>"), "{text}");
                assert_ne!(c["finish_reason"], "tool_calls");
            }
        }
    }
    // The grammar lets the model choose: with these seeds it both answers and calls.
    assert!(
        calls_seen > 0 && calls_seen < total,
        "{calls_seen} calls in {total}"
    );
    // A strict function whose schema cannot be enforced is refused before any work.
    tools[0]["function"]["parameters"] =
        json!({"type": "object", "properties": {"x": {"type": "nonsense"}}});
    body["tools"] = tools;
    let (status, _, v) = post(s, &body).await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["param"], "tools");
}
