//! The four findings of the ledger review, reproduced.

use super::*;

#[tokio::test]
async fn finding_a_forged_anchor_no_longer_switches_the_truncation_check_off() {
    let (t, db) = keyed_db().await;
    let run = finished_run(&db, 8).await;
    // Plain SQL cannot write an anchor at all.
    assert_guarded(
        &t.db,
        run,
        "INSERT INTO pgcrew.chain_anchors (run_id, tenant_id, last_seq, last_hash, event_count, reason) \
         VALUES ($1, 'default', 5, '\\x00', 5, 'forged')",
    )
    .await;
    // The owner truncates the ledger and forges an anchor that "explains" it.
    as_owner(&t.db, run, &TRUNCATED_WITH_FORGED_ANCHOR).await;
    let v = verdicts(&t.db, run).await;
    assert!(!v.rust.valid && !v.sql.valid && !v.signed.valid);
    assert_eq!(v.rust.first_bad_seq, Some(7));
    assert!(v.rust.problem.unwrap().contains("missing"));

    // An anchor on an intact ledger is reported too.
    let intact = finished_run(&db, 3).await;
    as_owner(&t.db, intact, &[FORGED_ANCHOR]).await;
    let v = verdicts(&t.db, intact).await;
    assert!(!v.rust.valid && !v.signed.valid);
    assert!(v.rust.problem.unwrap().contains("chain anchor"));
}

#[tokio::test]
async fn finding_b_rows_after_the_head_are_reported_and_stop_appends_with_a_typed_error() {
    let (t, db) = keyed_db().await;
    let run = running_run(&db, 2).await; // head seq 4
    // A well-formed event (correct v2 hash) inserted by plain SQL after the recorded head.
    let head: (i64, Vec<u8>) = {
        let r =
            t.db.get()
                .await
                .unwrap()
                .query_one(
                    "SELECT ledger_head_seq, ledger_head_hash FROM pgcrew.runs WHERE id = $1",
                    &[&run],
                )
                .await
                .unwrap();
        (r.get(0), r.get(1))
    };
    let conn = t.db.get().await.unwrap();
    let row = conn
        .query_one(
            "SELECT (extract(epoch FROM now()) * 1000000)::int8, now()",
            &[],
        )
        .await
        .unwrap();
    let us: i64 = row.get(0);
    let ts: chrono::DateTime<chrono::Utc> = row.get(1);
    let h = runs::event_hash_v2(&head.1, run, head.0 + 1, "default", "note", None, us, "{}");
    conn.execute(
        "INSERT INTO pgcrew.events (run_id, seq, tenant_id, event_type, payload, prev_hash, hash, created_at) \
         VALUES ($1, $2, 'default', 'note', '{}', $3, $4, $5)",
        &[&run, &(head.0 + 1), &head.1, &h.as_slice(), &ts],
    )
    .await
    .unwrap();
    let v = verdicts(&t.db, run).await;
    assert!(!v.rust.valid && !v.sql.valid && !v.signed.valid);
    assert_eq!(v.rust.first_bad_seq, Some(head.0 + 1));
    assert!(v.rust.problem.unwrap().contains("beyond the recorded head"));
    // The next real append is refused with a clear, typed error (not a duplicate key).
    let err = runs::append_event(&db, run, NewEvent::new("next", json!({})), None)
        .await
        .unwrap_err();
    match err {
        Error::LedgerTampered { run: r, message } => {
            assert_eq!(r, run.to_string());
            assert!(message.contains("beyond its recorded head"), "{message}");
        }
        other => panic!("expected LedgerTampered, got {other:?}"),
    }
}

#[tokio::test]
async fn finding_c_events_copied_between_runs_fail_under_v2() {
    let (t, db) = keyed_db().await;
    let a = finished_run(&db, 3).await;
    let b = finished_run(&db, 3).await;
    // Run B's ledger replaced by a copy of run A's (same tenant), head and all.
    let mut conn = t.db.get().await.unwrap();
    let tx = conn.transaction().await.unwrap();
    tx.batch_execute("SET LOCAL session_replication_role = replica")
        .await
        .unwrap();
    tx.execute("DELETE FROM pgcrew.events WHERE run_id = $1", &[&b])
        .await
        .unwrap();
    tx.execute(
        "INSERT INTO pgcrew.events (run_id, seq, tenant_id, event_type, step_key, payload, prev_hash, hash, created_at, dedupe) \
         SELECT $2, seq, tenant_id, event_type, step_key, payload, prev_hash, hash, created_at, dedupe \
         FROM pgcrew.events WHERE run_id = $1",
        &[&a, &b],
    )
    .await
    .unwrap();
    tx.execute(
        "UPDATE pgcrew.runs SET (ledger_head_seq, ledger_head_hash) = \
         (SELECT ledger_head_seq, ledger_head_hash FROM pgcrew.runs WHERE id = $1) WHERE id = $2",
        &[&a, &b],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let v = verdicts(&t.db, b).await;
    assert!(!v.rust.valid && !v.sql.valid && !v.signed.valid);
    assert_eq!(v.rust.first_bad_seq, Some(1));
    assert!(v.rust.problem.unwrap().contains("copied from another run"));
    assert!(verdicts(&t.db, a).await.signed.valid);
}

#[tokio::test]
async fn finding_d_a_full_rewrite_passes_without_the_key_and_fails_with_it() {
    let (t, db) = keyed_db().await;
    let run = finished_run(&db, 8).await;
    rewrite_event_5(&t.db, run, r#"{"i": 999, "forged": true}"#).await;
    let v = verdicts(&t.db, run).await;
    // Only a key can catch this.
    assert!(v.rust.valid && v.sql.valid, "{:?}", v.rust);
    assert!(!v.signed.valid);
    assert!(
        v.signed
            .problem
            .as_deref()
            .unwrap()
            .contains("does not match the stored chain"),
        "{:?}",
        v.signed.problem
    );
}
