//! The application layer's public routes, for API keys: sessions, stored chat completions (as
//! OpenAI's stored-completions API has them) and feedback.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use parlance_api::{parse_body, ApiError};
use parlance_platform::{CompletionList, FeedbackInput, Principal};
use serde::Deserialize;
use serde_json::Value;

use crate::error::Failure;
use crate::AppState;

#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewSession {
    project: Option<String>,
}

pub(crate) async fn create_session(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
    body: Bytes,
) -> Result<Response, Failure> {
    let b: NewSession = if body.iter().all(u8::is_ascii_whitespace) {
        NewSession::default()
    } else {
        parse_body(&body)?
    };
    let s = state
        .platform
        .create_session(&principal, b.project.as_deref())
        .await?;
    Ok((StatusCode::CREATED, Json(s)).into_response())
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Page {
    limit: Option<i64>,
    after: Option<String>,
    order: Option<String>,
}

pub(crate) async fn sessions(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
    Query(q): Query<Page>,
) -> Result<Json<Value>, Failure> {
    Ok(Json(state.platform.sessions(&principal, q.limit).await?))
}

pub(crate) async fn session(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Failure> {
    Ok(Json(state.platform.session(&principal, &id).await?))
}

pub(crate) async fn delete_session(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Failure> {
    Ok(Json(state.platform.delete_session(&principal, &id).await?))
}

fn int(name: &str, v: &str) -> Result<i64, ApiError> {
    v.parse()
        .map_err(|_| ApiError::invalid(name, format!("'{name}' must be an integer.")))
}

/// `GET /v1/chat/completions?model=&metadata[k]=v&after=&limit=&order=`.
pub(crate) async fn completions(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Json<Value>, Failure> {
    let mut q = CompletionList::default();
    for (k, v) in pairs {
        match k.as_str() {
            "model" => q.model = Some(v),
            "after" => q.after = Some(v),
            "limit" => q.limit = Some(int("limit", &v)?),
            "order" => q.order = Some(v),
            other => match other
                .strip_prefix("metadata[")
                .and_then(|r| r.strip_suffix(']'))
            {
                Some(name) if !name.is_empty() => {
                    q.metadata.insert(name.to_owned(), v);
                }
                _ => {
                    return Err(ApiError::invalid(
                        other,
                        format!("Unknown query parameter '{other}': use model, metadata[KEY], after, limit or order."),
                    )
                    .into())
                }
            },
        }
    }
    Ok(Json(
        state.platform.stored_completions(&principal, q).await?,
    ))
}

pub(crate) async fn completion(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Failure> {
    Ok(Json(
        state.platform.stored_completion(&principal, &id).await?,
    ))
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CompletionUpdate {
    metadata: BTreeMap<String, String>,
}

pub(crate) async fn update_completion(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, Failure> {
    let b: CompletionUpdate = parse_body(&body)?;
    if b.metadata.len() > 16 {
        return Err(ApiError::invalid("metadata", "At most 16 metadata pairs.").into());
    }
    Ok(Json(
        state
            .platform
            .update_stored_completion(&principal, &id, b.metadata)
            .await?,
    ))
}

pub(crate) async fn delete_completion(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Failure> {
    Ok(Json(
        state
            .platform
            .delete_stored_completion(&principal, &id)
            .await?,
    ))
}

pub(crate) async fn completion_messages(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
    Query(q): Query<Page>,
) -> Result<Json<Value>, Failure> {
    Ok(Json(
        state
            .platform
            .stored_completion_messages(
                &principal,
                &id,
                q.after.as_deref(),
                q.limit,
                q.order.as_deref(),
            )
            .await?,
    ))
}

pub(crate) async fn feedback(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
    body: Bytes,
) -> Result<Response, Failure> {
    let f: FeedbackInput = parse_body(&body)?;
    let v = state.platform.feedback(&principal, f).await?;
    Ok((StatusCode::CREATED, Json(v)).into_response())
}
