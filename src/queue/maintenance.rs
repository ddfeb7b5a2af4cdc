//! Leader maintenance for the queue: rescue of orphaned running tasks, retention.

use std::sync::Arc;

use async_trait::async_trait;
use tracing::{info, warn};

use crate::config::interval_micros;
use crate::coord::maintenance::{MaintenanceContext, MaintenanceStep};
use crate::db::Executor;
use crate::error::Result;

/// Returns running tasks whose instance is gone (not in `pgcrew.instances`) or whose heartbeat
/// is older than `task_heartbeat_timeout` to `retryable` (due now), or discards them when they
/// are out of attempts. At most `retention_batch_size` per pass.
#[derive(Debug)]
pub struct RescueTasks;

#[async_trait]
impl MaintenanceStep for RescueTasks {
    fn name(&self) -> &'static str {
        "rescue_tasks"
    }
    async fn run(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        ctx: &MaintenanceContext,
    ) -> Result<u64> {
        let timeout = interval_micros(ctx.config.task_heartbeat_timeout);
        let limit = i32::try_from(ctx.config.retention_batch_size).unwrap_or(i32::MAX);
        let rows = Executor::query(tx, sql!("queue/rescue"), typed![&timeout, &limit]).await?;
        for r in &rows {
            let id: i64 = r.get(0);
            let state: String = r.get(1);
            warn!(task = id, state = %state, "maintenance: rescued an orphaned running task");
        }
        Ok(rows.len() as u64)
    }
}

/// Deletes completed, discarded and cancelled tasks finalized more than `task_retention` ago,
/// at most `retention_batch_size` per pass.
#[derive(Debug)]
pub struct TaskRetention;

#[async_trait]
impl MaintenanceStep for TaskRetention {
    fn name(&self) -> &'static str {
        "task_retention"
    }
    async fn run(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        ctx: &MaintenanceContext,
    ) -> Result<u64> {
        let age = interval_micros(ctx.config.task_retention);
        let n = Executor::execute(
            tx,
            sql!("queue/retention"),
            typed![&age, &ctx.config.retention_batch_size],
        )
        .await?;
        if n > 0 {
            info!(deleted = n, "maintenance: deleted old finished tasks");
        }
        Ok(n)
    }
}

/// Maintenance steps this module contributes to the leader's maintenance pass: rescue of tasks
/// of dead instances or with stale heartbeats, then retention of finished tasks.
pub fn maintenance_steps() -> Vec<Arc<dyn MaintenanceStep>> {
    vec![Arc::new(RescueTasks), Arc::new(TaskRetention)]
}
