//! A task's priority and state.

use std::str::FromStr;

use crate::error::{Error, Result};

pub use crate::vocab::{Priority, TaskState};

impl FromStr for Priority {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let name = s.trim().to_ascii_lowercase();
        Priority::from_name(&name).ok_or_else(|| {
            Error::invalid(
                "priority",
                format!("`{name}` is not one of critical, high, normal, low, batch"),
            )
        })
    }
}

impl TaskState {
    /// Whether the state is final (completed, discarded, cancelled).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TaskState::Completed | TaskState::Discarded | TaskState::Cancelled
        )
    }
}

impl FromStr for TaskState {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        TaskState::from_name(&t).ok_or_else(|| {
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
