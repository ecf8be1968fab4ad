//! The `parlance` binary: `serve`, `pull`, `keys`, `credits` and `bench`.

mod bench;
mod config;
mod manage;
mod pull;
mod serve;
mod telemetry;

use clap::{Parser, Subcommand};

/// parlance: a self-hostable LLM API platform speaking the OpenAI Chat Completions API.
#[derive(Debug, Parser)]
#[command(name = "parlance", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve the API (the default model when no other is configured).
    Serve(Box<serve::ServeArgs>),
    /// Fetch the default model (SmolLM2-135M-Instruct Q4_1) into the cache and verify it.
    Pull {
        /// Fetch again even if a verified copy is cached.
        #[arg(long)]
        force: bool,
    },
    /// Manage API keys (in the server's database).
    Keys {
        #[command(flatten)]
        db: manage::DbArgs,
        #[command(subcommand)]
        cmd: manage::KeysCmd,
    },
    /// Manage accounts' prepaid credits (in the server's database).
    Credits {
        #[command(flatten)]
        db: manage::DbArgs,
        #[command(subcommand)]
        cmd: manage::CreditsCmd,
    },
    /// Manage projects: models, system-prompt templates, defaults, sessions, tools.
    Projects {
        #[command(flatten)]
        db: manage::DbArgs,
        #[command(subcommand)]
        cmd: manage::ProjectsCmd,
    },
    /// Manage A/B campaigns and read their reports.
    Campaigns {
        #[command(flatten)]
        db: manage::DbArgs,
        #[command(subcommand)]
        cmd: manage::CampaignsCmd,
    },
    /// Load-test any OpenAI-compatible server and print a table.
    Bench(bench::BenchArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Serve(args) => serve::run(*args),
        Cmd::Pull { force } => pull::pull(force).map(|_| ()),
        Cmd::Keys { db, cmd } => manage::keys(&db, cmd),
        Cmd::Credits { db, cmd } => manage::credits(&db, cmd),
        Cmd::Projects { db, cmd } => manage::projects(&db, cmd),
        Cmd::Campaigns { db, cmd } => manage::campaigns(&db, cmd),
        Cmd::Bench(args) => bench::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
