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

use crate::error::{Error, Result};
use crate::ids::{InstanceId, RunId, SessionId, TenantId};
use crate::kernel::{Kernel, ModelStep, RunScope};
use crate::model::{Message, ModelRequest, ToolCall, ToolSpec};
use crate::queue::{self, TaskOutcome, WorkerPoolBuilder};
use crate::runs::{self, Run, RunLease, RunLeasing, RunState, Session};

pub use super::def::{
    AGENT_RUN_KIND, AgentDef, CapabilityDenialPolicy, DEFAULT_MAX_ITERATIONS, agent_queue,
    get_agent, register_agent, register_tools,
};
use super::skills::{LOAD_SKILL_TOOL, SkillSet};

/// What becomes of an error of a step: the run fails with this `error_type`, the error goes
/// back to the model as the tool's result, or it is returned to the caller (the run stays).
enum Route {
    Fail(&'static str),
    ToModel,
    Return,
}

/// The route of a model step's error.
fn model_error_route(e: &Error) -> Route {
    match e {
        e if e.is_budget_exceeded() => Route::Fail("budget_exceeded"),
        Error::Model { .. } => Route::Fail("model_error"),
        Error::ReplayConsistency { .. } => Route::Fail("replay_consistency"),
        Error::UnknownModelPrice(_) => Route::Fail("unknown_model_price"),
        Error::InvalidInput { .. } => Route::Fail("invalid_request"),
        _ => Route::Return,
    }
}

/// The route of a tool step's error under the agent's capability-denial policy.
fn tool_error_route(e: &Error, policy: CapabilityDenialPolicy) -> Route {
    match e {
        Error::ToolOutcomeUnknown { .. } => Route::Fail("tool_outcome_unknown"),
        // A sub-agent's budget the run cannot carve out of its own.
        e if e.is_budget_exceeded() => Route::Fail("budget_exceeded"),
        Error::CapabilityDenied { .. } if policy == CapabilityDenialPolicy::FailRun => {
            Route::Fail("capability_denied")
        }
        Error::ToolFailed { .. }
        | Error::InvalidInput { .. }
        | Error::NotFound { kind: "tool", .. }
        | Error::CapabilityDenied { .. }
        | Error::SubagentRefused { .. } => Route::ToModel,
        _ => Route::Return,
    }
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
    max_subagent_depth: u32,
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
            max_subagent_depth: super::subagent::DEFAULT_MAX_SUBAGENT_DEPTH,
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

    /// The deepest sub-agent nesting this runtime starts (default
    /// [`DEFAULT_MAX_SUBAGENT_DEPTH`](super::subagent::DEFAULT_MAX_SUBAGENT_DEPTH)); a deeper
    /// call is refused and returned to the model.
    pub fn max_subagent_depth(mut self, depth: u32) -> Self {
        self.max_subagent_depth = depth;
        self
    }

    pub(crate) fn subagent_depth_limit(&self) -> u32 {
        self.max_subagent_depth
    }

    /// The kernel.
    pub fn kernel(&self) -> &Kernel {
        &self.kernel
    }

    /// This runtime taking run leases as `{owner}/{suffix}` (a hand-over to a fork drives the
    /// fork under an owner of its own, so a worker of this instance that claims the fork's task
    /// meanwhile cannot share the lease; maintenance still ties the owner to this instance).
    pub(super) fn sub_owner(&self, suffix: &str) -> Self {
        Self {
            owner: format!("{}/{suffix}", self.owner),
            ..self.clone()
        }
    }

    /// Create (or fetch) a session for `tenant`.
    #[instrument(skip(self), err)]
    pub async fn new_session(&self, tenant: &TenantId, identifier: &str) -> Result<Session> {
        runs::new_session(self.kernel.db(), tenant, identifier, json!({})).await
    }

    /// Create a run of `agent` in `session` with `prompt` and enqueue it on the agent's queue
    /// in the same transaction. An unknown agent or session is an error and nothing is written.
    /// The writes are `pgcrew.create_agent_run`'s, the same as `pgcrew.submit_run`'s (V019).
    #[instrument(skip(self, prompt), err)]
    pub async fn submit(&self, agent: &str, session: SessionId, prompt: &str) -> Result<RunId> {
        if prompt.trim().is_empty() {
            return Err(Error::invalid("prompt", "must not be empty"));
        }
        get_agent(self.kernel.db(), agent).await?;
        let s = runs::get_session(self.kernel.db(), session).await?;
        // While tracing: the run and its task store this span's trace context (V027).
        let row = crate::telemetry::trace::query_one_traced(
            self.kernel.db(),
            sql!("agent/create_agent_run"),
            typed![&agent, &s.tenant_id, &session, &prompt],
        )
        .await?;
        Ok(RunId(row.try_get(0)?))
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
        // The run's lease is taken with the claim (one flush per claimed batch); a runtime
        // whose owner is not a valid lease owner takes its leases in the handler.
        if let Ok(leasing) =
            RunLeasing::new(self.owner.clone(), self.lease_ttl, self.instance.clone())
        {
            builder = builder.lease_runs_of(AGENT_RUN_KIND, leasing);
        }
        let rt = Arc::new(self);
        builder.handler(AGENT_RUN_KIND, move |mut ctx, task: AgentRunTask| {
            let rt = rt.clone();
            async move {
                let taken = ctx.run_lease.take().filter(|l| l.run.id == task.run_id);
                match rt
                    .execute_taken(task.run_id, taken, Some(ctx.cancel.clone()))
                    .await
                {
                    Ok(_) => Ok(TaskOutcome::Complete),
                    // Held by another live instance: try again later.
                    Err(Error::LeaseLost(_)) | Err(Error::LimitReached { .. }) => {
                        Ok(TaskOutcome::Snooze(Duration::from_secs(1)))
                    }
                    // Parked at a durable wait (the wait parked the task already).
                    Err(Error::Waiting { resume_in, .. }) => Ok(TaskOutcome::Snooze(resume_in)),
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
    ///
    /// A model step whose request changed since it was recorded (say, the system prompt was
    /// edited between a crash and this resume) is replayed under the agent's
    /// [`ReplayPolicy`](crate::kernel::ReplayPolicy): `strict` fails the run with error_type
    /// `replay_consistency`, `allow_prompt_drift` keeps the recorded answer, `fork_on_drift`
    /// cancels this run in favour of a fork that carries the steps before the drift and
    /// continues there, so the run returned is then the fork (its `parent_run_id` is `run`).
    #[instrument(skip(self, cancel), err)]
    pub async fn execute(&self, run: RunId, cancel: Option<CancellationToken>) -> Result<Run> {
        self.execute_taken(run, None, cancel).await
    }

    /// [`Self::execute`] with the run's lease already taken (by the worker pool, with the
    /// task's claim), or `None` to take it here.
    async fn execute_taken(
        &self,
        run: RunId,
        taken: Option<runs::LeasedRun>,
        cancel: Option<CancellationToken>,
    ) -> Result<Run> {
        let db = self.kernel.db();
        // The lease and, for a woken run whose wait resolved, its resumption: one statement
        // (V025), or taken with the claim (V029). A finished run is reported as it is.
        let taken = match taken {
            Some(t) if t.lease.owner == self.owner => Some(t),
            _ => {
                match runs::lease_run(db, run, &self.owner, self.lease_ttl, self.instance.as_ref())
                    .await
                {
                    Err(Error::IllegalTransition { .. }) => return runs::get_run(db, run).await,
                    other => other?,
                }
            }
        };
        let runs::LeasedRun {
            lease,
            run: current,
        } = taken.ok_or_else(|| {
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
        // A finished run's lease was cleared by its final transition.
        let finished = matches!(&result, Ok(r) if r.state.is_terminal());
        if !finished && let Err(e) = runs::release_run_lease(db, &lease).await {
            warn!(run = %run, error = %e, "could not release the run lease");
        }
        result
    }

    /// One run under its lease: start it, then iterate model step → tool steps until the model
    /// answers without tool calls, the run ends elsewhere, or `max_iterations` is reached.
    async fn drive(
        &self,
        current: &Run,
        lease: &RunLease,
        cancel: Option<CancellationToken>,
    ) -> Result<Run> {
        let db = self.kernel.db();
        let run = current.id;
        let token = Some(lease.token);
        let loaded = self.start(current, token).await?;
        let scope = RunScope::new(run, current.tenant_id.clone()).with_lease(lease.token);
        let Some(agent_name) = current.agent_name.as_deref() else {
            let e = Error::invalid("agent", "the run names no agent");
            return self.fail(&scope, "unknown_agent", e).await;
        };
        let def = match loaded {
            Some(def) => def,
            None => get_agent(db, agent_name).await,
        };
        let def = match def {
            Ok(d) => d,
            Err(e @ Error::NotFound { .. }) => return self.fail(&scope, "unknown_agent", e).await,
            Err(e) => return Err(e),
        };
        let mut skills = match SkillSet::for_agent(db, &def).await {
            Ok(s) => s,
            Err(e @ Error::NotFound { .. }) => return self.fail(&scope, "unknown_skill", e).await,
            Err(e) => return Err(e),
        };
        let mut specs = self.tool_specs(&def)?;
        specs.extend(super::subagent::specs(db, &def).await?);
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
            // No re-read of the run here: a run finished elsewhere has lost its lease, which
            // the step's first write (or the final transition) reports as `LeaseLost`, and
            // `execute_taken` then returns the finished run.
            let mut request = ModelRequest::new(def.model.clone());
            request.messages = messages.clone();
            request.tools = [
                specs.clone(),
                skills.specs(&def.tools, self.kernel.tools())?,
            ]
            .concat();
            request.max_tokens = def.max_tokens;
            request.temperature = def.temperature;
            let key = format!("iter-{n}/model");
            let step = match self
                .kernel
                .step_model(&scope, &key, &request, def.replay_policy)
                .await
            {
                Ok(s) => s,
                Err(e) => return self.settle(&scope, model_error_route(&e), e).await,
            };
            if step.run != run {
                return self
                    .continue_in_fork(&scope, &def.name, &key, &step, cancel)
                    .await;
            }
            messages.push(Message::from_response(&step.response));
            if step.response.tool_calls.is_empty() {
                return self.complete(&scope, &step).await;
            }
            for call in &step.response.tool_calls {
                let key = format!("iter-{n}/tool-{}", call.id);
                if let Some(rejected) =
                    super::approval::gate(&self.kernel, &scope, &key, call).await?
                {
                    messages.push(Message::tool_result(call.id.clone(), rejected));
                    continue;
                }
                let called = match super::subagent::find(&def, &call.name) {
                    Some(sub) => {
                        self.call_subagent(&scope, sub, &key, call, cancel.clone())
                            .await
                    }
                    None => self.call_tool(&scope, n, call, &def, &mut skills).await,
                };
                let content = match called {
                    Ok(output) => output,
                    Err(e) => match tool_error_route(&e, def.on_capability_denied) {
                        Route::ToModel => json!({"error": e.to_string()}).to_string(),
                        route => return self.settle(&scope, route, e).await,
                    },
                };
                messages.push(Message::tool_result(call.id.clone(), content));
            }
            lease = runs::renew_run_lease(db, &lease, self.lease_ttl).await?;
        }
        let e = Error::invalid(
            "max_iterations",
            format!(
                "the agent did not finish within {} iterations",
                def.max_iterations
            ),
        );
        self.fail(&scope, "max_iterations", e).await
    }

    /// Start a pending run (fenced by the lease) and read its agent's definition in the same
    /// statement (`Some`: the definition, or [`Error::NotFound`] when the agent is not
    /// registered; `None` when the run was not pending and nothing was read); a tenant at its
    /// concurrent-run limit is [`Error::LimitReached`] (the task is snoozed).
    async fn start(&self, current: &Run, token: Option<i64>) -> Result<Option<Result<AgentDef>>> {
        let db = self.kernel.db();
        if current.state == RunState::Waiting {
            runs::resume_run(db, current.id, self.instance.as_ref(), token).await?;
            return Ok(None);
        }
        if current.state != RunState::Pending {
            return Ok(None);
        }
        let started = runs::start_run_row(
            db,
            sql!("agent/start_agent_run"),
            current.id,
            self.instance.as_ref(),
            token,
        )
        .await?;
        match started {
            runs::Started::Row(row) => {
                let name: Option<String> = row.try_get("name")?;
                Ok(Some(match name {
                    Some(_) => super::def::agent_of_row(&row),
                    None => Err(Error::not_found(
                        "agent",
                        current.agent_name.as_deref().unwrap_or(""),
                    )),
                }))
            }
            runs::Started::Limited { running, limit } => Err(Error::LimitReached {
                tenant: current.tenant_id.to_string(),
                message: format!("{running} of {limit} concurrent runs"),
            }),
        }
    }

    /// The specs of the agent's tools; a tool this instance lacks is [`Error::NotFound`].
    fn tool_specs(&self, def: &AgentDef) -> Result<Vec<ToolSpec>> {
        def.tools
            .iter()
            .map(|t| {
                self.kernel
                    .tools()
                    .get(t)
                    .map(|tool| tool.spec())
                    .ok_or_else(|| {
                        Error::not_found(
                            "tool",
                            format!("{t} (agent {} needs it; this instance lacks it)", def.name),
                        )
                    })
            })
            .collect()
    }

    /// One durable tool step of iteration `n` (reconciled once if its outcome is unknown):
    /// the tool's output as text. `load_skill` and tools the agent has not been given are
    /// answered by its [`SkillSet`].
    async fn call_tool(
        &self,
        scope: &RunScope,
        n: u32,
        call: &ToolCall,
        def: &AgentDef,
        skills: &mut SkillSet,
    ) -> Result<String> {
        let key = format!("iter-{n}/tool-{}", call.id);
        let registered = self.kernel.tools().get(&call.name).is_some();
        if call.name == LOAD_SKILL_TOOL && !registered {
            return skills.load(&self.kernel, scope, &key, call).await;
        }
        if registered
            && !skills.allows(&def.tools, &call.name)
            && let Some(refusal) = skills.refuse(&self.kernel, scope, &key, call).await?
        {
            return Ok(refusal);
        }
        let result = match self
            .kernel
            .step_tool(scope, &key, &call.name, call.arguments.clone())
            .await
        {
            Err(Error::ToolOutcomeUnknown { .. }) => self.kernel.reconcile_tool(scope, &key).await,
            other => other,
        };
        Ok(result?.output.to_string())
    }

    /// Complete the run with the model's final answer and the run's model totals (summed in
    /// the completing statement).
    async fn complete(&self, scope: &RunScope, step: &ModelStep) -> Result<Run> {
        let stop_reason = serde_json::to_value(step.response.finish_reason)?
            .as_str()
            .unwrap_or("stop")
            .to_string();
        runs::complete_with_model_totals(
            self.kernel.db(),
            scope.run,
            step.response.content.as_deref(),
            Some(&stop_reason),
            scope.lease_token,
        )
        .await
    }

    /// Fail the run for `e` or return `e`, as `route` says.
    async fn settle(&self, scope: &RunScope, route: Route, e: Error) -> Result<Run> {
        match route {
            Route::Fail(error_type) => self.fail(scope, error_type, e).await,
            Route::ToModel | Route::Return => Err(e),
        }
    }

    /// Fail the run with a typed `error_type` and the error's message.
    async fn fail(&self, scope: &RunScope, error_type: &'static str, e: Error) -> Result<Run> {
        runs::fail_run(
            self.kernel.db(),
            scope.run,
            error_type,
            &e.to_string(),
            scope.lease_token,
        )
        .await
    }
}
