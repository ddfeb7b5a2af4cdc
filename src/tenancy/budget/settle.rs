//! The budget operations: reserve, settle, charge, release, per-run budgets.

use tracing::instrument;
use uuid::Uuid;

use super::{BudgetOverrun, BudgetScope, CostInput, Reservation, ReserveRequest, Settlement};
use crate::db::{Acquire, Atomic, Executor};
use crate::error::{Error, Result};
use crate::ids::{RunId, TenantId};
use crate::tenancy::tenants::validate_budget;
use crate::vocab::BudgetStatus;

/// Reserve `req.estimate_usd` against the tenant's budget (and the run's, with `req.run_id`):
/// [`Error::BudgetExceeded`] (with the current figures) when the tenant's budget cannot cover
/// the estimate, [`Error::RunBudgetExceeded`] when the run's own budget cannot (a budget already
/// past its limit refuses every estimate, even 0), [`Error::NotFound`] for an unknown tenant or a
/// run that is not the tenant's.
///
/// Given the pool (`&db`), it runs in its own transaction, committed on success so other
/// instances see it. Given a transaction, it joins it (see [`Acquire`]): on error the caller
/// must roll back (the tenant row may already carry the reservation within the transaction).
#[instrument(skip(on, req), fields(tenant = %req.tenant_id, estimate = req.estimate_usd), err)]
pub async fn reserve<E: Acquire + ?Sized>(on: &E, req: &ReserveRequest) -> Result<Reservation> {
    req.validate()?;
    let mut conn = on.acquire().await?;
    let tx = conn.begin().await?;
    let r = reserve_steps(&tx, req).await?;
    tx.commit().await?;
    Ok(r)
}

/// [`reserve`]'s statements, on the unit.
async fn reserve_steps(tx: &Atomic<'_>, req: &ReserveRequest) -> Result<Reservation> {
    let tenant = &req.tenant_id;
    let updated = tx
        .query_opt(
            sql!("tenancy/reserve_tenant"),
            typed![tenant, &req.estimate_usd],
        )
        .await?;
    if updated.is_none() {
        let figures = tx
            .query_opt(sql!("tenancy/tenant_budget_figures"), typed![tenant])
            .await?
            .ok_or_else(|| Error::not_found("tenant", tenant))?;
        let (limit_usd, spent_usd, reserved_usd) = budget_figures(&figures)?;
        return Err(Error::BudgetExceeded {
            tenant: tenant.to_string(),
            limit_usd,
            spent_usd,
            reserved_usd,
            requested_usd: req.estimate_usd,
        });
    }
    if let Some(run) = req.run_id {
        let ok = tx
            .query_opt(
                sql!("tenancy/reserve_run"),
                typed![&run, tenant, &req.estimate_usd],
            )
            .await?;
        if ok.is_none() {
            let figures = tx
                .query_opt(sql!("tenancy/run_budget_figures"), typed![&run, tenant])
                .await?
                .ok_or_else(|| Error::not_found("run", run))?;
            let (limit_usd, spent_usd, reserved_usd) = budget_figures(&figures)?;
            return Err(Error::RunBudgetExceeded {
                tenant: tenant.to_string(),
                run: run.to_string(),
                limit_usd,
                spent_usd,
                reserved_usd,
                requested_usd: req.estimate_usd,
            });
        }
    }
    let id = Uuid::new_v4();
    let row = tx
        .query_one(
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

/// `(limit, spent, reserved)` of a budget-figures row (no limit reads as infinite).
fn budget_figures(row: &tokio_postgres::Row) -> Result<(f64, f64, f64)> {
    let limit: Option<f64> = row.try_get("limit_usd")?;
    Ok((
        limit.unwrap_or(f64::INFINITY),
        row.try_get("spent_usd")?,
        row.try_get("reserved_usd")?,
    ))
}

/// Settle a reservation, typically inside the caller's transaction (the one that records the
/// `model_completed` event): release the reservation, add `cost.cost_usd` to the tenant's and
/// the run's spend and insert the cost entry, in one statement. If maintenance already released
/// the reservation the cost is still charged (`released == false`). The actual cost may exceed
/// the estimate; it is charged in full (spend reflects what was really spent), and if that takes
/// a budget past its limit the settlement lists it in [`Settlement::overruns`] (logged as a
/// warning): the tenant's status is then EXCEEDED and further reservations are refused.
#[instrument(skip(on, reservation, cost), fields(reservation = %reservation.id, tenant = %reservation.tenant_id, cost = cost.cost_usd), err)]
pub async fn settle<E: Executor + ?Sized>(
    on: &E,
    reservation: &Reservation,
    cost: &CostInput,
) -> Result<Settlement> {
    let (p, c) = cost.validate()?;
    settle_query(
        on,
        Some(reservation.id),
        &reservation.tenant_id,
        reservation.run_id,
        cost,
        p,
        c,
    )
    .await
}

/// Charge a cost that had no reservation (tool, retrieval, storage, ...). The run, when given,
/// must belong to the tenant. Given the pool, it runs in its own transaction; given a
/// transaction, it joins it (see [`Acquire`]).
#[instrument(skip(on, cost), fields(cost = cost.cost_usd), err)]
pub async fn charge<E: Acquire + ?Sized>(
    on: &E,
    tenant: &TenantId,
    run: Option<RunId>,
    cost: &CostInput,
) -> Result<Settlement> {
    let (p, c) = cost.validate()?;
    let mut conn = on.acquire().await?;
    let tx = conn.begin().await?;
    if let Some(r) = run
        && tx
            .query_opt(sql!("tenancy/run_owned"), typed![&r, tenant])
            .await?
            .is_none()
    {
        return Err(Error::not_found("run", r));
    }
    let s = settle_query(&tx, None, tenant, run, cost, p, c).await?;
    tx.commit().await?;
    Ok(s)
}

async fn settle_query<E: Executor + ?Sized>(
    tx: &E,
    reservation: Option<Uuid>,
    tenant: &TenantId,
    run: Option<RunId>,
    cost: &CostInput,
    prompt_tokens: i64,
    completion_tokens: i64,
) -> Result<Settlement> {
    let row = tx
        .query_opt(
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
    let status: BudgetStatus = row.try_get("budget_status")?;
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
        status,
        overruns,
    })
}

/// Release a reservation without charging anything (one statement: on the pool, or inside the
/// caller's transaction). Returns `false` when it was already gone.
#[instrument(skip(on, reservation), fields(reservation = %reservation.id), err)]
pub async fn release<E: Executor + ?Sized>(on: &E, reservation: &Reservation) -> Result<bool> {
    let row = on
        .query_one(
            sql!("tenancy/release_reservation"),
            typed![&reservation.id, &reservation.tenant_id],
        )
        .await?;
    Ok(row.try_get::<_, i64>("released")? > 0)
}

/// Set (or clear, with `None`) a run's own budget limit. The run must belong to the tenant.
#[instrument(skip(on), err)]
pub async fn set_run_budget<E: Executor + ?Sized>(
    on: &E,
    tenant: &TenantId,
    run: RunId,
    limit_usd: Option<f64>,
) -> Result<()> {
    if let Some(l) = limit_usd {
        validate_budget("run budget_usd_limit", l)?;
    }
    on.query_opt(
        sql!("tenancy/set_run_budget"),
        typed![&run, tenant, &limit_usd],
    )
    .await?
    .ok_or_else(|| Error::not_found("run", run))?;
    Ok(())
}
