//! Projects and campaigns as requests use them: their specifications (validated when an
//! operator saves them), a short-lived cache over the store, and the resolution of a request's
//! `model`, `ab_campaign`, template, defaults and tools into the request a provider runs.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use parlance_api::chat::Tool;
use parlance_api::{parse_defaults, ApiError, ChatRequest};
use parlance_store::{CampaignRecord, ProjectRecord, Store};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::catalog::Catalog;

/// How long a project or campaign read from the store is trusted (edits on another replica
/// take effect within this time; edits on this one at once).
pub const APP_CACHE_TTL: Duration = Duration::from_secs(1);

fn default_steps() -> u32 {
    8
}

fn yes() -> bool {
    true
}

fn empty_object() -> Value {
    serde_json::json!({"type": "object", "properties": {}})
}

fn default_timeout() -> u64 {
    10_000
}

/// What a project is: its models, system prompt, default parameters, sessions and tools.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectSpec {
    /// The catalog model `model: "{project}"` means.
    pub default_model: String,
    /// The catalog models the project may use; empty: only the default.
    #[serde(default)]
    pub models: Vec<String>,
    /// A Jinja template rendered with `system_prompt_args` into the first system message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
    /// Default request parameters (temperature, max_tokens…), for what the caller leaves out.
    #[serde(default)]
    pub params: serde_json::Map<String, Value>,
    /// Whether a request without `session_id` starts a server-side session.
    #[serde(default)]
    pub sessions: bool,
    /// Tools offered to the model.
    #[serde(default)]
    pub tools: Vec<ProjectTool>,
    /// How many rounds of server-side tool calls one request may take.
    #[serde(default = "default_steps")]
    pub max_tool_steps: u32,
    /// Content filters for this project's requests, on top of the server's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<crate::filter::FilterSpec>,
}

/// A tool registered on a project.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectTool {
    /// Its id, which is also the function name the model sees.
    pub id: String,
    /// What it does, for the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// JSON schema of its arguments.
    #[serde(default = "empty_object")]
    pub parameters: Value,
    /// Offered unless a request switches it off (or on, when this is false).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// An endpoint parlance calls itself; without it, the call is returned to the caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpTool>,
}

/// A tool parlance calls: `POST url` with the arguments as the JSON body; the response body
/// is the result the model reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpTool {
    /// `http://` or `https://`.
    pub url: String,
    /// How long one call may take.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// Extra headers (an operator's credentials for the tool, for example).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// What a campaign is: variants with weights, and what keeps a caller on one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CampaignSpec {
    /// The variants.
    pub variants: Vec<Variant>,
    /// `user` (the default: by `user`, else by session), `session` (by session, else by
    /// `user`), or `none` (every request drawn anew).
    #[serde(default)]
    pub sticky: Sticky,
}

/// One arm of a campaign.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    /// Its name, unique in the campaign (reports group by it).
    pub name: String,
    /// Its share of traffic, relative to the others.
    pub weight: u32,
    /// The model it uses (a catalog name, or a model of the campaign's project); none: the
    /// request's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// A system-prompt template replacing the project's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
    /// Default parameters, before the project's.
    #[serde(default)]
    pub params: serde_json::Map<String, Value>,
}

/// What keeps a caller on the same variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sticky {
    /// By `user`, else by session.
    #[default]
    User,
    /// By session, else by `user`.
    Session,
    /// Drawn for each request.
    None,
}

fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid(param, message)
}

fn defaults(params: &serde_json::Map<String, Value>) -> Result<Option<ChatRequest>, ApiError> {
    if params.is_empty() {
        return Ok(None);
    }
    parse_defaults(&Value::Object(params.clone())).map(Some)
}

impl ProjectSpec {
    /// Reads and checks a spec (400 naming the field when it is wrong).
    pub fn parse(v: &Value, catalog: &Catalog) -> Result<Self, ApiError> {
        let spec: ProjectSpec = serde_json::from_value(v.clone()).map_err(|e| {
            ApiError::malformed(format!("Invalid project: {e}"), Some("spec".into()))
        })?;
        spec.check(catalog)?;
        Ok(spec)
    }

    /// Checks the spec; model names are checked against the catalog unless it is empty (the
    /// command line, which edits the database without loading models).
    fn check(&self, catalog: &Catalog) -> Result<(), ApiError> {
        for m in std::iter::once(&self.default_model).chain(&self.models) {
            if !catalog.is_empty() && catalog.resolve(m).is_err() {
                return Err(bad(
                    "default_model",
                    format!("The model `{m}` is not in the catalog."),
                ));
            }
        }
        if let Some(t) = &self.system_prompt {
            crate::prompt::check(t, "system_prompt")?;
        }
        defaults(&self.params)?;
        crate::filter::Filters::new(&self.filters).map_err(|e| bad("filters", e))?;
        if self.max_tool_steps == 0 || self.max_tool_steps > 32 {
            return Err(bad("max_tool_steps", "max_tool_steps is 1 to 32."));
        }
        let mut seen = Vec::new();
        for (i, t) in self.tools.iter().enumerate() {
            if !parlance_api::chat::valid_function_name(&t.id) {
                return Err(bad(
                    &format!("tools[{i}].id"),
                    format!(
                        "Tool id '{}' must be 1 to 64 of a-z, A-Z, 0-9, '_', '-'.",
                        t.id
                    ),
                ));
            }
            if seen.contains(&&t.id) {
                return Err(bad(
                    &format!("tools[{i}].id"),
                    format!("Two tools are named '{}'.", t.id),
                ));
            }
            seen.push(&t.id);
            if !t.parameters.is_object() {
                return Err(bad(
                    &format!("tools[{i}].parameters"),
                    "A tool's parameters are a JSON schema object.",
                ));
            }
            if let Some(h) = &t.http {
                let ok = reqwest::Url::parse(&h.url)
                    .map(|u| matches!(u.scheme(), "http" | "https"))
                    .unwrap_or(false);
                if !ok {
                    return Err(bad(
                        &format!("tools[{i}].http.url"),
                        format!("'{}' is not an http(s) URL.", h.url),
                    ));
                }
                if h.timeout_ms == 0 || h.timeout_ms > 600_000 {
                    return Err(bad(
                        &format!("tools[{i}].http.timeout_ms"),
                        "timeout_ms is 1 to 600000.",
                    ));
                }
            }
        }
        Ok(())
    }

    /// Whether the project may use this catalog model.
    pub fn allows(&self, model: &str) -> bool {
        model == self.default_model || self.models.iter().any(|m| m == model)
    }
}

impl CampaignSpec {
    /// Reads and checks a spec.
    pub fn parse(v: &Value) -> Result<Self, ApiError> {
        let spec: CampaignSpec = serde_json::from_value(v.clone()).map_err(|e| {
            ApiError::malformed(format!("Invalid campaign: {e}"), Some("spec".into()))
        })?;
        if spec.variants.is_empty() {
            return Err(bad("variants", "A campaign has at least one variant."));
        }
        if spec
            .variants
            .iter()
            .map(|v| u64::from(v.weight))
            .sum::<u64>()
            == 0
        {
            return Err(bad("variants", "The variants' weights add up to 0."));
        }
        for (i, v) in spec.variants.iter().enumerate() {
            if v.name.is_empty() || v.name.len() > 64 {
                return Err(bad(
                    &format!("variants[{i}].name"),
                    "A variant's name is 1 to 64 characters.",
                ));
            }
            if spec.variants[..i].iter().any(|o| o.name == v.name) {
                return Err(bad(
                    &format!("variants[{i}].name"),
                    format!("Two variants are named '{}'.", v.name),
                ));
            }
            if let Some(t) = &v.system_prompt {
                crate::prompt::check(t, &format!("variants[{i}].system_prompt"))?;
            }
            defaults(&v.params)?;
        }
        Ok(spec)
    }

    /// The variant for a caller: a weighted draw, the same for the same sticky key.
    pub fn pick(&self, campaign_id: &str, sticky_key: Option<&str>) -> usize {
        let total: u64 = self.variants.iter().map(|v| u64::from(v.weight)).sum();
        let point = match sticky_key {
            Some(k) => {
                let h = Sha256::digest(format!("{campaign_id}\u{0}{k}").as_bytes());
                let mut b = [0u8; 8];
                b.copy_from_slice(&h[..8]);
                u64::from_be_bytes(b) % total.max(1)
            }
            None => rand::random::<u64>() % total.max(1),
        };
        let mut acc = 0;
        for (i, v) in self.variants.iter().enumerate() {
            acc += u64::from(v.weight);
            if point < acc {
                return i;
            }
        }
        self.variants.len().saturating_sub(1)
    }
}

/// A project, ready for requests.
#[derive(Debug)]
pub(crate) struct Project {
    pub id: String,
    pub name: String,
    pub account_id: Option<String>,
    pub spec: ProjectSpec,
    pub defaults: Option<ChatRequest>,
    /// The spec's content filters, compiled.
    pub filters: crate::filter::Filters,
}

/// A campaign, ready for requests.
#[derive(Debug)]
pub(crate) struct Campaign {
    pub id: String,
    pub account_id: Option<String>,
    pub project_id: Option<String>,
    pub spec: CampaignSpec,
    pub defaults: Vec<Option<ChatRequest>>,
}

fn load_project(r: ProjectRecord) -> Option<Project> {
    let spec: ProjectSpec = match serde_json::from_value(r.spec) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(project = %r.name, error = %e, "a stored project cannot be read");
            return None;
        }
    };
    let defaults = defaults(&spec.params).ok().flatten();
    let filters = crate::filter::Filters::new(&spec.filters).unwrap_or_else(|e| {
        tracing::error!(project = %r.name, error = %e, "a stored project's filters cannot be compiled");
        crate::filter::Filters::default()
    });
    Some(Project {
        filters,
        id: r.id,
        name: r.name,
        account_id: r.account_id,
        spec,
        defaults,
    })
}

fn load_campaign(r: CampaignRecord) -> Option<Campaign> {
    let spec: CampaignSpec = match serde_json::from_value(r.spec) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(campaign = %r.id, error = %e, "a stored campaign cannot be read");
            return None;
        }
    };
    let defaults = spec
        .variants
        .iter()
        .map(|v| defaults(&v.params).ok().flatten())
        .collect();
    Some(Campaign {
        id: r.id,
        account_id: r.account_id,
        project_id: r.project_id,
        spec,
        defaults,
    })
}

type Cached<T> = Mutex<HashMap<String, (Instant, Option<Arc<T>>)>>;

/// Projects and campaigns by name, id or key, read through a cache.
#[derive(Debug)]
pub(crate) struct Apps {
    store: Store,
    projects: Cached<Project>,
    campaigns: Cached<Campaign>,
}

fn unavailable(e: parlance_store::StoreError) -> ApiError {
    tracing::error!(error = %e, "the database is unavailable");
    ApiError::NotReady("The database is unavailable.".into())
}

fn cached<T>(cache: &Cached<T>, key: &str) -> Option<Option<Arc<T>>> {
    let map = cache.lock().ok()?;
    let (at, v) = map.get(key)?;
    (at.elapsed() < APP_CACHE_TTL).then(|| v.clone())
}

fn remember<T>(cache: &Cached<T>, key: &str, v: Option<Arc<T>>) {
    if let Ok(mut map) = cache.lock() {
        if map.len() > 10_000 {
            map.clear();
        }
        map.insert(key.to_owned(), (Instant::now(), v));
    }
}

impl Apps {
    pub fn new(store: Store) -> Self {
        Self {
            store,
            projects: Mutex::new(HashMap::new()),
            campaigns: Mutex::new(HashMap::new()),
        }
    }

    /// Forgets what was cached (after an edit on this replica).
    pub fn invalidate(&self) {
        for c in [&self.projects as &dyn Clear, &self.campaigns] {
            c.clear();
        }
    }

    /// A project by name or id.
    pub async fn project(&self, name: &str) -> Result<Option<Arc<Project>>, ApiError> {
        if let Some(p) = cached(&self.projects, name) {
            return Ok(p);
        }
        let p = self
            .store
            .project(name)
            .await
            .map_err(unavailable)?
            .and_then(load_project)
            .map(Arc::new);
        remember(&self.projects, name, p.clone());
        Ok(p)
    }

    /// A campaign by id or key.
    pub async fn campaign(&self, id_or_key: &str) -> Result<Option<Arc<Campaign>>, ApiError> {
        if let Some(c) = cached(&self.campaigns, id_or_key) {
            return Ok(c);
        }
        let c = self
            .store
            .campaign(id_or_key)
            .await
            .map_err(unavailable)?
            .and_then(load_campaign)
            .map(Arc::new);
        remember(&self.campaigns, id_or_key, c.clone());
        Ok(c)
    }
}

trait Clear {
    fn clear(&self);
}

impl<T> Clear for Cached<T> {
    fn clear(&self) {
        if let Ok(mut m) = self.lock() {
            m.clear();
        }
    }
}

/// A project tool as a function the model is offered.
pub(crate) fn as_function(t: &ProjectTool) -> Tool {
    Tool {
        name: t.id.clone(),
        description: t.description.clone(),
        parameters: t.parameters.clone(),
        strict: false,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]
    use super::*;
    use serde_json::json;

    fn campaign(weights: &[u32]) -> CampaignSpec {
        let variants: Vec<Value> = weights
            .iter()
            .enumerate()
            .map(|(i, w)| json!({"name": format!("v{i}"), "weight": w}))
            .collect();
        CampaignSpec::parse(&json!({ "variants": variants })).unwrap()
    }

    #[test]
    fn sticky_draws_follow_the_weights() {
        let c = campaign(&[1, 3]);
        let mut counts = [0u32; 2];
        for i in 0..4000 {
            let key = format!("user-{i}");
            let v = c.pick("camp_1", Some(&key));
            assert_eq!(v, c.pick("camp_1", Some(&key)), "sticky");
            counts[v] += 1;
        }
        // 1000 ± 4.4σ (σ ≈ 27) for the first arm.
        assert!((880..=1120).contains(&counts[0]), "{counts:?}");
        let zero = campaign(&[0, 5]);
        assert!((0..100).all(|i| zero.pick("c", Some(&i.to_string())) == 1));
    }

    #[test]
    fn campaign_specs_are_checked() {
        assert!(CampaignSpec::parse(&json!({"variants": []})).is_err());
        assert!(CampaignSpec::parse(&json!({"variants": [{"name": "a", "weight": 0}]})).is_err());
        assert!(CampaignSpec::parse(
            &json!({"variants": [{"name": "a", "weight": 1}, {"name": "a", "weight": 1}]})
        )
        .is_err());
        let e = CampaignSpec::parse(
            &json!({"variants": [{"name": "a", "weight": 1, "params": {"temperature": 9}}]}),
        )
        .unwrap_err();
        assert_eq!(e.param().as_deref(), Some("temperature"));
        assert!(CampaignSpec::parse(
            &json!({"variants": [{"name": "a", "weight": 1, "colour": 1}]})
        )
        .is_err());
    }
}
