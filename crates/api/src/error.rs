//! The one error type of the API surface: each variant has a stable `type`, `code` and HTTP
//! status, and renders as OpenAI's envelope `{"error": {message, type, param, code}}`, the same
//! in a response body and in a stream's error event.

use serde::Serialize;

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
    #[error("This model's maximum context length is {context} tokens. However, your messages resulted in {prompt} tokens. Please reduce the length of the messages.")]
    ContextLengthExceeded {
        /// Tokens in the prompt.
        prompt: u32,
        /// The model's context length.
        context: u32,
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
    /// Anything else: the message is generic, details go to the log only.
    #[error("The server had an error while processing your request. Sorry about that!")]
    Internal,
}

/// The envelope body.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorObject,
}

/// OpenAI's error object.
#[derive(Debug, Serialize)]
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
            | ApiError::PayloadTooLarge(_) => "invalid_request_error",
            ApiError::Unauthorized(_) => "authentication_error",
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
            ApiError::Unauthorized(_)
            | ApiError::RouteNotFound { .. }
            | ApiError::MethodNotAllowed(_)
            | ApiError::PayloadTooLarge(_)
            | ApiError::Overloaded(_)
            | ApiError::NotReady(_)
            | ApiError::Internal => None,
        }
    }

    /// Seconds a client should wait before retrying, for errors where retrying helps.
    pub fn retry_after(&self) -> Option<u32> {
        match self {
            ApiError::Overloaded(_) | ApiError::NotReady(_) => Some(1),
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

    #[test]
    fn conventions() {
        let e = ApiError::invalid("n", "bad");
        assert_eq!(e.status(StatusConvention::OpenAi), 400);
        assert_eq!(e.status(StatusConvention::Unprocessable), 422);
        let m = ApiError::malformed("not json", None);
        assert_eq!(m.status(StatusConvention::Unprocessable), 400);
    }
}
