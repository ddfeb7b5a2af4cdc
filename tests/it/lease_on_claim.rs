//! Run leases taken with the claim (`WorkerPoolBuilder::lease_runs_of`, `pgcrew.lease_runs`,
//! V029): the claim's transaction takes the leases of the claimed tasks' runs (and resumes the
//! runs whose wait resolved), never waits for a busy run, and a run whose lease cannot be taken
//! there leaves the claim and the rest of its batch alone.

use std::time::Duration;

use pgcrew::queue::{TaskOutcome, WorkerPool};
use pgcrew::runs::{self, LeasedRun, RunLeasing, RunOutcome, RunState};
use pgcrew::{InstanceId, NewTask, RunId, TaskId};
use serde_json::json;
use tokio::sync::mpsc;

use crate::common::{
    count, db_with_tenant, eventually, fast_config, ledger_events, parked_run, scalar,
    start_client, started_run,
};

const HOUR: Duration = Duration::from_secs(3600);

/// What the handler saw of one task: its run, the lease it was given, and whether that lease
/// was written by the claim's own transaction (the run's `updated_at` is the task's
/// `claimed_at`: both are that transaction's `now()`).
#[derive(Debug)]
struct Seen {
    run: RunId,
    lease: Option<LeasedRun>,
    same_transaction: bool,
}

/// A pool on queue `q` leasing the runs of kind `k` as instance `inst`, whose handler reports
/// what it saw, then completes the run with the claim's lease or one it takes itself (a run
/// it cannot lease is discarded with the reason).
fn pool(inst: &InstanceId, seen: mpsc::UnboundedSender<Seen>) -> std::sync::Arc<WorkerPool> {
    let leasing = RunLeasing::new(inst.to_string(), HOUR, Some(inst.clone())).unwrap();
    let owner = inst.to_string();
    WorkerPool::builder()
        .queue("q")
        .lease_runs_of("k", leasing)
        .handler("k", move |mut ctx, _p: serde_json::Value| {
            let (seen, owner) = (seen.clone(), owner.clone());
            async move {
                let run = ctx.run_id.expect("a run");
                let db = ctx.client.db().clone();
                let conn = db.get().await?;
                let same: bool = conn
                    .query_one(
                        "SELECT (SELECT claimed_at FROM pgcrew.tasks WHERE id = $1) \
                              = (SELECT updated_at FROM pgcrew.runs WHERE id = $2)",
                        &[&ctx.id, &run],
                    )
                    .await?
                    .get(0);
                let lease = ctx.run_lease.take();
                let _ = seen.send(Seen {
                    run,
                    lease: lease.clone(),
                    same_transaction: same,
                });
                let token = match lease {
                    Some(l) => l.lease.token,
                    None => match runs::lease_run(&db, run, &owner, HOUR, None).await {
                        Ok(Some(l)) => l.lease.token,
                        Ok(None) => return Ok(TaskOutcome::Discard("leased elsewhere".into())),
                        Err(e) => return Ok(TaskOutcome::Discard(e.to_string())),
                    },
                };
                runs::complete_run(&db, run, RunOutcome::default(), Some(token)).await?;
                Ok(TaskOutcome::Complete)
            }
        })
        .build()
        .unwrap()
}

fn run_task(tenant: &pgcrew::TenantId, run: RunId) -> NewTask {
    NewTask::new("k", &json!({}))
        .unwrap()
        .queue("q")
        .tenant(tenant.clone())
        .run(run)
}

/// Start instance `name` with [`pool`] and wait until its handler has seen two tasks.
async fn run_both(t: &crate::common::TestDb, name: &str) -> (pgcrew::Client, Vec<Seen>) {
    let inst = InstanceId::new(name).unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let client = start_client(
        t.dsn(),
        fast_config(name).build().unwrap(),
        Some(pool(&inst, tx)),
    )
    .await;
    let mut seen = Vec::new();
    for _ in 0..2 {
        let next = tokio::time::timeout(Duration::from_secs(20), rx.recv()).await;
        seen.push(next.expect("both tasks are claimed and run").unwrap());
    }
    (client, seen)
}

async fn task_state(db: &pgcrew::Db, id: TaskId) -> String {
    let conn = db.get().await.unwrap();
    conn.query_one("SELECT state FROM pgcrew.tasks WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn the_claim_takes_the_run_lease_and_resumes_a_signalled_run_in_its_own_transaction() {
    let (t, tenant) = db_with_tenant("acme", &[], None).await;
    let (run, old_token) = parked_run(&t.db, &tenant, HOUR).await;
    runs::signal_run(&t.db, run, "go", Some(&json!({"ok": 1})))
        .await
        .unwrap();
    let fresh = started_run(&t.db, &tenant).await;
    let conn = t.db.get().await.unwrap();
    let tasks = [run_task(&tenant, run), run_task(&tenant, fresh)];
    let ids: Vec<TaskId> = pgcrew::queue::enqueue_many(&conn, &tasks).await.unwrap();

    let (client, seen) = run_both(&t, "lease-claim-1").await;
    for s in &seen {
        let lease = s.lease.as_ref().expect("the lease, taken with the claim");
        assert_eq!(lease.lease.run_id, s.run);
        assert_eq!(lease.lease.owner, "lease-claim-1");
        assert_eq!(lease.run.lease_token, lease.lease.token);
        assert!(
            s.same_transaction,
            "{s:?}: the lease was not the claim's write"
        );
        // The run came back running: the signalled one was resumed by the claim.
        assert_eq!(lease.run.state, RunState::Running, "{s:?}");
    }
    let resumed = seen.iter().find(|s| s.run == run).unwrap();
    let lease = resumed.lease.as_ref().unwrap();
    assert!(lease.lease.token > old_token);
    assert_eq!(lease.run.instance_id.as_deref(), Some("lease-claim-1"));
    // The wait's resolution, recorded as the wait step records it.
    let evs = ledger_events(&t.db, run).await;
    assert_eq!(count(&evs, "signal_received"), 1);
    assert_eq!(
        scalar(&t.db, "SELECT count(*) FROM pgcrew.run_waits").await,
        0
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            task_state(&t.db, ids[0]).await == "completed"
                && task_state(&t.db, ids[1]).await == "completed"
        })
        .await
    );
    for r in [run, fresh] {
        let done = runs::get_run(&t.db, r).await.unwrap();
        assert_eq!(done.state, RunState::Completed);
        assert!(runs::verify_run_chain(&t.db, r).await.unwrap().valid);
    }
    client.stop().await.unwrap();
}

#[tokio::test]
async fn lease_runs_never_waits_and_skips_busy_unknown_and_other_tenants_runs() {
    let (t, tenant) = db_with_tenant("acme", &[], None).await;
    let busy = started_run(&t.db, &tenant).await;
    let foreign = started_run(&t.db, &tenant).await;
    let free = started_run(&t.db, &tenant).await;
    let ghost = RunId::new();
    // Another transaction holds the busy run's lock (as a signal or a transition does).
    let mut holder = t.db.get().await.unwrap();
    let hold = holder.transaction().await.unwrap();
    hold.query("SELECT id FROM pgcrew.locked_run($1)", &[&busy])
        .await
        .unwrap();

    let conn = t.db.get().await.unwrap();
    conn.batch_execute("SET statement_timeout = '10s'")
        .await
        .unwrap();
    let runs_arg = vec![busy.0, foreign.0, ghost.0, free.0];
    let tenants_arg = vec!["acme", "other", "acme", "acme"];
    let rows = conn
        .query(
            "SELECT id, lease_owner FROM pgcrew.lease_runs($1, $2, 'w1', 60000000)",
            &[&runs_arg, &tenants_arg],
        )
        .await
        .expect("no wait for the busy run");
    let got: Vec<(uuid::Uuid, Option<String>)> =
        rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(got, vec![(free.0, Some("w1".to_string()))]);
    hold.rollback().await.unwrap();
    for r in [busy, foreign] {
        assert!(runs::get_run(&t.db, r).await.unwrap().lease_owner.is_none());
    }

    // Bad input: one tenant per run, an owner and a ttl of at least 1 ms; nothing changes.
    for (sql, code) in [
        (
            "SELECT * FROM pgcrew.lease_runs(ARRAY[$1::uuid], ARRAY[]::text[], 'w1', 60000000)",
            "22023",
        ),
        (
            "SELECT * FROM pgcrew.lease_runs(ARRAY[$1::uuid], ARRAY['acme'], 'w1', 0)",
            "22023",
        ),
        (
            "SELECT * FROM pgcrew.lease_runs(ARRAY[$1::uuid], ARRAY['acme'], NULL, 60000000)",
            "22023",
        ),
    ] {
        let err = conn.query(sql, &[&busy]).await.unwrap_err();
        assert_eq!(
            err.as_db_error().map(|d| d.code().code()),
            Some(code),
            "{sql}: {err}"
        );
    }
    assert!(
        runs::get_run(&t.db, busy)
            .await
            .unwrap()
            .lease_owner
            .is_none()
    );
    assert!(RunLeasing::new("", HOUR, None).is_err());
    assert!(RunLeasing::new("w1", Duration::ZERO, None).is_err());
}

#[tokio::test]
async fn a_run_whose_lease_fails_at_the_claim_leaves_the_claim_and_its_batch_alone() {
    let (t, tenant) = db_with_tenant("acme", &[], None).await;
    // A run whose ledger has an event beyond its recorded head (written by plain SQL): taking
    // its lease resumes it, which links an event there and is refused (PC004).
    let (bad, _) = parked_run(&t.db, &tenant, HOUR).await;
    runs::signal_run(&t.db, bad, "go", None).await.unwrap();
    let conn = t.db.get().await.unwrap();
    let next: i64 = conn
        .query_one(
            "SELECT ledger_head_seq + 1 FROM pgcrew.runs WHERE id = $1",
            &[&bad],
        )
        .await
        .unwrap()
        .get(0);
    conn.execute(
        "INSERT INTO pgcrew.events (run_id, seq, tenant_id, event_type, payload, prev_hash, hash, created_at) \
         VALUES ($1, $2, 'acme', 'stray', '{}', '\\x00', '\\x01', now())",
        &[&bad, &next],
    )
    .await
    .unwrap();
    let before = ledger_events(&t.db, bad).await.len();
    let (good, _) = parked_run(&t.db, &tenant, HOUR).await;
    runs::signal_run(&t.db, good, "go", None).await.unwrap();
    let ids: Vec<TaskId> =
        pgcrew::queue::enqueue_many(&conn, &[run_task(&tenant, bad), run_task(&tenant, good)])
            .await
            .unwrap();

    let (client, seen) = run_both(&t, "lease-claim-2").await;
    let mut runs_seen: Vec<RunId> = seen.iter().map(|s| s.run).collect();
    runs_seen.sort();
    let mut both = vec![bad, good];
    both.sort();
    assert_eq!(runs_seen, both);
    // Both tasks were handed out; the good run completes (its handler leased it itself when
    // the claim's leases were rolled back), the bad one is refused with its tampering.
    assert!(
        eventually(Duration::from_secs(10), || async {
            task_state(&t.db, ids[1]).await == "completed"
        })
        .await
    );
    assert_eq!(
        runs::get_run(&t.db, good).await.unwrap().state,
        RunState::Completed
    );
    assert!(runs::verify_run_chain(&t.db, good).await.unwrap().valid);
    assert!(
        eventually(Duration::from_secs(10), || async {
            task_state(&t.db, ids[0]).await == "discarded"
        })
        .await
    );
    let after = runs::get_run(&t.db, bad).await.unwrap();
    assert_eq!(after.state, RunState::Waiting);
    assert_eq!(ledger_events(&t.db, bad).await.len(), before);
    client.stop().await.unwrap();
}
