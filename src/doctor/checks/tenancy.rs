//! Tenancy checks: budgets, the roles bound to tenants, `pg_locks` readable by PUBLIC.

use std::collections::HashMap;

use super::Ctx;
use crate::doctor::{CheckId, Finding};
use crate::error::{Error, Result};

pub(super) async fn tenant_budgets(ctx: &Ctx<'_>) -> Result<Finding> {
    let check = CheckId::TenantBudgets;
    let row = ctx.one(sql!("doctor/tenants_without_budget")).await?;
    let total: i64 = row.try_get("total")?;
    let unlimited: Vec<String> = row.try_get("unlimited")?;
    Ok(if unlimited.is_empty() {
        Finding::pass(
            check,
            format!("every tenant in use has a budget limit ({total} tenant(s))"),
        )
    } else {
        Finding::warn(
            check,
            format!(
                "{} of {total} tenant(s) have no budget limit: their model and tool spending is \
                 unbounded",
                unlimited.len()
            ),
            "give each one a limit: `pgcrew tenants set <tenant> --budget-usd <limit>` (or \
             TenantContext::budget_usd)",
        )
        .items(
            unlimited
                .into_iter()
                .map(|t| format!("tenant {t}"))
                .collect(),
            ctx.opts.max_items,
        )
    })
}

pub(super) async fn tenant_roles(ctx: &Ctx<'_>) -> Result<Finding> {
    let check = CheckId::TenantRoles;
    let rows = ctx.client.query(sql!("doctor/tenant_roles"), &[]).await?;
    if rows.is_empty() {
        return Ok(Finding::pass(
            check,
            "no role is bound to a tenant (tenants have no SQL access)",
        ));
    }
    let who = ctx.one(sql!("doctor/is_superuser")).await?;
    let superuser: bool = who.try_get("superuser")?;
    let mut trust: HashMap<String, Vec<i32>> = HashMap::new();
    let mut hba_note = String::new();
    if superuser {
        match ctx
            .client
            .query(sql!("doctor/tenant_roles_trust"), &[])
            .await
        {
            Ok(rs) => {
                for r in rs {
                    trust.insert(r.try_get("role_name")?, r.try_get("lines")?);
                }
            }
            Err(e) => {
                hba_note = format!("; pg_hba.conf could not be read ({})", Error::from(e));
            }
        }
    } else {
        hba_note = "; pg_hba.conf not checked (needs a superuser)".to_string();
    }
    let mut fails = Vec::new();
    let mut warns = Vec::new();
    let mut kinds: Vec<&str> = Vec::new();
    for r in &rows {
        let role: String = r.try_get("role_name")?;
        let tenant: String = r.try_get("tenant_id")?;
        let who = format!("role {role} (tenant {tenant})");
        if r.try_get::<_, bool>("role_dropped")? {
            warns.push(format!(
                "{who}: the role was dropped; the binding is left over"
            ));
            kinds.push("dropped");
            continue;
        }
        if r.try_get::<_, bool>("superuser")? {
            fails.push(format!(
                "{who}: is a superuser, so row-level security does not apply to it"
            ));
            kinds.push("rls");
        }
        if r.try_get::<_, bool>("bypassrls")? {
            fails.push(format!(
                "{who}: has BYPASSRLS, so row-level security does not apply to it"
            ));
            kinds.push("rls");
        }
        if r.try_get::<_, bool>("owner_member")? {
            fails.push(format!(
                "{who}: is (a member of) the owner of the pgcrew tables, so row-level security \
                 does not apply to it"
            ));
            kinds.push("rls");
        }
        if let Some(lines) = trust.get(&role) {
            fails.push(format!(
                "{who}: can log in over TCP without a password (pg_hba.conf `trust`, line(s) {})",
                lines
                    .iter()
                    .map(|l| l.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            kinds.push("trust");
        }
        let missing: Vec<String> = r.try_get("missing")?;
        if !missing.is_empty() {
            warns.push(format!("{who}: lacks {}", missing.join(", ")));
            kinds.push("missing");
        }
        let extra: Vec<String> = r.try_get("extra")?;
        if !extra.is_empty() {
            warns.push(format!("{who}: also has {}", extra.join(", ")));
            kinds.push("extra");
        }
    }
    // Isolation first, then the grants, then leftovers.
    let order = ["rls", "trust", "missing", "extra", "dropped"];
    kinds.sort_by_key(|k| order.iter().position(|o| o == k));
    kinds.dedup();
    let mut advice = Vec::new();
    for k in &kinds {
        advice.push(match *k {
            "rls" => {
                "bind plain roles only (NOSUPERUSER NOBYPASSRLS, not members of the owner): \
                      `ALTER ROLE <role> NOSUPERUSER NOBYPASSRLS`, `REVOKE <owner> FROM <role>`, \
                      or unbind it with `pgcrew tenants revoke-role <role>`"
            }
            "trust" => {
                "require a password or certificate for these roles in pg_hba.conf (no \
                        `trust` on host lines), then `SELECT pg_reload_conf()`"
            }
            "missing" => {
                "grant again what reading needs: `pgcrew tenants grant-role <role> \
                          <tenant>` (idempotent)"
            }
            "extra" => {
                "revoke what grant-role does not give, e.g. `REVOKE INSERT, UPDATE, \
                        DELETE, TRUNCATE ON ALL TABLES IN SCHEMA pgcrew FROM <role>` and SELECT \
                        on tables without row-level security, then grant-role again"
            }
            _ => {
                "remove the leftover binding as the owner: `DELETE FROM pgcrew.tenant_roles \
                  WHERE role_oid = <oid>` (pgcrew.tenant_role_bindings shows the oid)"
            }
        });
    }
    let n = rows.len();
    let mut items = fails.clone();
    items.extend(warns.iter().cloned());
    Ok(if !fails.is_empty() {
        Finding::fail(
            check,
            format!(
                "{} problem(s) that break tenant isolation, {} to tidy, among {n} bound role(s){hba_note}",
                fails.len(),
                warns.len()
            ),
            advice.join("; "),
        )
        .items(items, ctx.opts.max_items)
    } else if !warns.is_empty() {
        Finding::warn(
            check,
            format!(
                "{} problem(s) with the grants of {n} bound role(s){hba_note}",
                warns.len()
            ),
            advice.join("; "),
        )
        .items(items, ctx.opts.max_items)
    } else {
        Finding::pass(
            check,
            format!(
                "{n} bound role(s): row-level security applies to each, with exactly the \
                 grants reading needs{hba_note}"
            ),
        )
    })
}

pub(super) async fn pg_locks_public(ctx: &Ctx<'_>) -> Result<Finding> {
    let check = CheckId::PgLocksPublic;
    let readable: bool = ctx.one(sql!("tenancy/pg_locks_public")).await?.try_get(0)?;
    if !readable {
        return Ok(Finding::pass(
            check,
            "pg_catalog.pg_locks is not readable by PUBLIC",
        ));
    }
    let bound: i64 = ctx
        .one(sql!("doctor/tenant_role_count"))
        .await?
        .try_get(0)?;
    Ok(if bound == 0 {
        Finding::pass(
            check,
            "pg_catalog.pg_locks is readable by PUBLIC, but no role is bound to a tenant (revoke \
             it before giving tenants SQL access)",
        )
    } else {
        Finding::warn(
            check,
            format!(
                "pg_catalog.pg_locks is readable by PUBLIC while {bound} role(s) are bound to \
                 tenants: a tenant role polling it sees the keys of the advisory locks other \
                 tenants' runs hold, and can take one to block that run"
            ),
            "as a superuser, in this database: `REVOKE SELECT ON pg_catalog.pg_locks FROM \
             PUBLIC;`",
        )
    })
}
