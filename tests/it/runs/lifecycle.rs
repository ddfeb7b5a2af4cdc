//! A run's life: leases, transitions, concurrency limits, cancellation, subscriptions, maintenance.

use super::*;

#[tokio::test]
async fn paused_lease_holder_loses_the_run_and_its_late_writes_are_rejected() {
    let (t, run) = db_with_run().await;
    let ttl = Duration::from_millis(400);
    let a = runs::acquire_run_lease(&t.db, run, "worker-a", ttl)
        .await
        .unwrap()
        .expect("free run");
    // Someone else cannot take a live lease.
    assert!(
        runs::acquire_run_lease(&t.db, run, "worker-b", ttl)
            .await
            .unwrap()
            .is_none()
    );
    runs::append_event(&t.db, run, NewEvent::new("a1", json!({})), Some(a.token))
        .await
        .unwrap();
    let a = runs::renew_run_lease(&t.db, &a, ttl).await.unwrap();

    // A holds an open transaction (a connection it is "paused" on) while its lease runs out.
    let mut paused = t.db.get().await.unwrap();
    let paused_tx = paused.transaction().await.unwrap();
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;

    let b = runs::acquire_run_lease(&t.db, run, "worker-b", Duration::from_secs(30))
        .await
        .unwrap()
        .expect("expired lease is taken over");
    assert!(b.token > a.token);

    // A wakes up: everything it tries under its old token is rejected.
    let late = runs::append_events(
        &paused_tx,
        run,
        &[NewEvent::new("a-late", json!({}))],
        Some(a.token),
    )
    .await;
    assert!(matches!(late, Err(Error::LeaseLost(_))), "{late:?}");
    drop(paused_tx);
    assert!(append_lease_lost(&t.db, run, "a-late", a.token).await);
    assert!(matches!(
        runs::renew_run_lease(&t.db, &a, ttl).await,
        Err(Error::LeaseLost(_))
    ));
    assert!(matches!(
        runs::start_run(&t.db, run, None, Some(a.token), LimitPolicy::Reject).await,
        Err(Error::LeaseLost(_))
    ));
    assert!(!runs::release_run_lease(&t.db, &a).await.unwrap());

    // B's writes succeed.
    runs::append_event(&t.db, run, NewEvent::new("b1", json!({})), Some(b.token))
        .await
        .unwrap();
    let started = runs::start_run(&t.db, run, None, Some(b.token), LimitPolicy::Reject)
        .await
        .unwrap();
    assert!(matches!(started, StartOutcome::Started(_)));
    let done = runs::complete_run(&t.db, run, RunOutcome::default(), Some(b.token))
        .await
        .unwrap();
    assert_eq!(done.state, RunState::Completed);
    assert_eq!(done.lease_owner, None);
    let types = event_types(&t.db, run).await;
    assert_eq!(
        types,
        vec!["run_created", "a1", "b1", "run_started", "run_completed"]
    );
    assert!(runs::verify_run_chain(&t.db, run).await.unwrap().valid);
    // A finished run cannot be leased.
    assert!(matches!(
        runs::acquire_run_lease(&t.db, run, "worker-c", ttl).await,
        Err(Error::IllegalTransition { .. })
    ));
}

#[tokio::test]
async fn illegal_transitions_are_errors_and_change_nothing() {
    let (t, run) = db_with_run().await;
    let r = runs::complete_run(&t.db, run, RunOutcome::default(), None).await;
    assert!(
        matches!(&r, Err(Error::IllegalTransition { from, to, .. }) if from == "pending" && to == "completed"),
        "{r:?}"
    );
    let inst = InstanceId::new("inst-1").unwrap();
    runs::start_run(&t.db, run, Some(&inst), None, LimitPolicy::Reject)
        .await
        .unwrap();
    let again = runs::start_run(&t.db, run, None, None, LimitPolicy::Reject).await;
    assert!(matches!(again, Err(Error::IllegalTransition { .. })));
    let done = runs::complete_run(
        &t.db,
        run,
        RunOutcome {
            response_text: Some("hi".into()),
            stop_reason: Some("end_turn".into()),
            input_tokens: 10,
            output_tokens: 5,
            cost_usd: 0.25,
        },
        None,
    )
    .await
    .unwrap();
    assert_eq!(done.state, RunState::Completed);
    assert_eq!(done.instance_id.as_deref(), Some("inst-1"));
    assert_eq!((done.input_tokens, done.output_tokens), (10, 5));
    assert!((done.cost_usd - 0.25).abs() < 1e-9);
    assert!(done.finalized_at.is_some());
    for res in [
        runs::fail_run(&t.db, run, "x", "boom", None).await,
        runs::cancel_run(&t.db, run, "stop").await,
    ] {
        assert!(
            matches!(res, Err(Error::IllegalTransition { .. })),
            "{res:?}"
        );
    }
    // The trigger also refuses a direct SQL update out of a terminal state.
    let direct =
        t.db.get()
            .await
            .unwrap()
            .execute(
                "UPDATE pgcrew.runs SET state = 'running' WHERE id = $1",
                &[&run],
            )
            .await;
    assert!(direct.is_err());
    let after = runs::get_run(&t.db, run).await.unwrap();
    assert_eq!(after.state, RunState::Completed);
    assert_eq!(after.response_text.as_deref(), Some("hi"));
    let types = event_types(&t.db, run).await;
    assert_eq!(types, vec!["run_created", "run_started", "run_completed"]);
    // Bad input: negative usage, empty reason, unknown tenant/run.
    let r2 = new_run(&t.db).await;
    assert!(matches!(
        runs::cancel_run(&t.db, r2, " ").await,
        Err(Error::InvalidInput { .. })
    ));
    assert!(matches!(
        runs::create_run(&t.db, NewRun::new(tenant("nobody"))).await,
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        runs::get_run(&t.db, RunId::new()).await,
        Err(Error::NotFound { .. })
    ));
    let failed = runs::fail_run(&t.db, r2, "tool_error", "tool exploded", None)
        .await
        .unwrap();
    assert_eq!(failed.state, RunState::Failed);
    assert_eq!(failed.error_type.as_deref(), Some("tool_error"));
}

#[tokio::test]
async fn concurrent_runs_limit_is_exact_under_concurrency() {
    let t = test_db().await;
    add_tenant(&t.db, "acme", Some(3)).await;
    let mut ids = Vec::new();
    for _ in 0..12 {
        ids.push(
            runs::create_run(&t.db, NewRun::new(tenant("acme")))
                .await
                .unwrap(),
        );
    }
    let mut handles = Vec::new();
    for id in ids.clone() {
        let db = t.db.clone();
        handles.push(tokio::spawn(async move {
            runs::start_run(&db, id, None, None, LimitPolicy::StayPending)
                .await
                .unwrap()
        }));
    }
    let mut started = Vec::new();
    for (h, id) in handles.into_iter().zip(ids.iter()) {
        match h.await.unwrap() {
            StartOutcome::Started(r) => started.push(r.id),
            StartOutcome::LimitReached { running, limit } => {
                assert_eq!((running, limit), (3, 3));
                assert_eq!(
                    runs::get_run(&t.db, *id).await.unwrap().state,
                    RunState::Pending
                );
            }
        }
    }
    assert_eq!(started.len(), 3);
    let running = runs::list_runs(
        &t.db,
        &runs::RunFilter {
            tenant: Some(tenant("acme")),
            state: Some(RunState::Running),
            limit: 100,
        },
    )
    .await
    .unwrap();
    assert_eq!(running.len(), 3);
    let pending: Vec<RunId> = ids
        .iter()
        .copied()
        .filter(|i| !started.contains(i))
        .collect();
    assert!(matches!(
        runs::start_run(&t.db, pending[0], None, None, LimitPolicy::Reject).await,
        Err(Error::LimitReached { .. })
    ));
    // Other tenants are not limited by acme's runs.
    let other = new_run(&t.db).await;
    assert!(matches!(
        runs::start_run(&t.db, other, None, None, LimitPolicy::Reject)
            .await
            .unwrap(),
        StartOutcome::Started(_)
    ));
    // Finishing one frees exactly one slot.
    runs::complete_run(&t.db, started[0], RunOutcome::default(), None)
        .await
        .unwrap();
    assert!(matches!(
        runs::start_run(&t.db, pending[0], None, None, LimitPolicy::Reject)
            .await
            .unwrap(),
        StartOutcome::Started(_)
    ));
    assert!(matches!(
        runs::start_run(&t.db, pending[1], None, None, LimitPolicy::StayPending)
            .await
            .unwrap(),
        StartOutcome::LimitReached { .. }
    ));
}

#[tokio::test]
async fn cancellation_reaches_a_running_step_on_another_instance() {
    let t = test_db().await;
    let worker = started_client(&t.db).await;
    let other = started_client(&t.db).await;
    let run = new_run(&t.db).await;
    runs::start_run(
        worker.db(),
        run,
        Some(worker.instance_id()),
        None,
        LimitPolicy::Reject,
    )
    .await
    .unwrap();
    // Slow fallback poll: the notification must do the work.
    let watcher = runs::RunWatcher::spawn(
        worker.db().clone(),
        worker.notifier(),
        Duration::from_secs(60),
    );
    let token = watcher.watch(run).await.unwrap();
    assert!(!token.is_cancelled());
    let step = tokio::spawn({
        let token = token.clone();
        async move {
            tokio::select! {
                _ = token.cancelled() => "cancelled",
                _ = tokio::time::sleep(Duration::from_secs(60)) => "finished",
            }
        }
    });
    let cancelled = runs::cancel_run(other.db(), run, "user pressed stop")
        .await
        .unwrap();
    assert_eq!(cancelled.state, RunState::Cancelled);
    assert_eq!(
        cancelled.cancel_reason.as_deref(),
        Some("user pressed stop")
    );
    let outcome = tokio::time::timeout(Duration::from_secs(20), step)
        .await
        .expect("cancellation reached the step")
        .unwrap();
    assert_eq!(outcome, "cancelled");
    assert_eq!(watcher.watched(), 0);
    // Watching an already-cancelled run returns a cancelled token.
    assert!(watcher.watch(run).await.unwrap().is_cancelled());
    let last = runs::read_events(&t.db, run, 0, 100).await.unwrap();
    let ev = last.last().unwrap();
    assert_eq!(ev.event_type, "run_cancelled");
    assert_eq!(ev.payload["reason"], "user pressed stop");
    worker.stop().await.unwrap();
    other.stop().await.unwrap();
}

#[tokio::test]
async fn subscribe_run_streams_new_events_in_order_without_gaps() {
    let t = test_db().await;
    let client = started_client(&t.db).await;
    let run = run_with_events(&t.db, 3).await;
    let stream = runs::subscribe_run(
        t.db.clone(),
        client.notifier(),
        run,
        2,
        Duration::from_secs(30),
    );
    let mut stream = Box::pin(stream);
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let db = t.db.clone();
            tokio::spawn(async move {
                for i in 0..10 {
                    append_from_writer(&db, run, "live", w, i).await;
                }
            })
        })
        .collect();
    let mut seen = Vec::new();
    while seen.len() < 42 {
        let ev = tokio::time::timeout(Duration::from_secs(20), stream.next())
            .await
            .expect("event delivered")
            .unwrap()
            .unwrap();
        seen.push(ev.seq);
    }
    for w in writers {
        w.await.unwrap();
    }
    assert_eq!(seen, (3..=44).collect::<Vec<i64>>());
    client.stop().await.unwrap();
}

#[tokio::test]
async fn maintenance_releases_dead_leases_and_fail_run_in_a_transaction_records_the_event() {
    let (t, run) = db_with_run().await;
    let lease = runs::acquire_run_lease(
        &t.db,
        run,
        "gone-instance/worker-1",
        Duration::from_secs(600),
    )
    .await
    .unwrap()
    .unwrap();
    let mut conn = t.db.get().await.unwrap();
    let tx = conn.transaction().await.unwrap();
    let ctx = pgcrew::coord::maintenance::MaintenanceContext {
        config: std::sync::Arc::new(ClientConfig::default()),
        instance_id: InstanceId::new("leader").unwrap(),
        lease: "default".into(),
        term: 1,
    };
    let mut released = 0;
    for step in runs::maintenance_steps() {
        released += step.run(&tx, &ctx).await.unwrap();
    }
    assert_eq!(released, 1);
    let failed = runs::fail_run(&tx, run, "timeout", "run timed out", None)
        .await
        .unwrap();
    assert_eq!(failed.state, RunState::Failed);
    tx.commit().await.unwrap();
    assert!(append_lease_lost(&t.db, run, "late", lease.token).await);
    let evs = runs::read_events(&t.db, run, 0, 10).await.unwrap();
    assert_eq!(evs.last().unwrap().event_type, "run_failed");

    // Stuck runs are failed with their ledger event, inside the caller's transaction. They are
    // judged by their lease: a run running for two hours whose lease is being renewed is live.
    let stuck = new_run(&t.db).await;
    let fresh = new_run(&t.db).await;
    let long_lived = new_run(&t.db).await;
    for r in [stuck, fresh, long_lived] {
        runs::start_run(&t.db, r, None, None, LimitPolicy::Reject)
            .await
            .unwrap();
    }
    for r in [stuck, long_lived] {
        exec(
            &t.db,
            "UPDATE pgcrew.runs SET started_at = now() - interval '2 hours' WHERE id = $1",
            r,
        )
        .await;
    }
    let live_lease =
        runs::acquire_run_lease(&t.db, long_lived, "busy-instance", Duration::from_secs(60))
            .await
            .unwrap()
            .unwrap();
    runs::renew_run_lease(&t.db, &live_lease, Duration::from_secs(60))
        .await
        .unwrap();
    let listed: Vec<uuid::Uuid> = conn
        .query("SELECT run_id FROM pgcrew.stuck_runs", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(listed.contains(&stuck.0), "{listed:?}");
    assert!(
        !listed.contains(&long_lived.0),
        "a run with a live lease is not stuck"
    );
    let tx = conn.transaction().await.unwrap();
    let failed = runs::fail_stuck_runs(&tx, Duration::from_secs(3600), 100, None)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(failed, vec![stuck]);
    let s = runs::get_run(&t.db, stuck).await.unwrap();
    assert_eq!(s.state, RunState::Failed);
    assert_eq!(s.error_message.as_deref(), Some("run timed out"));
    for r in [fresh, long_lived] {
        assert_eq!(
            runs::get_run(&t.db, r).await.unwrap().state,
            RunState::Running
        );
    }
    let sev = runs::read_events(&t.db, stuck, 0, 10).await.unwrap();
    assert_eq!(sev.last().unwrap().event_type, "run_failed");

    // Retention keeps an anchor of the finished run's chain.
    let last = evs.last().unwrap().clone();
    let anchor = runs::purge_run(&t.db, run, "retention test").await.unwrap();
    assert_eq!(anchor.last_seq, last.seq);
    assert_eq!(anchor.last_hash, last.hash);
    assert!(
        runs::read_events(&t.db, run, 0, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let v = runs::verify_run_chain(&t.db, run).await.unwrap();
    assert!(v.valid && v.anchor.is_some());
    // Unfinished runs cannot be purged.
    let live = new_run(&t.db).await;
    assert!(matches!(
        runs::purge_run(&t.db, live, "nope").await,
        Err(Error::InvalidInput { .. })
    ));
}

/// Whether appending an empty event of type `ty` under the lease `token` is refused with
/// `LeaseLost`.
async fn append_lease_lost(db: &Db, run: RunId, ty: &str, token: i64) -> bool {
    matches!(
        runs::append_event(db, run, NewEvent::new(ty, json!({})), Some(token)).await,
        Err(Error::LeaseLost(_))
    )
}

/// The types of a run's first 100 ledger events, in order.
async fn event_types(db: &Db, run: RunId) -> Vec<String> {
    runs::read_events(db, run, 0, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.event_type)
        .collect()
}
