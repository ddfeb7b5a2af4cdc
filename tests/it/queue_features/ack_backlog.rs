//! Acknowledgements that fall behind (found by `bench queue --with-limits`, V046): an
//! acknowledgement of a key-limited queue counts the queue's running tasks once per batch, not
//! once per key of the batch; a worker pool whose acknowledgements are slow to apply stops
//! claiming instead of piling up running tasks behind them, and keeps heartbeating the tasks
//! whose acknowledgement waits, so none is rescued and run again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use pgcrew::queue::{self, NewTask, TaskOutcome, WorkerPool};
use serde_json::json;

use crate::common::{fast_config, register_instance, scalar, start_client, test_db, wait_until};

/// Rows of `pgcrew.tasks` read in the current transaction (sequential and by index).
const TASK_ROWS_READ: &str =
    "SELECT (coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0))::bigint
    FROM pg_stat_xact_user_tables WHERE schemaname = 'pgcrew' AND relname = 'tasks'";

/// 1,000 running tasks of a key-limited queue, each its own key, acknowledged in one batch
/// while 1,000 more run: the acknowledgement reads the batch and the running tasks once each
/// (V035 read the running tasks once per key of the batch: about a million rows).
#[tokio::test]
async fn an_acknowledgement_counts_the_running_keys_once_per_batch() {
    let t = test_db().await;
    let me = register_instance(&t.db, "acks").await;
    queue::set_key_limit(&t.db, "ak", "c", 2000).await.unwrap();
    let tasks: Vec<NewTask> = (0..2000)
        .map(|i| NewTask::new("k", &json!({ "c": i })).unwrap().queue("ak"))
        .collect();
    queue::enqueue_many(&t.db, &tasks).await.unwrap();
    let conn = t.db.get().await.unwrap();
    let queues = vec!["ak".to_string()];
    let mut claimed = Vec::new();
    while claimed.len() < 2000 {
        let got = queue::claim(&conn, &queues, 500, &me).await.unwrap();
        assert!(!got.is_empty(), "claimed only {} of 2000", claimed.len());
        claimed.extend(got);
    }
    let batch = &claimed[..1000];
    let ids: Vec<i64> = batch.iter().map(|c| c.id.0).collect();
    let tokens: Vec<uuid::Uuid> = batch.iter().map(|c| c.token.0).collect();
    let outcomes: Vec<&str> = batch.iter().map(|_| "complete").collect();
    conn.batch_execute("BEGIN").await.unwrap();
    let before = conn
        .query_one(TASK_ROWS_READ, &[])
        .await
        .unwrap()
        .get::<_, i64>(0);
    let acked = conn
        .query(
            "SELECT * FROM pgcrew.ack_tasks($1, $2, $3, NULL, NULL)",
            &[&ids, &tokens, &outcomes],
        )
        .await
        .unwrap();
    let read = conn
        .query_one(TASK_ROWS_READ, &[])
        .await
        .unwrap()
        .get::<_, i64>(0)
        - before;
    conn.batch_execute("COMMIT").await.unwrap();
    assert_eq!(acked.len(), 1000);
    assert!(
        read < 20_000,
        "acknowledging 1,000 tasks beside 1,000 running read {read} task rows"
    );
    assert_eq!(
        scalar(
            &t.db,
            "SELECT count(*) FROM pgcrew.tasks WHERE queue = 'ak' AND state = 'completed'"
        )
        .await,
        1000
    );
}

/// Every completion takes 1 ms to write (a trigger: a database slow to take
/// acknowledgements while claims go through). The pool runs 8,000 no-op tasks: it never has
/// more running than two acknowledgement batches and its capacity (before: all 8,000 were
/// claimed within a second or two), and no task is rescued while its acknowledgement waits
/// (before: the tasks at the back of the queue of acknowledgements were not heartbeated).
#[tokio::test]
async fn a_pool_stops_claiming_while_its_acknowledgements_wait() {
    let t = test_db().await;
    t.db.get()
        .await
        .unwrap()
        .batch_execute(
            "CREATE FUNCTION public.slow_completion() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN PERFORM pg_sleep(0.001); RETURN NEW; END $$;
             CREATE TRIGGER slow_completion BEFORE UPDATE ON pgcrew.tasks FOR EACH ROW
               WHEN (NEW.state = 'completed') EXECUTE FUNCTION public.slow_completion();",
        )
        .await
        .unwrap();
    let tasks: Vec<NewTask> = (0..8000)
        .map(|i| {
            NewTask::new("noop", &json!({ "i": i }))
                .unwrap()
                .queue("slow")
        })
        .collect();
    queue::enqueue_many(&t.db, &tasks).await.unwrap();
    let pool = WorkerPool::builder()
        .queue("slow")
        .concurrency(4)
        .prefetch(100)
        .heartbeat_interval(Duration::from_millis(300))
        .handler("noop", |_ctx, _p: serde_json::Value| async move {
            Ok(TaskOutcome::Complete)
        })
        .build()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let most = Arc::new(AtomicI64::new(0));
    let sampler = {
        let (db, stop, most) = (t.db.clone(), stop.clone(), most.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let n = scalar(
                    &db,
                    "SELECT count(*) FROM pgcrew.tasks WHERE queue = 'slow' AND state = 'running'",
                )
                .await;
                most.fetch_max(n, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let config = fast_config("slow-acks")
        .task_heartbeat_timeout(Duration::from_secs(4))
        .build()
        .unwrap();
    let client = start_client(t.dsn(), config, Some(pool)).await;
    wait_until(Duration::from_secs(90), "every task completed", || async {
        scalar(
            &t.db,
            "SELECT count(*) FROM pgcrew.tasks WHERE queue = 'slow' AND state = 'completed'",
        )
        .await
            == 8000
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    sampler.await.unwrap();
    client.stop().await.unwrap();
    let most = most.load(Ordering::SeqCst);
    assert!(
        most <= 2200,
        "{most} tasks running at once behind slow acknowledgements (at most 2,000 waiting \
         acknowledgements and the pool's 104 slots)"
    );
    let again =
        t.db.get()
            .await
            .unwrap()
            .query(
                "SELECT count(*), min(last_error) FROM pgcrew.tasks
              WHERE queue = 'slow' AND attempts > 1",
                &[],
            )
            .await
            .unwrap();
    let (n, error): (i64, Option<String>) = (again[0].get(0), again[0].get(1));
    assert_eq!(
        n, 0,
        "tasks rescued and run again while their acknowledgements waited (one: {error:?})"
    );
}
