//! System-prompt templates: a project's (or campaign variant's) Jinja template rendered with
//! the request's `system_prompt_args`, strict about missing variables.

use minijinja::{Environment, ErrorKind, UndefinedBehavior};
use parlance_api::ApiError;
use serde_json::{Map, Value};

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    // Errors then carry where in the template they happened, which names the variable.
    env.set_debug(true);
    env
}

/// `name` or `name.attr`: what an undefined-variable error points at.
fn is_path(s: &str) -> bool {
    !s.is_empty()
        && s.split('.')
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
}

/// Checks that a template compiles (when a project or campaign is saved).
pub fn check(source: &str, param: &str) -> Result<(), ApiError> {
    let env = environment();
    env.template_from_str(source).map(|_| ()).map_err(|e| {
        ApiError::invalid(
            param,
            format!("The system-prompt template does not compile: {e}"),
        )
    })
}

/// Renders a template with its arguments. A variable the template needs and the arguments
/// lack is a 400 that names it.
pub fn render(source: &str, args: &Map<String, Value>) -> Result<String, ApiError> {
    let env = environment();
    let template = env.template_from_str(source).map_err(|e| {
        tracing::error!(error = %e, "a stored system-prompt template does not compile");
        ApiError::Internal
    })?;
    match template.render(args) {
        Ok(text) => Ok(text),
        Err(e) if e.kind() == ErrorKind::UndefinedError => {
            if let Some(name) = e
                .range()
                .and_then(|r| source.get(r))
                .map(str::trim)
                .filter(|n| is_path(n))
            {
                // The shortest part of `a.b.c` that the arguments lack.
                let parts: Vec<&str> = name.split('.').collect();
                let name = (1..=parts.len())
                    .map(|k| parts[..k].join("."))
                    .find(|p| lookup(args, p).is_none())
                    .unwrap_or_else(|| name.to_owned());
                return Err(ApiError::invalid(
                    "system_prompt_args",
                    format!("The system-prompt template cannot be rendered: missing variable `{name}`. Pass it in 'system_prompt_args'."),
                ));
            }
            let globals: Vec<String> = env.globals().map(|(k, _)| k.to_owned()).collect();
            let known = |name: &str| {
                let root = name.split('.').next().unwrap_or(name);
                globals.iter().any(|g| g == root)
            };
            let mut missing: Vec<String> = template
                .undeclared_variables(false)
                .into_iter()
                .filter(|v| !args.contains_key(v) && !known(v))
                .collect();
            if missing.is_empty() {
                // A top-level argument is there but lacks an attribute the template reads.
                missing = template
                    .undeclared_variables(true)
                    .into_iter()
                    .filter(|v| v.contains('.') && !known(v))
                    .filter(|v| lookup(args, v).is_none())
                    .collect();
            }
            missing.sort();
            let what = if missing.is_empty() {
                format!("a variable it uses is undefined ({e})")
            } else {
                format!(
                    "missing variable{} {}",
                    if missing.len() > 1 { "s" } else { "" },
                    missing
                        .iter()
                        .map(|m| format!("`{m}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            Err(ApiError::invalid(
                "system_prompt_args",
                format!("The system-prompt template cannot be rendered: {what}. Pass it in 'system_prompt_args'."),
            ))
        }
        Err(e) => Err(ApiError::invalid(
            "system_prompt_args",
            format!("The system-prompt template cannot be rendered with these 'system_prompt_args': {e}"),
        )),
    }
}

/// `a.b.c` in a JSON object.
fn lookup<'a>(args: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    let mut parts = path.split('.');
    let mut v = args.get(parts.next()?)?;
    for p in parts {
        v = v.get(p)?;
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]
    use super::*;
    use serde_json::json;

    fn args(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn renders_and_names_what_is_missing() {
        let t = "You help {{ customer }} of {{ company.name }}.{% if vip is defined %} VIP.{% endif %} Tone: {{ tone | default('warm') }}.";
        assert_eq!(
            render(
                t,
                &args(json!({"customer": "Ada", "company": {"name": "ACME"}}))
            )
            .unwrap(),
            "You help Ada of ACME. Tone: warm."
        );
        let e = render(t, &args(json!({"company": {"name": "ACME"}}))).unwrap_err();
        assert_eq!(e.param().as_deref(), Some("system_prompt_args"));
        assert!(e.to_string().contains("`customer`"), "{e}");
        let e = render("{{ who.name }}", &args(json!({}))).unwrap_err();
        assert!(e.to_string().contains("`who`"), "{e}");
        let e = render(t, &args(json!({"customer": "Ada", "company": {}}))).unwrap_err();
        assert!(e.to_string().contains("`company.name`"), "{e}");
        let e = render("{{ a }} {{ b }}", &args(json!({"a": 1}))).unwrap_err();
        assert!(e.to_string().contains("`b`"), "{e}");
        let e = render("{{ a ~ b }}", &args(json!({}))).unwrap_err();
        assert!(e.to_string().contains("`a`"), "{e}");
    }

    #[test]
    fn broken_templates_are_refused_when_saved() {
        assert!(check("Hello {{ name", "system_prompt").is_err());
        assert!(check("Hello {{ name }}", "system_prompt").is_ok());
    }
}
