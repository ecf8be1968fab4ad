//! Anthropic Messages: the request, translated at the edge into the same [`ChatRequest`] the
//! OpenAI door produces, the response and stream event shapes, and Anthropic's error body.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::chat::{parse_body, valid_function_name, ChatRequest, Message, Role, Tool, ToolChoice};
use crate::error::ApiError;

/// The body as it arrives; unknown fields are ignored.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[schemars(rename = "CreateMessageRequest")]
pub struct RawMessagesRequest {
    #[schemars(required)]
    model: Option<String>,
    #[schemars(required)]
    max_tokens: Option<i64>,
    #[schemars(required)]
    messages: Option<Vec<Value>>,
    system: Option<Value>,
    stop_sequences: Option<Vec<String>>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    stream: Option<bool>,
    metadata: Option<RawMetadata>,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    thinking: Option<Value>,
    #[serde(flatten)]
    app: crate::chat::RawApp,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
struct RawMetadata {
    user_id: Option<String>,
}

fn range(param: &str, v: Option<f64>, lo: f64, hi: f64, default: f64) -> Result<f32, ApiError> {
    match v {
        None => Ok(default as f32),
        Some(x) if x.is_finite() && (lo..=hi).contains(&x) => Ok(x as f32),
        Some(x) => Err(ApiError::invalid(
            param,
            format!("{param}: {x} is not between {lo} and {hi}"),
        )),
    }
}

/// Parses and validates a Messages request into the shared internal request.
pub fn parse_messages_request(body: &[u8]) -> Result<ChatRequest, ApiError> {
    let raw: RawMessagesRequest = parse_body(body)?;
    let model = raw
        .model
        .filter(|m| !m.trim().is_empty())
        .ok_or_else(|| ApiError::malformed("model: Field required", Some("model".into())))?;
    let max_tokens = match raw.max_tokens {
        None => {
            return Err(ApiError::malformed(
                "max_tokens: Field required",
                Some("max_tokens".into()),
            ))
        }
        Some(m) if m >= 1 && m <= i64::from(u32::MAX) => m as u32,
        Some(m) => {
            return Err(ApiError::invalid(
                "max_tokens",
                format!("max_tokens: {m} must be at least 1"),
            ))
        }
    };
    let (app, labels) = raw.app.validate()?;
    let labels = crate::chat::merge_labels(Default::default(), labels)?;
    let given = crate::chat::Given {
        temperature: raw.temperature.is_some(),
        top_p: raw.top_p.is_some(),
        max_tokens: true,
        stop: raw.stop_sequences.is_some(),
        top_k: raw.top_k.is_some(),
        ..Default::default()
    };
    let tools = parse_tools(raw.tools.as_ref())?;
    let (tool_choice, parallel_tool_calls) = parse_tool_choice(raw.tool_choice.as_ref(), &tools)?;
    if let Some(t) = &raw.thinking {
        if t.get("type").and_then(Value::as_str) != Some("disabled") {
            return Err(ApiError::Unsupported {
                message: "thinking: extended thinking is not supported by this model".into(),
                param: "thinking".into(),
            });
        }
    }
    let mut messages = Vec::new();
    if let Some(system) = raw.system {
        let text = text_of(&system, "system")?;
        messages.push(Message {
            role: Role::System,
            content: Some(text),
            name: None,
            tool_calls: None,
            tool_call_id: None,
            completion_id: None,
            metadata: None,
        });
    }
    let raw_messages = raw
        .messages
        .ok_or_else(|| ApiError::malformed("messages: Field required", Some("messages".into())))?;
    if raw_messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "messages: at least one message is required",
        ));
    }
    for (i, m) in raw_messages.iter().enumerate() {
        let role = match m.get("role").and_then(Value::as_str) {
            Some("user") => Role::User,
            Some("assistant") => Role::Assistant,
            other => {
                return Err(ApiError::invalid(
                    format!("messages.{i}.role"),
                    format!(
                        "messages.{i}.role: Input should be 'user' or 'assistant', got {other:?}"
                    ),
                ))
            }
        };
        let content = m.get("content").ok_or_else(|| {
            ApiError::malformed(
                format!("messages.{i}.content: Field required"),
                Some(format!("messages.{i}.content")),
            )
        })?;
        push_message(
            &mut messages,
            role,
            content,
            &format!("messages.{i}.content"),
        )?;
    }
    let top_k = match raw.top_k {
        None => 0,
        Some(k) if k >= 0 && k <= i64::from(u32::MAX) => k as u32,
        Some(k) => {
            return Err(ApiError::invalid(
                "top_k",
                format!("top_k: {k} must be at least 0"),
            ))
        }
    };
    Ok(ChatRequest {
        model,
        messages,
        max_tokens: Some(max_tokens),
        temperature: range("temperature", raw.temperature, 0.0, 1.0, 1.0)?,
        top_p: range("top_p", raw.top_p, 0.0, 1.0, 1.0)?,
        n: 1,
        stream: raw.stream.unwrap_or(false),
        include_usage: true,
        stop: raw.stop_sequences.unwrap_or_default(),
        seed: None,
        presence_penalty: 0.0,
        frequency_penalty: 0.0,
        logit_bias: Vec::new(),
        user: raw.metadata.and_then(|m| m.user_id),
        metadata: labels,
        top_k,
        min_p: 0.0,
        repetition_penalty: 1.0,
        ignore_eos: false,
        reasoning_effort: None,
        logprobs: None,
        response_format: None,
        tools,
        tool_choice,
        parallel_tool_calls,
        legacy_functions: false,
        max_ttft_ms: None,
        extra: serde_json::Map::new(),
        app,
        given,
    })
}

fn parse_tools(v: Option<&Value>) -> Result<Vec<Tool>, ApiError> {
    let Some(v) = v else { return Ok(Vec::new()) };
    let list = v.as_array().ok_or_else(|| {
        ApiError::malformed("tools: Input should be a valid list", Some("tools".into()))
    })?;
    list.iter()
        .enumerate()
        .map(|(i, t)| {
            let name = t.get("name").and_then(Value::as_str).ok_or_else(|| {
                ApiError::malformed(
                    format!("tools.{i}.name: Field required"),
                    Some(format!("tools.{i}.name")),
                )
            })?;
            if !valid_function_name(name) {
                return Err(ApiError::invalid(
                    format!("tools.{i}.name"),
                    format!(
                        "tools.{i}.name: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'"
                    ),
                ));
            }
            let schema = t
                .get("input_schema")
                .filter(|s| s.is_object())
                .ok_or_else(|| {
                    ApiError::malformed(
                        format!("tools.{i}.input_schema: Field required"),
                        Some(format!("tools.{i}.input_schema")),
                    )
                })?;
            Ok(Tool {
                name: name.to_owned(),
                description: t
                    .get("description")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                parameters: schema.clone(),
                strict: true,
            })
        })
        .collect()
}

fn parse_tool_choice(v: Option<&Value>, tools: &[Tool]) -> Result<(ToolChoice, bool), ApiError> {
    let parallel = !v
        .and_then(|c| c.get("disable_parallel_tool_use"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let choice = match v.and_then(|c| c.get("type")).and_then(Value::as_str) {
        _ if tools.is_empty() && v.is_none() => ToolChoice::None,
        _ if tools.is_empty() => {
            return Err(ApiError::invalid(
                "tool_choice",
                "tool_choice: 'tools' must be given to use 'tool_choice'",
            ))
        }
        None | Some("auto") => ToolChoice::Auto,
        Some("any") => ToolChoice::Required,
        Some("none") => ToolChoice::None,
        Some("tool") => {
            let name = v
                .and_then(|c| c.get("name"))
                .and_then(Value::as_str)
                .unwrap_or_default();
            if !tools.iter().any(|t| t.name == name) {
                return Err(ApiError::invalid(
                    "tool_choice.name",
                    format!("tool_choice.name: no tool named '{name}'"),
                ));
            }
            ToolChoice::Named(name.to_owned())
        }
        Some(other) => {
            return Err(ApiError::invalid(
                "tool_choice.type",
                format!("tool_choice.type: '{other}' is not one of 'auto', 'any', 'tool', 'none'"),
            ))
        }
    };
    Ok((choice, parallel))
}

/// Adds one Anthropic message: text becomes the message's content, `tool_use` blocks become the
/// assistant's tool calls, and each `tool_result` block becomes a `tool` message of its own.
fn push_message(
    messages: &mut Vec<Message>,
    role: Role,
    content: &Value,
    path: &str,
) -> Result<(), ApiError> {
    let blocks: Vec<Value> = match content {
        Value::Array(b) => b.clone(),
        other => {
            messages.push(Message {
                role,
                content: Some(text_of(other, path)?),
                name: None,
                tool_calls: None,
                tool_call_id: None,
                completion_id: None,
                metadata: None,
            });
            return Ok(());
        }
    };
    let mut text = String::new();
    let mut calls = Vec::new();
    for (j, b) in blocks.iter().enumerate() {
        let at = format!("{path}.{j}");
        match (role, b.get("type").and_then(Value::as_str)) {
            (Role::Assistant, Some("tool_use")) => {
                let field = |f: &str| {
                    b.get(f).cloned().ok_or_else(|| {
                        ApiError::malformed(
                            format!("{at}.{f}: Field required"),
                            Some(format!("{at}.{f}")),
                        )
                    })
                };
                let input = field("input")?;
                calls.push(serde_json::json!({"id": field("id")?, "type": "function",
                    "function": {"name": field("name")?, "arguments": input.to_string()}}));
            }
            (Role::User, Some("tool_result")) => {
                let id = b
                    .get("tool_use_id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        ApiError::malformed(
                            format!("{at}.tool_use_id: Field required"),
                            Some(format!("{at}.tool_use_id")),
                        )
                    })?;
                let result = match b.get("content") {
                    None | Some(Value::Null) => String::new(),
                    Some(c) => text_of(c, &format!("{at}.content"))?,
                };
                messages.push(Message {
                    role: Role::Tool,
                    content: Some(result),
                    name: None,
                    tool_calls: None,
                    tool_call_id: Some(id.to_owned()),
                    completion_id: None,
                    metadata: None,
                });
            }
            _ => text.push_str(&text_of(&Value::Array(vec![b.clone()]), path)?),
        }
    }
    if !text.is_empty() || !calls.is_empty() || blocks.is_empty() {
        messages.push(Message {
            role,
            content: (!text.is_empty() || calls.is_empty()).then_some(text),
            name: None,
            tool_calls: (!calls.is_empty()).then_some(Value::Array(calls)),
            tool_call_id: None,
            completion_id: None,
            metadata: None,
        });
    }
    Ok(())
}

/// The text of a string or an array of text blocks.
fn text_of(v: &Value, path: &str) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => {
            let mut out = String::new();
            for (j, b) in blocks.iter().enumerate() {
                match b.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        let t = b.get("text").and_then(Value::as_str).ok_or_else(|| {
                            ApiError::malformed(
                                format!("{path}.{j}.text: Field required"),
                                Some(format!("{path}.{j}.text")),
                            )
                        })?;
                        out.push_str(t);
                    }
                    Some(other) => {
                        return Err(ApiError::Unsupported {
                            message: format!("{path}.{j}.type: content blocks of type '{other}' are not supported by this server yet"),
                            param: format!("{path}.{j}.type"),
                        })
                    }
                    None => {
                        return Err(ApiError::malformed(
                            format!("{path}.{j}.type: Field required"),
                            Some(format!("{path}.{j}.type")),
                        ))
                    }
                }
            }
            Ok(out)
        }
        _ => Err(ApiError::malformed(
            format!("{path}: Input should be a valid string or a list of content blocks"),
            Some(path.to_owned()),
        )),
    }
}

/// Anthropic's `stop_reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The model ended its turn.
    EndTurn,
    /// `max_tokens` was reached.
    MaxTokens,
    /// A stop sequence matched.
    StopSequence,
    /// The model called tools.
    ToolUse,
    /// A content filter stopped the answer.
    Refusal,
}

/// `usage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default, schemars::JsonSchema)]
pub struct MessagesUsage {
    /// Prompt tokens.
    pub input_tokens: u32,
    /// Generated tokens.
    pub output_tokens: u32,
    /// Prompt tokens read from a cache.
    pub cache_read_input_tokens: u32,
    /// Prompt tokens written to a cache (none here).
    pub cache_creation_input_tokens: u32,
}

/// A complete response.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct MessagesResponse {
    /// `msg_…`.
    pub id: String,
    /// Always `message`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Always `assistant`.
    pub role: &'static str,
    /// The model as requested.
    pub model: String,
    /// The answer: `text` and `tool_use` blocks.
    pub content: Vec<Value>,
    /// Why it ended (null only in `message_start`).
    pub stop_reason: Option<StopReason>,
    /// The stop sequence that matched.
    pub stop_sequence: Option<String>,
    /// Token counts.
    pub usage: MessagesUsage,
    /// parlance: the server-side session this turn belongs to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
}

/// Anthropic's error body for an [`ApiError`].
pub fn error_body(e: &ApiError, status: u16) -> Value {
    let kind = match status {
        400 | 405 | 422 => "invalid_request_error",
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        504 => "timeout_error",
        _ => "api_error",
    };
    serde_json::json!({"type": "error", "error": {"type": kind, "message": e.to_string()}})
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<ChatRequest, ApiError> {
        parse_messages_request(v.to_string().as_bytes())
    }

    #[test]
    fn translates_into_the_shared_request() {
        let r = parse(json!({
            "model": "m", "max_tokens": 10, "system": [{"type": "text", "text": "Be brief."}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                         {"role": "assistant", "content": "Hello"},
                         {"role": "user", "content": "Bye"}],
            "stop_sequences": ["END"], "temperature": 0.5, "top_k": 5,
            "metadata": {"user_id": "u1"}
        }))
        .map_err(|e| e.to_string());
        let r = r.as_ref().map(|r| {
            (
                r.messages.len(),
                r.messages[0].role,
                r.messages[0].content.clone(),
                r.max_tokens,
                r.stop.clone(),
                r.top_k,
                r.user.clone(),
            )
        });
        assert_eq!(
            r,
            Ok((
                4,
                Role::System,
                Some("Be brief.".to_owned()),
                Some(10),
                vec!["END".to_owned()],
                5,
                Some("u1".to_owned())
            ))
        );
    }

    #[test]
    fn refusals_name_the_field() {
        let base = || json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]});
        let mut b = base();
        b.as_object_mut().map(|o| o.remove("max_tokens"));
        assert_eq!(
            parse(b).err().and_then(|e| e.param()),
            Some("max_tokens".into())
        );
        let mut b = base();
        b["temperature"] = json!(1.5);
        assert_eq!(
            parse(b).err().and_then(|e| e.param()),
            Some("temperature".into())
        );
        let mut b = base();
        b["messages"][0]["role"] = json!("system");
        assert_eq!(
            parse(b).err().and_then(|e| e.param()),
            Some("messages.0.role".into())
        );
        let mut b = base();
        b["messages"][0]["content"] = json!([{"type": "image", "source": {}}]);
        assert_eq!(
            parse(b).err().and_then(|e| e.param()),
            Some("messages.0.content.0.type".into())
        );
        let mut b = base();
        b["tool_choice"] = json!({"type": "any"});
        assert!(parse(b).is_err());
        let mut b = base();
        b["tools"] = json!([{"name": "get_weather", "input_schema": {"type": "object"}}]);
        b["tool_choice"] = json!({"type": "tool", "name": "nope"});
        assert_eq!(
            parse(b).err().and_then(|e| e.param()),
            Some("tool_choice.name".into())
        );
    }

    #[test]
    fn tool_use_history_translates() {
        let r = parse(json!({"model": "m", "max_tokens": 5,
            "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
            "messages": [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": [{"type": "text", "text": "Let me check."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "Rain"},
                    {"type": "text", "text": "Thanks"}]}]}))
        .map_err(|e| e.to_string());
        let r = r.as_ref().map(|r| {
            (
                r.tool_choice.clone(),
                r.parallel_tool_calls,
                r.messages.iter().map(|m| m.role).collect::<Vec<_>>(),
                r.messages[1]
                    .tool_calls
                    .as_ref()
                    .map(|c| c[0]["function"]["arguments"].clone()),
                r.messages[2].tool_call_id.clone(),
            )
        });
        assert_eq!(
            r,
            Ok((
                ToolChoice::Required,
                false,
                vec![Role::User, Role::Assistant, Role::Tool, Role::User],
                Some(json!("{\"city\":\"Oslo\"}")),
                Some("toolu_1".to_owned()),
            ))
        );
    }

    #[test]
    fn error_body_shape() {
        let v = error_body(&ApiError::ModelNotFound("x".into()), 404);
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "not_found_error");
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains('x')));
    }
}
