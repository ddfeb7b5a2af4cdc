//! Durable waits and signals: a workflow parks its run (no worker, lease or claimed task), a
//! signal wakes it on another instance, signals sent early are kept, sleeps are cut short by a
//! signal, timeouts are recorded and follow their policy, bad signals are refused.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pgcrew::kernel::{Kernel, OnTimeout, RunScope, waiting_outcome};
use pgcrew::queue::{TaskOutcome, WorkerPool};
use pgcrew::runs::{self, LimitPolicy, NewRun, RunState};
use pgcrew::{Db, Error, NewTask, RunId, TenantId};
use serde_json::{Value, json};

use crate::common::{
    bare_kernel, cli, count, db_with_tenant, fast_config, ledger_events, scalar, start_client,
    started_run, wait_until,
};

/// The test workflow: step `before` (counted), a wait for signal `go` (1 hour), step `after`;
/// returns the signal's payload.
async fn approval_workflow(
    k: &Kernel,
    scope: &RunScope,
    before_runs: Arc<AtomicU64>,
) -> pgcrew::Result<Option<Value>> {
    k.run_workflow(scope, |ctx| async move {
        ctx.step("before", || async {
            before_runs.fetch_add(1, Ordering::SeqCst);
            Ok(1)
        })
        .await?;
        let got = ctx.wait_for_signal("go", Duration::from_secs(3600)).await?;
        ctx.step("after", || async { Ok(2) }).await?;
        Ok(got)
    })
    .await
}

/// Run the test workflow of `run` with a kernel of its own until it parks at its wait (it must
/// end with `Waiting`); the kernel and scope, to resume it later.
async fn park(db: &Db, run: RunId, tenant: &TenantId) -> (Kernel, RunScope) {
    let k = bare_kernel(db);
    let scope = RunScope::new(run, tenant.clone());
    let e = approval_workflow(&k, &scope, Arc::new(AtomicU64::new(0)))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Waiting { .. }), "{e}");
    (k, scope)
}

/// A worker pool on queue `wf` whose `wf.run` tasks drive the test workflow of their run under
/// the run's lease, completing the run with the workflow's output.
fn workflow_pool(db: &Db, owner: &str, before_runs: Arc<AtomicU64>) -> Arc<WorkerPool> {
    let kernel = bare_kernel(db);
    let owner = owner.to_string();
    WorkerPool::builder()
        .queue("wf")
        .poll_interval(Duration::from_millis(100))
        .handler("wf.run", move |ctx, _p: Value| {
            let (kernel, owner, before_runs) = (kernel.clone(), owner.clone(), before_runs.clone());
            async move {
                let run = ctx.run_id.expect("the task names its run");
                let db = kernel.db();
                let r = runs::get_run(db, run).await?;
                let lease = runs::acquire_run_lease(db, run, &owner, Duration::from_secs(30))
                    .await?
                    .expect("lease");
                if r.state == RunState::Pending {
                    runs::start_run(db, run, None, Some(lease.token), LimitPolicy::Reject).await?;
                }
                let scope = RunScope::new(run, r.tenant_id.clone()).with_lease(lease.token);
                match approval_workflow(&kernel, &scope, before_runs).await {
                    Ok(out) => {
                        let outcome = runs::RunOutcome {
                            response_text: Some(json!(out).to_string()),
                            ..Default::default()
                        };
                        runs::complete_run(db, run, outcome, Some(lease.token)).await?;
                        Ok(TaskOutcome::Complete)
                    }
                    Err(e) => waiting_outcome(&e)
                        .ok_or_else(|| Box::new(e) as pgcrew::queue::HandlerError),
                }
            }
        })
        .build()
        .unwrap()
}

/// A new run of `tenant` and its task (kind `wf.run`, queue `wf`) for [`workflow_pool`].
async fn run_with_task(db: &Db, tenant: &TenantId) -> (RunId, pgcrew::TaskId) {
    let run = runs::create_run(db, NewRun::new(tenant.clone()))
        .await
        .unwrap();
    let task = NewTask::new("wf.run", &json!({}))
        .unwrap()
        .queue("wf")
        .tenant(tenant.clone())
        .run(run);
    (run, pgcrew::queue::enqueue(db, &task).await.unwrap().id)
}

fn event_types(evs: &[(String, Option<String>, Value)]) -> Vec<&str> {
    evs.iter().map(|(t, _, _)| t.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_run_holds_no_worker_lease_or_claim_and_a_signal_resumes_it_on_another_instance()
{
    let (t, tenant) = db_with_tenant("acme", &[], None).await;
    let before_runs = Arc::new(AtomicU64::new(0));
    let (run, task_id) = run_with_task(&t.db, &tenant).await;

    // Instance A runs the workflow up to its wait.
    let a = start_client(
        t.dsn(),
        fast_config("wait-a").build().unwrap(),
        Some(workflow_pool(&t.db, "wait-a", before_runs.clone())),
    )
    .await;
    wait_until(Duration::from_secs(20), "the run waits", || async {
        runs::get_run(&t.db, run).await.unwrap().state == RunState::Waiting
    })
    .await;
    // Parked: no lease, the task scheduled an hour out with its attempt given back.
    let task_sql = format!(
        "SELECT count(*) FROM pgcrew.tasks WHERE id = {task_id} AND state = 'scheduled' \
         AND attempts = 0 AND claim_token IS NULL AND run_at > now() + interval '59 minutes'"
    );
    wait_until(Duration::from_secs(10), "the task is parked", || async {
        scalar(&t.db, &task_sql).await == 1
    })
    .await;
    let r = runs::get_run(&t.db, run).await.unwrap();
    assert!(r.lease_owner.is_none() && !r.lease_valid, "{r:?}");
    assert_eq!(
        scalar(
            &t.db,
            "SELECT count(*) FROM pgcrew.tasks WHERE state = 'running'"
        )
        .await,
        0
    );
    let evs = ledger_events(&t.db, run).await;
    assert_eq!(count(&evs, "wait_started"), 1);
    let started = evs.iter().find(|(ty, _, _)| ty == "wait_started").unwrap();
    assert_eq!(started.1.as_deref(), Some("wf/signal:go"));
    assert_eq!(started.2["name"], "go");
    a.stop().await.unwrap();

    // Instance B: the signal makes the parked task available; B resumes and finishes the run.
    let b = start_client(
        t.dsn(),
        fast_config("wait-b").build().unwrap(),
        Some(workflow_pool(&t.db, "wait-b", before_runs.clone())),
    )
    .await;
    runs::signal_run(&t.db, run, "go", Some(&json!({"approved": true})))
        .await
        .unwrap();
    wait_until(Duration::from_secs(20), "the run completes", || async {
        runs::get_run(&t.db, run).await.unwrap().state == RunState::Completed
    })
    .await;
    b.stop().await.unwrap();
    let done = runs::get_run(&t.db, run).await.unwrap();
    assert_eq!(
        done.response_text.as_deref(),
        Some(json!({"approved": true}).to_string().as_str())
    );
    // The step before the wait ran once (replayed on B), the task ran twice with one attempt.
    assert_eq!(before_runs.load(Ordering::SeqCst), 1);
    assert_eq!(
        scalar(
            &t.db,
            &format!(
                "SELECT count(*) FROM pgcrew.tasks WHERE id = {task_id} AND state = 'completed' \
                 AND attempts = 1"
            )
        )
        .await,
        1
    );
    let evs = ledger_events(&t.db, run).await;
    let types = event_types(&evs);
    for ty in ["wait_started", "run_resumed", "signal_received"] {
        assert_eq!(count(&evs, ty), 1, "{ty} in {types:?}");
    }
    let pos = |ty: &str| types.iter().position(|t| *t == ty).unwrap();
    assert!(
        pos("wait_started") < pos("run_resumed") && pos("run_resumed") < pos("signal_received")
    );
    let received = evs
        .iter()
        .find(|(ty, _, _)| ty == "signal_received")
        .unwrap();
    assert_eq!(received.2["payload"], json!({"approved": true}));
    assert_eq!(
        scalar(&t.db, "SELECT count(*) FROM pgcrew.run_waits").await,
        0
    );
    assert!(runs::verify_run_chain(&t.db, run).await.unwrap().valid);
}

/// A waiting run that was cancelled kept its wait row until retention, and its parked task
/// stayed scheduled until the wait's deadline (an hour here), when a worker would claim it only
/// to find the run finished. Now both end with the run's change; a run failed while it waits
/// (no task parked: the wait reached by hand) loses its wait row too.
#[tokio::test]
async fn a_waiting_run_that_is_cancelled_ends_its_wait_and_its_parked_task() {
    let (t, tenant) = db_with_tenant("acme", &[], None).await;
    let (run, task_id) = run_with_task(&t.db, &tenant).await;
    let a = start_client(
        t.dsn(),
        fast_config("wait-cancel").build().unwrap(),
        Some(workflow_pool(
            &t.db,
            "wait-cancel",
            Arc::new(AtomicU64::new(0)),
        )),
    )
    .await;
    let parked =
        format!("SELECT count(*) FROM pgcrew.tasks WHERE id = {task_id} AND state = 'scheduled'");
    wait_until(
        Duration::from_secs(20),
        "the run waits, its task parked",
        || async {
            runs::get_run(&t.db, run).await.unwrap().state == RunState::Waiting
                && scalar(&t.db, &parked).await == 1
        },
    )
    .await;
    a.stop().await.unwrap();
    let waits = |r: RunId| format!("SELECT count(*) FROM pgcrew.run_waits WHERE run_id = '{r}'");
    assert_eq!(scalar(&t.db, &waits(run)).await, 1);

    let r = runs::cancel_run(&t.db, run, "changed my mind")
        .await
        .unwrap();
    assert_eq!(r.state, RunState::Cancelled);
    assert_eq!(scalar(&t.db, &waits(run)).await, 0, "the wait row stayed");
    let cancelled = format!(
        "SELECT count(*) FROM pgcrew.tasks WHERE id = {task_id} AND state = 'cancelled' \
         AND finalized_at IS NOT NULL"
    );
    assert_eq!(scalar(&t.db, &cancelled).await, 1, "the parked task stayed");
    assert!(runs::verify_run_chain(&t.db, run).await.unwrap().valid);

    // Failed while it waits, with no task parked.
    let other = started_run(&t.db, &tenant).await;
    park(&t.db, other, &tenant).await;
    assert_eq!(scalar(&t.db, &waits(other)).await, 1);
    let f = runs::fail_run(&t.db, other, "operator", "given up", None)
        .await
        .unwrap();
    assert_eq!(f.state, RunState::Failed);
    assert_eq!(scalar(&t.db, &waits(other)).await, 0, "the wait row stayed");
}

#[tokio::test]
async fn a_signal_sent_before_the_wait_is_kept_and_consumed_without_parking() {
    let (t, tenant) = db_with_tenant("acme", &[], None).await;
    let run = started_run(&t.db, &tenant).await;
    runs::signal_run(&t.db, run, "go", Some(&json!("early")))
        .await
        .unwrap();
    let k = bare_kernel(&t.db);
    let scope = RunScope::new(run, tenant);
    let out = approval_workflow(&k, &scope, Arc::new(AtomicU64::new(0)))
        .await
        .unwrap();
    assert_eq!(out, Some(json!("early")));
    let evs = ledger_events(&t.db, run).await;
    assert_eq!(count(&evs, "wait_started"), 0);
    assert_eq!(count(&evs, "signal_received"), 1);
    assert_eq!(
        runs::get_run(&t.db, run).await.unwrap().state,
        RunState::Running
    );
    // Replaying the finished workflow returns the recorded result.
    let again = approval_workflow(&k, &scope, Arc::new(AtomicU64::new(0)))
        .await
        .unwrap();
    assert_eq!(again, Some(json!("early")));
    assert!(runs::verify_run_chain(&t.db, run).await.unwrap().valid);
}

#[tokio::test]
async fn an_hour_long_durable_sleep_is_cut_short_by_a_signal() {
    let (t, tenant) = db_with_tenant("acme", &[], None).await;
    let run = started_run(&t.db, &tenant).await;
    let k = bare_kernel(&t.db);
    let scope = RunScope::new(run, tenant);
    let sleepy = |k: Kernel, scope: RunScope| async move {
        k.run_workflow(&scope, |ctx| async move {
            ctx.sleep("nap", Duration::from_secs(3600)).await?;
            Ok("rested".to_string())
        })
        .await
    };
    let err = sleepy(k.clone(), scope.clone()).await.unwrap_err();
    match &err {
        Error::Waiting {
            name, resume_in, ..
        } => {
            assert_eq!(name, "nap");
            assert!(*resume_in > Duration::from_secs(3590), "{resume_in:?}");
        }
        other => panic!("{other}"),
    }
    assert_eq!(
        runs::get_run(&t.db, run).await.unwrap().state,
        RunState::Waiting
    );
    // Before its signal, running the workflow again parks it again (nothing new recorded).
    assert!(matches!(
        sleepy(k.clone(), scope.clone()).await,
        Err(Error::Waiting { .. })
    ));
    runs::signal_run(&t.db, run, "nap", None).await.unwrap();
    assert_eq!(sleepy(k, scope).await.unwrap(), "rested");
    let evs = ledger_events(&t.db, run).await;
    assert_eq!(count(&evs, "wait_started"), 1);
    assert_eq!(count(&evs, "run_resumed"), 2);
    assert_eq!(count(&evs, "signal_received"), 1);
    assert_eq!(count(&evs, "workflow_completed"), 1);
    assert!(runs::verify_run_chain(&t.db, run).await.unwrap().valid);
}

#[tokio::test]
async fn timeouts_are_recorded_and_return_to_the_step_or_fail_the_run() {
    let (t, tenant) = db_with_tenant("acme", &[], None).await;
    let k = bare_kernel(&t.db);
    for policy in [OnTimeout::Return, OnTimeout::FailRun] {
        let run = started_run(&t.db, &tenant).await;
        let scope = RunScope::new(run, tenant.clone());
        let go = |k: Kernel, scope: RunScope| async move {
            k.run_workflow(&scope, |ctx| async move {
                let got = ctx
                    .wait_for_signal_with("reply", Duration::from_millis(300), policy)
                    .await?;
                Ok(got.is_none())
            })
            .await
        };
        assert!(matches!(
            go(k.clone(), scope.clone()).await,
            Err(Error::Waiting { .. })
        ));
        tokio::time::sleep(Duration::from_millis(400)).await;
        let result = go(k.clone(), scope.clone()).await;
        let evs = ledger_events(&t.db, run).await;
        assert_eq!(count(&evs, "wait_timed_out"), 1);
        let r = runs::get_run(&t.db, run).await.unwrap();
        match policy {
            OnTimeout::Return => {
                assert!(result.unwrap(), "the wait returned the timeout");
                assert_eq!(r.state, RunState::Running);
            }
            OnTimeout::FailRun => {
                assert!(
                    matches!(result, Err(Error::WaitTimedOut { .. })),
                    "{result:?}"
                );
                assert_eq!(r.state, RunState::Failed);
                assert_eq!(r.error_type.as_deref(), Some("wait_timed_out"));
            }
        }
        assert!(runs::verify_run_chain(&t.db, run).await.unwrap().valid);
    }
}

#[tokio::test]
async fn bad_signals_are_refused_with_clear_errors_and_sqlstates() {
    let (t, tenant) = db_with_tenant("acme", &[], None).await;
    // Unknown run.
    let ghost = RunId::new();
    let e = runs::signal_run(&t.db, ghost, "go", None)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NotFound { kind: "run", .. }), "{e}");
    // A bad name.
    let run = started_run(&t.db, &tenant).await;
    let e = runs::signal_run(&t.db, run, "", None).await.unwrap_err();
    assert!(matches!(e, Error::InvalidInput { .. }), "{e}");
    // A run waiting for another signal.
    park(&t.db, run, &tenant).await;
    let e = runs::signal_run(&t.db, run, "stop", None)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NotWaiting { .. }), "{e}");
    assert!(e.to_string().contains("waiting for signal 'go'"), "{e}");
    // A finished run (cancelled while it waited).
    let r = runs::cancel_run(&t.db, run, "changed my mind")
        .await
        .unwrap();
    assert_eq!(r.state, RunState::Cancelled);
    let e = runs::signal_run(&t.db, run, "go", None).await.unwrap_err();
    assert!(matches!(e, Error::RunFinished { .. }), "{e}");
    // The SQL surface: the same refusals by SQLSTATE.
    let conn = t.db.get().await.unwrap();
    let other = started_run(&t.db, &tenant).await;
    let code = |r: Result<tokio_postgres::Row, tokio_postgres::Error>| {
        r.unwrap_err().code().unwrap().code().to_string()
    };
    let q = "SELECT pgcrew.signal_run($1, $2)";
    assert_eq!(code(conn.query_one(q, &[&ghost, &"go"]).await), "PC002");
    assert_eq!(code(conn.query_one(q, &[&run, &"go"]).await), "PC041");
    assert_eq!(code(conn.query_one(q, &[&other, &""]).await), "22023");
    let id: i64 = conn
        .query_one(
            "SELECT pgcrew.signal_run(p_run => $1, p_name => 'go', p_payload => '{\"n\": 1}')",
            &[&other],
        )
        .await
        .unwrap()
        .get(0);
    assert!(id > 0);
    // Nothing was written to a ledger by a refusal, and every ledger verifies.
    for r in [run, other] {
        assert!(runs::verify_run_chain(&t.db, r).await.unwrap().valid);
    }
}

#[tokio::test]
async fn cli_sends_signals_and_refuses_bad_ones() {
    let (t, tenant) = db_with_tenant("acme", &[], None).await;
    let run = started_run(&t.db, &tenant).await;
    let (k, scope) = park(&t.db, run, &tenant).await;
    let run_s = run.to_string();
    let bad = cli(
        t.dsn(),
        ["run", "signal", &run_s, "go", "--payload", "{nope"],
    )
    .await;
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not JSON"));
    let wrong = cli(t.dsn(), ["run", "signal", &run_s, "stop"]).await;
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("waiting for signal"));
    let ok = cli(
        t.dsn(),
        [
            "run",
            "signal",
            &run_s,
            "go",
            "--payload",
            "{\"by\": \"cli\"}",
        ],
    )
    .await;
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let out = approval_workflow(&k, &scope, Arc::new(AtomicU64::new(0)))
        .await
        .unwrap();
    assert_eq!(out, Some(json!({"by": "cli"})));
    let ghost = cli(t.dsn(), ["run", "signal", &RunId::new().to_string(), "go"]).await;
    assert!(!ghost.status.success());
}

#[tokio::test]
async fn a_waiting_run_keeps_its_place_under_the_tenants_run_limit_and_resumes_without_admission() {
    let t = crate::common::test_db().await;
    let conn = t.db.get().await.unwrap();
    conn.execute(
        "INSERT INTO pgcrew.tenants (id, max_concurrent_runs) VALUES ('solo', 1)",
        &[],
    )
    .await
    .unwrap();
    drop(conn);
    let tenant = TenantId::new("solo").unwrap();
    let first = started_run(&t.db, &tenant).await;
    let (k, scope) = park(&t.db, first, &tenant).await;
    // The waiting run still counts: a second run of the tenant stays pending.
    let second = runs::create_run(&t.db, NewRun::new(tenant.clone()))
        .await
        .unwrap();
    let started = runs::start_run(&t.db, second, None, None, LimitPolicy::StayPending)
        .await
        .unwrap();
    assert!(
        matches!(
            started,
            runs::StartOutcome::LimitReached {
                running: 1,
                limit: 1
            }
        ),
        "{started:?}"
    );
    // The waiting run resumes although the tenant is at its limit.
    runs::signal_run(&t.db, first, "go", None).await.unwrap();
    assert_eq!(
        approval_workflow(&k, &scope, Arc::new(AtomicU64::new(0)))
            .await
            .unwrap(),
        Some(Value::Null)
    );
    assert_eq!(
        runs::get_run(&t.db, first).await.unwrap().state,
        RunState::Running
    );
}

#[tokio::test]
async fn a_resume_and_a_replayed_wait_are_one_statement_each_with_the_same_records_and_fences() {
    let (t, tenant) = db_with_tenant("acme", &[], None).await;
    let k = bare_kernel(&t.db);
    let hour = Duration::from_secs(3600);
    // Park a run at a bare wait step, then signal it.
    let run = started_run(&t.db, &tenant).await;
    let scope = RunScope::new(run, tenant.clone());
    let parked = k.wait_step(&scope, "w/go", "go", hour, json!({})).await;
    assert!(matches!(parked, Err(Error::Waiting { .. })), "{parked:?}");
    runs::signal_run(&t.db, run, "go", Some(&json!("p")))
        .await
        .unwrap();
    // pgcrew.resume_run: another tenant's run is not found and stays waiting.
    let other = scalar(
        &t.db,
        &format!("SELECT count(*) FROM pgcrew.resume_run('{run}', NULL, NULL, 'someone-else')"),
    )
    .await;
    assert_eq!(other, 0);
    assert_eq!(
        runs::get_run(&t.db, run).await.unwrap().state,
        RunState::Waiting
    );
    // runs::resume_run (one statement): running, `run_resumed` recorded once with from/to.
    let resumed = runs::resume_run(&t.db, run, None, None).await.unwrap();
    assert_eq!(resumed.state, RunState::Running);
    let again = runs::resume_run(&t.db, run, None, None).await.unwrap();
    assert_eq!(again.state, RunState::Running);
    let evs = ledger_events(&t.db, run).await;
    assert_eq!(count(&evs, "run_resumed"), 1);
    let (_, _, details) = evs.iter().find(|(ty, _, _)| ty == "run_resumed").unwrap();
    assert_eq!(details["from"], "waiting");
    assert_eq!(details["to"], "running");
    // The wait resolves with the signal; the run completes.
    let got = k.wait_step(&scope, "w/go", "go", hour, json!({})).await;
    assert_eq!(
        got.unwrap(),
        pgcrew::kernel::WaitOutcome::Signal(json!("p"))
    );
    runs::complete_run(&t.db, run, runs::RunOutcome::default(), None)
        .await
        .unwrap();
    // Replaying the resolved step on the finished run: the recorded outcome, from
    // pgcrew.wait_step itself (V020's function refused a finished run with PC041).
    let conn = t.db.get().await.unwrap();
    let row = conn
        .query_one(
            "SELECT o_outcome, o_payload FROM pgcrew.wait_step($1, NULL, 'go', 'w/go', 3600000000)",
            &[&run],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "signal");
    assert_eq!(row.get::<_, Option<Value>>(1), Some(json!("p")));
    let replayed = k.wait_step(&scope, "w/go", "go", hour, json!({})).await;
    assert_eq!(
        replayed.unwrap(),
        pgcrew::kernel::WaitOutcome::Signal(json!("p"))
    );
    assert_eq!(
        count(&ledger_events(&t.db, run).await, "signal_received"),
        1
    );
    assert!(runs::verify_run_chain(&t.db, run).await.unwrap().valid);

    // A resume under a lease that is no longer held is refused (LeaseLost), nothing changes.
    let run = started_run(&t.db, &tenant).await;
    let lease = runs::acquire_run_lease(&t.db, run, "w1", hour)
        .await
        .unwrap()
        .unwrap();
    let scope = RunScope::new(run, tenant.clone()).with_lease(lease.token);
    let parked = k.wait_step(&scope, "w/go", "go", hour, json!({})).await;
    assert!(matches!(parked, Err(Error::Waiting { .. })), "{parked:?}");
    let refused = runs::resume_run(&t.db, run, None, Some(lease.token)).await;
    assert!(matches!(refused, Err(Error::LeaseLost(_))), "{refused:?}");
    assert_eq!(
        runs::get_run(&t.db, run).await.unwrap().state,
        RunState::Waiting
    );
    assert_eq!(count(&ledger_events(&t.db, run).await, "run_resumed"), 0);
    // A run of another tenant through a workflow scope: not found, still waiting.
    let wrong = RunScope::new(run, TenantId::new("default").unwrap());
    let r = approval_workflow(&k, &wrong, Arc::new(AtomicU64::new(0))).await;
    assert!(matches!(r, Err(Error::NotFound { .. })), "{r:?}");
    assert_eq!(
        runs::get_run(&t.db, run).await.unwrap().state,
        RunState::Waiting
    );
}
