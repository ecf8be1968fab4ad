//! The admin API (`/admin/...`, guarded by the admin token): accounts, credits, keys and usage,
//! the same operations as `parlance keys` and `parlance credits`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use parlance_api::{parse_body, ApiError};
use parlance_store::{Account, KeyRecord, UsageQuery};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::Failure;
use crate::AppState;

fn account_json(a: &Account) -> Value {
    json!({
        "id": a.id,
        "object": "account",
        "name": a.name,
        "balance": a.balance,
        "reserved": a.reserved,
        "created_at": a.created_at / 1000,
    })
}

fn key_json(k: &KeyRecord, secret: Option<&str>) -> Value {
    let mut v = json!({
        "id": k.id,
        "object": "api_key",
        "account_id": k.account_id,
        "name": k.name,
        "prefix": k.prefix,
        "rpm": k.rpm,
        "tpm": k.tpm,
        "created_at": k.created_at / 1000,
        "revoked_at": k.revoked_at.map(|t| t / 1000),
    });
    if let (Some(s), Some(o)) = (secret, v.as_object_mut()) {
        o.insert("key".into(), json!(s));
    }
    v
}

fn list(data: Vec<Value>) -> Json<Value> {
    Json(json!({"object": "list", "data": data}))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewAccount {
    name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewCredits {
    /// Micro-units.
    amount: i64,
    note: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKeyBody {
    /// Account id or name.
    account: String,
    #[serde(default)]
    name: String,
    rpm: Option<i64>,
    tpm: Option<i64>,
}

pub(crate) async fn accounts(State(state): State<Arc<AppState>>) -> Result<Json<Value>, Failure> {
    let all = state.platform.accounts().await?;
    Ok(list(all.iter().map(account_json).collect()))
}

pub(crate) async fn create_account(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Response, Failure> {
    let b: NewAccount = parse_body(&body)?;
    let a = state.platform.create_account(&b.name).await?;
    Ok((StatusCode::CREATED, Json(account_json(&a))).into_response())
}

pub(crate) async fn account(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Failure> {
    Ok(Json(account_json(&state.platform.account(&id).await?)))
}

pub(crate) async fn add_credits(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, Failure> {
    let b: NewCredits = parse_body(&body)?;
    if b.amount <= 0 {
        return Err(ApiError::invalid(
            "amount",
            "'amount' must be a positive integer number of micro-units.",
        )
        .into());
    }
    let a = state
        .platform
        .add_credits(&id, b.amount, b.note.as_deref())
        .await?;
    Ok(Json(account_json(&a)))
}

#[derive(Debug, Deserialize)]
pub(crate) struct KeysQuery {
    account: Option<String>,
}

pub(crate) async fn keys(
    State(state): State<Arc<AppState>>,
    Query(q): Query<KeysQuery>,
) -> Result<Json<Value>, Failure> {
    let keys = state.platform.keys(q.account.as_deref()).await?;
    Ok(list(keys.iter().map(|k| key_json(k, None)).collect()))
}

pub(crate) async fn create_key(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Response, Failure> {
    let b: NewKeyBody = parse_body(&body)?;
    let k = state
        .platform
        .create_key(&b.account, &b.name, b.rpm, b.tpm)
        .await?;
    Ok((StatusCode::CREATED, Json(key_json(&k.record, Some(&k.key)))).into_response())
}

pub(crate) async fn revoke_key(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Failure> {
    state.platform.revoke_key(&id).await?;
    Ok(Json(
        json!({"id": id, "object": "api_key", "revoked": true}),
    ))
}

#[derive(Debug, Serialize)]
pub(crate) struct UsageResponse {
    object: &'static str,
    group_by: Option<String>,
    data: Vec<parlance_store::UsageGroup>,
}

/// Parses a time bound: Unix seconds.
fn seconds(name: &str, v: &str) -> Result<i64, ApiError> {
    v.parse::<i64>()
        .ok()
        .and_then(|s| s.checked_mul(1000))
        .ok_or_else(|| ApiError::invalid(name, format!("'{name}' must be a Unix time in seconds.")))
}

/// The filters of `/admin/usage` and of a campaign report, from the query string.
async fn usage_query(state: &AppState, pairs: &[(String, String)]) -> Result<UsageQuery, Failure> {
    filtered_query(state, pairs, false).await
}

/// [`usage_query`], also letting `status` and `limit` through (`extra`) for `/admin/requests`.
async fn filtered_query(
    state: &AppState,
    pairs: &[(String, String)],
    extra: bool,
) -> Result<UsageQuery, Failure> {
    let mut q = UsageQuery::default();
    for (k, v) in pairs.iter().cloned() {
        match k.as_str() {
            "model" => q.model = Some(v),
            "key" | "key_id" => q.key_id = Some(v),
            "account" | "account_id" => {
                q.account_id = Some(state.platform.account(&v).await?.id);
            }
            "user" => q.user = Some(v),
            "project" | "project_id" => {
                q.project_id = Some(state.platform.project_id(&v).await?);
            }
            "campaign" | "campaign_id" => {
                q.campaign_id = Some(state.platform.campaign_id(&v).await?);
            }
            "variant" => q.variant = Some(v),
            "session" | "session_id" => q.session_id = Some(v),
            "tag" => q.tag = Some(v),
            "label" | "metadata" => match v.split_once(':') {
                Some((name, value)) => q.labels.push((name.to_owned(), value.to_owned())),
                None => {
                    return Err(ApiError::invalid("label", "'label' takes NAME:VALUE.").into())
                }
            },
            "status" | "limit" if extra => {}
            "since" => q.since = Some(seconds("since", &v)?),
            "until" => q.until = Some(seconds("until", &v)?),
            "group_by" => q.group_by = Some(v),
            other => {
                return Err(ApiError::invalid(
                    other,
                    format!("Unknown filter '{other}': use model, key, account, user, project, campaign, variant, session, tag, label, since, until or group_by."),
                )
                .into())
            }
        }
    }
    Ok(q)
}

/// `GET /admin/usage?model=&key=&account=&user=&project=&campaign=&variant=&session=&tag=&label=NAME:VALUE&since=&until=&group_by=`.
pub(crate) async fn usage(
    State(state): State<Arc<AppState>>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Json<UsageResponse>, Failure> {
    let q = usage_query(&state, &pairs).await?;
    let data = state.platform.usage(&q).await?;
    Ok(Json(UsageResponse {
        object: "list",
        group_by: q.group_by,
        data,
    }))
}

/// The spec's own fields are checked by the platform (unknown ones refused there).
#[derive(Debug, Deserialize)]
struct NewProject {
    name: String,
    /// Account id or name; none: every account may use it.
    account: Option<String>,
    #[serde(flatten)]
    spec: serde_json::Map<String, Value>,
}

pub(crate) async fn projects(State(state): State<Arc<AppState>>) -> Result<Json<Value>, Failure> {
    Ok(Json(state.platform.projects().await?))
}

pub(crate) async fn create_project(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Response, Failure> {
    let b: NewProject = parse_body(&body)?;
    let p = state
        .platform
        .create_project(&b.name, b.account.as_deref(), &Value::Object(b.spec))
        .await?;
    Ok((StatusCode::CREATED, Json(p)).into_response())
}

pub(crate) async fn project(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Failure> {
    Ok(Json(state.platform.project(&id).await?))
}

pub(crate) async fn update_project(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, Failure> {
    let spec: Value = parse_body(&body)?;
    Ok(Json(state.platform.update_project(&id, &spec).await?))
}

pub(crate) async fn delete_project(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Failure> {
    Ok(Json(state.platform.delete_project(&id).await?))
}

#[derive(Debug, Deserialize)]
struct NewCampaign {
    name: String,
    key: Option<String>,
    account: Option<String>,
    project: Option<String>,
    #[serde(flatten)]
    spec: serde_json::Map<String, Value>,
}

pub(crate) async fn campaigns(State(state): State<Arc<AppState>>) -> Result<Json<Value>, Failure> {
    Ok(Json(state.platform.campaigns().await?))
}

pub(crate) async fn create_campaign(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Response, Failure> {
    let b: NewCampaign = parse_body(&body)?;
    let c = state
        .platform
        .create_campaign(
            b.key.as_deref(),
            &b.name,
            b.account.as_deref(),
            b.project.as_deref(),
            &Value::Object(b.spec),
        )
        .await?;
    Ok((StatusCode::CREATED, Json(c)).into_response())
}

pub(crate) async fn campaign(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Failure> {
    Ok(Json(state.platform.campaign(&id).await?))
}

pub(crate) async fn update_campaign(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, Failure> {
    let spec: Value = parse_body(&body)?;
    Ok(Json(state.platform.update_campaign(&id, &spec).await?))
}

pub(crate) async fn delete_campaign(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Failure> {
    Ok(Json(state.platform.delete_campaign(&id).await?))
}

/// `GET /admin/campaigns/{id}/report?since=&until=&tag=&label=NAME:VALUE&user=&model=&key=&account=&project=`.
pub(crate) async fn campaign_report(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Json<Value>, Failure> {
    let q = usage_query(&state, &pairs).await?;
    if q.group_by.is_some() || q.campaign_id.is_some() || q.variant.is_some() {
        return Err(ApiError::invalid(
            "group_by",
            "A campaign report is grouped by variant; 'group_by', 'campaign' and 'variant' do not apply.",
        )
        .into());
    }
    Ok(Json(state.platform.campaign_report(&id, &q).await?))
}

/// One request as `/admin/requests` lists it: times in Unix seconds.
#[derive(Debug, Serialize)]
pub(crate) struct RequestRow {
    object: &'static str,
    #[serde(flatten)]
    record: parlance_store::UsageRecord,
}

/// `GET /admin/requests?status=error|NNN&limit=N` plus the filters of `/admin/usage`: the newest
/// requests first (at most `limit`, default 50, up to 1000). `status=error` lists every status
/// of 400 or more.
pub(crate) async fn requests(
    State(state): State<Arc<AppState>>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Json<Value>, Failure> {
    let q = filtered_query(&state, &pairs, true).await?;
    if q.group_by.is_some() {
        return Err(ApiError::invalid(
            "group_by",
            "'/admin/requests' lists requests; group them with '/admin/usage'.",
        )
        .into());
    }
    let mut status = parlance_store::StatusFilter::Any;
    let mut limit = 50;
    for (k, v) in &pairs {
        match k.as_str() {
            "status" => {
                status = match v.as_str() {
                    "error" | "errors" => parlance_store::StatusFilter::Errors,
                    s => match s.parse::<i64>() {
                        Ok(n) if (100..600).contains(&n) => parlance_store::StatusFilter::Exactly(n),
                        _ => {
                            return Err(ApiError::invalid(
                                "status",
                                "'status' takes `error` (every status of 400 or more) or an HTTP status code.",
                            )
                            .into())
                        }
                    },
                }
            }
            "limit" => {
                limit = match v.parse::<i64>() {
                    Ok(n) if (1..=1000).contains(&n) => n,
                    _ => {
                        return Err(ApiError::invalid(
                            "limit",
                            "'limit' must be an integer from 1 to 1000.",
                        )
                        .into())
                    }
                }
            }
            _ => {}
        }
    }
    let rows = state.platform.recent_usage(&q, status, limit).await?;
    let data = rows
        .into_iter()
        .map(|mut record| {
            record.created_at /= 1000;
            serde_json::to_value(RequestRow {
                object: "request",
                record,
            })
            .unwrap_or(Value::Null)
        })
        .collect();
    Ok(list(data))
}
