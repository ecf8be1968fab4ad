//! One trait for anything that can complete a chat (the local engine, OpenAI-compatible
//! upstreams, the echo provider, and a router over several deployments of one model), and the
//! event stream every provider produces.

mod anthropic;
mod echo;
mod endpoint;
mod local;
pub mod openai;
mod router;
mod sse;
mod thinking;
pub mod tools;

use std::pin::Pin;

use futures::Stream;
use parlance_api::{ApiError, ChatRequest, FinishReason, Usage};

pub use anthropic::AnthropicUpstream;
pub use echo::EchoProvider;
pub use endpoint::Endpoint;
pub use local::LocalProvider;
pub use openai::OpenAiUpstream;
pub use router::{Deployment, RoutePolicy, Routed};

/// What a provider streams back, in order per choice; `Usage` comes last.
#[derive(Debug, Clone, PartialEq)]
pub enum ChatEvent {
    /// New text of one choice.
    Text {
        /// Choice index.
        choice: u32,
        /// The text (whole characters, never part of a stop string).
        text: String,
        /// Log probabilities of the tokens of this text, when the request asked for them.
        logprobs: Vec<parlance_api::chat::TokenLogprob>,
    },
    /// New reasoning text of one choice (a model thinking before it answers).
    Reasoning {
        /// Choice index.
        choice: u32,
        /// The text.
        text: String,
    },
    /// A choice ended.
    Finish {
        /// Choice index.
        choice: u32,
        /// Why.
        reason: FinishReason,
        /// The stop string that ended it, if one did.
        stop_sequence: Option<String>,
    },
    /// A tool call of one choice begins (before that choice's `Finish`): its id and function.
    /// Its arguments follow in `ToolCallArgs` fragments.
    ToolCallStart {
        /// Choice index.
        choice: u32,
        /// Which call of the choice.
        index: u32,
        /// `call_…`.
        id: String,
        /// The function.
        name: String,
    },
    /// A fragment of a call's arguments; the fragments of a call join to its JSON.
    ToolCallArgs {
        /// Choice index.
        choice: u32,
        /// Which call of the choice.
        index: u32,
        /// The fragment.
        arguments: String,
    },
    /// Final token counts, after every choice finished.
    Usage(Usage),
    /// The generation failed after it started.
    Error(ApiError),
}

/// The work a completion really did, known once it is over however it ended (finished,
/// failed, or cancelled because its stream was dropped): what money and limits settle to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tally {
    /// Prompt tokens processed (0 when the request never got to run).
    pub prompt_tokens: u32,
    /// Of those, reused from a cache.
    pub cached_tokens: u32,
    /// Completion tokens generated, over all choices.
    pub completion_tokens: u32,
}

/// A running completion.
pub struct ChatStream {
    /// Prompt tokens, when the provider knows them before the work starts.
    pub prompt_tokens: Option<u32>,
    /// The events; dropping the stream cancels the work.
    pub events: Pin<Box<dyn Stream<Item = ChatEvent> + Send>>,
    /// Resolves with the [`Tally`] when the work is over, even after `events` was dropped.
    /// `None`: the provider cannot tell, and the final [`ChatEvent::Usage`] is the measure.
    pub tally: Option<tokio::sync::oneshot::Receiver<Tally>>,
}

/// A request a provider has checked and measured but not started: the platform reserves
/// credit and rate-limit tokens for its worst case before any work is done.
#[async_trait::async_trait]
pub trait PreparedChat: Send {
    /// Prompt tokens, as the model counts them.
    fn prompt_tokens(&self) -> u32;
    /// The most completion tokens it may produce, over all choices.
    fn max_completion_tokens(&self) -> u64;
    /// Starts the work. Errors before any output (503 when full, an upstream that refused or
    /// could not be reached) are returned here.
    async fn start(self: Box<Self>) -> Result<ChatStream, ApiError>;
}

impl std::fmt::Debug for ChatStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChatStream")
    }
}

pub use parlance_engine::LoadStats;

/// What a provider reports for metrics at a scrape.
#[derive(Debug, Clone, Default)]
pub struct ProviderStats {
    /// A local model's load and prefix-cache figures.
    pub engine: Option<parlance_engine::LoadStats>,
    /// Each deployment of a routed model.
    pub deployments: Vec<DeploymentStats>,
}

/// One deployment's attempts and breaker, as counted since start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeploymentStats {
    /// Its label (`provider/model`, from the configuration).
    pub label: String,
    /// Its provider kind.
    pub kind: &'static str,
    /// Whether its circuit breaker is open (traffic kept away).
    pub breaker_open: bool,
    /// Attempts made on it.
    pub attempts: u64,
    /// Attempts that failed (errors, refusals, missed first-token deadlines).
    pub errors: u64,
    /// Retries of it after a failure.
    pub retries: u64,
    /// Requests it served after another deployment failed (fall-backs).
    pub fallbacks: u64,
}

/// Anything that can complete a chat.
#[async_trait::async_trait]
pub trait ChatProvider: Send + Sync {
    /// Which kind of provider this is (`local`, ...), for logs and `owned_by`.
    fn kind(&self) -> &'static str;
    /// Longest prompt plus completion it accepts.
    fn context_length(&self) -> u32;
    /// Identifies the model and build, for `system_fingerprint`.
    fn fingerprint(&self) -> String;
    /// Whether it can take work now.
    fn ready(&self) -> bool;
    /// Why a new request would be refused with 503 right now (its queue is full, or the wait
    /// would be too long), if it would: asked before a request is templated and tokenized, so
    /// that refusals under overload cost next to nothing.
    fn saturated(&self) -> Option<String> {
        None
    }
    /// Figures for metrics (none by default).
    fn stats(&self) -> ProviderStats {
        ProviderStats::default()
    }
    /// Checks and measures a request (400s are returned here), without starting it.
    async fn prepare(&self, request: &ChatRequest) -> Result<Box<dyn PreparedChat>, ApiError>;
    /// Prepares and starts a completion. Errors before any work are returned here (400s, 503
    /// when full); errors after it started arrive as [`ChatEvent::Error`].
    async fn complete(&self, request: &ChatRequest) -> Result<ChatStream, ApiError> {
        self.prepare(request).await?.start().await
    }
}

/// A request's `f32` parameter as the decimal the caller wrote (0.3, not 0.30000001192092896),
/// for the JSON sent upstream.
pub(crate) fn decimal(x: f32) -> serde_json::Value {
    x.to_string()
        .parse::<f64>()
        .map_or(serde_json::Value::Null, serde_json::Value::from)
}
