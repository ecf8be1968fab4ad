//! Persistence behind one small API: accounts, managed keys, the credit ledger with its
//! reservations, and usage records (with their project, campaign variant, session, parent
//! request and tags); projects, server-side sessions and their messages, stored completions,
//! A/B campaigns with their per-variant reports, and feedback; in SQLite (embedded, the
//! default) or PostgreSQL through sqlx; request and token counters in-process or in Redis
//! (shared by replicas).
//!
//! Every statement is written once in SQL that both databases accept (`$N` placeholders, text
//! ids, `BIGINT` integers, epoch milliseconds, JSON as text), so both backends run the same code
//! and the same tests.

mod apps;
mod db;
mod limits;
mod usage;

pub use apps::{
    CampaignRecord, CompletionQuery, Feedback, ProjectRecord, SessionMessage, SessionRecord,
    StoredCompletion, VariantReport,
};
pub use db::{Account, Backend, KeyRecord, Reserve, Settlement, Store, StoreError};
pub use limits::{Admit, LimitState, Limiter, Limits, Refusal};
pub use usage::{StatusFilter, UsageGroup, UsageQuery, UsageRecord};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A new time-ordered id with a prefix (`acct_…`, `key_…`).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}
