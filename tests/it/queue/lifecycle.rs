//! A task's life in the table: priorities, delays, dependencies, retries and retention.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use pgcrew::queue::{self, Ack, AckOutcome, Priority, TaskState};
use pgcrew::{ClaimToken, Client, TaskId};

use super::{completed, config, failed, q, state_of};
use crate::common::{
    db_with_instance_conn, enqueued, scalar, start_leader, task, test_db, wait_for,
};

#[tokio::test]
async fn priorities_are_claimed_in_order() {
    let (t, me, conn) = db_with_instance_conn("w").await;
    let order = [
        Priority::Batch,
        Priority::Low,
        Priority::Normal,
        Priority::High,
        Priority::Critical,
    ];
    let mut by_prio = HashMap::new();
    for p in order {
        let e = enqueued(&conn, &task("k").priority(p)).await;
        by_prio.insert(e.id, p);
    }
    let mut got = Vec::new();
    for _ in 0..5 {
        let c = queue::claim(&conn, &q("default"), 1, &me).await.unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].priority, by_prio[&c[0].id]);
        got.push(c[0].priority);
    }
    assert_eq!(
        got,
        vec![
            Priority::Critical,
            Priority::High,
            Priority::Normal,
            Priority::Low,
            Priority::Batch
        ]
    );

    // One claim of several tasks hands them over in execution order too.
    for p in order {
        enqueued(&conn, &task("k").priority(p)).await;
    }
    let batch = queue::claim(&conn, &q("default"), 10, &me).await.unwrap();
    let prios: Vec<Priority> = batch.iter().map(|c| c.priority).collect();
    assert_eq!(prios, got, "a batch is returned in priority order");

    // A delayed task that has come due competes by priority with the available ones: the claim
    // promotes it before taking any of them (the single-statement path must not claim around
    // it).
    let urgent = queue::enqueue(
        &conn,
        &task("k")
            .priority(Priority::Critical)
            .delay(Duration::from_millis(300)),
    )
    .await
    .unwrap();
    for _ in 0..3 {
        enqueued(&conn, &task("k").priority(Priority::Batch)).await;
    }
    let due = format!(
        "SELECT count(*) FROM pgcrew.tasks WHERE id = {} AND run_at <= now()",
        urgent.id.0
    );
    wait_for(&t, &due)
        .within(Duration::from_secs(5))
        .until(|n| n == 1, "the urgent task is due")
        .await;
    let c = queue::claim(&conn, &q("default"), 1, &me).await.unwrap();
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].id, urgent.id, "the due critical task comes first");
}

/// An idle pool asks for the next due task after every wake-up: that read is planned once per
/// connection (V043), not on every call (it was: 0.6-2 ms of planning for 0.04 ms of work).
#[tokio::test]
async fn the_next_due_read_is_not_planned_again_on_every_call() {
    let (_t, _me, conn) = db_with_instance_conn("w").await;
    let queues = q("default");
    for _ in 0..12 {
        assert_eq!(queue::next_due(&conn, &queues).await.unwrap(), None);
    }
    let rows = conn
        .query(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements \
              WHERE statement LIKE '%How long until the next scheduled%' \
                AND statement NOT LIKE '%pg_prepared_statements%'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1, "the next-due read is one prepared statement");
    let (generic, custom): (i64, i64) = (rows[0].get(0), rows[0].get(1));
    assert!(
        custom <= 5 && generic >= 7,
        "planned again on every call: {custom} custom plans, {generic} generic"
    );
    let config: Vec<String> = conn
        .query_one(
            "SELECT proconfig FROM pg_proc WHERE proname = 'next_due_in'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        config,
        vec!["plan_cache_mode=force_generic_plan".to_string()]
    );
}

#[tokio::test]
async fn delayed_tasks_wait_for_database_time() {
    let (_t, me, conn) = db_with_instance_conn("w").await;
    // Taken before the enqueue: the claim cannot succeed until 600 ms of database time later.
    let before = std::time::Instant::now();
    let e = enqueued(&conn, &task("k").delay(Duration::from_millis(600))).await;
    assert_eq!(e.state, TaskState::Scheduled);
    assert!(
        queue::claim(&conn, &q("default"), 10, &me)
            .await
            .unwrap()
            .is_empty()
    );
    let due = queue::next_due(&conn, &q("default"))
        .await
        .unwrap()
        .unwrap();
    assert!(
        due > Duration::from_millis(100) && due <= Duration::from_millis(600),
        "{due:?}"
    );
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while got.is_empty() && std::time::Instant::now() < deadline {
        got = queue::claim(&conn, &q("default"), 10, &me).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(got[0].id, e.id);
    assert!(before.elapsed() >= Duration::from_millis(590));
    // The row's run_at agrees with the delay measured on the database clock.
    let gap = seconds_to_run_at(&conn, e.id, "created_at").await;
    assert!((0.59..0.7).contains(&gap), "{gap}");
}

#[tokio::test]
async fn dependencies_gate_availability_and_failures_cancel_dependants() {
    let (t, me, conn) = db_with_instance_conn("w").await;
    let a = queue::enqueue(&conn, &task("a")).await.unwrap().id;
    let b = queue::enqueue(&conn, &task("b")).await.unwrap().id;
    let child = enqueued(&conn, &task("child").depends_on([a, b])).await;
    assert_eq!(child.state, TaskState::Scheduled);
    let grandchild = enqueued(&conn, &task("gc").depends_on([child.id])).await;
    let claimed = queue::claim(&conn, &q("default"), 10, &me).await.unwrap();
    let ids: HashSet<TaskId> = claimed.iter().map(|c| c.id).collect();
    assert_eq!(ids, HashSet::from([a, b]));
    let tok: HashMap<TaskId, ClaimToken> = claimed.iter().map(|c| (c.id, c.token)).collect();
    let done = |id: TaskId| completed(id, tok[&id]);
    queue::ack(&conn, &[done(a)]).await.unwrap();
    assert!(
        queue::claim(&conn, &q("default"), 10, &me)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(state_of(&t, child.id).await, TaskState::Scheduled);
    queue::ack(&conn, &[done(b)]).await.unwrap();
    let next = queue::claim(&conn, &q("default"), 10, &me).await.unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].id, child.id);
    // The child is discarded: the grandchild is cancelled with a reason.
    queue::ack(
        &conn,
        &[Ack {
            id: child.id,
            token: next[0].token,
            outcome: AckOutcome::Discard {
                error: "boom".into(),
            },
        }],
    )
    .await
    .unwrap();
    assert_eq!(state_of(&t, child.id).await, TaskState::Discarded);
    let gc = queue::get(&conn, grandchild.id).await.unwrap();
    assert_eq!(gc.state, TaskState::Cancelled);
    assert!(gc.last_error.unwrap().contains("dependency"));
    // A new dependant of a discarded task is cancelled at once.
    let late = enqueued(&conn, &task("late").depends_on([child.id])).await;
    assert_eq!(late.state, TaskState::Cancelled);
    // Depending on a completed task: available at once.
    let after_done = enqueued(&conn, &task("x").depends_on([a])).await;
    assert_eq!(after_done.state, TaskState::Available);
}

#[tokio::test]
async fn failures_back_off_then_discard_with_errors_kept_and_snooze_keeps_attempts() {
    let (_t, me, conn) = db_with_instance_conn("w").await;
    let e = enqueued(&conn, &task("k").max_attempts(2)).await;
    let c = queue::claim(&conn, &q("default"), 1, &me).await.unwrap();
    let applied = ack_failed(&conn, e.id, c[0].token, "first", Duration::from_secs(30)).await;
    assert_eq!(applied, vec![(e.id, TaskState::Retryable)]);
    let wait = seconds_to_run_at(&conn, e.id, "now()").await;
    assert!((28.0..=30.0).contains(&wait), "{wait}");
    assert!(
        queue::claim(&conn, &q("default"), 1, &me)
            .await
            .unwrap()
            .is_empty()
    );
    conn.execute(
        "UPDATE pgcrew.tasks SET run_at = now() WHERE id = $1",
        &[&e.id],
    )
    .await
    .unwrap();
    let c = queue::claim(&conn, &q("default"), 1, &me).await.unwrap();
    assert_eq!(c[0].attempt, 2);
    // Snooze gives the attempt back.
    queue::ack(
        &conn,
        &[Ack {
            id: e.id,
            token: c[0].token,
            outcome: AckOutcome::Snooze(Duration::ZERO),
        }],
    )
    .await
    .unwrap();
    let row = queue::get(&conn, e.id).await.unwrap();
    assert_eq!((row.state, row.attempts), (TaskState::Scheduled, 1));
    let c = queue::claim(&conn, &q("default"), 1, &me).await.unwrap();
    assert_eq!(c[0].attempt, 2);
    let applied = ack_failed(&conn, e.id, c[0].token, "second", Duration::from_secs(1)).await;
    assert_eq!(applied, vec![(e.id, TaskState::Discarded)]);
    let row = queue::get(&conn, e.id).await.unwrap();
    let errors: Vec<String> = row
        .errors
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["error"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(errors, vec!["first", "second"]);
    assert!(row.finalized_at.is_some());
}

#[tokio::test]
async fn retention_deletes_old_finished_tasks_in_batches() {
    let t = test_db().await;
    let mut cfg = config("keeper");
    cfg.task_retention = Duration::from_secs(3600);
    cfg.retention_batch_size = 2;
    let leader = Client::builder(t.db.clone())
        .config(cfg)
        .build()
        .await
        .unwrap();
    start_leader(&leader, Duration::from_secs(5)).await;
    let conn = t.db.get().await.unwrap();
    let ids = queue::enqueue_many(&conn, &(0..5).map(|_| task("k")).collect::<Vec<_>>())
        .await
        .unwrap();
    conn.execute(
        "UPDATE pgcrew.tasks SET state = 'completed', finalized_at = now() - interval '2 hours' WHERE id = ANY($1)",
        &[&ids[..4].iter().map(|i| i.0).collect::<Vec<_>>()],
    )
    .await
    .unwrap();
    conn.execute(
        "UPDATE pgcrew.tasks SET state = 'completed', finalized_at = now() WHERE id = $1",
        &[&ids[4]],
    )
    .await
    .unwrap();
    // The background maintenance may run too; check the end state and the batch bound.
    let first = leader.run_maintenance().await.unwrap();
    assert!(first.count("task_retention") <= 2);
    wait_for(&t, "SELECT count(*) FROM pgcrew.tasks")
        .within(Duration::from_secs(10))
        .until(|n| n == 1, "retention leaves only the unfinished task")
        .await;
    assert_eq!(
        scalar(
            &t,
            "SELECT count(*) FROM pgcrew.tasks WHERE finalized_at > now() - interval '1 minute'"
        )
        .await,
        1
    );
    leader.stop().await.unwrap();
}

/// Seconds from `since` (an SQL expression on task `id`'s row) to the task's `run_at`.
async fn seconds_to_run_at(conn: &pgcrew::db::Conn, id: TaskId, since: &str) -> f64 {
    let sql = format!(
        "SELECT extract(epoch FROM run_at - {since})::float8 FROM pgcrew.tasks WHERE id = $1"
    );
    conn.query_one(&sql, &[&id]).await.unwrap().get(0)
}

/// Fail claim `token` of task `id` with `error`, retried after `retry_in` ([`failed`]): the
/// (task, new state) pairs the acknowledgement applied.
async fn ack_failed(
    conn: &pgcrew::db::Conn,
    id: TaskId,
    token: ClaimToken,
    error: &str,
    retry_in: Duration,
) -> Vec<(TaskId, TaskState)> {
    let ack = failed(id, token, error, retry_in);
    queue::ack(conn, &[ack]).await.unwrap().applied
}
