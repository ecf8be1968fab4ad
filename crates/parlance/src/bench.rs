//! `parlance bench`: an LLM-aware load generator for any OpenAI-compatible server. It streams
//! chat completions and measures time to first token, inter-token latency and output tokens per
//! second, for the workloads of the performance plan (W1: one stream; W2: a concurrency sweep),
//! and prints a table. The `rate` workload sends short plain requests at fixed rates (open loop)
//! and reports latency percentiles: run it against a fast model (the `echo` provider) with and
//! without keys, limits and prices to measure what the platform path adds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use serde_json::{json, Value};

/// Flags of `parlance bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Base URL of the API, up to and including `/v1`.
    #[arg(long, default_value = "http://127.0.0.1:8080/v1")]
    url: String,
    /// Model name to request.
    #[arg(long, default_value = crate::pull::DEFAULT_MODEL_NAME)]
    model: String,
    /// Bearer key, if the server needs one.
    #[arg(long, env = "PARLANCE_BENCH_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Workloads to run: w1, w2 or all.
    #[arg(long, default_value = "all")]
    workload: String,
    /// Tokens generated per request (sent with `ignore_eos` so every request runs this long).
    #[arg(long, default_value_t = 128)]
    max_tokens: u32,
    /// Requests per concurrency level in W2.
    #[arg(long, default_value_t = 64)]
    requests: usize,
    /// Concurrency levels of W2.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8,16,32")]
    concurrency: Vec<usize>,
    /// Repeat each measurement this many times and report the median.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Request rates (per second) of the `rate` workload.
    #[arg(long, value_delimiter = ',', default_value = "500,1000")]
    rate: Vec<u32>,
    /// Seconds per rate in the `rate` workload.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Do not send `ignore_eos` (for servers that reject unknown fields).
    #[arg(long)]
    no_ignore_eos: bool,
    /// Constrain every request with a JSON schema (a long array of digits), to measure the cost
    /// of constrained decoding against the same length unconstrained.
    #[arg(long)]
    constrained: bool,
}

/// What one streamed request measured.
#[derive(Debug, Clone, Default)]
struct Sample {
    ttft: Option<Duration>,
    gaps: Vec<Duration>,
    tokens: u32,
    total: Duration,
    ok: bool,
}

struct Client {
    http: reqwest::Client,
    url: String,
    key: Option<String>,
}

const PROMPT: &str =
    "Write a long story about a lighthouse keeper who finds a message in a bottle.";

impl Client {
    async fn stream_one(&self, body: &Value) -> Sample {
        let start = Instant::now();
        let mut s = Sample::default();
        let send = || {
            let mut req = self
                .http
                .post(format!("{}/chat/completions", self.url))
                .json(body);
            if let Some(k) = &self.key {
                req = req.bearer_auth(k);
            }
            req.send()
        };
        // A pooled connection the server already closed fails before the request is sent:
        // retry that once rather than count it against the server.
        let resp = match send().await {
            Ok(r) => r,
            Err(e) if e.is_connect() || e.is_request() => match send().await {
                Ok(r) => r,
                Err(_) => return s,
            },
            Err(_) => return s,
        };
        if !resp.status().is_success() {
            s.total = start.elapsed();
            return s;
        }
        let mut bytes = resp.bytes_stream();
        let mut buf = String::new();
        let mut last: Option<Instant> = None;
        let mut counted = 0u32;
        while let Some(Ok(chunk)) = bytes.next().await {
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let event: String = buf.drain(..end + 2).collect();
                for line in event.lines() {
                    let Some(data) = line.strip_prefix("data: ") else {
                        continue;
                    };
                    if data == "[DONE]" {
                        s.ok = true;
                        continue;
                    }
                    let Ok(v) = serde_json::from_str::<Value>(data) else {
                        continue;
                    };
                    if let Some(u) = v.get("usage").and_then(|u| u.get("completion_tokens")) {
                        s.tokens = u.as_u64().unwrap_or(0) as u32;
                    }
                    let content = v
                        .pointer("/choices/0/delta/content")
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    if !content.is_empty() {
                        let now = Instant::now();
                        match last {
                            None => s.ttft = Some(now - start),
                            Some(prev) => s.gaps.push(now - prev),
                        }
                        last = Some(now);
                        counted += 1;
                    }
                }
            }
        }
        if s.tokens == 0 {
            s.tokens = counted;
        }
        s.total = start.elapsed();
        s
    }
}

/// A streamed request. `tag` opens the system prompt, so requests with distinct tags share no
/// prefix and no server can answer them from a prompt cache (W1, W2 measure uncached work).
fn body(args: &BenchArgs, tag: &str, prompt: &str) -> Value {
    let mut b = json!({
        "model": args.model,
        "messages": [
            {"role": "system", "content": format!("Session {tag}. You are a helpful assistant.")},
            {"role": "user", "content": prompt},
        ],
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if !args.no_ignore_eos {
        b["ignore_eos"] = json!(true);
    }
    if args.constrained {
        b["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "digits",
            "schema": {"type": "array", "minItems": 10000,
                       "items": {"type": "integer", "minimum": 0, "maximum": 9}}}});
    }
    b
}

/// A tag no earlier request used.
fn nonce() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{t:x}")
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    v[i]
}

fn median(mut v: Vec<f64>) -> f64 {
    pct(&mut v, 0.5)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[expect(clippy::print_stdout, reason = "the bench prints its table")]
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let runs = args.runs.max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let client = Arc::new(Client {
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .build()?,
        url: args.url.trim_end_matches('/').to_owned(),
        key: args.api_key.clone(),
    });
    let w = args.workload.to_lowercase();
    if !matches!(w.as_str(), "w1" | "w2" | "all" | "rate") {
        bail!("--workload must be w1, w2, rate or all");
    }
    println!(
        "parlance bench: {} model={} max_tokens={} runs={runs}",
        args.url, args.model, args.max_tokens
    );
    rt.block_on(async {
        if w == "rate" {
            return fixed_rates(&client, &args).await;
        }
        // Warm up: one short request so that nothing measured pays for first-use costs.
        let mut warm = body(&args, &nonce(), "Hi");
        warm["max_tokens"] = json!(4);
        let s = client.stream_one(&warm).await;
        if !s.ok {
            bail!("the server did not answer a streamed chat completion at {}", args.url);
        }
        if w == "w1" || w == "all" {
            let (mut tps, mut ttft) = (Vec::new(), Vec::new());
            for _ in 0..runs {
                let s = client.stream_one(&body(&args, &nonce(), PROMPT)).await;
                let t = s.ttft.context("W1 request produced no tokens")?;
                let decode = s.total.saturating_sub(t).as_secs_f64();
                tps.push(f64::from(s.tokens.saturating_sub(1)) / decode.max(1e-9));
                ttft.push(ms(t));
            }
            println!();
            println!("W1 single stream");
            println!("| decode tok/s | TTFT ms |");
            println!("|---:|---:|");
            println!("| {:.1} | {:.1} |", median(tps), median(ttft));
        }
        if w == "w2" || w == "all" {
            println!();
            println!("W2 concurrency sweep ({} requests per level)", args.requests);
            println!("| concurrency | total tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | failed |");
            println!("|---:|---:|---:|---:|---:|---:|---:|");
            for &c in &args.concurrency {
                let mut rows = Vec::new();
                for _ in 0..runs {
                    rows.push(sweep(&client, &args, c).await);
                }
                let col = |f: fn(&Row) -> f64| median(rows.iter().map(f).collect());
                println!(
                    "| {c} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} |",
                    col(|r| r.tps),
                    col(|r| r.ttft_p50),
                    col(|r| r.ttft_p99),
                    col(|r| r.itl_p50),
                    col(|r| r.itl_p99),
                    rows.iter().map(|r| r.failed).max().unwrap_or(0)
                );
            }
        }
        anyhow::Ok(())
    })
}

struct Row {
    tps: f64,
    ttft_p50: f64,
    ttft_p99: f64,
    itl_p50: f64,
    itl_p99: f64,
    failed: usize,
}

async fn sweep(client: &Arc<Client>, args: &BenchArgs, concurrency: usize) -> Row {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let client = client.clone();
        let next = next.clone();
        let total = args.requests;
        let prompts: Vec<Value> = (0..total)
            .map(|i| body(args, &format!("{}-{i}", nonce()), PROMPT))
            .collect();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= total {
                    return out;
                }
                out.push(client.stream_one(&prompts[i]).await);
            }
        }));
    }
    let mut samples = Vec::new();
    for t in tasks {
        if let Ok(v) = t.await {
            samples.extend(v);
        }
    }
    let wall = start.elapsed().as_secs_f64();
    let tokens: u64 = samples
        .iter()
        .filter(|s| s.ok)
        .map(|s| u64::from(s.tokens))
        .sum();
    let mut ttft: Vec<f64> = samples.iter().filter_map(|s| s.ttft).map(ms).collect();
    let mut itl: Vec<f64> = samples
        .iter()
        .flat_map(|s| s.gaps.iter().copied().map(ms))
        .collect();
    Row {
        tps: tokens as f64 / wall.max(1e-9),
        ttft_p50: pct(&mut ttft, 0.5),
        ttft_p99: pct(&mut ttft, 0.99),
        itl_p50: pct(&mut itl, 0.5),
        itl_p99: pct(&mut itl, 0.99),
        failed: samples.iter().filter(|s| !s.ok).count(),
    }
}

/// One plain request; its status and latency measured from when it was due.
async fn plain_one(client: &Client, body: &Value, due: Instant) -> (u16, Duration) {
    let mut req = client
        .http
        .post(format!("{}/chat/completions", client.url))
        .json(body);
    if let Some(k) = &client.key {
        req = req.bearer_auth(k);
    }
    let status = match req.send().await {
        Ok(r) => {
            let st = r.status().as_u16();
            let _ = r.bytes().await;
            st
        }
        Err(_) => 0,
    };
    (status, due.elapsed())
}

/// The `rate` workload: for each rate, requests sent on schedule (not waiting for answers),
/// latency from each request's due time, so a stall is measured rather than hidden.
#[expect(clippy::print_stdout, reason = "the bench prints its table")]
async fn fixed_rates(client: &Arc<Client>, args: &BenchArgs) -> anyhow::Result<()> {
    let body = json!({"model": args.model, "max_tokens": args.max_tokens,
                      "messages": [{"role": "user", "content": "one two three four five six seven eight"}]});
    // Warm up the connection pool and the server's caches.
    for _ in 0..200 {
        let (st, _) = plain_one(client, &body, Instant::now()).await;
        if st != 200 {
            bail!(
                "the server answered {st} to a plain chat completion at {}",
                args.url
            );
        }
    }
    println!();
    println!("Fixed-rate plain requests ({} s per rate)", args.duration);
    println!("| rate req/s | sent | ok | other | p50 ms | p90 ms | p99 ms | max ms |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &rate in &args.rate {
        let total = u64::from(rate.max(1)) * args.duration;
        let period = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
        let start = Instant::now();
        let mut tasks = Vec::with_capacity(total as usize);
        for i in 0..total {
            let due = start + period.mul_f64(i as f64);
            tokio::time::sleep_until(due.into()).await;
            let client = client.clone();
            let body = body.clone();
            tasks.push(tokio::spawn(
                async move { plain_one(&client, &body, due).await },
            ));
        }
        let mut lat = Vec::with_capacity(tasks.len());
        let mut ok = 0usize;
        let mut other = 0usize;
        for t in tasks {
            if let Ok((st, d)) = t.await {
                if st == 200 {
                    ok += 1;
                    lat.push(ms(d));
                } else {
                    other += 1;
                }
            }
        }
        let max = lat.iter().copied().fold(0.0, f64::max);
        println!(
            "| {rate} | {total} | {ok} | {other} | {:.3} | {:.3} | {:.3} | {:.1} |",
            pct(&mut lat, 0.5),
            pct(&mut lat, 0.9),
            pct(&mut lat, 0.99),
            max
        );
    }
    Ok(())
}
