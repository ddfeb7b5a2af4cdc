//! Crash recovery: kill -9 of a worker process.

use std::collections::HashSet;
use std::time::Duration;

use pgcrew::queue::{self, TaskOutcome, WorkerPool};

use super::start_client;
use crate::common::{
    OPEN_TASKS, create_task_effects, effect_tasks, effect_worker, first_column, scalar, test_db,
    wait_for,
};

#[tokio::test]
async fn kill_9_of_a_worker_process_loses_no_task() {
    let t = test_db().await;
    create_task_effects(&t).await;
    let conn = t.db.get().await.unwrap();
    queue::enqueue_many(&conn, &effect_tasks(3000, "crash"))
        .await
        .unwrap();
    let mut child = effect_worker(t.dsn(), "doomed", "crash", "2ms")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&t, "SELECT count(*) FROM pgcrew_task_effects")
        .within(Duration::from_secs(30))
        .until(|n| n >= 500, "the worker process did not start working")
        .await;
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    // What the dead process held at the moment it died (nothing can change it any more).
    let held: HashSet<i64> = first_column(
        &conn,
        "SELECT id FROM pgcrew.tasks WHERE state = 'running' AND claimed_by = 'doomed'",
    )
    .await;
    assert!(
        !held.is_empty(),
        "killed with nothing in flight: not a mid-batch crash"
    );
    let remaining = scalar(&t, OPEN_TASKS).await;
    assert!(
        remaining > 0,
        "the process finished everything before the kill"
    );

    // A survivor (leader: rescues the dead instance's tasks) finishes the work.
    let pool = WorkerPool::builder()
        .queue("crash")
        .concurrency(8)
        .handler("effect", |ctx, _p: serde_json::Value| async move {
            let conn = ctx.client.db().get().await?;
            conn.execute(
                "INSERT INTO pgcrew_task_effects VALUES ($1, $2)",
                &[&ctx.id, &ctx.client.instance_id().as_str()],
            )
            .await?;
            Ok(TaskOutcome::Complete)
        })
        .build()
        .unwrap();
    let survivor = start_client(&t, "survivor", Some(pool), true).await;
    wait_for(&t, OPEN_TASKS)
        .within(Duration::from_secs(60))
        .until(|n| n == 0, "tasks of the killed process were not recovered")
        .await;
    survivor.stop().await.unwrap();
    assert_eq!(
        scalar(
            &t,
            "SELECT count(DISTINCT task_id) FROM pgcrew_task_effects"
        )
        .await,
        3000
    );
    let repeated: HashSet<i64> = first_column(
        &conn,
        "SELECT task_id FROM pgcrew_task_effects GROUP BY task_id HAVING count(*) > 1",
    )
    .await;
    assert!(
        repeated.is_subset(&held),
        "tasks repeated that were not in flight in the killed process: {:?}",
        repeated.difference(&held).collect::<Vec<_>>()
    );
    assert_eq!(
        scalar(
            &t,
            "SELECT max(n) FROM (SELECT count(*) AS n FROM pgcrew_task_effects GROUP BY task_id) x"
        )
        .await,
        if repeated.is_empty() { 1 } else { 2 }
    );
}
