//! Runs: their state, their rows, creating and reading them. Sessions are in `session`, the
//! state machine's transitions in `transition` (both re-exported here).
//!
//! `pending → running → completed | failed | cancelled` (and `pending → failed | cancelled`);
//! a running run may park at a durable wait, `running → waiting`, and a signal or the wait's
//! deadline resumes it, `waiting → running` (a waiting run can also be failed or cancelled; see
//! [`crate::kernel::wait`]); terminal states are final. Every transition happens in one transaction that locks the run,
//! checks the transition (an illegal one is [`Error::IllegalTransition`], never a silent update),
//! optionally checks the caller's lease token, updates the row (the database trigger notifies
//! `pgcrew_run_state_changed`) and appends the matching ledger event (`run_started`,
//! `run_completed`, `run_failed`, `run_cancelled`; creation appends `run_created`).
//! A terminal transition also signs the run's final ledger head with the ledger key (when the
//! [`Db`] or the caller has one), in the same transaction: see [`crate::runs::ledger`].
//!
//! Starting a run enforces the tenant's `max_concurrent_runs` exactly: admission is serialised
//! per tenant with an advisory transaction lock around count + transition.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;
use tracing::instrument;

use super::ledger::{NewEvent, append_rows};
use super::session::{ensure_tenant, session_from_row};
use crate::db::Db;
use crate::db::{Acquire, Atomic, Executor};
use crate::error::{Error, Result};
use crate::ids::{RunId, SessionId, TenantId};

pub use super::session::{Session, get_session, new_session};
pub use super::transition::{
    LimitPolicy, RunOutcome, StartOutcome, cancel_run, complete_run, fail_run, fail_stuck_runs,
    resume_run, start_run,
};

use crate::vocab::EventType;
pub use crate::vocab::RunState;

impl RunState {
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
                RunState::Waiting | RunState::Completed | RunState::Failed | RunState::Cancelled
            ) | (
                RunState::Waiting,
                RunState::Running | RunState::Failed | RunState::Cancelled
            )
        )
    }
}

impl FromStr for RunState {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let name = s.trim();
        RunState::from_name(name).ok_or_else(|| {
            Error::invalid(
                "run state",
                format!(
                    "`{name}` is not one of pending, running, waiting, completed, failed, cancelled"
                ),
            )
        })
    }
}

/// A run row.
#[derive(Debug, Clone, PartialEq, Serialize, postgres_from_row::FromRow)]
pub struct Run {
    /// Id.
    pub id: RunId,
    /// Tenant.
    pub tenant_id: TenantId,
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

/// Create a `pending` run and record `run_created` (seq 1) atomically: given the pool, in a
/// transaction of its own; given a transaction, inside it (see [`crate::db::Acquire`]), so a run
/// can be created atomically with other writes (for example enqueueing the task that will
/// execute it). Nothing is written when the tenant, session or parent run is unknown or belongs
/// to another tenant.
#[instrument(skip(on, new), fields(tenant = %new.tenant_id), err)]
pub async fn create_run<E: Acquire + ?Sized>(on: &E, new: NewRun) -> Result<RunId> {
    let mut conn = on.acquire().await?;
    let tx = conn.begin().await?;
    let id = create_run_steps(&tx, new).await?;
    tx.commit().await?;
    Ok(id)
}

/// [`create_run`]'s statements, on the unit.
async fn create_run_steps(tx: &Atomic<'_>, new: NewRun) -> Result<RunId> {
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
            .query_opt(sql!("runs/get_session"), typed![&s])
            .await?
            .ok_or_else(|| Error::not_found("session", s))?;
        if session_from_row(&row).tenant_id != new.tenant_id {
            return Err(Error::not_found("session", s));
        }
    }
    if let Some(p) = new.parent_run_id {
        let row = tx
            .query_opt(sql!("runs/get_run"), typed![&p])
            .await?
            .ok_or_else(|| Error::not_found("run", p))?;
        if crate::db::row_as::<Run>(&row)?.tenant_id != new.tenant_id {
            return Err(Error::not_found("run", p));
        }
    }
    let id = RunId::new();
    tx.execute(
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
        EventType::RunCreated.as_str(),
        json!({
            "state": "pending",
            "agent_name": new.agent_name,
            "session_id": new.session_id,
            "parent_run_id": new.parent_run_id,
            "forked_at_seq": new.forked_at_seq,
        }),
    );
    append_rows(tx, id, &[ev], None, super::limits::MAX_EVENT_PAYLOAD_BYTES).await?;
    Ok(id)
}

/// Fetch a run.
#[instrument(skip(db), err)]
pub async fn get_run(db: &Db, run: RunId) -> Result<Run> {
    let row = db
        .query_opt(sql!("runs/get_run"), typed![&run])
        .await?
        .ok_or_else(|| Error::not_found("run", run))?;
    crate::db::row_as(&row)
}

/// List runs, newest first.
#[instrument(skip(db), err)]
pub async fn list_runs(db: &Db, filter: &RunFilter) -> Result<Vec<Run>> {
    if !(1..=10_000).contains(&filter.limit) {
        return Err(Error::invalid("limit", "must be between 1 and 10000"));
    }
    let rows = db
        .query(
            sql!("runs/list_runs"),
            typed![&filter.tenant, &filter.state, &filter.limit],
        )
        .await?;
    crate::db::rows_as(&rows)
}

/// [`Error::NotFound`] unless the run exists.
pub(crate) async fn ensure_run<C: Executor + ?Sized>(client: &C, run: RunId) -> Result<()> {
    let exists: bool = client
        .query_one(sql!("runs/run_exists"), typed![&run])
        .await?
        .get(0);
    if exists {
        Ok(())
    } else {
        Err(Error::not_found("run", run))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_machine_allows_only_documented_transitions() {
        use RunState::*;
        let all = [Pending, Running, Waiting, Completed, Failed, Cancelled];
        let allowed = [
            (Pending, Running),
            (Pending, Failed),
            (Pending, Cancelled),
            (Running, Waiting),
            (Running, Completed),
            (Running, Failed),
            (Running, Cancelled),
            (Waiting, Running),
            (Waiting, Failed),
            (Waiting, Cancelled),
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
        assert!(Completed.is_terminal() && !Running.is_terminal() && !Waiting.is_terminal());
    }
}
