//! What applications build on: projects, server-side sessions and their messages, stored
//! completions, A/B campaigns, feedback on responses and the per-variant campaign report.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use sqlx::any::AnyRow;
use sqlx::Row;

use crate::db::{is_unique_violation, Store, StoreError};
use crate::{new_id, now_ms};

/// A project: a named, saved bundle of prompt, parameters and tools (the `spec`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ProjectRecord {
    /// `proj_…`.
    pub id: String,
    /// Unique, 1 to 64 characters of `A-Z a-z 0-9 _ . -`.
    pub name: String,
    /// The account that owns it; `None`: the operator's.
    pub account_id: Option<String>,
    /// What the project does, as JSON (read by the server, opaque here).
    pub spec: Value,
    /// Epoch milliseconds.
    pub created_at: i64,
    /// Epoch milliseconds of the last change.
    pub updated_at: i64,
}

/// A server-side conversation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SessionRecord {
    /// Chosen by the caller (a UUID).
    pub id: String,
    /// The account that owns it, if any.
    pub account_id: Option<String>,
    /// The project it runs, if any.
    pub project_id: Option<String>,
    /// Epoch milliseconds.
    pub created_at: i64,
    /// Epoch milliseconds of the last append.
    pub updated_at: i64,
    /// How many messages it holds.
    pub messages: i64,
}

/// One message of a session.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SessionMessage {
    /// Chosen by the caller.
    pub id: String,
    /// Its position in the session, from 0, without gaps.
    pub seq: i64,
    /// The message, as JSON.
    pub message: Value,
    /// Epoch milliseconds.
    pub created_at: i64,
}

/// A completion kept for later retrieval (`store: true`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StoredCompletion {
    /// The completion's id.
    pub id: String,
    /// The account that owns it, if any.
    pub account_id: Option<String>,
    /// The model that produced it.
    pub model: String,
    /// Epoch milliseconds.
    pub created_at: i64,
    /// Its metadata, filterable.
    pub metadata: BTreeMap<String, String>,
    /// The request, as JSON.
    pub request: Value,
    /// The response, as JSON.
    pub response: Value,
}

/// Which stored completions to list, and which page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompletionQuery {
    /// Only this account's.
    pub account_id: Option<String>,
    /// Only this model's.
    pub model: Option<String>,
    /// Only those carrying all these metadata entries (name, value).
    pub metadata: Vec<(String, String)>,
    /// The page after this completion id, in the chosen order.
    pub after: Option<String>,
    /// Page size, at least 1.
    pub limit: i64,
    /// Newest first (else oldest first).
    pub descending: bool,
}

/// An A/B campaign: variants of a request, assigned by weight (the `spec`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CampaignRecord {
    /// `camp_…`.
    pub id: String,
    /// A unique key clients can name it by, if given.
    pub key: Option<String>,
    /// A label chosen by the operator.
    pub name: String,
    /// The account that owns it, if any.
    pub account_id: Option<String>,
    /// The project it belongs to, if any.
    pub project_id: Option<String>,
    /// Its variants and weights, as JSON (read by the server, opaque here).
    pub spec: Value,
    /// Epoch milliseconds.
    pub created_at: i64,
    /// Epoch milliseconds of the last change.
    pub updated_at: i64,
}

/// Feedback on one response.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Feedback {
    /// `fb_…`.
    pub id: String,
    /// The request it is about (its usage record's id).
    pub request_id: String,
    /// The completion id the client saw.
    pub completion_id: String,
    /// The account that gave it, if any.
    pub account_id: Option<String>,
    /// A numeric score.
    pub score: Option<f64>,
    /// A label (`good`, `bad`, …).
    pub label: Option<String>,
    /// Free text.
    pub comment: Option<String>,
    /// Epoch milliseconds.
    pub created_at: i64,
}

/// One variant of a campaign: its usage and its feedback.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct VariantReport {
    /// The variant (`null` for records of the campaign without one).
    pub variant: Option<String>,
    /// Client-visible requests (records without a parent).
    pub requests: i64,
    /// Records with a status of 400 or more.
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
    /// Feedback entries on its requests.
    pub feedback: i64,
    /// Mean feedback score (of the entries with one).
    pub avg_score: Option<f64>,
    /// Feedback entries per label.
    pub labels: BTreeMap<String, i64>,
}

/// How many times an append is retried when another one took the same positions.
const APPEND_TRIES: usize = 5;

fn json_text(v: &impl serde::Serialize) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Invalid(format!("not storable as JSON: {e}")))
}

fn json_column<T: serde::de::DeserializeOwned>(r: &AnyRow, col: &str) -> Result<T, sqlx::Error> {
    let text: String = r.try_get(col)?;
    serde_json::from_str(&text).map_err(|e| sqlx::Error::ColumnDecode {
        index: col.to_owned(),
        source: Box::new(e),
    })
}

/// A project name: 1 to 64 characters of `A-Z a-z 0-9 _ . -`.
fn valid_project_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

const PROJECT_COLUMNS: &str = "id, name, account_id, spec, created_at, updated_at";

fn project_row(r: &AnyRow) -> Result<ProjectRecord, sqlx::Error> {
    Ok(ProjectRecord {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        account_id: r.try_get("account_id")?,
        spec: json_column(r, "spec")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

const SESSION_COLUMNS: &str = "s.id, s.account_id, s.project_id, s.created_at, s.updated_at, \
     (SELECT COUNT(*) FROM session_messages m WHERE m.session_id = s.id) AS messages";

fn session_row(r: &AnyRow) -> Result<SessionRecord, sqlx::Error> {
    Ok(SessionRecord {
        id: r.try_get("id")?,
        account_id: r.try_get("account_id")?,
        project_id: r.try_get("project_id")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
        messages: r.try_get("messages")?,
    })
}

const COMPLETION_COLUMNS: &str =
    "c.id, c.account_id, c.model, c.created_at, c.metadata, c.request, c.response";

fn completion_row(r: &AnyRow) -> Result<StoredCompletion, sqlx::Error> {
    Ok(StoredCompletion {
        id: r.try_get("id")?,
        account_id: r.try_get("account_id")?,
        model: r.try_get("model")?,
        created_at: r.try_get("created_at")?,
        metadata: json_column(r, "metadata")?,
        request: json_column(r, "request")?,
        response: json_column(r, "response")?,
    })
}

const CAMPAIGN_COLUMNS: &str =
    "id, key, name, account_id, project_id, spec, created_at, updated_at";

fn campaign_row(r: &AnyRow) -> Result<CampaignRecord, sqlx::Error> {
    Ok(CampaignRecord {
        id: r.try_get("id")?,
        key: r.try_get("key")?,
        name: r.try_get("name")?,
        account_id: r.try_get("account_id")?,
        project_id: r.try_get("project_id")?,
        spec: json_column(r, "spec")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

/// An argument of a statement built at run time.
enum Arg {
    Text(String),
    Int(i64),
}

/// Collects the arguments of a statement built at run time and numbers their placeholders.
#[derive(Default)]
struct Args(Vec<Arg>);

impl Args {
    fn text(&mut self, v: &str) -> String {
        self.0.push(Arg::Text(v.to_owned()));
        format!("${}", self.0.len())
    }

    fn int(&mut self, v: i64) -> String {
        self.0.push(Arg::Int(v));
        format!("${}", self.0.len())
    }

    fn bind<'q>(
        self,
        mut q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    ) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
        for a in self.0 {
            q = match a {
                Arg::Text(s) => q.bind(s),
                Arg::Int(i) => q.bind(i),
            };
        }
        q
    }
}

impl Store {
    /// Replaces the `spec` of the row `id` of `table` (projects or campaigns) and reads the row
    /// back; `NotFound` naming `what` if there is none.
    async fn update_spec(
        &self,
        table: &str,
        what: &str,
        columns: &str,
        id: &str,
        spec: &Value,
    ) -> Result<sqlx::any::AnyRow, StoreError> {
        let r = sqlx::query(&format!(
            "UPDATE {table} SET spec = $1, updated_at = $2 WHERE id = $3"
        ))
        .bind(json_text(spec)?)
        .bind(now_ms())
        .bind(id)
        .execute(&self.pool)
        .await?;
        let missing = || StoreError::NotFound(format!("{what} {id:?}"));
        if r.rows_affected() == 0 {
            return Err(missing());
        }
        sqlx::query(&format!("SELECT {columns} FROM {table} WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(missing)
    }

    /// Deletes the row `id` of `table`; false when there is none.
    async fn delete_by_id(&self, table: &str, id: &str) -> Result<bool, StoreError> {
        let r = sqlx::query(&format!("DELETE FROM {table} WHERE id = $1"))
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }
}

/// Writes a completion's metadata rows (for filtering), inside a transaction.
async fn insert_metadata(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    id: &str,
    metadata: &BTreeMap<String, String>,
) -> Result<(), StoreError> {
    let entries: Vec<(&String, &String)> = metadata.iter().collect();
    for chunk in entries.chunks(500) {
        let sql = format!(
            "INSERT INTO stored_completion_metadata (completion_id, name, value) VALUES {}",
            crate::usage::values(chunk.len(), 3)
        );
        let mut q = sqlx::query(&sql);
        for (k, v) in chunk {
            q = q.bind(id.to_owned()).bind((*k).clone()).bind((*v).clone());
        }
        q.execute(&mut **tx).await?;
    }
    Ok(())
}

impl Store {
    /// A new project. `Invalid` unless the name is 1 to 64 characters of
    /// `A-Z a-z 0-9 _ . -`; `Conflict` if the name is taken; `NotFound` if the account is
    /// unknown.
    pub async fn create_project(
        &self,
        name: &str,
        account_id: Option<&str>,
        spec: &Value,
    ) -> Result<ProjectRecord, StoreError> {
        if !valid_project_name(name) {
            return Err(StoreError::Invalid(
                "a project name is 1 to 64 characters of A-Z, a-z, 0-9, '_', '.' and '-'".into(),
            ));
        }
        let id = new_id("proj");
        let now = now_ms();
        let result = sqlx::query(
            "INSERT INTO projects (id, name, account_id, spec, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $5)",
        )
        .bind(&id)
        .bind(name)
        .bind(account_id)
        .bind(json_text(spec)?)
        .bind(now)
        .execute(&self.pool)
        .await;
        match result {
            Ok(_) => Ok(ProjectRecord {
                id,
                name: name.to_owned(),
                account_id: account_id.map(str::to_owned),
                spec: spec.clone(),
                created_at: now,
                updated_at: now,
            }),
            Err(e) if is_unique_violation(&e) => {
                Err(StoreError::Conflict(format!("project {name:?}")))
            }
            Err(sqlx::Error::Database(d)) if d.is_foreign_key_violation() => Err(
                StoreError::NotFound(format!("account {:?}", account_id.unwrap_or_default())),
            ),
            Err(e) => Err(e.into()),
        }
    }

    /// The project with this id or name (the id wins if both match).
    pub async fn project(&self, id_or_name: &str) -> Result<Option<ProjectRecord>, StoreError> {
        let sql = format!(
            "SELECT {PROJECT_COLUMNS} FROM projects WHERE id = $1 OR name = $1 \
             ORDER BY CASE WHEN id = $1 THEN 0 ELSE 1 END LIMIT 1"
        );
        let row = sqlx::query(&sql)
            .bind(id_or_name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(project_row).transpose()?)
    }

    /// Projects, of one account or (`None`) all, by name.
    pub async fn projects(
        &self,
        account_id: Option<&str>,
    ) -> Result<Vec<ProjectRecord>, StoreError> {
        let sql = format!(
            "SELECT {PROJECT_COLUMNS} FROM projects WHERE $1 IS NULL OR account_id = $1 \
             ORDER BY name"
        );
        let rows = sqlx::query(&sql)
            .bind(account_id)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(project_row).collect::<Result<_, _>>()?)
    }

    /// Replaces a project's spec; `NotFound` if there is no project with this id.
    pub async fn update_project(
        &self,
        id: &str,
        spec: &Value,
    ) -> Result<ProjectRecord, StoreError> {
        let row = self
            .update_spec("projects", "project", PROJECT_COLUMNS, id, spec)
            .await?;
        Ok(project_row(&row)?)
    }

    /// Deletes a project; false when there is no project with this id.
    pub async fn delete_project(&self, id: &str) -> Result<bool, StoreError> {
        self.delete_by_id("projects", id).await
    }

    /// A new, empty session with the caller's id; `Conflict` if the id is taken.
    pub async fn create_session(
        &self,
        id: &str,
        account_id: Option<&str>,
        project_id: Option<&str>,
    ) -> Result<SessionRecord, StoreError> {
        if id.is_empty() || id.len() > 128 {
            return Err(StoreError::Invalid(
                "a session id is 1 to 128 characters".into(),
            ));
        }
        let now = now_ms();
        let result = sqlx::query(
            "INSERT INTO sessions (id, account_id, project_id, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $4)",
        )
        .bind(id)
        .bind(account_id)
        .bind(project_id)
        .bind(now)
        .execute(&self.pool)
        .await;
        match result {
            Ok(_) => Ok(SessionRecord {
                id: id.to_owned(),
                account_id: account_id.map(str::to_owned),
                project_id: project_id.map(str::to_owned),
                created_at: now,
                updated_at: now,
                messages: 0,
            }),
            Err(e) if is_unique_violation(&e) => {
                Err(StoreError::Conflict(format!("session {id:?}")))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The session with this id.
    pub async fn session(&self, id: &str) -> Result<Option<SessionRecord>, StoreError> {
        let sql = format!("SELECT {SESSION_COLUMNS} FROM sessions s WHERE s.id = $1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(session_row).transpose()?)
    }

    /// Sessions, of one account or (`None`) all, the most recently updated first, at most
    /// `limit` (at least 1).
    pub async fn sessions(
        &self,
        account_id: Option<&str>,
        limit: i64,
    ) -> Result<Vec<SessionRecord>, StoreError> {
        if limit < 1 {
            return Err(StoreError::Invalid("the limit must be at least 1".into()));
        }
        let sql = format!(
            "SELECT {SESSION_COLUMNS} FROM sessions s WHERE $1 IS NULL OR s.account_id = $1 \
             ORDER BY s.updated_at DESC, s.id DESC LIMIT $2"
        );
        let rows = sqlx::query(&sql)
            .bind(account_id)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(session_row).collect::<Result<_, _>>()?)
    }

    /// A session's messages, in order (empty for an unknown session).
    pub async fn session_messages(&self, id: &str) -> Result<Vec<SessionMessage>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, seq, message, created_at FROM session_messages \
             WHERE session_id = $1 ORDER BY seq",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(SessionMessage {
                    id: r.try_get("id")?,
                    seq: r.try_get("seq")?,
                    message: json_column(r, "message")?,
                    created_at: r.try_get("created_at")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// Appends messages after the last one, atomically: concurrent appends to the same session
    /// never interleave within one call nor lose a message (retry on the PK conflict a few
    /// times). Bumps updated_at. NotFound if the session does not exist.
    ///
    /// Each append first updates the session's row, which serialises the appends to one
    /// session (a row lock in PostgreSQL, the write lock in SQLite), then numbers its messages
    /// after the last one committed; the key on (session, seq) catches any race left, and the
    /// append is retried.
    pub async fn append_session(
        &self,
        id: &str,
        messages: &[(String, Value)],
    ) -> Result<(), StoreError> {
        let texts = messages
            .iter()
            .map(|(mid, m)| Ok((mid.as_str(), json_text(m)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        let mut tries = 0;
        loop {
            tries += 1;
            match self.try_append(id, &texts).await {
                Err(StoreError::Database(e)) if is_unique_violation(&e) && tries < APPEND_TRIES => {
                    let jitter = now_ms().rem_euclid(7) as u64;
                    tokio::time::sleep(Duration::from_millis(2 * tries as u64 + jitter)).await;
                }
                Err(StoreError::Database(e)) if is_unique_violation(&e) => {
                    return Err(StoreError::Conflict(format!(
                        "a concurrent append to session {id:?}"
                    )));
                }
                other => return other,
            }
        }
    }

    async fn try_append(&self, id: &str, messages: &[(&str, String)]) -> Result<(), StoreError> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let locked = sqlx::query(
            "UPDATE sessions SET updated_at = CASE WHEN updated_at > $1 THEN updated_at ELSE $1 END \
             WHERE id = $2",
        )
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        if locked.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("session {id:?}")));
        }
        if messages.is_empty() {
            tx.commit().await?;
            return Ok(());
        }
        let next: i64 = sqlx::query(
            "SELECT CAST(COALESCE(MAX(seq) + 1, 0) AS BIGINT) AS next FROM session_messages \
             WHERE session_id = $1",
        )
        .bind(id)
        .fetch_one(&mut *tx)
        .await?
        .try_get("next")?;
        let mut seq = next;
        for chunk in messages.chunks(500) {
            let sql = format!(
                "INSERT INTO session_messages (session_id, seq, id, message, created_at) VALUES {}",
                crate::usage::values(chunk.len(), 5)
            );
            let mut q = sqlx::query(&sql);
            for (mid, text) in chunk {
                q = q
                    .bind(id.to_owned())
                    .bind(seq)
                    .bind((*mid).to_owned())
                    .bind(text.clone())
                    .bind(now);
                seq += 1;
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Deletes a session and its messages; false when there is no session with this id.
    pub async fn delete_session(&self, id: &str) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM session_messages WHERE session_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let r = sqlx::query("DELETE FROM sessions WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(r.rows_affected() > 0)
    }

    /// Stores a completion and its metadata; `Conflict` if its id is taken.
    pub async fn store_completion(&self, c: &StoredCompletion) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO stored_completions (id, account_id, model, created_at, metadata, request, response) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&c.id)
        .bind(c.account_id.as_deref())
        .bind(&c.model)
        .bind(c.created_at)
        .bind(json_text(&c.metadata)?)
        .bind(json_text(&c.request)?)
        .bind(json_text(&c.response)?)
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::Conflict(format!("completion {:?}", c.id))
            } else {
                e.into()
            }
        })?;
        insert_metadata(&mut tx, &c.id, &c.metadata).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The stored completion with this id.
    pub async fn completion(&self, id: &str) -> Result<Option<StoredCompletion>, StoreError> {
        let sql = format!("SELECT {COMPLETION_COLUMNS} FROM stored_completions c WHERE c.id = $1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(completion_row).transpose()?)
    }

    /// A page and whether more follow. Order by (created_at, id).
    ///
    /// `Invalid` if the limit is below 1; `NotFound` if `after` names no stored completion.
    pub async fn completions(
        &self,
        q: &CompletionQuery,
    ) -> Result<(Vec<StoredCompletion>, bool), StoreError> {
        if q.limit < 1 {
            return Err(StoreError::Invalid("the limit must be at least 1".into()));
        }
        let mut args = Args::default();
        let mut wheres: Vec<String> = Vec::new();
        if let Some(a) = &q.account_id {
            wheres.push(format!("c.account_id = {}", args.text(a)));
        }
        if let Some(m) = &q.model {
            wheres.push(format!("c.model = {}", args.text(m)));
        }
        for (name, value) in &q.metadata {
            let a = args.text(name);
            let b = args.text(value);
            wheres.push(format!(
                "EXISTS (SELECT 1 FROM stored_completion_metadata m \
                 WHERE m.completion_id = c.id AND m.name = {a} AND m.value = {b})"
            ));
        }
        let (cmp, dir) = if q.descending {
            ("<", "DESC")
        } else {
            (">", "ASC")
        };
        if let Some(after) = &q.after {
            let at: i64 = sqlx::query("SELECT created_at FROM stored_completions WHERE id = $1")
                .bind(after)
                .fetch_optional(&self.pool)
                .await?
                .ok_or_else(|| StoreError::NotFound(format!("completion {after:?}")))?
                .try_get("created_at")?;
            let t = args.int(at);
            let i = args.text(after);
            wheres.push(format!(
                "(c.created_at {cmp} {t} OR (c.created_at = {t} AND c.id {cmp} {i}))"
            ));
        }
        let mut sql = format!("SELECT {COMPLETION_COLUMNS} FROM stored_completions c");
        if !wheres.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&wheres.join(" AND "));
        }
        let limit = args.int(q.limit.saturating_add(1));
        sql.push_str(&format!(
            " ORDER BY c.created_at {dir}, c.id {dir} LIMIT {limit}"
        ));
        let rows = args.bind(sqlx::query(&sql)).fetch_all(&self.pool).await?;
        let mut page = rows
            .iter()
            .map(completion_row)
            .collect::<Result<Vec<_>, _>>()?;
        let more = i64::try_from(page.len()).unwrap_or(i64::MAX) > q.limit;
        page.truncate(usize::try_from(q.limit).unwrap_or(usize::MAX));
        Ok((page, more))
    }

    /// Replaces a stored completion's metadata; false when there is no such completion.
    pub async fn update_completion_metadata(
        &self,
        id: &str,
        metadata: &BTreeMap<String, String>,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let r = sqlx::query("UPDATE stored_completions SET metadata = $1 WHERE id = $2")
            .bind(json_text(metadata)?)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if r.rows_affected() == 0 {
            return Ok(false);
        }
        sqlx::query("DELETE FROM stored_completion_metadata WHERE completion_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        insert_metadata(&mut tx, id, metadata).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Deletes a stored completion; false when there is no such completion.
    pub async fn delete_completion(&self, id: &str) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM stored_completion_metadata WHERE completion_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let r = sqlx::query("DELETE FROM stored_completions WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(r.rows_affected() > 0)
    }

    /// A new campaign. `Invalid` unless the name is 1 to 128 characters and the key (if
    /// any) 1 to 128 characters without whitespace; `Conflict` if the key is taken.
    pub async fn create_campaign(
        &self,
        key: Option<&str>,
        name: &str,
        account_id: Option<&str>,
        project_id: Option<&str>,
        spec: &Value,
    ) -> Result<CampaignRecord, StoreError> {
        let name = name.trim();
        if name.is_empty() || name.len() > 128 {
            return Err(StoreError::Invalid(
                "a campaign name is 1 to 128 characters".into(),
            ));
        }
        if let Some(k) = key {
            if k.is_empty()
                || k.len() > 128
                || k.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(StoreError::Invalid(
                    "a campaign key is 1 to 128 characters without spaces".into(),
                ));
            }
        }
        let id = new_id("camp");
        let now = now_ms();
        let result = sqlx::query(
            "INSERT INTO campaigns (id, key, name, account_id, project_id, spec, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $7)",
        )
        .bind(&id)
        .bind(key)
        .bind(name)
        .bind(account_id)
        .bind(project_id)
        .bind(json_text(spec)?)
        .bind(now)
        .execute(&self.pool)
        .await;
        match result {
            Ok(_) => Ok(CampaignRecord {
                id,
                key: key.map(str::to_owned),
                name: name.to_owned(),
                account_id: account_id.map(str::to_owned),
                project_id: project_id.map(str::to_owned),
                spec: spec.clone(),
                created_at: now,
                updated_at: now,
            }),
            Err(e) if is_unique_violation(&e) => Err(StoreError::Conflict(format!(
                "campaign {:?}",
                key.unwrap_or_default()
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// The campaign with this id or key (the id wins if both match).
    pub async fn campaign(&self, id_or_key: &str) -> Result<Option<CampaignRecord>, StoreError> {
        let sql = format!(
            "SELECT {CAMPAIGN_COLUMNS} FROM campaigns WHERE id = $1 OR key = $1 \
             ORDER BY CASE WHEN id = $1 THEN 0 ELSE 1 END LIMIT 1"
        );
        let row = sqlx::query(&sql)
            .bind(id_or_key)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(campaign_row).transpose()?)
    }

    /// Campaigns, of one account or (`None`) all, oldest first.
    pub async fn campaigns(
        &self,
        account_id: Option<&str>,
    ) -> Result<Vec<CampaignRecord>, StoreError> {
        let sql = format!(
            "SELECT {CAMPAIGN_COLUMNS} FROM campaigns WHERE $1 IS NULL OR account_id = $1 \
             ORDER BY created_at, id"
        );
        let rows = sqlx::query(&sql)
            .bind(account_id)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(campaign_row).collect::<Result<_, _>>()?)
    }

    /// Replaces a campaign's spec; `NotFound` if there is no campaign with this id.
    pub async fn update_campaign(
        &self,
        id: &str,
        spec: &Value,
    ) -> Result<CampaignRecord, StoreError> {
        let row = self
            .update_spec("campaigns", "campaign", CAMPAIGN_COLUMNS, id, spec)
            .await?;
        Ok(campaign_row(&row)?)
    }

    /// Deletes a campaign (its usage records keep its id); false when there is no campaign
    /// with this id.
    pub async fn delete_campaign(&self, id: &str) -> Result<bool, StoreError> {
        self.delete_by_id("campaigns", id).await
    }

    /// Stores feedback; `Invalid` if the score is not a finite number, `Conflict` if its id
    /// is taken.
    pub async fn insert_feedback(&self, f: &Feedback) -> Result<(), StoreError> {
        if f.score.is_some_and(|s| !s.is_finite()) {
            return Err(StoreError::Invalid("a score is a finite number".into()));
        }
        // No score is written as a literal NULL: sqlx 0.8's Any driver sends a missing f64 to
        // PostgreSQL as a float4 NULL, and the statement it prepares for that (and caches on
        // the connection) then rejects every real f64 score.
        let sql = format!(
            "INSERT INTO feedback (id, request_id, completion_id, account_id, label, comment, created_at, score) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, {})",
            if f.score.is_some() { "$8" } else { "NULL" }
        );
        let mut q = sqlx::query(&sql)
            .bind(&f.id)
            .bind(&f.request_id)
            .bind(&f.completion_id)
            .bind(f.account_id.as_deref())
            .bind(f.label.as_deref())
            .bind(f.comment.as_deref())
            .bind(f.created_at);
        if let Some(score) = f.score {
            q = q.bind(score);
        }
        q.execute(&self.pool).await.map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::Conflict(format!("feedback {:?}", f.id))
            } else {
                e.into()
            }
        })?;
        Ok(())
    }

    /// The usage record's account and campaign for a request id, if the record exists (used
    /// to check a completion id belongs to the caller): (account id, campaign id, variant).
    pub async fn usage_owner(
        &self,
        request_id: &str,
    ) -> Result<Option<(Option<String>, Option<String>, Option<String>)>, StoreError> {
        let row = sqlx::query(
            "SELECT account_id, campaign_id, variant FROM usage_records WHERE request_id = $1",
        )
        .bind(request_id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(r) = row else {
            return Ok(None);
        };
        Ok(Some((
            r.try_get("account_id")?,
            r.try_get("campaign_id")?,
            r.try_get("variant")?,
        )))
    }

    /// Per variant of a campaign (usage records with that campaign_id, within [since, until)
    /// when given): the usage aggregates (same semantics as usage(): requests counts
    /// parent_id IS NULL only) and the feedback joined by request_id (count, mean score, label
    /// counts). Ordered by variant name (records without a variant first).
    pub async fn campaign_report(
        &self,
        campaign_id: &str,
        filter: &crate::UsageQuery,
    ) -> Result<Vec<VariantReport>, StoreError> {
        let window = |args: &mut Args| {
            let mut w = format!("u.campaign_id = {}", args.text(campaign_id));
            if let Some(s) = filter.since {
                w.push_str(&format!(" AND u.created_at >= {}", args.int(s)));
            }
            if let Some(s) = filter.until {
                w.push_str(&format!(" AND u.created_at < {}", args.int(s)));
            }
            for (col, v) in [
                ("u.model", &filter.model),
                ("u.user_id", &filter.user),
                ("u.project_id", &filter.project_id),
                ("u.key_id", &filter.key_id),
                ("u.account_id", &filter.account_id),
            ] {
                if let Some(v) = v {
                    w.push_str(&format!(" AND {col} = {}", args.text(v)));
                }
            }
            if let Some(t) = &filter.tag {
                w.push_str(&format!(
                    " AND EXISTS (SELECT 1 FROM usage_tags t WHERE t.request_id = u.request_id AND t.tag = {})",
                    args.text(t)
                ));
            }
            for (name, value) in &filter.labels {
                let (a, b) = (args.text(name), args.text(value));
                w.push_str(&format!(
                    " AND EXISTS (SELECT 1 FROM usage_labels l WHERE l.request_id = u.request_id AND l.name = {a} AND l.value = {b})"
                ));
            }
            w
        };
        let mut reports: BTreeMap<Option<String>, VariantReport> = BTreeMap::new();

        let mut args = Args::default();
        let sql = format!(
            "SELECT u.variant AS variant, {} FROM usage_records u WHERE {} GROUP BY u.variant",
            crate::usage::AGGREGATES,
            window(&mut args)
        );
        for r in args.bind(sqlx::query(&sql)).fetch_all(&self.pool).await? {
            let variant: Option<String> = r.try_get("variant")?;
            reports.insert(
                variant.clone(),
                VariantReport {
                    variant,
                    requests: r.try_get("requests")?,
                    errors: r.try_get("errors")?,
                    prompt_tokens: r.try_get("prompt_tokens")?,
                    cached_tokens: r.try_get("cached_tokens")?,
                    completion_tokens: r.try_get("completion_tokens")?,
                    cost: r.try_get("cost")?,
                    avg_latency_ms: r.try_get("avg_latency_ms")?,
                    avg_ttft_ms: r.try_get("avg_ttft_ms")?,
                    feedback: 0,
                    avg_score: None,
                    labels: BTreeMap::new(),
                },
            );
        }

        let mut args = Args::default();
        let sql = format!(
            "SELECT u.variant AS variant, COUNT(*) AS feedback, \
             CAST(AVG(f.score) AS DOUBLE PRECISION) AS avg_score \
             FROM feedback f JOIN usage_records u ON u.request_id = f.request_id \
             WHERE {} GROUP BY u.variant",
            window(&mut args)
        );
        for r in args.bind(sqlx::query(&sql)).fetch_all(&self.pool).await? {
            let variant: Option<String> = r.try_get("variant")?;
            if let Some(report) = reports.get_mut(&variant) {
                report.feedback = r.try_get("feedback")?;
                report.avg_score = r.try_get("avg_score")?;
            }
        }

        let mut args = Args::default();
        let sql = format!(
            "SELECT u.variant AS variant, f.label AS label, COUNT(*) AS n \
             FROM feedback f JOIN usage_records u ON u.request_id = f.request_id \
             WHERE {} AND f.label IS NOT NULL GROUP BY u.variant, f.label",
            window(&mut args)
        );
        for r in args.bind(sqlx::query(&sql)).fetch_all(&self.pool).await? {
            let variant: Option<String> = r.try_get("variant")?;
            let label: String = r.try_get("label")?;
            if let Some(report) = reports.get_mut(&variant) {
                report.labels.insert(label, r.try_get("n")?);
            }
        }
        Ok(reports.into_values().collect())
    }
}
