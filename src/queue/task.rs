//! [`NewTask`]: a task to enqueue, and its validation.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{
    DEFAULT_QUEUE, DEFAULT_TENANT, MAX_PAYLOAD_BYTES, MAX_TASK_DELAY, MAX_UNIQUE_KEY_LEN, Priority,
    payload_size,
};
use crate::error::{Error, Result};
use crate::ids::{RunId, TaskId, TenantId, validate_text_id};

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

    setters! {
        /// Set the queue.
        queue(queue: impl Into<String>) => queue = queue.into();
        /// Set the tenant.
        tenant(tenant: TenantId) => tenant = tenant;
        /// Attach to a run.
        run(run: RunId) => run_id = Some(run);
        /// Set the priority.
        priority(priority: Priority) => priority = priority;
        /// Run no earlier than `at`.
        run_at(at: DateTime<Utc>) => run_at = Some(at);
        /// Run no earlier than `now() + delay` (database time).
        delay(delay: Duration) => delay = Some(delay);
        /// Set the maximum number of attempts (≥ 1).
        max_attempts(n: i32) => max_attempts = n;
        /// Deduplicate on `key` among this tenant's non-final tasks in the queue.
        unique_key(key: impl Into<String>) => unique_key = Some(key.into());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::TaskState;

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
