//! Row-Level Security for operators who give tenants SQL access.
//!
//! Migration V004 enables RLS on `pgcrew.tenants` and on every tenant-scoped table (`sessions`,
//! `runs`, `events`, `tasks`, `artifacts`, `summaries`, `cost_entries`,
//! `budget_reservations`), with a policy `tenant_isolation` that admits only rows whose
//! `tenant_id` equals the session setting `pgcrew.tenant_id`. The views `tenant_costs` and
//! `budget_status` are `security_invoker`, so they obey the same policies.
//!
//! The role that owns the schema (the one pgcrew migrates and runs with) is not affected, nor
//! are superusers and `BYPASSRLS` roles. **pgcrew itself must run as the owner of the tables or
//! as a `BYPASSRLS` role**: a non-owner application role would see no rows at all. (The policies
//! are not `FORCE`d for that reason.) To give tenant `acme` read access:
//!
//! ```sql
//! CREATE ROLE acme_reader LOGIN PASSWORD '...';
//! SELECT pgcrew.grant_tenant_access('acme_reader');          -- USAGE + SELECT
//! ALTER ROLE acme_reader SET pgcrew.tenant_id = 'acme';      -- or SET per session
//! ```
//!
//! A session without the setting sees no rows at all. Note that a role that can run `SET` can
//! change its own setting: for hard isolation give each tenant its own role and pin the setting
//! with `ALTER ROLE ... SET` behind a connection pooler that does not let clients send `SET`, or
//! (stronger) replace `pgcrew.current_tenant()` with a mapping from `current_user`.

use tracing::instrument;

use crate::db::Db;
use crate::error::Result;
use crate::ids::TenantId;

/// Grant `role` (an existing role, not the schema owner) read access to the tenant-scoped tables
/// and views; returns the objects granted. The policies then limit it to the tenant in its
/// `pgcrew.tenant_id` setting.
#[instrument(skip(db), err)]
pub async fn grant_tenant_access(db: &Db, role: &str) -> Result<Vec<String>> {
    crate::ids::validate_text_id("role", role)?;
    let conn = db.get().await?;
    let rows = conn
        .query(sql!("tenancy/grant_tenant_access"), &[&role])
        .await?;
    rows.iter().map(|r| Ok(r.try_get("granted")?)).collect()
}

/// Scope the caller's transaction to `tenant` for the RLS policies
/// (`set_config('pgcrew.tenant_id', tenant, true)`; reverts at commit or rollback).
#[instrument(skip(tx), err)]
pub async fn set_tenant_in_tx(
    tx: &tokio_postgres::Transaction<'_>,
    tenant: &TenantId,
) -> Result<()> {
    tx.query_one(sql!("tenancy/set_tenant_setting"), &[tenant])
        .await?;
    Ok(())
}
