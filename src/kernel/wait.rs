//! Durable waits: a step that waits for a named signal, or sleeps, without holding a worker slot,
//! a run lease or a connection.
//!
//! [`Kernel::wait_step`] resolves a wait step of a run (`pgcrew.wait_step` in SQL, one
//! transaction under the run's ledger lock and the caller's lease):
//!
//! * a signal named for the wait was sent (now or before the run reached the step: signals are
//!   kept): it is consumed and recorded as `signal_received`, and the step returns
//!   [`WaitOutcome::Signal`] with its payload;
//! * the wait's deadline (database time) passed: `wait_timed_out` is recorded and the step
//!   returns [`WaitOutcome::TimedOut`];
//! * otherwise the wait begins (`wait_started`, once): the run goes to `waiting`, its lease is
//!   released and its running task (the task whose `run_id` is the run) is parked until the
//!   deadline with its attempt given back. The step returns [`Error::Waiting`]: the caller stops
//!   working on the run (a task handler returns, the agent runtime does this by itself) and the
//!   task's own acknowledgement changes nothing. A signal makes the parked task available at
//!   once, so any instance working its queue claims it, resumes the run (`waiting → running`,
//!   `run_resumed`) and replays it: recorded steps return their results, and the wait step now
//!   returns the signal.
//!
//! Replaying a resolved wait returns its recorded outcome (the same statement reads it from the
//! ledger). Send signals with
//! [`crate::runs::signal_run`], `pgcrew.signal_run(run, name, payload)` or `pgcrew run signal`.
//! In a workflow, use [`WorkflowCtx::wait_for_signal`](super::WorkflowCtx::wait_for_signal) and
//! [`WorkflowCtx::sleep`](super::WorkflowCtx::sleep).

use std::time::Duration;

use serde_json::Value;
use tracing::instrument;

use super::{Kernel, RunScope, validate_step_key};
use crate::db::Executor;
use crate::error::{Error, Result};
use crate::runs::map_db_error;

/// How a wait step resolved.
#[derive(Debug, Clone, PartialEq)]
pub enum WaitOutcome {
    /// The signal arrived, with its payload (`null` when it had none).
    Signal(Value),
    /// The deadline passed without the signal.
    TimedOut,
}

/// What a wait does when its deadline passes without the signal (the timeout is recorded as
/// `wait_timed_out` either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnTimeout {
    /// Return the timeout to the step (`None` from
    /// [`wait_for_signal`](super::WorkflowCtx::wait_for_signal)).
    #[default]
    Return,
    /// Fail the run (error type `wait_timed_out`) and return [`Error::WaitTimedOut`].
    FailRun,
}

/// The longest wait: 3650 days (the queue's longest delay).
pub const MAX_WAIT: Duration = Duration::from_secs(3650 * 24 * 3600);

impl Kernel {
    /// Resolve the wait step `step_key` of `scope.run` for signal `name` with a deadline
    /// `timeout` after the wait begins (see the [module docs](self)); `details` are recorded in
    /// `wait_started`. [`Error::Waiting`] means the run is now parked.
    #[instrument(skip(self, details), fields(run = %scope.run), err)]
    pub async fn wait_step(
        &self,
        scope: &RunScope,
        step_key: &str,
        name: &str,
        timeout: Duration,
        details: Value,
    ) -> Result<WaitOutcome> {
        validate_step_key(step_key)?;
        if timeout > MAX_WAIT {
            return Err(Error::invalid(
                "wait timeout",
                format!("{timeout:?} is longer than the longest wait, 3650 days"),
            ));
        }
        // A replay of a resolved step: pgcrew.wait_step returns the recorded outcome (V024).
        let micros = crate::config::interval_micros(timeout);
        let row = self
            .db()
            .query_one(
                sql!("kernel/wait_step"),
                typed![
                    &scope.run,
                    &scope.lease_token,
                    &name,
                    &step_key,
                    &micros,
                    &details
                ],
            )
            .await
            .map_err(|e| map_wait_error(e, scope))?;
        let outcome: String = row.try_get(0)?;
        match outcome.as_str() {
            "signal" => Ok(WaitOutcome::Signal(
                row.try_get::<_, Option<Value>>(1)?.unwrap_or(Value::Null),
            )),
            "timeout" => Ok(WaitOutcome::TimedOut),
            _ => {
                let left: i64 = row.try_get(3)?;
                Err(Error::Waiting {
                    run: scope.run.to_string(),
                    name: name.to_string(),
                    resume_in: Duration::from_micros(u64::try_from(left).unwrap_or(0)),
                })
            }
        }
    }

    /// [`wait_step`](Self::wait_step) under a timeout policy: `Ok(None)` on a timeout under
    /// [`OnTimeout::Return`]; under [`OnTimeout::FailRun`] the run is failed (error type
    /// `wait_timed_out`) and the result is [`Error::WaitTimedOut`].
    pub async fn wait_for(
        &self,
        scope: &RunScope,
        step_key: &str,
        name: &str,
        timeout: Duration,
        on_timeout: OnTimeout,
    ) -> Result<Option<Value>> {
        match self
            .wait_step(
                scope,
                step_key,
                name,
                timeout,
                Value::Object(Default::default()),
            )
            .await?
        {
            WaitOutcome::Signal(v) => Ok(Some(v)),
            WaitOutcome::TimedOut if on_timeout == OnTimeout::Return => Ok(None),
            WaitOutcome::TimedOut => {
                let e = Error::WaitTimedOut {
                    run: scope.run.to_string(),
                    name: name.to_string(),
                };
                crate::runs::fail_run(
                    self.db(),
                    scope.run,
                    "wait_timed_out",
                    &e.to_string(),
                    scope.lease_token,
                )
                .await?;
                Err(e)
            }
        }
    }
}

fn map_wait_error(e: Error, scope: &RunScope) -> Error {
    let e = match e.into_driver() {
        Ok(d) => d,
        Err(other) => return other,
    };
    if let Some(db) = e.as_db_error()
        && matches!(db.code().code(), "22023" | "22004" | "55000")
    {
        return Error::invalid("wait", db.message().to_string());
    }
    map_db_error(Error::from(e), scope.run)
}
