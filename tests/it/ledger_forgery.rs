//! Issue #14 item 4: a ledger that is tamper-evident against anyone without the key.
//!
//! Forgeries made as the database owner (plain SQL, guard triggers bypassed the way an owner can)
//! against both unkeyed verifiers (Rust streaming and `pgcrew.verify_run_chain`) and the keyed
//! one (signed checkpoints), closed ledgers, v1 runs, key loading and the CLI.

use pgcrew::db::Db;
use pgcrew::runs::{self, ChainVerification, NewEvent, NewRun, RunOutcome, SignedVerification};
use pgcrew::{Client, ClientConfig, Error, InstanceId, LedgerKey, RunId, TenantId};
use serde_json::json;

use crate::common::{append_notes, pgcrew_bin, test_db};

const KEY: [u8; 32] = [0x5a; 32];

fn key() -> LedgerKey {
    LedgerKey::new(KEY).unwrap()
}

/// A handle that signs checkpoints every 4 appends.
fn keyed(db: &Db) -> Db {
    db.clone()
        .with_ledger_key(key())
        .with_checkpoint_interval(4)
}

fn tenant() -> TenantId {
    TenantId::new("default").unwrap()
}

/// run_created (1), run_started (2), `n` notes (3..), then run_completed: finished and signed
/// (checkpoints at 4 and 8 with n = 8, and the final one at 11).
async fn finished_run(db: &Db, n: usize) -> RunId {
    let run = running_run(db, n).await;
    runs::complete_run(db, run, RunOutcome::default(), None)
        .await
        .unwrap();
    run
}

async fn running_run(db: &Db, n: usize) -> RunId {
    let run = runs::create_run(db, NewRun::new(tenant())).await.unwrap();
    runs::start_run(db, run, None, None, runs::LimitPolicy::Reject)
        .await
        .unwrap();
    append_notes(db, run, n).await;
    run
}

/// Replace `to`'s ledger (events and recorded head) by a copy of `from`'s, with the guard
/// triggers off.
async fn copy_ledger(db: &Db, from: RunId, to: RunId) {
    let conn = db.get().await.unwrap();
    conn.batch_execute(&format!(
        "BEGIN; SET LOCAL session_replication_role = replica; \
         DELETE FROM pgcrew.events WHERE run_id = '{to}'; \
         INSERT INTO pgcrew.events (run_id, seq, tenant_id, event_type, step_key, payload, prev_hash, hash, created_at, dedupe) \
         SELECT '{to}', seq, tenant_id, event_type, step_key, payload, prev_hash, hash, created_at, dedupe \
         FROM pgcrew.events WHERE run_id = '{from}'; \
         UPDATE pgcrew.runs SET (ledger_head_seq, ledger_head_hash) = \
         (SELECT ledger_head_seq, ledger_head_hash FROM pgcrew.runs WHERE id = '{from}') WHERE id = '{to}'; \
         COMMIT;"
    ))
    .await
    .unwrap();
}

/// Run statements as the owner with the guard triggers off (`session_replication_role = replica`:
/// what an owner or superuser can always do). `$1` is the run.
async fn as_owner(db: &Db, run: RunId, statements: &[&str]) {
    let mut conn = db.get().await.unwrap();
    let tx = conn.transaction().await.unwrap();
    tx.batch_execute("SET LOCAL session_replication_role = replica")
        .await
        .unwrap();
    for s in statements {
        if s.contains("$1") {
            tx.execute(*s, &[&run]).await.unwrap();
        } else {
            tx.batch_execute(s).await.unwrap();
        }
    }
    tx.commit().await.unwrap();
}

/// Plain SQL with the guards in place; returns the SQLSTATE of the error, if any.
async fn plain(db: &Db, run: RunId, sql: &str) -> Option<String> {
    let conn = db.get().await.unwrap();
    match conn.execute(sql, &[&run]).await {
        Ok(_) => None,
        Err(e) => Some(e.code().map(|c| c.code().to_string()).unwrap_or_default()),
    }
}

struct Verdicts {
    rust: ChainVerification,
    sql: ChainVerification,
    signed: SignedVerification,
}

async fn verdicts(db: &Db, run: RunId) -> Verdicts {
    let rust = runs::verify_run_chain(db, run).await.unwrap();
    let sql = runs::verify_run_chain_sql(db, run).await.unwrap();
    let signed = runs::verify_run_chain_signed(db, run, &key())
        .await
        .unwrap();
    // The two unkeyed verifiers agree, and valid means "no bad seq".
    assert_eq!(rust.valid, sql.valid, "rust {rust:?} sql {sql:?}");
    assert_eq!(
        rust.first_bad_seq, sql.first_bad_seq,
        "rust {rust:?} sql {sql:?}"
    );
    assert_eq!(rust.problem, sql.problem, "rust {rust:?} sql {sql:?}");
    assert_eq!(rust.checked, sql.checked);
    assert_eq!(rust.valid, rust.first_bad_seq.is_none());
    assert_eq!(rust.valid, rust.problem.is_none());
    assert!(
        !signed.valid || rust.valid,
        "keyed valid implies unkeyed valid"
    );
    assert_eq!(signed.valid, signed.problem.is_none(), "{signed:?}");
    Verdicts { rust, sql, signed }
}

struct Row {
    seq: i64,
    tenant: String,
    event_type: String,
    step_key: Option<String>,
    created_us: i64,
    payload: String,
}

async fn rows(db: &Db, run: RunId) -> Vec<Row> {
    db.get()
        .await
        .unwrap()
        .query(
            "SELECT seq, tenant_id, event_type, step_key, \
             (extract(epoch FROM created_at) * 1000000)::int8, payload::text \
             FROM pgcrew.events WHERE run_id = $1 ORDER BY seq",
            &[&run],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| Row {
            seq: r.get(0),
            tenant: r.get(1),
            event_type: r.get(2),
            step_key: r.get(3),
            created_us: r.get(4),
            payload: r.get(5),
        })
        .collect()
}

/// The forger's tool: recompute every hash of `run`'s stored events with the public v2 formula
/// and write them and the recorded head back by plain SQL as the owner.
async fn recompute_chain(db: &Db, run: RunId) {
    let rows = rows(db, run).await;
    let mut conn = db.get().await.unwrap();
    let tx = conn.transaction().await.unwrap();
    tx.batch_execute("SET LOCAL session_replication_role = replica")
        .await
        .unwrap();
    let mut prev = vec![0u8; 32];
    for r in &rows {
        let h = runs::event_hash_v2(
            &prev,
            run,
            r.seq,
            &r.tenant,
            &r.event_type,
            r.step_key.as_deref(),
            r.created_us,
            &r.payload,
        );
        tx.execute(
            "UPDATE pgcrew.events SET prev_hash = $3, hash = $4 WHERE run_id = $1 AND seq = $2",
            &[&run, &r.seq, &prev, &h.as_slice()],
        )
        .await
        .unwrap();
        prev = h.to_vec();
    }
    let last = rows.last().map_or(0, |r| r.seq);
    tx.execute(
        "UPDATE pgcrew.runs SET ledger_head_seq = $2, ledger_head_hash = $3 WHERE id = $1",
        &[&run, &last, &prev],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// The four findings, reproduced.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn finding_a_forged_anchor_no_longer_switches_the_truncation_check_off() {
    let t = test_db().await;
    let db = keyed(&t.db);
    let run = finished_run(&db, 8).await;
    // Plain SQL cannot write an anchor at all.
    assert_eq!(
        plain(
            &t.db,
            run,
            "INSERT INTO pgcrew.chain_anchors (run_id, tenant_id, last_seq, last_hash, event_count, reason) \
             VALUES ($1, 'default', 5, '\\x00', 5, 'forged')"
        )
        .await
        .as_deref(),
        Some("PC005")
    );
    // The owner truncates the ledger and forges an anchor that "explains" it.
    as_owner(
        &t.db,
        run,
        &[
            "DELETE FROM pgcrew.events WHERE run_id = $1 AND seq > 6",
            "INSERT INTO pgcrew.chain_anchors (run_id, tenant_id, last_seq, last_hash, event_count, reason) \
             SELECT $1, 'default', ledger_head_seq, ledger_head_hash, ledger_head_seq, 'forged' \
             FROM pgcrew.runs WHERE id = $1",
        ],
    )
    .await;
    let v = verdicts(&t.db, run).await;
    assert!(!v.rust.valid && !v.sql.valid && !v.signed.valid);
    assert_eq!(v.rust.first_bad_seq, Some(7));
    assert!(v.rust.problem.unwrap().contains("missing"));

    // An anchor on an intact ledger is reported too.
    let intact = finished_run(&db, 3).await;
    as_owner(
        &t.db,
        intact,
        &["INSERT INTO pgcrew.chain_anchors (run_id, tenant_id, last_seq, last_hash, event_count, reason) \
           SELECT $1, 'default', ledger_head_seq, ledger_head_hash, ledger_head_seq, 'forged' \
           FROM pgcrew.runs WHERE id = $1"],
    )
    .await;
    let v = verdicts(&t.db, intact).await;
    assert!(!v.rust.valid && !v.signed.valid);
    assert!(v.rust.problem.unwrap().contains("chain anchor"));
}

#[tokio::test]
async fn finding_b_rows_after_the_head_are_reported_and_stop_appends_with_a_typed_error() {
    let t = test_db().await;
    let db = keyed(&t.db);
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
    let t = test_db().await;
    let db = keyed(&t.db);
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
    let t = test_db().await;
    let db = keyed(&t.db);
    let run = finished_run(&db, 8).await;
    as_owner(
        &t.db,
        run,
        &["UPDATE pgcrew.events SET payload = '{\"i\": 999, \"forged\": true}' WHERE run_id = $1 AND seq = 5"],
    )
    .await;
    recompute_chain(&t.db, run).await;
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

// ---------------------------------------------------------------------------------------------
// The forgery matrix: every attack against both unkeyed verifiers and the keyed one.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Attack {
    None,
    EditPayload,
    DeleteMiddleEvent,
    DeleteLastEvent,
    InsertAfterHead,
    CopyFromOtherRun,
    ForgedAnchor,
    FullRewrite,
    FullRewriteWithoutCheckpoints,
    ForgedCheckpointMac,
    DeletedCheckpoints,
    DeletedFinalCheckpoint,
    TruncatedToEarlierCheckpoint,
}

async fn attack(db: &Db, run: RunId, other: RunId, a: Attack) {
    match a {
        Attack::None => {}
        Attack::EditPayload => {
            as_owner(db, run, &["UPDATE pgcrew.events SET payload = '{\"i\": 42}' WHERE run_id = $1 AND seq = 5"]).await
        }
        Attack::DeleteMiddleEvent => {
            as_owner(db, run, &["DELETE FROM pgcrew.events WHERE run_id = $1 AND seq = 5"]).await
        }
        Attack::DeleteLastEvent => {
            as_owner(db, run, &["DELETE FROM pgcrew.events WHERE run_id = $1 AND seq = 11"]).await
        }
        Attack::InsertAfterHead => {
            as_owner(
                db,
                run,
                &["INSERT INTO pgcrew.events (run_id, seq, tenant_id, event_type, payload, prev_hash, hash, created_at) \
                   SELECT run_id, 12, tenant_id, 'note', '{}', hash, hash, now() \
                   FROM pgcrew.events WHERE run_id = $1 AND seq = 11"],
            )
            .await
        }
        Attack::CopyFromOtherRun => copy_ledger(db, other, run).await,
        Attack::ForgedAnchor => {
            as_owner(
                db,
                run,
                &[
                    "DELETE FROM pgcrew.events WHERE run_id = $1 AND seq > 6",
                    "INSERT INTO pgcrew.chain_anchors (run_id, tenant_id, last_seq, last_hash, event_count, reason) \
                     SELECT $1, 'default', ledger_head_seq, ledger_head_hash, ledger_head_seq, 'forged' \
                     FROM pgcrew.runs WHERE id = $1",
                ],
            )
            .await
        }
        Attack::FullRewrite | Attack::FullRewriteWithoutCheckpoints => {
            as_owner(db, run, &["UPDATE pgcrew.events SET payload = '{\"i\": 42}' WHERE run_id = $1 AND seq = 5"]).await;
            recompute_chain(db, run).await;
            if matches!(a, Attack::FullRewriteWithoutCheckpoints) {
                as_owner(db, run, &["DELETE FROM pgcrew.ledger_checkpoints WHERE run_id = $1"]).await;
            }
        }
        Attack::ForgedCheckpointMac => {
            as_owner(
                db,
                run,
                &["UPDATE pgcrew.ledger_checkpoints SET mac = sha256(mac) WHERE run_id = $1 AND seq = 8"],
            )
            .await
        }
        Attack::DeletedCheckpoints => {
            as_owner(db, run, &["DELETE FROM pgcrew.ledger_checkpoints WHERE run_id = $1"]).await
        }
        Attack::DeletedFinalCheckpoint => {
            as_owner(db, run, &["DELETE FROM pgcrew.ledger_checkpoints WHERE run_id = $1 AND final"]).await
        }
        Attack::TruncatedToEarlierCheckpoint => {
            // Back to the checkpoint at seq 8, head and all: a consistent, signed prefix.
            as_owner(
                db,
                run,
                &[
                    "DELETE FROM pgcrew.events WHERE run_id = $1 AND seq > 8",
                    "DELETE FROM pgcrew.ledger_checkpoints WHERE run_id = $1 AND seq > 8",
                    "UPDATE pgcrew.runs SET (ledger_head_seq, ledger_head_hash) = \
                     (SELECT seq, hash FROM pgcrew.events WHERE run_id = $1 AND seq = 8) WHERE id = $1",
                ],
            )
            .await
        }
    }
}

#[tokio::test]
async fn forgery_matrix_against_both_verifiers_with_and_without_the_key() {
    use Attack::*;
    let t = test_db().await;
    let db = keyed(&t.db);
    // (attack, unkeyed verdict, keyed verdict, first bad seq of the unkeyed verifiers)
    let cases = [
        (None, true, true, Option::None),
        (EditPayload, false, false, Some(5)),
        (DeleteMiddleEvent, false, false, Some(5)),
        (DeleteLastEvent, false, false, Some(11)),
        (InsertAfterHead, false, false, Some(12)),
        (CopyFromOtherRun, false, false, Some(1)),
        (ForgedAnchor, false, false, Some(7)),
        (FullRewrite, true, false, Option::None),
        (FullRewriteWithoutCheckpoints, true, false, Option::None),
        (ForgedCheckpointMac, true, false, Option::None),
        (DeletedCheckpoints, true, false, Option::None),
        (DeletedFinalCheckpoint, true, false, Option::None),
        (TruncatedToEarlierCheckpoint, true, false, Option::None),
    ];
    let other = finished_run(&db, 8).await;
    for (a, unkeyed, signed, bad) in cases {
        let run = finished_run(&db, 8).await;
        let before = verdicts(&t.db, run).await;
        assert!(before.signed.valid, "{a:?}: fresh run {:?}", before.signed);
        assert_eq!(before.signed.signed_seq, Some(11), "{a:?}");
        assert_eq!(
            before.signed.checkpoints, 3,
            "{a:?}: checkpoints at 4, 8, 11"
        );
        attack(&t.db, run, other, a).await;
        let v = verdicts(&t.db, run).await;
        assert_eq!(v.rust.valid, unkeyed, "{a:?}: rust {:?}", v.rust);
        assert_eq!(v.sql.valid, unkeyed, "{a:?}: sql {:?}", v.sql);
        assert_eq!(v.rust.first_bad_seq, bad, "{a:?}: {:?}", v.rust);
        assert_eq!(v.signed.valid, signed, "{a:?}: signed {:?}", v.signed);
        if !signed {
            assert!(v.signed.problem.is_some(), "{a:?}");
        }
    }
}

#[tokio::test]
async fn a_running_run_reports_how_far_it_is_signed() {
    let t = test_db().await;
    let db = keyed(&t.db);
    let run = running_run(&db, 9).await; // head 11; checkpoints at 4 and 8
    let v = verdicts(&t.db, run).await;
    assert!(v.signed.valid, "{:?}", v.signed);
    assert_eq!(v.signed.signed_seq, Some(8));
    assert_eq!(v.signed.chain.head_seq, 11);
    // A batch crossing a multiple of the interval signs its last event.
    let batch: Vec<_> = (0..6)
        .map(|i| NewEvent::new("b", json!({"i": i})))
        .collect();
    runs::append_events(&db, run, &batch, None).await.unwrap(); // 12..17
    let v = verdicts(&t.db, run).await;
    assert_eq!(v.signed.signed_seq, Some(17));
    // Deleting its checkpoints cannot be proven for a running run, but the report shows it.
    as_owner(
        &t.db,
        run,
        &["DELETE FROM pgcrew.ledger_checkpoints WHERE run_id = $1"],
    )
    .await;
    let v = verdicts(&t.db, run).await;
    assert!(v.signed.valid);
    assert_eq!(v.signed.signed_seq, Option::None);
    // A signed finish on a run the row says is still running is exposed.
    let fin = finished_run(&db, 1).await;
    as_owner(
        &t.db,
        fin,
        &["UPDATE pgcrew.runs SET state = 'running' WHERE id = $1"],
    )
    .await;
    let v = verdicts(&t.db, fin).await;
    assert!(v.rust.valid && !v.signed.valid, "{:?}", v.signed);
}

// ---------------------------------------------------------------------------------------------
// Closed ledgers, purge, guards, v1 runs, terminal paths.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn appends_to_a_finished_run_are_refused() {
    let t = test_db().await;
    let db = keyed(&t.db);
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
    let t = test_db().await;
    let db = keyed(&t.db);
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
    assert_eq!(
        plain(
            &t.db,
            run,
            "UPDATE pgcrew.chain_anchors SET last_seq = 3 WHERE run_id = $1"
        )
        .await
        .as_deref(),
        Some("PC005")
    );
    assert_eq!(
        plain(
            &t.db,
            run,
            "DELETE FROM pgcrew.chain_anchors WHERE run_id = $1"
        )
        .await
        .as_deref(),
        Some("PC005")
    );
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
        assert_eq!(
            plain(&t.db, run, sql).await.as_deref(),
            Some("PC005"),
            "{sql}"
        );
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

/// A run in ledger format 1 (as every run created before the v2 migration): its row is written
/// with the format chosen before its first append.
async fn v1_run(db: &Db) -> RunId {
    let run = RunId::new();
    db.get()
        .await
        .unwrap()
        .execute(
            "INSERT INTO pgcrew.runs (id, tenant_id, ledger_format) VALUES ($1, 'default', 1)",
            &[&run],
        )
        .await
        .unwrap();
    run
}

#[tokio::test]
async fn v1_runs_still_verify() {
    let t = test_db().await;
    let db = keyed(&t.db);
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
    as_owner(
        &t.db,
        run,
        &["UPDATE pgcrew.events SET payload = '{}' WHERE run_id = $1 AND seq = 3"],
    )
    .await;
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
    let t = test_db().await;
    let db = keyed(&t.db);
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
    // fail_run_in with the key, in the caller's transaction.
    let r = running_run(&db, 1).await;
    {
        let mut conn = t.db.get().await.unwrap();
        let tx = conn.transaction().await.unwrap();
        runs::fail_run_in(&tx, r, "timeout", "run timed out", Some(&key()))
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    finished.push(r);
    // Maintenance's stuck-run step, with the key from the client configuration.
    let stuck = running_run(&db, 1).await;
    as_owner(
        &t.db,
        stuck,
        &["UPDATE pgcrew.runs SET started_at = now() - interval '2 hours' WHERE id = $1"],
    )
    .await;
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
        let step = pgcrew::coord::maintenance::StuckRuns;
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

// ---------------------------------------------------------------------------------------------
// The key: loading, and the CLI.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn ledger_keys_load_from_files_and_the_environment() {
    let dir = std::env::temp_dir().join(format!("pgcrew-key-{}", RunId::new()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = "ZZZZ-a-ledger-key-of-forty-bytes-ZZZZZZ";
    let file = dir.join("key");
    std::fs::write(&file, format!("{secret}\n")).unwrap();
    let from_file = LedgerKey::from_file(&file).unwrap();
    let direct = LedgerKey::new(secret).unwrap();
    let run = RunId::new();
    // The trailing newline is not part of the key.
    assert_eq!(
        from_file.sign(run, 3, &[1; 32]),
        direct.sign(run, 3, &[1; 32])
    );
    std::fs::write(&file, format!("{secret}\r\n")).unwrap();
    assert_eq!(
        LedgerKey::from_file(&file).unwrap().sign(run, 3, &[1; 32]),
        direct.sign(run, 3, &[1; 32])
    );
    let from_env = LedgerKey::from_lookup(|n| {
        (n == "PGCREW_LEDGER_KEY_FILE").then(|| file.clone().into_os_string())
    })
    .unwrap()
    .unwrap();
    assert_eq!(
        from_env.sign(run, 3, &[1; 32]),
        direct.sign(run, 3, &[1; 32])
    );
    // Too short, in a file or in the variable: a clear typed error that never shows the key.
    std::fs::write(&file, "short-key\n").unwrap();
    match LedgerKey::from_file(&file) {
        Err(Error::LedgerKey(m)) => {
            assert!(m.contains("at least 32") && !m.contains("short-key"), "{m}")
        }
        other => panic!("{other:?}"),
    }
    match LedgerKey::new("x".repeat(31)) {
        Err(e @ Error::LedgerKey(_)) => assert!(e.to_string().contains("31 bytes")),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        LedgerKey::from_file(dir.join("missing")),
        Err(Error::LedgerKey(_))
    ));
    assert!(format!("{direct:?}").contains("redacted"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn cli_verify_ledger_with_and_without_the_key() {
    let t = test_db().await;
    let db = keyed(&t.db);
    let dir = std::env::temp_dir().join(format!("pgcrew-key-{}", RunId::new()));
    std::fs::create_dir_all(&dir).unwrap();
    let key_file = dir.join("key");
    std::fs::write(&key_file, [&KEY[..], b"\n"].concat()).unwrap();
    let short_file = dir.join("short");
    std::fs::write(&short_file, "short\n").unwrap();
    let run = finished_run(&db, 8).await;
    let live = running_run(&db, 9).await;
    let cli = |args: Vec<String>, env: Vec<(&'static str, String)>| {
        let dsn = t.dsn().to_string();
        async move {
            let mut cmd = tokio::process::Command::new(pgcrew_bin());
            cmd.arg("--dsn")
                .arg(dsn)
                .args(args)
                .env_remove("PGCREW_LEDGER_KEY")
                .env_remove("PGCREW_LEDGER_KEY_FILE");
            for (k, v) in env {
                cmd.env(k, v);
            }
            let out = cmd.output().await.unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).to_string(),
                String::from_utf8_lossy(&out.stderr).to_string(),
            )
        }
    };
    let verify = |r: RunId, extra: &[&str]| {
        let mut v = vec![
            "run".to_string(),
            "verify-ledger".to_string(),
            r.to_string(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let kf = key_file.to_string_lossy().to_string();
    // Keyed: --key-file, PGCREW_LEDGER_KEY_FILE.
    let (code, out, _) = cli(verify(run, &["--key-file", &kf]), vec![]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.starts_with("valid: 11 events") && out.contains("covered by a signed checkpoint"),
        "{out}"
    );
    let (code, out, _) = cli(
        verify(run, &[]),
        vec![("PGCREW_LEDGER_KEY_FILE", kf.clone())],
    )
    .await;
    assert_eq!(code, Some(0));
    assert!(out.contains("covered by a signed checkpoint"), "{out}");
    // A running run: how far it is signed.
    let (code, out, _) = cli(verify(live, &["--key-file", &kf]), vec![]).await;
    assert_eq!(code, Some(0));
    assert!(out.contains("signed up to seq 8 of 11"), "{out}");
    // Without a key: valid, and says plainly what is not covered.
    let (code, out, _) = cli(verify(run, &[]), vec![]).await;
    assert_eq!(code, Some(0));
    assert!(out.starts_with("valid"));
    assert!(
        out.contains("not covered without the ledger key: a full rewrite"),
        "{out}"
    );
    // A full rewrite: unkeyed still valid, keyed invalid (also with --sql).
    as_owner(
        &t.db,
        run,
        &["UPDATE pgcrew.events SET payload = '{}' WHERE run_id = $1 AND seq = 5"],
    )
    .await;
    recompute_chain(&t.db, run).await;
    let (code, out, _) = cli(verify(run, &[]), vec![]).await;
    assert_eq!(code, Some(0), "{out}");
    for extra in [
        vec!["--key-file", kf.as_str()],
        vec!["--key-file", kf.as_str(), "--sql"],
    ] {
        let (code, out, _) = cli(verify(run, &extra), vec![]).await;
        assert_eq!(code, Some(1), "{out}");
        assert!(out.starts_with("invalid"), "{out}");
        assert!(out.contains("rewritten"), "{out}");
    }
    // Keys that are too short are usage errors, reported without the key.
    let (code, _, err) = cli(
        verify(run, &["--key-file", &short_file.to_string_lossy()]),
        vec![],
    )
    .await;
    assert_eq!(code, Some(2));
    assert!(
        err.contains("at least 32") && !err.contains("short\n"),
        "{err}"
    );
    let (code, _, err) = cli(
        verify(run, &[]),
        vec![("PGCREW_LEDGER_KEY", "tiny-key".into())],
    )
    .await;
    assert_eq!(code, Some(2));
    assert!(
        err.contains("PGCREW_LEDGER_KEY") && !err.contains("tiny-key"),
        "{err}"
    );
    // The env key itself, valid length: the rewritten run is invalid.
    let env_key = String::from_utf8(KEY.to_vec()).unwrap();
    let (code, out, _) = cli(verify(run, &[]), vec![("PGCREW_LEDGER_KEY", env_key)]).await;
    assert_eq!(code, Some(1), "{out}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `pgcrew run cancel` signs the run's final checkpoint when the ledger key is in the
/// environment, as instances do (before, the CLI's handle had no key and cancelled runs were
/// left unsigned).
#[tokio::test]
async fn cli_cancel_signs_the_final_checkpoint_with_the_environment_key() {
    let t = test_db().await;
    let db = keyed(&t.db);
    let dir = std::env::temp_dir().join(format!("pgcrew-key-{}", RunId::new()));
    std::fs::create_dir_all(&dir).unwrap();
    let key_file = dir.join("key");
    std::fs::write(&key_file, [&KEY[..], b"\n"].concat()).unwrap();
    let run = running_run(&db, 3).await;
    let out = tokio::process::Command::new(pgcrew_bin())
        .arg("--dsn")
        .arg(t.dsn())
        .args(["run", "cancel", &run.to_string()])
        .env_remove("PGCREW_LEDGER_KEY")
        .env("PGCREW_LEDGER_KEY_FILE", &key_file)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let finals: i64 =
        t.db.get()
            .await
            .unwrap()
            .query_one(
                "SELECT count(*) FROM pgcrew.ledger_checkpoints WHERE run_id = $1 AND final",
                &[&run],
            )
            .await
            .unwrap()
            .get(0);
    assert_eq!(finals, 1, "the cancelled run's final head is signed");
    let report = runs::verify_run_chain_signed(&t.db, run, &key())
        .await
        .unwrap();
    assert!(report.valid, "{report:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}
