//! Phase 6 of the demo: the summary (runs, tasks, costs per tenant, leader changes, the
//! failover, the ledger chains).

use std::collections::BTreeMap;

use pgcrew::db::Db;
use pgcrew::runs::{self, RunState};
use pgcrew::tenancy::{self, costs::CostFilter};
use pgcrew::{Result, TenantId};

use super::watch::{Failover, tick};
use super::workload::Workload;

/// Phase 6: print the summary; true when every ledger chain verified, the failover was seen
/// and the leader changed.
pub(super) async fn summary(db: &Db, workload: &Workload, f: &Failover) -> Result<bool> {
    let (t, all) = tick(db).await?;
    println!("\n== summary ==");
    let mut failures: BTreeMap<String, usize> = BTreeMap::new();
    for r in all.iter().filter(|r| r.state == RunState::Failed) {
        *failures
            .entry(r.error_type.clone().unwrap_or_else(|| "unknown".into()))
            .or_insert(0) += 1;
    }
    let failures_text = if failures.is_empty() {
        String::new()
    } else {
        format!(
            " ({})",
            failures
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    println!(
        "runs: {} total; completed {}, failed {}{failures_text}, cancelled {}",
        all.len(),
        t.by_state.get("completed").copied().unwrap_or(0),
        t.by_state.get("failed").copied().unwrap_or(0),
        t.by_state.get("cancelled").copied().unwrap_or(0),
    );
    println!("tasks: {} of {} finished", t.tasks_done, t.tasks_total);
    println!(
        "cost per tenant (view pgcrew.tenant_costs; spend from the ledger's model_completed events):"
    );
    let spend: BTreeMap<TenantId, f64> = tenancy::costs::spend_from_events(db)
        .await?
        .into_iter()
        .collect();
    for tenant in &workload.tenants {
        let rows = tenancy::costs::cost_breakdown(db, &CostFilter::tenant(tenant.clone())).await?;
        let cost: f64 = rows.iter().map(|r| r.cost_usd).sum();
        let tokens: i64 = rows
            .iter()
            .map(|r| r.prompt_tokens + r.completion_tokens)
            .sum();
        let status = tenancy::costs::budget_status(db, tenant).await?;
        let per_run = |s: RunState| {
            all.iter()
                .filter(|r| r.tenant_id == tenant.as_str() && r.state == s)
                .count()
        };
        println!(
            "  {:<8} ${cost:.6} ({tokens} tokens; ledger ${:.6}) budget {} status {:?}; runs completed {}, failed {}",
            tenant.as_str(),
            spend.get(tenant).copied().unwrap_or(0.0),
            status
                .budget_usd_limit
                .map(|l| format!("${l}"))
                .unwrap_or_else(|| "none".into()),
            status.status,
            per_run(RunState::Completed),
            per_run(RunState::Failed),
        );
    }
    let chain: Vec<String> = f
        .leaders
        .iter()
        .map(|(l, term)| format!("{l} (term {term})"))
        .collect();
    println!(
        "leader changes: {} ({})",
        f.leaders.len().saturating_sub(1),
        chain.join(" -> ")
    );
    if let Some((victim, _)) = &f.killed {
        println!(
            "failover: killed {victim}; {} of its {} in-flight run(s) finished elsewhere",
            f.resumed.len(),
            f.victim_runs.len()
        );
    }
    let mut valid = 0;
    for r in &all {
        let v = runs::verify_run_chain(db, r.id).await?;
        if v.valid {
            valid += 1;
        } else {
            println!("  run {} ledger INVALID: {v:?}", r.id);
        }
    }
    println!("ledger: {valid} of {} run chains verified valid", all.len());
    Ok(valid == all.len() && f.reported && f.leaders.len() >= 2)
}
