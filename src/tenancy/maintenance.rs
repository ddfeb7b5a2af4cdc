//! Leader maintenance for tenancy: releasing budget reservations of instances that are gone
//! (or that are too old).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tracing::info;
use uuid::Uuid;

use crate::config::interval_micros;
use crate::coord::maintenance::{MaintenanceContext, MaintenanceStep, Probe, log_rows};
use crate::db::Executor;
use crate::error::Result;

/// Maintenance step: releases reservations whose instance no longer exists in
/// `pgcrew.instances`, or that are older than `max_age` (default: the client's
/// `stuck_run_timeout` — a model call cannot legitimately outlive its run).
#[derive(Debug, Clone, Default)]
pub struct ReleaseOrphanedReservations {
    /// Reservations older than this are released (default: `stuck_run_timeout`).
    pub max_age: Option<Duration>,
}

#[async_trait]
impl MaintenanceStep for ReleaseOrphanedReservations {
    fn name(&self) -> &'static str {
        "release_orphaned_reservations"
    }

    fn probe(&self, _ctx: &MaintenanceContext) -> Probe {
        // `pgcrew.maintenance_due` tests the default age (the stuck-run timeout) only.
        match self.max_age {
            None => Probe::WhenDue,
            Some(_) => Probe::Always,
        }
    }

    async fn run(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        ctx: &MaintenanceContext,
    ) -> Result<u64> {
        let age = interval_micros(self.max_age.unwrap_or(ctx.config.stuck_run_timeout));
        let rows = Executor::query(
            tx,
            sql!("tenancy/release_orphaned_reservations"),
            typed![&age, &ctx.config.retention_batch_size],
        )
        .await?;
        log_rows(&rows, |r| {
            let id: Uuid = r.try_get("id")?;
            let tenant: String = r.try_get("tenant_id")?;
            let instance: Option<String> = r.try_get("instance_id")?;
            let amount: f64 = r.try_get("amount_usd")?;
            info!(reservation = %id, tenant, instance = ?instance, amount,
                "maintenance: released orphaned budget reservation");
            Ok(())
        })
    }
}

/// Maintenance steps this module contributes to the leader's maintenance pass: releasing budget
/// reservations of instances that are gone (or that are too old).
pub fn maintenance_steps() -> Vec<Arc<dyn MaintenanceStep>> {
    vec![Arc::new(ReleaseOrphanedReservations::default())]
}
