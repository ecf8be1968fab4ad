//! `parlance keys` and `parlance credits`: the operator's commands, run straight against the
//! database the servers use (a revocation reaches every running replica within a second).

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
