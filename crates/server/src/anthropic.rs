//! `POST /v1/messages` and `/anthropic/v1/messages`: the Anthropic door. The body is translated
//! into the shared request, started through the same platform call as the OpenAI door, and the
//! shared events are encoded as an Anthropic message or its event stream.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures::{Stream, StreamExt};
use parlance_api::anthropic::{
    error_body, parse_messages_request, MessagesResponse, MessagesUsage, StopReason,
};
use parlance_api::{ApiError, FinishReason, Usage};
use parlance_platform::Principal;
use parlance_providers::ChatEvent;
use serde_json::json;

use crate::error::Failure;
use crate::AppState;

pub(crate) async fn messages(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
    body: Body,
) -> Result<Response, Failure> {
    let (request, started) =
        crate::chat::begin(&state, &principal, body, parse_messages_request).await?;
    let id = format!("msg_{}", started.request_id);
    let rate = started.rate_limit;
    let session_id = started.session_id.clone();
    let model = started
        .model
        .clone()
        .unwrap_or_else(|| request.model.clone());
    if request.stream {
        let mut resp = stream(id, model, session_id, started.stream).into_response();
        crate::error::add_rate_headers(&mut resp, rate);
        return Ok(resp);
    }
    let mut text = String::new();
    let mut thinking = String::new();
    // (id, name, arguments) of each call, in order.
    let mut pending: Vec<(String, String, String)> = Vec::new();
    let mut stop = (StopReason::EndTurn, None);
    let mut usage = Usage::default();
    let mut events = started.stream.events;
    while let Some(ev) = events.next().await {
        match ev {
            ChatEvent::Text { text: t, .. } => text.push_str(&t),
            ChatEvent::Reasoning { text: t, .. } => thinking.push_str(&t),
            ChatEvent::ToolCallStart { id, name, .. } => pending.push((id, name, String::new())),
            ChatEvent::ToolCallArgs {
                index, arguments, ..
            } => {
                if let Some(c) = pending.get_mut(index as usize) {
                    c.2.push_str(&arguments);
                }
            }
            ChatEvent::Finish {
                reason,
                stop_sequence,
                ..
            } => stop = stop_reason(reason, stop_sequence),
            ChatEvent::Usage(u) => usage = u,
            ChatEvent::Error(e) => return Err(e.into()),
        }
    }
    let calls: Vec<serde_json::Value> = pending
        .iter()
        .map(|(id, name, args)| tool_use_block(id, name, args))
        .collect();
    if !calls.is_empty() && stop.0 == StopReason::EndTurn {
        // Anthropic reports every answer that calls tools as `tool_use`, a forced one included.
        stop.0 = StopReason::ToolUse;
    }
    let mut content = Vec::new();
    if !thinking.is_empty() {
        // parlance does not sign thinking blocks; the signature is empty.
        content.push(json!({"type": "thinking", "thinking": thinking, "signature": ""}));
    }
    if !text.is_empty() || calls.is_empty() {
        content.push(json!({"type": "text", "text": text}));
    }
    content.extend(calls);
    let mut resp = Json(MessagesResponse {
        id,
        kind: "message",
        role: "assistant",
        model,
        content,
        stop_reason: Some(stop.0),
        stop_sequence: stop.1,
        usage: usage_of(&usage),
        session_id,
    })
    .into_response();
    crate::error::add_rate_headers(&mut resp, rate);
    Ok(resp)
}

/// Anthropic's id for a call: `toolu_` and the call's own suffix.
fn tool_use_id(id: &str) -> String {
    format!("toolu_{}", id.trim_start_matches("call_"))
}

fn tool_use_block(id: &str, name: &str, arguments: &str) -> serde_json::Value {
    let input: serde_json::Value = serde_json::from_str(arguments).unwrap_or_else(|_| json!({}));
    json!({"type": "tool_use", "id": tool_use_id(id), "name": name, "input": input})
}

fn stop_reason(
    reason: FinishReason,
    stop_sequence: Option<String>,
) -> (StopReason, Option<String>) {
    match (reason, stop_sequence) {
        (_, Some(s)) => (StopReason::StopSequence, Some(s)),
        (FinishReason::Length, None) => (StopReason::MaxTokens, None),
        (FinishReason::ContentFilter, None) => (StopReason::Refusal, None),
        (_, None) => (StopReason::EndTurn, None),
    }
}

fn usage_of(u: &Usage) -> MessagesUsage {
    let cached = u.prompt_tokens_details.cached_tokens;
    MessagesUsage {
        input_tokens: u.prompt_tokens.saturating_sub(cached),
        output_tokens: u.completion_tokens,
        cache_read_input_tokens: cached,
        cache_creation_input_tokens: 0,
    }
}

fn event(kind: &str, data: serde_json::Value) -> Event {
    Event::default().event(kind).data(data.to_string())
}

/// Anthropic's event sequence: `message_start`, then blocks (`content_block_start`,
/// `content_block_delta`..., `content_block_stop`; text as `text_delta`, tool calls as
/// `tool_use` blocks with `input_json_delta` fragments), `message_delta`, `message_stop`; an
/// error after the start is an `error` event that ends the stream. Blocks open when their first
/// content arrives (a thinking block before the text, as Anthropic's own streams order them).
fn stream(
    id: String,
    model: String,
    session_id: Option<String>,
    started: parlance_providers::ChatStream,
) -> impl IntoResponse {
    let input = started.prompt_tokens.unwrap_or(0);
    let text_start = |index: u32| {
        event(
            "content_block_start",
            json!({"type": "content_block_start", "index": index,
                   "content_block": {"type": "text", "text": ""}}),
        )
    };
    let block_stop = |index: u32| {
        event(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": index}),
        )
    };
    let mut message = json!({
        "id": id, "type": "message", "role": "assistant", "model": model,
        "content": [], "stop_reason": null, "stop_sequence": null,
        "usage": {"input_tokens": input, "output_tokens": 0,
                  "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}});
    if let (Some(s), Some(o)) = (session_id, message.as_object_mut()) {
        o.insert("session_id".into(), json!(s));
    }
    let opening = vec![event(
        "message_start",
        json!({"type": "message_start", "message": message}),
    )];
    let mut stop = (StopReason::EndTurn, None);
    let mut text_open = false;
    let mut index = 0u32;
    let mut any_block = false;
    let mut saw_tool = false;
    let mut tool_open = false;
    let mut thinking_open = false;
    let mut pinged = false;
    let body = started.events.flat_map(move |ev| {
        let mut out = Vec::new();
        match ev {
            ChatEvent::Text { text, .. } if text.is_empty() => {}
            ChatEvent::Reasoning { text, .. } => {
                if text_open || tool_open {
                    out.push(block_stop(index));
                    index += 1;
                    text_open = false;
                    tool_open = false;
                }
                if !thinking_open {
                    out.push(event(
                        "content_block_start",
                        json!({"type": "content_block_start", "index": index,
                               "content_block": {"type": "thinking", "thinking": "", "signature": ""}}),
                    ));
                    thinking_open = true;
                    any_block = true;
                }
                out.push(event(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": index,
                           "delta": {"type": "thinking_delta", "thinking": text}}),
                ));
            }
            ChatEvent::Text { text, .. } => {
                if thinking_open {
                    out.push(block_stop(index));
                    index += 1;
                    thinking_open = false;
                }
                if tool_open {
                    out.push(block_stop(index));
                    index += 1;
                    tool_open = false;
                }
                if !text_open {
                    out.push(text_start(index));
                    text_open = true;
                    any_block = true;
                }
                out.push(event(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": index,
                           "delta": {"type": "text_delta", "text": text}}),
                ));
            }
            ChatEvent::ToolCallStart { id, name, .. } => {
                if text_open || tool_open || thinking_open {
                    out.push(block_stop(index));
                    index += 1;
                    text_open = false;
                    thinking_open = false;
                }
                out.push(event(
                    "content_block_start",
                    json!({"type": "content_block_start", "index": index,
                           "content_block": {"type": "tool_use", "id": tool_use_id(&id),
                                             "name": name, "input": {}}}),
                ));
                tool_open = true;
                any_block = true;
                saw_tool = true;
            }
            ChatEvent::ToolCallArgs { arguments, .. } => {
                out.push(event(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": index,
                           "delta": {"type": "input_json_delta", "partial_json": arguments}}),
                ));
            }
            ChatEvent::Finish {
                reason,
                stop_sequence,
                ..
            } => {
                stop = stop_reason(reason, stop_sequence);
                if saw_tool && stop.0 == StopReason::EndTurn {
                    stop.0 = StopReason::ToolUse;
                }
            }
            ChatEvent::Usage(u) => {
                if !any_block {
                    out.push(text_start(index));
                    text_open = true;
                }
                if !text_open && thinking_open {
                    // Thought, then said nothing: close the thought, and end with an empty
                    // text block as Anthropic does.
                    out.push(block_stop(index));
                    index += 1;
                    out.push(text_start(index));
                    text_open = true;
                }
                if text_open || tool_open {
                    out.push(block_stop(index));
                }
                out.push(event(
                    "message_delta",
                    json!({"type": "message_delta",
                           "delta": {"stop_reason": stop.0, "stop_sequence": stop.1},
                           "usage": usage_of(&u)}),
                ));
                out.push(event("message_stop", json!({"type": "message_stop"})));
            }
            ChatEvent::Error(e) => {
                out.push(event("error", error_body(&e, e.status(Default::default()))))
            }
        }
        // Anthropic pings once, right after the first block opens.
        if !pinged && any_block {
            out.insert(out.len().min(1), event("ping", json!({"type": "ping"})));
            pinged = true;
        }
        futures::stream::iter(out.into_iter().map(Ok::<_, Infallible>))
    });
    let all: std::pin::Pin<Box<dyn Stream<Item = Result<Event, Infallible>> + Send>> =
        Box::pin(futures::stream::iter(opening.into_iter().map(Ok::<_, Infallible>)).chain(body));
    Sse::new(all).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// Re-renders errors of the Anthropic routes (authentication included) in Anthropic's shape.
pub(crate) async fn error_shape(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let resp = next.run(req).await;
    let Some(e) = resp.extensions().get::<ApiError>().cloned() else {
        return resp;
    };
    let status = e.status(state.convention);
    let mut out = (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        Json(error_body(&e, status)),
    )
        .into_response();
    if let Some(secs) = e.retry_after() {
        out.headers_mut()
            .insert("retry-after", HeaderValue::from(secs));
    }
    out.extensions_mut().insert(e);
    out
}
