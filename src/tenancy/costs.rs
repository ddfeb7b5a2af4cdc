//! Cost breakdown by tenant, day (UTC), category and model, from the `pgcrew.tenant_costs` view,
//! and budget snapshots from the `pgcrew.budget_status` view.

use chrono::NaiveDate;
use serde::Serialize;
use tracing::instrument;

use crate::db::Db;
use crate::db::Executor;
use crate::error::{Error, Result};
use crate::ids::TenantId;
use crate::tenancy::status::{BudgetSnapshot, BudgetThresholds};

/// Which costs to break down.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CostFilter {
    /// Only this tenant.
    pub tenant_id: Option<TenantId>,
    /// From this day (UTC, inclusive).
    pub since: Option<NaiveDate>,
    /// Until this day (UTC, inclusive).
    pub until: Option<NaiveDate>,
}

impl CostFilter {
    /// All costs of one tenant.
    pub fn tenant(tenant: TenantId) -> Self {
        Self {
            tenant_id: Some(tenant),
            ..Self::default()
        }
    }
}

/// One line of the breakdown.
#[derive(Debug, Clone, PartialEq, Serialize, postgres_from_row::FromRow)]
pub struct CostRow {
    /// The tenant.
    pub tenant_id: TenantId,
    /// The day (UTC).
    pub day: NaiveDate,
    /// The category (`llm`, `tool`, `retrieval`, `storage`, `other`).
    pub category: String,
    /// The model (empty when none).
    pub model: String,
    /// Number of cost entries.
    pub entries: i64,
    /// Prompt tokens.
    pub prompt_tokens: i64,
    /// Completion tokens.
    pub completion_tokens: i64,
    /// Total cost (USD).
    pub cost_usd: f64,
}

/// The cost breakdown, ordered by day, tenant, category, model.
#[instrument(skip(db), err)]
pub async fn cost_breakdown(db: &Db, filter: &CostFilter) -> Result<Vec<CostRow>> {
    if let (Some(s), Some(u)) = (filter.since, filter.until)
        && s > u
    {
        return Err(Error::invalid(
            "cost filter",
            format!("since ({s}) is after until ({u})"),
        ));
    }
    let rows = db
        .query(
            sql!("tenancy/cost_breakdown"),
            typed![&filter.tenant_id, &filter.since, &filter.until],
        )
        .await?;
    crate::db::rows_as(&rows)
}

/// A tenant's budget figures and status (`pgcrew.budget_status`), or [`Error::NotFound`].
#[instrument(skip(db), err)]
pub async fn budget_status(db: &Db, tenant: &TenantId) -> Result<BudgetSnapshot> {
    let r = db
        .query_opt(sql!("tenancy/budget_status"), typed![tenant])
        .await?
        .ok_or_else(|| Error::not_found("tenant", tenant))?;
    Ok(BudgetSnapshot {
        tenant_id: r.try_get("tenant_id")?,
        budget_usd_limit: r.try_get("budget_usd_limit")?,
        spent_usd: r.try_get("spent_usd")?,
        reserved_usd: r.try_get("reserved_usd")?,
        remaining_usd: r.try_get("remaining_usd")?,
        used_pct: r.try_get("used_pct")?,
        status: r.try_get("status")?,
        thresholds: BudgetThresholds {
            warning: r.try_get("warning_threshold")?,
            critical: r.try_get("critical_threshold")?,
        },
        active_reservations: r.try_get("active_reservations")?,
    })
}

/// Spend per tenant as recorded in the ledger (`model_completed` events carry `cost_usd`):
/// the operator query from the README, `(tenant_id, spend)` by tenant.
#[instrument(skip(db), err)]
pub async fn spend_from_events(db: &Db) -> Result<Vec<(TenantId, f64)>> {
    let rows = db
        .query(sql!("tenancy/spend_from_events"), typed![])
        .await?;
    rows.iter()
        .map(|r| Ok((r.try_get("tenant_id")?, r.try_get("spend")?)))
        .collect()
}
