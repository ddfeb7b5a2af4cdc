//! Leader maintenance for runs: stuck runs, run leases of dead instances, retention of finished
//! runs.

use std::sync::Arc;

use async_trait::async_trait;
use tracing::info;

use crate::coord::maintenance::{MaintenanceContext, MaintenanceStep};
use crate::db::Executor;
use crate::error::Result;

/// Fails runs stuck in `running` longer than the stuck-run timeout with `run timed out`.
#[derive(Debug)]
pub struct StuckRuns;

#[async_trait]
impl MaintenanceStep for StuckRuns {
    fn name(&self) -> &'static str {
        "stuck_runs"
    }
    async fn run(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        ctx: &MaintenanceContext,
    ) -> Result<u64> {
        // Fails each run through the state machine, recording `run_failed` in its ledger and
        // signing the run's final head with the ledger key (when configured).
        let failed = super::fail_stuck_runs(
            tx,
            ctx.config.stuck_run_timeout,
            ctx.config.retention_batch_size,
            ctx.config.ledger_key.as_ref(),
        )
        .await?;
        for id in &failed {
            info!(run = %id, "maintenance: failed stuck run (run timed out)");
        }
        Ok(failed.len() as u64)
    }
}

/// Releases run leases held by instances that are no longer in `pgcrew.instances` (the stale
/// instance step runs first, so leases of instances it removed are freed in the same pass).
#[derive(Debug)]
pub struct DeadInstanceLeases;

#[async_trait]
impl MaintenanceStep for DeadInstanceLeases {
    fn name(&self) -> &'static str {
        "dead_instance_run_leases"
    }
    async fn run(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        _ctx: &MaintenanceContext,
    ) -> Result<u64> {
        let rows = Executor::query(tx, sql!("runs/release_dead_leases"), typed![]).await?;
        for r in &rows {
            let id: uuid::Uuid = r.get(0);
            let owner: String = r.get(1);
            info!(run = %id, owner = %owner, "maintenance: released run lease of a dead instance");
        }
        Ok(rows.len() as u64)
    }
}

/// Retention of finished runs (`ClientConfig::run_retention`; off by default): one bounded batch
/// (`run_retention_batch_size` runs, oldest first) per pass through the SQL function
/// `pgcrew.retain_finished_runs`. A retained run keeps its row, its chain anchor and its final
/// signed checkpoint; its events, artifacts, summaries, other checkpoints, prompt and response
/// text and cost entries go (the cost totals move to `pgcrew.cost_daily`, so
/// `pgcrew.tenant_costs` is unchanged).
#[derive(Debug)]
pub struct RunRetention;

#[async_trait]
impl MaintenanceStep for RunRetention {
    fn name(&self) -> &'static str {
        "run_retention"
    }
    async fn run(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        ctx: &MaintenanceContext,
    ) -> Result<u64> {
        let Some(age) = ctx.config.run_retention else {
            return Ok(0);
        };
        // At most a century: `now() - age` must stay a valid timestamp.
        let age = crate::config::interval_micros(age).min(100 * 365 * 86_400 * 1_000_000);
        let batch = i32::try_from(ctx.config.run_retention_batch_size).unwrap_or(i32::MAX);
        let rows =
            Executor::query(tx, sql!("runs/retain_finished_runs"), typed![&age, &batch]).await?;
        for r in &rows {
            let id: uuid::Uuid = r.get(0);
            let events: i64 = r.get(1);
            let artifacts: i64 = r.get(2);
            let summaries: i64 = r.get(3);
            let checkpoints: i64 = r.get(4);
            let cost_entries: i64 = r.get(5);
            info!(run = %id, events, artifacts, summaries, checkpoints, cost_entries,
                "maintenance: retained finished run (chain anchor and final checkpoint kept)");
        }
        Ok(rows.len() as u64)
    }
}

/// Maintenance steps this module contributes to the leader's maintenance pass after the
/// queue's ([`StuckRuns`] runs earlier, right after coordination's stale-instance step).
pub fn maintenance_steps() -> Vec<Arc<dyn MaintenanceStep>> {
    vec![Arc::new(DeadInstanceLeases), Arc::new(RunRetention)]
}
