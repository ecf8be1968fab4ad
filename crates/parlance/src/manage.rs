//! `parlance keys`, `credits`, `projects` and `campaigns`: the operator's commands, run
//! straight against the database the servers use (a revocation or an edit reaches every running
//! replica within a second).

use std::sync::Arc;

use anyhow::Context;
use parlance_platform::{Catalog, Keys, Platform, StaticKeys};
use parlance_store::{Limiter, Store};

use crate::config;

/// Where the database is.
#[derive(Debug, clap::Args)]
pub struct DbArgs {
    /// Database URL [default: the server's default SQLite file].
    #[arg(
        long,
        env = "PARLANCE_DATABASE_URL",
        hide_env_values = true,
        global = true
    )]
    database_url: Option<String>,
}

/// `parlance keys ...`
#[derive(Debug, clap::Subcommand)]
pub enum KeysCmd {
    /// Create a key for an account (created if it does not exist). The key is printed once.
    Create {
        /// Account name or id.
        #[arg(long)]
        account: String,
        /// A label for the key.
        #[arg(long, default_value = "")]
        name: String,
        /// Requests per minute [default: unlimited].
        #[arg(long)]
        rpm: Option<i64>,
        /// Tokens per minute [default: unlimited].
        #[arg(long)]
        tpm: Option<i64>,
    },
    /// List keys (never their secrets).
    List {
        /// Only this account (name or id).
        #[arg(long)]
        account: Option<String>,
    },
    /// Revoke a key by id.
    Revoke {
        /// `key_…`.
        id: String,
    },
}

/// `parlance credits ...`
#[derive(Debug, clap::Subcommand)]
pub enum CreditsCmd {
    /// Add credit to an account, in micro-units (1 currency unit = 1000000).
    Add {
        /// Account name or id.
        account: String,
        /// Micro-units, a positive integer.
        amount: i64,
        /// A note for the ledger.
        #[arg(long)]
        note: Option<String>,
    },
    /// Show one account's balance, or every account's.
    Show {
        /// Account name or id.
        account: Option<String>,
    },
}

/// `parlance projects ...`
#[derive(Debug, clap::Subcommand)]
pub enum ProjectsCmd {
    /// Create a project. Its spec comes from the flags, or whole from `--spec` (JSON).
    Create {
        /// Unique name (what `model: "{project}"` names).
        name: String,
        /// Only this account's keys may use it (name or id) [default: every account].
        #[arg(long)]
        account: Option<String>,
        /// The model `{project}` alone means.
        #[arg(long, required_unless_present = "spec")]
        default_model: Option<String>,
        /// Another model the project may use (repeatable).
        #[arg(long = "model")]
        models: Vec<String>,
        /// System-prompt template (Jinja), or `@FILE` to read it from a file.
        #[arg(long)]
        system_prompt: Option<String>,
        /// Default parameters, as a JSON object (`{"temperature": 0.2}`).
        #[arg(long)]
        params: Option<String>,
        /// Start a server-side session for requests without `session_id`.
        #[arg(long)]
        sessions: bool,
        /// The project's tools: a JSON array, or `@FILE`.
        #[arg(long)]
        tools: Option<String>,
        /// The whole spec as JSON, or `@FILE`.
        #[arg(long, conflicts_with_all = ["default_model", "models", "system_prompt", "params", "sessions", "tools"])]
        spec: Option<String>,
    },
    /// List projects.
    List,
    /// Show one project's spec.
    Show {
        /// Name or id.
        name: String,
    },
    /// Replace a project's spec with JSON (or `@FILE`).
    Update {
        /// Name or id.
        name: String,
        /// The new spec.
        #[arg(long)]
        spec: String,
    },
    /// Delete a project (its sessions and usage records stay).
    Delete {
        /// Name or id.
        name: String,
    },
}

/// `parlance campaigns ...`
#[derive(Debug, clap::Subcommand)]
pub enum CampaignsCmd {
    /// Create a campaign from its spec (`{"variants": [...], "sticky": "user"}`, JSON or `@FILE`).
    Create {
        /// A name for people.
        name: String,
        /// The key requests name it by in `ab_campaign` (the id works too).
        #[arg(long)]
        key: Option<String>,
        /// Only this account's keys may use it.
        #[arg(long)]
        account: Option<String>,
        /// The project its variants' models belong to.
        #[arg(long)]
        project: Option<String>,
        /// The spec.
        #[arg(long)]
        spec: String,
    },
    /// List campaigns.
    List,
    /// Compare a campaign's variants: traffic, tokens, cost, latency and feedback.
    Report {
        /// Id or key.
        campaign: String,
    },
    /// Delete a campaign (its usage records keep its id).
    Delete {
        /// Id or key.
        campaign: String,
    },
}

/// A JSON argument, given inline or as `@FILE`.
fn json_arg(what: &str, v: &str) -> anyhow::Result<serde_json::Value> {
    let text = match v.strip_prefix('@') {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?
        }
        None => v.to_owned(),
    };
    serde_json::from_str(&text).with_context(|| format!("{what} is not valid JSON"))
}

fn text_arg(v: &str) -> anyhow::Result<String> {
    match v.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("cannot read {path}")),
        None => Ok(v.to_owned()),
    }
}

fn pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

/// Runs `parlance projects ...`.
#[expect(
    clippy::print_stdout,
    reason = "a command-line tool prints its results"
)]
pub fn projects(db: &DbArgs, cmd: ProjectsCmd) -> anyhow::Result<()> {
    with_platform(db, |p| async move {
        match cmd {
            ProjectsCmd::Create {
                name,
                account,
                default_model,
                models,
                system_prompt,
                params,
                sessions,
                tools,
                spec,
            } => {
                let spec = match spec {
                    Some(s) => json_arg("--spec", &s)?,
                    None => {
                        let mut o = serde_json::Map::new();
                        o.insert("default_model".into(), default_model.into());
                        o.insert("models".into(), models.into());
                        if let Some(t) = system_prompt {
                            o.insert("system_prompt".into(), text_arg(&t)?.into());
                        }
                        if let Some(v) = params {
                            o.insert("params".into(), json_arg("--params", &v)?);
                        }
                        o.insert("sessions".into(), sessions.into());
                        if let Some(v) = tools {
                            o.insert("tools".into(), json_arg("--tools", &v)?);
                        }
                        serde_json::Value::Object(o)
                    }
                };
                let v = p
                    .create_project(&name, account.as_deref(), &spec)
                    .await
                    .map_err(api)?;
                eprintln!(
                    "created project {name} ({})",
                    v["id"].as_str().unwrap_or("")
                );
                println!("{}", pretty(&v));
            }
            ProjectsCmd::List => {
                let all = p.projects().await.map_err(api)?;
                println!(
                    "{:<38} {:<24} {:<24} ACCOUNT",
                    "ID", "NAME", "DEFAULT MODEL"
                );
                for x in all["data"].as_array().into_iter().flatten() {
                    println!(
                        "{:<38} {:<24} {:<24} {}",
                        x["id"].as_str().unwrap_or(""),
                        x["name"].as_str().unwrap_or(""),
                        x["spec"]["default_model"].as_str().unwrap_or(""),
                        x["account_id"].as_str().unwrap_or("-")
                    );
                }
            }
            ProjectsCmd::Show { name } => {
                println!("{}", pretty(&p.project(&name).await.map_err(api)?))
            }
            ProjectsCmd::Update { name, spec } => {
                let spec = json_arg("--spec", &spec)?;
                println!(
                    "{}",
                    pretty(&p.update_project(&name, &spec).await.map_err(api)?)
                );
            }
            ProjectsCmd::Delete { name } => {
                p.delete_project(&name).await.map_err(api)?;
                println!("deleted project {name}");
            }
        }
        Ok(())
    })
}

/// Runs `parlance campaigns ...`.
#[expect(
    clippy::print_stdout,
    reason = "a command-line tool prints its results"
)]
pub fn campaigns(db: &DbArgs, cmd: CampaignsCmd) -> anyhow::Result<()> {
    with_platform(db, |p| async move {
        match cmd {
            CampaignsCmd::Create {
                name,
                key,
                account,
                project,
                spec,
            } => {
                let spec = json_arg("--spec", &spec)?;
                let v = p
                    .create_campaign(
                        key.as_deref(),
                        &name,
                        account.as_deref(),
                        project.as_deref(),
                        &spec,
                    )
                    .await
                    .map_err(api)?;
                println!("{}", pretty(&v));
            }
            CampaignsCmd::List => {
                let all = p.campaigns().await.map_err(api)?;
                println!("{:<38} {:<24} {:<32} VARIANTS", "ID", "KEY", "NAME");
                for c in all["data"].as_array().into_iter().flatten() {
                    let variants: Vec<String> = c["spec"]["variants"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|v| format!("{}:{}", v["name"].as_str().unwrap_or(""), v["weight"]))
                        .collect();
                    println!(
                        "{:<38} {:<24} {:<32} {}",
                        c["id"].as_str().unwrap_or(""),
                        c["key"].as_str().unwrap_or("-"),
                        c["name"].as_str().unwrap_or(""),
                        variants.join(" ")
                    );
                }
            }
            CampaignsCmd::Report { campaign } => {
                let r = p
                    .campaign_report(&campaign, &Default::default())
                    .await
                    .map_err(api)?;
                println!(
                    "{:<16} {:>6} {:>9} {:>7} {:>12} {:>12} {:>14} {:>9} {:>9} {:>8} {:>9}",
                    "VARIANT",
                    "WEIGHT",
                    "REQUESTS",
                    "ERRORS",
                    "PROMPT TOK",
                    "COMPL TOK",
                    "COST",
                    "LAT MS",
                    "TTFT MS",
                    "FEEDBACK",
                    "SCORE"
                );
                for v in r["variants"].as_array().into_iter().flatten() {
                    let num = |k: &str| v[k].as_i64().map_or("-".to_owned(), |n| n.to_string());
                    println!(
                        "{:<16} {:>6} {:>9} {:>7} {:>12} {:>12} {:>14} {:>9} {:>9} {:>8} {:>9}",
                        v["variant"].as_str().unwrap_or("-"),
                        num("weight"),
                        num("requests"),
                        num("errors"),
                        num("prompt_tokens"),
                        num("completion_tokens"),
                        money(v["cost"].as_i64().unwrap_or(0)),
                        num("avg_latency_ms"),
                        num("avg_ttft_ms"),
                        num("feedback"),
                        v["avg_score"]
                            .as_f64()
                            .map_or("-".to_owned(), |s| format!("{s:.3}"))
                    );
                }
            }
            CampaignsCmd::Delete { campaign } => {
                p.delete_campaign(&campaign).await.map_err(api)?;
                println!("deleted campaign {campaign}");
            }
        }
        Ok(())
    })
}

fn money(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let m = micros.unsigned_abs();
    format!("{sign}{}.{:06}", m / 1_000_000, m % 1_000_000)
}

fn with_platform<F, Fut>(db: &DbArgs, f: F) -> anyhow::Result<()>
where
    F: FnOnce(Platform) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let url = config::database_url(db.database_url.as_deref())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let store = Store::open(&url)
            .await
            .with_context(|| format!("cannot open the database {}", crate::serve::redact(&url)))?;
        let keys = Keys::new(StaticKeys::default(), store.clone());
        let platform = Platform::new(Catalog::default(), Arc::new(keys), store, Limiter::local());
        let out = f(platform.clone()).await;
        platform.shutdown(std::time::Duration::from_secs(5)).await;
        out
    })
}

fn api(e: parlance_api::ApiError) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

/// Runs `parlance keys ...`.
#[expect(
    clippy::print_stdout,
    reason = "a command-line tool prints its results"
)]
pub fn keys(db: &DbArgs, cmd: KeysCmd) -> anyhow::Result<()> {
    with_platform(db, |p| async move {
        match cmd {
            KeysCmd::Create {
                account,
                name,
                rpm,
                tpm,
            } => {
                if p.account(&account).await.is_err() {
                    p.create_account(&account).await.map_err(api)?;
                    eprintln!("created account {account:?}");
                }
                let k = p.create_key(&account, &name, rpm, tpm).await.map_err(api)?;
                eprintln!(
                    "key {} for account {} (shown once; keep it safe):",
                    k.record.id, k.record.account_id
                );
                println!("{}", k.key);
            }
            KeysCmd::List { account } => {
                println!(
                    "{:<38} {:<14} {:<24} {:>8} {:>10} STATUS",
                    "ID", "PREFIX", "NAME", "RPM", "TPM"
                );
                for k in p.keys(account.as_deref()).await.map_err(api)? {
                    let lim = |v: Option<i64>| v.map_or("-".to_owned(), |n| n.to_string());
                    println!(
                        "{:<38} {:<14} {:<24} {:>8} {:>10} {}",
                        k.id,
                        k.prefix,
                        k.name,
                        lim(k.rpm),
                        lim(k.tpm),
                        if k.revoked_at.is_some() {
                            "revoked"
                        } else {
                            "active"
                        }
                    );
                }
            }
            KeysCmd::Revoke { id } => {
                p.revoke_key(&id).await.map_err(api)?;
                println!("revoked {id}");
            }
        }
        Ok(())
    })
}

/// Runs `parlance credits ...`.
#[expect(
    clippy::print_stdout,
    reason = "a command-line tool prints its results"
)]
pub fn credits(db: &DbArgs, cmd: CreditsCmd) -> anyhow::Result<()> {
    with_platform(db, |p| async move {
        let accounts = match cmd {
            CreditsCmd::Add {
                account,
                amount,
                note,
            } => vec![p
                .add_credits(&account, amount, note.as_deref())
                .await
                .map_err(api)?],
            CreditsCmd::Show { account: Some(a) } => vec![p.account(&a).await.map_err(api)?],
            CreditsCmd::Show { account: None } => p.accounts().await.map_err(api)?,
        };
        println!(
            "{:<38} {:<24} {:>18} {:>18}",
            "ACCOUNT", "NAME", "BALANCE", "RESERVED"
        );
        for a in accounts {
            println!(
                "{:<38} {:<24} {:>18} {:>18}",
                a.id,
                a.name,
                money(a.balance),
                money(a.reserved)
            );
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn money_reads_as_decimal() {
        assert_eq!(super::money(1_500_000), "1.500000");
        assert_eq!(super::money(7), "0.000007");
        assert_eq!(super::money(-2_000_001), "-2.000001");
    }
}
