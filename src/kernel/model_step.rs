//! Model steps: a durable model call keyed by `(run, step_key)`. A step travels:
//! [`Kernel::step_model`] validates and fingerprints the request once (`PreparedRequest`) →
//! one read of the step's events with the tenant's budget status and degradation policy
//! (`StepState`) → a recorded step is replayed (`replay_model`: reject, allow drift or fork) →
//! else the degradation decision (`plan`: the one recorded for this request, or
//! [`tenancy::decide`] now) → `reserve_model` for the model and cap decided
//! (`budget_exceeded` when refused) → `budget_degraded` (when degraded) and `model_requested` in
//! one append → `call_model` (`model_failed` and a release on error) → `complete_model`
//! (`model_completed`, settlement and `budget_overrun` in one transaction). A skipped optional
//! step records `budget_degraded` only.

use serde_json::{Value, json};
use tracing::instrument;

use super::validate_step_key;
use super::{DEFAULT_RESERVE_MAX_TOKENS, Kernel, ReplayPolicy, RunScope, StepEvent};
use crate::db::Executor;
use crate::error::{Error, Result};
use crate::ids::RunId;
use crate::model::port::prompt_token_bound;
use crate::model::{ModelErrorKind, ModelRequest, ModelResponse};
use crate::runs::ledger::{after_append, check_events};
use crate::runs::{AppendedEvent, NewEvent, OutputPublisher, append_events, map_db_error};
use crate::tenancy::{
    self, BudgetStatus, CostInput, Decision, DegradationPolicy, Reservation, ReserveRequest,
    StepRequest,
};
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
    /// True when the tenant's degradation policy skipped this optional step
    /// ([`ModelRequest::optional`](crate::model::ModelRequest)): no model call was made and
    /// `response` is empty (no content, no tool calls, zero usage).
    pub skipped: bool,
    /// The degradation applied to this step (recorded as `budget_degraded`; on replay, the
    /// recorded one), `None` when it ran as requested.
    pub degradation: Option<Decision>,
}

impl ModelStep {
    /// A step answered from the ledger.
    fn replayed(
        run: RunId,
        response: ModelResponse,
        drift: bool,
        degradation: Option<Decision>,
    ) -> Self {
        Self {
            run,
            response,
            cost_usd: 0.0,
            replayed: true,
            drift,
            forked_from: None,
            skipped: false,
            degradation,
        }
    }

    /// A step skipped by `decision` (`replayed` when the skip was recorded earlier).
    fn skipped(run: RunId, decision: Decision, replayed: bool) -> Self {
        Self {
            run,
            response: ModelResponse {
                content: None,
                tool_calls: Vec::new(),
                usage: crate::model::Usage::default(),
                finish_reason: crate::model::FinishReason::Other,
                model: decision.model.clone(),
            },
            cost_usd: 0.0,
            replayed,
            drift: false,
            forked_from: None,
            skipped: true,
            degradation: Some(decision),
        }
    }
}

/// A model step's recorded events with its tenant's budget status and degradation policy, read
/// in one statement (`kernel/model_step_events`): deciding degradation costs no extra read.
struct StepState {
    events: Vec<StepEvent>,
    status: BudgetStatus,
    /// The stored policy, parsed only when a decision is taken.
    policy: Value,
}

/// What [`Kernel::begin_step`] found or did.
enum Begun {
    /// Nothing written: the step's state, for the general path.
    State(StepState),
    /// Reserved for the request as asked and `model_requested` appended: call the model.
    Started(Box<Reserved>),
}

/// A [`StepState`] from the rows of a step-state read (non-empty): the columns holding the
/// event's seq (NULL on the single row of a step with no event), type and payload, and the
/// tenant's budget status and degradation policy.
fn step_state_of(rows: &[tokio_postgres::Row], columns: [&str; 5]) -> Result<StepState> {
    let [seq, event_type, payload, status, policy] = columns;
    let Some(first) = rows.first() else {
        return Err(Error::Internal("a step-state read returned no row".into()));
    };
    let status: BudgetStatus = first.try_get(status)?;
    let policy: Value = first.try_get(policy)?;
    let mut events = Vec::with_capacity(rows.len());
    for r in rows {
        if let Some(seq) = r.try_get::<_, Option<i64>>(seq)? {
            events.push(StepEvent {
                seq,
                event_type: r.try_get(event_type)?,
                payload: r.try_get(payload)?,
            });
        }
    }
    Ok(StepState {
        events,
        status,
        policy,
    })
}

/// How a step that is not recorded as completed will run: the decision and whether it is new
/// (to be recorded as `budget_degraded`) or was recorded for this request before.
struct Plan {
    decision: Decision,
    record: bool,
}

/// The degradation decision recorded for the request with `fingerprint`, if the step already
/// started with it (a resume after a crash or a failed call, or a replay): the `budget_degraded`
/// recorded for that request (`Some(Some(_))`; without a `model_requested` it was a skip), or
/// `Some(None)` when it started undegraded (a `model_requested` of that request and no
/// `budget_degraded`: a decision, once recorded, is re-used, so none follows a start). `None`
/// when the request never started.
fn recorded_decision(events: &[StepEvent], fingerprint: &str) -> Option<Option<Decision>> {
    let mut started = false;
    for e in events.iter().rev() {
        if e.text("fingerprint") != fingerprint {
            continue;
        }
        if e.event_type == EventType::BudgetDegraded.as_str() {
            if let Ok(d) = serde_json::from_value::<Decision>(e.payload.clone()) {
                return Some(Some(d));
            }
        } else if e.event_type == EventType::ModelRequested.as_str() {
            started = true;
        }
    }
    started.then_some(None)
}

/// The `budget_degraded` payload: the decision (status, model, max_tokens, skip, applied rules,
/// reason) with what was requested and the request's fingerprint (a resume finds it by it).
fn degraded_payload(
    prepared: &PreparedRequest<'_>,
    requested: &StepRequest,
    d: &Decision,
) -> Value {
    let mut p = serde_json::to_value(d).unwrap_or_else(|_| json!({}));
    if let Some(o) = p.as_object_mut() {
        o.insert("requested_model".into(), json!(requested.model));
        o.insert("requested_max_tokens".into(), json!(requested.max_tokens));
        o.insert("optional".into(), json!(requested.optional));
        o.insert("fingerprint".into(), json!(prepared.fingerprint));
        o.insert("message".into(), json!(d.reason));
    }
    p
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
    /// The request as sent to the provider: the decided model and completion cap.
    sent: ModelRequest,
    prompt_tokens: u64,
    estimate: f64,
}

/// A request sized for its reservation ([`Kernel::size`]).
struct Sized {
    sent: ModelRequest,
    prompt_tokens: u64,
    estimate: f64,
    req: ReserveRequest,
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
    /// Degradation: before the reservation the tenant's degradation policy is applied at its
    /// budget status ([`tenancy::decide`]; status and policy come with the step's ledger read,
    /// no extra statement): the model may be switched, `max_tokens` capped (the reservation's
    /// worst case is priced for the model and cap actually sent) and an optional request
    /// ([`ModelRequest::optional`](crate::model::ModelRequest)) skipped. A decision that
    /// changes anything is recorded as `budget_degraded` in the same append as
    /// `model_requested` (alone for a skip) and is re-used, not taken again, when the step is
    /// resumed or replayed with the same request — whatever the status is by then. The
    /// fingerprint stays the caller's request; `model_requested`, `model_completed` and the
    /// cost entry name the model used.
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
        let state = match self.begin_step(scope, step_key, prepared).await? {
            Begun::State(state) => state,
            Begun::Started(reserved) => {
                let response = self
                    .call_model(scope, step_key, prepared, &reserved)
                    .await?;
                return self
                    .complete_model(scope, step_key, prepared, &reserved, response, None)
                    .await;
            }
        };
        let events = &state.events;
        match events
            .iter()
            .rev()
            .find(|e| e.event_type == EventType::ModelCompleted.as_str())
        {
            Some(done) => {
                self.replay_model(scope, step_key, prepared, &state, done, policy)
                    .await
            }
            None => self.execute_model(scope, step_key, prepared, &state).await,
        }
    }

    /// A step not recorded yet, for a tenant with no degradation rule active at its status,
    /// starts in one statement (`kernel/model_step_begin`, V040): the reservation for the
    /// request as asked and `model_requested`, under the lease. Anything else (a recorded or
    /// started step, a rule to apply, a model without a price) gets the step's state from the
    /// same statement, or from [`Self::step_state`], for the general path; nothing is written.
    async fn begin_step(
        &self,
        scope: &RunScope,
        step_key: &str,
        prepared: &PreparedRequest<'_>,
    ) -> Result<Begun> {
        let request = prepared.request;
        let max_tokens = request.max_tokens.unwrap_or(DEFAULT_RESERVE_MAX_TOKENS);
        let Ok(Sized {
            sent,
            prompt_tokens,
            estimate,
            req,
        }) = self.size(scope, request, &request.model, max_tokens)
        else {
            return Ok(Begun::State(self.step_state(scope, step_key).await?));
        };
        let id = uuid::Uuid::new_v4();
        let payload = self.requested_payload(prepared, &sent, estimate, id, prompt_tokens);
        let event = NewEvent::new(EventType::ModelRequested, payload).step(step_key);
        if req.validate().is_err() || check_events(&self.db, std::slice::from_ref(&event)).is_err()
        {
            return Ok(Begun::State(self.step_state(scope, step_key).await?));
        }
        let instance = self.instance.as_ref().map(ToString::to_string);
        let rows = self
            .db
            .query(
                sql!("kernel/model_step_begin"),
                typed![
                    &scope.run,
                    &scope.tenant,
                    &step_key,
                    &scope.lease_token,
                    &id,
                    &instance,
                    &sent.model,
                    &estimate,
                    &event.payload,
                ],
            )
            .await
            .map_err(|e| map_db_error(e, scope.run))?;
        let Some(first) = rows.first() else {
            return Err(Error::not_found("tenant", &scope.tenant));
        };
        let outcome: String = first.try_get("o_outcome")?;
        let figures = || -> Result<(f64, f64, f64)> {
            Ok((
                first
                    .try_get::<_, Option<f64>>("o_limit_usd")?
                    .unwrap_or(f64::INFINITY),
                first.try_get("o_spent_usd")?,
                first.try_get("o_reserved_usd")?,
            ))
        };
        match outcome.as_str() {
            "reserved" => {
                let appended = AppendedEvent {
                    seq: first.try_get("o_seq")?,
                    hash: first.try_get("o_hash")?,
                    created_at: first.try_get("o_created_at")?,
                    inserted: true,
                };
                after_append(&self.db, scope.run, &[appended]).await;
                Ok(Begun::Started(Box::new(Reserved {
                    reservation: Reservation {
                        id,
                        tenant_id: scope.tenant.clone(),
                        run_id: Some(scope.run),
                        instance_id: self.instance.clone(),
                        model: Some(sent.model.clone()),
                        amount_usd: first.try_get("o_amount_usd")?,
                        created_at: first.try_get("o_reserved_at")?,
                    },
                    sent,
                    prompt_tokens,
                    estimate,
                })))
            }
            "tenant_refused" | "run_refused" => {
                let (limit_usd, spent_usd, reserved_usd) = figures()?;
                let e = if outcome == "tenant_refused" {
                    Error::BudgetExceeded {
                        tenant: scope.tenant.to_string(),
                        limit_usd,
                        spent_usd,
                        reserved_usd,
                        requested_usd: estimate,
                    }
                } else {
                    Error::RunBudgetExceeded {
                        tenant: scope.tenant.to_string(),
                        run: scope.run.to_string(),
                        limit_usd,
                        spent_usd,
                        reserved_usd,
                        requested_usd: estimate,
                    }
                };
                let payload = budget_exceeded_payload(&e, &sent.model, estimate);
                self.record(scope, step_key, EventType::BudgetExceeded, payload)
                    .await?;
                Err(e)
            }
            _ => Ok(Begun::State(step_state_of(
                &rows,
                [
                    "o_event_seq",
                    "o_event_type",
                    "o_event_payload",
                    "o_budget_status",
                    "o_degradation_policy",
                ],
            )?)),
        }
    }

    /// `request` as sent with `model` and the completion cap `max_tokens`, its prompt's upper
    /// bound, its worst-case cost (an error for a model without a price) and the reservation
    /// request for that cost: what both ways of starting a step reserve.
    fn size(
        &self,
        scope: &RunScope,
        request: &ModelRequest,
        model: &str,
        max_tokens: u32,
    ) -> Result<Sized> {
        let mut sent = request.clone();
        sent.model = model.to_string();
        sent.max_tokens = Some(max_tokens);
        let prompt_tokens = prompt_token_bound(&sent);
        let estimate =
            self.prices
                .worst_case_cost(&sent.model, prompt_tokens, u64::from(max_tokens))?;
        let mut req = ReserveRequest::new(scope.tenant.clone(), estimate)
            .run(scope.run)
            .model(sent.model.clone());
        if let Some(i) = &self.instance {
            req = req.instance(i.clone());
        }
        Ok(Sized {
            sent,
            prompt_tokens,
            estimate,
            req,
        })
    }

    /// The payload of `model_requested` for `sent` (as sent: model and completion cap).
    fn requested_payload(
        &self,
        prepared: &PreparedRequest<'_>,
        sent: &ModelRequest,
        estimate: f64,
        reservation_id: uuid::Uuid,
        prompt_tokens: u64,
    ) -> Value {
        json!({"model": sent.model,
               "fingerprint": prepared.fingerprint,
               "estimate_usd": estimate,
               "reservation_id": reservation_id,
               "prompt_token_bound": prompt_tokens,
               "max_tokens": sent.max_tokens,
               "messages": prepared.request.messages.len(), "port": self.model.name()})
    }

    /// The step's events and the tenant's budget status and degradation policy, in one read.
    async fn step_state(&self, scope: &RunScope, step_key: &str) -> Result<StepState> {
        let conn = self.db.get().await?;
        let rows = conn
            .query(
                sql!("kernel/model_step_events"),
                typed![&scope.run, &step_key, &scope.tenant],
            )
            .await?;
        if rows.is_empty() {
            return Err(Error::not_found("tenant", &scope.tenant));
        }
        step_state_of(
            &rows,
            [
                "seq",
                "event_type",
                "payload",
                "budget_status",
                "degradation_policy",
            ],
        )
    }

    /// The decision a step that has not completed runs with: the one recorded for this request
    /// when it started before (resume), else the tenant's policy at its status now.
    fn plan(state: &StepState, prepared: &PreparedRequest<'_>) -> Result<(StepRequest, Plan)> {
        let request = prepared.request;
        let asked = StepRequest {
            model: request.model.clone(),
            max_tokens: request.max_tokens.unwrap_or(DEFAULT_RESERVE_MAX_TOKENS),
            optional: request.optional,
        };
        let plan = match recorded_decision(&state.events, &prepared.fingerprint) {
            Some(Some(decision)) => Plan {
                decision,
                record: false,
            },
            Some(None) => Plan {
                decision: tenancy::decide(&DegradationPolicy::default(), state.status, &asked),
                record: false,
            },
            None => {
                let policy: DegradationPolicy = serde_json::from_value(state.policy.clone())?;
                let decision = tenancy::decide(&policy, state.status, &asked);
                let record = decision.degraded();
                Plan { decision, record }
            }
        };
        Ok((asked, plan))
    }

    /// Answer a recorded step from the ledger; a changed fingerprint is handled by `policy`.
    async fn replay_model(
        &self,
        scope: &RunScope,
        step_key: &str,
        prepared: &PreparedRequest<'_>,
        state: &StepState,
        done: &StepEvent,
        policy: ReplayPolicy,
    ) -> Result<ModelStep> {
        let first_seq = state.events.first().map_or(done.seq, |e| e.seq);
        let fingerprint = &prepared.fingerprint;
        let recorded_fp = done.text("fingerprint");
        let response: ModelResponse =
            serde_json::from_value(done.payload.get("response").cloned().unwrap_or(Value::Null))?;
        let degradation = recorded_decision(&state.events, &recorded_fp).flatten();
        if &recorded_fp == fingerprint {
            return Ok(ModelStep::replayed(scope.run, response, false, degradation));
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
                Ok(ModelStep::replayed(scope.run, response, true, degradation))
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

    /// Execution of a step not recorded as completed: decide degradation, reserve, record the
    /// decision and the request, call, record the completion.
    async fn execute_model(
        &self,
        scope: &RunScope,
        step_key: &str,
        prepared: &PreparedRequest<'_>,
        state: &StepState,
    ) -> Result<ModelStep> {
        let (asked, plan) = Self::plan(state, prepared)?;
        let decision = plan.decision;
        let degraded_event = plan.record.then(|| {
            NewEvent::new(
                EventType::BudgetDegraded,
                degraded_payload(prepared, &asked, &decision),
            )
            .step(step_key)
        });
        if decision.skip {
            if let Some(ev) = degraded_event {
                append_events(&self.db, scope.run, &[ev], scope.lease_token).await?;
            }
            return Ok(ModelStep::skipped(scope.run, decision, !plan.record));
        }
        let reserved = self
            .reserve_model(scope, step_key, prepared.request, &decision)
            .await?;
        let mut requested_payload = self.requested_payload(
            prepared,
            &reserved.sent,
            reserved.estimate,
            reserved.reservation.id,
            reserved.prompt_tokens,
        );
        if decision.degraded() {
            requested_payload["requested_model"] = json!(asked.model);
        }
        let mut events: Vec<NewEvent> = degraded_event.into_iter().collect();
        events.push(NewEvent::new(EventType::ModelRequested, requested_payload).step(step_key));
        // The decision and the step's start in one append (one statement, one transaction).
        let requested = append_events(&self.db, scope.run, &events, scope.lease_token).await;
        if let Err(e) = requested {
            let _ = tenancy::release(&self.db, &reserved.reservation).await;
            return Err(e);
        }
        let response = self
            .call_model(scope, step_key, prepared, &reserved)
            .await?;
        let degradation = decision.degraded().then_some(decision);
        self.complete_model(scope, step_key, prepared, &reserved, response, degradation)
            .await
    }

    /// Reserve the worst-case cost of `request` as `decision` sends it (its model and
    /// completion cap); a refusal records `budget_exceeded`.
    async fn reserve_model(
        &self,
        scope: &RunScope,
        step_key: &str,
        request: &ModelRequest,
        decision: &Decision,
    ) -> Result<Reserved> {
        let max_tokens = decision.max_tokens;
        let Sized {
            sent,
            prompt_tokens,
            estimate,
            req,
        } = self.size(scope, request, &decision.model, max_tokens)?;
        match tenancy::reserve(&self.db, &req).await {
            Ok(reservation) => Ok(Reserved {
                reservation,
                sent,
                prompt_tokens,
                estimate,
            }),
            Err(e) if e.is_budget_exceeded() => {
                let mut payload = budget_exceeded_payload(&e, &sent.model, estimate);
                if decision.degraded() {
                    payload["requested_model"] = json!(request.model);
                    payload["degradation"] = json!(decision.reason);
                }
                self.record(scope, step_key, EventType::BudgetExceeded, payload)
                    .await?;
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// Call the model with the reserved model and completion cap. The fingerprint stays the
    /// caller's request (replays stay stable); the provider gets the cap, so it cannot produce
    /// more than was reserved. A failure releases the reservation and records `model_failed`.
    async fn call_model(
        &self,
        scope: &RunScope,
        step_key: &str,
        prepared: &PreparedRequest<'_>,
        reserved: &Reserved,
    ) -> Result<ModelResponse> {
        let started = std::time::Instant::now();
        let model = reserved.sent.model.as_str();
        let e = match self.call_port(scope, step_key, &reserved.sent).await {
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
            json!({"model": model, "fingerprint": prepared.fingerprint,
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
        reserved: &Reserved,
        response: ModelResponse,
        degradation: Option<Decision>,
    ) -> Result<ModelStep> {
        let reservation = &reserved.reservation;
        let model = &reserved.sent.model;
        let cost = self.prices.cost(
            model,
            response.usage.prompt_tokens,
            response.usage.completion_tokens,
        )?;
        crate::telemetry::global().model_usage(
            model,
            response.usage.prompt_tokens,
            response.usage.completion_tokens,
            cost,
        );
        let input = CostInput::llm(
            model.clone(),
            response.usage.prompt_tokens,
            response.usage.completion_tokens,
            cost,
        )
        .step(step_key);
        let mut payload = json!({"model": model, "fingerprint": prepared.fingerprint,
               "response": response, "usage": response.usage, "cost_usd": cost,
               "output": response.content});
        if degradation.is_some() {
            payload["requested_model"] = json!(prepared.request.model);
        }
        let ev = NewEvent::new(EventType::ModelCompleted, payload)
            .step(step_key)
            .idempotent();
        let recorded = match self
            .end_step(scope, step_key, &ev, reservation, &input)
            .await
        {
            Ok(Some(done)) => Ok(done),
            Ok(None) => {
                self.record_completion(scope, step_key, ev, reservation, &input)
                    .await
            }
            Err(e) => Err(e),
        };
        match recorded {
            Ok(true) => Ok(ModelStep {
                run: scope.run,
                response,
                cost_usd: cost,
                replayed: false,
                drift: false,
                forked_from: None,
                skipped: false,
                degradation,
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

    /// Record `model_completed` and settle in one statement (`kernel/model_step_end`, V040):
    /// `Some(true)` when recorded, `Some(false)` when the step was recorded meanwhile (the
    /// reservation is then released and nothing charged), `None` when nothing was written
    /// because the settlement would pass a limit (or the tenant or run is unknown):
    /// [`Self::record_completion`] then records it with its `budget_overrun`.
    async fn end_step(
        &self,
        scope: &RunScope,
        step_key: &str,
        ev: &NewEvent,
        reservation: &Reservation,
        input: &CostInput,
    ) -> Result<Option<bool>> {
        let Ok((prompt_tokens, completion_tokens)) = input.validate() else {
            return Ok(None);
        };
        if check_events(&self.db, std::slice::from_ref(ev)).is_err() {
            return Ok(None);
        }
        let row = self
            .db
            .query_one(
                sql!("kernel/model_step_end"),
                typed![
                    &scope.run,
                    &scope.tenant,
                    &step_key,
                    &scope.lease_token,
                    &reservation.id,
                    &input.cost_usd,
                    &input.category.as_str(),
                    &input.model,
                    &prompt_tokens,
                    &completion_tokens,
                    &ev.payload,
                ],
            )
            .await;
        let row = match row {
            Ok(row) => row,
            Err(e) => {
                let meanwhile = matches!(&e, Error::Database(d)
                    if crate::sqlstate::of(d) == Some(crate::sqlstate::STEP_RECORDED_MEANWHILE));
                if meanwhile {
                    tenancy::release(&self.db, reservation).await?;
                    return Ok(Some(false));
                }
                return Err(map_db_error(e, scope.run));
            }
        };
        let outcome: String = row.try_get("o_outcome")?;
        match outcome.as_str() {
            "completed" => {
                let appended = AppendedEvent {
                    seq: row.try_get("o_seq")?,
                    hash: row.try_get("o_hash")?,
                    created_at: row.try_get("o_created_at")?,
                    inserted: true,
                };
                after_append(&self.db, scope.run, &[appended]).await;
                Ok(Some(true))
            }
            "recorded" => Ok(Some(false)),
            _ => Ok(None),
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
        if request.optional {
            return Err(Error::invalid(
                "optional",
                "an optional step may be skipped and then has no output to parse: use step_model and check ModelStep::skipped",
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
