//! `pgcrew tenants set|list|show|grant-role|revoke-role|roles`.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use pgcrew::tenancy::{self, BudgetThresholds, CostFilter, DegradationPolicy, TenantContext};
use pgcrew::{Error, Result, TenantId};

use crate::output::{connect, print_json, print_rows, print_table};

/// `pgcrew tenants` subcommands.
#[derive(Debug, Subcommand)]
pub enum TenantsCmd {
    /// Create a tenant or change it: only the given settings change.
    Set(SetArgs),
    /// List tenants with their budget figures.
    List(crate::output::JsonFlag),
    /// Show one tenant: configuration, budget status and cost breakdown.
    Show(ShowArgs),
    /// Bind an existing PostgreSQL role to a tenant and grant it read access: row-level
    /// security then shows it that tenant's rows only, whatever it sets.
    GrantRole(GrantRoleArgs),
    /// Unbind a role from its tenant and revoke its access to pgcrew's objects.
    RevokeRole(RevokeRoleArgs),
    /// List the roles bound to tenants.
    Roles(crate::output::JsonFlag),
}

/// Flags of `pgcrew tenants grant-role`.
#[derive(Debug, Args)]
pub struct GrantRoleArgs {
    /// The PostgreSQL role (must exist; not a superuser, BYPASSRLS or the pgcrew owner).
    pub role: String,
    /// The tenant it is bound to.
    pub tenant: String,
}

/// Flags of `pgcrew tenants revoke-role`.
#[derive(Debug, Args)]
pub struct RevokeRoleArgs {
    /// The PostgreSQL role.
    pub role: String,
}

/// Flags of `pgcrew tenants set`.
#[derive(Debug, Args)]
pub struct SetArgs {
    /// The tenant id (1-128 bytes).
    pub tenant: String,
    /// Capabilities, comma-separated (replaces the current set; `--capabilities ''` clears it).
    #[arg(long, value_delimiter = ',')]
    pub capabilities: Option<Vec<String>>,
    /// Budget limit in USD.
    #[arg(long, conflicts_with = "no_budget", allow_negative_numbers = true)]
    pub budget_usd: Option<f64>,
    /// Remove the budget limit (unlimited).
    #[arg(long)]
    pub no_budget: bool,
    /// Maximum concurrently running runs (0 removes the limit).
    #[arg(long, allow_negative_numbers = true)]
    pub max_concurrent_runs: Option<i32>,
    /// Maximum concurrently running tasks (0 removes the limit).
    #[arg(long, allow_negative_numbers = true)]
    pub max_concurrent_tasks: Option<i32>,
    /// WARNING threshold as a fraction of the budget (default 0.8).
    #[arg(long, allow_negative_numbers = true)]
    pub warning_threshold: Option<f64>,
    /// CRITICAL threshold as a fraction of the budget (default 0.9).
    #[arg(long, allow_negative_numbers = true)]
    pub critical_threshold: Option<f64>,
    /// Degradation policy as JSON, e.g.
    /// `{"rules":[{"at":"WARNING","action":"switch_model","to":"gpt-4o-mini"}]}`.
    #[arg(long)]
    pub degradation: Option<String>,
    /// Print the resulting tenant as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `pgcrew tenants show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The tenant id.
    pub tenant: String,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

fn opt_limit(v: i32) -> Option<i32> {
    (v != 0).then_some(v)
}

fn usd(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.4}")).unwrap_or_else(|| "-".into())
}

/// Execute a `pgcrew tenants` subcommand.
pub async fn exec(dsn: Option<String>, cmd: TenantsCmd) -> Result<ExitCode> {
    match cmd {
        TenantsCmd::Set(args) => set(dsn, args).await,
        TenantsCmd::List(f) => list(dsn, f.json).await,
        TenantsCmd::Show(args) => show(dsn, args).await,
        TenantsCmd::GrantRole(args) => grant_role(dsn, args).await,
        TenantsCmd::RevokeRole(args) => revoke_role(dsn, args).await,
        TenantsCmd::Roles(f) => roles(dsn, f.json).await,
    }
}

async fn set(dsn: Option<String>, args: SetArgs) -> Result<ExitCode> {
    let id = TenantId::new(args.tenant.clone())?;
    // Validate what we can before touching the database.
    let degradation =
        match &args.degradation {
            Some(j) => Some(serde_json::from_str::<DegradationPolicy>(j).map_err(|e| {
                Error::invalid("degradation", format!("is not a valid policy ({e})"))
            })?),
            None => None,
        };
    if let Some(b) = args.budget_usd {
        tenancy::validate_budget("budget_usd", b)?;
    }
    let db = connect(dsn).await?;
    let mut ctx = match tenancy::get(&db, &id).await {
        Ok(t) => t.context,
        Err(Error::NotFound { .. }) => TenantContext::for_id(id.clone()),
        Err(e) => return Err(e),
    };
    if let Some(caps) = args.capabilities {
        ctx.capabilities = caps
            .into_iter()
            .map(|c| c.trim().to_string())
            .filter(|c| !c.is_empty())
            .collect();
    }
    if let Some(b) = args.budget_usd {
        ctx.budget_usd_limit = Some(b);
    }
    if args.no_budget {
        ctx.budget_usd_limit = None;
    }
    if let Some(n) = args.max_concurrent_runs {
        ctx.max_concurrent_runs = opt_limit(n);
    }
    if let Some(n) = args.max_concurrent_tasks {
        ctx.max_concurrent_tasks = opt_limit(n);
    }
    if args.warning_threshold.is_some() || args.critical_threshold.is_some() {
        ctx.thresholds = BudgetThresholds::new(
            args.warning_threshold.unwrap_or(ctx.thresholds.warning),
            args.critical_threshold.unwrap_or(ctx.thresholds.critical),
        )?;
    }
    if let Some(p) = degradation {
        ctx.degradation = p;
    }
    let created = tenancy::upsert(&db, &ctx).await?;
    let t = tenancy::get(&db, &id).await?;
    if args.json {
        print_json(&t)?;
    } else {
        println!(
            "{} tenant {}",
            if created { "created" } else { "updated" },
            t.context.tenant_id
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn list(dsn: Option<String>, json: bool) -> Result<ExitCode> {
    let db = connect(dsn).await?;
    let tenants = tenancy::list(&db).await?;
    let headers = [
        "TENANT",
        "STATUS",
        "LIMIT_USD",
        "SPENT_USD",
        "RESERVED_USD",
        "MAX_RUNS",
        "MAX_TASKS",
        "CAPABILITIES",
    ];
    print_rows(json, &tenants, None, &headers, |t| {
        vec![
            t.context.tenant_id.to_string(),
            t.status.to_string(),
            usd(t.context.budget_usd_limit),
            usd(Some(t.spent_usd)),
            usd(Some(t.reserved_usd)),
            t.context
                .max_concurrent_runs
                .map_or("-".into(), |n| n.to_string()),
            t.context
                .max_concurrent_tasks
                .map_or("-".into(), |n| n.to_string()),
            t.context.capabilities.join(","),
        ]
    })?;
    Ok(ExitCode::SUCCESS)
}

async fn show(dsn: Option<String>, args: ShowArgs) -> Result<ExitCode> {
    let id = TenantId::new(args.tenant)?;
    let db = connect(dsn).await?;
    let t = tenancy::get(&db, &id).await?;
    let budget = tenancy::budget_status(&db, &id).await?;
    let costs = tenancy::cost_breakdown(&db, &CostFilter::tenant(id.clone())).await?;
    if args.json {
        print_json(&serde_json::json!({
            "tenant": t,
            "budget": budget,
            "costs": costs,
        }))?;
        return Ok(ExitCode::SUCCESS);
    }
    println!("tenant:        {}", t.context.tenant_id);
    println!("capabilities:  {}", t.context.capabilities.join(", "));
    println!(
        "budget:        {} USD limit, {} spent, {} reserved, {} remaining ({})",
        usd(t.context.budget_usd_limit),
        usd(Some(t.spent_usd)),
        usd(Some(t.reserved_usd)),
        usd(budget.remaining_usd),
        budget.status
    );
    println!(
        "thresholds:    warning {} / critical {}",
        t.context.thresholds.warning, t.context.thresholds.critical
    );
    println!(
        "limits:        runs {}, tasks {}",
        t.context
            .max_concurrent_runs
            .map_or("unlimited".into(), |n| n.to_string()),
        t.context
            .max_concurrent_tasks
            .map_or("unlimited".into(), |n| n.to_string())
    );
    println!(
        "degradation:   {}",
        serde_json::to_string(&t.context.degradation)?
    );
    if !costs.is_empty() {
        println!();
        let rows: Vec<Vec<String>> = costs
            .iter()
            .map(|c| {
                vec![
                    c.day.to_string(),
                    c.category.clone(),
                    c.model.clone(),
                    c.entries.to_string(),
                    c.prompt_tokens.to_string(),
                    c.completion_tokens.to_string(),
                    format!("{:.6}", c.cost_usd),
                ]
            })
            .collect();
        print_table(
            &[
                "DAY",
                "CATEGORY",
                "MODEL",
                "ENTRIES",
                "PROMPT_TOKENS",
                "COMPLETION_TOKENS",
                "COST_USD",
            ],
            &rows,
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn grant_role(dsn: Option<String>, args: GrantRoleArgs) -> Result<ExitCode> {
    let tenant = TenantId::new(args.tenant)?;
    let db = connect(dsn).await?;
    let granted = tenancy::grant_tenant_role(&db, &args.role, &tenant).await?;
    println!(
        "role {} is bound to tenant {tenant}; it can read: {}",
        args.role,
        granted.join(", ")
    );
    if tenancy::pg_locks_readable_by_public(&db).await? {
        eprintln!(
            "warning: every role can read pg_catalog.pg_locks, where the keys of advisory locks show while they are held; \
             a tenant role could learn another tenant's run lock key there and hold it. As a superuser, in this database: \
             REVOKE SELECT ON pg_catalog.pg_locks FROM PUBLIC;"
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn revoke_role(dsn: Option<String>, args: RevokeRoleArgs) -> Result<ExitCode> {
    let db = connect(dsn).await?;
    if tenancy::revoke_tenant_role(&db, &args.role).await? {
        println!(
            "role {} is no longer bound to a tenant; its access to pgcrew was revoked",
            args.role
        );
    } else {
        println!(
            "role {} was not bound to a tenant; any access it had to pgcrew was revoked",
            args.role
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn roles(dsn: Option<String>, json: bool) -> Result<ExitCode> {
    let db = connect(dsn).await?;
    let roles = tenancy::list_tenant_roles(&db).await?;
    let headers = ["ROLE", "TENANT", "GRANTED_AT"];
    print_rows(json, &roles, None, &headers, |r| {
        vec![
            r.role.clone(),
            r.tenant_id.to_string(),
            r.granted_at.to_rfc3339(),
        ]
    })?;
    Ok(ExitCode::SUCCESS)
}
