//! An OpenAI-compatible upstream (OpenAI, vLLM, llama.cpp's server, OpenRouter...): the shared
//! request is sent as a streamed Chat Completions call and the upstream's chunks are turned back
//! into chat events. The upstream key is a secret: it goes in the `Authorization` header and
//! nowhere else (never in logs or errors).

use std::collections::BTreeMap;

use parlance_api::chat::{ResponseFormat, ToolChoice};
use parlance_api::{ApiError, ChatRequest, FinishReason, Usage};
use serde_json::{json, Value};

use crate::endpoint::{upstream_error, Call, Endpoint, KeyHeader};
use crate::{ChatEvent, ChatProvider, PreparedChat};

/// One OpenAI-compatible deployment.
#[derive(Debug, Clone)]
pub struct OpenAiUpstream {
    endpoint: Endpoint,
    pass_through: Vec<String>,
}

impl OpenAiUpstream {
    /// A deployment at an endpoint.
    pub fn new(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            pass_through: Vec::new(),
        }
    }

    /// Request fields this server does not know that go to this upstream untouched: the names
    /// listed, or every one with `*` (for upstreams with extensions of their own, such as
    /// OpenRouter's `provider` or `transforms`).
    pub fn with_pass_through(mut self, fields: Vec<String>) -> Self {
        self.pass_through = fields;
        self
    }
}

/// A conservative count of prompt tokens before the upstream has counted them: one per three
/// bytes of text, plus a few per message (real tokenizers average about four bytes a token).
pub fn estimate_prompt_tokens(request: &ChatRequest) -> u32 {
    let bytes: usize = request
        .messages
        .iter()
        .map(|m| {
            m.content.as_deref().map_or(0, str::len)
                + m.tool_calls.as_ref().map_or(0, |c| c.to_string().len())
        })
        .sum();
    let tools: usize = request
        .tools
        .iter()
        .map(|t| t.parameters.to_string().len() + t.name.len())
        .sum();
    u32::try_from((bytes + tools) / 3 + 4 * request.messages.len() + 1).unwrap_or(u32::MAX)
}

/// The upstream body for a shared request.
pub fn request_body(request: &ChatRequest, model: &str) -> Value {
    let messages: Vec<Value> = request
        .messages
        .iter()
        .map(|m| {
            let mut v = json!({"role": m.role, "content": m.content});
            if let Some(o) = v.as_object_mut() {
                if let Some(n) = &m.name {
                    o.insert("name".into(), json!(n));
                }
                if let Some(c) = &m.tool_calls {
                    o.insert("tool_calls".into(), c.clone());
                }
                if let Some(id) = &m.tool_call_id {
                    o.insert("tool_call_id".into(), json!(id));
                }
            }
            v
        })
        .collect();
    let mut b = json!({
        "model": model,
        "messages": messages,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let Some(o) = b.as_object_mut() else {
        return b;
    };
    let mut set = |k: &str, v: Value| {
        o.insert(k.to_owned(), v);
    };
    if let Some(m) = request.max_tokens {
        set("max_tokens", json!(m));
    }
    set("temperature", crate::decimal(request.temperature));
    set("top_p", crate::decimal(request.top_p));
    if request.n != 1 {
        set("n", json!(request.n));
    }
    if !request.stop.is_empty() {
        set("stop", json!(request.stop));
    }
    if let Some(s) = request.seed {
        set("seed", json!(s));
    }
    if request.presence_penalty != 0.0 {
        set("presence_penalty", crate::decimal(request.presence_penalty));
    }
    if request.frequency_penalty != 0.0 {
        set(
            "frequency_penalty",
            crate::decimal(request.frequency_penalty),
        );
    }
    if !request.logit_bias.is_empty() {
        let m: BTreeMap<String, f32> = request
            .logit_bias
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect();
        set("logit_bias", json!(m));
    }
    if let Some(u) = &request.user {
        set("user", json!(u));
    }
    if let Some(effort) = request.reasoning_effort {
        set("reasoning_effort", json!(effort));
    }
    if let Some(top) = request.logprobs {
        set("logprobs", json!(true));
        set("top_logprobs", json!(top));
    }
    match &request.response_format {
        None => {}
        Some(ResponseFormat::JsonObject) => set("response_format", json!({"type": "json_object"})),
        Some(ResponseFormat::JsonSchema {
            name,
            schema,
            strict,
        }) => set(
            "response_format",
            json!({"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": strict}}),
        ),
    }
    if !request.tools.is_empty() {
        let tools: Vec<Value> = request
            .tools
            .iter()
            .map(|t| json!({"type": "function", "function": t}))
            .collect();
        set("tools", json!(tools));
        set(
            "tool_choice",
            match &request.tool_choice {
                ToolChoice::None => json!("none"),
                ToolChoice::Auto => json!("auto"),
                ToolChoice::Required => json!("required"),
                ToolChoice::Named(n) => json!({"type": "function", "function": {"name": n}}),
            },
        );
        set("parallel_tool_calls", json!(request.parallel_tool_calls));
    }
    // Extensions that OpenAI-compatible servers such as vLLM understand, sent only when set.
    if request.top_k > 0 {
        set("top_k", json!(request.top_k));
    }
    if request.min_p > 0.0 {
        set("min_p", crate::decimal(request.min_p));
    }
    if request.repetition_penalty != 1.0 {
        set(
            "repetition_penalty",
            crate::decimal(request.repetition_penalty),
        );
    }
    if request.ignore_eos {
        set("ignore_eos", json!(true));
    }
    b
}

/// Adds the request's unknown fields that `allowed` names (`*`: all), never replacing a field
/// this server set.
pub fn pass_through(body: &mut Value, request: &ChatRequest, allowed: &[String]) {
    let all = allowed.iter().any(|a| a == "*");
    if let Some(o) = body.as_object_mut() {
        for (k, v) in &request.extra {
            if (all || allowed.contains(k)) && !o.contains_key(k) {
                o.insert(k.clone(), v.clone());
            }
        }
    }
}

#[async_trait::async_trait]
impl ChatProvider for OpenAiUpstream {
    fn kind(&self) -> &'static str {
        "openai"
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
        let prompt = estimate_prompt_tokens(request);
        // The caller's `max_tokens` is the bound when given (the prompt count is only an
        // estimate); otherwise the rest of the context.
        let room = self.endpoint.context_length.saturating_sub(prompt).max(1);
        let per_choice = request.max_tokens.unwrap_or(room);
        let mut body = request_body(request, &self.endpoint.model);
        pass_through(&mut body, request, &self.pass_through);
        Ok(Box::new(Call {
            endpoint: self.endpoint.clone(),
            path: "/chat/completions",
            key: KeyHeader::Bearer,
            headers: &[],
            body,
            prompt,
            translator: Translation {
                estimated_prompt: prompt,
                ..Translation::default()
            },
            max_completion: u64::from(per_choice) * u64::from(request.n),
        }))
    }
}

fn finish(reason: &str) -> FinishReason {
    match reason {
        "length" => FinishReason::Length,
        "tool_calls" | "function_call" => FinishReason::ToolCalls,
        "content_filter" => FinishReason::ContentFilter,
        _ => FinishReason::Stop,
    }
}

/// A call whose fragments are being passed on.
#[derive(Default)]
struct PendingCall {
    id: String,
    name: String,
    /// Whether its start was sent (once its name is known).
    started: bool,
    /// Argument fragments that arrived before the name.
    held: String,
    /// Whether any argument fragment was sent.
    any_args: bool,
}

impl PendingCall {
    /// Sends the start (once), then any held fragment.
    fn flush(&mut self, choice: u32, index: u32, out: &mut Vec<ChatEvent>) {
        if !self.started {
            self.started = true;
            if self.id.is_empty() {
                self.id = format!("call_{}", uuid::Uuid::new_v4().simple());
            }
            out.push(ChatEvent::ToolCallStart {
                choice,
                index,
                id: self.id.clone(),
                name: self.name.clone(),
            });
        }
        if !self.held.is_empty() {
            self.any_args = true;
            out.push(ChatEvent::ToolCallArgs {
                choice,
                index,
                arguments: std::mem::take(&mut self.held),
            });
        }
    }
}

/// State of one upstream stream's translation.
#[derive(Default)]
struct Translation {
    calls: BTreeMap<(u32, u32), PendingCall>,
    usage: Option<Usage>,
    done: bool,
    failed: bool,
    estimated_prompt: u32,
    /// Characters of output, for a usage estimate when the upstream gives none.
    chars: usize,
}

impl crate::sse::Translator for Translation {
    fn failed(&self) -> bool {
        self.failed
    }

    fn on_event(&mut self, _event: Option<&str>, data: &str, out: &mut Vec<ChatEvent>) {
        if data == "[DONE]" {
            self.done = true;
            return;
        }
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            self.failed = true;
            out.push(ChatEvent::Error(ApiError::Upstream {
                status: 502,
                message: "Upstream error: the upstream sent malformed data.".into(),
                retry_after: None,
            }));
            return;
        };
        if let Some(e) = v.get("error") {
            self.failed = true;
            out.push(ChatEvent::Error(upstream_error(
                502,
                &json!({ "error": e }).to_string(),
            )));
            return;
        }
        for c in v
            .get("choices")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let choice = c.get("index").and_then(Value::as_u64).unwrap_or(0) as u32;
            let delta = c.get("delta");
            // Thinking, as DeepSeek and vLLM (`reasoning_content`) or OpenRouter (`reasoning`)
            // stream it.
            if let Some(text) = delta
                .and_then(|d| d.get("reasoning_content").or_else(|| d.get("reasoning")))
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
            {
                self.chars += text.chars().count();
                out.push(ChatEvent::Reasoning {
                    choice,
                    text: text.to_owned(),
                });
            }
            if let Some(text) = delta
                .and_then(|d| d.get("content"))
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
            {
                self.chars += text.chars().count();
                out.push(ChatEvent::Text {
                    choice,
                    text: text.to_owned(),
                    logprobs: Vec::new(),
                });
            }
            for tc in delta
                .and_then(|d| d.get("tool_calls"))
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let index = tc.get("index").and_then(Value::as_u64).unwrap_or(0) as u32;
                let p = self.calls.entry((choice, index)).or_default();
                if let Some(id) = tc.get("id").and_then(Value::as_str) {
                    p.id = id.to_owned();
                }
                if let Some(f) = tc.get("function") {
                    if let Some(n) = f.get("name").and_then(Value::as_str) {
                        p.name.push_str(n);
                    }
                    if let Some(a) = f.get("arguments").and_then(Value::as_str) {
                        self.chars += a.len();
                        p.held.push_str(a);
                    }
                }
                // Passed on fragment by fragment as soon as the call is named.
                if !p.name.is_empty() {
                    p.flush(choice, index, out);
                }
            }
            if let Some(reason) = c.get("finish_reason").and_then(Value::as_str) {
                let keys: Vec<(u32, u32)> = self
                    .calls
                    .keys()
                    .filter(|(ch, _)| *ch == choice)
                    .copied()
                    .collect();
                for k in keys {
                    if let Some(mut p) = self.calls.remove(&k) {
                        p.flush(choice, k.1, out);
                        if !p.any_args {
                            out.push(ChatEvent::ToolCallArgs {
                                choice,
                                index: k.1,
                                arguments: "{}".into(),
                            });
                        }
                    }
                }
                out.push(ChatEvent::Finish {
                    choice,
                    reason: finish(reason),
                    stop_sequence: None,
                });
            }
        }
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0) as u32;
            let cached = u
                .pointer("/prompt_tokens_details/cached_tokens")
                .and_then(Value::as_u64)
                .unwrap_or(0) as u32;
            let reasoning = u
                .pointer("/completion_tokens_details/reasoning_tokens")
                .and_then(Value::as_u64)
                .unwrap_or(0) as u32;
            self.usage = Some(
                Usage::new(n("prompt_tokens"), cached, n("completion_tokens"))
                    .with_reasoning(reasoning),
            );
        }
    }

    /// The end of the upstream's stream: usage (the upstream's, or an estimate), or an error if
    /// it was cut.
    fn on_end(&mut self, out: &mut Vec<ChatEvent>) {
        if self.failed {
            return;
        }
        if !self.done {
            out.push(ChatEvent::Error(ApiError::Upstream {
                status: 502,
                message: "Upstream error: the upstream's stream ended before it was complete."
                    .into(),
                retry_after: None,
            }));
            return;
        }
        let usage = self.usage.unwrap_or_else(|| {
            // No usage from the upstream: count it ourselves, conservatively.
            let completion = u32::try_from(self.chars.div_ceil(3)).unwrap_or(u32::MAX);
            Usage::new(self.estimated_prompt, 0, completion)
        });
        out.push(ChatEvent::Usage(usage));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::sse::Translator;

    fn run(datas: &[&str], end: bool) -> Vec<ChatEvent> {
        let mut t = Translation {
            estimated_prompt: 7,
            ..Translation::default()
        };
        let mut out = Vec::new();
        for d in datas {
            t.on_event(None, d, &mut out);
        }
        if end {
            t.on_end(&mut out);
        }
        out
    }

    #[test]
    fn text_tool_call_fragments_finish_and_usage() {
        let out = run(
            &[
                r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#,
                r#"{"choices":[{"index":0,"delta":{"content":"Hel"}}]}"#,
                r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"get","arguments":""}}]}}]}"#,
                r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"a\":"}}]}}]}"#,
                r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"1}"}}]}}]}"#,
                r#"{"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#,
                r#"{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17,"prompt_tokens_details":{"cached_tokens":4}}}"#,
                "[DONE]",
            ],
            true,
        );
        assert_eq!(
            out,
            vec![
                ChatEvent::Text {
                    choice: 0,
                    text: "Hel".into(),
                    logprobs: vec![]
                },
                ChatEvent::ToolCallStart {
                    choice: 0,
                    index: 0,
                    id: "call_1".into(),
                    name: "get".into(),
                },
                ChatEvent::ToolCallArgs {
                    choice: 0,
                    index: 0,
                    arguments: "{\"a\":".into()
                },
                ChatEvent::ToolCallArgs {
                    choice: 0,
                    index: 0,
                    arguments: "1}".into()
                },
                ChatEvent::Finish {
                    choice: 0,
                    reason: FinishReason::ToolCalls,
                    stop_sequence: None
                },
                ChatEvent::Usage(Usage::new(12, 4, 5)),
            ]
        );
    }

    #[test]
    fn cut_malformed_and_missing_usage() {
        let cut = run(
            &[r#"{"choices":[{"index":0,"delta":{"content":"Hi"}}]}"#],
            true,
        );
        assert!(matches!(
            cut.last(),
            Some(ChatEvent::Error(ApiError::Upstream { status: 502, .. }))
        ));
        let bad = run(&["{not json"], false);
        assert!(matches!(bad.as_slice(), [ChatEvent::Error(_)]));
        let no_usage = run(
            &[
                r#"{"choices":[{"index":0,"delta":{"content":"abcdef"},"finish_reason":"stop"}]}"#,
                "[DONE]",
            ],
            true,
        );
        assert_eq!(
            no_usage.last(),
            Some(&ChatEvent::Usage(Usage::new(7, 0, 2)))
        );
    }

    #[test]
    fn unknown_fields_pass_only_where_allowed() {
        let r = parlance_api::parse_chat_request(
            br#"{"model":"m","messages":[{"role":"user","content":"x"}],"provider":{"order":["a"]},"transforms":[],"stream":false}"#,
        )
        .unwrap();
        assert_eq!(r.extra.len(), 2);
        let mut b = request_body(&r, "up");
        pass_through(&mut b, &r, &[]);
        assert!(b.get("provider").is_none());
        pass_through(&mut b, &r, &["provider".into()]);
        assert_eq!(b["provider"]["order"][0], "a");
        assert!(b.get("transforms").is_none());
        pass_through(&mut b, &r, &["*".into()]);
        assert!(b.get("transforms").is_some());
        // Never replaces what the server set.
        assert_eq!(b["stream"], true);
    }

    #[test]
    fn errors_keep_the_callers_status() {
        let e = upstream_error(400, r#"{"error":{"message":"bad temperature"}}"#);
        assert_eq!(e.status(parlance_api::StatusConvention::OpenAi), 400);
        assert!(e.to_string().contains("bad temperature"));
        let e = upstream_error(500, "oops");
        assert_eq!(e.status(parlance_api::StatusConvention::OpenAi), 502);
    }
}
