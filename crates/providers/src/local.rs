//! The embedded engine as a provider: template, tokenize, check the context, submit, and turn
//! engine events into chat events.

use std::sync::Arc;

use futures::stream;
use std::collections::VecDeque;

use parlance_api::chat::{
    ReasoningEffort, ResponseFormat, TokenLogprob, Tool, ToolChoice, TopLogprob,
};
use parlance_api::{ApiError, ChatRequest, FinishReason, Usage};
use parlance_engine::{
    Constraint, Engine, Event, Generation, Place, SamplingParams, SubmitError, ThinkBudget,
};

use crate::thinking::ThinkSplitter;
use crate::{tools, ChatEvent, ChatProvider, ChatStream, PreparedChat, Tally};

/// A loaded local model.
#[derive(Debug, Clone)]
pub struct LocalProvider {
    engine: Arc<Engine>,
}

impl LocalProvider {
    /// Wraps a loaded engine.
    pub fn new(engine: Arc<Engine>) -> Self {
        Self { engine }
    }

    /// The engine, for gauges.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}

/// Renders and tokenizes the conversation, then checks it against the context and vocabulary.
/// A request ready for the engine, and whether its output carries a thought to read out
/// (`Some(opened)`: the template thinks; `opened` when the prompt itself opened the thought).
fn prepare(engine: &Engine, request: &ChatRequest) -> Result<(Generation, Option<bool>), ApiError> {
    let knows_tools = engine.template_renders_tools();
    let messages = tools::template_messages(
        &request.messages,
        &request.tools,
        &request.tool_choice,
        knows_tools,
    );
    let tool_defs: Option<serde_json::Value> = (knows_tools
        && !request.tools.is_empty()
        && request.tool_choice != ToolChoice::None)
        .then(|| {
            serde_json::Value::Array(
                request
                    .tools
                    .iter()
                    .map(|t| serde_json::json!({"type": "function", "function": t}))
                    .collect(),
            )
        });
    // Templates with a thinking mode think unless the caller asked for no reasoning.
    let enable_thinking = request.reasoning_effort != Some(ReasoningEffort::None);
    let text = engine
        .apply_chat_template(&messages, tool_defs.as_ref(), enable_thinking)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    let think = engine
        .template_thinks()
        .then(|| text.trim_end().ends_with("<think>"));
    let prompt = engine.tokenize(&text);
    let info = engine.info();
    let prompt_len = u32::try_from(prompt.len()).unwrap_or(u32::MAX);
    let context = info.context_length;
    if prompt_len >= context
        || request
            .max_tokens
            .is_some_and(|m| u64::from(prompt_len) + u64::from(m) > u64::from(context))
    {
        return Err(ApiError::ContextLengthExceeded {
            prompt: prompt_len,
            context,
            completion: request.max_tokens.filter(|_| prompt_len < context),
        });
    }
    if let Some((id, _)) = request
        .logit_bias
        .iter()
        .find(|(id, _)| *id >= info.vocab_size)
    {
        return Err(ApiError::invalid(
            "logit_bias",
            format!("Invalid key in 'logit_bias': token id {id} is outside the vocabulary of {} tokens.", info.vocab_size),
        ));
    }
    // Compiled before any work: a schema that cannot be enforced is a 400, never ignored.
    let forced = tools::forced_schema(
        &request.tools,
        &request.tool_choice,
        request.parallel_tool_calls,
    );
    let auto = match (&request.tool_choice, &request.response_format) {
        (ToolChoice::Auto, None) => {
            tools::auto_grammar(&request.tools, request.parallel_tool_calls)
        }
        _ => None,
    };
    let constraint = match (&request.response_format, forced) {
        (None, None) if auto.is_some() => auto.map(|g| (Constraint::Lark(g), "tools")),
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "response_format",
                "'response_format' cannot be combined with a forced tool call ('tool_choice' 'required' or a named function).",
            ))
        }
        (None, Some(schema)) => Some((Constraint::JsonSchema(schema), "tools")),
        (Some(ResponseFormat::JsonObject), None) => {
            Some((Constraint::JsonObject, "response_format"))
        }
        (Some(ResponseFormat::JsonSchema { schema, .. }), None) => Some((
            Constraint::JsonSchema(schema.clone()),
            "response_format.json_schema.schema",
        )),
        (None, None) => None,
    };
    let grammar = match constraint {
        None => None,
        Some((c, param)) => Some(engine.compile(&c).map_err(|e| {
            ApiError::invalid(param, format!("The JSON schema cannot be enforced: {e}"))
        })?),
    };
    // A thought's length follows the effort (`high`: as long as the model likes). Not under an
    // output constraint, which decides every token itself.
    let budget = match request.reasoning_effort {
        Some(ReasoningEffort::Minimal) => Some(128),
        Some(ReasoningEffort::Low) => Some(512),
        Some(ReasoningEffort::Medium) => Some(2048),
        _ => None,
    };
    let think_budget = match (think, budget, &grammar) {
        (Some(_), Some(tokens), None) => Some(ThinkBudget {
            tokens,
            close: engine.tokenize("\n</think>\n\n"),
            close_text: "</think>".into(),
        }),
        _ => None,
    };
    Ok((
        Generation {
            prompt,
            n: request.n,
            max_tokens: request.max_tokens,
            sampling: SamplingParams {
                temperature: request.temperature,
                top_p: request.top_p,
                top_k: request.top_k,
                min_p: request.min_p,
                presence_penalty: request.presence_penalty,
                frequency_penalty: request.frequency_penalty,
                repetition_penalty: request.repetition_penalty,
                logit_bias: request.logit_bias.clone(),
                seed: request.seed,
            },
            stop: request.stop.clone(),
            ignore_eos: request.ignore_eos,
            logprobs: request.logprobs,
            grammar,
            think_budget,
        },
        think,
    ))
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn wire_logprob(t: parlance_engine::TokenLogprob) -> TokenLogprob {
    TokenLogprob {
        token: lossy(&t.bytes),
        logprob: t.logprob,
        top_logprobs: t
            .top
            .into_iter()
            .map(|(bytes, logprob)| TopLogprob {
                token: lossy(&bytes),
                logprob,
                bytes,
            })
            .collect(),
        bytes: t.bytes,
    }
}

/// How the output of a request is read.
#[derive(Debug, Clone, PartialEq)]
enum ToolMode {
    /// Plain text.
    Off,
    /// The model may answer a call (`auto`): output that starts like a call is held back.
    Auto,
    /// A call is forced by the grammar; a named function (`named`) answers `stop`, `required`
    /// answers `tool_calls`.
    Forced { named: Option<String> },
}

struct Progress {
    events: parlance_engine::GenerationStream,
    stops: Vec<String>,
    tools: Vec<Tool>,
    mode: ToolMode,
    /// Per choice: text held back while it may be a call, and whether it turned out plain.
    held: Vec<String>,
    plain: Vec<bool>,
    /// Per choice, for templates that think: reads the thought out of the text.
    thoughts: Option<Vec<ThinkSplitter>>,
    /// Characters of reasoning and of answer, to apportion the completion tokens.
    reasoning_chars: usize,
    answer_chars: usize,
    pending: VecDeque<ChatEvent>,
    n: u32,
    finished: u32,
    prompt_tokens: u32,
    cached_tokens: u32,
    completion_tokens: u32,
    done: bool,
}

impl Progress {
    /// Reasoning text of a choice, sent as it comes.
    fn reason(&mut self, choice: u32, text: String) {
        if !text.is_empty() {
            self.reasoning_chars += text.chars().count();
            self.pending
                .push_back(ChatEvent::Reasoning { choice, text });
        }
    }

    /// Answer text of a choice: sent, or held while it may be a tool call.
    fn on_text(&mut self, choice: u32, text: String, logprobs: Vec<TokenLogprob>) {
        if text.is_empty() && logprobs.is_empty() {
            return;
        }
        self.answer_chars += text.chars().count();
        let c = choice as usize;
        match self.mode {
            ToolMode::Off => self.pending.push_back(ChatEvent::Text {
                choice,
                text,
                logprobs,
            }),
            ToolMode::Forced { .. } => self.held[c].push_str(&text),
            ToolMode::Auto if self.plain[c] => self.pending.push_back(ChatEvent::Text {
                choice,
                text,
                logprobs,
            }),
            ToolMode::Auto => {
                self.held[c].push_str(&text);
                if !tools::may_be_call(&self.held[c]) {
                    self.plain[c] = true;
                    let text = std::mem::take(&mut self.held[c]);
                    self.pending.push_back(ChatEvent::Text {
                        choice,
                        text,
                        logprobs,
                    });
                }
            }
        }
    }

    /// Completion tokens spent thinking, apportioned by characters (the engine counts tokens
    /// per choice, not per part of the text).
    fn reasoning_tokens(&self) -> u32 {
        let total = self.reasoning_chars + self.answer_chars;
        if total == 0 {
            return 0;
        }
        let share = u64::from(self.completion_tokens) * self.reasoning_chars as u64 / total as u64;
        u32::try_from(share).unwrap_or(u32::MAX)
    }

    /// Turns one engine event into chat events (queued in `pending`).
    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Admitted { cached_tokens } => self.cached_tokens = cached_tokens,
            Event::Text {
                choice,
                text,
                logprobs,
            } => {
                let logprobs = logprobs.into_iter().map(wire_logprob).collect();
                let text = match self
                    .thoughts
                    .as_mut()
                    .and_then(|t| t.get_mut(choice as usize))
                {
                    Some(splitter) => {
                        let (reasoning, answer) = splitter.push(&text);
                        self.reason(choice, reasoning);
                        answer
                    }
                    None => text,
                };
                self.on_text(choice, text, logprobs);
            }
            Event::Finished {
                choice,
                reason,
                stop_sequence,
                completion_tokens,
            } => {
                self.finished += 1;
                self.completion_tokens += completion_tokens;
                // What the thought splitter still held back.
                if let Some(splitter) = self
                    .thoughts
                    .as_mut()
                    .and_then(|t| t.get_mut(choice as usize))
                {
                    let (reasoning, answer) = splitter.finish();
                    self.reason(choice, reasoning);
                    self.on_text(choice, answer, Vec::new());
                }
                let mut reason = match reason {
                    parlance_engine::FinishReason::Stop => FinishReason::Stop,
                    parlance_engine::FinishReason::Length => FinishReason::Length,
                };
                let c = choice as usize;
                let held = std::mem::take(&mut self.held[c]);
                let calls = match self.mode {
                    ToolMode::Off => Vec::new(),
                    // Cut by `max_tokens`: the call as far as it got, never its JSON as text.
                    ToolMode::Forced { ref named } if reason == FinishReason::Length => {
                        tools::parse_truncated(&held, &self.tools, named.as_deref())
                    }
                    ToolMode::Forced { .. } => tools::parse_forced(&held, &self.tools),
                    ToolMode::Auto => tools::parse_auto(&held, &self.tools),
                };
                if calls.is_empty() {
                    if !held.is_empty() {
                        self.pending.push_back(ChatEvent::Text {
                            choice,
                            text: held,
                            logprobs: Vec::new(),
                        });
                    }
                } else {
                    for (index, call) in calls.into_iter().enumerate() {
                        let index = index as u32;
                        self.pending.push_back(ChatEvent::ToolCallStart {
                            choice,
                            index,
                            id: format!("call_{}", uuid::Uuid::new_v4().simple()),
                            name: call.name,
                        });
                        // The call is complete here; it streams in fragments all the same.
                        let chars: Vec<char> = call.arguments.chars().collect();
                        for piece in chars.chunks(16) {
                            self.pending.push_back(ChatEvent::ToolCallArgs {
                                choice,
                                index,
                                arguments: piece.iter().collect(),
                            });
                        }
                    }
                    if reason == FinishReason::Stop {
                        reason = match self.mode {
                            ToolMode::Forced { named: Some(_) } => FinishReason::Stop,
                            _ => FinishReason::ToolCalls,
                        };
                    }
                }
                let stop_sequence = stop_sequence.and_then(|i| self.stops.get(i).cloned());
                self.pending.push_back(ChatEvent::Finish {
                    choice,
                    reason,
                    stop_sequence,
                });
            }
            Event::Failed { message } => {
                tracing::error!(%message, "generation failed");
                self.done = true;
                self.pending.push_back(ChatEvent::Error(ApiError::Internal));
            }
        }
    }
}

#[async_trait::async_trait]
impl ChatProvider for LocalProvider {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn context_length(&self) -> u32 {
        self.engine.info().context_length
    }

    fn fingerprint(&self) -> String {
        self.engine.info().fingerprint.clone()
    }

    fn ready(&self) -> bool {
        self.engine.is_alive()
    }

    fn saturated(&self) -> Option<String> {
        self.engine.refusal().as_ref().map(overload_reason)
    }

    fn stats(&self) -> crate::ProviderStats {
        crate::ProviderStats {
            engine: Some(self.engine.stats()),
            deployments: Vec::new(),
        }
    }

    async fn prepare(&self, request: &ChatRequest) -> Result<Box<dyn PreparedChat>, ApiError> {
        // A place in the queue while the prompt is templated and tokenized: the requests of a
        // burst count for the next arrivals' check before any of that work (`saturated`).
        let place = self.engine.hold();
        let engine = self.engine.clone();
        let req = request.clone();
        // Templating and tokenizing are CPU work: keep them off the async runtime.
        let (generation, think) = tokio::task::spawn_blocking(move || prepare(&engine, &req))
            .await
            .map_err(|_| ApiError::Internal)??;
        Ok(Box::new(LocalPrepared {
            place,
            engine: self.engine.clone(),
            generation,
            think,
            tools: request.tools.clone(),
            tool_choice: request.tool_choice.clone(),
        }))
    }
}

/// A templated, tokenized and checked local request, not yet queued.
struct LocalPrepared {
    /// Its place in the engine's queue.
    place: Place,
    engine: Arc<Engine>,
    generation: Generation,
    think: Option<bool>,
    tools: Vec<Tool>,
    tool_choice: ToolChoice,
}

#[async_trait::async_trait]
impl PreparedChat for LocalPrepared {
    fn prompt_tokens(&self) -> u32 {
        u32::try_from(self.generation.prompt.len()).unwrap_or(u32::MAX)
    }

    fn max_completion_tokens(&self) -> u64 {
        let room = self
            .engine
            .info()
            .context_length
            .saturating_sub(self.prompt_tokens());
        let per_choice = self.generation.max_tokens.map_or(room, |m| m.min(room));
        u64::from(per_choice) * u64::from(self.generation.n)
    }

    async fn start(self: Box<Self>) -> Result<ChatStream, ApiError> {
        let LocalPrepared {
            place,
            engine,
            generation,
            think,
            tools,
            tool_choice,
        } = *self;
        let prompt_tokens = generation.prompt.len() as u32;
        let n = generation.n;
        let stops = generation.stop.clone();
        let mut events = engine.submit_in(place, generation).map_err(submit_error)?;
        let tally = events.tally().map(|rx| {
            let (tx, out) = tokio::sync::oneshot::channel();
            tokio::spawn(async move {
                if let Ok(t) = rx.await {
                    let _ = tx.send(Tally {
                        prompt_tokens: if t.admitted { prompt_tokens } else { 0 },
                        cached_tokens: t.cached_tokens,
                        completion_tokens: t.completion_tokens,
                    });
                }
            });
            out
        });
        let mode = match &tool_choice {
            _ if tools.is_empty() => ToolMode::Off,
            ToolChoice::None => ToolMode::Off,
            ToolChoice::Auto => ToolMode::Auto,
            ToolChoice::Required => ToolMode::Forced { named: None },
            ToolChoice::Named(name) => ToolMode::Forced {
                named: Some(name.clone()),
            },
        };
        let state = Progress {
            events,
            stops,
            tools,
            mode,
            held: vec![String::new(); n as usize],
            plain: vec![false; n as usize],
            thoughts: think.map(|opened| vec![ThinkSplitter::new(opened); n as usize]),
            reasoning_chars: 0,
            answer_chars: 0,
            pending: VecDeque::new(),
            n,
            finished: 0,
            prompt_tokens,
            cached_tokens: 0,
            completion_tokens: 0,
            done: false,
        };
        let events = stream::unfold(state, |mut st| async move {
            loop {
                if let Some(ev) = st.pending.pop_front() {
                    return Some((ev, st));
                }
                if st.done {
                    return None;
                }
                if st.finished == st.n {
                    // Every choice is over: the usage comes last, then the stream ends.
                    st.done = true;
                    let usage =
                        Usage::new(st.prompt_tokens, st.cached_tokens, st.completion_tokens)
                            .with_reasoning(st.reasoning_tokens());
                    return Some((ChatEvent::Usage(usage), st));
                }
                match st.events.next().await {
                    Some(ev) => st.on_event(ev),
                    None => {
                        st.done = true;
                        tracing::error!("engine stream ended before every choice finished");
                        return Some((ChatEvent::Error(ApiError::Internal), st));
                    }
                }
            }
        });
        Ok(ChatStream {
            prompt_tokens: Some(prompt_tokens),
            events: Box::pin(events),
            tally,
        })
    }
}

/// Why the engine refuses work under load, for the 503's message.
fn overload_reason(e: &SubmitError) -> String {
    match e {
        SubmitError::QueueFull => "the model's queue is full".into(),
        e => e.to_string(),
    }
}

/// The API error for a generation the engine would not take.
fn submit_error(e: SubmitError) -> ApiError {
    match e {
        e @ (SubmitError::QueueFull | SubmitError::WaitTooLong { .. }) => {
            ApiError::Overloaded(overload_reason(&e))
        }
        SubmitError::ContextLengthExceeded { prompt, context } => ApiError::ContextLengthExceeded {
            prompt,
            context,
            completion: None,
        },
        SubmitError::EmptyPrompt => ApiError::invalid("messages", "The prompt is empty."),
        SubmitError::Stopped => ApiError::NotReady("The model is shutting down.".into()),
    }
}
