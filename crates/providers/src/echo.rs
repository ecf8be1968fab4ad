//! The `echo` provider: answers at once with the words of the last user message (up to
//! `max_tokens`), counting one token per word. For smoke-testing a deployment and for
//! measuring what the platform path (keys, limits, credits, usage) adds to a request, without
//! a model's time in the way. Never a default: an operator configures it by name.

use futures::stream;
use parlance_api::{ApiError, ChatRequest, FinishReason, Role, Usage};

use crate::{ChatEvent, ChatProvider, ChatStream, PreparedChat};

/// Per-message tokens added to the prompt count, as a chat template would.
const PER_MESSAGE: u32 = 4;
const CONTEXT: u32 = 1 << 20;

/// Answers with what it was told.
#[derive(Debug, Clone, Default)]
pub struct EchoProvider;

struct EchoRun {
    words: Vec<String>,
    prompt: u32,
    n: u32,
    truncated: bool,
}

fn words(s: &str) -> usize {
    s.split_whitespace().count()
}

#[async_trait::async_trait]
impl ChatProvider for EchoProvider {
    fn kind(&self) -> &'static str {
        "echo"
    }

    fn context_length(&self) -> u32 {
        CONTEXT
    }

    fn fingerprint(&self) -> String {
        "fp_echo".into()
    }

    fn ready(&self) -> bool {
        true
    }

    async fn prepare(&self, request: &ChatRequest) -> Result<Box<dyn PreparedChat>, ApiError> {
        let prompt: usize = request
            .messages
            .iter()
            .map(|m| m.content.as_deref().map_or(0, words) + PER_MESSAGE as usize)
            .sum();
        let prompt = u32::try_from(prompt).unwrap_or(u32::MAX);
        if prompt >= CONTEXT {
            return Err(ApiError::ContextLengthExceeded {
                prompt,
                context: CONTEXT,
                completion: None,
            });
        }
        let last = request
            .messages
            .iter()
            .rev()
            .find(|m| m.role == Role::User)
            .and_then(|m| m.content.clone())
            .unwrap_or_default();
        let mut words: Vec<String> = last.split_whitespace().map(str::to_owned).collect();
        let limit = request.max_tokens.map_or(usize::MAX, |m| m as usize);
        let truncated = words.len() > limit;
        words.truncate(limit);
        Ok(Box::new(EchoRun {
            words,
            prompt,
            n: request.n,
            truncated,
        }))
    }
}

#[async_trait::async_trait]
impl PreparedChat for EchoRun {
    fn prompt_tokens(&self) -> u32 {
        self.prompt
    }

    fn max_completion_tokens(&self) -> u64 {
        self.words.len() as u64 * u64::from(self.n)
    }

    async fn start(self: Box<Self>) -> Result<ChatStream, ApiError> {
        let mut events = Vec::new();
        for choice in 0..self.n {
            for (i, w) in self.words.iter().enumerate() {
                let text = if i == 0 { w.clone() } else { format!(" {w}") };
                events.push(ChatEvent::Text {
                    choice,
                    text,
                    logprobs: Vec::new(),
                });
            }
            events.push(ChatEvent::Finish {
                choice,
                reason: if self.truncated {
                    FinishReason::Length
                } else {
                    FinishReason::Stop
                },
                stop_sequence: None,
            });
        }
        let completion = u32::try_from(self.words.len()).unwrap_or(u32::MAX) * self.n;
        events.push(ChatEvent::Usage(Usage::new(self.prompt, 0, completion)));
        Ok(ChatStream {
            prompt_tokens: Some(self.prompt),
            events: Box::pin(stream::iter(events)),
            tally: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[tokio::test]
    async fn echoes_up_to_max_tokens_and_counts_words() {
        let req = parlance_api::parse_chat_request(
            br#"{"model":"e","max_tokens":3,"n":2,"messages":[{"role":"system","content":"be nice"},{"role":"user","content":"one two three four"}]}"#,
        )
        .unwrap();
        let p = EchoProvider.prepare(&req).await.unwrap();
        assert_eq!(p.prompt_tokens(), 2 + 4 + 4 + 4);
        assert_eq!(p.max_completion_tokens(), 6);
        let events: Vec<ChatEvent> = p.start().await.unwrap().events.collect().await;
        let text: String = events
            .iter()
            .filter_map(|e| match e {
                ChatEvent::Text {
                    choice: 0, text, ..
                } => Some(text.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(text, "one two three");
        assert!(events.contains(&ChatEvent::Finish {
            choice: 1,
            reason: FinishReason::Length,
            stop_sequence: None
        }));
        assert_eq!(events.last(), Some(&ChatEvent::Usage(Usage::new(14, 0, 6))));
    }
}
