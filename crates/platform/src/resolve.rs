//! From the request as sent to the request a provider runs: the campaign variant, the project
//! and its model, default parameters, the rendered system prompt, the session's history, and
//! the project's tools switched as asked.

use std::sync::Arc;

use parlance_api::chat::ToolChoice;
use parlance_api::{ApiError, ChatRequest, Message, Role};

use crate::projects::{as_function, Campaign, Project, ProjectTool, Sticky};
use crate::{Platform, Principal};

/// What the application layer decided about a request.
#[derive(Debug, Default)]
pub(crate) struct AppContext {
    pub project: Option<Arc<Project>>,
    pub campaign: Option<(Arc<Campaign>, usize)>,
    /// The session in use, and whether this request creates it.
    pub session: Option<(String, bool)>,
    /// The caller's new messages (what a session records for this turn).
    pub turn: Vec<Message>,
    /// Tools parlance calls itself, offered in this request.
    pub server_tools: Vec<ProjectTool>,
    /// The model named in the response, when a project or campaign chose it.
    pub response_model: Option<String>,
    pub max_steps: u32,
}

impl AppContext {
    /// Whether the request needs the conversation driver (tool loop, session or storage).
    pub fn needs_driver(&self, request: &ChatRequest) -> bool {
        !self.server_tools.is_empty() || self.session.is_some() || request.app.store
    }

    pub fn project_id(&self) -> Option<String> {
        self.project.as_ref().map(|p| p.id.clone())
    }

    pub fn campaign_id(&self) -> Option<String> {
        self.campaign.as_ref().map(|(c, _)| c.id.clone())
    }

    pub fn variant(&self) -> Option<String> {
        self.campaign
            .as_ref()
            .and_then(|(c, i)| c.spec.variants.get(*i))
            .map(|v| v.name.clone())
    }
}

fn visible(owner: &Option<String>, principal: &Principal) -> bool {
    owner.is_none() || owner == &principal.account_id
}

fn campaign_missing(name: &str) -> ApiError {
    ApiError::Missing {
        message: format!("No campaign with the id or key '{name}'."),
        param: "ab_campaign",
        code: "campaign_not_found",
    }
}

/// A session that does not exist or is not the caller's (the two look the same).
pub(crate) fn session_missing(id: &str) -> ApiError {
    ApiError::Missing {
        message: format!("No session '{id}'."),
        param: "session_id",
        code: "session_not_found",
    }
}

impl Platform {
    /// Rewrites `request` in place into what the provider runs, and says what was decided.
    pub(crate) async fn resolve_app(
        &self,
        principal: &Principal,
        request: &mut ChatRequest,
    ) -> Result<AppContext, ApiError> {
        let mut ctx = AppContext {
            max_steps: 8,
            ..AppContext::default()
        };
        let app = request.app.clone();

        // The campaign variant, which may choose the model.
        let mut name = request.model.clone();
        if let Some(c) = &app.ab_campaign {
            let campaign = self
                .apps
                .campaign(c)
                .await?
                .filter(|c| visible(&c.account_id, principal))
                .ok_or_else(|| campaign_missing(c))?;
            let key = match campaign.spec.sticky {
                Sticky::User => request.user.as_deref().or(app.session_id.as_deref()),
                Sticky::Session => app.session_id.as_deref().or(request.user.as_deref()),
                Sticky::None => None,
            };
            let i = campaign.spec.pick(&campaign.id, key);
            if let Some(m) = campaign.spec.variants.get(i).and_then(|v| v.model.clone()) {
                name = m;
            }
            ctx.campaign = Some((campaign, i));
        }

        // The project, and the catalog model it resolves to.
        let (project, model) = self.resolve_model(principal, &name).await?;
        let project = match (
            project,
            ctx.campaign
                .as_ref()
                .and_then(|(c, _)| c.project_id.clone()),
        ) {
            (Some(p), Some(cp)) if p.id != cp => {
                return Err(ApiError::invalid(
                    "ab_campaign",
                    format!("The campaign belongs to another project than '{}'.", p.name),
                ))
            }
            (Some(p), _) => Some(p),
            (None, Some(cp)) => {
                let p = self
                    .apps
                    .project(&cp)
                    .await?
                    .filter(|p| visible(&p.account_id, principal))
                    .ok_or_else(|| campaign_missing(app.ab_campaign.as_deref().unwrap_or("")))?;
                if !p.spec.allows(&model) {
                    return Err(not_allowed(&p, &model));
                }
                Some(p)
            }
            (None, None) => None,
        };
        if project.is_some() || ctx.campaign.is_some() {
            ctx.response_model = Some(model.clone());
        }
        request.model = model;

        // Defaults: the variant's, then the project's, for what the caller left out.
        if let Some(d) = ctx
            .campaign
            .as_ref()
            .and_then(|(c, i)| c.defaults.get(*i).cloned().flatten())
        {
            request.apply_defaults(&d);
        }
        if let Some(d) = project.as_ref().and_then(|p| p.defaults.as_ref()) {
            request.apply_defaults(d);
        }

        // The system prompt.
        let template = ctx
            .campaign
            .as_ref()
            .and_then(|(c, i)| c.spec.variants.get(*i))
            .and_then(|v| v.system_prompt.clone())
            .or_else(|| project.as_ref().and_then(|p| p.spec.system_prompt.clone()));
        let system = match (&template, &app.system_prompt_args) {
            (None, Some(_)) => {
                return Err(ApiError::invalid(
                    "system_prompt_args",
                    "'system_prompt_args' was given, but no system-prompt template applies to this request (use a project or campaign that has one).",
                ))
            }
            (Some(t), args) => Some(crate::prompt::render(t, &args.clone().unwrap_or_default())?),
            (None, None) => None,
        };

        // The session.
        ctx.turn = request
            .messages
            .iter()
            .filter(|m| !matches!(m.role, Role::System | Role::Developer))
            .cloned()
            .collect();
        let mut history = Vec::new();
        if let Some(id) = &app.session_id {
            let s = self
                .store
                .session(id)
                .await
                .map_err(crate::unavailable)?
                .filter(|s| s.account_id == principal.account_id)
                .ok_or_else(|| session_missing(id))?;
            if s.project_id.is_some() && s.project_id != project.as_ref().map(|p| p.id.clone()) {
                return Err(ApiError::invalid(
                    "session_id",
                    "This session belongs to another project: name that project in 'model'.",
                ));
            }
            for (i, m) in self
                .store
                .session_messages(id)
                .await
                .map_err(crate::unavailable)?
                .iter()
                .enumerate()
            {
                history.push(parlance_api::chat::parse_message(i, &m.message).map_err(|e| {
                    tracing::error!(session = %id, error = %e, "a stored session message cannot be read");
                    ApiError::Internal
                })?);
            }
            ctx.session = Some((id.clone(), false));
        } else if project.as_ref().is_some_and(|p| p.spec.sessions) {
            ctx.session = Some((uuid::Uuid::new_v4().hyphenated().to_string(), true));
        }
        if ctx.session.is_some() && request.n > 1 {
            return Err(ApiError::invalid(
                "n",
                "A session continues with one answer: 'n' must be 1 with a session.",
            ));
        }
        if system.is_some() || !history.is_empty() {
            let mut messages = Vec::with_capacity(history.len() + request.messages.len() + 1);
            if let Some(text) = system {
                messages.push(Message::new(Role::System, Some(text)));
            }
            messages.extend(history);
            messages.append(&mut request.messages);
            request.messages = messages;
        }

        // The project's tools, switched as the request asks.
        self.project_tools(&mut ctx, project.as_ref(), request)?;
        request.check_tool_choice()?;
        if let Some(p) = &project {
            ctx.max_steps = p.spec.max_tool_steps;
        }
        ctx.project = project;
        Ok(ctx)
    }

    /// `name` as a catalog model, `{project}/{model}` or `{project}`.
    async fn resolve_model(
        &self,
        principal: &Principal,
        name: &str,
    ) -> Result<(Option<Arc<Project>>, String), ApiError> {
        if let Ok(e) = self.catalog.resolve(name) {
            return Ok((None, e.name.clone()));
        }
        let (pname, model) = match name.split_once('/') {
            Some((p, m)) => (p, Some(m)),
            None => (name, None),
        };
        let Some(project) = self
            .apps
            .project(pname)
            .await?
            .filter(|p| visible(&p.account_id, principal))
        else {
            return Err(ApiError::ModelNotFound(name.to_owned()));
        };
        let model = match model {
            None => project.spec.default_model.clone(),
            Some(m) => {
                let e = self.catalog.resolve(m)?;
                if !project.spec.allows(&e.name) {
                    return Err(not_allowed(&project, &e.name));
                }
                e.name.clone()
            }
        };
        Ok((Some(project), model))
    }

    fn project_tools(
        &self,
        ctx: &mut AppContext,
        project: Option<&Arc<Project>>,
        request: &mut ChatRequest,
    ) -> Result<(), ApiError> {
        let switches = &request.app.tool_switches;
        let Some(project) = project else {
            if let Some((id, _)) = switches.first() {
                return Err(ApiError::invalid(
                    "tools",
                    format!(
                        "'tools' switches the project tool '{id}', but 'model' names no project."
                    ),
                ));
            }
            return Ok(());
        };
        for (id, _) in switches {
            if !project.spec.tools.iter().any(|t| &t.id == id) {
                return Err(ApiError::invalid(
                    "tools",
                    format!("The project '{}' has no tool '{id}'.", project.name),
                ));
            }
        }
        if request.app.use_tools == Some(false) {
            return Ok(());
        }
        let had_tools = !request.tools.is_empty();
        for t in &project.spec.tools {
            let on = switches
                .iter()
                .rev()
                .find(|(id, _)| id == &t.id)
                .map_or(t.enabled, |(_, on)| *on);
            if !on {
                continue;
            }
            if request.tools.iter().any(|f| f.name == t.id) {
                return Err(ApiError::invalid(
                    "tools",
                    format!("The function '{}' is also a tool of the project.", t.id),
                ));
            }
            request.tools.push(as_function(t));
            if t.http.is_some() {
                ctx.server_tools.push(t.clone());
            }
        }
        if !had_tools && !request.tools.is_empty() && !request.app.tool_choice_given {
            request.tool_choice = ToolChoice::Auto;
        }
        if !ctx.server_tools.is_empty() && request.n > 1 {
            return Err(ApiError::invalid(
                "n",
                "This project has tools parlance calls itself; they run with 'n' = 1.",
            ));
        }
        Ok(())
    }
}

fn not_allowed(p: &Project, model: &str) -> ApiError {
    ApiError::invalid(
        "model",
        format!(
            "The project '{}' does not allow the model `{model}` (it allows: {}).",
            p.name,
            std::iter::once(&p.spec.default_model)
                .chain(&p.spec.models)
                .map(|m| format!("`{m}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )
}
