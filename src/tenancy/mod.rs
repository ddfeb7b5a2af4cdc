//! Tenancy: tenants and capabilities, USD budgets with reserve/settle, cost accounting, budget
//! status with notifications, degradation decisions, model prices and Row-Level Security.
//!
//! ```no_run
//! use pgcrew::tenancy::{self, CostInput, PriceTable, ReserveRequest, TenantContext};
//!
//! # async fn demo(db: pgcrew::Db) -> pgcrew::Result<()> {
//! let ctx = TenantContext::new("acme")?
//!     .capabilities(["web_search"])
//!     .budget_usd(Some(25.0));
//! tenancy::upsert(&db, &ctx).await?;
//!
//! let prices = PriceTable::builtin();
//! let estimate = prices.worst_case_cost("gpt-4o-mini", 1_200, 512)?;
//! let reservation = tenancy::reserve(&db, &ReserveRequest::new(ctx.tenant_id.clone(), estimate)).await?;
//! // ... call the model ...
//! let actual = prices.cost("gpt-4o-mini", 1_180, 230)?;
//! let mut conn = db.get().await?;
//! let tx = conn.transaction().await?;
//! // (the kernel appends the `model_completed` event with `cost_usd` here, in the same tx)
//! tenancy::settle(&tx, &reservation, &CostInput::llm("gpt-4o-mini", 1_180, 230, actual)).await?;
//! tx.commit().await?;
//! # Ok(())
//! # }
//! ```

pub mod budget;
pub mod costs;
pub mod degradation;
mod maintenance;
pub mod prices;
pub mod rls;
pub mod status;
pub mod tenants;

pub use budget::{
    BudgetOverrun, BudgetScope, CostCategory, CostInput, ReleaseOrphanedReservations, Reservation,
    ReserveRequest, Settlement, charge, release, reserve, set_run_budget, settle,
};
pub use costs::{CostFilter, CostRow, budget_status, cost_breakdown, spend_from_events};
pub use degradation::{
    Decision, DegradationAction, DegradationPolicy, DegradationRule, StepRequest, decide,
};
pub use maintenance::maintenance_steps;
pub use prices::{ModelPrice, PriceTable};
pub use rls::{
    TenantRole, grant_tenant_access, grant_tenant_role, list_tenant_roles,
    pg_locks_readable_by_public, revoke_tenant_role,
};
pub use status::{BudgetSnapshot, BudgetStatus, BudgetThresholds};
pub use tenants::{
    MAX_BUDGET_USD, Tenant, TenantContext, get, list, require_capability, upsert, validate_budget,
};

/// Decide how to run a model step for a stored tenant: loads its status and degradation policy
/// and applies [`decide`].
#[tracing::instrument(skip(db, request), err)]
pub async fn decide_for_tenant(
    db: &crate::Db,
    tenant: &crate::TenantId,
    request: &StepRequest,
) -> crate::Result<Decision> {
    let t = get(db, tenant).await?;
    Ok(decide(&t.context.degradation, t.status, request))
}
