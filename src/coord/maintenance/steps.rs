//! Coordination's own maintenance steps: stale instances and expired leases.

use tracing::info;

use super::log_rows;
use crate::config::interval_micros;
use crate::db::Executor;

maintenance_step! {
    /// Deletes instances silent for longer than the instance TTL (links cascade).
    StaleInstances, "stale_instances", probe: |_ctx| crate::coord::maintenance::Probe::WhenDue,
    |tx, ctx| {
        let ttl = interval_micros(ctx.config.instance_ttl);
        let rows = Executor::query(tx, sql!("coord/delete_stale_instances"), typed![&ttl]).await?;
        log_rows(&rows, |r| {
            let id: String = r.try_get(0)?;
            info!(instance = %id, "maintenance: removed stale instance");
            Ok(())
        })
    }
}

maintenance_step! {
    /// Deletes expired rows of other lease names.
    ExpiredLeaders, "expired_leaders", probe: |_ctx| crate::coord::maintenance::Probe::WhenDue,
    |tx, ctx| {
        Ok(Executor::execute(tx, sql!("coord/delete_expired_leaders"), typed![&ctx.lease]).await?)
    }
}
