//! Sessions, runs and the run state machine.
//!
//! `pending → running → completed | failed | cancelled` (and `pending → failed | cancelled`);
//! terminal states are final. Every transition happens in one transaction that locks the run,
//! checks the transition (an illegal one is [`Error::IllegalTransition`], never a silent update),
//! optionally checks the caller's lease token, updates the row (the database trigger notifies
//! `pgcrew_run_state_changed`) and appends the matching ledger event (`run_started`,
//! `run_completed`, `run_failed`, `run_cancelled`; creation appends `run_created`).
//! A terminal transition also signs the run's final ledger head with the ledger key (when the
//! [`Db`] or the caller has one), in the same transaction: see [`crate::runs::ledger`].
//!
//! Starting a run enforces the tenant's `max_concurrent_runs` exactly: admission is serialised
//! per tenant with an advisory transaction lock around count + transition.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;
use tracing::instrument;

use super::ledger::{NewEvent, append_events_in, sign_head_in};
use super::map_db_error;
use crate::db::Db;
use crate::db::Executor;
use crate::error::{Error, Result};
use crate::ids::{InstanceId, RunId, SessionId, TenantId};
use crate::ledger_key::LedgerKey;

/// A run's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// Created, not started.
    Pending,
    /// Being worked on.
    Running,
    /// Finished successfully (terminal).
    Completed,
    /// Finished with an error (terminal).
    Failed,
    /// Cancelled (terminal).
    Cancelled,
}

impl RunState {
    /// The state's name as stored.
    pub fn as_str(&self) -> &'static str {
        match self {
            RunState::Pending => "pending",
            RunState::Running => "running",
            RunState::Completed => "completed",
            RunState::Failed => "failed",
            RunState::Cancelled => "cancelled",
        }
    }

    /// True for completed, failed and cancelled.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            RunState::Completed | RunState::Failed | RunState::Cancelled
        )
    }

    /// Whether the state machine allows `self → to`.
    pub fn can_transition_to(&self, to: RunState) -> bool {
        matches!(
            (self, to),
            (
                RunState::Pending,
                RunState::Running | RunState::Failed | RunState::Cancelled
            ) | (
                RunState::Running,
                RunState::Completed | RunState::Failed | RunState::Cancelled
            )
        )
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RunState {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.trim() {
            "pending" => RunState::Pending,
            "running" => RunState::Running,
            "completed" => RunState::Completed,
            "failed" => RunState::Failed,
            "cancelled" => RunState::Cancelled,
            other => {
                return Err(Error::invalid(
                    "run state",
                    format!(
                        "`{other}` is not one of pending, running, completed, failed, cancelled"
                    ),
                ));
            }
        })
    }
}

/// A session: a tenant's conversation or job grouping runs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Session {
    /// Id.
    pub id: SessionId,
    /// Tenant.
    pub tenant_id: String,
    /// The caller's identifier, unique per tenant.
    pub identifier: String,
    /// Metadata given at creation.
    pub metadata: serde_json::Value,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

/// A run row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Run {
    /// Id.
    pub id: RunId,
    /// Tenant.
    pub tenant_id: String,
    /// Session, if any.
    pub session_id: Option<SessionId>,
    /// Agent name.
    pub agent_name: Option<String>,
    /// State.
    pub state: RunState,
    /// Prompt.
    pub prompt: Option<String>,
    /// Final response.
    pub response_text: Option<String>,
    /// Why it stopped.
    pub stop_reason: Option<String>,
    /// Input tokens used.
    pub input_tokens: i64,
    /// Output tokens used.
    pub output_tokens: i64,
    /// Cost in USD.
    pub cost_usd: f64,
    /// Error message when failed.
    pub error_message: Option<String>,
    /// Error type when failed.
    pub error_type: Option<String>,
    /// The instance that ran it.
    pub instance_id: Option<String>,
    /// Current lease holder.
    pub lease_owner: Option<String>,
    /// Lease fencing token (increments with every new holder).
    pub lease_token: i64,
    /// Lease expiry (database time).
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// Parent run when forked.
    pub parent_run_id: Option<RunId>,
    /// Seq of the parent at which it was forked.
    pub forked_at_seq: Option<i64>,
    /// Metadata.
    pub metadata: serde_json::Value,
    /// When cancellation was requested.
    pub cancel_requested_at: Option<DateTime<Utc>>,
    /// Why it was cancelled.
    pub cancel_reason: Option<String>,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Started.
    pub started_at: Option<DateTime<Utc>>,
    /// Finished.
    pub finalized_at: Option<DateTime<Utc>>,
    /// Whether a lease is held and unexpired right now (database time).
    pub lease_valid: bool,
}

impl Run {
    fn from_row(r: &tokio_postgres::Row) -> Result<Run> {
        let state: String = r.get("state");
        Ok(Run {
            id: r.get("id"),
            tenant_id: r.get("tenant_id"),
            session_id: r.get("session_id"),
            agent_name: r.get("agent_name"),
            state: state.parse()?,
            prompt: r.get("prompt"),
            response_text: r.get("response_text"),
            stop_reason: r.get("stop_reason"),
            input_tokens: r.get("input_tokens"),
            output_tokens: r.get("output_tokens"),
            cost_usd: r.get("cost_usd"),
            error_message: r.get("error_message"),
            error_type: r.get("error_type"),
            instance_id: r.get("instance_id"),
            lease_owner: r.get("lease_owner"),
            lease_token: r.get("lease_token"),
            lease_expires_at: r.get("lease_expires_at"),
            parent_run_id: r.get("parent_run_id"),
            forked_at_seq: r.get("forked_at_seq"),
            metadata: r.get("metadata"),
            cancel_requested_at: r.get("cancel_requested_at"),
            cancel_reason: r.get("cancel_reason"),
            created_at: r.get("created_at"),
            started_at: r.get("started_at"),
            finalized_at: r.get("finalized_at"),
            lease_valid: r.get("lease_valid"),
        })
    }
}

/// A run to create.
#[derive(Debug, Clone)]
pub struct NewRun {
    /// Tenant (must exist).
    pub tenant_id: TenantId,
    /// Session (must belong to the tenant).
    pub session_id: Option<SessionId>,
    /// Agent name.
    pub agent_name: Option<String>,
    /// Prompt.
    pub prompt: Option<String>,
    /// Metadata.
    pub metadata: serde_json::Value,
    /// Parent run when forked.
    pub parent_run_id: Option<RunId>,
    /// Parent seq at the fork.
    pub forked_at_seq: Option<i64>,
}

impl NewRun {
    /// A run for `tenant` with nothing else set.
    pub fn new(tenant_id: TenantId) -> Self {
        NewRun {
            tenant_id,
            session_id: None,
            agent_name: None,
            prompt: None,
            metadata: json!({}),
            parent_run_id: None,
            forked_at_seq: None,
        }
    }

    /// Set the session.
    pub fn session(mut self, session: SessionId) -> Self {
        self.session_id = Some(session);
        self
    }

    /// Set the agent name.
    pub fn agent(mut self, agent: impl Into<String>) -> Self {
        self.agent_name = Some(agent.into());
        self
    }

    /// Set the prompt.
    pub fn prompt(mut self, prompt: impl Into<String>) -> Self {
        self.prompt = Some(prompt.into());
        self
    }
}

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

/// Filter for [`list_runs`].
#[derive(Debug, Clone)]
pub struct RunFilter {
    /// Only this tenant.
    pub tenant: Option<TenantId>,
    /// Only this state.
    pub state: Option<RunState>,
    /// At most this many (1..=10000).
    pub limit: i64,
}

impl Default for RunFilter {
    fn default() -> Self {
        RunFilter {
            tenant: None,
            state: None,
            limit: 100,
        }
    }
}

/// Create (or fetch, when `(tenant, identifier)` exists) a session.
#[instrument(skip(db, metadata), err)]
pub async fn new_session(
    db: &Db,
    tenant: &TenantId,
    identifier: &str,
    metadata: serde_json::Value,
) -> Result<Session> {
    crate::ids::validate_text_id("session identifier", identifier)?;
    let conn = db.get().await?;
    ensure_tenant(&**conn, tenant).await?;
    let row = conn
        .query_typed_row(
            sql!("runs/upsert_session"),
            typed![&SessionId::new(), tenant, &identifier, &metadata],
        )
        .await?;
    Ok(session_from_row(&row))
}

fn session_from_row(row: &tokio_postgres::Row) -> Session {
    Session {
        id: row.get(0),
        tenant_id: row.get(1),
        identifier: row.get(2),
        metadata: row.get(3),
        created_at: row.get(4),
    }
}

/// Fetch a session.
#[instrument(skip(db), err)]
pub async fn get_session(db: &Db, id: SessionId) -> Result<Session> {
    let conn = db.get().await?;
    let row = conn
        .query_typed_opt_row(sql!("runs/get_session"), typed![&id])
        .await?
        .ok_or_else(|| Error::not_found("session", id))?;
    Ok(session_from_row(&row))
}

async fn ensure_tenant<C: Executor + ?Sized>(client: &C, tenant: &TenantId) -> Result<()> {
    let exists: bool = client
        .query_typed_row(sql!("runs/tenant_exists"), typed![tenant])
        .await?
        .get(0);
    if exists {
        Ok(())
    } else {
        Err(Error::not_found("tenant", tenant))
    }
}

/// Create a `pending` run and record `run_created` (seq 1) in the same transaction.
#[instrument(skip(db, new), fields(tenant = %new.tenant_id), err)]
pub async fn create_run(db: &Db, new: NewRun) -> Result<RunId> {
    let mut conn = db.get().await?;
    let tx = conn.transaction().await?;
    let id = create_run_in(&tx, new).await?;
    tx.commit().await?;
    Ok(id)
}

/// [`create_run`] inside the caller's transaction, so a run can be created atomically with
/// other writes (for example enqueueing the task that will execute it). Nothing is written when
/// the tenant, session or parent run is unknown or belongs to another tenant.
#[instrument(skip(tx, new), fields(tenant = %new.tenant_id), err)]
pub async fn create_run_in(tx: &tokio_postgres::Transaction<'_>, new: NewRun) -> Result<RunId> {
    if let Some(a) = &new.agent_name {
        crate::ids::validate_text_id("agent name", a)?;
    }
    if let Some(p) = &new.prompt {
        super::limits::check("run prompt", p.len(), super::limits::MAX_PROMPT_BYTES)?;
    }
    super::limits::check(
        "run metadata",
        super::limits::json_len(&new.metadata),
        super::limits::MAX_RUN_METADATA_BYTES,
    )?;
    if new.forked_at_seq.is_some_and(|s| s < 0) {
        return Err(Error::invalid("forked_at_seq", "must not be negative"));
    }
    ensure_tenant(tx, &new.tenant_id).await?;
    if let Some(s) = new.session_id {
        let row = tx
            .query_typed_opt_row(sql!("runs/get_session"), typed![&s])
            .await?
            .ok_or_else(|| Error::not_found("session", s))?;
        if session_from_row(&row).tenant_id != new.tenant_id.as_str() {
            return Err(Error::not_found("session", s));
        }
    }
    if let Some(p) = new.parent_run_id {
        let row = tx
            .query_typed_opt_row(sql!("runs/get_run"), typed![&p])
            .await?
            .ok_or_else(|| Error::not_found("run", p))?;
        if Run::from_row(&row)?.tenant_id != new.tenant_id.as_str() {
            return Err(Error::not_found("run", p));
        }
    }
    let id = RunId::new();
    tx.execute_typed_count(
        sql!("runs/insert_run"),
        typed![
            &id,
            &new.tenant_id,
            &new.session_id,
            &new.agent_name,
            &new.prompt,
            &new.metadata,
            &new.parent_run_id,
            &new.forked_at_seq,
        ],
    )
    .await?;
    let ev = NewEvent::new(
        "run_created",
        json!({
            "state": "pending",
            "agent_name": new.agent_name,
            "session_id": new.session_id,
            "parent_run_id": new.parent_run_id,
            "forked_at_seq": new.forked_at_seq,
        }),
    );
    append_events_in(tx, id, &[ev], None).await?;
    Ok(id)
}

/// Fetch a run.
#[instrument(skip(db), err)]
pub async fn get_run(db: &Db, run: RunId) -> Result<Run> {
    let conn = db.get().await?;
    let row = conn
        .query_typed_opt_row(sql!("runs/get_run"), typed![&run])
        .await?
        .ok_or_else(|| Error::not_found("run", run))?;
    Run::from_row(&row)
}

/// List runs, newest first.
#[instrument(skip(db), err)]
pub async fn list_runs(db: &Db, filter: &RunFilter) -> Result<Vec<Run>> {
    if !(1..=10_000).contains(&filter.limit) {
        return Err(Error::invalid("limit", "must be between 1 and 10000"));
    }
    let conn = db.get().await?;
    let state = filter.state.map(|s| s.as_str());
    let tenant = filter.tenant.as_ref().map(|t| t.as_str());
    let rows = conn
        .query_typed_rows(
            sql!("runs/list_runs"),
            typed![&tenant, &state, &filter.limit],
        )
        .await?;
    rows.iter().map(Run::from_row).collect()
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

async fn transition_in(
    tx: &tokio_postgres::Transaction<'_>,
    run: RunId,
    to: RunState,
    change: Change,
    key: Option<&LedgerKey>,
) -> Result<Applied> {
    if to == RunState::Running {
        // Admission: serialise per tenant (tenant lock before run lock, always).
        let row = tx
            .query_typed_opt_row(sql!("runs/get_run"), typed![&run])
            .await?
            .ok_or_else(|| Error::not_found("run", run))?;
        let tenant: String = row.get("tenant_id");
        tx.execute_typed_count(sql!("runs/lock_tenant"), typed![&tenant])
            .await?;
    }
    tx.execute_typed_count(sql!("runs/lock_run"), typed![&run])
        .await?;
    let row = tx
        .query_typed_opt_row(sql!("runs/get_run_for_update"), typed![&run])
        .await?
        .ok_or_else(|| Error::not_found("run", run))?;
    let current = Run::from_row(&row)?;
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
    if to == RunState::Running {
        let row = tx
            .query_typed_row(sql!("runs/count_running"), typed![&current.tenant_id])
            .await?;
        let running: i64 = row.get(0);
        let limit: Option<i32> = row.get(1);
        if let Some(limit) = limit
            && running >= i64::from(limit)
        {
            return match change.limit.unwrap_or_default() {
                LimitPolicy::StayPending => Ok(Applied::Limited {
                    running,
                    limit: i64::from(limit),
                }),
                LimitPolicy::Reject => Err(Error::LimitReached {
                    tenant: current.tenant_id.clone(),
                    message: format!(
                        "max_concurrent_runs is {limit} and {running} runs are running; run {run} stays pending"
                    ),
                }),
            };
        }
    }
    let mut details = change.details;
    if let Some(obj) = details.as_object_mut() {
        obj.insert("from".into(), json!(current.state.as_str()));
        obj.insert("to".into(), json!(to.as_str()));
    }
    let event_type = match to {
        RunState::Running => "run_started".to_string(),
        other => format!("run_{}", other.as_str()),
    };
    let ev = NewEvent::new(event_type, details);
    // Record first (the lease check needs the lease the terminal update clears, and appends to a
    // finished run are refused).
    let appended = append_events_in(tx, run, &[ev], change.lease_token).await?;
    tx.execute_typed_count(
        sql!("runs/update_state"),
        typed![
            &run,
            &to.as_str(),
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
    .map_err(|e| map_db_error(e, run))?;
    // Sign the final head in the same transaction: a finished run's ledger is closed, and its
    // last event is covered by a checkpoint.
    if to.is_terminal()
        && let (Some(key), Some(last)) = (key, appended.last())
    {
        sign_head_in(tx, key, run, last.seq, &last.hash, true).await?;
    }
    let row = tx
        .query_typed_row(sql!("runs/get_run"), typed![&run])
        .await
        .map_err(|e| map_db_error(e, run))?;
    Ok(Applied::Done(Box::new(Run::from_row(&row)?)))
}

async fn transition(db: &Db, run: RunId, to: RunState, change: Change) -> Result<Applied> {
    let mut conn = db.get().await?;
    let tx = conn.transaction().await?;
    let applied = transition_in(&tx, run, to, change, db.ledger_key()).await?;
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
#[instrument(skip(db), err)]
pub async fn start_run(
    db: &Db,
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
    match transition(db, run, RunState::Running, change).await? {
        Applied::Done(r) => Ok(StartOutcome::Started(r)),
        Applied::Limited { running, limit } => Ok(StartOutcome::LimitReached { running, limit }),
    }
}

fn done(a: Applied) -> Result<Run> {
    match a {
        Applied::Done(r) => Ok(*r),
        Applied::Limited { .. } => Err(Error::Migration(
            "unexpected admission result for a terminal transition".into(),
        )),
    }
}

/// Complete a running run, adding the outcome's usage to its totals.
#[instrument(skip(db, outcome), err)]
pub async fn complete_run(
    db: &Db,
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
    done(transition(db, run, RunState::Completed, change).await?)
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

/// Fail a pending or running run.
#[instrument(skip(db, error_message), err)]
pub async fn fail_run(
    db: &Db,
    run: RunId,
    error_type: &str,
    error_message: &str,
    lease_token: Option<i64>,
) -> Result<Run> {
    let change = failure(error_type, error_message, lease_token)?;
    done(transition(db, run, RunState::Failed, change).await?)
}

/// Fail a run and record `run_failed` inside the caller's transaction (used by maintenance for
/// stuck runs). No lease check: the caller (the fenced leader) overrides any holder. With `key`,
/// the run's final ledger head is signed in that transaction; without one it stays unsigned (and
/// a keyed verification reports the run).
#[instrument(skip(tx, error_message, key), err)]
pub async fn fail_run_in(
    tx: &tokio_postgres::Transaction<'_>,
    run: RunId,
    error_type: &str,
    error_message: &str,
    key: Option<&LedgerKey>,
) -> Result<Run> {
    let change = failure(error_type, error_message, None)?;
    done(transition_in(tx, run, RunState::Failed, change, key).await?)
}

/// Fail runs that have been `running` for longer than `timeout` (at most `limit` of them) with
/// error type `timeout` / `run timed out`, each recording `run_failed` in the ledger, inside the
/// caller's transaction (the leader's fenced maintenance transaction), signing each final head
/// with `key` (see [`fail_run_in`]). Returns the runs failed. A run that finished meanwhile is
/// skipped.
#[instrument(skip(tx, key), err)]
pub async fn fail_stuck_runs_in(
    tx: &tokio_postgres::Transaction<'_>,
    timeout: std::time::Duration,
    limit: i64,
    key: Option<&LedgerKey>,
) -> Result<Vec<RunId>> {
    if limit < 1 {
        return Err(Error::invalid("limit", "must be at least 1"));
    }
    let micros = crate::config::interval_micros(timeout);
    let rows = tx
        .query_typed_rows(sql!("runs/stuck_running"), typed![&micros, &limit])
        .await?;
    let mut failed = Vec::new();
    for r in rows {
        let run: RunId = r.get(0);
        match fail_run_in(tx, run, "timeout", "run timed out", key).await {
            Ok(_) => failed.push(run),
            Err(Error::IllegalTransition { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(failed)
}

/// Cancel a pending or running run from anywhere (any instance, the CLI). The state change is
/// notified, so the instance working on the run sees it at once (see
/// [`RunWatcher`](super::RunWatcher)); `run_cancelled` is recorded with the reason.
#[instrument(skip(db), err)]
pub async fn cancel_run(db: &Db, run: RunId, reason: &str) -> Result<Run> {
    if reason.trim().is_empty() {
        return Err(Error::invalid("reason", "say why the run is cancelled"));
    }
    let change = Change {
        cancel_reason: Some(reason.to_string()),
        stop_reason: Some("cancelled".into()),
        details: json!({ "reason": reason }),
        ..Change::default()
    };
    done(transition(db, run, RunState::Cancelled, change).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_machine_allows_only_documented_transitions() {
        use RunState::*;
        let all = [Pending, Running, Completed, Failed, Cancelled];
        let allowed = [
            (Pending, Running),
            (Pending, Failed),
            (Pending, Cancelled),
            (Running, Completed),
            (Running, Failed),
            (Running, Cancelled),
        ];
        for from in all {
            for to in all {
                assert_eq!(
                    from.can_transition_to(to),
                    allowed.contains(&(from, to)),
                    "{from} -> {to}"
                );
            }
            assert_eq!(from.as_str().parse::<RunState>().ok(), Some(from));
        }
        assert!("done".parse::<RunState>().is_err());
        assert!(Completed.is_terminal() && !Running.is_terminal());
    }
}
