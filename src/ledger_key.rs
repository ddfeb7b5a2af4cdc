//! The ledger key: an HMAC-SHA-256 key held outside the database that signs ledger checkpoints.
//!
//! A checkpoint binds a run's chain head: `mac = HMAC-SHA-256(key, uuid_send(run_id) (16 bytes)
//! || int8send(seq) (8 bytes, big-endian) || head_hash (32 bytes))`. Whoever can write to the
//! database but does not hold the key can damage a ledger, but cannot rewrite it without the
//! checkpoints exposing it (see [`crate::runs::ledger`]).
//!
//! Where instances get the key (see [`LedgerKey::from_env`]): `PGCREW_LEDGER_KEY` holds the key
//! itself, `PGCREW_LEDGER_KEY_FILE` names a file holding it (a trailing newline is ignored), or
//! [`ClientConfigBuilder::ledger_key`](crate::ClientConfigBuilder::ledger_key). A key has at least
//! [`MIN_LEDGER_KEY_LEN`] bytes; it never appears in `Debug` output or logs.

use std::ffi::OsString;
use std::path::Path;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::{Error, Result};
use crate::ids::RunId;

/// The shortest accepted ledger key, in bytes.
pub const MIN_LEDGER_KEY_LEN: usize = 32;

/// The environment variable holding the ledger key itself.
pub const LEDGER_KEY_ENV: &str = "PGCREW_LEDGER_KEY";

/// The environment variable naming a file that holds the ledger key.
pub const LEDGER_KEY_FILE_ENV: &str = "PGCREW_LEDGER_KEY_FILE";

/// Sign a run's head at most every this many appends by default (and always when it finishes).
pub const DEFAULT_CHECKPOINT_INTERVAL: u32 = 64;

type HmacSha256 = Hmac<Sha256>;

/// A ledger key (at least [`MIN_LEDGER_KEY_LEN`] bytes). Cheap to clone; `Debug` never shows it.
/// Only the keyed HMAC state is kept, not the key bytes.
#[derive(Clone)]
pub struct LedgerKey {
    mac: Arc<HmacSha256>,
}

impl std::fmt::Debug for LedgerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LedgerKey(<redacted>)")
    }
}

impl LedgerKey {
    /// A key from its bytes; [`Error::LedgerKey`] when shorter than [`MIN_LEDGER_KEY_LEN`].
    pub fn new(bytes: impl AsRef<[u8]>) -> Result<LedgerKey> {
        let bytes = bytes.as_ref();
        if bytes.len() < MIN_LEDGER_KEY_LEN {
            return Err(Error::LedgerKey(format!(
                "the key is {} bytes long; at least {MIN_LEDGER_KEY_LEN} are required (e.g. `openssl rand -hex 32`)",
                bytes.len()
            )));
        }
        let mac = HmacSha256::new_from_slice(bytes)
            .map_err(|e| Error::LedgerKey(format!("HMAC-SHA-256 refused the key: {e}")))?;
        Ok(LedgerKey { mac: Arc::new(mac) })
    }

    /// Read a key from a file (its bytes; one trailing newline, `\n` or `\r\n`, is ignored).
    pub fn from_file(path: impl AsRef<Path>) -> Result<LedgerKey> {
        let path = path.as_ref();
        let mut bytes = std::fs::read(path).map_err(|e| {
            Error::LedgerKey(format!("cannot read the key file {}: {e}", path.display()))
        })?;
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
            if bytes.last() == Some(&b'\r') {
                bytes.pop();
            }
        }
        LedgerKey::new(&bytes).map_err(|e| match e {
            Error::LedgerKey(m) => Error::LedgerKey(format!("key file {}: {m}", path.display())),
            other => other,
        })
    }

    /// The key from the environment: `PGCREW_LEDGER_KEY` (the key itself) or
    /// `PGCREW_LEDGER_KEY_FILE` (a file holding it). `Ok(None)` when neither is set (empty counts
    /// as unset); [`Error::LedgerKey`] when both are set, the file cannot be read or the key is
    /// too short.
    pub fn from_env() -> Result<Option<LedgerKey>> {
        LedgerKey::from_lookup(|name| std::env::var_os(name))
    }

    /// [`LedgerKey::from_env`] with the variables looked up by `lookup` (for tests and embedding).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<OsString>) -> Result<Option<LedgerKey>> {
        let key = lookup(LEDGER_KEY_ENV).filter(|v| !v.is_empty());
        let file = lookup(LEDGER_KEY_FILE_ENV).filter(|v| !v.is_empty());
        match (key, file) {
            (Some(_), Some(_)) => Err(Error::LedgerKey(format!(
                "both {LEDGER_KEY_ENV} and {LEDGER_KEY_FILE_ENV} are set; set only one"
            ))),
            (Some(k), None) => {
                let bytes = os_bytes(k);
                LedgerKey::new(bytes).map(Some).map_err(|e| match e {
                    Error::LedgerKey(m) => Error::LedgerKey(format!("{LEDGER_KEY_ENV}: {m}")),
                    other => other,
                })
            }
            (None, Some(f)) => LedgerKey::from_file(Path::new(&f)).map(Some),
            (None, None) => Ok(None),
        }
    }

    fn mac_of(&self, run: RunId, seq: i64, head_hash: &[u8]) -> HmacSha256 {
        let mut mac = (*self.mac).clone();
        mac.update(run.as_uuid().as_bytes());
        mac.update(&seq.to_be_bytes());
        mac.update(head_hash);
        mac
    }

    /// The checkpoint MAC of `(run, seq, head_hash)`:
    /// `HMAC-SHA-256(key, uuid_send(run_id) || int8send(seq) || head_hash)`.
    pub fn sign(&self, run: RunId, seq: i64, head_hash: &[u8]) -> [u8; 32] {
        self.mac_of(run, seq, head_hash)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Whether `mac` is the checkpoint MAC of `(run, seq, head_hash)` (compared in constant time).
    pub fn verify(&self, run: RunId, seq: i64, head_hash: &[u8], mac: &[u8]) -> bool {
        self.mac_of(run, seq, head_hash).verify_slice(mac).is_ok()
    }
}

#[cfg(unix)]
fn os_bytes(v: OsString) -> Vec<u8> {
    use std::os::unix::ffi::OsStringExt;
    v.into_vec()
}

#[cfg(not(unix))]
fn os_bytes(v: OsString) -> Vec<u8> {
    v.to_string_lossy().into_owned().into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked_and_never_printed() {
        assert!(matches!(
            LedgerKey::new([7u8; 31]),
            Err(Error::LedgerKey(_))
        ));
        let k = LedgerKey::new("k".repeat(32)).unwrap();
        assert_eq!(format!("{k:?}"), "LedgerKey(<redacted>)");
        let run = RunId::new();
        let mac = k.sign(run, 5, &[1u8; 32]);
        assert!(k.verify(run, 5, &[1u8; 32], &mac));
        assert!(!k.verify(run, 6, &[1u8; 32], &mac));
        assert!(!k.verify(RunId::new(), 5, &[1u8; 32], &mac));
        assert!(!k.verify(run, 5, &[2u8; 32], &mac));
        let other = LedgerKey::new("j".repeat(32)).unwrap();
        assert!(!other.verify(run, 5, &[1u8; 32], &mac));
    }

    #[test]
    fn mac_is_the_documented_hmac() {
        let k = LedgerKey::new([0x42u8; 32]).unwrap();
        let run = RunId::new();
        let mut m = HmacSha256::new_from_slice(&[0x42u8; 32]).unwrap();
        let mut msg = run.as_uuid().as_bytes().to_vec();
        msg.extend_from_slice(&9i64.to_be_bytes());
        msg.extend_from_slice(&[3u8; 32]);
        m.update(&msg);
        let expected: [u8; 32] = m.finalize().into_bytes().into();
        assert_eq!(k.sign(run, 9, &[3u8; 32]), expected);
    }

    #[test]
    fn env_lookup() {
        let none = LedgerKey::from_lookup(|_| None).unwrap();
        assert!(none.is_none());
        let key = "x".repeat(40);
        let got = LedgerKey::from_lookup(|n| (n == LEDGER_KEY_ENV).then(|| key.clone().into()))
            .unwrap()
            .unwrap();
        assert!(!got.verify(RunId::new(), 1, &[0; 32], &[0; 32]));
        let short = LedgerKey::from_lookup(|n| (n == LEDGER_KEY_ENV).then(|| "short".into()));
        match short {
            Err(Error::LedgerKey(m)) => {
                assert!(
                    m.contains(LEDGER_KEY_ENV) && m.contains("at least 32"),
                    "{m}"
                );
                assert!(!m.contains("short"), "the key must not be echoed: {m}");
            }
            other => panic!("expected a ledger key error, got {other:?}"),
        }
        let both = LedgerKey::from_lookup(|_| Some("y".repeat(40).into()));
        assert!(matches!(both, Err(Error::LedgerKey(_))));
    }
}
