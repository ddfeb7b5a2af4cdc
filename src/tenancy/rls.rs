//! Row-Level Security for operators who give tenants SQL access.
//!
//! A tenant's SQL role is bound to its tenant by a protected mapping, `pgcrew.tenant_roles`
//! (writable only by the pgcrew owner), never by a setting it could change. Every
//! tenant-scoped table (`tenants`, `sessions`, `runs`, `events`, `tasks`, `artifacts`,
//! `summaries`, `cost_entries`, `budget_reservations`, `chain_anchors`, ...) has a policy
//! `tenant_isolation` that admits only the rows of `pgcrew.current_tenant()`: a
//! `SECURITY DEFINER` function with a fixed `search_path` that looks the effective role up in
//! the mapping (the `SET ROLE` target, else the login role; PostgreSQL only lets a session take
//! roles it is a member of). `SET pgcrew.tenant_id = ...` or `set_config(...)` change nothing.
//! The views `tenant_costs` and `budget_status` are `security_invoker`, so they obey the same
//! policies.
//!
//! The role that owns the schema (the one pgcrew migrates and runs with) is not affected, nor
//! are superusers and `BYPASSRLS` roles: that is the operator path. **pgcrew itself must run
//! as the owner of the tables or as a `BYPASSRLS` role.** To give tenant `acme` read access:
//!
//! ```sql
//! CREATE ROLE acme_reader LOGIN PASSWORD '...';
//! SELECT pgcrew.grant_tenant_role('acme_reader', 'acme');  -- or: pgcrew tenants grant-role
//! ```
//!
//! A role gets `SELECT` on the tenant-scoped tables and the two views, and `EXECUTE` on the
//! functions reading needs (`current_tenant`, `verify_run_chain`, the hash functions); no pgcrew
//! function is executable by `PUBLIC`. A role that is not bound sees no rows at all.

use chrono::{DateTime, Utc};
use serde::Serialize;
use tracing::{info, instrument};

use crate::db::Db;
use crate::db::Executor;
use crate::error::Result;
use crate::ids::TenantId;

/// A role bound to a tenant (a row of `pgcrew.tenant_roles`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TenantRole {
    /// The PostgreSQL role.
    pub role: String,
    /// Its tenant.
    pub tenant_id: TenantId,
    /// When it was bound.
    pub granted_at: DateTime<Utc>,
}

fn validate_role(role: &str) -> Result<()> {
    crate::ids::validate_text_id("role", role)?;
    if role.len() > 63 {
        return Err(crate::Error::invalid(
            "role",
            format!(
                "is {} bytes long; PostgreSQL role names have at most 63",
                role.len()
            ),
        ));
    }
    Ok(())
}

/// Grant `role` read access to the tenant-scoped tables and views without binding it to a
/// tenant (it then sees no rows until [`grant_tenant_role`] binds it). Returns the objects
/// granted.
#[instrument(skip(db), err)]
pub async fn grant_tenant_access(db: &Db, role: &str) -> Result<Vec<String>> {
    validate_role(role)?;
    let rows = db
        .query(sql!("tenancy/grant_tenant_access"), typed![&role])
        .await?;
    rows.iter().map(|r| Ok(r.try_get("granted")?)).collect()
}

/// Bind the existing `role` to `tenant` and grant it read access; returns the tables and views
/// granted. Refused (nothing changed) for an unknown role or tenant, a superuser or
/// `BYPASSRLS` role, a member of the owner role, and a role bound to another tenant.
#[instrument(skip(db), err)]
pub async fn grant_tenant_role(db: &Db, role: &str, tenant: &TenantId) -> Result<Vec<String>> {
    validate_role(role)?;
    let mut conn = db.get().await?;
    let tx = conn.transaction().await?;
    let rows = tx
        .query(sql!("tenancy/grant_tenant_role"), typed![&role, tenant])
        .await?;
    let granted = rows
        .iter()
        .map(|r| Ok(r.try_get("granted")?))
        .collect::<Result<Vec<String>>>()?;
    tx.commit().await?;
    info!(role, tenant = %tenant, "bound role to tenant");
    Ok(granted)
}

/// Unbind `role` from its tenant and revoke its access to pgcrew's tables, views and
/// functions. Returns whether it was bound.
#[instrument(skip(db), err)]
pub async fn revoke_tenant_role(db: &Db, role: &str) -> Result<bool> {
    validate_role(role)?;
    let mut conn = db.get().await?;
    let tx = conn.transaction().await?;
    let was: bool = tx
        .query_one(sql!("tenancy/revoke_tenant_role"), typed![&role])
        .await?
        .get(0);
    tx.commit().await?;
    info!(role, was_bound = was, "revoked tenant role");
    Ok(was)
}

/// Whether `PUBLIC` (so every tenant role) can read `pg_catalog.pg_locks`, where PostgreSQL
/// shows the keys of advisory locks while they are held. Advisory-lock keys are derived from
/// an installation secret no tenant can read, but a tenant that polls `pg_locks` can learn a
/// key while another tenant's transaction holds it and take it afterwards. Where tenants have
/// SQL access, a superuser should run `REVOKE SELECT ON pg_catalog.pg_locks FROM PUBLIC;` in
/// the pgcrew database (`pgcrew tenants grant-role` warns while it has not).
#[instrument(skip(db), err)]
pub async fn pg_locks_readable_by_public(db: &Db) -> Result<bool> {
    Ok(db
        .query_one(sql!("tenancy/pg_locks_public"), typed![])
        .await?
        .get(0))
}

/// Every role bound to a tenant, by tenant.
#[instrument(skip(db), err)]
pub async fn list_tenant_roles(db: &Db) -> Result<Vec<TenantRole>> {
    let rows = db
        .query(sql!("tenancy/list_tenant_roles"), typed![])
        .await?;
    rows.iter()
        .map(|r| {
            Ok(TenantRole {
                role: r.try_get(0)?,
                tenant_id: TenantId::new(r.try_get::<_, String>(1)?)?,
                granted_at: r.try_get(2)?,
            })
        })
        .collect()
}
