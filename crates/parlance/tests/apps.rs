//! The application layer end to end, on the real binary: projects (model resolution,
//! system-prompt templates, default parameters), server-side sessions, stored completions,
//! A/B campaigns with their report and feedback, labels and tags, and project tools, including
//! the loop of HTTP tools parlance calls itself. The real default model answers where what it
//! says does not matter to the assertion; where the test must see exactly what a provider was
//! sent, a mock upstream (a real HTTP server on loopback) answers and records it; `echo`
//! answers the 1,000-request campaign draw.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::post;
use common::mock_upstream::{mock_upstream, Shared};
use common::{client, model_path, sse_data, Server};
use futures::StreamExt;
use serde_json::{json, Value};

const ADMIN: &str = "adm-apps";

/// What the test tools were sent.
type ToolLog = Arc<Mutex<Vec<(String, Value)>>>;

/// HTTP tools on loopback: `/weather` answers, `/fail` fails, `/hang` never answers in time.
async fn tool_server() -> (String, ToolLog) {
    let log: ToolLog = Arc::default();
    let l1 = log.clone();
    let l2 = log.clone();
    let l3 = log.clone();
    let app = axum::Router::new()
        .route(
            "/weather",
            post(move |axum::Json(v): axum::Json<Value>| async move {
                l1.lock().unwrap().push(("weather".into(), v));
                axum::Json(json!({"temp_c": 21, "sky": "clear"}))
            }),
        )
        .route(
            "/fail",
            post(move |axum::Json(v): axum::Json<Value>| async move {
                l2.lock().unwrap().push(("fail".into(), v));
                (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "tool broke")
            }),
        )
        .route(
            "/hang",
            post(move |axum::Json(v): axum::Json<Value>| async move {
                l3.lock().unwrap().push(("hang".into(), v));
                tokio::time::sleep(Duration::from_secs(60)).await;
                "too late"
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}"), log)
}

/// parlance with the local model, `echo`, and mock-upstream models `inspect` (records what it
/// is sent), `agent` and `agent-forever` (call tools).
async fn gateway() -> (Server, Shared) {
    let (base, seen) = mock_upstream().await;
    let dir = std::env::temp_dir().join(format!("parlance-apps-{}", common::uuid_like()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = format!(
        r#"[[providers]]
name = "mock"
kind = "openai"
base_url = "{base}"
api_key = "sk-up"

[[models]]
name = "smollm2"
path = "{path}"

[[models]]
name = "echo"
provider = "echo"

[[models]]
name = "inspect"
deployments = [{{ provider = "mock", model = "ok" }}]

[[models]]
name = "agent"
deployments = [{{ provider = "mock", model = "agent" }}]

[[models]]
name = "agent-forever"
deployments = [{{ provider = "mock", model = "agent-forever" }}]
"#,
        path = model_path().display()
    );
    let path = dir.join("parlance.toml");
    std::fs::write(&path, cfg).unwrap();
    let server = Server::start_raw(&[
        "serve",
        "--addr",
        "127.0.0.1:0",
        "--config",
        path.to_str().unwrap(),
        "--admin-token",
        ADMIN,
        "--exit-on-stdin-eof",
    ]);
    (server, seen)
}

async fn admin(s: &Server, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut r = client()
        .request(method.parse().unwrap(), s.url(path))
        .bearer_auth(ADMIN);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let r = r.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// A new account and a key of it.
async fn account_key(s: &Server, name: &str) -> String {
    let (st, _) = admin(s, "POST", "/admin/accounts", Some(json!({"name": name}))).await;
    assert_eq!(st, 201);
    let (st, k) = admin(s, "POST", "/admin/keys", Some(json!({"account": name}))).await;
    assert_eq!(st, 201);
    k["key"].as_str().unwrap().to_owned()
}

async fn call(
    s: &Server,
    key: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut r = client()
        .request(method.parse().unwrap(), s.url(path))
        .bearer_auth(key);
    if let Some(b) = body {
        r = r.json(b);
    }
    let r = r.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn chat(s: &Server, key: &str, body: &Value) -> (u16, Value) {
    call(s, key, "POST", "/v1/chat/completions", Some(body)).await
}

async fn chat_stream(s: &Server, key: &str, body: &Value) -> Vec<Value> {
    let mut body = body.clone();
    body["stream"] = json!(true);
    let r = client()
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    sse_data(&r.text().await.unwrap())
        .into_iter()
        .filter(|d| d != "[DONE]")
        .map(|d| serde_json::from_str(&d).unwrap())
        .collect()
}

fn text(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn streamed_text(chunks: &[Value]) -> String {
    chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect()
}

fn user(content: &str) -> Value {
    json!({"role": "user", "content": content})
}

fn last_body(seen: &Shared, model: &str) -> Value {
    seen.lock().unwrap().bodies.get(model).cloned().unwrap()
}

#[tokio::test]
async fn projects_resolve_models_render_templates_and_fill_defaults() {
    let (s, seen) = gateway().await;
    let key_a = account_key(&s, "a").await;
    let key_b = account_key(&s, "b").await;

    let (st, p) = admin(
        &s,
        "POST",
        "/admin/projects",
        Some(json!({
            "name": "support",
            "default_model": "inspect",
            "models": ["smollm2", "echo"],
            "system_prompt": "You are {{ bot }}, helping {{ customer.name }}.{% if vip is defined %} VIP!{% endif %}",
            "params": {"temperature": 0.3, "max_tokens": 40}
        })),
    )
    .await;
    assert_eq!(st, 201, "{p}");
    assert_eq!(p["name"], "support");

    // `{project}` alone: the default model, the template rendered first, the defaults applied.
    let args = json!({"bot": "Parla", "customer": {"name": "Ada"}});
    let (st, r) = chat(
        &s,
        &key_a,
        &json!({"model": "support", "messages": [user("Hi")], "system_prompt_args": args}),
    )
    .await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["model"], "inspect");
    let sent = last_body(&seen, "ok");
    assert_eq!(
        sent["messages"][0],
        json!({"role": "system", "content": "You are Parla, helping Ada."})
    );
    assert_eq!(sent["messages"][1]["content"], "Hi");
    assert_eq!(sent["temperature"], json!(0.3));
    let max = sent.get("max_completion_tokens").or(sent.get("max_tokens"));
    assert_eq!(max, Some(&json!(40)), "{sent}");

    // What the caller sets wins over the project's defaults.
    let (st, _) = chat(
        &s,
        &key_a,
        &json!({"model": "support/inspect", "messages": [user("Hi")], "system_prompt_args": args, "temperature": 0.9}),
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(last_body(&seen, "ok")["temperature"], json!(0.9));

    // The template reaches the local model too: a longer rendering, more prompt tokens.
    let mut counts = Vec::new();
    for bot in [
        "A",
        "A helper with a much longer name than the other one has",
    ] {
        let (st, r) = chat(
            &s,
            &key_a,
            &json!({"model": "support/smollm2", "messages": [user("Hi")], "max_tokens": 1,
                    "system_prompt_args": {"bot": bot, "customer": {"name": "Ada"}}}),
        )
        .await;
        assert_eq!(st, 200, "{r}");
        assert_eq!(r["model"], "smollm2");
        counts.push(r["usage"]["prompt_tokens"].as_u64().unwrap());
    }
    assert!(counts[1] > counts[0] + 5, "{counts:?}");

    // A variable the template needs is named in the 400.
    let (st, e) = chat(
        &s,
        &key_a,
        &json!({"model": "support", "messages": [user("Hi")], "system_prompt_args": {"bot": "x"}}),
    )
    .await;
    assert_eq!(st, 400);
    assert_eq!(e["error"]["param"], "system_prompt_args");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`customer`"),
        "{e}"
    );
    // Arguments where no template applies.
    let (st, e) = chat(
        &s,
        &key_a,
        &json!({"model": "echo", "messages": [user("Hi")], "system_prompt_args": {"a": 1}}),
    )
    .await;
    assert_eq!(
        (st, e["error"]["param"].clone()),
        (400, json!("system_prompt_args"))
    );
    // A model the project does not allow; projects and models that do not exist.
    let (st, e) = chat(
        &s,
        &key_a,
        &json!({"model": "support/agent", "messages": [user("Hi")], "system_prompt_args": args}),
    )
    .await;
    assert_eq!(
        (st, e["error"]["param"].clone()),
        (400, json!("model")),
        "{e}"
    );
    for m in ["nosuch", "nosuch/smollm2", "support/nosuch"] {
        let (st, e) = chat(&s, &key_a, &json!({"model": m, "messages": [user("Hi")]})).await;
        assert_eq!(st, 404, "{m}: {e}");
        assert_eq!(e["error"]["code"], "model_not_found");
    }

    // Operators get a clear 4xx for a bad project.
    for (body, status) in [
        (json!({"name": "x1", "default_model": "gpt-9"}), 400),
        (
            json!({"name": "x2", "default_model": "echo", "system_prompt": "{{ oops"}),
            400,
        ),
        (
            json!({"name": "x3", "default_model": "echo", "params": {"temperature": 5}}),
            400,
        ),
        (
            json!({"name": "x4", "default_model": "echo", "params": {"messages": []}}),
            400,
        ),
        (
            json!({"name": "x5", "default_model": "echo", "tools": [{"id": "t", "http": {"url": "ftp://x"}}]}),
            400,
        ),
        (json!({"name": "support", "default_model": "echo"}), 409),
    ] {
        let (st, e) = admin(&s, "POST", "/admin/projects", Some(body.clone())).await;
        assert_eq!(st, status, "{body}: {e}");
    }
    // A project of account b is not there for account a.
    let (st, _) = admin(
        &s,
        "POST",
        "/admin/projects",
        Some(json!({"name": "private", "account": "b", "default_model": "echo"})),
    )
    .await;
    assert_eq!(st, 201);
    let ask = json!({"model": "private", "messages": [user("one two")]});
    assert_eq!(chat(&s, &key_b, &ask).await.0, 200);
    assert_eq!(chat(&s, &key_a, &ask).await.0, 404);
    // Edits take effect at once on this replica.
    let (st, _) = admin(
        &s,
        "POST",
        "/admin/projects/private",
        Some(json!({"default_model": "echo", "params": {"max_tokens": 1}})),
    )
    .await;
    assert_eq!(st, 200);
    let (_, r) = chat(&s, &key_b, &ask).await;
    assert_eq!(text(&r), "one");
    let (st, list) = admin(&s, "GET", "/admin/projects", None).await;
    assert_eq!(st, 200);
    assert_eq!(list["data"].as_array().unwrap().len(), 2);
    assert_eq!(
        admin(&s, "DELETE", "/admin/projects/private", None).await.0,
        200
    );
    assert_eq!(chat(&s, &key_b, &ask).await.0, 404);
}

#[tokio::test]
async fn sessions_continue_conversations_and_stay_private() {
    let (s, seen) = gateway().await;
    let key_a = account_key(&s, "a").await;
    let key_b = account_key(&s, "b").await;
    let (st, _) = admin(
        &s,
        "POST",
        "/admin/projects",
        Some(json!({"name": "chat", "default_model": "smollm2", "models": ["inspect"], "sessions": true})),
    )
    .await;
    assert_eq!(st, 201);

    // First turn on the local model: the server starts a session.
    let (st, r1) = chat(
        &s,
        &key_a,
        &json!({"model": "chat", "messages": [user("My name is Ada.")], "max_tokens": 8, "temperature": 0}),
    )
    .await;
    assert_eq!(st, 200, "{r1}");
    let session = r1["session_id"].as_str().unwrap().to_owned();
    assert_eq!(
        uuid::Uuid::parse_str(&session).unwrap().to_string(),
        session
    );
    let completion_1 = r1["choices"][0]["completion_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(r1["choices"][0]["message"]["id"]
        .as_str()
        .unwrap()
        .starts_with("msg_"));
    let (p1, c1) = (
        r1["usage"]["prompt_tokens"].as_u64().unwrap(),
        r1["usage"]["completion_tokens"].as_u64().unwrap(),
    );

    // Second turn, streamed: the history comes first, so the prompt holds both turns.
    let chunks = chat_stream(
        &s,
        &key_a,
        &json!({"model": "chat", "session_id": session, "messages": [user("What is my name?")],
                "max_tokens": 8, "temperature": 0, "stream_options": {"include_usage": true}}),
    )
    .await;
    assert!(chunks.iter().all(|c| c["session_id"] == session.as_str()));
    let p2 = chunks.last().unwrap()["usage"]["prompt_tokens"]
        .as_u64()
        .unwrap();
    assert!(p2 > p1 + c1, "turn 2 prompt {p2} vs turn 1 {p1} + {c1}");
    let answer_2 = streamed_text(&chunks);

    // The history as stored.
    let (st, h) = call(&s, &key_a, "GET", &format!("/v1/sessions/{session}"), None).await;
    assert_eq!(st, 200, "{h}");
    let msgs = h["messages"].as_array().unwrap();
    let roles: Vec<&str> = msgs.iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["user", "assistant", "user", "assistant"]);
    assert_eq!(msgs[0]["content"], "My name is Ada.");
    assert_eq!(msgs[1]["content"], text(&r1).as_str());
    assert_eq!(msgs[1]["completion_id"], completion_1.as_str());
    assert_eq!(msgs[3]["content"], answer_2.as_str());
    assert!(msgs
        .iter()
        .all(|m| m["id"].as_str().unwrap().starts_with("msg_")));

    // Exactly this history reaches an upstream model of the same project.
    let (st, _) = chat(
        &s,
        &key_a,
        &json!({"model": "chat/inspect", "session_id": session, "messages": [user("Third.")]}),
    )
    .await;
    assert_eq!(st, 200);
    let sent: Vec<Value> = last_body(&seen, "ok")["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].clone())
        .collect();
    assert_eq!(
        sent,
        vec![
            json!("My name is Ada."),
            json!(text(&r1)),
            json!("What is my name?"),
            json!(answer_2),
            json!("Third.")
        ]
    );

    // Another account can neither read, extend nor delete it: 404, as if it did not exist.
    let path = format!("/v1/sessions/{session}");
    assert_eq!(call(&s, &key_b, "GET", &path, None).await.0, 404);
    assert_eq!(call(&s, &key_b, "DELETE", &path, None).await.0, 404);
    let (st, e) = chat(
        &s,
        &key_b,
        &json!({"model": "chat", "session_id": session, "messages": [user("Hi")]}),
    )
    .await;
    assert_eq!(st, 404);
    assert_eq!(e["error"]["code"], "session_not_found");
    assert_eq!(e["error"]["param"], "session_id");

    // Clear errors: unknown session, not a UUID, several choices.
    let unknown = uuid::Uuid::new_v4().to_string();
    let (st, _) = chat(
        &s,
        &key_a,
        &json!({"model": "chat", "session_id": unknown, "messages": [user("Hi")]}),
    )
    .await;
    assert_eq!(st, 404);
    let (st, e) = chat(
        &s,
        &key_a,
        &json!({"model": "chat", "session_id": "abc", "messages": [user("Hi")]}),
    )
    .await;
    assert_eq!(
        (st, e["error"]["param"].clone()),
        (400, json!("session_id"))
    );
    let (st, e) = chat(
        &s,
        &key_a,
        &json!({"model": "chat", "session_id": session, "n": 2, "messages": [user("Hi")]}),
    )
    .await;
    assert_eq!((st, e["error"]["param"].clone()), (400, json!("n")));

    // Sessions made explicitly, listed, and deleted.
    let (st, made) = call(&s, &key_a, "POST", "/v1/sessions", Some(&json!({}))).await;
    assert_eq!(st, 201);
    let (st, r) = chat(
        &s,
        &key_a,
        &json!({"model": "echo", "session_id": made["id"], "messages": [user("one two")]}),
    )
    .await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["session_id"], made["id"]);
    let (_, list) = call(&s, &key_a, "GET", "/v1/sessions", None).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 2);
    let (_, list_b) = call(&s, &key_b, "GET", "/v1/sessions", None).await;
    assert_eq!(list_b["data"].as_array().unwrap().len(), 0);
    let (st, d) = call(&s, &key_a, "DELETE", &path, None).await;
    assert_eq!((st, d["deleted"].clone()), (200, json!(true)));
    assert_eq!(call(&s, &key_a, "GET", &path, None).await.0, 404);
}

#[tokio::test]
async fn stored_completions_are_listed_filtered_and_private() {
    let (s, _) = gateway().await;
    let key_a = account_key(&s, "a").await;
    let key_b = account_key(&s, "b").await;

    let mut ids = Vec::new();
    for (i, team) in ["red", "blue", "red"].iter().enumerate() {
        let (st, r) = chat(
            &s,
            &key_a,
            &json!({"model": "echo", "store": true, "metadata": {"team": team, "n": i.to_string()},
                    "messages": [{"role": "system", "content": "Be brief."}, user(&format!("answer number {i}"))]}),
        )
        .await;
        assert_eq!(st, 200);
        ids.push(r["id"].as_str().unwrap().to_owned());
    }
    // Streamed and stored.
    let chunks = chat_stream(
        &s,
        &key_a,
        &json!({"model": "echo", "store": true, "labels": {"team": "green"}, "messages": [user("streamed words")]}),
    )
    .await;
    let streamed_id = chunks[0]["id"].as_str().unwrap().to_owned();
    // Not stored.
    let (_, plain) = chat(
        &s,
        &key_a,
        &json!({"model": "echo", "messages": [user("x")]}),
    )
    .await;

    let (st, got) = call(
        &s,
        &key_a,
        "GET",
        &format!("/v1/chat/completions/{}", ids[1]),
        None,
    )
    .await;
    assert_eq!(st, 200, "{got}");
    assert_eq!(got["object"], "chat.completion");
    assert_eq!(text(&got), "answer number 1");
    assert_eq!(got["metadata"], json!({"team": "blue", "n": "1"}));
    let (st, got) = call(
        &s,
        &key_a,
        "GET",
        &format!("/v1/chat/completions/{streamed_id}"),
        None,
    )
    .await;
    assert_eq!((st, text(&got)), (200, "streamed words".to_owned()));
    let path = format!("/v1/chat/completions/{}", plain["id"].as_str().unwrap());
    assert_eq!(call(&s, &key_a, "GET", &path, None).await.0, 404);

    // Listing, filtering by metadata, paging.
    let (_, all) = call(&s, &key_a, "GET", "/v1/chat/completions", None).await;
    let listed: Vec<&str> = all["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        listed,
        [
            ids[0].as_str(),
            ids[1].as_str(),
            ids[2].as_str(),
            streamed_id.as_str()
        ]
    );
    let (_, red) = call(
        &s,
        &key_a,
        "GET",
        "/v1/chat/completions?metadata[team]=red",
        None,
    )
    .await;
    let red: Vec<&str> = red["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(red, [ids[0].as_str(), ids[2].as_str()]);
    let (_, page) = call(
        &s,
        &key_a,
        "GET",
        "/v1/chat/completions?limit=2&order=desc",
        None,
    )
    .await;
    assert_eq!(page["has_more"], true);
    assert_eq!(page["first_id"], streamed_id.as_str());
    let after = page["last_id"].as_str().unwrap().to_owned();
    let (_, page2) = call(
        &s,
        &key_a,
        "GET",
        &format!("/v1/chat/completions?limit=2&order=desc&after={after}"),
        None,
    )
    .await;
    assert_eq!(page2["has_more"], false);
    assert_eq!(page2["data"][1]["id"], ids[0].as_str());
    let (st, _) = call(&s, &key_a, "GET", "/v1/chat/completions?limit=0", None).await;
    assert_eq!(st, 400);

    // The request's messages.
    let (st, m) = call(
        &s,
        &key_a,
        "GET",
        &format!("/v1/chat/completions/{}/messages", ids[2]),
        None,
    )
    .await;
    assert_eq!(st, 200);
    let contents: Vec<&str> = m["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["content"].as_str().unwrap())
        .collect();
    assert_eq!(contents, ["Be brief.", "answer number 2"]);

    // Metadata can be replaced, and filters see the new values.
    let (st, up) = call(
        &s,
        &key_a,
        "POST",
        &format!("/v1/chat/completions/{}", ids[1]),
        Some(&json!({"metadata": {"team": "red"}})),
    )
    .await;
    assert_eq!((st, up["metadata"].clone()), (200, json!({"team": "red"})));
    let (_, red) = call(
        &s,
        &key_a,
        "GET",
        "/v1/chat/completions?metadata[team]=red",
        None,
    )
    .await;
    assert_eq!(red["data"].as_array().unwrap().len(), 3);

    // Another account sees none of it.
    let one = format!("/v1/chat/completions/{}", ids[0]);
    assert_eq!(call(&s, &key_b, "GET", &one, None).await.0, 404);
    assert_eq!(call(&s, &key_b, "DELETE", &one, None).await.0, 404);
    assert_eq!(
        call(&s, &key_b, "POST", &one, Some(&json!({"metadata": {}})))
            .await
            .0,
        404
    );
    let (_, none) = call(&s, &key_b, "GET", "/v1/chat/completions", None).await;
    assert_eq!(none["data"].as_array().unwrap().len(), 0);

    // Deleted.
    let (st, d) = call(&s, &key_a, "DELETE", &one, None).await;
    assert_eq!(
        (st, d["object"].clone(), d["deleted"].clone()),
        (200, json!("chat.completion.deleted"), json!(true))
    );
    assert_eq!(call(&s, &key_a, "GET", &one, None).await.0, 404);
}

#[tokio::test]
async fn campaigns_split_traffic_stickily_and_report_outcomes() {
    let (s, _) = gateway().await;
    let key_a = account_key(&s, "a").await;
    let key_b = account_key(&s, "b").await;
    // Variant `short` answers 2 words, `long` 4: the answer tells which one served it.
    let (st, c) = admin(
        &s,
        "POST",
        "/admin/campaigns",
        Some(
            json!({"name": "Greeting length", "key": "greeting", "variants": [
                {"name": "short", "weight": 1, "model": "echo", "params": {"max_tokens": 2}},
                {"name": "long", "weight": 3, "model": "echo", "params": {"max_tokens": 4}}
            ]}),
        ),
    )
    .await;
    assert_eq!(st, 201, "{c}");
    let campaign_id = c["id"].as_str().unwrap().to_owned();

    let ask = |u: String| {
        json!({"model": "echo", "ab_campaign": "greeting", "user": u, "tags": ["ab"],
               "messages": [user("w1 w2 w3 w4 w5")]})
    };
    let words = |r: &Value| text(r).split_whitespace().count();
    // 1,000 users, one request each, 16 at a time.
    let results: Vec<(String, usize, String)> = futures::stream::iter(0..1000)
        .map(|i| {
            let (s, key, body) = (&s, &key_a, ask(format!("user-{i}")));
            async move {
                let (st, r) = chat(s, key, &body).await;
                assert_eq!(st, 200, "{r}");
                (
                    format!("user-{i}"),
                    words(&r),
                    r["choices"][0]["completion_id"]
                        .as_str()
                        .unwrap()
                        .to_owned(),
                )
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let short = results.iter().filter(|r| r.1 == 2).count();
    let long = results.iter().filter(|r| r.1 == 4).count();
    assert_eq!(short + long, 1000);
    // Expected 250 short (σ ≈ 13.7): within 4.5σ.
    assert!((188..=312).contains(&short), "short {short}, long {long}");
    // Sticky: the same user gets the same variant every time.
    let first: HashMap<&str, usize> = results.iter().map(|r| (r.0.as_str(), r.1)).collect();
    for i in (0..1000).step_by(20) {
        let u = format!("user-{i}");
        for _ in 0..3 {
            let (_, r) = chat(&s, &key_a, &ask(u.clone())).await;
            assert_eq!(words(&r), first[u.as_str()], "{u} changed variant");
        }
    }
    let repeats = 50 * 3;

    // Feedback against completions: every short answer accepted (score 1), two long ones rejected.
    let shorts: Vec<&String> = results
        .iter()
        .filter(|r| r.1 == 2)
        .map(|r| &r.2)
        .take(10)
        .collect();
    for id in &shorts {
        let (st, f) = call(
            &s,
            &key_a,
            "POST",
            "/v1/feedback",
            Some(&json!({"completion_id": id, "score": 1, "label": "accepted"})),
        )
        .await;
        assert_eq!(st, 201, "{f}");
        assert_eq!(f["variant"], "short");
    }
    let longs: Vec<&String> = results
        .iter()
        .filter(|r| r.1 == 4)
        .map(|r| &r.2)
        .take(2)
        .collect();
    for id in &longs {
        let (st, _) = call(
            &s,
            &key_a,
            "POST",
            "/v1/feedback",
            Some(&json!({"completion_id": id, "score": 0})),
        )
        .await;
        assert_eq!(st, 201);
    }
    // Feedback on another account's completion, an unknown one, or with nothing in it: 4xx.
    let (st, e) = call(
        &s,
        &key_b,
        "POST",
        "/v1/feedback",
        Some(&json!({"completion_id": shorts[0], "score": 1})),
    )
    .await;
    assert_eq!(
        (st, e["error"]["code"].clone()),
        (404, json!("completion_not_found"))
    );
    let (st, _) = call(
        &s,
        &key_a,
        "POST",
        "/v1/feedback",
        Some(&json!({"completion_id": uuid::Uuid::new_v4().to_string(), "score": 1})),
    )
    .await;
    assert_eq!(st, 404);
    let (st, _) = call(
        &s,
        &key_a,
        "POST",
        "/v1/feedback",
        Some(&json!({"completion_id": shorts[0]})),
    )
    .await;
    assert_eq!(st, 400);

    // The report compares the variants.
    let (st, rep) = admin(&s, "GET", "/admin/campaigns/greeting/report", None).await;
    assert_eq!(st, 200, "{rep}");
    assert_eq!(rep["campaign_id"], campaign_id.as_str());
    let v: HashMap<String, Value> = rep["variants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["variant"].as_str().unwrap().to_owned(), v.clone()))
        .collect();
    let (vs, vl) = (&v["short"], &v["long"]);
    let short_reqs = vs["requests"].as_u64().unwrap();
    let long_reqs = vl["requests"].as_u64().unwrap();
    assert_eq!(short_reqs + long_reqs, 1000 + repeats);
    assert_eq!(vs["completion_tokens"].as_u64().unwrap(), 2 * short_reqs);
    assert_eq!(vl["completion_tokens"].as_u64().unwrap(), 4 * long_reqs);
    assert_eq!(vs["errors"], 0);
    assert_eq!(vs["weight"], 1);
    assert!(vs["avg_latency_ms"].is_number());
    assert_eq!(vs["feedback"], 10);
    assert_eq!(vs["avg_score"].as_f64(), Some(1.0));
    assert_eq!(vs["labels"]["accepted"], 10);
    assert_eq!(vl["feedback"], 2);
    assert_eq!(vl["avg_score"].as_f64(), Some(0.0));

    // The report filters like the usage API does.
    let (_, tagged) = admin(&s, "GET", "/admin/campaigns/greeting/report?tag=ab", None).await;
    assert_eq!(tagged["variants"], rep["variants"]);
    let (_, other) = admin(&s, "GET", "/admin/campaigns/greeting/report?tag=nope", None).await;
    assert!(
        other["variants"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["requests"] == 0),
        "{other}"
    );
    let (_, one) = admin(
        &s,
        "GET",
        "/admin/campaigns/greeting/report?user=user-0",
        None,
    )
    .await;
    let one_total: u64 = one["variants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["requests"].as_u64().unwrap())
        .sum();
    assert_eq!(one_total, 4);
    assert_eq!(
        admin(
            &s,
            "GET",
            "/admin/campaigns/greeting/report?group_by=model",
            None
        )
        .await
        .0,
        400
    );

    // Usage filters by campaign, variant and tag.
    let (_, u) = admin(
        &s,
        "GET",
        "/admin/usage?campaign=greeting&group_by=variant",
        None,
    )
    .await;
    let total: u64 = u["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["requests"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 1000 + repeats);
    let (_, u) = admin(&s, "GET", "/admin/usage?tag=ab", None).await;
    assert_eq!(u["data"][0]["requests"].as_u64(), Some(1000 + repeats));

    // A campaign that does not exist, or that belongs to another account.
    let (st, e) = chat(
        &s,
        &key_a,
        &json!({"model": "echo", "ab_campaign": "nope", "messages": [user("x")]}),
    )
    .await;
    assert_eq!(st, 404);
    assert_eq!(
        (e["error"]["code"].clone(), e["error"]["param"].clone()),
        (json!("campaign_not_found"), json!("ab_campaign"))
    );
    let (st, _) = admin(
        &s,
        "POST",
        "/admin/campaigns",
        Some(json!({"name": "b only", "key": "b-only", "account": "b",
        "variants": [{"name": "x", "weight": 1}]})),
    )
    .await;
    assert_eq!(st, 201);
    let (st, _) = chat(
        &s,
        &key_a,
        &json!({"model": "echo", "ab_campaign": "b-only", "messages": [user("x")]}),
    )
    .await;
    assert_eq!(st, 404);
    assert_eq!(
        chat(
            &s,
            &key_b,
            &json!({"model": "echo", "ab_campaign": "b-only", "messages": [user("x")]})
        )
        .await
        .0,
        200
    );
    // Invalid campaigns and labels are refused.
    let (st, _) = admin(
        &s,
        "POST",
        "/admin/campaigns",
        Some(json!({"name": "bad", "variants": []})),
    )
    .await;
    assert_eq!(st, 400);
    let (st, e) = chat(
        &s,
        &key_a,
        &json!({"model": "echo", "tags": vec!["t"; 33], "messages": [user("x")]}),
    )
    .await;
    assert_eq!((st, e["error"]["param"].clone()), (400, json!("tags")));
    let (st, e) = chat(
        &s,
        &key_a,
        &json!({"model": "echo", "labels": {"k": 1}, "messages": [user("x")]}),
    )
    .await;
    assert_eq!((st, e["error"]["param"].clone()), (400, json!("labels.k")));
}

#[tokio::test]
async fn project_tools_are_switched_and_http_tools_run_in_a_loop() {
    let (s, seen) = gateway().await;
    let (tools, log) = tool_server().await;
    let key = account_key(&s, "a").await;
    let (st, p) = admin(
        &s,
        "POST",
        "/admin/projects",
        Some(json!({
            "name": "agents",
            "default_model": "agent",
            "models": ["agent-forever", "smollm2"],
            "max_tool_steps": 3,
            "tools": [
                {"id": "weather", "description": "Weather now", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
                 "http": {"url": format!("{tools}/weather"), "headers": {"x-tool-secret": "s3"}}},
                {"id": "broken", "http": {"url": format!("{tools}/fail")}},
                {"id": "sleepy", "http": {"url": format!("{tools}/hang"), "timeout_ms": 300}},
                {"id": "lookup", "description": "Runs on the caller's side",
                 "parameters": {"type": "object", "properties": {"q": {"type": "string", "maxLength": 20}}, "required": ["q"], "additionalProperties": false}},
                {"id": "dormant", "enabled": false, "http": {"url": format!("{tools}/weather")}}
            ]
        })),
    )
    .await;
    assert_eq!(st, 201, "{p}");
    let ask = |words: &str| json!({"model": "agents", "messages": [user(words)]});
    let offered = |seen: &Shared, model: &str| -> Vec<String> {
        last_body(seen, model)["tools"]
            .as_array()
            .map(|t| {
                t.iter()
                    .map(|t| t["function"]["name"].as_str().unwrap().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    };

    // The model calls `weather`; parlance calls the tool and the model reads its answer.
    let (st, r) = chat(&s, &key, &ask("weather please")).await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(text(&r), r#"Tool said: {"temp_c":21,"sky":"clear"}"#);
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    assert!(r["choices"][0]["message"].get("tool_calls").is_none());
    // Two provider calls, one usage (the mock reports 11 + 3 per call).
    assert_eq!(r["usage"]["prompt_tokens"], 22);
    assert_eq!(r["usage"]["completion_tokens"], 6);
    assert_eq!(
        log.lock().unwrap().last().unwrap(),
        &("weather".to_owned(), json!({"q": "weather please"}))
    );
    assert_eq!(
        offered(&seen, "agent"),
        ["weather", "broken", "sleepy", "lookup"]
    );
    // The second call carried the call and its result.
    let sent = last_body(&seen, "agent");
    let msgs = sent["messages"].as_array().unwrap();
    assert_eq!(msgs[1]["role"], "assistant");
    assert_eq!(msgs[1]["tool_calls"][0]["function"]["name"], "weather");
    assert_eq!(msgs[2]["role"], "tool");
    assert_eq!(msgs[2]["tool_call_id"], msgs[1]["tool_calls"][0]["id"]);

    // A tool that fails, and one that never answers in time: the model reads the error.
    let (_, r) = chat(&s, &key, &ask("broken please")).await;
    assert!(text(&r).contains("HTTP 500"), "{r}");
    let started = std::time::Instant::now();
    let (_, r) = chat(&s, &key, &ask("sleepy please")).await;
    assert!(text(&r).contains("within 300 ms"), "{r}");
    assert!(started.elapsed() < Duration::from_secs(30));

    // A function tool goes back to the caller as a normal tool call.
    let (_, r) = chat(&s, &key, &ask("lookup please")).await;
    assert_eq!(r["choices"][0]["finish_reason"], "tool_calls", "{r}");
    assert_eq!(
        r["choices"][0]["message"]["tool_calls"][0]["function"]["name"],
        "lookup"
    );

    // Streamed: the caller sees the answer, not the server's own calls.
    let chunks = chat_stream(&s, &key, &ask("weather please")).await;
    assert_eq!(
        streamed_text(&chunks),
        r#"Tool said: {"temp_c":21,"sky":"clear"}"#
    );
    assert!(chunks
        .iter()
        .all(|c| c["choices"][0]["delta"].get("tool_calls").is_none()));

    // Switches.
    let mut b = ask("hello");
    b["use_tools"] = json!(false);
    let (_, r) = chat(&s, &key, &b).await;
    assert_eq!(text(&r), "No more tools after 0 results.");
    assert!(offered(&seen, "agent").is_empty());
    let mut b = ask("lookup please");
    b["tools"] = json!([{"id": "weather", "enabled": false}, {"id": "dormant", "enabled": true}]);
    chat(&s, &key, &b).await;
    assert_eq!(
        offered(&seen, "agent"),
        ["broken", "sleepy", "lookup", "dormant"]
    );
    let mut b = ask("x");
    b["tools"] = json!([{"id": "nope"}]);
    let (st, e) = chat(&s, &key, &b).await;
    assert_eq!((st, e["error"]["param"].clone()), (400, json!("tools")));
    let (st, _) = chat(
        &s,
        &key,
        &json!({"model": "echo", "tools": [{"id": "weather"}], "messages": [user("x")]}),
    )
    .await;
    assert_eq!(st, 400);

    // A model that always wants another tool: stopped after `max_tool_steps` rounds.
    let (st, r) = chat(
        &s,
        &key,
        &json!({"model": "agents/agent-forever", "messages": [user("weather forever")]}),
    )
    .await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(text(&r), "No more tools after 3 results.");
    assert_eq!(r["usage"]["prompt_tokens"], 44);

    // The local model is offered the project's tools too, and can be made to call one.
    let (st, r) = chat(
        &s,
        &key,
        &json!({"model": "agents/smollm2", "messages": [user("Look it up.")], "tool_choice": {"type": "function", "function": {"name": "lookup"}}, "max_tokens": 60}),
    )
    .await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(
        r["choices"][0]["message"]["tool_calls"][0]["function"]["name"],
        "lookup"
    );
}

#[tokio::test]
async fn command_line_manages_projects_and_campaigns() {
    let dir = std::env::temp_dir().join(format!("parlance-apps-cli-{}", common::uuid_like()));
    std::fs::create_dir_all(&dir).unwrap();
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
    let template = dir.join("prompt.j2");
    std::fs::write(&template, "Speak as {{ persona }}.").unwrap();
    let (ok, out, err) = run(&[
        "projects",
        "create",
        "cli-proj",
        "--default-model",
        "inspect",
        "--system-prompt",
        &format!("@{}", template.display()),
        "--params",
        r#"{"max_tokens": 7}"#,
        "--sessions",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("\"sessions\": true"), "{out}");
    // A bad template or parameter fails with a message, and nothing is created.
    let (ok, _, err) = run(&[
        "projects",
        "create",
        "bad",
        "--default-model",
        "x",
        "--system-prompt",
        "{{ oops",
    ]);
    assert!(!ok && err.contains("template"), "{err}");
    let (ok, _, err) = run(&[
        "projects",
        "create",
        "bad",
        "--default-model",
        "x",
        "--params",
        r#"{"top_p": 3}"#,
    ]);
    assert!(!ok && err.contains("top_p"), "{err}");
    let (ok, list, _) = run(&["projects", "list"]);
    assert!(
        ok && list.contains("cli-proj") && !list.contains("bad"),
        "{list}"
    );
    let (ok, out, err) = run(&[
        "campaigns",
        "create",
        "CLI test",
        "--key",
        "cli-camp",
        "--spec",
        r#"{"variants": [{"name": "only", "weight": 1, "model": "cli-proj"}]}"#,
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("cli-camp"), "{out}");

    // A server on the same database serves them.
    let (base, seen) = mock_upstream().await;
    let cfg = dir.join("parlance.toml");
    std::fs::write(
        &cfg,
        format!("[[providers]]\nname = \"mock\"\nkind = \"openai\"\nbase_url = \"{base}\"\napi_key = \"k\"\n\n[[models]]\nname = \"inspect\"\ndeployments = [{{ provider = \"mock\", model = \"ok\" }}]\n"),
    )
    .unwrap();
    let s = Server::start_raw(&[
        "serve",
        "--addr",
        "127.0.0.1:0",
        "--config",
        cfg.to_str().unwrap(),
        "--database-url",
        &db,
        "--allow-unauthenticated",
        "--exit-on-stdin-eof",
    ]);
    let (st, r) = chat(
        &s,
        "none",
        &json!({"model": "echo-does-not-matter", "ab_campaign": "cli-camp", "system_prompt_args": {"persona": "a pirate"},
                "messages": [user("Hi")]}),
    )
    .await;
    assert_eq!(st, 200, "{r}");
    assert!(r["session_id"].is_string(), "{r}");
    let sent = last_body(&seen, "ok");
    assert_eq!(sent["messages"][0]["content"], "Speak as a pirate.");
    assert_eq!(
        sent.get("max_completion_tokens").or(sent.get("max_tokens")),
        Some(&json!(7))
    );
    // The server writes usage in batches every 100 ms.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ok, report, err) = run(&["campaigns", "report", "cli-camp"]);
    assert!(ok, "{err}");
    let row = report.lines().find(|l| l.starts_with("only")).unwrap();
    assert_eq!(row.split_whitespace().nth(2), Some("1"), "{report}");
    let (ok, _, err) = run(&["projects", "delete", "cli-proj"]);
    assert!(ok, "{err}");
}

#[tokio::test]
async fn the_anthropic_door_resolves_projects_and_continues_sessions() {
    let (s, seen) = gateway().await;
    let key = account_key(&s, "a").await;
    let (st, _) = admin(
        &s,
        "POST",
        "/admin/projects",
        Some(json!({"name": "anth", "default_model": "inspect", "sessions": true, "system_prompt": "Be {{ tone }}."})),
    )
    .await;
    assert_eq!(st, 201);
    let send = |body: Value| {
        let s = &s;
        let key = key.clone();
        async move {
            let r = client()
                .post(s.url("/v1/messages"))
                .header("x-api-key", key)
                .header("anthropic-version", "2023-06-01")
                .json(&body)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (st, r) = send(
        json!({"model": "anth", "max_tokens": 20, "system_prompt_args": {"tone": "brief"},
                              "messages": [user("First.")]}),
    )
    .await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["model"], "inspect");
    let session = r["session_id"].as_str().unwrap().to_owned();
    assert_eq!(
        last_body(&seen, "ok")["messages"][0],
        json!({"role": "system", "content": "Be brief."})
    );
    let (st, _) = send(json!({"model": "anth", "max_tokens": 20, "session_id": session, "system_prompt_args": {"tone": "brief"},
                              "messages": [user("Second.")]}))
    .await;
    assert_eq!(st, 200);
    let contents: Vec<Value> = last_body(&seen, "ok")["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].clone())
        .collect();
    assert_eq!(
        contents,
        vec![
            json!("Be brief."),
            json!("First."),
            json!("Hello from upstream"),
            json!("Second.")
        ]
    );
    // Errors keep Anthropic's shape.
    let (st, e) = send(json!({"model": "anth", "max_tokens": 20, "messages": [user("x")]})).await;
    assert_eq!(st, 400);
    assert_eq!(e["type"], "error");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("`tone`"),
        "{e}"
    );
}
