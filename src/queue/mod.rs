//! The durable task queue.
//!
//! Tasks live in `pgcrew.tasks`. They are enqueued singly ([`enqueue`]), in bulk
//! ([`enqueue_many`], thousands per statement) or inside the caller's own transaction (both take
//! any [`Executor`](crate::db::Executor): a tokio-postgres `Client` or `Transaction`, or a pooled
//! connection `&conn` or pooled transaction `&tx`, which cache the prepared statement per
//! connection; `Client::enqueue` takes a pooled connection for you),
//! claimed with `FOR UPDATE SKIP LOCKED` by
//! the `pgcrew.claim_tasks` function —
//! fairly across tenants and within every tenant's concurrency limit — and acknowledged in
//! batches with a claim token ([`ack`]). The [`WorkerPool`] service runs handlers registered by
//! kind inside a `Client`; the leader's maintenance rescues tasks of dead
//! instances and deletes old finished tasks ([`maintenance_steps`]).
//!
//! ```no_run
//! use std::time::Duration;
//! use pgcrew::queue::{self, NewTask, TaskOutcome, WorkerPool};
//! use pgcrew::{Client, ClientConfig};
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct Email { to: String }
//!
//! # async fn demo(dsn: &str) -> pgcrew::Result<()> {
//! let pool = WorkerPool::builder()
//!     .queue("default")
//!     .concurrency(8)
//!     .handler("send_email", |_ctx, email: Email| async move {
//!         println!("sending to {}", email.to);
//!         Ok(TaskOutcome::Complete)
//!     })
//!     .build()?;
//! let client = Client::builder(dsn)
//!     .config(ClientConfig::default())
//!     .service(pool.clone())
//!     .build()
//!     .await?;
//! client.start().await?;
//! client.enqueue(&NewTask::new("send_email", &Email { to: "x@y.z".into() })?).await?;
//! // Or inside your own transaction: the task exists only if it commits.
//! let mut conn = client.db().get().await?;
//! let tx = conn.transaction().await?;
//! queue::enqueue(&tx, &NewTask::new("send_email", &Email { to: "a@b.c".into() })?).await?;
//! tx.commit().await?;
//! # tokio::time::sleep(Duration::from_secs(1)).await;
//! client.stop().await?;
//! # Ok(())
//! # }
//! ```

mod admin;
mod claim;
mod enqueue;
mod maintenance;
mod retry;
mod worker;

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use admin::{
    TaskRow, TaskStats, cancel, clear_queue_limit, get, list, retry, set_queue_limit, stats,
};
pub use claim::{
    Ack, AckOutcome, AckReport, ClaimedTask, HeartbeatReport, ack, claim, heartbeat, next_due,
};
pub use enqueue::{Enqueued, enqueue, enqueue_many};
pub use maintenance::{RescueTasks, TaskRetention, maintenance_steps};
pub use retry::RetryPolicy;
pub use worker::{
    HandlerError, TaskContext, TaskOutcome, WorkerMetrics, WorkerMetricsSnapshot, WorkerPool,
    WorkerPoolBuilder,
};

use crate::error::{Error, Result};
use crate::ids::{RunId, TaskId, TenantId, validate_text_id};

/// Largest accepted task payload, in bytes of its JSON text as PostgreSQL renders the stored
/// `jsonb` (`octet_length(payload::text)`, see [`payload_size`]). Every enqueue path refuses a
/// larger payload with [`Error::InvalidInput`] (field `payload`) and stores nothing; the SQL
/// function `pgcrew.enqueue_task` refuses it with SQLSTATE `PC021`.
pub const MAX_PAYLOAD_BYTES: usize = 256 * 1024;

/// Longest delay a task can be given: 3650 days (about 10 years). A longer enqueue `delay` is
/// refused ([`Error::InvalidInput`], field `delay`; SQLSTATE `PC022` from
/// `pgcrew.enqueue_task`); longer snoozes and retry backoffs (e.g. `Duration::MAX`) are clamped
/// to it, by the library and by `pgcrew.ack_tasks`.
pub const MAX_TASK_DELAY: Duration = Duration::from_secs(3650 * 24 * 3600);

/// Longest error text stored per attempt (`last_error`, `errors[].error`), in characters. A
/// longer text keeps its beginning and ends with ` … [truncated: N characters in all]`, the
/// whole being exactly this long ([`bound_error_text`]; `pgcrew.ack_tasks` does the same).
pub const MAX_ERROR_CHARS: usize = 8192;

/// Entries kept in a task's `errors` history: the most recent ones (each carries its attempt
/// number, so a gap shows where older ones were dropped).
pub const MAX_ERRORS_KEPT: usize = 100;

/// Most tasks per bulk enqueue ([`enqueue_many`], `pgcrew tasks enqueue --count`): a larger
/// batch is refused with [`Error::InvalidInput`] (field `tasks`) and nothing is stored; split
/// it into several calls.
pub const MAX_ENQUEUE_BATCH: usize = 100_000;

/// Longest accepted unique key, in bytes.
pub const MAX_UNIQUE_KEY_LEN: usize = 512;

/// The queue tasks go to unless another is named.
pub const DEFAULT_QUEUE: &str = "default";

/// The tenant that owns work naming no tenant.
pub const DEFAULT_TENANT: &str = "default";

/// Task priority: claimed in this order within a tenant (stored as 0..=4).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// 0: before everything else.
    Critical,
    /// 1.
    High,
    /// 2: the default.
    #[default]
    Normal,
    /// 3.
    Low,
    /// 4: bulk/background work.
    Batch,
}

impl Priority {
    /// The stored value (0 = critical .. 4 = batch).
    pub fn as_i16(self) -> i16 {
        match self {
            Priority::Critical => 0,
            Priority::High => 1,
            Priority::Normal => 2,
            Priority::Low => 3,
            Priority::Batch => 4,
        }
    }

    /// From the stored value.
    pub fn from_i16(v: i16) -> Option<Priority> {
        Some(match v {
            0 => Priority::Critical,
            1 => Priority::High,
            2 => Priority::Normal,
            3 => Priority::Low,
            4 => Priority::Batch,
            _ => return None,
        })
    }

    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Critical => "critical",
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
            Priority::Batch => "batch",
        }
    }
}

impl FromStr for Priority {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "critical" => Priority::Critical,
            "high" => Priority::High,
            "normal" => Priority::Normal,
            "low" => Priority::Low,
            "batch" => Priority::Batch,
            other => {
                return Err(Error::invalid(
                    "priority",
                    format!("`{other}` is not one of critical, high, normal, low, batch"),
                ));
            }
        })
    }
}

/// A task's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Delayed, snoozed, or waiting for its dependencies.
    Scheduled,
    /// Ready to be claimed.
    Available,
    /// Claimed by a worker.
    Running,
    /// Finished successfully (final).
    Completed,
    /// Failed; will become available again after its backoff.
    Retryable,
    /// Failed for good (out of attempts, or discarded by its handler) (final).
    Discarded,
    /// Cancelled (final).
    Cancelled,
}

impl TaskState {
    /// All states, in lifecycle order.
    pub const ALL: [TaskState; 7] = [
        TaskState::Scheduled,
        TaskState::Available,
        TaskState::Running,
        TaskState::Completed,
        TaskState::Retryable,
        TaskState::Discarded,
        TaskState::Cancelled,
    ];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Scheduled => "scheduled",
            TaskState::Available => "available",
            TaskState::Running => "running",
            TaskState::Completed => "completed",
            TaskState::Retryable => "retryable",
            TaskState::Discarded => "discarded",
            TaskState::Cancelled => "cancelled",
        }
    }

    /// Whether the state is final (completed, discarded, cancelled).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TaskState::Completed | TaskState::Discarded | TaskState::Cancelled
        )
    }
}

impl std::fmt::Display for TaskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TaskState {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        TaskState::ALL
            .into_iter()
            .find(|st| st.as_str() == t)
            .ok_or_else(|| {
                Error::invalid(
                    "state",
                    format!(
                        "`{s}` is not a task state (scheduled, available, running, completed, retryable, discarded, cancelled)"
                    ),
                )
            })
    }
}

/// A task to enqueue. Built with [`NewTask::new`] and the chained setters.
#[derive(Debug, Clone, PartialEq)]
pub struct NewTask {
    /// Queue (default [`DEFAULT_QUEUE`]).
    pub queue: String,
    /// Kind: selects the handler.
    pub kind: String,
    /// Owning tenant (default [`DEFAULT_TENANT`]).
    pub tenant: TenantId,
    /// The run this task belongs to, if any.
    pub run_id: Option<RunId>,
    /// Priority (default normal).
    pub priority: Priority,
    /// JSON payload (at most [`MAX_PAYLOAD_BYTES`] serialised).
    pub payload: serde_json::Value,
    /// Run no earlier than this (database clock); exclusive with `delay`.
    pub run_at: Option<DateTime<Utc>>,
    /// Run no earlier than `now() + delay` (database clock).
    pub delay: Option<Duration>,
    /// Attempts before the task is discarded (default 25).
    pub max_attempts: i32,
    /// Deduplication key among non-final tasks of the same tenant and queue.
    pub unique_key: Option<String>,
    /// Tasks that must all complete before this one becomes available.
    pub depends_on: Vec<TaskId>,
}

impl NewTask {
    /// A task of `kind` carrying `payload` (any serde-serialisable value).
    pub fn new(kind: impl Into<String>, payload: &impl Serialize) -> Result<NewTask> {
        Ok(NewTask {
            queue: DEFAULT_QUEUE.to_string(),
            kind: kind.into(),
            tenant: TenantId::new(DEFAULT_TENANT)?,
            run_id: None,
            priority: Priority::Normal,
            payload: serde_json::to_value(payload)?,
            run_at: None,
            delay: None,
            max_attempts: 25,
            unique_key: None,
            depends_on: Vec::new(),
        })
    }

    /// Set the queue.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = queue.into();
        self
    }
    /// Set the tenant.
    pub fn tenant(mut self, tenant: TenantId) -> Self {
        self.tenant = tenant;
        self
    }
    /// Attach to a run.
    pub fn run(mut self, run: RunId) -> Self {
        self.run_id = Some(run);
        self
    }
    /// Set the priority.
    pub fn priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }
    /// Run no earlier than `at`.
    pub fn run_at(mut self, at: DateTime<Utc>) -> Self {
        self.run_at = Some(at);
        self
    }
    /// Run no earlier than `now() + delay` (database time).
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }
    /// Set the maximum number of attempts (≥ 1).
    pub fn max_attempts(mut self, n: i32) -> Self {
        self.max_attempts = n;
        self
    }
    /// Deduplicate on `key` among this tenant's non-final tasks in the queue.
    pub fn unique_key(mut self, key: impl Into<String>) -> Self {
        self.unique_key = Some(key.into());
        self
    }
    /// Become available only once all of `parents` completed (a discarded or cancelled parent
    /// cancels this task).
    pub fn depends_on(mut self, parents: impl IntoIterator<Item = TaskId>) -> Self {
        self.depends_on.extend(parents);
        self
    }

    /// Check every field; nothing is written when this fails.
    pub fn validate(&self) -> Result<()> {
        validate_text_id("queue", &self.queue)?;
        validate_text_id("kind", &self.kind)?;
        let size = payload_size(&self.payload)?;
        if size > MAX_PAYLOAD_BYTES {
            return Err(Error::invalid(
                "payload",
                format!(
                    "is {size} bytes of JSON; at most {MAX_PAYLOAD_BYTES} are allowed: store large data elsewhere (e.g. an artifact) and pass a reference"
                ),
            ));
        }
        if let Some(d) = self.delay
            && d > MAX_TASK_DELAY
        {
            return Err(Error::invalid(
                "delay",
                format!(
                    "is {d:?}; at most {} days are allowed: give a run_at instead, or a shorter delay",
                    MAX_TASK_DELAY.as_secs() / 86_400
                ),
            ));
        }
        if self.max_attempts < 1 {
            return Err(Error::invalid(
                "max_attempts",
                format!("is {}; it must be at least 1", self.max_attempts),
            ));
        }
        if self.run_at.is_some() && self.delay.is_some() {
            return Err(Error::invalid(
                "run_at",
                "give either run_at or delay, not both",
            ));
        }
        if let Some(k) = &self.unique_key
            && (k.is_empty() || k.len() > MAX_UNIQUE_KEY_LEN)
        {
            return Err(Error::invalid(
                "unique_key",
                format!("must be 1..={MAX_UNIQUE_KEY_LEN} bytes (got {})", k.len()),
            ));
        }
        if let Some(bad) = self.depends_on.iter().find(|t| t.0 <= 0) {
            return Err(Error::invalid(
                "depends_on",
                format!("{bad} is not a task id"),
            ));
        }
        Ok(())
    }

    pub(crate) fn delay_us(&self) -> i64 {
        self.delay.map(crate::config::interval_micros).unwrap_or(0)
    }
}

/// The size in bytes of `payload`'s JSON text as PostgreSQL renders the stored `jsonb`
/// (`octet_length(payload::text)`: `", "` and `": "` separators, numbers as `numeric` prints
/// them), the measure [`MAX_PAYLOAD_BYTES`] applies to on every enqueue path, the SQL function
/// `pgcrew.enqueue_task` included. `Err` names what `jsonb` cannot store at all (a NUL
/// character, `\u0000`, in a string or key).
pub fn payload_size(payload: &serde_json::Value) -> Result<usize> {
    use serde_json::Value;
    fn string(s: &str) -> Result<usize> {
        let mut n = 2;
        for c in s.chars() {
            n += match c {
                '\0' => {
                    return Err(Error::invalid(
                        "payload",
                        "contains a NUL character (\\u0000), which PostgreSQL's jsonb cannot store: remove it or encode the data (e.g. base64)",
                    ));
                }
                '"' | '\\' | '\u{8}' | '\u{c}' | '\n' | '\r' | '\t' => 2,
                c if (c as u32) < 0x20 => 6,
                c => c.len_utf8(),
            };
        }
        Ok(n)
    }
    fn value(v: &Value) -> Result<usize> {
        Ok(match v {
            Value::Null | Value::Bool(true) => 4,
            Value::Bool(false) => 5,
            Value::Number(n) => numeric_len(&n.to_string()),
            Value::String(s) => string(s)?,
            Value::Array(a) => {
                let mut n = 2 + 2 * a.len().saturating_sub(1);
                for x in a {
                    n += value(x)?;
                }
                n
            }
            Value::Object(m) => {
                let mut n = 2 + 2 * m.len().saturating_sub(1);
                for (k, x) in m {
                    n += string(k)? + 2 + value(x)?;
                }
                n
            }
        })
    }
    value(payload)
}

/// Length of PostgreSQL's `numeric` output for a JSON number written as `text`
/// (`-1.5e-7` prints as `-0.00000015`, `1e16` as `10000000000000000`, `-0` as `0`).
fn numeric_len(text: &str) -> usize {
    let (neg, rest) = match text.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, text),
    };
    let (mantissa, exp) = match rest.find(['e', 'E']) {
        Some(i) => (
            &rest[..i],
            rest[i + 1..]
                .trim_start_matches('+')
                .parse::<i64>()
                .unwrap_or(0),
        ),
        None => (rest, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = int.len() as i64 + frac.len() as i64;
    // Digits before the decimal point once the exponent is applied.
    let point = int.len() as i64 + exp;
    let scale = (frac.len() as i64 - exp).max(0);
    let all = int.bytes().chain(frac.bytes());
    let nonzero = all.clone().any(|b| b != b'0');
    // Integer part: the digits before the point (padded with zeros), without leading zeros.
    let leading_zeros = all
        .take(point.clamp(0, digits) as usize)
        .take_while(|b| *b == b'0')
        .count() as i64;
    let int_len = if point <= 0 || !nonzero {
        1
    } else {
        (point - leading_zeros).max(1)
    };
    let sign = usize::from(neg && nonzero);
    sign + int_len as usize + if scale > 0 { 1 + scale as usize } else { 0 }
}

/// `text` made storable as a task's error: NUL characters (which PostgreSQL text cannot hold)
/// become `␀` (U+2400), and a text longer than [`MAX_ERROR_CHARS`] characters keeps its
/// beginning and ends with ` … [truncated: N characters in all]` (N counts the whole text),
/// exactly as `pgcrew.ack_tasks` bounds what it is given. Borrowed when nothing changes.
pub fn bound_error_text(text: &str) -> std::borrow::Cow<'_, str> {
    use std::borrow::Cow;
    let has_nul = text.contains('\0');
    // At most MAX_ERROR_CHARS bytes is at most that many characters.
    if !has_nul && text.len() <= MAX_ERROR_CHARS {
        return Cow::Borrowed(text);
    }
    let clean: Cow<'_, str> = if has_nul {
        Cow::Owned(text.replace('\0', "\u{2400}"))
    } else {
        Cow::Borrowed(text)
    };
    let total = clean.chars().count();
    if total <= MAX_ERROR_CHARS {
        return clean;
    }
    let marker = format!(" … [truncated: {total} characters in all]");
    let keep = MAX_ERROR_CHARS.saturating_sub(marker.chars().count());
    let cut = clean
        .char_indices()
        .nth(keep)
        .map_or(clean.len(), |(i, _)| i);
    Cow::Owned(format!("{}{marker}", &clean[..cut]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_round_trip() {
        for p in [
            Priority::Critical,
            Priority::High,
            Priority::Normal,
            Priority::Low,
            Priority::Batch,
        ] {
            assert_eq!(Priority::from_i16(p.as_i16()), Some(p));
            assert_eq!(p.as_str().parse::<Priority>().ok(), Some(p));
        }
        assert!("urgent".parse::<Priority>().is_err());
        assert!(Priority::Critical < Priority::Batch);
    }

    #[test]
    fn error_texts_are_bounded_and_storable() {
        assert!(matches!(
            bound_error_text("plain"),
            std::borrow::Cow::Borrowed("plain")
        ));
        assert_eq!(bound_error_text("a\0b\0"), "a\u{2400}b\u{2400}");
        let exact = "é".repeat(MAX_ERROR_CHARS);
        assert_eq!(bound_error_text(&exact), exact);
        let long = format!("{}\0", "é".repeat(MAX_ERROR_CHARS));
        let b = bound_error_text(&long);
        assert_eq!(b.chars().count(), MAX_ERROR_CHARS);
        assert!(b.starts_with("éé"));
        assert!(!b.contains('\0'));
        assert!(
            b.ends_with(&format!(
                " … [truncated: {} characters in all]",
                MAX_ERROR_CHARS + 1
            )),
            "{}",
            &b[b.len() - 50..]
        );
    }

    #[test]
    fn payload_size_is_postgresql_json_text_length() {
        use serde_json::json;
        let cases = [
            (json!({}), "{}"),
            (json!([]), "[]"),
            (
                json!({"a": 1, "b": [true, false, null]}),
                r#"{"a": 1, "b": [true, false, null]}"#,
            ),
            (json!("q\"\\\n\u{1}é"), r#""q\"\\\n\u0001é""#),
        ];
        for (v, text) in cases {
            assert_eq!(payload_size(&v).unwrap(), text.len(), "{v}");
        }
        for (num, pg) in [
            ("1e16", "10000000000000000"),
            ("1.5e-7", "0.00000015"),
            ("-1.5E+2", "-150"),
            ("-0", "0"),
            ("-0.0", "0.0"),
            ("0e5", "0"),
            ("0.5e3", "500"),
            ("100.0", "100.0"),
            ("-12.25", "-12.25"),
            ("18446744073709551615", "18446744073709551615"),
        ] {
            assert_eq!(numeric_len(num), pg.len(), "{num}");
        }
        assert!(payload_size(&json!({"k": "nul\u{0}"})).is_err());
        assert!(payload_size(&json!({"nul\u{0}": 1})).is_err());
    }

    #[test]
    fn new_task_validation() {
        let ok = NewTask::new("k", &serde_json::json!({"a": 1})).unwrap();
        assert!(ok.validate().is_ok());
        let big = NewTask::new("k", &"x".repeat(MAX_PAYLOAD_BYTES + 1)).unwrap();
        let err = big.validate().unwrap_err();
        assert!(err.to_string().contains("payload"), "{err}");
        assert!(ok.clone().max_attempts(0).validate().is_err());
        assert!(ok.clone().queue("").validate().is_err());
        assert!(
            ok.clone()
                .delay(Duration::from_secs(1))
                .run_at(Utc::now())
                .validate()
                .is_err()
        );
        assert!(ok.clone().depends_on([TaskId(0)]).validate().is_err());
        assert!("bogus".parse::<TaskState>().is_err());
        assert_eq!(
            "running".parse::<TaskState>().ok(),
            Some(TaskState::Running)
        );
    }
}
