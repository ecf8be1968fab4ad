//! The domain: which models exist (the catalog), who may call (authentication), what they may
//! spend (credits, rate limits), the application layer over them (projects, templates,
//! sessions, campaigns, stored completions, project tools), and the one function handlers call
//! to start a chat completion: resolve, prepare, limit, reserve, start, and meter until it
//! settles.

mod admin;
mod apps_api;
mod assemble;
mod auth;
mod catalog;
mod conversation;
mod filter;
mod httptool;
pub mod ids;
mod meter;
mod metrics;
mod pricing;
mod projects;
mod prompt;
mod resolve;

pub use admin::NewKey;
pub use apps_api::{CompletionList, FeedbackInput};
pub use assemble::{Assembly, ChoiceOutput, ResponseMeta};
pub use auth::{hash_secret, Authenticator, Keys, Principal, StaticKeys, KEY_CACHE_TTL};
pub use catalog::{Catalog, CatalogEntry};
use filter::FilteredEvents;
pub use filter::{FilterSpec, Filters};
pub use metrics::Metrics;
pub use pricing::Price;
pub use projects::{
    CampaignSpec, HttpTool, ProjectSpec, ProjectTool, Sticky, Variant, APP_CACHE_TTL,
};

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::Instrument;

use parlance_api::{ApiError, ChatRequest, RateLimitHeaders};
use parlance_providers::ChatStream;
use parlance_store::{Admit, LimitState, Limiter, Refusal, Reserve, Store};

use meter::{Closing, Meter, Metered};

/// Everything a request needs from the platform.
#[derive(Clone)]
pub struct Platform {
    /// The models.
    pub catalog: Arc<Catalog>,
    /// Who may call.
    pub auth: Arc<dyn Authenticator>,
    /// Accounts, keys, ledger, usage.
    pub store: Store,
    /// Request and token counters.
    pub limiter: Arc<Limiter>,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    meter: Arc<Meter>,
    apps: Arc<projects::Apps>,
    /// The client for project tools parlance calls.
    http: reqwest::Client,
    /// Content filters applied to every request and answer.
    filters: Filters,
}

/// What a usage record says about the application layer.
#[derive(Debug, Clone, Default)]
pub(crate) struct UsageTags {
    pub project_id: Option<String>,
    pub campaign_id: Option<String>,
    pub variant: Option<String>,
    pub session_id: Option<String>,
    pub parent_id: Option<String>,
    pub tags: Vec<String>,
}

pub(crate) fn unavailable(e: parlance_store::StoreError) -> ApiError {
    match e {
        parlance_store::StoreError::NotFound(what) => {
            ApiError::NotFound(format!("No such {what}."))
        }
        e => {
            tracing::error!(error = %e, "the database is unavailable");
            ApiError::NotReady("The database is unavailable.".into())
        }
    }
}

impl std::fmt::Debug for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Platform")
            .field("catalog", &self.catalog)
            .field("store", &self.store.backend())
            .field("limiter", &self.limiter)
            .finish()
    }
}

/// A completion that has started, with what the response needs to describe it.
#[derive(Debug)]
pub struct Started {
    /// The events, metered: dropping them cancels the work and settles what it used.
    pub stream: ChatStream,
    /// `system_fingerprint`.
    pub fingerprint: String,
    /// The request's id (the completion id is made from it).
    pub request_id: String,
    /// The key's standing against its limits, for the `x-ratelimit-*` headers.
    pub rate_limit: Option<RateLimitHeaders>,
    /// The model to name in the response, when a project or campaign chose it.
    pub model: Option<String>,
    /// The server-side session this turn belongs to.
    pub session_id: Option<String>,
    /// Unix seconds, for `created`.
    pub created: u64,
}

fn headers(s: &LimitState) -> RateLimitHeaders {
    RateLimitHeaders {
        requests: s.limits.rpm.map(|l| (l, l.saturating_sub(s.requests_used))),
        tokens: s.limits.tpm.map(|l| (l, l.saturating_sub(s.tokens_used))),
        reset_ms: s.reset_ms,
    }
}

fn rate_limited(key: &str, s: &LimitState, why: Refusal, requested: u64) -> ApiError {
    let retry_after = u32::try_from(s.reset_ms.div_ceil(1000).max(1)).unwrap_or(60);
    let (limit, what, label, used, asked, cap) = match why {
        Refusal::Requests => (
            "requests",
            "requests per minute (RPM)",
            "requests",
            s.requests_used,
            1,
            s.limits.rpm.unwrap_or(0),
        ),
        Refusal::Tokens => (
            "tokens",
            "tokens per minute (TPM)",
            "tokens",
            s.tokens_used,
            requested,
            s.limits.tpm.unwrap_or(0),
        ),
    };
    let message = if asked > cap {
        format!(
            "Request too large for {what} on key {key}: Limit {cap}, Requested {asked} {label}. Lower max_tokens or the prompt."
        )
    } else {
        format!(
            "Rate limit reached for {what} on key {key}: Limit {cap}, Used {used}, Requested {asked}. Please try again in {retry_after}s."
        )
    };
    ApiError::RateLimited {
        message,
        limit,
        retry_after,
        headers: headers(s),
    }
}

impl Platform {
    /// A platform over a catalog, keys, a store and a limiter. Starts the metering worker, so
    /// it must be called on a Tokio runtime.
    pub fn new(
        catalog: Catalog,
        auth: Arc<dyn Authenticator>,
        store: Store,
        limiter: Limiter,
    ) -> Self {
        let limiter = Arc::new(limiter);
        let catalog = Arc::new(catalog);
        let metrics = Arc::new(Metrics::new(catalog.clone()));
        let meter = Arc::new(Meter::start(
            store.clone(),
            limiter.clone(),
            metrics.clone(),
        ));
        let apps = Arc::new(projects::Apps::new(store.clone()));
        Self {
            catalog,
            auth,
            store,
            limiter,
            metrics,
            meter,
            apps,
            http: reqwest::Client::new(),
            filters: Filters::default(),
        }
    }

    /// The same platform with these content filters on every request and answer.
    pub fn with_filters(mut self, filters: Filters) -> Self {
        self.filters = filters;
        self
    }

    /// The server's content filters, then those of the request's project.
    pub(crate) fn filters_for(&self, ctx: &resolve::AppContext) -> Filters {
        match &ctx.project {
            Some(p) => self.filters.merged(&p.filters),
            None => self.filters.clone(),
        }
    }

    /// Resolves the project, campaign, session and model, prepares the request, checks the
    /// key's limits, reserves the worst-case cost, and starts the completion. Refusals come
    /// back as errors (400, 402, 404, 429, 503) before any model work is done.
    pub async fn chat(
        &self,
        principal: &Principal,
        request: &ChatRequest,
    ) -> Result<Started, ApiError> {
        let mut resolved = request.clone();
        let ctx = self.resolve_app(principal, &mut resolved).await?;
        let request_id = ids::new_request_id();
        let tags = UsageTags {
            project_id: ctx.project_id(),
            campaign_id: ctx.campaign_id(),
            variant: ctx.variant(),
            session_id: ctx.session.as_ref().map(|s| s.0.clone()),
            parent_id: None,
            tags: resolved.app.tags.clone(),
        };
        let mut started = self
            .chat_once(
                principal,
                &resolved,
                &self.filters_for(&ctx),
                tags.clone(),
                request_id.clone(),
            )
            .await?;
        started.model = ctx.response_model.clone();
        started.session_id = ctx.session.as_ref().map(|s| s.0.clone());
        if ctx.needs_driver(&resolved) {
            let meta = ResponseMeta {
                id: format!("chatcmpl-{request_id}"),
                created: started.created,
                model: started
                    .model
                    .clone()
                    .unwrap_or_else(|| request.model.clone()),
                fingerprint: started.fingerprint.clone(),
                request_id,
                session_id: started.session_id.clone(),
                legacy_functions: request.legacy_functions,
            };
            let first = std::mem::replace(
                &mut started.stream.events,
                Box::pin(futures::stream::empty()),
            );
            started.stream.events = conversation::drive(
                conversation::Drive {
                    platform: self.clone(),
                    principal: principal.clone(),
                    request: resolved,
                    caller: request.clone(),
                    ctx,
                    tags,
                    meta,
                },
                first,
            );
        }
        Ok(started)
    }

    /// One provider call of a request: filter, prepare, limit, reserve, start, meter.
    pub(crate) async fn chat_once(
        &self,
        principal: &Principal,
        request: &ChatRequest,
        filters: &Filters,
        tags: UsageTags,
        request_id: String,
    ) -> Result<Started, ApiError> {
        let arrived = Instant::now();
        let created_at = parlance_store::now_ms();
        let entry = self.catalog.resolve(&request.model)?;
        // The request's span (the caller's) lives until the settlement; admission is its first
        // child: filters, preparation, rate limits and credit.
        let request_span = tracing::Span::current();
        request_span.record("model", entry.name.as_str());
        // The id of its usage record (`/admin/requests`), to find the logs of a metered request.
        request_span.record("usage_id", request_id.as_str());
        let admission = tracing::info_span!(
            "admission",
            model = %entry.name,
            provider = entry.provider.kind(),
            prompt_tokens = tracing::field::Empty,
        );
        if !entry.provider.ready() {
            return Err(ApiError::NotReady(format!(
                "The model `{}` is not ready yet.",
                request.model
            )));
        }
        let closing = |prompt_tokens: u32, tags: UsageTags| Closing {
            request_id: request_id.clone(),
            created_at,
            arrived,
            key_id: principal.key_id.clone(),
            account_id: principal.account_id.clone(),
            model: entry.name.clone(),
            provider: entry.provider.kind(),
            user: request.user.clone(),
            labels: request.metadata.clone(),
            tags,
            price: entry.price,
            reserved: 0,
            rate: None,
            prompt_tokens,
            tally: None,
            usage: None,
            first_output: None,
            ended: None,
            status: 200,
            outcome: "started",
            filter_hits: 0,
            span: request_span.clone(),
        };
        // A full queue refuses at once, before templating and tokenizing, for callers that no
        // quota could refuse first (a 429 always comes before a 503).
        let saturated = principal
            .limits
            .is_unlimited()
            .then(|| entry.provider.saturated())
            .flatten();
        if let Some(why) = saturated {
            let e = ApiError::Overloaded(why);
            if let Some(t) = self.meter.ticket(closing(0, tags)) {
                meter::refused(t, &e);
            }
            return Err(e);
        }
        // Content filters on what the caller sent: a block refuses before any work (recorded,
        // not billed); redaction rewrites the messages the model sees.
        let (input_hits, redacted) = match filters.check_input(request) {
            Ok(checked) => checked,
            Err(e) => {
                if let Some(t) = self.meter.ticket(closing(0, tags)) {
                    t.update(|c| {
                        c.filter_hits = 1;
                        c.status = 400;
                    });
                    meter::refused(t, &e);
                }
                return Err(e);
            }
        };
        let request = redacted.as_ref().unwrap_or(request);
        let prepared = entry
            .provider
            .prepare(request)
            .instrument(admission.clone())
            .await?;
        let prompt_tokens = prepared.prompt_tokens();
        admission.record("prompt_tokens", prompt_tokens);
        let worst_tokens = u64::from(prompt_tokens) + prepared.max_completion_tokens();
        let ticket = self.meter.ticket(closing(prompt_tokens, tags));
        let Some(ticket) = ticket else {
            return Err(ApiError::NotReady("The server is shutting down.".into()));
        };

        // Rate limits: count the request and its worst-case tokens, or refuse.
        let mut rate_limit = None;
        if let (Some(key), false) = (&principal.key_id, principal.limits.is_unlimited()) {
            match self
                .limiter
                .acquire(key, principal.limits, worst_tokens)
                .instrument(admission.clone())
                .await
            {
                Ok(Admit::Allowed(s)) => {
                    rate_limit = Some(headers(&s));
                    let key = key.clone();
                    ticket.update(|c| c.rate = Some((key, s.window, worst_tokens)));
                }
                Ok(Admit::Refused(s, why)) => {
                    let e = rate_limited(key, &s, why, worst_tokens);
                    meter::refused(ticket, &e);
                    return Err(e);
                }
                Err(err) => {
                    tracing::error!(error = %err, "rate limiter unavailable");
                    let e = ApiError::NotReady("The rate limiter is unavailable.".into());
                    meter::refused(ticket, &e);
                    return Err(e);
                }
            }
        }

        // Credits: hold the worst case, or refuse with 402.
        let worst_cost = entry.price.cost(
            u64::from(prompt_tokens),
            0,
            prepared.max_completion_tokens(),
        );
        if let (Some(account), true) = (&principal.account_id, worst_cost > 0) {
            match self
                .store
                .reserve(account, worst_cost)
                .instrument(admission.clone())
                .await
            {
                Ok(Reserve::Reserved) => {
                    self.meter.hold(account, worst_cost);
                    ticket.update(|c| c.reserved = worst_cost);
                }
                Ok(Reserve::Insufficient { balance }) => {
                    let e = ApiError::InsufficientBalance {
                        needed: worst_cost,
                        balance,
                    };
                    meter::refused(ticket, &e);
                    return Err(e);
                }
                Err(err) => {
                    tracing::error!(error = %err, "credit reservation failed");
                    let e = ApiError::NotReady("The credit ledger is unavailable.".into());
                    meter::refused(ticket, &e);
                    return Err(e);
                }
            }
        }

        drop(admission);
        // From here to the first output; then the attempt that produced it.
        let first_token = tracing::info_span!("first_token", arrived = false);
        let attempt = tracing::info_span!("provider_attempt", provider = entry.provider.kind());
        let mut stream = match prepared.start().instrument(attempt).await {
            Ok(s) => s,
            Err(e) => {
                meter::refused(ticket, &e);
                return Err(e);
            }
        };
        ticket.update(|c| c.filter_hits = input_hits);
        // Output filters see the events first; when they stop a choice they need what the
        // work used, so the tally goes to them as well as to the watcher.
        let mut filter_tally = None;
        if FilteredEvents::needed(filters) {
            if let Some(rx) = stream.tally.take() {
                let (to_watcher, watcher_rx) = tokio::sync::oneshot::channel();
                let (to_filter, filter_rx) = tokio::sync::oneshot::channel();
                tokio::spawn(async move {
                    if let Ok(t) = rx.await {
                        let _ = to_watcher.send(t);
                        let _ = to_filter.send(t);
                    }
                });
                stream.tally = Some(watcher_rx);
                filter_tally = Some(filter_rx);
            }
            let t = ticket.clone();
            let events = std::mem::replace(&mut stream.events, Box::pin(futures::stream::empty()));
            stream.events = Box::pin(FilteredEvents::new(
                events,
                filters,
                request.n,
                filter_tally,
                prompt_tokens,
                Box::new(move |hits| t.update(|c| c.filter_hits += hits)),
            ));
        }
        // The tally watcher holds the ticket until the provider says what the work used.
        if let Some(rx) = stream.tally.take() {
            let t = ticket.clone();
            tokio::spawn(async move {
                if let Ok(tally) = rx.await {
                    t.update(|c| c.tally = Some(tally));
                }
            });
        }
        let itl = self.metrics.inter_token(&entry.name, entry.provider.kind());
        stream.events = Box::pin(Metered::new(stream.events, ticket, itl, first_token));
        Ok(Started {
            stream,
            fingerprint: entry.provider.fingerprint(),
            request_id,
            rate_limit,
            model: None,
            session_id: None,
            created: u64::try_from(created_at / 1000).unwrap_or(0),
        })
    }

    /// Waits until every request finished so far is settled and its usage written.
    pub async fn flush_usage(&self) {
        self.meter.flush().await;
    }

    /// Stops metering new requests and waits (at most `limit`) for the open ones to settle and
    /// their usage to be written.
    pub async fn shutdown(&self, limit: Duration) {
        self.meter.shutdown(limit).await;
    }
}
