//! The HTTP surface (axum): OpenAI routes, health checks, SSE encoding and the middleware
//! around them. Handlers are thin: extract, call the platform, encode.

mod admin;
mod anthropic;
mod apps;
mod chat;
mod error;
mod middleware;
mod models;
mod recent;
mod routes;
mod ui;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::Router;
use parlance_api::StatusConvention;
use parlance_platform::Platform;

pub use error::Failure;
pub use routes::document as openapi_document;

/// Shared state of every handler.
#[derive(Debug)]
pub struct AppState {
    /// The domain.
    pub platform: Platform,
    /// How invalid values are reported (400 or 422).
    pub convention: StatusConvention,
    /// Largest request body accepted, in bytes.
    pub body_limit: usize,
    /// Set when shutdown begins: `/readyz` turns 503 and new completions are refused.
    pub shutting_down: AtomicBool,
    /// SHA-256 of the admin token; `None`: the admin API is closed.
    pub admin_token: Option<[u8; 32]>,
    /// The last error responses, for `/admin/errors`.
    pub(crate) recent_errors: recent::RecentErrors,
}

impl AppState {
    /// State with OpenAI's conventions and a 16 MiB body limit.
    pub fn new(platform: Platform) -> Self {
        Self {
            platform,
            convention: StatusConvention::OpenAi,
            body_limit: 16 << 20,
            shutting_down: AtomicBool::new(false),
            admin_token: None,
            recent_errors: recent::RecentErrors::default(),
        }
    }

    /// Opens the admin API to this token (empty: keeps it closed).
    pub fn with_admin_token(mut self, token: Option<&str>) -> Self {
        self.admin_token = token
            .filter(|t| !t.trim().is_empty())
            .map(parlance_platform::hash_secret);
        self
    }

    /// Marks the server as shutting down.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }
}

/// The whole application: the routes of [`routes::table`], each group behind its guard.
pub fn router(state: Arc<AppState>) -> Router {
    let (mut open, mut api, mut anthropic_api, mut admin_api) =
        (Router::new(), Router::new(), Router::new(), Router::new());
    for r in routes::table() {
        let group = match r.access {
            routes::Access::Open => &mut open,
            routes::Access::Key => &mut api,
            routes::Access::AnthropicKey => &mut anthropic_api,
            routes::Access::Admin => &mut admin_api,
        };
        *group = std::mem::take(group).route(&r.path, r.handler);
    }
    let api = api.route_layer(axum::middleware::from_fn_with_state(
        state.clone(),
        middleware::authenticate,
    ));
    // The Anthropic door: the same pipeline, Anthropic's shapes, errors (401 included) in
    // Anthropic's body.
    let anthropic_api = anthropic_api
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::authenticate,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            anthropic::error_shape,
        ));
    let admin_api = admin_api.route_layer(axum::middleware::from_fn_with_state(
        state.clone(),
        middleware::admin,
    ));
    open.merge(api)
        .merge(anthropic_api)
        .merge(admin_api)
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::conventions,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::metrics,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::request_id,
        ))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            error::panic_response,
        ))
        .with_state(state)
}
