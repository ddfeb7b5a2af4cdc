//! Pausing a queue: no claim starts after `pause` returns (sampled under a steady producer, on
//! both claim paths), resume wakes idle pools through NOTIFY, tenant pauses leave other tenants.

use std::time::Duration;

use chrono::{DateTime, Utc};
use pgcrew::queue::{self, TaskOutcome, WorkerPool};

use crate::common::{
    self, create_tenant, db_with_instance_conn, fast_config, scalar, task, test_db, wait_until,
};

async fn db_now(t: &pgcrew::Db) -> DateTime<Utc> {
    let conn = t.get().await.unwrap();
    conn.query_one("SELECT clock_timestamp()", &[])
        .await
        .unwrap()
        .get(0)
}

async fn claimed_after(t: &pgcrew::Db, at: DateTime<Utc>) -> i64 {
    let conn = t.get().await.unwrap();
    conn.query_one(
        "SELECT count(*) FROM pgcrew.tasks WHERE queue = 'pq' AND claimed_at > $1",
        &[&at],
    )
    .await
    .unwrap()
    .get(0)
}

/// A pool works a queue fed every 2 ms. Three times: pause, then for half a second no task of
/// the queue is claimed by a claim that started after `pause` returned, though work waits;
/// resume, and the idle pool (30 s fallback poll) claims again at once: woken by the NOTIFY.
#[tokio::test]
async fn no_claim_starts_after_pause_and_resume_wakes_the_pool() {
    let t = test_db().await;
    let pool = WorkerPool::builder()
        .queue("pq")
        .concurrency(4)
        .poll_interval(Duration::from_secs(30))
        .handler("w", |_ctx, _p: serde_json::Value| async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            Ok(TaskOutcome::Complete)
        })
        .build()
        .unwrap();
    let client = common::start_client(
        t.dsn(),
        fast_config("pauser").build().unwrap(),
        Some(pool.clone()),
    )
    .await;
    let producer_db = t.db.clone();
    let producer = tokio::spawn(async move {
        loop {
            let _ = queue::enqueue(&producer_db, &task("w").queue("pq")).await;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    wait_until(
        Duration::from_secs(10),
        "the pool works the queue",
        || async {
            scalar(
                &t,
                "SELECT count(*) FROM pgcrew.tasks WHERE state = 'completed'",
            )
            .await
                > 20
        },
    )
    .await;
    for round in 0..3 {
        assert!(queue::pause(&t.db, "pq", None).await.unwrap());
        let paused_at = db_now(&t).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            claimed_after(&t, paused_at).await,
            0,
            "round {round}: a claim started after pause returned"
        );
        let waiting = scalar(
            &t,
            "SELECT count(*) FROM pgcrew.tasks WHERE queue = 'pq' AND state = 'available'",
        )
        .await;
        assert!(
            waiting > 10,
            "round {round}: work waits while paused ({waiting})"
        );
        let depth = queue::queues(&t.db).await.unwrap();
        assert!(depth.iter().any(|d| d.queue == "pq" && d.paused));
        let resumed_at = db_now(&t).await;
        assert!(queue::resume(&t.db, "pq", None).await.unwrap());
        // Far below the 30 s fallback poll: the resume's NOTIFY woke the pool.
        wait_until(
            Duration::from_secs(3),
            "claims resume after resume",
            || async { claimed_after(&t, resumed_at).await > 0 },
        )
        .await;
        let conn = t.db.get().await.unwrap();
        let ms: f64 = conn
            .query_one(
                "SELECT (extract(epoch FROM min(claimed_at) - $1) * 1000)::float8 FROM pgcrew.tasks WHERE queue = 'pq' AND claimed_at > $1",
                &[&resumed_at],
            )
            .await
            .unwrap()
            .get(0);
        eprintln!("round {round}: first claim {ms:.1} ms after resume was called");
    }
    producer.abort();
    assert!(
        !queue::resume(&t.db, "pq", None).await.unwrap(),
        "not paused any more"
    );
    client.stop().await.unwrap();
}

/// On the claim API: a tenant's pause leaves the other tenants' tasks claimable (general
/// path), the paused tenant alone gets nothing (fast path), and a queue-wide pause stops both.
#[tokio::test]
async fn tenant_and_queue_pauses_on_both_claim_paths() {
    let (t, me, conn) = db_with_instance_conn("claimer").await;
    let a = create_tenant(&t, "ta", None).await;
    let b = create_tenant(&t, "tb", None).await;
    for tenant in [&a, &b] {
        for _ in 0..3 {
            queue::enqueue(&conn, &task("k").queue("tq").tenant(tenant.clone()))
                .await
                .unwrap();
        }
    }
    let q = vec!["tq".to_string()];
    assert!(queue::pause(&conn, "tq", Some(&a)).await.unwrap());
    assert!(
        !queue::pause(&conn, "tq", Some(&a)).await.unwrap(),
        "paused already"
    );
    let got = queue::claim(&conn, &q, 10, &me).await.unwrap();
    assert_eq!(got.len(), 3);
    assert!(got.iter().all(|c| c.tenant == b), "{got:?}");
    // Only the paused tenant has work now: the fast path's case, and it claims nothing.
    assert!(queue::claim(&conn, &q, 10, &me).await.unwrap().is_empty());
    let listed = queue::queues(&conn).await.unwrap();
    let tq = listed.iter().find(|d| d.queue == "tq").unwrap();
    assert_eq!(
        (tq.paused, tq.paused_tenants.clone()),
        (false, vec!["ta".to_string()])
    );
    assert!(queue::resume(&conn, "tq", Some(&a)).await.unwrap());
    // Queue-wide pause, one tenant with work (fast path) and two (general path).
    assert!(queue::pause(&conn, "tq", None).await.unwrap());
    assert!(queue::claim(&conn, &q, 10, &me).await.unwrap().is_empty());
    queue::enqueue(&conn, &task("k").queue("tq").tenant(b.clone()))
        .await
        .unwrap();
    assert!(queue::claim(&conn, &q, 10, &me).await.unwrap().is_empty());
    // A tenant's resume does not lift the queue-wide pause.
    assert!(!queue::resume(&conn, "tq", Some(&a)).await.unwrap());
    assert!(queue::claim(&conn, &q, 10, &me).await.unwrap().is_empty());
    assert!(queue::resume(&conn, "tq", None).await.unwrap());
    assert_eq!(queue::claim(&conn, &q, 10, &me).await.unwrap().len(), 4);
}
