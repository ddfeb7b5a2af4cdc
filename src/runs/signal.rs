//! Signals to runs and decisions on tool calls waiting for approval.
//!
//! A run parked at a durable wait ([`crate::kernel::wait`]) waits for a named signal. Any
//! process can send one, from Rust ([`signal_run`]), SQL (`pgcrew.signal_run(run, name,
//! payload)`) or the CLI (`pgcrew run signal RUN NAME --payload JSON`): the signal is stored,
//! and when the run waits for it its parked task becomes available at once, so whichever
//! instance works the task's queue resumes the run. A signal sent before the run reaches its
//! wait is kept until that wait consumes it.
//!
//! A tool call that requires approval waits for the signal `approval/<step key>`; decide it with
//! [`approve_step`] / [`reject_step`] (`pgcrew run approve|reject RUN STEP`), which also say who
//! decided and why. Both are recorded in the run's ledger when the run resumes.
//!
//! Refusals are typed: an unknown run is [`Error::NotFound`], a finished run
//! [`Error::RunFinished`], a run waiting for another signal or a step not waiting for approval
//! [`Error::NotWaiting`], a bad name [`Error::InvalidInput`], an oversized payload
//! [`Error::TooLarge`].

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::instrument;

use super::map_db_error;
use crate::db::Executor;
use crate::error::{Error, Result};
use crate::ids::RunId;
use crate::sqlstate;

/// A decision on a tool call waiting for approval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Run the tool.
    Approved,
    /// Do not run it; the model is told the call was rejected.
    Rejected,
}

fn map(e: tokio_postgres::Error, run: RunId) -> Error {
    let bad_arg = e.as_db_error().is_some_and(|d| {
        matches!(
            d.code().code(),
            "22023" | sqlstate::NOT_NULL_VIOLATION | "22004"
        )
    });
    if bad_arg {
        let message = e
            .as_db_error()
            .map(|d| d.message().to_string())
            .unwrap_or_default();
        return Error::invalid("signal", message);
    }
    map_db_error(Error::from(e), run)
}

/// Send signal `name` (with an optional JSON payload) to `run` on `on` (the pool, a connection or
/// a transaction: the signal and its wake-up commit with it). Returns the signal's id.
#[instrument(skip(on, payload), err)]
pub async fn signal_run<E: Executor + ?Sized>(
    on: &E,
    run: RunId,
    name: &str,
    payload: Option<&Value>,
) -> Result<i64> {
    let row = on
        .query_one(sql!("runs/signal_run"), typed![&run, &name, &payload])
        .await
        .map_err(|e| match e.into_driver() {
            Ok(d) => map(d, run),
            Err(other) => other,
        })?;
    Ok(row.try_get(0)?)
}

/// Decide the tool call of step `step` of `run` (its step key, as in the `wait_started` event),
/// saying who decided (`by`, default: the database user) and why. Returns the signal's id.
#[instrument(skip(on, reason), err)]
pub async fn decide_step<E: Executor + ?Sized>(
    on: &E,
    run: RunId,
    step: &str,
    decision: Decision,
    by: Option<&str>,
    reason: Option<&str>,
) -> Result<i64> {
    let approved = decision == Decision::Approved;
    let row = on
        .query_one(
            sql!("runs/decide_approval"),
            typed![&run, &step, &approved, &by, &reason],
        )
        .await
        .map_err(|e| match e.into_driver() {
            Ok(d) => map(d, run),
            Err(other) => other,
        })?;
    Ok(row.try_get(0)?)
}

/// Approve the tool call of step `step` of `run` (see [`decide_step`]).
pub async fn approve_step<E: Executor + ?Sized>(
    on: &E,
    run: RunId,
    step: &str,
    by: Option<&str>,
    reason: Option<&str>,
) -> Result<i64> {
    decide_step(on, run, step, Decision::Approved, by, reason).await
}

/// Reject the tool call of step `step` of `run` (see [`decide_step`]).
pub async fn reject_step<E: Executor + ?Sized>(
    on: &E,
    run: RunId,
    step: &str,
    by: Option<&str>,
    reason: Option<&str>,
) -> Result<i64> {
    decide_step(on, run, step, Decision::Rejected, by, reason).await
}
