//! OpenAI chat completions: the request as it arrives (lenient: unknown fields ignored), its
//! validation into a typed [`ChatRequest`] (strict: every known field honoured or refused), and
//! the response and chunk shapes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ApiError;

/// A validated chat completion request.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    /// The requested model name, as the client sent it.
    pub model: String,
    /// The conversation.
    pub messages: Vec<Message>,
    /// Completion token limit (`max_completion_tokens` wins over `max_tokens`).
    pub max_tokens: Option<u32>,
    /// 0–2, default 1.
    pub temperature: f32,
    /// 0–1, default 1.
    pub top_p: f32,
    /// Choices, 1–128.
    pub n: u32,
    /// Stream as server-sent events.
    pub stream: bool,
    /// Send a usage chunk at the end of the stream.
    pub include_usage: bool,
    /// Up to 4 stop strings.
    pub stop: Vec<String>,
    /// Seed for reproducible sampling.
    pub seed: Option<u64>,
    /// −2–2.
    pub presence_penalty: f32,
    /// −2–2.
    pub frequency_penalty: f32,
    /// Token id → bias (−100–100).
    pub logit_bias: Vec<(u32, f32)>,
    /// End-user identifier.
    pub user: Option<String>,
    /// Up to 16 string pairs.
    pub metadata: BTreeMap<String, String>,
    /// vLLM extension: keep the k most likely tokens (0: off).
    pub top_k: u32,
    /// vLLM extension: relative probability floor (0: off).
    pub min_p: f32,
    /// vLLM extension: repetition penalty (1: off).
    pub repetition_penalty: f32,
    /// vLLM extension: never stop on the end-of-turn token.
    pub ignore_eos: bool,
    /// Reasoning effort; models without a thinking mode accept it with no effect.
    pub reasoning_effort: Option<ReasoningEffort>,
    /// `logprobs: true`, with `top_logprobs` alternatives per token (0–20).
    pub logprobs: Option<u32>,
    /// Structured output: `json_object` or `json_schema` (`text` is `None`).
    pub response_format: Option<ResponseFormat>,
    /// Function tools the model may call.
    pub tools: Vec<Tool>,
    /// How the model may use them (`Auto` when tools are given and no choice is).
    pub tool_choice: ToolChoice,
    /// Whether several calls may come in one answer.
    pub parallel_tool_calls: bool,
    /// The tools came as the legacy `functions` (and `function_call`): the answer is written
    /// in that shape too (`message.function_call`, `finish_reason: "function_call"`).
    pub legacy_functions: bool,
    /// parlance extension: abandon an upstream attempt whose first token has not arrived after
    /// this many milliseconds and try the next deployment.
    pub max_ttft_ms: Option<u64>,
    /// Top-level fields this server does not know, kept as sent: an upstream configured to
    /// accept them gets them untouched; everything else ignores them.
    pub extra: serde_json::Map<String, Value>,
    /// parlance's application-platform fields.
    pub app: AppFields,
    /// Which of the parameters a project or campaign may default were set by the caller.
    pub given: Given,
}

/// The application-platform fields of a request: sessions, campaigns, tags, the project's
/// system-prompt arguments and tool switches, and storage.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AppFields {
    /// A server-side conversation to continue (a UUID, lower-case and hyphenated).
    pub session_id: Option<String>,
    /// A campaign, by id or key.
    pub ab_campaign: Option<String>,
    /// Free tags (at most 32, each 1 to 64 characters).
    pub tags: Vec<String>,
    /// Arguments of the project's system-prompt template.
    pub system_prompt_args: Option<serde_json::Map<String, Value>>,
    /// `false` turns all of the project's tools off.
    pub use_tools: Option<bool>,
    /// `tools: [{id, enabled}]`: project tools switched on or off for this request.
    pub tool_switches: Vec<(String, bool)>,
    /// Keep the request and response (`store: true`).
    pub store: bool,
    /// Whether `tool_choice` was sent (it is checked once the project's tools are known).
    pub tool_choice_given: bool,
}

/// The parameters a project or campaign variant may give defaults for, and whether the caller
/// set each (a default never overrides what the caller set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Given {
    /// `temperature`.
    pub temperature: bool,
    /// `top_p`.
    pub top_p: bool,
    /// `max_tokens` / `max_completion_tokens`.
    pub max_tokens: bool,
    /// `stop`.
    pub stop: bool,
    /// `seed`.
    pub seed: bool,
    /// `presence_penalty`.
    pub presence_penalty: bool,
    /// `frequency_penalty`.
    pub frequency_penalty: bool,
    /// `top_k`.
    pub top_k: bool,
    /// `min_p`.
    pub min_p: bool,
    /// `repetition_penalty`.
    pub repetition_penalty: bool,
    /// `reasoning_effort`.
    pub reasoning_effort: bool,
    /// `response_format`.
    pub response_format: bool,
    /// `max_ttft_ms`.
    pub max_ttft_ms: bool,
}

/// The fields a project's or campaign variant's `params` may set.
pub const DEFAULTABLE: &[&str] = &[
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "top_k",
    "min_p",
    "repetition_penalty",
    "reasoning_effort",
    "response_format",
    "max_ttft_ms",
];

impl ChatRequest {
    /// Takes each parameter the caller did not set from `defaults` (parsed with
    /// [`parse_defaults`]).
    pub fn apply_defaults(&mut self, defaults: &ChatRequest) {
        let (g, d) = (self.given, &defaults.given);
        if !g.temperature && d.temperature {
            self.temperature = defaults.temperature;
        }
        if !g.top_p && d.top_p {
            self.top_p = defaults.top_p;
        }
        if !g.max_tokens && d.max_tokens {
            self.max_tokens = defaults.max_tokens;
        }
        if !g.stop && d.stop {
            self.stop = defaults.stop.clone();
        }
        if !g.seed && d.seed {
            self.seed = defaults.seed;
        }
        if !g.presence_penalty && d.presence_penalty {
            self.presence_penalty = defaults.presence_penalty;
        }
        if !g.frequency_penalty && d.frequency_penalty {
            self.frequency_penalty = defaults.frequency_penalty;
        }
        if !g.top_k && d.top_k {
            self.top_k = defaults.top_k;
        }
        if !g.min_p && d.min_p {
            self.min_p = defaults.min_p;
        }
        if !g.repetition_penalty && d.repetition_penalty {
            self.repetition_penalty = defaults.repetition_penalty;
        }
        if !g.reasoning_effort && d.reasoning_effort {
            self.reasoning_effort = defaults.reasoning_effort;
        }
        if !g.response_format && d.response_format {
            self.response_format = defaults.response_format.clone();
        }
        if !g.max_ttft_ms && d.max_ttft_ms {
            self.max_ttft_ms = defaults.max_ttft_ms;
        }
        self.given = Given {
            temperature: g.temperature || d.temperature,
            top_p: g.top_p || d.top_p,
            max_tokens: g.max_tokens || d.max_tokens,
            stop: g.stop || d.stop,
            seed: g.seed || d.seed,
            presence_penalty: g.presence_penalty || d.presence_penalty,
            frequency_penalty: g.frequency_penalty || d.frequency_penalty,
            top_k: g.top_k || d.top_k,
            min_p: g.min_p || d.min_p,
            repetition_penalty: g.repetition_penalty || d.repetition_penalty,
            reasoning_effort: g.reasoning_effort || d.reasoning_effort,
            response_format: g.response_format || d.response_format,
            max_ttft_ms: g.max_ttft_ms || d.max_ttft_ms,
        };
    }

    /// Checks `tool_choice` against the tools finally offered (the caller's plus a project's):
    /// `tool_choice` without tools and a named function that is not offered are 400s.
    pub fn check_tool_choice(&self) -> Result<(), ApiError> {
        if self.tools.is_empty() && self.app.tool_choice_given {
            return Err(ApiError::invalid(
                "tool_choice",
                "'tool_choice' is only allowed when 'tools' are specified.",
            ));
        }
        if let ToolChoice::Named(name) = &self.tool_choice {
            if !self.tools.iter().any(|t| &t.name == name) {
                return Err(ApiError::invalid(
                    "tool_choice",
                    format!("Invalid 'tool_choice': no function named '{name}' in 'tools'."),
                ));
            }
        }
        Ok(())
    }
}

/// Validates a project's or campaign variant's default parameters (an object holding only
/// [`DEFAULTABLE`] fields, each valid as in a request) into a request whose `given` says which
/// were set.
pub fn parse_defaults(params: &Value) -> Result<ChatRequest, ApiError> {
    let Some(obj) = params.as_object() else {
        return Err(ApiError::malformed(
            "Invalid type for 'params': expected an object.",
            Some("params".into()),
        ));
    };
    if let Some(k) = obj.keys().find(|k| !DEFAULTABLE.contains(&k.as_str())) {
        return Err(ApiError::invalid(
            format!("params.{k}"),
            format!(
                "'{k}' cannot be a default parameter; allowed: {}.",
                DEFAULTABLE.join(", ")
            ),
        ));
    }
    let mut body = obj.clone();
    body.insert("model".into(), Value::String("defaults".into()));
    body.insert(
        "messages".into(),
        serde_json::json!([{"role": "user", "content": "-"}]),
    );
    validate(deserialize(&Value::Object(body))?)
}

/// The top-level fields of a chat request this server reads.
const KNOWN_FIELDS: &[&str] = &[
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stream_options",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "user",
    "metadata",
    "top_k",
    "min_p",
    "repetition_penalty",
    "ignore_eos",
    "max_ttft_ms",
    "reasoning_effort",
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "functions",
    "function_call",
    "response_format",
    "store",
    "modalities",
    "audio",
    "prediction",
    "web_search_options",
    "service_tier",
    "labels",
    "tags",
    "session_id",
    "ab_campaign",
    "system_prompt_args",
    "use_tools",
];

/// A function tool.
#[derive(Debug, Clone, PartialEq, Serialize, schemars::JsonSchema)]
pub struct Tool {
    /// Function name (a-z, A-Z, 0-9, `_`, `-`; at most 64).
    pub name: String,
    /// What it does, for the model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// JSON schema of its arguments (an object schema).
    pub parameters: Value,
    /// Whether the caller asked for strict arguments (always enforced when calls are forced).
    pub strict: bool,
}

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// Never call a tool.
    None,
    /// The model decides.
    Auto,
    /// At least one call.
    Required,
    /// Exactly this function.
    Named(String),
}

/// `response_format` other than `text`.
#[derive(Debug, Clone, PartialEq)]
pub enum ResponseFormat {
    /// Any JSON object.
    JsonObject,
    /// JSON valid against a schema.
    JsonSchema {
        /// The schema's name.
        name: String,
        /// The schema.
        schema: Value,
        /// Whether the caller asked for strict adherence (always enforced here).
        strict: bool,
    },
}

/// `reasoning_effort` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReasoningEffort {
    /// No thinking.
    None,
    /// Minimal.
    Minimal,
    /// Low.
    Low,
    /// Medium.
    Medium,
    /// High.
    High,
}

/// Message roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// System instructions.
    System,
    /// Developer instructions (rendered as system where a template lacks the role).
    Developer,
    /// The user.
    User,
    /// The model.
    Assistant,
    /// A tool result.
    Tool,
}

/// One message of the conversation, with its content flattened to text.
#[derive(Debug, Clone, PartialEq, Serialize, schemars::JsonSchema)]
pub struct Message {
    /// Who speaks.
    pub role: Role,
    /// The text (text parts joined); `None` for an assistant turn that only calls tools.
    pub content: Option<String>,
    /// Optional participant name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// An assistant's tool calls, as sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Value>,
    /// The call a tool message answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// The completion an assistant message came from (parlance's sessions and feedback).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_id: Option<String>,
    /// Free data the caller attached to the message (kept with a session's history).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
}

impl Message {
    /// A message with only a role and its content.
    pub fn new(role: Role, content: Option<String>) -> Self {
        Self {
            role,
            content,
            name: None,
            tool_calls: None,
            tool_call_id: None,
            completion_id: None,
            metadata: None,
        }
    }
}

/// The body as it arrives; unknown fields are ignored. Fields whose shape needs a precise
/// error path are kept as raw JSON and checked by hand.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[schemars(rename = "CreateChatCompletionRequest")]
pub struct RawRequest {
    #[schemars(required)]
    model: Option<String>,
    #[schemars(required)]
    messages: Option<Vec<Value>>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    n: Option<i64>,
    stream: Option<bool>,
    stream_options: Option<RawStreamOptions>,
    stop: Option<Value>,
    seed: Option<i64>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    logit_bias: Option<BTreeMap<String, f64>>,
    user: Option<String>,
    metadata: Option<BTreeMap<String, Value>>,
    top_k: Option<i64>,
    min_p: Option<f64>,
    repetition_penalty: Option<f64>,
    ignore_eos: Option<bool>,
    max_ttft_ms: Option<i64>,
    reasoning_effort: Option<String>,
    logprobs: Option<bool>,
    top_logprobs: Option<i64>,
    tools: Option<Vec<Value>>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
    functions: Option<Value>,
    function_call: Option<Value>,
    response_format: Option<Value>,
    modalities: Option<Vec<String>>,
    audio: Option<Value>,
    prediction: Option<Value>,
    web_search_options: Option<Value>,
    service_tier: Option<String>,
    #[serde(flatten)]
    app: RawApp,
}

/// The application-platform fields, read the same way by both doors.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub(crate) struct RawApp {
    labels: Option<BTreeMap<String, Value>>,
    tags: Option<Vec<String>>,
    session_id: Option<String>,
    ab_campaign: Option<String>,
    system_prompt_args: Option<Value>,
    use_tools: Option<bool>,
    store: Option<bool>,
}

impl RawApp {
    /// The validated fields, and the labels (merged into `metadata` by the caller).
    pub(crate) fn validate(self) -> Result<(AppFields, BTreeMap<String, String>), ApiError> {
        let labels = parse_metadata("labels", self.labels)?;
        let app = AppFields {
            session_id: self
                .session_id
                .as_deref()
                .map(parse_session_id)
                .transpose()?,
            ab_campaign: match self.ab_campaign {
                Some(c) if c.is_empty() || c.len() > 128 => return Err(ApiError::invalid(
                    "ab_campaign",
                    "Invalid 'ab_campaign': expected a campaign id or key of 1 to 128 characters.",
                )),
                c => c,
            },
            tags: parse_tags(self.tags)?,
            system_prompt_args: match self.system_prompt_args {
                None | Some(Value::Null) => None,
                Some(Value::Object(m)) => Some(m),
                Some(_) => {
                    return Err(ApiError::malformed(
                        "Invalid type for 'system_prompt_args': expected an object.",
                        Some("system_prompt_args".into()),
                    ))
                }
            },
            use_tools: self.use_tools,
            tool_switches: Vec::new(),
            store: self.store.unwrap_or(false),
            tool_choice_given: false,
        };
        Ok((app, labels))
    }
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
struct RawStreamOptions {
    include_usage: Option<bool>,
}

/// Parses and validates a request body.
pub fn parse_chat_request(body: &[u8]) -> Result<ChatRequest, ApiError> {
    let value = parse_object(body)?;
    let extra: serde_json::Map<String, Value> = value
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| !KNOWN_FIELDS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut request = validate(deserialize(&value)?)?;
    request.extra = extra;
    Ok(request)
}

/// Decodes a JSON object body into `T`; wrong JSON or wrong types are 400s naming the path.
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    deserialize(&parse_object(body)?)
}

/// A body that must be a JSON object.
fn parse_object(body: &[u8]) -> Result<Value, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::malformed(
            format!("We could not parse the JSON body of your request: {e}. The body must be a JSON object."),
            None,
        )
    })?;
    if !value.is_object() {
        return Err(ApiError::malformed(
            "The request body must be a JSON object.",
            None,
        ));
    }
    Ok(value)
}

/// `T` from a JSON value; wrong types are 400s naming the path.
pub(crate) fn deserialize<T: serde::de::DeserializeOwned>(value: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        ApiError::malformed(
            format!("Invalid type for '{path}': {}", e.inner()),
            Some(path),
        )
    })
}

fn unsupported(param: &str, what: &str) -> ApiError {
    ApiError::Unsupported {
        message: format!("'{param}' {what} is not supported by this server yet."),
        param: param.to_owned(),
    }
}

fn range_f(param: &str, v: Option<f64>, lo: f64, hi: f64, default: f64) -> Result<f32, ApiError> {
    match v {
        None => Ok(default as f32),
        Some(x) if x.is_finite() && x >= lo && x <= hi => Ok(x as f32),
        Some(x) => Err(ApiError::invalid(
            param,
            format!("Invalid value for '{param}': {x} is not between {lo} and {hi}."),
        )),
    }
}

fn validate(raw: RawRequest) -> Result<ChatRequest, ApiError> {
    let model = match raw.model {
        Some(m) if !m.trim().is_empty() => m,
        _ => {
            return Err(ApiError::malformed(
                "Missing required parameter: 'model'.",
                Some("model".into()),
            ))
        }
    };
    let raw_messages = raw.messages.ok_or_else(|| {
        ApiError::malformed(
            "Missing required parameter: 'messages'.",
            Some("messages".into()),
        )
    })?;
    if raw_messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "Invalid 'messages': empty array. Expected an array with minimum length 1.",
        ));
    }
    let messages = raw_messages
        .iter()
        .enumerate()
        .map(|(i, m)| parse_message(i, m))
        .collect::<Result<Vec<_>, _>>()?;

    let limit = |param: &str, v: Option<i64>| -> Result<Option<u32>, ApiError> {
        match v {
            None => Ok(None),
            Some(x) if x >= 1 && x <= i64::from(u32::MAX) => Ok(Some(x as u32)),
            Some(x) => Err(ApiError::invalid(
                param,
                format!("Invalid '{param}': integer below minimum value. Expected a value >= 1, but got {x} instead."),
            )),
        }
    };
    let max_completion = limit("max_completion_tokens", raw.max_completion_tokens)?;
    let max_tokens = limit("max_tokens", raw.max_tokens)?;
    let n = match raw.n {
        None => 1,
        Some(x) if (1..=128).contains(&x) => x as u32,
        Some(x) => {
            return Err(ApiError::invalid(
                "n",
                format!("Invalid value for 'n': {x} is not between 1 and 128."),
            ))
        }
    };
    let stream = raw.stream.unwrap_or(false);
    if raw.stream_options.is_some() && !stream {
        return Err(ApiError::invalid(
            "stream_options",
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
        ));
    }
    let include_usage = raw
        .stream_options
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    let stop_given = !matches!(raw.stop, None | Some(Value::Null));
    let stop = parse_stop(raw.stop)?;
    let logit_bias = raw
        .logit_bias
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| {
            let id: u32 = k.parse().map_err(|_| {
                ApiError::invalid(
                    "logit_bias",
                    format!("Invalid key in 'logit_bias': '{k}' is not a token id."),
                )
            })?;
            if !(-100.0..=100.0).contains(&v) {
                return Err(ApiError::invalid(
                    "logit_bias",
                    format!("Invalid value in 'logit_bias' for token {id}: {v} is not between -100 and 100."),
                ));
            }
            Ok((id, v as f32))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(u) = &raw.user {
        if u.chars().count() > 512 {
            return Err(ApiError::invalid(
                "user",
                "Invalid 'user': string too long. Expected a string with maximum length 512.",
            ));
        }
    }
    let given = Given {
        temperature: raw.temperature.is_some(),
        top_p: raw.top_p.is_some(),
        max_tokens: raw.max_tokens.is_some() || raw.max_completion_tokens.is_some(),
        stop: stop_given,
        seed: raw.seed.is_some(),
        presence_penalty: raw.presence_penalty.is_some(),
        frequency_penalty: raw.frequency_penalty.is_some(),
        top_k: raw.top_k.is_some(),
        min_p: raw.min_p.is_some(),
        repetition_penalty: raw.repetition_penalty.is_some(),
        reasoning_effort: raw.reasoning_effort.is_some(),
        response_format: !matches!(raw.response_format, None | Some(Value::Null)),
        max_ttft_ms: raw.max_ttft_ms.is_some(),
    };
    let (app, labels) = raw.app.validate()?;
    let metadata = merge_labels(parse_metadata("metadata", raw.metadata)?, labels)?;
    let max_ttft_ms = match raw.max_ttft_ms {
        None => None,
        Some(ms) if (1..=600_000).contains(&ms) => Some(ms as u64),
        Some(ms) => {
            return Err(ApiError::invalid(
                "max_ttft_ms",
                format!(
                "Invalid value for 'max_ttft_ms': {ms}. Expected milliseconds from 1 to 600000."
            ),
            ))
        }
    };
    let top_k = match raw.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 && k <= i64::from(u32::MAX) => k as u32,
        Some(k) => {
            return Err(ApiError::invalid(
                "top_k",
                format!(
                    "Invalid value for 'top_k': {k}. Expected -1, 0 (off) or a positive integer."
                ),
            ))
        }
    };
    let repetition_penalty = match raw.repetition_penalty {
        None => 1.0,
        Some(p) if p.is_finite() && p > 0.0 && p <= 10.0 => p as f32,
        Some(p) => {
            return Err(ApiError::invalid(
                "repetition_penalty",
                format!(
                    "Invalid value for 'repetition_penalty': {p}. Expected a value in (0, 10]."
                ),
            ))
        }
    };
    let reasoning_effort = match raw.reasoning_effort.as_deref() {
        None => None,
        Some(s) => Some(
            serde_json::from_value::<ReasoningEffort>(Value::String(s.to_owned())).map_err(
                |_| {
                    ApiError::invalid(
                        "reasoning_effort",
                        format!("Invalid value for 'reasoning_effort': '{s}'. Supported values are: 'none', 'minimal', 'low', 'medium' and 'high'."),
                    )
                },
            )?,
        ),
    };

    // Known fields this server does not honour yet are refused, never silently dropped.
    if raw.top_logprobs.is_some() && raw.logprobs != Some(true) {
        return Err(ApiError::invalid(
            "top_logprobs",
            "'top_logprobs' is only allowed when 'logprobs' is true.",
        ));
    }
    let logprobs = match (raw.logprobs, raw.top_logprobs) {
        (Some(true), None) => Some(0),
        (Some(true), Some(k)) if (0..=20).contains(&k) => Some(k as u32),
        (Some(true), Some(k)) => {
            return Err(ApiError::invalid(
                "top_logprobs",
                format!("Invalid value for 'top_logprobs': {k} is not between 0 and 20."),
            ))
        }
        _ => None,
    };
    // `tools` holds function tools and, as parlance's extension, switches of a project's tools
    // (`{"id": ..., "enabled": ...}`, no `type`).
    let mut tools = Vec::new();
    let mut tool_switches = Vec::new();
    match &raw.tools {
        None => {}
        Some(t) if t.is_empty() => {
            return Err(ApiError::invalid(
                "tools",
                "Invalid 'tools': empty array. Expected an array with minimum length 1, or omit the parameter.",
            ))
        }
        Some(t) => {
            for (i, v) in t.iter().enumerate() {
                if v.get("type").is_none() && v.get("id").is_some() {
                    tool_switches.push(parse_tool_switch(i, v)?);
                } else {
                    tools.push(parse_tool(i, v)?);
                }
            }
        }
    }
    let mut tool_choice_given = !matches!(raw.tool_choice, None | Some(Value::Null));
    let mut tool_choice = match &raw.tool_choice {
        None | Some(Value::Null) if tools.is_empty() => ToolChoice::None,
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(c) => parse_tool_choice(c)?,
    };
    let mut parallel_tool_calls = raw.parallel_tool_calls.unwrap_or(true);
    // Legacy function calling: `functions` and `function_call` are `tools` and `tool_choice`
    // in their older shape, with one call per answer.
    let functions = raw.functions.as_ref().filter(|v| !v.is_null());
    let function_call = raw.function_call.as_ref().filter(|v| !v.is_null());
    let legacy_functions = functions.is_some() || function_call.is_some();
    if legacy_functions {
        if raw.tools.is_some() {
            return Err(ApiError::invalid(
                if functions.is_some() { "functions" } else { "function_call" },
                "'functions' and 'function_call' are deprecated forms of 'tools' and 'tool_choice'; use one form or the other, not both.",
            ));
        }
        if tool_choice_given {
            return Err(ApiError::invalid(
                "tool_choice",
                "'tool_choice' cannot be combined with 'functions'; use 'function_call'.",
            ));
        }
        tools = parse_functions(functions)?;
        tool_choice = match function_call {
            None if tools.is_empty() => ToolChoice::None,
            None => ToolChoice::Auto,
            Some(c) => parse_function_call(c)?,
        };
        if let (ToolChoice::Named(name), false) = (&tool_choice, tools.is_empty()) {
            if !tools.iter().any(|t| &t.name == name) {
                return Err(ApiError::invalid(
                    "function_call",
                    format!("Invalid 'function_call': no function named '{name}' in 'functions'."),
                ));
            }
        }
        if tools.is_empty() {
            return Err(ApiError::invalid(
                "function_call",
                "'function_call' is only allowed when 'functions' are specified.",
            ));
        }
        tool_choice_given = function_call.is_some();
        parallel_tool_calls = false;
    }
    let response_format = match &raw.response_format {
        None | Some(Value::Null) => None,
        Some(rf) => parse_response_format(rf)?,
    };
    if let Some(m) = &raw.modalities {
        if m.iter().any(|x| x != "text") {
            return Err(unsupported("modalities", "(only 'text' output)"));
        }
    }
    if raw.audio.is_some() {
        return Err(unsupported("audio", "(audio output)"));
    }
    if raw.prediction.is_some() {
        return Err(unsupported("prediction", "(predicted outputs)"));
    }
    if raw.web_search_options.is_some() {
        return Err(unsupported("web_search_options", "(web search)"));
    }
    if let Some(t) = raw.service_tier.as_deref() {
        if !matches!(t, "auto" | "default") {
            return Err(ApiError::invalid(
                "service_tier",
                format!("Invalid value for 'service_tier': '{t}'. This server offers 'auto' and 'default'."),
            ));
        }
    }

    Ok(ChatRequest {
        model,
        messages,
        max_tokens: max_completion.or(max_tokens),
        temperature: range_f("temperature", raw.temperature, 0.0, 2.0, 1.0)?,
        top_p: range_f("top_p", raw.top_p, 0.0, 1.0, 1.0)?,
        n,
        stream,
        include_usage,
        stop,
        seed: raw.seed.map(|s| s as u64),
        presence_penalty: range_f("presence_penalty", raw.presence_penalty, -2.0, 2.0, 0.0)?,
        frequency_penalty: range_f("frequency_penalty", raw.frequency_penalty, -2.0, 2.0, 0.0)?,
        logit_bias,
        user: raw.user,
        metadata,
        top_k,
        min_p: range_f("min_p", raw.min_p, 0.0, 1.0, 0.0)?,
        repetition_penalty,
        ignore_eos: raw.ignore_eos.unwrap_or(false),
        reasoning_effort,
        logprobs,
        response_format,
        tools,
        tool_choice,
        parallel_tool_calls,
        legacy_functions,
        max_ttft_ms,
        extra: serde_json::Map::new(),
        app: AppFields {
            tool_switches,
            tool_choice_given,
            ..app
        },
        given,
    })
}

/// A session id: a UUID, any case, with or without hyphens; kept lower-case and hyphenated.
pub fn parse_session_id(s: &str) -> Result<String, ApiError> {
    uuid::Uuid::parse_str(s)
        .map(|u| u.hyphenated().to_string())
        .map_err(|_| {
            ApiError::invalid(
                "session_id",
                format!("Invalid 'session_id': '{s}' is not a UUID."),
            )
        })
}

fn parse_tags(v: Option<Vec<String>>) -> Result<Vec<String>, ApiError> {
    let tags = v.unwrap_or_default();
    if tags.len() > 32 {
        return Err(ApiError::invalid(
            "tags",
            format!(
                "Invalid 'tags': {} tags; at most 32 are allowed.",
                tags.len()
            ),
        ));
    }
    let mut out: Vec<String> = Vec::with_capacity(tags.len());
    for (i, t) in tags.into_iter().enumerate() {
        if t.is_empty() || t.chars().count() > 64 {
            return Err(ApiError::invalid(
                format!("tags[{i}]"),
                format!("Invalid 'tags[{i}]': a tag is 1 to 64 characters."),
            ));
        }
        if !out.contains(&t) {
            out.push(t);
        }
    }
    Ok(out)
}

/// `labels` is an alias of `metadata`: both may be given if they agree.
pub(crate) fn merge_labels(
    mut metadata: BTreeMap<String, String>,
    labels: BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, ApiError> {
    for (k, v) in labels {
        match metadata.get(&k) {
            Some(old) if old != &v => {
                return Err(ApiError::invalid(
                    format!("labels.{k}"),
                    format!("'labels' is an alias of 'metadata', and they disagree on '{k}'."),
                ))
            }
            _ => {
                metadata.insert(k, v);
            }
        }
    }
    if metadata.len() > 16 {
        return Err(ApiError::invalid(
            "metadata",
            "Invalid 'metadata': too many properties. Expected an object with at most 16 properties.",
        ));
    }
    Ok(metadata)
}

/// Names of functions and schemas: 1 to 64 of a-z, A-Z, 0-9, `_`, `-`.
pub fn valid_function_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn parse_tool(i: usize, v: &Value) -> Result<Tool, ApiError> {
    let at = |f: &str| format!("tools[{i}].{f}");
    if v.get("type").and_then(Value::as_str) != Some("function") {
        return Err(ApiError::invalid(
            at("type"),
            format!(
                "Invalid value for '{}': only 'function' tools are supported.",
                at("type")
            ),
        ));
    }
    let f = v.get("function").filter(|f| f.is_object()).ok_or_else(|| {
        ApiError::malformed(
            format!("Missing required parameter: '{}'.", at("function")),
            Some(at("function")),
        )
    })?;
    parse_function(&at("function"), f)
}

/// A function definition (`tools[i].function`, or `functions[i]` of the legacy shape); `at`
/// names it in errors.
fn parse_function(at: &str, f: &Value) -> Result<Tool, ApiError> {
    let at = |field: &str| format!("{at}.{field}");
    if !f.is_object() {
        return Err(ApiError::malformed(
            format!("Invalid type for '{}': expected an object.", at("")),
            Some(at("").trim_end_matches('.').to_owned()),
        ));
    }
    let name = f.get("name").and_then(Value::as_str).ok_or_else(|| {
        ApiError::malformed(
            format!("Missing required parameter: '{}'.", at("name")),
            Some(at("name")),
        )
    })?;
    if !valid_function_name(name) {
        return Err(ApiError::invalid(
            at("name"),
            format!("Invalid '{}': '{name}' must be 1 to 64 characters among a-z, A-Z, 0-9, '_' and '-'.", at("name")),
        ));
    }
    let parameters = match f.get("parameters") {
        None | Some(Value::Null) => serde_json::json!({"type": "object", "properties": {}}),
        Some(p) if p.is_object() => p.clone(),
        Some(_) => {
            return Err(ApiError::malformed(
                format!(
                    "Invalid type for '{}': expected an object.",
                    at("parameters")
                ),
                Some(at("parameters")),
            ))
        }
    };
    Ok(Tool {
        name: name.to_owned(),
        description: f
            .get("description")
            .and_then(Value::as_str)
            .map(str::to_owned),
        parameters,
        strict: f.get("strict").and_then(Value::as_bool).unwrap_or(false),
    })
}

/// The legacy `functions`: 1 to 128 function definitions.
fn parse_functions(functions: Option<&Value>) -> Result<Vec<Tool>, ApiError> {
    let Some(v) = functions else {
        return Ok(Vec::new());
    };
    let list = v.as_array().ok_or_else(|| {
        ApiError::malformed(
            "Invalid type for 'functions': expected an array of function definitions.",
            Some("functions".into()),
        )
    })?;
    if list.is_empty() || list.len() > 128 {
        return Err(ApiError::invalid(
            "functions",
            format!(
                "Invalid 'functions': {} functions; expected between 1 and 128.",
                list.len()
            ),
        ));
    }
    let mut tools: Vec<Tool> = Vec::with_capacity(list.len());
    for (i, f) in list.iter().enumerate() {
        let t = parse_function(&format!("functions[{i}]"), f)?;
        if tools.iter().any(|o| o.name == t.name) {
            return Err(ApiError::invalid(
                format!("functions[{i}].name"),
                format!("Invalid 'functions': '{}' is defined twice.", t.name),
            ));
        }
        tools.push(t);
    }
    Ok(tools)
}

/// The legacy `function_call`: `"none"`, `"auto"` or `{"name": ...}`.
fn parse_function_call(c: &Value) -> Result<ToolChoice, ApiError> {
    let bad = || {
        ApiError::invalid(
            "function_call",
            "Invalid 'function_call': expected 'none', 'auto' or {\"name\": ...}.",
        )
    };
    match c {
        Value::String(s) if s == "none" => Ok(ToolChoice::None),
        Value::String(s) if s == "auto" => Ok(ToolChoice::Auto),
        Value::Object(o) => o
            .get("name")
            .and_then(Value::as_str)
            .map(|n| ToolChoice::Named(n.to_owned()))
            .ok_or_else(bad),
        _ => Err(bad()),
    }
}

/// The id parlance gives a call written in the legacy shape (`function_call` in an assistant
/// message, answered by a `function` message that names the function, not the call).
pub fn legacy_call_id(name: &str) -> String {
    format!("call_fn_{name}")
}

/// `tool_choice`'s shape; whether a named function is offered is checked by
/// [`ChatRequest::check_tool_choice`] once a project's tools are known.
fn parse_tool_choice(c: &Value) -> Result<ToolChoice, ApiError> {
    let bad = || {
        ApiError::invalid(
            "tool_choice",
            "Invalid 'tool_choice': expected 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": {\"name\": ...}}.",
        )
    };
    match c {
        Value::String(s) => match s.as_str() {
            "none" => Ok(ToolChoice::None),
            "auto" => Ok(ToolChoice::Auto),
            "required" => Ok(ToolChoice::Required),
            _ => Err(bad()),
        },
        Value::Object(o) => {
            if o.get("type").and_then(Value::as_str) != Some("function") {
                return Err(bad());
            }
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(bad)?;
            Ok(ToolChoice::Named(name.to_owned()))
        }
        _ => Err(bad()),
    }
}

/// `{"id": "...", "enabled": bool}`: a project tool switched on or off.
fn parse_tool_switch(i: usize, v: &Value) -> Result<(String, bool), ApiError> {
    let at = |f: &str| format!("tools[{i}].{f}");
    let id = v.get("id").and_then(Value::as_str).ok_or_else(|| {
        ApiError::malformed(
            format!("Invalid type for '{}': expected a string.", at("id")),
            Some(at("id")),
        )
    })?;
    let enabled = match v.get("enabled") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(ApiError::malformed(
                format!("Invalid type for '{}': expected a boolean.", at("enabled")),
                Some(at("enabled")),
            ))
        }
    };
    if let Some(k) = v
        .as_object()
        .and_then(|o| o.keys().find(|k| !matches!(k.as_str(), "id" | "enabled")))
    {
        return Err(ApiError::invalid(
            at(k),
            format!("Invalid '{}': a tool switch is {{\"id\", \"enabled\"}}; function tools need \"type\": \"function\".", at(k)),
        ));
    }
    Ok((id.to_owned(), enabled))
}

fn parse_response_format(rf: &Value) -> Result<Option<ResponseFormat>, ApiError> {
    match rf.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(ResponseFormat::JsonObject)),
        Some("json_schema") => {
            let js = rf
                .get("json_schema")
                .filter(|v| v.is_object())
                .ok_or_else(|| {
                    ApiError::malformed(
                        "Missing required parameter: 'response_format.json_schema'.",
                        Some("response_format.json_schema".into()),
                    )
                })?;
            let name = js.get("name").and_then(Value::as_str).ok_or_else(|| {
                ApiError::malformed(
                    "Missing required parameter: 'response_format.json_schema.name'.",
                    Some("response_format.json_schema.name".into()),
                )
            })?;
            if !valid_function_name(name) {
                return Err(ApiError::invalid(
                    "response_format.json_schema.name",
                    "Invalid 'response_format.json_schema.name': use 1 to 64 characters among a-z, A-Z, 0-9, '_' and '-'.",
                ));
            }
            let schema = match js.get("schema") {
                None => serde_json::json!({}),
                Some(s) if s.is_object() => s.clone(),
                Some(_) => return Err(ApiError::malformed(
                    "Invalid type for 'response_format.json_schema.schema': expected an object.",
                    Some("response_format.json_schema.schema".into()),
                )),
            };
            let strict = js.get("strict").and_then(Value::as_bool).unwrap_or(false);
            Ok(Some(ResponseFormat::JsonSchema {
                name: name.to_owned(),
                schema,
                strict,
            }))
        }
        _ => Err(ApiError::invalid(
            "response_format.type",
            "Invalid 'response_format.type': expected one of 'text', 'json_object', 'json_schema'.",
        )),
    }
}

fn parse_stop(v: Option<Value>) -> Result<Vec<String>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s]),
        Some(Value::Array(items)) => {
            if items.len() > 4 {
                return Err(ApiError::invalid(
                    "stop",
                    format!("Invalid 'stop': array too long. Expected an array with maximum length 4, but got an array with length {} instead.", items.len()),
                ));
            }
            items
                .into_iter()
                .enumerate()
                .map(|(i, x)| match x {
                    Value::String(s) => Ok(s),
                    _ => Err(ApiError::malformed(
                        format!("Invalid type for 'stop[{i}]': expected a string."),
                        Some(format!("stop[{i}]")),
                    )),
                })
                .collect()
        }
        Some(_) => Err(ApiError::malformed(
            "Invalid type for 'stop': expected a string, an array of strings, or null.",
            Some("stop".into()),
        )),
    }
}

fn parse_metadata(
    field: &str,
    v: Option<BTreeMap<String, Value>>,
) -> Result<BTreeMap<String, String>, ApiError> {
    let Some(map) = v else {
        return Ok(BTreeMap::new());
    };
    if map.len() > 16 {
        return Err(ApiError::invalid(
            field,
            format!("Invalid '{field}': too many properties. Expected an object with at most 16 properties."),
        ));
    }
    map.into_iter()
        .map(|(k, v)| {
            if k.chars().count() > 64 {
                return Err(ApiError::invalid(
                    field,
                    format!("Invalid '{field}': key '{k}' is longer than 64 characters."),
                ));
            }
            match v {
                Value::String(s) if s.chars().count() <= 512 => Ok((k, s)),
                Value::String(_) => Err(ApiError::invalid(
                    format!("{field}.{k}"),
                    format!("Invalid '{field}.{k}': string longer than 512 characters."),
                )),
                _ => Err(ApiError::malformed(
                    format!("Invalid type for '{field}.{k}': expected a string."),
                    Some(format!("{field}.{k}")),
                )),
            }
        })
        .collect()
}

/// One message of a request (`messages[i]`), also used to read a stored session's history.
pub fn parse_message(i: usize, m: &Value) -> Result<Message, ApiError> {
    let at = |field: &str| format!("messages[{i}].{field}");
    let obj = m.as_object().ok_or_else(|| {
        ApiError::malformed(
            format!("Invalid type for 'messages[{i}]': expected an object."),
            Some(format!("messages[{i}]")),
        )
    })?;
    let role = match obj.get("role").and_then(Value::as_str) {
        Some("system") => Role::System,
        Some("developer") => Role::Developer,
        Some("user") => Role::User,
        Some("assistant") => Role::Assistant,
        Some("tool") => Role::Tool,
        // The legacy answer to a `function_call`: a tool result that names the function.
        Some("function") => Role::Tool,
        Some(other) => {
            return Err(ApiError::invalid(
                at("role"),
                format!("Invalid value for '{}': '{other}'. Supported values are: 'system', 'developer', 'user', 'assistant' and 'tool'.", at("role")),
            ))
        }
        None => {
            return Err(ApiError::malformed(
                format!("Missing required parameter: '{}'.", at("role")),
                Some(at("role")),
            ))
        }
    };
    let content = match obj.get("content") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, part) in parts.iter().enumerate() {
                let kind = part.get("type").and_then(Value::as_str);
                let allowed = match role {
                    Role::Assistant => matches!(kind, Some("text") | Some("refusal")),
                    _ => kind == Some("text"),
                };
                let p = format!("messages[{i}].content[{j}].type");
                match kind {
                    None => {
                        return Err(ApiError::malformed(
                            format!("Missing required parameter: '{p}'."),
                            Some(p),
                        ))
                    }
                    Some(k) if !allowed => {
                        return Err(ApiError::Unsupported {
                            message: format!("Invalid value for '{p}': content parts of type '{k}' are not supported by this server for role '{}'.", role_name(role)),
                            param: p,
                        })
                    }
                    Some(k) => {
                        let field = if k == "refusal" { "refusal" } else { "text" };
                        let t = part.get(field).and_then(Value::as_str).ok_or_else(|| {
                            let p = format!("messages[{i}].content[{j}].{field}");
                            ApiError::malformed(
                                format!("Missing required parameter: '{p}'."),
                                Some(p),
                            )
                        })?;
                        text.push_str(t);
                    }
                }
            }
            Some(text)
        }
        Some(_) => {
            return Err(ApiError::malformed(
                format!(
                    "Invalid type for '{}': expected a string or an array of content parts.",
                    at("content")
                ),
                Some(at("content")),
            ))
        }
    };
    let legacy_role = obj.get("role").and_then(Value::as_str) == Some("function");
    let mut tool_calls = obj.get("tool_calls").filter(|v| !v.is_null()).cloned();
    if let Some(fc) = obj.get("function_call").filter(|v| !v.is_null()) {
        // The legacy shape of one call: kept as a tool call with an id derived from its name.
        if role != Role::Assistant || tool_calls.is_some() {
            return Err(ApiError::invalid(
                at("function_call"),
                "Only assistant messages may carry 'function_call', and not together with 'tool_calls'.",
            ));
        }
        let name = fc.get("name").and_then(Value::as_str).ok_or_else(|| {
            ApiError::malformed(
                format!(
                    "Missing required parameter: '{}.name'.",
                    at("function_call")
                ),
                Some(format!("{}.name", at("function_call"))),
            )
        })?;
        let arguments = fc.get("arguments").and_then(Value::as_str).ok_or_else(|| {
            ApiError::malformed(
                format!(
                    "Missing required parameter: '{}.arguments'.",
                    at("function_call")
                ),
                Some(format!("{}.arguments", at("function_call"))),
            )
        })?;
        tool_calls = Some(serde_json::json!([{
            "id": legacy_call_id(name),
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }]));
    }
    if tool_calls.is_some() && role != Role::Assistant {
        return Err(ApiError::invalid(
            at("tool_calls"),
            "Only assistant messages may carry 'tool_calls'.",
        ));
    }
    if let Some(tc) = &tool_calls {
        if !tc.is_array() {
            return Err(ApiError::malformed(
                format!(
                    "Invalid type for '{}': expected an array.",
                    at("tool_calls")
                ),
                Some(at("tool_calls")),
            ));
        }
    }
    // A legacy `function` result may be null: an empty result.
    let content = if legacy_role {
        Some(content.unwrap_or_default())
    } else {
        content
    };
    if content.is_none() && !(role == Role::Assistant && tool_calls.is_some()) {
        return Err(ApiError::malformed(
            format!("Missing required parameter: '{}'.", at("content")),
            Some(at("content")),
        ));
    }
    let mut tool_call_id = obj
        .get("tool_call_id")
        .and_then(Value::as_str)
        .map(str::to_owned);
    if legacy_role {
        let name = obj.get("name").and_then(Value::as_str).ok_or_else(|| {
            ApiError::malformed(
                format!("Missing required parameter: '{}'.", at("name")),
                Some(at("name")),
            )
        })?;
        tool_call_id = Some(legacy_call_id(name));
    }
    if role == Role::Tool && tool_call_id.is_none() {
        return Err(ApiError::malformed(
            format!("Missing required parameter: '{}'.", at("tool_call_id")),
            Some(at("tool_call_id")),
        ));
    }
    let name = match obj.get("name") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            return Err(ApiError::malformed(
                format!("Invalid type for '{}': expected a string.", at("name")),
                Some(at("name")),
            ))
        }
    };
    let completion_id = match obj.get("completion_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            return Err(ApiError::malformed(
                format!(
                    "Invalid type for '{}': expected a string.",
                    at("completion_id")
                ),
                Some(at("completion_id")),
            ))
        }
    };
    let metadata = obj.get("metadata").filter(|v| !v.is_null()).cloned();
    Ok(Message {
        role,
        content,
        name,
        tool_calls,
        tool_call_id,
        completion_id,
        metadata,
    })
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::System => "system",
        Role::Developer => "developer",
        Role::User => "user",
        Role::Assistant => "assistant",
        Role::Tool => "tool",
    }
}

/// Why a choice ended, on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// Natural end or stop string.
    Stop,
    /// Token limit or context length.
    Length,
    /// The model called tools.
    ToolCalls,
    /// Content was filtered.
    ContentFilter,
    /// The model called a function (legacy `functions`; the same end as `tool_calls`).
    FunctionCall,
}

/// `usage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default, schemars::JsonSchema)]
pub struct Usage {
    /// Templated prompt tokens.
    pub prompt_tokens: u32,
    /// Generated tokens over all choices.
    pub completion_tokens: u32,
    /// The sum.
    pub total_tokens: u32,
    /// Prompt details.
    pub prompt_tokens_details: PromptTokensDetails,
    /// Completion details.
    pub completion_tokens_details: CompletionTokensDetails,
}

impl Usage {
    /// The same usage, with this many of the completion tokens spent thinking.
    pub fn with_reasoning(mut self, reasoning_tokens: u32) -> Self {
        self.completion_tokens_details.reasoning_tokens =
            reasoning_tokens.min(self.completion_tokens);
        self
    }

    /// Usage from the three counts.
    pub fn new(prompt_tokens: u32, cached_tokens: u32, completion_tokens: u32) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens,
                audio_tokens: 0,
            },
            completion_tokens_details: CompletionTokensDetails::default(),
        }
    }
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default, schemars::JsonSchema)]
pub struct PromptTokensDetails {
    /// Prompt tokens reused from a cache.
    pub cached_tokens: u32,
    /// Always 0 here.
    pub audio_tokens: u32,
}

/// `usage.completion_tokens_details`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default, schemars::JsonSchema)]
pub struct CompletionTokensDetails {
    /// Tokens spent thinking.
    pub reasoning_tokens: u32,
    /// Always 0 here.
    pub audio_tokens: u32,
    /// Always 0 here.
    pub accepted_prediction_tokens: u32,
    /// Always 0 here.
    pub rejected_prediction_tokens: u32,
}

/// A complete (non-streamed) response.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct ChatCompletion {
    /// `chatcmpl-…`.
    pub id: String,
    /// Always `chat.completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The model name as requested.
    pub model: String,
    /// The choices, by index.
    pub choices: Vec<Choice>,
    /// Token counts.
    pub usage: Usage,
    /// Identifies the model file and build.
    pub system_fingerprint: String,
    /// The tier that served the request.
    pub service_tier: &'static str,
    /// parlance: the server-side session this turn belongs to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
}

/// One choice.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct Choice {
    /// 0..n−1.
    pub index: u32,
    /// The answer.
    pub message: AssistantMessage,
    /// Token log probabilities, or null when not asked for.
    pub logprobs: Option<ChoiceLogprobs>,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// parlance: this choice's id, for feedback and sessions (a UUID).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_id: Option<String>,
}

/// `logprobs` of a choice or a chunk.
#[derive(Debug, Clone, Default, Serialize, schemars::JsonSchema)]
pub struct ChoiceLogprobs {
    /// One entry per content token.
    pub content: Vec<TokenLogprob>,
    /// Always null here.
    pub refusal: Option<Vec<TokenLogprob>>,
}

/// One token's log probability.
#[derive(Debug, Clone, PartialEq, Serialize, schemars::JsonSchema)]
pub struct TokenLogprob {
    /// The token's text (lossy where it is part of a UTF-8 character).
    pub token: String,
    /// Natural log of its probability.
    pub logprob: f32,
    /// Its UTF-8 bytes.
    pub bytes: Vec<u8>,
    /// The most likely tokens at this position.
    pub top_logprobs: Vec<TopLogprob>,
}

/// One alternative in `top_logprobs`.
#[derive(Debug, Clone, PartialEq, Serialize, schemars::JsonSchema)]
pub struct TopLogprob {
    /// The token's text.
    pub token: String,
    /// Natural log of its probability.
    pub logprob: f32,
    /// Its UTF-8 bytes.
    pub bytes: Vec<u8>,
}

/// The assistant's message.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct AssistantMessage {
    /// parlance: the message's id (as kept in a session's history).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Always `assistant`.
    pub role: &'static str,
    /// The text.
    pub content: Option<String>,
    /// A refusal, or null.
    pub refusal: Option<String>,
    /// Calls the model made.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// The call the model made, for a request that used the legacy `functions`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub function_call: Option<FunctionCall>,
    /// What the model thought before answering, when it thinks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
}

/// One call in `message.tool_calls`.
#[derive(Debug, Clone, PartialEq, Serialize, schemars::JsonSchema)]
pub struct ToolCall {
    /// `call_…`.
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Which function, with what.
    pub function: FunctionCall,
}

/// The function part of a call.
#[derive(Debug, Clone, PartialEq, Serialize, schemars::JsonSchema)]
pub struct FunctionCall {
    /// The function.
    pub name: String,
    /// Its arguments, as a JSON string.
    pub arguments: String,
}

/// A streamed fragment of a tool call.
#[derive(Debug, Clone, PartialEq, Serialize, schemars::JsonSchema)]
pub struct ToolCallDelta {
    /// Which call of the choice.
    pub index: u32,
    /// On the first fragment only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// On the first fragment only.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    /// Name (first fragment) and an arguments fragment.
    pub function: FunctionDelta,
}

/// The function part of a streamed fragment.
#[derive(Debug, Clone, PartialEq, Serialize, schemars::JsonSchema)]
pub struct FunctionDelta {
    /// On the first fragment only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// A piece of the arguments (`""` on the first fragment).
    pub arguments: String,
}

/// One streamed chunk.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct ChatCompletionChunk {
    /// Same for every chunk of the stream.
    pub id: String,
    /// Always `chat.completion.chunk`.
    pub object: &'static str,
    /// Same for every chunk.
    pub created: u64,
    /// Same for every chunk.
    pub model: String,
    /// Identifies the model file and build.
    pub system_fingerprint: String,
    /// The tier that served the request.
    pub service_tier: &'static str,
    /// Choice deltas; empty in the usage chunk.
    pub choices: Vec<ChunkChoice>,
    /// Present only when usage was asked for: null on every chunk but the last.
    #[serde(skip_serializing_if = "UsageField::is_absent")]
    pub usage: UsageField,
    /// parlance: the server-side session this turn belongs to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
}

/// The `usage` field of a chunk: absent, null, or set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageField {
    /// Not asked for: the field does not appear.
    Absent,
    /// Asked for, not yet known: `null`.
    Null,
    /// The final counts.
    Set(Usage),
}

impl UsageField {
    fn is_absent(&self) -> bool {
        matches!(self, UsageField::Absent)
    }
}

impl Serialize for UsageField {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            UsageField::Absent | UsageField::Null => s.serialize_none(),
            UsageField::Set(u) => u.serialize(s),
        }
    }
}

impl schemars::JsonSchema for UsageField {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ChunkUsage".into()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        // `null` until the last chunk, which carries the counts.
        <Option<Usage>>::json_schema(generator)
    }
}

/// A choice in a chunk.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct ChunkChoice {
    /// Which choice.
    pub index: u32,
    /// What is new.
    pub delta: Delta,
    /// Log probabilities of the tokens of this delta, or null.
    pub logprobs: Option<ChoiceLogprobs>,
    /// Set on the choice's last chunk only.
    pub finish_reason: Option<FinishReason>,
    /// parlance: the choice's id, on its first chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_id: Option<String>,
}

/// What a chunk adds.
#[derive(Debug, Clone, Default, Serialize, schemars::JsonSchema)]
pub struct Delta {
    /// `assistant` on the first chunk of each choice only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// New text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Tool-call fragments.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
    /// A fragment of the function call (requests that used the legacy `functions`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub function_call: Option<FunctionDelta>,
    /// New reasoning text (models that think before they answer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Parsed and checked as the platform does for a request without a project.
    fn parse(v: Value) -> Result<ChatRequest, ApiError> {
        let r = parse_chat_request(v.to_string().as_bytes())?;
        r.check_tool_choice()?;
        Ok(r)
    }

    fn base() -> Value {
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    }

    fn with(field: &str, value: Value) -> Value {
        let mut b = base();
        b[field] = value;
        b
    }

    fn err(v: Value) -> ApiError {
        match parse(v) {
            Err(e) => e,
            Ok(r) => ApiError::malformed(format!("unexpectedly valid: {r:?}"), None),
        }
    }

    #[test]
    fn legacy_functions_become_tools_and_answer_in_their_shape() {
        let f = json!([{"name": "get_weather", "parameters": {"type": "object"}}]);
        let mut b = with("functions", f.clone());
        b["function_call"] = json!({"name": "get_weather"});
        let r = parse(b).unwrap();
        assert!(r.legacy_functions);
        assert_eq!(r.tools.len(), 1);
        assert_eq!(r.tool_choice, ToolChoice::Named("get_weather".into()));
        assert!(
            !r.parallel_tool_calls,
            "the legacy shape has one call per answer"
        );
        let r = parse(with("functions", f.clone())).unwrap();
        assert_eq!(r.tool_choice, ToolChoice::Auto);
        let mut b = with("functions", f.clone());
        b["function_call"] = json!("none");
        assert_eq!(parse(b).unwrap().tool_choice, ToolChoice::None);
        // Plain tools are not legacy.
        let t = json!([{"type": "function", "function": {"name": "a"}}]);
        assert!(!parse(with("tools", t.clone())).unwrap().legacy_functions);
        // Mixing the forms, bad values.
        let mut b = with("functions", f.clone());
        b["tools"] = t;
        assert_eq!(err(b).param().as_deref(), Some("functions"));
        let mut b = with("functions", f.clone());
        b["function_call"] = json!("required");
        assert_eq!(err(b).param().as_deref(), Some("function_call"));
        assert_eq!(
            err(with("function_call", json!("auto"))).param().as_deref(),
            Some("function_call")
        );
        assert_eq!(
            err(with("functions", json!([]))).param().as_deref(),
            Some("functions")
        );
        assert_eq!(
            err(with("functions", json!([{"name": "a"}, {"name": "a"}])))
                .param()
                .as_deref(),
            Some("functions[1].name")
        );
    }

    #[test]
    fn legacy_history_messages_pair_call_and_result() {
        let call = parse_message(
            0,
            &json!({"role": "assistant", "content": null,
                    "function_call": {"name": "get_weather", "arguments": "{\"city\":\"Rome\"}"}}),
        )
        .unwrap();
        let calls = call.tool_calls.unwrap();
        assert_eq!(calls[0]["id"], json!(legacy_call_id("get_weather")));
        assert_eq!(
            calls[0]["function"]["arguments"],
            json!("{\"city\":\"Rome\"}")
        );
        let result = parse_message(
            1,
            &json!({"role": "function", "name": "get_weather", "content": "Sunny"}),
        )
        .unwrap();
        assert_eq!(result.role, Role::Tool);
        assert_eq!(result.tool_call_id, Some(legacy_call_id("get_weather")));
        assert_eq!(result.content.as_deref(), Some("Sunny"));
        // A function result must name its function; a user cannot carry a call.
        let e = parse_message(2, &json!({"role": "function", "content": "x"})).unwrap_err();
        assert_eq!(e.param().as_deref(), Some("messages[2].name"));
        let e = parse_message(
            3,
            &json!({"role": "user", "content": "x", "function_call": {"name": "a", "arguments": "{}"}}),
        )
        .unwrap_err();
        assert_eq!(e.param().as_deref(), Some("messages[3].function_call"));
    }

    #[test]
    fn defaults_are_openais() {
        let r = parse(base()).map_err(|e| e.to_string());
        let r = r
            .as_ref()
            .map(|r| (r.temperature, r.top_p, r.n, r.stream, r.max_tokens));
        assert_eq!(r, Ok((1.0, 1.0, 1, false, None)));
    }

    #[test]
    fn max_completion_tokens_wins() {
        let mut b = base();
        b["max_tokens"] = json!(10);
        b["max_completion_tokens"] = json!(5);
        assert_eq!(parse(b).ok().and_then(|r| r.max_tokens), Some(5));
        assert_eq!(
            parse(with("max_tokens", json!(7)))
                .ok()
                .and_then(|r| r.max_tokens),
            Some(7)
        );
    }

    #[test]
    fn stop_forms() {
        assert_eq!(
            parse(with("stop", json!("x"))).ok().map(|r| r.stop),
            Some(vec!["x".into()])
        );
        assert_eq!(
            parse(with("stop", Value::Null)).ok().map(|r| r.stop),
            Some(vec![])
        );
        let e = err(with("stop", json!(["a", "b", "c", "d", "e"])));
        assert_eq!(e.param().as_deref(), Some("stop"));
        assert_eq!(e.status(Default::default()), 400);
        assert_eq!(err(with("stop", json!(3))).param().as_deref(), Some("stop"));
    }

    #[test]
    fn ranges_refused_with_param() {
        for (f, v) in [
            ("temperature", json!(2.5)),
            ("top_p", json!(-0.1)),
            ("n", json!(0)),
            ("n", json!(129)),
            ("presence_penalty", json!(3)),
            ("frequency_penalty", json!(-3)),
            ("max_tokens", json!(0)),
            ("min_p", json!(1.5)),
            ("repetition_penalty", json!(0)),
            ("top_k", json!(-2)),
            ("reasoning_effort", json!("extreme")),
        ] {
            let e = err(with(f, v));
            assert_eq!(e.param().as_deref(), Some(f), "{f}");
            assert_eq!(e.code(), Some("invalid_value"), "{f}");
        }
    }

    #[test]
    fn wrong_types_name_the_path() {
        let e = err(with("temperature", json!("hot")));
        assert_eq!(e.param().as_deref(), Some("temperature"));
        let e = err(json!({"model": "m", "messages": [{"role": "user", "content": 5}]}));
        assert_eq!(e.param().as_deref(), Some("messages[0].content"));
        let e = err(json!({"model": 1, "messages": []}));
        assert_eq!(e.param().as_deref(), Some("model"));
    }

    #[test]
    fn malformed_json_is_400_without_param() {
        let e = parse_chat_request(b"{not json").err();
        assert_eq!(e.as_ref().map(|e| e.status(Default::default())), Some(400));
        assert_eq!(e.and_then(|e| e.param()), None);
        assert!(parse_chat_request(b"[1]").is_err());
    }

    #[test]
    fn logit_bias_validated() {
        assert_eq!(
            parse(with("logit_bias", json!({"42": -100})))
                .ok()
                .map(|r| r.logit_bias),
            Some(vec![(42, -100.0)])
        );
        assert_eq!(
            err(with("logit_bias", json!({"x": 1}))).param().as_deref(),
            Some("logit_bias")
        );
        assert_eq!(
            err(with("logit_bias", json!({"1": 101})))
                .param()
                .as_deref(),
            Some("logit_bias")
        );
    }

    #[test]
    fn stream_options_require_stream() {
        let e = err(with("stream_options", json!({"include_usage": true})));
        assert_eq!(e.param().as_deref(), Some("stream_options"));
        let mut b = with("stream", json!(true));
        b["stream_options"] = json!({"include_usage": true});
        assert_eq!(parse(b).ok().map(|r| r.include_usage), Some(true));
    }

    #[test]
    fn content_parts() {
        let r = parse(
            json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}),
        );
        assert_eq!(
            r.ok().and_then(|r| r.messages[0].content.clone()),
            Some("ab".into())
        );
        let e = err(
            json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}}]}]}),
        );
        assert_eq!(e.param().as_deref(), Some("messages[0].content[1].type"));
        assert_eq!(e.status(Default::default()), 400);
    }

    #[test]
    fn platform_fields() {
        let r = parse(json!({
            "model": "proj/m", "messages": [{"role": "user", "content": "hi", "completion_id": "c1", "metadata": {"a": 1}}],
            "session_id": "3C90C3CC0D444B5088888DD25736052A", "ab_campaign": "spring",
            "labels": {"team": "a"}, "metadata": {"env": "prod"}, "tags": ["x", "y", "x"],
            "system_prompt_args": {"name": "Ada"}, "use_tools": false,
            "tools": [{"id": "search", "enabled": false}, {"id": "clock"}], "store": true
        }))
        .unwrap();
        assert_eq!(
            r.app.session_id.as_deref(),
            Some("3c90c3cc-0d44-4b50-8888-8dd25736052a")
        );
        assert_eq!(r.app.ab_campaign.as_deref(), Some("spring"));
        assert_eq!(r.metadata.len(), 2);
        assert_eq!(r.app.tags, vec!["x".to_owned(), "y".to_owned()]);
        assert_eq!(r.app.system_prompt_args.unwrap()["name"], "Ada");
        assert_eq!(r.app.use_tools, Some(false));
        assert_eq!(
            r.app.tool_switches,
            vec![("search".to_owned(), false), ("clock".to_owned(), true)]
        );
        assert!(r.tools.is_empty());
        assert!(r.app.store);
        assert_eq!(r.messages[0].completion_id.as_deref(), Some("c1"));
        // Errors name the field.
        let param = |f: &str, v: Value| err(with(f, v)).param();
        assert_eq!(
            param("session_id", json!("nope")).as_deref(),
            Some("session_id")
        );
        assert_eq!(param("tags", json!(vec!["t"; 33])).as_deref(), Some("tags"));
        assert_eq!(param("tags", json!(["ok", ""])).as_deref(), Some("tags[1]"));
        assert_eq!(
            param("system_prompt_args", json!("x")).as_deref(),
            Some("system_prompt_args")
        );
        assert_eq!(
            param("ab_campaign", json!("")).as_deref(),
            Some("ab_campaign")
        );
        assert_eq!(
            param("tools", json!([{"id": "a", "enabled": "yes"}])).as_deref(),
            Some("tools[0].enabled")
        );
        assert_eq!(
            param("tools", json!([{"id": "a", "function": {}}])).as_deref(),
            Some("tools[0].function")
        );
        // `labels` is `metadata` by another name: they may not disagree.
        let mut b = with("labels", json!({"k": "1"}));
        b["metadata"] = json!({"k": "2"});
        assert_eq!(err(b).param().as_deref(), Some("labels.k"));
        let mut b = with("labels", json!({"k": "1"}));
        b["metadata"] = json!({"k": "1"});
        assert_eq!(parse(b).unwrap().metadata.len(), 1);
    }

    #[test]
    fn defaults_fill_only_what_the_caller_left_out() {
        let d = parse_defaults(&json!({"temperature": 0.2, "max_tokens": 50, "stop": ["END"]}))
            .unwrap();
        let mut r = parse(with("temperature", json!(0.9))).unwrap();
        r.apply_defaults(&d);
        assert_eq!(r.temperature, 0.9);
        assert_eq!(r.max_tokens, Some(50));
        assert_eq!(r.stop, vec!["END".to_owned()]);
        assert_eq!(r.top_p, 1.0);
        assert!(r.given.max_tokens && !r.given.top_p);
        assert_eq!(
            parse_defaults(&json!({"messages": []}))
                .unwrap_err()
                .param()
                .as_deref(),
            Some("params.messages")
        );
        assert_eq!(
            parse_defaults(&json!({"temperature": 7}))
                .unwrap_err()
                .param()
                .as_deref(),
            Some("temperature")
        );
    }

    #[test]
    fn unknown_fields_ignored_known_unhonoured_refused() {
        assert!(parse(with("some_future_field", json!({"a": 1}))).is_ok());
        assert_eq!(
            err(with("tools", json!([]))).param().as_deref(),
            Some("tools")
        );
        assert_eq!(
            err(with("tool_choice", json!("auto"))).param().as_deref(),
            Some("tool_choice")
        );
        assert_eq!(
            err(with("top_logprobs", json!(2))).param().as_deref(),
            Some("top_logprobs")
        );
        assert_eq!(
            parse(with("store", json!(true))).map(|r| r.app.store),
            Ok(true)
        );
        assert_eq!(
            parse(with("store", json!(false))).map(|r| r.app.store),
            Ok(false)
        );
        assert!(parse(with("reasoning_effort", json!("low"))).is_ok());
        assert_eq!(
            parse(with("response_format", json!({"type": "json_object"})))
                .ok()
                .and_then(|r| r.response_format),
            Some(ResponseFormat::JsonObject)
        );
        assert_eq!(
            parse(with("response_format", json!({"type": "text"})))
                .ok()
                .and_then(|r| r.response_format),
            None
        );
        assert_eq!(
            err(with("response_format", json!({"type": "xml"})))
                .param()
                .as_deref(),
            Some("response_format.type")
        );
        assert_eq!(
            err(with("response_format", json!({"type": "json_schema"})))
                .param()
                .as_deref(),
            Some("response_format.json_schema")
        );
        assert_eq!(
            err(with(
                "response_format",
                json!({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}})
            ))
            .param()
            .as_deref(),
            Some("response_format.json_schema.name")
        );
    }

    #[test]
    fn roles_checked() {
        let e = err(json!({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}));
        assert_eq!(e.param().as_deref(), Some("messages[0].role"));
        let e = err(json!({"model": "m", "messages": [{"role": "tool", "content": "x"}]}));
        assert_eq!(e.param().as_deref(), Some("messages[0].tool_call_id"));
        assert!(parse(json!({"model": "m", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": null, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}, {"role": "tool", "tool_call_id": "c", "content": "1"}]})).is_ok());
    }

    #[test]
    fn metadata_limits() {
        let many: serde_json::Map<String, Value> =
            (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
        assert_eq!(
            err(with("metadata", Value::Object(many)))
                .param()
                .as_deref(),
            Some("metadata")
        );
        assert!(parse(with("metadata", json!({"a": "b"}))).is_ok());
        assert_eq!(
            err(with("metadata", json!({"a": 1}))).param().as_deref(),
            Some("metadata.a")
        );
    }

    #[test]
    fn chunk_usage_field_absent_null_or_set() {
        let mk = |usage| ChatCompletionChunk {
            id: "x".into(),
            object: "chat.completion.chunk",
            created: 0,
            model: "m".into(),
            system_fingerprint: "fp".into(),
            service_tier: "default",
            choices: vec![],
            usage,
            session_id: None,
        };
        let v = serde_json::to_value(mk(UsageField::Absent)).unwrap_or_default();
        assert!(v.get("usage").is_none());
        let v = serde_json::to_value(mk(UsageField::Null)).unwrap_or_default();
        assert_eq!(v.get("usage"), Some(&Value::Null));
        let v = serde_json::to_value(mk(UsageField::Set(Usage::new(3, 1, 2)))).unwrap_or_default();
        assert_eq!(v["usage"]["total_tokens"], json!(5));
        assert_eq!(
            v["usage"]["prompt_tokens_details"]["cached_tokens"],
            json!(1)
        );
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// No body, however mangled, makes the parser panic; every failure is a 4xx.
            #[test]
            fn never_panics(s in "\\PC{0,200}") {
                if let Err(e) = parse_chat_request(s.as_bytes()) {
                    prop_assert!((400..500).contains(&e.status(Default::default())));
                }
            }

            /// Any temperature in range is accepted as given; any outside is refused on its param.
            #[test]
            fn temperature_range(t in -10.0f64..10.0) {
                let r = parse(with("temperature", json!(t)));
                if (0.0..=2.0).contains(&t) {
                    prop_assert_eq!(r.ok().map(|r| r.temperature), Some(t as f32));
                } else {
                    prop_assert_eq!(r.err().and_then(|e| e.param()), Some("temperature".to_string()));
                }
            }
        }
    }
}
