//! Instance registration, heartbeats and listing.

use chrono::{DateTime, Utc};
use serde::Serialize;
use tracing::instrument;

use crate::db::Db;
use crate::db::Executor;
use crate::error::Result;
use crate::ids::InstanceId;

/// What an instance registers about itself.
#[derive(Debug, Clone)]
pub struct InstanceInfo {
    /// The instance id.
    pub id: InstanceId,
    /// Host name of the machine.
    pub hostname: String,
    /// OS process id.
    pub pid: i32,
    /// pgcrew version.
    pub version: String,
    /// Free-form metadata.
    pub metadata: serde_json::Value,
    /// Agent names served by this instance.
    pub agents: Vec<String>,
    /// Tool names registered in this instance.
    pub tools: Vec<String>,
}

/// The machine's host name (from the kernel, falling back to `$HOSTNAME`, then `unknown`).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}

/// Register (or re-register) the instance and replace its agent and tool links, atomically.
#[instrument(skip(db, info), fields(instance = %info.id), err)]
pub async fn register(db: &Db, info: &InstanceInfo) -> Result<()> {
    let mut conn = db.get().await?;
    let tx = conn.transaction().await?;
    tx.execute(
        sql!("coord/register_instance"),
        typed![
            &info.id,
            &info.hostname,
            &info.pid,
            &info.version,
            &info.metadata,
        ],
    )
    .await?;
    tx.execute(sql!("coord/clear_instance_links"), typed![&info.id])
        .await?;
    tx.execute(
        sql!("coord/insert_instance_agents"),
        typed![&info.id, &info.agents],
    )
    .await?;
    tx.execute(
        sql!("coord/insert_instance_tools"),
        typed![&info.id, &info.tools],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Refresh the heartbeat. Returns `false` when the row is gone (the instance was removed as
/// stale and must re-register).
#[instrument(skip(db), err)]
pub async fn heartbeat(db: &Db, id: &InstanceId) -> Result<bool> {
    let conn = db.get().await?;
    heartbeat_on(&conn, id).await
}

/// [`heartbeat`] on a given connection (the instance's coordination connection).
pub(crate) async fn heartbeat_on(conn: &tokio_postgres::Client, id: &InstanceId) -> Result<bool> {
    Ok(Executor::execute(conn, sql!("coord/heartbeat"), typed![id]).await? == 1)
}

/// Delete the instance row (links cascade; the deregistration NOTIFY fires).
#[instrument(skip(db), err)]
pub async fn deregister(db: &Db, id: &InstanceId) -> Result<bool> {
    Ok(db
        .execute(sql!("coord/deregister_instance"), typed![id])
        .await?
        == 1)
}

/// An instance row as listed by [`list`].
#[derive(Debug, Clone, Serialize, postgres_from_row::FromRow)]
pub struct InstanceRow {
    /// Instance id.
    pub id: String,
    /// Host name.
    pub hostname: String,
    /// Process id.
    pub pid: i32,
    /// pgcrew version.
    pub version: String,
    /// Metadata.
    pub metadata: serde_json::Value,
    /// Registration time.
    pub created_at: DateTime<Utc>,
    /// Last heartbeat.
    pub last_heartbeat_at: DateTime<Utc>,
    /// Milliseconds since the last heartbeat (database time).
    pub silent_ms: i64,
    /// Whether it currently holds a valid leader lease.
    pub is_leader: bool,
    /// Agents it serves.
    pub agents: Vec<String>,
    /// Tools it has.
    pub tools: Vec<String>,
}

/// All registered instances, oldest first.
#[instrument(skip(db), err)]
pub async fn list(db: &Db) -> Result<Vec<InstanceRow>> {
    let rows = db.query(sql!("coord/list_instances"), typed![]).await?;
    crate::db::rows_as(&rows)
}
