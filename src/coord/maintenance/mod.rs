//! The leader-only maintenance runner. Every step runs in its own short transaction that first
//! locks the leader row and checks our term (`FOR SHARE`), so a deposed leader can never act:
//! while the step runs nobody can take the lease, and once someone has, the check fails.
//!
//! A pass first asks, in one statement (`pgcrew.maintenance_due`, V041), which of the built-in
//! steps have anything to do (and whether the term still holds), and runs only those
//! ([`Probe`]): at idle a pass is that one statement. A step that fails is reported and the
//! others still run.
//!
//! This module knows steps only through [`MaintenanceStep`]: each module brings its own steps
//! in its `maintenance.rs` (coordination's own are [`StaleInstances`] and [`ExpiredLeaders`]), and
//! the client composes the default list.

use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;
use tracing::{debug, instrument, warn};

use crate::config::{ClientConfig, interval_micros};
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

/// Whether a step runs in a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// Every pass (the default: steps the pass's probe knows nothing about).
    Always,
    /// Not in this pass (e.g. the step is turned off in the configuration).
    Never,
    /// When `pgcrew.maintenance_due` (V041) names the step: it has rows to act on. Only for the
    /// built-in steps whose statement that function mirrors.
    WhenDue,
}

/// One maintenance step. Implementations do a bounded amount of work in `tx` and return how
/// many rows they affected.
#[async_trait]
pub trait MaintenanceStep: Send + Sync {
    /// Short name for logs and reports.
    fn name(&self) -> &'static str;
    /// Whether the step runs in a pass ([`Probe::Always`] unless the step says otherwise).
    fn probe(&self, _ctx: &MaintenanceContext) -> Probe {
        Probe::Always
    }
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
    /// `(step name, rows affected)` in execution order (a skipped step: 0).
    pub steps: Vec<(String, u64)>,
    /// Steps left out of the pass: nothing to do ([`Probe`]).
    pub skipped: Vec<String>,
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

/// Ask `pgcrew.maintenance_due` (V041) which built-in steps have work: `None` when the term no
/// longer holds.
async fn due_steps(db: &Db, ctx: &MaintenanceContext) -> Result<Option<Vec<String>>> {
    let c = &ctx.config;
    let [instance_ttl, heartbeat, tasks, history, stuck] = [
        c.instance_ttl,
        c.task_heartbeat_timeout,
        c.task_retention,
        c.history_retention,
        c.stuck_run_timeout,
    ]
    .map(interval_micros);
    let row = db
        .query_one(
            sql!("coord/maintenance_due"),
            typed![
                &ctx.lease,
                &ctx.instance_id,
                &ctx.term,
                &instance_ttl,
                &heartbeat,
                &tasks,
                &history,
                &stuck
            ],
        )
        .await?;
    Ok(row.try_get(0)?)
}

/// Run every step that has work once, each in its own fenced transaction: one statement asks
/// which steps have work ([`Probe`]); the steps it leaves out send nothing. Stops with
/// [`Error::LeaseLost`] as soon as the term no longer holds. A step that fails with another
/// error does not stop the others: the pass then ends with the first such error, after all
/// steps (every failure is logged and counted in `maintenance_errors`).
#[instrument(skip(db, steps, ctx), fields(term = ctx.term), err)]
pub async fn run_once(
    db: &Db,
    steps: &[Arc<dyn MaintenanceStep>],
    ctx: &MaintenanceContext,
) -> Result<MaintenanceReport> {
    let probes: Vec<Probe> = steps.iter().map(|s| s.probe(ctx)).collect();
    let due = if probes.contains(&Probe::WhenDue) {
        match due_steps(db, ctx).await? {
            Some(due) => due,
            None => {
                return Err(Error::LeaseLost(format!(
                    "leader term {} of {} is no longer current; maintenance stopped",
                    ctx.term, ctx.instance_id
                )));
            }
        }
    } else {
        Vec::new()
    };
    let mut report = MaintenanceReport::default();
    let mut first_error = None;
    for (step, probe) in steps.iter().zip(probes) {
        let runs = match probe {
            Probe::Always => true,
            Probe::Never => false,
            Probe::WhenDue => due.iter().any(|d| d == step.name()),
        };
        if !runs {
            crate::telemetry::global().maintenance_step_skipped(step.name());
            report.skipped.push(step.name().to_string());
            report.steps.push((step.name().to_string(), 0));
            continue;
        }
        match run_step(db, step.as_ref(), ctx).await {
            Ok(n) => report.steps.push((step.name().to_string(), n)),
            Err(e @ Error::LeaseLost(_)) => return Err(e),
            Err(e) => {
                crate::telemetry::global().maintenance_errors.inc();
                warn!(step = step.name(), error = %e, "maintenance step failed");
                report.steps.push((step.name().to_string(), 0));
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(report),
    }
}

/// One step in its own fenced transaction; its duration and rows go to the step metrics.
async fn run_step(db: &Db, step: &dyn MaintenanceStep, ctx: &MaintenanceContext) -> Result<u64> {
    let mut conn = db.get().await?;
    let tx = conn.transaction().await?;
    ctx.fence(&tx, "maintenance").await?;
    let started = std::time::Instant::now();
    let n = step.run(&tx, ctx).await?;
    tx.commit().await?;
    crate::telemetry::global().maintenance_step(step.name(), started.elapsed(), n);
    debug!(step = step.name(), rows = n, "maintenance step done");
    Ok(n)
}
