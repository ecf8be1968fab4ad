//! The conversation driver, for requests that need more than one provider call or a record
//! of the answer: it runs the loop of server-side (HTTP) tool calls, and once the answer is
//! complete, appends the turn to the session and stores the completion, before the caller
//! sees the final usage event (so the next turn always reads this one).

use std::pin::Pin;

use futures::{Stream, StreamExt};
use parlance_api::chat::{ToolCall, ToolChoice};
use parlance_api::{ApiError, ChatRequest, Message, Role, Usage};
use parlance_providers::ChatEvent;
use parlance_store::StoredCompletion;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::assemble::{Assembly, ResponseMeta};
use crate::resolve::AppContext;
use crate::{ids, Platform, Principal, UsageTags};

type Events = Pin<Box<dyn Stream<Item = ChatEvent> + Send>>;

/// Everything the driver needs.
pub(crate) struct Drive {
    pub platform: Platform,
    pub principal: Principal,
    /// The request as the provider runs it (history, system prompt and tools merged).
    pub request: ChatRequest,
    /// The request as the caller sent it (what a stored completion keeps).
    pub caller: ChatRequest,
    pub ctx: AppContext,
    pub tags: UsageTags,
    pub meta: ResponseMeta,
}

fn add(a: Usage, b: Usage) -> Usage {
    let mut u = Usage::new(
        a.prompt_tokens + b.prompt_tokens,
        a.prompt_tokens_details.cached_tokens + b.prompt_tokens_details.cached_tokens,
        a.completion_tokens + b.completion_tokens,
    );
    u.completion_tokens_details.reasoning_tokens =
        a.completion_tokens_details.reasoning_tokens + b.completion_tokens_details.reasoning_tokens;
    u
}

/// Starts the driver over the first step's events; the returned events are what the caller
/// sees. Dropping them stops the driver and cancels the step in progress.
pub(crate) fn drive(d: Drive, first: Events) -> Events {
    let (tx, rx) = mpsc::channel::<ChatEvent>(64);
    tokio::spawn(tracing::Instrument::in_current_span(run(d, first, tx)));
    Box::pin(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (e, rx))
    }))
}

async fn run(mut d: Drive, first: Events, tx: mpsc::Sender<ChatEvent>) {
    let server = !d.ctx.server_tools.is_empty();
    let is_server = |name: &str, d: &Drive| d.ctx.server_tools.iter().any(|t| t.id == name);
    let mut stream = first;
    let mut total = Usage::default();
    // What the session records after the caller's own messages: tool rounds, then the answer.
    let mut rounds: Vec<(String, Message)> = Vec::new();
    let mut spoken = String::new();
    let mut step: u32 = 0;
    let mut step_request_id = d.meta.request_id.clone();
    loop {
        let mut asm = Assembly::new(d.request.n);
        let mut held: Vec<ChatEvent> = Vec::new();
        let mut ended = false;
        loop {
            let ev = tokio::select! {
                _ = tx.closed() => return,
                ev = stream.next() => ev,
            };
            let Some(ev) = ev else { break };
            asm.push(&ev);
            match ev {
                ChatEvent::Usage(u) => {
                    total = add(total, u);
                    ended = true;
                    break;
                }
                ChatEvent::Error(e) => {
                    let _ = tx.send(ChatEvent::Error(e)).await;
                    return;
                }
                ev @ (ChatEvent::ToolCallStart { .. }
                | ChatEvent::ToolCallArgs { .. }
                | ChatEvent::Finish { .. })
                    if server =>
                {
                    held.push(ev)
                }
                ev => {
                    if tx.send(ev).await.is_err() {
                        return;
                    }
                }
            }
        }
        if !ended {
            // The provider's stream ended without its usage: nothing more to say.
            return;
        }
        let calls: Vec<ToolCall> = asm
            .choices
            .first()
            .map(|c| c.calls.clone())
            .unwrap_or_default();
        let text = asm
            .choices
            .first()
            .map(|c| c.text.clone())
            .unwrap_or_default();
        if server
            && !calls.is_empty()
            && calls.iter().all(|c| is_server(&c.function.name, &d))
            && step < d.ctx.max_steps
        {
            // A round of server-side calls: run them, then ask the model again.
            let results = futures::future::join_all(calls.iter().map(|c| {
                let tool = d.ctx.server_tools.iter().find(|t| t.id == c.function.name);
                let client = d.platform.http.clone();
                async move {
                    match tool.and_then(|t| t.http.as_ref()) {
                        Some(h) => {
                            crate::httptool::call(
                                &client,
                                h,
                                &c.function.name,
                                &c.id,
                                &c.function.arguments,
                            )
                            .await
                        }
                        None => json!({"error": "unknown tool"}).to_string(),
                    }
                }
            }))
            .await;
            spoken.push_str(&text);
            let mut assistant = Message::new(Role::Assistant, (!text.is_empty()).then_some(text));
            assistant.tool_calls = serde_json::to_value(&calls).ok();
            assistant.completion_id = Some(ids::completion_id(&step_request_id, 0));
            rounds.push((ids::message_id(&step_request_id, 0), assistant.clone()));
            d.request.messages.push(assistant);
            for (c, r) in calls.iter().zip(results) {
                let mut m = Message::new(Role::Tool, Some(r));
                m.tool_call_id = Some(c.id.clone());
                rounds.push((format!("msg_{}", uuid::Uuid::now_v7().simple()), m.clone()));
                d.request.messages.push(m);
            }
            step += 1;
            // The caller's tool_choice governs the first answer; later ones are the model's
            // choice, and the last one allowed must be text.
            d.request.tool_choice = if step >= d.ctx.max_steps {
                ToolChoice::None
            } else {
                ToolChoice::Auto
            };
            step_request_id = ids::new_request_id();
            let mut tags = d.tags.clone();
            tags.parent_id = Some(d.meta.request_id.clone());
            match d
                .platform
                .chat_once(
                    &d.principal,
                    &d.request,
                    &d.platform.filters_for(&d.ctx),
                    tags,
                    step_request_id.clone(),
                )
                .await
            {
                Ok(s) => stream = s.stream.events,
                Err(e) => {
                    let _ = tx.send(ChatEvent::Error(e)).await;
                    return;
                }
            }
            continue;
        }

        // The answer. Server-side calls mixed with the caller's are not run: the caller gets
        // its own calls, renumbered.
        let mut renumber: Vec<Option<u32>> = Vec::new();
        let mut next = 0;
        for c in &calls {
            if server && is_server(&c.function.name, &d) {
                renumber.push(None);
            } else {
                renumber.push(Some(next));
                next += 1;
            }
        }
        for ev in held {
            let ev = match ev {
                ChatEvent::ToolCallStart {
                    choice,
                    index,
                    id,
                    name,
                } => match renumber.get(index as usize).copied().flatten() {
                    Some(index) => ChatEvent::ToolCallStart {
                        choice,
                        index,
                        id,
                        name,
                    },
                    None => continue,
                },
                ChatEvent::ToolCallArgs {
                    choice,
                    index,
                    arguments,
                } => match renumber.get(index as usize).copied().flatten() {
                    Some(index) => ChatEvent::ToolCallArgs {
                        choice,
                        index,
                        arguments,
                    },
                    None => continue,
                },
                ev => ev,
            };
            if tx.send(ev).await.is_err() {
                return;
            }
        }
        if let Some(c) = asm.choices.first_mut() {
            c.text = format!("{spoken}{}", c.text);
            let kept: Vec<ToolCall> = c
                .calls
                .iter()
                .zip(&renumber)
                .filter(|(_, r)| r.is_some())
                .map(|(c, _)| c.clone())
                .collect();
            c.calls = kept;
        }
        asm.usage = Some(total);
        if let Err(e) = record(&d, &asm, rounds).await {
            let _ = tx.send(ChatEvent::Error(e)).await;
            return;
        }
        let _ = tx.send(ChatEvent::Usage(total)).await;
        return;
    }
}

/// Appends the turn to the session and stores the completion, as the request asked.
async fn record(d: &Drive, asm: &Assembly, rounds: Vec<(String, Message)>) -> Result<(), ApiError> {
    let store = &d.platform.store;
    if let Some((session, new)) = &d.ctx.session {
        if *new {
            store
                .create_session(
                    session,
                    d.principal.account_id.as_deref(),
                    d.ctx.project_id().as_deref(),
                )
                .await
                .map_err(crate::unavailable)?;
        }
        let mut out: Vec<(String, Value)> = Vec::new();
        for m in &d.ctx.turn {
            let id = format!("msg_{}", uuid::Uuid::now_v7().simple());
            out.push((id, serde_json::to_value(m).unwrap_or(Value::Null)));
        }
        for (id, m) in rounds {
            out.push((id, serde_json::to_value(&m).unwrap_or(Value::Null)));
        }
        let answer = asm.message(&d.meta, 0);
        let mut m = Message::new(Role::Assistant, answer.content);
        m.tool_calls = answer.tool_calls.and_then(|c| serde_json::to_value(c).ok());
        m.completion_id = Some(ids::completion_id(&d.meta.request_id, 0));
        out.push((
            ids::message_id(&d.meta.request_id, 0),
            serde_json::to_value(&m).unwrap_or(Value::Null),
        ));
        store
            .append_session(session, &out)
            .await
            .map_err(crate::unavailable)?;
    }
    if d.request.app.store {
        let c = &d.caller;
        let mut response = serde_json::to_value(asm.completion(&d.meta, c.logprobs.is_some()))
            .unwrap_or(Value::Null);
        if let Some(o) = response.as_object_mut() {
            o.insert("metadata".into(), json!(c.metadata));
            o.insert("request_id".into(), json!(d.meta.request_id));
            o.insert("seed".into(), json!(c.seed));
            o.insert("temperature".into(), json!(d.request.temperature));
            o.insert("top_p".into(), json!(d.request.top_p));
            o.insert("presence_penalty".into(), json!(d.request.presence_penalty));
            o.insert(
                "frequency_penalty".into(),
                json!(d.request.frequency_penalty),
            );
            o.insert("input_user".into(), json!(c.user));
            o.insert("tools".into(), json!(c.tools));
        }
        let messages: Vec<Value> = c
            .messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let mut v = serde_json::to_value(m).unwrap_or(Value::Null);
                if let Some(o) = v.as_object_mut() {
                    o.insert("id".into(), json!(format!("{}-{i}", d.meta.id)));
                }
                v
            })
            .collect();
        let request = json!({
            "model": c.model,
            "messages": messages,
            "n": c.n,
            "max_tokens": c.max_tokens,
            "stream": c.stream,
            "user": c.user,
            "tags": c.app.tags,
            "session_id": d.ctx.session.as_ref().map(|s| s.0.clone()),
        });
        store
            .store_completion(&StoredCompletion {
                id: d.meta.id.clone(),
                account_id: d.principal.account_id.clone(),
                model: d.meta.model.clone(),
                created_at: parlance_store::now_ms(),
                metadata: c.metadata.clone(),
                request,
                response,
            })
            .await
            .map_err(crate::unavailable)?;
    }
    Ok(())
}
