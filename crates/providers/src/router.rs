//! One public model served by several deployments: a weighted first choice, ordered fall-backs,
//! retries with backoff on failures that are not the caller's (unreachable, 429, 5xx; honouring
//! `Retry-After`), a circuit breaker per deployment, and `max_ttft_ms`: an attempt whose first
//! output has not arrived by the deadline is abandoned (cancelled, never billed) and the next
//! deployment is tried. The caller sees one clean stream, from the attempt that answered.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use parlance_api::{ApiError, ChatRequest};
use rand::Rng;
use tracing::Instrument;

use crate::{ChatEvent, ChatProvider, ChatStream, PreparedChat};

/// Consecutive failures that open a deployment's breaker.
const BREAKER_FAILURES: u32 = 5;
/// How long an open breaker keeps traffic away.
const BREAKER_OPEN: Duration = Duration::from_secs(30);
/// The longest `Retry-After` honoured before moving on to the next deployment.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(5);

/// One way to serve the model.
pub struct Deployment {
    /// The provider (an upstream, or a local model).
    pub provider: Arc<dyn ChatProvider>,
    /// Weight of the weighted first choice (0: only as a fall-back).
    pub weight: u32,
    /// A label for logs (`provider/model`).
    pub label: String,
    failures: AtomicU32,
    open_until_ms: AtomicU64,
    attempts: AtomicU64,
    errors: AtomicU64,
    retries: AtomicU64,
    fallbacks: AtomicU64,
}

impl Deployment {
    /// A deployment with a weight.
    pub fn new(provider: Arc<dyn ChatProvider>, weight: u32, label: impl Into<String>) -> Self {
        Self {
            provider,
            weight,
            label: label.into(),
            failures: AtomicU32::new(0),
            open_until_ms: AtomicU64::new(0),
            attempts: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
        }
    }

    fn now_ms() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }

    /// Whether the breaker lets traffic through.
    pub fn is_closed(&self) -> bool {
        self.open_until_ms.load(Ordering::Acquire) <= Self::now_ms()
    }

    fn succeeded(&self) {
        self.failures.store(0, Ordering::Release);
    }

    fn failed(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let n = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if n >= BREAKER_FAILURES {
            let until = Self::now_ms() + BREAKER_OPEN.as_millis() as u64;
            self.open_until_ms.store(until, Ordering::Release);
            self.failures.store(0, Ordering::Release);
            tracing::warn!(deployment = %self.label, "circuit breaker open for 30 s");
        }
    }
}

/// Routing settings of one public model.
#[derive(Debug, Clone, Copy)]
pub struct RoutePolicy {
    /// Retries of the same deployment before falling back.
    pub retries: u32,
    /// First backoff; doubles each retry.
    pub backoff: Duration,
    /// Default `max_ttft_ms` when the request has none.
    pub max_ttft_ms: Option<u64>,
}

impl Default for RoutePolicy {
    fn default() -> Self {
        Self {
            retries: 1,
            backoff: Duration::from_millis(100),
            max_ttft_ms: None,
        }
    }
}

/// A model with several deployments, as one provider.
pub struct Routed {
    deployments: Arc<Vec<Deployment>>,
    policy: RoutePolicy,
    context_length: u32,
}

impl Routed {
    /// Deployments in fall-back order.
    pub fn new(deployments: Vec<Deployment>, policy: RoutePolicy) -> Self {
        let context_length = deployments
            .iter()
            .map(|d| d.provider.context_length())
            .min()
            .unwrap_or(0);
        Self {
            deployments: Arc::new(deployments),
            policy,
            context_length,
        }
    }

    /// The order to try deployments in: one chosen by weight first, then the rest in order;
    /// deployments whose breaker is open go last.
    fn order(&self) -> Vec<usize> {
        let n = self.deployments.len();
        let total: u32 = self.deployments.iter().map(|d| d.weight).sum();
        let first = if total == 0 {
            0
        } else {
            let mut pick = rand::rng().random_range(0..total);
            let mut chosen = 0;
            for (i, d) in self.deployments.iter().enumerate() {
                if pick < d.weight {
                    chosen = i;
                    break;
                }
                pick -= d.weight;
            }
            chosen
        };
        let mut order: Vec<usize> = std::iter::once(first)
            .chain((0..n).filter(|&i| i != first))
            .collect();
        order.sort_by_key(|&i| !self.deployments[i].is_closed());
        order
    }
}

/// Whether another attempt may help: the upstream's failures, not the caller's mistakes.
fn retryable(e: &ApiError) -> bool {
    match e {
        ApiError::Upstream { status, .. } => {
            matches!(status, 401 | 403 | 408 | 409 | 429) || *status >= 500
        }
        ApiError::Overloaded(_) | ApiError::NotReady(_) | ApiError::Internal => true,
        _ => false,
    }
}

struct RoutedPrepared {
    deployments: Arc<Vec<Deployment>>,
    policy: RoutePolicy,
    order: Vec<usize>,
    request: ChatRequest,
    first: Box<dyn PreparedChat>,
}

#[async_trait::async_trait]
impl ChatProvider for Routed {
    fn kind(&self) -> &'static str {
        self.deployments
            .first()
            .map_or("routed", |d| d.provider.kind())
    }

    fn context_length(&self) -> u32 {
        self.context_length
    }

    fn fingerprint(&self) -> String {
        self.deployments
            .first()
            .map_or_else(String::new, |d| d.provider.fingerprint())
    }

    fn ready(&self) -> bool {
        self.deployments.iter().any(|d| d.provider.ready())
    }

    fn saturated(&self) -> Option<String> {
        let mut why = None;
        for d in self.deployments.iter() {
            why = Some(d.provider.saturated()?);
        }
        why
    }

    fn stats(&self) -> crate::ProviderStats {
        let mut out = crate::ProviderStats::default();
        for d in self.deployments.iter() {
            let inner = d.provider.stats();
            if out.engine.is_none() {
                out.engine = inner.engine;
            }
            out.deployments.push(crate::DeploymentStats {
                label: d.label.clone(),
                kind: d.provider.kind(),
                breaker_open: !d.is_closed(),
                attempts: d.attempts.load(Ordering::Relaxed),
                errors: d.errors.load(Ordering::Relaxed),
                retries: d.retries.load(Ordering::Relaxed),
                fallbacks: d.fallbacks.load(Ordering::Relaxed),
            });
        }
        out
    }

    async fn prepare(&self, request: &ChatRequest) -> Result<Box<dyn PreparedChat>, ApiError> {
        let order = self.order();
        let Some(&first) = order.first() else {
            return Err(ApiError::NotReady("The model has no deployment.".into()));
        };
        // The first choice checks and measures the request (a 400 is final); the platform
        // reserves for that measure.
        let prepared = self.deployments[first].provider.prepare(request).await?;
        Ok(Box::new(RoutedPrepared {
            deployments: self.deployments.clone(),
            policy: self.policy,
            order,
            request: request.clone(),
            first: prepared,
        }))
    }
}

/// Waits for a stream's first event within `deadline`; gives the stream back with that event
/// put in front again.
async fn first_event(
    mut stream: ChatStream,
    deadline: Option<Duration>,
) -> Result<Result<ChatStream, ApiError>, ()> {
    let next = match deadline {
        Some(d) => match tokio::time::timeout(d, stream.events.next()).await {
            Ok(ev) => ev,
            Err(_) => return Err(()),
        },
        None => stream.events.next().await,
    };
    match next {
        // Failing before any output: the attempt failed, the caller has seen nothing.
        Some(ChatEvent::Error(e)) => Ok(Err(e)),
        Some(ev) => {
            stream.events = Box::pin(futures::stream::once(async move { ev }).chain(stream.events));
            Ok(Ok(stream))
        }
        None => Ok(Ok(stream)),
    }
}

#[async_trait::async_trait]
impl PreparedChat for RoutedPrepared {
    fn prompt_tokens(&self) -> u32 {
        self.first.prompt_tokens()
    }

    fn max_completion_tokens(&self) -> u64 {
        self.first.max_completion_tokens()
    }

    async fn start(self: Box<Self>) -> Result<ChatStream, ApiError> {
        let RoutedPrepared {
            deployments,
            policy,
            order,
            request,
            first,
        } = *self;
        let ttft = request
            .max_ttft_ms
            .or(policy.max_ttft_ms)
            .map(Duration::from_millis);
        let mut first = Some(first);
        let mut last_error = None;
        let mut missed_deadline = false;
        for (n, &i) in order.iter().enumerate() {
            let d = &deployments[i];
            let mut attempt = 0;
            loop {
                let prepared = match first.take() {
                    Some(p) if n == 0 => p,
                    _ => match d.provider.prepare(&request).await {
                        Ok(p) => p,
                        Err(e) if retryable(&e) => {
                            last_error = Some(e);
                            break;
                        }
                        Err(e) => return Err(e),
                    },
                };
                d.attempts.fetch_add(1, Ordering::Relaxed);
                let span =
                    tracing::info_span!("deployment_attempt", deployment = %d.label, attempt);
                let began = Instant::now();
                let started = match ttft {
                    Some(limit) => {
                        match tokio::time::timeout(limit, prepared.start().instrument(span.clone()))
                            .await
                        {
                            Ok(r) => r,
                            Err(_) => {
                                tracing::warn!(deployment = %d.label, "no first token before max_ttft_ms; trying the next deployment");
                                d.failed();
                                missed_deadline = true;
                                break;
                            }
                        }
                    }
                    None => prepared.start().instrument(span.clone()).await,
                };
                let outcome = match started {
                    Ok(stream) => {
                        let left = ttft.map(|t| t.saturating_sub(began.elapsed()));
                        match first_event(stream, left).instrument(span.clone()).await {
                            Ok(r) => r,
                            Err(()) => {
                                tracing::warn!(deployment = %d.label, "no first token before max_ttft_ms; trying the next deployment");
                                d.failed();
                                missed_deadline = true;
                                break;
                            }
                        }
                    }
                    Err(e) => Err(e),
                };
                match outcome {
                    Ok(stream) => {
                        d.succeeded();
                        if n > 0 {
                            d.fallbacks.fetch_add(1, Ordering::Relaxed);
                        }
                        if n > 0 || attempt > 0 {
                            tracing::info!(deployment = %d.label, attempt, "served after a fall-back or retry");
                        }
                        return Ok(stream);
                    }
                    Err(e) if retryable(&e) => {
                        d.failed();
                        tracing::warn!(deployment = %d.label, error = %e, attempt, "attempt failed");
                        let wait = match &e {
                            ApiError::Upstream {
                                retry_after: Some(w),
                                ..
                            } => Some(*w),
                            _ => None,
                        };
                        last_error = Some(e);
                        if attempt >= policy.retries {
                            break;
                        }
                        let backoff = policy.backoff * 2u32.pow(attempt);
                        match wait {
                            // A wait longer than we are willing to hold the caller: fall back.
                            Some(w) if w > MAX_RETRY_WAIT => break,
                            Some(w) => tokio::time::sleep(w.max(backoff)).await,
                            None => tokio::time::sleep(backoff).await,
                        }
                        attempt += 1;
                        d.retries.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        d.errors.fetch_add(1, Ordering::Relaxed);
                        return Err(e);
                    }
                }
            }
        }
        if missed_deadline {
            if let Some(t) = ttft {
                return Err(ApiError::TtftDeadline(t.as_millis() as u64));
            }
        }
        Err(last_error.unwrap_or(ApiError::Internal))
    }
}
