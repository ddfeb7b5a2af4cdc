//! The worker pool: draining on stop, cancellation, retries, timeouts and panics.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use pgcrew::queue::{self, NewTask, RetryPolicy, TaskOutcome, TaskState, WorkerPool};
use pgcrew::{Error, TaskId};
use serde::{Deserialize, Serialize};

use super::{start_client, state_of, wait_state};
use crate::common::{
    COMPLETED_TASKS, RUNNING_TASKS, TestDb, cancel_task, enqueued, retry_task, scalar, task,
    test_db, wait_for, wait_until,
};

#[tokio::test]
async fn stop_drains_in_flight_tasks_and_flushes_acks() {
    let t = test_db().await;
    let pool = WorkerPool::builder()
        .concurrency(4)
        .prefetch(4)
        .handler("slow", |_ctx, _p: serde_json::Value| async move {
            tokio::time::sleep(Duration::from_millis(400)).await;
            Ok(TaskOutcome::Complete)
        })
        .build()
        .unwrap();
    let client = start_client(&t, "drainer", Some(pool.clone()), false).await;
    let conn = t.db.get().await.unwrap();
    queue::enqueue_many(&conn, &(0..8).map(|_| task("slow")).collect::<Vec<_>>())
        .await
        .unwrap();
    wait_for(&t, RUNNING_TASKS)
        .within(Duration::from_secs(5))
        .until(|n| n == 8, "the pool did not claim and prefetch the tasks")
        .await;
    client.stop().await.unwrap();
    // Everything it held ran to completion and was acknowledged before stop returned.
    assert_eq!(scalar(&t, COMPLETED_TASKS).await, 8);
    let m = pool.metrics().snapshot();
    assert_eq!((m.executed, m.succeeded, m.in_flight), (8, 8, 0));
    assert!(m.queue_lag_ms >= 0.0 && m.throughput_per_sec > 0.0);
}

#[derive(Debug, Serialize, Deserialize)]
struct Flaky {
    fail_times: i32,
}

/// Cancelling a running task reaches its handler through `pgcrew_task_cancel_requested`, not
/// at the pool's next heartbeat: with a 10-minute heartbeat interval the token still fires.
/// A repeated request is not announced again.
#[tokio::test]
async fn running_task_cancellation_is_announced_not_left_to_the_heartbeat() {
    let t = test_db().await;
    let seen = Arc::new(AtomicBool::new(false));
    let seen_in = seen.clone();
    let pool = WorkerPool::builder()
        .queue("cancel_me")
        .heartbeat_interval(Duration::from_secs(600))
        .handler("wait", move |ctx, _p: serde_json::Value| {
            flag_on_cancel(&ctx.cancel, &seen_in);
            async move {
                tokio::time::sleep(Duration::from_secs(600)).await;
                Ok(TaskOutcome::Complete)
            }
        })
        .build()
        .unwrap();
    let client = start_client(&t, "canceller", Some(pool.clone()), false).await;
    let mut announcements = client.subscribe(&[pgcrew::EventKind::TaskCancelRequested]);
    let conn = t.db.get().await.unwrap();
    let id = enqueued(&conn, &task("wait").queue("cancel_me").max_attempts(1))
        .await
        .id;
    // Cancelled within 10 s: the cancellation reached the handler before the (10-minute)
    // heartbeat.
    cancel_while_running(&t, id, 2, Duration::from_secs(10), "the task").await;
    assert!(seen.load(Ordering::SeqCst));
    let ev = tokio::time::timeout(Duration::from_secs(5), announcements.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        ev,
        pgcrew::Event::TaskCancelRequested {
            task_id: id,
            instance_id: Some("canceller".into())
        }
    );
    // The second request found the flag already set: no second announcement.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), announcements.recv())
            .await
            .is_err()
    );
    client.stop().await.unwrap();
}

#[tokio::test]
async fn worker_pool_retries_with_backoff_times_out_and_cancels() {
    let t = test_db().await;
    let cancelled_seen = Arc::new(AtomicBool::new(false));
    let seen = cancelled_seen.clone();
    let pool = WorkerPool::builder()
        .concurrency(4)
        .heartbeat_interval(Duration::from_millis(100))
        .poll_interval(Duration::from_millis(200))
        .retry_policy(RetryPolicy {
            base: Duration::from_millis(100),
            factor: 2.0,
            max: Duration::from_secs(1),
            jitter: 0.0,
        })
        .handler("flaky", |ctx, p: Flaky| async move {
            if ctx.attempt <= p.fail_times {
                return Err(format!("attempt {} failed", ctx.attempt).into());
            }
            Ok(TaskOutcome::Complete)
        })
        .handler("slow", |ctx, _p: serde_json::Value| async move {
            if ctx.attempt == 1 {
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
            Ok(TaskOutcome::Complete)
        })
        .handler("forever", move |ctx, _p: serde_json::Value| {
            flag_on_cancel(&ctx.cancel, &seen);
            async move {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok(TaskOutcome::Complete)
            }
        })
        // Panics on every attempt (an attempt is never 0; the condition keeps the completion
        // below reachable for the compiler). It once panicked with a probability of 255/256, so
        // one run in 256 completed the task and failed the wait for its discard.
        .handler("panics", |ctx, _p: serde_json::Value| async move {
            if ctx.attempt > 0 {
                panic!("handler bug");
            }
            Ok(TaskOutcome::Complete)
        })
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let client = start_client(&t, "pool", Some(pool.clone()), false).await;
    let conn = t.db.get().await.unwrap();
    // Before the enqueue: the idle pool may start the first attempt at once.
    let t0 = std::time::Instant::now();
    let flaky = queue::enqueue(
        &conn,
        &NewTask::new("flaky", &Flaky { fail_times: 2 }).unwrap(),
    )
    .await
    .unwrap()
    .id;
    let slow = queue::enqueue(&conn, &task("slow")).await.unwrap().id;
    let panics = queue::enqueue(&conn, &task("panics").max_attempts(1))
        .await
        .unwrap()
        .id;
    let unknown = queue::enqueue(&conn, &task("nobody-handles-this").max_attempts(1))
        .await
        .unwrap()
        .id;
    let bad_payload = queue::enqueue(
        &conn,
        &NewTask::new("flaky", &serde_json::json!({"wrong": true})).unwrap(),
    )
    .await
    .unwrap()
    .id;
    wait_state(
        &t,
        flaky,
        TaskState::Completed,
        Duration::from_secs(10),
        "the flaky task completes after its retries",
    )
    .await;
    // Two failures with 100 ms then 200 ms backoff.
    assert!(t0.elapsed() >= Duration::from_millis(300));
    let row = queue::get(&conn, flaky).await.unwrap();
    assert_eq!(row.attempts, 3);
    assert_eq!(row.errors.as_array().unwrap().len(), 2);
    wait_state(
        &t,
        slow,
        TaskState::Completed,
        Duration::from_secs(10),
        "the slow task completes",
    )
    .await;
    let row = queue::get(&conn, slow).await.unwrap();
    assert!(
        row.errors[0]["error"]
            .as_str()
            .unwrap()
            .contains("timed out")
    );
    wait_until(
        Duration::from_secs(10),
        "the panicking, unknown-kind and bad-payload tasks are discarded",
        || async {
            state_of(&t, panics).await == TaskState::Discarded
                && state_of(&t, unknown).await == TaskState::Discarded
                && state_of(&t, bad_payload).await == TaskState::Discarded
        },
    )
    .await;
    let p = queue::get(&conn, panics).await.unwrap();
    assert!(p.last_error.unwrap().contains("handler bug"));
    let u = queue::get(&conn, unknown).await.unwrap();
    assert!(u.last_error.unwrap().contains("no handler"));
    let b = queue::get(&conn, bad_payload).await.unwrap();
    assert!(b.last_error.unwrap().contains("payload"));

    // Cancel a running task: the handler's token fires and the task ends cancelled. The
    // pool-wide timeout (500 ms) is longer than the cancel path (heartbeat 100 ms).
    let forever = enqueued(&conn, &task("forever").max_attempts(1)).await.id;
    cancel_while_running(&t, forever, 1, Duration::from_secs(5), "the endless task").await;
    assert!(cancelled_seen.load(Ordering::SeqCst));
    let row = queue::get(&conn, forever).await.unwrap();
    assert!(
        row.last_error.unwrap().contains("cancelled"),
        "{:?}",
        row.errors
    );
    // Cancelling a finished task is an illegal transition; retry brings it back.
    assert!(matches!(
        queue::cancel(&conn, forever).await,
        Err(Error::IllegalTransition { .. })
    ));
    let m = pool.metrics().snapshot();
    assert!(
        m.executed >= 8 && m.failed >= 5 && m.succeeded >= 2,
        "{m:?}"
    );
    client.stop().await.unwrap();
    // Not-started tasks cancel at once; retry makes them available again.
    let idle = queue::enqueue(&conn, &task("flaky")).await.unwrap().id;
    assert_eq!(cancel_task(&t, idle).await, TaskState::Cancelled);
    assert_eq!(retry_task(&t, idle).await, TaskState::Available);
    assert!(matches!(
        queue::retry(&conn, TaskId(999_999)).await,
        Err(Error::NotFound { .. })
    ));
}

/// Set `seen` once `cancel` fires (from a task of its own, while the handler sleeps).
fn flag_on_cancel(cancel: &tokio_util::sync::CancellationToken, seen: &Arc<AtomicBool>) {
    let (cancel, seen) = (cancel.clone(), seen.clone());
    tokio::spawn(async move {
        cancel.cancelled().await;
        seen.store(true, Ordering::SeqCst);
    });
}

/// Cancel task `id` (named `what` in the panic messages) while it runs: wait (up to `timeout`)
/// until it is running, request its cancellation `requests` times (each finding it still
/// running), then wait (up to `timeout` again) until it ends cancelled.
async fn cancel_while_running(
    t: &TestDb,
    id: TaskId,
    requests: usize,
    timeout: Duration,
    what: &str,
) {
    let running = format!("{what} is running");
    wait_state(t, id, TaskState::Running, timeout, &running).await;
    for _ in 0..requests {
        assert_eq!(cancel_task(t, id).await, TaskState::Running);
    }
    let cancelled = format!("{what} is cancelled");
    wait_state(t, id, TaskState::Cancelled, timeout, &cancelled).await;
}
