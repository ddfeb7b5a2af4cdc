//! Runs, sessions, the hash-chained ledger, leases, cancellation, artifacts, summaries, the run
//! CLI — against a real PostgreSQL.

use std::time::Duration;

use futures_util::StreamExt;
use pgcrew::db::Db;
use pgcrew::runs::{
    self, LimitPolicy, NewEvent, NewRun, RunOutcome, RunState, StartOutcome, SummaryContent,
};
use pgcrew::{Client, ClientConfig, Error, InstanceId, RunId, TenantId};
use serde_json::json;

use crate::common::{append_notes, cli, pgcrew_bin, test_db};

fn tenant(id: &str) -> TenantId {
    TenantId::new(id).unwrap()
}

async fn add_tenant(db: &Db, id: &str, max_runs: Option<i32>) {
    db.get()
        .await
        .unwrap()
        .execute(
            "INSERT INTO pgcrew.tenants (id, max_concurrent_runs) VALUES ($1, $2)",
            &[&id, &max_runs],
        )
        .await
        .unwrap();
}

async fn new_run(db: &Db) -> RunId {
    runs::create_run(db, NewRun::new(tenant("default")).agent("tester"))
        .await
        .unwrap()
}

async fn run_with_events(db: &Db, n: usize) -> RunId {
    let run = new_run(db).await;
    append_notes(db, run, n).await;
    run
}

async fn exec(db: &Db, sql: &str, run: RunId) {
    db.get().await.unwrap().execute(sql, &[&run]).await.unwrap();
}

async fn both_verifiers(db: &Db, run: RunId) -> (Option<i64>, Option<i64>) {
    let rust = runs::verify_run_chain(db, run).await.unwrap();
    let sql = runs::verify_run_chain_sql(db, run).await.unwrap();
    assert_eq!(rust.valid, rust.first_bad_seq.is_none());
    assert_eq!(sql.valid, sql.first_bad_seq.is_none());
    (rust.first_bad_seq, sql.first_bad_seq)
}

#[tokio::test]
async fn eight_concurrent_writers_get_gapless_seqs_and_a_valid_chain() {
    let t = test_db().await;
    let run = new_run(&t.db).await;
    let mut handles = Vec::new();
    for w in 0..8 {
        let db = t.db.clone();
        handles.push(tokio::spawn(async move {
            for i in 0..25 {
                if i % 5 == 0 {
                    let batch: Vec<_> = (0..3)
                        .map(|j| NewEvent::new("batch", json!({"w": w, "i": i, "j": j})))
                        .collect();
                    let got = runs::append_events(&db, run, &batch, None).await.unwrap();
                    // A batch gets consecutive seqs.
                    assert_eq!(got[1].seq, got[0].seq + 1);
                    assert_eq!(got[2].seq, got[0].seq + 2);
                } else {
                    runs::append_event(
                        &db,
                        run,
                        NewEvent::new("single", json!({"w": w, "i": i})),
                        None,
                    )
                    .await
                    .unwrap();
                }
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    // run_created + 8 writers × (20 singles + 5 batches of 3).
    let expected = 1 + 8 * (20 + 5 * 3);
    let events = runs::read_events(&t.db, run, 0, 10_000).await.unwrap();
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=expected).collect::<Vec<i64>>());
    for w in events.windows(2) {
        assert_eq!(w[1].prev_hash, w[0].hash);
    }
    let v = runs::verify_run_chain(&t.db, run).await.unwrap();
    assert!(v.valid, "{v:?}");
    assert_eq!(v.checked, expected as u64);
    let s = runs::verify_run_chain_sql(&t.db, run).await.unwrap();
    assert!(s.valid, "{s:?}");
    assert_eq!(s.checked, expected as u64);
}

#[tokio::test]
async fn hash_formula_matches_the_documented_one() {
    let t = test_db().await;
    let run = new_run(&t.db).await;
    let ev = runs::append_event(
        &t.db,
        run,
        NewEvent::new("tool_completed", json!({"b": [1, 2.5, "ü"], "a": null})).step("step-1"),
        None,
    )
    .await
    .unwrap();
    let row = t
        .db
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT tenant_id, event_type, step_key, (extract(epoch FROM created_at) * 1000000)::int8, \
             payload::text, prev_hash, hash, created_at FROM pgcrew.events WHERE run_id = $1 AND seq = $2",
            &[&run, &ev.seq],
        )
        .await
        .unwrap();
    let prev: Vec<u8> = row.get(5);
    let hash: Vec<u8> = row.get(6);
    let created: chrono::DateTime<chrono::Utc> = row.get(7);
    // created_at round-trips exactly: the returned value is the stored and hashed one.
    assert_eq!(created, ev.created_at);
    assert_eq!(row.get::<_, i64>(3), ev.created_at.timestamp_micros());
    // New runs use ledger format v2: the run id is hashed right after the previous hash.
    let computed = runs::event_hash_v2(
        &prev,
        run,
        ev.seq,
        row.get(0),
        row.get(1),
        row.get(2),
        row.get(3),
        row.get(4),
    );
    assert_eq!(computed.to_vec(), hash);
    assert_eq!(ev.hash, hash);
    // The first event chains from 32 zero bytes.
    let first = runs::read_events(&t.db, run, 0, 1).await.unwrap();
    assert_eq!(first[0].prev_hash, vec![0u8; 32]);
}

#[tokio::test]
async fn tampering_is_reported_at_the_right_seq_by_both_verifiers() {
    let t = test_db().await;
    // Changed payload.
    let a = run_with_events(&t.db, 10).await;
    assert_eq!(both_verifiers(&t.db, a).await, (None, None));
    exec(
        &t.db,
        "UPDATE pgcrew.events SET payload = '{\"i\": 99}' WHERE run_id = $1 AND seq = 5",
        a,
    )
    .await;
    assert_eq!(both_verifiers(&t.db, a).await, (Some(5), Some(5)));

    // (what, events written, tampering statements, the seq both verifiers report)
    let cases: [(&str, usize, &[&str], i64); 4] = [
        (
            "deleted row",
            10,
            &["DELETE FROM pgcrew.events WHERE run_id = $1 AND seq = 4"],
            4,
        ),
        (
            "two rows swapped (seq numbers exchanged)",
            10,
            &[
                "UPDATE pgcrew.events SET seq = 1000 WHERE run_id = $1 AND seq = 3",
                "UPDATE pgcrew.events SET seq = 3 WHERE run_id = $1 AND seq = 7",
                "UPDATE pgcrew.events SET seq = 7 WHERE run_id = $1 AND seq = 1000",
            ],
            3,
        ),
        (
            "rewritten step key on the last row",
            6,
            &["UPDATE pgcrew.events SET step_key = 'other' WHERE run_id = $1 AND seq = 7"],
            7,
        ),
        // The last events deleted: the run row's recorded head exposes it at the first
        // missing seq.
        (
            "truncated ledger",
            6,
            &["DELETE FROM pgcrew.events WHERE run_id = $1 AND seq >= 6"],
            6,
        ),
    ];
    for (what, events, statements, seq) in cases {
        let run = run_with_events(&t.db, events).await;
        for sql in statements {
            exec(&t.db, sql, run).await;
        }
        assert_eq!(
            both_verifiers(&t.db, run).await,
            (Some(seq), Some(seq)),
            "{what}"
        );
    }
}

#[tokio::test]
async fn cli_verify_ledger_exit_codes() {
    let t = test_db().await;
    let run = run_with_events(&t.db, 5).await;
    let out = |args: Vec<String>| cli(t.dsn(), args);
    let ok = out(vec!["run".into(), "verify-ledger".into(), run.to_string()]).await;
    assert_eq!(ok.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(stdout.starts_with("valid: 6 events"), "{stdout}");
    // Without a key the CLI says plainly what it cannot see.
    assert!(stdout.contains("full rewrite"), "{stdout}");
    exec(
        &t.db,
        "UPDATE pgcrew.events SET payload = '{}' WHERE run_id = $1 AND seq = 3",
        run,
    )
    .await;
    for sql in [false, true] {
        let mut args = vec!["run".into(), "verify-ledger".into(), run.to_string()];
        if sql {
            args.push("--sql".into());
        }
        let bad = out(args).await;
        assert_eq!(bad.status.code(), Some(1));
        let stdout = String::from_utf8_lossy(&bad.stdout);
        assert!(stdout.starts_with("invalid at seq 3: "), "{stdout}");
    }
    let unknown = out(vec![
        "run".into(),
        "verify-ledger".into(),
        RunId::new().to_string(),
    ])
    .await;
    assert_eq!(unknown.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("not found"));
    let garbage = out(vec!["run".into(), "verify-ledger".into(), "nope".into()]).await;
    assert_eq!(garbage.status.code(), Some(2));
}

#[tokio::test]
async fn idempotent_batch_and_in_transaction_appends() {
    let t = test_db().await;
    let run = new_run(&t.db).await;
    let ev = NewEvent::new("model_completed", json!({"tokens": 5}))
        .step("turn-1")
        .idempotent();
    let first = runs::append_event(&t.db, run, ev.clone(), None)
        .await
        .unwrap();
    assert!(first.inserted);
    let again = runs::append_event(&t.db, run, ev.clone(), None)
        .await
        .unwrap();
    assert!(!again.inserted);
    assert_eq!(again.seq, first.seq);
    assert_eq!(again.hash, first.hash);

    // In the caller's transaction: rolled back → nothing stored; committed → stored.
    let mut conn = t.db.get().await.unwrap();
    {
        let tx = conn.transaction().await.unwrap();
        let got = runs::append_events_in(&tx, run, &[NewEvent::new("x", json!(1))], None)
            .await
            .unwrap();
        assert_eq!(got[0].seq, first.seq + 1);
        tx.rollback().await.unwrap();
    }
    {
        let tx = conn.transaction().await.unwrap();
        let got =
            runs::append_events_in(&tx, run, &[NewEvent::new("y", json!(2)), ev.clone()], None)
                .await
                .unwrap();
        assert_eq!(got[0].seq, first.seq + 1);
        assert!(got[0].inserted);
        assert!(!got[1].inserted);
        tx.commit().await.unwrap();
    }
    let all = runs::read_events(&t.db, run, 0, 100).await.unwrap();
    assert_eq!(
        all.iter()
            .map(|e| e.event_type.as_str())
            .collect::<Vec<_>>(),
        vec!["run_created", "model_completed", "y"]
    );
    // Bad input changes nothing.
    assert!(matches!(
        runs::append_events(&t.db, run, &[], None).await,
        Err(Error::InvalidInput { .. })
    ));
    assert!(matches!(
        runs::append_event(&t.db, run, NewEvent::new("", json!({})), None).await,
        Err(Error::InvalidInput { .. })
    ));
    assert!(matches!(
        runs::append_event(&t.db, RunId::new(), NewEvent::new("a", json!({})), None).await,
        Err(Error::NotFound { .. })
    ));
    assert_eq!(
        runs::read_events(&t.db, run, 0, 100).await.unwrap().len(),
        3
    );
    assert!(runs::verify_run_chain(&t.db, run).await.unwrap().valid);
}

#[tokio::test]
async fn paused_lease_holder_loses_the_run_and_its_late_writes_are_rejected() {
    let t = test_db().await;
    let run = new_run(&t.db).await;
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
    let late = runs::append_events_in(
        &paused_tx,
        run,
        &[NewEvent::new("a-late", json!({}))],
        Some(a.token),
    )
    .await;
    assert!(matches!(late, Err(Error::LeaseLost(_))), "{late:?}");
    drop(paused_tx);
    assert!(matches!(
        runs::append_event(
            &t.db,
            run,
            NewEvent::new("a-late", json!({})),
            Some(a.token)
        )
        .await,
        Err(Error::LeaseLost(_))
    ));
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
    let types: Vec<String> = runs::read_events(&t.db, run, 0, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.event_type)
        .collect();
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
    let t = test_db().await;
    let run = new_run(&t.db).await;
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
    let types: Vec<String> = runs::read_events(&t.db, run, 0, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.event_type)
        .collect();
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

async fn started_client(db: &Db) -> Client {
    let config = ClientConfig::builder()
        .notify_poll_interval(Duration::from_secs(30))
        .leader_election(false)
        .build()
        .unwrap();
    let client = Client::connect(db.clone(), config).await.unwrap();
    client.start().await.unwrap();
    assert!(
        client
            .notifier()
            .wait_connected(Duration::from_secs(10))
            .await
    );
    client
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
                    runs::append_event(
                        &db,
                        run,
                        NewEvent::new("live", json!({"w": w, "i": i})),
                        None,
                    )
                    .await
                    .unwrap();
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
async fn tail_follow_sees_events_appended_by_another_process() {
    use tokio::io::AsyncBufReadExt;
    let t = test_db().await;
    let run = run_with_events(&t.db, 2).await;
    let mut child = tokio::process::Command::new(pgcrew_bin())
        .env("DATABASE_URL", t.dsn())
        .args(["run", "tail", &run.to_string(), "--follow"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut got = Vec::new();
    // The existing events first.
    for _ in 0..3 {
        let l = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        got.push(l);
    }
    // Then live ones, appended after the CLI started following.
    for i in 0..3 {
        runs::append_event(
            &t.db,
            run,
            NewEvent::new("live", json!({"i": i})).step(format!("k{i}")),
            None,
        )
        .await
        .unwrap();
    }
    for _ in 0..3 {
        let l = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("tail --follow printed the live event")
            .unwrap()
            .unwrap();
        got.push(l);
    }
    let fields: Vec<Vec<&str>> = got.iter().map(|l| l.split('\t').collect()).collect();
    assert!(fields.iter().all(|f| f.len() == 4), "{got:?}");
    assert_eq!(
        fields.iter().map(|f| f[0]).collect::<Vec<_>>(),
        vec!["1", "2", "3", "4", "5", "6"]
    );
    assert_eq!(fields[0][2], "run_created");
    assert_eq!(fields[5][2], "live");
    assert_eq!(fields[5][3], "k2");
    // Once the run is finished and printed, --follow exits by itself.
    runs::cancel_run(&t.db, run, "done").await.unwrap();
    let l = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(l.contains("run_cancelled"), "{l}");
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("tail --follow exits after the run finished")
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn artifacts_and_summaries() {
    let t = test_db().await;
    let run = new_run(&t.db).await;
    let v1 = runs::put_artifact(&t.db, run, "plan", json!({"steps": 1}), None)
        .await
        .unwrap();
    let v2 = runs::put_artifact(&t.db, run, "plan", json!({"steps": 2}), None)
        .await
        .unwrap();
    runs::put_artifact(&t.db, run, "notes", json!("x"), None)
        .await
        .unwrap();
    assert_eq!((v1.version, v2.version), (1, 2));
    let latest = runs::get_artifact(&t.db, run, "plan")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(latest.value, json!({"steps": 2}));
    let hist = runs::artifact_history(&t.db, run, "plan").await.unwrap();
    assert_eq!(
        hist.iter().map(|a| a.version).collect::<Vec<_>>(),
        vec![1, 2]
    );
    let all = runs::list_artifacts(&t.db, run).await.unwrap();
    assert_eq!(
        all.iter()
            .map(|a| (a.key.as_str(), a.version))
            .collect::<Vec<_>>(),
        vec![("notes", 1), ("plan", 2)]
    );
    assert!(
        runs::get_artifact(&t.db, run, "missing")
            .await
            .unwrap()
            .is_none()
    );
    assert!(matches!(
        runs::put_artifact(&t.db, run, "", json!(1), None).await,
        Err(Error::InvalidInput { .. })
    ));
    runs::add_summary(
        &t.db,
        run,
        "conversation",
        SummaryContent::Text("hello".into()),
        None,
    )
    .await
    .unwrap();
    runs::add_summary(
        &t.db,
        run,
        "plan",
        SummaryContent::Json(json!({"a": 1})),
        None,
    )
    .await
    .unwrap();
    runs::add_summary(
        &t.db,
        run,
        "conversation",
        SummaryContent::Text("bye".into()),
        None,
    )
    .await
    .unwrap();
    let conv = runs::list_summaries(&t.db, run, Some("conversation"), 10)
        .await
        .unwrap();
    assert_eq!(
        conv.iter().map(|s| s.content.clone()).collect::<Vec<_>>(),
        vec![
            SummaryContent::Text("bye".into()),
            SummaryContent::Text("hello".into())
        ]
    );
    assert_eq!(
        runs::list_summaries(&t.db, run, None, 2)
            .await
            .unwrap()
            .len(),
        2
    );
    // The CLI shows them.
    let out = tokio::process::Command::new(pgcrew_bin())
        .env("DATABASE_URL", t.dsn())
        .args(["run", "artifacts", &run.to_string(), "--json"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn sessions_list_and_cli_list_status_cancel() {
    let t = test_db().await;
    let s = runs::new_session(&t.db, &tenant("default"), "chat-1", json!({"u": 1}))
        .await
        .unwrap();
    let same = runs::new_session(&t.db, &tenant("default"), "chat-1", json!({}))
        .await
        .unwrap();
    assert_eq!(s.id, same.id);
    assert_eq!(
        runs::get_session(&t.db, s.id).await.unwrap().identifier,
        "chat-1"
    );
    add_tenant(&t.db, "other", None).await;
    // A session of another tenant cannot be used.
    assert!(matches!(
        runs::create_run(&t.db, NewRun::new(tenant("other")).session(s.id)).await,
        Err(Error::NotFound { .. })
    ));
    let r1 = runs::create_run(&t.db, NewRun::new(tenant("default")).session(s.id))
        .await
        .unwrap();
    let r2 = runs::create_run(&t.db, NewRun::new(tenant("other")))
        .await
        .unwrap();
    let run_cli = |args: Vec<String>| cli(t.dsn(), args);
    let list = run_cli(vec![
        "run".into(),
        "list".into(),
        "--tenant".into(),
        "other".into(),
    ])
    .await;
    assert_eq!(list.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&list.stdout).trim(), r2.to_string());
    let bad = run_cli(vec![
        "run".into(),
        "list".into(),
        "--state".into(),
        "weird".into(),
    ])
    .await;
    assert_eq!(bad.status.code(), Some(2));
    let cancel = run_cli(vec!["run".into(), "cancel".into(), r1.to_string()]).await;
    assert_eq!(cancel.status.code(), Some(0), "{cancel:?}");
    let status = run_cli(vec![
        "run".into(),
        "status".into(),
        r1.to_string(),
        "--json".into(),
    ])
    .await;
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(v["state"], "cancelled");
    assert_eq!(v["session_id"], s.id.to_string());
    let again = run_cli(vec!["run".into(), "cancel".into(), r1.to_string()]).await;
    assert_eq!(again.status.code(), Some(2));
}

#[tokio::test]
async fn maintenance_releases_leases_of_dead_instances_and_fail_run_in_records_the_event() {
    let t = test_db().await;
    let run = new_run(&t.db).await;
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
    let failed = runs::fail_run_in(&tx, run, "timeout", "run timed out", None)
        .await
        .unwrap();
    assert_eq!(failed.state, RunState::Failed);
    tx.commit().await.unwrap();
    assert!(matches!(
        runs::append_event(
            &t.db,
            run,
            NewEvent::new("late", json!({})),
            Some(lease.token)
        )
        .await,
        Err(Error::LeaseLost(_))
    ));
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
    let failed = runs::fail_stuck_runs_in(&tx, Duration::from_secs(3600), 100, None)
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

#[tokio::test]
async fn cli_tail_json_prints_one_event_per_line() {
    let t = test_db().await;
    let run = run_with_events(&t.db, 4).await;
    let out = tokio::process::Command::new(pgcrew_bin())
        .env("DATABASE_URL", t.dsn())
        .args(["run", "tail", &run.to_string(), "--json"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let seqs: Vec<i64> = lines.iter().map(|v| v["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, (1..=5).collect::<Vec<_>>());
    assert!(lines.iter().all(|v| v["event_type"].is_string()));
}
