//! USD budgets: reserve before a model call, settle after it.
//!
//! * [`reserve`] checks and reserves the worst-case cost with ONE conditional `UPDATE` of the
//!   tenant row (`spent + reserved + estimate <= limit`), so concurrent reservations can never
//!   overcommit the budget; the optional per-run budget is checked the same way in the same
//!   transaction. Each reservation is a row in `pgcrew.budget_reservations`, tagged with the
//!   instance that made it.
//! * [`settle_in_tx`] runs in the CALLER's transaction (the one that writes the
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
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tracing::{info, instrument};
use uuid::Uuid;

use crate::config::interval_micros;
use crate::coord::maintenance::{MaintenanceContext, MaintenanceStep};
use crate::db::Db;
use crate::db::Executor;
use crate::error::{Error, Result};
use crate::ids::{InstanceId, RunId, TenantId, validate_text_id};
use crate::tenancy::status::BudgetStatus;
use crate::tenancy::tenants::validate_budget;

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

    fn validate(&self) -> Result<()> {
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

    fn validate(&self) -> Result<(i64, i64)> {
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

/// Reserve in its own transaction (committed on success, so other instances see it).
#[instrument(skip(db, req), fields(tenant = %req.tenant_id, estimate = req.estimate_usd), err)]
pub async fn reserve(db: &Db, req: &ReserveRequest) -> Result<Reservation> {
    req.validate()?;
    let mut conn = db.get().await?;
    let tx = conn.transaction().await?;
    let r = reserve_in_tx(&tx, req).await?;
    tx.commit().await?;
    Ok(r)
}

/// Reserve inside the caller's transaction: [`Error::BudgetExceeded`] (with the current figures)
/// when the tenant's budget cannot cover the estimate, [`Error::RunBudgetExceeded`] when the
/// run's own budget cannot (a budget already past its limit refuses every estimate, even 0), [`Error::NotFound`] for an
/// unknown tenant or a run that is not the tenant's. On error the caller must roll back (the
/// tenant row may already carry the reservation within the transaction).
#[instrument(skip(tx, req), fields(tenant = %req.tenant_id, estimate = req.estimate_usd), err)]
pub async fn reserve_in_tx(
    tx: &tokio_postgres::Transaction<'_>,
    req: &ReserveRequest,
) -> Result<Reservation> {
    req.validate()?;
    let tenant = &req.tenant_id;
    let updated = tx
        .query_typed_opt_row(
            sql!("tenancy/reserve_tenant"),
            typed![tenant, &req.estimate_usd],
        )
        .await?;
    if updated.is_none() {
        let figures = tx
            .query_typed_opt_row(sql!("tenancy/tenant_budget_figures"), typed![tenant])
            .await?
            .ok_or_else(|| Error::not_found("tenant", tenant))?;
        return Err(Error::BudgetExceeded {
            tenant: tenant.to_string(),
            limit_usd: figures
                .try_get::<_, Option<f64>>("limit_usd")?
                .unwrap_or(f64::INFINITY),
            spent_usd: figures.try_get("spent_usd")?,
            reserved_usd: figures.try_get("reserved_usd")?,
            requested_usd: req.estimate_usd,
        });
    }
    if let Some(run) = req.run_id {
        let ok = tx
            .query_typed_opt_row(
                sql!("tenancy/reserve_run"),
                typed![&run, tenant, &req.estimate_usd],
            )
            .await?;
        if ok.is_none() {
            let figures = tx
                .query_typed_opt_row(sql!("tenancy/run_budget_figures"), typed![&run, tenant])
                .await?
                .ok_or_else(|| Error::not_found("run", run))?;
            return Err(Error::RunBudgetExceeded {
                tenant: tenant.to_string(),
                run: run.to_string(),
                limit_usd: figures
                    .try_get::<_, Option<f64>>("limit_usd")?
                    .unwrap_or(f64::INFINITY),
                spent_usd: figures.try_get("spent_usd")?,
                reserved_usd: figures.try_get("reserved_usd")?,
                requested_usd: req.estimate_usd,
            });
        }
    }
    let id = Uuid::new_v4();
    let row = tx
        .query_typed_row(
            sql!("tenancy/insert_reservation"),
            typed![
                &id,
                tenant,
                &req.run_id,
                &req.instance_id,
                &req.model,
                &req.estimate_usd,
            ],
        )
        .await?;
    Ok(Reservation {
        id,
        tenant_id: tenant.clone(),
        run_id: req.run_id,
        instance_id: req.instance_id.clone(),
        model: req.model.clone(),
        amount_usd: row.try_get("amount_usd")?,
        created_at: row.try_get("created_at")?,
    })
}

/// Settle a reservation inside the caller's transaction (the one that records the
/// `model_completed` event): release the reservation, add `cost.cost_usd` to the tenant's and
/// the run's spend and insert the cost entry. If maintenance already released the reservation
/// the cost is still charged (`released == false`). The actual cost may exceed the estimate; it
/// is charged in full (spend reflects what was really spent), and if that takes a budget past
/// its limit the settlement lists it in [`Settlement::overruns`] (logged as a warning): the
/// tenant's status is then EXCEEDED and further reservations are refused.
#[instrument(skip(tx, reservation, cost), fields(reservation = %reservation.id, tenant = %reservation.tenant_id, cost = cost.cost_usd), err)]
pub async fn settle_in_tx(
    tx: &tokio_postgres::Transaction<'_>,
    reservation: &Reservation,
    cost: &CostInput,
) -> Result<Settlement> {
    let (p, c) = cost.validate()?;
    settle_query(
        tx,
        Some(reservation.id),
        &reservation.tenant_id,
        reservation.run_id,
        cost,
        p,
        c,
    )
    .await
}

/// Charge a cost that had no reservation (tool, retrieval, storage, ...) inside the caller's
/// transaction. The run, when given, must belong to the tenant.
#[instrument(skip(tx, cost), fields(cost = cost.cost_usd), err)]
pub async fn charge_in_tx(
    tx: &tokio_postgres::Transaction<'_>,
    tenant: &TenantId,
    run: Option<RunId>,
    cost: &CostInput,
) -> Result<Settlement> {
    let (p, c) = cost.validate()?;
    if let Some(r) = run
        && tx
            .query_typed_opt_row(sql!("tenancy/run_owned"), typed![&r, tenant])
            .await?
            .is_none()
    {
        return Err(Error::not_found("run", r));
    }
    settle_query(tx, None, tenant, run, cost, p, c).await
}

/// [`charge_in_tx`] in its own transaction.
#[instrument(skip(db, cost), fields(cost = cost.cost_usd), err)]
pub async fn charge(
    db: &Db,
    tenant: &TenantId,
    run: Option<RunId>,
    cost: &CostInput,
) -> Result<Settlement> {
    let mut conn = db.get().await?;
    let tx = conn.transaction().await?;
    let s = charge_in_tx(&tx, tenant, run, cost).await?;
    tx.commit().await?;
    Ok(s)
}

async fn settle_query(
    tx: &tokio_postgres::Transaction<'_>,
    reservation: Option<Uuid>,
    tenant: &TenantId,
    run: Option<RunId>,
    cost: &CostInput,
    prompt_tokens: i64,
    completion_tokens: i64,
) -> Result<Settlement> {
    let row = tx
        .query_typed_opt_row(
            sql!("tenancy/settle"),
            typed![
                &reservation,
                tenant,
                &run,
                &cost.cost_usd,
                &cost.category.as_str(),
                &cost.model,
                &cost.step_key,
                &prompt_tokens,
                &completion_tokens,
            ],
        )
        .await?
        .ok_or_else(|| Error::not_found("tenant", tenant))?;
    let status: String = row.try_get("budget_status")?;
    let mut overruns = Vec::new();
    if row.try_get::<_, bool>("tenant_overrun")? {
        overruns.push(BudgetOverrun {
            scope: BudgetScope::Tenant,
            limit_usd: row
                .try_get::<_, Option<f64>>("tenant_limit_usd")?
                .unwrap_or(f64::INFINITY),
            spent_usd: row.try_get("spent_usd")?,
        });
    }
    if row.try_get::<_, bool>("run_overrun")? {
        overruns.push(BudgetOverrun {
            scope: BudgetScope::Run,
            limit_usd: row
                .try_get::<_, Option<f64>>("run_limit_usd")?
                .unwrap_or(f64::INFINITY),
            spent_usd: row
                .try_get::<_, Option<f64>>("run_spent_usd")?
                .unwrap_or_default(),
        });
    }
    for o in &overruns {
        tracing::warn!(tenant = %tenant, run = ?run, scope = %o.scope, limit = o.limit_usd,
            spent = o.spent_usd, cost = cost.cost_usd, "budget overrun: a settled cost passed the limit");
    }
    Ok(Settlement {
        entry_id: row.try_get("entry_id")?,
        cost_usd: row.try_get("cost_usd")?,
        released: row.try_get::<_, i64>("released")? > 0,
        tenant_spent_usd: row.try_get("spent_usd")?,
        tenant_reserved_usd: row.try_get("reserved_usd")?,
        status: status.parse()?,
        overruns,
    })
}

/// Release a reservation without charging anything. Returns `false` when it was already gone.
#[instrument(skip(db, reservation), fields(reservation = %reservation.id), err)]
pub async fn release(db: &Db, reservation: &Reservation) -> Result<bool> {
    let mut conn = db.get().await?;
    let tx = conn.transaction().await?;
    let released = release_in_tx(&tx, reservation).await?;
    tx.commit().await?;
    Ok(released)
}

/// [`release`] inside the caller's transaction.
#[instrument(skip(tx, reservation), fields(reservation = %reservation.id), err)]
pub async fn release_in_tx(
    tx: &tokio_postgres::Transaction<'_>,
    reservation: &Reservation,
) -> Result<bool> {
    let row = tx
        .query_typed_row(
            sql!("tenancy/release_reservation"),
            typed![&reservation.id, &reservation.tenant_id],
        )
        .await?;
    Ok(row.try_get::<_, i64>("released")? > 0)
}

/// Set (or clear, with `None`) a run's own budget limit. The run must belong to the tenant.
#[instrument(skip(db), err)]
pub async fn set_run_budget(
    db: &Db,
    tenant: &TenantId,
    run: RunId,
    limit_usd: Option<f64>,
) -> Result<()> {
    if let Some(l) = limit_usd {
        validate_budget("run budget_usd_limit", l)?;
    }
    let conn = db.get().await?;
    conn.query_typed_opt_row(
        sql!("tenancy/set_run_budget"),
        typed![&run, tenant, &limit_usd],
    )
    .await?
    .ok_or_else(|| Error::not_found("run", run))?;
    Ok(())
}

/// Maintenance step: releases reservations whose instance no longer exists in
/// `pgcrew.instances`, or that are older than `max_age` (default: the client's
/// `stuck_run_timeout` — a model call cannot legitimately outlive its run).
#[derive(Debug, Clone, Default)]
pub struct ReleaseOrphanedReservations {
    /// Reservations older than this are released (default: `stuck_run_timeout`).
    pub max_age: Option<Duration>,
}

#[async_trait]
impl MaintenanceStep for ReleaseOrphanedReservations {
    fn name(&self) -> &'static str {
        "release_orphaned_reservations"
    }

    async fn run(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        ctx: &MaintenanceContext,
    ) -> Result<u64> {
        let age = interval_micros(self.max_age.unwrap_or(ctx.config.stuck_run_timeout));
        let rows = tx
            .query_typed_rows(
                sql!("tenancy/release_orphaned_reservations"),
                typed![&age, &ctx.config.retention_batch_size],
            )
            .await?;
        for r in &rows {
            let id: Uuid = r.try_get("id")?;
            let tenant: String = r.try_get("tenant_id")?;
            let instance: Option<String> = r.try_get("instance_id")?;
            let amount: f64 = r.try_get("amount_usd")?;
            info!(reservation = %id, tenant, instance = ?instance, amount,
                "maintenance: released orphaned budget reservation");
        }
        Ok(rows.len() as u64)
    }
}
