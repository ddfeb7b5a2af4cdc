//! `runs::lease_run` (`pgcrew.lease_run`, V025): the lease and the resumption of a run whose wait
//! has resolved, in one statement, with the records a wait step's resolution makes.

use std::time::Duration;

use pgcrew::kernel::{RunScope, WaitOutcome};
use pgcrew::runs::{self, RunState};
use pgcrew::{Error, InstanceId, RunId};
use serde_json::json;

use crate::common::{
    bare_kernel, count, db_with_tenant, ledger_events, parked_run, scalar, started_run, test_db,
};

const HOUR: Duration = Duration::from_secs(3600);

#[tokio::test]
async fn a_signalled_run_is_leased_and_resumed_in_one_statement_and_its_wait_step_replays() {
    let (t, tenant) = db_with_tenant("acme", &[], None).await;
    let (run, old_token) = parked_run(&t.db, &tenant, HOUR).await;
    runs::signal_run(&t.db, run, "go", Some(&json!({"ok": 1})))
        .await
        .unwrap();
    let instance = InstanceId::new("i-1").unwrap();
    let taken = runs::lease_run(&t.db, run, "w1", HOUR, Some(&instance))
        .await
        .unwrap()
        .expect("the lease");
    assert_eq!(taken.run.state, RunState::Running);
    assert_eq!(taken.run.instance_id.as_deref(), Some("i-1"));
    assert_eq!(taken.lease.owner, "w1");
    assert!(taken.lease.token > old_token);
    assert_eq!(taken.run.lease_token, taken.lease.token);
    // The wait's resolution, as pgcrew.wait_step records it: the signal consumed by the wait's
    // step, `signal_received` under that step key, the wait gone, no `run_resumed`.
    let evs = ledger_events(&t.db, run).await;
    assert_eq!(count(&evs, "signal_received"), 1);
    assert_eq!(count(&evs, "run_resumed"), 0);
    let (_, step, body) = evs.last().unwrap();
    assert_eq!(step.as_deref(), Some("w/go"));
    assert_eq!(body["name"], "go");
    assert_eq!(body["payload"], json!({"ok": 1}));
    assert_eq!(
        scalar(&t.db, "SELECT count(*) FROM pgcrew.run_waits").await,
        0
    );
    assert_eq!(
        scalar(
            &t.db,
            "SELECT count(*) FROM pgcrew.run_signals \
             WHERE consumed_at IS NOT NULL AND consumed_by_step = 'w/go'"
        )
        .await,
        1
    );
    // The wait step, reached again by the run's code, answers from the ledger; nothing new.
    let scope = RunScope::new(run, tenant.clone()).with_lease(taken.lease.token);
    let got = bare_kernel(&t.db)
        .wait_step(&scope, "w/go", "go", HOUR, json!({}))
        .await
        .unwrap();
    assert_eq!(got, WaitOutcome::Signal(json!({"ok": 1})));
    assert_eq!(ledger_events(&t.db, run).await.len(), evs.len());
    // Another owner does not get the live lease; its holder keeps its token.
    assert!(
        runs::lease_run(&t.db, run, "w2", HOUR, None)
            .await
            .unwrap()
            .is_none()
    );
    let again = runs::lease_run(&t.db, run, "w1", HOUR, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.lease.token, taken.lease.token);
    // The old holder's token is fenced out.
    let stale = runs::complete_run(&t.db, run, runs::RunOutcome::default(), Some(old_token)).await;
    assert!(matches!(stale, Err(Error::LeaseLost(_))), "{stale:?}");
    runs::complete_run(
        &t.db,
        run,
        runs::RunOutcome::default(),
        Some(taken.lease.token),
    )
    .await
    .unwrap();
    // A finished run cannot be leased.
    let done = runs::lease_run(&t.db, run, "w1", HOUR, None).await;
    assert!(
        matches!(done, Err(Error::IllegalTransition { .. })),
        "{done:?}"
    );
    assert!(runs::verify_run_chain(&t.db, run).await.unwrap().valid);
}

#[tokio::test]
async fn an_unresolved_wait_keeps_waiting_and_a_passed_deadline_resumes_with_a_timeout() {
    let (t, tenant) = db_with_tenant("acme", &[], None).await;
    // Woken early (no signal, deadline ahead): the lease only; the wait step parks it again.
    let (run, _) = parked_run(&t.db, &tenant, HOUR).await;
    let before = ledger_events(&t.db, run).await.len();
    let taken = runs::lease_run(&t.db, run, "w1", HOUR, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(taken.run.state, RunState::Waiting);
    assert_eq!(ledger_events(&t.db, run).await.len(), before);
    assert_eq!(
        scalar(&t.db, "SELECT count(*) FROM pgcrew.run_waits").await,
        1
    );
    let scope = RunScope::new(run, tenant.clone()).with_lease(taken.lease.token);
    let parked = bare_kernel(&t.db)
        .wait_step(&scope, "w/go", "go", HOUR, json!({}))
        .await;
    assert!(matches!(parked, Err(Error::Waiting { .. })), "{parked:?}");
    assert!(
        runs::get_run(&t.db, run)
            .await
            .unwrap()
            .lease_owner
            .is_none()
    );

    // A signal of another name does not resolve the wait.
    let conn = t.db.get().await.unwrap();
    conn.execute(
        "INSERT INTO pgcrew.run_signals (run_id, tenant_id, name) VALUES ($1, 'acme', 'other')",
        &[&run],
    )
    .await
    .unwrap();
    let taken = runs::lease_run(&t.db, run, "w1", HOUR, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(taken.run.state, RunState::Waiting);

    // The deadline passed: `wait_timed_out` recorded, running again, the wait step replays it.
    let (run, _) = parked_run(&t.db, &tenant, Duration::from_millis(1)).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let taken = runs::lease_run(&t.db, run, "w1", HOUR, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(taken.run.state, RunState::Running);
    let evs = ledger_events(&t.db, run).await;
    assert_eq!(count(&evs, "wait_timed_out"), 1);
    assert_eq!(evs.last().unwrap().1.as_deref(), Some("w/go"));
    let scope = RunScope::new(run, tenant).with_lease(taken.lease.token);
    let got = bare_kernel(&t.db)
        .wait_step(&scope, "w/go", "go", HOUR, json!({}))
        .await
        .unwrap();
    assert_eq!(got, WaitOutcome::TimedOut);
    assert!(runs::verify_run_chain(&t.db, run).await.unwrap().valid);
}

#[tokio::test]
async fn bad_leases_are_refused_and_tenant_roles_cannot_take_runs() {
    let t = test_db().await;
    let ghost = runs::lease_run(&t.db, RunId::new(), "w1", HOUR, None).await;
    assert!(matches!(ghost, Err(Error::NotFound { .. })), "{ghost:?}");
    let run = crate::common::running_run(&t.db, 0).await;
    for (owner, ttl) in [("", HOUR), ("w1", Duration::ZERO)] {
        let bad = runs::lease_run(&t.db, run, owner, ttl, None).await;
        assert!(matches!(bad, Err(Error::InvalidInput { .. })), "{bad:?}");
    }
    let conn = t.db.get().await.unwrap();
    let err = conn
        .query("SELECT * FROM pgcrew.lease_run($1, 'w1', 0)", &[&run])
        .await
        .unwrap_err();
    assert_eq!(err.as_db_error().map(|d| d.code().code()), Some("22023"));
    assert!(
        runs::get_run(&t.db, run)
            .await
            .unwrap()
            .lease_owner
            .is_none()
    );

    let events = ledger_events(&t.db, run).await.len();
    let role = format!("lease_run_{}", std::process::id());
    conn.batch_execute(&format!(
        "DROP ROLE IF EXISTS {role}; CREATE ROLE {role}; \
         SELECT pgcrew.grant_tenant_role('{role}', 'default');"
    ))
    .await
    .unwrap();
    let mut codes = Vec::new();
    for call in [
        format!("pgcrew.lease_run('{run}', 'w1', 1000000)"),
        format!(
            "pgcrew.finish_run('{run}', 'completed', NULL, '{{}}', NULL, NULL, NULL, 0, 0, 0, \
             NULL, NULL, NULL)"
        ),
        format!(
            "pgcrew.ledger_insert((SELECT r FROM pgcrew.runs r WHERE r.id = '{run}'), 'note', \
             NULL, '{{}}')"
        ),
        format!("pgcrew.lease_runs(ARRAY['{run}'::uuid], ARRAY['default'], 'w1', 1000000)"),
        format!(
            "pgcrew.lease_locked_run((SELECT r FROM pgcrew.runs r WHERE r.id = '{run}'), 'w1', \
             1000000, NULL)"
        ),
    ] {
        let err = conn
            .batch_execute(&format!("SET ROLE {role}; SELECT * FROM {call}"))
            .await
            .unwrap_err();
        codes.push(err.as_db_error().map(|d| d.code().code().to_string()));
        conn.batch_execute("RESET ROLE").await.unwrap();
    }
    conn.batch_execute(&format!(
        "SELECT pgcrew.revoke_tenant_role('{role}'); DROP ROLE {role}"
    ))
    .await
    .unwrap();
    assert!(
        codes.iter().all(|c| c.as_deref() == Some("42501")),
        "{codes:?}"
    );
    let after = runs::get_run(&t.db, run).await.unwrap();
    assert!(after.lease_owner.is_none());
    assert_eq!(after.state, RunState::Running);
    assert_eq!(ledger_events(&t.db, run).await.len(), events);
}

#[tokio::test]
async fn a_run_finishes_in_one_statement_with_its_checks_and_a_signed_head() {
    let (t, tenant) = db_with_tenant("acme", &[], None).await;
    // An unknown run, an unknown target state, a pending run that cannot complete.
    let conn = t.db.get().await.unwrap();
    let call = |run: RunId, state: &str| {
        format!(
            "SELECT * FROM pgcrew.finish_run('{run}', '{state}', NULL, '{{}}', NULL, NULL, NULL, \
             0, 0, 0, NULL, NULL, NULL)"
        )
    };
    for (run, state, code) in [
        (RunId::new(), "completed", "PC002"),
        (started_run(&t.db, &tenant).await, "running", "22023"),
    ] {
        let err = conn.batch_execute(&call(run, state)).await.unwrap_err();
        assert_eq!(
            err.as_db_error().map(|d| d.code().code()),
            Some(code),
            "{err}"
        );
    }
    let pending = runs::create_run(&t.db, runs::NewRun::new(tenant.clone()))
        .await
        .unwrap();
    let err = conn
        .batch_execute(&call(pending, "completed"))
        .await
        .unwrap_err();
    let db = err.as_db_error().unwrap();
    assert_eq!((db.code().code(), db.detail()), ("PC006", Some("pending")));
    match runs::complete_run(&t.db, pending, runs::RunOutcome::default(), None).await {
        Err(Error::IllegalTransition { from, to, .. }) => {
            assert_eq!((from.as_str(), to.as_str()), ("pending", "completed"));
        }
        other => panic!("{other:?}"),
    }
    // Completion under a lease: the outcome added, the lease cleared, `run_completed` with
    // {from, to}, the chain valid; twice is illegal.
    let run = started_run(&t.db, &tenant).await;
    let lease = runs::acquire_run_lease(&t.db, run, "w1", HOUR)
        .await
        .unwrap()
        .unwrap();
    let outcome = runs::RunOutcome {
        response_text: Some("done".into()),
        input_tokens: 3,
        output_tokens: 4,
        cost_usd: 0.5,
        ..Default::default()
    };
    let stale = runs::complete_run(
        &t.db,
        run,
        runs::RunOutcome::default(),
        Some(lease.token - 1),
    )
    .await;
    assert!(matches!(stale, Err(Error::LeaseLost(_))), "{stale:?}");
    let done = runs::complete_run(&t.db, run, outcome, Some(lease.token))
        .await
        .unwrap();
    assert_eq!(done.state, RunState::Completed);
    assert_eq!((done.input_tokens, done.output_tokens), (3, 4));
    assert!((done.cost_usd - 0.5).abs() < 1e-9);
    assert!(done.lease_owner.is_none() && done.finalized_at.is_some());
    let evs = ledger_events(&t.db, run).await;
    let (ty, _, body) = evs.last().unwrap();
    assert_eq!(ty, "run_completed");
    assert_eq!(
        (&body["from"], &body["to"]),
        (&json!("running"), &json!("completed"))
    );
    assert_eq!(body["input_tokens"], 3);
    let again = runs::complete_run(&t.db, run, runs::RunOutcome::default(), None).await;
    assert!(
        matches!(again, Err(Error::IllegalTransition { .. })),
        "{again:?}"
    );
    assert!(runs::verify_run_chain(&t.db, run).await.unwrap().valid);
}
