//! The fast limited claim (V035, `sql/queries/queue/claim_fast_limited.sql`): a key limit far
//! from its bound and a queue rate limit are held exactly by it under 16 concurrent claimers
//! that take it first and `pgcrew.claim_tasks` when it steps aside (as the worker pool does);
//! and a pool held back by a key limit is woken when the key frees on another instance, not at
//! its poll.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use pgcrew::queue::{self, NewTask, Rate, RateScope, TaskOutcome, WorkerPool};
use serde_json::json;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::common::{self, fast_config, register_instance, scalar, test_db, wait_until};

/// The fast limited statement the worker pool takes for a queue with a rate or key limit.
const LIMITED: &str = include_str!("../../../sql/queries/queue/claim_fast_limited.sql");
/// The general claim.
const GENERAL: &str = include_str!("../../../sql/queries/queue/claim.sql");

/// One claim as the pool routes it for a queue with limits: the limited statement, then
/// `pgcrew.claim_tasks` when it stepped aside (a row without a task; no row: the queue has no
/// work, and the pool runs nothing more). Returns the (id, token) pairs claimed and whether
/// the limited statement claimed them.
async fn routed_claim(
    conn: &tokio_postgres::Client,
    queue: &str,
    limit: i32,
    me: &str,
) -> (Vec<(i64, Uuid)>, bool) {
    let rows = conn
        .query(LIMITED, &[&queue, &limit, &me, &Uuid::new_v4()])
        .await
        .unwrap();
    let Some(first) = rows.first() else {
        return (Vec::new(), false);
    };
    let fast = first.get::<_, Option<i64>>("id").is_some();
    let rows = if fast {
        rows
    } else {
        let queues = vec![queue.to_string()];
        conn.query(GENERAL, &[&queues, &limit, &me]).await.unwrap()
    };
    (
        rows.iter()
            .map(|r| (r.get("id"), r.get("claim_token")))
            .collect(),
        fast,
    )
}

/// Complete claimed tasks through `pgcrew.ack_tasks`.
async fn complete(conn: &tokio_postgres::Client, got: &[(i64, Uuid)]) {
    let ids: Vec<i64> = got.iter().map(|g| g.0).collect();
    let tokens: Vec<Uuid> = got.iter().map(|g| g.1).collect();
    let outcomes: Vec<&str> = got.iter().map(|_| "complete").collect();
    conn.execute(
        "SELECT pgcrew.ack_tasks($1, $2, $3, NULL, NULL)",
        &[&ids, &tokens, &outcomes],
    )
    .await
    .unwrap();
}

const MAX_PER_KEY: &str = "SELECT coalesce(max(n), 0) FROM (SELECT count(*) AS n FROM pgcrew.tasks
    WHERE state = 'running' AND queue = 'lq' AND payload ? 'c' GROUP BY payload->>'c') c";

/// Mostly one key, limit 4: the fast claim applies while the queue runs few enough tasks, the
/// general claim counts per key otherwise; sampled, no key ever runs more than 4.
#[tokio::test]
async fn limited_fast_claim_holds_a_key_limit_under_sixteen_claimers() {
    let t = test_db().await;
    let me = register_instance(&t, "limited-keys").await;
    let tasks: Vec<NewTask> = (0..400)
        .map(|i| {
            let payload = if i % 5 == 0 {
                json!({"n": i})
            } else {
                json!({"c": i % 7 / 6})
            };
            NewTask::new("k", &payload).unwrap().queue("lq")
        })
        .collect();
    queue::enqueue_many(&t.db, &tasks).await.unwrap();
    queue::set_key_limit(&t.db, "lq", "c", 4).await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(AtomicI64::new(0));
    let sampler = {
        let (db, stop, seen) = (t.db.clone(), stop.clone(), seen.clone());
        tokio::spawn(async move {
            let mut samples = 0;
            while !stop.load(Ordering::SeqCst) {
                let n = scalar(&db, MAX_PER_KEY).await;
                assert!(n <= 4, "{n} tasks of one key running at once");
                seen.fetch_max(n, Ordering::SeqCst);
                samples += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            samples
        })
    };
    let fast_claims = Arc::new(AtomicI64::new(0));
    let claimers: Vec<_> = (0..16)
        .map(|i| {
            let (db, me, fast_claims) = (t.db.clone(), me.clone(), fast_claims.clone());
            tokio::spawn(async move {
                let conn = db.get().await.unwrap();
                let mut idle = 0;
                while idle < 50 {
                    let (got, fast) = routed_claim(&conn, "lq", 1 + i % 3, me.as_str()).await;
                    if got.is_empty() {
                        idle += 1;
                        tokio::time::sleep(Duration::from_millis(3)).await;
                        continue;
                    }
                    idle = 0;
                    if fast {
                        fast_claims.fetch_add(1, Ordering::SeqCst);
                    }
                    tokio::time::sleep(Duration::from_millis(fastrand::u64(1..8))).await;
                    complete(&conn, &got).await;
                }
            })
        })
        .collect();
    for c in claimers {
        c.await.unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    let samples = sampler.await.unwrap();
    assert_eq!(
        scalar(
            &t,
            "SELECT count(*) FROM pgcrew.tasks WHERE state <> 'completed'"
        )
        .await,
        0,
        "every task ran"
    );
    assert!(samples > 50, "{samples} samples");
    assert_eq!(seen.load(Ordering::SeqCst), 4, "the limit was reached");
    let fast = fast_claims.load(Ordering::SeqCst);
    eprintln!("limited fast claims: {fast}");
    assert!(fast > 0, "the fast limited claim took part");
}

/// 200 claims a second, bursts of 20, 16 claimers for 3 s: every window of the claims is
/// within what the bucket allows (its burst plus the rate over the window), and the claimers
/// got close to the rate.
#[tokio::test]
async fn limited_fast_claim_holds_a_rate_limit_under_sixteen_claimers() {
    let t = test_db().await;
    let me = register_instance(&t, "limited-rate").await;
    queue::enqueue_many(
        &t.db,
        &(0..3000)
            .map(|i| NewTask::new("r", &json!({ "i": i })).unwrap().queue("rq"))
            .collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    queue::set_rate_limit(
        &t.db,
        RateScope::Queue,
        "rq",
        Rate::per_second(200.0).burst(20),
    )
    .await
    .unwrap();
    let from: chrono::DateTime<chrono::Utc> =
        t.db.get()
            .await
            .unwrap()
            .query_one(
                "SELECT refilled_at FROM pgcrew.rate_limits WHERE scope = 'queue' AND name = 'rq'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
    let fast_claims = Arc::new(AtomicI64::new(0));
    let until = Instant::now() + Duration::from_secs(3);
    let claimers: Vec<_> = (0..16)
        .map(|i| {
            let (db, me, fast_claims) = (t.db.clone(), me.clone(), fast_claims.clone());
            tokio::spawn(async move {
                let conn = db.get().await.unwrap();
                while Instant::now() < until {
                    let (got, fast) = routed_claim(&conn, "rq", 1 + i % 4, me.as_str()).await;
                    if got.is_empty() {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        continue;
                    }
                    if fast {
                        fast_claims.fetch_add(1, Ordering::SeqCst);
                    }
                    complete(&conn, &got).await;
                }
            })
        })
        .collect();
    for c in claimers {
        c.await.unwrap();
    }
    let conn = t.db.get().await.unwrap();
    // From the bucket's start (full, at `from`) to each claim: at most the burst plus the rate
    // over that time; and in every 1 s window that starts at a claim, at most the burst plus
    // one second's worth (tokens never go below 0). Claims are stamped with their
    // transaction's start, a little before they take their tokens: a token or two of slack.
    let row = conn
        .query_one(
            "SELECT count(*),
                    coalesce(max(x.n_since - (20 + 200 * extract(epoch FROM x.claimed_at - $1))), 0)::float8,
                    (SELECT max((SELECT count(*) FROM pgcrew.tasks y
                                  WHERE y.queue = 'rq' AND y.claimed_at >= z.claimed_at
                                    AND y.claimed_at < z.claimed_at + interval '1 second'))
                       FROM pgcrew.tasks z WHERE z.queue = 'rq' AND z.claimed_at IS NOT NULL)
               FROM (SELECT t.claimed_at,
                            count(*) OVER (ORDER BY t.claimed_at
                                           RANGE BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS n_since
                       FROM pgcrew.tasks t WHERE t.queue = 'rq' AND t.claimed_at IS NOT NULL) x",
            &[&from],
        )
        .await
        .unwrap();
    let (n, over, window): (i64, f64, i64) = (row.get(0), row.get(1), row.get(2));
    let fast = fast_claims.load(Ordering::SeqCst);
    eprintln!(
        "rate limit: {n} claims in 3 s at 200/s (burst 20), largest 1 s window {window}, {fast} fast claims"
    );
    assert!(over <= 2.0, "{over} claims beyond the bucket");
    assert!(window <= 222, "{window} claims in one second");
    assert!(n >= 400, "{n} claims in 3 s at 200/s");
    assert!(fast > 0, "the fast limited claim took part");
}

/// Key limit 1: the first instance's pool runs a task of key c=1, the second instance's pool
/// (polling only every 30 s) has the next task of that key and waits. When the first task
/// finishes (the first instance stopping, so it claims nothing more), the second pool is
/// woken by the acknowledgement and claims well before its poll.
#[tokio::test]
async fn a_pool_held_back_by_a_key_is_woken_when_the_key_frees_elsewhere() {
    let t = test_db().await;
    queue::set_key_limit(&t.db, "kw", "c", 1).await.unwrap();
    queue::enqueue(
        &t.db,
        &NewTask::new("hold", &json!({"c": 1})).unwrap().queue("kw"),
    )
    .await
    .unwrap();
    let release = Arc::new(Notify::new());
    let pool = |release: Arc<Notify>| {
        WorkerPool::builder()
            .queue("kw")
            .concurrency(1)
            .poll_interval(Duration::from_secs(30))
            .handler("hold", move |_ctx, _p: serde_json::Value| {
                let release = release.clone();
                async move {
                    release.notified().await;
                    Ok(TaskOutcome::Complete)
                }
            })
            .handler("next", |_ctx, _p: serde_json::Value| async move {
                Ok(TaskOutcome::Complete)
            })
            .build()
            .unwrap()
    };
    let config = |id: &str| {
        fast_config(id)
            .notify_poll_interval(Duration::from_secs(60))
            .build()
            .unwrap()
    };
    let first =
        common::start_client(t.dsn(), config("key-first"), Some(pool(release.clone()))).await;
    wait_until(Duration::from_secs(20), "the first pool runs the task", || async {
        scalar(
            &t,
            "SELECT count(*) FROM pgcrew.tasks WHERE state = 'running' AND claimed_by = 'key-first'",
        )
        .await
            == 1
    })
    .await;
    let second =
        common::start_client(t.dsn(), config("key-second"), Some(pool(release.clone()))).await;
    queue::enqueue(
        &t.db,
        &NewTask::new("next", &json!({"c": 1})).unwrap().queue("kw"),
    )
    .await
    .unwrap();
    // The second pool found the key full and waits for work (registered as a waiter).
    wait_until(Duration::from_secs(20), "the second pool waits", || async {
        scalar(
            &t,
            "SELECT count(*) FROM pgcrew.queue_waiters WHERE queue = 'kw'",
        )
        .await
            == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        scalar(
            &t,
            "SELECT count(*) FROM pgcrew.tasks WHERE kind = 'next' AND state = 'available'"
        )
        .await,
        1
    );
    // Stop the first instance (its pool claims nothing more), then let its task finish.
    let released = Instant::now();
    tokio::join!(async { first.stop().await.unwrap() }, async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        release.notify_one();
    });
    wait_until(
        Duration::from_secs(10),
        "the second pool ran the next task (woken, not polled)",
        || async {
            scalar(
                &t,
                "SELECT count(*) FROM pgcrew.tasks WHERE kind = 'next' AND state = 'completed' \
                 AND claimed_by = 'key-second'",
            )
            .await
                == 1
        },
    )
    .await;
    eprintln!(
        "next task of the key completed {:?} after the release (poll interval 30 s)",
        released.elapsed()
    );
    second.stop().await.unwrap();
}

/// The limited statement on a key- and rate-limited queue with no available task locks and
/// writes nothing (no transaction id; it used to lock the feature row and the bucket on every
/// idle claim), and tells "no work" (no row: the pool skips `pgcrew.claim_tasks`) from
/// "stepped aside" (one row without a task: a delayed task due to promote, a paused queue).
#[tokio::test]
async fn limited_claim_tells_no_work_from_stepping_aside_and_locks_nothing_when_idle() {
    let t = test_db().await;
    let me = register_instance(&t, "limited-idle").await;
    queue::set_key_limit(&t.db, "iq", "c", 10).await.unwrap();
    queue::set_rate_limit(
        &t.db,
        RateScope::Queue,
        "iq",
        Rate::per_second(100.0).burst(100),
    )
    .await
    .unwrap();
    let mut conn = t.db.get().await.unwrap();
    // (rows, rows with a task, whether the statement took a transaction id); rolled back.
    let mut limited = async || {
        let tx = conn.transaction().await.unwrap();
        let rows = tx
            .query(LIMITED, &[&"iq", &4i32, &me.as_str(), &Uuid::new_v4()])
            .await
            .unwrap();
        let xid: bool = tx
            .query_one("SELECT pg_current_xact_id_if_assigned() IS NOT NULL", &[])
            .await
            .unwrap()
            .get(0);
        tx.rollback().await.unwrap();
        let tasks = rows
            .iter()
            .filter(|r| r.get::<_, Option<i64>>("id").is_some())
            .count();
        assert!(rows.iter().all(|r| r.get::<_, bool>("limited")));
        (rows.len(), tasks, xid)
    };
    assert_eq!(
        limited().await,
        (0, 0, false),
        "no work: no row, nothing locked"
    );
    let due = "INSERT INTO pgcrew.tasks (queue, kind, state, run_at)
               VALUES ('iq', 'k', 'scheduled', now() - interval '1 second')";
    t.db.get().await.unwrap().execute(due, &[]).await.unwrap();
    assert_eq!(
        limited().await,
        (1, 0, false),
        "a due delayed task: stepped aside (pgcrew.claim_tasks promotes it)"
    );
    t.db.get()
        .await
        .unwrap()
        .execute("DELETE FROM pgcrew.tasks WHERE queue = 'iq'", &[])
        .await
        .unwrap();
    queue::enqueue(
        &t.db,
        &NewTask::new("k", &json!({"c": 1})).unwrap().queue("iq"),
    )
    .await
    .unwrap();
    queue::pause(&t.db, "iq", None).await.unwrap();
    let (rows, tasks, _) = limited().await;
    assert_eq!((rows, tasks), (1, 0), "paused with work: stepped aside");
    queue::resume(&t.db, "iq", None).await.unwrap();
    assert_eq!(limited().await, (1, 1, true), "claims the available task");
}

/// A worker pool on a key-limited queue runs its tasks one at a time, going idle after each:
/// its idle claims run no `pgcrew.claim_tasks` (which raises the feature row's `claims`
/// counter on every call, under the queue's lock), so the counter rises once per task claimed
/// rather than also once per idle claim (before: at least twice per task).
#[tokio::test]
async fn an_idle_pool_on_a_limited_queue_skips_the_general_claim() {
    let t = test_db().await;
    queue::set_key_limit(&t.db, "gq", "c", 100).await.unwrap();
    let pool = WorkerPool::builder()
        .queue("gq")
        .concurrency(1)
        .prefetch(0)
        .poll_interval(Duration::from_secs(30))
        .handler("k", |_ctx, _p: serde_json::Value| async move {
            Ok(TaskOutcome::Complete)
        })
        .build()
        .unwrap();
    let client = common::start_client(
        t.dsn(),
        fast_config("idle-general").build().unwrap(),
        Some(pool),
    )
    .await;
    let claims = "SELECT claims FROM pgcrew.claim_features WHERE queue = 'gq'";
    let run_one = async |i: i64| {
        queue::enqueue(
            &t.db,
            &NewTask::new("k", &json!({ "c": i })).unwrap().queue("gq"),
        )
        .await
        .unwrap();
        wait_until(Duration::from_secs(20), "the task ran", || async {
            scalar(
                &t,
                "SELECT count(*) FROM pgcrew.tasks WHERE queue = 'gq' AND state = 'completed'",
            )
            .await
                == i + 1
        })
        .await;
    };
    // The first tasks teach the pool's route that the queue has features.
    for i in 0..3 {
        run_one(i).await;
    }
    let before = scalar(&t, claims).await;
    const N: i64 = 20;
    for i in 3..3 + N {
        run_one(i).await;
    }
    let raised = scalar(&t, claims).await - before;
    eprintln!("claims counter raised {raised} times for {N} tasks");
    assert!(
        raised < N + N / 2,
        "the counter rose {raised} times for {N} tasks: idle claims ran pgcrew.claim_tasks"
    );
    client.stop().await.unwrap();
}

/// The plain one-statement claim (a queue without features).
const PLAIN: &str = include_str!("../../../sql/queries/queue/claim_fast.sql");

/// Issue #21, wake-up with limits: a limited claim of one task writes the bucket row and the
/// feature row once each, so it writes two WAL records more than the plain claim of one task
/// (which locks and updates the task, as the limited one does). It wrote four more: each row
/// was locked (`FOR UPDATE SKIP LOCKED`: a heap change and a WAL record of its own) and then
/// updated. Counted with `pg_stat_statements` on a throwaway cluster
/// (`PGCREW_TEST_CLUSTER_PORT` fixes its port); the tokens taken are exactly the tasks claimed.
#[tokio::test]
async fn a_limited_claim_writes_each_limit_row_once() {
    let (_cluster, _scratch, db) = common::statements_db("limited_wal").await;
    let me = register_instance(&db, "limited-wal").await;
    queue::set_key_limit(&db, "wq", "c", 1000).await.unwrap();
    queue::set_rate_limit(
        &db,
        RateScope::Queue,
        "wq",
        Rate::per_second(0.001).burst(1000),
    )
    .await
    .unwrap();
    let conn = db.get().await.unwrap();
    const N: i64 = 20;
    for (queue, statement) in [("wq", LIMITED), ("pq", PLAIN)] {
        for i in 0..N {
            queue::enqueue(
                &db,
                &NewTask::new("k", &json!({ "c": i })).unwrap().queue(queue),
            )
            .await
            .unwrap();
            let rows = conn
                .query(statement, &[&queue, &4i32, &me.as_str(), &Uuid::new_v4()])
                .await
                .unwrap();
            let got: Vec<(i64, Uuid)> = rows
                .iter()
                .filter_map(|r| Some((r.get::<_, Option<i64>>("id")?, r.get("claim_token"))))
                .collect();
            assert_eq!(got.len(), 1, "{queue}: the task claimed in one statement");
            complete(&conn, &got).await;
        }
    }
    let tokens = scalar(
        &db,
        "SELECT floor(tokens)::bigint FROM pgcrew.rate_limits WHERE name = 'wq'",
    )
    .await;
    assert_eq!(tokens, 1000 - N, "one token per task claimed");
    let wal = async |marker: &str| {
        let row = conn
            .query_one(
                "SELECT sum(s.calls)::bigint, sum(s.wal_records)::bigint
                   FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
                  WHERE d.datname = current_database() AND s.query LIKE $1",
                &[&format!("%{marker}%")],
            )
            .await
            .unwrap();
        (row.get::<_, i64>(0), row.get::<_, i64>(1))
    };
    let (limited_calls, limited_wal) = wal("that has a rate limit or a key limit (V035)").await;
    let (plain_calls, plain_wal) = wal("claim for a single queue, in one round trip").await;
    eprintln!(
        "WAL records per claim of one task: limited {:.2}, plain {:.2}",
        limited_wal as f64 / limited_calls as f64,
        plain_wal as f64 / plain_calls as f64
    );
    assert_eq!((limited_calls, plain_calls), (N, N));
    // Two rows written once each: 2 records per claim (4 before); a page pruned on the way
    // may add one now and then.
    assert!(
        limited_wal - plain_wal <= 2 * N + N / 4,
        "{limited_wal} WAL records for {N} limited claims, {plain_wal} for {N} plain ones"
    );
}

/// A pool that runs out of work through `pgcrew.claim_tasks` (the general claim it uses until
/// then) runs it once on the empty queue, which locks the rate-limit bucket and writes nothing.
/// That finished lock holds nothing: the next wake-up's fast limited claim takes the task (it
/// stepped aside to `pgcrew.claim_tasks` on every wake-up before: two claims each, found by
/// `bench queue --with-limits`). A lock of a transaction still open makes it step aside, as
/// before, without waiting.
#[tokio::test]
async fn a_finished_lock_on_the_bucket_does_not_turn_the_fast_claim_aside() {
    let t = test_db().await;
    let me = register_instance(&t, "limited-lock").await;
    queue::set_key_limit(&t.db, "fq", "c", 1000).await.unwrap();
    queue::set_rate_limit(
        &t.db,
        RateScope::Queue,
        "fq",
        Rate::per_second(1e6).burst(1_000_000),
    )
    .await
    .unwrap();
    let conn = t.db.get().await.unwrap();
    let queues = vec!["fq".to_string()];
    let limited = async |conn: &tokio_postgres::Client| {
        let rows = conn
            .query(LIMITED, &[&"fq", &4i32, &me.as_str(), &Uuid::new_v4()])
            .await
            .unwrap();
        rows.iter()
            .map(|r| r.get::<_, Option<i64>>("id"))
            .collect::<Vec<_>>()
    };
    let enqueue = async |c: i64| {
        queue::enqueue(
            &t.db,
            &NewTask::new("k", &json!({ "c": c })).unwrap().queue("fq"),
        )
        .await
        .unwrap()
    };
    // The general claim on the empty queue: it locks the bucket and claims nothing.
    let none = conn
        .query(GENERAL, &[&queues, &4i32, &me.as_str()])
        .await
        .unwrap();
    assert!(none.is_empty());
    let (xmin, xmax): (String, String) = {
        let r = conn
            .query_one(
                "SELECT xmin::text, xmax::text FROM pgcrew.rate_limits WHERE name = 'fq'",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert!(
        xmax != "0" && xmax != xmin,
        "the empty general claim left its lock on the bucket ({xmin}, {xmax})"
    );
    let id = enqueue(1).await;
    assert_eq!(
        limited(&conn).await,
        vec![Some(id.id.0)],
        "the fast limited claim took the task"
    );

    // A lock held by an open transaction: step aside (one row without a task), not wait.
    let mut holder = t.db.get().await.unwrap();
    let tx = holder.transaction().await.unwrap();
    tx.execute(
        "SELECT FROM pgcrew.rate_limits WHERE name = 'fq' FOR UPDATE",
        &[],
    )
    .await
    .unwrap();
    let id = enqueue(2).await;
    let aside = tokio::time::timeout(Duration::from_secs(5), limited(&conn))
        .await
        .expect("the fast limited claim waited for the bucket's lock");
    assert_eq!(aside, vec![None], "stepped aside while the bucket is held");
    tx.commit().await.unwrap();
    assert_eq!(
        limited(&conn).await,
        vec![Some(id.id.0)],
        "after the holder finished, the fast limited claim took the task"
    );
}
