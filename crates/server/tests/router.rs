//! In-process router tests (`tower::ServiceExt::oneshot`) for what the real model cannot be made
//! to do on demand: a provider that fails after its stream started. The provider here stands in
//! for an engine fault; everything else (router, middleware, encoding) is the real code.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use parlance_api::{ApiError, ChatRequest, FinishReason, Usage};
use parlance_platform::{Catalog, CatalogEntry, Platform, Price, StaticKeys};
use parlance_providers::{ChatEvent, ChatProvider, ChatStream, PreparedChat};
use parlance_server::{router, AppState};
use parlance_store::{Limiter, Store};
use serde_json::{json, Value};
use tower::ServiceExt;

/// Emits one piece of text, then fails (or finishes, when `fail` is false).
struct Scripted {
    fail: bool,
}

#[async_trait::async_trait]
impl ChatProvider for Scripted {
    fn kind(&self) -> &'static str {
        "scripted"
    }
    fn context_length(&self) -> u32 {
        100
    }
    fn fingerprint(&self) -> String {
        "fp_test".into()
    }
    fn ready(&self) -> bool {
        true
    }
    async fn prepare(&self, _: &ChatRequest) -> Result<Box<dyn PreparedChat>, ApiError> {
        Ok(Box::new(ScriptedRun { fail: self.fail }))
    }
}

struct ScriptedRun {
    fail: bool,
}

#[async_trait::async_trait]
impl PreparedChat for ScriptedRun {
    fn prompt_tokens(&self) -> u32 {
        3
    }
    fn max_completion_tokens(&self) -> u64 {
        97
    }
    async fn start(self: Box<Self>) -> Result<ChatStream, ApiError> {
        let mut events = vec![ChatEvent::Text {
            choice: 0,
            text: "partial".into(),
            logprobs: Vec::new(),
        }];
        if self.fail {
            events.push(ChatEvent::Error(ApiError::Internal));
        } else {
            events.push(ChatEvent::Finish {
                choice: 0,
                reason: FinishReason::Stop,
                stop_sequence: None,
            });
            events.push(ChatEvent::Usage(Usage::new(3, 0, 1)));
        }
        Ok(ChatStream {
            prompt_tokens: Some(3),
            events: Box::pin(futures::stream::iter(events)),
            tally: None,
        })
    }
}

async fn app(fail: bool) -> axum::Router {
    let mut catalog = Catalog::default();
    catalog.insert(CatalogEntry {
        name: "m".into(),
        provider: Arc::new(Scripted { fail }),
        created: 0,
        price: Price::default(),
    });
    let store = Store::open("sqlite::memory:").await.unwrap();
    let platform = Platform::new(
        catalog,
        Arc::new(StaticKeys::new(Vec::<String>::new())),
        store,
        Limiter::local(),
    );
    router(Arc::new(AppState::new(platform)))
}

async fn call(app: axum::Router, body: Value) -> (StatusCode, String) {
    let req = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = app.oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

#[tokio::test]
async fn error_after_stream_started_is_an_error_event_and_the_stream_ends() {
    let body =
        json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": true});
    let (status, text) = call(app(true).await, body).await;
    assert_eq!(status, StatusCode::OK);
    let data: Vec<&str> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .collect();
    assert!(data.iter().any(|d| d.contains("\"partial\"")));
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["type"], "server_error");
    assert!(last["error"]["message"].is_string());
    assert!(
        !text.contains("[DONE]"),
        "an errored stream must not look complete"
    );
}

#[tokio::test]
async fn error_in_a_plain_request_is_a_500_envelope() {
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
    let (status, text) = call(app(true).await, body).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"]["code"], "internal_error");
}

#[tokio::test]
async fn completed_stream_ends_with_done() {
    let body =
        json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": true});
    let (_, text) = call(app(false).await, body).await;
    assert!(text.trim_end().ends_with("data: [DONE]"));
}
