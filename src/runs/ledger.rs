//! The per-run, append-only, hash-chained event ledger.
//!
//! Appends run in one transaction under `pg_advisory_xact_lock` on the run (the SQL function
//! `pgcrew.append_events`, secret-keyed lock): read the recorded head `(seq, hash)` from the run
//! row, insert `seq + 1`, move the head. Appends to a finished (or purged) run are refused
//! ([`Error::LedgerClosed`]); a row found at the next seq, written outside pgcrew beyond the
//! recorded head, stops the append ([`Error::LedgerTampered`]).
//!
//! # Hash formats
//!
//! The chain hash is public and verifiable from the tables alone. The format is stored per run
//! (`runs.ledger_format`): runs created before the v2 migration keep format 1, new runs use 2.
//!
//! ```text
//! v1: hash_n = sha256(hash_{n-1} || int8send(seq) || utf8(tenant_id) || 0x00
//!                     || utf8(event_type) || 0x00 || utf8(coalesce(step_key, '')) || 0x00
//!                     || int8send(created_at in µs since the Unix epoch) || utf8(payload::text))
//! v2: hash_n = sha256(hash_{n-1} || uuid_send(run_id) (16 bytes) || int8send(seq)
//!                     || utf8(tenant_id) || 0x00 || utf8(event_type) || 0x00
//!                     || utf8(coalesce(step_key, '')) || 0x00
//!                     || int8send(created_at in µs since the Unix epoch) || utf8(payload::text))
//! hash_0 = 32 zero bytes; int8send is 8 bytes big-endian; payload::text is PostgreSQL's jsonb text
//! ```
//!
//! ([`event_hash`], [`event_hash_v2`]; SQL `pgcrew.event_hash`, `pgcrew.event_hash_v2`.) v2 binds
//! each event to its run, so events copied from one run into another do not verify.
//!
//! # Signed checkpoints
//!
//! An unkeyed chain cannot expose a full rewrite: whoever can write the tables can recompute every
//! hash and the recorded head. Instances holding the ledger key ([`LedgerKey`], kept outside the
//! database) therefore sign run heads into `pgcrew.ledger_checkpoints`:
//!
//! ```text
//! mac = HMAC-SHA-256(key, uuid_send(run_id) (16 bytes) || int8send(seq) (8 bytes) || head_hash (32 bytes))
//! ```
//!
//! when a run finishes (in the transaction of the terminal transition: complete, fail, cancel,
//! maintenance's stuck-run failure) and, through a [`Db`] with a key
//! ([`Db::with_ledger_key`]), at most every [`Db::checkpoint_interval`] appended events (default
//! 64). An operator with write access to the database but without the key can damage a ledger
//! (delete it, truncate it) but not forge one: [`verify_run_chain_signed`] reports any rewrite.
//!
//! # Verification
//!
//! Without the key ([`verify_run_chain`], streaming in Rust in constant memory, and
//! [`verify_run_chain_sql`], the SQL function `pgcrew.verify_run_chain(run)`, with identical
//! results): every event links to its predecessor and hashes correctly, the stored events end
//! exactly at the recorded head (missing events and rows beyond the head are reported), and a
//! chain anchor stands in for the events only when the run really was purged (finished, no events
//! left, anchor equal to the recorded head). A full rewrite with recomputed hashes and head passes
//! this check. With the key ([`verify_run_chain_signed`]) every checkpoint must verify and match
//! the chain, and a finished run's head must be covered by one; for a running run the result says
//! how far the ledger is signed.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tracing::{info, instrument, warn};

use super::map_db_error;
use super::state::RunState;
use futures_util::StreamExt;
use tokio_postgres::types::{ToSql, Type};

use crate::db::{Db, Executor};
use crate::error::{Error, Result};
use crate::ids::RunId;
use crate::ledger_key::LedgerKey;

/// Longest accepted step key, in bytes.
pub const MAX_STEP_KEY_LEN: usize = 512;
/// Most events accepted by one batch append.
pub const MAX_BATCH: usize = 10_000;

/// An event to append.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// The event type (`run_started`, `model_completed`, ...): non-empty, at most 128 bytes.
    pub event_type: String,
    /// The step the event belongs to, if any.
    pub step_key: Option<String>,
    /// The payload.
    pub payload: serde_json::Value,
    /// Append at most once per (run, event_type, step_key): a repeat returns the stored event.
    pub idempotent: bool,
}

impl NewEvent {
    /// An event with no step key, appended unconditionally.
    pub fn new(event_type: impl Into<String>, payload: serde_json::Value) -> Self {
        NewEvent {
            event_type: event_type.into(),
            step_key: None,
            payload,
            idempotent: false,
        }
    }

    /// Set the step key.
    pub fn step(mut self, step_key: impl Into<String>) -> Self {
        self.step_key = Some(step_key.into());
        self
    }

    /// Make the append idempotent per (run, event_type, step_key).
    pub fn idempotent(mut self) -> Self {
        self.idempotent = true;
        self
    }

    fn validate(&self) -> Result<()> {
        crate::ids::validate_text_id("event type", &self.event_type)?;
        if let Some(k) = &self.step_key {
            if k.len() > MAX_STEP_KEY_LEN {
                return Err(Error::invalid(
                    "step key",
                    format!(
                        "is {} bytes long; at most {MAX_STEP_KEY_LEN} are allowed",
                        k.len()
                    ),
                ));
            }
            if k.chars().any(char::is_control) {
                return Err(Error::invalid(
                    "step key",
                    "must not contain control characters",
                ));
            }
        }
        Ok(())
    }
}

/// The result of appending one event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AppendedEvent {
    /// Its sequence number.
    pub seq: i64,
    /// Its chain hash.
    #[serde(with = "hex_bytes")]
    pub hash: Vec<u8>,
    /// Its timestamp (database time, microsecond precision).
    pub created_at: DateTime<Utc>,
    /// False when an idempotent append found the event already stored.
    pub inserted: bool,
}

/// A stored ledger event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LedgerEvent {
    /// The run.
    pub run_id: RunId,
    /// Sequence number (1, 2, ...).
    pub seq: i64,
    /// The run's tenant.
    pub tenant_id: String,
    /// Event type.
    pub event_type: String,
    /// Step key.
    pub step_key: Option<String>,
    /// Payload.
    pub payload: serde_json::Value,
    /// The previous event's hash.
    #[serde(with = "hex_bytes")]
    pub prev_hash: Vec<u8>,
    /// This event's hash.
    #[serde(with = "hex_bytes")]
    pub hash: Vec<u8>,
    /// Database timestamp.
    pub created_at: DateTime<Utc>,
}

mod hex_bytes {
    pub fn serialize<S: serde::Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }
}

/// What retention left of a run's ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainAnchor {
    /// The last seq before the events were removed.
    pub last_seq: i64,
    /// The last hash before the events were removed.
    #[serde(with = "hex_bytes")]
    pub last_hash: Vec<u8>,
    /// How many events were removed.
    pub event_count: i64,
    /// Why (as given to [`purge_run`]).
    pub reason: String,
    /// When.
    pub purged_at: DateTime<Utc>,
}

/// The outcome of verifying a run's chain without the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainVerification {
    /// True when every event links to its predecessor and hashes correctly, the events end at
    /// the recorded head, and a chain anchor (if any) belongs to a really purged run.
    pub valid: bool,
    /// The first bad seq (a missing seq, the first row that was changed or moved, the first seq
    /// beyond the recorded head).
    pub first_bad_seq: Option<i64>,
    /// Events checked (the events stored, when invalid).
    pub checked: u64,
    /// The chain anchor when retention removed the run's events.
    pub anchor: Option<ChainAnchor>,
    /// What was found, when invalid.
    pub problem: Option<String>,
    /// The run's recorded ledger head (last appended seq; 0 when nothing was appended).
    pub head_seq: i64,
    /// The run's ledger hash format (1 or 2).
    pub format: i16,
}

/// The outcome of verifying a run's chain and its signed checkpoints with the ledger key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SignedVerification {
    /// The unkeyed verification (chain, head, anchor).
    pub chain: ChainVerification,
    /// True when the chain is valid, every checkpoint verifies with the key and matches the
    /// chain, and, for a finished run, its head is covered by a checkpoint.
    pub valid: bool,
    /// What was found, when invalid.
    pub problem: Option<String>,
    /// The highest seq covered by a valid checkpoint (None: nothing signed).
    pub signed_seq: Option<i64>,
    /// Checkpoints checked.
    pub checkpoints: u64,
    /// The run's state.
    pub state: RunState,
}

/// A run's ledger hash format (`runs.ledger_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum LedgerFormat {
    /// Runs created before the v2 migration: the run id is not hashed.
    V1,
    /// Every new run: the run id is hashed right after the previous hash.
    V2,
}

impl LedgerFormat {
    /// The stored value (1 or 2).
    pub fn as_i16(self) -> i16 {
        match self {
            LedgerFormat::V1 => 1,
            LedgerFormat::V2 => 2,
        }
    }

    /// The format of a stored value; [`Error::InvalidInput`] for anything but 1 and 2.
    pub fn from_i16(v: i16) -> Result<LedgerFormat> {
        match v {
            1 => Ok(LedgerFormat::V1),
            2 => Ok(LedgerFormat::V2),
            other => Err(Error::invalid(
                "ledger format",
                format!("{other} is not a known ledger format (1 or 2)"),
            )),
        }
    }

    /// The chain hash of one event in this format.
    #[allow(clippy::too_many_arguments)]
    pub fn hash(
        self,
        prev_hash: &[u8],
        run: RunId,
        seq: i64,
        tenant_id: &str,
        event_type: &str,
        step_key: Option<&str>,
        created_at_micros: i64,
        payload_text: &str,
    ) -> [u8; 32] {
        let run = match self {
            LedgerFormat::V1 => None,
            LedgerFormat::V2 => Some(run),
        };
        hash_fields(
            prev_hash,
            run,
            seq,
            tenant_id,
            event_type,
            step_key,
            created_at_micros,
            payload_text,
        )
    }
}

/// Compute an event's v1 chain hash (runs created before the v2 migration; see the module docs).
#[allow(clippy::too_many_arguments)]
pub fn event_hash(
    prev_hash: &[u8],
    seq: i64,
    tenant_id: &str,
    event_type: &str,
    step_key: Option<&str>,
    created_at_micros: i64,
    payload_text: &str,
) -> [u8; 32] {
    hash_fields(
        prev_hash,
        None,
        seq,
        tenant_id,
        event_type,
        step_key,
        created_at_micros,
        payload_text,
    )
}

/// Compute an event's v2 chain hash (every new run; the run id is hashed right after the previous
/// hash; see the module docs).
#[allow(clippy::too_many_arguments)]
pub fn event_hash_v2(
    prev_hash: &[u8],
    run: RunId,
    seq: i64,
    tenant_id: &str,
    event_type: &str,
    step_key: Option<&str>,
    created_at_micros: i64,
    payload_text: &str,
) -> [u8; 32] {
    hash_fields(
        prev_hash,
        Some(run),
        seq,
        tenant_id,
        event_type,
        step_key,
        created_at_micros,
        payload_text,
    )
}

#[allow(clippy::too_many_arguments)]
fn hash_fields(
    prev_hash: &[u8],
    run: Option<RunId>,
    seq: i64,
    tenant_id: &str,
    event_type: &str,
    step_key: Option<&str>,
    created_at_micros: i64,
    payload_text: &str,
) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev_hash);
    if let Some(run) = run {
        h.update(run.as_uuid().as_bytes());
    }
    h.update(seq.to_be_bytes());
    h.update(tenant_id.as_bytes());
    h.update([0u8]);
    h.update(event_type.as_bytes());
    h.update([0u8]);
    h.update(step_key.unwrap_or("").as_bytes());
    h.update([0u8]);
    h.update(created_at_micros.to_be_bytes());
    h.update(payload_text.as_bytes());
    h.finalize().into()
}

type AppendParams = (
    Vec<String>,
    Vec<Option<String>>,
    Vec<serde_json::Value>,
    Vec<bool>,
);

fn params(events: &[NewEvent], max_payload: usize) -> Result<AppendParams> {
    if events.is_empty() {
        return Err(Error::invalid("events", "at least one event is required"));
    }
    if events.len() > MAX_BATCH {
        return Err(Error::invalid(
            "events",
            format!(
                "{} events in one batch; at most {MAX_BATCH} are allowed",
                events.len()
            ),
        ));
    }
    for e in events {
        e.validate()?;
        super::limits::check(
            "event payload",
            super::limits::json_len(&e.payload),
            max_payload,
        )?;
    }
    Ok((
        events.iter().map(|e| e.event_type.clone()).collect(),
        events.iter().map(|e| e.step_key.clone()).collect(),
        events.iter().map(|e| e.payload.clone()).collect(),
        events.iter().map(|e| e.idempotent).collect(),
    ))
}

fn appended(rows: Vec<tokio_postgres::Row>) -> Vec<AppendedEvent> {
    rows.into_iter()
        .map(|r| AppendedEvent {
            seq: r.get(0),
            hash: r.get(1),
            created_at: r.get(2),
            inserted: r.get(3),
        })
        .collect()
}

/// Append one event to a run in its own transaction. With `lease_token`, the append is rejected
/// with [`Error::LeaseLost`] unless that token is the run's current, unexpired lease.
#[instrument(skip(db, event), fields(event_type = %event.event_type), err)]
pub async fn append_event(
    db: &Db,
    run: RunId,
    event: NewEvent,
    lease_token: Option<i64>,
) -> Result<AppendedEvent> {
    let mut v = append_events(db, run, std::slice::from_ref(&event), lease_token).await?;
    v.pop()
        .ok_or_else(|| Error::Migration("pgcrew.append_events returned no row".into()))
}

/// Append several events to a run in one transaction (consecutive seqs). A payload over the
/// handle's limit ([`Db::run_limits`], at most the 1 MiB hard cap) is refused with
/// [`Error::TooLarge`] and nothing of the batch is stored.
#[instrument(skip(db, events), fields(n = events.len()), err)]
pub async fn append_events(
    db: &Db,
    run: RunId,
    events: &[NewEvent],
    lease_token: Option<i64>,
) -> Result<Vec<AppendedEvent>> {
    let (types, keys, payloads, dedupe) = params(events, db.run_limits().max_event_payload_bytes)?;
    let conn = db.get().await?;
    let rows = conn
        .query_typed_rows(
            sql!("runs/append_events"),
            typed![&run, &lease_token, &types, &keys, &payloads, &dedupe],
        )
        .await
        .map_err(|e| map_db_error(e, run))?;
    let out = appended(rows);
    if let Some(key) = db.ledger_key() {
        checkpoint_after_append(&conn, key, db.checkpoint_interval(), run, &out).await;
    }
    Ok(out)
}

/// Sign the head reached by an append when the append crossed a multiple of `every` (so a run
/// is signed at most every `every` events). The append has committed: a checkpoint that cannot
/// be stored is logged and left to the next one (or to the run's final checkpoint).
async fn checkpoint_after_append(
    conn: &crate::db::Conn,
    key: &LedgerKey,
    every: u32,
    run: RunId,
    appended: &[AppendedEvent],
) {
    let every = i64::from(every.max(1));
    let (Some(first), Some(last)) = (
        appended.iter().find(|e| e.inserted),
        appended.iter().rev().find(|e| e.inserted),
    ) else {
        return;
    };
    if last.seq / every == (first.seq - 1) / every {
        return;
    }
    let mac = key.sign(run, last.seq, &last.hash);
    let stored = async {
        conn.execute_typed_count(
            sql!("runs/add_checkpoint"),
            typed![&run, &last.seq, &last.hash, &mac.as_slice(), &false],
        )
        .await
    }
    .await;
    if let Err(e) = stored {
        warn!(run = %run, seq = last.seq, error = %e, "ledger checkpoint not stored; the next one covers it");
    }
}

/// Sign a run's head `(seq, head_hash)` with `key` and store the checkpoint inside the caller's
/// transaction (`last` marks the checkpoint signed when the run finished).
pub(crate) async fn sign_head_in(
    tx: &tokio_postgres::Transaction<'_>,
    key: &LedgerKey,
    run: RunId,
    seq: i64,
    head_hash: &[u8],
    last: bool,
) -> Result<()> {
    let mac = key.sign(run, seq, head_hash);
    tx.execute_typed_count(
        sql!("runs/add_checkpoint"),
        typed![&run, &seq, &head_hash, &mac.as_slice(), &last],
    )
    .await
    .map_err(|e| map_db_error(e, run))?;
    Ok(())
}

/// Append events inside the caller's transaction (for example the one settling a budget). The
/// run stays locked for appends until that transaction ends; `pgcrew_run_event` is notified at
/// most once per transaction and run, at commit. Payloads are checked against the hard cap
/// ([`super::limits::MAX_EVENT_PAYLOAD_BYTES`]; [`Error::TooLarge`]).
#[instrument(skip(tx, events), fields(n = events.len()), err)]
pub async fn append_events_in(
    tx: &tokio_postgres::Transaction<'_>,
    run: RunId,
    events: &[NewEvent],
    lease_token: Option<i64>,
) -> Result<Vec<AppendedEvent>> {
    let (types, keys, payloads, dedupe) = params(events, super::limits::MAX_EVENT_PAYLOAD_BYTES)?;
    let rows = tx
        .query_typed_rows(
            sql!("runs/append_events"),
            typed![&run, &lease_token, &types, &keys, &payloads, &dedupe],
        )
        .await
        .map_err(|e| map_db_error(e, run))?;
    Ok(appended(rows))
}

pub(crate) fn ledger_event(run: RunId, r: &tokio_postgres::Row) -> LedgerEvent {
    LedgerEvent {
        run_id: run,
        seq: r.get(0),
        tenant_id: r.get(1),
        event_type: r.get(2),
        step_key: r.get(3),
        payload: r.get(4),
        prev_hash: r.get(5),
        hash: r.get(6),
        created_at: r.get(7),
    }
}

/// Read up to `limit` events of a run with `seq > after_seq`, in order.
#[instrument(skip(db), err)]
pub async fn read_events(
    db: &Db,
    run: RunId,
    after_seq: i64,
    limit: i64,
) -> Result<Vec<LedgerEvent>> {
    if limit < 1 {
        return Err(Error::invalid("limit", "must be at least 1"));
    }
    let conn = db.get().await?;
    let rows = conn
        .query_typed_rows(sql!("runs/read_events"), typed![&run, &after_seq, &limit])
        .await?;
    Ok(rows.iter().map(|r| ledger_event(run, r)).collect())
}

async fn anchor<C: Executor + ?Sized>(client: &C, run: RunId) -> Result<Option<ChainAnchor>> {
    let row = client
        .query_typed_opt_row(sql!("runs/get_anchor"), typed![&run])
        .await?;
    Ok(row.map(|r| ChainAnchor {
        last_seq: r.get(0),
        last_hash: r.get(1),
        event_count: r.get(2),
        reason: r.get(3),
        purged_at: r.get(4),
    }))
}

async fn ensure_run<C: Executor + ?Sized>(client: &C, run: RunId) -> Result<()> {
    let exists: bool = client
        .query_typed_row(sql!("runs/run_exists"), typed![&run])
        .await?
        .get(0);
    if exists {
        Ok(())
    } else {
        Err(Error::not_found("run", run))
    }
}

/// A stored checkpoint.
struct Checkpoint {
    seq: i64,
    head_hash: Vec<u8>,
    mac: Vec<u8>,
    /// The stored event at `seq`, as streamed: its hash and whether it finishes the run.
    event: Option<(Vec<u8>, bool)>,
}

/// The event types a terminal transition records (always a finished run's last event).
fn finishes_run(event_type: &str) -> bool {
    matches!(event_type, "run_completed" | "run_failed" | "run_cancelled")
}

/// What one consistent scan of a run's ledger found.
struct Scan {
    chain: ChainVerification,
    state: RunState,
    head_hash: Option<Vec<u8>>,
    purged: bool,
    checkpoints: Vec<Checkpoint>,
}

/// Stream a run's events (and, with `with_checkpoints`, its checkpoints) in one read-only,
/// repeatable-read snapshot and apply the unkeyed checks, exactly like `pgcrew.verify_run_chain`.
async fn scan(db: &Db, run: RunId, with_checkpoints: bool) -> Result<Scan> {
    let mut conn = db.get().await?;
    ensure_run(&**conn, run).await?;
    let tx = conn
        .build_transaction()
        .read_only(true)
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await?;
    let head = tx
        .query_typed_opt_row(sql!("runs/ledger_head"), typed![&run])
        .await?
        .ok_or_else(|| Error::not_found("run", run))?;
    let head_seq: i64 = head.get(0);
    let head_hash: Option<Vec<u8>> = head.get(1);
    let state: String = head.get(2);
    let state: RunState = state.parse()?;
    let format_value: i16 = head.get(3);
    let format = LedgerFormat::from_i16(format_value)?;
    let anchor = anchor(&*tx, run).await?;
    let mut checkpoints: Vec<Checkpoint> = if with_checkpoints {
        tx.query_typed_rows(sql!("runs/list_checkpoints"), typed![&run])
            .await?
            .iter()
            .map(|r| Checkpoint {
                seq: r.get(0),
                head_hash: r.get(1),
                mac: r.get(2),
                event: None,
            })
            .collect()
    } else {
        Vec::new()
    };
    // Streamed row by row, as an unnamed statement (nothing is left on the server connection,
    // which behind a transaction pooler may serve another client next).
    let rows = tx
        .query_typed_raw(
            sql!("runs/verify_rows"),
            [(&run as &(dyn ToSql + Sync), Type::UUID)],
        )
        .await?;
    let mut rows = Box::pin(rows);
    let mut expected_prev = vec![0u8; 32];
    let mut rn: i64 = 0;
    let mut next_ck = 0usize;
    let mut first_bad: Option<(i64, String)> = None;
    'outer: loop {
        let Some(r) = rows.next().await.transpose()? else {
            break;
        };
        {
            rn += 1;
            let seq: i64 = r.get(0);
            let tenant: &str = r.get(1);
            let event_type: &str = r.get(2);
            let step_key: Option<&str> = r.get(3);
            let created_us: i64 = r.get(4);
            let payload: &str = r.get(5);
            let prev: &[u8] = r.get(6);
            let hash: &[u8] = r.get(7);
            if seq != rn {
                first_bad = Some((rn, "event missing or moved".into()));
                break 'outer;
            }
            let computed = format.hash(
                prev, run, seq, tenant, event_type, step_key, created_us, payload,
            );
            if prev != expected_prev.as_slice() {
                first_bad = Some((seq, "event does not link to its predecessor".into()));
                break 'outer;
            }
            if hash != computed.as_slice() {
                first_bad = Some((
                    seq,
                    "event hash does not match its contents (changed, or copied from another run)"
                        .into(),
                ));
                break 'outer;
            }
            while next_ck < checkpoints.len() && checkpoints[next_ck].seq < seq {
                next_ck += 1;
            }
            if let Some(ck) = checkpoints.get_mut(next_ck)
                && ck.seq == seq
            {
                ck.event = Some((hash.to_vec(), finishes_run(event_type)));
            }
            expected_prev.clear();
            expected_prev.extend_from_slice(hash);
        }
    }
    drop(rows);
    // A bad row past head + 1 means rows are stored beyond the recorded head: report that first,
    // like the SQL function (which sees every row).
    if let Some((bad, _)) = &first_bad
        && *bad > head_seq + 1
    {
        first_bad = Some((
            head_seq + 1,
            format!("events stored beyond the recorded head (seq {head_seq})"),
        ));
    }
    // Stored events: rn (all of them when the rows were good; only needed then).
    let stored = rn;
    let last_hash = (stored > 0).then_some(expected_prev.as_slice());
    let purged = anchor.as_ref().is_some_and(|a| {
        stored == 0
            && first_bad.is_none()
            && state.is_terminal()
            && a.last_seq == head_seq
            && Some(&a.last_hash) == head_hash.as_ref()
            && a.event_count == head_seq
    });
    if first_bad.is_none() && !purged {
        if stored < head_seq {
            first_bad = Some((
                stored + 1,
                format!(
                    "events missing after the last stored one (recorded head is seq {head_seq})"
                ),
            ));
        } else if stored > head_seq {
            first_bad = Some((
                head_seq + 1,
                format!("events stored beyond the recorded head (seq {head_seq})"),
            ));
        } else if stored > 0 && last_hash != head_hash.as_deref() {
            first_bad = Some((head_seq, "the last event is not the recorded head".into()));
        }
    }
    if first_bad.is_none()
        && !purged
        && let Some(a) = &anchor
    {
        first_bad = Some((
            a.last_seq.min(head_seq).max(1),
            "chain anchor does not match a purged run (events still stored, run unfinished, or anchor differs from the recorded head)".into(),
        ));
    }
    let checked = match first_bad {
        // Like the SQL function, report the number of events stored.
        Some(_) => count_events(&*tx, run).await?,
        None => u64::try_from(rn).unwrap_or(0),
    };
    tx.commit().await?;
    let (first_bad_seq, problem) = match first_bad {
        Some((s, p)) => (Some(s), Some(p)),
        None => (None, None),
    };
    Ok(Scan {
        chain: ChainVerification {
            valid: first_bad_seq.is_none(),
            first_bad_seq,
            checked,
            anchor,
            problem,
            head_seq,
            format: format_value,
        },
        state,
        head_hash,
        purged,
        checkpoints,
    })
}

/// Verify a run's chain without the key, in Rust, streaming the rows through a cursor (constant
/// memory) in one consistent snapshot. Reports the first bad seq exactly like
/// [`verify_run_chain_sql`]. A full rewrite with recomputed hashes and head is not detected
/// without the key: see [`verify_run_chain_signed`].
#[instrument(skip(db), err)]
pub async fn verify_run_chain(db: &Db, run: RunId) -> Result<ChainVerification> {
    Ok(scan(db, run, false).await?.chain)
}

/// Verify a run's chain and its signed checkpoints with the ledger key. Detects everything
/// [`verify_run_chain`] does, and also a full rewrite (recomputed hashes and head), events copied
/// from another run, forged, mismatching or deleted checkpoints, and a finished run whose head is
/// not covered by a valid checkpoint. For a run still running, [`SignedVerification::signed_seq`]
/// says how far it is signed.
#[instrument(skip(db, key), err)]
pub async fn verify_run_chain_signed(
    db: &Db,
    run: RunId,
    key: &LedgerKey,
) -> Result<SignedVerification> {
    let scan = scan(db, run, true).await?;
    Ok(judge_signed(run, key, scan))
}

fn judge_signed(run: RunId, key: &LedgerKey, scan: Scan) -> SignedVerification {
    let Scan {
        chain,
        state,
        head_hash,
        purged,
        checkpoints,
    } = scan;
    let head_seq = chain.head_seq;
    let count = checkpoints.len() as u64;
    let verdict = |problem: Option<String>, signed_seq: Option<i64>| SignedVerification {
        valid: chain.valid && problem.is_none(),
        problem: chain.problem.clone().or(problem),
        signed_seq,
        checkpoints: count,
        state,
        chain: chain.clone(),
    };
    if !chain.valid {
        return verdict(None, None);
    }
    let mut signed: Option<i64> = None;
    let mut finished_at: Option<i64> = None;
    for ck in &checkpoints {
        let seq = ck.seq;
        if !key.verify(run, seq, &ck.head_hash, &ck.mac) {
            return verdict(
                Some(format!(
                    "checkpoint at seq {seq} does not verify with this key (forged, or signed with another key)"
                )),
                signed,
            );
        }
        if seq > head_seq {
            return verdict(
                Some(format!(
                    "checkpoint at seq {seq} is beyond the recorded head (seq {head_seq}): signed events were removed"
                )),
                signed,
            );
        }
        if purged {
            // Only the anchored head is left to compare with.
            if seq == head_seq && Some(&ck.head_hash) != head_hash.as_ref() {
                return verdict(
                    Some(format!(
                        "checkpoint at seq {seq} does not match the chain anchor (rewritten ledger)"
                    )),
                    signed,
                );
            }
        } else {
            match &ck.event {
                Some((hash, finishes)) if *hash == ck.head_hash => {
                    if *finishes {
                        finished_at = Some(seq);
                    }
                }
                Some(_) => {
                    return verdict(
                        Some(format!(
                            "checkpoint at seq {seq} does not match the stored chain (rewritten ledger)"
                        )),
                        signed,
                    );
                }
                None => {
                    return verdict(
                        Some(format!(
                            "checkpoint at seq {seq} covers an event that is not stored"
                        )),
                        signed,
                    );
                }
            }
        }
        signed = Some(signed.map_or(seq, |s| s.max(seq)));
    }
    if let Some(at) = finished_at {
        if !state.is_terminal() {
            return verdict(
                Some(format!(
                    "the signed ledger finishes the run at seq {at}, but the run is {state}"
                )),
                signed,
            );
        }
        if at != head_seq {
            return verdict(
                Some(format!(
                    "events after the signed end of the run (seq {at}; recorded head seq {head_seq})"
                )),
                signed,
            );
        }
    }
    if state.is_terminal() {
        if signed != Some(head_seq) {
            return verdict(
                Some(format!(
                    "the run is {state} but its head (seq {head_seq}) is not covered by a valid checkpoint (signed up to {})",
                    signed.map_or("nothing".to_string(), |s| format!("seq {s}"))
                )),
                signed,
            );
        }
        if !purged && finished_at != Some(head_seq) {
            return verdict(
                Some(format!(
                    "the run is {state} but its signed head (seq {head_seq}) is not the event that finished it"
                )),
                signed,
            );
        }
    }
    verdict(None, signed)
}

async fn count_events<C: Executor + ?Sized>(client: &C, run: RunId) -> Result<u64> {
    let row = client
        .query_typed_row(sql!("runs/count_events"), typed![&run])
        .await?;
    let n: i64 = row.get(0);
    Ok(u64::try_from(n).unwrap_or(0))
}

/// Verify a run's chain with the SQL function `pgcrew.verify_run_chain(run)` (what an auditor
/// runs without pgcrew; no key, so a full rewrite is not detected).
#[instrument(skip(db), err)]
pub async fn verify_run_chain_sql(db: &Db, run: RunId) -> Result<ChainVerification> {
    let mut conn = db.get().await?;
    ensure_run(&**conn, run).await?;
    let tx = conn
        .build_transaction()
        .read_only(true)
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await?;
    let anchor = anchor(&*tx, run).await?;
    let head = tx
        .query_typed_opt_row(sql!("runs/ledger_head"), typed![&run])
        .await?
        .ok_or_else(|| Error::not_found("run", run))?;
    let row = tx
        .query_typed_row(sql!("runs/verify_chain"), typed![&run])
        .await?;
    tx.commit().await?;
    let checked: i64 = row.get(2);
    Ok(ChainVerification {
        valid: row.get(0),
        first_bad_seq: row.get(1),
        checked: u64::try_from(checked).unwrap_or(0),
        anchor,
        problem: row.get(3),
        head_seq: head.get(0),
        format: head.get(3),
    })
}

/// Retention: remove a *finished* run's events, artifacts and summaries, keeping a chain anchor
/// (the recorded head: last seq and hash) in `pgcrew.chain_anchors` and the run's signed
/// checkpoints (SQL function `pgcrew.purge_run_ledger`). Logged at `info`. The run row stays; its
/// ledger is closed (appends are refused) and it still verifies, through the anchor.
#[instrument(skip(db, reason), err)]
pub async fn purge_run(db: &Db, run: RunId, reason: &str) -> Result<ChainAnchor> {
    if reason.trim().is_empty() {
        return Err(Error::invalid(
            "reason",
            "say why the run's ledger is removed",
        ));
    }
    let conn = db.get().await?;
    let row = conn
        .query_typed_row(sql!("runs/purge_ledger"), typed![&run, &reason])
        .await
        .map_err(|e| match e.as_db_error() {
            Some(d) if d.code().code() == "55000" => Error::invalid("run", d.message()),
            _ => map_db_error(e, run),
        })?;
    let events: i64 = row.get(5);
    let artifacts: i64 = row.get(6);
    let summaries: i64 = row.get(7);
    info!(run = %run, events, artifacts, summaries, reason, "retention: purged finished run's ledger (chain anchor kept)");
    Ok(ChainAnchor {
        last_seq: row.get(0),
        last_hash: row.get(1),
        event_count: row.get(2),
        reason: row.get(3),
        purged_at: row.get(4),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_hash_covers_every_field() {
        let base = event_hash(&[0u8; 32], 1, "t", "e", Some("k"), 5, "{}");
        // The same input gives the same hash; changing any field changes it.
        assert_eq!(
            base,
            event_hash(&[0u8; 32], 1, "t", "e", Some("k"), 5, "{}")
        );
        assert_ne!(
            base,
            event_hash(&[1u8; 32], 1, "t", "e", Some("k"), 5, "{}")
        );
        assert_ne!(
            base,
            event_hash(&[0u8; 32], 2, "t", "e", Some("k"), 5, "{}")
        );
        assert_ne!(
            base,
            event_hash(&[0u8; 32], 1, "u", "e", Some("k"), 5, "{}")
        );
        assert_ne!(
            base,
            event_hash(&[0u8; 32], 1, "t", "f", Some("k"), 5, "{}")
        );
        assert_ne!(base, event_hash(&[0u8; 32], 1, "t", "e", None, 5, "{}"));
        assert_ne!(
            base,
            event_hash(&[0u8; 32], 1, "t", "e", Some("k"), 6, "{}")
        );
        assert_ne!(
            base,
            event_hash(&[0u8; 32], 1, "t", "e", Some("k"), 5, "[]")
        );
        // The 0x00 separators keep field boundaries unambiguous.
        assert_ne!(
            event_hash(&[0u8; 32], 1, "ab", "c", None, 5, "{}"),
            event_hash(&[0u8; 32], 1, "a", "bc", None, 5, "{}")
        );
        // No step key hashes like an empty one (coalesce(step_key, '')).
        assert_eq!(
            event_hash(&[0u8; 32], 1, "t", "e", None, 5, "{}"),
            event_hash(&[0u8; 32], 1, "t", "e", Some(""), 5, "{}")
        );
    }

    #[test]
    fn appends_are_validated_before_touching_the_database() {
        assert!(params_max(&[]).is_err());
        assert!(params_max(&[NewEvent::new("", serde_json::json!({}))]).is_err());
        assert!(params_max(&[NewEvent::new("a", serde_json::json!({})).step("x\n")]).is_err());
        assert!(
            params_max(&[NewEvent::new("a", serde_json::json!({})).step("k".repeat(513))]).is_err()
        );
        assert!(params_max(&[NewEvent::new("a", serde_json::json!({})).step("k")]).is_ok());
        // Payload limit: compact JSON text, refused with TooLarge.
        let big = NewEvent::new("a", serde_json::json!("x".repeat(100)));
        assert!(params(std::slice::from_ref(&big), 102).is_ok());
        assert!(matches!(
            params(&[big], 101),
            Err(Error::TooLarge {
                size: 102,
                limit: 101,
                ..
            })
        ));
    }

    fn params_max(events: &[NewEvent]) -> Result<AppendParams> {
        params(events, crate::runs::limits::MAX_EVENT_PAYLOAD_BYTES)
    }
}
