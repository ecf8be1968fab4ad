//! The route table: every route with its handler, who may call it and its description. The
//! router and the OpenAPI document (`GET /openapi.json`) are both built from this one table, and
//! the schemas come from the types the handlers read and write, so the two cannot drift apart.

use std::sync::Arc;

use axum::http::Method;
use axum::routing::{delete, get, post, put, MethodRouter};
use schemars::{JsonSchema, SchemaGenerator};
use serde_json::{json, Map, Value};

use crate::{admin, anthropic, apps, chat, models, ui, AppState};

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// Anyone (health, metrics, pages, this document).
    Open,
    /// An API key (`Authorization: Bearer`), errors in OpenAI's envelope.
    Key,
    /// An API key (`x-api-key` or Bearer), errors in Anthropic's envelope.
    AnthropicKey,
    /// The admin token.
    Admin,
}

type SchemaFn = fn(&mut SchemaGenerator) -> schemars::Schema;

/// What a successful response carries.
#[derive(Clone, Copy)]
pub(crate) enum Body {
    /// JSON of this schema.
    Json(SchemaFn),
    /// JSON, or with `stream: true`, server-sent events whose data are of the second schema.
    JsonOrEvents(SchemaFn, SchemaFn),
    /// Another media type (a page, metrics text).
    Other(&'static str),
    /// A redirect.
    Redirect,
}

/// One operation: a method on a path.
pub(crate) struct Route {
    pub method: Method,
    /// axum's path syntax (`{id}`, `{*id}` for the rest of the path).
    pub path: String,
    pub operation_id: String,
    pub summary: &'static str,
    pub tag: &'static str,
    pub access: Access,
    pub request: Option<SchemaFn>,
    pub query: Vec<(&'static str, &'static str)>,
    pub status: u16,
    pub response: Body,
    pub handler: MethodRouter<Arc<AppState>>,
}

fn schema<T: JsonSchema>(g: &mut SchemaGenerator) -> schemars::Schema {
    g.subschema_for::<T>()
}

/// Objects whose shape belongs to the application layer (projects, campaigns, sessions, stored
/// completions), documented in docs/apps.md.
type Object = Map<String, Value>;

const USAGE_FILTERS: &[(&str, &str)] = &[
    ("model", "Only this model."),
    ("key", "Only this managed key id."),
    ("account", "Only this account (id or name)."),
    ("user", "Only this `user`."),
    ("project", "Only this project (id or name)."),
    ("campaign", "Only this campaign (id or key)."),
    ("variant", "Only this campaign variant."),
    ("session", "Only this session id."),
    ("tag", "Only requests with this tag."),
    (
        "label",
        "NAME:VALUE: only requests with this label (repeatable).",
    ),
    ("since", "Unix seconds: from this time."),
    ("until", "Unix seconds: before this time."),
];

#[allow(clippy::too_many_arguments, reason = "one row of the table")]
fn route(
    method: Method,
    path: impl Into<String>,
    operation_id: impl Into<String>,
    summary: &'static str,
    tag: &'static str,
    access: Access,
    request: Option<SchemaFn>,
    status: u16,
    response: Body,
    handler: MethodRouter<Arc<AppState>>,
) -> Route {
    Route {
        method,
        path: path.into(),
        operation_id: operation_id.into(),
        summary,
        tag,
        access,
        request,
        query: Vec::new(),
        status,
        response,
        handler,
    }
}

impl Route {
    /// Adds documented query parameters.
    fn with_query(mut self, query: &[(&'static str, &'static str)]) -> Self {
        self.query.extend_from_slice(query);
        self
    }
}

/// Every route of the server.
pub(crate) fn table() -> Vec<Route> {
    use Access::{Admin, AnthropicKey, Key, Open};
    use Body::{Json, JsonOrEvents, Other, Redirect};
    let mut t = Vec::new();
    for (prefix, id) in [("/v1", ""), ("/api/v1", "_api")] {
        t.extend([
            route(
                Method::POST,
                format!("{prefix}/chat/completions"),
                format!("createChatCompletion{id}"),
                "Creates a chat completion (streamed as server-sent events with `stream: true`).",
                "Chat",
                Key,
                Some(schema::<parlance_api::chat::RawRequest>),
                200,
                JsonOrEvents(
                    schema::<parlance_api::chat::ChatCompletion>,
                    schema::<parlance_api::chat::ChatCompletionChunk>,
                ),
                post(chat::completions),
            ),
            route(
                Method::GET,
                format!("{prefix}/chat/completions"),
                format!("listChatCompletions{id}"),
                "Lists the caller's stored completions.",
                "Chat",
                Key,
                None,
                200,
                Json(schema::<Object>),
                get(apps::completions),
            )
            .with_query(&[
                ("model", "Only this model."),
                (
                    "metadata[NAME]",
                    "Only completions with this metadata value.",
                ),
                ("after", "Page after this id."),
                ("limit", "Page size, 1 to 100 (20)."),
                ("order", "`asc` or `desc`."),
            ]),
            route(
                Method::GET,
                format!("{prefix}/chat/completions/{{id}}"),
                format!("getChatCompletion{id}"),
                "A stored completion.",
                "Chat",
                Key,
                None,
                200,
                Json(schema::<Object>),
                get(apps::completion),
            ),
            route(
                Method::POST,
                format!("{prefix}/chat/completions/{{id}}"),
                format!("updateChatCompletion{id}"),
                "Replaces a stored completion's metadata.",
                "Chat",
                Key,
                Some(schema::<apps::CompletionUpdate>),
                200,
                Json(schema::<Object>),
                post(apps::update_completion),
            ),
            route(
                Method::DELETE,
                format!("{prefix}/chat/completions/{{id}}"),
                format!("deleteChatCompletion{id}"),
                "Deletes a stored completion.",
                "Chat",
                Key,
                None,
                200,
                Json(schema::<Object>),
                delete(apps::delete_completion),
            ),
            route(
                Method::GET,
                format!("{prefix}/chat/completions/{{id}}/messages"),
                format!("getChatCompletionMessages{id}"),
                "The messages of a stored completion.",
                "Chat",
                Key,
                None,
                200,
                Json(schema::<Object>),
                get(apps::completion_messages),
            )
            .with_query(&[
                ("after", "Page after this id."),
                ("limit", "Page size."),
                ("order", "`asc` or `desc`."),
            ]),
            route(
                Method::POST,
                format!("{prefix}/sessions"),
                format!("createSession{id}"),
                "Opens a server-side session (optionally on a project).",
                "Sessions",
                Key,
                Some(schema::<apps::NewSession>),
                201,
                Json(schema::<Object>),
                post(apps::create_session),
            ),
            route(
                Method::GET,
                format!("{prefix}/sessions"),
                format!("listSessions{id}"),
                "The caller's sessions.",
                "Sessions",
                Key,
                None,
                200,
                Json(schema::<Object>),
                get(apps::sessions),
            )
            .with_query(&[
                ("limit", "Page size."),
                ("after", "Page after this id."),
                ("order", "`asc` or `desc`."),
            ]),
            route(
                Method::GET,
                format!("{prefix}/sessions/{{id}}"),
                format!("getSession{id}"),
                "A session and its turns.",
                "Sessions",
                Key,
                None,
                200,
                Json(schema::<Object>),
                get(apps::session),
            ),
            route(
                Method::DELETE,
                format!("{prefix}/sessions/{{id}}"),
                format!("deleteSession{id}"),
                "Deletes a session.",
                "Sessions",
                Key,
                None,
                200,
                Json(schema::<Object>),
                delete(apps::delete_session),
            ),
            route(
                Method::POST,
                format!("{prefix}/feedback"),
                format!("createFeedback{id}"),
                "Records feedback (a score, a label) on a completion.",
                "Sessions",
                Key,
                Some(schema::<parlance_platform::FeedbackInput>),
                200,
                Json(schema::<Object>),
                post(apps::feedback),
            ),
            route(
                Method::GET,
                format!("{prefix}/models"),
                format!("listModels{id}"),
                "The models this server serves.",
                "Models",
                Key,
                None,
                200,
                Json(schema::<parlance_api::models::ModelList>),
                get(models::list),
            ),
            route(
                Method::GET,
                format!("{prefix}/models/{{*id}}"),
                format!("retrieveModel{id}"),
                "One model.",
                "Models",
                Key,
                None,
                200,
                Json(schema::<parlance_api::models::ModelObject>),
                get(models::get),
            ),
        ]);
    }
    for (path, id) in [
        ("/v1/messages", "createMessage"),
        ("/anthropic/v1/messages", "createMessage_anthropic"),
    ] {
        t.push(route(
            Method::POST,
            path,
            id,
            "Anthropic's Messages API (streamed as Anthropic's events with `stream: true`).",
            "Anthropic",
            AnthropicKey,
            Some(schema::<parlance_api::anthropic::RawMessagesRequest>),
            200,
            JsonOrEvents(
                schema::<parlance_api::anthropic::MessagesResponse>,
                schema::<Object>,
            ),
            post(anthropic::messages),
        ));
    }
    t.extend([
        route(
            Method::GET,
            "/admin/accounts",
            "listAccounts",
            "Accounts and their balances.",
            "Admin",
            Admin,
            None,
            200,
            Json(schema::<admin::List<admin::AccountObject>>),
            get(admin::accounts),
        ),
        route(
            Method::POST,
            "/admin/accounts",
            "createAccount",
            "Creates an account.",
            "Admin",
            Admin,
            Some(schema::<admin::NewAccount>),
            201,
            Json(schema::<admin::AccountObject>),
            post(admin::create_account),
        ),
        route(
            Method::GET,
            "/admin/accounts/{id}",
            "getAccount",
            "One account (id or name).",
            "Admin",
            Admin,
            None,
            200,
            Json(schema::<admin::AccountObject>),
            get(admin::account),
        ),
        route(
            Method::POST,
            "/admin/accounts/{id}/credits",
            "addCredits",
            "Adds credits (micro-units).",
            "Admin",
            Admin,
            Some(schema::<admin::NewCredits>),
            200,
            Json(schema::<admin::AccountObject>),
            post(admin::add_credits),
        ),
        route(
            Method::GET,
            "/admin/keys",
            "listKeys",
            "Managed keys (never their secrets).",
            "Admin",
            Admin,
            None,
            200,
            Json(schema::<admin::List<admin::KeyObject>>),
            get(admin::keys),
        )
        .with_query(&[("account", "Only this account's keys.")]),
        route(
            Method::POST,
            "/admin/keys",
            "createKey",
            "Creates a key; its secret is shown once.",
            "Admin",
            Admin,
            Some(schema::<admin::NewKeyBody>),
            201,
            Json(schema::<admin::KeyObject>),
            post(admin::create_key),
        ),
        route(
            Method::DELETE,
            "/admin/keys/{id}",
            "revokeKey",
            "Revokes a key.",
            "Admin",
            Admin,
            None,
            200,
            Json(schema::<admin::RevokedKey>),
            delete(admin::revoke_key),
        ),
        route(
            Method::GET,
            "/admin/usage",
            "getUsage",
            "Usage, filtered and grouped.",
            "Admin",
            Admin,
            None,
            200,
            Json(schema::<admin::UsageResponse>),
            get(admin::usage),
        )
        .with_query(USAGE_FILTERS)
        .with_query(&[("group_by", "model, key, account, user, provider, status, outcome, day, hour, minute, project, campaign, variant, session, tag or label:NAME.")]),
        route(
            Method::GET,
            "/admin/requests",
            "listRequests",
            "The newest requests, newest first.",
            "Admin",
            Admin,
            None,
            200,
            Json(schema::<admin::List<admin::RequestRow>>),
            get(admin::requests),
        )
        .with_query(USAGE_FILTERS)
        .with_query(&[
            ("status", "`error` (every status of 400 or more) or one HTTP status."),
            ("limit", "How many, 1 to 1000 (50)."),
        ]),
        route(
            Method::GET,
            "/admin/errors",
            "listErrors",
            "This replica's last error responses (any status of 400 or more), newest first.",
            "Admin",
            Admin,
            None,
            200,
            Json(schema::<admin::List<crate::recent::ErrorEvent>>),
            get(admin::errors),
        )
        .with_query(&[("limit", "How many, 1 to 200 (50).")]),
        route(
            Method::GET,
            "/admin/projects",
            "listProjects",
            "Projects.",
            "Admin",
            Admin,
            None,
            200,
            Json(schema::<Object>),
            get(admin::projects),
        ),
        route(
            Method::POST,
            "/admin/projects",
            "createProject",
            "Creates a project (docs/apps.md).",
            "Admin",
            Admin,
            Some(schema::<admin::NewProject>),
            201,
            Json(schema::<Object>),
            post(admin::create_project),
        ),
        route(
            Method::GET,
            "/admin/projects/{id}",
            "getProject",
            "One project.",
            "Admin",
            Admin,
            None,
            200,
            Json(schema::<Object>),
            get(admin::project),
        ),
        route(
            Method::POST,
            "/admin/projects/{id}",
            "updateProject",
            "Saves a new version of a project.",
            "Admin",
            Admin,
            Some(schema::<Object>),
            200,
            Json(schema::<Object>),
            post(admin::update_project),
        ),
        route(
            Method::PUT,
            "/admin/projects/{id}",
            "replaceProject",
            "Saves a new version of a project.",
            "Admin",
            Admin,
            Some(schema::<Object>),
            200,
            Json(schema::<Object>),
            put(admin::update_project),
        ),
        route(
            Method::DELETE,
            "/admin/projects/{id}",
            "deleteProject",
            "Deletes a project.",
            "Admin",
            Admin,
            None,
            200,
            Json(schema::<Object>),
            delete(admin::delete_project),
        ),
        route(
            Method::GET,
            "/admin/campaigns",
            "listCampaigns",
            "A/B campaigns.",
            "Admin",
            Admin,
            None,
            200,
            Json(schema::<Object>),
            get(admin::campaigns),
        ),
        route(
            Method::POST,
            "/admin/campaigns",
            "createCampaign",
            "Creates a campaign (docs/apps.md).",
            "Admin",
            Admin,
            Some(schema::<admin::NewCampaign>),
            201,
            Json(schema::<Object>),
            post(admin::create_campaign),
        ),
        route(
            Method::GET,
            "/admin/campaigns/{id}",
            "getCampaign",
            "One campaign.",
            "Admin",
            Admin,
            None,
            200,
            Json(schema::<Object>),
            get(admin::campaign),
        ),
        route(
            Method::POST,
            "/admin/campaigns/{id}",
            "updateCampaign",
            "Changes a campaign.",
            "Admin",
            Admin,
            Some(schema::<Object>),
            200,
            Json(schema::<Object>),
            post(admin::update_campaign),
        ),
        route(
            Method::PUT,
            "/admin/campaigns/{id}",
            "replaceCampaign",
            "Changes a campaign.",
            "Admin",
            Admin,
            Some(schema::<Object>),
            200,
            Json(schema::<Object>),
            put(admin::update_campaign),
        ),
        route(
            Method::DELETE,
            "/admin/campaigns/{id}",
            "deleteCampaign",
            "Deletes a campaign.",
            "Admin",
            Admin,
            None,
            200,
            Json(schema::<Object>),
            delete(admin::delete_campaign),
        ),
        route(
            Method::GET,
            "/admin/campaigns/{id}/report",
            "getCampaignReport",
            "A campaign's report by variant.",
            "Admin",
            Admin,
            None,
            200,
            Json(schema::<Object>),
            get(admin::campaign_report),
        )
        .with_query(USAGE_FILTERS),
        route(
            Method::GET,
            "/",
            "root",
            "Redirects to the playground.",
            "Pages",
            Open,
            None,
            307,
            Redirect,
            get(ui::root),
        ),
        route(
            Method::GET,
            "/ui",
            "ui",
            "Redirects to the playground.",
            "Pages",
            Open,
            None,
            307,
            Redirect,
            get(ui::root),
        ),
        route(
            Method::GET,
            "/ui/",
            "playground",
            "The chat playground.",
            "Pages",
            Open,
            None,
            200,
            Other("text/html"),
            get(ui::playground),
        ),
        route(
            Method::GET,
            "/ui/dashboard",
            "dashboard",
            "The operator dashboard.",
            "Pages",
            Open,
            None,
            200,
            Other("text/html"),
            get(ui::dashboard),
        ),
        route(
            Method::GET,
            "/ui/{name}",
            "pageAsset",
            "A page's script, style sheet or icon.",
            "Pages",
            Open,
            None,
            200,
            Other("text/plain"),
            get(ui::asset),
        ),
        route(
            Method::GET,
            "/metrics",
            "metrics",
            "Prometheus metrics (OpenMetrics text).",
            "Operations",
            Open,
            None,
            200,
            Other("application/openmetrics-text"),
            get(models::metrics),
        ),
        route(
            Method::GET,
            "/healthz",
            "healthz",
            "Liveness.",
            "Operations",
            Open,
            None,
            200,
            Json(schema::<Object>),
            get(models::healthz),
        ),
        route(
            Method::GET,
            "/readyz",
            "readyz",
            "Readiness: 503 while models load or shutdown begins.",
            "Operations",
            Open,
            None,
            200,
            Json(schema::<Object>),
            get(models::readyz),
        ),
        route(
            Method::GET,
            "/openapi.json",
            "openapi",
            "This document.",
            "Operations",
            Open,
            None,
            200,
            Json(schema::<Object>),
            get(openapi_json),
        ),
    ]);
    t
}

async fn openapi_json() -> axum::Json<Value> {
    axum::Json(document())
}

/// The OpenAPI 3.1 document of every route.
pub fn document() -> Value {
    let settings = schemars::generate::SchemaSettings::draft2020_12().with(|s| {
        s.definitions_path = "/components/schemas".into();
    });
    let mut g = settings.into_generator();
    let error = g.subschema_for::<parlance_api::error::ErrorBody>();
    let mut paths = Map::new();
    for r in table() {
        // OpenAPI names a path parameter `{id}` whatever axum matches with it.
        let path = r.path.replace("{*", "{");
        let mut op = Map::new();
        op.insert("operationId".into(), json!(r.operation_id));
        op.insert("summary".into(), json!(r.summary));
        op.insert("tags".into(), json!([r.tag]));
        let mut params: Vec<Value> = path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        params.extend(r.query.iter().map(|(name, description)| {
            json!({"name": name, "in": "query", "required": false, "description": description,
                   "schema": {"type": "string"}})
        }));
        if !params.is_empty() {
            op.insert("parameters".into(), Value::Array(params));
        }
        if let Some(req) = r.request {
            op.insert(
                "requestBody".into(),
                json!({"required": true, "content": {"application/json": {"schema": req(&mut g)}}}),
            );
        }
        let content = match r.response {
            Body::Json(s) => json!({"application/json": {"schema": s(&mut g)}}),
            Body::JsonOrEvents(s, e) => json!({
                "application/json": {"schema": s(&mut g)},
                "text/event-stream": {"schema": {"type": "string",
                    "description": "Server-sent events; each `data:` line holds one JSON object of itemSchema, OpenAI's stream ends with `data: [DONE]`."},
                    "itemSchema": e(&mut g)},
            }),
            Body::Other(media) => json!({ media: {"schema": {"type": "string"}} }),
            Body::Redirect => Value::Null,
        };
        let mut ok = json!({"description": r.summary});
        if !content.is_null() {
            ok["content"] = content;
        }
        let mut responses = Map::new();
        responses.insert(r.status.to_string(), ok);
        if r.access != Access::Open {
            responses.insert(
                "default".into(),
                json!({"description": "An error, in the API's envelope.",
                       "content": {"application/json": {"schema": if r.access == Access::AnthropicKey { json!({"type": "object"}) } else { error.clone().to_value() }}}}),
            );
        }
        op.insert("responses".into(), Value::Object(responses));
        match r.access {
            Access::Open => {}
            Access::Key => {
                op.insert("security".into(), json!([{"apiKey": []}]));
            }
            Access::AnthropicKey => {
                op.insert(
                    "security".into(),
                    json!([{"apiKey": []}, {"anthropicKey": []}]),
                );
            }
            Access::Admin => {
                op.insert("security".into(), json!([{"adminToken": []}]));
            }
        }
        let entry = paths
            .entry(path)
            .or_insert_with(|| Value::Object(Map::new()));
        if let Some(o) = entry.as_object_mut() {
            o.insert(r.method.as_str().to_ascii_lowercase(), Value::Object(op));
        }
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "parlance",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "OpenAI's Chat Completions API and Anthropic's Messages API, with keys, credits, limits, projects, sessions, campaigns and usage.",
        },
        "paths": paths,
        "components": {
            "schemas": g.take_definitions(true),
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer", "description": "An API key."},
                "anthropicKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
                "adminToken": {"type": "http", "scheme": "bearer", "description": "The admin token."},
            },
        },
    })
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        reason = "test code"
    )]

    use super::*;

    /// Every `$ref` in a value.
    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    match (k.as_str(), x) {
                        ("$ref", Value::String(r)) => out.push(r.clone()),
                        _ => refs(x, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
            _ => {}
        }
    }

    #[test]
    fn every_route_is_documented_once_and_every_reference_resolves() {
        let doc = document();
        let table = table();
        let mut ids = std::collections::HashSet::new();
        for r in &table {
            assert!(
                ids.insert(r.operation_id.clone()),
                "{} twice",
                r.operation_id
            );
            let path = r.path.replace("{*", "{");
            let op = &doc["paths"][&path][r.method.as_str().to_ascii_lowercase()];
            assert_eq!(op["operationId"], r.operation_id.as_str(), "{path}");
        }
        let documented: usize = doc["paths"]
            .as_object()
            .unwrap()
            .values()
            .map(|p| p.as_object().unwrap().len())
            .sum();
        assert_eq!(documented, table.len());
        let mut all = Vec::new();
        refs(&doc, &mut all);
        assert!(all.len() > 20);
        for r in all {
            let name = r.strip_prefix("#/components/schemas/").unwrap();
            assert!(
                doc["components"]["schemas"][name].is_object(),
                "{r} does not resolve"
            );
        }
        // The chat request's schema is the parser's: a field it reads is a field it documents.
        let req = &doc["components"]["schemas"]["CreateChatCompletionRequest"]["properties"];
        for f in [
            "model",
            "messages",
            "tools",
            "response_format",
            "stream_options",
            "session_id",
        ] {
            assert!(!req[f].is_null(), "{f} missing");
        }
    }

    /// `docs/openapi.json` is the document the code makes; `PARLANCE_UPDATE_OPENAPI=1` rewrites
    /// it after a change to the routes or their types.
    #[test]
    fn the_checked_in_document_is_the_generated_one() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
        let generated = format!("{}\n", serde_json::to_string_pretty(&document()).unwrap());
        if std::env::var_os("PARLANCE_UPDATE_OPENAPI").is_some() {
            std::fs::write(&path, &generated).unwrap();
        }
        let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            checked_in == generated,
            "docs/openapi.json is out of date: run `PARLANCE_UPDATE_OPENAPI=1 cargo test -p parlance-server the_checked_in_document` and commit it"
        );
    }
}
