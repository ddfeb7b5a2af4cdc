//! The durable kernel: model steps with budget reserve/settle and replay policies, two-phase
//! tool steps with reconciliation, and checkpointed workflow steps. Every step is keyed by
//! `(run, step_key)` and recorded in the run's hash-chained ledger, so a run resumed after a
//! crash (on any instance) replays recorded steps instead of repeating model calls or tools.
//!
//! Ledger events written here (all carry the step key):
//! `model_requested`, `model_completed`, `model_failed`, `budget_exceeded`, `budget_overrun`,
//! `replayed_with_drift`, `replay_rejected`, `run_forked`, `tool_requested`, `tool_completed`,
//! `tool_failed`, `tool_outcome_unknown`, `tool_rejected`, `capability_denied`,
//! `output_invalid`, `workflow_step_completed`, `workflow_step_failed`, `workflow_completed`.
//!
//! ```no_run
//! use std::sync::Arc;
//! use pgcrew::kernel::{Kernel, ReplayPolicy, RunScope};
//! use pgcrew::model::{ModelRequest, ScriptedModel, ScriptedReply};
//!
//! # async fn demo(db: pgcrew::Db, scope: RunScope) -> pgcrew::Result<()> {
//! let model = Arc::new(ScriptedModel::sequence(vec![ScriptedReply::text("hi")]));
//! let kernel = Kernel::new(db, model);
//! let request = ModelRequest::new("gpt-4o-mini").user("hello").max_tokens(64);
//! let step = kernel.step_model(&scope, "greet", &request, ReplayPolicy::Strict).await?;
//! println!("{} (cost {} USD)", step.response.content_text(), step.cost_usd);
//! # Ok(())
//! # }
//! ```

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tracing::instrument;

use crate::agent::{Tool, ToolContext, ToolError, ToolRegistry};
use crate::db::Db;
use crate::db::Executor;
use crate::error::{Error, Result};
use crate::ids::{InstanceId, RunId, TenantId};
use crate::model::port::prompt_token_bound;
use crate::model::{ModelPort, ModelRequest, ModelResponse, PriceTable};
use crate::runs::{NewEvent, NewRun, append_events, append_events_in, create_run, get_run};
use crate::tenancy::{self, CostInput, ReserveRequest};

pub mod harness;
pub mod workflow;

pub use harness::{Harness, HarnessReport, UnitCtx};
pub use workflow::WorkflowCtx;

/// `max_tokens` reserved for — and sent to the provider as the completion cap — when a request
/// does not set one.
pub const DEFAULT_RESERVE_MAX_TOKENS: u32 = 4096;

/// What to do when a recorded model step is replayed with a request whose fingerprint differs
/// from the recorded one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplayPolicy {
    /// Fail with [`Error::ReplayConsistency`] (and record `replay_rejected`).
    #[default]
    Strict,
    /// Return the recorded output and record `replayed_with_drift`.
    AllowPromptDrift,
    /// Fork a new run carrying the parent's step events before this step
    /// (`parent_run_id`, `forked_at_seq`) and execute the step there.
    ForkOnDrift,
}

/// The run a step belongs to, with the caller's run lease token (when it holds one: every
/// append is then fenced by it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunScope {
    /// The run.
    pub run: RunId,
    /// Its tenant.
    pub tenant: TenantId,
    /// The caller's run lease token, if any.
    pub lease_token: Option<i64>,
}

impl RunScope {
    /// A scope without a lease.
    pub fn new(run: RunId, tenant: TenantId) -> Self {
        Self {
            run,
            tenant,
            lease_token: None,
        }
    }

    /// Fence every append with this lease token.
    pub fn with_lease(mut self, token: i64) -> Self {
        self.lease_token = Some(token);
        self
    }
}

/// The result of [`Kernel::step_model`].
#[derive(Debug, Clone, PartialEq)]
pub struct ModelStep {
    /// The run the step is recorded in (a new fork under [`ReplayPolicy::ForkOnDrift`]).
    pub run: RunId,
    /// The model's response (recorded or fresh).
    pub response: ModelResponse,
    /// The cost charged for the call (0 when replayed).
    pub cost_usd: f64,
    /// True when the output came from the ledger (no model call).
    pub replayed: bool,
    /// True when the request differed from the recorded one.
    pub drift: bool,
    /// The parent run when this step forked a new run.
    pub forked_from: Option<RunId>,
}

/// The result of [`Kernel::step_tool`] / [`Kernel::reconcile_tool`].
#[derive(Debug, Clone, PartialEq)]
pub struct ToolStep {
    /// The tool's output.
    pub output: Value,
    /// True when the output came from the ledger (the tool did not run).
    pub replayed: bool,
    /// True when the output was obtained by reconciliation.
    pub reconciled: bool,
    /// The idempotency key the tool was given.
    pub idempotency_key: String,
}

/// One recorded event of a step.
#[derive(Debug, Clone)]
pub(crate) struct StepEvent {
    pub(crate) seq: i64,
    pub(crate) event_type: String,
    pub(crate) payload: Value,
}

/// The durable kernel (see the [module docs](self)). Cheap to clone.
#[derive(Clone)]
pub struct Kernel {
    db: Db,
    model: Arc<dyn ModelPort>,
    prices: Arc<PriceTable>,
    tools: Arc<ToolRegistry>,
    instance: Option<InstanceId>,
}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernel")
            .field("model", &self.model.name())
            .field("tools", &self.tools.names())
            .finish()
    }
}

impl Kernel {
    /// A kernel on `db` calling `model`, with the built-in price table and no tools.
    pub fn new(db: Db, model: Arc<dyn ModelPort>) -> Self {
        Self {
            db,
            model,
            prices: Arc::new(PriceTable::builtin()),
            tools: Arc::new(ToolRegistry::new()),
            instance: None,
        }
    }

    /// Use this price table for reservations and costs.
    pub fn with_prices(mut self, prices: PriceTable) -> Self {
        self.prices = Arc::new(prices);
        self
    }

    /// Execute these tools.
    pub fn with_tools(mut self, tools: ToolRegistry) -> Self {
        self.tools = Arc::new(tools);
        self
    }

    /// Record this instance on budget reservations (so maintenance can release them if the
    /// instance dies mid-call).
    pub fn with_instance(mut self, instance: InstanceId) -> Self {
        self.instance = Some(instance);
        self
    }

    /// The database.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The registered tools.
    pub fn tools(&self) -> &ToolRegistry {
        &self.tools
    }

    /// The model port.
    pub fn model(&self) -> &Arc<dyn ModelPort> {
        &self.model
    }

    /// The price table.
    pub fn prices(&self) -> &PriceTable {
        &self.prices
    }

    pub(crate) async fn step_events(&self, run: RunId, step_key: &str) -> Result<Vec<StepEvent>> {
        let conn = self.db.get().await?;
        let rows = conn
            .query_typed_rows(sql!("kernel/step_events"), typed![&run, &step_key])
            .await?;
        rows.iter()
            .map(|r| {
                Ok(StepEvent {
                    seq: r.try_get(0)?,
                    event_type: r.try_get(1)?,
                    payload: r.try_get(2)?,
                })
            })
            .collect()
    }

    pub(crate) async fn record(
        &self,
        scope: &RunScope,
        step_key: &str,
        event_type: &str,
        payload: Value,
    ) -> Result<()> {
        let ev = NewEvent::new(event_type, payload).step(step_key);
        append_events(&self.db, scope.run, &[ev], scope.lease_token).await?;
        Ok(())
    }

    /// A durable model call keyed by `(run, step_key)`.
    ///
    /// First execution: reserve the worst-case cost (the prompt's upper bound
    /// [`prompt_token_bound`](crate::model::port::prompt_token_bound) + `max_tokens`, or
    /// [`DEFAULT_RESERVE_MAX_TOKENS`] when unset, priced with the price table) → record
    /// `model_requested` → call the model with that completion cap (always sent, so the provider
    /// cannot produce more than was reserved) → in one transaction record `model_completed`
    /// (output, usage, cost, fingerprint, model), settle the reservation and insert the cost
    /// entry. A refused reservation records `budget_exceeded` (with `scope` `tenant` or `run`)
    /// and returns [`Error::BudgetExceeded`] / [`Error::RunBudgetExceeded`]; a provider error
    /// records `model_failed` (typed kind) and releases the reservation. A provider reporting
    /// more usage than reserved is charged in full: if that passes a limit, `budget_overrun` is
    /// recorded in the same transaction and the budget refuses further reservations.
    ///
    /// Replay (a `model_completed` is recorded for the step): no model call. The recorded
    /// output is returned when the fingerprint matches; otherwise `policy` decides.
    #[instrument(skip(self, request), fields(run = %scope.run, step_key), err)]
    pub async fn step_model(
        &self,
        scope: &RunScope,
        step_key: &str,
        request: &ModelRequest,
        policy: ReplayPolicy,
    ) -> Result<ModelStep> {
        validate_step_key(step_key)?;
        request.validate()?;
        let fingerprint = request.fingerprint()?;
        let events = self.step_events(scope.run, step_key).await?;
        if let Some(done) = events
            .iter()
            .rev()
            .find(|e| e.event_type == "model_completed")
        {
            let recorded_fp = done
                .payload
                .get("fingerprint")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let response: ModelResponse = serde_json::from_value(
                done.payload.get("response").cloned().unwrap_or(Value::Null),
            )?;
            if recorded_fp == fingerprint {
                return Ok(ModelStep {
                    run: scope.run,
                    response,
                    cost_usd: 0.0,
                    replayed: true,
                    drift: false,
                    forked_from: None,
                });
            }
            let first_seq = events.first().map_or(done.seq, |e| e.seq);
            return match policy {
                ReplayPolicy::Strict => {
                    let message = format!(
                        "the recorded request fingerprint {recorded_fp} differs from the current {fingerprint} (the prompt, model, options, tools or output schema changed); use allow_prompt_drift or fork_on_drift to replay anyway"
                    );
                    self.record(
                        scope,
                        step_key,
                        "replay_rejected",
                        json!({"recorded_fingerprint": recorded_fp, "fingerprint": fingerprint,
                               "policy": "strict"}),
                    )
                    .await?;
                    Err(Error::ReplayConsistency {
                        step_key: step_key.to_string(),
                        message,
                    })
                }
                ReplayPolicy::AllowPromptDrift => {
                    self.record(
                        scope,
                        step_key,
                        "replayed_with_drift",
                        json!({"recorded_fingerprint": recorded_fp, "fingerprint": fingerprint}),
                    )
                    .await?;
                    Ok(ModelStep {
                        run: scope.run,
                        response,
                        cost_usd: 0.0,
                        replayed: true,
                        drift: true,
                        forked_from: None,
                    })
                }
                ReplayPolicy::ForkOnDrift => {
                    let fork = self.fork_run(scope, first_seq).await?;
                    let fork_scope = RunScope::new(fork, scope.tenant.clone());
                    let mut step = self.execute_model(&fork_scope, step_key, request).await?;
                    step.drift = true;
                    step.forked_from = Some(scope.run);
                    Ok(step)
                }
            };
        }
        self.execute_model(scope, step_key, request).await
    }

    /// Create a fork of `scope.run` carrying its step events with `seq < before_seq`.
    #[instrument(skip(self), fields(run = %scope.run), err)]
    pub async fn fork_run(&self, scope: &RunScope, before_seq: i64) -> Result<RunId> {
        let parent = get_run(&self.db, scope.run).await?;
        if parent.tenant_id != scope.tenant.as_str() {
            return Err(Error::not_found("run", scope.run));
        }
        let forked_at = before_seq - 1;
        let rows = {
            let conn = self.db.get().await?;
            conn.query_typed_rows(
                sql!("kernel/step_events_before"),
                typed![&scope.run, &before_seq],
            )
            .await?
        };
        let mut new = NewRun::new(scope.tenant.clone());
        new.session_id = parent.session_id;
        new.agent_name = parent.agent_name.clone();
        new.prompt = parent.prompt.clone();
        new.metadata = parent.metadata.clone();
        new.parent_run_id = Some(scope.run);
        new.forked_at_seq = Some(forked_at);
        let fork = create_run(&self.db, new).await?;
        let mut events = Vec::with_capacity(rows.len() + 1);
        for r in &rows {
            let seq: i64 = r.try_get(0)?;
            let event_type: String = r.try_get(1)?;
            let step_key: String = r.try_get(2)?;
            let mut payload: Value = r.try_get(3)?;
            if let Value::Object(m) = &mut payload {
                m.insert("copied_from_seq".into(), json!(seq));
            }
            events.push(NewEvent::new(event_type, payload).step(step_key));
        }
        events.push(NewEvent::new(
            "run_forked",
            json!({"parent_run_id": scope.run, "forked_at_seq": forked_at,
                   "copied_events": rows.len()}),
        ));
        append_events(&self.db, fork, &events, None).await?;
        Ok(fork)
    }

    async fn execute_model(
        &self,
        scope: &RunScope,
        step_key: &str,
        request: &ModelRequest,
    ) -> Result<ModelStep> {
        // The fingerprint is the caller's request (replays stay stable); the provider gets the
        // completion cap that is reserved for, so it cannot produce more than was reserved.
        let fingerprint = request.fingerprint()?;
        let prompt_tokens = prompt_token_bound(request);
        let max_tokens = request.max_tokens.unwrap_or(DEFAULT_RESERVE_MAX_TOKENS);
        let estimate =
            self.prices
                .worst_case_cost(&request.model, prompt_tokens, u64::from(max_tokens))?;
        let mut capped = request.clone();
        capped.max_tokens = Some(max_tokens);
        let mut req = ReserveRequest::new(scope.tenant.clone(), estimate)
            .run(scope.run)
            .model(request.model.clone());
        if let Some(i) = &self.instance {
            req = req.instance(i.clone());
        }
        let reservation = match tenancy::reserve(&self.db, &req).await {
            Ok(r) => r,
            Err(e) if e.is_budget_exceeded() => {
                let (scope_name, limit_usd, spent_usd, reserved_usd, requested_usd) = match &e {
                    Error::RunBudgetExceeded {
                        limit_usd,
                        spent_usd,
                        reserved_usd,
                        requested_usd,
                        ..
                    } => ("run", *limit_usd, *spent_usd, *reserved_usd, *requested_usd),
                    Error::BudgetExceeded {
                        limit_usd,
                        spent_usd,
                        reserved_usd,
                        requested_usd,
                        ..
                    } => (
                        "tenant",
                        *limit_usd,
                        *spent_usd,
                        *reserved_usd,
                        *requested_usd,
                    ),
                    _ => ("tenant", f64::INFINITY, 0.0, 0.0, estimate),
                };
                let limit = if limit_usd.is_finite() {
                    json!(limit_usd)
                } else {
                    Value::Null
                };
                self.record(
                    scope,
                    step_key,
                    "budget_exceeded",
                    json!({"model": request.model, "scope": scope_name,
                           "estimate_usd": requested_usd,
                           "limit_usd": limit, "spent_usd": spent_usd,
                           "reserved_usd": reserved_usd, "message": e.to_string()}),
                )
                .await?;
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        let requested = self
            .record(
                scope,
                step_key,
                "model_requested",
                json!({"model": request.model, "fingerprint": fingerprint,
                       "estimate_usd": estimate, "reservation_id": reservation.id,
                       "prompt_token_bound": prompt_tokens, "max_tokens": max_tokens,
                       "messages": request.messages.len(), "port": self.model.name()}),
            )
            .await;
        if let Err(e) = requested {
            let _ = tenancy::release(&self.db, &reservation).await;
            return Err(e);
        }
        let response = match self.model.complete(&capped).await {
            Ok(r) => r,
            Err(e) => {
                let kind = match &e {
                    Error::Model { kind, .. } => kind.clone(),
                    Error::InvalidInput { .. } => "invalid_request".to_string(),
                    _ => "other".to_string(),
                };
                let mut conn = self.db.get().await?;
                let tx = conn.transaction().await?;
                // Lock order: ledger lock, tenant row, run row (see kernel/lock_run.sql).
                tx.execute_typed_count(sql!("kernel/lock_run"), typed![&scope.run])
                    .await?;
                tenancy::release_in_tx(&tx, &reservation).await?;
                let ev = NewEvent::new(
                    "model_failed",
                    json!({"model": request.model, "fingerprint": fingerprint,
                           "kind": kind, "message": e.to_string()}),
                )
                .step(step_key);
                append_events_in(&tx, scope.run, &[ev], scope.lease_token).await?;
                tx.commit().await?;
                return Err(e);
            }
        };
        let cost = self.prices.cost(
            &request.model,
            response.usage.prompt_tokens,
            response.usage.completion_tokens,
        )?;
        let input = CostInput::llm(
            request.model.clone(),
            response.usage.prompt_tokens,
            response.usage.completion_tokens,
            cost,
        )
        .step(step_key);
        let ev = NewEvent::new(
            "model_completed",
            json!({"model": request.model, "fingerprint": fingerprint,
                   "response": response, "usage": response.usage, "cost_usd": cost,
                   "output": response.content}),
        )
        .step(step_key)
        .idempotent();
        match self
            .record_completion(scope, step_key, ev, &reservation, &input)
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                // Another attempt recorded this step concurrently: its record stands.
                return Box::pin(self.step_model(scope, step_key, request, ReplayPolicy::Strict))
                    .await;
            }
            Err(e) => {
                // The call was made and paid for even though it could not be recorded (for
                // example the run lease was lost): charge it so the budget stays truthful.
                if let Err(e2) = self.charge_unrecorded(&reservation, &input).await {
                    tracing::warn!(error = %e2, "could not charge an unrecorded model call");
                }
                return Err(e);
            }
        }
        Ok(ModelStep {
            run: scope.run,
            response,
            cost_usd: cost,
            replayed: false,
            drift: false,
            forked_from: None,
        })
    }

    /// Record `model_completed` and settle in one transaction; `Ok(false)` when the step was
    /// already recorded (the reservation is then released and nothing charged). A settlement
    /// that takes a budget past its limit also records `budget_overrun` in that transaction.
    async fn record_completion(
        &self,
        scope: &RunScope,
        step_key: &str,
        ev: NewEvent,
        reservation: &tenancy::Reservation,
        input: &CostInput,
    ) -> Result<bool> {
        let mut conn = self.db.get().await?;
        let tx = conn.transaction().await?;
        // Lock order: the run's ledger lock, then (settle) the tenant row and the run row, then
        // the appends (whose run-row update is then already ours). Reservations lock the tenant
        // row then the run row and appends the ledger lock then the run row, so this order
        // cannot deadlock with concurrent steps of the same run.
        tx.execute_typed_count(sql!("kernel/lock_run"), typed![&scope.run])
            .await?;
        let done: bool = tx
            .query_typed_row(sql!("kernel/step_completed"), typed![&scope.run, &step_key])
            .await?
            .try_get("done")?;
        if done {
            tenancy::release_in_tx(&tx, reservation).await?;
            tx.commit().await?;
            return Ok(false);
        }
        let settlement = tenancy::settle_in_tx(&tx, reservation, input).await?;
        let mut events = vec![ev];
        for o in &settlement.overruns {
            events.push(
                NewEvent::new(
                    "budget_overrun",
                    json!({"scope": o.scope.as_str(), "limit_usd": o.limit_usd,
                           "spent_usd": o.spent_usd, "cost_usd": settlement.cost_usd,
                           "reserved_usd": reservation.amount_usd,
                           "model": input.model, "prompt_tokens": input.prompt_tokens,
                           "completion_tokens": input.completion_tokens,
                           "message": format!(
                               "the actual cost {} USD passed the {} budget of {} USD (spent {} USD); further reservations are refused",
                               settlement.cost_usd, o.scope, o.limit_usd, o.spent_usd)}),
                )
                .step(step_key),
            );
        }
        let appended = append_events_in(&tx, scope.run, &events, scope.lease_token).await?;
        if appended.first().is_some_and(|a| !a.inserted) {
            // Recorded meanwhile by a writer that did not take the ledger lock first: undo the
            // settlement (rollback) and release the reservation; that record stands.
            drop(tx);
            tenancy::release(&self.db, reservation).await?;
            return Ok(false);
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn charge_unrecorded(
        &self,
        reservation: &tenancy::Reservation,
        input: &CostInput,
    ) -> Result<()> {
        let mut conn = self.db.get().await?;
        let tx = conn.transaction().await?;
        tenancy::settle_in_tx(&tx, reservation, input).await?;
        tx.commit().await?;
        Ok(())
    }

    /// [`step_model`](Self::step_model) with structured output parsed into `T`. Invalid JSON
    /// (or JSON of the wrong shape) records `output_invalid` and returns [`Error::Model`] of
    /// kind `invalid_output`.
    #[instrument(skip(self, request), fields(run = %scope.run, step_key), err)]
    pub async fn step_model_structured<T: serde::de::DeserializeOwned>(
        &self,
        scope: &RunScope,
        step_key: &str,
        request: &ModelRequest,
        policy: ReplayPolicy,
    ) -> Result<(T, ModelStep)> {
        if request.output_schema.is_none() {
            return Err(Error::invalid(
                "output_schema",
                "step_model_structured needs a request with an output schema (.output_schema(..))",
            ));
        }
        let step = self.step_model(scope, step_key, request, policy).await?;
        match step.response.parse_output::<T>() {
            Ok(v) => Ok((v, step)),
            Err(e) => {
                let s = RunScope {
                    run: step.run,
                    ..scope.clone()
                };
                self.record(
                    &s,
                    step_key,
                    "output_invalid",
                    json!({"kind": crate::model::error_kind::INVALID_OUTPUT,
                           "message": e.to_string()}),
                )
                .await?;
                Err(e)
            }
        }
    }

    /// The stable idempotency key of a tool step: the same for every attempt of `(run, step_key)`.
    pub fn idempotency_key(run: RunId, step_key: &str) -> String {
        let digest = Sha256::digest(format!("{run}\0{step_key}").as_bytes());
        format!("pgcrew-{}", &hex::encode(digest)[..32])
    }

    /// A durable tool call keyed by `(run, step_key)`, two-phase: `tool_requested` is recorded
    /// before the call and `tool_completed` / `tool_failed` after it.
    ///
    /// Before recording anything the tool must be registered ([`Error::NotFound`], recorded as
    /// `tool_rejected`), the arguments must match its input schema ([`Error::InvalidInput`],
    /// `tool_rejected`) and the tenant must hold its capability ([`Error::CapabilityDenied`],
    /// `capability_denied`); the tool does not run in those cases.
    ///
    /// A recorded completion is returned without running the tool; a recorded failure is
    /// returned as [`Error::ToolFailed`]. A handler returning [`ToolError::UnknownOutcome`], or
    /// a `tool_requested` with no outcome (a crash during the call), makes the step fail with
    /// [`Error::ToolOutcomeUnknown`] until [`reconcile_tool`](Self::reconcile_tool) settles it.
    #[instrument(skip(self, arguments), fields(run = %scope.run, step_key, tool), err)]
    pub async fn step_tool(
        &self,
        scope: &RunScope,
        step_key: &str,
        tool: &str,
        arguments: Value,
    ) -> Result<ToolStep> {
        validate_step_key(step_key)?;
        let key = Self::idempotency_key(scope.run, step_key);
        let events = self.step_events(scope.run, step_key).await?;
        if let Some(out) = recorded_outcome(&events, tool, &key)? {
            return Ok(out);
        }
        if events.iter().any(|e| e.event_type == "tool_requested") {
            return Err(Error::ToolOutcomeUnknown {
                tool: tool.to_string(),
                step_key: step_key.to_string(),
            });
        }
        let t = self.check_tool(scope, step_key, tool, &arguments).await?;
        let ev = NewEvent::new(
            "tool_requested",
            json!({"tool": tool, "arguments": arguments, "idempotency_key": key}),
        )
        .step(step_key)
        .idempotent();
        let appended = append_events(&self.db, scope.run, &[ev], scope.lease_token).await?;
        if appended.first().is_some_and(|a| !a.inserted) {
            // A concurrent attempt requested this call first: its outcome is not ours to know.
            return Err(Error::ToolOutcomeUnknown {
                tool: tool.to_string(),
                step_key: step_key.to_string(),
            });
        }
        self.invoke(scope, step_key, &t, arguments, key, false)
            .await
    }

    /// Settle a tool step whose outcome is unknown: call the tool again with the same arguments
    /// and idempotency key and `reconciliation = true`, and record the outcome. A step that
    /// already has a recorded completion returns it without running the tool.
    #[instrument(skip(self), fields(run = %scope.run, step_key), err)]
    pub async fn reconcile_tool(&self, scope: &RunScope, step_key: &str) -> Result<ToolStep> {
        validate_step_key(step_key)?;
        let key = Self::idempotency_key(scope.run, step_key);
        let events = self.step_events(scope.run, step_key).await?;
        let Some(req) = events.iter().find(|e| e.event_type == "tool_requested") else {
            return Err(Error::invalid(
                "step_key",
                format!(
                    "step `{step_key}` of run {} has no recorded tool call to reconcile",
                    scope.run
                ),
            ));
        };
        let tool = req
            .payload
            .get("tool")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if let Some(out) = recorded_outcome(&events, &tool, &key)? {
            return Ok(out);
        }
        let arguments = req.payload.get("arguments").cloned().unwrap_or(Value::Null);
        let t = self.check_tool(scope, step_key, &tool, &arguments).await?;
        self.invoke(scope, step_key, &t, arguments, key, true).await
    }

    async fn check_tool(
        &self,
        scope: &RunScope,
        step_key: &str,
        tool: &str,
        arguments: &Value,
    ) -> Result<Tool> {
        let Some(t) = self.tools.get(tool) else {
            let known = self.tools.names();
            self.record(
                scope,
                step_key,
                "tool_rejected",
                json!({"tool": tool, "reason": "unknown_tool",
                       "message": format!("no tool named `{tool}` is registered on this instance (registered: {known:?})")}),
            )
            .await?;
            return Err(Error::not_found("tool", tool));
        };
        if let Err(e) = t.validate_arguments(arguments) {
            self.record(
                scope,
                step_key,
                "tool_rejected",
                json!({"tool": tool, "reason": "invalid_arguments", "arguments": arguments,
                       "message": e.to_string()}),
            )
            .await?;
            return Err(e);
        }
        if let Err(e) =
            tenancy::require_capability(&self.db, &scope.tenant, tool, t.requires_capability())
                .await
        {
            if matches!(e, Error::CapabilityDenied { .. }) {
                self.record(
                    scope,
                    step_key,
                    "capability_denied",
                    json!({"tool": tool, "capability": t.requires_capability(),
                           "message": e.to_string()}),
                )
                .await?;
            }
            return Err(e);
        }
        Ok(t.clone())
    }

    async fn invoke(
        &self,
        scope: &RunScope,
        step_key: &str,
        t: &Tool,
        arguments: Value,
        key: String,
        reconciliation: bool,
    ) -> Result<ToolStep> {
        let ctx = ToolContext {
            run: scope.run,
            tenant: scope.tenant.clone(),
            step_key: step_key.to_string(),
            idempotency_key: key.clone(),
            reconciliation,
        };
        match t.call(ctx, arguments).await {
            Ok(output) => {
                let ev = NewEvent::new(
                    "tool_completed",
                    json!({"tool": t.name(), "output": output, "reconciled": reconciliation}),
                )
                .step(step_key)
                .idempotent();
                let appended = append_events(&self.db, scope.run, &[ev], scope.lease_token).await?;
                if appended.first().is_some_and(|a| !a.inserted) {
                    // A concurrent attempt recorded first: its outcome stands.
                    let events = self.step_events(scope.run, step_key).await?;
                    if let Some(out) = recorded_outcome(&events, t.name(), &key)? {
                        return Ok(out);
                    }
                }
                Ok(ToolStep {
                    output,
                    replayed: false,
                    reconciled: reconciliation,
                    idempotency_key: key,
                })
            }
            Err(ToolError::Failed(message)) => {
                self.record(
                    scope,
                    step_key,
                    "tool_failed",
                    json!({"tool": t.name(), "message": message, "reconciled": reconciliation}),
                )
                .await?;
                Err(Error::ToolFailed {
                    tool: t.name().to_string(),
                    message,
                })
            }
            Err(ToolError::UnknownOutcome(message)) => {
                self.record(
                    scope,
                    step_key,
                    "tool_outcome_unknown",
                    json!({"tool": t.name(), "message": message, "reconciled": reconciliation}),
                )
                .await?;
                Err(Error::ToolOutcomeUnknown {
                    tool: t.name().to_string(),
                    step_key: step_key.to_string(),
                })
            }
        }
    }
}

/// The recorded definitive outcome of a tool step, if any: `Ok(Some)` for a completion,
/// `Err(ToolFailed)` for a failure.
fn recorded_outcome(events: &[StepEvent], tool: &str, key: &str) -> Result<Option<ToolStep>> {
    for e in events.iter().rev() {
        match e.event_type.as_str() {
            "tool_completed" => {
                return Ok(Some(ToolStep {
                    output: e.payload.get("output").cloned().unwrap_or(Value::Null),
                    replayed: true,
                    reconciled: e
                        .payload
                        .get("reconciled")
                        .and_then(Value::as_bool)
                        .unwrap_or(false),
                    idempotency_key: key.to_string(),
                }));
            }
            "tool_failed" => {
                return Err(Error::ToolFailed {
                    tool: tool.to_string(),
                    message: e
                        .payload
                        .get("message")
                        .and_then(Value::as_str)
                        .unwrap_or("failed")
                        .to_string(),
                });
            }
            _ => {}
        }
    }
    Ok(None)
}

pub(crate) fn validate_step_key(step_key: &str) -> Result<()> {
    if step_key.is_empty() {
        return Err(Error::invalid("step key", "must not be empty"));
    }
    if step_key.len() > crate::runs::ledger::MAX_STEP_KEY_LEN {
        return Err(Error::invalid(
            "step key",
            format!(
                "is {} bytes long; at most {} are allowed",
                step_key.len(),
                crate::runs::ledger::MAX_STEP_KEY_LEN
            ),
        ));
    }
    if step_key.chars().any(char::is_control) {
        return Err(Error::invalid(
            "step key",
            "must not contain control characters",
        ));
    }
    Ok(())
}
