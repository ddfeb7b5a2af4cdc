//! Model steps: a durable model call keyed by `(run, step_key)`. A step travels:
//! [`Kernel::step_model`] validates and fingerprints the request once (`PreparedRequest`) →
//! a recorded step is replayed (`replay_model`: reject, allow drift or fork) → else
//! `reserve_model` (`budget_exceeded` when refused) → `model_requested` →
//! `call_model` (`model_failed` and a release on error) → `complete_model`
//! (`model_completed`, settlement and `budget_overrun` in one transaction).

use serde_json::{Value, json};
use tracing::instrument;

use super::validate_step_key;
use super::{DEFAULT_RESERVE_MAX_TOKENS, Kernel, ReplayPolicy, RunScope, StepEvent};
use crate::db::Executor;
use crate::error::{Error, Result};
use crate::ids::RunId;
use crate::model::port::prompt_token_bound;
use crate::model::{ModelErrorKind, ModelRequest, ModelResponse};
use crate::runs::{NewEvent, OutputPublisher, append_events};
use crate::tenancy::{self, CostInput, Reservation, ReserveRequest};
use crate::vocab::EventType;

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

impl ModelStep {
    /// A step answered from the ledger.
    fn replayed(run: RunId, response: ModelResponse, drift: bool) -> Self {
        Self {
            run,
            response,
            cost_usd: 0.0,
            replayed: true,
            drift,
            forked_from: None,
        }
    }
}

/// A model request validated and fingerprinted once per step: every later phase (replay,
/// fork, execution, the retry after a concurrent record) uses this fingerprint.
struct PreparedRequest<'a> {
    request: &'a ModelRequest,
    fingerprint: String,
}

impl<'a> PreparedRequest<'a> {
    fn new(request: &'a ModelRequest) -> Result<Self> {
        request.validate()?;
        let fingerprint = request.fingerprint()?;
        Ok(Self {
            request,
            fingerprint,
        })
    }
}

/// What a model step reserved for: the prompt's upper bound and the completion cap sent to
/// the provider, priced at their worst case.
struct Reserved {
    reservation: Reservation,
    prompt_tokens: u64,
    max_tokens: u32,
    estimate: f64,
}

impl Kernel {
    /// A durable model call keyed by `(run, step_key)`.
    ///
    /// First execution: reserve the worst-case cost (the prompt's upper bound
    /// [`prompt_token_bound`] + `max_tokens`, or
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
        let prepared = PreparedRequest::new(request)?;
        self.model_step(scope, step_key, &prepared, policy).await
    }

    /// Replay the step if it is recorded, execute it otherwise.
    async fn model_step(
        &self,
        scope: &RunScope,
        step_key: &str,
        prepared: &PreparedRequest<'_>,
        policy: ReplayPolicy,
    ) -> Result<ModelStep> {
        let events = self.step_events(scope.run, step_key).await?;
        match events
            .iter()
            .rev()
            .find(|e| e.event_type == EventType::ModelCompleted.as_str())
        {
            Some(done) => {
                let first_seq = events.first().map_or(done.seq, |e| e.seq);
                self.replay_model(scope, step_key, prepared, done, first_seq, policy)
                    .await
            }
            None => self.execute_model(scope, step_key, prepared).await,
        }
    }

    /// Answer a recorded step from the ledger; a changed fingerprint is handled by `policy`.
    async fn replay_model(
        &self,
        scope: &RunScope,
        step_key: &str,
        prepared: &PreparedRequest<'_>,
        done: &StepEvent,
        first_seq: i64,
        policy: ReplayPolicy,
    ) -> Result<ModelStep> {
        let fingerprint = &prepared.fingerprint;
        let recorded_fp = done.text("fingerprint");
        let response: ModelResponse =
            serde_json::from_value(done.payload.get("response").cloned().unwrap_or(Value::Null))?;
        if &recorded_fp == fingerprint {
            return Ok(ModelStep::replayed(scope.run, response, false));
        }
        match policy {
            ReplayPolicy::Strict => {
                let message = format!(
                    "the recorded request fingerprint {recorded_fp} differs from the current {fingerprint} (the prompt, model, options, tools or output schema changed); use allow_prompt_drift or fork_on_drift to replay anyway"
                );
                self.record(
                    scope,
                    step_key,
                    EventType::ReplayRejected,
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
                    EventType::ReplayedWithDrift,
                    json!({"recorded_fingerprint": recorded_fp, "fingerprint": fingerprint}),
                )
                .await?;
                Ok(ModelStep::replayed(scope.run, response, true))
            }
            ReplayPolicy::ForkOnDrift => {
                // A fork made earlier for this step (say, by an attempt that crashed before it
                // could go on in it) is continued: its step replays, or executes if it never
                // completed there, so the drifted call is made and charged once.
                let fork = match self.existing_fork(scope, first_seq).await? {
                    Some(f) => f,
                    None => self.fork_run(scope, first_seq).await?,
                };
                let fork_scope = RunScope::new(fork, scope.tenant.clone());
                let mut step = Box::pin(self.model_step(
                    &fork_scope,
                    step_key,
                    prepared,
                    ReplayPolicy::ForkOnDrift,
                ))
                .await?;
                step.drift = true;
                step.forked_from = Some(scope.run);
                Ok(step)
            }
        }
    }

    /// First execution of a step: reserve, record the request, call, record the completion.
    async fn execute_model(
        &self,
        scope: &RunScope,
        step_key: &str,
        prepared: &PreparedRequest<'_>,
    ) -> Result<ModelStep> {
        let reserved = self
            .reserve_model(scope, step_key, prepared.request)
            .await?;
        let requested = self
            .record(
                scope,
                step_key,
                EventType::ModelRequested,
                json!({"model": prepared.request.model, "fingerprint": prepared.fingerprint,
                       "estimate_usd": reserved.estimate,
                       "reservation_id": reserved.reservation.id,
                       "prompt_token_bound": reserved.prompt_tokens,
                       "max_tokens": reserved.max_tokens,
                       "messages": prepared.request.messages.len(), "port": self.model.name()}),
            )
            .await;
        if let Err(e) = requested {
            let _ = tenancy::release(&self.db, &reserved.reservation).await;
            return Err(e);
        }
        let response = self
            .call_model(scope, step_key, prepared, &reserved)
            .await?;
        self.complete_model(scope, step_key, prepared, &reserved.reservation, response)
            .await
    }

    /// Reserve the worst-case cost of `request`; a refusal records `budget_exceeded`.
    async fn reserve_model(
        &self,
        scope: &RunScope,
        step_key: &str,
        request: &ModelRequest,
    ) -> Result<Reserved> {
        let prompt_tokens = prompt_token_bound(request);
        let max_tokens = request.max_tokens.unwrap_or(DEFAULT_RESERVE_MAX_TOKENS);
        let estimate =
            self.prices
                .worst_case_cost(&request.model, prompt_tokens, u64::from(max_tokens))?;
        let mut req = ReserveRequest::new(scope.tenant.clone(), estimate)
            .run(scope.run)
            .model(request.model.clone());
        if let Some(i) = &self.instance {
            req = req.instance(i.clone());
        }
        match tenancy::reserve(&self.db, &req).await {
            Ok(reservation) => Ok(Reserved {
                reservation,
                prompt_tokens,
                max_tokens,
                estimate,
            }),
            Err(e) if e.is_budget_exceeded() => {
                let payload = budget_exceeded_payload(&e, &request.model, estimate);
                self.record(scope, step_key, EventType::BudgetExceeded, payload)
                    .await?;
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// Call the model with the reserved completion cap. The fingerprint stays the caller's
    /// request (replays stay stable); the provider gets the cap, so it cannot produce more than
    /// was reserved. A failure releases the reservation and records `model_failed`.
    async fn call_model(
        &self,
        scope: &RunScope,
        step_key: &str,
        prepared: &PreparedRequest<'_>,
        reserved: &Reserved,
    ) -> Result<ModelResponse> {
        let mut capped = prepared.request.clone();
        capped.max_tokens = Some(reserved.max_tokens);
        let started = std::time::Instant::now();
        let model = prepared.request.model.as_str();
        let e = match self.call_port(scope, step_key, &capped).await {
            Ok(r) => {
                crate::telemetry::global().model_call(model, "ok", started.elapsed());
                return Ok(r);
            }
            Err(e) => e,
        };
        let kind = match &e {
            Error::Model { kind, .. } => kind.as_str(),
            Error::InvalidInput { .. } => ModelErrorKind::InvalidRequest.as_str(),
            _ => "other",
        };
        crate::telemetry::global().model_call(model, kind, started.elapsed());
        let mut conn = self.db.get().await?;
        let tx = conn.transaction().await?;
        // Lock order: ledger lock, tenant row, run row (see kernel/lock_run.sql).
        tx.execute(sql!("kernel/lock_run"), typed![&scope.run])
            .await?;
        tenancy::release(&tx, &reserved.reservation).await?;
        let ev = NewEvent::new(
            EventType::ModelFailed,
            json!({"model": prepared.request.model, "fingerprint": prepared.fingerprint,
                   "kind": kind, "message": e.to_string()}),
        )
        .step(step_key);
        append_events(&tx, scope.run, &[ev], scope.lease_token).await?;
        tx.commit().await?;
        Err(e)
    }

    /// One call of the model port: streamed, with its output published live, when the kernel
    /// streams ([`Kernel::with_streaming`]); the final output is the same either way.
    async fn call_port(
        &self,
        scope: &RunScope,
        step_key: &str,
        request: &ModelRequest,
    ) -> Result<ModelResponse> {
        if !self.streaming {
            return self.model.complete(request).await;
        }
        let publisher = OutputPublisher::start(self.db.clone(), scope.run, step_key);
        let sink = publisher.sink();
        let result = self.model.stream(request, &sink).await;
        publisher.finish(result.is_ok()).await;
        result
    }

    /// Price the response and record `model_completed` with the settlement; a step recorded
    /// meanwhile by another attempt is answered from that record.
    async fn complete_model(
        &self,
        scope: &RunScope,
        step_key: &str,
        prepared: &PreparedRequest<'_>,
        reservation: &Reservation,
        response: ModelResponse,
    ) -> Result<ModelStep> {
        let request = prepared.request;
        let cost = self.prices.cost(
            &request.model,
            response.usage.prompt_tokens,
            response.usage.completion_tokens,
        )?;
        crate::telemetry::global().model_usage(
            &request.model,
            response.usage.prompt_tokens,
            response.usage.completion_tokens,
            cost,
        );
        let input = CostInput::llm(
            request.model.clone(),
            response.usage.prompt_tokens,
            response.usage.completion_tokens,
            cost,
        )
        .step(step_key);
        let ev = NewEvent::new(
            EventType::ModelCompleted,
            json!({"model": request.model, "fingerprint": prepared.fingerprint,
                   "response": response, "usage": response.usage, "cost_usd": cost,
                   "output": response.content}),
        )
        .step(step_key)
        .idempotent();
        match self
            .record_completion(scope, step_key, ev, reservation, &input)
            .await
        {
            Ok(true) => Ok(ModelStep {
                run: scope.run,
                response,
                cost_usd: cost,
                replayed: false,
                drift: false,
                forked_from: None,
            }),
            // Another attempt recorded this step concurrently: its record stands.
            Ok(false) => {
                Box::pin(self.model_step(scope, step_key, prepared, ReplayPolicy::Strict)).await
            }
            Err(e) => {
                // The call was made and paid for even though it could not be recorded (for
                // example the run lease was lost): charge it so the budget stays truthful.
                if let Err(e2) = self.charge_unrecorded(reservation, &input).await {
                    tracing::warn!(error = %e2, "could not charge an unrecorded model call");
                }
                Err(e)
            }
        }
    }

    /// Record `model_completed` and settle in one transaction; `Ok(false)` when the step was
    /// already recorded (the reservation is then released and nothing charged). A settlement
    /// that takes a budget past its limit also records `budget_overrun` in that transaction.
    async fn record_completion(
        &self,
        scope: &RunScope,
        step_key: &str,
        ev: NewEvent,
        reservation: &Reservation,
        input: &CostInput,
    ) -> Result<bool> {
        let mut conn = self.db.get().await?;
        let tx = conn.transaction().await?;
        // Lock order: the run's ledger lock, then (settle) the tenant row and the run row, then
        // the appends (whose run-row update is then already ours). Reservations lock the tenant
        // row then the run row and appends the ledger lock then the run row, so this order
        // cannot deadlock with concurrent steps of the same run.
        tx.execute(sql!("kernel/lock_run"), typed![&scope.run])
            .await?;
        let done: bool = tx
            .query_one(sql!("kernel/step_completed"), typed![&scope.run, &step_key])
            .await?
            .try_get("done")?;
        if done {
            tenancy::release(&tx, reservation).await?;
            tx.commit().await?;
            return Ok(false);
        }
        let settlement = tenancy::settle(&tx, reservation, input).await?;
        let mut events = vec![ev];
        for o in &settlement.overruns {
            events.push(
                NewEvent::new(
                    EventType::BudgetOverrun,
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
        let appended = append_events(&tx, scope.run, &events, scope.lease_token).await?;
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

    async fn charge_unrecorded(&self, reservation: &Reservation, input: &CostInput) -> Result<()> {
        let mut conn = self.db.get().await?;
        let tx = conn.transaction().await?;
        tenancy::settle(&tx, reservation, input).await?;
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
                    EventType::OutputInvalid,
                    json!({"kind": ModelErrorKind::InvalidOutput.as_str(),
                           "message": e.to_string()}),
                )
                .await?;
                Err(e)
            }
        }
    }
}

/// The `budget_exceeded` payload of a refused reservation: which budget (`run` or `tenant`)
/// refused, its limit (`null` when unlimited), what was spent and reserved, and the request.
fn budget_exceeded_payload(e: &Error, model: &str, estimate: f64) -> Value {
    let (scope_name, limit_usd, spent_usd, reserved_usd, requested_usd) = match e {
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
    json!({"model": model, "scope": scope_name,
           "estimate_usd": requested_usd,
           "limit_usd": limit, "spent_usd": spent_usd,
           "reserved_usd": reserved_usd, "message": e.to_string()})
}
