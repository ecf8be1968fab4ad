//! The application layer's own resources, as the HTTP surface shows them: sessions, stored
//! completions and feedback (for API keys, within their account), projects, campaigns and
//! campaign reports (for operators).

use std::collections::BTreeMap;

use parlance_api::{parse_session_id, ApiError};
use parlance_store::{CampaignRecord, CompletionQuery, Feedback, ProjectRecord, SessionRecord};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::admin::store_error;
use crate::projects::{CampaignSpec, ProjectSpec};
use crate::resolve::session_missing;
use crate::{Platform, Principal};

/// `GET /v1/chat/completions` query.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
pub struct CompletionList {
    /// Only this model.
    pub model: Option<String>,
    /// Only completions carrying all these metadata pairs.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Page after this id.
    pub after: Option<String>,
    /// Page size, 1 to 100 (20).
    pub limit: Option<i64>,
    /// `asc` (default) or `desc`.
    pub order: Option<String>,
}

/// `POST /v1/feedback`.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FeedbackInput {
    /// The choice's `completion_id`.
    pub completion_id: String,
    /// A number: a rating, a thumbs up (1) or down (-1 or 0), a conversion value.
    pub score: Option<f64>,
    /// An outcome name (`accepted`, `converted`…).
    pub label: Option<String>,
    /// Free text.
    pub comment: Option<String>,
}

fn secs(ms: i64) -> i64 {
    ms / 1000
}

fn session_json(s: &SessionRecord) -> Value {
    json!({
        "id": s.id,
        "object": "session",
        "project_id": s.project_id,
        "messages_count": s.messages,
        "created_at": secs(s.created_at),
        "updated_at": secs(s.updated_at),
    })
}

/// A project as the admin API shows it.
pub fn project_json(p: &ProjectRecord) -> Value {
    json!({
        "id": p.id,
        "object": "project",
        "name": p.name,
        "account_id": p.account_id,
        "spec": p.spec,
        "created_at": secs(p.created_at),
        "updated_at": secs(p.updated_at),
    })
}

fn campaign_json(c: &CampaignRecord) -> Value {
    json!({
        "id": c.id,
        "object": "campaign",
        "key": c.key,
        "name": c.name,
        "account_id": c.account_id,
        "project_id": c.project_id,
        "spec": c.spec,
        "created_at": secs(c.created_at),
        "updated_at": secs(c.updated_at),
    })
}

fn completion_missing(id: &str) -> ApiError {
    ApiError::NotFound(format!("No stored chat completion with id '{id}'."))
}

fn page_limit(limit: Option<i64>) -> Result<i64, ApiError> {
    match limit {
        None => Ok(20),
        Some(n) if (1..=100).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::invalid(
            "limit",
            format!("Invalid 'limit': {n} is not between 1 and 100."),
        )),
    }
}

fn descending(order: Option<&str>) -> Result<bool, ApiError> {
    match order {
        None | Some("asc") => Ok(false),
        Some("desc") => Ok(true),
        Some(o) => Err(ApiError::invalid(
            "order",
            format!("Invalid 'order': '{o}'. Expected 'asc' or 'desc'."),
        )),
    }
}

impl Platform {
    async fn own_session(&self, p: &Principal, id: &str) -> Result<SessionRecord, ApiError> {
        let id = parse_session_id(id).map_err(|_| session_missing(id))?;
        self.store
            .session(&id)
            .await
            .map_err(store_error)?
            .filter(|s| s.account_id == p.account_id)
            .ok_or_else(|| session_missing(&id))
    }

    /// Starts an empty session (in a project, if named).
    pub async fn create_session(
        &self,
        p: &Principal,
        project: Option<&str>,
    ) -> Result<Value, ApiError> {
        let project_id = match project {
            None => None,
            Some(name) => Some(
                self.apps
                    .project(name)
                    .await?
                    .filter(|x| x.account_id.is_none() || x.account_id == p.account_id)
                    .ok_or_else(|| ApiError::NotFound(format!("No project '{name}'.")))?
                    .id
                    .clone(),
            ),
        };
        let id = uuid::Uuid::new_v4().hyphenated().to_string();
        let s = self
            .store
            .create_session(&id, p.account_id.as_deref(), project_id.as_deref())
            .await
            .map_err(store_error)?;
        Ok(session_json(&s))
    }

    /// A session and its messages.
    pub async fn session(&self, p: &Principal, id: &str) -> Result<Value, ApiError> {
        let s = self.own_session(p, id).await?;
        let messages: Vec<Value> = self
            .store
            .session_messages(&s.id)
            .await
            .map_err(store_error)?
            .into_iter()
            .map(|m| {
                let mut v = m.message;
                if let Some(o) = v.as_object_mut() {
                    o.insert("id".into(), json!(m.id));
                    o.insert("created_at".into(), json!(secs(m.created_at)));
                }
                v
            })
            .collect();
        let mut v = session_json(&s);
        if let Some(o) = v.as_object_mut() {
            o.insert("messages".into(), Value::Array(messages));
        }
        Ok(v)
    }

    /// The caller's sessions, most recently used first.
    pub async fn sessions(&self, p: &Principal, limit: Option<i64>) -> Result<Value, ApiError> {
        let all = self
            .store
            .sessions(p.account_id.as_deref(), page_limit(limit)?)
            .await
            .map_err(store_error)?;
        Ok(json!({"object": "list", "data": all.iter().map(session_json).collect::<Vec<_>>()}))
    }

    /// Deletes a session and its history.
    pub async fn delete_session(&self, p: &Principal, id: &str) -> Result<Value, ApiError> {
        let s = self.own_session(p, id).await?;
        self.store
            .delete_session(&s.id)
            .await
            .map_err(store_error)?;
        Ok(json!({"id": s.id, "object": "session.deleted", "deleted": true}))
    }

    async fn own_completion(
        &self,
        p: &Principal,
        id: &str,
    ) -> Result<parlance_store::StoredCompletion, ApiError> {
        self.store
            .completion(id)
            .await
            .map_err(store_error)?
            .filter(|c| c.account_id == p.account_id)
            .ok_or_else(|| completion_missing(id))
    }

    /// A stored completion, as it was answered (with its metadata).
    pub async fn stored_completion(&self, p: &Principal, id: &str) -> Result<Value, ApiError> {
        let c = self.own_completion(p, id).await?;
        let mut v = c.response;
        if let Some(o) = v.as_object_mut() {
            o.insert("metadata".into(), json!(c.metadata));
        }
        Ok(v)
    }

    /// A page of the caller's stored completions.
    pub async fn stored_completions(
        &self,
        p: &Principal,
        q: CompletionList,
    ) -> Result<Value, ApiError> {
        let query = CompletionQuery {
            account_id: p.account_id.clone(),
            model: q.model,
            metadata: q.metadata.into_iter().collect(),
            after: q.after,
            limit: page_limit(q.limit)?,
            descending: descending(q.order.as_deref())?,
        };
        let (page, has_more) = self.store.completions(&query).await.map_err(store_error)?;
        let data: Vec<Value> = page
            .into_iter()
            .map(|c| {
                let mut v = c.response;
                if let Some(o) = v.as_object_mut() {
                    o.insert("metadata".into(), json!(c.metadata));
                }
                v
            })
            .collect();
        Ok(json!({
            "object": "list",
            "first_id": data.first().and_then(|c| c.get("id")).cloned(),
            "last_id": data.last().and_then(|c| c.get("id")).cloned(),
            "has_more": has_more,
            "data": data,
        }))
    }

    /// The messages of a stored completion's request.
    pub async fn stored_completion_messages(
        &self,
        p: &Principal,
        id: &str,
        after: Option<&str>,
        limit: Option<i64>,
        order: Option<&str>,
    ) -> Result<Value, ApiError> {
        let c = self.own_completion(p, id).await?;
        let mut all: Vec<Value> = c
            .request
            .get("messages")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if descending(order)? {
            all.reverse();
        }
        let start = match after {
            Some(a) => all
                .iter()
                .position(|m| m.get("id").and_then(Value::as_str) == Some(a))
                .map_or(all.len(), |i| i + 1),
            None => 0,
        };
        let limit = page_limit(limit)? as usize;
        let data: Vec<Value> = all.iter().skip(start).take(limit).cloned().collect();
        let has_more = all.len() > start + data.len();
        Ok(json!({
            "object": "list",
            "first_id": data.first().and_then(|m| m.get("id")).cloned(),
            "last_id": data.last().and_then(|m| m.get("id")).cloned(),
            "has_more": has_more,
            "data": data,
        }))
    }

    /// Replaces a stored completion's metadata.
    pub async fn update_stored_completion(
        &self,
        p: &Principal,
        id: &str,
        metadata: BTreeMap<String, String>,
    ) -> Result<Value, ApiError> {
        self.own_completion(p, id).await?;
        self.store
            .update_completion_metadata(id, &metadata)
            .await
            .map_err(store_error)?;
        self.stored_completion(p, id).await
    }

    /// Deletes a stored completion.
    pub async fn delete_stored_completion(
        &self,
        p: &Principal,
        id: &str,
    ) -> Result<Value, ApiError> {
        self.own_completion(p, id).await?;
        self.store
            .delete_completion(id)
            .await
            .map_err(store_error)?;
        Ok(json!({"id": id, "object": "chat.completion.deleted", "deleted": true}))
    }

    /// Records an outcome for a completion of the caller's.
    pub async fn feedback(&self, p: &Principal, f: FeedbackInput) -> Result<Value, ApiError> {
        if f.score.is_none() && f.label.is_none() {
            return Err(ApiError::malformed(
                "Feedback needs a 'score' or a 'label'.",
                Some("score".into()),
            ));
        }
        if f.score.is_some_and(|s| !s.is_finite()) {
            return Err(ApiError::invalid(
                "score",
                "'score' must be a finite number.",
            ));
        }
        if f.label
            .as_ref()
            .is_some_and(|l| l.is_empty() || l.chars().count() > 64)
        {
            return Err(ApiError::invalid("label", "'label' is 1 to 64 characters."));
        }
        if f.comment.as_ref().is_some_and(|c| c.chars().count() > 4096) {
            return Err(ApiError::invalid(
                "comment",
                "'comment' is at most 4096 characters.",
            ));
        }
        let missing = || ApiError::Missing {
            message: format!("No completion '{}'.", f.completion_id),
            param: "completion_id",
            code: "completion_not_found",
        };
        let (request_id, _) = crate::ids::request_of(&f.completion_id).ok_or_else(missing)?;
        let mut owner = self
            .store
            .usage_owner(&request_id)
            .await
            .map_err(store_error)?;
        if owner.is_none() {
            // Usage is written in batches: the completion may have ended a moment ago.
            self.flush_usage().await;
            owner = self
                .store
                .usage_owner(&request_id)
                .await
                .map_err(store_error)?;
        }
        let Some((account, campaign, variant)) = owner else {
            return Err(missing());
        };
        if account != p.account_id {
            return Err(missing());
        }
        let record = Feedback {
            id: parlance_store::new_id("fb"),
            request_id,
            completion_id: f.completion_id.clone(),
            account_id: account,
            score: f.score,
            label: f.label.clone(),
            comment: f.comment.clone(),
            created_at: parlance_store::now_ms(),
        };
        self.store
            .insert_feedback(&record)
            .await
            .map_err(store_error)?;
        Ok(json!({
            "id": record.id,
            "object": "feedback",
            "completion_id": record.completion_id,
            "campaign_id": campaign,
            "variant": variant,
            "score": record.score,
            "label": record.label,
            "created_at": secs(record.created_at),
        }))
    }

    async fn account_id(&self, account: Option<&str>) -> Result<Option<String>, ApiError> {
        match account {
            None => Ok(None),
            Some(a) => Ok(Some(self.account(a).await?.id)),
        }
    }

    /// Creates a project (operators only).
    pub async fn create_project(
        &self,
        name: &str,
        account: Option<&str>,
        spec: &Value,
    ) -> Result<Value, ApiError> {
        let checked = ProjectSpec::parse(spec, &self.catalog)?;
        let account_id = self.account_id(account).await?;
        let spec = serde_json::to_value(checked).map_err(|_| ApiError::Internal)?;
        let p = self
            .store
            .create_project(name, account_id.as_deref(), &spec)
            .await
            .map_err(store_error)?;
        self.apps.invalidate();
        Ok(project_json(&p))
    }

    async fn project_record(&self, id_or_name: &str) -> Result<ProjectRecord, ApiError> {
        self.store
            .project(id_or_name)
            .await
            .map_err(store_error)?
            .ok_or_else(|| ApiError::NotFound(format!("No project '{id_or_name}'.")))
    }

    /// A project's id, from its id or name (an id passes as it is: usage outlives projects).
    pub async fn project_id(&self, id_or_name: &str) -> Result<String, ApiError> {
        if id_or_name.starts_with("proj_") {
            return Ok(id_or_name.to_owned());
        }
        Ok(self.project_record(id_or_name).await?.id)
    }

    /// A campaign's id, from its id or key.
    pub async fn campaign_id(&self, id_or_key: &str) -> Result<String, ApiError> {
        match self.store.campaign(id_or_key).await.map_err(store_error)? {
            Some(c) => Ok(c.id),
            None if id_or_key.starts_with("camp_") => Ok(id_or_key.to_owned()),
            None => Err(ApiError::NotFound(format!("No campaign '{id_or_key}'."))),
        }
    }

    /// One project.
    pub async fn project(&self, id_or_name: &str) -> Result<Value, ApiError> {
        Ok(project_json(&self.project_record(id_or_name).await?))
    }

    /// Every project.
    pub async fn projects(&self) -> Result<Value, ApiError> {
        let all = self.store.projects(None).await.map_err(store_error)?;
        Ok(json!({"object": "list", "data": all.iter().map(project_json).collect::<Vec<_>>()}))
    }

    /// Replaces a project's spec.
    pub async fn update_project(&self, id_or_name: &str, spec: &Value) -> Result<Value, ApiError> {
        let checked = ProjectSpec::parse(spec, &self.catalog)?;
        let p = self.project_record(id_or_name).await?;
        let spec = serde_json::to_value(checked).map_err(|_| ApiError::Internal)?;
        let p = self
            .store
            .update_project(&p.id, &spec)
            .await
            .map_err(store_error)?;
        self.apps.invalidate();
        Ok(project_json(&p))
    }

    /// Deletes a project (its sessions and usage stay).
    pub async fn delete_project(&self, id_or_name: &str) -> Result<Value, ApiError> {
        let p = self.project_record(id_or_name).await?;
        self.store
            .delete_project(&p.id)
            .await
            .map_err(store_error)?;
        self.apps.invalidate();
        Ok(json!({"id": p.id, "object": "project.deleted", "deleted": true}))
    }

    /// Creates a campaign (operators only).
    pub async fn create_campaign(
        &self,
        key: Option<&str>,
        name: &str,
        account: Option<&str>,
        project: Option<&str>,
        spec: &Value,
    ) -> Result<Value, ApiError> {
        let checked = CampaignSpec::parse(spec)?;
        let account_id = self.account_id(account).await?;
        let project_id = match project {
            Some(p) => Some(self.project_record(p).await?.id),
            None => None,
        };
        if let Some(k) = key {
            if k.is_empty() || k.len() > 128 {
                return Err(ApiError::invalid(
                    "key",
                    "A campaign key is 1 to 128 characters.",
                ));
            }
        }
        let spec = serde_json::to_value(checked).map_err(|_| ApiError::Internal)?;
        let c = self
            .store
            .create_campaign(
                key,
                name,
                account_id.as_deref(),
                project_id.as_deref(),
                &spec,
            )
            .await
            .map_err(store_error)?;
        self.apps.invalidate();
        Ok(campaign_json(&c))
    }

    async fn campaign_record(&self, id_or_key: &str) -> Result<CampaignRecord, ApiError> {
        self.store
            .campaign(id_or_key)
            .await
            .map_err(store_error)?
            .ok_or_else(|| ApiError::NotFound(format!("No campaign '{id_or_key}'.")))
    }

    /// One campaign.
    pub async fn campaign(&self, id_or_key: &str) -> Result<Value, ApiError> {
        Ok(campaign_json(&self.campaign_record(id_or_key).await?))
    }

    /// Every campaign.
    pub async fn campaigns(&self) -> Result<Value, ApiError> {
        let all = self.store.campaigns(None).await.map_err(store_error)?;
        Ok(json!({"object": "list", "data": all.iter().map(campaign_json).collect::<Vec<_>>()}))
    }

    /// Replaces a campaign's spec.
    pub async fn update_campaign(&self, id_or_key: &str, spec: &Value) -> Result<Value, ApiError> {
        let checked = CampaignSpec::parse(spec)?;
        let c = self.campaign_record(id_or_key).await?;
        let spec = serde_json::to_value(checked).map_err(|_| ApiError::Internal)?;
        let c = self
            .store
            .update_campaign(&c.id, &spec)
            .await
            .map_err(store_error)?;
        self.apps.invalidate();
        Ok(campaign_json(&c))
    }

    /// Deletes a campaign (its usage records keep its id).
    pub async fn delete_campaign(&self, id_or_key: &str) -> Result<Value, ApiError> {
        let c = self.campaign_record(id_or_key).await?;
        self.store
            .delete_campaign(&c.id)
            .await
            .map_err(store_error)?;
        self.apps.invalidate();
        Ok(json!({"id": c.id, "object": "campaign.deleted", "deleted": true}))
    }

    /// The variants of a campaign compared: requests, errors, tokens, cost, latency, time to
    /// first token, and the feedback posted against their completions.
    pub async fn campaign_report(
        &self,
        id_or_key: &str,
        filter: &parlance_store::UsageQuery,
    ) -> Result<Value, ApiError> {
        let c = self.campaign_record(id_or_key).await?;
        self.flush_usage().await;
        let rows = self
            .store
            .campaign_report(&c.id, filter)
            .await
            .map_err(store_error)?;
        // Every variant of the spec appears, with zeros when it had no traffic.
        let names: Vec<String> = c
            .spec
            .get("variants")
            .and_then(Value::as_array)
            .map(|vs| {
                vs.iter()
                    .filter_map(|v| v.get("name").and_then(Value::as_str).map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let weights: BTreeMap<String, Value> = c
            .spec
            .get("variants")
            .and_then(Value::as_array)
            .map(|vs| {
                vs.iter()
                    .filter_map(|v| {
                        Some((
                            v.get("name")?.as_str()?.to_owned(),
                            v.get("weight")?.clone(),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut variants: Vec<Value> = Vec::new();
        for name in &names {
            let r = rows
                .iter()
                .find(|r| r.variant.as_deref() == Some(name.as_str()));
            let mut v = match r {
                Some(r) => serde_json::to_value(r).unwrap_or(Value::Null),
                None => json!({
                    "variant": name, "requests": 0, "errors": 0, "prompt_tokens": 0,
                    "cached_tokens": 0, "completion_tokens": 0, "cost": 0,
                    "avg_latency_ms": null, "avg_ttft_ms": null, "feedback": 0,
                    "avg_score": null, "labels": {},
                }),
            };
            if let Some(o) = v.as_object_mut() {
                o.insert(
                    "weight".into(),
                    weights.get(name).cloned().unwrap_or(Value::Null),
                );
            }
            variants.push(v);
        }
        // Records of variants since removed from the spec are still reported.
        for r in rows
            .iter()
            .filter(|r| r.variant.as_ref().is_none_or(|v| !names.contains(v)))
        {
            variants.push(serde_json::to_value(r).unwrap_or(Value::Null));
        }
        Ok(json!({
            "object": "campaign.report",
            "campaign_id": c.id,
            "key": c.key,
            "name": c.name,
            "variants": variants,
        }))
    }
}
