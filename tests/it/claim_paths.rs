//! The fast claim (`sql/queries/queue/claim_fast.sql`, one statement) and the general claim
//! (`pgcrew.claim_tasks`) claim the same tasks in the same order: a table of cases
//! (`claim_paths_cases.json`), each built the same way in two scratch databases; one database
//! claims the way `queue::claim` routes (the fast statement for a single queue,
//! `pgcrew.claim_tasks` when it steps aside; when it says the queue has no work, nothing else
//! runs, so the general claim must never find work there), the other with `pgcrew.claim_tasks` only. The
//! claimed ids, their execution order, and every row's state and attempts afterwards must agree;
//! each claim also says whether the fast statement is expected to apply, so the table covers
//! both its hits and its refusals.

use pgcrew::db::Db;
use serde::Deserialize;
use uuid::Uuid;

use crate::common::{TestDb, rows_of, test_db};

/// The fast statement `queue::claim` runs first for a single queue.
const FAST: &str = include_str!("../../sql/queries/queue/claim_fast.sql");
/// The fast statement a worker pool runs for a queue with a rate or key limit (V035); on a
/// queue without features it claims as `FAST` does.
const LIMITED: &str = include_str!("../../sql/queries/queue/claim_fast_limited.sql");
/// The general claim (the SQL function is public API).
const GENERAL: &str = "SELECT id, priority, run_at FROM pgcrew.claim_tasks($1, $2, $3)";
/// The claiming instance (no foreign key: the name is only recorded).
const INSTANCE: &str = "claim-paths";

/// One case of the table (`claim_paths_cases.json`).
#[derive(Deserialize)]
struct Case {
    name: String,
    /// Rows of `pgcrew.tenants` (id, max_concurrent_tasks); a tenant not listed has no row.
    tenants: Vec<(String, Option<i32>)>,
    /// Rows of `pgcrew.tenant_queue_limits` (tenant, queue, max_concurrent_tasks).
    queue_limits: Vec<(String, String, i32)>,
    /// Task rows: queue, tenant, priority, state, `run_at` in seconds from the insert
    /// (negative: in the past), attempts, pending_deps.
    tasks: Vec<(String, String, i16, String, i32, i32, i32)>,
    /// The queues every claim asks for.
    queues: Vec<String>,
    /// Successive claims: (limit, whether the fast statement claims).
    claims: Vec<(i32, bool)>,
}

/// The table: a single unlimited tenant in many shapes (the fast statement claims), then the
/// cases it leaves to `pgcrew.claim_tasks` (limits, several tenants, due scheduled or retryable
/// tasks, several queues, nothing to claim).
const CASES: &str = include_str!("claim_paths_cases.json");

/// A case's names made unique, so all cases share one database without meeting.
fn scoped(case: usize, name: &str) -> String {
    format!("c{case}_{name}")
}

/// Write one case's tenants, limits and tasks (the tasks in one statement: one `now()`).
async fn build(db: &Db, i: usize, case: &Case) {
    let conn = db.get().await.unwrap();
    for (tenant, limit) in &case.tenants {
        conn.execute(
            "INSERT INTO pgcrew.tenants (id, max_concurrent_tasks) VALUES ($1, $2)",
            &[&scoped(i, tenant), limit],
        )
        .await
        .unwrap();
    }
    for (tenant, queue, limit) in &case.queue_limits {
        conn.execute(
            "INSERT INTO pgcrew.tenant_queue_limits (tenant_id, queue, max_concurrent_tasks) \
             VALUES ($1, $2, $3)",
            &[&scoped(i, tenant), &scoped(i, queue), limit],
        )
        .await
        .unwrap();
    }
    let rows = &case.tasks;
    let queues: Vec<String> = rows.iter().map(|r| scoped(i, &r.0)).collect();
    let tenants: Vec<String> = rows.iter().map(|r| scoped(i, &r.1)).collect();
    let priorities: Vec<i16> = rows.iter().map(|r| r.2).collect();
    let states: Vec<&str> = rows.iter().map(|r| r.3.as_str()).collect();
    let run_in: Vec<i32> = rows.iter().map(|r| r.4).collect();
    let attempts: Vec<i32> = rows.iter().map(|r| r.5).collect();
    let deps: Vec<i32> = rows.iter().map(|r| r.6).collect();
    conn.execute(
        "INSERT INTO pgcrew.tasks (queue, kind, tenant_id, state, priority, run_at, attempts, \
                                   pending_deps) \
         SELECT q, 'k', t, s, p, now() + make_interval(secs => r), a, d \
           FROM unnest($1::text[], $2::text[], $3::text[], $4::int2[], $5::int4[], $6::int4[], \
                       $7::int4[]) WITH ORDINALITY AS x(q, t, s, p, r, a, d, n) \
          ORDER BY n",
        &[
            &queues,
            &tenants,
            &states,
            &priorities,
            &run_in,
            &attempts,
            &deps,
        ],
    )
    .await
    .unwrap();
}

/// Claimed ids in execution order (priority, due time, id), as `queue::claim` returns them.
fn in_order(rows: &[tokio_postgres::Row]) -> Vec<i64> {
    let mut keyed: Vec<(i16, chrono::DateTime<chrono::Utc>, i64)> = rows
        .iter()
        .map(|r| (r.get("priority"), r.get("run_at"), r.get("id")))
        .collect();
    keyed.sort();
    keyed.into_iter().map(|(_, _, id)| id).collect()
}

/// The general claim.
async fn claim_general(db: &Db, queues: &[String], limit: i32) -> Vec<i64> {
    let conn = db.get().await.unwrap();
    in_order(
        &conn
            .query(GENERAL, &[&queues, &limit, &INSTANCE])
            .await
            .unwrap(),
    )
}

/// The claim as `queue::claim` routes it: the fast statement for a single queue (no row: no
/// work, and nothing else runs; a row without a task: it stepped aside), the general claim
/// when it stepped aside. Also says whether the fast statement claimed.
async fn claim_routed(db: &Db, queues: &[String], limit: i32) -> (Vec<i64>, bool) {
    claim_routed_with(FAST, db, queues, limit).await
}

/// The claim as a worker pool routes it once it uses the limited statement (the same rule).
async fn claim_routed_limited(db: &Db, queues: &[String], limit: i32) -> (Vec<i64>, bool) {
    claim_routed_with(LIMITED, db, queues, limit).await
}

/// For a single queue, `fast` first: no row means the queue has no work and nothing else runs;
/// a row without a task means it stepped aside, and the general claim runs.
async fn claim_routed_with(fast: &str, db: &Db, queues: &[String], limit: i32) -> (Vec<i64>, bool) {
    if let [queue] = queues {
        let conn = db.get().await.unwrap();
        let rows = conn
            .query(fast, &[queue, &limit, &INSTANCE, &Uuid::new_v4()])
            .await
            .unwrap();
        let Some(first) = rows.first() else {
            return (Vec::new(), false);
        };
        if first.get::<_, Option<i64>>("id").is_some() {
            return (in_order(&rows), true);
        }
    }
    (claim_general(db, queues, limit).await, false)
}

/// Every task row's id, queue, state, attempts and claimer.
async fn task_rows(db: &Db) -> Vec<(i64, String, String, i32, Option<String>)> {
    let sql = "SELECT id, queue, state, attempts, claimed_by FROM pgcrew.tasks ORDER BY id";
    rows_of(db, sql, |r| {
        (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))
    })
    .await
}

#[tokio::test]
async fn fast_and_general_claims_take_the_same_tasks_in_the_same_order() {
    same_tasks_in_the_same_order(false).await;
}

/// The same table through the limited statement as a pool routes it ("no row" skips
/// the general claim, as for the plain statement): the general claim never finds what the
/// limited statement called no work.
#[tokio::test]
async fn limited_and_general_claims_take_the_same_tasks_in_the_same_order() {
    same_tasks_in_the_same_order(true).await;
}

async fn same_tasks_in_the_same_order(limited: bool) {
    let cases: Vec<Case> = serde_json::from_str(CASES).unwrap();
    assert_eq!(cases.len(), 17);
    let (routed, general): (TestDb, TestDb) = tokio::join!(test_db(), test_db());
    for (i, case) in cases.iter().enumerate() {
        build(&routed.db, i, case).await;
        build(&general.db, i, case).await;
        let queues: Vec<String> = case.queues.iter().map(|q| scoped(i, q)).collect();
        for (n, &(limit, fast_expected)) in case.claims.iter().enumerate() {
            let (by_route, fast) = if limited {
                claim_routed_limited(&routed.db, &queues, limit).await
            } else {
                claim_routed(&routed.db, &queues, limit).await
            };
            let by_general = claim_general(&general.db, &queues, limit).await;
            assert_eq!(
                by_route, by_general,
                "case `{}`, claim {n} (limit {limit}): the routed claim (fast statement used: \
                 {fast}) and pgcrew.claim_tasks differ",
                case.name
            );
            assert_eq!(
                fast,
                fast_expected,
                "case `{}`, claim {n}: the fast statement {} but was expected to {}",
                case.name,
                if fast { "claimed" } else { "did not claim" },
                if fast_expected { "claim" } else { "step aside" }
            );
        }
        assert_eq!(
            task_rows(&routed.db).await,
            task_rows(&general.db).await,
            "case `{}`: the task rows differ after the claims",
            case.name
        );
    }
    // The table exercises both sides of the router.
    let claims = || cases.iter().flat_map(|c| &c.claims);
    let fast_hits = claims().filter(|c| c.1).count();
    let fallbacks = claims().filter(|c| !c.1).count();
    assert!(
        fast_hits >= 8 && fallbacks >= 8,
        "{fast_hits} / {fallbacks}"
    );
}
