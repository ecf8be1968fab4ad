//! The embedded engine as a provider: template, tokenize, check the context, submit, and turn
//! engine events into chat events.

use std::sync::Arc;

use futures::stream;
use parlance_api::chat::{ResponseFormat, TokenLogprob, TopLogprob};
use parlance_api::{ApiError, ChatRequest, FinishReason, Usage};
use parlance_engine::{Constraint, Engine, Event, Generation, SamplingParams, SubmitError};

use crate::{ChatEvent, ChatProvider, ChatStream};

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
fn prepare(engine: &Engine, request: &ChatRequest) -> Result<Generation, ApiError> {
    let messages: Vec<serde_json::Value> = request
        .messages
        .iter()
        .map(|m| serde_json::to_value(m).unwrap_or_default())
        .collect();
    let text = engine
        .apply_chat_template(&messages, None)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
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
    let grammar = match &request.response_format {
        None => None,
        Some(rf) => {
            let (constraint, param) = match rf {
                ResponseFormat::JsonObject => (Constraint::JsonObject, "response_format"),
                ResponseFormat::JsonSchema { schema, .. } => (
                    Constraint::JsonSchema(schema.clone()),
                    "response_format.json_schema.schema",
                ),
            };
            Some(engine.compile(&constraint).map_err(|e| {
                ApiError::invalid(param, format!("The JSON schema cannot be enforced: {e}"))
            })?)
        }
    };
    Ok(Generation {
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
    })
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

struct Progress {
    events: parlance_engine::GenerationStream,
    stops: Vec<String>,
    n: u32,
    finished: u32,
    prompt_tokens: u32,
    cached_tokens: u32,
    completion_tokens: u32,
    done: bool,
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

    async fn complete(&self, request: &ChatRequest) -> Result<ChatStream, ApiError> {
        let engine = self.engine.clone();
        let req = request.clone();
        // Templating and tokenizing are CPU work: keep them off the async runtime.
        let generation = tokio::task::spawn_blocking(move || prepare(&engine, &req))
            .await
            .map_err(|_| ApiError::Internal)??;
        let prompt_tokens = generation.prompt.len() as u32;
        let n = generation.n;
        let stops = generation.stop.clone();
        let events = self.engine.submit(generation).map_err(|e| match e {
            SubmitError::QueueFull => ApiError::Overloaded("the model's queue is full".into()),
            SubmitError::ContextLengthExceeded { prompt, context } => {
                ApiError::ContextLengthExceeded { prompt, context }
            }
            SubmitError::EmptyPrompt => ApiError::invalid("messages", "The prompt is empty."),
            SubmitError::Stopped => ApiError::NotReady("The model is shutting down.".into()),
        })?;
        let state = Progress {
            events,
            stops,
            n,
            finished: 0,
            prompt_tokens,
            cached_tokens: 0,
            completion_tokens: 0,
            done: false,
        };
        let events = stream::unfold(state, |mut st| async move {
            if st.done {
                return None;
            }
            if st.finished == st.n {
                // Every choice is over: the usage comes last, then the stream ends.
                st.done = true;
                let usage = Usage::new(st.prompt_tokens, st.cached_tokens, st.completion_tokens);
                return Some((ChatEvent::Usage(usage), st));
            }
            loop {
                let Some(ev) = st.events.next().await else {
                    st.done = true;
                    tracing::error!("engine stream ended before every choice finished");
                    return Some((ChatEvent::Error(ApiError::Internal), st));
                };
                match ev {
                    Event::Admitted { cached_tokens } => st.cached_tokens = cached_tokens,
                    Event::Text {
                        choice,
                        text,
                        logprobs,
                    } => {
                        let logprobs = logprobs.into_iter().map(wire_logprob).collect();
                        return Some((
                            ChatEvent::Text {
                                choice,
                                text,
                                logprobs,
                            },
                            st,
                        ));
                    }
                    Event::Finished {
                        choice,
                        reason,
                        stop_sequence,
                        completion_tokens,
                    } => {
                        st.finished += 1;
                        st.completion_tokens += completion_tokens;
                        let reason = match reason {
                            parlance_engine::FinishReason::Stop => FinishReason::Stop,
                            parlance_engine::FinishReason::Length => FinishReason::Length,
                        };
                        let stop_sequence = stop_sequence.and_then(|i| st.stops.get(i).cloned());
                        return Some((
                            ChatEvent::Finish {
                                choice,
                                reason,
                                stop_sequence,
                            },
                            st,
                        ));
                    }
                    Event::Failed { message } => {
                        tracing::error!(%message, "generation failed");
                        st.done = true;
                        return Some((ChatEvent::Error(ApiError::Internal), st));
                    }
                }
            }
        });
        Ok(ChatStream {
            prompt_tokens: Some(prompt_tokens),
            events: Box::pin(events),
        })
    }
}
