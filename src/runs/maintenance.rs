//! Leader maintenance for runs: stuck runs, run leases of dead instances, retention of finished
//! runs.

use std::sync::Arc;

use tracing::info;

use crate::coord::maintenance::{MaintenanceStep, log_rows};
use crate::db::Executor;

maintenance_step! {
    /// Fails runs stuck in `running` longer than the stuck-run timeout with `run timed out`.
    StuckRuns, "stuck_runs", probe: |_ctx| crate::coord::maintenance::Probe::WhenDue,
    |tx, ctx| {
        // Fails each run through the state machine, recording `run_failed` in its ledger and
        // signing the run's final head with the ledger key (when configured).
        let failed = super::fail_stuck_runs(
            tx,
            ctx.config.stuck_run_timeout,
            ctx.config.retention_batch_size,
            ctx.config.ledger_key.as_ref(),
        ).await?;
        for id in &failed {
            info!(run = %id, "maintenance: failed stuck run (run timed out)");
        }
        Ok(failed.len() as u64)
    }
}

maintenance_step! {
    /// Releases run leases held by instances that are no longer in `pgcrew.instances` (the stale
    /// instance step runs first, so leases of instances it removed are freed in the same pass).
    DeadInstanceLeases, "dead_instance_run_leases", probe: |_ctx| crate::coord::maintenance::Probe::WhenDue,
    |tx, _ctx| {
        let rows = Executor::query(tx, sql!("runs/release_dead_leases"), typed![]).await?;
        log_rows(&rows, |r| {
            let id: uuid::Uuid = r.try_get(0)?;
            let owner: String = r.try_get(1)?;
            info!(run = %id, owner = %owner, "maintenance: released run lease of a dead instance");
            Ok(())
        })
    }
}

maintenance_step! {
    /// Retention of finished runs (`ClientConfig::run_retention`; off by default): one bounded
    /// batch (`run_retention_batch_size` runs, oldest first) per pass through the SQL function
    /// `pgcrew.retain_finished_runs`. A retained run keeps its row, its chain anchor and its
    /// final signed checkpoint; its events, artifacts, summaries, other checkpoints, prompt and
    /// response text and cost entries go (the cost totals move to `pgcrew.cost_daily`, so
    /// `pgcrew.tenant_costs` is unchanged).
    RunRetention, "run_retention",
    probe: |ctx| if ctx.config.run_retention.is_some() {
        crate::coord::maintenance::Probe::Always
    } else {
        crate::coord::maintenance::Probe::Never
    },
    |tx, ctx| {
        let Some(age) = ctx.config.run_retention else {
            return Ok(0);
        };
        // At most a century: `now() - age` must stay a valid timestamp.
        let age = crate::config::interval_micros(age).min(100 * 365 * 86_400 * 1_000_000);
        let batch = i32::try_from(ctx.config.run_retention_batch_size).unwrap_or(i32::MAX);
        let rows = Executor::query(tx, sql!("runs/retain_finished_runs"), typed![&age, &batch]).await?;
        log_rows(&rows, |r| {
            let id: uuid::Uuid = r.try_get(0)?;
            let [events, artifacts, summaries, checkpoints, cost_entries]: [i64; 5] = [
                r.try_get(1)?,
                r.try_get(2)?,
                r.try_get(3)?,
                r.try_get(4)?,
                r.try_get(5)?,
            ];
            info!(run = %id, events, artifacts, summaries, checkpoints, cost_entries,
                "maintenance: retained finished run (chain anchor and final checkpoint kept)");
            Ok(())
        })
    }
}

maintenance_step! {
    /// Retention of run rows (`ClientConfig::run_row_retention`; off by default): one bounded
    /// batch (`run_retention_batch_size` runs, oldest first) per pass through the SQL function
    /// `pgcrew.delete_retained_runs` (V036). Only runs [`RunRetention`] already retained, that
    /// no run names as parent, whose parent (if any) is finished and whose tenant is not being
    /// moved: the row goes with its chain anchor and checkpoints (their ledger no longer
    /// verifies).
    RunRowRetention, "run_row_retention",
    probe: |ctx| if ctx.config.run_row_retention.is_some() {
        crate::coord::maintenance::Probe::Always
    } else {
        crate::coord::maintenance::Probe::Never
    },
    |tx, ctx| {
        let Some(age) = ctx.config.run_row_retention else {
            return Ok(0);
        };
        // At most a century: `now() - age` must stay a valid timestamp.
        let age = crate::config::interval_micros(age).min(100 * 365 * 86_400 * 1_000_000);
        let batch = i32::try_from(ctx.config.run_retention_batch_size).unwrap_or(i32::MAX);
        let rows = Executor::query(tx, sql!("runs/delete_retained_runs"), typed![&age, &batch]).await?;
        log_rows(&rows, |r| {
            let id: uuid::Uuid = r.try_get(0)?;
            let tenant: String = r.try_get(1)?;
            let checkpoints: i64 = r.try_get(2)?;
            let anchors: i64 = r.try_get(3)?;
            info!(run = %id, tenant, checkpoints, anchors,
                "maintenance: deleted retained run row (run row retention)");
            Ok(())
        })
    }
}

/// Maintenance steps this module contributes to the leader's maintenance pass after the
/// queue's ([`StuckRuns`] runs earlier, right after coordination's stale-instance step).
pub fn maintenance_steps() -> Vec<Arc<dyn MaintenanceStep>> {
    vec![
        Arc::new(DeadInstanceLeases),
        Arc::new(RunRetention),
        Arc::new(RunRowRetention),
    ]
}
