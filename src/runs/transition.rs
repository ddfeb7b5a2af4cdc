//! The run state machine's transitions: start (with the tenant's concurrent-runs limit),
//! complete, fail, cancel, and maintenance's stuck-run failure. Each is one atomic unit that
//! locks the run, checks the transition, updates the row and appends the matching ledger event;
//! a terminal transition also signs the run's final ledger head.
//!
//! Every transition takes `&impl Acquire` ([`crate::db::Acquire`]): given the pool (`&db`) it
//! runs in a transaction of its own; given a transaction it joins it (on an error the caller
//! rolls back). The final head is signed with the ledger key of the handle the call goes
//! through: `&db`, or `&db.join(&tx)` inside your own transaction ([`Db::join`]); a bare
//! transaction carries no key, and the run's head then stays unsigned.

use serde_json::json;
use tracing::instrument;

use super::ledger::{NewEvent, append_rows, sign_head};
use super::limits::MAX_EVENT_PAYLOAD_BYTES;
use super::map_db_error;
use super::state::{Run, RunState};
use crate::db::{Acquire, Atomic, Db, Executor, Handle, handle_of};
use crate::error::{Error, Result};
use crate::ids::{InstanceId, RunId, TenantId};
use crate::ledger_key::LedgerKey;
use crate::vocab::EventType;

/// What to do when starting a run would exceed the tenant's `max_concurrent_runs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LimitPolicy {
    /// Leave the run `pending` and report [`StartOutcome::LimitReached`].
    #[default]
    StayPending,
    /// Fail the call with [`Error::LimitReached`].
    Reject,
}

/// The result of [`start_run`].
#[derive(Debug, Clone, PartialEq)]
pub enum StartOutcome {
    /// The run is now `running`.
    Started(Box<Run>),
    /// The tenant is at its limit; the run stays `pending`.
    LimitReached {
        /// Runs of the tenant running now.
        running: i64,
        /// The tenant's limit.
        limit: i64,
    },
}

/// Usage and result recorded when a run completes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunOutcome {
    /// Final response text.
    pub response_text: Option<String>,
    /// Why it stopped (`end_turn`, `max_steps`, ...).
    pub stop_reason: Option<String>,
    /// Input tokens to add to the run's total.
    pub input_tokens: i64,
    /// Output tokens to add.
    pub output_tokens: i64,
    /// Cost in USD to add.
    pub cost_usd: f64,
}

#[derive(Debug, Default)]
struct Change {
    instance: Option<String>,
    response_text: Option<String>,
    stop_reason: Option<String>,
    input_tokens: i64,
    output_tokens: i64,
    cost_usd: f64,
    error_type: Option<String>,
    error_message: Option<String>,
    cancel_reason: Option<String>,
    lease_token: Option<i64>,
    limit: Option<LimitPolicy>,
    details: serde_json::Value,
}

enum Applied {
    Done(Box<Run>),
    Limited { running: i64, limit: i64 },
}

async fn transition_steps(
    tx: &Atomic<'_>,
    run: RunId,
    to: RunState,
    change: Change,
    key: Option<&LedgerKey>,
) -> Result<Applied> {
    if to.is_terminal() {
        return finish_steps(tx, run, to, change, key).await;
    }
    if to == RunState::Running {
        // Admission: serialise per tenant (tenant lock before run lock, always).
        let row = tx
            .query_opt(sql!("runs/get_run"), typed![&run])
            .await?
            .ok_or_else(|| Error::not_found("run", run))?;
        // Only starting a pending run is admitted; resuming a waiting one is not (it is counted
        // while it waits), so resumes of one tenant's runs do not queue on its lock.
        let state: RunState = row.get("state");
        if state == RunState::Pending {
            let tenant: TenantId = row.get("tenant_id");
            tx.execute(sql!("runs/lock_tenant"), typed![&tenant])
                .await?;
        }
    }
    // The run's lock, then its row for update, in one statement (V024).
    let row = tx
        .query_opt(sql!("runs/locked_run"), typed![&run])
        .await?
        .ok_or_else(|| Error::not_found("run", run))?;
    let current = crate::db::row_as::<Run>(&row)?;
    if to == RunState::Waiting {
        return Err(Error::invalid(
            "run state",
            "a run waits through a wait step (pgcrew.wait_step), not a plain transition",
        ));
    }
    if !current.state.can_transition_to(to) {
        return Err(Error::IllegalTransition {
            entity: "run",
            id: run.to_string(),
            from: current.state.to_string(),
            to: to.to_string(),
        });
    }
    if let Some(token) = change.lease_token
        && (current.lease_token != token || !current.lease_valid)
    {
        return Err(Error::LeaseLost(format!(
            "run {run}: lease token {token} is no longer held (current token {}, owner {})",
            current.lease_token,
            current.lease_owner.as_deref().unwrap_or("none")
        )));
    }
    // Admission for starting runs only: a waiting run keeps its place (it is counted).
    if to == RunState::Running && current.state == RunState::Pending {
        // The runs in flight are counted only under a limit (V053 does the same).
        let limit: Option<i32> = tx
            .query_one(sql!("runs/run_limit"), typed![&current.tenant_id, &run])
            .await?
            .try_get(0)?;
        if let Some(limit) = limit {
            let running: i64 = tx
                .query_one(sql!("runs/count_running"), typed![&current.tenant_id])
                .await?
                .try_get(0)?;
            if running >= i64::from(limit) {
                return match change.limit.unwrap_or_default() {
                    LimitPolicy::StayPending => Ok(Applied::Limited {
                        running,
                        limit: i64::from(limit),
                    }),
                    LimitPolicy::Reject => Err(Error::LimitReached {
                        tenant: current.tenant_id.to_string(),
                        message: format!(
                            "max_concurrent_runs is {limit} and {running} runs are running; run {run} stays pending"
                        ),
                    }),
                };
            }
        }
    }
    let mut details = change.details;
    if let Some(obj) = details.as_object_mut() {
        obj.insert("from".into(), json!(current.state.as_str()));
        obj.insert("to".into(), json!(to.as_str()));
    }
    let event_type = match to {
        RunState::Running if current.state == RunState::Waiting => EventType::RunResumed,
        RunState::Running => EventType::RunStarted,
        other => {
            return Err(Error::Internal(format!(
                "run {run}: no plain transition leads to {other}"
            )));
        }
    };
    let ev = NewEvent::new(event_type.as_str(), details);
    // Record first, then move the run.
    append_rows(tx, run, &[ev], change.lease_token, MAX_EVENT_PAYLOAD_BYTES).await?;
    let row = tx
        .query_one(
            sql!("runs/update_state"),
            typed![&run, &to.as_str(), &change.instance],
        )
        .await
        .map_err(|e| map_db_error(e, run))?;
    let updated = crate::db::row_as::<Run>(&row)?;
    Ok(Applied::Done(Box::new(updated)))
}

/// A terminal transition in one statement (`pgcrew.finish_run`, V025: the lock, the checks, the
/// event and the run row's update with its new ledger head), then the head signed and, for a
/// cancellation or failure, the heads of the sub-agent runs the database cancelled with it.
async fn finish_steps<E: Executor + ?Sized>(
    tx: &E,
    run: RunId,
    to: RunState,
    change: Change,
    key: Option<&LedgerKey>,
) -> Result<Applied> {
    // The event's payload as the database will write it (details plus {from, to}), checked here
    // against the same cap as every append.
    // (64 bytes cover `"from": "...", "to": "..."` with the longest state names.)
    super::limits::check(
        "event payload",
        super::limits::json_len(&change.details) + 64,
        MAX_EVENT_PAYLOAD_BYTES,
    )?;
    let row = tx
        .query_opt(
            sql!("runs/finish_run"),
            typed![
                &run,
                &to.as_str(),
                &change.lease_token,
                &change.details,
                &change.instance,
                &change.response_text,
                &change.stop_reason,
                &change.input_tokens,
                &change.output_tokens,
                &change.cost_usd,
                &change.error_type,
                &change.error_message,
                &change.cancel_reason,
            ],
        )
        .await
        .map_err(|e| finish_error(e, run, to))?
        .ok_or_else(|| Error::not_found("run", run))?;
    let updated = crate::db::row_as::<Run>(&row)?;
    if let Some(key) = key {
        let seq: i64 = row.try_get("ledger_head_seq")?;
        let hash: Vec<u8> = row.try_get("ledger_head_hash")?;
        sign_head(tx, key, run, seq, &hash, true).await?;
        // Sub-agent runs the database cancelled with this one (V021) close with it.
        if matches!(to, RunState::Cancelled | RunState::Failed) {
            for r in tx.query(sql!("runs/cascaded_heads"), typed![&run]).await? {
                let hash: Vec<u8> = r.try_get(2)?;
                sign_head(tx, key, r.try_get(0)?, r.try_get(1)?, &hash, true).await?;
            }
        }
    }
    Ok(Applied::Done(Box::new(updated)))
}

/// `pgcrew.finish_run`'s refusal of an illegal transition (PC006, DETAIL = the run's state) as
/// [`Error::IllegalTransition`]; every other error as the ledger's and leases' errors.
/// Complete `run` with `response_text` and `stop_reason` and its own model calls' tokens and
/// cost (summed from its `model_completed` events, copies in a fork excluded), in one statement
/// (plus the head's signature, in the same transaction, when the handle has a ledger key): the
/// agent runtime's final transition.
#[instrument(name = "complete_run", skip(db, response_text), err)]
pub(crate) async fn complete_with_model_totals(
    db: &Db,
    run: RunId,
    response_text: Option<&str>,
    stop_reason: Option<&str>,
    lease_token: Option<i64>,
) -> Result<Run> {
    let query = sql!("runs/complete_with_model_totals");
    let to = RunState::Completed;
    let Some(key) = db.ledger_key() else {
        let row = db
            .query_opt(
                query,
                typed![&run, &lease_token, &response_text, &stop_reason],
            )
            .await
            .map_err(|e| finish_error(e, run, to))?
            .ok_or_else(|| Error::not_found("run", run))?;
        return crate::db::row_as::<Run>(&row);
    };
    let mut conn = db.acquire().await?;
    let tx = conn.begin().await?;
    let row = tx
        .query_opt(
            query,
            typed![&run, &lease_token, &response_text, &stop_reason],
        )
        .await
        .map_err(|e| finish_error(e, run, to))?
        .ok_or_else(|| Error::not_found("run", run))?;
    let updated = crate::db::row_as::<Run>(&row)?;
    let seq: i64 = row.try_get("ledger_head_seq")?;
    let hash: Vec<u8> = row.try_get("ledger_head_hash")?;
    sign_head(&tx, key, run, seq, &hash, true).await?;
    tx.commit().await?;
    Ok(updated)
}

/// What [`start_fenced_row`] did.
pub(crate) enum Started {
    /// Started (or resumed): the statement's row.
    Row(Box<tokio_postgres::Row>),
    /// The tenant is at its limit; nothing was written.
    Limited {
        /// Runs of the tenant running now.
        running: i64,
        /// The tenant's limit.
        limit: i64,
    },
}

/// Start a pending run or resume a waiting one in one statement (`pgcrew.start_run_fenced`,
/// V040): admission, transition and lease checks, the event and the row update.
async fn start_fenced<E: Executor + ?Sized>(on: &E, run: RunId, change: Change) -> Result<Applied> {
    let limit = change.limit;
    match start_fenced_row(on, sql!("runs/start_run_fenced"), run, change, limit).await? {
        Started::Row(row) => Ok(Applied::Done(Box::new(crate::db::row_as::<Run>(&row)?))),
        Started::Limited { running, limit } => Ok(Applied::Limited { running, limit }),
    }
}

/// Start pending run `run` on `instance` under `lease_token` through `query` (a statement over
/// `pgcrew.start_run_fenced` with its four parameters: the agent runtime's reads the agent's
/// definition with it): the statement's row, or the tenant's limit reached (nothing written).
#[instrument(name = "start_run", skip(db, query), err)]
pub(crate) async fn start_run_row(
    db: &Db,
    query: &str,
    run: RunId,
    instance: Option<&InstanceId>,
    lease_token: Option<i64>,
) -> Result<Started> {
    let change = Change {
        instance: instance.map(|i| i.to_string()),
        lease_token,
        details: json!({ "instance_id": instance.map(|i| i.to_string()) }),
        ..Change::default()
    };
    start_fenced_row(db, query, run, change, Some(LimitPolicy::StayPending)).await
}

async fn start_fenced_row<E: Executor + ?Sized>(
    on: &E,
    query: &str,
    run: RunId,
    change: Change,
    policy: Option<LimitPolicy>,
) -> Result<Started> {
    let row = on
        .query_opt(
            query,
            typed![&run, &change.lease_token, &change.instance, &change.details],
        )
        .await;
    let e = match row {
        Ok(Some(row)) => return Ok(Started::Row(Box::new(row))),
        Ok(None) => return Err(Error::not_found("run", run)),
        Err(e) => e,
    };
    let db = match e.into_driver() {
        Ok(db) => db,
        Err(other) => return Err(map_db_error(other, run)),
    };
    let Some(d) = db.as_db_error() else {
        return Err(map_db_error(Error::Database(db), run));
    };
    match d.code().code() {
        crate::sqlstate::RUN_ADMISSION_LIMIT => {
            let mut detail = d.detail().unwrap_or("").splitn(3, ',');
            let mut number = || {
                detail
                    .next()
                    .and_then(|n| n.parse::<i64>().ok())
                    .unwrap_or(0)
            };
            let (running, limit) = (number(), number());
            let tenant = detail.next().unwrap_or("").to_string();
            match policy.unwrap_or_default() {
                LimitPolicy::StayPending => Ok(Started::Limited { running, limit }),
                LimitPolicy::Reject => Err(Error::LimitReached {
                    tenant,
                    message: format!(
                        "max_concurrent_runs is {limit} and {running} runs are running; run {run} stays pending"
                    ),
                }),
            }
        }
        _ => Err(finish_error(Error::Database(db), run, RunState::Running)),
    }
}

fn finish_error(e: Error, run: RunId, to: RunState) -> Error {
    match e.into_driver() {
        Ok(db) => match db.as_db_error() {
            Some(d) if d.code().code() == crate::sqlstate::ILLEGAL_RUN_TRANSITION => {
                Error::IllegalTransition {
                    entity: "run",
                    id: run.to_string(),
                    from: d.detail().unwrap_or("?").to_string(),
                    to: to.to_string(),
                }
            }
            _ => map_db_error(Error::Database(db), run),
        },
        Err(other) => map_db_error(other, run),
    }
}

/// Apply a transition atomically on `on` (its own transaction given the pool, the caller's
/// given one), signing a terminal transition's final head with `key` or else the key of the
/// handle `on` goes through.
async fn transition<E: Acquire + ?Sized>(
    on: &E,
    run: RunId,
    to: RunState,
    change: Change,
    key: Option<&LedgerKey>,
) -> Result<Applied> {
    let key = key.or_else(|| handle_of(on).db().and_then(Db::ledger_key));
    if to == RunState::Running && matches!(handle_of(on), Handle::Pool(_)) {
        // One statement (V040), autocommitted: nothing to sign, and a refused admission writes
        // nothing. Inside the caller's transaction the steps below run instead, so that a
        // refused admission leaves that transaction usable.
        return start_fenced(on, run, change).await;
    }
    if to.is_terminal() && key.is_none() {
        // Nothing to sign: the one statement is atomic by itself (or joins the caller's
        // transaction), so no transaction is begun for it.
        return finish_steps(on, run, to, change, None).await;
    }
    let mut conn = on.acquire().await?;
    let tx = conn.begin().await?;
    let applied = transition_steps(&tx, run, to, change, key).await?;
    if matches!(applied, Applied::Done(_)) {
        tx.commit().await?;
    }
    Ok(applied)
}

/// Start a pending run (`pending → running`), recording the instance that runs it.
///
/// Enforces the tenant's `max_concurrent_runs` exactly under concurrency; `policy` decides
/// whether a run over the limit stays pending or the call fails. With `lease_token`, the caller
/// must hold the run's lease.
#[instrument(skip(on), err)]
pub async fn start_run<E: Acquire + ?Sized>(
    on: &E,
    run: RunId,
    instance: Option<&InstanceId>,
    lease_token: Option<i64>,
    policy: LimitPolicy,
) -> Result<StartOutcome> {
    let change = Change {
        instance: instance.map(|i| i.to_string()),
        lease_token,
        limit: Some(policy),
        details: json!({ "instance_id": instance.map(|i| i.to_string()) }),
        ..Change::default()
    };
    match transition(on, run, RunState::Running, change, None).await? {
        Applied::Done(r) => Ok(StartOutcome::Started(r)),
        Applied::Limited { running, limit } => Ok(StartOutcome::LimitReached { running, limit }),
    }
}

/// Resume a waiting run (`waiting → running`, recording `run_resumed`), as the worker that
/// picked up its woken task does before replaying it; a run that is already running is returned
/// as it is. No admission check: a waiting run counts towards its tenant's
/// `max_concurrent_runs` while it waits. With `lease_token`, the caller must hold the run's lease.
///
/// One statement (`pgcrew.resume_run`, V024): the lock, the lease check, the event and the state
/// change. A pending run goes through [`start_run`]'s path (admission, `run_started`).
#[instrument(skip(on), err)]
pub async fn resume_run<E: Acquire + ?Sized>(
    on: &E,
    run: RunId,
    instance: Option<&InstanceId>,
    lease_token: Option<i64>,
) -> Result<Run> {
    let instance_text = instance.map(|i| i.to_string());
    let current = resume_if_waiting(on, run, None, instance, lease_token).await?;
    match current.state {
        RunState::Running => Ok(current),
        RunState::Pending => {
            let change = Change {
                instance: instance_text,
                lease_token,
                details: json!({ "instance_id": instance.map(|i| i.to_string()) }),
                ..Change::default()
            };
            done(transition(on, run, RunState::Running, change, None).await?)
        }
        other => Err(Error::IllegalTransition {
            entity: "run",
            id: run.to_string(),
            from: other.to_string(),
            to: RunState::Running.to_string(),
        }),
    }
}

/// Resume `run` when it is waiting (as [`resume_run`]) and return it, in whatever state it is
/// (pending and finished runs unchanged); with `tenant`, a run of another tenant is not found.
pub(crate) async fn resume_if_waiting<E: Executor + ?Sized>(
    on: &E,
    run: RunId,
    tenant: Option<&TenantId>,
    instance: Option<&InstanceId>,
    lease_token: Option<i64>,
) -> Result<Run> {
    let instance = instance.map(|i| i.to_string());
    let tenant = tenant.map(|t| t.to_string());
    let row = on
        .query_opt(
            sql!("runs/resume_run"),
            typed![&run, &lease_token, &instance, &tenant],
        )
        .await
        .map_err(|e| map_db_error(e, run))?
        .ok_or_else(|| Error::not_found("run", run))?;
    crate::db::row_as::<Run>(&row)
}

fn done(a: Applied) -> Result<Run> {
    match a {
        Applied::Done(r) => Ok(*r),
        Applied::Limited { .. } => Err(Error::Internal(
            "unexpected admission result for a terminal transition".into(),
        )),
    }
}

/// Complete a running run, adding the outcome's usage to its totals.
#[instrument(skip(on, outcome), err)]
pub async fn complete_run<E: Acquire + ?Sized>(
    on: &E,
    run: RunId,
    outcome: RunOutcome,
    lease_token: Option<i64>,
) -> Result<Run> {
    if outcome.input_tokens < 0 || outcome.output_tokens < 0 {
        return Err(Error::invalid("tokens", "must not be negative"));
    }
    if !outcome.cost_usd.is_finite() || outcome.cost_usd < 0.0 {
        return Err(Error::invalid(
            "cost_usd",
            "must be a finite, non-negative number",
        ));
    }
    let details = json!({
        "stop_reason": outcome.stop_reason,
        "input_tokens": outcome.input_tokens,
        "output_tokens": outcome.output_tokens,
        "cost_usd": outcome.cost_usd,
    });
    let change = Change {
        response_text: outcome.response_text,
        stop_reason: outcome.stop_reason,
        input_tokens: outcome.input_tokens,
        output_tokens: outcome.output_tokens,
        cost_usd: outcome.cost_usd,
        lease_token,
        details,
        ..Change::default()
    };
    done(transition(on, run, RunState::Completed, change, None).await?)
}

fn failure(error_type: &str, error_message: &str, lease_token: Option<i64>) -> Result<Change> {
    crate::ids::validate_text_id("error type", error_type)?;
    if error_message.is_empty() {
        return Err(Error::invalid("error message", "must not be empty"));
    }
    Ok(Change {
        error_type: Some(error_type.to_string()),
        error_message: Some(error_message.to_string()),
        stop_reason: Some(
            if error_type == "timeout" {
                "timeout"
            } else {
                "error"
            }
            .into(),
        ),
        lease_token,
        details: json!({ "error_type": error_type, "error_message": error_message }),
        ..Change::default()
    })
}

/// Fail a pending or running run. With `lease_token`, the caller must hold the run's lease;
/// without one there is no lease check (maintenance overrides any holder).
#[instrument(skip(on, error_message), err)]
pub async fn fail_run<E: Acquire + ?Sized>(
    on: &E,
    run: RunId,
    error_type: &str,
    error_message: &str,
    lease_token: Option<i64>,
) -> Result<Run> {
    let change = failure(error_type, error_message, lease_token)?;
    done(transition(on, run, RunState::Failed, change, None).await?)
}

/// Fail runs that have been `running` for longer than `timeout` (at most `limit` of them) with
/// error type `timeout` / `run timed out`, each recording `run_failed` in the ledger (no lease
/// check: the caller, the fenced leader, overrides any holder), atomically on `on` — maintenance
/// passes its fenced transaction. Each final head is signed with `key`, or else the key of the
/// handle `on` goes through; without either it stays unsigned (and a keyed verification reports
/// the run). Returns the runs failed. A run that finished meanwhile is skipped.
#[instrument(skip(on, key), err)]
pub async fn fail_stuck_runs<E: Acquire + ?Sized>(
    on: &E,
    timeout: std::time::Duration,
    limit: i64,
    key: Option<&LedgerKey>,
) -> Result<Vec<RunId>> {
    if limit < 1 {
        return Err(Error::invalid("limit", "must be at least 1"));
    }
    let mut conn = on.acquire().await?;
    let tx = conn.begin().await?;
    let micros = crate::config::interval_micros(timeout);
    let rows = tx
        .query(sql!("runs/stuck_running"), typed![&micros, &limit])
        .await?;
    let mut failed = Vec::new();
    for r in rows {
        let run: RunId = r.get(0);
        let change = failure("timeout", "run timed out", None)?;
        match transition(&tx, run, RunState::Failed, change, key).await {
            Ok(_) => failed.push(run),
            Err(Error::IllegalTransition { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    tx.commit().await?;
    Ok(failed)
}

/// Cancel a pending or running run from anywhere (any instance, the CLI). The state change is
/// notified, so the instance working on the run sees it at once (see
/// [`RunWatcher`](super::RunWatcher)); `run_cancelled` is recorded with the reason.
#[instrument(skip(on), err)]
pub async fn cancel_run<E: Acquire + ?Sized>(on: &E, run: RunId, reason: &str) -> Result<Run> {
    if reason.trim().is_empty() {
        return Err(Error::invalid("reason", "say why the run is cancelled"));
    }
    let change = Change {
        cancel_reason: Some(reason.to_string()),
        stop_reason: Some("cancelled".into()),
        details: json!({ "reason": reason }),
        ..Change::default()
    };
    done(transition(on, run, RunState::Cancelled, change, None).await?)
}
