//! Submitting agent runs and waiting for them: [`submit_run`] (the SQL function
//! `pgcrew.submit_run`, so every language submits the same way) and [`wait_for_run`] (woken by
//! `pgcrew_run_state_changed`, re-reading the run on every wake-up). [`Client::submit`] and
//! [`Client::wait_for_run`] are the same on the client's pool and notifier.

use std::time::Duration;

use serde_json::{Value, json};
use tracing::instrument;

use super::Client;
use crate::coord::notify::{Event, EventKind, Notifier};
use crate::db::{Db, Executor};
use crate::error::{Error, Result};
use crate::ids::{RunId, TenantId};
use crate::runs::{self, Run};
use crate::sqlstate;

/// Submit a run of `agent` for `tenant` on `on` (a pool, a connection or your transaction: the
/// run is then committed with it) through `pgcrew.submit_run`: the run, its `run_created`
/// ledger event and the agent-run task on the agent's queue, so any instance hosting the agent
/// runs it. `session` is an identifier (the session is created when missing; `None`: no
/// session); `input` is a JSON object with at least `{"prompt": "..."}` (its other keys become
/// the run's metadata).
///
/// Errors: [`Error::NotFound`] with kind `agent` (not registered) or `tenant`;
/// [`Error::InvalidInput`] for a bad identifier, input or empty prompt; [`Error::TooLarge`] for
/// a prompt over 1 MiB; a tenant role submitting for another tenant gets SQLSTATE 42501.
#[instrument(skip(on, input), err)]
pub async fn submit_run<E: Executor + ?Sized>(
    on: &E,
    agent: &str,
    tenant: &TenantId,
    session: Option<&str>,
    input: &Value,
) -> Result<RunId> {
    // While tracing: the run and its task store this span's trace context (V027).
    let row = crate::telemetry::trace::query_one_traced(
        on,
        sql!("agent/submit_run"),
        typed![&agent, &tenant.as_str(), &session, input],
    )
    .await
    .map_err(|e| submit_error(e, agent, tenant))?;
    Ok(RunId(row.try_get(0)?))
}

/// The typed error of a refused submit (the SQLSTATEs of `pgcrew.submit_run`, V019).
fn submit_error(e: Error, agent: &str, tenant: &TenantId) -> Error {
    let pg = match e.into_driver() {
        Ok(pg) => pg,
        Err(other) => return other,
    };
    let Some(db) = pg.as_db_error() else {
        return Error::Database(pg);
    };
    match db.code().code() {
        sqlstate::UNKNOWN_AGENT => Error::not_found("agent", agent),
        sqlstate::UNKNOWN_TENANT => Error::not_found("tenant", tenant),
        sqlstate::INVALID_PARAMETER_VALUE | sqlstate::NULL_VALUE_NOT_ALLOWED => {
            Error::invalid("submit", db.message())
        }
        _ => Error::Database(pg),
    }
}

/// Wait until `run` is finished (completed, failed or cancelled) and return it. Woken by the
/// run's `pgcrew_run_state_changed` notifications through `notifier` (start a client or spawn a
/// listener for prompt wake-ups); the run is re-read from the table at the start, on every
/// wake-up and `Resync`, and every `poll_interval` (so a lost notification only delays it).
///
/// Errors: [`Error::NotFound`] (kind `run`) for an unknown run, [`Error::Timeout`] when it is
/// not finished within `timeout`.
#[instrument(skip(db, notifier), err)]
pub async fn wait_for_run(
    db: &Db,
    notifier: &Notifier,
    run: RunId,
    timeout: Duration,
    poll_interval: Duration,
) -> Result<Run> {
    // Subscribed before the first read, so no change between the read and the wait is missed.
    let mut sub = notifier.subscribe(&[EventKind::RunStateChanged]);
    let poll = poll_interval.max(Duration::from_millis(10));
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let current = runs::get_run(db, run).await?;
        if current.state.is_terminal() {
            return Ok(current);
        }
        // Wait for this run's change, a resync, the poll or the deadline.
        loop {
            let woke = tokio::select! {
                ev = sub.recv() => match ev {
                    Some(Event::RunStateChanged { run_id }) => run_id == run,
                    Some(_) => true,
                    None => {
                        tokio::time::sleep(poll).await;
                        true
                    }
                },
                _ = tokio::time::sleep(poll) => true,
                _ = tokio::time::sleep_until(deadline) => return Err(Error::Timeout(timeout)),
            };
            if woke {
                break;
            }
        }
    }
}

impl Client {
    /// Submit a run of `agent` for `tenant` in the session `session` (an identifier, created
    /// when missing) with `prompt`, through `pgcrew.submit_run` on a pooled connection. Any
    /// instance hosting the agent runs it. See [`submit_run`] for the errors; to submit inside
    /// your own transaction, call [`submit_run`] with it.
    pub async fn submit(
        &self,
        agent: &str,
        tenant: &TenantId,
        session: &str,
        prompt: &str,
    ) -> Result<RunId> {
        submit_run(
            self.db(),
            agent,
            tenant,
            Some(session),
            &json!({ "prompt": prompt }),
        )
        .await
    }

    /// Wait until `run` is finished and return it; see [`wait_for_run`]. Wake-ups come through
    /// this client's notifier once `start()` has run; the fallback poll is the client's
    /// `notify_poll_interval` (at most 1 s).
    pub async fn wait_for_run(&self, run: RunId, timeout: Duration) -> Result<Run> {
        let poll = self
            .config()
            .notify_poll_interval
            .min(Duration::from_secs(1));
        wait_for_run(self.db(), self.notifier(), run, timeout, poll).await
    }
}
