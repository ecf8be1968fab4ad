//! The database: connect (SQLite or PostgreSQL by URL), migrate, and the statements for
//! accounts, keys, reservations, settlement and the ledger.

use std::time::Duration;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::AnyPool;
use sqlx::{Executor, Row};

use crate::{new_id, now_ms};

/// Which database is behind the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// An embedded SQLite file (or memory).
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

/// What can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed or could not be reached.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Something that must be unique already exists.
    #[error("{0} already exists")]
    Conflict(String),
    /// The named thing does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// An argument is out of range.
    #[error("{0}")]
    Invalid(String),
    /// The URL names no supported database.
    #[error("unsupported database URL {0:?}: use sqlite://PATH or postgres://…")]
    UnsupportedUrl(String),
}

/// An account: who pays.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Account {
    /// `acct_…`.
    pub id: String,
    /// Unique, chosen by the operator.
    pub name: String,
    /// Credit available now, in micro-units (reservations already taken out).
    pub balance: i64,
    /// Credit held by requests in flight, in micro-units.
    pub reserved: i64,
    /// Epoch milliseconds.
    pub created_at: i64,
}

/// A managed API key, without its secret.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeyRecord {
    /// `key_…`.
    pub id: String,
    /// The account it spends from.
    pub account_id: String,
    /// A label chosen by the operator.
    pub name: String,
    /// The first characters of the secret, to recognise it.
    pub prefix: String,
    /// Requests per minute, if limited.
    pub rpm: Option<i64>,
    /// Tokens per minute, if limited.
    pub tpm: Option<i64>,
    /// Epoch milliseconds.
    pub created_at: i64,
    /// Epoch milliseconds, once revoked.
    pub revoked_at: Option<i64>,
}

/// The outcome of a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserve {
    /// Held.
    Reserved,
    /// The balance cannot cover it.
    Insufficient {
        /// The balance available.
        balance: i64,
    },
}

/// One request's reservation turned into a charge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    /// The request (the ledger entry names it).
    pub request_id: String,
    /// The account.
    pub account_id: String,
    /// What was held for it.
    pub reserved: i64,
    /// What it cost (at most `reserved`).
    pub charged: i64,
}

/// The migrations, in order; each runs once, in a transaction, on either database.
const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        include_str!("../migrations/0001_accounts_keys_ledger_usage.sql"),
    ),
    (2, include_str!("../migrations/0002_replica_holds.sql")),
    (
        3,
        include_str!("../migrations/0003_projects_sessions_campaigns.sql"),
    ),
    (4, include_str!("../migrations/0004_filter_hits.sql")),
];

/// The database behind the platform.
#[derive(Debug, Clone)]
pub struct Store {
    pub(crate) pool: AnyPool,
    backend: Backend,
}

fn key_row(r: &AnyRow) -> Result<KeyRecord, sqlx::Error> {
    Ok(KeyRecord {
        id: r.try_get("id")?,
        account_id: r.try_get("account_id")?,
        name: r.try_get("name")?,
        prefix: r.try_get("prefix")?,
        rpm: r.try_get("rpm")?,
        tpm: r.try_get("tpm")?,
        created_at: r.try_get("created_at")?,
        revoked_at: r.try_get("revoked_at")?,
    })
}

fn account_row(r: &AnyRow) -> Result<Account, sqlx::Error> {
    Ok(Account {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        balance: r.try_get("balance")?,
        reserved: r.try_get("reserved")?,
        created_at: r.try_get("created_at")?,
    })
}

/// Copies the SQLite write-ahead log into the database file every second, on a connection of
/// its own (a passive checkpoint never blocks the writer), until the store is closed.
async fn checkpoints(url: &str, main: AnyPool) -> Result<(), StoreError> {
    let pool = AnyPoolOptions::new()
        .max_connections(1)
        .after_connect(|conn, _| {
            Box::pin(async move {
                conn.execute("PRAGMA busy_timeout = 5000;").await?;
                Ok(())
            })
        })
        .connect(url)
        .await?;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        while !main.is_closed() {
            tick.tick().await;
            if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                .execute(&pool)
                .await
            {
                tracing::warn!(error = %e, "SQLite checkpoint failed");
            }
        }
    });
    Ok(())
}

pub(crate) fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

const ACCOUNT_COLUMNS: &str = "a.id, a.name, a.balance, a.reserved, a.created_at";

impl Store {
    /// Connects to `sqlite://PATH` (created if missing), `sqlite::memory:`, or
    /// `postgres://…`, and brings the schema up to date.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            return Err(StoreError::UnsupportedUrl(url.to_owned()));
        };
        let url = match backend {
            // Create the file on first start.
            Backend::Sqlite if !url.contains("memory") && !url.contains("mode=") => {
                if url.contains('?') {
                    format!("{url}&mode=rwc")
                } else {
                    format!("{url}?mode=rwc")
                }
            }
            _ => url.to_owned(),
        };
        let options = match backend {
            // One connection: SQLite takes one writer at a time anyway, and a single connection
            // never waits in SQLite's busy handler (nor splits an in-memory database in two).
            Backend::Sqlite => AnyPoolOptions::new()
                .max_connections(1)
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        // Checkpoints (which wait for the disk) run on a connection of their
                        // own, so that no request waits behind one.
                        conn.execute(
                            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                             PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000; \
                             PRAGMA wal_autocheckpoint = 0;",
                        )
                        .await?;
                        Ok(())
                    })
                }),
            Backend::Postgres => AnyPoolOptions::new().max_connections(16),
        };
        let pool = options
            .acquire_timeout(Duration::from_secs(10))
            .connect(&url)
            .await?;
        let store = Store { pool, backend };
        store.migrate().await?;
        if backend == Backend::Sqlite && !url.contains("memory") {
            checkpoints(&url, store.pool.clone()).await?;
        }
        Ok(store)
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Applies the migrations not applied yet. Safe when several replicas start at once: each
    /// migration's version row is inserted in the migration's own transaction, so a second
    /// replica waits for the first and then skips it.
    async fn migrate(&self) -> Result<(), StoreError> {
        let create = "CREATE TABLE IF NOT EXISTS parlance_migrations (\
                      version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)";
        if let Err(e) = sqlx::query(create).execute(&self.pool).await {
            // Two replicas creating the table at the same moment: the loser retries once.
            tokio::time::sleep(Duration::from_millis(200)).await;
            sqlx::query(create)
                .execute(&self.pool)
                .await
                .map_err(|_| StoreError::Database(e))?;
        }
        for (version, sql) in MIGRATIONS {
            let mut tx = self.pool.begin().await?;
            let claimed = sqlx::query(
                "INSERT INTO parlance_migrations (version, applied_at) VALUES ($1, $2) \
                 ON CONFLICT (version) DO NOTHING",
            )
            .bind(*version)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
            if claimed.rows_affected() == 0 {
                tx.rollback().await?;
                continue;
            }
            tracing::info!(version, "applying database migration");
            tx.execute(*sql).await?;
            tx.commit().await?;
        }
        Ok(())
    }

    /// A new account with a zero balance.
    pub async fn create_account(&self, name: &str) -> Result<Account, StoreError> {
        let name = name.trim();
        if name.is_empty() || name.len() > 128 {
            return Err(StoreError::Invalid(
                "an account name is 1 to 128 characters".into(),
            ));
        }
        let id = new_id("acct");
        let now = now_ms();
        match sqlx::query(
            "INSERT INTO accounts (id, name, balance, created_at) VALUES ($1, $2, 0, $3)",
        )
        .bind(&id)
        .bind(name)
        .bind(now)
        .execute(&self.pool)
        .await
        {
            Ok(_) => Ok(Account {
                id,
                name: name.to_owned(),
                balance: 0,
                reserved: 0,
                created_at: now,
            }),
            Err(e) if is_unique_violation(&e) => {
                Err(StoreError::Conflict(format!("account {name:?}")))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The account with this id or name.
    pub async fn account(&self, id_or_name: &str) -> Result<Option<Account>, StoreError> {
        let sql =
            format!("SELECT {ACCOUNT_COLUMNS} FROM accounts a WHERE a.id = $1 OR a.name = $1");
        let row = sqlx::query(&sql)
            .bind(id_or_name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(account_row).transpose()?)
    }

    /// Every account, oldest first.
    pub async fn accounts(&self) -> Result<Vec<Account>, StoreError> {
        let sql = format!("SELECT {ACCOUNT_COLUMNS} FROM accounts a ORDER BY a.created_at, a.id");
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
        Ok(rows.iter().map(account_row).collect::<Result<_, _>>()?)
    }

    /// Adds credit (a positive amount of micro-units) to an account, with a ledger entry.
    pub async fn add_credits(
        &self,
        account_id: &str,
        amount: i64,
        note: Option<&str>,
    ) -> Result<Account, StoreError> {
        if amount <= 0 {
            return Err(StoreError::Invalid(
                "the amount must be a positive number of micro-units".into(),
            ));
        }
        let mut tx = self.pool.begin().await?;
        let updated = sqlx::query("UPDATE accounts SET balance = balance + $1 WHERE id = $2")
            .bind(amount)
            .bind(account_id)
            .execute(&mut *tx)
            .await?;
        if updated.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("account {account_id:?}")));
        }
        sqlx::query(
            "INSERT INTO ledger (id, account_id, amount, kind, request_id, note, created_at) \
             VALUES ($1, $2, $3, 'credit', NULL, $4, $5)",
        )
        .bind(new_id("led"))
        .bind(account_id)
        .bind(amount)
        .bind(note)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.account(account_id)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("account {account_id:?}")))
    }

    /// Stores a new key (its secret only as a hash).
    pub async fn insert_key(&self, key: &KeyRecord, secret_hash: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO api_keys (id, account_id, name, secret_hash, prefix, rpm, tpm, created_at, revoked_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, NULL)",
        )
        .bind(&key.id)
        .bind(&key.account_id)
        .bind(&key.name)
        .bind(secret_hash)
        .bind(&key.prefix)
        .bind(key.rpm)
        .bind(key.tpm)
        .bind(key.created_at)
        .execute(&self.pool)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::Conflict("a key with this secret".into())
            } else {
                e.into()
            }
        })?;
        Ok(())
    }

    /// The key whose secret hashes to `secret_hash` (revoked ones included).
    pub async fn key_by_hash(&self, secret_hash: &str) -> Result<Option<KeyRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT id, account_id, name, prefix, rpm, tpm, created_at, revoked_at \
             FROM api_keys WHERE secret_hash = $1",
        )
        .bind(secret_hash)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(key_row).transpose()?)
    }

    /// Keys, of one account or all, oldest first.
    pub async fn keys(&self, account_id: Option<&str>) -> Result<Vec<KeyRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, account_id, name, prefix, rpm, tpm, created_at, revoked_at FROM api_keys \
             WHERE $1 IS NULL OR account_id = $1 ORDER BY created_at, id",
        )
        .bind(account_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(key_row).collect::<Result<_, _>>()?)
    }

    /// Whether any managed key was ever created (revoked ones count: revoking the last key
    /// must not open the server).
    pub async fn any_key(&self) -> Result<bool, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM api_keys")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<i64, _>("n")? > 0)
    }

    /// Revokes a key; false when there is no such key. Revoking twice keeps the first time.
    pub async fn revoke_key(&self, id: &str) -> Result<bool, StoreError> {
        let r =
            sqlx::query("UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2")
                .bind(now_ms())
                .bind(id)
                .execute(&self.pool)
                .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Holds `amount` of the account's balance for a request, atomically and in one statement:
    /// on every replica and under any concurrency, the balance never goes below zero.
    pub async fn reserve(&self, account_id: &str, amount: i64) -> Result<Reserve, StoreError> {
        if amount < 0 {
            return Err(StoreError::Invalid(
                "a reservation cannot be negative".into(),
            ));
        }
        let taken = sqlx::query(
            "UPDATE accounts SET balance = balance - $1, reserved = reserved + $1 \
             WHERE id = $2 AND balance >= $1",
        )
        .bind(amount)
        .bind(account_id)
        .execute(&self.pool)
        .await?;
        if taken.rows_affected() == 1 {
            return Ok(Reserve::Reserved);
        }
        let balance = sqlx::query("SELECT balance FROM accounts WHERE id = $1")
            .bind(account_id)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| r.try_get::<i64, _>("balance"))
            .transpose()?
            .ok_or_else(|| StoreError::NotFound(format!("account {account_id:?}")))?;
        Ok(Reserve::Insufficient { balance })
    }

    /// Settles reservations and writes usage records in one transaction: each account gets back
    /// what it held minus what was charged (one statement per account), each charge gets a
    /// ledger entry, each request its record. All or nothing, so the ledger and the usage
    /// records always agree.
    pub async fn commit(
        &self,
        settlements: &[Settlement],
        usage: &[crate::UsageRecord],
    ) -> Result<(), StoreError> {
        self.commit_with_holds(settlements, usage, None).await
    }

    /// [`Store::commit`], and in the same transaction this replica's holds per account as
    /// they stand after these settlements (so that they can be given back if it dies).
    pub async fn commit_with_holds(
        &self,
        settlements: &[Settlement],
        usage: &[crate::UsageRecord],
        holds: Option<(&str, &[(String, i64)])>,
    ) -> Result<(), StoreError> {
        if settlements.is_empty() && usage.is_empty() && holds.is_none_or(|h| h.1.is_empty()) {
            return Ok(());
        }
        let mut per_account: std::collections::BTreeMap<&str, (i64, i64)> = Default::default();
        for st in settlements {
            let charged = st.charged.clamp(0, st.reserved);
            let e = per_account.entry(&st.account_id).or_default();
            e.0 += st.reserved - charged;
            e.1 += st.reserved;
        }
        let mut tx = self.pool.begin().await?;
        for (account, (refund, held)) in &per_account {
            sqlx::query(
                "UPDATE accounts SET balance = balance + $1, reserved = reserved - $2 WHERE id = $3",
            )
            .bind(*refund)
            .bind(*held)
            .bind(*account)
            .execute(&mut *tx)
            .await?;
        }
        let now = now_ms();
        let charges: Vec<&Settlement> = settlements.iter().filter(|s| s.charged > 0).collect();
        for chunk in charges.chunks(500) {
            let sql = format!(
                "INSERT INTO ledger (id, account_id, amount, kind, request_id, note, created_at) VALUES {} \
                 ON CONFLICT (request_id) DO NOTHING",
                crate::usage::values(chunk.len(), 7)
            );
            let mut q = sqlx::query(&sql);
            for st in chunk {
                q = q
                    .bind(new_id("led"))
                    .bind(st.account_id.clone())
                    .bind(-st.charged.clamp(0, st.reserved))
                    .bind("charge")
                    .bind(st.request_id.clone())
                    .bind(None::<String>)
                    .bind(now);
            }
            q.execute(&mut *tx).await?;
        }
        crate::usage::insert_usage(&mut tx, usage).await?;
        if let Some((replica, holds)) = holds {
            for (account, amount) in holds {
                sqlx::query(
                    "INSERT INTO replica_holds (replica_id, account_id, amount, seen_at) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (replica_id, account_id) \
                     DO UPDATE SET amount = excluded.amount, seen_at = excluded.seen_at",
                )
                .bind(replica)
                .bind(account.clone())
                .bind((*amount).max(0))
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// Marks this replica alive.
    pub async fn heartbeat(&self, replica: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE replica_holds SET seen_at = $1 WHERE replica_id = $2")
            .bind(now_ms())
            .bind(replica)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Forgets this replica's holds (at a clean stop, when nothing is held any more).
    pub async fn forget_replica(&self, replica: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM replica_holds WHERE replica_id = $1 AND amount = 0")
            .bind(replica)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Gives back to their accounts the holds of replicas not seen since `cutoff` (epoch ms):
    /// they died with requests in flight. Each dead hold is taken by exactly one caller.
    /// Returns the micro-units released.
    pub async fn release_dead_holds(&self, cutoff: i64) -> Result<i64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "DELETE FROM replica_holds WHERE seen_at < $1 RETURNING account_id, amount",
        )
        .bind(cutoff)
        .fetch_all(&mut *tx)
        .await?;
        let mut per_account: std::collections::BTreeMap<String, i64> = Default::default();
        for r in &rows {
            let account: String = r.try_get("account_id")?;
            let amount: i64 = r.try_get("amount")?;
            *per_account.entry(account).or_default() += amount;
        }
        let mut released = 0;
        for (account, amount) in per_account.iter().filter(|(_, a)| **a > 0) {
            // Never more than is still held (a hold can lag its settlements by one batch).
            let r = sqlx::query(
                "UPDATE accounts SET balance = balance + (CASE WHEN reserved < $1 THEN reserved ELSE $1 END), \
                 reserved = reserved - (CASE WHEN reserved < $1 THEN reserved ELSE $1 END) WHERE id = $2",
            )
            .bind(*amount)
            .bind(account.clone())
            .execute(&mut *tx)
            .await?;
            if r.rows_affected() > 0 {
                released += amount;
            }
        }
        tx.commit().await?;
        if released > 0 {
            tracing::warn!(
                released,
                "gave back the holds of a replica that stopped without settling"
            );
        }
        Ok(released)
    }

    /// The sum of an account's ledger: credits minus charges. With no request in flight it
    /// equals the balance.
    pub async fn ledger_total(&self, account_id: &str) -> Result<i64, StoreError> {
        let row = sqlx::query(
            "SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) AS total FROM ledger WHERE account_id = $1",
        )
        .bind(account_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("total")?)
    }
}
