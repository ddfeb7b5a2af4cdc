//! Rate limits: three clients with their own pools share a queue limited to 50 claims a
//! second; over a 10 s window (after a warm-up) 450 to 550 tasks are claimed. Kind and tenant
//! limits cap claims too; a rate-limited task uses no attempt; bad rates are refused.

use std::time::Duration;

use chrono::{DateTime, Utc};
use pgcrew::Error;
use pgcrew::queue::{self, Rate, RateScope, TaskOutcome, WorkerPool};

use crate::common::{
    self, cli, create_tenant, db_with_instance_conn, fast_config, scalar, task, test_db,
};

async fn db_now(db: &pgcrew::Db) -> DateTime<Utc> {
    let conn = db.get().await.unwrap();
    conn.query_one("SELECT clock_timestamp()", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn fifty_a_second_across_three_instances() {
    let t = test_db().await;
    queue::enqueue_many(
        &t.db,
        &(0..2000).map(|_| task("r").queue("rl")).collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    queue::set_rate_limit(&t.db, RateScope::Queue, "rl", Rate::per_second(50.0))
        .await
        .unwrap();
    let mut clients = Vec::new();
    for i in 0..3 {
        let pool = WorkerPool::builder()
            .queue("rl")
            .concurrency(8)
            .poll_interval(Duration::from_millis(50))
            .handler("r", |_ctx, _p: serde_json::Value| async move {
                Ok(TaskOutcome::Complete)
            })
            .build()
            .unwrap();
        let cfg = fast_config(&format!("rl-{i}")).build().unwrap();
        clients.push(common::start_client(t.dsn(), cfg, Some(pool)).await);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let from = db_now(&t).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let to = db_now(&t).await;
    let conn = t.db.get().await.unwrap();
    let n: i64 = conn
        .query_one(
            "SELECT count(*) FROM pgcrew.tasks WHERE queue = 'rl' AND claimed_at >= $1 AND claimed_at < $2",
            &[&from, &to],
        )
        .await
        .unwrap()
        .get(0);
    for c in clients {
        c.stop().await.unwrap();
    }
    eprintln!("rate limit: {n} claims in 10 s at 50/s");
    assert!((450..=550).contains(&n), "{n} claims in 10 s at 50/s");
    // Waiting used no attempt.
    assert_eq!(
        scalar(&t, "SELECT count(*) FROM pgcrew.tasks WHERE attempts > 1").await,
        0
    );
}

#[tokio::test]
async fn kind_and_tenant_limits_cap_claims_and_bad_rates_are_refused() {
    let (t, me, conn) = db_with_instance_conn("rk").await;
    let slow = create_tenant(&t, "slow", None).await;
    for _ in 0..20 {
        queue::enqueue(&conn, &task("mail").queue("q1"))
            .await
            .unwrap();
        queue::enqueue(&conn, &task("sms").queue("q2"))
            .await
            .unwrap();
        queue::enqueue(&conn, &task("x").queue("q2").tenant(slow.clone()))
            .await
            .unwrap();
    }
    // 3 mails a minute (burst 3) across queues; tenant `slow` 2 a second, burst 2.
    queue::set_rate_limit(
        &conn,
        RateScope::Kind,
        "mail",
        Rate::per_minute(3.0).burst(3),
    )
    .await
    .unwrap();
    queue::set_rate_limit(&conn, RateScope::Tenant, "slow", Rate::per_second(2.0))
        .await
        .unwrap();
    let qs = vec!["q1".to_string(), "q2".to_string()];
    let got = queue::claim(&conn, &qs, 100, &me).await.unwrap();
    let count = |k: &str| got.iter().filter(|c| c.kind == k).count();
    assert_eq!((count("mail"), count("sms"), count("x")), (3, 20, 2));
    let again = queue::claim(&conn, &qs, 100, &me).await.unwrap();
    assert!(again.is_empty(), "{again:?}");
    let limits = queue::rate_limits(&conn).await.unwrap();
    assert_eq!(limits.len(), 2);
    // Bad input: refused, nothing changed.
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        match queue::set_rate_limit(&conn, RateScope::Queue, "q1", Rate::per_second(bad)).await {
            Err(Error::InvalidInput { field, .. }) => assert_eq!(field, "rate"),
            other => panic!("{bad}: {other:?}"),
        }
    }
    match queue::set_rate_limit(
        &conn,
        RateScope::Queue,
        "q1",
        Rate::per_second(1.0).burst(0),
    )
    .await
    {
        Err(Error::InvalidInput { field, .. }) => assert_eq!(field, "burst"),
        other => panic!("{other:?}"),
    }
    let e = conn
        .query("SELECT pgcrew.set_rate_limit('queue', 'q1', 0)", &[])
        .await
        .unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("PC103"));
    let out = cli(
        t.dsn(),
        ["queues", "rate-limit", "--queue", "q1", "--per-second=0"],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invalid rate"),
        "{out:?}"
    );
    assert_eq!(
        shape(queue::rate_limits(&conn).await.unwrap()),
        shape(limits)
    );
    assert!(
        queue::clear_rate_limit(&conn, RateScope::Kind, "mail")
            .await
            .unwrap()
    );
    let rest = queue::claim(&conn, &qs, 100, &me).await.unwrap();
    assert_eq!(rest.iter().filter(|c| c.kind == "mail").count(), 17);
}

fn shape(v: Vec<queue::RateLimit>) -> Vec<(String, String, f64, i32)> {
    v.into_iter()
        .map(|l| (l.scope, l.name, l.per_second, l.burst))
        .collect()
}

/// V045: `pgcrew.rate_limits`'s rules are a trigger instead of CHECK constraints (a claim's
/// token update no longer prepares them); a row written by plain SQL that breaks one is still
/// refused with 23514 and the constraint's name, and a token update passes.
#[tokio::test]
async fn plain_sql_rate_limit_rows_are_checked_as_before() {
    let t = test_db().await;
    queue::set_rate_limit(&t.db, RateScope::Queue, "cq", Rate::per_second(5.0))
        .await
        .unwrap();
    let conn = t.db.get().await.unwrap();
    for (values, constraint) in [
        ("('sometimes', 'x', 1, 1, 1)", "rate_limits_scope_check"),
        ("('queue', '', 1, 1, 1)", "rate_limits_name_check"),
        ("('queue', 'x', 0, 1, 1)", "rate_limits_per_second_check"),
        ("('queue', 'x', 2e9, 1, 1)", "rate_limits_per_second_check"),
        ("('queue', 'x', 1, 0, 1)", "rate_limits_burst_check"),
    ] {
        let e = conn
            .execute(
                &format!(
                    "INSERT INTO pgcrew.rate_limits (scope, name, per_second, burst, tokens) \
                     VALUES {values}"
                ),
                &[],
            )
            .await
            .unwrap_err();
        let db = e.as_db_error().unwrap();
        assert_eq!(
            (db.code().code(), db.constraint()),
            ("23514", Some(constraint)),
            "{values}"
        );
    }
    let e = conn
        .execute(
            "UPDATE pgcrew.rate_limits SET burst = 0 WHERE name = 'cq'",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(
        e.as_db_error().unwrap().constraint(),
        Some("rate_limits_burst_check")
    );
    conn.execute(
        "UPDATE pgcrew.rate_limits SET tokens = 1, refilled_at = now() WHERE name = 'cq'",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(
        scalar(
            &t,
            "SELECT count(*) FROM pgcrew.rate_limits WHERE name = 'x'"
        )
        .await,
        0
    );
}
