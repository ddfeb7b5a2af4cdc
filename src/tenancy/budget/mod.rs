//! USD budgets: reserve before a model call, settle after it.
//!
//! * [`reserve`] checks and reserves the worst-case cost with ONE conditional `UPDATE` of the
//!   tenant row (`spent + reserved + estimate <= limit`), so concurrent reservations can never
//!   overcommit the budget; the optional per-run budget is checked the same way in the same
//!   transaction (its own when given the pool, the caller's when given a transaction: see
//!   [`crate::db::Acquire`]). Each reservation is a row in `pgcrew.budget_reservations`, tagged with the
//!   instance that made it.
//! * [`settle`] runs in the CALLER's transaction (the one that writes the
//!   `model_completed` event): it deletes the reservation, releases its amount, adds the actual
//!   cost to the tenant's (and run's) spend and inserts the `pgcrew.cost_entries` row, in one
//!   statement. Amounts are `numeric` rounded once to 10 decimals, so
//!   `sum(cost_entries.cost_usd) = tenants.spent_usd` exactly.
//!   A cost is charged in full even when it takes spend past a limit (it was really spent): the
//!   [`Settlement`] then lists a [`BudgetOverrun`], the tenant's status is EXCEEDED and every
//!   further reservation is refused until the limit is raised (the kernel records a
//!   `budget_overrun` ledger event on the run).
//! * Money reaching the database is checked there too: `pgcrew.money_amount` refuses NaN,
//!   infinite and negative amounts (SQLSTATE PC030, mapped to [`Error::InvalidInput`]) and CHECK
//!   constraints (V012) refuse them in every money column, whoever writes.
//! * [`release`] drops a reservation without charging (the call failed before costing anything).
//! * [`ReleaseOrphanedReservations`] (a leader maintenance step) releases reservations whose
//!   instance is gone or that are older than a timeout.
//!
//! Lock order: reservation row, tenant row, run row. A caller that settles and appends ledger
//! events in one transaction must take the run's ledger lock (`pgcrew.lock_run`) first, settle,
//! and append afterwards — as the kernel does — because an append updates the run row: appending
//! first and settling second can deadlock with a concurrent reservation for the same run (which
//! holds the tenant row and waits for the run row).

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::ids::{InstanceId, RunId, TenantId, validate_text_id};
use crate::tenancy::status::BudgetStatus;
use crate::tenancy::tenants::validate_budget;

mod settle;

pub use super::maintenance::ReleaseOrphanedReservations;
pub use settle::{charge, release, reserve, set_run_budget, settle};

/// What a cost was spent on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CostCategory {
    /// Model calls.
    Llm,
    /// Tool calls.
    Tool,
    /// Retrieval (embeddings, vector search).
    Retrieval,
    /// Storage.
    Storage,
    /// Anything else.
    Other,
}

impl CostCategory {
    /// The stored name.
    pub fn as_str(&self) -> &'static str {
        match self {
            CostCategory::Llm => "llm",
            CostCategory::Tool => "tool",
            CostCategory::Retrieval => "retrieval",
            CostCategory::Storage => "storage",
            CostCategory::Other => "other",
        }
    }
}

impl fmt::Display for CostCategory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CostCategory {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "llm" => Ok(CostCategory::Llm),
            "tool" => Ok(CostCategory::Tool),
            "retrieval" => Ok(CostCategory::Retrieval),
            "storage" => Ok(CostCategory::Storage),
            "other" => Ok(CostCategory::Other),
            _ => Err(Error::invalid(
                "cost category",
                format!("`{s}` is not one of llm, tool, retrieval, storage, other"),
            )),
        }
    }
}

/// A reservation request: who reserves how much for what.
#[derive(Debug, Clone, PartialEq)]
pub struct ReserveRequest {
    /// The tenant charged.
    pub tenant_id: TenantId,
    /// The run (must belong to the tenant); its per-run budget is checked too.
    pub run_id: Option<RunId>,
    /// The instance making the call (reservations of instances that disappear are released by
    /// maintenance). `None`: only the age timeout releases it.
    pub instance_id: Option<InstanceId>,
    /// The model, for operators.
    pub model: Option<String>,
    /// The worst-case cost in USD (e.g. `PriceTable::worst_case_cost`).
    pub estimate_usd: f64,
}

impl ReserveRequest {
    /// A request to reserve `estimate_usd` for `tenant_id`.
    pub fn new(tenant_id: TenantId, estimate_usd: f64) -> Self {
        Self {
            tenant_id,
            run_id: None,
            instance_id: None,
            model: None,
            estimate_usd,
        }
    }
    /// For this run.
    pub fn run(mut self, run: RunId) -> Self {
        self.run_id = Some(run);
        self
    }
    /// Made by this instance.
    pub fn instance(mut self, instance: InstanceId) -> Self {
        self.instance_id = Some(instance);
        self
    }
    /// For this model.
    pub fn model(mut self, model: impl Into<String>) -> Self {
        self.model = Some(model.into());
        self
    }

    pub(crate) fn validate(&self) -> Result<()> {
        validate_amount("estimate_usd", self.estimate_usd)?;
        if let Some(m) = &self.model {
            validate_text_id("model", m)?;
        }
        Ok(())
    }
}

/// An open reservation (a row of `pgcrew.budget_reservations`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reservation {
    /// The reservation id.
    pub id: Uuid,
    /// The tenant.
    pub tenant_id: TenantId,
    /// The run, if any.
    pub run_id: Option<RunId>,
    /// The instance that made it.
    pub instance_id: Option<InstanceId>,
    /// The model.
    pub model: Option<String>,
    /// The reserved amount (rounded to 10 decimals as stored).
    pub amount_usd: f64,
    /// Database time of the reservation.
    pub created_at: DateTime<Utc>,
}

/// An actual cost to record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CostInput {
    /// What it was spent on.
    pub category: CostCategory,
    /// The model (for `llm` costs).
    pub model: Option<String>,
    /// The step that incurred it.
    pub step_key: Option<String>,
    /// Prompt tokens used.
    pub prompt_tokens: u64,
    /// Completion tokens used.
    pub completion_tokens: u64,
    /// The cost in USD.
    pub cost_usd: f64,
}

impl CostInput {
    /// An `llm` cost for `model`.
    pub fn llm(
        model: impl Into<String>,
        prompt_tokens: u64,
        completion_tokens: u64,
        cost_usd: f64,
    ) -> Self {
        Self {
            category: CostCategory::Llm,
            model: Some(model.into()),
            step_key: None,
            prompt_tokens,
            completion_tokens,
            cost_usd,
        }
    }

    /// A cost of another category.
    pub fn other(category: CostCategory, cost_usd: f64) -> Self {
        Self {
            category,
            model: None,
            step_key: None,
            prompt_tokens: 0,
            completion_tokens: 0,
            cost_usd,
        }
    }

    /// With a step key (builder style).
    pub fn step(mut self, step_key: impl Into<String>) -> Self {
        self.step_key = Some(step_key.into());
        self
    }

    pub(crate) fn validate(&self) -> Result<(i64, i64)> {
        validate_amount("cost_usd", self.cost_usd)?;
        if let Some(m) = &self.model {
            validate_text_id("model", m)?;
        }
        let p = i64::try_from(self.prompt_tokens)
            .map_err(|_| Error::invalid("prompt_tokens", "is too large"))?;
        let c = i64::try_from(self.completion_tokens)
            .map_err(|_| Error::invalid("completion_tokens", "is too large"))?;
        Ok((p, c))
    }
}

/// Which budget: the tenant's or the run's own ([`set_run_budget`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BudgetScope {
    /// The tenant's budget (`tenants.budget_usd_limit`).
    Tenant,
    /// The run's own budget (`runs.budget_usd_limit`).
    Run,
}

impl BudgetScope {
    /// `tenant` or `run`.
    pub fn as_str(&self) -> &'static str {
        match self {
            BudgetScope::Tenant => "tenant",
            BudgetScope::Run => "run",
        }
    }
}

impl fmt::Display for BudgetScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A settlement that took spend past a limit (the actual cost exceeded what was reserved, or
/// a cost was charged without a reservation). The cost is recorded in full; the budget is then
/// EXCEEDED and refuses every further reservation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BudgetOverrun {
    /// Which budget was passed.
    pub scope: BudgetScope,
    /// Its limit.
    pub limit_usd: f64,
    /// Its spend after this settlement (above the limit).
    pub spent_usd: f64,
}

/// The result of settling or charging a cost.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Settlement {
    /// The `pgcrew.cost_entries` row.
    pub entry_id: i64,
    /// The cost as recorded (rounded to 10 decimals).
    pub cost_usd: f64,
    /// Whether a reservation was released (false when maintenance had already released it, or
    /// for a plain charge).
    pub released: bool,
    /// The tenant's spend after this cost.
    pub tenant_spent_usd: f64,
    /// The tenant's remaining reservations after this cost.
    pub tenant_reserved_usd: f64,
    /// The tenant's budget status after this cost.
    pub status: BudgetStatus,
    /// The budgets this cost took past their limit (empty normally).
    pub overruns: Vec<BudgetOverrun>,
}

fn validate_amount(field: &'static str, usd: f64) -> Result<()> {
    validate_budget(field, usd)
}
