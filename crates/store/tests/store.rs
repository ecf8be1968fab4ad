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
    Admit, CompletionQuery, Feedback, KeyRecord, Limiter, Limits, Refusal, Reserve, Settlement,
    Store, StoreError, StoredCompletion, UsageQuery, UsageRecord,
};
use serde_json::json;
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
        project_id: None,
        campaign_id: None,
        variant: None,
        session_id: None,
        parent_id: None,
        tags: Vec::new(),
        // Refused records stand for filter blocks here: 3 hits each.
        filter_hits: if status >= 400 { 3 } else { 0 },
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
        assert_eq!(total[0].filter_hits, 3, "content-filter hits are summed");
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

#[tokio::test]
async fn projects_crud() {
    for (url, store) in each_backend().await {
        let acct = store.create_account("acme").await.unwrap();
        let spec = json!({"model": "small", "instructions": "Be brief."});
        let p = store
            .create_project("support-bot", Some(&acct.id), &spec)
            .await
            .unwrap();
        assert!(p.id.starts_with("proj_"), "{url}");
        assert_eq!((p.spec.clone(), p.created_at), (spec.clone(), p.updated_at));
        let other = store
            .create_project("a.b_c-1", None, &json!({}))
            .await
            .unwrap();
        assert!(matches!(
            store.create_project("support-bot", None, &json!({})).await,
            Err(StoreError::Conflict(_))
        ));
        for bad in ["", "has space", "slash/y", "ünï", &"x".repeat(65)] {
            assert!(
                matches!(
                    store.create_project(bad, None, &json!({})).await,
                    Err(StoreError::Invalid(_))
                ),
                "{url}: {bad:?}"
            );
        }
        assert!(store
            .create_project(&"x".repeat(64), None, &json!({}))
            .await
            .is_ok());
        // An unknown account is refused by the database.
        assert!(matches!(
            store
                .create_project("orphan", Some("acct_missing"), &json!({}))
                .await,
            Err(StoreError::NotFound(_))
        ));

        // By id or by name.
        assert_eq!(store.project(&p.id).await.unwrap().unwrap(), p);
        assert_eq!(store.project("support-bot").await.unwrap().unwrap(), p);
        assert!(store.project("nope").await.unwrap().is_none());

        let names: Vec<_> = store
            .projects(None)
            .await
            .unwrap()
            .into_iter()
            .map(|p| p.name)
            .collect();
        assert_eq!(
            names,
            vec!["a.b_c-1".to_owned(), "support-bot".into(), "x".repeat(64)]
        );
        let mine = store.projects(Some(&acct.id)).await.unwrap();
        assert_eq!(mine, vec![p.clone()]);

        let spec2 = json!({"model": "large", "tools": [{"id": "lookup"}]});
        let updated = store.update_project(&p.id, &spec2).await.unwrap();
        assert_eq!(
            (updated.spec.clone(), updated.name.clone()),
            (spec2, p.name.clone())
        );
        assert!(updated.updated_at >= p.updated_at);
        assert_eq!(store.project(&p.id).await.unwrap().unwrap(), updated);
        assert!(matches!(
            store.update_project("proj_missing", &json!({})).await,
            Err(StoreError::NotFound(_))
        ));

        assert!(store.delete_project(&other.id).await.unwrap());
        assert!(!store.delete_project(&other.id).await.unwrap());
        assert!(store.project("a.b_c-1").await.unwrap().is_none());
        // The name is free again.
        store
            .create_project("a.b_c-1", None, &json!({}))
            .await
            .unwrap();
    }
}

fn msgs(prefix: &str, n: usize) -> Vec<(String, serde_json::Value)> {
    (0..n)
        .map(|i| {
            (
                format!("{prefix}-{i}"),
                json!({"role": "user", "content": format!("{prefix} {i}")}),
            )
        })
        .collect()
}

#[tokio::test]
async fn sessions_append_and_read() {
    for (url, store) in each_backend().await {
        let id = uuid::Uuid::new_v4().to_string();
        let s = store
            .create_session(&id, Some("acct_a"), Some("proj_a"))
            .await
            .unwrap();
        assert_eq!(
            (s.messages, s.account_id.as_deref()),
            (0, Some("acct_a")),
            "{url}"
        );
        assert!(matches!(
            store.create_session(&id, None, None).await,
            Err(StoreError::Conflict(_))
        ));
        assert!(store.session_messages(&id).await.unwrap().is_empty());

        store.append_session(&id, &msgs("a", 3)).await.unwrap();
        store.append_session(&id, &[]).await.unwrap();
        store.append_session(&id, &msgs("b", 2)).await.unwrap();
        let read = store.session_messages(&id).await.unwrap();
        let got: Vec<_> = read.iter().map(|m| (m.seq, m.id.clone())).collect();
        assert_eq!(
            got,
            vec![
                (0, "a-0".to_owned()),
                (1, "a-1".into()),
                (2, "a-2".into()),
                (3, "b-0".into()),
                (4, "b-1".into())
            ]
        );
        assert_eq!(read[4].message, json!({"role": "user", "content": "b 1"}));
        let after = store.session(&id).await.unwrap().unwrap();
        assert_eq!(after.messages, 5);
        assert!(after.updated_at >= s.updated_at);
        assert_eq!(after.project_id.as_deref(), Some("proj_a"));

        assert!(matches!(
            store.append_session("no-such-session", &msgs("x", 1)).await,
            Err(StoreError::NotFound(_))
        ));
        assert!(store.session("no-such-session").await.unwrap().is_none());

        // Listing: per account, most recently updated first, limited.
        let other = uuid::Uuid::new_v4().to_string();
        store
            .create_session(&other, Some("acct_a"), None)
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        store.append_session(&id, &msgs("c", 1)).await.unwrap();
        let third = uuid::Uuid::new_v4().to_string();
        store
            .create_session(&third, Some("acct_b"), None)
            .await
            .unwrap();
        let listed: Vec<_> = store
            .sessions(Some("acct_a"), 10)
            .await
            .unwrap()
            .into_iter()
            .map(|s| (s.id, s.messages))
            .collect();
        assert_eq!(listed, vec![(id.clone(), 6), (other.clone(), 0)]);
        assert_eq!(store.sessions(None, 10).await.unwrap().len(), 3);
        assert_eq!(store.sessions(None, 1).await.unwrap().len(), 1);
        assert!(matches!(
            store.sessions(None, 0).await,
            Err(StoreError::Invalid(_))
        ));

        assert!(store.delete_session(&id).await.unwrap());
        assert!(!store.delete_session(&id).await.unwrap());
        assert!(store.session(&id).await.unwrap().is_none());
        assert!(store.session_messages(&id).await.unwrap().is_empty());
        // A new session with the same id starts empty.
        store.create_session(&id, None, None).await.unwrap();
        store.append_session(&id, &msgs("d", 1)).await.unwrap();
        assert_eq!(store.session_messages(&id).await.unwrap()[0].seq, 0);
    }
}

/// 8 tasks append 5 pairs each to one session, through two stores on one database (two
/// replicas): nothing is lost, no pair is split, and the positions have no gaps.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_keep_order() {
    for url in [fresh_sqlite(), fresh_postgres().await] {
        let a = Arc::new(Store::open(&url).await.unwrap());
        let b = Arc::new(Store::open(&url).await.unwrap());
        let id = uuid::Uuid::new_v4().to_string();
        a.create_session(&id, None, None).await.unwrap();
        let mut tasks = Vec::new();
        for t in 0..8 {
            let s = if t % 2 == 0 { a.clone() } else { b.clone() };
            let id = id.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..5 {
                    let pair = msgs(&format!("t{t}-{i}"), 2);
                    s.append_session(&id, &pair).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let all = a.session_messages(&id).await.unwrap();
        assert_eq!(all.len(), 80, "{url}");
        for (i, m) in all.iter().enumerate() {
            assert_eq!(m.seq, i as i64, "{url}");
        }
        let mut seen = std::collections::BTreeSet::new();
        for pair in all.chunks(2) {
            let first = pair[0].id.strip_suffix("-0").unwrap();
            assert_eq!(pair[1].id, format!("{first}-1"), "{url}: a pair was split");
            assert!(seen.insert(first.to_owned()));
        }
        assert_eq!(seen.len(), 40);
        assert_eq!(a.session(&id).await.unwrap().unwrap().messages, 80);
    }
}

fn completion(
    id: &str,
    account: &str,
    model: &str,
    at: i64,
    meta: &[(&str, &str)],
) -> StoredCompletion {
    StoredCompletion {
        id: id.into(),
        account_id: Some(account.into()),
        model: model.into(),
        created_at: at,
        metadata: meta
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        request: json!({"model": model, "messages": [{"role": "user", "content": id}]}),
        response: json!({"id": id, "choices": [{"message": {"content": "ok"}}]}),
    }
}

async fn ids(store: &Store, q: &CompletionQuery) -> (Vec<String>, bool) {
    let (page, more) = store.completions(q).await.unwrap();
    (page.into_iter().map(|c| c.id).collect(), more)
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test]
async fn stored_completions_list_and_page() {
    for (url, store) in each_backend().await {
        let all = [
            completion(
                "c1",
                "acct_a",
                "small",
                1_000,
                &[("env", "prod"), ("team", "red")],
            ),
            completion("c2", "acct_a", "large", 2_000, &[("env", "dev")]),
            // Same time as c2: the id breaks the tie.
            completion("c3", "acct_a", "small", 2_000, &[("env", "prod")]),
            completion("c4", "acct_a", "small", 3_000, &[]),
            completion("c5", "acct_b", "small", 4_000, &[("env", "prod")]),
        ];
        for c in &all {
            store.store_completion(c).await.unwrap();
        }
        assert!(matches!(
            store.store_completion(&all[0]).await,
            Err(StoreError::Conflict(_))
        ));
        assert_eq!(
            store.completion("c1").await.unwrap().unwrap(),
            all[0],
            "{url}"
        );
        assert!(store.completion("nope").await.unwrap().is_none());

        let mine = CompletionQuery {
            account_id: Some("acct_a".into()),
            limit: 10,
            ..CompletionQuery::default()
        };
        assert_eq!(
            ids(&store, &mine).await,
            (strs(&["c1", "c2", "c3", "c4"]), false)
        );
        let everyone = CompletionQuery {
            limit: 10,
            ..CompletionQuery::default()
        };
        assert_eq!(ids(&store, &everyone).await.0.len(), 5);

        // Filters: model, metadata (all entries must match).
        let small = CompletionQuery {
            model: Some("small".into()),
            ..mine.clone()
        };
        assert_eq!(ids(&store, &small).await.0, strs(&["c1", "c3", "c4"]));
        let prod = CompletionQuery {
            metadata: vec![("env".into(), "prod".into())],
            ..mine.clone()
        };
        assert_eq!(ids(&store, &prod).await.0, strs(&["c1", "c3"]));
        let prod_red = CompletionQuery {
            metadata: vec![("env".into(), "prod".into()), ("team".into(), "red".into())],
            ..mine.clone()
        };
        assert_eq!(ids(&store, &prod_red).await.0, strs(&["c1"]));

        // Paging, oldest first.
        let mut page = CompletionQuery {
            limit: 2,
            ..mine.clone()
        };
        assert_eq!(ids(&store, &page).await, (strs(&["c1", "c2"]), true));
        page.after = Some("c2".into());
        assert_eq!(ids(&store, &page).await, (strs(&["c3", "c4"]), false));
        page.after = Some("c4".into());
        assert_eq!(ids(&store, &page).await, (vec![], false));
        // Newest first.
        let mut page = CompletionQuery {
            limit: 2,
            descending: true,
            ..mine.clone()
        };
        assert_eq!(ids(&store, &page).await, (strs(&["c4", "c3"]), true));
        page.after = Some("c3".into());
        assert_eq!(ids(&store, &page).await, (strs(&["c2", "c1"]), false));
        page.limit = 1;
        assert_eq!(ids(&store, &page).await, (strs(&["c2"]), true));
        page.after = Some("missing".into());
        assert!(matches!(
            store.completions(&page).await,
            Err(StoreError::NotFound(_))
        ));
        page.after = None;
        page.limit = 0;
        assert!(matches!(
            store.completions(&page).await,
            Err(StoreError::Invalid(_))
        ));

        // Replacing the metadata: the filter sees the new values only.
        let new_meta = BTreeMap::from([("env".to_owned(), "staging".to_owned())]);
        assert!(store
            .update_completion_metadata("c1", &new_meta)
            .await
            .unwrap());
        assert!(!store
            .update_completion_metadata("nope", &new_meta)
            .await
            .unwrap());
        assert_eq!(
            store.completion("c1").await.unwrap().unwrap().metadata,
            new_meta
        );
        assert_eq!(ids(&store, &prod).await.0, strs(&["c3"]));
        assert_eq!(ids(&store, &prod_red).await.0, Vec::<String>::new());
        let staging = CompletionQuery {
            metadata: vec![("env".into(), "staging".into())],
            ..mine.clone()
        };
        assert_eq!(ids(&store, &staging).await.0, strs(&["c1"]));

        assert!(store.delete_completion("c3").await.unwrap());
        assert!(!store.delete_completion("c3").await.unwrap());
        assert!(store.completion("c3").await.unwrap().is_none());
        assert_eq!(ids(&store, &prod).await.0, Vec::<String>::new());
        assert_eq!(ids(&store, &mine).await.0, strs(&["c1", "c2", "c4"]));
        // The id can be stored again, with its metadata fresh.
        store.store_completion(&all[2]).await.unwrap();
        assert_eq!(ids(&store, &prod).await.0, strs(&["c3"]));
    }
}

#[tokio::test]
async fn campaigns_crud() {
    for (url, store) in each_backend().await {
        let spec = json!({"variants": [{"name": "a", "weight": 1}, {"name": "b", "weight": 1}]});
        let c = store
            .create_campaign(
                Some("homepage"),
                "Homepage test",
                Some("acct_a"),
                Some("proj_x"),
                &spec,
            )
            .await
            .unwrap();
        assert!(c.id.starts_with("camp_"), "{url}");
        let keyless = store
            .create_campaign(None, "No key", None, None, &json!({}))
            .await
            .unwrap();
        // Several campaigns may have no key.
        store
            .create_campaign(None, "No key either", None, None, &json!({}))
            .await
            .unwrap();
        assert!(matches!(
            store
                .create_campaign(Some("homepage"), "Again", None, None, &json!({}))
                .await,
            Err(StoreError::Conflict(_))
        ));
        assert!(matches!(
            store
                .create_campaign(Some("a key"), "Bad", None, None, &json!({}))
                .await,
            Err(StoreError::Invalid(_))
        ));
        assert!(matches!(
            store
                .create_campaign(None, " ", None, None, &json!({}))
                .await,
            Err(StoreError::Invalid(_))
        ));

        assert_eq!(store.campaign(&c.id).await.unwrap().unwrap(), c);
        assert_eq!(store.campaign("homepage").await.unwrap().unwrap(), c);
        assert_eq!(store.campaign(&keyless.id).await.unwrap().unwrap(), keyless);
        assert!(store.campaign("nope").await.unwrap().is_none());

        assert_eq!(store.campaigns(None).await.unwrap().len(), 3);
        assert_eq!(
            store.campaigns(Some("acct_a")).await.unwrap(),
            vec![c.clone()]
        );

        let spec2 = json!({"variants": [{"name": "a", "weight": 3}]});
        let updated = store.update_campaign(&c.id, &spec2).await.unwrap();
        assert_eq!(updated.spec, spec2);
        assert_eq!(
            (updated.key.clone(), updated.name.clone()),
            (c.key.clone(), c.name.clone())
        );
        assert_eq!(
            store.campaign("homepage").await.unwrap().unwrap().spec,
            spec2
        );
        assert!(matches!(
            store.update_campaign("camp_missing", &spec2).await,
            Err(StoreError::NotFound(_))
        ));

        assert!(store.delete_campaign(&c.id).await.unwrap());
        assert!(!store.delete_campaign(&c.id).await.unwrap());
        assert!(store.campaign("homepage").await.unwrap().is_none());
        // The key is free again.
        store
            .create_campaign(Some("homepage"), "Second", None, None, &json!({}))
            .await
            .unwrap();
    }
}

/// A usage record tied to a project, campaign variant, session and tags.
fn app_record(
    id: &str,
    cost: i64,
    campaign: Option<&str>,
    variant: Option<&str>,
    parent: Option<&str>,
    tags: &[&str],
) -> UsageRecord {
    UsageRecord {
        project_id: Some("proj_1".into()),
        campaign_id: campaign.map(str::to_owned),
        variant: variant.map(str::to_owned),
        session_id: Some(if parent.is_some() { "sess_2" } else { "sess_1" }.into()),
        parent_id: parent.map(str::to_owned),
        tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        latency_ms: 100 + cost,
        ..record(id, "m", "alice", "red", cost, 200)
    }
}

fn grouped(groups: &[parlance_store::UsageGroup]) -> Vec<(Option<String>, i64, i64)> {
    let mut g: Vec<_> = groups
        .iter()
        .map(|g| (g.group.clone(), g.requests, g.cost))
        .collect();
    g.sort();
    g
}

#[tokio::test]
async fn usage_by_project_campaign_variant_and_tag() {
    for (url, store) in each_backend().await {
        let mut records = vec![
            app_record("r1", 10, Some("camp_1"), Some("a"), None, &["x", "y"]),
            // Two extra steps of r1: counted in tokens and cost, not as requests.
            app_record("r1-2", 5, Some("camp_1"), Some("a"), Some("r1"), &["x"]),
            app_record("r1-3", 5, Some("camp_1"), Some("a"), Some("r1"), &[]),
            app_record("r2", 20, Some("camp_1"), Some("b"), None, &["y"]),
            app_record("r3", 40, None, None, None, &[]),
        ];
        records[4].project_id = Some("proj_2".into());
        // A failed extra step counts as an error.
        records[2].status = 500;
        store.insert_usage(&records).await.unwrap();
        store.insert_usage(&records).await.unwrap();

        let total = store.usage(&UsageQuery::default()).await.unwrap();
        assert_eq!(
            (
                total[0].requests,
                total[0].cost,
                total[0].errors,
                total[0].prompt_tokens
            ),
            (3, 80, 1, 50),
            "{url}"
        );

        let q = |f: fn(&mut UsageQuery)| {
            let mut q = UsageQuery::default();
            f(&mut q);
            q
        };
        let one = |g: Vec<parlance_store::UsageGroup>| (g[0].requests, g[0].cost);
        let cases: Vec<(UsageQuery, (i64, i64))> = vec![
            (q(|q| q.project_id = Some("proj_1".into())), (2, 40)),
            (q(|q| q.project_id = Some("proj_2".into())), (1, 40)),
            (q(|q| q.campaign_id = Some("camp_1".into())), (2, 40)),
            (q(|q| q.variant = Some("a".into())), (1, 20)),
            (q(|q| q.session_id = Some("sess_2".into())), (0, 10)),
            (q(|q| q.tag = Some("x".into())), (1, 15)),
            (q(|q| q.tag = Some("y".into())), (2, 30)),
            (q(|q| q.tag = Some("z".into())), (0, 0)),
        ];
        for (query, expected) in cases {
            assert_eq!(
                one(store.usage(&query).await.unwrap()),
                expected,
                "{url}: {query:?}"
            );
        }

        let by = |name: &str| UsageQuery {
            group_by: Some(name.into()),
            ..UsageQuery::default()
        };
        assert_eq!(
            grouped(&store.usage(&by("project")).await.unwrap()),
            vec![
                (Some("proj_1".into()), 2, 40),
                (Some("proj_2".into()), 1, 40)
            ]
        );
        assert_eq!(
            grouped(&store.usage(&by("campaign")).await.unwrap()),
            vec![(None, 1, 40), (Some("camp_1".into()), 2, 40)]
        );
        assert_eq!(
            grouped(&store.usage(&by("variant")).await.unwrap()),
            vec![
                (None, 1, 40),
                (Some("a".into()), 1, 20),
                (Some("b".into()), 1, 20)
            ]
        );
        assert_eq!(
            grouped(&store.usage(&by("session")).await.unwrap()),
            vec![
                (Some("sess_1".into()), 3, 70),
                (Some("sess_2".into()), 0, 10)
            ]
        );
        // r1 has two tags: it counts in both groups.
        assert_eq!(
            grouped(&store.usage(&by("tag")).await.unwrap()),
            vec![
                (None, 1, 45),
                (Some("x".into()), 1, 15),
                (Some("y".into()), 2, 30)
            ]
        );
        // Grouping by tag within a filter.
        let tag_in_campaign = UsageQuery {
            campaign_id: Some("camp_1".into()),
            tag: Some("y".into()),
            group_by: Some("variant".into()),
            ..UsageQuery::default()
        };
        assert_eq!(
            grouped(&store.usage(&tag_in_campaign).await.unwrap()),
            vec![(Some("a".into()), 1, 10), (Some("b".into()), 1, 20)]
        );
        let err = store.usage(&by("colour")).await.unwrap_err().to_string();
        assert!(err.contains("campaign") && err.contains("tag"), "{err}");

        // Who a request belongs to.
        assert_eq!(
            store.usage_owner("r2").await.unwrap(),
            Some((
                Some("acct_a".into()),
                Some("camp_1".into()),
                Some("b".into())
            ))
        );
        assert_eq!(
            store.usage_owner("r3").await.unwrap(),
            Some((Some("acct_a".into()), None, None))
        );
        assert_eq!(store.usage_owner("nope").await.unwrap(), None);
    }
}

fn feedback(request: &str, score: Option<f64>, label: Option<&str>) -> Feedback {
    Feedback {
        id: parlance_store::new_id("fb"),
        request_id: request.into(),
        completion_id: format!("chatcmpl-{request}"),
        account_id: Some("acct_a".into()),
        score,
        label: label.map(str::to_owned),
        comment: Some("thanks".into()),
        created_at: parlance_store::now_ms(),
    }
}

#[tokio::test]
async fn campaign_report_joins_feedback() {
    for (url, store) in each_backend().await {
        let mut records = vec![
            app_record("r1", 10, Some("camp_1"), Some("a"), None, &[]),
            app_record("r1-2", 5, Some("camp_1"), Some("a"), Some("r1"), &[]),
            app_record("r2", 20, Some("camp_1"), Some("a"), None, &[]),
            app_record("r3", 30, Some("camp_1"), Some("b"), None, &[]),
            app_record("r4", 40, Some("camp_1"), Some("c"), None, &[]),
            app_record("r5", 50, Some("camp_2"), Some("a"), None, &[]),
        ];
        // r4 is later than the others.
        records[4].created_at += 1_000_000;
        records[3].status = 429;
        // (A mean that is a whole number: the databases round a cast differently.)
        records[1].latency_ms = 100;
        store.insert_usage(&records).await.unwrap();
        // First no score, then scores and no scores alternating, through the same prepared
        // statements (feedback on an unknown request: not in the report).
        for i in 0..20 {
            let score = (i % 2 == 1).then_some(0.25);
            store
                .insert_feedback(&feedback("r-unknown", score, None))
                .await
                .unwrap();
        }
        for f in [
            feedback("r1", Some(1.0), Some("good")),
            feedback("r1", Some(0.5), Some("good")),
            feedback("r2", Some(0.0), Some("bad")),
            feedback("r2", None, Some("bad")),
            feedback("r2", None, None),
            feedback("r3", None, Some("good")),
            // Another campaign's and an unknown request's feedback are not counted.
            feedback("r5", Some(1.0), Some("good")),
            feedback("r-unknown", Some(1.0), Some("good")),
        ] {
            store.insert_feedback(&f).await.unwrap();
        }
        let dup = feedback("r1", None, None);
        store.insert_feedback(&dup).await.unwrap();
        assert!(matches!(
            store.insert_feedback(&dup).await,
            Err(StoreError::Conflict(_))
        ));
        assert!(matches!(
            store
                .insert_feedback(&feedback("r1", Some(f64::NAN), None))
                .await,
            Err(StoreError::Invalid(_))
        ));

        let report = store
            .campaign_report("camp_1", &UsageQuery::default())
            .await
            .unwrap();
        let variants: Vec<_> = report.iter().map(|r| r.variant.clone().unwrap()).collect();
        assert_eq!(variants, strs(&["a", "b", "c"]), "{url}");
        let a = &report[0];
        assert_eq!(
            (a.requests, a.cost, a.errors, a.prompt_tokens),
            (2, 35, 0, 30)
        );
        assert_eq!(a.avg_latency_ms, Some((110 + 100 + 120) / 3));
        assert_eq!(a.feedback, 6);
        assert_eq!(a.avg_score, Some(0.5));
        assert_eq!(
            a.labels,
            BTreeMap::from([("good".to_owned(), 2), ("bad".to_owned(), 2)])
        );
        let b = &report[1];
        assert_eq!((b.requests, b.cost, b.errors), (1, 30, 1));
        assert_eq!((b.feedback, b.avg_score), (1, None));
        assert_eq!(b.labels, BTreeMap::from([("good".to_owned(), 1)]));
        let c = &report[2];
        assert_eq!((c.requests, c.feedback, c.avg_score), (1, 0, None));
        assert!(c.labels.is_empty());

        // A window leaves r4 (variant c) out.
        let since = records.iter().map(|r| r.created_at).min().unwrap();
        let window = store
            .campaign_report(
                "camp_1",
                &UsageQuery {
                    since: Some(since),
                    until: Some(since + 1_000),
                    ..UsageQuery::default()
                },
            )
            .await
            .unwrap();
        let variants: Vec<_> = window.iter().map(|r| r.variant.clone().unwrap()).collect();
        assert_eq!(variants, strs(&["a", "b"]));
        assert_eq!(window[0], report[0]);
        let later = store
            .campaign_report(
                "camp_1",
                &UsageQuery {
                    since: Some(since + 1_000),
                    ..UsageQuery::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(later.len(), 1);
        assert_eq!(later[0].variant.as_deref(), Some("c"));

        assert!(store
            .campaign_report("camp_none", &UsageQuery::default())
            .await
            .unwrap()
            .is_empty());
        let serialized = serde_json::to_value(&report[0]).unwrap();
        assert_eq!(serialized["avg_score"], json!(0.5));
    }
}
