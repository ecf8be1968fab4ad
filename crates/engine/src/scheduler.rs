//! The engine thread: continuous batching over llama.cpp contexts, one KV stream per sequence.
//!
//! The thread holds one context per lane (`Lanes`): the flash attention's, and with
//! `long_prompt_tokens` a second one with the plain attention for prompts at least that long
//! (see `model::long_prompts_from`). A request's lane depends only on its prompt's length. Each lane is a
//! `Scheduler` (below: its own streams, queue, prefix cache and step costs); the thread runs a
//! step of each in turn.
//!
//! Each sequence id owns its own KV stream (`kv_unified = false`), laid out from position 0 the
//! same way whatever else runs: that keeps a sequence's arithmetic, and so its output, identical
//! alone and in a full batch (a shared, interleaved cache changes the order of the attention sums
//! and with it the last bits of the logits).
//!
//! Flow of one forward step:
//! 1. Take new commands (block only when nothing is running).
//! 2. Drop the sequences of cancelled requests (their stream was dropped).
//! 3. Admit waiting requests while sequence ids are free. A request with `n` choices gets `n`
//!    sequences (or as many as are free, the rest later); the first computes the prompt, the
//!    others copy its KV state and its last logits when it is done, so the prompt is evaluated
//!    once for all of them.
//!
//! The prefix cache: a sequence id whose sequence ended keeps the KV state of every token it
//! computed (the prompt, and the answer too with flash attention: see `reusable`), remembered
//! in its [`Slot`]. A new request takes the free slot
//! whose tokens share the longest prefix with its prompt and computes only the rest; when a
//! running sequence (or a free slot whose longer context is worth keeping) shares a longer
//! prefix, its KV stream is copied into the least recently used free slot first. So a shared
//! system prompt, the earlier turns of a conversation and the prompt of `n` choices are
//! computed once, whichever sequence computed them, within the memory the KV streams already
//! have (least recently used slots are overwritten first).
//! 4. Decode one token for every decoding sequence in one pass; then prompt chunks with what is
//!    left of `batch_size`, the chunks of sequences with consecutive ids and equal sizes together
//!    in one pass. While sequences decode, a step's prompt rows are also bounded by
//!    `max_prompt_stall` (by the measured cost of a row), so a long prompt is computed over many
//!    steps, each of which gives every running stream its next token (chunked prefill).
//!    Requests that arrive during a step are admitted between its prompt passes (`Inbox`) and
//!    join them.
//! 5. After each pass, sample each sequence that has logits; stream its text; finish it on end of
//!    turn, a stop string, `max_tokens` or the context length, and free its sequence id.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::session::{LlamaStateSeqFlags, SeqState};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::mpsc::UnboundedSender;

use crate::admission::{self, StepCost};
use crate::kvmem;
use crate::model::{backend, LoadedModel};
use crate::priority;
use crate::sampling::{log_probs, Sampler};
use crate::text::{AlignedQueue, StopMatcher, Utf8Decoder};
use crate::{
    EngineConfig, EngineError, Event, FinishReason, Gauges, Generation, TallyGuard, TokenLogprob,
};

pub(crate) enum Command {
    Submit(Box<(Generation, UnboundedSender<Event>, Arc<TallyGuard>)>),
    Shutdown,
}

/// Starts the scheduler thread; returns once its context exists (or failed to).
pub(crate) fn start(
    model: Arc<LoadedModel>,
    config: &EngineConfig,
    gauges: Arc<Gauges>,
) -> Result<(Sender<Command>, std::thread::JoinHandle<()>), EngineError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
    let config = config.clone();
    let thread = std::thread::Builder::new()
        .name("parlance-engine".into())
        .spawn(move || {
            // Before llama.cpp starts its workers on this thread: they inherit it.
            if config.compute_nice > 0 {
                match priority::lower_this_thread(i32::from(config.compute_nice)) {
                    Some(nice) => tracing::debug!(nice, "engine threads run at a lower priority"),
                    None => tracing::debug!("engine threads keep the server's priority"),
                }
            }
            let backend = match backend() {
                Ok(b) => b,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let before = kvmem::Snapshot::take();
            // The flash attention's context, and the plain attention's for long prompts.
            let mut lanes = Vec::new();
            let mut shapes = vec![(
                config.flash_attention,
                model.kv_types,
                model.info.max_sequences,
            )];
            if let Some(l) = model.info.long_prompts {
                shapes.push((false, model.long_kv_types, l.sequences));
            }
            for (i, (flash, kv_types, sequences)) in shapes.into_iter().enumerate() {
                let made =
                    context(&model, backend, &config, flash, kv_types, sequences).map_err(|e| {
                        match e {
                            EngineError::Context(m) if i > 0 => EngineError::Context(format!(
                                "{m} (the plain-attention context for long prompts; \
                             long_prompt_tokens = 0 turns it off)"
                            )),
                            e => e,
                        }
                    });
                match made {
                    Ok(ctx) => lanes.push(Scheduler::new(
                        &model,
                        ctx,
                        &config,
                        gauges.clone(),
                        sequences,
                        flash,
                    )),
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                }
            }
            // The KV cache, zeroed by llama.cpp, stays reserved but not resident until used.
            let released = kvmem::release_zeroed(&before);
            tracing::debug!(released_mib = released >> 20, "zeroed KV memory given back");
            // However the loop ends, a panic included, the engine reports itself stopped.
            let _stopped = StoppedOnDrop(gauges.clone());
            // Admission by expected wait needs the step costs from the first request on.
            lanes[0].calibrate();
            let _ = ready_tx.send(Ok(()));
            let long_from = model.info.long_prompts.map(|l| l.from_tokens as usize);
            Lanes {
                lanes,
                long_from,
                gauges,
            }
            .run(&rx);
        })
        .map_err(|e| EngineError::Context(e.to_string()))?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok((tx, thread)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(EngineError::Context("engine thread ended".into())),
    }
}

/// A llama.cpp context for `sequences` sequences of the model's context length, one KV stream
/// each, with flash or plain attention over KV caches of `kv_types`.
fn context<'m>(
    model: &'m LoadedModel,
    backend: &llama_cpp_2::llama_backend::LlamaBackend,
    config: &EngineConfig,
    flash: bool,
    (type_k, type_v): (
        llama_cpp_2::context::params::KvCacheType,
        llama_cpp_2::context::params::KvCacheType,
    ),
    sequences: u32,
) -> Result<LlamaContext<'m>, EngineError> {
    let threads = i32::try_from(config.thread_count()).unwrap_or(i32::MAX);
    let step = config.batch_size + sequences;
    // Both attention settings compute every query row the same way whatever else is in the
    // batch; the KV types that keep the flash attention there: `kv_types`. The plain attention
    // computes every query row over all of its stream's cells with the same kernels whatever
    // the batch (at least `MIN_CHUNK` rows).
    let policy = if flash {
        llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_ENABLED
    } else {
        llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED
    };
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(model.info.context_length * sequences))
        .with_n_batch(step)
        .with_n_ubatch(step)
        .with_n_seq_max(sequences)
        .with_kv_unified(false)
        .with_n_threads(threads)
        .with_n_threads_batch(threads)
        .with_flash_attention_policy(policy)
        .with_type_k(type_k)
        .with_type_v(type_v);
    model
        .model
        .new_context(backend, params)
        .map_err(|e| EngineError::Context(e.to_string()))
}

struct StoppedOnDrop(Arc<Gauges>);

impl Drop for StoppedOnDrop {
    fn drop(&mut self) {
        self.0.stopped.store(true, Ordering::Release);
        if std::thread::panicking() {
            tracing::error!("the engine thread panicked; the model is no longer served");
        }
    }
}

/// A request as the scheduler tracks it.
struct Request {
    id: u64,
    generation: Generation,
    tx: UnboundedSender<Event>,
    /// Counts the work; reports it when the last copy of the request is dropped.
    tally: Arc<TallyGuard>,
    /// The next choice index not yet given a sequence.
    next_choice: u32,
    /// Choices finished so far.
    finished: u32,
    admitted: bool,
}

/// One choice being generated, on one llama.cpp sequence id.
struct Seq {
    seq_id: i32,
    request: u64,
    choice: u32,
    /// Prompt plus generated tokens; the last one may not be in the KV cache yet.
    tokens: Vec<u32>,
    /// Tokens of `tokens` whose KV state is in the cache.
    n_past: usize,
    prompt_len: usize,
    generated: u32,
    sampler: Sampler,
    decoder: Utf8Decoder,
    stops: StopMatcher,
    /// This sequence's copy of the request's output constraint.
    grammar: Option<llguidance::Matcher>,
    /// Log probabilities waiting for their token's text to be sent.
    logprobs: AlignedQueue<TokenLogprob>,
    /// While set, this sequence waits for the sequence with this id to compute the shared
    /// prompt, then copies its KV state.
    leader: Option<i32>,
    /// While set, this sequence waits for the sequence with this id to compute the first this
    /// many tokens of its prompt (a prefix they share), then copies them instead.
    wait: Option<(i32, usize)>,
    /// Batch index of this sequence's logits after the current decode.
    logits_at: Option<i32>,
    /// Tokens to write next instead of sampling (a thought cut short by its budget).
    forced: VecDeque<u32>,
    /// The thinking budget still to watch (`None` once the thought closed or was cut).
    think_budget: Option<crate::ThinkBudget>,
    /// The end of the text generated so far, while the budget is watched.
    think_tail: String,
    done: bool,
}

/// What a sequence id's KV stream holds while no sequence uses it.
#[derive(Debug, Default, Clone)]
struct Slot {
    /// The tokens whose KV state is in the stream, from position 0.
    tokens: Vec<u32>,
    /// When it was last used (a tick of the scheduler), for least-recently-used choice.
    used: u64,
    /// Whether a sequence ever ran on this stream: some of its memory is resident (the pages of
    /// the cells written to it, by a sequence or by a copy).
    touched: bool,
}

/// Token rows of the larger calibration pass at start-up (see `Scheduler::calibrate`).
const CALIBRATION_ROWS: usize = 32;

/// Streams kept warm for the prefix cache before a new one is touched only when every warm one
/// is busy: resident memory follows the concurrency a server has seen, while a few
/// conversations stay cached even at concurrency 1.
const MIN_WARM_SLOTS: usize = 8;

/// A prefix held in another stream is copied rather than computed again when the copy is the
/// quicker: it moves every cell the source holds (then drops those past the prefix), so it
/// costs in proportion to those: for the default model 13–19 µs a cell (measured: 72 cells,
/// 1.7 MB, in 1.2–1.4 ms; 1,193 cells, 27.5 MB, in 16 ms) against about 5.4 ms to compute a
/// prompt token on 2 cores, so a copy breaks even at some 300 cells per token it saves. This
/// bound leaves a margin of ~5× (for models whose cells are larger against their compute).
const COPY_CELLS_PER_TOKEN: usize = 64;

/// Whether copying `saved` prompt tokens out of a stream holding `held` cells is quicker than
/// computing them.
fn copy_pays(saved: usize, held: usize) -> bool {
    saved > 0 && held <= saved * COPY_CELLS_PER_TOKEN
}

/// A free stream holding at most this many cells past the part a new prompt shares with it is
/// reused in place (those cells are dropped); one holding more is another context still worth
/// keeping cached, and the shared part is copied out of it instead (or, when that does not
/// pay, the least recently used stream is taken).
const MAX_DROPPED_TAIL: usize = 32;

/// A prompt waits for a sequence still computing a prefix it shares only if that gives it at
/// least this many more tokens than it can reuse at once (waiting costs the rest of that
/// sequence's prompt pass).
const MIN_WAIT: usize = 32;

/// The fewest prompt tokens of one sequence computed in one pass (a reused prefix always leaves
/// at least this many to compute, and no chunk is cut shorter). The plain attention took another
/// path for fewer than 2 (F16) or 4 (F32) query rows; flash attention in its per-row path
/// (see `start`) has no such edge, and this floor stays as a margin: every prompt token is
/// computed among at least this many rows of its own sequence, so a prompt's KV state is the
/// same however it was split, cached or not (tested to the last bit of the log probabilities).
const MIN_CHUNK: usize = 4;

/// The fewest prompt rows a step computes while sequences decode, however slow the machine or
/// short `max_prompt_stall`: prompts keep advancing.
const MIN_STALL_ROWS: usize = 16;

/// A sequence id taken for a prompt: the id, how many prompt tokens its stream already holds,
/// and, if it is to copy them from a sequence still computing them, that sequence and how many.
type Taken = (i32, usize, Option<(i32, usize)>);

/// Sequences whose prompts advance together in one pass, in id order, and the tokens each
/// computes in it.
struct PromptGroup {
    /// Indices into `Scheduler::seqs`.
    members: Vec<usize>,
    take: usize,
}

impl PromptGroup {
    fn rows(&self) -> usize {
        self.members.len() * self.take
    }
}

/// How many of a sequence's tokens the prefix cache may offer to later requests: those whose KV
/// state is in its stream, generated ones included when `generated` (flash attention, whose
/// per-row path computes a token's KV state alike in a one-token step and in a prompt chunk);
/// otherwise the prompt's only (the plain attention takes another kernel for a single row).
fn reusable(s: &Seq, generated: bool) -> usize {
    let computed = s.n_past.min(s.tokens.len());
    if generated {
        computed
    } else {
        computed.min(s.prompt_len)
    }
}

/// Copies sequence `src`'s KV state into `dst`'s stream (replacing what `dst` held), cell for
/// cell in the same order; false if llama.cpp refused (then `dst` is empty).
///
/// llama.cpp's own copy between streams (`seq_cp`) copies the whole stream buffer, every cell
/// of every layer (34 MiB a stream for the default model at 2,048 tokens), which costs a pass's
/// worth of memory traffic and makes the whole destination stream resident. Going through the
/// sequence state moves only the cells `src` holds, and `dst` is written only as far as that.
fn copy_stream(ctx: &mut LlamaContext<'_>, src: i32, dst: i32) -> bool {
    let started = std::time::Instant::now();
    let state = ctx.state_seq_get(src, LlamaStateSeqFlags::empty()).ok();
    let bytes = state.as_ref().map_or(0, SeqState::byte_len);
    let copied = state.is_some_and(|state| ctx.state_seq_set(&state, dst).is_ok());
    tracing::trace!(
        src,
        dst,
        bytes,
        micros = started.elapsed().as_micros() as u64,
        "KV copy"
    );
    if !copied {
        let _ = ctx.clear_kv_cache_seq(Some(dst as u32), None, None);
    }
    copied
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The engine thread's contexts ("lanes"): the flash attention's, and the plain attention's for
/// prompts of `long_from` tokens or more when there is one (see `model::long_prompts_from`). Each has its
/// own KV streams, queue, prefix cache and step costs; the thread runs one forward pass at a
/// time, a step of each lane in turn.
struct Lanes<'m> {
    lanes: Vec<Scheduler<'m>>,
    long_from: Option<usize>,
    gauges: Arc<Gauges>,
}

/// The lane a request runs in: the long-prompt lane (the last) when its prompt is at least
/// `long_from` tokens, otherwise the first.
fn lane_for(long_from: Option<usize>, lanes: usize, generation: &Generation) -> usize {
    let long = long_from.is_some_and(|from| generation.prompt.len() >= from);
    usize::from(long).min(lanes - 1)
}

/// Commands taken between the passes of a step. A request for the lane stepping is queued and
/// admitted at once, so that one arriving during a step of several prompt passes joins them
/// instead of waiting for the step to end (its first token can come a whole step sooner). A
/// request for the other lane waits for that lane's turn (`hand_over`), shutting down for the
/// end of the round, in order.
struct Inbox<'r> {
    rx: &'r Receiver<Command>,
    lane: usize,
    lanes: usize,
    long_from: Option<usize>,
    deferred: &'r mut VecDeque<Command>,
}

impl Inbox<'_> {
    /// Queues `cmd` in `lane` when it is a request for this lane (true); otherwise sets it
    /// aside for later.
    fn queue_or_defer(&mut self, lane: &mut Scheduler<'_>, cmd: Command) -> bool {
        match cmd {
            Command::Submit(b) if lane_for(self.long_from, self.lanes, &b.0) == self.lane => {
                let (generation, tx, tally) = *b;
                lane.enqueue(generation, tx, tally);
                true
            }
            cmd => {
                self.deferred.push_back(cmd);
                false
            }
        }
    }

    /// Whether a shutdown has been set aside: nothing after it is taken.
    fn closed(&self) -> bool {
        self.deferred.iter().any(|c| matches!(c, Command::Shutdown))
    }

    /// Before a prompt pass: queues and admits the requests for this lane that have arrived,
    /// and sets the others aside.
    fn take(&mut self, lane: &mut Scheduler<'_>) {
        let mut queued = false;
        // After a shutdown nothing more is taken: the step ends and the thread stops.
        while !self.closed() {
            let Ok(cmd) = self.rx.try_recv() else { break };
            queued |= self.queue_or_defer(lane, cmd);
        }
        if queued {
            lane.drop_cancelled();
            lane.admit();
        }
    }

    /// Before this lane's step: queues and admits the requests for it that the other lane's
    /// step took (those before a shutdown), so they need not wait for another round.
    fn hand_over(&mut self, lane: &mut Scheduler<'_>) {
        let mut queued = false;
        for cmd in std::mem::take(self.deferred) {
            if self.closed() {
                self.deferred.push_back(cmd);
            } else {
                queued |= self.queue_or_defer(lane, cmd);
            }
        }
        if queued {
            lane.drop_cancelled();
            lane.admit();
            lane.compact();
        }
    }
}

impl Lanes<'_> {
    fn run(&mut self, rx: &Receiver<Command>) {
        // Commands taken during a step that were not for the lane stepping.
        let mut deferred = VecDeque::new();
        loop {
            for cmd in deferred.drain(..) {
                if !self.handle(cmd) {
                    return;
                }
            }
            // 1. Commands: wait when idle, otherwise just look.
            let idle = self
                .lanes
                .iter()
                .all(|l| l.seqs.is_empty() && l.waiting.is_empty());
            if idle {
                self.publish();
                match rx.recv() {
                    Ok(cmd) => {
                        if !self.handle(cmd) {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(cmd) => {
                        if !self.handle(cmd) {
                            return;
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            }
            for lane in &mut self.lanes {
                lane.drop_cancelled();
                lane.admit();
                lane.compact();
            }
            self.publish();
            self.publish_releases();
            let mut stepped = Vec::with_capacity(self.lanes.len());
            for i in 0..self.lanes.len() {
                let others = (0..self.lanes.len())
                    .filter(|&j| j != i)
                    .map(|j| self.lanes[j].decoding())
                    .sum();
                let mut inbox = Inbox {
                    rx,
                    lane: i,
                    lanes: self.lanes.len(),
                    long_from: self.long_from,
                    deferred: &mut deferred,
                };
                let lane = &mut self.lanes[i];
                inbox.hand_over(lane);
                lane.others_decoding = others;
                stepped.push(lane.timed_step(&mut inbox));
            }
            // Admission estimates use the flash attention's costs: most requests run there.
            if let (Some(c), true) = (self.lanes[0].cost.coefficients(), stepped[0]) {
                let lane = &mut self.lanes[0];
                self.gauges.pace.set_costs(c);
                lane.steps += 1;
                if lane.steps.is_multiple_of(256) {
                    tracing::debug!(
                        per_pass_us = (c.0 * 1e6) as u64,
                        per_row_us = (c.1 * 1e6) as u64,
                        "step costs"
                    );
                }
            }
        }
    }

    /// Queues a request in the lane its prompt's length picks, or shuts down (false).
    fn handle(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Submit(b) => {
                let (generation, tx, tally) = *b;
                let lane = lane_for(self.long_from, self.lanes.len(), &generation);
                self.lanes[lane].enqueue(generation, tx, tally);
                true
            }
            Command::Shutdown => {
                for lane in &mut self.lanes {
                    lane.fail_all("the engine is shutting down");
                }
                false
            }
        }
    }

    /// Publishes when each running sequence should end (see `Scheduler::release_ends`).
    fn publish_releases(&self) {
        let pace = &self.gauges.pace;
        let (Some(costs), Some((_, usual))) = (pace.costs(), pace.usual()) else {
            return;
        };
        let ends: Vec<f64> = self
            .lanes
            .iter()
            .flat_map(|l| l.release_ends(costs, usual))
            .collect();
        tracing::trace!(
            running = ends.len(),
            first = ends.iter().copied().reduce(f64::min),
            last = ends.iter().copied().reduce(f64::max),
            per_row = costs.1,
            usual,
            "releases"
        );
        pace.set_releases(ends);
    }

    /// Publishes the load figures the metrics read, summed over the lanes.
    fn publish(&self) {
        let (mut running, mut live, mut cached, mut warm) = (0, 0, 0, 0);
        for l in &self.lanes {
            running += l.seqs.len();
            live += l.seqs.iter().map(|s| s.n_past).sum::<usize>();
            cached += l
                .free_ids
                .iter()
                .map(|&id| l.slots[id as usize].tokens.len())
                .sum::<usize>();
            warm += l.slots.iter().filter(|s| s.touched).count();
        }
        let g = &self.gauges;
        g.running.store(running, Ordering::Relaxed);
        g.live_cells.store(live, Ordering::Relaxed);
        g.cached_cells.store(cached, Ordering::Relaxed);
        g.warm_streams.store(warm, Ordering::Relaxed);
    }
}

struct Scheduler<'m> {
    model: &'m LoadedModel,
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
    waiting: VecDeque<Request>,
    active: Vec<Request>,
    seqs: Vec<Seq>,
    free_ids: Vec<i32>,
    batch_size: usize,
    context_length: usize,
    gauges: Arc<Gauges>,
    next_id: u64,
    piece: Vec<u8>,
    /// By sequence id.
    slots: Vec<Slot>,
    prefix_cache: bool,
    /// Whether the KV state of generated tokens is reused too (see `reusable`).
    reuse_generated: bool,
    tick: u64,
    /// Forward passes and token rows of the step under way, and the fit of step times.
    step_passes: usize,
    step_rows: usize,
    cost: StepCost,
    steps: u64,
    /// Longest a step's prompt chunks should hold decoding sequences (`max_prompt_stall`).
    max_stall: Option<std::time::Duration>,
    /// Most prompt tokens of one sequence computed in one pass during the step under way:
    /// `batch_size`, or fewer while sequences decode (see `chunk_limit`).
    chunk: usize,
    /// Sequences decoding in the other lane: a step's prompt rows hold them too.
    others_decoding: usize,
}

impl<'m> Scheduler<'m> {
    fn new(
        model: &'m LoadedModel,
        ctx: LlamaContext<'m>,
        config: &EngineConfig,
        gauges: Arc<Gauges>,
        sequences: u32,
        flash: bool,
    ) -> Self {
        let step = (config.batch_size + sequences) as usize;
        Self {
            model,
            ctx,
            batch: LlamaBatch::new(step, sequences as i32),
            waiting: VecDeque::new(),
            active: Vec::new(),
            seqs: Vec::new(),
            free_ids: (0..sequences as i32).rev().collect(),
            batch_size: config.batch_size as usize,
            context_length: model.info.context_length as usize,
            gauges,
            next_id: 0,
            piece: Vec::new(),
            slots: vec![Slot::default(); sequences as usize],
            prefix_cache: config.prefix_cache,
            reuse_generated: flash,
            tick: 0,
            step_passes: 0,
            step_rows: 0,
            cost: StepCost::default(),
            steps: 0,
            max_stall: config.max_prompt_stall,
            chunk: config.batch_size as usize,
            others_decoding: 0,
        }
    }

    /// Times a pass of one token row and one of [`CALIBRATION_ROWS`] (after one of each,
    /// untimed, that fault in the weights and the compute buffers) on the first stream, then
    /// forgets them: the first estimate of the step costs, refined by every step that follows.
    fn calibrate(&mut self) {
        let rows = CALIBRATION_ROWS.min(self.batch_size + self.slots.len());
        let mut pos = 0;
        for (n, timed) in [(1, false), (rows, false), (1, true), (rows, true)] {
            self.batch.clear();
            for i in 0..n {
                if self
                    .batch
                    .add(LlamaToken(0), (pos + i) as i32, &[0], i + 1 == n)
                    .is_err()
                {
                    return;
                }
            }
            let started = std::time::Instant::now();
            if self.ctx.decode(&mut self.batch).is_err() {
                break;
            }
            if timed {
                self.cost.observe(1, n, started.elapsed().as_secs_f64());
            }
            pos += n;
        }
        self.batch.clear();
        let _ = self.ctx.clear_kv_cache_seq(Some(0), None, None);
        if let Some(c) = self.cost.coefficients() {
            tracing::debug!(
                per_pass_us = (c.0 * 1e6) as u64,
                per_row_us = (c.1 * 1e6) as u64,
                "step costs calibrated"
            );
            self.gauges.pace.set_costs(c);
        }
    }

    /// Sequences that decode in the next step.
    fn decoding(&self) -> usize {
        self.seqs
            .iter()
            .filter(|s| s.leader.is_none() && !s.done && s.n_past >= s.prompt_len)
            .count()
    }

    /// Runs one step (if any sequence is in flight) and folds its time into the step costs;
    /// whether it ran.
    fn timed_step(&mut self, inbox: &mut Inbox<'_>) -> bool {
        if self.seqs.is_empty() {
            return false;
        }
        let started = std::time::Instant::now();
        (self.step_passes, self.step_rows) = (0, 0);
        if let Err(message) = self.step(inbox) {
            tracing::error!(%message, "engine step failed");
            self.fail_all(&message);
            return false;
        }
        self.cost.observe(
            self.step_passes,
            self.step_rows,
            started.elapsed().as_secs_f64(),
        );
        true
    }

    /// When each running sequence should end, in seconds from now (for admission by expected
    /// wait): its prompt still to compute and its tokens still to generate, at the measured
    /// step costs with every sequence decoding. A sequence that cannot end before its limit
    /// (`ignore_eos`, no stop strings, no grammar) runs to it; any other is expected to take the
    /// usual output (within its limit), and one past that is given half of it again.
    fn release_ends(&self, costs: (f64, f64), usual: f64) -> Vec<f64> {
        let sequences = self.slots.len();
        self.seqs
            .iter()
            .filter(|s| !s.done)
            .map(|s| {
                let req = self.active.iter().find(|r| r.id == s.request);
                let cap = req
                    .and_then(|r| r.generation.max_tokens)
                    .map_or(self.context_length, |m| m as usize)
                    .min(self.context_length.saturating_sub(s.prompt_len))
                    as f64;
                let generated = f64::from(s.generated);
                // Without an end of generation or a stop string it runs to its limit.
                let to_limit = req.is_some_and(|r| {
                    r.generation.ignore_eos
                        && r.generation.stop.is_empty()
                        && r.generation.grammar.is_none()
                });
                let expected = if to_limit { cap } else { cap.min(usual) };
                let left = if generated < expected {
                    expected - generated
                } else {
                    (cap - generated).min(usual / 2.0).max(1.0)
                };
                let prompt = if s.leader.is_some() {
                    0
                } else {
                    s.prompt_len.saturating_sub(s.n_past)
                };
                let share =
                    admission::share(costs, sequences, self.batch_size, prompt as f64, left);
                sequences as f64 * share
            })
            .collect()
    }

    /// Queues a submitted request.
    fn enqueue(
        &mut self,
        generation: Generation,
        tx: UnboundedSender<Event>,
        tally: Arc<TallyGuard>,
    ) {
        self.next_id += 1;
        self.waiting.push_back(Request {
            id: self.next_id,
            generation,
            tx,
            tally,
            next_choice: 0,
            finished: 0,
            admitted: false,
        });
    }

    /// Requests whose stream was dropped: free their sequences now.
    fn drop_cancelled(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|r| !r.tx.is_closed() || r.admitted);
        let gone = before - self.waiting.len();
        if gone > 0 {
            self.gauges.queued.fetch_sub(gone, Ordering::AcqRel);
        }
        let cancelled: Vec<u64> = self
            .active
            .iter()
            .chain(self.waiting.iter())
            .filter(|r| r.tx.is_closed())
            .map(|r| r.id)
            .collect();
        for id in cancelled {
            self.remove_request(id);
        }
    }

    fn remove_request(&mut self, id: u64) {
        for i in (0..self.seqs.len()).rev() {
            if self.seqs[i].request == id {
                self.release_seq(i);
            }
        }
        self.active.retain(|r| r.id != id);
        self.waiting.retain(|r| r.id != id);
    }

    /// Sequences waiting for `leader`'s prefix take it once `computed` tokens of it are in;
    /// with `all`, whatever is computed (the leader is going away).
    fn release_waiters_upto(&mut self, leader: i32, computed: usize, all: bool) {
        for j in 0..self.seqs.len() {
            let Some((l, len)) = self.seqs[j].wait else {
                continue;
            };
            if l != leader || (computed < len && !all) {
                continue;
            }
            let take = len.min(computed);
            let id = self.seqs[j].seq_id;
            let took = take > 0 && self.copy_prefix(leader, id, take);
            let n_past = if took { take } else { 0 };
            let f = &mut self.seqs[j];
            f.wait = None;
            f.n_past = n_past;
            if n_past < len {
                // Less was reused than announced at admission: say so again.
                let request = f.request;
                if let Some(r) = self.active.iter().find(|r| r.id == request) {
                    r.tally
                        .cached_tokens
                        .store(n_past as u32, Ordering::Release);
                    let _ = r.tx.send(Event::Admitted {
                        cached_tokens: n_past as u32,
                    });
                }
            }
        }
    }

    fn release_waiters(&mut self, leader: i32, computed: usize) {
        self.release_waiters_upto(leader, computed, false);
    }

    /// Frees a sequence's id, removing it from `seqs` (indices shift). With the prefix cache its
    /// KV state stays, for a later request that starts with the same tokens.
    fn release_seq(&mut self, i: usize) {
        let leader = self.seqs[i].seq_id;
        let computed = self.seqs[i]
            .n_past
            .min(self.seqs[i].prompt_len)
            .min(self.seqs[i].tokens.len());
        if self.seqs[i].leader.is_none() && self.seqs[i].wait.is_none() {
            self.release_waiters_upto(leader, computed, true);
        }
        let seq = self.seqs.remove(i);
        let id = seq.seq_id;
        self.tick += 1;
        let slot = &mut self.slots[id as usize];
        slot.used = self.tick;
        slot.tokens.clear();
        if self.prefix_cache && seq.leader.is_none() {
            // A reused prefix must give the same answer as a computed one: generated tokens
            // count only where their KV state equals a prompt's (`reusable`).
            let keep = reusable(&seq, self.reuse_generated);
            slot.tokens.extend_from_slice(&seq.tokens[..keep]);
            // A free stream holding a prefix of the same tokens (the one this sequence moved
            // from) is now redundant: it goes first when a stream must be overwritten.
            let held = &seq.tokens[..keep];
            for &other in &self.free_ids {
                let o = &mut self.slots[other as usize];
                if !o.tokens.is_empty() && held.starts_with(&o.tokens) {
                    o.used = 0;
                }
            }
        } else {
            let _ = self.ctx.clear_kv_cache_seq(Some(id as u32), None, None);
        }
        self.free_ids.push(id);
    }

    /// Keeps the ids of the sequences in flight at the low end, `0..k`. llama.cpp cuts a batch
    /// over several KV streams into one micro-batch per run of consecutive sequence ids, and
    /// each micro-batch is a pass over all the weights: scattered ids would cost a pass each per
    /// step. A sequence above the range moves down into a free id by a copy of its KV stream;
    /// the stream it leaves keeps its prompt as a cached prefix.
    fn compact(&mut self) {
        // One sequence is one micro-batch wherever it is; several need consecutive ids. Pick the
        // window of ids that already holds the most of them, and move the others in.
        let k = self.seqs.len();
        let n = self.slots.len();
        if k < 2 || k > n {
            return;
        }
        let inside = |a: usize, seqs: &[Seq]| {
            seqs.iter()
                .filter(|s| (a..a + k).contains(&(s.seq_id as usize)))
                .count()
        };
        // Once enough streams are warm, a window that would touch a stream never used before
        // comes last (its memory would become resident).
        let warm = self.warm_enough();
        let all_warm = |a: usize| !warm || self.slots[a..a + k].iter().all(|s| s.touched);
        let Some(a) =
            (0..=n - k).max_by_key(|&a| (all_warm(a), inside(a, &self.seqs), std::cmp::Reverse(a)))
        else {
            return;
        };
        let (lo, hi) = (a as i32, (a + k) as i32);
        while let Some(i) = self
            .seqs
            .iter()
            .position(|s| s.seq_id < lo || s.seq_id >= hi)
        {
            // Into the least recently used free id of the window.
            let warm = self.warm_enough();
            let Some(pos) = self
                .free_ids
                .iter()
                .enumerate()
                .filter(|(_, &id)| id >= lo && id < hi)
                .min_by_key(|(_, &id)| self.victim_order(id, warm))
                .map(|(p, _)| p)
            else {
                return;
            };
            let new = self.free_ids.swap_remove(pos);
            self.touch(new);
            let old = self.seqs[i].seq_id;
            let empty = self.seqs[i].leader.is_some()
                || self.seqs[i].wait.is_some()
                || self.seqs[i].n_past == 0;
            self.slots[new as usize].tokens.clear();
            let moved = if empty {
                self.ctx
                    .clear_kv_cache_seq(Some(new as u32), None, None)
                    .is_ok()
            } else {
                copy_stream(&mut self.ctx, old, new)
            };
            if !moved {
                self.free_ids.push(new);
                return;
            }
            tracing::trace!(old, new, "sequence moved down");
            let s = &self.seqs[i];
            let keep = if empty || !self.prefix_cache {
                0
            } else {
                reusable(s, self.reuse_generated)
            };
            self.tick += 1;
            let slot = &mut self.slots[old as usize];
            slot.tokens.clear();
            slot.tokens.extend_from_slice(&self.seqs[i].tokens[..keep]);
            slot.used = self.tick;
            if keep == 0 {
                let _ = self.ctx.clear_kv_cache_seq(Some(old as u32), None, None);
            }
            self.free_ids.push(old);
            self.seqs[i].seq_id = new;
            for f in &mut self.seqs {
                if f.leader == Some(old) {
                    f.leader = Some(new);
                }
                if let Some((l, len)) = f.wait {
                    if l == old {
                        f.wait = Some((new, len));
                    }
                }
            }
        }
    }

    /// Whether enough streams are warm that a stream never used should come last.
    fn warm_enough(&self) -> bool {
        self.slots.iter().filter(|s| s.touched).count() >= MIN_WARM_SLOTS
    }

    /// Which free stream to overwrite first (the smallest): the least recently used, except
    /// that once enough streams are warm (`warm_enough`), a stream never used comes last.
    fn victim_order(&self, id: i32, warm_enough: bool) -> (bool, u64, i32) {
        let slot = &self.slots[id as usize];
        (!slot.touched && warm_enough, slot.used, id)
    }

    /// Marks a stream as used by a sequence (its memory becomes resident).
    fn touch(&mut self, id: i32) {
        let slot = &mut self.slots[id as usize];
        if !slot.touched {
            tracing::debug!(id, running = self.seqs.len(), "new KV stream in use");
            slot.touched = true;
        }
    }

    /// Takes a free sequence id for a prompt, reusing what the KV streams hold; returns it and
    /// how many of the prompt's tokens are already computed in it.
    fn take_slot(&mut self, prompt: &[u32]) -> Option<Taken> {
        if self.free_ids.is_empty() {
            return None;
        }
        // The least recently used free slot: the one to overwrite.
        let warm = self.warm_enough();
        let lru = self
            .free_ids
            .iter()
            .enumerate()
            .min_by_key(|(_, id)| self.victim_order(**id, warm))
            .map(|(i, _)| i)?;
        if !self.prefix_cache || prompt.is_empty() {
            let id = self.free_ids.swap_remove(lru);
            self.slots[id as usize].tokens.clear();
            let _ = self.ctx.clear_kv_cache_seq(Some(id as u32), None, None);
            return Some((id, 0, None));
        }
        // At least the last tokens are computed again: their logits start the answer, and they
        // make a pass of at least `MIN_CHUNK`.
        let usable = prompt.len().saturating_sub(MIN_CHUNK);
        let (best_free, free_len) = self
            .free_ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let slot = &self.slots[*id as usize];
                (i, common_prefix(&slot.tokens, prompt).min(usable))
            })
            .max_by_key(|(i, len)| (*len, self.slots[self.free_ids[*i] as usize].used))?;
        let running = self
            .seqs
            .iter()
            .filter(|s| s.leader.is_none() && s.wait.is_none() && s.n_past > 0)
            .map(|s| {
                let computed = reusable(s, self.reuse_generated);
                let len = common_prefix(&s.tokens[..computed], prompt);
                (s.seq_id, len.min(usable), s.n_past)
            })
            .max_by_key(|(_, len, _)| *len);
        // A sequence still computing its prompt will have much more of this one: wait for it
        // (requests that share a long system prompt and arrive together compute it once).
        let have = running.map_or(free_len, |(_, len, _)| len.max(free_len));
        let pending = self
            .seqs
            .iter()
            .filter(|s| s.leader.is_none() && s.wait.is_none() && !s.done)
            .map(|s| {
                let len = common_prefix(&s.tokens[..s.prompt_len.min(s.tokens.len())], prompt);
                (s.seq_id, len.min(usable))
            })
            .filter(|(_, len)| *len >= have + MIN_WAIT)
            .max_by_key(|(_, len)| *len);
        if let Some((src, len)) = pending {
            let id = self.free_ids.swap_remove(lru);
            self.slots[id as usize].tokens.clear();
            let _ = self.ctx.clear_kv_cache_seq(Some(id as u32), None, None);
            tracing::debug!(
                src,
                id,
                len,
                "prefix cache: wait for a sequence computing the prefix"
            );
            return Some((id, 0, Some((src, len))));
        }
        // A running sequence shares more, enough to pay for copying its stream: copy it.
        if let Some((src, len, _)) =
            running.filter(|&(_, len, held)| len > free_len && copy_pays(len - free_len, held))
        {
            let id = self.free_ids.swap_remove(lru);
            tracing::debug!(src, id, len, "prefix cache: copy from a running sequence");
            if self.copy_prefix(src, id, len) {
                return Some((id, len, None));
            }
            return Some((id, 0, None));
        }
        let best_id = self.free_ids[best_free];
        let held = self.slots[best_id as usize].tokens.len();
        // The best free slot holds a longer context than this prompt would keep of it (another
        // conversation): keep that context, and copy the shared part into the least recently
        // used slot, or, when the copy would not pay, just take that slot.
        let idx = if held > free_len + MAX_DROPPED_TAIL && lru != best_free {
            if copy_pays(free_len, held) {
                let id = self.free_ids.swap_remove(lru);
                tracing::debug!(
                    src = best_id,
                    id,
                    len = free_len,
                    "prefix cache: copy from a free slot"
                );
                if self.copy_prefix(best_id, id, free_len) {
                    return Some((id, free_len, None));
                }
                return Some((id, 0, None));
            }
            lru
        } else {
            best_free
        };
        let id = self.free_ids.swap_remove(idx);
        let slot = &mut self.slots[id as usize];
        let keep = common_prefix(&slot.tokens, prompt).min(usable);
        slot.tokens.truncate(keep);
        let cut = if keep == 0 { None } else { Some(keep as u32) };
        if self
            .ctx
            .clear_kv_cache_seq(Some(id as u32), cut, None)
            .is_err()
        {
            slot.tokens.clear();
            let _ = self.ctx.clear_kv_cache_seq(Some(id as u32), None, None);
            return Some((id, 0, None));
        }
        tracing::debug!(
            id,
            keep,
            held = self.slots[id as usize].tokens.len(),
            "prefix cache: reuse a slot"
        );
        Some((id, keep, None))
    }

    /// Copies the first `len` positions of `src`'s stream into `dst`'s (whose own state is
    /// dropped); false (and `dst` empty) if llama.cpp refused.
    fn copy_prefix(&mut self, src: i32, dst: i32, len: usize) -> bool {
        self.slots[dst as usize].tokens.clear();
        let ok = copy_stream(&mut self.ctx, src, dst)
            && self
                .ctx
                .clear_kv_cache_seq(Some(dst as u32), Some(len as u32), None)
                .is_ok();
        if !ok {
            let _ = self.ctx.clear_kv_cache_seq(Some(dst as u32), None, None);
        }
        ok
    }

    fn admit(&mut self) {
        while let Some(front) = self.waiting.front() {
            if self.free_ids.is_empty() {
                return;
            }
            let prompt_len = front.generation.prompt.len();
            let Some(mut req) = self.waiting.pop_front() else {
                return;
            };
            let remaining = req.generation.n - req.next_choice;
            let k = remaining.min(self.free_ids.len() as u32);
            let mut leader = None;
            let mut cached = 0;
            for j in 0..k {
                // The first sequence computes the prompt (from what the cache holds); the others
                // take its state when it is done.
                let prompt: &[u32] = if leader.is_none() {
                    &req.generation.prompt
                } else {
                    &[]
                };
                let Some((seq_id, reused, wait)) = self.take_slot(prompt) else {
                    break;
                };
                self.touch(seq_id);
                if leader.is_none() {
                    cached = wait.map_or(reused, |(_, len)| len);
                }
                let choice = req.next_choice + j;
                let g = &req.generation;
                self.seqs.push(Seq {
                    seq_id,
                    request: req.id,
                    choice,
                    tokens: g.prompt.clone(),
                    n_past: reused,
                    prompt_len,
                    generated: 0,
                    sampler: Sampler::new(g.sampling.clone(), &g.prompt, u64::from(choice)),
                    decoder: Utf8Decoder::default(),
                    stops: StopMatcher::new(&g.stop),
                    logprobs: AlignedQueue::default(),
                    grammar: g.grammar.as_ref().map(|g| g.0.deep_clone()),
                    forced: VecDeque::new(),
                    think_budget: g.think_budget.clone(),
                    think_tail: String::new(),
                    leader,
                    wait,
                    logits_at: None,
                    done: false,
                });
                leader = leader.or(Some(seq_id));
            }
            req.next_choice += k;
            if !req.admitted {
                req.admitted = true;
                req.tally.admitted.store(true, Ordering::Release);
                req.tally
                    .cached_tokens
                    .store(cached as u32, Ordering::Release);
                self.gauges.queued.fetch_sub(1, Ordering::AcqRel);
                self.gauges
                    .prompt_tokens
                    .fetch_add(prompt_len as u64, Ordering::Relaxed);
                self.gauges
                    .cached_tokens
                    .fetch_add(cached as u64, Ordering::Relaxed);
                self.gauges.lookups.fetch_add(1, Ordering::Relaxed);
                if cached > 0 {
                    self.gauges.hits.fetch_add(1, Ordering::Relaxed);
                }
                let _ = req.tx.send(Event::Admitted {
                    cached_tokens: cached as u32,
                });
            }
            let more = req.next_choice < req.generation.n;
            let placeholder = more.then(|| Request {
                id: req.id,
                generation: req.generation.clone(),
                tx: req.tx.clone(),
                tally: req.tally.clone(),
                next_choice: req.next_choice,
                finished: 0,
                admitted: true,
            });
            if let Some(existing) = self.active.iter_mut().find(|r| r.id == req.id) {
                existing.next_choice = req.next_choice;
            } else {
                self.active.push(req);
            }
            if let Some(p) = placeholder {
                // More choices than free sequences: the rest wait at the front of the queue.
                self.waiting.push_front(p);
                return;
            }
        }
    }

    /// Adds one token for every decoding sequence, in sequence-id order; returns how many.
    fn build_decode_batch(&mut self) -> Result<usize, String> {
        self.batch.clear();
        let mut order: Vec<usize> = (0..self.seqs.len()).collect();
        order.sort_by_key(|&i| self.seqs[i].seq_id);
        let mut n = 0usize;
        for i in order {
            let s = &mut self.seqs[i];
            s.logits_at = None;
            if s.leader.is_some() || s.done {
                continue;
            }
            if s.n_past + 1 == s.tokens.len() && s.n_past >= s.prompt_len {
                let tok = s.tokens[s.n_past];
                self.batch
                    .add(LlamaToken(tok as i32), s.n_past as i32, &[s.seq_id], true)
                    .map_err(|e| e.to_string())?;
                s.logits_at = Some(n as i32);
                s.n_past += 1;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Decodes the batch as built: `streams` sequences' tokens.
    fn decode(&mut self, what: &'static str, streams: usize) -> Result<(), String> {
        let started = std::time::Instant::now();
        self.ctx
            .decode(&mut self.batch)
            .map_err(|e| e.to_string())?;
        self.step_passes += 1;
        self.step_rows += self.batch.n_tokens() as usize;
        tracing::trace!(
            what,
            tokens = self.batch.n_tokens(),
            streams,
            running = self.seqs.len(),
            micros = started.elapsed().as_micros() as u64,
            "forward pass"
        );
        Ok(())
    }

    /// One forward step: every decoding sequence's next token in one pass, then prompt chunks
    /// within what is left of `batch_size` (and, while sequences decode, of `chunk_limit`), as
    /// many sequences' in one pass as can take the same number of tokens (`prompt_group`).
    ///
    /// Decoding and prompts stay in separate passes: llama.cpp splits a batch that mixes
    /// sequences with different token counts into micro-batches of equal counts per sequence,
    /// so a prompt batched with decoding sequences would be cut into pieces of one token whose
    /// size depends on the load.
    fn step(&mut self, inbox: &mut Inbox<'_>) -> Result<(), String> {
        let decoding = self.build_decode_batch()?;
        if decoding > 0 {
            self.decode("decode", decoding)?;
            self.sample_all();
        }
        // Prompt chunks, oldest request first, with neighbours that can take as many tokens;
        // requests that arrived meanwhile are admitted before each pass and join in.
        self.chunk = self.chunk_limit(decoding);
        let mut budget = self.chunk.min(self.batch_size.saturating_sub(decoding));
        let mut prefilled = false;
        while let Some(group) = {
            inbox.take(self);
            self.prompt_group(budget, prefilled)
        } {
            prefilled = true;
            budget = budget.saturating_sub(group.rows());
            self.prefill(&group)?;
        }
        for s in &mut self.seqs {
            s.logits_at = None;
        }
        self.reap();
        self.compact();
        Ok(())
    }

    /// Most prompt rows of the step while `decoding` sequences decode: `batch_size` when none
    /// do (or no stall bound is set); otherwise as many as the step costs say fit in
    /// `max_prompt_stall` (at least `MIN_STALL_ROWS`), so that a long prompt is computed over
    /// several steps, each of which also gives every decoding sequence its next token.
    fn chunk_limit(&self, decoding: usize) -> usize {
        let decoding = decoding + self.others_decoding;
        let (Some(stall), true) = (self.max_stall, decoding > 0) else {
            return self.batch_size;
        };
        // This context's own costs once measured (the long-prompt lane's rows cost more).
        let Some((per_pass, per_row)) = self
            .cost
            .coefficients()
            .or_else(|| self.gauges.pace.costs())
        else {
            return self.batch_size;
        };
        let rows = (stall.as_secs_f64() - per_pass).max(0.0) / per_row;
        (rows as usize).clamp(MIN_STALL_ROWS, self.batch_size.max(MIN_STALL_ROWS))
    }

    /// How many tokens of its prompt sequence `i` would compute next on its own: the rest, or
    /// the step's chunk (`batch_size`, less while others decode) of it, leaving no last chunk
    /// shorter than `MIN_CHUNK`. `None` when it has none to compute now (decoding, done, or
    /// waiting for another's prefix).
    fn prompt_take(&self, i: usize) -> Option<(usize, usize)> {
        let s = &self.seqs[i];
        let end = s.prompt_len.min(s.tokens.len());
        if s.leader.is_some() || s.wait.is_some() || s.done || s.n_past >= end {
            return None;
        }
        let rest = end - s.n_past;
        let mut take = rest.min(self.chunk);
        let left = rest - take;
        if left > 0 && left < MIN_CHUNK {
            take = take.saturating_sub(MIN_CHUNK - left).max(1);
        }
        Some((take, rest))
    }

    /// The next prompt pass: the oldest sequence with prompt to compute, and the sequences on
    /// the ids next to it that can compute as many tokens in the same pass, within `budget`
    /// tokens (the first pass of a step always runs, so running streams never starve a prompt).
    ///
    /// llama.cpp computes a batch over several KV streams as one pass only when its sequences
    /// have consecutive ids and equal token counts; each one's rows are then computed as they
    /// would be alone (flash attention per row, the weight products per row), so grouping changes
    /// no sequence's arithmetic.
    fn prompt_group(&self, budget: usize, prefilled: bool) -> Option<PromptGroup> {
        let anchor = (0..self.seqs.len()).find(|&i| self.prompt_take(i).is_some())?;
        let (own, _) = self.prompt_take(anchor)?;
        if own > budget && prefilled {
            return None;
        }
        // Taking `t` must leave a sequence none of its prompt or at least `MIN_CHUNK`.
        let fits = |i: usize, t: usize| {
            self.prompt_take(i).is_some_and(|(own, rest)| {
                own >= t && (rest == t || rest >= t + MIN_CHUNK) && t >= MIN_CHUNK.min(rest)
            })
        };
        let by_id = |id: i32| self.seqs.iter().position(|s| s.seq_id == id);
        let group_for = |t: usize| -> Vec<usize> {
            let mut members = vec![anchor];
            let limit = budget.max(t);
            let id = self.seqs[anchor].seq_id;
            for step in [1i32, -1] {
                let mut next = id + step;
                while (members.len() + 1) * t <= limit {
                    match by_id(next) {
                        Some(j) if fits(j, t) => members.push(j),
                        _ => break,
                    }
                    next += step;
                }
            }
            members.sort_by_key(|&j| self.seqs[j].seq_id);
            members
        };
        // The anchor's own chunk, or the shortest chunk among the other prompts (so that more
        // of them finish their prompts in this pass): whichever computes more.
        let shortest = (0..self.seqs.len())
            .filter(|&j| j != anchor)
            .filter_map(|j| self.prompt_take(j).map(|(own, _)| own))
            .filter(|&t| t < own && t >= MIN_CHUNK)
            .min();
        let mut best = (group_for(own), own);
        if let Some(t) = shortest.filter(|&t| fits(anchor, t)) {
            let g = group_for(t);
            if g.len() * t > best.0.len() * best.1 {
                best = (g, t);
            }
        }
        Some(PromptGroup {
            members: best.0,
            take: best.1,
        })
    }

    /// Computes `take` prompt tokens of each sequence of `group` in one pass; sequences whose
    /// prompt is then complete sample their first token (choices waiting on them take a copy).
    fn prefill(&mut self, group: &PromptGroup) -> Result<(), String> {
        self.batch.clear();
        let mut finished = Vec::new();
        for &i in &group.members {
            let s = &self.seqs[i];
            let (start, end) = (s.n_past, s.tokens.len());
            for p in start..start + group.take {
                let last = p + 1 == end;
                if last {
                    finished.push((i, self.batch.n_tokens()));
                }
                self.batch
                    .add(LlamaToken(s.tokens[p] as i32), p as i32, &[s.seq_id], last)
                    .map_err(|e| e.to_string())?;
            }
        }
        self.decode("prompt", group.members.len())?;
        for &i in &group.members {
            self.seqs[i].n_past += group.take;
            let (id, n_past) = (self.seqs[i].seq_id, self.seqs[i].n_past);
            self.release_waiters(id, n_past);
        }
        if finished.is_empty() {
            return Ok(());
        }
        for s in &mut self.seqs {
            s.logits_at = None;
        }
        for (i, at) in finished {
            let (id, n_past) = (self.seqs[i].seq_id, self.seqs[i].n_past);
            self.seqs[i].logits_at = Some(at);
            // Choices waiting on this prompt take its KV state and logits.
            for j in 0..self.seqs.len() {
                if self.seqs[j].leader == Some(id) {
                    let f = self.seqs[j].seq_id;
                    if !copy_stream(&mut self.ctx, id, f) {
                        return Err(format!("could not copy KV stream {id} to {f}"));
                    }
                    let f = &mut self.seqs[j];
                    f.n_past = n_past;
                    f.leader = None;
                    f.logits_at = Some(at);
                }
            }
        }
        self.sample_all();
        Ok(())
    }

    fn sample_all(&mut self) {
        for i in 0..self.seqs.len() {
            let Some(at) = self.seqs[i].logits_at else {
                continue;
            };
            let request = self.seqs[i].request;
            let Some(req) = self.active.iter().find(|r| r.id == request) else {
                continue;
            };
            let g = &req.generation;
            let banned: &[u32] = if g.ignore_eos { &self.model.eog } else { &[] };
            let max_tokens = g.max_tokens;
            let want_logprobs = g.logprobs;
            let tx = req.tx.clone();
            req.tally.completion_tokens.fetch_add(1, Ordering::AcqRel);
            let logits = self.ctx.get_logits_ith(at);
            let s = &mut self.seqs[i];
            let mask = match s.grammar.as_mut().map(|m| m.compute_mask_or_eos()) {
                None => None,
                Some(Ok(mask)) => Some(mask),
                Some(Err(e)) => {
                    tracing::error!(error = %e, "grammar failed");
                    None
                }
            };
            let token = match (s.forced.pop_front(), &mask) {
                (Some(t), _) => t,
                (None, Some(mask)) => {
                    // The grammar decides when the output is complete, not `ignore_eos`.
                    s.sampler
                        .sample_allowed(logits, &[], |t| mask.is_allowed(t))
                }
                (None, None) => s.sampler.sample(logits, banned),
            };
            s.sampler.accept(token);
            let mut grammar_done = false;
            if let Some(m) = s.grammar.as_mut() {
                if !self.model.eog.contains(&token) {
                    if let Err(e) = m.consume_token(token) {
                        tracing::error!(error = %e, "grammar rejected a token it allowed");
                    }
                    grammar_done = m.is_stopped();
                }
            }
            s.generated += 1;
            if let Some(b) = &s.think_budget {
                // The text so far, as far back as the closing text is long.
                self.model.piece(token, &mut self.piece);
                s.think_tail.push_str(&String::from_utf8_lossy(&self.piece));
                let keep = b.close_text.len() * 2;
                if s.think_tail.len() > keep {
                    let mut cut = s.think_tail.len() - keep;
                    while !s.think_tail.is_char_boundary(cut) {
                        cut += 1;
                    }
                    s.think_tail.drain(..cut);
                }
                if s.think_tail.contains(b.close_text.as_str()) || b.close.is_empty() {
                    s.think_budget = None;
                } else if s.generated >= b.tokens {
                    // Out of budget: the close comes next, then the answer.
                    s.forced.extend(b.close.iter().copied());
                    s.think_budget = None;
                }
            }
            let is_eog = self.model.eog.contains(&token);
            if let (Some(top), false) = (want_logprobs, is_eog) {
                let (logprob, best) = log_probs(logits, token, top as usize);
                let mut piece = Vec::new();
                let top = best
                    .into_iter()
                    .map(|(t, lp)| {
                        self.model.piece(t, &mut piece);
                        (piece.clone(), lp)
                    })
                    .collect();
                self.model.piece(token, &mut piece);
                let len = piece.len();
                s.logprobs.push(
                    len,
                    TokenLogprob {
                        bytes: piece,
                        logprob,
                        top,
                    },
                );
            }
            let mut finish = None;
            let mut matched = None;
            let mut flush = false;
            let mut cut = false;
            let mut text = String::new();
            if is_eog {
                finish = Some(FinishReason::Stop);
                flush = true;
            } else {
                self.model.piece(token, &mut self.piece);
                let decoded = s.decoder.push(&self.piece);
                let out = s.stops.push(&decoded);
                text = out.text;
                if out.stopped {
                    finish = Some(FinishReason::Stop);
                    matched = out.matched;
                    cut = true;
                }
            }
            s.tokens.push(token);
            if finish.is_none() && grammar_done {
                // The constrained output is complete: nothing more may follow.
                finish = Some(FinishReason::Stop);
                flush = true;
            }
            if finish.is_none()
                && (max_tokens.is_some_and(|m| s.generated >= m)
                    || s.tokens.len() >= self.context_length)
            {
                finish = Some(FinishReason::Length);
                flush = true;
            }
            if flush {
                // Ending without a stop-string match: release what was held back.
                let rest = s.decoder.finish();
                let out = s.stops.push(&rest);
                text.push_str(&out.text);
                if out.stopped {
                    cut = true;
                    matched = out.matched;
                    finish = Some(FinishReason::Stop);
                } else {
                    text.push_str(&s.stops.finish());
                }
            }
            let mut logprobs = s.logprobs.release(text.len());
            if cut {
                logprobs.extend(s.logprobs.cut());
            } else if flush {
                logprobs.extend(s.logprobs.drain());
            }
            if !text.is_empty() || !logprobs.is_empty() {
                let _ = tx.send(Event::Text {
                    choice: s.choice,
                    text,
                    logprobs,
                });
            }
            if let Some(reason) = finish {
                s.done = true;
                let _ = tx.send(Event::Finished {
                    choice: s.choice,
                    reason,
                    stop_sequence: matched,
                    completion_tokens: s.generated,
                });
            }
        }
    }

    /// Frees finished sequences and completed requests.
    fn reap(&mut self) {
        for i in (0..self.seqs.len()).rev() {
            if self.seqs[i].done {
                let request = self.seqs[i].request;
                self.release_seq(i);
                if let Some(r) = self.active.iter_mut().find(|r| r.id == request) {
                    r.finished += 1;
                }
            }
        }
        let pace = &self.gauges.pace;
        self.active.retain(|r| {
            let open = r.finished < r.generation.n;
            if !open {
                // Its size, for the estimate of how long the queue takes to move.
                let cached = r.tally.cached_tokens.load(Ordering::Acquire) as usize;
                let output = r.tally.completion_tokens.load(Ordering::Acquire) as usize;
                let choices = r.generation.n.max(1) as usize;
                pace.finished(
                    r.generation.prompt.len().saturating_sub(cached),
                    output / choices,
                );
            }
            open
        });
    }

    fn fail_all(&mut self, message: &str) {
        for r in self.active.iter().chain(self.waiting.iter()) {
            let _ = r.tx.send(Event::Failed {
                message: message.to_owned(),
            });
        }
        let unadmitted = self.waiting.iter().filter(|r| !r.admitted).count();
        self.gauges.queued.fetch_sub(unadmitted, Ordering::AcqRel);
        self.ctx.clear_kv_cache();
        for slot in &mut self.slots {
            slot.tokens.clear();
        }
        self.free_ids.extend(self.seqs.drain(..).map(|s| s.seq_id));
        self.active.clear();
        self.waiting.clear();
    }
}
