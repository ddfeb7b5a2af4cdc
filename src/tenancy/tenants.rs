//! Tenants: configuration ([`TenantContext`]), upsert/get/list and capability checks.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tracing::instrument;

use crate::db::Db;
use crate::db::Executor;
use crate::error::{Error, Result};
use crate::ids::{TenantId, validate_text_id};
use crate::tenancy::degradation::DegradationPolicy;
use crate::tenancy::status::{BudgetStatus, BudgetThresholds};

/// Largest accepted budget (the column is `numeric(20, 10)`).
pub const MAX_BUDGET_USD: f64 = 1e9;

/// A tenant's configuration: what it may do and how much it may spend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantContext {
    /// The tenant.
    pub tenant_id: TenantId,
    /// Capabilities granted (tools declare `requires_capability`). Sorted and de-duplicated on
    /// write.
    pub capabilities: Vec<String>,
    /// Budget limit in USD (`None`: unlimited).
    pub budget_usd_limit: Option<f64>,
    /// Maximum concurrently running runs (`None`: unlimited).
    pub max_concurrent_runs: Option<i32>,
    /// Maximum concurrently running tasks (`None`: unlimited).
    pub max_concurrent_tasks: Option<i32>,
    /// Budget status thresholds.
    #[serde(default)]
    pub thresholds: BudgetThresholds,
    /// Degradation policy.
    #[serde(default)]
    pub degradation: DegradationPolicy,
}

impl TenantContext {
    /// A context for `tenant_id` (validated) with no capabilities, no limits and the default
    /// thresholds.
    pub fn new(tenant_id: impl Into<String>) -> Result<Self> {
        Ok(Self::for_id(TenantId::new(tenant_id)?))
    }

    /// A default context for an already validated id.
    pub fn for_id(tenant_id: TenantId) -> Self {
        Self {
            tenant_id,
            capabilities: Vec::new(),
            budget_usd_limit: None,
            max_concurrent_runs: None,
            max_concurrent_tasks: None,
            thresholds: BudgetThresholds::default(),
            degradation: DegradationPolicy::default(),
        }
    }

    /// Set the capabilities (builder style).
    pub fn capabilities<I, S>(mut self, caps: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.capabilities = caps.into_iter().map(Into::into).collect();
        self
    }

    /// Set the budget limit (builder style).
    pub fn budget_usd(mut self, limit: Option<f64>) -> Self {
        self.budget_usd_limit = limit;
        self
    }

    /// Set the concurrency limits (builder style).
    pub fn limits(mut self, runs: Option<i32>, tasks: Option<i32>) -> Self {
        self.max_concurrent_runs = runs;
        self.max_concurrent_tasks = tasks;
        self
    }

    /// Set the thresholds (builder style).
    pub fn thresholds(mut self, thresholds: BudgetThresholds) -> Self {
        self.thresholds = thresholds;
        self
    }

    /// Set the degradation policy (builder style).
    pub fn degradation(mut self, policy: DegradationPolicy) -> Self {
        self.degradation = policy;
        self
    }

    /// Whether the tenant holds `capability`.
    pub fn has_capability(&self, capability: &str) -> bool {
        self.capabilities.iter().any(|c| c == capability)
    }

    /// Check that the tenant may call `tool`, which requires `required` (if anything):
    /// [`Error::CapabilityDenied`] otherwise. Pure; see [`require_capability`] for the
    /// check against the stored row.
    pub fn check_capability(&self, tool: &str, required: Option<&str>) -> Result<()> {
        check_capability(&self.tenant_id, &self.capabilities, tool, required)
    }

    /// Validate every field (a clear [`Error::InvalidInput`] for the first bad one) and
    /// normalise the capabilities (sorted, de-duplicated).
    pub fn validate(&mut self) -> Result<()> {
        validate_text_id("tenant id", self.tenant_id.as_str())?;
        for c in &self.capabilities {
            validate_text_id("capability", c)?;
        }
        self.capabilities.sort();
        self.capabilities.dedup();
        if let Some(b) = self.budget_usd_limit {
            validate_budget("budget_usd_limit", b)?;
        }
        for (field, v) in [
            ("max_concurrent_runs", self.max_concurrent_runs),
            ("max_concurrent_tasks", self.max_concurrent_tasks),
        ] {
            if let Some(n) = v
                && n <= 0
            {
                return Err(Error::invalid(
                    field,
                    format!("{n} is not a positive limit (omit it for no limit)"),
                ));
            }
        }
        self.thresholds.validate()?;
        self.degradation.validate()?;
        Ok(())
    }
}

/// Check a USD amount used as a budget: finite, non-negative, at most [`MAX_BUDGET_USD`].
pub fn validate_budget(field: &'static str, usd: f64) -> Result<()> {
    if usd.is_nan() {
        return Err(Error::invalid(
            field,
            "is NaN; give a USD amount such as 25.00",
        ));
    }
    if usd.is_infinite() {
        return Err(Error::invalid(
            field,
            "is infinite; omit the limit for an unlimited budget",
        ));
    }
    if usd < 0.0 {
        return Err(Error::invalid(
            field,
            format!("{usd} is negative; a budget must be >= 0 USD"),
        ));
    }
    if usd > MAX_BUDGET_USD {
        return Err(Error::invalid(
            field,
            format!("{usd} is larger than the maximum of {MAX_BUDGET_USD} USD"),
        ));
    }
    Ok(())
}

/// The capability rule shared by the pure and the database checks.
pub(crate) fn check_capability(
    tenant: &TenantId,
    capabilities: &[String],
    tool: &str,
    required: Option<&str>,
) -> Result<()> {
    match required {
        Some(cap) if !capabilities.iter().any(|c| c == cap) => Err(Error::CapabilityDenied {
            tenant: tenant.to_string(),
            capability: cap.to_string(),
            tool: tool.to_string(),
        }),
        _ => Ok(()),
    }
}

/// A stored tenant: its configuration plus its accounting figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Tenant {
    /// The configuration.
    #[serde(flatten)]
    pub context: TenantContext,
    /// Spent so far (USD).
    pub spent_usd: f64,
    /// Reserved by in-flight calls (USD).
    pub reserved_usd: f64,
    /// Current budget status.
    pub status: BudgetStatus,
    /// Open reservations.
    pub active_reservations: i64,
    /// Free-form metadata.
    pub metadata: serde_json::Value,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change (configuration or accounting).
    pub updated_at: DateTime<Utc>,
}

fn tenant_from_row(r: &tokio_postgres::Row) -> Result<Tenant> {
    let policy: serde_json::Value = r.try_get("degradation_policy")?;
    Ok(Tenant {
        context: TenantContext {
            tenant_id: r.try_get("id")?,
            capabilities: r.try_get("capabilities")?,
            budget_usd_limit: r.try_get("budget_usd_limit")?,
            max_concurrent_runs: r.try_get("max_concurrent_runs")?,
            max_concurrent_tasks: r.try_get("max_concurrent_tasks")?,
            thresholds: BudgetThresholds {
                warning: r.try_get("warning_threshold")?,
                critical: r.try_get("critical_threshold")?,
            },
            degradation: serde_json::from_value(policy)?,
        },
        spent_usd: r.try_get("spent_usd")?,
        reserved_usd: r.try_get("reserved_usd")?,
        status: r.try_get("budget_status")?,
        active_reservations: r.try_get("active_reservations")?,
        metadata: r.try_get("metadata")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

/// Create or replace a tenant's configuration. Validates everything first (nothing is written
/// on bad input). Accounting figures (spent, reserved) are kept. Returns `true` when the tenant
/// was created.
#[instrument(skip(db, ctx), fields(tenant = %ctx.tenant_id), err)]
pub async fn upsert(db: &Db, ctx: &TenantContext) -> Result<bool> {
    let mut ctx = ctx.clone();
    ctx.validate()?;
    let policy = serde_json::to_value(&ctx.degradation)?;
    let row = db
        .query_one(
            sql!("tenancy/upsert_tenant"),
            typed![
                &ctx.tenant_id,
                &ctx.capabilities,
                &ctx.budget_usd_limit,
                &ctx.max_concurrent_runs,
                &ctx.max_concurrent_tasks,
                &ctx.thresholds.warning,
                &ctx.thresholds.critical,
                &policy,
            ],
        )
        .await?;
    Ok(row.try_get("inserted")?)
}

/// A tenant, or [`Error::NotFound`].
#[instrument(skip(db), err)]
pub async fn get(db: &Db, tenant: &TenantId) -> Result<Tenant> {
    let row = db
        .query_opt(sql!("tenancy/get_tenant"), typed![tenant])
        .await?
        .ok_or_else(|| Error::not_found("tenant", tenant))?;
    tenant_from_row(&row)
}

/// All tenants, by id.
#[instrument(skip(db), err)]
pub async fn list(db: &Db) -> Result<Vec<Tenant>> {
    let rows = db.query(sql!("tenancy/list_tenants"), typed![]).await?;
    rows.iter().map(tenant_from_row).collect()
}

/// Check that `tenant` holds the capability `required` by `tool`: [`Error::CapabilityDenied`]
/// when it does not ([`Error::NotFound`] for an unknown tenant). One statement, on the pool or
/// inside the caller's transaction (the kernel checks before running a tool and records the
/// audit event in the same transaction).
#[instrument(skip(on), err)]
pub async fn require_capability<E: Executor + ?Sized>(
    on: &E,
    tenant: &TenantId,
    tool: &str,
    required: Option<&str>,
) -> Result<()> {
    let Some(cap) = required else {
        return Ok(());
    };
    let row = on
        .query_opt(sql!("tenancy/tenant_capabilities"), typed![tenant])
        .await?
        .ok_or_else(|| Error::not_found("tenant", tenant))?;
    let caps: Vec<String> = row.try_get(0)?;
    check_capability(tenant, &caps, tool, Some(cap))
}
