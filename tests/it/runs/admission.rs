//! Run admission: what starting a pending run reads of its tenant's runs in flight.

use pgcrew::db::{Acquire, Db};
use pgcrew::runs::{self, LimitPolicy, NewRun, RunState, StartOutcome};

use super::{add_tenant, tenant};

/// Calls, since the last reset, of the statements that count a tenant's runs in flight
/// (`pgcrew.start_run_fenced`'s own, nested, and `runs/count_running`).
async fn counts_of_runs_in_flight(db: &Db) -> i64 {
    crate::common::value_on(
        &db.get().await.unwrap(),
        "SELECT coalesce(sum(s.calls), 0)::bigint \
           FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid \
          WHERE d.datname = current_database() \
            AND s.query LIKE '%count(*)%pgcrew.runs%parent_relation IS DISTINCT FROM%' \
            AND s.query NOT LIKE '%pg_stat_statements%'",
        0,
    )
    .await
}

/// Start pending run `run` through the one statement (`pgcrew.start_run_fenced`) or, with
/// `in_a_transaction`, inside the caller's transaction (committed).
async fn start(
    db: &Db,
    run: pgcrew::RunId,
    in_a_transaction: bool,
    policy: LimitPolicy,
) -> pgcrew::Result<StartOutcome> {
    if !in_a_transaction {
        return runs::start_run(db, run, None, None, policy).await;
    }
    let mut conn = db.acquire().await.unwrap();
    let tx = conn.begin().await.unwrap();
    let outcome = runs::start_run(&tx, run, None, None, policy).await;
    tx.commit().await.unwrap();
    outcome
}

async fn pending_runs(db: &Db, tenant_id: &str, n: usize) -> Vec<pgcrew::RunId> {
    let mut ids = Vec::new();
    for _ in 0..n {
        ids.push(
            runs::create_run(db, NewRun::new(tenant(tenant_id)))
                .await
                .unwrap(),
        );
    }
    ids
}

/// Each start of a pending run counted its tenant's running and waiting runs, limit or none:
/// a walk of the runs index that grows with the tenant's churn, under the tenant's admission
/// lock (1.6 ms a start in `bench agents`). Without a limit nothing is counted now; under one,
/// the limit still holds, and a refusal reports the exact count.
#[tokio::test]
async fn starts_count_runs_in_flight_only_under_a_limit() {
    let (_cluster, scratch, setup) = crate::common::statements_db("admission").await;
    // Nested statements too, on every connection of a pool opened after the setting.
    setup
        .get()
        .await
        .unwrap()
        .batch_execute(&format!(
            "ALTER DATABASE {} SET pg_stat_statements.track = 'all'",
            scratch.name()
        ))
        .await
        .unwrap();
    let db = Db::connect(scratch.dsn(), 4, std::time::Duration::from_secs(5))
        .await
        .unwrap();
    add_tenant(&db, "free", None).await;
    add_tenant(&db, "capped", Some(3)).await;
    let free = pending_runs(&db, "free", 12).await;
    let capped = pending_runs(&db, "capped", 5).await;

    // No limit: every run starts, through the one statement and in the caller's transaction.
    crate::common::reset_statements(&db).await;
    for (i, id) in free.iter().enumerate() {
        let outcome = start(&db, *id, i % 2 == 1, LimitPolicy::Reject).await;
        assert!(
            matches!(outcome, Ok(StartOutcome::Started(_))),
            "{outcome:?}"
        );
    }
    assert_eq!(
        counts_of_runs_in_flight(&db).await,
        0,
        "starts of a tenant without a run limit counted its runs in flight"
    );

    // Under a limit of 3: three start, the others stay pending, on both paths.
    crate::common::reset_statements(&db).await;
    let mut started = 0;
    for (i, id) in capped.iter().enumerate() {
        let outcome = start(&db, *id, i % 2 == 1, LimitPolicy::StayPending).await;
        match outcome.unwrap() {
            StartOutcome::Started(_) => started += 1,
            StartOutcome::LimitReached { running, limit } => {
                assert_eq!((running, limit), (3, 3));
                assert_eq!(
                    runs::get_run(&db, *id).await.unwrap().state,
                    RunState::Pending
                );
            }
        }
    }
    assert_eq!(started, 3);
    assert!(
        counts_of_runs_in_flight(&db).await >= 5,
        "the starts under a limit counted nothing the test can see: it cannot tell the cases apart"
    );

    // The limit lowered below the runs in flight: the refusal carries the exact count.
    crate::common::execute(
        &db,
        "UPDATE pgcrew.tenants SET max_concurrent_runs = 1 WHERE id = 'capped'",
        &[],
    )
    .await;
    let outcome = runs::start_run(&db, capped[4], None, None, LimitPolicy::StayPending)
        .await
        .unwrap();
    assert!(
        matches!(
            outcome,
            StartOutcome::LimitReached {
                running: 3,
                limit: 1
            }
        ),
        "{outcome:?}"
    );
    let mut conn = db.acquire().await.unwrap();
    let tx = conn.begin().await.unwrap();
    let refused = runs::start_run(&tx, capped[4], None, None, LimitPolicy::Reject).await;
    assert!(
        matches!(&refused, Err(pgcrew::Error::LimitReached { message, .. })
                 if message.contains("max_concurrent_runs is 1 and 3 runs are running")),
        "{refused:?}"
    );
    drop(tx);
    assert_eq!(
        runs::get_run(&db, capped[4]).await.unwrap().state,
        RunState::Pending
    );
}
