//! `parlance serve`: layer the configuration, load the models, listen, and shut down gracefully
//! on SIGTERM or SIGINT (stop accepting, let in-flight requests finish within a grace period).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use axum::serve::ListenerExt;
use parlance_api::StatusConvention;
use parlance_engine::Engine;
use parlance_platform::{Catalog, CatalogEntry, Keys, Platform, Price, StaticKeys};
use parlance_providers::{
    AnthropicUpstream, Deployment, EchoProvider, Endpoint, LocalProvider, OpenAiUpstream,
    RoutePolicy, Routed,
};
use parlance_server::AppState;
use parlance_store::{Limiter, Store};

use crate::config::{self, EngineSection, FileConfig};
use crate::pull;

/// Flags of `parlance serve`. Each may also come from the environment variable shown, and
/// from the configuration file; flags win over the environment, which wins over the file.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, short, env = "PARLANCE_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "PARLANCE_ADDR")]
    addr: Option<SocketAddr>,
    /// A local GGUF model to serve, as NAME=PATH or PATH (repeatable). Without any, the default
    /// model is served (and fetched on first use).
    #[arg(long = "model", short, env = "PARLANCE_MODELS", value_delimiter = ',')]
    models: Vec<String>,
    /// Static API keys accepted as `Authorization: Bearer` (comma-separated in the environment).
    #[arg(
        long = "api-key",
        env = "PARLANCE_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    api_keys: Vec<String>,
    /// Database: `sqlite://PATH` or `postgres://USER@HOST/DB` [default: SQLite file
    /// `parlance.db` in $PARLANCE_DATA_DIR or the user's data directory].
    #[arg(long, env = "PARLANCE_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Redis for rate-limit counters shared by replicas (`redis://HOST:PORT/`); without it
    /// the counters are per process.
    #[arg(long, env = "PARLANCE_REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,
    /// Token that opens the admin API (`/admin/...`); without one it is closed.
    #[arg(long, env = "PARLANCE_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Serve without API keys on an address other than loopback.
    #[arg(long, env = "PARLANCE_ALLOW_UNAUTHENTICATED")]
    allow_unauthenticated: bool,
    /// Sequences decoded together in one forward step [default: as many as --kv-cache-mib
    /// holds at the full context length, at most 64; 34 for the default model].
    #[arg(long, env = "PARLANCE_MAX_SEQUENCES")]
    max_sequences: Option<u32>,
    /// KV-cache address space in MiB that sets the number of sequences; reserved, resident
    /// only as sequences use it [default: 1536].
    #[arg(long, env = "PARLANCE_KV_CACHE_MIB")]
    kv_cache_mib: Option<u32>,
    /// Longest prompt plus completion of one request; each sequence holds this many KV cells
    /// [default: the model's, capped at 2048].
    #[arg(long, env = "PARLANCE_CONTEXT_LENGTH")]
    context_length: Option<u32>,
    /// Tokens per forward step [default: 512].
    #[arg(long, env = "PARLANCE_BATCH_SIZE")]
    batch_size: Option<u32>,
    /// CPU threads per model [default: all cores].
    #[arg(long, env = "PARLANCE_THREADS")]
    threads: Option<u32>,
    /// Requests that may wait for a sequence before new ones get 503 [default: 256].
    #[arg(long, env = "PARLANCE_MAX_QUEUE")]
    max_queue: Option<usize>,
    /// Refuse (503) a request whose estimated wait for the model exceeds this many seconds,
    /// estimated from the measured speed and recent requests; 0: no limit but --max-queue
    /// [default: 30].
    #[arg(long, env = "PARLANCE_MAX_QUEUE_WAIT", value_name = "SECONDS")]
    max_queue_wait: Option<f64>,
    /// While streams are decoding, a forward step computes at most this many milliseconds'
    /// worth of prompt tokens (by the measured speed), so a long prompt is spread over steps
    /// that each give every running stream its next token; 0: up to --batch-size tokens
    /// [default: 250].
    #[arg(long, env = "PARLANCE_MAX_PROMPT_STALL_MS", value_name = "MS")]
    max_prompt_stall_ms: Option<u64>,
    /// The types the weights are multiplied in: auto (Q8_0 for small Q4_1/Q5_1 models on CPU,
    /// 1.4-2× the batched speed for 1.5× the weights' memory; otherwise the file's), file, or
    /// q8_0. A conversion is made once and kept in the cache directory [default: auto].
    #[arg(long, env = "PARLANCE_WEIGHTS", value_name = "FORMAT")]
    weights: Option<String>,
    /// How much lower than the server's own threads the model's compute threads run (their
    /// nice value above the process's, 0-19), so that connections, refusals and streaming are
    /// never held up by a forward pass; 0: the same priority [default: 10].
    #[arg(long, env = "PARLANCE_COMPUTE_NICE", value_name = "N")]
    compute_nice: Option<u8>,
    /// Turn off the prefix cache (every prompt is computed in full).
    #[arg(long, env = "PARLANCE_NO_PREFIX_CACHE")]
    no_prefix_cache: bool,
    /// Plain attention instead of flash attention for every prompt, not only long ones (see
    /// --long-prompt-tokens): 10-18% slower on short contexts; answers are not kept in the
    /// prefix cache.
    #[arg(long, env = "PARLANCE_NO_FLASH_ATTENTION")]
    no_flash_attention: bool,
    /// With flash attention on CPU, prompts of at least this many tokens are computed (and
    /// answered) in a second context with the plain attention, with a quarter of the sequences: about
    /// 1.4x faster prompts after 512 tokens of context, 1.6x after 1,024. Which context a
    /// request takes depends only on its prompt's length; 0: one context [default: 512].
    #[arg(long, env = "PARLANCE_LONG_PROMPT_TOKENS", value_name = "TOKENS")]
    long_prompt_tokens: Option<u32>,
    /// Status for out-of-range parameter values: 400 (OpenAI's) or 422 [default: 400].
    #[arg(long, env = "PARLANCE_INVALID_VALUE_STATUS")]
    invalid_value_status: Option<u16>,
    /// Seconds in-flight requests get to finish after SIGTERM or SIGINT [default: 30].
    #[arg(long, env = "PARLANCE_SHUTDOWN_GRACE_SECONDS")]
    shutdown_grace_seconds: Option<u64>,
    /// Exit when standard input closes (for a supervisor or test harness that owns the process).
    #[arg(long, hide = true)]
    exit_on_stdin_eof: bool,
    /// Log format: pretty or json [default: pretty]. Levels come from RUST_LOG.
    #[arg(long, env = "PARLANCE_LOG_FORMAT")]
    log_format: Option<String>,
    /// Export traces to this OpenTelemetry collector (OTLP over HTTP): its base URL, e.g.
    /// http://127.0.0.1:4318 [default: no export].
    #[arg(long, env = "PARLANCE_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// OTLP encoding: http/protobuf or http/json [default: http/protobuf].
    #[arg(long, env = "PARLANCE_OTLP_PROTOCOL")]
    otlp_protocol: Option<String>,
}

struct ModelSpec {
    name: String,
    /// The GGUF file; `None` for the echo provider.
    path: Option<PathBuf>,
    engine: EngineSection,
    price: Price,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    if args.exit_on_stdin_eof {
        std::thread::spawn(|| {
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            std::process::exit(0);
        });
    }
    let file = match &args.config {
        Some(p) => config::load(p)?,
        None => FileConfig::default(),
    };
    // Checked before any model loads: a bad filter stops the server at once.
    let filters = parlance_platform::Filters::new(&file.filters)
        .map_err(|e| anyhow::anyhow!("config: {e}"))?;
    let otlp = args
        .otlp_endpoint
        .clone()
        .or(file.otlp_endpoint.clone())
        .map(|endpoint| crate::telemetry::Otlp {
            endpoint,
            protocol: args
                .otlp_protocol
                .clone()
                .or(file.otlp_protocol.clone())
                .unwrap_or_else(|| "http/protobuf".to_owned()),
        });
    let telemetry = crate::telemetry::init(
        args.log_format
            .as_deref()
            .or(file.log_format.as_deref())
            .unwrap_or("pretty"),
        otlp.as_ref(),
    )?;
    let addr = args
        .addr
        .or(file.addr)
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080)));
    let flags = EngineSection {
        max_sequences: args.max_sequences,
        kv_cache_mib: args.kv_cache_mib,
        context_length: args.context_length,
        batch_size: args.batch_size,
        threads: args.threads,
        max_queue: args.max_queue,
        max_queue_wait_seconds: args.max_queue_wait,
        max_prompt_stall_ms: args.max_prompt_stall_ms,
        prefix_cache: args.no_prefix_cache.then_some(false),
        flash_attention: args.no_flash_attention.then_some(false),
        long_prompt_tokens: args.long_prompt_tokens,
        weights: args.weights.clone(),
        compute_nice: args.compute_nice,
    };
    let defaults = flags.or(&file.engine);
    let mut specs = Vec::new();
    for m in &args.models {
        let (name, path) = config::parse_model_flag(m)?;
        specs.push(ModelSpec {
            name,
            path: Some(path),
            engine: defaults.clone(),
            price: Price::default(),
        });
    }
    let routed: Vec<&config::ModelSection> = file
        .models
        .iter()
        .filter(|m| !m.deployments.is_empty())
        .collect();
    if specs.is_empty() {
        for m in file.models.iter().filter(|m| m.deployments.is_empty()) {
            let path = match (m.provider.as_deref(), m.path.as_deref()) {
                (Some("echo"), _) => None,
                (None | Some("local"), None | Some("default")) => {
                    Some(pull::ensure_default_model()?)
                }
                (None | Some("local"), Some(p)) => Some(PathBuf::from(p)),
                (Some(other), _) => bail!(
                    "model {}: provider must be `local` or `echo`, not {other:?}",
                    m.name
                ),
            };
            m.price
                .validate()
                .map_err(|e| anyhow::anyhow!("model {}: {e}", m.name))?;
            specs.push(ModelSpec {
                name: m.name.clone(),
                path,
                engine: flags.or(&m.engine).or(&file.engine),
                price: m.price,
            });
        }
    }
    if specs.is_empty() && routed.is_empty() {
        specs.push(ModelSpec {
            name: pull::DEFAULT_MODEL_NAME.into(),
            path: Some(pull::ensure_default_model()?),
            engine: defaults.clone(),
            price: Price::default(),
        });
    }

    let mut keys: Vec<String> = file.api_keys.clone();
    keys.extend(args.api_keys.iter().cloned());
    let statics = StaticKeys::new(&keys);
    let open_ok = args.allow_unauthenticated || file.allow_unauthenticated.unwrap_or(false);
    let database_url = config::database_url(
        args.database_url
            .as_deref()
            .or(file.database_url.as_deref()),
    )?;
    let redis_url = args.redis_url.clone().or(file.redis_url.clone());
    let admin_token = args.admin_token.clone().or(file.admin_token.clone());
    let convention = match args.invalid_value_status.or(file.invalid_value_status) {
        None | Some(400) => StatusConvention::OpenAi,
        Some(422) => StatusConvention::Unprocessable,
        Some(s) => bail!("invalid_value_status must be 400 or 422, not {s}"),
    };
    let grace = Duration::from_secs(
        args.shutdown_grace_seconds
            .or(file.shutdown_grace_seconds)
            .unwrap_or(30),
    );

    let mut catalog = Catalog::default();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for spec in specs {
        let Some(path) = &spec.path else {
            tracing::info!(model = %spec.name, "echo provider (answers with the user's words)");
            catalog.insert(CatalogEntry {
                name: spec.name,
                provider: Arc::new(EchoProvider),
                created: now,
                price: spec.price,
            });
            continue;
        };
        let cfg = spec
            .engine
            .build()
            .with_context(|| format!("model {}", spec.name))?;
        tracing::info!(model = %spec.name, path = %path.display(), "loading model");
        let engine =
            Engine::load(path, &cfg).with_context(|| format!("cannot load model {}", spec.name))?;
        let info = engine.info();
        tracing::info!(
            model = %spec.name,
            context_length = info.context_length,
            max_sequences = info.max_sequences,
            kv_cache_mib = (u64::from(info.max_sequences)
                * u64::from(info.context_length)
                * info.kv_bytes_per_cell)
                >> 20,
            long_prompts_from = info.long_prompts.map(|l| l.from_tokens),
            long_prompt_sequences = info.long_prompts.map(|l| l.sequences),
            fingerprint = %info.fingerprint,
            weights = ?info.weights,
            weights_path = %info.weights_path.display(),
            "model loaded"
        );
        catalog.insert(CatalogEntry {
            name: spec.name,
            provider: Arc::new(LocalProvider::new(Arc::new(engine))),
            created: now,
            price: spec.price,
        });
    }

    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(90))
        .build()?;
    for m in routed {
        catalog.insert(CatalogEntry {
            name: m.name.clone(),
            provider: Arc::new(routed_model(m, &file.providers, &http)?),
            created: now,
            price: m.price,
        });
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let served = rt.block_on(async move {
        let store = Store::open(&database_url)
            .await
            .with_context(|| format!("cannot open the database {}", redact(&database_url)))?;
        tracing::info!(database = %redact(&database_url), "database ready");
        let limiter = match &redis_url {
            Some(u) => {
                let l = Limiter::redis(u)
                    .await
                    .with_context(|| format!("cannot reach Redis at {}", redact(u)))?;
                tracing::info!(redis = %redact(u), "rate-limit counters in Redis");
                l
            }
            None => Limiter::local(),
        };
        let keys = Keys::new(statics, store.clone());
        if keys.is_open().await.map_err(|e| anyhow::anyhow!("{e}"))? {
            if !addr.ip().is_loopback() && !open_ok {
                bail!("refusing to serve {addr} without API keys: create one (`parlance keys create`), set --api-key (or PARLANCE_API_KEYS), or pass --allow-unauthenticated to serve anyone who can reach it");
            }
            tracing::warn!(%addr, "no API keys configured: serving WITHOUT authentication");
        }
        let platform =
            Platform::new(catalog, Arc::new(keys), store, limiter).with_filters(filters);
        let mut state = AppState::new(platform.clone()).with_admin_token(admin_token.as_deref());
        state.convention = convention;
        if let Some(limit) = file.body_limit_bytes {
            state.body_limit = limit;
        }
        let state = Arc::new(state);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let local = listener.local_addr()?;
        tracing::info!("listening on http://{local}");
        let app = parlance_server::router(state.clone());
        let shutdown_state = state.clone();
        // Streams are many small writes: send each at once rather than wait for the last
        // one's acknowledgement (Nagle's algorithm against delayed ACKs costs 40 ms a write).
        let listener = listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
        });
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                shutdown_signal().await;
                tracing::info!(
                    grace_seconds = grace.as_secs(),
                    "shutting down: finishing in-flight requests"
                );
                shutdown_state.begin_shutdown();
                // Past the grace period, exit even if streams are still open.
                tokio::spawn(async move {
                    tokio::time::sleep(grace).await;
                    tracing::warn!("grace period over: exiting with requests still open");
                    std::process::exit(0);
                });
            })
            .await?;
        // Every request has finished: settle what is open and write the last usage records.
        platform.shutdown(Duration::from_secs(10)).await;
        tracing::info!("stopped");
        anyhow::Ok(())
    });
    drop(rt);
    // The spans still waiting go out now that the runtime is gone (the exporter blocks).
    telemetry.shutdown();
    served
}

/// A model served by deployments on upstream providers.
fn routed_model(
    m: &config::ModelSection,
    providers: &[config::ProviderSection],
    http: &reqwest::Client,
) -> anyhow::Result<Routed> {
    m.price
        .validate()
        .map_err(|e| anyhow::anyhow!("model {}: {e}", m.name))?;
    let context = m.engine.context_length.unwrap_or(128_000);
    let mut deployments = Vec::new();
    for (i, d) in m.deployments.iter().enumerate() {
        let Some(p) = providers.iter().find(|p| p.name == d.provider) else {
            bail!("model {}: no provider named {:?}", m.name, d.provider);
        };
        let key = match (&p.api_key, &p.api_key_env) {
            (Some(k), _) => Some(k.clone()),
            (None, Some(var)) => Some(std::env::var(var).with_context(|| {
                format!(
                    "provider {}: the environment variable {var} is not set",
                    p.name
                )
            })?),
            (None, None) => None,
        };
        let provider: Arc<dyn parlance_providers::ChatProvider> = match p.kind.as_str() {
            "openai" => Arc::new(
                OpenAiUpstream::new(Endpoint::new(
                    http.clone(),
                    &p.base_url,
                    key,
                    &d.model,
                    context,
                ))
                .with_pass_through(p.pass_through.clone()),
            ),
            "anthropic" => Arc::new(AnthropicUpstream::new(Endpoint::new(
                http.clone(),
                &p.base_url,
                key,
                &d.model,
                context,
            ))),
            other => bail!(
                "provider {}: kind must be `openai` or `anthropic`, not {other:?}",
                p.name
            ),
        };
        let weight = d.weight.unwrap_or(u32::from(i == 0));
        deployments.push(Deployment::new(
            provider,
            weight,
            format!("{}/{}", p.name, d.model),
        ));
    }
    tracing::info!(model = %m.name, deployments = deployments.len(), "upstream model");
    Ok(Routed::new(
        deployments,
        RoutePolicy {
            retries: m.retries.unwrap_or(1),
            max_ttft_ms: m.max_ttft_ms,
            ..RoutePolicy::default()
        },
    ))
}

/// A URL without its password, for logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
