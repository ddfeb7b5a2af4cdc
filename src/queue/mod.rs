//! The durable task queue.
//!
//! Tasks live in `pgcrew.tasks`. They are enqueued singly ([`enqueue`]), in bulk
//! ([`enqueue_many`], thousands per statement) or inside the caller's own transaction (both take
//! any [`Executor`](crate::db::Executor): a tokio-postgres `Client` or `Transaction`, or a pooled
//! connection `&conn` or pooled transaction `&tx`, which cache the prepared statement per
//! connection; [`Client::enqueue`](crate::Client::enqueue) takes a pooled connection for you),
//! claimed with `FOR UPDATE SKIP LOCKED` by
//! the `pgcrew.claim_tasks` function —
//! fairly across tenants and within every tenant's concurrency limit — and acknowledged in
//! batches with a claim token ([`ack`]). The [`WorkerPool`] service runs handlers registered by
//! kind inside a [`Client`](crate::Client); the leader's maintenance rescues tasks of dead
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
use std::sync::Arc;
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
pub use maintenance::{RescueTasks, TaskRetention};
pub use retry::RetryPolicy;
pub use worker::{
    HandlerError, TaskContext, TaskOutcome, WorkerMetrics, WorkerMetricsSnapshot, WorkerPool,
    WorkerPoolBuilder,
};

use crate::coord::maintenance::MaintenanceStep;
use crate::error::{Error, Result};
use crate::ids::{RunId, TaskId, TenantId, validate_text_id};

/// Largest accepted task payload (serialised JSON), in bytes.
pub const MAX_PAYLOAD_BYTES: usize = 256 * 1024;

/// Longest accepted unique key, in bytes.
pub const MAX_UNIQUE_KEY_LEN: usize = 512;

/// The queue tasks go to unless another is named.
pub const DEFAULT_QUEUE: &str = "default";

/// The tenant that owns work naming no tenant.
pub const DEFAULT_TENANT: &str = "default";

/// Maintenance steps this module contributes to the leader's maintenance pass: rescue of tasks
/// of dead instances or with stale heartbeats, then retention of finished tasks.
pub fn maintenance_steps() -> Vec<Arc<dyn MaintenanceStep>> {
    vec![Arc::new(RescueTasks), Arc::new(TaskRetention)]
}

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
        let size = self.payload.to_string().len();
        if size > MAX_PAYLOAD_BYTES {
            return Err(Error::invalid(
                "payload",
                format!(
                    "is {size} bytes of JSON; at most {MAX_PAYLOAD_BYTES} are allowed: store large data elsewhere (e.g. an artifact) and pass a reference"
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
