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
use serde_json::Value;

use crate::error::Failure;
use crate::AppState;

/// An account as the admin API shows it: money in micro-units, times in Unix seconds.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub(crate) struct AccountObject {
    id: String,
    /// Always `account`.
    object: &'static str,
    name: String,
    /// Credit available now (reservations already taken out).
    balance: i64,
    /// Credit held by requests in flight.
    reserved: i64,
    created_at: i64,
}

fn account_json(a: &Account) -> AccountObject {
    AccountObject {
        id: a.id.clone(),
        object: "account",
        name: a.name.clone(),
        balance: a.balance,
        reserved: a.reserved,
        created_at: a.created_at / 1000,
    }
}

/// A managed key as the admin API shows it; `key` (the secret) only when it is created.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub(crate) struct KeyObject {
    id: String,
    /// Always `api_key`.
    object: &'static str,
    account_id: String,
    name: String,
    /// The first characters of the secret, to recognise it.
    prefix: String,
    rpm: Option<i64>,
    tpm: Option<i64>,
    created_at: i64,
    revoked_at: Option<i64>,
    /// The secret: shown once, when the key is created.
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<String>,
}

fn key_json(k: &KeyRecord, secret: Option<&str>) -> KeyObject {
    KeyObject {
        id: k.id.clone(),
        object: "api_key",
        account_id: k.account_id.clone(),
        name: k.name.clone(),
        prefix: k.prefix.clone(),
        rpm: k.rpm,
        tpm: k.tpm,
        created_at: k.created_at / 1000,
        revoked_at: k.revoked_at.map(|t| t / 1000),
        key: secret.map(str::to_owned),
    }
}

/// A key once revoked.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub(crate) struct RevokedKey {
    id: String,
    /// Always `api_key`.
    object: &'static str,
    /// Always true.
    revoked: bool,
}

/// A list: `{"object": "list", "data": [...]}`.
#[derive(Debug, Serialize, schemars::JsonSchema)]
#[schemars(rename = "ListOf{T}")]
pub(crate) struct List<T> {
    /// Always `list`.
    object: &'static str,
    data: Vec<T>,
}

fn list<T>(data: Vec<T>) -> Json<List<T>> {
    Json(List {
        object: "list",
        data,
    })
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewAccount {
    name: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewCredits {
    /// Micro-units.
    amount: i64,
    note: Option<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewKeyBody {
    /// Account id or name.
    account: String,
    #[serde(default)]
    name: String,
    rpm: Option<i64>,
    tpm: Option<i64>,
}

pub(crate) async fn accounts(
    State(state): State<Arc<AppState>>,
) -> Result<Json<List<AccountObject>>, Failure> {
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
) -> Result<Json<AccountObject>, Failure> {
    Ok(Json(account_json(&state.platform.account(&id).await?)))
}

pub(crate) async fn add_credits(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<AccountObject>, Failure> {
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

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub(crate) struct KeysQuery {
    account: Option<String>,
}

pub(crate) async fn keys(
    State(state): State<Arc<AppState>>,
    Query(q): Query<KeysQuery>,
) -> Result<Json<List<KeyObject>>, Failure> {
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
) -> Result<Json<RevokedKey>, Failure> {
    state.platform.revoke_key(&id).await?;
    Ok(Json(RevokedKey {
        id,
        object: "api_key",
        revoked: true,
    }))
}

#[derive(Debug, Serialize, schemars::JsonSchema)]
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
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub(crate) struct NewProject {
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

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub(crate) struct NewCampaign {
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
#[derive(Debug, Serialize, schemars::JsonSchema)]
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
) -> Result<Json<List<RequestRow>>, Failure> {
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
            RequestRow {
                object: "request",
                record,
            }
        })
        .collect();
    Ok(list(data))
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ErrorsQuery {
    limit: Option<usize>,
}

/// `GET /admin/errors?limit=N`: the last error responses of this replica, newest first (at most
/// `limit`, default 50, up to 200), whatever refused them.
pub(crate) async fn errors(
    State(state): State<Arc<AppState>>,
    Query(q): Query<ErrorsQuery>,
) -> Result<Json<List<crate::recent::ErrorEvent>>, Failure> {
    let limit = q.limit.unwrap_or(50);
    if !(1..=crate::recent::CAPACITY).contains(&limit) {
        return Err(ApiError::invalid("limit", "'limit' must be an integer from 1 to 200.").into());
    }
    Ok(list(state.recent_errors.newest(limit)))
}
