//! The multi-tenant platform end to end, against the real binary and model: managed keys and
//! the admin API, prepaid credits (402) settled to the real usage on every path, rate limits
//! (429 with OpenAI's headers), and the race tests: two replicas sharing PostgreSQL and Redis.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

mod common;

use std::time::{Duration, Instant};

use common::{client, model_path, scrape, Server, MODEL};
use futures::StreamExt;
use serde_json::{json, Value};

const ADMIN: &str = "adm-secret-token";

/// Prices of the test model: 1 micro-unit per prompt token, 0.5 per cached one, 2 per
/// completion token.
fn config_with_prices(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("parlance.toml");
    let text = format!(
        "[[models]]\nname = \"{MODEL}\"\npath = \"{}\"\nprice = {{ prompt = 1000000, cached_prompt = 500000, completion = 2000000 }}\n",
        model_path().display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn scratch() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("parlance-platform-{}", common::uuid_like()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A server with prices and the admin API, on the given extra flags. The prefix cache is off:
/// these tests count money to the micro-unit from uncached prices (what the cache saves is
/// tested on its own, in `reused_prompt_tokens_are_billed_at_the_cached_price`).
fn priced_server(extra: &[&str]) -> Server {
    priced_server_env(extra, &[])
}

fn priced_server_env(extra: &[&str], env: &[(&str, &str)]) -> Server {
    let dir = scratch();
    let cfg = config_with_prices(&dir);
    let cfg = cfg.to_str().unwrap().to_owned();
    let mut args = vec![
        "serve",
        "--addr",
        "127.0.0.1:0",
        "--config",
        &cfg,
        "--admin-token",
        ADMIN,
        "--exit-on-stdin-eof",
    ];
    if !extra.contains(&"--prefix-cache-on") {
        args.push("--no-prefix-cache");
    }
    args.extend(extra.iter().copied().filter(|a| *a != "--prefix-cache-on"));
    Server::start_with_env(&args, env)
}

async fn admin(s: &Server, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let c = client();
    let mut req = match method {
        "GET" => c.get(s.url(path)),
        "POST" => c.post(s.url(path)),
        "DELETE" => c.delete(s.url(path)),
        _ => unreachable!(),
    }
    .bearer_auth(ADMIN);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// An account with `credits` and a key (with optional limits); returns (account id, key).
async fn funded_key(s: &Server, name: &str, credits: i64, limits: Value) -> (String, String) {
    let (st, acct) = admin(s, "POST", "/admin/accounts", Some(json!({"name": name}))).await;
    assert_eq!(st, 201, "{acct}");
    let id = acct["id"].as_str().unwrap().to_owned();
    if credits > 0 {
        let (st, a) = admin(
            s,
            "POST",
            &format!("/admin/accounts/{id}/credits"),
            Some(json!({"amount": credits, "note": "test"})),
        )
        .await;
        assert_eq!(st, 200, "{a}");
        assert_eq!(a["balance"], credits);
    }
    let mut body = json!({"account": name, "name": "test key"});
    if let (Some(b), Some(l)) = (body.as_object_mut(), limits.as_object()) {
        b.extend(l.clone());
    }
    let (st, k) = admin(s, "POST", "/admin/keys", Some(body)).await;
    assert_eq!(st, 201, "{k}");
    (id, k["key"].as_str().unwrap().to_owned())
}

async fn chat_as(s: &Server, key: &str, body: &Value) -> (u16, reqwest::header::HeaderMap, Value) {
    let r = client()
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.json().await.unwrap_or(Value::Null))
}

/// A request that generates exactly `n` tokens (the end-of-turn token is banned).
fn exact(n: u32, content: &str) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": content}],
           "max_tokens": n, "ignore_eos": true, "temperature": 0})
}

/// Starts a streamed request that generates exactly `tokens` tokens.
async fn stream_of(s: &Server, key: &str, tokens: u32, content: &str) -> reqwest::Response {
    let mut body = exact(tokens, content);
    body["stream"] = json!(true);
    client()
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// Waits until nothing is reserved on the account, and returns it.
async fn settled_account(s: &Server, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (st, a) = admin(s, "GET", &format!("/admin/accounts/{id}"), None).await;
        assert_eq!(st, 200, "{a}");
        if a["reserved"] == 0 {
            return a;
        }
        assert!(Instant::now() < deadline, "reservation never settled: {a}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn assert_envelope(v: &Value, kind: &str, code: &str) {
    let e = &v["error"];
    assert_eq!(e["type"], kind, "{v}");
    assert_eq!(e["code"], code, "{v}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(
        e.get("param").is_some(),
        "param must be present (null): {v}"
    );
}

#[tokio::test]
async fn admin_api_manages_keys_and_revocation_is_prompt() {
    let s = priced_server(&[]);
    // Without the admin token, or with a wrong one: 401 in the envelope.
    let r = client().get(s.url("/admin/keys")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_envelope(&v, "authentication_error", "invalid_admin_token");
    let r = client()
        .get(s.url("/admin/keys"))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // Before any key exists the server is open (loopback); once one exists it is closed.
    let (st, _, _) = chat_as(&s, "anything", &exact(1, "hi")).await;
    assert_eq!(st, 200);
    let (_, key) = funded_key(&s, "acme", 1_000_000, json!({})).await;
    assert!(key.starts_with("sk-pl-") && key.len() > 40);
    let (st, _, v) = chat_as(&s, "anything", &exact(1, "hi")).await;
    assert_eq!(st, 401, "{v}");
    assert_envelope(&v, "authentication_error", "invalid_api_key");
    let (st, _, v) = chat_as(&s, &key, &exact(1, "hi")).await;
    assert_eq!(st, 200, "{v}");

    // Listing shows the key, never its secret.
    let (st, list) = admin(&s, "GET", "/admin/keys?account=acme", None).await;
    assert_eq!(st, 200);
    let listed = list["data"].as_array().unwrap();
    assert_eq!(listed.len(), 1);
    assert!(
        !list.to_string().contains(&key),
        "a listing leaked a secret"
    );
    let id = listed[0]["id"].as_str().unwrap().to_owned();

    // Errors of the admin API: unknown account, duplicate, bad amount.
    let (st, v) = admin(&s, "POST", "/admin/keys", Some(json!({"account": "ghost"}))).await;
    assert_eq!(st, 404, "{v}");
    assert_envelope(&v, "invalid_request_error", "not_found");
    let (st, v) = admin(&s, "POST", "/admin/accounts", Some(json!({"name": "acme"}))).await;
    assert_eq!(st, 409, "{v}");
    assert_envelope(&v, "invalid_request_error", "conflict");
    let (st, v) = admin(
        &s,
        "POST",
        "/admin/accounts/acme/credits",
        Some(json!({"amount": -5})),
    )
    .await;
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["error"]["param"], "amount");
    let (st, v) = admin(
        &s,
        "POST",
        "/admin/keys",
        Some(json!({"account": "acme", "rpm": 0})),
    )
    .await;
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["error"]["param"], "rpm");

    // Revocation: refused at once on this replica.
    let (st, _) = admin(&s, "DELETE", &format!("/admin/keys/{id}"), None).await;
    assert_eq!(st, 200);
    let (st, _, _) = chat_as(&s, &key, &exact(1, "hi")).await;
    assert_eq!(st, 401);
    let (st, _) = admin(&s, "DELETE", "/admin/keys/key_missing", None).await;
    assert_eq!(st, 404);
    // Revoking the last key does not open the server.
    let (st, _, _) = chat_as(&s, "anything", &exact(1, "hi")).await;
    assert_eq!(st, 401);
}

#[tokio::test]
async fn credits_are_reserved_then_settled_to_real_usage() {
    let s = priced_server(&[]);
    let (acct, key) = funded_key(&s, "acme", 10_000, json!({})).await;
    let (st, _, v) = chat_as(&s, &key, &exact(5, "Count to three.")).await;
    assert_eq!(st, 200, "{v}");
    let prompt = v["usage"]["prompt_tokens"].as_i64().unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 5);
    let cost = prompt + 2 * 5;
    let a = settled_account(&s, &acct).await;
    assert_eq!(a["balance"], 10_000 - cost, "{a}");

    // The usage record says the same.
    let (st, u) = admin(&s, "GET", "/admin/usage?account=acme&group_by=model", None).await;
    assert_eq!(st, 200, "{u}");
    let g = &u["data"][0];
    assert_eq!(g["group"], MODEL);
    assert_eq!(g["requests"], 1);
    assert_eq!(g["cost"], cost);
    assert_eq!(g["prompt_tokens"], prompt);
    assert_eq!(g["completion_tokens"], 5);

    // The worst case (the prompt and 100 completion tokens) is more than the balance: 402 at
    // once, nothing charged.
    let (_, poor) = funded_key(&s, "poor", 50, json!({})).await;
    let t = Instant::now();
    let (st, h, v) = chat_as(&s, &poor, &exact(100, "hi")).await;
    assert_eq!(st, 402, "{v}");
    assert!(t.elapsed() < Duration::from_secs(2));
    assert!(h.get("retry-after").is_none());
    assert_envelope(&v, "insufficient_balance", "insufficient_balance");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("50 available"), "{msg}");
    let (_, p) = admin(&s, "GET", "/admin/accounts/poor", None).await;
    assert_eq!(
        (p["balance"].as_i64(), p["reserved"].as_i64()),
        (Some(50), Some(0))
    );
    // The refusal is on record, with nothing spent.
    let (_, u) = admin(&s, "GET", "/admin/usage?account=poor&group_by=status", None).await;
    assert_eq!(u["data"][0]["group"], "402", "{u}");
    assert_eq!(u["data"][0]["cost"], 0);

    // The Anthropic door spends from the same balance.
    let r = client()
        .post(s.url("/v1/messages"))
        .header("x-api-key", &key)
        .json(&json!({"model": MODEL, "max_tokens": 3,
                      "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let m: Value = r.json().await.unwrap();
    let cost2 = m["usage"]["input_tokens"].as_i64().unwrap()
        + 2 * m["usage"]["output_tokens"].as_i64().unwrap();
    let a = settled_account(&s, &acct).await;
    assert_eq!(a["balance"], 10_000 - cost - cost2, "{a}");
}

#[tokio::test]
async fn client_gone_mid_stream_settles_to_what_was_generated() {
    let s = priced_server(&[]);
    let (acct, key) = funded_key(&s, "acme", 100_000, json!({})).await;
    let r = stream_of(&s, &key, 400, "Tell me a long story.").await;
    assert_eq!(r.status(), 200);
    let mut chunks = r.bytes_stream();
    for _ in 0..4 {
        chunks.next().await.unwrap().unwrap();
    }
    // While it runs, the worst case is held.
    let (_, held) = admin(&s, "GET", &format!("/admin/accounts/{acct}"), None).await;
    assert!(held["reserved"].as_i64().unwrap() > 800, "{held}");
    drop(chunks);

    let a = settled_account(&s, &acct).await;
    let (_, u) = admin(
        &s,
        "GET",
        "/admin/usage?account=acme&group_by=outcome",
        None,
    )
    .await;
    let g = &u["data"][0];
    assert_eq!(g["group"], "cancelled", "{u}");
    let completion = g["completion_tokens"].as_i64().unwrap();
    let prompt = g["prompt_tokens"].as_i64().unwrap();
    assert!(completion > 0 && completion < 400, "{u}");
    assert_eq!(g["cost"], prompt + 2 * completion);
    assert_eq!(a["balance"], 100_000 - prompt - 2 * completion, "{a}");
}

#[tokio::test]
async fn rate_limits_answer_429_with_openai_headers() {
    let s = priced_server(&[]);
    let (_, key) = funded_key(&s, "acme", 1_000_000, json!({"rpm": 2})).await;
    // The three requests below must fall in one one-minute counting window.
    let into = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        % 60_000) as u64;
    if into > 30_000 {
        tokio::time::sleep(Duration::from_millis(60_500 - into)).await;
    }
    let (st, h, _) = chat_as(&s, &key, &exact(1, "hi")).await;
    assert_eq!(st, 200);
    assert_eq!(h["x-ratelimit-limit-requests"], "2");
    assert_eq!(h["x-ratelimit-remaining-requests"], "1");
    assert!(h.contains_key("x-ratelimit-reset-requests"));
    let (st, _, _) = chat_as(&s, &key, &exact(1, "hi")).await;
    assert_eq!(st, 200);
    let t = Instant::now();
    let (st, h, v) = chat_as(&s, &key, &exact(1, "hi")).await;
    assert_eq!(st, 429, "{v}");
    assert!(t.elapsed() < Duration::from_secs(1));
    assert_envelope(&v, "requests", "rate_limit_exceeded");
    let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry));
    assert_eq!(h["x-ratelimit-remaining-requests"], "0");

    // Tokens per minute: a request whose worst case does not fit is refused, and tokens left
    // unused come back when a request settles.
    let (_, tkey) = funded_key(&s, "tok", 1_000_000, json!({"tpm": 400})).await;
    let (st, h, v) = chat_as(&s, &tkey, &exact(10, "hi")).await;
    assert_eq!(st, 200, "{v}");
    let used = v["usage"]["total_tokens"].as_u64().unwrap();
    assert_eq!(h["x-ratelimit-limit-tokens"], "400");
    let left: u64 = h["x-ratelimit-remaining-tokens"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(left, 400 - used);
    let (st, h, v) = chat_as(&s, &tkey, &exact(1000, "hi")).await;
    assert_eq!(st, 429, "{v}");
    assert_envelope(&v, "tokens", "rate_limit_exceeded");
    assert!(h.contains_key("x-ratelimit-reset-tokens"));
    // A stop string ends this one early; the unused part of its reservation is given back.
    let mut early = exact(300, "Say hello.");
    early["ignore_eos"] = json!(false);
    early["stop"] = json!(["e", "a", "o", " "]);
    let (st, _, v) = chat_as(&s, &tkey, &early).await;
    assert_eq!(st, 200, "{v}");
    let spent = v["usage"]["total_tokens"].as_u64().unwrap();
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() < 300);
    let probe = exact(1, "hi");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut probes = 0;
    loop {
        // Settlement is asynchronous: until it lands, the whole reservation still counts (and
        // may leave no room for the probe).
        let (st, h, p) = chat_as(&s, &tkey, &probe).await;
        if st == 200 {
            probes += p["usage"]["total_tokens"].as_u64().unwrap();
            let left: u64 = h["x-ratelimit-remaining-tokens"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            if left == 400 - used - spent - probes {
                break;
            }
        } else {
            assert_eq!(st, 429, "{p}");
        }
        assert!(
            Instant::now() < deadline,
            "unused tokens were not given back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn env_url(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run the tests through scripts/test.sh, or `source scripts/services.sh start` first")
    })
}

/// A fresh PostgreSQL database for a pair of replicas.
async fn fresh_postgres() -> String {
    use sqlx::Connection;
    let base = env_url("PARLANCE_TEST_POSTGRES_URL");
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(&base).await.unwrap();
    let name = format!("e2e_{}", common::uuid_like().replace('-', "_"));
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .unwrap();
    let (prefix, _) = base.rsplit_once('/').unwrap();
    format!("{prefix}/{name}")
}

/// `n` requests at once, alternating between two replicas; their statuses.
async fn fan_out(a: &Server, b: &Server, key: &str, body: &Value, n: usize) -> Vec<u16> {
    let c = client();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let s = if i % 2 == 0 { a } else { b };
            let req = c
                .post(s.url("/v1/chat/completions"))
                .bearer_auth(key)
                .json(body);
            tokio::spawn(async move { req.send().await.unwrap().status().as_u16() })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|s| **s == status).count()
}

/// Two replicas on one PostgreSQL database and one Redis, as a scaled-out deployment runs.
async fn two_replicas() -> (Server, Server, String) {
    let db = fresh_postgres().await;
    let redis = env_url("PARLANCE_TEST_REDIS_URL");
    // Bursts of hundreds of requests: credits and limits refuse them here, not the bound on the
    // expected wait for the model (which a slow machine could reach).
    let flags = [
        "--database-url",
        &db,
        "--redis-url",
        &redis,
        "--max-queue-wait",
        "0",
    ];
    let a = priced_server(&flags);
    let b = priced_server(&flags);
    (a, b, db)
}

/// 500 concurrent requests over two replicas against a balance that covers exactly 100:
/// exactly 100 succeed, the rest get 402, the balance ends at zero, and the ledger, the
/// balance and the usage records agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn race_two_replicas_never_overspend() {
    let (a, b, db) = two_replicas().await;
    // Measure one request's exact cost on a separate account.
    let (_, probe) = funded_key(&a, "probe", 1_000_000, json!({})).await;
    let body = exact(1, "hi");
    let (st, _, v) = chat_as(&a, &probe, &body).await;
    assert_eq!(st, 200, "{v}");
    let cost = v["usage"]["prompt_tokens"].as_i64().unwrap() + 2;

    let (acct, key) = funded_key(&a, "race", 100 * cost, json!({})).await;
    let statuses = fan_out(&a, &b, &key, &body, 500).await;
    assert_eq!(count(&statuses, 200), 100);
    assert_eq!(count(&statuses, 402), 400);
    let acc = settled_account(&b, &acct).await;
    assert_eq!(acc["balance"], 0, "{acc}");

    // The ledger sums to the balance, and the charges to the usage records' cost.
    let store = parlance_store::Store::open(&db).await.unwrap();
    assert_eq!(store.ledger_total(&acct).await.unwrap(), 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, u) = admin(&a, "GET", "/admin/usage?account=race", None).await;
        if u["data"][0]["requests"] == 500 {
            assert_eq!(u["data"][0]["cost"], 100 * cost, "{u}");
            assert_eq!(u["data"][0]["errors"], 400, "{u}");
            break;
        }
        assert!(Instant::now() < deadline, "usage records missing: {u}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A tokens-per-minute limit holds across two replicas: exactly as many requests pass as the
/// limit covers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn race_two_replicas_share_token_limits() {
    let (a, b, _db) = two_replicas().await;
    let (_, probe) = funded_key(&a, "probe", 1_000_000, json!({})).await;
    let body = exact(1, "hello");
    let (st, _, v) = chat_as(&a, &probe, &body).await;
    assert_eq!(st, 200);
    let per = v["usage"]["total_tokens"].as_i64().unwrap();
    let (_, key) = funded_key(&a, "limited", 1_000_000, json!({"tpm": 10 * per + per / 2})).await;
    // Keep the test inside one counting window.
    let into = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        % 60_000) as u64;
    if into > 30_000 {
        tokio::time::sleep(Duration::from_millis(60_500 - into)).await;
    }
    let statuses = fan_out(&a, &b, &key, &body, 40).await;
    assert_eq!(count(&statuses, 200), 10);
    assert_eq!(count(&statuses, 429), 30);
}

#[tokio::test]
async fn command_line_manages_keys_and_credits() {
    let dir = scratch();
    let db = format!("sqlite://{}", dir.join("cli.db").display());
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_parlance"))
            .args(args)
            .args(["--database-url", &db])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, key, err) = run(&["keys", "create", "--account", "cli", "--rpm", "5"]);
    assert!(ok, "{err}");
    let key = key.trim().to_owned();
    assert!(key.starts_with("sk-pl-"), "{key}");
    let (ok, out, err) = run(&["credits", "add", "cli", "2500000", "--note", "welcome"]);
    assert!(ok, "{err}");
    assert!(out.contains("2.500000"), "{out}");
    let (ok, out, _) = run(&["credits", "show", "cli"]);
    assert!(ok && out.contains("2.500000"), "{out}");
    let (ok, _, err) = run(&["credits", "add", "cli", "-5"]);
    assert!(!ok, "a negative amount must fail: {err}");
    let (ok, list, _) = run(&["keys", "list"]);
    assert!(
        ok && list.contains("active") && !list.contains(&key),
        "{list}"
    );

    // A server on the same database takes the key.
    let s = Server::start_raw(&[
        "serve",
        "--addr",
        "127.0.0.1:0",
        "--model",
        &format!("{MODEL}={}", model_path().display()),
        "--database-url",
        &db,
        "--exit-on-stdin-eof",
    ]);
    let (st, h, _) = chat_as(&s, &key, &exact(1, "hi")).await;
    assert_eq!(st, 200);
    assert_eq!(h["x-ratelimit-limit-requests"], "5");
    let id = list
        .lines()
        .find_map(|l| {
            l.split_whitespace()
                .next()
                .filter(|w| w.starts_with("key_"))
        })
        .unwrap()
        .to_owned();
    let (ok, _, err) = run(&["keys", "revoke", &id]);
    assert!(ok, "{err}");
    // Revoked from another process: refused within about a second.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let (st, _, _) = chat_as(&s, &key, &exact(1, "hi")).await;
    assert_eq!(st, 401);
}

/// Usage records still waiting in the batch when SIGTERM arrives are written before exit.
#[tokio::test]
async fn graceful_shutdown_writes_every_usage_record() {
    let dir = scratch();
    let db = format!("sqlite://{}", dir.join("shutdown.db").display());
    let mut s = Server::start_raw(&[
        "serve",
        "--addr",
        "127.0.0.1:0",
        "--model",
        &format!("{MODEL}={}", model_path().display()),
        "--database-url",
        &db,
        // Generous: with other tests' servers on the same cores a token can take over a second
        // (their llama.cpp threads spin against these), and the stream must end within it.
        "--shutdown-grace-seconds",
        "600",
        "--exit-on-stdin-eof",
    ]);
    for i in 0..5 {
        let mut body = exact(2, "hi");
        body["metadata"] = json!({"run": format!("r{i}")});
        let (st, _, _) = chat_as(&s, "unused", &body).await;
        assert_eq!(st, 200);
    }
    // A stream in flight when SIGTERM arrives finishes, and its record is written by the
    // shutdown itself (the server has stopped serving by then).
    let r = stream_of(&s, "unused", 24, "Tell me a story.").await;
    let mut chunks = r.bytes_stream();
    chunks.next().await.unwrap().unwrap();
    s.terminate();
    let mut text = String::new();
    while let Some(c) = chunks.next().await {
        let c = c.unwrap_or_else(|e| panic!("the in-flight stream broke: {e}; it had: {text}"));
        text.push_str(&String::from_utf8_lossy(&c));
    }
    assert!(
        text.contains("[DONE]"),
        "the in-flight stream was cut: {text}"
    );
    let ended = Instant::now();
    loop {
        if let Some(status) = s.child.try_wait().unwrap() {
            assert!(status.success(), "the server's exit: {status:?}");
            break;
        }
        assert!(
            ended.elapsed() < Duration::from_secs(30),
            "the server did not exit within 30 s of its last stream"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let store = parlance_store::Store::open(&db).await.unwrap();
    let total = store
        .usage(&parlance_store::UsageQuery::default())
        .await
        .unwrap();
    assert_eq!(
        total[0].requests, 6,
        "usage records were lost at shutdown: {total:?}"
    );
    assert_eq!(total[0].completion_tokens, 10 + 24);
    let by_label = store
        .usage(&parlance_store::UsageQuery {
            group_by: Some("label:run".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    // Five labelled runs, and the stream without the label.
    assert_eq!(by_label.iter().filter(|g| g.group.is_some()).count(), 5);
    assert_eq!(by_label.iter().filter(|g| g.group.is_none()).count(), 1);
}

/// A replica killed with a stream in flight leaves credit held; another replica gives it back
/// once the dead one has been unseen for the replica timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_replicas_holds_are_given_back() {
    let db = fresh_postgres().await;
    let flags = ["--database-url", db.as_str()];
    let env = [("PARLANCE_REPLICA_TIMEOUT_MS", "1500")];
    let a = priced_server_env(&flags, &env);
    let b = priced_server_env(&flags, &env);
    let (acct, key) = funded_key(&b, "acme", 100_000, json!({})).await;
    let r = stream_of(&a, &key, 400, "Tell me a long story.").await;
    let mut chunks = r.bytes_stream();
    chunks.next().await.unwrap().unwrap();
    let (_, held) = admin(&b, "GET", &format!("/admin/accounts/{acct}"), None).await;
    assert!(held["reserved"].as_i64().unwrap() > 800, "{held}");
    // Let the hold reach the database (it is written with the next batch), then kill the
    // replica without a chance to settle.
    tokio::time::sleep(Duration::from_millis(400)).await;
    drop(a);
    drop(chunks);
    let a_after = settled_account(&b, &acct).await;
    assert_eq!(
        a_after["balance"], 100_000,
        "the dead request must not be charged: {a_after}"
    );
}

#[tokio::test]
async fn reused_prompt_tokens_are_billed_at_the_cached_price() {
    let s = priced_server(&["--prefix-cache-on"]);
    let (acct, key) = funded_key(&s, "cache", 100_000, json!({})).await;
    let long = "Describe, in careful detail and in order, every step of baking a loaf of \
                sourdough bread, from feeding the starter to cooling the loaf on a rack.";
    let (st, _, first) = chat_as(&s, &key, &exact(4, long)).await;
    assert_eq!(st, 200, "{first}");
    let (st, _, second) = chat_as(&s, &key, &exact(4, long)).await;
    assert_eq!(st, 200);
    let u = &second["usage"];
    let (prompt, cached, completion) = (
        u["prompt_tokens"].as_i64().unwrap(),
        u["prompt_tokens_details"]["cached_tokens"]
            .as_i64()
            .unwrap(),
        u["completion_tokens"].as_i64().unwrap(),
    );
    assert!(cached > 20 && cached < prompt, "{u}");
    // Prices per million: prompt 1, cached prompt 0.5, completion 2 (× 10^6 micro-units);
    // one request's cost is rounded up once.
    let cost = |prompt: i64, cached: i64, completion: i64| {
        (prompt - cached) + (cached + 1) / 2 + 2 * completion
    };
    let f = &first["usage"];
    let first_cost = cost(
        f["prompt_tokens"].as_i64().unwrap(),
        f["prompt_tokens_details"]["cached_tokens"]
            .as_i64()
            .unwrap(),
        f["completion_tokens"].as_i64().unwrap(),
    );
    let a = settled_account(&s, &acct).await;
    assert_eq!(
        a["balance"],
        100_000 - first_cost - cost(prompt, cached, completion),
        "{a}"
    );
    let (_, g) = admin(&s, "GET", "/admin/usage?account=cache", None).await;
    assert_eq!(
        g["data"][0]["cached_tokens"].as_i64().unwrap(),
        cached
            + f["prompt_tokens_details"]["cached_tokens"]
                .as_i64()
                .unwrap()
    );
}

#[tokio::test]
async fn metrics_count_known_traffic() {
    let s = priced_server(&["--prefix-cache-on"]);
    let (_, key) = funded_key(&s, "metered", 1_000_000, json!({"rpm": 3})).await;
    // The four requests below must fall in one one-minute counting window.
    let into = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        % 60_000) as u64;
    if into > 40_000 {
        tokio::time::sleep(Duration::from_millis(60_500 - into)).await;
    }
    let (mut prompt, mut completion) = (0.0, 0.0);
    for i in 0..2 {
        let (st, _, v) = chat_as(&s, &key, &exact(4, &format!("Count to {i}"))).await;
        assert_eq!(st, 200, "{v}");
        prompt += v["usage"]["prompt_tokens"].as_f64().unwrap();
        completion += v["usage"]["completion_tokens"].as_f64().unwrap();
    }
    let mut body = exact(5, "Count to ten");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = client()
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let data = common::sse_data(&r.text().await.unwrap());
    let usage: Value = data
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find(|v| v["usage"].is_object())
        .unwrap()["usage"]
        .clone();
    prompt += usage["prompt_tokens"].as_f64().unwrap();
    completion += usage["completion_tokens"].as_f64().unwrap();
    assert_eq!(completion, 13.0);
    // The fourth request in the minute is over the key's limit; a wrong key and an unknown
    // route are counted by the HTTP metrics only.
    let (st, _, _) = chat_as(&s, &key, &exact(4, "One more")).await;
    assert_eq!(st, 429);
    let (st, _, _) = chat_as(&s, "sk-wrong", &exact(4, "Hello")).await;
    assert_eq!(st, 401);
    assert_eq!(common::get_status(&s, "/no/such/route").await, 404);
    // What was charged, from the ledger's side (this also writes the waiting usage records).
    let (st, usage) = admin(&s, "GET", "/admin/usage", None).await;
    assert_eq!(st, 200);
    let charged = usage["data"][0]["cost"].as_f64().unwrap();
    assert!(charged > 0.0);

    let (text, m) = scrape(&s).await;
    let get = |series: &str| {
        m.get(series)
            .copied()
            .unwrap_or_else(|| panic!("{series} missing from:\n{text}"))
    };
    let chat = "route=\"/v1/chat/completions\",method=\"POST\"";
    assert_eq!(
        get(&format!(
            "parlance_http_requests_total{{{chat},status=\"200\"}}"
        )),
        3.0
    );
    assert_eq!(
        get(&format!(
            "parlance_http_requests_total{{{chat},status=\"429\"}}"
        )),
        1.0
    );
    assert_eq!(
        get(&format!(
            "parlance_http_requests_total{{{chat},status=\"401\"}}"
        )),
        1.0
    );
    assert_eq!(
        get("parlance_http_requests_total{route=\"unmatched\",method=\"GET\",status=\"404\"}"),
        1.0
    );
    let model = format!("model=\"{MODEL}\",provider=\"local\"");
    assert_eq!(
        get(&format!(
            "parlance_requests_total{{{model},status=\"200\",outcome=\"completed\"}}"
        )),
        3.0
    );
    assert_eq!(
        get(&format!(
            "parlance_requests_total{{{model},status=\"429\",outcome=\"refused\"}}"
        )),
        1.0
    );
    assert_eq!(
        get(&format!(
            "parlance_refusals_total{{model=\"{MODEL}\",reason=\"rate_limited\"}}"
        )),
        1.0
    );
    assert_eq!(
        get(&format!("parlance_prompt_tokens_total{{{model}}}")),
        prompt
    );
    assert_eq!(
        get(&format!("parlance_completion_tokens_total{{{model}}}")),
        completion
    );
    assert_eq!(
        get(&format!("parlance_credits_spent_micros_total{{{model}}}")),
        charged
    );
    assert_eq!(
        get(&format!(
            "parlance_time_to_first_token_seconds_count{{{model}}}"
        )),
        3.0
    );
    assert_eq!(
        get(&format!(
            "parlance_request_duration_seconds_count{{{model}}}"
        )),
        3.0
    );
    // Every token after the first of each answer is one inter-token gap at most.
    let gaps = get(&format!(
        "parlance_inter_token_latency_seconds_count{{{model}}}"
    ));
    assert!(gaps >= 3.0 && gaps <= completion - 3.0, "{gaps} gaps");
    // The engine's side: three admissions, nothing left running or waiting.
    let local = format!("model=\"{MODEL}\"");
    assert_eq!(
        get(&format!("parlance_prefix_cache_lookups_total{{{local}}}")),
        3.0
    );
    assert_eq!(
        get(&format!(
            "parlance_prefix_cache_prompt_tokens_total{{{local}}}"
        )),
        prompt
    );
    assert_eq!(get(&format!("parlance_queue_depth{{{local}}}")), 0.0);
    assert_eq!(get(&format!("parlance_running_sequences{{{local}}}")), 0.0);
    assert_eq!(
        get(&format!("parlance_kv_cache_cells_live{{{local}}}")),
        0.0
    );
    assert!(get(&format!("parlance_kv_cache_cells_cached{{{local}}}")) > 0.0);
    // No secret and no caller-chosen text becomes a label.
    assert!(!text.contains(&key) && !text.contains("sk-wrong") && !text.contains("/no/such"));

    // The same three errors, newest first, in the replica's recent errors (the 404 and the 401
    // have no usage record), with what the caller was told and never the key.
    let (st, errors) = admin(&s, "GET", "/admin/errors?limit=3", None).await;
    assert_eq!(st, 200, "{errors}");
    let got: Vec<(u64, &str, &str)> = errors["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["status"].as_u64().unwrap(),
                e["route"].as_str().unwrap(),
                e["code"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (404, "unmatched", "unknown_url"),
            (401, "/v1/chat/completions", "invalid_api_key"),
            (429, "/v1/chat/completions", "rate_limit_exceeded"),
        ],
        "{errors}"
    );
    assert!(errors["data"][1]["message"]
        .as_str()
        .unwrap()
        .contains("API key"));
    let all = errors.to_string();
    assert!(!all.contains(&key) && !all.contains("sk-wrong"));
}
