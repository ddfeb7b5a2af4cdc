//! Leader maintenance for schedules: retention of old fire records.

use tracing::info;

use crate::config::interval_micros;
use crate::db::Executor;

maintenance_step! {
    /// Deletes records of fires enqueued more than `task_retention` ago (at most
    /// `retention_batch_size` per pass): a fire that old cannot come due again.
    ScheduleFireRetention, "schedule_fire_retention", probe: |_ctx| crate::coord::maintenance::Probe::WhenDue,
    |tx, ctx| {
        let age = interval_micros(ctx.config.task_retention);
        let n = Executor::execute(tx,
                sql!("schedule/retention"),
                typed![&age, &ctx.config.retention_batch_size],
            ).await?;
        if n > 0 {
            info!(deleted = n, "maintenance: deleted old schedule fire records");
        }
        Ok(n)
    }
}
