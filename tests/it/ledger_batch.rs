//! Issue #14, benchmark line (V016): a batch of ledger events is stored with one INSERT. The
//! chain, the beyond-the-head check (PC004), the input caps (PC040) and idempotent events behave
//! as they did with one INSERT an event, in both ledger formats.

use pgcrew::db::Db;
use pgcrew::runs::{self, NewEvent};
use pgcrew::{Error, RunId};
use serde_json::json;

use crate::common::{running_run, test_db, v1_run, wait_until};

fn notes(tag: &str, n: usize) -> Vec<NewEvent> {
    (0..n)
        .map(|i| NewEvent::new("note", json!({"tag": tag, "i": i})).step(format!("{tag}{i}")))
        .collect()
}

/// (events stored, recorded head seq) of a run.
async fn stored(db: &Db, run: RunId) -> (i64, i64) {
    let row = db
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT (SELECT count(*) FROM pgcrew.events WHERE run_id = $1), \
                    (SELECT ledger_head_seq FROM pgcrew.runs WHERE id = $1)",
            &[&run],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// Call `pgcrew.append_events` directly; the SQLSTATE and message of its error, if any.
async fn append_sql(
    db: &Db,
    run: RunId,
    types: &[&str],
    payloads: &[serde_json::Value],
) -> Option<(String, String)> {
    let conn = db.get().await.unwrap();
    let keys: Vec<Option<String>> = vec![None; types.len()];
    let dedupe = vec![false; types.len()];
    conn.query(
        "SELECT * FROM pgcrew.append_events($1, NULL, $2::text[], $3::text[], $4::jsonb[], $5::bool[])",
        &[&run, &types, &keys, &payloads, &dedupe],
    )
    .await
    .err()
    .map(|e| {
        let d = e.as_db_error().unwrap();
        (d.code().code().to_string(), d.message().to_string())
    })
}

#[tokio::test]
async fn batches_and_single_appends_chain_in_both_formats() {
    let t = test_db().await;
    for run in [running_run(&t.db, 0).await, v1_run(&t.db).await] {
        let mut expected = Vec::new();
        for (tag, n) in [("a", 1), ("b", 2), ("c", 7), ("d", 1), ("e", 30)] {
            let out = runs::append_events(&t.db, run, &notes(tag, n), None)
                .await
                .unwrap();
            assert_eq!(out.len(), n);
            assert!(out.iter().all(|e| e.inserted));
            expected.extend(out);
        }
        // Idempotent events take the per-event path inside a batch.
        let mixed = vec![
            NewEvent::new("tool", json!({"x": 1}))
                .step("t1")
                .idempotent(),
            NewEvent::new("note", json!({"y": 2})),
        ];
        expected.extend(runs::append_events(&t.db, run, &mixed, None).await.unwrap());
        let seqs: Vec<i64> = expected.iter().map(|e| e.seq).collect();
        let first = seqs[0];
        assert_eq!(seqs, (first..first + seqs.len() as i64).collect::<Vec<_>>());
        let read = runs::read_events(&t.db, run, first - 1, 1000)
            .await
            .unwrap();
        assert_eq!(read.len(), expected.len());
        for (r, e) in read.iter().zip(&expected) {
            assert_eq!((r.seq, &r.hash), (e.seq, &e.hash));
        }
        for w in read.windows(2) {
            assert_eq!(
                w[1].prev_hash, w[0].hash,
                "seq {} links to its predecessor",
                w[1].seq
            );
        }
        let rust = runs::verify_run_chain(&t.db, run).await.unwrap();
        let sql = runs::verify_run_chain_sql(&t.db, run).await.unwrap();
        assert!(rust.valid && sql.valid, "{rust:?} {sql:?}");
        let last = *seqs.last().unwrap();
        assert_eq!(stored(&t.db, run).await, (last, last));
    }
}

#[tokio::test]
async fn a_batch_stops_at_an_event_beyond_the_head_and_stores_nothing() {
    let t = test_db().await;
    let run = running_run(&t.db, 0).await;
    runs::append_events(&t.db, run, &notes("a", 3), None)
        .await
        .unwrap();
    let (count, head) = stored(&t.db, run).await;
    // An event written by plain SQL two places beyond the recorded head.
    let stray = head + 3;
    t.db.get()
        .await
        .unwrap()
        .execute(
            "INSERT INTO pgcrew.events (run_id, seq, tenant_id, event_type, payload, prev_hash, hash, created_at) \
             VALUES ($1, $2, 'default', 'stray', '{}', '\\x00', '\\x01', now())",
            &[&run, &stray],
        )
        .await
        .unwrap();
    let err = runs::append_events(&t.db, run, &notes("b", 5), None)
        .await
        .unwrap_err();
    match err {
        Error::LedgerTampered { run: r, message } => {
            assert_eq!(r, run.to_string());
            assert!(
                message.contains(&format!(
                    "already has an event at seq {stray}, beyond its recorded head (seq {head})"
                )),
                "{message}"
            );
        }
        other => panic!("expected LedgerTampered, got {other:?}"),
    }
    // Nothing of the batch is kept: the stray row only, and the head where it was.
    assert_eq!(stored(&t.db, run).await, (count + 1, head));
    // The SQL surface reports the same SQLSTATE.
    let (code, _) = append_sql(
        &t.db,
        run,
        &["x", "y", "z"],
        &[json!({}), json!({}), json!({})],
    )
    .await
    .unwrap();
    assert_eq!(code, "PC004");
    // A single append stops at the same place (the stray row is at head + 3, not head + 1).
    runs::append_event(&t.db, run, NewEvent::new("one", json!({})), None)
        .await
        .unwrap();
    runs::append_event(&t.db, run, NewEvent::new("two", json!({})), None)
        .await
        .unwrap();
    let err = runs::append_event(&t.db, run, NewEvent::new("three", json!({})), None)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::LedgerTampered { .. }), "{err:?}");
}

#[tokio::test]
async fn a_batch_with_an_input_over_its_cap_stores_nothing() {
    let t = test_db().await;
    let run = running_run(&t.db, 0).await;
    let before = stored(&t.db, run).await;
    let big = json!({"blob": "x".repeat(1_048_576)});
    let small = json!({"ok": true});
    let cases: [(&[&str], Vec<serde_json::Value>, &str); 3] = [
        (
            &["a", "b", "c", "d"],
            vec![small.clone(), small.clone(), big, small.clone()],
            "event payload",
        ),
        (
            &["a", "", "c"],
            vec![small.clone(), small.clone(), small.clone()],
            "event type",
        ),
        (
            &["a", "b", &"t".repeat(129)],
            vec![small.clone(), small.clone(), small.clone()],
            "event type",
        ),
    ];
    for (types, payloads, field) in cases {
        let (code, message) = append_sql(&t.db, run, types, &payloads).await.unwrap();
        assert_eq!(code, "PC040", "{message}");
        assert!(message.starts_with(field), "{message}");
        assert_eq!(stored(&t.db, run).await, before);
    }
}

#[tokio::test]
async fn idempotent_events_in_one_batch_return_the_first() {
    let t = test_db().await;
    let run = running_run(&t.db, 0).await;
    let evs = vec![
        NewEvent::new("tool", json!({"n": 1}))
            .step("k")
            .idempotent(),
        NewEvent::new("note", json!({"n": 2})),
        NewEvent::new("tool", json!({"n": 3}))
            .step("k")
            .idempotent(),
    ];
    let out = runs::append_events(&t.db, run, &evs, None).await.unwrap();
    assert_eq!(
        out.iter().map(|e| e.inserted).collect::<Vec<_>>(),
        [true, true, false]
    );
    assert_eq!((out[2].seq, &out[2].hash), (out[0].seq, &out[0].hash));
    let again = runs::append_events(&t.db, run, &evs[..1], None)
        .await
        .unwrap();
    assert_eq!((again[0].seq, again[0].inserted), (out[0].seq, false));
    assert!(runs::verify_run_chain(&t.db, run).await.unwrap().valid);
}

/// V017: a run keeps its secret-keyed lock key (`runs.lock_key`), set when it is inserted and
/// never changed, so append_events can lock without deriving it and still takes the same lock as
/// every other holder of the run lock (`pgcrew.lock_run`, leases, transitions).
#[tokio::test]
async fn runs_keep_their_derived_lock_key_and_appends_take_the_run_lock() {
    let t = test_db().await;
    let run = running_run(&t.db, 0).await;
    let conn = t.db.get().await.unwrap();
    let same: bool = conn
        .query_one(
            "SELECT lock_key = pgcrew.lock_key('run', id::text) FROM pgcrew.runs WHERE id = $1",
            &[&run],
        )
        .await
        .unwrap()
        .get(0);
    assert!(same, "the stored key is not the derived one");
    // An INSERT cannot choose the key.
    let forged = RunId::new();
    conn.execute(
        "INSERT INTO pgcrew.runs (id, tenant_id, lock_key) VALUES ($1, 'default', 42)",
        &[&forged],
    )
    .await
    .unwrap();
    let key: i64 = conn
        .query_one("SELECT lock_key FROM pgcrew.runs WHERE id = $1", &[&forged])
        .await
        .unwrap()
        .get(0);
    assert_ne!(key, 42, "an INSERT chose the run's lock key");
    // Nor can an UPDATE change it, or the id it is derived from.
    for sql in [
        "UPDATE pgcrew.runs SET lock_key = 42 WHERE id = $1",
        "UPDATE pgcrew.runs SET id = gen_random_uuid() WHERE id = $1",
    ] {
        let e = conn.execute(sql, &[&run]).await.unwrap_err();
        let d = e.as_db_error().unwrap();
        assert_eq!(d.code().code(), "PC005", "{sql}: {}", d.message());
        assert!(d.message().contains("lock_key"), "{}", d.message());
    }
    // While another transaction holds the run lock, an append waits on that advisory lock and
    // goes on once it is released, after the recorded head.
    let (_, head) = stored(&t.db, run).await;
    let mut holder = t.db.get().await.unwrap();
    let tx = holder.transaction().await.unwrap();
    tx.execute("SELECT pgcrew.lock_run($1)", &[&run])
        .await
        .unwrap();
    let db = t.db.clone();
    let append = tokio::spawn(async move {
        runs::append_event(&db, run, NewEvent::new("waited", json!({})), None).await
    });
    wait_until(
        std::time::Duration::from_secs(20),
        "the append waits on the run's advisory lock",
        || async {
            conn.query_one(
                "SELECT count(*) FROM pg_stat_activity \
                  WHERE wait_event_type = 'Lock' AND wait_event = 'advisory' \
                    AND query LIKE '%append_events%'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
                == 1
        },
    )
    .await;
    assert!(!append.is_finished());
    tx.commit().await.unwrap();
    let ev = append.await.unwrap().unwrap();
    assert_eq!(ev.seq, head + 1);
}
