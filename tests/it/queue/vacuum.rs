//! The pool's vacuum of `pgcrew.tasks` while it is busy (issue #23): claims step over the dead
//! index entries of the tasks claimed since the table's last vacuum, and autovacuum visits a
//! database once a minute by default.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use pgcrew::queue::{self, TaskOutcome, WorkerPool};

use super::start_client;
use crate::common::{COMPLETED_TASKS, TestDb, scalar, task, test_db, wait_for, wait_until};

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
    let (client, pool) = start_pool(&t, vacuum).await;
    let conn = t.db.get().await.unwrap();
    for i in 1..=waves {
        wave(&t, &conn, i).await;
        if vacuum && pool.metrics().snapshot().vacuums > 0 {
            break;
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let vacuums = scalar(&t.db, MANUAL_VACUUMS).await;
    client.stop().await.unwrap();
    (vacuums, pool.metrics().snapshot().vacuums)
}

/// A client whose pool runs no-op tasks and vacuums the table or not (`vacuum`), on `t` with
/// autovacuum off on `pgcrew.tasks` (it would only blur what the pool does, and make its
/// SKIP_LOCKED vacuums skip).
async fn start_pool(t: &TestDb, vacuum: bool) -> (pgcrew::Client, Arc<WorkerPool>) {
    t.db.get()
        .await
        .unwrap()
        .batch_execute("ALTER TABLE pgcrew.tasks SET (autovacuum_enabled = false)")
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
    let client = start_client(t, "vacuum", Some(pool.clone()), false).await;
    (client, pool)
}

/// Enqueue wave `i` (5,000 no-op tasks) on `conn` and wait until all of them completed.
async fn wave(t: &TestDb, conn: &tokio_postgres::Client, i: usize) {
    let wave: Vec<_> = (0..5_000).map(|_| task("noop")).collect();
    queue::enqueue_many(conn, &wave).await.unwrap();
    wait_for(&t.db, COMPLETED_TASKS)
        .within(Duration::from_secs(120))
        .until(
            |c| c == 5_000 * i as i64,
            "every task of the wave completes",
        )
        .await;
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

/// The start times of the pool's VACUUMs of `pgcrew.tasks` seen running so far.
type Attempts = Arc<std::sync::Mutex<HashSet<String>>>;

/// Watch `pg_stat_activity` every 20 ms on a connection of its own and note each VACUUM of the
/// pool's (by its start time) until the returned task is aborted.
async fn watch_vacuums(t: &TestDb) -> (Attempts, tokio::task::JoinHandle<()>) {
    let seen: Attempts = Arc::default();
    let conn = t.db.get().await.unwrap();
    let noted = seen.clone();
    let watcher = tokio::spawn(async move {
        loop {
            let rows = conn
                .query(
                    "SELECT query_start::text FROM pg_stat_activity \
                      WHERE datname = current_database() AND pid <> pg_backend_pid() \
                        AND query LIKE '%VACUUM (SKIP_LOCKED, INDEX_CLEANUP ON%' \
                        AND state = 'active'",
                    &[],
                )
                .await
                .unwrap();
            noted
                .lock()
                .unwrap()
                .extend(rows.iter().map(|r| r.get::<_, String>(0)));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    (seen, watcher)
}

/// A role (or database) `statement_timeout` shorter than the pool's vacuum: the vacuum is
/// cancelled, and before the fix every later look (each 5,000 acknowledgements) started it
/// again, to be cancelled again, for as long as the pool ran: the table's dead rows only grow,
/// so it stays due. Now the pool warns once and stops vacuuming for the run.
#[tokio::test]
async fn a_vacuum_cancelled_by_statement_timeout_is_not_started_again() {
    let t = test_db().await;
    // New sessions of this database (the pool's) time out after 1 s, and their VACUUMs sleep
    // 50 ms per 200 cost units (a dirtied page costs 20): a vacuum of the first waves' dead
    // rows takes seconds.
    t.db.get()
        .await
        .unwrap()
        .batch_execute(
            "DO $$ BEGIN
               EXECUTE format('ALTER DATABASE %I SET statement_timeout = %L',
                              current_database(), '1s');
               EXECUTE format('ALTER DATABASE %I SET vacuum_cost_delay = %L',
                              current_database(), '50ms');
             END $$",
        )
        .await
        .unwrap();
    let conn = t.db.get().await.unwrap();
    conn.batch_execute("SET statement_timeout = 0")
        .await
        .unwrap();
    let (seen, watcher) = watch_vacuums(&t).await;
    let (client, pool) = start_pool(&t, true).await;
    let mut i = 0;
    while seen.lock().unwrap().is_empty() && i < 16 {
        i += 1;
        wave(&t, &conn, i).await;
    }
    assert!(
        !seen.lock().unwrap().is_empty(),
        "{i} waves of 5,000 tasks and the pool never started a vacuum"
    );
    // Each of these waves is a look at a table that is still due (nothing removed its dead
    // rows), taken after the previous vacuum was cancelled (1 s).
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        i += 1;
        wave(&t, &conn, i).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    watcher.abort();
    client.stop().await.unwrap();
    let attempts = seen.lock().unwrap().len();
    assert_eq!(
        attempts, 1,
        "the pool started its vacuum {attempts} times; each was cancelled by the 1 s \
         statement_timeout"
    );
    assert_eq!(pool.metrics().snapshot().vacuums, 0, "no vacuum completed");
    assert_eq!(
        scalar(&t.db, MANUAL_VACUUMS).await,
        0,
        "no vacuum of the table completed"
    );
}
