//! Usage records: written in batches, read back filtered and aggregated.

use std::collections::BTreeMap;

use sqlx::Row;

use crate::db::{Store, StoreError};

/// One request, as metered.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
pub struct UsageRecord {
    /// The request id.
    pub request_id: String,
    /// Epoch milliseconds when the request arrived.
    pub created_at: i64,
    /// The managed key, if one was used.
    pub key_id: Option<String>,
    /// The account charged, if any.
    pub account_id: Option<String>,
    /// Public model name.
    pub model: String,
    /// Provider kind that served it.
    pub provider: String,
    /// Prompt tokens processed.
    pub prompt_tokens: i64,
    /// Of those, reused from a cache.
    pub cached_tokens: i64,
    /// Completion tokens generated (all choices).
    pub completion_tokens: i64,
    /// Micro-units charged.
    pub cost: i64,
    /// Milliseconds from arrival to the end of the work.
    pub latency_ms: i64,
    /// Milliseconds from arrival to the first output, if any came.
    pub ttft_ms: Option<i64>,
    /// HTTP status the request got (200 for a stream that started).
    pub status: i64,
    /// `completed`, `error`, `cancelled` (client gone) or `refused`.
    pub outcome: String,
    /// The request's `user`.
    pub user: Option<String>,
    /// The request's labels (`metadata`).
    pub labels: BTreeMap<String, String>,
    /// The project the request ran, if any.
    pub project_id: Option<String>,
    /// The A/B campaign the request took part in, if any.
    pub campaign_id: Option<String>,
    /// The campaign variant it was given.
    pub variant: Option<String>,
    /// The server-side session it continued, if any.
    pub session_id: Option<String>,
    /// Set on the extra records of a multi-step request: the client-visible request's id.
    /// Records without a parent are the requests clients see and are counted as requests.
    pub parent_id: Option<String>,
    /// Free-form tags, for filtering and grouping.
    pub tags: Vec<String>,
    /// Content-filter matches (blocked or redacted, input and output).
    pub filter_hits: i64,
}

/// Which records to aggregate, and how to group them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageQuery {
    /// Only this key.
    pub key_id: Option<String>,
    /// Only this account.
    pub account_id: Option<String>,
    /// Only this model.
    pub model: Option<String>,
    /// Only this `user`.
    pub user: Option<String>,
    /// Only records carrying these labels (name, value).
    pub labels: Vec<(String, String)>,
    /// Only this project.
    pub project_id: Option<String>,
    /// Only this campaign.
    pub campaign_id: Option<String>,
    /// Only this campaign variant.
    pub variant: Option<String>,
    /// Only this session.
    pub session_id: Option<String>,
    /// Only records carrying this tag.
    pub tag: Option<String>,
    /// From this time (epoch ms, inclusive).
    pub since: Option<i64>,
    /// Before this time (epoch ms, exclusive).
    pub until: Option<i64>,
    /// `model`, `key`, `account`, `user`, `provider`, `status`, `outcome`, `day`, `hour`,
    /// `project`, `campaign`, `variant`, `session`, `tag` (a record with several tags counts in
    /// each of their groups) or `label:NAME`; `None`: one total.
    pub group_by: Option<String>,
}

/// One group of aggregated usage.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
pub struct UsageGroup {
    /// The group's value (`null` for the total, or records without it).
    pub group: Option<String>,
    /// Client-visible requests (records without a parent; the extra steps of a multi-step
    /// request are not counted again).
    pub requests: i64,
    /// Records with a status of 400 or more (every step counts).
    pub errors: i64,
    /// Prompt tokens.
    pub prompt_tokens: i64,
    /// Cached prompt tokens.
    pub cached_tokens: i64,
    /// Completion tokens.
    pub completion_tokens: i64,
    /// Micro-units charged.
    pub cost: i64,
    /// Mean latency, ms.
    pub avg_latency_ms: Option<i64>,
    /// Mean time to first token, ms.
    pub avg_ttft_ms: Option<i64>,
    /// Content-filter matches.
    pub filter_hits: i64,
}

/// The aggregate columns over usage records `u`, shared by [`Store::usage`] and the campaign
/// report: `requests` counts the client-visible requests (no parent), everything else sums
/// over every record.
pub(crate) const AGGREGATES: &str = "\
    CAST(COALESCE(SUM(CASE WHEN u.parent_id IS NULL THEN 1 ELSE 0 END), 0) AS BIGINT) AS requests, \
    CAST(COALESCE(SUM(CASE WHEN u.status >= 400 THEN 1 ELSE 0 END), 0) AS BIGINT) AS errors, \
    CAST(COALESCE(SUM(u.prompt_tokens), 0) AS BIGINT) AS prompt_tokens, \
    CAST(COALESCE(SUM(u.cached_tokens), 0) AS BIGINT) AS cached_tokens, \
    CAST(COALESCE(SUM(u.completion_tokens), 0) AS BIGINT) AS completion_tokens, \
    CAST(COALESCE(SUM(u.cost), 0) AS BIGINT) AS cost, \
    CAST(AVG(u.latency_ms) AS BIGINT) AS avg_latency_ms, \
    CAST(AVG(u.ttft_ms) AS BIGINT) AS avg_ttft_ms, \
    CAST(COALESCE(SUM(u.filter_hits), 0) AS BIGINT) AS filter_hits";

/// `rows` groups of `cols` numbered placeholders: `($1, $2), ($3, $4)`.
pub(crate) fn values(rows: usize, cols: usize) -> String {
    let mut out = String::with_capacity(rows * cols * 5);
    for r in 0..rows {
        if r > 0 {
            out.push_str(", ");
        }
        out.push('(');
        for c in 0..cols {
            if c > 0 {
                out.push_str(", ");
            }
            out.push('$');
            out.push_str(&(r * cols + c + 1).to_string());
        }
        out.push(')');
    }
    out
}

/// Writes usage records (and their labels and tags) with multi-row statements, inside a
/// transaction.
pub(crate) async fn insert_usage(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    records: &[UsageRecord],
) -> Result<(), StoreError> {
    for chunk in records.chunks(32) {
        let sql = format!(
            "INSERT INTO usage_records (request_id, created_at, key_id, account_id, model, provider, \
             prompt_tokens, cached_tokens, completion_tokens, cost, latency_ms, ttft_ms, status, \
             outcome, user_id, labels, project_id, campaign_id, variant, session_id, parent_id, \
             tags, filter_hits) VALUES {} ON CONFLICT (request_id) DO NOTHING",
            values(chunk.len(), 23)
        );
        let mut q = sqlx::query(&sql);
        for r in chunk {
            let labels = serde_json::to_string(&r.labels).unwrap_or_else(|_| "{}".into());
            let tags = serde_json::to_string(&r.tags).unwrap_or_else(|_| "[]".into());
            q = q
                .bind(r.request_id.clone())
                .bind(r.created_at)
                .bind(r.key_id.clone())
                .bind(r.account_id.clone())
                .bind(r.model.clone())
                .bind(r.provider.clone())
                .bind(r.prompt_tokens)
                .bind(r.cached_tokens)
                .bind(r.completion_tokens)
                .bind(r.cost)
                .bind(r.latency_ms)
                .bind(r.ttft_ms)
                .bind(r.status)
                .bind(r.outcome.clone())
                .bind(r.user.clone())
                .bind(labels)
                .bind(r.project_id.clone())
                .bind(r.campaign_id.clone())
                .bind(r.variant.clone())
                .bind(r.session_id.clone())
                .bind(r.parent_id.clone())
                .bind(tags)
                .bind(r.filter_hits);
        }
        q.execute(&mut **tx).await?;
    }
    let labels: Vec<(&str, &str, &str)> = records
        .iter()
        .flat_map(|r| {
            r.labels
                .iter()
                .map(|(k, v)| (r.request_id.as_str(), k.as_str(), v.as_str()))
        })
        .collect();
    for chunk in labels.chunks(1000) {
        let sql = format!(
            "INSERT INTO usage_labels (request_id, name, value) VALUES {} \
             ON CONFLICT (request_id, name) DO NOTHING",
            values(chunk.len(), 3)
        );
        let mut q = sqlx::query(&sql);
        for (id, k, v) in chunk {
            q = q
                .bind(id.to_string())
                .bind(k.to_string())
                .bind(v.to_string());
        }
        q.execute(&mut **tx).await?;
    }
    let tags: std::collections::BTreeSet<(&str, &str)> = records
        .iter()
        .flat_map(|r| r.tags.iter().map(|t| (r.request_id.as_str(), t.as_str())))
        .collect();
    let tags: Vec<(&str, &str)> = tags.into_iter().collect();
    for chunk in tags.chunks(1000) {
        let sql = format!(
            "INSERT INTO usage_tags (request_id, tag) VALUES {} \
             ON CONFLICT (request_id, tag) DO NOTHING",
            values(chunk.len(), 2)
        );
        let mut q = sqlx::query(&sql);
        for (id, t) in chunk {
            q = q.bind(id.to_string()).bind(t.to_string());
        }
        q.execute(&mut **tx).await?;
    }
    Ok(())
}

/// A day number (days since the epoch) as `YYYY-MM-DD` (Howard Hinnant's civil-from-days).
fn civil(days: i64) -> String {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Adds a text argument, returning its placeholder (`$n`).
fn text_arg(v: &str, args: &mut Vec<Option<String>>) -> String {
    args.push(Some(v.to_owned()));
    format!("${}", args.len())
}

/// The WHERE conditions of a usage query. Text arguments are added to `args` ($1…); the integer
/// arguments returned are numbered after every text argument.
fn filters(q: &UsageQuery, args: &mut Vec<Option<String>>) -> (Vec<String>, Vec<i64>) {
    let mut wheres: Vec<String> = Vec::new();
    let mut ints: Vec<i64> = Vec::new();
    for (col, v) in [
        ("u.key_id", &q.key_id),
        ("u.account_id", &q.account_id),
        ("u.model", &q.model),
        ("u.user_id", &q.user),
        ("u.project_id", &q.project_id),
        ("u.campaign_id", &q.campaign_id),
        ("u.variant", &q.variant),
        ("u.session_id", &q.session_id),
    ] {
        if let Some(v) = v {
            let p = text_arg(v, args);
            wheres.push(format!("{col} = {p}"));
        }
    }
    for (name, value) in &q.labels {
        let a = text_arg(name, args);
        let b = text_arg(value, args);
        wheres.push(format!(
            "EXISTS (SELECT 1 FROM usage_labels f WHERE f.request_id = u.request_id AND f.name = {a} AND f.value = {b})"
        ));
    }
    if let Some(tag) = &q.tag {
        let p = text_arg(tag, args);
        wheres.push(format!(
            "EXISTS (SELECT 1 FROM usage_tags h WHERE h.request_id = u.request_id AND h.tag = {p})"
        ));
    }
    let base = args.len();
    if let Some(s) = q.since {
        ints.push(s);
        wheres.push(format!("u.created_at >= ${}", base + ints.len()));
    }
    if let Some(s) = q.until {
        ints.push(s);
        wheres.push(format!("u.created_at < ${}", base + ints.len()));
    }
    (wheres, ints)
}

/// Appends the conditions, if any, as a WHERE clause.
fn push_where(sql: &mut String, wheres: &[String]) {
    if !wheres.is_empty() {
        sql.push_str(" WHERE ");
        sql.push_str(&wheres.join(" AND "));
    }
}

/// The query with its text arguments ($1…) bound, then its integer ones.
fn bound<'q>(
    sql: &'q str,
    args: &[Option<String>],
    ints: &[i64],
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    let mut query = sqlx::query(sql);
    for a in args {
        query = query.bind(a.clone());
    }
    for i in ints {
        query = query.bind(*i);
    }
    query
}

/// Which records `Store::recent_usage` lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusFilter {
    /// Every record.
    Any,
    /// Records whose status is 400 or more.
    Errors,
    /// Records with this status.
    Exactly(i64),
}

impl Store {
    /// Writes records in one transaction; a record already written (same request id) is kept.
    pub async fn insert_usage(&self, records: &[UsageRecord]) -> Result<(), StoreError> {
        self.commit(&[], records).await
    }

    /// Aggregates usage records, grouped as asked (largest cost first), or one total.
    pub async fn usage(&self, q: &UsageQuery) -> Result<Vec<UsageGroup>, StoreError> {
        let mut args: Vec<Option<String>> = Vec::new();
        let mut join = String::new();
        let group_expr = match q.group_by.as_deref() {
            None => None,
            Some("model") => Some("u.model".to_owned()),
            Some("key") => Some("u.key_id".to_owned()),
            Some("account") => Some("u.account_id".to_owned()),
            Some("user") => Some("u.user_id".to_owned()),
            Some("provider") => Some("u.provider".to_owned()),
            Some("outcome") => Some("u.outcome".to_owned()),
            Some("status") => Some("CAST(u.status AS TEXT)".to_owned()),
            Some("day") => Some("CAST(u.created_at / 86400000 AS TEXT)".to_owned()),
            Some("hour") => Some("CAST(u.created_at / 3600000 AS TEXT)".to_owned()),
            Some("minute") => Some("CAST(u.created_at / 60000 AS TEXT)".to_owned()),
            Some("project") => Some("u.project_id".to_owned()),
            Some("campaign") => Some("u.campaign_id".to_owned()),
            Some("variant") => Some("u.variant".to_owned()),
            Some("session") => Some("u.session_id".to_owned()),
            Some("tag") => {
                join = " LEFT JOIN usage_tags t ON t.request_id = u.request_id".to_owned();
                Some("t.tag".to_owned())
            }
            Some(other) => match other.strip_prefix("label:") {
                Some(name) if !name.is_empty() => {
                    let p = text_arg(name, &mut args);
                    join = format!(
                        " LEFT JOIN usage_labels g ON g.request_id = u.request_id AND g.name = {p}"
                    );
                    Some("g.value".to_owned())
                }
                _ => {
                    return Err(StoreError::Invalid(format!(
                        "group_by must be one of model, key, account, user, provider, status, outcome, day, hour, minute, project, campaign, variant, session, tag, label:NAME; not {other:?}"
                    )))
                }
            },
        };
        let (wheres, ints) = filters(q, &mut args);
        let select_group = group_expr
            .as_deref()
            .map_or("CAST(NULL AS TEXT)".to_owned(), |g| g.to_owned());
        let mut sql =
            format!("SELECT {select_group} AS grp, {AGGREGATES} FROM usage_records u{join}");
        push_where(&mut sql, &wheres);
        if let Some(g) = &group_expr {
            sql.push_str(&format!(" GROUP BY {g} ORDER BY cost DESC, requests DESC"));
        }
        let rows = bound(&sql, &args, &ints).fetch_all(&self.pool).await?;
        let day = q.group_by.as_deref() == Some("day");
        let hour = q.group_by.as_deref() == Some("hour");
        let minute = q.group_by.as_deref() == Some("minute");
        rows.iter()
            .map(|r| {
                let mut group: Option<String> = r.try_get("grp")?;
                if let Some(n) = group.as_deref().and_then(|g| g.parse::<i64>().ok()) {
                    if day {
                        group = Some(civil(n));
                    } else if hour {
                        group = Some(format!("{}T{:02}:00Z", civil(n / 24), n % 24));
                    } else if minute {
                        group = Some(format!(
                            "{}T{:02}:{:02}Z",
                            civil(n / 1440),
                            n / 60 % 24,
                            n % 60
                        ));
                    }
                }
                Ok(UsageGroup {
                    group,
                    requests: r.try_get("requests")?,
                    errors: r.try_get("errors")?,
                    prompt_tokens: r.try_get("prompt_tokens")?,
                    cached_tokens: r.try_get("cached_tokens")?,
                    completion_tokens: r.try_get("completion_tokens")?,
                    cost: r.try_get("cost")?,
                    avg_latency_ms: r.try_get("avg_latency_ms")?,
                    avg_ttft_ms: r.try_get("avg_ttft_ms")?,
                    filter_hits: r.try_get("filter_hits")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }
}

impl Store {
    /// The newest records matching the query's filters (its `group_by` is ignored), newest first:
    /// at most `limit` (1–1000).
    pub async fn recent_usage(
        &self,
        q: &UsageQuery,
        status: StatusFilter,
        limit: i64,
    ) -> Result<Vec<UsageRecord>, StoreError> {
        let mut args: Vec<Option<String>> = Vec::new();
        let (mut wheres, mut ints) = filters(q, &mut args);
        let base = args.len();
        match status {
            StatusFilter::Any => {}
            StatusFilter::Errors => wheres.push("u.status >= 400".to_owned()),
            StatusFilter::Exactly(s) => {
                ints.push(s);
                wheres.push(format!("u.status = ${}", base + ints.len()));
            }
        }
        ints.push(limit.clamp(1, 1000));
        let limit_arg = base + ints.len();
        let mut sql = "SELECT u.request_id, u.created_at, u.key_id, u.account_id, u.model, \
             u.provider, u.prompt_tokens, u.cached_tokens, u.completion_tokens, u.cost, \
             u.latency_ms, u.ttft_ms, u.status, u.outcome, u.user_id, u.labels, u.project_id, \
             u.campaign_id, u.variant, u.session_id, u.parent_id, u.tags, u.filter_hits \
             FROM usage_records u"
            .to_owned();
        push_where(&mut sql, &wheres);
        sql.push_str(&format!(
            " ORDER BY u.created_at DESC, u.request_id DESC LIMIT ${limit_arg}"
        ));
        let rows = bound(&sql, &args, &ints).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                let labels: String = r.try_get("labels")?;
                let tags: String = r.try_get("tags")?;
                Ok(UsageRecord {
                    request_id: r.try_get("request_id")?,
                    created_at: r.try_get("created_at")?,
                    key_id: r.try_get("key_id")?,
                    account_id: r.try_get("account_id")?,
                    model: r.try_get("model")?,
                    provider: r.try_get("provider")?,
                    prompt_tokens: r.try_get("prompt_tokens")?,
                    cached_tokens: r.try_get("cached_tokens")?,
                    completion_tokens: r.try_get("completion_tokens")?,
                    cost: r.try_get("cost")?,
                    latency_ms: r.try_get("latency_ms")?,
                    ttft_ms: r.try_get("ttft_ms")?,
                    status: r.try_get("status")?,
                    outcome: r.try_get("outcome")?,
                    user: r.try_get("user_id")?,
                    labels: serde_json::from_str(&labels).unwrap_or_default(),
                    project_id: r.try_get("project_id")?,
                    campaign_id: r.try_get("campaign_id")?,
                    variant: r.try_get("variant")?,
                    session_id: r.try_get("session_id")?,
                    parent_id: r.try_get("parent_id")?,
                    tags: serde_json::from_str(&tags).unwrap_or_default(),
                    filter_hits: r.try_get("filter_hits")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }
}

#[cfg(test)]
mod tests {
    use super::civil;

    #[test]
    fn placeholder_groups() {
        assert_eq!(super::values(2, 3), "($1, $2, $3), ($4, $5, $6)");
    }

    #[test]
    fn days_to_dates() {
        assert_eq!(civil(0), "1970-01-01");
        assert_eq!(civil(20_784), "2026-11-27");
        assert_eq!(civil(11_016), "2000-02-29");
        assert_eq!(civil(-1), "1969-12-31");
    }
}
