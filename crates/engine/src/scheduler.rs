//! The engine thread: continuous batching over one llama.cpp context, one KV stream per sequence.
//!
//! Each sequence id owns its own KV stream (`kv_unified = false`), laid out from position 0 the
//! same way whatever else runs: that keeps a sequence's arithmetic, and so its output, identical
//! alone and in a full batch (a shared, interleaved cache changes the order of the attention sums
//! and with it the last bits of the logits).
//!
//! Flow of one forward step:
//! 1. Take new commands (block only when nothing is running).
//! 2. Drop the sequences of cancelled requests (their stream was dropped) and clear their KV.
//! 3. Admit waiting requests while sequence ids are free. A request with `n` choices gets `n`
//!    sequences (or as many as are free, the rest later); the first computes the prompt, the
//!    others copy its KV state and its last logits when it is done, so the prompt is evaluated
//!    once for all of them.
//! 4. Build one batch: one token for every decoding sequence first, then prompt chunks with what
//!    is left of `batch_size` (chunked prefill, so a long prompt never stalls running streams).
//! 5. Decode, then sample each sequence that has logits; stream its text; finish it on end of
//!    turn, a stop string, `max_tokens` or the context length, and free its sequence id.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::mpsc::UnboundedSender;

use crate::model::{backend, LoadedModel};
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
            let threads = config.threads.map_or_else(
                || std::thread::available_parallelism().map_or(1, |n| n.get() as i32),
                |t| t as i32,
            );
            let step = config.batch_size + config.max_sequences;
            let params = LlamaContextParams::default()
                .with_n_ctx(NonZeroU32::new(
                    model.info.context_length * config.max_sequences,
                ))
                .with_n_batch(step)
                .with_n_ubatch(step)
                .with_n_seq_max(config.max_sequences)
                .with_kv_unified(false)
                .with_n_threads(threads)
                .with_n_threads_batch(threads);
            let backend = match backend() {
                Ok(b) => b,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let ctx = match model.model.new_context(backend, params) {
                Ok(c) => c,
                Err(e) => {
                    let _ = ready_tx.send(Err(EngineError::Context(e.to_string())));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            // However the loop ends, a panic included, the engine reports itself stopped.
            let _stopped = StoppedOnDrop(gauges.clone());
            let mut s = Scheduler::new(&model, ctx, &config, gauges);
            s.run(&rx);
        })
        .map_err(|e| EngineError::Context(e.to_string()))?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok((tx, thread)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(EngineError::Context("engine thread ended".into())),
    }
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
}

impl<'m> Scheduler<'m> {
    fn new(
        model: &'m LoadedModel,
        ctx: LlamaContext<'m>,
        config: &EngineConfig,
        gauges: Arc<Gauges>,
    ) -> Self {
        let step = (config.batch_size + config.max_sequences) as usize;
        Self {
            model,
            ctx,
            batch: LlamaBatch::new(step, config.max_sequences as i32),
            waiting: VecDeque::new(),
            active: Vec::new(),
            seqs: Vec::new(),
            free_ids: (0..config.max_sequences as i32).rev().collect(),
            batch_size: config.batch_size as usize,
            context_length: model.info.context_length as usize,
            gauges,
            next_id: 0,
            piece: Vec::new(),
        }
    }

    fn run(&mut self, rx: &Receiver<Command>) {
        loop {
            // 1. Commands: wait when idle, otherwise just look.
            if self.seqs.is_empty() && self.waiting.is_empty() {
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
            self.drop_cancelled();
            self.admit();
            self.gauges
                .running
                .store(self.seqs.len(), Ordering::Relaxed);
            if self.seqs.is_empty() {
                continue;
            }
            if let Err(message) = self.step() {
                tracing::error!(%message, "engine step failed");
                self.fail_all(&message);
            }
        }
    }

    fn handle(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Submit(b) => {
                let (generation, tx, tally) = *b;
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
                true
            }
            Command::Shutdown => {
                self.fail_all("the engine is shutting down");
                false
            }
        }
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

    /// Frees a sequence's KV cells and id, removing it from `seqs` (indices shift).
    fn release_seq(&mut self, i: usize) {
        let seq = self.seqs.remove(i);
        let _ = self
            .ctx
            .clear_kv_cache_seq(Some(seq.seq_id as u32), None, None);
        self.free_ids.push(seq.seq_id);
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
            for j in 0..k {
                let Some(seq_id) = self.free_ids.pop() else {
                    break;
                };
                let choice = req.next_choice + j;
                let g = &req.generation;
                self.seqs.push(Seq {
                    seq_id,
                    request: req.id,
                    choice,
                    tokens: g.prompt.clone(),
                    n_past: 0,
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
                    logits_at: None,
                    done: false,
                });
                leader = leader.or(Some(seq_id));
            }
            req.next_choice += k;
            if !req.admitted {
                req.admitted = true;
                req.tally.admitted.store(true, Ordering::Release);
                self.gauges.queued.fetch_sub(1, Ordering::AcqRel);
                let _ = req.tx.send(Event::Admitted { cached_tokens: 0 });
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

    /// Builds the batch; returns false when nothing could be added.
    fn build_batch(&mut self) -> Result<bool, String> {
        self.batch.clear();
        let mut n = 0usize;
        // Decode tokens first: running streams never wait behind a prompt.
        for s in &mut self.seqs {
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
        // Then prompt chunks, oldest request first.
        let mut budget = self.batch_size.saturating_sub(n).max(1);
        for s in &mut self.seqs {
            if budget == 0 {
                break;
            }
            // Only sequences with prompt tokens still to compute.
            if s.leader.is_some() || s.done || s.logits_at.is_some() || s.n_past >= s.tokens.len() {
                continue;
            }
            let start = s.n_past;
            let take = (s.tokens.len() - start).min(budget);
            for p in start..start + take {
                let last = p + 1 == s.tokens.len();
                self.batch
                    .add(LlamaToken(s.tokens[p] as i32), p as i32, &[s.seq_id], last)
                    .map_err(|e| e.to_string())?;
                n += 1;
            }
            if start + take == s.tokens.len() {
                s.logits_at = Some(n as i32 - 1);
            }
            s.n_past += take;
            budget -= take;
        }
        Ok(n > 0)
    }

    fn step(&mut self) -> Result<(), String> {
        if !self.build_batch()? {
            return Ok(());
        }
        let started = std::time::Instant::now();
        self.ctx
            .decode(&mut self.batch)
            .map_err(|e| e.to_string())?;
        tracing::trace!(
            tokens = self.batch.n_tokens(),
            sequences = self.seqs.len(),
            micros = started.elapsed().as_micros() as u64,
            "forward step"
        );
        // Choices waiting on a shared prompt take its KV state and logits once it is in.
        let ready: Vec<(i32, usize, i32)> = self
            .seqs
            .iter()
            .filter_map(|s| s.logits_at.map(|at| (s.seq_id, s.n_past, at)))
            .collect();
        for (leader, n_past, at) in ready {
            for i in 0..self.seqs.len() {
                if self.seqs[i].leader == Some(leader) {
                    let id = self.seqs[i].seq_id;
                    self.ctx
                        .copy_kv_cache_seq(leader, id, None, None)
                        .map_err(|e| e.to_string())?;
                    let f = &mut self.seqs[i];
                    f.n_past = n_past;
                    f.leader = None;
                    f.logits_at = Some(at);
                }
            }
        }
        self.sample_all();
        self.reap();
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
        self.active.retain(|r| r.finished < r.generation.n);
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
        self.free_ids.extend(self.seqs.drain(..).map(|s| s.seq_id));
        self.active.clear();
        self.waiting.clear();
    }
}
