//! Events gathered into a whole answer: what a non-streamed response, a stored completion and a
//! session's next message are made of.

use parlance_api::chat::{
    AssistantMessage, ChatCompletion, Choice, ChoiceLogprobs, FunctionCall, TokenLogprob, ToolCall,
};
use parlance_api::{ApiError, FinishReason, Usage};
use parlance_providers::ChatEvent;

/// One choice, gathered.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChoiceOutput {
    /// Its text.
    pub text: String,
    /// Its reasoning text.
    pub reasoning: String,
    /// The log probabilities of its tokens, if asked for.
    pub logprobs: Vec<TokenLogprob>,
    /// Its tool calls.
    pub calls: Vec<ToolCall>,
    /// Why it ended.
    pub finish: Option<FinishReason>,
}

/// A whole answer, gathered from its events.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Assembly {
    /// The choices, by index.
    pub choices: Vec<ChoiceOutput>,
    /// The final usage.
    pub usage: Option<Usage>,
    /// The error that ended it, if one did.
    pub error: Option<ApiError>,
}

/// What a response needs besides the answer.
#[derive(Debug, Clone)]
pub struct ResponseMeta {
    /// `chatcmpl-…`.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// The model named in the response.
    pub model: String,
    /// `system_fingerprint`.
    pub fingerprint: String,
    /// The request id (completion and message ids derive from it).
    pub request_id: String,
    /// The session, if one is in use.
    pub session_id: Option<String>,
    /// The request used the legacy `functions`: its call is written as `function_call`.
    pub legacy_functions: bool,
}

impl ResponseMeta {
    /// A choice's finish reason as this request's caller expects it: `function_call` for a
    /// call made to a legacy `functions` request.
    pub fn finish_reason(&self, reason: FinishReason) -> FinishReason {
        match reason {
            FinishReason::ToolCalls if self.legacy_functions => FinishReason::FunctionCall,
            r => r,
        }
    }
}

impl Assembly {
    /// An empty answer of `n` choices.
    pub fn new(n: u32) -> Self {
        Self {
            choices: vec![ChoiceOutput::default(); n as usize],
            ..Self::default()
        }
    }

    /// Adds one event.
    pub fn push(&mut self, ev: &ChatEvent) {
        fn slot(a: &mut Assembly, c: u32) -> Option<&mut ChoiceOutput> {
            a.choices.get_mut(c as usize)
        }
        match ev {
            ChatEvent::Text {
                choice,
                text,
                logprobs,
            } => {
                if let Some(c) = slot(self, *choice) {
                    c.text.push_str(text);
                    c.logprobs.extend(logprobs.iter().cloned());
                }
            }
            ChatEvent::Reasoning { choice, text } => {
                if let Some(c) = slot(self, *choice) {
                    c.reasoning.push_str(text);
                }
            }
            ChatEvent::Finish { choice, reason, .. } => {
                if let Some(c) = slot(self, *choice) {
                    c.finish = Some(*reason);
                }
            }
            ChatEvent::ToolCallStart {
                choice, id, name, ..
            } => {
                if let Some(c) = slot(self, *choice) {
                    c.calls.push(ToolCall {
                        id: id.clone(),
                        kind: "function",
                        function: FunctionCall {
                            name: name.clone(),
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
                if let Some(call) =
                    slot(self, *choice).and_then(|c| c.calls.get_mut(*index as usize))
                {
                    call.function.arguments.push_str(arguments);
                }
            }
            ChatEvent::Usage(u) => self.usage = Some(*u),
            ChatEvent::Error(e) => self.error = Some(e.clone()),
        }
    }

    /// The assistant message of one choice, as a response or a session shows it.
    pub fn message(&self, meta: &ResponseMeta, index: u32) -> AssistantMessage {
        let c = self
            .choices
            .get(index as usize)
            .cloned()
            .unwrap_or_default();
        let mut calls = c.calls;
        // The legacy shape has one call, as `function_call` (such requests allow only one).
        let function_call = if meta.legacy_functions && !calls.is_empty() {
            Some(calls.remove(0).function)
        } else {
            None
        };
        let calls_none = calls.is_empty() && function_call.is_none();
        AssistantMessage {
            id: Some(crate::ids::message_id(&meta.request_id, index)),
            role: "assistant",
            // A turn that only calls tools has null content, as OpenAI answers it.
            content: (calls_none || !c.text.is_empty()).then_some(c.text),
            refusal: None,
            tool_calls: (!calls.is_empty()).then_some(calls),
            function_call,
            reasoning_content: (!c.reasoning.is_empty()).then_some(c.reasoning),
        }
    }

    /// The whole response, as `POST /v1/chat/completions` answers it without streaming.
    pub fn completion(&self, meta: &ResponseMeta, want_logprobs: bool) -> ChatCompletion {
        let choices = (0..self.choices.len() as u32)
            .map(|i| {
                let c = &self.choices[i as usize];
                Choice {
                    index: i,
                    message: self.message(meta, i),
                    logprobs: want_logprobs.then(|| ChoiceLogprobs {
                        content: c.logprobs.clone(),
                        refusal: None,
                    }),
                    finish_reason: meta.finish_reason(c.finish.unwrap_or(FinishReason::Stop)),
                    completion_id: Some(crate::ids::completion_id(&meta.request_id, i)),
                }
            })
            .collect();
        ChatCompletion {
            id: meta.id.clone(),
            object: "chat.completion",
            created: meta.created,
            model: meta.model.clone(),
            choices,
            usage: self.usage.unwrap_or_default(),
            system_fingerprint: meta.fingerprint.clone(),
            service_tier: "default",
            session_id: meta.session_id.clone(),
        }
    }
}
