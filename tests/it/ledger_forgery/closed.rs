//! Closed ledgers, purge, guards, v1 runs and the terminal paths' signatures.

use super::*;

#[tokio::test]
async fn appends_to_a_finished_run_are_refused() {
    let (t, db) = keyed_db().await;
    for finish in 0..3 {
        let run = running_run(&db, 1).await;
        let finished = match finish {
            0 => runs::complete_run(&db, run, RunOutcome::default(), None).await,
            1 => runs::fail_run(&db, run, "boom", "it broke", None).await,
            _ => runs::cancel_run(&db, run, "stop").await,
        };
        assert!(finished.unwrap().state.is_terminal());
        let err = runs::append_event(&db, run, NewEvent::new("late", json!({})), None)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::LedgerClosed { message, .. } if message.contains("closed")),
            "{err:?}"
        );
        // Through the SQL function too.
        let conn = t.db.get().await.unwrap();
        let e = conn
            .query(
                "SELECT * FROM pgcrew.append_events($1, NULL, ARRAY['late'], ARRAY[NULL::text], ARRAY['{}'::jsonb], ARRAY[false])",
                &[&run],
            )
            .await
            .unwrap_err();
        assert_eq!(e.code().map(|c| c.code()), Some("PC003"));
        assert!(verdicts(&t.db, run).await.signed.valid);
    }
}

#[tokio::test]
async fn an_append_after_purge_is_refused_and_the_run_stays_verifiable() {
    let (t, db) = keyed_db().await;
    let run = finished_run(&db, 5).await;
    let anchor = runs::purge_run(&db, run, "retention").await.unwrap();
    assert_eq!(anchor.last_seq, 8);
    let err = runs::append_event(&db, run, NewEvent::new("late", json!({})), None)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::LedgerClosed { .. }), "{err:?}");
    let v = verdicts(&t.db, run).await;
    assert!(
        v.rust.valid && v.sql.valid && v.signed.valid,
        "{:?}",
        v.signed
    );
    assert_eq!(v.rust.anchor.as_ref().map(|a| a.last_seq), Some(8));
    assert_eq!(v.signed.signed_seq, Some(8));
    // Purging twice is refused; the anchor cannot be rewritten by plain SQL.
    assert!(matches!(
        runs::purge_run(&db, run, "again").await,
        Err(Error::InvalidInput { .. })
    ));
    for sql in [
        "UPDATE pgcrew.chain_anchors SET last_seq = 3 WHERE run_id = $1",
        "DELETE FROM pgcrew.chain_anchors WHERE run_id = $1",
    ] {
        assert_guarded(&t.db, run, sql).await;
    }
    // A forged final checkpoint on the purged run is exposed.
    as_owner(
        &t.db,
        run,
        &["UPDATE pgcrew.ledger_checkpoints SET mac = sha256(mac) WHERE run_id = $1 AND final"],
    )
    .await;
    assert!(!verdicts(&t.db, run).await.signed.valid);
}

#[tokio::test]
async fn heads_and_anchors_are_written_only_by_pgcrew_functions() {
    let t = test_db().await;
    let run = running_run(&t.db, 2).await;
    for sql in [
        "UPDATE pgcrew.runs SET ledger_head_seq = 2 WHERE id = $1",
        "UPDATE pgcrew.runs SET ledger_head_hash = sha256(ledger_head_hash) WHERE id = $1",
        "UPDATE pgcrew.runs SET ledger_format = 1 WHERE id = $1",
        "INSERT INTO pgcrew.runs (id, tenant_id, ledger_head_seq) VALUES (gen_random_uuid(), 'default', 3 + 0 * length($1::uuid::text))",
    ] {
        assert_guarded(&t.db, run, sql).await;
    }
    // Other columns of the run stay writable, and appends still move the head.
    assert_eq!(
        plain(
            &t.db,
            run,
            "UPDATE pgcrew.runs SET metadata = '{\"x\": 1}' WHERE id = $1"
        )
        .await,
        Option::None
    );
    runs::append_event(&t.db, run, NewEvent::new("more", json!({})), None)
        .await
        .unwrap();
    assert!(verdicts(&t.db, run).await.rust.valid);
}

#[tokio::test]
async fn v1_runs_still_verify() {
    let (t, db) = keyed_db().await;
    let run = v1_run(&t.db).await;
    let evs: Vec<_> = (0..6)
        .map(|i| NewEvent::new("old", json!({"i": i})))
        .collect();
    runs::append_events(&db, run, &evs, None).await.unwrap();
    // Hashed with the v1 formula (no run id).
    let stored = runs::read_events(&t.db, run, 0, 100).await.unwrap();
    let rows = rows(&t.db, run).await;
    for (e, r) in stored.iter().zip(&rows) {
        let v1 = runs::event_hash(
            &e.prev_hash,
            e.seq,
            &r.tenant,
            &r.event_type,
            r.step_key.as_deref(),
            r.created_us,
            &r.payload,
        );
        assert_eq!(v1.to_vec(), e.hash);
    }
    runs::start_run(&db, run, None, None, runs::LimitPolicy::Reject)
        .await
        .unwrap();
    runs::complete_run(&db, run, RunOutcome::default(), None)
        .await
        .unwrap();
    let v = verdicts(&t.db, run).await;
    assert!(
        v.rust.valid && v.sql.valid && v.signed.valid,
        "{:?}",
        v.signed
    );
    assert_eq!((v.rust.format, v.sql.format), (1, 1));
    // Tampering is still found in v1 runs.
    edit_payload(&t.db, run, 3, "{}").await;
    let v = verdicts(&t.db, run).await;
    assert_eq!(v.rust.first_bad_seq, Some(3));
    assert!(!v.signed.valid);

    // v1 does not hash the run id, so a copied v1 ledger passes without the key; the
    // checkpoints (which sign the run id) expose it.
    let a = v1_run(&t.db).await;
    let b = v1_run(&t.db).await;
    for r in [a, b] {
        runs::append_events(&db, r, &evs, None).await.unwrap();
        runs::cancel_run(&db, r, "done").await.unwrap();
    }
    copy_ledger(&t.db, a, b).await;
    let v = verdicts(&t.db, b).await;
    assert!(v.rust.valid && !v.signed.valid, "{:?}", v.signed);
}

#[tokio::test]
async fn every_terminal_path_signs_the_final_head() {
    let (t, db) = keyed_db().await;
    let mut finished = Vec::new();
    // complete, fail, cancel (running and pending).
    let r = running_run(&db, 1).await;
    runs::complete_run(&db, r, RunOutcome::default(), None)
        .await
        .unwrap();
    finished.push(r);
    let r = running_run(&db, 1).await;
    runs::fail_run(&db, r, "boom", "it broke", None)
        .await
        .unwrap();
    finished.push(r);
    let r = running_run(&db, 1).await;
    runs::cancel_run(&db, r, "stop").await.unwrap();
    finished.push(r);
    let r = runs::create_run(&db, NewRun::new(tenant())).await.unwrap();
    runs::cancel_run(&db, r, "never started").await.unwrap();
    finished.push(r);
    let r = runs::create_run(&db, NewRun::new(tenant())).await.unwrap();
    runs::fail_run(&db, r, "boom", "before start", None)
        .await
        .unwrap();
    finished.push(r);
    // fail_run with the key, in the caller's transaction (joined by a keyed handle).
    let r = running_run(&db, 1).await;
    {
        let keyed = t.db.clone().with_ledger_key(key());
        let mut conn = t.db.get().await.unwrap();
        let tx = conn.transaction().await.unwrap();
        runs::fail_run(&keyed.join(&tx), r, "timeout", "run timed out", None)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    finished.push(r);
    // Maintenance's stuck-run step, with the key from the client configuration.
    let stuck = running_run(&db, 1).await;
    set_run_row(&t.db, stuck, "started_at = now() - interval '2 hours'").await;
    {
        let config = ClientConfig::builder().ledger_key(key()).build().unwrap();
        let ctx = pgcrew::coord::maintenance::MaintenanceContext {
            config: std::sync::Arc::new(config),
            instance_id: InstanceId::new("leader").unwrap(),
            lease: "default".into(),
            term: 1,
        };
        let mut conn = t.db.get().await.unwrap();
        let tx = conn.transaction().await.unwrap();
        let step = pgcrew::runs::StuckRuns;
        use pgcrew::coord::maintenance::MaintenanceStep;
        assert_eq!(step.run(&tx, &ctx).await.unwrap(), 1);
        tx.commit().await.unwrap();
    }
    finished.push(stuck);
    // A client built with a key in its configuration signs through its own handle.
    let client = Client::builder(t.db.clone())
        .config(
            ClientConfig::builder()
                .ledger_key(key())
                .checkpoint_interval(4)
                .leader_election(false)
                .build()
                .unwrap(),
        )
        .build()
        .await
        .unwrap();
    assert!(client.db().ledger_key().is_some());
    assert!(!format!("{client:?}{:?}{:?}", client.config(), client.db()).contains("ZZZZ"));
    let r = finished_run(client.db(), 5).await;
    finished.push(r);
    for r in finished {
        let v = verdicts(&t.db, r).await;
        assert!(v.signed.valid, "{r}: {:?}", v.signed);
        assert_eq!(v.signed.signed_seq, Some(v.signed.chain.head_seq), "{r}");
    }
    // Without a key nothing is signed: a keyed verification reports the finished run.
    let unsigned = finished_run(&t.db, 1).await;
    let v = verdicts(&t.db, unsigned).await;
    assert!(v.rust.valid && !v.signed.valid);
    assert!(
        v.signed
            .problem
            .unwrap()
            .contains("not covered by a valid checkpoint")
    );
}
