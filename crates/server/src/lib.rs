//! The HTTP surface (axum): OpenAI routes, health checks, SSE encoding and the middleware
//! around them. Handlers are thin: extract, call the platform, encode.

mod admin;
mod anthropic;
mod apps;
mod chat;
mod error;
mod middleware;
mod models;
mod ui;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::routing::{delete, get, post};
use axum::Router;
use parlance_api::StatusConvention;
use parlance_platform::Platform;

pub use error::Failure;

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

/// The whole application.
pub fn router(state: Arc<AppState>) -> Router {
    let mut api = Router::new();
    for prefix in ["/v1", "/api/v1"] {
        api = api
            .route(
                &format!("{prefix}/chat/completions"),
                post(chat::completions).get(apps::completions),
            )
            .route(
                &format!("{prefix}/chat/completions/{{id}}"),
                get(apps::completion)
                    .post(apps::update_completion)
                    .delete(apps::delete_completion),
            )
            .route(
                &format!("{prefix}/chat/completions/{{id}}/messages"),
                get(apps::completion_messages),
            )
            .route(
                &format!("{prefix}/sessions"),
                post(apps::create_session).get(apps::sessions),
            )
            .route(
                &format!("{prefix}/sessions/{{id}}"),
                get(apps::session).delete(apps::delete_session),
            )
            .route(&format!("{prefix}/feedback"), post(apps::feedback));
    }
    let api = api
        .route("/v1/models", get(models::list))
        .route("/api/v1/models", get(models::list))
        .route("/v1/models/{*id}", get(models::get))
        .route("/api/v1/models/{*id}", get(models::get))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::authenticate,
        ));
    // The Anthropic door: the same pipeline, Anthropic's shapes, errors (401 included) in
    // Anthropic's body.
    let anthropic_api = Router::new()
        .route("/v1/messages", post(anthropic::messages))
        .route("/anthropic/v1/messages", post(anthropic::messages))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::authenticate,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            anthropic::error_shape,
        ));
    let admin_api = Router::new()
        .route(
            "/admin/accounts",
            get(admin::accounts).post(admin::create_account),
        )
        .route("/admin/accounts/{id}", get(admin::account))
        .route("/admin/accounts/{id}/credits", post(admin::add_credits))
        .route("/admin/keys", get(admin::keys).post(admin::create_key))
        .route("/admin/keys/{id}", delete(admin::revoke_key))
        .route("/admin/usage", get(admin::usage))
        .route("/admin/requests", get(admin::requests))
        .route(
            "/admin/projects",
            get(admin::projects).post(admin::create_project),
        )
        .route(
            "/admin/projects/{id}",
            get(admin::project)
                .post(admin::update_project)
                .put(admin::update_project)
                .delete(admin::delete_project),
        )
        .route(
            "/admin/campaigns",
            get(admin::campaigns).post(admin::create_campaign),
        )
        .route(
            "/admin/campaigns/{id}",
            get(admin::campaign)
                .post(admin::update_campaign)
                .put(admin::update_campaign)
                .delete(admin::delete_campaign),
        )
        .route("/admin/campaigns/{id}/report", get(admin::campaign_report))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::admin,
        ));
    Router::new()
        .route("/", get(ui::root))
        .route("/ui", get(ui::root))
        .route("/ui/", get(ui::playground))
        .route("/ui/dashboard", get(ui::dashboard))
        .route("/ui/{name}", get(ui::asset))
        .route("/metrics", get(models::metrics))
        .route("/healthz", get(models::healthz))
        .route("/readyz", get(models::readyz))
        .merge(api)
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
        .layer(axum::middleware::from_fn(middleware::request_id))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            error::panic_response,
        ))
        .with_state(state)
}
