//! A task's priority and state.

use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

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
}
