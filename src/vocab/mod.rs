//! The shared vocabulary: the closed sets of names that travel between modules and into the
//! database (a task's state, a run's state, a task's priority, a tenant's budget status, the
//! ledger event types pgcrew writes).
//!
//! Each enum is declared once with [`vocab!`](crate::vocab!): its variants and their stored
//! names, from which come `ALL`, `as_str`, `from_name`, `Display` and comparisons with `&str`.
//! `FromStr` (with each type's own error text) stays next to the type's module; the
//! PostgreSQL side (`ToSql` / `FromSql`) is in `vocab/sql.rs`. This module imports nothing above
//! `error`.

mod sql;

/// Declare a vocabulary enum: `vocab! { /// doc #[attrs] pub enum Name { /// doc Variant = "name", .. } }`.
/// Generates the enum, `ALL` (declaration order), `as_str`, `from_name` (exact match),
/// `Display` (the name), `PartialEq<str>` / `PartialEq<&str>` and `From<_> for String`.
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
            pub const fn as_str(&self) -> &'static str {
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

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.as_str().to_string()
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
        /// Parked at a durable wait (a signal, an approval, a sleep): holds no worker, lease or
        /// connection; a signal or the wait's deadline resumes it (back to running).
        Waiting = "waiting",
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

vocab! {
    /// The ledger event types pgcrew itself writes (`pgcrew.run_events.event_type`); callers
    /// may append events of their own types too.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
    #[serde(rename_all = "snake_case")]
    pub enum EventType {
        /// The run was created (always seq 1).
        RunCreated = "run_created",
        /// pending → running.
        RunStarted = "run_started",
        /// running → completed (finishes the run).
        RunCompleted = "run_completed",
        /// → failed (finishes the run).
        RunFailed = "run_failed",
        /// → cancelled (finishes the run).
        RunCancelled = "run_cancelled",
        /// The run was forked from another run's ledger.
        RunForked = "run_forked",
        /// A model call was reserved and is about to be made.
        ModelRequested = "model_requested",
        /// A model call answered (its usage settled).
        ModelCompleted = "model_completed",
        /// A model call failed (its reservation released).
        ModelFailed = "model_failed",
        /// A model's structured output did not parse into the expected shape.
        OutputInvalid = "output_invalid",
        /// A reservation was refused by the tenant's or the run's budget.
        BudgetExceeded = "budget_exceeded",
        /// A settled cost was above its reservation.
        BudgetOverrun = "budget_overrun",
        /// The tenant's degradation policy changed a model step before it ran (switched its
        /// model, capped its `max_tokens` or skipped it): status, rules applied, requested and
        /// used model and cap, reason. Recorded with the step's `model_requested` (or alone for
        /// a skipped step); a replay or resume of the step re-uses it.
        BudgetDegraded = "budget_degraded",
        /// Replay found a different request and the policy refused it.
        ReplayRejected = "replay_rejected",
        /// Replay found a different request and the policy allowed it.
        ReplayedWithDrift = "replayed_with_drift",
        /// A tool call is about to be invoked.
        ToolRequested = "tool_requested",
        /// A tool call returned.
        ToolCompleted = "tool_completed",
        /// A tool call failed.
        ToolFailed = "tool_failed",
        /// A tool call's outcome is not known (the process died during the call).
        ToolOutcomeUnknown = "tool_outcome_unknown",
        /// A tool call was refused before invocation (unknown tool, bad arguments).
        ToolRejected = "tool_rejected",
        /// A tool call was refused for a missing capability.
        CapabilityDenied = "capability_denied",
        /// An agent loaded a skill (its tools and instructions joined the run's context).
        SkillLoaded = "skill_loaded",
        /// A workflow step recorded its output.
        WorkflowStepCompleted = "workflow_step_completed",
        /// A workflow step failed.
        WorkflowStepFailed = "workflow_step_failed",
        /// A workflow finished and recorded its output.
        WorkflowCompleted = "workflow_completed",
        /// A sub-agent run was started for a tool step (payload: the child's run id).
        ChildRunStarted = "child_run_started",
        /// A sub-agent run finished (payload: the child's run id, state and result).
        ChildRunCompleted = "child_run_completed",
        /// A sub-agent call was refused before a child started (a cycle or the depth limit).
        ChildRunRefused = "child_run_refused",
        /// A harness unit started (or resumed from its progress).
        HarnessUnitStarted = "harness_unit_started",
        /// A harness unit recorded its output.
        HarnessUnitCompleted = "harness_unit_completed",
        /// A harness unit failed.
        HarnessUnitFailed = "harness_unit_failed",
        /// A harness unit left an unclean state behind.
        HarnessUnitUnclean = "harness_unit_unclean",
        /// A step began a durable wait for a signal (the run is parked: `waiting`).
        WaitStarted = "wait_started",
        /// A waiting step consumed its signal (payload: name, signal id, the signal's payload).
        SignalReceived = "signal_received",
        /// A waiting step's deadline passed without its signal.
        WaitTimedOut = "wait_timed_out",
        /// waiting → running: a worker resumed the run.
        RunResumed = "run_resumed",
        /// A tool call that requires approval was approved or rejected (who, why), or its
        /// approval timed out.
        ApprovalDecided = "approval_decided",
    }
}

impl EventType {
    /// True for the events a terminal transition records (a finished run's last event).
    pub fn finishes_run(&self) -> bool {
        matches!(
            self,
            EventType::RunCompleted | EventType::RunFailed | EventType::RunCancelled
        )
    }
}

vocab! {
    /// The kinds of [`Error::Model`](crate::Error::Model): each has a stable name (its `kind`,
    /// recorded in the ledger as `model_failed.kind`), also available as the
    /// [`error_kind`](crate::model::error_kind) constants.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum ModelErrorKind {
        /// The provider rate-limited the call (HTTP 429); retried with backoff.
        RateLimited = "rate_limited",
        /// The account has no quota left (HTTP 429 `insufficient_quota`); not retried.
        QuotaExceeded = "quota_exceeded",
        /// The provider failed (HTTP 5xx); retried with backoff.
        Server = "server",
        /// The call did not finish within the per-request timeout; retried with backoff.
        Timeout = "timeout",
        /// The provider could not be reached or the connection broke; retried with backoff.
        Connection = "connection",
        /// The provider rejected the credentials (HTTP 401/403).
        Auth = "auth",
        /// The provider (or pgcrew, before sending) rejected the request as malformed.
        InvalidRequest = "invalid_request",
        /// The provider answered with something that is not a chat completion.
        InvalidResponse = "invalid_response",
        /// The model's output is unusable: invalid JSON, JSON not matching the expected type, or
        /// tool-call arguments that are not JSON.
        InvalidOutput = "invalid_output",
        /// A scripted model ran out of scripted replies.
        ScriptExhausted = "script_exhausted",
        /// A streamed answer broke off before it finished (the connection was cut or the
        /// stream ended without a finish reason); retried with backoff. Nothing is charged.
        StreamCut = "stream_cut",
    }
}

impl ModelErrorKind {
    /// True for the kinds that are transient and worth retrying.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Self::RateLimited | Self::Server | Self::Timeout | Self::Connection | Self::StreamCut
        )
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
        for e in EventType::ALL {
            assert_eq!(EventType::from_name(e.as_str()), Some(e));
            assert_eq!(serde_json::to_value(e).ok(), Some(e.as_str().into()));
        }
        for p in Priority::ALL {
            assert_eq!(serde_json::to_value(p).ok(), Some(p.as_str().into()));
        }
        assert!(RunState::Running == "running");
        assert_eq!(RunState::from_name("runnin"), None);
    }

    #[test]
    fn model_error_kinds_keep_their_names() {
        let names: Vec<&str> = ModelErrorKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "rate_limited",
                "quota_exceeded",
                "server",
                "timeout",
                "connection",
                "auth",
                "invalid_request",
                "invalid_response",
                "invalid_output",
                "script_exhausted",
                "stream_cut"
            ]
        );
        assert_eq!(ModelErrorKind::RateLimited.to_string(), "rate_limited");
        assert!(ModelErrorKind::Timeout == "timeout");
        let retryable: Vec<ModelErrorKind> = ModelErrorKind::ALL
            .into_iter()
            .filter(|k| k.is_retryable())
            .collect();
        assert_eq!(
            retryable,
            [
                ModelErrorKind::RateLimited,
                ModelErrorKind::Server,
                ModelErrorKind::Timeout,
                ModelErrorKind::Connection,
                ModelErrorKind::StreamCut
            ]
        );
    }
}
