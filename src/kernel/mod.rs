//! The durable kernel: model steps with budget reserve/settle and replay policies, two-phase
//! tool steps with reconciliation, and checkpointed workflow steps. Every step is keyed by
//! `(run, step_key)` and recorded in the run's hash-chained ledger, so a run resumed after a
//! crash (on any instance) replays recorded steps instead of repeating model calls or tools.
//!
//! Ledger events written here (all carry the step key; [`crate::vocab::EventType`] names them):
//! `model_requested`, `model_completed`, `model_failed`, `budget_exceeded`, `budget_overrun`,
//! `budget_degraded` (a tenant's degradation rules changed a model step), `replayed_with_drift`, `replay_rejected`, `run_forked`, `tool_requested`, `tool_completed`,
//! `tool_failed`, `tool_outcome_unknown`, `tool_rejected`, `capability_denied`,
//! `output_invalid`, `workflow_step_completed`, `workflow_step_failed`, `workflow_completed`,
//! and for durable waits ([`wait`]) `wait_started`, `signal_received`, `wait_timed_out`.
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
use serde_json::Value;

use crate::db::Db;
use crate::db::Executor;
use crate::error::{Error, Result};
use crate::ids::{InstanceId, RunId, TenantId};
use crate::model::{ModelPort, PriceTable};
use crate::runs::{NewEvent, append_events};
use crate::vocab::EventType;

mod fork;
pub mod harness;
mod model_step;
pub mod schema;
pub mod tool;
mod tool_step;
pub mod wait;
pub mod workflow;

pub use harness::{Harness, HarnessReport, UnitCtx};
pub use model_step::ModelStep;
pub use tool::{Tool, ToolBuilder, ToolContext, ToolError, ToolRegistry, validate_tool_name};
pub use tool_step::ToolStep;
pub use wait::{OnTimeout, WaitOutcome};
pub use workflow::{WorkflowCtx, waiting_outcome};

/// `max_tokens` reserved for — and sent to the provider as the completion cap — when a request
/// does not set one.
pub const DEFAULT_RESERVE_MAX_TOKENS: u32 = 4096;

crate::vocab! {
    /// What to do when a recorded model step is replayed with a request whose fingerprint
    /// differs from the recorded one. Stored per agent in `pgcrew.agents.replay_policy`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
    #[serde(rename_all = "snake_case")]
    pub enum ReplayPolicy {
        /// Fail with [`Error::ReplayConsistency`] (and record `replay_rejected`).
        #[default]
        Strict = "strict",
        /// Return the recorded output and record `replayed_with_drift`.
        AllowPromptDrift = "allow_prompt_drift",
        /// Fork a new run carrying the parent's step events before this step
        /// (`parent_run_id`, `forked_at_seq`) and execute the step there. The same drift of the
        /// same step forks once: a later replay finds that fork and continues in it.
        ForkOnDrift = "fork_on_drift",
    }
}

impl std::str::FromStr for ReplayPolicy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::from_name(s.trim()).ok_or_else(|| {
            Error::invalid(
                "replay_policy",
                format!("`{s}` is not one of strict, allow_prompt_drift, fork_on_drift"),
            )
        })
    }
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

/// One recorded event of a step.
#[derive(Debug, Clone)]
pub(crate) struct StepEvent {
    pub(crate) seq: i64,
    pub(crate) event_type: String,
    pub(crate) payload: Value,
}

impl StepEvent {
    /// The payload's text field `field` (empty when absent or not text).
    pub(crate) fn text(&self, field: &str) -> String {
        self.payload
            .get(field)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    }
}

/// The durable kernel (see the [module docs](self)). Cheap to clone.
#[derive(Clone)]
pub struct Kernel {
    db: Db,
    model: Arc<dyn ModelPort>,
    prices: Arc<PriceTable>,
    tools: Arc<ToolRegistry>,
    instance: Option<InstanceId>,
    streaming: bool,
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
            streaming: false,
        }
    }

    /// Stream model calls ([`ModelPort::stream`]): while a model step runs, its output reaches
    /// [`runs::subscribe_output`](crate::runs::subscribe_output) on this instance and
    /// [`runs::listen_output`](crate::runs::listen_output) on any instance. What is recorded
    /// (`model_completed`) and charged is the same as without streaming. Default: off.
    pub fn with_streaming(mut self) -> Self {
        self.streaming = true;
        self
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
            .query(sql!("kernel/step_events"), typed![&run, &step_key])
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
        event_type: EventType,
        payload: Value,
    ) -> Result<()> {
        let ev = NewEvent::new(event_type, payload).step(step_key);
        append_events(&self.db, scope.run, &[ev], scope.lease_token).await?;
        Ok(())
    }
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
