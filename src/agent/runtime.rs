//! Agent definitions and the durable agent loop.
//!
//! An [`AgentDef`] (name, description, model, system prompt, tools, max tokens, temperature,
//! max iterations) is upserted into `pgcrew.agents` by every instance that can run it
//! ([`register_agent`]). [`AgentRuntime::submit`] creates a run and enqueues a task of kind
//! [`AGENT_RUN_KIND`] on the agent's queue ([`agent_queue`]); any instance whose
//! [`AgentRuntime::install`]ed worker pool listens on that queue (because it has the agent's
//! tools) claims it and runs [`AgentRuntime::execute`]: under a fenced run lease, each
//! iteration is a durable model step (`iter-{n}/model`) followed by durable tool steps
//! (`iter-{n}/tool-{call_id}`). A run resumed elsewhere replays recorded steps without calling
//! the model or the tools again.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{instrument, warn};

use crate::db::Executor;
use crate::error::{Error, Result};
use crate::ids::{InstanceId, RunId, SessionId, TenantId};
use crate::kernel::{Kernel, ReplayPolicy, RunScope};
use crate::model::{Message, ModelRequest};
use crate::queue::{self, NewTask, TaskOutcome, WorkerPoolBuilder};
use crate::runs::{
    self, LimitPolicy, NewRun, Run, RunLease, RunOutcome, RunState, Session, StartOutcome,
};

use super::tool::ToolRegistry;

/// The task kind of agent runs.
pub const AGENT_RUN_KIND: &str = "pgcrew.agent_run";

/// Default most model/tool iterations per run.
pub const DEFAULT_MAX_ITERATIONS: u32 = 10;

/// The queue an agent's runs are enqueued on (`agent.<name>`): only instances that can run the
/// agent (they have its tools) listen on it.
pub fn agent_queue(agent: &str) -> String {
    format!("agent.{agent}")
}

/// What an agent run does when the model calls a tool whose capability the run's tenant lacks
/// (the tool never runs and the ledger records `capability_denied` either way). Stored per
/// agent in `pgcrew.agents.on_capability_denied`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum CapabilityDenialPolicy {
    /// The default: the run fails with `error_type` `capability_denied` and the denial
    /// ([`Error::CapabilityDenied`]) as its error message; the model is not called again.
    #[default]
    FailRun,
    /// The denial is returned to the model as the tool's result (`{"error": "capability
    /// denied: ..."}`) and the run continues, so the model can answer without the tool.
    ReturnToModel,
}

impl CapabilityDenialPolicy {
    /// The stored name: `fail_run` or `return_to_model`.
    pub fn as_str(&self) -> &'static str {
        match self {
            CapabilityDenialPolicy::FailRun => "fail_run",
            CapabilityDenialPolicy::ReturnToModel => "return_to_model",
        }
    }
}

impl std::fmt::Display for CapabilityDenialPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for CapabilityDenialPolicy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "fail_run" => Ok(CapabilityDenialPolicy::FailRun),
            "return_to_model" => Ok(CapabilityDenialPolicy::ReturnToModel),
            other => Err(Error::invalid(
                "on_capability_denied",
                format!("`{other}` is not one of fail_run, return_to_model"),
            )),
        }
    }
}

/// An agent definition.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentDef {
    /// Unique name.
    pub name: String,
    /// What the agent does.
    pub description: String,
    /// The model it calls.
    pub model: String,
    /// Its system prompt.
    pub system_prompt: String,
    /// Names of the tools it may call.
    pub tools: Vec<String>,
    /// `max_tokens` of each model call.
    pub max_tokens: Option<u32>,
    /// Sampling temperature.
    pub temperature: Option<f64>,
    /// Most iterations (model calls) per run.
    pub max_iterations: u32,
    /// What a run does when a tool call is denied for lack of a capability (default
    /// [`CapabilityDenialPolicy::FailRun`]).
    pub on_capability_denied: CapabilityDenialPolicy,
}

impl AgentDef {
    /// A definition with defaults (no tools, no system prompt, 10 iterations).
    pub fn new(name: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            description: String::new(),
            model: model.into(),
            system_prompt: String::new(),
            tools: Vec::new(),
            max_tokens: None,
            temperature: None,
            max_iterations: DEFAULT_MAX_ITERATIONS,
            on_capability_denied: CapabilityDenialPolicy::default(),
        }
    }

    /// Set the description.
    pub fn description(mut self, d: impl Into<String>) -> Self {
        self.description = d.into();
        self
    }

    /// Set the system prompt.
    pub fn system_prompt(mut self, p: impl Into<String>) -> Self {
        self.system_prompt = p.into();
        self
    }

    /// Allow a tool.
    pub fn tool(mut self, name: impl Into<String>) -> Self {
        self.tools.push(name.into());
        self
    }

    /// Set `max_tokens` per model call.
    pub fn max_tokens(mut self, n: u32) -> Self {
        self.max_tokens = Some(n);
        self
    }

    /// Set the temperature.
    pub fn temperature(mut self, t: f64) -> Self {
        self.temperature = Some(t);
        self
    }

    /// Set the most iterations per run.
    pub fn max_iterations(mut self, n: u32) -> Self {
        self.max_iterations = n;
        self
    }

    /// Set what a run does when a tool call is denied for lack of a capability.
    pub fn on_capability_denied(mut self, policy: CapabilityDenialPolicy) -> Self {
        self.on_capability_denied = policy;
        self
    }

    /// Check the definition (names, ranges).
    pub fn validate(&self) -> Result<()> {
        crate::ids::validate_text_id("agent name", &self.name)?;
        crate::ids::validate_text_id("agent model", &self.model)?;
        for t in &self.tools {
            super::tool::validate_tool_name(t)?;
        }
        if self.max_iterations == 0 || self.max_iterations > 1000 {
            return Err(Error::invalid(
                "max_iterations",
                format!("{} is outside 1 to 1000", self.max_iterations),
            ));
        }
        if self.max_tokens == Some(0) {
            return Err(Error::invalid("max_tokens", "must be at least 1"));
        }
        if let Some(t) = self.temperature
            && !(t.is_finite() && (0.0..=2.0).contains(&t))
        {
            return Err(Error::invalid(
                "temperature",
                format!("{t} is outside 0 to 2"),
            ));
        }
        Ok(())
    }
}

fn to_i32(field: &'static str, v: u32) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::invalid(field, format!("{v} is too large")))
}

/// Upsert an agent definition into `pgcrew.agents`.
#[instrument(skip(db, def), fields(agent = %def.name), err)]
pub async fn register_agent(db: &crate::Db, def: &AgentDef) -> Result<()> {
    def.validate()?;
    let max_tokens = def
        .max_tokens
        .map(|n| to_i32("max_tokens", n))
        .transpose()?;
    let iterations = to_i32("max_iterations", def.max_iterations)?;
    let conn = db.get().await?;
    conn.execute_typed_count(
        sql!("agent/upsert_agent"),
        typed![
            &def.name,
            &def.description,
            &def.model,
            &def.system_prompt,
            &def.tools,
            &max_tokens,
            &def.temperature,
            &iterations,
            &def.on_capability_denied.as_str(),
        ],
    )
    .await?;
    Ok(())
}

/// Upsert every tool of a registry into `pgcrew.tools`, in one transaction.
#[instrument(skip(db, tools), err)]
pub async fn register_tools(db: &crate::Db, tools: &ToolRegistry) -> Result<()> {
    let mut conn = db.get().await?;
    let tx = conn.transaction().await?;
    for t in tools.iter() {
        tx.execute_typed_count(
            sql!("agent/upsert_tool"),
            typed![
                &t.name(),
                &t.description(),
                t.input_schema(),
                &t.requires_capability(),
            ],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Load an agent definition ([`Error::NotFound`] with kind `agent` when unknown).
#[instrument(skip(db), err)]
pub async fn get_agent(db: &crate::Db, name: &str) -> Result<AgentDef> {
    let conn = db.get().await?;
    let row = conn
        .query_typed_opt_row(sql!("agent/get_agent"), typed![&name])
        .await?
        .ok_or_else(|| Error::not_found("agent", name))?;
    let max_tokens: Option<i32> = row.try_get("max_tokens")?;
    let iterations: i32 = row.try_get("max_iterations")?;
    let policy: String = row.try_get("on_capability_denied")?;
    Ok(AgentDef {
        name: row.try_get("name")?,
        description: row.try_get("description")?,
        model: row.try_get("model")?,
        system_prompt: row.try_get("system_prompt")?,
        tools: row.try_get("tools")?,
        max_tokens: max_tokens.and_then(|n| u32::try_from(n).ok()),
        temperature: row.try_get("temperature")?,
        max_iterations: u32::try_from(iterations).unwrap_or(DEFAULT_MAX_ITERATIONS),
        on_capability_denied: policy.parse()?,
    })
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The payload of an [`AGENT_RUN_KIND`] task.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AgentRunTask {
    /// The run to drive.
    pub run_id: RunId,
}

/// Runs agents on one instance: submits runs and executes them durably.
#[derive(Debug, Clone)]
pub struct AgentRuntime {
    kernel: Kernel,
    owner: String,
    instance: Option<InstanceId>,
    lease_ttl: Duration,
}

impl AgentRuntime {
    /// A runtime executing with `kernel` (its tools are the tools this instance can run); leases
    /// are taken as `owner` (use the instance id).
    pub fn new(kernel: Kernel, owner: impl Into<String>) -> Self {
        Self {
            kernel,
            owner: owner.into(),
            instance: None,
            lease_ttl: Duration::from_secs(60),
        }
    }

    /// Record this instance on the runs it starts.
    pub fn with_instance(mut self, instance: InstanceId) -> Self {
        self.instance = Some(instance);
        self
    }

    /// The run lease TTL (default 60 s; renewed after every step).
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// The kernel.
    pub fn kernel(&self) -> &Kernel {
        &self.kernel
    }

    /// Create (or fetch) a session for `tenant`.
    #[instrument(skip(self), err)]
    pub async fn new_session(&self, tenant: &TenantId, identifier: &str) -> Result<Session> {
        runs::new_session(self.kernel.db(), tenant, identifier, json!({})).await
    }

    /// Create a run of `agent` in `session` with `prompt` and enqueue it on the agent's queue
    /// in the same transaction. An unknown agent or session is an error and nothing is written.
    #[instrument(skip(self, prompt), err)]
    pub async fn submit(&self, agent: &str, session: SessionId, prompt: &str) -> Result<RunId> {
        if prompt.trim().is_empty() {
            return Err(Error::invalid("prompt", "must not be empty"));
        }
        get_agent(self.kernel.db(), agent).await?;
        let s = runs::get_session(self.kernel.db(), session).await?;
        let tenant = TenantId::new(s.tenant_id.clone())?;
        let new = NewRun::new(tenant.clone())
            .session(session)
            .agent(agent)
            .prompt(prompt);
        let mut conn = self.kernel.db().get().await?;
        let tx = conn.transaction().await?;
        let run = runs::create_run_in(&tx, new).await?;
        let task = NewTask::new(AGENT_RUN_KIND, &AgentRunTask { run_id: run })?
            .queue(agent_queue(agent))
            .tenant(tenant)
            .run(run)
            .unique_key(format!("agent_run:{run}"));
        queue::enqueue(&tx, &task).await?;
        tx.commit().await?;
        Ok(run)
    }

    /// Register the agent-run handler on a worker pool builder and listen on the queues of
    /// `agents` (the caller lists the agents whose tools this instance has), in addition to
    /// every queue the builder works: its named queues, or the implicit `default` queue of a
    /// builder that names none. To work only the agents' queues, name them on the builder
    /// (`.queue(agent_queue(name))`).
    pub fn install(self, mut builder: WorkerPoolBuilder, agents: &[&str]) -> WorkerPoolBuilder {
        for a in agents {
            builder = builder.also_queue(agent_queue(a));
        }
        let rt = Arc::new(self);
        builder.handler(AGENT_RUN_KIND, move |ctx, task: AgentRunTask| {
            let rt = rt.clone();
            async move {
                match rt.execute(task.run_id, Some(ctx.cancel.clone())).await {
                    Ok(_) => Ok(TaskOutcome::Complete),
                    // Held by another live instance: try again later.
                    Err(Error::LeaseLost(_)) | Err(Error::LimitReached { .. }) => {
                        Ok(TaskOutcome::Snooze(Duration::from_secs(1)))
                    }
                    Err(e) if e.is_transient() => Err(Box::new(e) as queue::HandlerError),
                    Err(e) => Ok(TaskOutcome::Discard(e.to_string())),
                }
            }
        })
    }

    /// Drive a run to a terminal state (or until cancelled / the lease is lost). Resumes from
    /// the ledger: recorded model and tool steps are replayed, not repeated. Failures of the
    /// run itself (unknown agent, budget exceeded — the tenant's or the run's, model error, max
    /// iterations, unresolvable tool outcome, and a capability denial under
    /// [`CapabilityDenialPolicy::FailRun`]) fail the run with a typed `error_type` and return
    /// the failed run. Unknown tools and invalid arguments are returned to the model.
    #[instrument(skip(self, cancel), err)]
    pub async fn execute(&self, run: RunId, cancel: Option<CancellationToken>) -> Result<Run> {
        let db = self.kernel.db();
        let current = runs::get_run(db, run).await?;
        if current.state.is_terminal() {
            return Ok(current);
        }
        let lease = runs::acquire_run_lease(db, run, &self.owner, self.lease_ttl)
            .await?
            .ok_or_else(|| {
                Error::LeaseLost(format!("run {run} is leased by another live instance"))
            })?;
        // Keep the lease alive during long model calls; stopped when this future ends or is
        // dropped (a killed worker stops renewing, so another instance can take over).
        let renewer = AbortOnDrop(tokio::spawn({
            let (db, lease, ttl) = (db.clone(), lease.clone(), self.lease_ttl);
            async move {
                loop {
                    tokio::time::sleep(ttl / 3).await;
                    if runs::renew_run_lease(&db, &lease, ttl).await.is_err() {
                        break;
                    }
                }
            }
        }));
        let mut result = self.drive(&current, &lease, cancel).await;
        drop(renewer);
        if let Err(Error::LeaseLost(_)) = &result {
            // Cancelled (or finalized) from elsewhere while we worked: report the final run.
            let now = runs::get_run(db, run).await?;
            if now.state.is_terminal() {
                result = Ok(now);
            }
        }
        if let Err(e) = runs::release_run_lease(db, &lease).await {
            warn!(run = %run, error = %e, "could not release the run lease");
        }
        result
    }

    async fn drive(
        &self,
        current: &Run,
        lease: &RunLease,
        cancel: Option<CancellationToken>,
    ) -> Result<Run> {
        let db = self.kernel.db();
        let run = current.id;
        let token = Some(lease.token);
        if current.state == RunState::Pending {
            match runs::start_run(
                db,
                run,
                self.instance.as_ref(),
                token,
                LimitPolicy::StayPending,
            )
            .await?
            {
                StartOutcome::Started(_) => {}
                StartOutcome::LimitReached { running, limit } => {
                    return Err(Error::LimitReached {
                        tenant: current.tenant_id.clone(),
                        message: format!("{running} of {limit} concurrent runs"),
                    });
                }
            }
        }
        let tenant = TenantId::new(current.tenant_id.clone())?;
        let scope = RunScope::new(run, tenant).with_lease(lease.token);
        let fail = |error_type: &'static str, e: Error| async move {
            runs::fail_run(db, run, error_type, &e.to_string(), token).await
        };
        let Some(agent_name) = current.agent_name.clone() else {
            return fail(
                "unknown_agent",
                Error::invalid("agent", "the run names no agent"),
            )
            .await;
        };
        let def = match get_agent(db, &agent_name).await {
            Ok(d) => d,
            Err(e @ Error::NotFound { .. }) => return fail("unknown_agent", e).await,
            Err(e) => return Err(e),
        };
        let mut specs = Vec::new();
        for t in &def.tools {
            match self.kernel.tools().get(t) {
                Some(tool) => specs.push(tool.spec()),
                None => {
                    return Err(Error::not_found(
                        "tool",
                        format!("{t} (agent {} needs it; this instance lacks it)", def.name),
                    ));
                }
            }
        }
        let mut messages = Vec::new();
        if !def.system_prompt.is_empty() {
            messages.push(Message::system(def.system_prompt.clone()));
        }
        messages.push(Message::user(current.prompt.clone().unwrap_or_default()));
        let mut lease = lease.clone();
        for n in 0..def.max_iterations {
            if cancel.as_ref().is_some_and(CancellationToken::is_cancelled) {
                return Err(Error::Cancelled(format!("run {run}: worker shutting down")));
            }
            let now = runs::get_run(db, run).await?;
            if now.state.is_terminal() {
                return Ok(now);
            }
            let mut request = ModelRequest::new(def.model.clone());
            request.messages = messages.clone();
            request.tools = specs.clone();
            request.max_tokens = def.max_tokens;
            request.temperature = def.temperature;
            let step = match self
                .kernel
                .step_model(
                    &scope,
                    &format!("iter-{n}/model"),
                    &request,
                    ReplayPolicy::Strict,
                )
                .await
            {
                Ok(s) => s,
                Err(e) if e.is_budget_exceeded() => return fail("budget_exceeded", e).await,
                Err(e @ Error::Model { .. }) => return fail("model_error", e).await,
                Err(e @ Error::ReplayConsistency { .. }) => {
                    return fail("replay_consistency", e).await;
                }
                Err(e @ Error::UnknownModelPrice(_)) => {
                    return fail("unknown_model_price", e).await;
                }
                Err(e @ Error::InvalidInput { .. }) => return fail("invalid_request", e).await,
                Err(e) => return Err(e),
            };
            messages.push(Message::from_response(&step.response));
            if step.response.tool_calls.is_empty() {
                let (input_tokens, output_tokens, cost_usd) = self.totals(run).await?;
                let outcome = RunOutcome {
                    response_text: step.response.content.clone(),
                    stop_reason: Some(
                        serde_json::to_value(step.response.finish_reason)?
                            .as_str()
                            .unwrap_or("stop")
                            .to_string(),
                    ),
                    input_tokens,
                    output_tokens,
                    cost_usd,
                };
                return runs::complete_run(db, run, outcome, token).await;
            }
            for call in &step.response.tool_calls {
                let key = format!("iter-{n}/tool-{}", call.id);
                let result = match self
                    .kernel
                    .step_tool(&scope, &key, &call.name, call.arguments.clone())
                    .await
                {
                    Err(Error::ToolOutcomeUnknown { .. }) => {
                        self.kernel.reconcile_tool(&scope, &key).await
                    }
                    other => other,
                };
                let content = match result {
                    Ok(t) => t.output.to_string(),
                    Err(e @ Error::ToolOutcomeUnknown { .. }) => {
                        return fail("tool_outcome_unknown", e).await;
                    }
                    Err(e @ Error::CapabilityDenied { .. })
                        if def.on_capability_denied == CapabilityDenialPolicy::FailRun =>
                    {
                        return fail("capability_denied", e).await;
                    }
                    Err(
                        e @ (Error::ToolFailed { .. }
                        | Error::InvalidInput { .. }
                        | Error::NotFound { kind: "tool", .. }
                        | Error::CapabilityDenied { .. }),
                    ) => json!({"error": e.to_string()}).to_string(),
                    Err(e) => return Err(e),
                };
                messages.push(Message::tool_result(call.id.clone(), content));
            }
            lease = runs::renew_run_lease(db, &lease, self.lease_ttl).await?;
        }
        fail(
            "max_iterations",
            Error::invalid(
                "max_iterations",
                format!(
                    "the agent did not finish within {} iterations",
                    def.max_iterations
                ),
            ),
        )
        .await
    }

    async fn totals(&self, run: RunId) -> Result<(i64, i64, f64)> {
        let conn = self.kernel.db().get().await?;
        let row = conn
            .query_typed_row(sql!("kernel/run_model_totals"), typed![&run])
            .await?;
        Ok((
            row.try_get("input_tokens")?,
            row.try_get("output_tokens")?,
            row.try_get::<_, f64>("cost_usd")?,
        ))
    }
}
