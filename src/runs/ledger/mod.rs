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
//! hash and the recorded head. Instances holding the ledger key ([`LedgerKey`](crate::LedgerKey), kept outside the
//! database) therefore sign run heads into `pgcrew.ledger_checkpoints`:
//!
//! ```text
//! mac = HMAC-SHA-256(key, uuid_send(run_id) (16 bytes) || int8send(seq) (8 bytes) || head_hash (32 bytes))
//! ```
//!
//! when a run finishes (in the transaction of the terminal transition: complete, fail, cancel,
//! maintenance's stuck-run failure) and, through a [`Db`](crate::Db) with a key
//! ([`Db::with_ledger_key`](crate::Db::with_ledger_key)), at most every [`Db::checkpoint_interval`](crate::Db::checkpoint_interval) appended events (default
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

use super::state::RunState;
use crate::error::{Error, Result};
use crate::ids::{RunId, TenantId};

mod append;
mod hash;
mod purge;
mod verify;

pub(crate) use append::{after_append, append_rows, check_events, sign_head};
pub use append::{append_event, append_events, read_events};
pub use hash::{LedgerFormat, event_hash, event_hash_v2};
pub use purge::purge_run;
pub use verify::{verify_run_chain, verify_run_chain_signed, verify_run_chain_sql};

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
    pub tenant_id: TenantId,
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
