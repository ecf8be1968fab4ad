//! Local inference over GGUF models: load a model, render its chat template, tokenize, and run
//! generations with continuous batching on a thread of its own.
//!
//! The engine knows nothing of HTTP, tenants or money. Submit a [`Generation`] and read
//! [`Event`]s from the returned [`GenerationStream`]; dropping the stream cancels the generation
//! and frees its sequences at the next forward step.

mod admission;
mod convert;
mod cpu;
mod gemv;
mod grammar;
mod kvmem;
mod model;
mod priority;
mod sampling;
mod scheduler;
mod template;
mod text;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use grammar::{Constraint, Grammar, GrammarError};
pub use sampling::{log_probs, SamplingParams};
pub use template::{ChatTemplate, TemplateError};
pub use text::{AlignedQueue, StopMatcher, StopOutcome, Utf8Decoder};

/// Outputs (weight rows times tokens) this process has computed with its own Q8_0 kernel for
/// one to eight tokens (see the `gemv` module); zero where the kernel is off.
pub fn q8_0_gemv_rows() -> u64 {
    gemv::rows_computed()
}

use model::LoadedModel;

/// How an engine sizes its context and schedules its work.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Sequences (choices) decoded together in one forward step, at most; `None`: as many as
    /// [`kv_cache_mib`](Self::kv_cache_mib) holds at the full context length (1 to 64).
    pub max_sequences: Option<u32>,
    /// Longest context (prompt plus completion) of one sequence; `None`: the model's training
    /// context, capped at 2048. Each sequence owns this many KV cells, so the KV cache takes
    /// `max_sequences × context_length` cells (12 KiB each for the default model).
    pub context_length: Option<u32>,
    /// Address space for the KV cache when `max_sequences` is not given, in MiB. It is
    /// reserved, not resident: pages become resident only as sequences write their cells. The
    /// long-prompt context (see [`long_prompt_tokens`](Self::long_prompt_tokens)) reserves
    /// its own, for a quarter as many sequences.
    pub kv_cache_mib: u32,
    /// Tokens processed in one forward step, prompt chunks and decode tokens together.
    pub batch_size: u32,
    /// CPU threads for the forward pass; `None`: the available cores.
    pub threads: Option<u32>,
    /// Requests that may wait for a sequence before new ones are refused.
    pub max_queue: usize,
    /// Longest expected wait for a sequence before a new request is refused, estimated from
    /// the measured cost of forward steps and the size of recent requests (see
    /// [`Engine::expected_wait`]); `None`: only `max_queue` bounds the queue.
    pub max_queue_wait: Option<Duration>,
    /// Keep the KV state of finished sequences for later prompts that start the same way.
    pub prefix_cache: bool,
    /// Flash attention (over Q8_0 keys and values, 12 KiB a cell for the default model) or the
    /// plain attention (Q8_0 keys, F16 values, 17 KiB), both batch-invariant. With Q8_0 weights
    /// flash attention is 10-18% the faster while contexts are short (W1, W2, two runs each);
    /// past a few hundred tokens of context the plain attention is the faster (`llama-bench`,
    /// a 32-token prompt after 1,024 cells: 358 tokens a second against 197, decoding there
    /// about even); flash attention keeps answers in the prefix cache. With
    /// [`long_prompt_tokens`](Self::long_prompt_tokens) long prompts get the plain attention
    /// anyway. See `docs/benchmarks.md`.
    pub flash_attention: bool,
    /// With flash attention on CPU, prompts of at least this many tokens are computed, and
    /// their answers generated, in a second context with the plain attention (a quarter as many
    /// sequences, its own prefix cache), which is much quicker over long contexts: a shared
    /// system prompt of 1,000 tokens, a long conversation. Which context a request takes
    /// depends only on its prompt's length, so outputs stay the same alone and under load.
    /// `None`: one context for every prompt.
    pub long_prompt_tokens: Option<u32>,
    /// Longest a forward step's prompt chunks should hold the sequences that are decoding,
    /// estimated from the measured step costs: while any decode, a step computes at most that
    /// many seconds' worth of prompt rows (at least 16), so a long prompt is spread over steps
    /// that each give every running stream its next token. `None`: up to `batch_size` rows.
    pub max_prompt_stall: Option<Duration>,
    /// The types the weights are multiplied in: as in the file, or re-expressed in Q8_0 for
    /// llama.cpp's tiled kernels (see [`WeightFormat`]).
    pub weights: WeightFormat,
    /// Where weights converted from a model file are kept; `None`: beside the model file.
    pub weights_dir: Option<PathBuf>,
    /// How much the compute threads' nice value exceeds the process's (0 to 19; 0: the same),
    /// so that the server's own threads (connections, refusals, streaming) are preferred
    /// whenever both want the CPU. Only under contention does it change anything.
    pub compute_nice: u8,
}

/// The types a model's weights are multiplied in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// Q8_0 for a model held mostly in Q4_1 or Q5_1 (types llama.cpp multiplies one row and one
    /// token at a time on CPU) whose weights stay under 512 MiB in Q8_0, on CPU; otherwise the
    /// file's own types.
    #[default]
    Auto,
    /// The file's own types.
    File,
    /// Every quantized matrix in Q8_0, converted once into `weights_dir`: batched steps and
    /// prompts 1.5-2× as fast on CPU as with Q4_1, a single stream about as fast, and the
    /// weights 1.7× Q4_1's size.
    Q8_0,
}

impl std::str::FromStr for WeightFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "file" => Ok(Self::File),
            "q8_0" => Ok(Self::Q8_0),
            other => Err(format!("weights must be auto, file or q8_0, not {other:?}")),
        }
    }
}

impl EngineConfig {
    /// CPU threads for the forward pass and the weights' conversion: `threads`, else the
    /// available cores.
    pub(crate) fn thread_count(&self) -> u32 {
        self.threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(1))
        })
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_sequences: None,
            context_length: None,
            kv_cache_mib: 1536,
            batch_size: 512,
            threads: None,
            max_queue: 256,
            max_queue_wait: Some(Duration::from_secs(30)),
            prefix_cache: true,
            flash_attention: true,
            long_prompt_tokens: Some(512),
            max_prompt_stall: Some(Duration::from_millis(250)),
            weights: WeightFormat::Auto,
            weights_dir: None,
            compute_nice: 10,
        }
    }
}

/// What a loaded model is.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// The file it was loaded from.
    pub path: PathBuf,
    /// The types its weights are multiplied in: [`WeightFormat::File`] or
    /// [`WeightFormat::Q8_0`], never `Auto`.
    pub weights: WeightFormat,
    /// The file the weights were read from: `path`, or its Q8_0 conversion.
    pub weights_path: PathBuf,
    /// Longest context (prompt plus completion) one request may use.
    pub context_length: u32,
    /// The context length the model was trained with.
    pub train_context_length: u32,
    /// Tokens in the vocabulary.
    pub vocab_size: u32,
    /// Stable for a given model file, build and engine configuration: `fp_` and 10 hex digits.
    pub fingerprint: String,
    /// Sequences decoded together, at most (those of the long-prompt lane not counted).
    pub max_sequences: u32,
    /// Bytes of KV cache one token of context takes.
    pub kv_bytes_per_cell: u64,
    /// The plain-attention lane for long prompts, if there is one.
    pub long_prompts: Option<LongPrompts>,
}

/// The lane for long prompts: a second context, with the plain attention, that takes every
/// request whose prompt has at least `from_tokens` tokens (see
/// [`EngineConfig::long_prompt_tokens`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LongPrompts {
    /// Prompts of this many tokens or more take this lane.
    pub from_tokens: u32,
    /// Sequences it decodes together, at most.
    pub sequences: u32,
    /// Bytes of its KV cache one token of context takes.
    pub kv_bytes_per_cell: u64,
}

/// One generation request: a tokenized prompt and how to continue it.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The prompt, already templated and tokenized by [`Engine::tokenize`].
    pub prompt: Vec<u32>,
    /// Choices to generate from the same prompt (evaluated once and shared).
    pub n: u32,
    /// Largest number of tokens per choice; `None`: until the context is full.
    pub max_tokens: Option<u32>,
    /// Sampling parameters, shared by the choices (each has its own random stream).
    pub sampling: SamplingParams,
    /// Strings that end a choice; they are not part of its text.
    pub stop: Vec<String>,
    /// Never end on the model's end-of-generation tokens (they are banned instead).
    pub ignore_eos: bool,
    /// Report log probabilities, with this many most likely alternatives per token.
    pub logprobs: Option<u32>,
    /// Constrain the output (from [`Engine::compile`]); the choice ends when it is complete.
    pub grammar: Option<Grammar>,
    /// A thinking budget: after this many generated tokens without the closing tokens, those
    /// tokens are written for the model (its thought is cut short and the answer begins).
    pub think_budget: Option<ThinkBudget>,
}

/// Cuts a thought short after a number of tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThinkBudget {
    /// Tokens the thought may take.
    pub tokens: u32,
    /// The tokens that close a thought (`</think>` and a line break, tokenized).
    pub close: Vec<u32>,
    /// The closing text (`</think>`): when the model writes it, the budget no longer applies.
    pub close_text: String,
}

/// The log probability of one generated token, from the model's raw distribution.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The token's bytes (may be part of a UTF-8 character).
    pub bytes: Vec<u8>,
    /// Natural log of its probability.
    pub logprob: f32,
    /// The most likely tokens at this position, most likely first: bytes and log probability.
    pub top: Vec<(Vec<u8>, f32)>,
}

/// Why a choice ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model ended its turn, or a stop string matched.
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
}

/// What a running generation reports, in order per choice.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The request got its sequences; `cached_tokens` of its prompt were reused.
    Admitted {
        /// Prompt tokens whose KV state was reused instead of computed.
        cached_tokens: u32,
    },
    /// New text of one choice: whole UTF-8 characters, never part of a stop string.
    Text {
        /// Choice index.
        choice: u32,
        /// The text.
        text: String,
        /// Log probabilities of the tokens this text completes (when asked for).
        logprobs: Vec<TokenLogprob>,
    },
    /// A choice ended.
    Finished {
        /// Choice index.
        choice: u32,
        /// Why.
        reason: FinishReason,
        /// Which stop string ended it, as an index into [`Generation::stop`].
        stop_sequence: Option<usize>,
        /// Tokens generated for this choice.
        completion_tokens: u32,
    },
    /// The engine failed; no more events follow.
    Failed {
        /// What went wrong, for logs (not for clients).
        message: String,
    },
}

/// Why a generation could not be submitted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    /// Too many requests are waiting already.
    #[error("the queue of model requests is full")]
    QueueFull,
    /// The request would wait longer than the engine's `max_queue_wait`.
    #[error(
        "a new request would wait about {} s for the model (the limit is {} s)",
        expected.as_secs_f64().ceil(),
        limit.as_secs_f64()
    )]
    WaitTooLong {
        /// The estimated wait.
        expected: Duration,
        /// The configured limit.
        limit: Duration,
    },
    /// The prompt alone fills the context.
    #[error("prompt of {prompt} tokens exceeds the context length of {context}")]
    ContextLengthExceeded {
        /// Tokens in the prompt.
        prompt: u32,
        /// The context length.
        context: u32,
    },
    /// The prompt is empty.
    #[error("empty prompt")]
    EmptyPrompt,
    /// The engine has stopped.
    #[error("the engine has stopped")]
    Stopped,
}

/// Loading failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The llama.cpp backend could not start.
    #[error("llama.cpp backend: {0}")]
    Backend(String),
    /// The model file could not be loaded.
    #[error("cannot load model {path}: {message}")]
    Load {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The model's chat template does not compile.
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// The grammar compiler could not be built for this vocabulary.
    #[error("grammar compiler: {0}")]
    Grammar(#[from] GrammarError),
    /// The inference context could not be created.
    #[error("cannot create inference context: {0}")]
    Context(String),
}

/// What a generation consumed, reported once the engine is done with it, however it ended
/// (finished, failed, or cancelled by dropping its stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tally {
    /// Whether it got sequences (its prompt was, at least in part, processed).
    pub admitted: bool,
    /// Prompt tokens reused instead of computed.
    pub cached_tokens: u32,
    /// Tokens generated, over all choices.
    pub completion_tokens: u32,
}

/// Counts a generation's work; sends the [`Tally`] when the scheduler drops its last copy.
#[derive(Debug)]
pub(crate) struct TallyGuard {
    pub admitted: std::sync::atomic::AtomicBool,
    pub cached_tokens: std::sync::atomic::AtomicU32,
    pub completion_tokens: std::sync::atomic::AtomicU32,
    tx: Option<tokio::sync::oneshot::Sender<Tally>>,
}

impl Drop for TallyGuard {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Tally {
                admitted: self.admitted.load(Ordering::Acquire),
                cached_tokens: self.cached_tokens.load(Ordering::Acquire),
                completion_tokens: self.completion_tokens.load(Ordering::Acquire),
            });
        }
    }
}

/// Events of one generation. Dropping it cancels the generation.
#[derive(Debug)]
pub struct GenerationStream {
    rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
    tally: Option<tokio::sync::oneshot::Receiver<Tally>>,
}

impl GenerationStream {
    /// The next event, or `None` when the generation is over.
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// Resolves with what the generation consumed once the engine is done with it, even if
    /// this stream was dropped first (the first call takes it; later calls get `None`).
    pub fn tally(&mut self) -> Option<tokio::sync::oneshot::Receiver<Tally>> {
        self.tally.take()
    }

    /// The next event, waiting on the current thread (for use outside async code).
    pub fn blocking_next(&mut self) -> Option<Event> {
        self.rx.blocking_recv()
    }
}

/// A place held in an engine's queue (see [`Engine::hold`]); given back when dropped
/// unless a generation took it.
#[derive(Debug)]
pub struct Place {
    gauges: Arc<Gauges>,
    held: bool,
}

impl Drop for Place {
    fn drop(&mut self) {
        if self.held {
            self.gauges.queued.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Load figures, read without locking.
#[derive(Debug, Default)]
pub(crate) struct Gauges {
    pub queued: AtomicUsize,
    pub running: AtomicUsize,
    /// Prompt tokens of admitted requests, and of those, reused from the prefix cache.
    pub prompt_tokens: std::sync::atomic::AtomicU64,
    pub cached_tokens: std::sync::atomic::AtomicU64,
    /// Admitted requests, and of those, with some prompt reused.
    pub lookups: std::sync::atomic::AtomicU64,
    pub hits: std::sync::atomic::AtomicU64,
    /// Set when the engine thread has ended, however it ended (a panic included).
    pub stopped: std::sync::atomic::AtomicBool,
    /// KV cells holding the sequences in flight, and cells holding cached prefixes on free
    /// streams.
    pub live_cells: AtomicUsize,
    pub cached_cells: AtomicUsize,
    /// Streams that ever ran a sequence (their memory is resident).
    pub warm_streams: AtomicUsize,
    /// The measured pace of the engine, for admission by expected wait.
    pub pace: admission::Pace,
}

/// A snapshot of an engine's load, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadStats {
    /// Requests waiting for a sequence.
    pub queued: u64,
    /// Sequences being decoded.
    pub running: u64,
    /// Sequences it may run at once (KV streams), the long-prompt lane's included.
    pub max_sequences: u64,
    /// KV cells in all: streams × context length.
    pub kv_cells: u64,
    /// KV cells holding the sequences in flight.
    pub kv_cells_live: u64,
    /// KV cells holding cached prefixes on free streams.
    pub kv_cells_cached: u64,
    /// Streams whose memory is resident.
    pub warm_streams: u64,
    /// Admitted requests, and of those, the ones with part of the prompt reused.
    pub prefix_lookups: u64,
    pub prefix_hits: u64,
    /// Prompt tokens of admitted requests, and of those, reused from the prefix cache.
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    /// How long a request arriving now would wait for a sequence, by the engine's estimate
    /// (`None` until it has measured its steps).
    pub expected_wait: Option<Duration>,
}

/// A loaded model and the thread that runs it.
pub struct Engine {
    model: Arc<LoadedModel>,
    gauges: Arc<Gauges>,
    commands: std::sync::mpsc::Sender<scheduler::Command>,
    thread: Option<std::thread::JoinHandle<()>>,
    max_queue: usize,
    max_queue_wait: Option<Duration>,
    batch_size: usize,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("info", &self.model.info)
            .finish()
    }
}

impl Engine {
    /// Loads the GGUF file at `path` and starts its scheduler thread.
    pub fn load(path: &Path, config: &EngineConfig) -> Result<Self, EngineError> {
        let model = Arc::new(LoadedModel::load(path, config)?);
        let gauges = Arc::new(Gauges::default());
        let (commands, thread) = scheduler::start(model.clone(), config, gauges.clone())?;
        Ok(Self {
            model,
            gauges,
            commands,
            thread: Some(thread),
            max_queue: config.max_queue,
            max_queue_wait: config.max_queue_wait,
            batch_size: config.batch_size as usize,
        })
    }

    /// What was loaded.
    pub fn info(&self) -> &ModelInfo {
        &self.model.info
    }

    /// Renders a conversation with the model's chat template, ending with the assistant's
    /// generation prompt; `thinking` is the template's `enable_thinking`.
    pub fn apply_chat_template(
        &self,
        messages: &[serde_json::Value],
        tools: Option<&serde_json::Value>,
        thinking: bool,
    ) -> Result<String, TemplateError> {
        self.model.template.render(messages, tools, true, thinking)
    }

    /// Whether the model's chat template has a thinking mode.
    pub fn template_thinks(&self) -> bool {
        self.model.template.knows_thinking()
    }

    /// Whether the model's chat template renders tool definitions itself.
    pub fn template_renders_tools(&self) -> bool {
        self.model.template.knows_tools()
    }

    /// Compiles an output constraint for this model (cached by schema). CPU work: call it off
    /// the async runtime.
    pub fn compile(&self, constraint: &Constraint) -> Result<Grammar, GrammarError> {
        self.model.grammar.compile(constraint)
    }

    /// Tokenizes templated text (special tokens in the text are parsed as such).
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        self.model.tokenize(text)
    }

    /// Requests waiting for a sequence.
    pub fn queued(&self) -> usize {
        self.gauges.queued.load(Ordering::Relaxed)
    }

    /// Why a new generation of the usual size would be refused now, if it would.
    pub fn refusal(&self) -> Option<SubmitError> {
        self.admissible(self.gauges.queued.load(Ordering::Relaxed), (0, 0))
            .err()
    }

    /// Whether a generation with `ahead` requests queued before it is within both bounds;
    /// `own`: its prompt and output tokens (see [`wait_for`](Self::wait_for)).
    fn admissible(&self, ahead: usize, own: (usize, usize)) -> Result<(), SubmitError> {
        if ahead >= self.max_queue {
            return Err(SubmitError::QueueFull);
        }
        let Some(limit) = self.max_queue_wait else {
            return Ok(());
        };
        match self.wait_for(ahead, own) {
            Some(expected) if expected > limit => Err(SubmitError::WaitTooLong { expected, limit }),
            _ => Ok(()),
        }
    }

    /// How long a request arriving now would wait for a sequence, from the measured step
    /// costs, the usual request size and when each running sequence should end (see the
    /// `admission` module). `None` until the engine has timed its steps.
    pub fn expected_wait(&self) -> Option<Duration> {
        self.wait_for(self.gauges.queued.load(Ordering::Relaxed), (0, 0))
    }

    /// The expected wait with `queued` requests ahead; `own`: the new request's prompt and
    /// output tokens (per choice), the size assumed until some request has been submitted.
    fn wait_for(&self, queued: usize, own: (usize, usize)) -> Option<Duration> {
        let sequences = self.model.info.max_sequences as usize;
        self.gauges
            .pace
            .wait(queued, sequences, self.batch_size, own)
    }

    /// Whether the engine thread is still running (it is not after a fault).
    pub fn is_alive(&self) -> bool {
        !self.gauges.stopped.load(Ordering::Acquire)
    }

    /// Load and prefix-cache figures, read without locking.
    pub fn stats(&self) -> LoadStats {
        let g = &self.gauges;
        let n = |v: usize| v as u64;
        let info = &self.model.info;
        let sequences =
            u64::from(info.max_sequences) + info.long_prompts.map_or(0, |l| u64::from(l.sequences));
        LoadStats {
            queued: n(g.queued.load(Ordering::Relaxed)),
            running: n(g.running.load(Ordering::Relaxed)),
            max_sequences: sequences,
            kv_cells: sequences * u64::from(info.context_length),
            kv_cells_live: n(g.live_cells.load(Ordering::Relaxed)),
            kv_cells_cached: n(g.cached_cells.load(Ordering::Relaxed)),
            warm_streams: n(g.warm_streams.load(Ordering::Relaxed)),
            prefix_lookups: g.lookups.load(Ordering::Relaxed),
            prefix_hits: g.hits.load(Ordering::Relaxed),
            prompt_tokens: g.prompt_tokens.load(Ordering::Relaxed),
            cached_tokens: g.cached_tokens.load(Ordering::Relaxed),
            expected_wait: self.expected_wait(),
        }
    }

    /// Sequences being decoded.
    pub fn running(&self) -> usize {
        self.gauges.running.load(Ordering::Relaxed)
    }

    /// Holds a place in the queue for a request about to be templated and tokenized, so that
    /// requests being prepared count as queued for the next arrivals' checks
    /// ([`refusal`](Self::refusal)). It is given back when dropped unless
    /// [`submit_in`](Self::submit_in) takes it; the bounds are checked there.
    pub fn hold(&self) -> Place {
        self.gauges.queued.fetch_add(1, Ordering::AcqRel);
        Place {
            gauges: self.gauges.clone(),
            held: true,
        }
    }

    /// Queues a generation. Fails at once when the queue is full, when the generation would
    /// wait longer than `max_queue_wait`, or when the prompt cannot fit.
    pub fn submit(&self, generation: Generation) -> Result<GenerationStream, SubmitError> {
        self.submit_in(self.hold(), generation)
    }

    /// The prompt tokens and most output tokens (a choice) of `generation`, or why it cannot
    /// run.
    fn size(&self, generation: &Generation) -> Result<(usize, usize), SubmitError> {
        let prompt = u32::try_from(generation.prompt.len()).unwrap_or(u32::MAX);
        if prompt == 0 {
            return Err(SubmitError::EmptyPrompt);
        }
        let context = self.model.info.context_length;
        if prompt >= context {
            return Err(SubmitError::ContextLengthExceeded { prompt, context });
        }
        let room = context - prompt;
        let output = generation.max_tokens.map_or(room, |m| m.min(room));
        Ok((prompt as usize, output as usize))
    }

    /// Queues a generation in a place held by [`hold`](Self::hold). Fails at once when the
    /// queue is full, when the generation would wait longer than `max_queue_wait`, or when the
    /// prompt cannot fit.
    pub fn submit_in(
        &self,
        mut place: Place,
        generation: Generation,
    ) -> Result<GenerationStream, SubmitError> {
        let (prompt, output) = self.size(&generation)?;
        // The first request's size stands for the usual one until requests finish.
        self.gauges.pace.seed(prompt, output);
        // Requests ahead of this one (its own place is counted in `queued`).
        let ahead = self.gauges.queued.load(Ordering::Acquire).saturating_sub(1);
        self.admissible(ahead, (prompt, output))?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (tally_tx, tally) = tokio::sync::oneshot::channel();
        let guard = Arc::new(TallyGuard {
            admitted: false.into(),
            cached_tokens: 0.into(),
            completion_tokens: 0.into(),
            tx: Some(tally_tx),
        });
        if self
            .commands
            .send(scheduler::Command::Submit(Box::new((
                generation, tx, guard,
            ))))
            .is_err()
        {
            return Err(SubmitError::Stopped);
        }
        // The scheduler gives the place back when it admits the generation.
        place.held = false;
        Ok(GenerationStream {
            rx,
            tally: Some(tally),
        })
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.commands.send(scheduler::Command::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
