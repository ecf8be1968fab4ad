//! `POST /v1/chat/completions`: parse, start through the platform, then answer as one JSON body
//! or as a stream of `chat.completion.chunk` server-sent events ending in `data: [DONE]`.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures::{Stream, StreamExt};
use parlance_api::chat::{
    AssistantMessage, ChatCompletion, ChatCompletionChunk, Choice, ChoiceLogprobs, ChunkChoice,
    Delta, FunctionCall, FunctionDelta, ToolCall, ToolCallDelta, UsageField,
};
use parlance_api::{parse_chat_request, ApiError, ChatRequest, FinishReason, Usage};
use parlance_platform::{Principal, Started};
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
    let meta = Meta {
        id: format!("chatcmpl-{}", started.request_id),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        model: request.model.clone(),
        fingerprint: started.fingerprint.clone(),
    };
    let mut resp = if request.stream {
        stream(meta, &request, started).into_response()
    } else {
        collect(meta, &request, started).await?
    };
    crate::error::add_rate_headers(&mut resp, rate);
    Ok(resp)
}

/// What every chunk or body repeats.
#[derive(Clone)]
struct Meta {
    id: String,
    created: u64,
    model: String,
    fingerprint: String,
}

async fn collect(meta: Meta, request: &ChatRequest, started: Started) -> Result<Response, Failure> {
    let n = request.n as usize;
    let mut texts = vec![String::new(); n];
    let mut thoughts = vec![String::new(); n];
    let mut logprobs = vec![Vec::new(); n];
    let mut calls: Vec<Vec<ToolCall>> = vec![Vec::new(); n];
    let mut reasons = vec![None; n];
    let mut usage = Usage::default();
    let mut events = started.stream.events;
    while let Some(ev) = events.next().await {
        match ev {
            ChatEvent::Text {
                choice,
                text,
                logprobs: lp,
            } => {
                if let Some(t) = texts.get_mut(choice as usize) {
                    t.push_str(&text);
                }
                if let Some(l) = logprobs.get_mut(choice as usize) {
                    l.extend(lp);
                }
            }
            ChatEvent::Reasoning { choice, text } => {
                if let Some(t) = thoughts.get_mut(choice as usize) {
                    t.push_str(&text);
                }
            }
            ChatEvent::Finish { choice, reason, .. } => {
                if let Some(r) = reasons.get_mut(choice as usize) {
                    *r = Some(reason);
                }
            }
            ChatEvent::ToolCallStart {
                choice, id, name, ..
            } => {
                if let Some(c) = calls.get_mut(choice as usize) {
                    c.push(ToolCall {
                        id,
                        kind: "function",
                        function: FunctionCall {
                            name,
                            arguments: String::new(),
                        },
                    });
                }
            }
            ChatEvent::ToolCallArgs {
                choice,
                index,
                arguments,
            } => {
                if let Some(call) = calls
                    .get_mut(choice as usize)
                    .and_then(|c| c.get_mut(index as usize))
                {
                    call.function.arguments.push_str(&arguments);
                }
            }
            ChatEvent::Usage(u) => usage = u,
            ChatEvent::Error(e) => return Err(e.into()),
        }
    }
    let want_logprobs = request.logprobs.is_some();
    let choices = texts
        .into_iter()
        .zip(reasons)
        .zip(logprobs)
        .zip(calls)
        .zip(thoughts)
        .enumerate()
        .map(
            |(i, ((((text, reason), content), calls), thought))| Choice {
                index: i as u32,
                message: AssistantMessage {
                    role: "assistant",
                    // A turn that only calls tools has null content, as OpenAI answers it.
                    content: (calls.is_empty() || !text.is_empty()).then_some(text),
                    refusal: None,
                    tool_calls: (!calls.is_empty()).then_some(calls),
                    reasoning_content: (!thought.is_empty()).then_some(thought),
                },
                logprobs: want_logprobs.then_some(ChoiceLogprobs {
                    content,
                    refusal: None,
                }),
                finish_reason: reason.unwrap_or(FinishReason::Stop),
            },
        )
        .collect();
    Ok(Json(ChatCompletion {
        id: meta.id,
        object: "chat.completion",
        created: meta.created,
        model: meta.model,
        choices,
        usage,
        system_fingerprint: meta.fingerprint,
        service_tier: "default",
    })
    .into_response())
}

fn chunk(meta: &Meta, choices: Vec<ChunkChoice>, usage: UsageField) -> Event {
    let c = ChatCompletionChunk {
        id: meta.id.clone(),
        object: "chat.completion.chunk",
        created: meta.created,
        model: meta.model.clone(),
        system_fingerprint: meta.fingerprint.clone(),
        service_tier: "default",
        choices,
        usage,
    };
    Event::default().data(serde_json::to_string(&c).unwrap_or_default())
}

fn delta(index: u32, delta: Delta, finish_reason: Option<FinishReason>) -> ChunkChoice {
    ChunkChoice {
        index,
        delta,
        logprobs: None,
        finish_reason,
    }
}

/// A chunk carrying one tool-call fragment.
fn tool_chunk(meta: &Meta, choice: u32, tc: ToolCallDelta, usage: UsageField) -> Event {
    let d = Delta {
        role: None,
        content: None,
        tool_calls: Some(vec![tc]),
        reasoning_content: None,
    };
    chunk(meta, vec![delta(choice, d, None)], usage)
}

fn stream(meta: Meta, request: &ChatRequest, started: Started) -> impl IntoResponse {
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
                reasoning_content: None,
            };
            Ok(chunk(&meta, vec![delta(i, d, None)], none))
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
                    vec![delta(choice, Delta::default(), Some(reason))],
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
