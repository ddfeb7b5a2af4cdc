//! Leader maintenance for the queue: rescue of orphaned running tasks, retention.

use std::sync::Arc;

use tracing::{info, warn};

use crate::config::interval_micros;
use crate::coord::maintenance::{MaintenanceStep, log_rows};
use crate::db::Executor;

maintenance_step! {
    /// Returns running tasks whose instance is gone (not in `pgcrew.instances`) or whose
    /// heartbeat is older than `task_heartbeat_timeout` to `retryable` (due now), or discards
    /// them when they are out of attempts. At most `retention_batch_size` per pass.
    RescueTasks, "rescue_tasks", probe: |_ctx| crate::coord::maintenance::Probe::WhenDue,
    |tx, ctx| {
        let timeout = interval_micros(ctx.config.task_heartbeat_timeout);
        let limit = i32::try_from(ctx.config.retention_batch_size).unwrap_or(i32::MAX);
        let rows = Executor::query(tx, sql!("queue/rescue"), typed![&timeout, &limit]).await?;
        log_rows(&rows, |r| {
            let id: i64 = r.try_get(0)?;
            let state: String = r.try_get(1)?;
            let (queue, kind): (String, String) = (r.try_get(2)?, r.try_get(3)?);
            crate::telemetry::global().task_rescued(&queue, &kind);
            warn!(task = id, state = %state, "maintenance: rescued an orphaned running task");
            Ok(())
        })
    }
}

maintenance_step! {
    /// Deletes completed, discarded and cancelled tasks finalized more than `task_retention`
    /// ago, at most `retention_batch_size` per pass.
    TaskRetention, "task_retention", probe: |_ctx| crate::coord::maintenance::Probe::WhenDue,
    |tx, ctx| {
        let age = interval_micros(ctx.config.task_retention);
        let n = Executor::execute(tx,
                sql!("queue/retention"),
                typed![&age, &ctx.config.retention_batch_size],
            ).await?;
        if n > 0 {
            info!(deleted = n, "maintenance: deleted old finished tasks");
        }
        Ok(n)
    }
}

maintenance_step! {
    /// Writes the per-minute figures of finished tasks (`pgcrew.queue_minutes`: the console's
    /// throughput and latency sparklines) for the minutes since the last pass.
    QueueMinutes, "queue_minutes", probe: |_ctx| crate::coord::maintenance::Probe::WhenDue,
    |tx, _ctx| {
        Ok(Executor::execute(tx, sql!("queue/minutes"), typed![]).await?)
    }
}

maintenance_step! {
    /// Deletes task events older than `task_retention`, queue pause records older than
    /// `history_retention` (at most `retention_batch_size` of each per pass) and per-minute
    /// figures older than a day.
    QueueHistoryRetention, "queue_history_retention", probe: |_ctx| crate::coord::maintenance::Probe::WhenDue,
    |tx, ctx| {
        let tasks = interval_micros(ctx.config.task_retention);
        let history = interval_micros(ctx.config.history_retention);
        let row = Executor::query_one(tx,
            sql!("queue/history_retention"),
            typed![&tasks, &history, &ctx.config.retention_batch_size],
        ).await?;
        let n: i64 = row.try_get(0)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

/// Maintenance steps this module contributes to the leader's maintenance pass: rescue of tasks
/// of dead instances or with stale heartbeats, retention of finished tasks, the per-minute
/// figures, then retention of the queue's history.
pub fn maintenance_steps() -> Vec<Arc<dyn MaintenanceStep>> {
    vec![
        Arc::new(RescueTasks),
        Arc::new(QueueMinutes),
        Arc::new(TaskRetention),
        Arc::new(QueueHistoryRetention),
    ]
}
