//! Middleware, outermost first: catch panics (in `router`), request id, status conventions,
//! authentication.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use parlance_api::{ApiError, StatusConvention};
use tracing::Instrument;

use crate::error::{render, Failure};
use crate::AppState;

/// Header carrying the request id, echoed from the client or made here.
pub(crate) const REQUEST_ID: &str = "x-request-id";

/// Gives every request an id, returned in `x-request-id`, and a trace span carrying it.
pub(crate) async fn request_id(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let id = req
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_owned)
        .unwrap_or_else(|| format!("req_{}", uuid::Uuid::now_v7().simple()));
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_owned());
    // No header is recorded: the Authorization header and keys never reach logs or traces.
    let method = req.method().clone();
    let span = tracing::info_span!(
        "request",
        id = %id,
        method = %method,
        path = %req.uri().path(),
        route = route.as_deref(),
        model = tracing::field::Empty,
        usage_id = tracing::field::Empty,
        status = tracing::field::Empty,
    );
    let mut resp = next.run(req).instrument(span.clone()).await;
    let status = resp.status();
    span.record("status", status.as_u16());
    span.in_scope(|| {
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), "request failed");
        } else {
            tracing::debug!(status = status.as_u16(), "request done");
        }
    });
    if status.is_client_error() || status.is_server_error() {
        state.recent_errors.push(
            &id,
            method.as_str(),
            route.as_deref(),
            status.as_u16(),
            resp.extensions().get::<ApiError>(),
        );
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    resp
}

/// Counts every request in the metrics by its route pattern (never its raw path).
pub(crate) async fn metrics(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = req.method().clone();
    let began = std::time::Instant::now();
    let resp = next.run(req).await;
    state.platform.metrics.http(
        &route,
        method.as_str(),
        resp.status().as_u16(),
        began.elapsed().as_secs_f64(),
    );
    resp
}

/// Re-renders invalid-value errors as 422 when the operator asked for that convention.
pub(crate) async fn conventions(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let resp = next.run(req).await;
    if state.convention == StatusConvention::OpenAi {
        return resp;
    }
    match resp.extensions().get::<ApiError>() {
        Some(e @ ApiError::InvalidValue { .. }) => render(e, state.convention),
        _ => resp,
    }
}

/// The token of `Authorization: Bearer`, or of Anthropic's `x-api-key`.
fn bearer(headers: &axum::http::HeaderMap) -> Option<String> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| token.trim().to_owned())
        })
        .or_else(|| {
            headers
                .get("x-api-key")
                .and_then(|v| v.to_str().ok())
                .map(|v| v.trim().to_owned())
        })
}

/// Guards the admin API: the bearer token must be the configured admin token (compared in
/// constant time); without one configured, the admin API is closed.
pub(crate) async fn admin(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    use subtle::ConstantTimeEq;
    let Some(expected) = state.admin_token else {
        return Failure(ApiError::AdminUnauthorized(
            "The admin API is disabled: start the server with an admin token (--admin-token or PARLANCE_ADMIN_TOKEN).".into(),
        ))
        .into_response();
    };
    let given = bearer(req.headers()).map(|t| parlance_platform::hash_secret(&t));
    match given {
        Some(h) if bool::from(h.ct_eq(&expected)) => next.run(req).await,
        Some(_) => {
            Failure(ApiError::AdminUnauthorized("Incorrect admin token.".into())).into_response()
        }
        None => Failure(ApiError::AdminUnauthorized(
            "The admin API needs the admin token in an Authorization header (Bearer).".into(),
        ))
        .into_response(),
    }
}

/// Checks `Authorization: Bearer` (or Anthropic's `x-api-key`) and stores the principal for the
/// handler.
pub(crate) async fn authenticate(
    State(state): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let bearer = bearer(req.headers());
    match state.platform.auth.authenticate(bearer.as_deref()).await {
        Ok(p) => {
            req.extensions_mut().insert(p);
            next.run(req).await
        }
        Err(e) => Failure(e).into_response(),
    }
}
