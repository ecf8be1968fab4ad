//! Prometheus metrics: what happened (requests, latencies, tokens, credits, refusals) is counted
//! as it happens; what is (queues, sequences, KV and prefix cache, upstream breakers) is read
//! from the providers at each scrape. Label values come only from the configuration and from
//! fixed sets (routes, statuses, outcomes), never from callers, so label sets stay bounded.

use std::sync::Arc;

use parlance_store::UsageRecord;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::Catalog;

/// An HTTP request: its route pattern (not its path), method and status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    route: String,
    method: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

/// A completion request as metered.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    model: String,
    provider: String,
    status: u16,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
    provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    model: String,
    reason: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency() -> Histogram {
    Histogram::new([
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
    ])
}

fn inter_token() -> Histogram {
    Histogram::new([
        0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56,
    ])
}

/// Registers a metric (with its unit, if any) and gives it back.
fn registered<M: prometheus_client::registry::Metric + Clone>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    metric: M,
) -> M {
    match unit {
        Some(u) => registry.register_with_unit(name, help, u, metric.clone()),
        None => registry.register(name, help, metric.clone()),
    }
    metric
}

/// Every metric of a server; `render` writes them in Prometheus' text format.
pub struct Metrics {
    registry: Registry,
    http_requests: Family<HttpLabels, Counter>,
    http_duration: Histograms<RouteLabels>,
    requests: Family<RequestLabels, Counter>,
    duration: Histograms<ModelLabels>,
    ttft: Histograms<ModelLabels>,
    itl: Histograms<ModelLabels>,
    prompt_tokens: Family<ModelLabels, Counter>,
    cached_tokens: Family<ModelLabels, Counter>,
    completion_tokens: Family<ModelLabels, Counter>,
    credits: Family<ModelLabels, Counter>,
    refusals: Family<RefusalLabels, Counter>,
    filter_hits: Family<ModelLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// The metrics of a server over this catalog.
    pub fn new(catalog: Arc<Catalog>) -> Self {
        let mut registry = Registry::with_prefix("parlance");
        let http_requests = registered(
            &mut registry,
            "http_requests",
            "HTTP requests by route pattern, method and status",
            None,
            Family::<HttpLabels, Counter>::default(),
        );
        let http_duration = registered(
            &mut registry,
            "http_request_duration",
            "Time to the response head, by route pattern (a stream's body continues after it)",
            Some(Unit::Seconds),
            Histograms::<RouteLabels>::new_with_constructor(latency),
        );
        let requests = registered(&mut registry, "requests", "Completion requests by model, provider, status and outcome (completed, error, cancelled, refused)", None, Family::<RequestLabels, Counter>::default());
        let duration = registered(
            &mut registry,
            "request_duration",
            "Completion requests from arrival to the end of the work",
            Some(Unit::Seconds),
            Histograms::<ModelLabels>::new_with_constructor(latency),
        );
        let ttft = registered(
            &mut registry,
            "time_to_first_token",
            "From arrival to the first output",
            Some(Unit::Seconds),
            Histograms::<ModelLabels>::new_with_constructor(latency),
        );
        let itl = registered(
            &mut registry,
            "inter_token_latency",
            "Between successive pieces of output of one request",
            Some(Unit::Seconds),
            Histograms::<ModelLabels>::new_with_constructor(inter_token),
        );
        let prompt_tokens = registered(
            &mut registry,
            "prompt_tokens",
            "Prompt tokens processed, cached ones included",
            None,
            Family::<ModelLabels, Counter>::default(),
        );
        let cached_tokens = registered(
            &mut registry,
            "cached_tokens",
            "Prompt tokens reused from a cache",
            None,
            Family::<ModelLabels, Counter>::default(),
        );
        let completion_tokens = registered(
            &mut registry,
            "completion_tokens",
            "Completion tokens generated",
            None,
            Family::<ModelLabels, Counter>::default(),
        );
        let credits = registered(
            &mut registry,
            "credits_spent_micros",
            "Credits charged, in micro-units",
            None,
            Family::<ModelLabels, Counter>::default(),
        );
        let refusals = registered(&mut registry, "refusals", "Requests refused at admission: rate_limited (429), insufficient_balance (402), overloaded (503)", None, Family::<RefusalLabels, Counter>::default());
        let filter_hits = registered(
            &mut registry,
            "filter_hits",
            "Content-filter matches (blocked or redacted)",
            None,
            Family::<ModelLabels, Counter>::default(),
        );
        registry.register_collector(Box::new(Load { catalog }));
        Self {
            registry,
            http_requests,
            http_duration,
            requests,
            duration,
            ttft,
            itl,
            prompt_tokens,
            cached_tokens,
            completion_tokens,
            credits,
            refusals,
            filter_hits,
        }
    }

    /// Counts an HTTP request: `route` is its pattern (`/v1/chat/completions/{id}`), or
    /// `unmatched`.
    pub fn http(&self, route: &str, method: &str, status: u16, seconds: f64) {
        let method = match method {
            "GET" | "POST" | "PUT" | "DELETE" | "PATCH" | "HEAD" | "OPTIONS" => method,
            _ => "other",
        };
        self.http_requests
            .get_or_create(&HttpLabels {
                route: route.to_owned(),
                method: method.to_owned(),
                status,
            })
            .inc();
        self.http_duration
            .get_or_create(&RouteLabels {
                route: route.to_owned(),
            })
            .observe(seconds);
    }

    /// Counts a metered completion request once it is settled.
    pub(crate) fn record(&self, r: &UsageRecord) {
        let model = ModelLabels {
            model: r.model.clone(),
            provider: r.provider.clone(),
        };
        let status = u16::try_from(r.status).unwrap_or(0);
        self.requests
            .get_or_create(&RequestLabels {
                model: r.model.clone(),
                provider: r.provider.clone(),
                status,
                outcome: r.outcome.clone(),
            })
            .inc();
        if r.outcome == "refused" {
            let reason = match status {
                402 => "insufficient_balance",
                429 => "rate_limited",
                503 => "overloaded",
                _ => "other",
            };
            self.refusals
                .get_or_create(&RefusalLabels {
                    model: r.model.clone(),
                    reason,
                })
                .inc();
            return;
        }
        let secs = |ms: i64| ms.max(0) as f64 / 1000.0;
        let count = |n: i64| u64::try_from(n).unwrap_or(0);
        self.duration
            .get_or_create(&model)
            .observe(secs(r.latency_ms));
        if let Some(t) = r.ttft_ms {
            self.ttft.get_or_create(&model).observe(secs(t));
        }
        self.prompt_tokens
            .get_or_create(&model)
            .inc_by(count(r.prompt_tokens));
        self.cached_tokens
            .get_or_create(&model)
            .inc_by(count(r.cached_tokens));
        self.completion_tokens
            .get_or_create(&model)
            .inc_by(count(r.completion_tokens));
        self.credits.get_or_create(&model).inc_by(count(r.cost));
        self.filter_hits
            .get_or_create(&model)
            .inc_by(count(r.filter_hits));
    }

    /// The inter-token latency histogram of a model.
    pub(crate) fn inter_token(&self, model: &str, provider: &str) -> Histogram {
        self.itl
            .get_or_create(&ModelLabels {
                model: model.to_owned(),
                provider: provider.to_owned(),
            })
            .clone()
    }

    /// Every metric, in Prometheus' text exposition format (OpenMetrics).
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "could not encode the metrics");
        }
        out
    }
}

/// Read at each scrape: the local models' load and caches, the deployments' attempts and
/// breakers.
#[derive(Debug)]
struct Load {
    catalog: Arc<Catalog>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelOnly {
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeploymentLabels {
    model: String,
    deployment: String,
    provider: String,
}

/// One metric family written at a scrape.
fn family<L: EncodeLabelSet, M: EncodeMetric>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: &[(L, M)],
) -> Result<(), std::fmt::Error> {
    let Some((_, first)) = rows.first() else {
        return Ok(());
    };
    let mut metric = encoder.encode_descriptor(name, help, None, first.metric_type())?;
    for (labels, value) in rows {
        value.encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for Load {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let gauge = |v: u64| ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
        let mut engines = Vec::new();
        let mut deployments = Vec::new();
        for entry in self.catalog.entries() {
            let stats = entry.provider.stats();
            if let Some(e) = stats.engine {
                engines.push((
                    ModelOnly {
                        model: entry.name.clone(),
                    },
                    e,
                ));
            }
            for d in stats.deployments {
                deployments.push((
                    DeploymentLabels {
                        model: entry.name.clone(),
                        deployment: d.label.clone(),
                        provider: d.kind.to_owned(),
                    },
                    d,
                ));
            }
        }
        type Read = fn(&parlance_providers::LoadStats) -> u64;
        let gauges: [(&str, &str, Read); 7] = [
            ("queue_depth", "Requests waiting for a sequence.", |e| {
                e.queued
            }),
            ("running_sequences", "Sequences being decoded.", |e| {
                e.running
            }),
            (
                "max_sequences",
                "Sequences a local model may run at once (KV streams).",
                |e| e.max_sequences,
            ),
            (
                "kv_cache_cells",
                "KV cells in all (streams × context).",
                |e| e.kv_cells,
            ),
            (
                "kv_cache_cells_live",
                "KV cells holding sequences in flight.",
                |e| e.kv_cells_live,
            ),
            (
                "kv_cache_cells_cached",
                "KV cells holding cached prompt prefixes on free streams.",
                |e| e.kv_cells_cached,
            ),
            (
                "kv_cache_warm_streams",
                "KV streams whose memory is resident.",
                |e| e.warm_streams,
            ),
        ];
        for (name, help, read) in gauges {
            let rows: Vec<_> = engines
                .iter()
                .map(|(l, e)| (l.clone(), gauge(read(e))))
                .collect();
            family(&mut encoder, name, help, &rows)?;
        }
        let waits: Vec<_> = engines
            .iter()
            .filter_map(|(l, e)| {
                let w = e.expected_wait?;
                Some((l.clone(), ConstGauge::new(w.as_secs_f64())))
            })
            .collect();
        family(
            &mut encoder,
            "queue_wait_expected_seconds",
            "How long a request arriving now would wait for a sequence, by the local model's \
             estimate; past max_queue_wait new requests get 503.",
            &waits,
        )?;
        let counters: [(&str, &str, Read); 4] = [
            (
                "prefix_cache_lookups",
                "Requests admitted by a local model (prefix-cache lookups).",
                |e| e.prefix_lookups,
            ),
            (
                "prefix_cache_hits",
                "Admitted requests that reused part of their prompt.",
                |e| e.prefix_hits,
            ),
            (
                "prefix_cache_prompt_tokens",
                "Prompt tokens of admitted requests.",
                |e| e.prompt_tokens,
            ),
            (
                "prefix_cache_cached_tokens",
                "Prompt tokens reused from the prefix cache.",
                |e| e.cached_tokens,
            ),
        ];
        for (name, help, read) in counters {
            let rows: Vec<_> = engines
                .iter()
                .map(|(l, e)| (l.clone(), ConstCounter::new(read(e))))
                .collect();
            family(&mut encoder, name, help, &rows)?;
        }
        let rows: Vec<_> = engines
            .iter()
            .map(|(l, e)| {
                let rate = if e.prompt_tokens == 0 {
                    0.0
                } else {
                    e.cached_tokens as f64 / e.prompt_tokens as f64
                };
                (l.clone(), ConstGauge::new(rate))
            })
            .collect();
        family(
            &mut encoder,
            "prefix_cache_hit_ratio",
            "Share of admitted prompt tokens reused from the prefix cache, since start.",
            &rows,
        )?;
        type ReadD = fn(&parlance_providers::DeploymentStats) -> u64;
        let counters: [(&str, &str, ReadD); 4] = [
            ("upstream_attempts", "Attempts on a deployment.", |d| {
                d.attempts
            }),
            ("upstream_errors", "Failed attempts on a deployment.", |d| {
                d.errors
            }),
            (
                "upstream_retries",
                "Retries of a deployment after a failure.",
                |d| d.retries,
            ),
            (
                "upstream_fallbacks",
                "Requests a deployment served after another failed.",
                |d| d.fallbacks,
            ),
        ];
        for (name, help, read) in counters {
            let rows: Vec<_> = deployments
                .iter()
                .map(|(l, d)| (l.clone(), ConstCounter::new(read(d))))
                .collect();
            family(&mut encoder, name, help, &rows)?;
        }
        let rows: Vec<_> = deployments
            .iter()
            .map(|(l, d)| (l.clone(), ConstGauge::new(i64::from(d.breaker_open))))
            .collect();
        family(
            &mut encoder,
            "circuit_breaker_open",
            "1 while a deployment's circuit breaker keeps traffic away.",
            &rows,
        )
    }
}
