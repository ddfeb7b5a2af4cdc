//! The chain hash of both ledger formats (see the ledger's module docs).

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::ids::RunId;

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

    /// The chain hash of one event in this format (v1 ignores `run`).
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
        let mut h = Sha256::new();
        h.update(prev_hash);
        if self == LedgerFormat::V2 {
            h.update(run.as_uuid().as_bytes());
        }
        h.update(seq.to_be_bytes());
        for field in [tenant_id, event_type, step_key.unwrap_or("")] {
            h.update(field.as_bytes());
            h.update([0u8]);
        }
        h.update(created_at_micros.to_be_bytes());
        h.update(payload_text.as_bytes());
        h.finalize().into()
    }
}

/// Compute an event's v1 chain hash (runs created before the v2 migration; see the module docs):
/// [`LedgerFormat::hash`] of [`LedgerFormat::V1`], which hashes no run id.
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
    let no_run = RunId(uuid::Uuid::nil());
    LedgerFormat::V1.hash(
        prev_hash,
        no_run,
        seq,
        tenant_id,
        event_type,
        step_key,
        created_at_micros,
        payload_text,
    )
}

/// Compute an event's v2 chain hash (every new run; the run id is hashed right after the previous
/// hash; see the module docs): [`LedgerFormat::hash`] of [`LedgerFormat::V2`].
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
    LedgerFormat::V2.hash(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_hash_covers_every_field() {
        let zero = [0u8; 32];
        let base = event_hash(&zero, 1, "t", "e", Some("k"), 5, "{}");
        // The same input gives the same hash; changing any field changes it.
        assert_eq!(base, event_hash(&zero, 1, "t", "e", Some("k"), 5, "{}"));
        let changed = [
            event_hash(&[1u8; 32], 1, "t", "e", Some("k"), 5, "{}"),
            event_hash(&zero, 2, "t", "e", Some("k"), 5, "{}"),
            event_hash(&zero, 1, "u", "e", Some("k"), 5, "{}"),
            event_hash(&zero, 1, "t", "f", Some("k"), 5, "{}"),
            event_hash(&zero, 1, "t", "e", None, 5, "{}"),
            event_hash(&zero, 1, "t", "e", Some("k"), 6, "{}"),
            event_hash(&zero, 1, "t", "e", Some("k"), 5, "[]"),
        ];
        for (i, other) in changed.iter().enumerate() {
            assert_ne!(&base, other, "field change {i}");
        }
        // The 0x00 separators keep field boundaries unambiguous.
        assert_ne!(
            event_hash(&zero, 1, "ab", "c", None, 5, "{}"),
            event_hash(&zero, 1, "a", "bc", None, 5, "{}")
        );
        // No step key hashes like an empty one (coalesce(step_key, '')).
        assert_eq!(
            event_hash(&zero, 1, "t", "e", None, 5, "{}"),
            event_hash(&zero, 1, "t", "e", Some(""), 5, "{}")
        );
    }
}
