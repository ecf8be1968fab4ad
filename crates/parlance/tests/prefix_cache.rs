//! The prefix cache on the real model: what it reuses is reported in `cached_tokens`, and it
//! never changes an answer: the same seeded requests give the same text with the cache on and
//! off, one at a time or concurrently, and after their prefixes were evicted.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

mod common;

use common::{post, Server, MODEL};
use serde_json::{json, Value};

const SYSTEM: &str = "You are the ship's cook on a long voyage across the northern sea. You \
    answer every question with a story about the galley, the crew, the storms and the fish you \
    caught, and you always end with a recipe that uses whatever is left in the hold.";

fn ask(system: Option<&str>, turns: &[(&str, &str)], question: &str, max_tokens: u32) -> Value {
    let mut messages = Vec::new();
    if let Some(s) = system {
        messages.push(json!({"role": "system", "content": s}));
    }
    for (q, a) in turns {
        messages.push(json!({"role": "user", "content": q}));
        messages.push(json!({"role": "assistant", "content": a}));
    }
    messages.push(json!({"role": "user", "content": question}));
    json!({"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0.8,
           "seed": 7, "logprobs": true})
}

/// The answer's text followed by every token's log probability (so that two answers compare
/// equal only if their logits agreed to the last bit), the prompt's size and its cached part.
async fn answer(s: &Server, body: &Value) -> (String, u64, u64) {
    let (st, _, v) = post(s, body).await;
    assert_eq!(st, 200, "{v}");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    let logprobs = &v["choices"][0]["logprobs"]["content"];
    assert!(logprobs.as_array().is_some_and(|a| !a.is_empty()), "{v}");
    (
        format!("{text}\n{logprobs}"),
        v["usage"]["prompt_tokens"].as_u64().unwrap(),
        v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap(),
    )
}

/// The answer of the server with the cache, after checking that the one without gives the same
/// text and log probabilities.
async fn same_without_cache(cached: &Server, fresh: &Server, body: &Value) -> (String, u64, u64) {
    let got = answer(cached, body).await;
    let (want, _, _) = answer(fresh, body).await;
    assert_eq!(got.0, want, "cached and computed prefixes disagree");
    got
}

/// The answer's text alone.
fn text(answer: &str) -> &str {
    answer.rsplit_once('\n').map_or(answer, |(t, _)| t)
}

#[tokio::test]
async fn reused_prefixes_are_reported_and_never_change_an_answer() {
    let cached = Server::start(&[]);
    let fresh = Server::start(&["--no-prefix-cache"]);
    let questions = [
        "What did you cook today?",
        "Who is the best sailor?",
        "Tell me about the storm.",
        "What fish did you catch?",
    ];

    // One at a time: after the first, the system prompt comes from the cache.
    let mut first_prompt = 0;
    for (i, q) in questions.iter().enumerate() {
        let body = ask(Some(SYSTEM), &[], q, 24);
        let (a, prompt, hit) = answer(&cached, &body).await;
        let (b, prompt_b, miss) = answer(&fresh, &body).await;
        assert_eq!(a, b, "question {i}: cached and computed prefixes disagree");
        assert_eq!(prompt, prompt_b);
        assert_eq!(miss, 0, "the cache is off");
        if i == 0 {
            first_prompt = prompt;
        } else {
            // The system prompt (some 50 tokens) and the template around it were reused.
            assert!(
                hit >= 50 && hit < prompt,
                "question {i}: {hit} of {prompt} cached"
            );
        }
    }

    // The next turn of a conversation reuses the whole of the first turn, the answer's tokens
    // included (computed one per step, their KV state is what a prompt would have given).
    let (a1, _, _) = answer(&cached, &ask(Some(SYSTEM), &[], questions[0], 24)).await;
    let turn2 = ask(
        Some(SYSTEM),
        &[(questions[0], text(&a1))],
        "And for dessert?",
        80,
    );
    let (a2, prompt2, hit2) = same_without_cache(&cached, &fresh, &turn2).await;
    assert!(
        hit2 >= first_prompt + 16,
        "turn 2 reused {hit2} tokens; turn 1's prompt alone was {first_prompt} (of {prompt2})"
    );
    // A third turn, after a longer answer computed past 64 cells one token at a time.
    let turn3 = ask(
        Some(SYSTEM),
        &[(questions[0], text(&a1)), ("And for dessert?", text(&a2))],
        "Which wine goes with it?",
        16,
    );
    let (_, prompt3, hit3) = same_without_cache(&cached, &fresh, &turn3).await;
    assert!(
        hit3 >= prompt2 + 16,
        "turn 3 reused {hit3} tokens; turn 2's prompt alone was {prompt2} (of {prompt3})"
    );

    // Concurrent requests sharing the prefix, finishing in any order (different lengths), give
    // what each gives alone on a server without the cache.
    let bodies: Vec<Value> = (0..8)
        .map(|i| ask(Some(SYSTEM), &[], questions[i % 4], 4 + 6 * (i as u32 % 4)))
        .collect();
    let together = futures::future::join_all(bodies.iter().map(|b| answer(&cached, b))).await;
    for (body, (got, _, _)) in bodies.iter().zip(&together) {
        let (alone, _, _) = answer(&fresh, body).await;
        assert_eq!(got, &alone);
    }
    assert!(together.iter().all(|(_, _, hit)| *hit >= 50));

    // `n` choices share their prompt; every choice matches the uncached server's.
    let mut body = ask(Some(SYSTEM), &[], questions[1], 12);
    body["n"] = json!(3);
    let texts = |v: &Value| -> Vec<Value> {
        v["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| json!([c["message"]["content"], c["finish_reason"]]))
            .collect()
    };
    let (_, _, a) = post(&cached, &body).await;
    let (_, _, b) = post(&fresh, &body).await;
    assert_eq!(texts(&a), texts(&b));
    assert_eq!(texts(&a).len(), 3);
}

#[tokio::test]
async fn least_recently_used_prefixes_are_evicted_first() {
    // Two KV streams: room for two cached prompts.
    let s = Server::start(&["--max-sequences", "2"]);
    let long = |topic: &str| {
        format!(
            "Write a long, careful and detailed explanation of {topic}, covering its history, \
             the people involved, the main ideas, the common mistakes beginners make, and what \
             to read next to learn more about {topic}."
        )
    };
    let (a, b, c) = (long("sailing"), long("bread baking"), long("astronomy"));
    let mut first = Vec::new();
    for p in [&a, &b, &c] {
        first.push(answer(&s, &ask(None, &[], p, 1)).await);
    }
    // The template's preamble is all any two of these share (`c` took the slot of `a`, the
    // least recently used, and reused that much of it).
    let preamble = first[2].2;
    assert!(preamble > 0 && preamble < 40, "{first:?}");
    // `b` and `c` are cached whole (all but the last 4 prompt tokens, computed again in one pass
    // whose last logits start the answer); `a`, the least recently used, was overwritten.
    let (_, prompt_b, hit_b) = answer(&s, &ask(None, &[], &b, 1)).await;
    assert_eq!(hit_b, prompt_b - 4);
    let (_, _, hit_a) = answer(&s, &ask(None, &[], &a, 1)).await;
    assert_eq!(hit_a, preamble);
    // And the answers are still the ones computed from scratch.
    let (again, _, _) = answer(&s, &ask(None, &[], &c, 1)).await;
    assert_eq!(again, first[2].0);
}

#[tokio::test]
async fn a_short_shared_prefix_is_copied_and_the_context_holding_it_kept() {
    // A new question under the same short system prompt as a long conversation held in a free
    // stream. Reusing that stream in place would drop the conversation; taking a fresh stream
    // would compute the system prompt again. Copying the few shared cells costs less than
    // computing them (the copy moves only the cells the source holds), so they are copied and
    // the conversation stays cached.
    let cached = Server::start(&[]);
    let fresh = Server::start(&["--no-prefix-cache"]);
    let system = "You are a terse assistant.";
    let long = "Tell me, in order and with one line for each, the names of the planets, the \
                moons of each planet you know, the colour each one shows in a small telescope, \
                and which of them a sailor could use to find the way home at night.";
    let (_, prompt_long, hit_long) = answer(&cached, &ask(Some(system), &[], long, 24)).await;
    assert_eq!(hit_long, 0, "a fresh server has nothing cached");
    let (_, prompt, hit) =
        same_without_cache(&cached, &fresh, &ask(Some(system), &[], "Name a fruit.", 8)).await;
    // The template's system part and the user header (some 15 tokens) were reused.
    assert!(hit >= 10 && hit + 4 <= prompt, "{hit} of {prompt} cached");
    // And the long conversation was not overwritten: asked again, all of it but the last
    // `MIN_CHUNK` (4) prompt tokens comes from the cache.
    let (_, _, again) =
        same_without_cache(&cached, &fresh, &ask(Some(system), &[], long, 24)).await;
    assert_eq!(again, prompt_long - 4);
}

#[tokio::test]
async fn with_the_plain_attention_only_prompts_are_reused() {
    // The plain attention computes a lone decoding row with another kernel than a prompt's
    // rows, so an answer's KV state would differ in its last bits from a prompt's: the cache
    // keeps the prompt only, and the next turn still matches a server without the cache.
    let cached = Server::start(&["--no-flash-attention"]);
    let fresh = Server::start(&["--no-flash-attention", "--no-prefix-cache"]);
    let turn1 = ask(Some(SYSTEM), &[], "What did you cook today?", 24);
    let (a1, prompt1, _) = answer(&cached, &turn1).await;
    let turn2 = ask(
        Some(SYSTEM),
        &[("What did you cook today?", text(&a1))],
        "And for dessert?",
        24,
    );
    let (_, _, hit2) = same_without_cache(&cached, &fresh, &turn2).await;
    assert_eq!(hit2, prompt1, "turn 2 reused exactly turn 1's prompt");
}

/// The server's resident memory in MiB (Linux).
#[cfg(target_os = "linux")]
fn resident_mib(s: &Server) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", s.pid())).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib / 1024.0
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_copied_prefix_makes_only_its_cells_resident() {
    let s = Server::start(&[]);
    let rules = |tag: &str| -> String {
        (1..=30)
            .map(|i| format!("{tag} rule {i}: the crew washes deck {i} before the bell. "))
            .collect()
    };
    // Warm-up: eight distinct long prompts at once (nothing shared to copy) make eight streams
    // and the pass buffers resident as far as such prompts reach.
    let distinct: Vec<Value> = (0..8)
        .map(|i| ask(Some(&rules(&format!("Ship {i}"))), &[], "Which rule?", 4))
        .collect();
    let warm = futures::future::join_all(distinct.iter().map(|b| answer(&s, b))).await;
    assert!(warm.iter().all(|(_, _, hit)| *hit < 32), "{warm:?}");
    let before = resident_mib(&s);
    // Eight requests sharing a new ~400-token system prompt: one computes it, the others copy
    // it into their own streams. A copy writes only the cells it moves (~7 MiB each here);
    // copying whole streams (34 MiB each for this model) would add some 240 MiB.
    let sharing: Vec<Value> = (0..8)
        .map(|i| {
            ask(
                Some(&rules("Southern")),
                &[],
                &format!("What is rule {i}?"),
                4,
            )
        })
        .collect();
    let shared = futures::future::join_all(sharing.iter().map(|b| answer(&s, b))).await;
    assert!(
        shared.iter().all(|(_, prompt, _)| *prompt > 350),
        "{shared:?}"
    );
    let copied = shared
        .iter()
        .filter(|(_, prompt, hit)| hit + 40 >= *prompt)
        .count();
    assert!(copied >= 6, "the shared prompt was not reused: {shared:?}");
    let grown = resident_mib(&s) - before;
    assert!(
        grown < 100.0,
        "resident memory grew by {grown:.0} MiB ({before:.0} MiB before)"
    );
}
