//! The pool's vacuum of `pgcrew.tasks` while it is busy (issue #23): claims step over the dead
//! index entries of the tasks claimed since the table's last vacuum, and autovacuum visits a
//! database once a minute by default.

use std::time::Duration;

use pgcrew::queue::{self, TaskOutcome, WorkerPool};

use super::start_client;
use crate::common::{COMPLETED_TASKS, scalar, task, test_db, wait_for, wait_until};

/// The pool's look at the table (`due`, `owner`), with the least gap between vacuums (µs).
const LOOK: &str = include_str!("../../../sql/queries/queue/vacuum_due.sql");
/// The pool's vacuum.
const VACUUM: &str = include_str!("../../../sql/queries/queue/vacuum_tasks.sql");

/// Vacuums of `pgcrew.tasks` by hand (any session's VACUUM; autovacuum counts apart).
const MANUAL_VACUUMS: &str = "SELECT pg_stat_get_vacuum_count('pgcrew.tasks'::regclass)";

/// Waves of no-op tasks for a pool that vacuums or not (`vacuum`): 5,000 tasks a wave (one look
/// at the table per wave), each processed before the next is enqueued, at most `waves` of them
/// and, for a pool that vacuums, until it has vacuumed once (the dead rows reach the statistics
/// only when the backends flush them, about every second, so on a loaded machine the first
/// looks may not see them yet). Returns the vacuums of the table by hand seen 3 s after the
/// last wave, and the pool's own count.
async fn process(waves: usize, vacuum: bool) -> (i64, u64) {
    let t = test_db().await;
    let conn = t.db.get().await.unwrap();
    // Autovacuum would only blur what the pool does (and make its SKIP_LOCKED vacuums skip).
    conn.batch_execute("ALTER TABLE pgcrew.tasks SET (autovacuum_enabled = false)")
        .await
        .unwrap();
    let pool = WorkerPool::builder()
        .concurrency(8)
        .prefetch(200)
        .vacuum_tasks(vacuum)
        .handler("noop", |_ctx, _p: serde_json::Value| async move {
            Ok(TaskOutcome::Complete)
        })
        .build()
        .unwrap();
    let client = start_client(&t, "vacuum", Some(pool.clone()), false).await;
    let wave: Vec<_> = (0..5_000).map(|_| task("noop")).collect();
    for i in 1..=waves {
        queue::enqueue_many(&conn, &wave).await.unwrap();
        wait_for(&t.db, COMPLETED_TASKS)
            .within(Duration::from_secs(120))
            .until(
                |c| c == 5_000 * i as i64,
                "every task of the wave completes",
            )
            .await;
        if vacuum && pool.metrics().snapshot().vacuums > 0 {
            break;
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let vacuums = scalar(&t.db, MANUAL_VACUUMS).await;
    client.stop().await.unwrap();
    (vacuums, pool.metrics().snapshot().vacuums)
}

#[tokio::test]
async fn a_busy_pool_vacuums_the_tasks_table_between_autovacuum_visits() {
    let (vacuums, by_pool) = process(16, true).await;
    assert!(
        vacuums >= 1,
        "80,000 tasks (160,000 dead row versions) and no vacuum of pgcrew.tasks"
    );
    assert_eq!(
        vacuums as u64, by_pool,
        "every vacuum of the table was the pool's (autovacuum is off here)"
    );
}

#[tokio::test]
async fn a_pool_told_not_to_vacuum_leaves_the_table_alone() {
    let (vacuums, by_pool) = process(3, false).await;
    assert_eq!((vacuums, by_pool), (0, 0));
}

/// `(due, owner)` as the pool's look sees them on `conn`, with a gap of `gap_s` seconds.
async fn look(conn: &tokio_postgres::Client, gap_s: i64) -> (bool, bool) {
    let row = conn.query_one(LOOK, &[&(gap_s * 1_000_000)]).await.unwrap();
    (row.get("due"), row.get("owner"))
}

#[tokio::test]
async fn the_vacuum_look_counts_dead_rows_waits_its_gap_and_knows_the_owner() {
    let t = test_db().await;
    let conn = t.db.get().await.unwrap();
    assert_eq!(
        look(&conn, 1).await,
        (false, true),
        "a new table has no dead rows"
    );
    conn.batch_execute(
        "ALTER TABLE pgcrew.tasks SET (autovacuum_enabled = false);
         INSERT INTO pgcrew.tasks (queue, kind) SELECT 'q', 'k' FROM generate_series(1, 3000);
         UPDATE pgcrew.tasks SET priority = 1;",
    )
    .await
    .unwrap();
    // 3,000 dead versions against the table's threshold of 1,000 + 1 % of its rows.
    wait_until(
        Duration::from_secs(10),
        "the look sees the dead rows",
        || async {
            conn.batch_execute("SELECT pg_stat_force_next_flush()")
                .await
                .unwrap();
            look(&conn, 1).await == (true, true)
        },
    )
    .await;
    conn.batch_execute(VACUUM).await.unwrap();
    conn.batch_execute("UPDATE pgcrew.tasks SET priority = 2; SELECT pg_stat_force_next_flush()")
        .await
        .unwrap();
    // Dead rows again, but the table was vacuumed less than the gap (an hour) ago.
    assert_eq!(look(&conn, 3600).await, (false, true));
    let role = format!("vacuum_look_{}", std::process::id());
    conn.batch_execute(&format!(
        "DROP ROLE IF EXISTS {role}; CREATE ROLE {role}; GRANT USAGE ON SCHEMA pgcrew TO {role}; \
         SET ROLE {role}"
    ))
    .await
    .unwrap();
    let (_, owner) = look(&conn, 1).await;
    conn.batch_execute(&format!(
        "RESET ROLE; REVOKE USAGE ON SCHEMA pgcrew FROM {role}; DROP ROLE {role}"
    ))
    .await
    .unwrap();
    assert!(
        !owner,
        "a role that does not own pgcrew.tasks may not vacuum it"
    );
}
