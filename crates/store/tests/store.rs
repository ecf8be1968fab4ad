//! The store against real databases: every test runs on SQLite (a fresh file) and on
//! PostgreSQL (a fresh database on the server `scripts/services.sh` starts), and the limiter on
//! this process and on Redis.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::collections::BTreeMap;
use std::sync::Arc;

use parlance_store::{
    Admit, KeyRecord, Limiter, Limits, Refusal, Reserve, Settlement, Store, UsageQuery, UsageRecord,
};
use sqlx::Connection;

fn env_url(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run the tests through scripts/test.sh, or `source scripts/services.sh start` first")
    })
}

/// A fresh, empty PostgreSQL database on the test server.
async fn fresh_postgres() -> String {
    let base = env_url("PARLANCE_TEST_POSTGRES_URL");
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(&base).await.unwrap();
    let name = format!("t_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .unwrap();
    let (prefix, _) = base.rsplit_once('/').unwrap();
    format!("{prefix}/{name}")
}

/// A fresh SQLite file.
fn fresh_sqlite() -> String {
    let dir = std::env::temp_dir().join(format!("parlance-store-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    format!("sqlite://{}", dir.join("test.db").display())
}

async fn each_backend() -> Vec<(String, Store)> {
    let mut out = Vec::new();
    for url in [fresh_sqlite(), fresh_postgres().await] {
        let store = Store::open(&url).await.unwrap();
        out.push((url, store));
    }
    out
}

fn key(id: &str, account: &str) -> KeyRecord {
    KeyRecord {
        id: id.into(),
        account_id: account.into(),
        name: "test".into(),
        prefix: "sk-pl-xx".into(),
        rpm: Some(10),
        tpm: None,
        created_at: parlance_store::now_ms(),
        revoked_at: None,
    }
}

#[tokio::test]
async fn migrations_run_once_and_reopen() {
    for (url, store) in each_backend().await {
        let a = store.create_account("acme").await.unwrap();
        drop(store);
        // Reopening (a second replica, a restart) keeps the data and migrates nothing twice.
        let again = Store::open(&url).await.unwrap();
        let b = again.account("acme").await.unwrap().unwrap();
        assert_eq!(a.id, b.id, "{url}");
    }
}

#[tokio::test]
async fn replicas_migrating_at_once_agree() {
    let url = fresh_postgres().await;
    let (a, b) = tokio::join!(Store::open(&url), Store::open(&url));
    let (a, b) = (a.unwrap(), b.unwrap());
    a.create_account("one").await.unwrap();
    assert!(b.account("one").await.unwrap().is_some());
}

#[tokio::test]
async fn accounts_keys_and_credits() {
    for (url, store) in each_backend().await {
        let acct = store.create_account("acme").await.unwrap();
        assert!(
            matches!(
                store.create_account("acme").await,
                Err(parlance_store::StoreError::Conflict(_))
            ),
            "{url}"
        );
        assert!(matches!(
            store.add_credits(&acct.id, 0, None).await,
            Err(parlance_store::StoreError::Invalid(_))
        ));
        assert!(matches!(
            store.add_credits("acct_missing", 5, None).await,
            Err(parlance_store::StoreError::NotFound(_))
        ));
        let after = store
            .add_credits(&acct.id, 1_500, Some("top-up"))
            .await
            .unwrap();
        assert_eq!(after.balance, 1_500);
        assert_eq!(store.ledger_total(&acct.id).await.unwrap(), 1_500);

        assert!(!store.any_key().await.unwrap());
        store
            .insert_key(&key("key_1", &acct.id), "hash-1")
            .await
            .unwrap();
        assert!(store
            .insert_key(&key("key_2", &acct.id), "hash-1")
            .await
            .is_err());
        let found = store.key_by_hash("hash-1").await.unwrap().unwrap();
        assert_eq!(found.id, "key_1");
        assert_eq!(found.rpm, Some(10));
        assert!(store.key_by_hash("hash-2").await.unwrap().is_none());
        assert!(store.any_key().await.unwrap());
        assert!(store.revoke_key("key_1").await.unwrap());
        assert!(!store.revoke_key("key_nope").await.unwrap());
        let revoked = store.key_by_hash("hash-1").await.unwrap().unwrap();
        assert!(revoked.revoked_at.is_some());
        // Revoking the last key must not open the server.
        assert!(store.any_key().await.unwrap());
        assert_eq!(store.keys(Some(&acct.id)).await.unwrap().len(), 1);
        assert_eq!(store.keys(Some("acct_other")).await.unwrap().len(), 0);
        assert_eq!(store.keys(None).await.unwrap().len(), 1);
    }
}

fn settlement(id: &str, account: &str, reserved: i64, charged: i64) -> Settlement {
    Settlement {
        request_id: id.into(),
        account_id: account.into(),
        reserved,
        charged,
    }
}

#[tokio::test]
async fn reserve_then_settle_in_batches() {
    for (url, store) in each_backend().await {
        let acct = store.create_account("acme").await.unwrap();
        let other = store.create_account("other").await.unwrap();
        store.add_credits(&acct.id, 100, None).await.unwrap();
        store.add_credits(&other.id, 10, None).await.unwrap();
        assert_eq!(
            store.reserve(&acct.id, 60).await.unwrap(),
            Reserve::Reserved
        );
        let held = store.account(&acct.id).await.unwrap().unwrap();
        assert_eq!((held.balance, held.reserved), (40, 60), "{url}");
        // The rest cannot cover a second one of the same size.
        assert_eq!(
            store.reserve(&acct.id, 60).await.unwrap(),
            Reserve::Insufficient { balance: 40 }
        );
        assert!(matches!(
            store.reserve("acct_missing", 1).await,
            Err(parlance_store::StoreError::NotFound(_))
        ));
        assert_eq!(
            store.reserve(&acct.id, 30).await.unwrap(),
            Reserve::Reserved
        );
        assert_eq!(
            store.reserve(&other.id, 10).await.unwrap(),
            Reserve::Reserved
        );
        // One batch settles three requests of two accounts, with their usage records.
        let usage = vec![
            record("s1", "m", "u", "t", 25, 200),
            record("s2", "m", "u", "t", 30, 200),
        ];
        store
            .commit(
                &[
                    settlement("s1", &acct.id, 60, 25),
                    settlement("s2", &acct.id, 30, 30),
                    settlement("s3", &other.id, 10, 0),
                ],
                &usage,
            )
            .await
            .unwrap();
        let after = store.account(&acct.id).await.unwrap().unwrap();
        assert_eq!((after.balance, after.reserved), (45, 0));
        assert_eq!(store.ledger_total(&acct.id).await.unwrap(), 45);
        let o = store.account(&other.id).await.unwrap().unwrap();
        assert_eq!((o.balance, o.reserved), (10, 0));
        assert_eq!(store.ledger_total(&other.id).await.unwrap(), 10);
        let total = store.usage(&UsageQuery::default()).await.unwrap();
        assert_eq!((total[0].requests, total[0].cost), (2, 55));
        // A charge above the reservation is clamped to it: the balance never goes negative.
        store.reserve(&acct.id, 45).await.unwrap();
        store
            .commit(&[settlement("s4", &acct.id, 45, 1_000)], &[])
            .await
            .unwrap();
        let empty = store.account(&acct.id).await.unwrap().unwrap();
        assert_eq!((empty.balance, empty.reserved), (0, 0));
        assert_eq!(store.ledger_total(&acct.id).await.unwrap(), 0);
    }
}

/// Many concurrent reservations, from two stores sharing one database (two replicas): exactly
/// as many succeed as the balance covers, and it ends at zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_reservations_never_overspend() {
    for url in [fresh_sqlite(), fresh_postgres().await] {
        let a = Arc::new(Store::open(&url).await.unwrap());
        let b = Arc::new(Store::open(&url).await.unwrap());
        let acct = a.create_account("race").await.unwrap();
        a.add_credits(&acct.id, 500, None).await.unwrap();
        let mut tasks = Vec::new();
        for i in 0..300u32 {
            let s = if i % 2 == 0 { a.clone() } else { b.clone() };
            let id = acct.id.clone();
            tasks.push(tokio::spawn(
                async move { s.reserve(&id, 10).await.unwrap() },
            ));
        }
        let mut ok = 0;
        for t in tasks {
            if t.await.unwrap() == Reserve::Reserved {
                ok += 1;
            }
        }
        assert_eq!(ok, 50, "{url}");
        let acc = a.account(&acct.id).await.unwrap().unwrap();
        assert_eq!((acc.balance, acc.reserved), (0, 500));
    }
}

fn record(id: &str, model: &str, user: &str, team: &str, cost: i64, status: i64) -> UsageRecord {
    UsageRecord {
        request_id: id.into(),
        created_at: 1_764_201_600_000 + cost, // 2025-11-27
        key_id: Some("key_a".into()),
        account_id: Some("acct_a".into()),
        model: model.into(),
        provider: "local".into(),
        prompt_tokens: 10,
        cached_tokens: 2,
        completion_tokens: 5,
        cost,
        latency_ms: 100,
        ttft_ms: Some(20),
        status,
        outcome: if status == 200 {
            "completed"
        } else {
            "refused"
        }
        .into(),
        user: Some(user.into()),
        labels: BTreeMap::from([("team".to_owned(), team.to_owned())]),
    }
}

#[tokio::test]
async fn usage_is_filtered_and_grouped() {
    for (url, store) in each_backend().await {
        let records = vec![
            record("u1", "small", "alice", "red", 10, 200),
            record("u2", "small", "bob", "blue", 20, 200),
            record("u3", "large", "alice", "red", 40, 200),
            record("u4", "large", "alice", "blue", 0, 402),
        ];
        store.insert_usage(&records).await.unwrap();
        // Writing the same batch again (a retry) adds nothing.
        store.insert_usage(&records).await.unwrap();
        let total = store.usage(&UsageQuery::default()).await.unwrap();
        assert_eq!(total.len(), 1);
        assert_eq!(total[0].requests, 4, "{url}");
        assert_eq!(total[0].errors, 1);
        assert_eq!(total[0].cost, 70);
        assert_eq!(total[0].prompt_tokens, 40);
        assert_eq!(total[0].avg_ttft_ms, Some(20));

        let by_model = store
            .usage(&UsageQuery {
                group_by: Some("model".into()),
                ..UsageQuery::default()
            })
            .await
            .unwrap();
        let m: Vec<_> = by_model
            .iter()
            .map(|g| (g.group.clone().unwrap(), g.requests, g.cost))
            .collect();
        assert_eq!(m, vec![("large".into(), 2, 40), ("small".into(), 2, 30)]);

        let red_alice = store
            .usage(&UsageQuery {
                user: Some("alice".into()),
                labels: vec![("team".into(), "red".into())],
                ..UsageQuery::default()
            })
            .await
            .unwrap();
        assert_eq!((red_alice[0].requests, red_alice[0].cost), (2, 50));

        let by_team = store
            .usage(&UsageQuery {
                group_by: Some("label:team".into()),
                since: Some(1_764_201_600_000 + 15),
                ..UsageQuery::default()
            })
            .await
            .unwrap();
        let t: Vec<_> = by_team
            .iter()
            .map(|g| (g.group.clone().unwrap(), g.requests))
            .collect();
        assert_eq!(t, vec![("red".into(), 1), ("blue".into(), 1)]);

        let by_day = store
            .usage(&UsageQuery {
                group_by: Some("day".into()),
                ..UsageQuery::default()
            })
            .await
            .unwrap();
        assert_eq!(by_day[0].group.as_deref(), Some("2025-11-27"));
        assert!(store
            .usage(&UsageQuery {
                group_by: Some("colour".into()),
                ..UsageQuery::default()
            })
            .await
            .is_err());
    }
}

/// Counting windows are whole minutes: keep a test from straddling two.
async fn away_from_window_edge() {
    let into = parlance_store::now_ms().rem_euclid(60_000);
    if into > 57_000 {
        tokio::time::sleep(std::time::Duration::from_millis((60_100 - into) as u64)).await;
    }
}

async fn limiters() -> Vec<(&'static str, Limiter, Limiter)> {
    away_from_window_edge().await;
    let redis = env_url("PARLANCE_TEST_REDIS_URL");
    vec![
        ("local", Limiter::local(), Limiter::local()),
        (
            "redis",
            Limiter::redis(&redis).await.unwrap(),
            Limiter::redis(&redis).await.unwrap(),
        ),
    ]
}

#[tokio::test]
async fn request_and_token_limits() {
    for (name, a, _) in limiters().await {
        let key = format!("k-{}", uuid::Uuid::new_v4().simple());
        let limits = Limits {
            rpm: Some(3),
            tpm: Some(100),
        };
        let Admit::Allowed(s) = a.acquire(&key, limits, 40).await.unwrap() else {
            panic!("{name}: first request refused");
        };
        assert_eq!((s.requests_used, s.tokens_used), (1, 40));
        assert!(s.reset_ms <= 60_000);
        assert!(matches!(
            a.acquire(&key, limits, 40).await.unwrap(),
            Admit::Allowed(_)
        ));
        // 80 used: 40 more would pass 100.
        let Admit::Refused(s, why) = a.acquire(&key, limits, 40).await.unwrap() else {
            panic!("{name}: token limit not enforced");
        };
        assert_eq!((why, s.tokens_used), (Refusal::Tokens, 80));
        // Giving back unused tokens makes room again.
        a.refund(&key, s.window, 30).await.unwrap();
        let Admit::Allowed(s) = a.acquire(&key, limits, 40).await.unwrap() else {
            panic!("{name}: refund not applied");
        };
        assert_eq!((s.requests_used, s.tokens_used), (3, 90));
        // The fourth request passes the request limit.
        assert!(matches!(
            a.acquire(&key, limits, 1).await.unwrap(),
            Admit::Refused(_, Refusal::Requests)
        ));
    }
}

/// Two limiters on one Redis act as one; two in-process ones do not (that is why replicas
/// need Redis).
#[tokio::test]
async fn redis_limits_hold_across_replicas() {
    for (name, a, b) in limiters().await {
        let key = format!("k-{}", uuid::Uuid::new_v4().simple());
        let limits = Limits {
            rpm: Some(10),
            tpm: None,
        };
        let mut allowed = 0;
        for i in 0..30 {
            let l = if i % 2 == 0 { &a } else { &b };
            if matches!(l.acquire(&key, limits, 1).await.unwrap(), Admit::Allowed(_)) {
                allowed += 1;
            }
        }
        let expected = if name == "redis" { 10 } else { 20 };
        assert_eq!(allowed, expected, "{name}");
    }
}

#[tokio::test]
async fn a_dead_replicas_holds_are_released_once() {
    for (url, store) in each_backend().await {
        let acct = store.create_account("acme").await.unwrap();
        store.add_credits(&acct.id, 100, None).await.unwrap();
        store.reserve(&acct.id, 60).await.unwrap();
        let holds = vec![(acct.id.clone(), 60)];
        store
            .commit_with_holds(&[], &[], Some(("r-dead", &holds)))
            .await
            .unwrap();
        // Alive (seen just now): nothing released.
        let recent = parlance_store::now_ms() - 60_000;
        assert_eq!(store.release_dead_holds(recent).await.unwrap(), 0, "{url}");
        store.heartbeat("r-dead").await.unwrap();
        // Unseen since the cutoff: released, once.
        let future = parlance_store::now_ms() + 1_000;
        assert_eq!(store.release_dead_holds(future).await.unwrap(), 60);
        assert_eq!(store.release_dead_holds(future).await.unwrap(), 0);
        let a = store.account(&acct.id).await.unwrap().unwrap();
        assert_eq!((a.balance, a.reserved), (100, 0));
    }
}
