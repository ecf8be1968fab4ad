//! `GET /v1/models`, `GET /v1/models/{id}`, `/metrics`, `/healthz` and `/readyz`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use parlance_api::models::{ModelList, ModelObject};
use parlance_api::ApiError;
use serde_json::json;

use crate::error::Failure;
use crate::AppState;

pub(crate) async fn list(State(state): State<Arc<AppState>>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: state.platform.catalog.list(),
    })
}

pub(crate) async fn get(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<ModelObject>, Failure> {
    Ok(Json(state.platform.catalog.get(&id)?))
}

/// `GET /metrics`: Prometheus' text format.
pub(crate) async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.platform.metrics.render(),
    )
        .into_response()
}

pub(crate) async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

pub(crate) async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.shutting_down.load(Ordering::SeqCst) {
        return Failure(ApiError::NotReady("The server is shutting down.".into())).into_response();
    }
    if !state.platform.catalog.ready() {
        return Failure(ApiError::NotReady("Models are still loading.".into())).into_response();
    }
    (StatusCode::OK, Json(json!({"status": "ready"}))).into_response()
}
