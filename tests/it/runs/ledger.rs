//! The run ledger: concurrent appends, the hash formula, tampering, verification, idempotent appends.

use super::*;

#[tokio::test]
async fn eight_concurrent_writers_get_gapless_seqs_and_a_valid_chain() {
    let (t, run) = db_with_run().await;
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
                    append_from_writer(&db, run, "single", w, i).await;
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
    let (t, run) = db_with_run().await;
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
    let (t, run) = db_with_run().await;
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
        let got = runs::append_events(&tx, run, &[NewEvent::new("x", json!(1))], None)
            .await
            .unwrap();
        assert_eq!(got[0].seq, first.seq + 1);
        tx.rollback().await.unwrap();
    }
    {
        let tx = conn.transaction().await.unwrap();
        let got = runs::append_events(&tx, run, &[NewEvent::new("y", json!(2)), ev.clone()], None)
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
