//! Size limits on stored run inputs.
//!
//! The database enforces hard caps on every run input (SQLSTATE `PC040`, see
//! `sql/V013__runs_edges.sql`); the library refuses earlier, before anything is sent, with
//! [`Error::TooLarge`], and may be configured lower ([`RunLimits`], set on a [`Db`] with
//! [`Db::with_run_limits`] or through `ClientConfig::run_limits`), never higher.
//!
//! | input | hard cap | library measures |
//! |---|---|---|
//! | ledger event payload | [`MAX_EVENT_PAYLOAD_BYTES`] (1 MiB) | compact JSON text |
//! | event type | 1..128 bytes | bytes |
//! | step key | 512 bytes ([`super::ledger::MAX_STEP_KEY_LEN`]) | bytes |
//! | artifact key | 1..256 bytes | bytes |
//! | artifact value | [`MAX_ARTIFACT_BYTES`] (1 MiB) | compact JSON text |
//! | summary type | 1..128 bytes | bytes |
//! | summary content (text or JSON) | [`MAX_SUMMARY_BYTES`] (1 MiB) | bytes / compact JSON text |
//! | run prompt | [`MAX_PROMPT_BYTES`] (1 MiB) | bytes |
//! | run metadata | [`MAX_RUN_METADATA_BYTES`] (64 KiB) | compact JSON text |
//! | run agent name | 128 bytes | bytes |
//!
//! The database measures JSON as PostgreSQL's `jsonb` text (`value::text`, which puts a space
//! after `:` and `,`), so a value just under the library's limit can still exceed the hard cap;
//! it is then refused by the database with the same [`Error::TooLarge`].
//!
//! [`Db`]: crate::db::Db
//! [`Db::with_run_limits`]: crate::db::Db::with_run_limits

use serde::Serialize;

use crate::error::{Error, Result};

/// Hard cap on a ledger event's payload (its JSON text), in bytes.
pub const MAX_EVENT_PAYLOAD_BYTES: usize = 1 << 20;
/// Hard cap on an artifact value (its JSON text), in bytes.
pub const MAX_ARTIFACT_BYTES: usize = 1 << 20;
/// Hard cap on a summary's content (text, or JSON text), in bytes.
pub const MAX_SUMMARY_BYTES: usize = 1 << 20;
/// Hard cap on a run's prompt, in bytes.
pub const MAX_PROMPT_BYTES: usize = 1 << 20;
/// Hard cap on a run's metadata (its JSON text), in bytes.
pub const MAX_RUN_METADATA_BYTES: usize = 64 << 10;

/// The library's limits on run inputs (each at most its database hard cap; defaults: the caps).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RunLimits {
    /// Largest ledger event payload (compact JSON), in bytes.
    pub max_event_payload_bytes: usize,
    /// Largest artifact value (compact JSON), in bytes.
    pub max_artifact_bytes: usize,
    /// Largest summary content (text, or compact JSON), in bytes.
    pub max_summary_bytes: usize,
}

impl Default for RunLimits {
    fn default() -> Self {
        RunLimits {
            max_event_payload_bytes: MAX_EVENT_PAYLOAD_BYTES,
            max_artifact_bytes: MAX_ARTIFACT_BYTES,
            max_summary_bytes: MAX_SUMMARY_BYTES,
        }
    }
}

impl RunLimits {
    /// [`Error::Config`] unless every limit is between 1 byte and its hard cap.
    pub fn validate(&self) -> Result<()> {
        for (name, value, cap) in [
            (
                "max_event_payload_bytes",
                self.max_event_payload_bytes,
                MAX_EVENT_PAYLOAD_BYTES,
            ),
            (
                "max_artifact_bytes",
                self.max_artifact_bytes,
                MAX_ARTIFACT_BYTES,
            ),
            (
                "max_summary_bytes",
                self.max_summary_bytes,
                MAX_SUMMARY_BYTES,
            ),
        ] {
            if value == 0 || value > cap {
                return Err(Error::Config(format!(
                    "run_limits.{name} must be between 1 and {cap} (the database's hard cap); got {value}"
                )));
            }
        }
        Ok(())
    }
}

/// Counts bytes written, so a JSON value is measured without allocating its text.
struct Counter(usize);

impl std::io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The length of a value's compact JSON text, in bytes.
pub(crate) fn json_len(value: &serde_json::Value) -> usize {
    let mut c = Counter(0);
    // Writing a `Value` into a counter cannot fail (the writer never errors, keys are strings).
    match serde_json::to_writer(&mut c, value) {
        Ok(()) => c.0,
        Err(_) => usize::MAX,
    }
}

/// [`Error::TooLarge`] when `size` exceeds `limit`.
pub(crate) fn check(field: &str, size: usize, limit: usize) -> Result<()> {
    if size > limit {
        return Err(Error::TooLarge {
            field: field.to_string(),
            size: size as u64,
            limit: limit as u64,
        });
    }
    Ok(())
}
