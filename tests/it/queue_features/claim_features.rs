//! The claims with queue features configured (V031): the fast claim steps aside exactly while
//! a pause, key limit or rate limit may apply to its queue (read from `pgcrew.claim_features`,
//! kept by triggers), and applies again once they are gone; a key limit far from its bound
//! skips the per-key counts, and stays exact where the counting starts again; an idle pool
//! held back by a rate limit claims when the next token comes, not at its poll.

use std::time::Duration;

use pgcrew::queue::{self, AckOutcome, NewTask, Rate, RateScope, TaskOutcome, WorkerPool};
use pgcrew::{Db, InstanceId};
use serde_json::json;
use uuid::Uuid;

use crate::common::{
    self, create_tenant, db_with_instance_conn, fast_config, scalar, task, test_db, wait_until,
};

/// The fast statement `queue::claim` runs first for a single queue.
const FAST: &str = include_str!("../../../sql/queries/queue/claim_fast.sql");
/// The fast statement a worker pool runs for a queue with a rate or key limit (V035).
const LIMITED: &str = include_str!("../../../sql/queries/queue/claim_fast_limited.sql");

/// Whether the fast statement claims one task of `queue` now (the claim is rolled back).
async fn fast_claims(db: &Db, queue: &str, me: &InstanceId) -> bool {
    claims_with(FAST, db, queue, me).await
}

/// Whether the fast limited statement claims one task of `queue` now (rolled back).
async fn limited_claims(db: &Db, queue: &str, me: &InstanceId) -> bool {
    claims_with(LIMITED, db, queue, me).await
}

async fn claims_with(statement: &str, db: &Db, queue: &str, me: &InstanceId) -> bool {
    let mut conn = db.get().await.unwrap();
    let tx = conn.transaction().await.unwrap();
    let rows = tx
        .query(statement, &[&queue, &1i32, &me.as_str(), &Uuid::new_v4()])
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    // The limited statement returns a row without a task when it steps aside.
    rows.iter().any(|r| r.get::<_, Option<i64>>("id").is_some())
}

#[tokio::test]
async fn fast_claim_steps_aside_exactly_while_a_feature_may_apply() {
    let (t, me, conn) = db_with_instance_conn("features").await;
    let other = create_tenant(&t, "other", None).await;
    for _ in 0..3 {
        queue::enqueue(&conn, &task("k").queue("fq")).await.unwrap();
        queue::enqueue(&conn, &task("k").queue("elsewhere").tenant(other.clone()))
            .await
            .unwrap();
    }
    assert!(fast_claims(&t, "fq", &me).await, "nothing configured");
    assert!(limited_claims(&t, "fq", &me).await, "nothing configured");
    let rows = "SELECT count(*) FROM pgcrew.claim_features";

    // Each feature in turn: set, the fast claim steps aside (pgcrew.claim_tasks's job); clear,
    // it applies again and no feature row is left.
    queue::pause(&conn, "fq", None).await.unwrap();
    assert!(!fast_claims(&t, "fq", &me).await, "queue paused");
    assert!(!limited_claims(&t, "fq", &me).await, "queue paused");
    queue::resume(&conn, "fq", None).await.unwrap();
    assert!(fast_claims(&t, "fq", &me).await, "queue resumed");

    queue::pause(&conn, "fq", Some(&other)).await.unwrap();
    assert!(
        !fast_claims(&t, "fq", &me).await,
        "a tenant of the queue paused"
    );
    assert!(
        !limited_claims(&t, "fq", &me).await,
        "a tenant of the queue paused"
    );
    queue::resume(&conn, "fq", Some(&other)).await.unwrap();
    assert!(fast_claims(&t, "fq", &me).await, "tenant resumed");

    queue::set_key_limit(&conn, "fq", "customer", 3)
        .await
        .unwrap();
    assert!(!fast_claims(&t, "fq", &me).await, "key limit");
    // Far from its bound (none running, a claim of 1, limit 3): the limited statement claims.
    assert!(
        limited_claims(&t, "fq", &me).await,
        "key limit far from its bound"
    );
    assert!(queue::clear_key_limit(&conn, "fq").await.unwrap());
    assert!(fast_claims(&t, "fq", &me).await, "key limit cleared");

    for (scope, name) in [
        (RateScope::Queue, "fq"),
        (RateScope::Kind, "some-kind"),
        (RateScope::Tenant, "some-tenant"),
    ] {
        queue::set_rate_limit(&conn, scope, name, Rate::per_second(5.0))
            .await
            .unwrap();
        assert!(!fast_claims(&t, "fq", &me).await, "{scope:?} rate limit");
        // A queue's tokens are taken by the limited statement; kind and tenant limits are
        // pgcrew.claim_tasks's.
        assert_eq!(
            limited_claims(&t, "fq", &me).await,
            scope == RateScope::Queue,
            "{scope:?} rate limit"
        );
        // Replacing a limit keeps it (the trigger is on the key, not on the tokens).
        queue::set_rate_limit(&conn, scope, name, Rate::per_second(7.0))
            .await
            .unwrap();
        assert!(
            !fast_claims(&t, "fq", &me).await,
            "{scope:?} rate limit replaced"
        );
        assert!(queue::clear_rate_limit(&conn, scope, name).await.unwrap());
        assert!(
            fast_claims(&t, "fq", &me).await,
            "{scope:?} rate limit cleared"
        );
    }
    assert_eq!(scalar(&t, rows).await, 0);

    // Features of another queue leave this one on the fast claim.
    queue::pause(&conn, "elsewhere", None).await.unwrap();
    queue::set_key_limit(&conn, "elsewhere", "customer", 1)
        .await
        .unwrap();
    queue::set_rate_limit(&conn, RateScope::Queue, "elsewhere", Rate::per_second(1.0))
        .await
        .unwrap();
    assert!(
        fast_claims(&t, "fq", &me).await,
        "features of another queue"
    );
    assert!(!fast_claims(&t, "elsewhere", &me).await);
    // One row for the queue's three features; it goes with the last of them.
    assert_eq!(scalar(&t, rows).await, 1);
    queue::resume(&conn, "elsewhere", None).await.unwrap();
    assert!(queue::clear_key_limit(&conn, "elsewhere").await.unwrap());
    assert_eq!(scalar(&t, rows).await, 1, "the rate limit remains");
    assert!(
        queue::clear_rate_limit(&conn, RateScope::Queue, "elsewhere")
            .await
            .unwrap()
    );
    assert_eq!(scalar(&t, rows).await, 0);
}

/// A tenant's pause goes with the tenant (ON DELETE CASCADE): its feature row too.
#[tokio::test]
async fn a_cascaded_pause_delete_clears_the_feature_row() {
    let (t, me, conn) = db_with_instance_conn("features-cascade").await;
    let gone = create_tenant(&t, "gone", None).await;
    queue::enqueue(&conn, &task("k").queue("cq")).await.unwrap();
    queue::pause(&conn, "cq", Some(&gone)).await.unwrap();
    assert!(!fast_claims(&t, "cq", &me).await);
    conn.execute("DELETE FROM pgcrew.tenants WHERE id = 'gone'", &[])
        .await
        .unwrap();
    assert!(fast_claims(&t, "cq", &me).await);
}

/// Five tasks of one key, limit 3. A claim of 2 with none running cannot reach the limit (the
/// counts are skipped); a second claim of 2 with 2 running could (counted: one fits); then
/// nothing fits until an acknowledgement frees room for exactly one.
#[tokio::test]
async fn key_limit_stays_exact_where_the_counting_starts() {
    let (t, me, conn) = db_with_instance_conn("keys-edge").await;
    let tasks: Vec<NewTask> = (0..5)
        .map(|_| {
            NewTask::new("k", &json!({"customer": 7}))
                .unwrap()
                .queue("ke")
        })
        .collect();
    queue::enqueue_many(&conn, &tasks).await.unwrap();
    queue::set_key_limit(&conn, "ke", "customer", 3)
        .await
        .unwrap();
    let qs = vec!["ke".to_string()];
    let first = queue::claim(&conn, &qs, 2, &me).await.unwrap();
    assert_eq!(first.len(), 2, "far from the limit");
    let second = queue::claim(&conn, &qs, 2, &me).await.unwrap();
    assert_eq!(second.len(), 1, "one more fits under the limit");
    assert!(queue::claim(&conn, &qs, 1, &me).await.unwrap().is_empty());
    let running = "SELECT count(*) FROM pgcrew.tasks WHERE state = 'running'";
    assert_eq!(scalar(&t, running).await, 3);
    queue::ack(&conn, &[first[0].ack(AckOutcome::Complete)])
        .await
        .unwrap();
    assert_eq!(queue::claim(&conn, &qs, 5, &me).await.unwrap().len(), 1);
    assert_eq!(scalar(&t, running).await, 3);
}

/// Four tasks, 2 a second (burst 1), a pool polling every 60 s: the tasks after the first wait
/// for tokens, and the idle pool wakes for each token (`next_due`) instead of at its poll, so
/// all four finish in well under a poll interval.
#[tokio::test]
async fn a_rate_limited_idle_pool_claims_when_the_next_token_comes() {
    let t = test_db().await;
    queue::enqueue_many(
        &t.db,
        &(0..4).map(|_| task("r").queue("tok")).collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    queue::set_rate_limit(
        &t.db,
        RateScope::Queue,
        "tok",
        Rate::per_second(2.0).burst(1),
    )
    .await
    .unwrap();
    let pool = WorkerPool::builder()
        .queue("tok")
        .concurrency(2)
        .poll_interval(Duration::from_secs(60))
        .handler("r", |_ctx, _p: serde_json::Value| async move {
            Ok(TaskOutcome::Complete)
        })
        .build()
        .unwrap();
    let cfg = fast_config("tok")
        .notify_poll_interval(Duration::from_secs(60))
        .build()
        .unwrap();
    let client = common::start_client(t.dsn(), cfg, Some(pool)).await;
    wait_until(
        Duration::from_secs(20),
        "every task ran (woken by the tokens)",
        || async {
            scalar(
                &t,
                "SELECT count(*) FROM pgcrew.tasks WHERE state = 'completed'",
            )
            .await
                == 4
        },
    )
    .await;
    client.stop().await.unwrap();
}
