//! `parlance bench`: an LLM-aware load generator for any OpenAI-compatible server. It streams
//! chat completions (`temperature: 0`, `ignore_eos` unless `--no-ignore-eos`) and prints a table
//! for each workload of the performance plan:
//!
//! - W1, one stream: decode tokens per second and time to first token (TTFT).
//! - W2, a concurrency sweep: total output tokens per second, TTFT and inter-token latency
//!   percentiles at each concurrency. Every request of W1 and W2 opens its system prompt with a
//!   fresh tag, so no server can answer it from a prompt cache.
//! - W3, a shared prefix: a system prompt of about 1,000 tokens, the same for every request of a
//!   run (opened by a tag fresh for each run), and a distinct short question per request, at
//!   concurrency 8. TTFT percentiles, total tokens per second and the prompt tokens the server
//!   reports as cached (`usage.prompt_tokens_details.cached_tokens`, `-` when it reports none).
//! - W4, conversations: five turns each, every turn resending the whole history (the assistant's
//!   answers as received) and a new question. TTFT and cached tokens per turn, and TTFT of the
//!   last turn against the first.
//! - W5, overload: 512 short requests fired from 256 workers at once. Counts of completed
//!   requests, 503 refusals (and how long they took), other statuses, errors and requests that
//!   hung past a timeout, and whether every request completed or was refused within 50 ms.
//!
//! The `rate` workload (not in `all`) sends short plain requests at fixed rates (open loop) and
//! reports latency percentiles: run it against a fast model (the `echo` provider) with and
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
    /// Workloads to run, comma-separated: w1, w2, w3, w4, w5, rate, or all (w1 to w5).
    #[arg(long, value_delimiter = ',', default_value = "all")]
    workload: Vec<String>,
    /// Tokens generated per request of W1, W2 and W3 (sent with `ignore_eos` so every request
    /// runs this long).
    #[arg(long, default_value_t = 128)]
    max_tokens: u32,
    /// Requests per concurrency level in W2.
    #[arg(long, default_value_t = 64)]
    requests: usize,
    /// Concurrency levels of W2.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8,16,32")]
    concurrency: Vec<usize>,
    /// Repeat each measurement of W1, W2 and W3 this many times and report the median.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Requests per run of W3.
    #[arg(long, default_value_t = 32)]
    w3_requests: usize,
    /// Concurrency of W3.
    #[arg(long, default_value_t = 8)]
    w3_concurrency: usize,
    /// Approximate length in tokens of W3's shared system prompt.
    #[arg(long, default_value_t = 1000)]
    w3_prefix_tokens: usize,
    /// Conversations of W4.
    #[arg(long, default_value_t = 4)]
    w4_conversations: usize,
    /// Conversations of W4 in flight at once (1: one after the other).
    #[arg(long, default_value_t = 1)]
    w4_concurrency: usize,
    /// Turns per conversation of W4.
    #[arg(long, default_value_t = 5)]
    w4_turns: usize,
    /// Tokens generated per turn of W4.
    #[arg(long, default_value_t = 32)]
    w4_max_tokens: u32,
    /// Requests of W5.
    #[arg(long, default_value_t = 512)]
    w5_requests: usize,
    /// Requests of W5 in flight at once.
    #[arg(long, default_value_t = 256)]
    w5_concurrency: usize,
    /// Tokens generated per request of W5.
    #[arg(long, default_value_t = 16)]
    w5_max_tokens: u32,
    /// Seconds after which a request of W5 counts as hung and is abandoned.
    #[arg(long, default_value_t = 120)]
    w5_timeout: u64,
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
    /// To the end of the stream; to the status line when the answer was not a success.
    total: Duration,
    /// The stream ended with `[DONE]`.
    ok: bool,
    /// The answer's HTTP status; 0 when none came.
    status: u16,
    /// Abandoned after the per-request timeout.
    timed_out: bool,
    /// `usage.prompt_tokens`, when reported.
    prompt_tokens: Option<u32>,
    /// `usage.prompt_tokens_details.cached_tokens`, when reported.
    cached_tokens: Option<u32>,
    /// The streamed content.
    text: String,
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
                Err(_) => {
                    s.total = start.elapsed();
                    return s;
                }
            },
            Err(_) => {
                s.total = start.elapsed();
                return s;
            }
        };
        s.status = resp.status().as_u16();
        if !resp.status().is_success() {
            s.total = start.elapsed();
            // Read the error so that the connection can serve the next request.
            let _ = resp.bytes().await;
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
                    if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                        let n = |p: &str| u.pointer(p).and_then(Value::as_u64).map(|n| n as u32);
                        s.tokens = n("/completion_tokens").unwrap_or(0);
                        s.prompt_tokens = n("/prompt_tokens").or(s.prompt_tokens);
                        s.cached_tokens =
                            n("/prompt_tokens_details/cached_tokens").or(s.cached_tokens);
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
                        s.text.push_str(content);
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

    /// [`Client::stream_one`], abandoned after `timeout` if one is given.
    async fn stream_timed(&self, body: &Value, timeout: Option<Duration>) -> Sample {
        let Some(t) = timeout else {
            return self.stream_one(body).await;
        };
        match tokio::time::timeout(t, self.stream_one(body)).await {
            Ok(s) => s,
            Err(_) => Sample {
                timed_out: true,
                total: t,
                ..Sample::default()
            },
        }
    }
}

/// A streamed request. `tag` opens the system prompt, so requests with distinct tags share no
/// prefix and no server can answer them from a prompt cache (W1, W2 measure uncached work).
fn body(args: &BenchArgs, tag: &str, prompt: &str) -> Value {
    body_with_system(
        args,
        &format!("Session {tag}. You are a helpful assistant."),
        prompt,
    )
}

/// A streamed request with this system prompt.
fn body_with_system(args: &BenchArgs, system: &str, prompt: &str) -> Value {
    let mut b = json!({
        "model": args.model,
        "messages": [
            {"role": "system", "content": system},
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

/// `x` with one decimal, or `-` when there is none (NaN).
fn f1(x: f64) -> String {
    if x.is_nan() {
        "-".to_owned()
    } else {
        format!("{x:.1}")
    }
}

/// `x` rounded, or `-` when there is none (NaN).
fn f0(x: f64) -> String {
    if x.is_nan() {
        "-".to_owned()
    } else {
        format!("{x:.0}")
    }
}

const WORKLOADS: [&str; 5] = ["w1", "w2", "w3", "w4", "w5"];

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
    let mut want: Vec<String> = Vec::new();
    for w in &args.workload {
        let w = w.trim().to_lowercase();
        match w.as_str() {
            "all" => want.extend(WORKLOADS.iter().map(|w| (*w).to_owned())),
            "w1" | "w2" | "w3" | "w4" | "w5" | "rate" => want.push(w),
            _ => bail!("--workload takes w1, w2, w3, w4, w5, rate or all (comma-separated)"),
        }
    }
    let has = |w: &str| want.iter().any(|x| x == w);
    println!(
        "parlance bench: {} model={} max_tokens={} runs={runs}",
        args.url, args.model, args.max_tokens
    );
    rt.block_on(async {
        if WORKLOADS.iter().any(|w| has(w)) {
            // Warm up: one short request so that nothing measured pays for first-use costs.
            let mut warm = body(&args, &nonce(), "Hi");
            warm["max_tokens"] = json!(4);
            let s = client.stream_one(&warm).await;
            if !s.ok {
                bail!("the server did not answer a streamed chat completion at {}", args.url);
            }
        }
        if has("w1") {
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
        if has("w2") {
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
        if has("w3") {
            shared_prefix(&client, &args, runs).await;
        }
        if has("w4") {
            conversations(&client, &args).await;
        }
        if has("w5") {
            overload(&client, &args).await;
        }
        if has("rate") {
            fixed_rates(&client, &args).await?;
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

impl Row {
    /// The figures of `samples`, sent over `wall`.
    fn of(samples: &[Sample], wall: Duration) -> Row {
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
            tps: tokens as f64 / wall.as_secs_f64().max(1e-9),
            ttft_p50: pct(&mut ttft, 0.5),
            ttft_p99: pct(&mut ttft, 0.99),
            itl_p50: pct(&mut itl, 0.5),
            itl_p99: pct(&mut itl, 0.99),
            failed: samples.iter().filter(|s| !s.ok).count(),
        }
    }
}

/// Runs jobs `0..n` on `concurrency` workers, each taking the next job when its last one ends.
/// Returns the results (in no particular order) and the wall time.
async fn pool<T, F, Fut>(n: usize, concurrency: usize, job: F) -> (Vec<T>, Duration)
where
    T: Send + 'static,
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = T> + Send + 'static,
{
    use std::sync::atomic::{AtomicUsize, Ordering};
    let job = Arc::new(job);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.clamp(1, n.max(1)) {
        let (job, next) = (job.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= n {
                    return out;
                }
                out.push(job(i).await);
            }
        }));
    }
    let mut results = Vec::with_capacity(n);
    for t in tasks {
        if let Ok(v) = t.await {
            results.extend(v);
        }
    }
    (results, start.elapsed())
}

/// Streams every body, `concurrency` at a time, each abandoned after `timeout` if given.
async fn send_all(
    client: &Arc<Client>,
    bodies: Vec<Value>,
    concurrency: usize,
    timeout: Option<Duration>,
) -> (Vec<Sample>, Duration) {
    let n = bodies.len();
    let bodies = Arc::new(bodies);
    let client = client.clone();
    pool(n, concurrency, move |i| {
        let (client, bodies) = (client.clone(), bodies.clone());
        async move { client.stream_timed(&bodies[i], timeout).await }
    })
    .await
}

async fn sweep(client: &Arc<Client>, args: &BenchArgs, concurrency: usize) -> Row {
    let tag = nonce();
    let bodies = (0..args.requests)
        .map(|i| body(args, &format!("{tag}-{i}"), PROMPT))
        .collect();
    let (samples, wall) = send_all(client, bodies, concurrency, None).await;
    Row::of(&samples, wall)
}

/// About `tokens` tokens of deterministic filler (numbered house rules), opened by `tag`: the
/// shared system prompt of W3.
fn shared_system(tag: &str, tokens: usize) -> String {
    const WHO: [&str; 7] = [
        "the keeper",
        "the assistant keeper",
        "the relief keeper",
        "the inspector",
        "the boatman",
        "the cook",
        "the apprentice",
    ];
    const DOES: [&str; 5] = [
        "writes down",
        "checks twice",
        "reports to the harbour master",
        "cleans and polishes",
        "counts and records",
    ];
    const WHAT: [&str; 11] = [
        "the oil in the lamp room",
        "the brass of the lens",
        "every ship that passes the point",
        "the barometer reading",
        "the wind and the state of the sea",
        "the stores in the cellar",
        "the clockwork that turns the light",
        "the fog signal",
        "the windows of the lantern",
        "the rain gauge",
        "the log book",
    ];
    const WHEN: [&str; 3] = ["before sunset", "at midnight", "at first light"];
    let mut s = format!(
        "Session {tag}. You are the assistant of a lighthouse station. These are its rules.\n"
    );
    // Each rule is about 20 tokens (SmolLM2's tokenizer; GPT-style BPE vocabularies are close).
    for i in 0..tokens.div_ceil(20) {
        s.push_str(&format!(
            "Rule {}: {} {} {} {}.\n",
            i + 1,
            WHO[i % WHO.len()],
            DOES[i % DOES.len()],
            WHAT[i % WHAT.len()],
            WHEN[i % WHEN.len()],
        ));
    }
    s.push_str("Answer questions about these rules briefly.");
    s
}

/// Median of the values some samples report, NaN when none does.
fn median_of(samples: &[Sample], f: fn(&Sample) -> Option<u32>) -> f64 {
    median(samples.iter().filter_map(f).map(f64::from).collect())
}

/// What one run of W3 measured.
struct SharedRun {
    row: Row,
    /// Prompt tokens (median over requests), NaN when not reported.
    prompt: f64,
    /// Cached tokens, mean over requests and total, NaN when not reported.
    cached_mean: f64,
    cached_total: f64,
}

/// W3: one shared system prompt of about 1,000 tokens per run, a distinct question per request.
#[expect(clippy::print_stdout, reason = "the bench prints its table")]
async fn shared_prefix(client: &Arc<Client>, args: &BenchArgs, runs: usize) {
    let mut rows = Vec::new();
    for _ in 0..runs {
        let system = shared_system(&nonce(), args.w3_prefix_tokens);
        let bodies = (0..args.w3_requests)
            .map(|i| {
                let q = format!("Question {}: what does rule {} ask, and why?", i + 1, i + 1);
                body_with_system(args, &system, &q)
            })
            .collect();
        let (samples, wall) = send_all(client, bodies, args.w3_concurrency, None).await;
        let cached: Vec<f64> = samples
            .iter()
            .filter_map(|s| s.cached_tokens)
            .map(f64::from)
            .collect();
        let (cached_mean, cached_total) = if cached.is_empty() {
            (f64::NAN, f64::NAN)
        } else {
            let total: f64 = cached.iter().sum();
            (total / cached.len() as f64, total)
        };
        rows.push(SharedRun {
            row: Row::of(&samples, wall),
            prompt: median_of(&samples, |s| s.prompt_tokens),
            cached_mean,
            cached_total,
        });
    }
    let col =
        |f: fn(&SharedRun) -> f64| median(rows.iter().map(f).filter(|x| !x.is_nan()).collect());
    println!();
    println!(
        "W3 shared prefix (~{}-token system prompt, {} requests, concurrency {})",
        args.w3_prefix_tokens, args.w3_requests, args.w3_concurrency
    );
    println!("| prompt tokens | TTFT p50 ms | TTFT p99 ms | total tok/s | cached tokens mean | cached tokens total | failed |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {} | {} | {} | {} | {} | {} | {} |",
        f0(col(|r| r.prompt)),
        f1(col(|r| r.row.ttft_p50)),
        f1(col(|r| r.row.ttft_p99)),
        f1(col(|r| r.row.tps)),
        f1(col(|r| r.cached_mean)),
        f0(col(|r| r.cached_total)),
        rows.iter().map(|r| r.row.failed).max().unwrap_or(0)
    );
}

/// The user's messages of a W4 conversation, in turn.
const TURNS: [&str; 5] = [
    "Tell me about the history of lighthouses.",
    "What did a keeper do each night?",
    "How were the lamps fuelled?",
    "Why were most lighthouses automated?",
    "Sum up what we discussed.",
];

/// One W4 conversation: each turn sends the whole history and a new question; stops at the
/// first turn that fails.
async fn conversation(client: Arc<Client>, mut body: Value, turns: usize) -> Vec<Sample> {
    let mut out = Vec::new();
    for t in 0..turns {
        if t > 0 {
            let q = TURNS[t % TURNS.len()];
            if let Some(m) = body["messages"].as_array_mut() {
                m.push(json!({"role": "user", "content": q}));
            }
        }
        let s = client.stream_one(&body).await;
        let ok = s.ok;
        if let Some(m) = body["messages"].as_array_mut() {
            m.push(json!({"role": "assistant", "content": s.text}));
        }
        out.push(s);
        if !ok {
            break;
        }
    }
    out
}

/// W4: conversations of several turns; TTFT and cached tokens per turn.
#[expect(clippy::print_stdout, reason = "the bench prints its table")]
async fn conversations(client: &Arc<Client>, args: &BenchArgs) {
    let turns = args.w4_turns.max(1);
    let tag = nonce();
    let bodies: Vec<Value> = (0..args.w4_conversations)
        .map(|i| {
            let mut b = body(args, &format!("{tag}-{i}"), TURNS[0]);
            b["max_tokens"] = json!(args.w4_max_tokens);
            b
        })
        .collect();
    let client = client.clone();
    let (convs, _) = pool(bodies.len(), args.w4_concurrency, move |i| {
        conversation(client.clone(), bodies[i].clone(), turns)
    })
    .await;
    println!();
    println!(
        "W4 conversations ({} conversations of {turns} turns, {} at a time, {} tokens per turn)",
        args.w4_conversations, args.w4_concurrency, args.w4_max_tokens
    );
    println!("| turn | prompt tokens p50 | cached tokens p50 | TTFT p50 ms | failed |");
    println!("|---:|---:|---:|---:|---:|");
    let mut ttfts = Vec::new();
    for t in 0..turns {
        let at: Vec<Sample> = convs.iter().filter_map(|c| c.get(t)).cloned().collect();
        let ttft = median(at.iter().filter_map(|s| s.ttft).map(ms).collect());
        ttfts.push(ttft);
        println!(
            "| {} | {} | {} | {} | {} |",
            t + 1,
            f0(median_of(&at, |s| s.prompt_tokens)),
            f0(median_of(&at, |s| s.cached_tokens)),
            f1(ttft),
            convs.len() - at.iter().filter(|s| s.ok).count()
        );
    }
    if let (Some(first), Some(last)) = (ttfts.first(), ttfts.last()) {
        println!("TTFT turn {turns} / turn 1: {:.2}x", last / first);
    }
}

/// Opens up to `n` connections to the server (as many `GET /models` at once) and leaves them in
/// the pool, so that a burst that follows measures the server rather than TCP handshakes.
async fn open_connections(client: &Arc<Client>, n: usize) {
    let client = client.clone();
    pool(n, n, move |_| {
        let client = client.clone();
        async move {
            let mut req = client.http.get(format!("{}/models", client.url));
            if let Some(k) = &client.key {
                req = req.bearer_auth(k);
            }
            if let Ok(r) = req.send().await {
                let _ = r.bytes().await;
            }
        }
    })
    .await;
}

/// W5: many short requests at once against a bounded queue; each must complete or be refused
/// with 503 within 50 ms, and none may hang. The connections are opened beforehand.
#[expect(clippy::print_stdout, reason = "the bench prints its table")]
async fn overload(client: &Arc<Client>, args: &BenchArgs) {
    const REFUSAL_LIMIT_MS: f64 = 50.0;
    open_connections(client, args.w5_concurrency).await;
    let tag = nonce();
    let bodies = (0..args.w5_requests)
        .map(|i| {
            let mut b = body(args, &format!("{tag}-{i}"), PROMPT);
            b["max_tokens"] = json!(args.w5_max_tokens);
            b
        })
        .collect();
    let timeout = Duration::from_secs(args.w5_timeout);
    let (samples, wall) = send_all(client, bodies, args.w5_concurrency, Some(timeout)).await;
    let mut completed = Vec::new();
    let mut refused = Vec::new();
    let mut other = std::collections::BTreeMap::<u16, usize>::new();
    let (mut errors, mut hung) = (0usize, 0usize);
    for s in &samples {
        match s.status {
            _ if s.timed_out => hung += 1,
            200 if s.ok => completed.push(s.total.as_secs_f64()),
            503 => refused.push(ms(s.total)),
            0 | 200 => errors += 1,
            st => *other.entry(st).or_default() += 1,
        }
    }
    let slow = refused.iter().filter(|&&l| l > REFUSAL_LIMIT_MS).count();
    let max = |v: &[f64]| v.iter().copied().reduce(f64::max).unwrap_or(f64::NAN);
    let refused_max = max(&refused);
    let completed_max = max(&completed);
    println!();
    println!(
        "W5 overload ({} requests, concurrency {}, {} tokens each, timeout {} s)",
        args.w5_requests, args.w5_concurrency, args.w5_max_tokens, args.w5_timeout
    );
    println!("| completed | refused 503 | other status | errors | hung | 503 p50 ms | 503 p99 ms | 503 max ms | slowest completed s | wall s |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {} | {} | {} | {errors} | {hung} | {} | {} | {} | {} | {:.1} |",
        completed.len(),
        refused.len(),
        other.values().sum::<usize>(),
        f1(pct(&mut refused, 0.5)),
        f1(pct(&mut refused, 0.99)),
        f1(refused_max),
        f1(completed_max),
        wall.as_secs_f64()
    );
    if !other.is_empty() {
        let list: Vec<String> = other.iter().map(|(st, n)| format!("{st}: {n}")).collect();
        println!("other statuses: {}", list.join(", "));
    }
    let pass = completed.len() + refused.len() - slow == samples.len();
    println!(
        "every request completed or was refused within {REFUSAL_LIMIT_MS} ms: {}",
        if pass {
            "yes".to_owned()
        } else {
            format!(
                "no ({slow} refusals over {REFUSAL_LIMIT_MS} ms, {} other, {errors} errors, {hung} hung)",
                other.values().sum::<usize>()
            )
        }
    );
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
