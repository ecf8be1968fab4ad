//! Errors as HTTP responses: OpenAI's envelope with the variant's status, `Retry-After` where
//! retrying helps, and the operator's choice of 400 or 422 for invalid values.

use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use parlance_api::{ApiError, RateLimitHeaders, StatusConvention};

/// An [`ApiError`] on its way out of a handler.
#[derive(Debug)]
pub struct Failure(pub ApiError);

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        Failure(e)
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        render(&self.0, StatusConvention::OpenAi)
    }
}

/// Renders an error under a status convention.
pub(crate) fn render(e: &ApiError, convention: StatusConvention) -> Response {
    let status =
        StatusCode::from_u16(e.status(convention)).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = (status, Json(e.body())).into_response();
    if let Some(secs) = e.retry_after() {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    if let ApiError::RateLimited { headers, .. } = e {
        add_rate_headers(&mut resp, Some(*headers));
    }
    // Lets the conventions middleware re-render it if the operator chose 422.
    resp.extensions_mut().insert(e.clone());
    resp
}

/// Adds OpenAI's `x-ratelimit-*` headers.
pub(crate) fn add_rate_headers(resp: &mut Response, headers: Option<RateLimitHeaders>) {
    for (name, value) in headers.iter().flat_map(RateLimitHeaders::pairs) {
        if let Ok(v) = HeaderValue::from_str(&value) {
            resp.headers_mut().insert(name, v);
        }
    }
}

pub(crate) async fn not_found(method: Method, uri: Uri) -> Failure {
    Failure(ApiError::RouteNotFound {
        method: method.to_string(),
        path: uri.path().to_owned(),
    })
}

pub(crate) async fn method_not_allowed(method: Method) -> Failure {
    Failure(ApiError::MethodNotAllowed(method.to_string()))
}

pub(crate) fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("a request handler panicked");
    Failure(ApiError::Internal).into_response()
}
