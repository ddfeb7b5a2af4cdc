//! Sessions: a tenant's conversation or job, grouping runs.

use chrono::{DateTime, Utc};
use serde::Serialize;
use tracing::instrument;

use crate::db::Db;
use crate::db::Executor;
use crate::error::{Error, Result};
use crate::ids::{SessionId, TenantId};

/// A session: a tenant's conversation or job grouping runs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Session {
    /// Id.
    pub id: SessionId,
    /// Tenant.
    pub tenant_id: TenantId,
    /// The caller's identifier, unique per tenant.
    pub identifier: String,
    /// Metadata given at creation.
    pub metadata: serde_json::Value,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

/// Create (or fetch, when `(tenant, identifier)` exists) a session.
#[instrument(skip(db, metadata), err)]
pub async fn new_session(
    db: &Db,
    tenant: &TenantId,
    identifier: &str,
    metadata: serde_json::Value,
) -> Result<Session> {
    crate::ids::validate_text_id("session identifier", identifier)?;
    let conn = db.get().await?;
    ensure_tenant(&conn, tenant).await?;
    let row = conn
        .query_one(
            sql!("runs/upsert_session"),
            typed![&SessionId::new(), tenant, &identifier, &metadata],
        )
        .await?;
    Ok(session_from_row(&row))
}

pub(super) fn session_from_row(row: &tokio_postgres::Row) -> Session {
    Session {
        id: row.get(0),
        tenant_id: row.get(1),
        identifier: row.get(2),
        metadata: row.get(3),
        created_at: row.get(4),
    }
}

/// Fetch a session.
#[instrument(skip(db), err)]
pub async fn get_session(db: &Db, id: SessionId) -> Result<Session> {
    let row = db
        .query_opt(sql!("runs/get_session"), typed![&id])
        .await?
        .ok_or_else(|| Error::not_found("session", id))?;
    Ok(session_from_row(&row))
}

pub(super) async fn ensure_tenant<C: Executor + ?Sized>(
    client: &C,
    tenant: &TenantId,
) -> Result<()> {
    let exists: bool = client
        .query_one(sql!("runs/tenant_exists"), typed![tenant])
        .await?
        .get(0);
    if exists {
        Ok(())
    } else {
        Err(Error::not_found("tenant", tenant))
    }
}
