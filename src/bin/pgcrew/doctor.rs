//! `pgcrew doctor`: the deployment checked against the production checklist.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use pgcrew::db::Db;
use pgcrew::doctor::{self, DOCTOR_APPLICATION_NAME, DoctorOptions, Report, Status};
use pgcrew::{ClientConfig, LedgerKey, Result};

use crate::output::{duration_arg, print_json, require_dsn};

fn fraction_arg(s: &str) -> std::result::Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number; give a fraction such as 0.2"))?;
    if !v.is_finite() || !(0.0..1.0).contains(&v) {
        return Err(format!(
            "`{s}` is out of range; give a fraction from 0 up to, not including, 1"
        ));
    }
    Ok(v)
}

fn non_negative_fraction_arg(s: &str) -> std::result::Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number; give a fraction such as 0.2"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("`{s}` must be a non-negative number"));
    }
    Ok(v)
}

/// Flags of `pgcrew doctor`.
#[derive(Debug, Args)]
#[command(after_help = DOCTOR_HELP)]
pub struct DoctorArgs {
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// The instances' instance TTL: an instance silent for longer is stale.
    #[arg(long, value_parser = duration_arg, default_value = "2m")]
    pub instance_ttl: Duration,
    /// The connections one instance opens at most (its pool and its coordination connection,
    /// which is also its LISTEN connection); default: an instance with the default configuration.
    #[arg(long, default_value_t = doctor::connections_per_instance(&ClientConfig::default()), value_parser = clap::value_parser!(u32).range(1..))]
    pub connections_per_instance: u32,
    /// Share of the usable connection slots to keep free (0 to <1).
    #[arg(long, value_parser = fraction_arg, default_value = "0.2")]
    pub connection_headroom: f64,
    /// Connections whose application_name starts with this are pgcrew's.
    #[arg(long, default_value = "pgcrew")]
    pub application_name_prefix: String,
    /// The leader lease that must be held.
    #[arg(long, default_value = pgcrew::coord::leader::DEFAULT_LEASE)]
    pub lease: String,
    /// Warn when a queue's oldest due task has waited longer than this.
    #[arg(long, value_parser = duration_arg, default_value = "1m")]
    pub max_queue_lag: Duration,
    /// Warn when statement_timeout is set below this.
    #[arg(long, value_parser = duration_arg, default_value = "10s")]
    pub min_statement_timeout: Duration,
    /// Warn when pgcrew.tasks holds more dead tuples than this share of its live ones.
    #[arg(long, value_parser = non_negative_fraction_arg, default_value = "0.2")]
    pub max_dead_tuple_ratio: f64,
    /// Runs finished within this window are checked for signed checkpoints.
    #[arg(long, value_parser = duration_arg, default_value = "24h")]
    pub ledger_window: Duration,
    /// At most this many of those runs (the newest).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(i64).range(1..))]
    pub ledger_sample: i64,
    /// A file holding the ledger key, to verify checkpoint signatures (a trailing newline is
    /// ignored). Default: PGCREW_LEDGER_KEY or the file named by PGCREW_LEDGER_KEY_FILE.
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// Name at most this many items (instances, runs, tenants, roles) per finding.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_items: u32,
}

const DOCTOR_HELP: &str = "Checks: server_version, migrations, max_connections, \
idle_in_transaction_timeout, statement_timeout, tasks_autovacuum, tls, leader, instances, \
stuck_runs, queue_lag, tenant_budgets, tenant_roles, pg_locks_public, ledger_checkpoints, \
ledger_signatures.

Exit codes: 0 no check failed (warnings allowed), 1 a check failed, 2 bad arguments or no
connection. Run it as the role that owns the pgcrew schema (a superuser or a member of
pg_read_all_stats also sees other roles' connections).

Examples:
  DATABASE_URL=postgres://owner@db.internal/app pgcrew doctor
  pgcrew doctor --json --key-file /etc/pgcrew/ledger.key
  pgcrew doctor --instance-ttl 30s --max-queue-lag 5m";

/// The DSN with `application_name=pgcrew-doctor` added unless it names one, so the doctor's
/// own session is never counted as one of the deployment's.
fn doctor_dsn(dsn: &str) -> Result<String> {
    let config = pgcrew::db::parse_dsn(dsn)?;
    if config.get_application_name().is_some() {
        return Ok(dsn.to_string());
    }
    let trimmed = dsn.trim();
    Ok(
        if trimmed.starts_with("postgres://") || trimmed.starts_with("postgresql://") {
            let sep = if trimmed.contains('?') { '&' } else { '?' };
            format!("{trimmed}{sep}application_name={DOCTOR_APPLICATION_NAME}")
        } else {
            format!("{trimmed} application_name={DOCTOR_APPLICATION_NAME}")
        },
    )
}

/// `pgcrew doctor`: exit 0 when no check failed, 1 when one did.
pub async fn exec(dsn: Option<String>, args: DoctorArgs) -> Result<ExitCode> {
    // Arguments and the key first: a bad one is a usage error (exit 2) before connecting.
    let key = match &args.key_file {
        Some(f) => Some(LedgerKey::from_file(f)?),
        None => LedgerKey::from_env()?,
    };
    let options = DoctorOptions {
        instance_ttl: args.instance_ttl,
        lease_name: args.lease.clone(),
        connections_per_instance: args.connections_per_instance,
        connection_headroom: args.connection_headroom,
        application_name_prefix: args.application_name_prefix.clone(),
        max_queue_lag: args.max_queue_lag,
        min_statement_timeout: args.min_statement_timeout,
        max_dead_tuple_ratio: args.max_dead_tuple_ratio,
        ledger_window: args.ledger_window,
        ledger_sample: args.ledger_sample,
        ledger_key: key,
        max_items: args.max_items as usize,
        ..DoctorOptions::default()
    };
    options.validate()?;
    let dsn = doctor_dsn(&require_dsn(dsn)?)?;
    let db = Db::connect(&dsn, 1, Duration::from_secs(10)).await?;
    let report = doctor::run(&db, &options).await?;
    if args.json {
        print_json(&report)?;
    } else {
        print_text(&report);
    }
    Ok(if report.failed() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn print_text(report: &Report) {
    let width = report
        .findings
        .iter()
        .map(|f| f.check.as_str().len())
        .max()
        .unwrap_or(0);
    for f in &report.findings {
        let tag = match f.status {
            Status::Pass => "PASS",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        };
        println!("{tag}  {:<width$}  {}", f.check.as_str(), f.message);
        let indent = " ".repeat(width + 8);
        for item in &f.items {
            println!("{indent}- {item}");
        }
        if let Some(advice) = &f.advice {
            println!("{indent}what to do: {advice}");
        }
    }
    println!(
        "\n{} checks: {} passed, {} warning(s), {} failed",
        report.findings.len(),
        report.summary.pass,
        report.summary.warn,
        report.summary.fail
    );
}
