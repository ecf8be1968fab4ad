//! Per-key rate limits: requests and tokens per minute, in fixed one-minute windows, counted
//! in this process or in Redis so that every replica sees the same counts. Tokens are reserved
//! for the worst case when a request is admitted and the unused part is given back when it
//! settles, like money.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::now_ms;

/// Limits of one key; `None`: unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Requests per minute.
    pub rpm: Option<u64>,
    /// Tokens (prompt plus completion) per minute.
    pub tpm: Option<u64>,
}

impl Limits {
    /// Whether nothing is limited.
    pub fn is_unlimited(&self) -> bool {
        self.rpm.is_none() && self.tpm.is_none()
    }
}

/// Where a key stands in its current window, for the `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitState {
    /// The window (minutes since the epoch) the request was counted in.
    pub window: u64,
    /// The limits.
    pub limits: Limits,
    /// Requests used in the window (this one included when admitted).
    pub requests_used: u64,
    /// Tokens used in the window.
    pub tokens_used: u64,
    /// Milliseconds until the window resets.
    pub reset_ms: u64,
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Requests per minute.
    Requests,
    /// Tokens per minute.
    Tokens,
}

/// The answer to a request for admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Counted; go on.
    Allowed(LimitState),
    /// Over a limit; nothing was counted.
    Refused(LimitState, Refusal),
}

const WINDOW_MS: u64 = 60_000;

/// Checks both limits and counts the request only when both allow it; returns
/// `{allowed, requests, tokens, window, reset_ms, refused_by}`. Uses Redis's own clock so that
/// every replica agrees on the window.
const ACQUIRE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = math.floor(now / 60000)
local reset = (window + 1) * 60000 - now
local rk = KEYS[1] .. ':' .. window .. ':r'
local tk = KEYS[1] .. ':' .. window .. ':t'
local rpm = tonumber(ARGV[1])
local tpm = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local r = tonumber(redis.call('GET', rk) or '0')
local used = tonumber(redis.call('GET', tk) or '0')
if rpm >= 0 and r + 1 > rpm then return {0, r, used, window, reset, 1} end
if tpm >= 0 and used + n > tpm then return {0, r, used, window, reset, 2} end
r = redis.call('INCR', rk)
redis.call('PEXPIRE', rk, 120000)
used = redis.call('INCRBY', tk, n)
redis.call('PEXPIRE', tk, 120000)
return {1, r, used, window, reset, 0}
";

/// Gives back unused tokens to the window they were taken from, if it still exists.
const REFUND: &str = r"
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local back = math.min(tonumber(ARGV[1]), tonumber(v))
redis.call('DECRBY', KEYS[1], back)
return back
";

#[derive(Debug, Default)]
struct Window {
    window: u64,
    requests: u64,
    tokens: u64,
}

/// Where the counters live.
pub struct Limiter(Backing);

enum Backing {
    /// In this process: right for one replica.
    Local(Mutex<HashMap<String, Window>>),
    /// In Redis: shared by every replica.
    Redis {
        /// The connection (reconnects by itself).
        conn: redis::aio::ConnectionManager,
        /// Key prefix.
        prefix: String,
        /// The two scripts (hashed once; sent by hash, loaded on first use).
        scripts: Box<(redis::Script, redis::Script)>,
    },
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0 {
            Backing::Local(_) => "Limiter::Local",
            Backing::Redis { .. } => "Limiter::Redis",
        })
    }
}

fn refusal(code: i64) -> Refusal {
    if code == 2 {
        Refusal::Tokens
    } else {
        Refusal::Requests
    }
}

impl Limiter {
    /// Whether the counters are shared by replicas (kept in Redis).
    pub fn is_shared(&self) -> bool {
        matches!(self.0, Backing::Redis { .. })
    }

    /// Counters in this process.
    pub fn local() -> Self {
        Limiter(Backing::Local(Mutex::new(HashMap::new())))
    }

    /// Counters in the Redis server at `url` (`redis://127.0.0.1:6379/0`).
    pub async fn redis(url: &str) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let conn = redis::aio::ConnectionManager::new(client).await?;
        Ok(Limiter(Backing::Redis {
            conn,
            prefix: "parlance:rl".into(),
            scripts: Box::new((redis::Script::new(ACQUIRE), redis::Script::new(REFUND))),
        }))
    }

    /// Counts one request of `tokens` (its worst case) against `key`'s limits, or refuses it
    /// without counting anything.
    pub async fn acquire(
        &self,
        key: &str,
        limits: Limits,
        tokens: u64,
    ) -> Result<Admit, redis::RedisError> {
        match &self.0 {
            Backing::Local(windows) => {
                let now = u64::try_from(now_ms()).unwrap_or(0);
                let window = now / WINDOW_MS;
                let reset_ms = (window + 1) * WINDOW_MS - now;
                let mut map = windows.lock().unwrap_or_else(|p| p.into_inner());
                if map.len() > 100_000 {
                    map.retain(|_, w| w.window >= window);
                }
                let w = map.entry(key.to_owned()).or_default();
                if w.window != window {
                    *w = Window {
                        window,
                        ..Window::default()
                    };
                }
                let state = |w: &Window| LimitState {
                    window,
                    limits,
                    requests_used: w.requests,
                    tokens_used: w.tokens,
                    reset_ms,
                };
                if limits.rpm.is_some_and(|l| w.requests + 1 > l) {
                    return Ok(Admit::Refused(state(w), Refusal::Requests));
                }
                if limits.tpm.is_some_and(|l| w.tokens + tokens > l) {
                    return Ok(Admit::Refused(state(w), Refusal::Tokens));
                }
                w.requests += 1;
                w.tokens += tokens;
                Ok(Admit::Allowed(state(w)))
            }
            Backing::Redis {
                conn,
                prefix,
                scripts,
            } => {
                let as_arg =
                    |l: Option<u64>| l.map_or(-1, |v| i64::try_from(v).unwrap_or(i64::MAX));
                let mut conn = conn.clone();
                let out: Vec<i64> = scripts
                    .0
                    .key(format!("{prefix}:{key}"))
                    .arg(as_arg(limits.rpm))
                    .arg(as_arg(limits.tpm))
                    .arg(tokens)
                    .invoke_async(&mut conn)
                    .await?;
                let get = |i: usize| u64::try_from(out.get(i).copied().unwrap_or(0)).unwrap_or(0);
                let state = LimitState {
                    window: get(3),
                    limits,
                    requests_used: get(1),
                    tokens_used: get(2),
                    reset_ms: get(4),
                };
                if get(0) == 1 {
                    Ok(Admit::Allowed(state))
                } else {
                    Ok(Admit::Refused(
                        state,
                        refusal(out.get(5).copied().unwrap_or(1)),
                    ))
                }
            }
        }
    }

    /// Gives back `tokens` reserved in `window` and not used. A window that has passed is left
    /// alone.
    pub async fn refund(
        &self,
        key: &str,
        window: u64,
        tokens: u64,
    ) -> Result<(), redis::RedisError> {
        if tokens == 0 {
            return Ok(());
        }
        match &self.0 {
            Backing::Local(windows) => {
                let mut map = windows.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(w) = map.get_mut(key) {
                    if w.window == window {
                        w.tokens = w.tokens.saturating_sub(tokens);
                    }
                }
                Ok(())
            }
            Backing::Redis {
                conn,
                prefix,
                scripts,
            } => {
                let mut conn = conn.clone();
                let _: i64 = scripts
                    .1
                    .key(format!("{prefix}:{key}:{window}:t"))
                    .arg(tokens)
                    .invoke_async(&mut conn)
                    .await?;
                Ok(())
            }
        }
    }
}
