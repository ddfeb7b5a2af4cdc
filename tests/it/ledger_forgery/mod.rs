//! Issue #14 item 4: a ledger that is tamper-evident against anyone without the key.
//!
//! Forgeries made as the database owner (plain SQL, guard triggers bypassed the way an owner can)
//! against both unkeyed verifiers (Rust streaming and `pgcrew.verify_run_chain`) and the keyed
//! one (signed checkpoints), closed ledgers, v1 runs, key loading and the CLI.

mod closed;
mod findings;
mod key;
mod matrix;

use pgcrew::db::Db;
use pgcrew::runs::{self, ChainVerification, NewEvent, NewRun, RunOutcome, SignedVerification};
use pgcrew::{Client, ClientConfig, Error, InstanceId, LedgerKey, RunId, TenantId};
use serde_json::json;

use crate::common::{TestDb, pgcrew_bin, running_run, test_db, v1_run};

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

/// A scratch database and a [`keyed`] handle on it.
async fn keyed_db() -> (TestDb, Db) {
    let t = test_db().await;
    let db = keyed(&t.db);
    (t, db)
}

/// A fresh temporary directory for key files.
fn key_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("pgcrew-key-{}", RunId::new()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// [`key_dir`] with the test key (and a trailing newline) in its file `key`: (dir, key file).
fn key_file_dir() -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = key_dir();
    let key_file = dir.join("key");
    std::fs::write(&key_file, [&KEY[..], b"\n"].concat()).unwrap();
    (dir, key_file)
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

/// Event `seq`'s payload set to `payload` (a JSON literal) as the owner; its hash is left as is.
async fn edit_payload(db: &Db, run: RunId, seq: i64, payload: &str) {
    let sql =
        format!("UPDATE pgcrew.events SET payload = '{payload}' WHERE run_id = $1 AND seq = {seq}");
    as_owner(db, run, &[&sql]).await;
}

/// `run`'s row updated by the owner with `assignments` (the `SET` list), guards off.
async fn set_run_row(db: &Db, run: RunId, assignments: &str) {
    let sql = format!("UPDATE pgcrew.runs SET {assignments} WHERE id = $1");
    as_owner(db, run, &[&sql]).await;
}

/// A full rewrite: event 5's payload set to `payload` ([`edit_payload`]) and the whole chain
/// recomputed ([`recompute_chain`]), which no unkeyed verifier can tell from the original.
async fn rewrite_event_5(db: &Db, run: RunId, payload: &str) {
    edit_payload(db, run, 5, payload).await;
    recompute_chain(db, run).await;
}

/// An owner statement (`$1` is the run) forging an anchor that "explains" the ledger as it is.
const FORGED_ANCHOR: &str = "INSERT INTO pgcrew.chain_anchors (run_id, tenant_id, last_seq, last_hash, event_count, reason) \
     SELECT $1, 'default', ledger_head_seq, ledger_head_hash, ledger_head_seq, 'forged' \
     FROM pgcrew.runs WHERE id = $1";

/// Owner statements: the ledger truncated after seq 6, with a [`FORGED_ANCHOR`] to explain it.
const TRUNCATED_WITH_FORGED_ANCHOR: [&str; 2] = [
    "DELETE FROM pgcrew.events WHERE run_id = $1 AND seq > 6",
    FORGED_ANCHOR,
];

/// Plain SQL `sql` (`$1` is the run) is refused by the guard triggers (SQLSTATE PC005).
async fn assert_guarded(db: &Db, run: RunId, sql: &str) {
    assert_eq!(plain(db, run, sql).await.as_deref(), Some("PC005"), "{sql}");
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

// ---------------------------------------------------------------------------------------------
// The forgery matrix: every attack against both unkeyed verifiers and the keyed one.
// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// Closed ledgers, purge, guards, v1 runs, terminal paths.
// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// The key: loading, and the CLI.
// ---------------------------------------------------------------------------------------------
