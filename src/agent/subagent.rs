//! Sub-agents: an agent calls another agent as a tool.
//!
//! An [`AgentDef`] lists the agents it may call ([`AgentDef::subagent`]); each is offered to the
//! model as a tool named after the agent, taking `{"prompt": "..."}`. When the model calls one,
//! the parent's tool step (`iter-{n}/tool-{call_id}`) starts a **child run** of its own
//! (`pgcrew.start_child_run`, V021): the same tenant and session, `parent_run_id` with
//! `parent_relation = 'subagent'` (forks have `fork`), keyed by (parent, step key) so a parent
//! replayed on another instance finds the child it already started instead of starting a second
//! one. The child's budget (the sub-agent's `budget_usd`, or the parent's whole remaining run
//! budget) is carved out of the parent's remaining run budget and reserved on the parent, so
//! parent and children together never spend more than the parent's budget; when the child
//! finishes, the carve is released and what the child spent is added to the parent's spend.
//!
//! The child runs on the caller's instance under its own lease and its own ledger; the parent's
//! ledger records `child_run_started` and `child_run_completed` (with the child's id), and the
//! child's answer goes back to the parent's model as the tool's result (a failed or cancelled
//! child as an error). A call that would close a cycle (A calls B calls A, along the parent
//! chain) or pass the depth limit records `child_run_refused` and returns
//! [`Error::SubagentRefused`] to the model; a carve the parent cannot afford records
//! `budget_exceeded` and fails the parent ([`Error::RunBudgetExceeded`]). Cancelling (or
//! failing) a parent cancels its unfinished children and theirs, in the database.

use std::future::Future;
use std::pin::Pin;

use serde::Serialize;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tracing::instrument;

use super::def::{AgentDef, get_agent};
use super::runtime::AgentRuntime;
use crate::db::{Db, Executor};
use crate::error::{Error, Result};
use crate::ids::RunId;
use crate::kernel::{RunScope, StepEvent};
use crate::model::{ToolCall, ToolSpec};
use crate::runs::{NewEvent, Run, RunState, append_events};
use crate::sqlstate;
use crate::vocab::EventType;

/// The default deepest sub-agent nesting: a top-level run is at depth 0, its children at 1.
pub const DEFAULT_MAX_SUBAGENT_DEPTH: u32 = 4;

/// A sub-agent an agent may call: the agent's name (also the tool's name the model sees) and
/// the budget carved out of the caller's remaining run budget for each call.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Subagent {
    /// The called agent's name.
    pub agent: String,
    /// The child run's budget in USD; `None`: the parent's whole remaining run budget (or no
    /// limit when the parent has none).
    pub budget_usd: Option<f64>,
}

impl Subagent {
    /// A sub-agent `agent` with the parent's remaining budget.
    pub fn new(agent: impl Into<String>) -> Self {
        Self {
            agent: agent.into(),
            budget_usd: None,
        }
    }

    /// Give each child run this budget (carved out of the parent's remaining budget).
    pub fn budget_usd(mut self, usd: f64) -> Self {
        self.budget_usd = Some(usd);
        self
    }

    /// Check the name (a tool name: 1 to 64 of `[a-zA-Z0-9_-]`) and the budget.
    pub fn validate(&self) -> Result<()> {
        crate::kernel::validate_tool_name(&self.agent)?;
        if let Some(b) = self.budget_usd {
            crate::tenancy::tenants::validate_budget("sub-agent budget_usd", b)?;
        }
        Ok(())
    }
}

/// A sub-agent run of a parent ([`child_runs`]).
#[derive(Debug, Clone, PartialEq, Serialize, postgres_from_row::FromRow)]
pub struct ChildRun {
    /// The child run.
    pub id: RunId,
    /// The parent's tool step that started it.
    pub parent_step_key: String,
    /// The agent it runs.
    pub agent_name: Option<String>,
    /// Its state.
    pub state: RunState,
    /// Its depth (1 for a child of a top-level run).
    pub depth: i32,
    /// The budget carved out of the parent for it (`None`: unlimited).
    pub budget_usd: Option<f64>,
    /// What it (and its own children) spent.
    pub spent_usd: f64,
    /// Its final answer.
    pub response_text: Option<String>,
    /// Its error type, when it failed.
    pub error_type: Option<String>,
    /// Its error message, when it failed.
    pub error_message: Option<String>,
}

/// The sub-agent runs a run started, oldest first.
#[instrument(skip(db), err)]
pub async fn child_runs(db: &Db, parent: RunId) -> Result<Vec<ChildRun>> {
    let rows = db.query(sql!("agent/child_runs"), typed![&parent]).await?;
    crate::db::rows_as(&rows)
}

/// The input schema of every sub-agent tool.
pub fn input_schema() -> Value {
    json!({
        "type": "object",
        "properties": {"prompt": {"type": "string", "minLength": 1,
                                  "description": "the task for the sub-agent"}},
        "required": ["prompt"],
        "additionalProperties": false
    })
}

/// Store `def`'s sub-agents in its transaction (the agent row must be written first); a list
/// that closes a cycle is [`Error::SubagentRefused`] with reason `cycle`.
pub(crate) async fn store<E: Executor + ?Sized>(tx: &E, def: &AgentDef) -> Result<()> {
    let names: Vec<String> = def.subagents.iter().map(|s| s.agent.clone()).collect();
    let budgets: Vec<Option<f64>> = def.subagents.iter().map(|s| s.budget_usd).collect();
    tx.execute(
        sql!("agent/set_subagents"),
        typed![&def.name, &names, &budgets => tokio_postgres::types::Type::FLOAT8_ARRAY],
    )
    .await
    .map_err(|e| classify(e, &def.name, None))?;
    Ok(())
}

/// The sub-agent named `tool` among `def`'s, if any.
pub(crate) fn find<'a>(def: &'a AgentDef, tool: &str) -> Option<&'a Subagent> {
    def.subagents.iter().find(|s| s.agent == tool)
}

/// The tool specs of `def`'s sub-agents (described by the called agent's description when it
/// is registered).
pub(crate) async fn specs(db: &Db, def: &AgentDef) -> Result<Vec<ToolSpec>> {
    let mut out = Vec::with_capacity(def.subagents.len());
    for s in &def.subagents {
        let description = match get_agent(db, &s.agent).await {
            Ok(d) if !d.description.is_empty() => d.description,
            Ok(_) | Err(Error::NotFound { .. }) => {
                format!("Delegate a task to the `{}` agent.", s.agent)
            }
            Err(e) => return Err(e),
        };
        out.push(ToolSpec::new(&s.agent, description, input_schema()));
    }
    Ok(out)
}

/// Map the sub-agent SQLSTATEs (PC070 cycle, PC071 depth, PC072 budget) to typed errors; the
/// run's own codes go through the runs mapper.
fn classify(e: Error, agent: &str, scope: Option<&RunScope>) -> Error {
    let e = match e.into_driver() {
        Ok(e) => e,
        Err(other) => return other,
    };
    let Some(db) = e.as_db_error() else {
        return Error::from(e);
    };
    let refused = |reason| Error::SubagentRefused {
        agent: agent.to_string(),
        reason,
        message: db.message().to_string(),
    };
    match (db.code().code(), scope) {
        (sqlstate::SUBAGENT_CYCLE, _) => refused("cycle"),
        (sqlstate::SUBAGENT_DEPTH, _) => refused("depth"),
        (sqlstate::SUBAGENT_BUDGET, Some(scope)) => {
            let d: Value = db
                .detail()
                .and_then(|d| serde_json::from_str(d).ok())
                .unwrap_or(Value::Null);
            let num = |k: &str| d.get(k).and_then(Value::as_f64).unwrap_or(0.0);
            Error::RunBudgetExceeded {
                tenant: scope.tenant.to_string(),
                run: scope.run.to_string(),
                limit_usd: num("limit_usd"),
                spent_usd: num("spent_usd"),
                reserved_usd: num("reserved_usd"),
                requested_usd: num("requested_usd"),
            }
        }
        (sqlstate::RUN_FINISHED, Some(scope)) => Error::LeaseLost(format!(
            "run {} finished before its sub-agent `{agent}` could start",
            scope.run
        )),
        (_, Some(scope)) => crate::runs::map_db_error(Error::from(e), scope.run),
        (_, None) => Error::from(e),
    }
}

fn recorded(events: &[StepEvent], t: EventType) -> Option<&StepEvent> {
    events.iter().find(|e| e.event_type == t.as_str())
}

/// What the parent's model gets for a finished child (a `child_run_completed` payload): the
/// child's answer, or [`Error::ToolFailed`] for a child that failed or was cancelled.
fn outcome(agent: &str, p: &Value) -> Result<String> {
    let text = |k: &str| p.get(k).and_then(Value::as_str).unwrap_or_default();
    if text("state") == RunState::Completed.as_str() {
        return Ok(text("response").to_string());
    }
    Err(Error::ToolFailed {
        tool: agent.to_string(),
        message: format!(
            "sub-agent run {} {} ({}): {}",
            text("child_run_id"),
            text("state"),
            text("error_type"),
            text("error_message")
        ),
    })
}

/// A recorded refusal, as the error it was.
fn refusal(agent: &str, p: &Value) -> Error {
    Error::SubagentRefused {
        agent: agent.to_string(),
        reason: match p.get("reason").and_then(Value::as_str) {
            Some("depth") => "depth",
            _ => "cycle",
        },
        message: p
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
    }
}

type RunFuture<'a> = Pin<Box<dyn Future<Output = Result<Run>> + Send + 'a>>;

/// The child's execution, boxed (the agent loop calls itself through it).
fn execute_child(
    rt: &AgentRuntime,
    child: RunId,
    cancel: Option<CancellationToken>,
) -> RunFuture<'_> {
    Box::pin(rt.execute(child, cancel))
}

impl AgentRuntime {
    /// The parent's tool step `step_key` calling sub-agent `sub`: replay a recorded outcome, or
    /// start (or find) the child, drive it to its end here and record `child_run_completed`.
    pub(crate) async fn call_subagent(
        &self,
        scope: &RunScope,
        sub: &Subagent,
        step_key: &str,
        call: &ToolCall,
        cancel: Option<CancellationToken>,
    ) -> Result<String> {
        let kernel = self.kernel();
        let events = kernel.step_events(scope.run, step_key).await?;
        if let Some(done) = recorded(&events, EventType::ChildRunCompleted) {
            return outcome(&sub.agent, &done.payload);
        }
        if let Some(refused) = recorded(&events, EventType::ChildRunRefused) {
            return Err(refusal(&sub.agent, &refused.payload));
        }
        let prompt = match call.arguments.get("prompt").and_then(Value::as_str) {
            Some(p) if !p.trim().is_empty() => p,
            _ => {
                let message = format!(
                    "sub-agent `{}` takes {{\"prompt\": \"...\"}} with a non-empty prompt",
                    sub.agent
                );
                kernel
                    .record(
                        scope,
                        step_key,
                        EventType::ToolRejected,
                        json!({"tool": sub.agent, "reason": "invalid_arguments",
                               "arguments": call.arguments, "message": message}),
                    )
                    .await?;
                return Err(Error::invalid("tool arguments", message));
            }
        };
        let child = self.start_child(scope, sub, step_key, prompt).await?;
        let run = match execute_child(self, child, cancel).await {
            Ok(run) => run,
            // Not the model's concern: this instance cannot run the child (the child waits,
            // as a top-level run would, for an instance that can).
            Err(Error::NotFound { kind: "tool", id }) => {
                return Err(Error::Config(format!(
                    "sub-agent run {child} of `{}` needs tool {id}: a parent runs its sub-agents on its own instance, so the instances that run it need their tools",
                    sub.agent
                )));
            }
            Err(e) => return Err(e),
        };
        if !run.state.is_terminal() {
            return Err(Error::Internal(format!(
                "sub-agent run {child} returned in state {}",
                run.state
            )));
        }
        let payload = json!({"child_run_id": run.id, "agent": sub.agent,
                             "state": run.state.as_str(), "response": run.response_text,
                             "error_type": run.error_type, "error_message": run.error_message,
                             "cost_usd": run.cost_usd});
        let ev = NewEvent::new(EventType::ChildRunCompleted, payload.clone())
            .step(step_key)
            .idempotent();
        append_events(kernel.db(), scope.run, &[ev], scope.lease_token).await?;
        outcome(&sub.agent, &payload)
    }

    /// Start the child (or find the one started for this step) and record `child_run_started`
    /// in the parent's ledger, in one transaction; a refusal is recorded in the parent's ledger.
    async fn start_child(
        &self,
        scope: &RunScope,
        sub: &Subagent,
        step_key: &str,
        prompt: &str,
    ) -> Result<RunId> {
        let started = self.try_start_child(scope, sub, step_key, prompt).await;
        let kernel = self.kernel();
        match &started {
            Err(Error::SubagentRefused {
                reason, message, ..
            }) => {
                kernel
                    .record(
                        scope,
                        step_key,
                        EventType::ChildRunRefused,
                        json!({"agent": sub.agent, "reason": reason, "message": message}),
                    )
                    .await?;
            }
            Err(
                e @ Error::RunBudgetExceeded {
                    limit_usd,
                    spent_usd,
                    reserved_usd,
                    requested_usd,
                    ..
                },
            ) => {
                kernel
                    .record(
                        scope,
                        step_key,
                        EventType::BudgetExceeded,
                        json!({"scope": "run", "subagent": sub.agent,
                               "estimate_usd": requested_usd, "limit_usd": limit_usd,
                               "spent_usd": spent_usd, "reserved_usd": reserved_usd,
                               "message": e.to_string()}),
                    )
                    .await?;
            }
            _ => {}
        }
        started
    }

    async fn try_start_child(
        &self,
        scope: &RunScope,
        sub: &Subagent,
        step_key: &str,
        prompt: &str,
    ) -> Result<RunId> {
        let mut conn = self.kernel().db().get().await?;
        let tx = conn.transaction().await?;
        // The parent's ledger lock first (the order of appends and settlements).
        tx.execute(sql!("kernel/lock_run"), typed![&scope.run])
            .await?;
        let depth = i32::try_from(self.subagent_depth_limit()).unwrap_or(i32::MAX);
        let row = tx
            .query_one(
                sql!("agent/start_child_run"),
                typed![
                    &scope.run,
                    &step_key,
                    &sub.agent,
                    &prompt,
                    &sub.budget_usd,
                    &depth
                ],
            )
            .await
            .map_err(|e| classify(e, &sub.agent, Some(scope)))?;
        let child: RunId = row.try_get("child_id")?;
        if row.try_get::<_, bool>("created")? {
            let budget: Option<f64> = row.try_get("budget_usd")?;
            let child_depth: i32 = row.try_get("depth")?;
            let ev = NewEvent::new(
                EventType::ChildRunStarted,
                json!({"child_run_id": child, "agent": sub.agent, "budget_usd": budget,
                       "depth": child_depth}),
            )
            .step(step_key)
            .idempotent();
            append_events(&tx, scope.run, &[ev], scope.lease_token).await?;
        }
        tx.commit().await?;
        Ok(child)
    }
}
