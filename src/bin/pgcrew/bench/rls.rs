//! `pgcrew bench rls`: reads by a tenant role under row-level security against the same reads
//! by the owner (no RLS), on a ledger of a million events shared by two tenants.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use pgcrew::db::Db;
use pgcrew::tenancy::{self, TenantContext};
use pgcrew::{Error, Result, TenantId};
use serde::Serialize;

/// Arguments of `pgcrew bench rls`.
#[derive(Debug, Args)]
pub struct RlsBenchArgs {
    /// Ledger events seeded (split evenly between two tenants).
    #[arg(long, default_value_t = 1_000_000)]
    pub events: i32,
    /// Runs the events are spread over.
    #[arg(long, default_value_t = 1_000)]
    pub runs: i32,
    /// Timed repetitions of each read, per reader.
    #[arg(long, default_value_t = 15)]
    pub samples: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// One read, timed as the owner and as the tenant role.
#[derive(Debug, Serialize)]
struct ReadFigure {
    read: &'static str,
    rows: i64,
    owner_ms: f64,
    tenant_ms: f64,
    ratio: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    events: i32,
    runs: i32,
    samples: usize,
    reads: Vec<ReadFigure>,
    worst_ratio: f64,
}

/// Run the benchmark.
pub async fn run(dsn: Option<String>, args: RlsBenchArgs) -> Result<ExitCode> {
    if args.events < 2 || args.runs < 2 || args.runs > args.events || args.samples == 0 {
        return Err(Error::invalid(
            "arguments",
            "--events and --runs must be at least 2 (runs <= events) and --samples at least 1",
        ));
    }
    let r = crate::bench::in_scratch(dsn, async |dsn| bench(dsn, &args).await).await?;
    super::print_report(args.json, &r, |r| {
        println!(
            "pgcrew bench rls: {} events on {} runs of two tenants, median of {} reads each",
            r.events, r.runs, r.samples
        );
        for f in &r.reads {
            println!(
                "  {:<28} {:>7} rows  owner {:>8.2} ms  tenant role {:>8.2} ms  ({:.2} x; target <= 1.2)",
                f.read, f.rows, f.owner_ms, f.tenant_ms, f.ratio
            );
        }
        Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

async fn bench(dsn: &str, args: &RlsBenchArgs) -> Result<Report> {
    let db = Db::connect(dsn, 2, Duration::from_secs(10)).await?;
    let tenant = TenantId::new("bench-a")?;
    for id in ["bench-a", "bench-b"] {
        tenancy::upsert(&db, &TenantContext::new(id)?).await?;
    }
    eprintln!(
        "[1/3] seeding {} events on {} runs ...",
        args.events, args.runs
    );
    let owner = db.get().await?;
    owner
        .execute(
            pgcrew::sql!("bench/tenancy_rls_seed"),
            &[&args.runs, &args.events],
        )
        .await?;
    for table in ["pgcrew.events", "pgcrew.runs"] {
        owner
            .batch_execute(&format!("VACUUM ANALYZE {table}"))
            .await?;
    }
    eprintln!("[2/3] a role bound to tenant bench-a ...");
    let role = format!("pgcrew_bench_{}", uuid::Uuid::new_v4().simple());
    let password = uuid::Uuid::new_v4().simple().to_string();
    owner
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN NOSUPERUSER NOBYPASSRLS PASSWORD '{password}'"
        ))
        .await
        .map_err(|e| {
            Error::invalid(
                "database user",
                format!(
                    "cannot create the benchmark's tenant role ({}); the bench needs CREATEROLE",
                    pgcrew::Error::from(e)
                ),
            )
        })?;
    let result = async {
        tenancy::grant_tenant_role(&db, &role, &tenant).await?;
        let mut cfg = db.config().clone();
        cfg.user(&role).password(password.as_str());
        let (tenant_client, conn) = cfg.open().await?;
        let driver = tokio::spawn(conn);
        eprintln!("[3/3] timing reads ...");
        let reads = measure(&owner, &tenant_client, &tenant, args.samples).await;
        drop(tenant_client);
        let _ = driver.await;
        reads
    }
    .await;
    owner
        .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
        .await?;
    let reads = result?;
    let worst_ratio = reads.iter().map(|r| r.ratio).fold(0.0, f64::max);
    Ok(Report {
        events: args.events,
        runs: args.runs,
        samples: args.samples,
        reads,
        worst_ratio,
    })
}

async fn measure(
    owner: &tokio_postgres::Client,
    tenant_client: &tokio_postgres::Client,
    tenant: &TenantId,
    samples: usize,
) -> Result<Vec<ReadFigure>> {
    let run: uuid::Uuid = owner
        .query_one(pgcrew::sql!("bench/tenancy_rls_run_of"), &[])
        .await?
        .get(0);
    let t = tenant.as_str();
    let reads: [(
        &'static str,
        &'static str,
        Vec<&(dyn tokio_postgres::types::ToSql + Sync)>,
    ); 3] = [
        (
            "one run's ledger",
            pgcrew::sql!("bench/tenancy_rls_ledger"),
            vec![&run, &t],
        ),
        (
            "a tenant's 100 newest events",
            pgcrew::sql!("bench/tenancy_rls_recent"),
            vec![&t],
        ),
        (
            "all of a tenant's events",
            pgcrew::sql!("bench/tenancy_rls_scan"),
            vec![&t],
        ),
    ];
    let mut out = Vec::new();
    for (name, sql, params) in reads {
        let owner_stmt = owner.prepare(sql).await?;
        let tenant_stmt = tenant_client.prepare(sql).await?;
        // Warm both (caches, plans), and check they read the same rows.
        let a: i64 = owner.query_one(&owner_stmt, &params).await?.get(0);
        let b: i64 = tenant_client.query_one(&tenant_stmt, &params).await?.get(0);
        if a != b {
            return Err(Error::invalid(
                "bench rls",
                format!("{name}: the owner read {a} rows and the tenant role {b}"),
            ));
        }
        let mut owner_ms = Vec::with_capacity(samples);
        let mut tenant_ms = Vec::with_capacity(samples);
        for _ in 0..samples {
            let t0 = Instant::now();
            owner.query_one(&owner_stmt, &params).await?;
            owner_ms.push(t0.elapsed().as_secs_f64() * 1e3);
            let t0 = Instant::now();
            tenant_client.query_one(&tenant_stmt, &params).await?;
            tenant_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        owner_ms.sort_by(f64::total_cmp);
        tenant_ms.sort_by(f64::total_cmp);
        let o = crate::bench::percentile_ms(&owner_ms, 0.5);
        let tn = crate::bench::percentile_ms(&tenant_ms, 0.5);
        out.push(ReadFigure {
            read: name,
            rows: a,
            owner_ms: o,
            tenant_ms: tn,
            ratio: if o > 0.0 { tn / o } else { f64::NAN },
        });
    }
    Ok(out)
}
