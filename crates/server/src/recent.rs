//! The last error responses this replica sent, whatever refused them (a malformed body, an
//! unknown model, a bad key, a refusal, a failure), for `GET /admin/errors` and the dashboard.
//! Kept in memory, newest last, at most [`CAPACITY`]; no header or body of the request is kept.

use std::collections::VecDeque;
use std::sync::Mutex;

use parlance_api::ApiError;
use serde::Serialize;

/// How many errors are kept.
pub(crate) const CAPACITY: usize = 200;

/// One error response.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub(crate) struct ErrorEvent {
    /// Always `error_event`.
    object: &'static str,
    /// Unix seconds.
    created_at: i64,
    /// The request's `x-request-id`.
    request_id: String,
    method: String,
    /// The route pattern, or `unmatched`.
    route: String,
    status: u16,
    /// The error's `type`, `code`, `param` and `message`, as the caller got them.
    #[serde(rename = "type")]
    kind: Option<String>,
    code: Option<String>,
    param: Option<String>,
    message: Option<String>,
}

/// The ring of recent errors.
#[derive(Debug, Default)]
pub(crate) struct RecentErrors(Mutex<VecDeque<ErrorEvent>>);

impl RecentErrors {
    /// Notes an error response.
    pub(crate) fn push(
        &self,
        request_id: &str,
        method: &str,
        route: Option<&str>,
        status: u16,
        error: Option<&ApiError>,
    ) {
        let body = error.map(ApiError::body);
        let event = ErrorEvent {
            object: "error_event",
            created_at: parlance_store::now_ms() / 1000,
            request_id: request_id.to_owned(),
            method: method.to_owned(),
            route: route.unwrap_or("unmatched").to_owned(),
            status,
            kind: body.as_ref().map(|b| b.error.kind.to_owned()),
            code: body.as_ref().and_then(|b| b.error.code.map(str::to_owned)),
            param: body.as_ref().and_then(|b| b.error.param.clone()),
            message: body.map(|b| b.error.message),
        };
        let mut ring = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if ring.len() == CAPACITY {
            ring.pop_front();
        }
        ring.push_back(event);
    }

    /// The newest `limit`, newest first.
    pub(crate) fn newest(&self, limit: usize) -> Vec<ErrorEvent> {
        let ring = self.0.lock().unwrap_or_else(|p| p.into_inner());
        ring.iter().rev().take(limit).cloned().collect()
    }
}
