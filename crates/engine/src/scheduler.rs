//! The engine thread: continuous batching over one llama.cpp context with a unified KV cache.
//!
//! Flow of one forward step:
//! 1. Take new commands (block only when nothing is running).
//! 2. Drop the sequences of cancelled requests (their stream was dropped) and free their KV.
//! 3. Admit waiting requests while sequence slots and KV cells allow. A request with `n` choices
//!    gets `n` sequences (or as many as are free, the rest later); its prompt is added to the
//!    batch once with every sequence id, so the choices share its KV cells and its last logits.
//! 4. Build one batch: one token for every decoding sequence first, then prompt chunks of the
//!    waiting-for-prompt sequences with what is left of `batch_size` (chunked prefill, so a long
//!    prompt never stalls running streams).
//! 5. Decode. If the KV cache has no room, pause the youngest request (free its cells; it
//!    recomputes its tokens later, its output unchanged) and retry.
//! 6. Sample each sequence that has logits; stream its text; finish it on end of turn, a stop
//!    string, `max_tokens` or the context length.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::DecodeError;
use tokio::sync::mpsc::UnboundedSender;

use crate::model::{backend, LoadedModel};
use crate::sampling::Sampler;
use crate::text::{StopMatcher, Utf8Decoder};
use crate::{EngineConfig, EngineError, Event, FinishReason, Gauges, Generation};

pub(crate) enum Command {
    Submit(Box<(Generation, UnboundedSender<Event>)>),
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
                .with_n_ctx(NonZeroU32::new(config.kv_cache_tokens))
                .with_n_batch(step)
                .with_n_ubatch(step)
                .with_n_seq_max(config.max_sequences)
                .with_kv_unified(true)
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

/// A request as the scheduler tracks it.
struct Request {
    id: u64,
    generation: Generation,
    tx: UnboundedSender<Event>,
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
    /// Sequences that share this one's prompt and receive its tokens until the prompt is done.
    followers: Vec<usize>,
    /// This sequence follows a leader while the shared prompt is computed.
    following: bool,
    /// Prompt tokens whose cells belong to the leader of this sequence's request.
    shared_prefix: usize,
    /// Paused because the KV cache was full: recompute all tokens before going on.
    paused: bool,
    /// Batch index of this sequence's logits after the current decode.
    logits_at: Option<i32>,
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
    kv_size: usize,
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
            kv_size: config.kv_cache_tokens as usize,
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
                let (generation, tx) = *b;
                self.next_id += 1;
                self.waiting.push_back(Request {
                    id: self.next_id,
                    generation,
                    tx,
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
        // Fix follower indices that pointed past the removed one.
        for s in &mut self.seqs {
            s.followers.retain(|&f| f != i);
            for f in &mut s.followers {
                if *f > i {
                    *f -= 1;
                }
            }
        }
    }

    /// Cells in use, as far as the scheduler can tell: a prompt shared by the choices of one
    /// request counts once. (llama.cpp has the last word: a decode that finds no room pauses a
    /// sequence.)
    fn kv_used(&self) -> usize {
        self.seqs
            .iter()
            .filter(|s| !s.following && !s.paused)
            .map(|s| s.n_past.saturating_sub(s.shared_prefix))
            .sum()
    }

    fn admit(&mut self) {
        while let Some(front) = self.waiting.front() {
            if self.free_ids.is_empty() {
                return;
            }
            let prompt_len = front.generation.prompt.len();
            let used = self.kv_used() + self.paused_need();
            if used + prompt_len + 1 > self.kv_size && !self.seqs.is_empty() {
                return;
            }
            let Some(mut req) = self.waiting.pop_front() else {
                return;
            };
            let remaining = req.generation.n - req.next_choice;
            let k = remaining.min(self.free_ids.len() as u32);
            let leader_index = self.seqs.len();
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
                    followers: Vec::new(),
                    following: j > 0,
                    shared_prefix: if j > 0 { prompt_len } else { 0 },
                    paused: false,
                    logits_at: None,
                    done: false,
                });
            }
            let followers: Vec<usize> = (leader_index + 1..self.seqs.len()).collect();
            self.seqs[leader_index].followers = followers;
            req.next_choice += k;
            if !req.admitted {
                req.admitted = true;
                self.gauges.queued.fetch_sub(1, Ordering::AcqRel);
                let _ = req.tx.send(Event::Admitted { cached_tokens: 0 });
            }
            let more = req.next_choice < req.generation.n;
            let placeholder = more.then(|| Request {
                id: req.id,
                generation: req.generation.clone(),
                tx: req.tx.clone(),
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

    fn paused_need(&self) -> usize {
        self.seqs
            .iter()
            .filter(|s| s.paused)
            .map(|s| s.tokens.len())
            .sum()
    }

    /// Builds the batch; returns false when nothing could be added.
    fn build_batch(&mut self) -> Result<bool, String> {
        self.batch.clear();
        let mut n = 0usize;
        // Decode tokens first: running streams never wait behind a prompt.
        for s in &mut self.seqs {
            s.logits_at = None;
            if s.paused || s.following || s.done {
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
        // Then prompt chunks (and recomputation of paused sequences), oldest first.
        let mut budget = self.batch_size.saturating_sub(n).max(1);
        let mut kv_left = self.kv_size.saturating_sub(self.kv_used() + n);
        for i in 0..self.seqs.len() {
            if budget == 0 {
                break;
            }
            let s = &self.seqs[i];
            if s.following || s.done || s.n_past + 1 == s.tokens.len() && s.n_past >= s.prompt_len {
                continue;
            }
            if s.paused {
                if s.tokens.len() > kv_left {
                    continue;
                }
                self.seqs[i].paused = false;
            }
            let s = &self.seqs[i];
            let mut ids = vec![s.seq_id];
            ids.extend(s.followers.iter().map(|&f| self.seqs[f].seq_id));
            let left = s.tokens.len() - s.n_past;
            let take = left.min(budget);
            let start = s.n_past;
            for p in start..start + take {
                let last = p + 1 == s.tokens.len();
                self.batch
                    .add(LlamaToken(s.tokens[p] as i32), p as i32, &ids, last)
                    .map_err(|e| e.to_string())?;
                n += 1;
            }
            let s = &mut self.seqs[i];
            if start + take == s.tokens.len() {
                s.logits_at = Some(n as i32 - 1);
            }
            s.n_past += take;
            budget -= take;
            kv_left = kv_left.saturating_sub(take);
        }
        Ok(n > 0)
    }

    fn step(&mut self) -> Result<(), String> {
        loop {
            if !self.build_batch()? {
                // Everything is paused: resume the oldest by force.
                if let Some(s) = self.seqs.iter_mut().find(|s| s.paused) {
                    s.paused = false;
                    continue;
                }
                return Ok(());
            }
            match self.ctx.decode(&mut self.batch) {
                Ok(()) => break,
                Err(DecodeError::NoKvCacheSlot) => {
                    self.undo_batch();
                    if !self.pause_youngest() {
                        return Err("KV cache too small for a single sequence".into());
                    }
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        // Followers take the leader's state once the shared prompt is in.
        for i in 0..self.seqs.len() {
            if self.seqs[i].logits_at.is_some() && !self.seqs[i].followers.is_empty() {
                let (n_past, at) = (self.seqs[i].n_past, self.seqs[i].logits_at);
                let followers = std::mem::take(&mut self.seqs[i].followers);
                for f in followers {
                    let fs = &mut self.seqs[f];
                    fs.n_past = n_past;
                    fs.following = false;
                    fs.logits_at = at;
                }
            }
        }
        self.sample_all();
        self.reap();
        Ok(())
    }

    /// The batch was not applied: roll back the positions it would have advanced.
    fn undo_batch(&mut self) {
        for s in &mut self.seqs {
            // What llama.cpp really holds for this sequence.
            let held = self.ctx.kv_cache_seq_pos_max(s.seq_id) + 1;
            s.n_past = usize::try_from(held).unwrap_or(0);
            s.logits_at = None;
        }
    }

    /// Pauses the most recently admitted running sequence (and any that follow it); false when
    /// fewer than two are running, so pausing cannot help.
    fn pause_youngest(&mut self) -> bool {
        let running: Vec<usize> = (0..self.seqs.len())
            .filter(|&i| !self.seqs[i].paused && !self.seqs[i].done && !self.seqs[i].following)
            .collect();
        if running.len() < 2 {
            return false;
        }
        let Some(&victim) = running.last() else {
            return false;
        };
        tracing::debug!(seq = self.seqs[victim].seq_id, "KV cache full: pausing a sequence");
        let mut group = std::mem::take(&mut self.seqs[victim].followers);
        group.push(victim);
        for i in group {
            let s = &mut self.seqs[i];
            let _ = self
                .ctx
                .clear_kv_cache_seq(Some(s.seq_id as u32), None, None);
            s.n_past = 0;
            s.paused = true;
            s.following = false;
            s.shared_prefix = 0;
            s.logits_at = None;
        }
        true
    }

    fn sample_all(&mut self) {
        let ban_eog: Vec<u32> = Vec::new();
        for i in 0..self.seqs.len() {
            let Some(at) = self.seqs[i].logits_at else {
                continue;
            };
            let request = self.seqs[i].request;
            let Some(req) = self.active.iter().find(|r| r.id == request) else {
                continue;
            };
            let g = &req.generation;
            let banned = if g.ignore_eos { &self.model.eog } else { &ban_eog };
            let max_tokens = g.max_tokens;
            let tx = req.tx.clone();
            let logits = self.ctx.get_logits_ith(at);
            let s = &mut self.seqs[i];
            let token = s.sampler.sample(logits, banned);
            s.sampler.accept(token);
            s.generated += 1;
            let mut finish = None;
            let mut flush = false;
            let mut text = String::new();
            if self.model.eog.contains(&token) {
                finish = Some(FinishReason::Stop);
                flush = true;
            } else {
                self.model.piece(token, &mut self.piece);
                let decoded = s.decoder.push(&self.piece);
                let out = s.stops.push(&decoded);
                text = out.text;
                if out.stopped {
                    finish = Some(FinishReason::Stop);
                }
            }
            s.tokens.push(token);
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
                if !out.stopped {
                    text.push_str(&s.stops.finish());
                }
            }
            if !text.is_empty() {
                let _ = tx.send(Event::Text {
                    choice: s.choice,
                    text,
                });
            }
            if let Some(reason) = finish {
                s.done = true;
                let _ = tx.send(Event::Finished {
                    choice: s.choice,
                    reason,
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
