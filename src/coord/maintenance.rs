//! Leader-only maintenance. Every step runs in its own short transaction that first locks the
//! leader row and checks our term (`FOR SHARE`), so a deposed leader can never act: while the
//! step runs nobody can take the lease, and once someone has, the check fails.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use tracing::{debug, info, instrument};

use crate::config::{ClientConfig, interval_micros};
use crate::db::Db;
use crate::db::Executor;
use crate::error::{Error, Result};
use crate::ids::InstanceId;

/// What a maintenance step sees.
#[derive(Debug, Clone)]
pub struct MaintenanceContext {
    /// The client configuration (TTLs, timeouts, retention).
    pub config: Arc<ClientConfig>,
    /// The leader instance running the step.
    pub instance_id: InstanceId,
    /// The lease name.
    pub lease: String,
    /// The fencing term under which the step runs.
    pub term: i64,
}

/// One maintenance step. Implementations do a bounded amount of work in `tx` and return how
/// many rows they affected.
#[async_trait]
pub trait MaintenanceStep: Send + Sync {
    /// Short name for logs and reports.
    fn name(&self) -> &'static str;
    /// Do the work inside the fenced transaction.
    async fn run(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        ctx: &MaintenanceContext,
    ) -> Result<u64>;
}

/// Rows affected by each step of one maintenance pass.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MaintenanceReport {
    /// `(step name, rows affected)` in execution order.
    pub steps: Vec<(String, u64)>,
}

impl MaintenanceReport {
    /// Rows affected by the named step (0 when it did not run).
    pub fn count(&self, step: &str) -> u64 {
        self.steps
            .iter()
            .filter(|(n, _)| n == step)
            .map(|(_, c)| *c)
            .sum()
    }
}

/// Deletes instances silent for longer than the instance TTL (links cascade).
#[derive(Debug)]
pub struct StaleInstances;

#[async_trait]
impl MaintenanceStep for StaleInstances {
    fn name(&self) -> &'static str {
        "stale_instances"
    }
    async fn run(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        ctx: &MaintenanceContext,
    ) -> Result<u64> {
        let ttl = interval_micros(ctx.config.instance_ttl);
        let rows = tx
            .query_typed_rows(sql!("coord/delete_stale_instances"), typed![&ttl])
            .await?;
        for r in &rows {
            let id: String = r.get(0);
            info!(instance = %id, "maintenance: removed stale instance");
        }
        Ok(rows.len() as u64)
    }
}

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
        let failed = crate::runs::fail_stuck_runs_in(
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

/// Deletes expired rows of other lease names.
#[derive(Debug)]
pub struct ExpiredLeaders;

#[async_trait]
impl MaintenanceStep for ExpiredLeaders {
    fn name(&self) -> &'static str {
        "expired_leaders"
    }
    async fn run(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        ctx: &MaintenanceContext,
    ) -> Result<u64> {
        Ok(tx
            .execute_typed_count(sql!("coord/delete_expired_leaders"), typed![&ctx.lease])
            .await?)
    }
}

/// The built-in steps, in order. Modules append their own steps here.
pub fn default_steps() -> Vec<Arc<dyn MaintenanceStep>> {
    let mut steps: Vec<Arc<dyn MaintenanceStep>> = vec![
        Arc::new(StaleInstances),
        Arc::new(StuckRuns),
        Arc::new(ExpiredLeaders),
    ];
    steps.extend(crate::queue::maintenance_steps());
    steps.extend(crate::runs::maintenance_steps());
    steps.extend(crate::tenancy::maintenance_steps());
    steps
}

/// Run every step once, each in its own fenced transaction. Stops with
/// [`Error::LeaseLost`] as soon as the term no longer holds.
#[instrument(skip(db, steps, ctx), fields(term = ctx.term), err)]
pub async fn run_once(
    db: &Db,
    steps: &[Arc<dyn MaintenanceStep>],
    ctx: &MaintenanceContext,
) -> Result<MaintenanceReport> {
    let mut report = MaintenanceReport::default();
    for step in steps {
        let mut conn = db.get().await?;
        let tx = conn.transaction().await?;
        let fenced = tx
            .query_typed_opt_row(
                sql!("coord/fence_leader"),
                typed![&ctx.lease, &ctx.instance_id, &ctx.term],
            )
            .await?;
        if fenced.is_none() {
            return Err(Error::LeaseLost(format!(
                "leader term {} of {} is no longer current; maintenance stopped",
                ctx.term, ctx.instance_id
            )));
        }
        let n = step.run(&tx, ctx).await?;
        tx.commit().await?;
        debug!(step = step.name(), rows = n, "maintenance step done");
        report.steps.push((step.name().to_string(), n));
    }
    Ok(report)
}

/// Sleep helper shared by background loops: returns `true` when shutdown was signalled.
pub(crate) async fn sleep_or_shutdown(
    d: Duration,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) -> bool {
    if *shutdown.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => *shutdown.borrow(),
        _ = shutdown.changed() => true,
    }
}
