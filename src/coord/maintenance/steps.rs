//! Coordination's own maintenance steps: stale instances and expired leases.

use async_trait::async_trait;
use tracing::info;

use super::{MaintenanceContext, MaintenanceStep};
use crate::config::interval_micros;
use crate::db::Executor;
use crate::error::Result;

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
        let rows = Executor::query(tx, sql!("coord/delete_stale_instances"), typed![&ttl]).await?;
        for r in &rows {
            let id: String = r.get(0);
            info!(instance = %id, "maintenance: removed stale instance");
        }
        Ok(rows.len() as u64)
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
        Ok(Executor::execute(tx, sql!("coord/delete_expired_leaders"), typed![&ctx.lease]).await?)
    }
}
