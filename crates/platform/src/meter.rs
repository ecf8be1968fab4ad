//! Metering and settlement, off the request path. Every admitted request carries a [`Ticket`];
//! the stream wrapper and the provider's tally both hold it, and when the last of them lets go
//! (the work is over and the client has the answer or is gone) the ticket is sent to the
//! worker, which settles the credit reservation and the rate-limit tokens to what was really
//! used and writes the usage record in a batch. Settlement happens in `Drop`, so it happens
//! exactly once on every path: success, error, refusal, client gone mid-stream.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::Stream;
use parlance_api::{ApiError, StatusConvention, Usage};
use parlance_providers::{ChatEvent, Tally};
use parlance_store::{Limiter, Settlement, Store, UsageRecord};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use crate::pricing::Price;

/// Records are written when this many are waiting, or after [`FLUSH_EVERY`].
const BATCH: usize = 32;
const FLUSH_EVERY: Duration = Duration::from_millis(100);

/// What a request was and what happened to it, filled in as it goes.
#[derive(Debug, Clone)]
pub(crate) struct Closing {
    pub request_id: String,
    pub created_at: i64,
    pub arrived: Instant,
    pub key_id: Option<String>,
    pub account_id: Option<String>,
    pub model: String,
    pub provider: &'static str,
    pub user: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub tags: crate::UsageTags,
    pub price: Price,
    /// Micro-units held for this request (0: nothing was reserved).
    pub reserved: i64,
    /// Rate-limit tokens taken: the key, the window, how many.
    pub rate: Option<(String, u64, u64)>,
    /// Prompt tokens, as prepared.
    pub prompt_tokens: u32,
    pub tally: Option<Tally>,
    pub usage: Option<Usage>,
    pub first_output: Option<Instant>,
    pub ended: Option<Instant>,
    pub status: u16,
    pub outcome: &'static str,
    /// Content-filter matches.
    pub filter_hits: u32,
    /// The request's trace span: held until the settlement, its last child.
    pub span: tracing::Span,
}

impl Closing {
    /// Prompt, cached and completion tokens really processed.
    fn tokens(&self) -> (u64, u64, u64) {
        if let Some(t) = self.tally {
            return (
                u64::from(t.prompt_tokens),
                u64::from(t.cached_tokens),
                u64::from(t.completion_tokens),
            );
        }
        if let Some(u) = &self.usage {
            return (
                u64::from(u.prompt_tokens),
                u64::from(u.prompt_tokens_details.cached_tokens),
                u64::from(u.completion_tokens),
            );
        }
        if self.outcome == "refused" {
            (0, 0, 0)
        } else {
            (u64::from(self.prompt_tokens), 0, 0)
        }
    }
}

enum Job {
    Close(Box<Closing>),
    Flush(oneshot::Sender<()>),
}

/// Shared by the stream and the tally watcher; sends its [`Closing`] when the last one drops.
pub(crate) struct Ticket {
    data: Mutex<Option<Closing>>,
    tx: mpsc::UnboundedSender<Job>,
}

impl Ticket {
    pub(crate) fn update(&self, f: impl FnOnce(&mut Closing)) {
        if let Some(c) = self.data.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            f(c);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let data = self
            .data
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(mut c) = data {
            c.ended.get_or_insert_with(Instant::now);
            if self.tx.send(Job::Close(Box::new(c))).is_err() {
                tracing::error!("the metering worker is gone: a request was not settled");
            }
        }
    }
}

/// What this replica holds per account for its requests in flight, and which accounts changed
/// since the store last heard of them.
#[derive(Default)]
struct Holds {
    held: HashMap<String, i64>,
    dirty: HashSet<String>,
}

/// Shared between the request path (reservations) and the worker (settlements).
#[derive(Clone, Default)]
pub(crate) struct HoldBook(Arc<Mutex<Holds>>);

impl HoldBook {
    fn change(&self, account: &str, delta: i64) {
        let mut h = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *h.held.entry(account.to_owned()).or_default() += delta;
        h.dirty.insert(account.to_owned());
    }

    /// The accounts that changed, with what is held now.
    fn take_dirty(&self) -> Vec<(String, i64)> {
        let mut h = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let dirty: Vec<String> = h.dirty.drain().collect();
        let out = dirty
            .into_iter()
            .map(|a| {
                let v = h.held.get(&a).copied().unwrap_or(0);
                (a, v)
            })
            .collect();
        h.held.retain(|_, v| *v != 0);
        out
    }

    fn mark_dirty(&self, accounts: &[(String, i64)]) {
        let mut h = self.0.lock().unwrap_or_else(|p| p.into_inner());
        h.dirty.extend(accounts.iter().map(|(a, _)| a.clone()));
    }
}

/// How long a replica may go unseen before its holds are given back (60 s; the environment
/// variable `PARLANCE_REPLICA_TIMEOUT_MS` changes it).
fn replica_timeout() -> Duration {
    std::env::var("PARLANCE_REPLICA_TIMEOUT_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|ms| *ms >= 100)
        .map_or(Duration::from_secs(60), Duration::from_millis)
}

/// The handle to the metering worker.
pub(crate) struct Meter {
    tx: Mutex<Option<mpsc::UnboundedSender<Job>>>,
    worker: Mutex<Option<tokio::task::JoinHandle<()>>>,
    holds: HoldBook,
}

impl Meter {
    /// Starts the worker (on the current Tokio runtime).
    pub(crate) fn start(store: Store, limiter: Arc<Limiter>, metrics: Arc<crate::Metrics>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let holds = HoldBook::default();
        let replica = format!("replica_{}", uuid::Uuid::now_v7().simple());
        let worker = tokio::spawn(run(rx, store, limiter, holds.clone(), replica, metrics));
        Self {
            tx: Mutex::new(Some(tx)),
            worker: Mutex::new(Some(worker)),
            holds,
        }
    }

    /// Notes credit this replica now holds for a request.
    pub(crate) fn hold(&self, account: &str, amount: i64) {
        self.holds.change(account, amount);
    }

    /// A ticket for a request; `None` after shutdown began.
    pub(crate) fn ticket(&self, closing: Closing) -> Option<Arc<Ticket>> {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner()).clone()?;
        Some(Arc::new(Ticket {
            data: Mutex::new(Some(closing)),
            tx,
        }))
    }

    /// Waits until every ticket closed so far is settled and its record written.
    pub(crate) async fn flush(&self) {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(tx) = tx {
            let (done, wait) = oneshot::channel();
            if tx.send(Job::Flush(done)).is_ok() {
                let _ = wait.await;
            }
        }
    }

    /// Stops taking tickets, then waits (at most `limit`) until every open one is settled and
    /// written.
    pub(crate) async fn shutdown(&self, limit: Duration) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        let worker = self.worker.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(w) = worker {
            if tokio::time::timeout(limit, w).await.is_err() {
                tracing::error!("usage records still open at exit were not all written");
            }
        }
    }
}

/// Turns a closed request into its settlement (when credit was held) and its usage record.
fn close(c: Closing) -> (Option<Settlement>, UsageRecord, Option<(String, u64, u64)>) {
    let (prompt, cached, completion) = c.tokens();
    let cost = c.price.cost(prompt, cached, completion);
    let settlement = match (&c.account_id, c.reserved > 0) {
        (Some(account), true) => {
            if cost > c.reserved {
                tracing::error!(
                    request_id = %c.request_id,
                    cost,
                    reserved = c.reserved,
                    "a request cost more than it reserved; charging what was reserved"
                );
            }
            Some(Settlement {
                request_id: c.request_id.clone(),
                account_id: account.clone(),
                reserved: c.reserved,
                charged: cost.min(c.reserved),
            })
        }
        _ => None,
    };
    let charged = settlement.as_ref().map_or(cost, |s| s.charged);
    // Rate-limit tokens taken for the worst case and not used go back.
    let refund = c
        .rate
        .clone()
        .map(|(key, window, taken)| (key, window, taken.saturating_sub(prompt + completion)));
    let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    let clamp = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    let record = UsageRecord {
        request_id: c.request_id,
        created_at: c.created_at,
        key_id: c.key_id,
        account_id: c.account_id,
        model: c.model,
        provider: c.provider.to_owned(),
        prompt_tokens: clamp(prompt),
        cached_tokens: clamp(cached),
        completion_tokens: clamp(completion),
        cost: charged,
        latency_ms: ms(c.ended.unwrap_or_else(Instant::now) - c.arrived),
        ttft_ms: c.first_output.map(|t| ms(t - c.arrived)),
        status: i64::from(c.status),
        outcome: c.outcome.to_owned(),
        user: c.user,
        labels: c.labels,
        project_id: c.tags.project_id,
        campaign_id: c.tags.campaign_id,
        variant: c.tags.variant,
        session_id: c.tags.session_id,
        parent_id: c.tags.parent_id,
        tags: c.tags.tags,
        filter_hits: i64::from(c.filter_hits),
    };
    (settlement, record, refund)
}

/// Settlements and records waiting to be committed together, with this replica's holds.
struct Batch {
    settlements: Vec<Settlement>,
    records: Vec<UsageRecord>,
    holds: HoldBook,
    replica: String,
}

impl Batch {
    fn len(&self) -> usize {
        self.records.len()
    }

    /// Commits the batch in one transaction, retrying a few times; on failure it is kept for
    /// the next attempt (credit stays held meanwhile, never lost or double-counted).
    async fn write(&mut self, store: &Store) {
        let holds = self.holds.take_dirty();
        if self.records.is_empty() && self.settlements.is_empty() && holds.is_empty() {
            return;
        }
        for attempt in 0..3u32 {
            let started = Instant::now();
            match store
                .commit_with_holds(
                    &self.settlements,
                    &self.records,
                    Some((&self.replica, &holds)),
                )
                .await
            {
                Ok(()) => {
                    tracing::debug!(
                        records = self.records.len(),
                        settlements = self.settlements.len(),
                        micros = started.elapsed().as_micros() as u64,
                        "committed usage batch"
                    );
                    self.settlements.clear();
                    self.records.clear();
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, records = self.records.len(), attempt, "writing settlements and usage failed");
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
            }
        }
        self.holds.mark_dirty(&holds);
        if self.records.len() > 100_000 {
            let drop = self.records.len() - 100_000;
            tracing::error!(
                dropped = drop,
                "usage records dropped: the database is unavailable"
            );
            self.records.drain(..drop);
        }
    }
}

async fn run(
    mut rx: mpsc::UnboundedReceiver<Job>,
    store: Store,
    limiter: Arc<Limiter>,
    holds: HoldBook,
    replica: String,
    metrics: Arc<crate::Metrics>,
) {
    let mut refunds: JoinSet<()> = JoinSet::new();
    let mut batch = Batch {
        settlements: Vec::new(),
        records: Vec::new(),
        holds: holds.clone(),
        replica: replica.clone(),
    };
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Liveness: a heartbeat well inside the timeout, and a look for dead replicas' holds.
    let timeout = replica_timeout();
    let mut heartbeat = tokio::time::interval(timeout / 6);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sweep = tokio::time::interval(timeout / 2);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            job = rx.recv() => match job {
                Some(Job::Close(c)) => {
                    // Entered so that the request's span ends with its settlement.
                    let request_span = c.span.clone();
                    let in_request = request_span.enter();
                    let span = tracing::info_span!(
                        parent: &c.span,
                        "settlement",
                        outcome = c.outcome,
                        status = c.status,
                        cost = tracing::field::Empty,
                    );
                    let entered = span.enter();
                    let (settlement, record, refund) = close(*c);
                    span.record("cost", record.cost);
                    metrics.record(&record);
                    drop(entered);
                    drop(in_request);
                    if let Some(s) = &settlement {
                        holds.change(&s.account_id, -s.reserved);
                    }
                    batch.settlements.extend(settlement);
                    batch.records.push(record);
                    if let Some((key, window, tokens)) = refund.filter(|r| r.2 > 0) {
                        let limiter = limiter.clone();
                        refunds.spawn(async move {
                            if let Err(e) = limiter.refund(&key, window, tokens).await {
                                tracing::warn!(error = %e, "could not give back unused rate-limit tokens");
                            }
                        });
                    }
                    if batch.len() >= BATCH {
                        batch.write(&store).await;
                    }
                }
                Some(Job::Flush(done)) => {
                    while refunds.join_next().await.is_some() {}
                    batch.write(&store).await;
                    let _ = done.send(());
                }
                None => break,
            },
            Some(_) = refunds.join_next(), if !refunds.is_empty() => {}
            _ = tick.tick() => batch.write(&store).await,
            _ = heartbeat.tick() => {
                if let Err(e) = store.heartbeat(&replica).await {
                    tracing::warn!(error = %e, "replica heartbeat failed");
                }
            }
            _ = sweep.tick() => {
                let cutoff = parlance_store::now_ms()
                    - i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
                if let Err(e) = store.release_dead_holds(cutoff).await {
                    tracing::warn!(error = %e, "could not release dead replicas' holds");
                }
            }
        }
    }
    while refunds.join_next().await.is_some() {}
    batch.write(&store).await;
    if let Err(e) = store.forget_replica(&replica).await {
        tracing::warn!(error = %e, "could not clear this replica's holds");
    }
}

/// A provider's events, observed for metering on their way to the client.
pub(crate) struct Metered {
    inner: Pin<Box<dyn Stream<Item = ChatEvent> + Send>>,
    ticket: Arc<Ticket>,
    done: bool,
    /// When the last piece of output came, for the inter-token latency.
    last_output: Option<Instant>,
    /// Open until the first output comes.
    first_token: Option<tracing::Span>,
    itl: prometheus_client::metrics::histogram::Histogram,
}

impl Metered {
    pub(crate) fn new(
        inner: Pin<Box<dyn Stream<Item = ChatEvent> + Send>>,
        ticket: Arc<Ticket>,
        itl: prometheus_client::metrics::histogram::Histogram,
        first_token: tracing::Span,
    ) -> Self {
        Self {
            inner,
            ticket,
            done: false,
            last_output: None,
            first_token: Some(first_token),
            itl,
        }
    }
}

impl Stream for Metered {
    type Item = ChatEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ChatEvent>> {
        let polled = self.inner.as_mut().poll_next(cx);
        match &polled {
            Poll::Ready(Some(ev)) => {
                let now = Instant::now();
                match ev {
                    ChatEvent::Text { .. }
                    | ChatEvent::Reasoning { .. }
                    | ChatEvent::ToolCallStart { .. }
                    | ChatEvent::ToolCallArgs { .. } => match self.last_output.replace(now) {
                        Some(last) => self.itl.observe((now - last).as_secs_f64()),
                        None => {
                            // The first output is here: its span ends.
                            if let Some(span) = self.first_token.take() {
                                span.record("arrived", true);
                            }
                            self.ticket.update(|c| {
                                c.first_output.get_or_insert(now);
                            });
                        }
                    },
                    ChatEvent::Usage(u) => {
                        let u = *u;
                        self.ticket.update(|c| {
                            c.usage = Some(u);
                            c.outcome = "completed";
                        });
                    }
                    ChatEvent::Error(e) => {
                        let status = e.status(StatusConvention::OpenAi);
                        self.ticket.update(|c| {
                            c.outcome = "error";
                            c.status = status;
                        });
                    }
                    ChatEvent::Finish { .. } => {}
                }
            }
            Poll::Ready(None) => {
                self.done = true;
                self.ticket.update(|c| {
                    if c.outcome == "started" {
                        c.outcome = "completed";
                    }
                    c.ended.get_or_insert_with(Instant::now);
                });
            }
            Poll::Pending => {}
        }
        polled
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        if !self.done {
            self.ticket.update(|c| {
                if c.outcome == "started" {
                    c.outcome = "cancelled";
                }
                c.ended.get_or_insert_with(Instant::now);
            });
        }
    }
}

/// Records a refusal (402, 429, 503 at admission) as a usage record with nothing spent.
pub(crate) fn refused(ticket: Arc<Ticket>, e: &ApiError) {
    let status = e.status(StatusConvention::OpenAi);
    ticket.update(|c| {
        c.outcome = "refused";
        c.status = status;
    });
}
