//! The shared vocabulary: the closed sets of names that travel between modules and into the
//! database (a task's state, a run's state, a task's priority, a tenant's budget status).
//!
//! Each enum is declared once with [`vocab!`](crate::vocab!): its variants and their stored
//! names, from which come `ALL`, `as_str`, `from_name`, `Display` and comparisons with `&str`.
//! `FromStr` (with each type's own error text) stays next to the type's module. This module
//! imports nothing above `error`.

/// Declare a vocabulary enum: `vocab! { /// doc #[attrs] pub enum Name { /// doc Variant = "name", .. } }`.
/// Generates the enum, `ALL` (declaration order), `as_str`, `from_name` (exact match),
/// `Display` (the name) and `PartialEq<str>` / `PartialEq<&str>`.
#[macro_export]
#[doc(hidden)]
macro_rules! vocab {
    ($(#[$meta:meta])* pub enum $name:ident {
        $($(#[$vmeta:meta])* $variant:ident = $text:literal,)+
    }) => {
        $(#[$meta])*
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: [$name; [$($text),+].len()] = [$($name::$variant),+];

            /// The name as stored and sent.
            pub fn as_str(&self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }

            /// The value named exactly `name`, if any.
            pub fn from_name(name: &str) -> Option<Self> {
                match name {
                    $($text => Some($name::$variant),)+
                    _ => None,
                }
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.as_str() == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }
    };
}

use serde::{Deserialize, Serialize};

vocab! {
    /// Task priority: claimed in this order within a tenant (stored as 0..=4).
    #[derive(
        Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
    )]
    #[serde(rename_all = "snake_case")]
    pub enum Priority {
        /// 0: before everything else.
        Critical = "critical",
        /// 1.
        High = "high",
        /// 2: the default.
        #[default]
        Normal = "normal",
        /// 3.
        Low = "low",
        /// 4: bulk/background work.
        Batch = "batch",
    }
}

vocab! {
    /// A task's state.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
    #[serde(rename_all = "snake_case")]
    pub enum TaskState {
        /// Delayed, snoozed, or waiting for its dependencies.
        Scheduled = "scheduled",
        /// Ready to be claimed.
        Available = "available",
        /// Claimed by a worker.
        Running = "running",
        /// Finished successfully (final).
        Completed = "completed",
        /// Failed; will become available again after its backoff.
        Retryable = "retryable",
        /// Failed for good (out of attempts, or discarded by its handler) (final).
        Discarded = "discarded",
        /// Cancelled (final).
        Cancelled = "cancelled",
    }
}

vocab! {
    /// A run's state.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
    #[serde(rename_all = "lowercase")]
    pub enum RunState {
        /// Created, not started.
        Pending = "pending",
        /// Being worked on.
        Running = "running",
        /// Finished successfully (terminal).
        Completed = "completed",
        /// Finished with an error (terminal).
        Failed = "failed",
        /// Cancelled (terminal).
        Cancelled = "cancelled",
    }
}

vocab! {
    /// A tenant's budget status, ordered from best to worst.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
    #[serde(rename_all = "SCREAMING_SNAKE_CASE")]
    pub enum BudgetStatus {
        /// Spent below the warning threshold (or no limit).
        Healthy = "HEALTHY",
        /// Spent at or above the warning threshold (default 80 %).
        Warning = "WARNING",
        /// Spent at or above the critical threshold (default 90 %).
        Critical = "CRITICAL",
        /// Spent at or above the limit.
        Exceeded = "EXCEEDED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_match_serde() {
        for s in TaskState::ALL {
            assert_eq!(TaskState::from_name(s.as_str()), Some(s));
            assert_eq!(serde_json::to_value(s).ok(), Some(s.as_str().into()));
        }
        for s in RunState::ALL {
            assert_eq!(RunState::from_name(s.as_str()), Some(s));
            assert_eq!(serde_json::to_value(s).ok(), Some(s.as_str().into()));
        }
        for s in BudgetStatus::ALL {
            assert_eq!(BudgetStatus::from_name(s.as_str()), Some(s));
            assert_eq!(serde_json::to_value(s).ok(), Some(s.as_str().into()));
        }
        for p in Priority::ALL {
            assert_eq!(serde_json::to_value(p).ok(), Some(p.as_str().into()));
        }
        assert!(RunState::Running == "running");
        assert_eq!(RunState::from_name("runnin"), None);
    }
}
