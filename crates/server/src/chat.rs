//! `POST /v1/chat/completions`: parse, start through the platform, then answer as one JSON body
//! or as a stream of `chat.completion.chunk` server-sent events ending in `data: [DONE]`.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures::{Stream, StreamExt};
use parlance_api::chat::{
    ChatCompletionChunk, ChoiceLogprobs, ChunkChoice, Delta, FunctionDelta, ToolCallDelta,
    UsageField,
};
use parlance_api::{parse_chat_request, ApiError, ChatRequest, FinishReason};
use parlance_platform::{Assembly, Principal, ResponseMeta, Started};
use parlance_providers::ChatEvent;

use crate::error::Failure;
use crate::AppState;

/// What both doors do first: refuse during shutdown, read the body within its limit, parse it
/// with the door's parser into the shared request, and start it through the platform.
pub(crate) async fn begin(
    state: &AppState,
    principal: &Principal,
    body: Body,
    parse: fn(&[u8]) -> Result<ChatRequest, ApiError>,
) -> Result<(ChatRequest, Started), Failure> {
    if state.shutting_down.load(Ordering::SeqCst) {
        return Err(ApiError::NotReady("The server is shutting down.".into()).into());
    }
    let bytes = axum::body::to_bytes(body, state.body_limit)
        .await
        .map_err(|_| ApiError::PayloadTooLarge(state.body_limit))?;
    let request = parse(&bytes)?;
    let started = state.platform.chat(principal, &request).await?;
    Ok((request, started))
}

pub(crate) async fn completions(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
    body: Body,
) -> Result<Response, Failure> {
    let (request, started) = begin(&state, &principal, body, parse_chat_request).await?;
    let rate = started.rate_limit;
    let meta = ResponseMeta {
        id: format!("chatcmpl-{}", started.request_id),
        created: started.created,
        model: started
            .model
            .clone()
            .unwrap_or_else(|| request.model.clone()),
        fingerprint: started.fingerprint.clone(),
        request_id: started.request_id.clone(),
        session_id: started.session_id.clone(),
        legacy_functions: request.legacy_functions,
    };
    let mut resp = if request.stream {
        stream(meta, &request, started).into_response()
    } else {
        collect(meta, &request, started).await?
    };
    crate::error::add_rate_headers(&mut resp, rate);
    Ok(resp)
}

async fn collect(
    meta: ResponseMeta,
    request: &ChatRequest,
    started: Started,
) -> Result<Response, Failure> {
    let mut answer = Assembly::new(request.n);
    let mut events = started.stream.events;
    while let Some(ev) = events.next().await {
        if let ChatEvent::Error(e) = ev {
            return Err(e.into());
        }
        answer.push(&ev);
    }
    Ok(Json(answer.completion(&meta, request.logprobs.is_some())).into_response())
}

fn chunk(meta: &ResponseMeta, choices: Vec<ChunkChoice>, usage: UsageField) -> Event {
    let c = ChatCompletionChunk {
        id: meta.id.clone(),
        object: "chat.completion.chunk",
        created: meta.created,
        model: meta.model.clone(),
        system_fingerprint: meta.fingerprint.clone(),
        service_tier: "default",
        choices,
        usage,
        session_id: meta.session_id.clone(),
    };
    Event::default().data(serde_json::to_string(&c).unwrap_or_default())
}

fn delta(index: u32, delta: Delta, finish_reason: Option<FinishReason>) -> ChunkChoice {
    ChunkChoice {
        index,
        delta,
        logprobs: None,
        finish_reason,
        completion_id: None,
    }
}

/// A chunk carrying one tool-call fragment.
fn tool_chunk(meta: &ResponseMeta, choice: u32, tc: ToolCallDelta, usage: UsageField) -> Event {
    let d = if meta.legacy_functions {
        // The legacy shape: the one call's name and arguments as `function_call`.
        Delta {
            function_call: Some(tc.function),
            ..Delta::default()
        }
    } else {
        Delta {
            tool_calls: Some(vec![tc]),
            ..Delta::default()
        }
    };
    chunk(meta, vec![delta(choice, d, None)], usage)
}

fn stream(meta: ResponseMeta, request: &ChatRequest, started: Started) -> impl IntoResponse {
    let include_usage = request.include_usage;
    let want_logprobs = request.logprobs.is_some();
    let none = if include_usage {
        UsageField::Null
    } else {
        UsageField::Absent
    };
    // Each choice opens with the role, once.
    let opening: Vec<Result<Event, Infallible>> = (0..request.n)
        .map(|i| {
            let d = Delta {
                role: Some("assistant"),
                content: Some(String::new()),
                tool_calls: None,
                function_call: None,
                reasoning_content: None,
            };
            let mut c = delta(i, d, None);
            c.completion_id = Some(parlance_platform::ids::completion_id(&meta.request_id, i));
            Ok(chunk(&meta, vec![c], none))
        })
        .collect();
    let m = meta.clone();
    let body = started.stream.events.flat_map(move |ev| {
        let events: Vec<Event> = match ev {
            ChatEvent::Text {
                choice,
                text,
                logprobs,
            } => {
                let d = Delta {
                    role: None,
                    content: Some(text),
                    tool_calls: None,
                    function_call: None,
                    reasoning_content: None,
                };
                let mut c = delta(choice, d, None);
                if want_logprobs {
                    c.logprobs = Some(ChoiceLogprobs {
                        content: logprobs,
                        refusal: None,
                    });
                }
                vec![chunk(&m, vec![c], none)]
            }
            ChatEvent::Reasoning { choice, text } => {
                let d = Delta {
                    reasoning_content: Some(text),
                    ..Delta::default()
                };
                vec![chunk(&m, vec![delta(choice, d, None)], none)]
            }
            ChatEvent::Finish { choice, reason, .. } => {
                vec![chunk(
                    &m,
                    vec![delta(
                        choice,
                        Delta::default(),
                        Some(m.finish_reason(reason)),
                    )],
                    none,
                )]
            }
            // The first fragment of a call names it with empty arguments; the arguments follow
            // in fragments that join to the same JSON as the plain response.
            ChatEvent::ToolCallStart {
                choice,
                index,
                id,
                name,
            } => {
                let tc = ToolCallDelta {
                    index,
                    id: Some(id),
                    kind: Some("function"),
                    function: FunctionDelta {
                        name: Some(name),
                        arguments: String::new(),
                    },
                };
                vec![tool_chunk(&m, choice, tc, none)]
            }
            ChatEvent::ToolCallArgs {
                choice,
                index,
                arguments,
            } => {
                let tc = ToolCallDelta {
                    index,
                    id: None,
                    kind: None,
                    function: FunctionDelta {
                        name: None,
                        arguments,
                    },
                };
                vec![tool_chunk(&m, choice, tc, none)]
            }
            ChatEvent::Usage(u) => {
                let mut v = Vec::new();
                if include_usage {
                    v.push(chunk(&m, vec![], UsageField::Set(u)));
                }
                v.push(Event::default().data("[DONE]"));
                v
            }
            // An error after the stream started: one error event, and the stream ends.
            ChatEvent::Error(e) => {
                vec![Event::default().data(serde_json::to_string(&e.body()).unwrap_or_default())]
            }
        };
        futures::stream::iter(events.into_iter().map(Ok::<_, Infallible>))
    });
    let all: std::pin::Pin<Box<dyn Stream<Item = Result<Event, Infallible>> + Send>> =
        Box::pin(futures::stream::iter(opening).chain(body));
    Sse::new(all).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}
