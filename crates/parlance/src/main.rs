//! The `parlance` binary: `serve`, `pull` and `bench`.

mod bench;
mod config;
mod pull;
mod serve;

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
    /// Load-test any OpenAI-compatible server and print a table.
    Bench(bench::BenchArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Serve(args) => serve::run(*args),
        Cmd::Pull { force } => pull::pull(force).map(|_| ()),
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
