//! The leader-only maintenance runner. Every step runs in its own short transaction that first
//! locks the leader row and checks our term (`FOR SHARE`), so a deposed leader can never act:
//! while the step runs nobody can take the lease, and once someone has, the check fails.
//!
//! This module knows steps only through [`MaintenanceStep`]: each module brings its own steps
//! in its `maintenance.rs` (coordination's own are [`StaleInstances`] and [`ExpiredLeaders`]), and
//! the client composes the default list.

use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;
use tracing::{debug, instrument};

use crate::config::ClientConfig;
use crate::db::Db;
use crate::db::Executor;
use crate::error::{Error, Result};
use crate::ids::InstanceId;

mod steps;

pub use steps::{ExpiredLeaders, StaleInstances};

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

impl MaintenanceContext {
    /// Check in `tx` that this leader's term still holds (`coord/fence_leader`), so the leader's
    /// work that follows in `tx` commits only under it; [`Error::LeaseLost`] naming `what`
    /// (which stops) otherwise.
    pub(crate) async fn fence<E: Executor + ?Sized>(&self, tx: &E, what: &str) -> Result<()> {
        // How long the fenced transaction may sit idle: a leader cut off inside it must not
        // keep the row locked past its lease (see `coord/fence_leader`).
        let idle = format!("{}ms", self.config.leader_ttl.as_millis().max(1));
        let fenced = tx
            .query_opt(
                sql!("coord/fence_leader"),
                typed![&self.lease, &self.instance_id, &self.term, &idle],
            )
            .await?;
        if fenced.is_none() {
            return Err(Error::LeaseLost(format!(
                "leader term {} of {} is no longer current; {what} stopped",
                self.term, self.instance_id
            )));
        }
        Ok(())
    }
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

/// Hand each row a step's statement returned to `log` (which reads and logs it) and count them:
/// what most steps report.
pub fn log_rows(
    rows: &[tokio_postgres::Row],
    mut log: impl FnMut(&tokio_postgres::Row) -> Result<()>,
) -> Result<u64> {
    rows.iter().try_for_each(&mut log)?;
    Ok(rows.len() as u64)
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
        ctx.fence(&tx, "maintenance").await?;
        let started = std::time::Instant::now();
        let n = match step.run(&tx, ctx).await {
            Ok(n) => n,
            Err(e) => {
                crate::telemetry::global().maintenance_errors.inc();
                return Err(e);
            }
        };
        tx.commit().await?;
        crate::telemetry::global().maintenance_step(step.name(), started.elapsed(), n);
        debug!(step = step.name(), rows = n, "maintenance step done");
        report.steps.push((step.name().to_string(), n));
    }
    Ok(report)
}
