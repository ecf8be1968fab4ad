//! What every upstream deployment has in common: an HTTP client, a base URL, a secret key, the
//! upstream's name for the model, and one way to call it that turns refusals into errors
//! without ever letting the key or the URL into a log or a message.

use std::time::Duration;

use parlance_api::ApiError;
use serde_json::Value;

use crate::sse::Translator;
use crate::{ChatStream, PreparedChat};

/// An upstream deployment's address and credentials.
#[derive(Clone)]
pub struct Endpoint {
    http: reqwest::Client,
    base_url: String,
    api_key: Option<String>,
    /// The upstream's name for the model.
    pub model: String,
    /// Longest prompt plus completion it accepts.
    pub context_length: u32,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("base_url", &self.base_url)
            .field("model", &self.model)
            .finish()
    }
}

/// How a request carries the key.
#[derive(Debug, Clone, Copy)]
pub(crate) enum KeyHeader {
    /// `Authorization: Bearer`.
    Bearer,
    /// A header of its own (`x-api-key`).
    Named(&'static str),
}

impl Endpoint {
    /// A deployment at `base_url` (up to and including `/v1`).
    pub fn new(
        http: reqwest::Client,
        base_url: &str,
        api_key: Option<String>,
        model: &str,
        context_length: u32,
    ) -> Self {
        Self {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            api_key: api_key.filter(|k| !k.is_empty()),
            model: model.to_owned(),
            context_length,
        }
    }

    /// POSTs `body` to `path`; a 200 answer, or the upstream's refusal (or absence) as an error.
    pub(crate) async fn post(
        &self,
        path: &str,
        body: &Value,
        key: KeyHeader,
        headers: &[(&'static str, &'static str)],
    ) -> Result<reqwest::Response, ApiError> {
        let mut req = self
            .http
            .post(format!("{}{path}", self.base_url))
            .json(body);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        if let Some(k) = &self.api_key {
            req = match key {
                KeyHeader::Bearer => req.bearer_auth(k),
                KeyHeader::Named(name) => req.header(name, k),
            };
        }
        let resp = req.send().await.map_err(|e| {
            tracing::warn!(upstream = %self.base_url, error = %without_url(&e), "upstream unreachable");
            ApiError::Upstream {
                status: 502,
                message: "Upstream error: the upstream could not be reached.".into(),
                retry_after: None,
            }
        })?;
        let status = resp.status().as_u16();
        if status == 200 {
            return Ok(resp);
        }
        let after = retry_after(resp.headers());
        let text = resp.text().await.unwrap_or_default();
        let mut e = upstream_error(status, &text);
        if let ApiError::Upstream { retry_after, .. } = &mut e {
            *retry_after = after;
        }
        Err(e)
    }
}

/// A prepared upstream call: where it goes, its body, its measure, and how its events are read.
pub(crate) struct Call<T> {
    pub endpoint: Endpoint,
    pub path: &'static str,
    pub key: KeyHeader,
    pub headers: &'static [(&'static str, &'static str)],
    pub body: Value,
    pub prompt: u32,
    pub max_completion: u64,
    pub translator: T,
}

#[async_trait::async_trait]
impl<T: Translator> PreparedChat for Call<T> {
    fn prompt_tokens(&self) -> u32 {
        self.prompt
    }

    fn max_completion_tokens(&self) -> u64 {
        self.max_completion
    }

    async fn start(self: Box<Self>) -> Result<ChatStream, ApiError> {
        let resp = self
            .endpoint
            .post(self.path, &self.body, self.key, self.headers)
            .await?;
        let events = crate::sse::events(resp.bytes_stream(), self.translator);
        Ok(ChatStream {
            prompt_tokens: None,
            events: Box::pin(events),
            tally: None,
        })
    }
}

/// An upstream's error answer as ours, with its message (from `error.message`, the shape both
/// OpenAI and Anthropic use) and its status; `ApiError::status` decides what the caller sees.
pub fn upstream_error(status: u16, body: &str) -> ApiError {
    let message = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| format!("the upstream answered {status}"));
    ApiError::Upstream {
        status,
        message: format!("Upstream error: {message}"),
        retry_after: None,
    }
}

fn retry_after(h: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = h.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    v.trim().parse::<f64>().ok().map(Duration::from_secs_f64)
}

/// A reqwest error's text without the URL (it may carry credentials).
fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(u) = e.url() {
        s = s.replace(u.as_str(), "<upstream>");
    }
    s
}
