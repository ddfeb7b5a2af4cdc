//! Tenancy: tenants, capabilities, budgets (reserve/settle), costs, status, degradation, RLS.

mod access;
mod budget;
mod reports;

use std::sync::Arc;
use std::time::Duration;

use pgcrew::coord::instance::{self, InstanceInfo};
use pgcrew::coord::maintenance::{MaintenanceContext, MaintenanceStep};
use pgcrew::db::Db;
use pgcrew::tenancy::{
    self, BudgetStatus, BudgetThresholds, CostCategory, CostFilter, CostInput, DegradationAction,
    DegradationPolicy, PriceTable, ReleaseOrphanedReservations, ReserveRequest, StepRequest,
    TenantContext,
};
use pgcrew::{ClientConfig, Error, Event, InstanceId, RunId, TenantId};

use crate::common::{eventually, scalar_on, test_db, value_on};

fn tid(s: &str) -> TenantId {
    TenantId::new(s).unwrap()
}

async fn tenant(db: &Db, id: &str, budget: Option<f64>) -> TenantId {
    let ctx = TenantContext::new(id).unwrap().budget_usd(budget);
    tenancy::upsert(db, &ctx).await.unwrap();
    tid(id)
}

/// Tests may create runs directly (the runs API belongs to another module).
async fn new_run(db: &Db, tenant: &TenantId) -> RunId {
    let run = RunId::new();
    let conn = db.get().await.unwrap();
    conn.execute(
        "INSERT INTO pgcrew.runs (id, tenant_id, state) VALUES ($1, $2, 'running')",
        &[&run, tenant],
    )
    .await
    .unwrap();
    run
}

/// `sum(cost_entries) = spent_usd` compared as numeric (exact), and reserved_usd = sum of open
/// reservations.
async fn books_balance(db: &Db, tenant: &TenantId) -> bool {
    let conn = db.get().await.unwrap();
    conn.query_one(
        "SELECT (SELECT coalesce(sum(cost_usd), 0) FROM pgcrew.cost_entries WHERE tenant_id = t.id) = t.spent_usd
            AND (SELECT coalesce(sum(amount_usd), 0) FROM pgcrew.budget_reservations WHERE tenant_id = t.id) = t.reserved_usd
         FROM pgcrew.tenants t WHERE t.id = $1",
        &[tenant],
    )
    .await
    .unwrap()
    .get(0)
}

fn maintenance_ctx() -> MaintenanceContext {
    MaintenanceContext {
        config: Arc::new(ClientConfig::default()),
        instance_id: InstanceId::new("leader").unwrap(),
        lease: "pgcrew".into(),
        term: 1,
    }
}

async fn run_step(db: &Db, step: &dyn MaintenanceStep) -> u64 {
    let mut conn = db.get().await.unwrap();
    let tx = conn.transaction().await.unwrap();
    let n = step.run(&tx, &maintenance_ctx()).await.unwrap();
    tx.commit().await.unwrap();
    n
}

/// One "model step" as the kernel will do it: reserve the worst case, call the model, then in
/// one transaction append `model_completed` (payload carries cost_usd) and settle.
async fn model_step(
    db: Db,
    tenant: TenantId,
    run: RunId,
    step: usize,
    estimate: f64,
    actual: f64,
) -> pgcrew::Result<f64> {
    let reservation = tenancy::reserve(
        &db,
        &ReserveRequest::new(tenant.clone(), estimate)
            .run(run)
            .model("gpt-4o-mini"),
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(fastrand::u64(1..20))).await;
    let mut conn = db.get().await?;
    let tx = conn.transaction().await?;
    let cost = CostInput::llm("gpt-4o-mini", 1000, 500, actual).step(format!("step-{step}"));
    let s = tenancy::settle(&tx, &reservation, &cost).await?;
    assert!(s.released);
    let payload = serde_json::json!({"cost_usd": s.cost_usd, "model": "gpt-4o-mini"});
    tx.query(
        "SELECT * FROM pgcrew.append_events($1, NULL, ARRAY['model_completed'], ARRAY[$2::text], ARRAY[$3::jsonb], ARRAY[false])",
        &[&run, &format!("step-{step}"), &payload],
    )
    .await?;
    tx.commit().await?;
    Ok(s.cost_usd)
}
