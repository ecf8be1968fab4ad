//! Anthropic's Messages API as an upstream: the shared request (whichever door it came in by)
//! is translated into a streamed Messages call, and Anthropic's events (`message_start`,
//! `content_block_*`, `message_delta`, `message_stop`, `error`) back into chat events: text,
//! tool calls (assembled from `input_json_delta` fragments), stop reasons, usage with cached
//! tokens, errors. The key goes in `x-api-key` and nowhere else.

use std::collections::BTreeMap;

use parlance_api::chat::{ReasoningEffort, ToolChoice};
use parlance_api::{ApiError, ChatRequest, FinishReason, Role, Usage};
use serde_json::{json, Value};

use crate::endpoint::{upstream_error, Call, Endpoint, KeyHeader};
use crate::openai::estimate_prompt_tokens;
use crate::{ChatEvent, ChatProvider, PreparedChat};

/// The API version sent with every call.
const VERSION: &str = "2023-06-01";
/// `max_tokens` when the caller set none (Anthropic requires one).
const DEFAULT_MAX_TOKENS: u32 = 4096;

/// One deployment on Anthropic's API (or a compatible one).
#[derive(Debug, Clone)]
pub struct AnthropicUpstream {
    endpoint: Endpoint,
}

impl AnthropicUpstream {
    /// A deployment at an endpoint.
    pub fn new(endpoint: Endpoint) -> Self {
        Self { endpoint }
    }
}

fn unsupported(param: &str, what: &str) -> ApiError {
    ApiError::Unsupported {
        message: format!("{what} is not supported by this model's upstream (Anthropic)."),
        param: param.to_owned(),
    }
}

/// Appends content blocks to the last message if it has the same role (Anthropic wants turns
/// to alternate), or starts a new message.
fn push(messages: &mut Vec<Value>, role: &str, blocks: Vec<Value>) {
    if blocks.is_empty() {
        return;
    }
    if let Some(last) = messages.last_mut() {
        if last["role"] == role {
            if let Some(c) = last["content"].as_array_mut() {
                c.extend(blocks);
                return;
            }
        }
    }
    messages.push(json!({"role": role, "content": blocks}));
}

/// The Messages body for a shared request.
pub fn request_body(request: &ChatRequest, model: &str) -> Result<Value, ApiError> {
    if request.n != 1 {
        return Err(unsupported("n", "More than one choice"));
    }
    if request.logprobs.is_some() {
        return Err(unsupported("logprobs", "'logprobs'"));
    }
    if request.response_format.is_some() {
        return Err(unsupported("response_format", "'response_format'"));
    }
    let mut system = Vec::new();
    let mut messages: Vec<Value> = Vec::new();
    for m in &request.messages {
        let text = m.content.clone().unwrap_or_default();
        match m.role {
            Role::System | Role::Developer => system.push(text),
            Role::User => push(
                &mut messages,
                "user",
                vec![json!({"type": "text", "text": text})],
            ),
            Role::Tool => push(
                &mut messages,
                "user",
                vec![json!({"type": "tool_result",
                    "tool_use_id": m.tool_call_id.clone().unwrap_or_default(),
                    "content": text})],
            ),
            Role::Assistant => {
                let mut blocks = Vec::new();
                if !text.is_empty() {
                    blocks.push(json!({"type": "text", "text": text}));
                }
                for c in m
                    .tool_calls
                    .as_ref()
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let args = c
                        .pointer("/function/arguments")
                        .and_then(Value::as_str)
                        .unwrap_or("{}");
                    blocks.push(json!({"type": "tool_use",
                        "id": c.get("id").cloned().unwrap_or(json!("")),
                        "name": c.pointer("/function/name").cloned().unwrap_or(json!("")),
                        "input": serde_json::from_str::<Value>(args).unwrap_or(json!({}))}));
                }
                push(&mut messages, "assistant", blocks);
            }
        }
    }
    let mut b = json!({
        "model": model,
        "messages": messages,
        "max_tokens": request.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        "stream": true,
        // Anthropic's range is 0 to 1; OpenAI's 0 to 2.
        "temperature": crate::decimal(request.temperature.clamp(0.0, 1.0)),
    });
    let Some(o) = b.as_object_mut() else {
        return Ok(b);
    };
    if !system.is_empty() {
        o.insert("system".into(), json!(system.join("\n\n")));
    }
    if request.top_p < 1.0 {
        o.insert("top_p".into(), crate::decimal(request.top_p));
    }
    if request.top_k > 0 {
        o.insert("top_k".into(), json!(request.top_k));
    }
    if !request.stop.is_empty() {
        o.insert("stop_sequences".into(), json!(request.stop));
    }
    // `reasoning_effort` sets a thinking budget; Anthropic wants it below `max_tokens`, at
    // least 1024, and no sampling changes alongside it.
    let budget = match request.reasoning_effort {
        None | Some(ReasoningEffort::None) => None,
        Some(ReasoningEffort::Minimal) => Some(1024),
        Some(ReasoningEffort::Low) => Some(2048),
        Some(ReasoningEffort::Medium) => Some(8192),
        Some(ReasoningEffort::High) => Some(24_576),
    };
    let max_tokens = request.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
    if let Some(b) = budget.map(|b: u32| b.min(max_tokens.saturating_sub(1))) {
        if b >= 1024 {
            o.insert(
                "thinking".into(),
                json!({"type": "enabled", "budget_tokens": b}),
            );
            o.remove("temperature");
            o.remove("top_k");
            o.remove("top_p");
        }
    }
    if let Some(u) = &request.user {
        o.insert("metadata".into(), json!({"user_id": u}));
    }
    if !request.tools.is_empty() {
        let tools: Vec<Value> = request
            .tools
            .iter()
            .map(|t| {
                let mut v = json!({"name": t.name, "input_schema": t.parameters});
                if let (Some(d), Some(o)) = (&t.description, v.as_object_mut()) {
                    o.insert("description".into(), json!(d));
                }
                v
            })
            .collect();
        o.insert("tools".into(), json!(tools));
        let mut choice = match &request.tool_choice {
            ToolChoice::None => json!({"type": "none"}),
            ToolChoice::Auto => json!({"type": "auto"}),
            ToolChoice::Required => json!({"type": "any"}),
            ToolChoice::Named(n) => json!({"type": "tool", "name": n}),
        };
        if !request.parallel_tool_calls && request.tool_choice != ToolChoice::None {
            if let Some(c) = choice.as_object_mut() {
                c.insert("disable_parallel_tool_use".into(), json!(true));
            }
        }
        o.insert("tool_choice".into(), choice);
    }
    Ok(b)
}

#[async_trait::async_trait]
impl ChatProvider for AnthropicUpstream {
    fn kind(&self) -> &'static str {
        "anthropic"
    }

    fn context_length(&self) -> u32 {
        self.endpoint.context_length
    }

    fn fingerprint(&self) -> String {
        "fp_upstream".into()
    }

    fn ready(&self) -> bool {
        true
    }

    async fn prepare(&self, request: &ChatRequest) -> Result<Box<dyn PreparedChat>, ApiError> {
        let body = request_body(request, &self.endpoint.model)?;
        let prompt = estimate_prompt_tokens(request);
        Ok(Box::new(Call {
            endpoint: self.endpoint.clone(),
            path: "/messages",
            key: KeyHeader::Named("x-api-key"),
            headers: &[("anthropic-version", VERSION)],
            body,
            prompt,
            translator: Translation::default(),
            max_completion: u64::from(request.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS)),
        }))
    }
}

/// A `tool_use` block being passed on: its call index, and whether arguments were sent.
struct PendingCall {
    index: u32,
    any_args: bool,
}

#[derive(Default)]
struct Translation {
    calls: BTreeMap<u64, PendingCall>,
    next_call: u32,
    input: u32,
    cached: u32,
    output: u32,
    stop: Option<(FinishReason, Option<String>)>,
    done: bool,
    failed: bool,
    /// Characters of thinking: Anthropic counts thinking in `output_tokens` without a figure
    /// of its own, so reasoning tokens are estimated from them (three characters a token).
    thinking_chars: usize,
}

impl Translation {
    fn fail(&mut self, e: ApiError, out: &mut Vec<ChatEvent>) {
        self.failed = true;
        out.push(ChatEvent::Error(e));
    }
}

impl crate::sse::Translator for Translation {
    fn failed(&self) -> bool {
        self.failed
    }

    fn on_event(&mut self, _event: Option<&str>, data: &str, out: &mut Vec<ChatEvent>) {
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            let e = ApiError::Upstream {
                status: 502,
                message: "Upstream error: the upstream sent malformed data.".into(),
                retry_after: None,
            };
            self.fail(e, out);
            return;
        };
        let n = |p: &str| v.pointer(p).and_then(Value::as_u64).unwrap_or(0) as u32;
        match v.get("type").and_then(Value::as_str).unwrap_or("") {
            "message_start" => {
                self.cached = n("/message/usage/cache_read_input_tokens");
                self.input = n("/message/usage/input_tokens")
                    + self.cached
                    + n("/message/usage/cache_creation_input_tokens");
                self.output = n("/message/usage/output_tokens");
            }
            "content_block_start" => {
                let index = v.get("index").and_then(Value::as_u64).unwrap_or(0);
                let block = &v["content_block"];
                match block.get("type").and_then(Value::as_str) {
                    Some("tool_use") => {
                        let call = self.next_call;
                        self.next_call += 1;
                        out.push(ChatEvent::ToolCallStart {
                            choice: 0,
                            index: call,
                            id: block["id"].as_str().unwrap_or("").to_owned(),
                            name: block["name"].as_str().unwrap_or("").to_owned(),
                        });
                        self.calls.insert(
                            index,
                            PendingCall {
                                index: call,
                                any_args: false,
                            },
                        );
                    }
                    Some("text") => {
                        if let Some(t) = block["text"].as_str().filter(|t| !t.is_empty()) {
                            out.push(ChatEvent::Text {
                                choice: 0,
                                text: t.to_owned(),
                                logprobs: Vec::new(),
                            });
                        }
                    }
                    _ => {}
                }
            }
            "content_block_delta" => {
                let index = v.get("index").and_then(Value::as_u64).unwrap_or(0);
                let d = &v["delta"];
                match d.get("type").and_then(Value::as_str) {
                    Some("text_delta") => {
                        if let Some(t) = d["text"].as_str().filter(|t| !t.is_empty()) {
                            out.push(ChatEvent::Text {
                                choice: 0,
                                text: t.to_owned(),
                                logprobs: Vec::new(),
                            });
                        }
                    }
                    Some("thinking_delta") => {
                        if let Some(t) = d["thinking"].as_str().filter(|t| !t.is_empty()) {
                            self.thinking_chars += t.chars().count();
                            out.push(ChatEvent::Reasoning {
                                choice: 0,
                                text: t.to_owned(),
                            });
                        }
                    }
                    Some("input_json_delta") => {
                        if let (Some(c), Some(p)) = (
                            self.calls.get_mut(&index),
                            d["partial_json"].as_str().filter(|p| !p.is_empty()),
                        ) {
                            c.any_args = true;
                            out.push(ChatEvent::ToolCallArgs {
                                choice: 0,
                                index: c.index,
                                arguments: p.to_owned(),
                            });
                        }
                    }
                    _ => {}
                }
            }
            "content_block_stop" => {
                let index = v.get("index").and_then(Value::as_u64).unwrap_or(0);
                if let Some(c) = self.calls.remove(&index) {
                    if !c.any_args {
                        out.push(ChatEvent::ToolCallArgs {
                            choice: 0,
                            index: c.index,
                            arguments: "{}".into(),
                        });
                    }
                }
            }
            "message_delta" => {
                if let Some(r) = v.pointer("/delta/stop_reason").and_then(Value::as_str) {
                    let reason = match r {
                        "max_tokens" => FinishReason::Length,
                        "tool_use" => FinishReason::ToolCalls,
                        "refusal" => FinishReason::ContentFilter,
                        _ => FinishReason::Stop,
                    };
                    let seq = v
                        .pointer("/delta/stop_sequence")
                        .and_then(Value::as_str)
                        .map(str::to_owned);
                    self.stop = Some((reason, seq));
                }
                if let Some(o) = v.pointer("/usage/output_tokens").and_then(Value::as_u64) {
                    self.output = o as u32;
                }
            }
            "message_stop" => self.done = true,
            "error" => {
                let status = match v.pointer("/error/type").and_then(Value::as_str) {
                    Some("overloaded_error") => 529,
                    Some("rate_limit_error") => 429,
                    Some("invalid_request_error") => 400,
                    _ => 502,
                };
                let e = upstream_error(status, data);
                self.fail(e, out);
            }
            _ => {}
        }
    }

    fn on_end(&mut self, out: &mut Vec<ChatEvent>) {
        if self.failed {
            return;
        }
        if !self.done {
            self.fail(
                ApiError::Upstream {
                    status: 502,
                    message: "Upstream error: the upstream's stream ended before it was complete."
                        .into(),
                    retry_after: None,
                },
                out,
            );
            return;
        }
        let (reason, stop_sequence) = self.stop.take().unwrap_or((FinishReason::Stop, None));
        out.push(ChatEvent::Finish {
            choice: 0,
            reason,
            stop_sequence,
        });
        let reasoning = u32::try_from(self.thinking_chars.div_ceil(3)).unwrap_or(u32::MAX);
        out.push(ChatEvent::Usage(
            Usage::new(self.input, self.cached, self.output).with_reasoning(reasoning),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse::Translator;

    fn parse(v: Value) -> ChatRequest {
        parlance_api::parse_chat_request(v.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn requests_translate_with_history_and_tools() {
        let r = parse(
            json!({"model": "m", "max_tokens": 50, "temperature": 1.5, "stop": ["END"],
            "user": "u1", "parallel_tool_calls": false,
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                    "function": {"name": "get", "arguments": "{\"city\":\"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                {"role": "tool", "tool_call_id": "call_2", "content": "rain"}],
            "tools": [{"type": "function", "function": {"name": "get", "description": "Weather",
                "parameters": {"type": "object"}}}],
            "tool_choice": "required"}),
        );
        let b = request_body(&r, "claude-x").unwrap();
        assert_eq!(b["system"], "Be brief.");
        assert_eq!(b["max_tokens"], 50);
        assert_eq!(b["temperature"], 1.0);
        assert_eq!(b["stop_sequences"], json!(["END"]));
        assert_eq!(b["metadata"]["user_id"], "u1");
        assert_eq!(b["messages"][1]["content"][0]["type"], "tool_use");
        assert_eq!(b["messages"][1]["content"][0]["input"]["city"], "Paris");
        // Both tool results in one user turn.
        assert_eq!(b["messages"].as_array().unwrap().len(), 3);
        assert_eq!(b["messages"][2]["content"][1]["tool_use_id"], "call_2");
        assert_eq!(b["tools"][0]["input_schema"]["type"], "object");
        assert_eq!(
            b["tool_choice"],
            json!({"type": "any", "disable_parallel_tool_use": true})
        );
        let n2 =
            parse(json!({"model": "m", "n": 2, "messages": [{"role": "user", "content": "x"}]}));
        assert_eq!(
            request_body(&n2, "c").map_err(|e| e.param()),
            Err(Some("n".into()))
        );
    }

    #[test]
    fn events_translate_text_tools_stop_and_usage() {
        let mut t = Translation::default();
        let mut out = Vec::new();
        for d in [
            json!({"type": "message_start", "message": {"usage": {"input_tokens": 10, "cache_read_input_tokens": 5, "output_tokens": 1}}}),
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Let me"}}),
            json!({"type": "content_block_stop", "index": 0}),
            json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_1", "name": "get", "input": {}}}),
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"city\": "}}),
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "\"Paris\"}"}}),
            json!({"type": "content_block_stop", "index": 1}),
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null}, "usage": {"output_tokens": 17}}),
            json!({"type": "message_stop"}),
        ] {
            t.on_event(None, &d.to_string(), &mut out);
        }
        t.on_end(&mut out);
        assert_eq!(
            out,
            vec![
                ChatEvent::Text {
                    choice: 0,
                    text: "Let me".into(),
                    logprobs: vec![]
                },
                ChatEvent::ToolCallStart {
                    choice: 0,
                    index: 0,
                    id: "toolu_1".into(),
                    name: "get".into(),
                },
                ChatEvent::ToolCallArgs {
                    choice: 0,
                    index: 0,
                    arguments: "{\"city\": ".into()
                },
                ChatEvent::ToolCallArgs {
                    choice: 0,
                    index: 0,
                    arguments: "\"Paris\"}".into()
                },
                ChatEvent::Finish {
                    choice: 0,
                    reason: FinishReason::ToolCalls,
                    stop_sequence: None
                },
                ChatEvent::Usage(Usage::new(15, 5, 17)),
            ]
        );
        let mut t = Translation::default();
        let mut out = Vec::new();
        t.on_event(None, &json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}).to_string(), &mut out);
        assert!(matches!(
            out.as_slice(),
            [ChatEvent::Error(ApiError::Upstream { status: 529, .. })]
        ));
    }
}
