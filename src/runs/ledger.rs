//! The per-run, append-only, hash-chained event ledger.
//!
//! Appends run in one transaction under `pg_advisory_xact_lock` on the run (the SQL function
//! `pgcrew.append_events`): read the last `(seq, hash)`, insert `seq + 1`. The chain hash is
//! public and verifiable from the table alone (see [`event_hash`]):
//!
//! ```text
//! hash_n = sha256(hash_{n-1} || int8send(seq) || utf8(tenant_id) || 0x00 || utf8(event_type)
//!                 || 0x00 || utf8(coalesce(step_key, '')) || 0x00
//!                 || int8send(created_at in µs since the Unix epoch) || utf8(payload::text))
//! hash_0 = 32 zero bytes
//! ```
//!
//! Verification exists twice, with identical results: in SQL (`pgcrew.verify_run_chain(run)`,
//! [`verify_run_chain_sql`]) and in Rust, streaming through a cursor in constant memory
//! ([`verify_run_chain`]).

use chrono::{DateTime, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tracing::{info, instrument};

use super::map_db_error;
use crate::db::Db;
use crate::error::{Error, Result};
use crate::ids::RunId;

/// Longest accepted step key, in bytes.
pub const MAX_STEP_KEY_LEN: usize = 512;
/// Most events accepted by one batch append.
pub const MAX_BATCH: usize = 10_000;
/// Rows fetched per cursor round trip by the Rust verifier.
const VERIFY_FETCH: i32 = 5_000;

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

/// The outcome of verifying a run's chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainVerification {
    /// True when every event links to its predecessor and hashes correctly.
    pub valid: bool,
    /// The first bad seq (a missing seq, or the first row that was changed or moved).
    pub first_bad_seq: Option<i64>,
    /// Events checked.
    pub checked: u64,
    /// The chain anchor when retention removed the run's events.
    pub anchor: Option<ChainAnchor>,
}

/// Compute an event's chain hash (the public formula; see the module docs).
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
    let mut h = Sha256::new();
    h.update(prev_hash);
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

fn params(events: &[NewEvent]) -> Result<AppendParams> {
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

/// Append several events to a run in one transaction (consecutive seqs).
#[instrument(skip(db, events), fields(n = events.len()), err)]
pub async fn append_events(
    db: &Db,
    run: RunId,
    events: &[NewEvent],
    lease_token: Option<i64>,
) -> Result<Vec<AppendedEvent>> {
    let (types, keys, payloads, dedupe) = params(events)?;
    let conn = db.get().await?;
    let stmt = conn.prepare_cached(sql!("runs/append_events")).await?;
    let rows = conn
        .query(
            &stmt,
            &[&run, &lease_token, &types, &keys, &payloads, &dedupe],
        )
        .await
        .map_err(|e| map_db_error(e, run))?;
    Ok(appended(rows))
}

/// Append events inside the caller's transaction (for example the one settling a budget). The
/// run stays locked for appends until that transaction ends; `pgcrew_run_event` is notified at
/// most once per transaction and run, at commit.
#[instrument(skip(tx, events), fields(n = events.len()), err)]
pub async fn append_events_in(
    tx: &tokio_postgres::Transaction<'_>,
    run: RunId,
    events: &[NewEvent],
    lease_token: Option<i64>,
) -> Result<Vec<AppendedEvent>> {
    let (types, keys, payloads, dedupe) = params(events)?;
    let rows = tx
        .query(
            sql!("runs/append_events"),
            &[&run, &lease_token, &types, &keys, &payloads, &dedupe],
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
    let stmt = conn.prepare_cached(sql!("runs/read_events")).await?;
    let rows = conn.query(&stmt, &[&run, &after_seq, &limit]).await?;
    Ok(rows.iter().map(|r| ledger_event(run, r)).collect())
}

async fn anchor(client: &tokio_postgres::Client, run: RunId) -> Result<Option<ChainAnchor>> {
    let row = client.query_opt(sql!("runs/get_anchor"), &[&run]).await?;
    Ok(row.map(|r| ChainAnchor {
        last_seq: r.get(0),
        last_hash: r.get(1),
        event_count: r.get(2),
        reason: r.get(3),
        purged_at: r.get(4),
    }))
}

async fn ensure_run(client: &tokio_postgres::Client, run: RunId) -> Result<()> {
    let exists: bool = client
        .query_one(sql!("runs/run_exists"), &[&run])
        .await?
        .get(0);
    if exists {
        Ok(())
    } else {
        Err(Error::not_found("run", run))
    }
}

/// Verify a run's chain in Rust, streaming the rows through a cursor (constant memory).
/// Reports the first bad seq exactly like [`verify_run_chain_sql`].
#[instrument(skip(db), err)]
pub async fn verify_run_chain(db: &Db, run: RunId) -> Result<ChainVerification> {
    let mut conn = db.get().await?;
    ensure_run(&conn, run).await?;
    let anchor = anchor(&conn, run).await?;
    let tx = conn.build_transaction().read_only(true).start().await?;
    let stmt = tx.prepare(sql!("runs/verify_rows")).await?;
    let portal = tx.bind(&stmt, &[&run]).await?;
    let mut expected_prev = vec![0u8; 32];
    let mut rn: i64 = 0;
    let mut first_bad = None;
    'outer: loop {
        let rows = tx.query_portal(&portal, VERIFY_FETCH).await?;
        let n = rows.len();
        for r in rows {
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
                first_bad = Some(rn);
                break 'outer;
            }
            let computed = event_hash(prev, seq, tenant, event_type, step_key, created_us, payload);
            if prev != expected_prev.as_slice() || hash != computed.as_slice() {
                first_bad = Some(seq);
                break 'outer;
            }
            expected_prev.clear();
            expected_prev.extend_from_slice(hash);
        }
        if n < VERIFY_FETCH as usize {
            break;
        }
    }
    drop(portal);
    // Truncation: the recorded head must be the last event we saw.
    if first_bad.is_none() {
        let head = tx.query_one(sql!("runs/ledger_head"), &[&run]).await?;
        let head_seq: i64 = head.get(0);
        let head_hash: Option<&[u8]> = head.get(1);
        let purged: bool = head.get(2);
        if !purged && head_seq > 0 {
            if rn < head_seq {
                first_bad = Some(rn + 1);
            } else if rn == head_seq && head_hash != Some(expected_prev.as_slice()) {
                first_bad = Some(head_seq);
            }
        }
    }
    tx.commit().await?;
    let checked = match first_bad {
        // Like the SQL function, report the number of events stored.
        Some(_) => count_events(&conn, run).await?,
        None => u64::try_from(rn).unwrap_or(0),
    };
    Ok(ChainVerification {
        valid: first_bad.is_none(),
        first_bad_seq: first_bad,
        checked,
        anchor,
    })
}

async fn count_events(client: &tokio_postgres::Client, run: RunId) -> Result<u64> {
    let row = client.query_one(sql!("runs/count_events"), &[&run]).await?;
    let n: i64 = row.get(0);
    Ok(u64::try_from(n).unwrap_or(0))
}

/// Verify a run's chain with the SQL function `pgcrew.verify_run_chain(run)` (what an auditor
/// runs without pgcrew).
#[instrument(skip(db), err)]
pub async fn verify_run_chain_sql(db: &Db, run: RunId) -> Result<ChainVerification> {
    let conn = db.get().await?;
    ensure_run(&conn, run).await?;
    let anchor = anchor(&conn, run).await?;
    let row = conn.query_one(sql!("runs/verify_chain"), &[&run]).await?;
    let checked: i64 = row.get(2);
    Ok(ChainVerification {
        valid: row.get(0),
        first_bad_seq: row.get(1),
        checked: u64::try_from(checked).unwrap_or(0),
        anchor,
    })
}

/// Retention: remove a *finished* run's events, artifacts and summaries, keeping a chain anchor
/// (last seq and hash) in `pgcrew.chain_anchors`. Logged at `info`. The run row stays.
#[instrument(skip(db, reason), err)]
pub async fn purge_run(db: &Db, run: RunId, reason: &str) -> Result<ChainAnchor> {
    if reason.trim().is_empty() {
        return Err(Error::invalid(
            "reason",
            "say why the run's ledger is removed",
        ));
    }
    let mut conn = db.get().await?;
    let tx = conn.transaction().await?;
    tx.execute(sql!("runs/lock_run"), &[&run]).await?;
    let row = tx
        .query_opt(sql!("runs/get_run_for_update"), &[&run])
        .await?
        .ok_or_else(|| Error::not_found("run", run))?;
    let state: String = row.get("state");
    let tenant: String = row.get("tenant_id");
    if !matches!(state.as_str(), "completed" | "failed" | "cancelled") {
        return Err(Error::invalid(
            "run",
            format!("run {run} is {state}; only finished runs can be purged"),
        ));
    }
    let anchored = tx
        .query_opt(sql!("runs/insert_anchor"), &[&run, &tenant, &reason])
        .await?;
    if anchored.is_none() {
        return Err(Error::invalid(
            "run",
            format!("run {run} has no ledger events (already purged?)"),
        ));
    }
    let events = tx.execute(sql!("runs/delete_events"), &[&run]).await?;
    let artifacts = tx.execute(sql!("runs/delete_artifacts"), &[&run]).await?;
    let summaries = tx.execute(sql!("runs/delete_summaries"), &[&run]).await?;
    tx.commit().await?;
    info!(run = %run, events, artifacts, summaries, reason, "retention: purged finished run's ledger (chain anchor kept)");
    anchor(&conn, run)
        .await?
        .ok_or_else(|| Error::not_found("chain anchor", run))
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
        assert!(params(&[]).is_err());
        assert!(params(&[NewEvent::new("", serde_json::json!({}))]).is_err());
        assert!(params(&[NewEvent::new("a", serde_json::json!({})).step("x\n")]).is_err());
        assert!(
            params(&[NewEvent::new("a", serde_json::json!({})).step("k".repeat(513))]).is_err()
        );
        assert!(params(&[NewEvent::new("a", serde_json::json!({})).step("k")]).is_ok());
    }
}
