//! The forgery matrix: every attack against both verifiers, with and without the key.

use super::*;

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

impl Attack {
    /// The statements the owner runs for this attack (`$1` is the run), all in one transaction.
    fn statements(self) -> &'static [&'static str] {
        use Attack::*;
        match self {
            None | CopyFromOtherRun => &[],
            EditPayload | FullRewrite | FullRewriteWithoutCheckpoints => {
                &["UPDATE pgcrew.events SET payload = '{\"i\": 42}' WHERE run_id = $1 AND seq = 5"]
            }
            DeleteMiddleEvent => &["DELETE FROM pgcrew.events WHERE run_id = $1 AND seq = 5"],
            DeleteLastEvent => &["DELETE FROM pgcrew.events WHERE run_id = $1 AND seq = 11"],
            InsertAfterHead => &[
                "INSERT INTO pgcrew.events (run_id, seq, tenant_id, event_type, payload, prev_hash, hash, created_at) \
                 SELECT run_id, 12, tenant_id, 'note', '{}', hash, hash, now() \
                 FROM pgcrew.events WHERE run_id = $1 AND seq = 11",
            ],
            ForgedAnchor => &TRUNCATED_WITH_FORGED_ANCHOR,
            ForgedCheckpointMac => &[
                "UPDATE pgcrew.ledger_checkpoints SET mac = sha256(mac) WHERE run_id = $1 AND seq = 8",
            ],
            DeletedCheckpoints => &["DELETE FROM pgcrew.ledger_checkpoints WHERE run_id = $1"],
            DeletedFinalCheckpoint => {
                &["DELETE FROM pgcrew.ledger_checkpoints WHERE run_id = $1 AND final"]
            }
            // Back to the checkpoint at seq 8, head and all: a consistent, signed prefix.
            TruncatedToEarlierCheckpoint => &[
                "DELETE FROM pgcrew.events WHERE run_id = $1 AND seq > 8",
                "DELETE FROM pgcrew.ledger_checkpoints WHERE run_id = $1 AND seq > 8",
                "UPDATE pgcrew.runs SET (ledger_head_seq, ledger_head_hash) = \
                 (SELECT seq, hash FROM pgcrew.events WHERE run_id = $1 AND seq = 8) WHERE id = $1",
            ],
        }
    }
}

/// Attack `run` as `a` says (`other` is the finished run a copied ledger comes from).
async fn attack(db: &Db, run: RunId, other: RunId, a: Attack) {
    if matches!(a, Attack::CopyFromOtherRun) {
        copy_ledger(db, other, run).await;
    }
    if !a.statements().is_empty() {
        as_owner(db, run, a.statements()).await;
    }
    let without_checkpoints = matches!(a, Attack::FullRewriteWithoutCheckpoints);
    if without_checkpoints || matches!(a, Attack::FullRewrite) {
        recompute_chain(db, run).await;
    }
    if without_checkpoints {
        as_owner(db, run, Attack::DeletedCheckpoints.statements()).await;
    }
}

#[tokio::test]
async fn forgery_matrix_against_both_verifiers_with_and_without_the_key() {
    use Attack::*;
    let (t, db) = keyed_db().await;
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
    let (t, db) = keyed_db().await;
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
    attack(&t.db, run, run, Attack::DeletedCheckpoints).await;
    let v = verdicts(&t.db, run).await;
    assert!(v.signed.valid);
    assert_eq!(v.signed.signed_seq, Option::None);
    // A signed finish on a run the row says is still running is exposed.
    let fin = finished_run(&db, 1).await;
    set_run_row(&t.db, fin, "state = 'running'").await;
    let v = verdicts(&t.db, fin).await;
    assert!(v.rust.valid && !v.signed.valid, "{:?}", v.signed);
}
