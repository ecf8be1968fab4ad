//! The one error type of the API surface: each variant has a stable `type`, `code` and HTTP
//! status, and renders as OpenAI's envelope `{"error": {message, type, param, code}}`, the same
//! in a response body and in a stream's error event.

use serde::Serialize;

/// OpenAI's wording, naming the completion when it is what does not fit.
fn context_message(context: u32, prompt: u32, completion: Option<u32>) -> String {
    match completion {
        Some(c) => format!(
            "This model's maximum context length is {context} tokens. However, you requested {} tokens ({prompt} in the messages, {c} in the completion). Please reduce the length of the messages or completion.",
            u64::from(prompt) + u64::from(c)
        ),
        None => format!(
            "This model's maximum context length is {context} tokens. However, your messages resulted in {prompt} tokens. Please reduce the length of the messages."
        ),
    }
}

/// An error a client can see.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    /// The body is not JSON, or not the right shape.
    #[error("{message}")]
    InvalidRequest {
        /// What is wrong.
        message: String,
        /// The offending field, as a path (`messages[0].content`).
        param: Option<String>,
        /// A stable code, where one applies.
        code: Option<&'static str>,
    },
    /// A value is of the right type but out of range or not allowed.
    #[error("{message}")]
    InvalidValue {
        /// What is wrong.
        message: String,
        /// The offending field.
        param: String,
    },
    /// A field the server knows but does not support.
    #[error("{message}")]
    Unsupported {
        /// What is not supported.
        message: String,
        /// The field.
        param: String,
    },
    /// The prompt does not fit the model's context.
    #[error("{}", context_message(*.context, *.prompt, *.completion))]
    ContextLengthExceeded {
        /// Tokens in the prompt.
        prompt: u32,
        /// The model's context length.
        context: u32,
        /// The completion tokens asked for (`max_tokens`), when they are what does not fit.
        completion: Option<u32>,
    },
    /// No or wrong API key.
    #[error("{0}")]
    Unauthorized(String),
    /// The model does not exist.
    #[error("The model `{0}` does not exist or you do not have access to it.")]
    ModelNotFound(String),
    /// The route does not exist.
    #[error("Unknown request URL: {method} {path}.")]
    RouteNotFound {
        /// HTTP method.
        method: String,
        /// Path.
        path: String,
    },
    /// The route exists but not for this method.
    #[error("Method {0} is not allowed for this URL.")]
    MethodNotAllowed(String),
    /// The body is larger than allowed.
    #[error("The request body is too large (limit {0} bytes).")]
    PayloadTooLarge(usize),
    /// The service cannot take more work now.
    #[error("The server is overloaded: {0}. Please retry after a short wait.")]
    Overloaded(String),
    /// The service is not ready (a model is loading, or the server is shutting down).
    #[error("{0}")]
    NotReady(String),
    /// The account's balance cannot cover the request's worst-case cost.
    #[error("Insufficient balance: this request may cost up to {needed} micro-units and the account has {balance} available. Add credits to continue.")]
    InsufficientBalance {
        /// The worst-case cost, micro-units.
        needed: i64,
        /// The balance available, micro-units.
        balance: i64,
    },
    /// The key is over one of its limits.
    #[error("{message}")]
    RateLimited {
        /// What limit, and when to retry.
        message: String,
        /// `requests` or `tokens` (OpenAI's `type`).
        limit: &'static str,
        /// Seconds until a retry can succeed.
        retry_after: u32,
        /// The `x-ratelimit-*` headers.
        headers: RateLimitHeaders,
    },
    /// A resource of the admin or platform API does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A resource a request field names does not exist (or belongs to another account, which
    /// must not be told apart from not existing).
    #[error("{message}")]
    Missing {
        /// What is missing.
        message: String,
        /// The field that named it.
        param: &'static str,
        /// A stable code (`session_not_found`, `campaign_not_found`…).
        code: &'static str,
    },
    /// The admin API refused the token.
    #[error("{0}")]
    AdminUnauthorized(String),
    /// The resource already exists.
    #[error("{0}")]
    Conflict(String),
    /// An upstream provider refused or failed (its status as it answered; see `status()`).
    #[error("{message}")]
    Upstream {
        /// The upstream's HTTP status (502 when it could not be reached or broke its protocol).
        status: u16,
        /// What went wrong, without secrets.
        message: String,
        /// How long the upstream asked us to wait, if it said.
        retry_after: Option<std::time::Duration>,
    },
    /// No deployment produced a first token within `max_ttft_ms`.
    #[error("No deployment of the model produced a first token within {0} ms.")]
    TtftDeadline(u64),
    /// Anything else: the message is generic, details go to the log only.
    #[error("The server had an error while processing your request. Sorry about that!")]
    Internal,
}

/// Where a key stands against its limits, as OpenAI's `x-ratelimit-*` headers say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateLimitHeaders {
    /// Requests per minute and requests left in this window.
    pub requests: Option<(u64, u64)>,
    /// Tokens per minute and tokens left in this window.
    pub tokens: Option<(u64, u64)>,
    /// Milliseconds until the window resets.
    pub reset_ms: u64,
}

/// A duration the way OpenAI writes its reset headers: `59ms`, `12s`, `1m0s`.
pub fn reset_duration(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        let s = ms as f64 / 1000.0;
        let text = format!("{s:.3}");
        let text = text.trim_end_matches('0').trim_end_matches('.');
        format!("{text}s")
    } else {
        format!("{}m{}s", ms / 60_000, (ms % 60_000) / 1000)
    }
}

impl RateLimitHeaders {
    /// The header names and values.
    pub fn pairs(&self) -> Vec<(&'static str, String)> {
        let reset = reset_duration(self.reset_ms);
        let mut out = Vec::new();
        if let Some((limit, left)) = self.requests {
            out.push(("x-ratelimit-limit-requests", limit.to_string()));
            out.push(("x-ratelimit-remaining-requests", left.to_string()));
            out.push(("x-ratelimit-reset-requests", reset.clone()));
        }
        if let Some((limit, left)) = self.tokens {
            out.push(("x-ratelimit-limit-tokens", limit.to_string()));
            out.push(("x-ratelimit-remaining-tokens", left.to_string()));
            out.push(("x-ratelimit-reset-tokens", reset));
        }
        out
    }
}

/// The envelope body.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorObject,
}

/// OpenAI's error object.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct ErrorObject {
    /// Human-readable message.
    pub message: String,
    /// Error category.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The offending parameter, or null.
    pub param: Option<String>,
    /// A stable code, or null.
    pub code: Option<&'static str>,
}

/// How out-of-range parameter values are reported: OpenAI's 400 (the default) or 422 as some
/// providers do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StatusConvention {
    /// 400 for every invalid request.
    #[default]
    OpenAi,
    /// 422 for values that are well-formed but invalid.
    Unprocessable,
}

impl ApiError {
    /// An invalid-request error about one field.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::InvalidValue {
            message: message.into(),
            param: param.into(),
        }
    }

    /// A malformed body.
    pub fn malformed(message: impl Into<String>, param: Option<String>) -> Self {
        ApiError::InvalidRequest {
            message: message.into(),
            param,
            code: None,
        }
    }

    /// The HTTP status, under the given convention.
    pub fn status(&self, convention: StatusConvention) -> u16 {
        match self {
            ApiError::InvalidRequest { .. } => 400,
            ApiError::InvalidValue { .. } => match convention {
                StatusConvention::OpenAi => 400,
                StatusConvention::Unprocessable => 422,
            },
            ApiError::Unsupported { .. } => 400,
            ApiError::ContextLengthExceeded { .. } => 400,
            ApiError::Unauthorized(_) => 401,
            ApiError::ModelNotFound(_) => 404,
            ApiError::RouteNotFound { .. } => 404,
            ApiError::MethodNotAllowed(_) => 405,
            ApiError::PayloadTooLarge(_) => 413,
            ApiError::Overloaded(_) => 503,
            ApiError::NotReady(_) => 503,
            ApiError::InsufficientBalance { .. } => 402,
            ApiError::RateLimited { .. } => 429,
            ApiError::NotFound(_) | ApiError::Missing { .. } => 404,
            ApiError::AdminUnauthorized(_) => 401,
            ApiError::Conflict(_) => 409,
            // The caller's own mistakes keep their status; an upstream that is over its limits
            // makes this service overloaded (503); anything else is a bad gateway.
            ApiError::Upstream { status, .. } => match status {
                400 | 404 | 413 | 422 => *status,
                429 | 503 | 529 => 503,
                _ => 502,
            },
            ApiError::TtftDeadline(_) => 504,
            ApiError::Internal => 500,
        }
    }

    /// OpenAI's `type`.
    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest { .. }
            | ApiError::InvalidValue { .. }
            | ApiError::Unsupported { .. }
            | ApiError::ContextLengthExceeded { .. }
            | ApiError::ModelNotFound(_)
            | ApiError::RouteNotFound { .. }
            | ApiError::MethodNotAllowed(_)
            | ApiError::PayloadTooLarge(_)
            | ApiError::NotFound(_)
            | ApiError::Missing { .. }
            | ApiError::Conflict(_) => "invalid_request_error",
            ApiError::Unauthorized(_) | ApiError::AdminUnauthorized(_) => "authentication_error",
            ApiError::InsufficientBalance { .. } => "insufficient_balance",
            ApiError::RateLimited { limit, .. } => limit,
            ApiError::Upstream {
                status: 400 | 404 | 413 | 422,
                ..
            } => "invalid_request_error",
            ApiError::Upstream {
                status: 429 | 503 | 529,
                ..
            } => "service_unavailable_error",
            ApiError::Upstream { .. } => "upstream_error",
            ApiError::TtftDeadline(_) => "timeout_error",
            ApiError::Overloaded(_) | ApiError::NotReady(_) => "service_unavailable_error",
            ApiError::Internal => "server_error",
        }
    }

    /// The stable `code`.
    pub fn code(&self) -> Option<&'static str> {
        match self {
            ApiError::InvalidRequest { code, .. } => *code,
            ApiError::InvalidValue { .. } => Some("invalid_value"),
            ApiError::Unsupported { .. } => Some("unsupported_parameter"),
            ApiError::ContextLengthExceeded { .. } => Some("context_length_exceeded"),
            ApiError::Unauthorized(_) => Some("invalid_api_key"),
            ApiError::ModelNotFound(_) => Some("model_not_found"),
            ApiError::RouteNotFound { .. } => Some("unknown_url"),
            ApiError::MethodNotAllowed(_) => Some("method_not_allowed"),
            ApiError::PayloadTooLarge(_) => Some("payload_too_large"),
            ApiError::Overloaded(_) => Some("overloaded"),
            ApiError::NotReady(_) => Some("not_ready"),
            ApiError::InsufficientBalance { .. } => Some("insufficient_balance"),
            ApiError::RateLimited { .. } => Some("rate_limit_exceeded"),
            ApiError::NotFound(_) => Some("not_found"),
            ApiError::Missing { code, .. } => Some(code),
            ApiError::AdminUnauthorized(_) => Some("invalid_admin_token"),
            ApiError::Conflict(_) => Some("conflict"),
            ApiError::Upstream {
                status: 429 | 503 | 529,
                ..
            } => Some("upstream_overloaded"),
            ApiError::Upstream { .. } => Some("upstream_error"),
            ApiError::TtftDeadline(_) => Some("ttft_deadline_exceeded"),
            ApiError::Internal => Some("internal_error"),
        }
    }

    /// The offending parameter.
    pub fn param(&self) -> Option<String> {
        match self {
            ApiError::InvalidRequest { param, .. } => param.clone(),
            ApiError::InvalidValue { param, .. } | ApiError::Unsupported { param, .. } => {
                Some(param.clone())
            }
            ApiError::ContextLengthExceeded { .. } => Some("messages".into()),
            ApiError::ModelNotFound(_) => Some("model".into()),
            ApiError::Missing { param, .. } => Some((*param).into()),
            ApiError::Unauthorized(_)
            | ApiError::RouteNotFound { .. }
            | ApiError::MethodNotAllowed(_)
            | ApiError::PayloadTooLarge(_)
            | ApiError::Overloaded(_)
            | ApiError::NotReady(_)
            | ApiError::InsufficientBalance { .. }
            | ApiError::RateLimited { .. }
            | ApiError::NotFound(_)
            | ApiError::AdminUnauthorized(_)
            | ApiError::Conflict(_)
            | ApiError::Upstream { .. }
            | ApiError::TtftDeadline(_)
            | ApiError::Internal => None,
        }
    }

    /// Seconds a client should wait before retrying, for errors where retrying helps.
    pub fn retry_after(&self) -> Option<u32> {
        match self {
            ApiError::Overloaded(_) | ApiError::NotReady(_) => Some(1),
            ApiError::RateLimited { retry_after, .. } => Some(*retry_after),
            ApiError::Upstream {
                status: 429 | 503 | 529,
                retry_after,
                ..
            } => Some(retry_after.map_or(1, |d| d.as_secs().clamp(1, 3600) as u32)),
            _ => None,
        }
    }

    /// The envelope.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorObject {
                message: self.to_string(),
                kind: self.kind(),
                param: self.param(),
                code: self.code(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_shape() {
        let e = ApiError::invalid("temperature", "too hot");
        let v = serde_json::to_value(e.body()).unwrap_or_default();
        assert_eq!(
            v,
            serde_json::json!({"error": {"message": "too hot", "type": "invalid_request_error", "param": "temperature", "code": "invalid_value"}})
        );
    }

    /// The exact bodies of the platform's refusals (snapshots: a change here is a change of the
    /// wire contract).
    #[test]
    fn platform_error_snapshots() {
        let cases = [
            (
                ApiError::InsufficientBalance {
                    needed: 120,
                    balance: 50,
                },
                402,
                r#"{"error":{"message":"Insufficient balance: this request may cost up to 120 micro-units and the account has 50 available. Add credits to continue.","type":"insufficient_balance","param":null,"code":"insufficient_balance"}}"#,
            ),
            (
                ApiError::RateLimited {
                    message: "Rate limit reached for requests per minute (RPM) on key key_1: Limit 2, Used 2, Requested 1. Please try again in 12s.".into(),
                    limit: "requests",
                    retry_after: 12,
                    headers: RateLimitHeaders::default(),
                },
                429,
                r#"{"error":{"message":"Rate limit reached for requests per minute (RPM) on key key_1: Limit 2, Used 2, Requested 1. Please try again in 12s.","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#,
            ),
            (
                ApiError::NotFound("No such account \"x\".".into()),
                404,
                r#"{"error":{"message":"No such account \"x\".","type":"invalid_request_error","param":null,"code":"not_found"}}"#,
            ),
            (
                ApiError::AdminUnauthorized("Incorrect admin token.".into()),
                401,
                r#"{"error":{"message":"Incorrect admin token.","type":"authentication_error","param":null,"code":"invalid_admin_token"}}"#,
            ),
            (
                ApiError::Conflict("The account \"a\" already exists.".into()),
                409,
                r#"{"error":{"message":"The account \"a\" already exists.","type":"invalid_request_error","param":null,"code":"conflict"}}"#,
            ),
        ];
        for (e, status, body) in cases {
            assert_eq!(e.status(StatusConvention::OpenAi), status);
            assert_eq!(serde_json::to_string(&e.body()).unwrap_or_default(), body);
        }
        let limited = ApiError::RateLimited {
            message: String::new(),
            limit: "tokens",
            retry_after: 7,
            headers: RateLimitHeaders::default(),
        };
        assert_eq!(limited.retry_after(), Some(7));
        assert_eq!(
            ApiError::InsufficientBalance {
                needed: 1,
                balance: 0
            }
            .retry_after(),
            None,
            "retrying does not help an empty balance"
        );
    }

    #[test]
    fn reset_headers_read_like_openai() {
        assert_eq!(reset_duration(59), "59ms");
        assert_eq!(reset_duration(12_000), "12s");
        assert_eq!(reset_duration(1_500), "1.5s");
        assert_eq!(reset_duration(60_000), "1m0s");
        let h = RateLimitHeaders {
            requests: Some((10, 3)),
            tokens: None,
            reset_ms: 2_000,
        };
        assert_eq!(
            h.pairs(),
            vec![
                ("x-ratelimit-limit-requests", "10".to_owned()),
                ("x-ratelimit-remaining-requests", "3".to_owned()),
                ("x-ratelimit-reset-requests", "2s".to_owned()),
            ]
        );
    }

    #[test]
    fn conventions() {
        let e = ApiError::invalid("n", "bad");
        assert_eq!(e.status(StatusConvention::OpenAi), 400);
        assert_eq!(e.status(StatusConvention::Unprocessable), 422);
        let m = ApiError::malformed("not json", None);
        assert_eq!(m.status(StatusConvention::Unprocessable), 400);
    }
}
