//! `pgcrew migrate`, `serve`, `instances`, `leader`.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use pgcrew::config::parse_duration;
use pgcrew::coord::{instance, leader};
use pgcrew::db::Db;
use pgcrew::{Client, ClientConfig, InstanceId, Result};

use crate::output::{connect, print_json, print_table, require_dsn};

fn duration_arg(s: &str) -> std::result::Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

/// Flags of `pgcrew serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Instance id (default: a random UUID).
    #[arg(long)]
    pub instance_id: Option<String>,
    /// Heartbeat interval.
    #[arg(long, value_parser = duration_arg, default_value = "30s")]
    pub heartbeat_interval: Duration,
    /// Instance TTL: silence after which the leader removes an instance.
    #[arg(long, value_parser = duration_arg, default_value = "2m")]
    pub instance_ttl: Duration,
    /// Leader lease TTL (renewed every TTL/3).
    #[arg(long, value_parser = duration_arg, default_value = "30s")]
    pub leader_ttl: Duration,
    /// Maintenance interval (leader only).
    #[arg(long, value_parser = duration_arg, default_value = "1m")]
    pub maintenance_interval: Duration,
    /// Runs `running` longer than this are failed by maintenance.
    #[arg(long, value_parser = duration_arg, default_value = "1h")]
    pub stuck_run_timeout: Duration,
    /// Listener fallback poll interval.
    #[arg(long, value_parser = duration_arg, default_value = "5s")]
    pub poll_interval: Duration,
    /// Separate DSN for LISTEN (e.g. direct to PostgreSQL when DATABASE_URL goes through PgBouncer).
    #[arg(long, env = "PGCREW_LISTEN_DSN", hide_env_values = true)]
    pub listen_dsn: Option<String>,
    /// Do not LISTEN; poll only.
    #[arg(long)]
    pub poll_only: bool,
    /// Apply migrations before starting.
    #[arg(long)]
    pub migrate: bool,
    /// Print one line per leadership change on stdout (for scripts and tests).
    #[arg(long)]
    pub print_events: bool,
}

/// `pgcrew migrate`.
pub async fn migrate(dsn: Option<String>) -> Result<ExitCode> {
    let dsn = require_dsn(dsn)?;
    let db = Db::connect(&dsn, 2, Duration::from_secs(10)).await?;
    let report = db.migrate().await?;
    if report.applied.is_empty() {
        println!("schema is up to date (version {})", report.to_version);
    } else {
        for m in &report.applied {
            println!("applied {m}");
        }
        println!(
            "schema migrated from version {} to {}",
            report.from_version, report.to_version
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `pgcrew serve`.
pub async fn serve(dsn: Option<String>, args: ServeArgs) -> Result<ExitCode> {
    let dsn = require_dsn(dsn)?;
    let mut b = ClientConfig::builder()
        .heartbeat_interval(args.heartbeat_interval)
        .instance_ttl(args.instance_ttl)
        .leader_ttl(args.leader_ttl)
        .maintenance_interval(args.maintenance_interval)
        .stuck_run_timeout(args.stuck_run_timeout)
        .notify_poll_interval(args.poll_interval)
        .poll_only(args.poll_only)
        .migrate(args.migrate);
    if let Some(id) = args.instance_id {
        b = b.instance_id(InstanceId::new(id)?);
    }
    if let Some(l) = args.listen_dsn {
        b = b.listen_dsn(l);
    }
    let config = b.build()?;
    let print = args.print_events;
    let client = Client::builder(dsn)
        .config(config)
        .on_error(|e| eprintln!("pgcrew serve: {e}"))
        .on_became_leader(move |term| {
            if print {
                println!("leader term={term}");
            }
        })
        .on_lost_leadership(move || {
            if print {
                println!("follower");
            }
        })
        .build()
        .await?;
    client.start().await?;
    println!("serving instance {}", client.instance_id());
    wait_for_signal().await;
    eprintln!("pgcrew serve: stopping (draining, resigning, deregistering)");
    client.stop().await?;
    println!("stopped");
    Ok(ExitCode::SUCCESS)
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// `pgcrew instances`.
pub async fn instances(dsn: Option<String>, json: bool) -> Result<ExitCode> {
    let db = connect(dsn).await?;
    let rows = instance::list(&db).await?;
    if json {
        print_json(&rows)?;
    } else {
        let table: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                vec![
                    r.id.clone(),
                    r.hostname.clone(),
                    r.pid.to_string(),
                    r.version.clone(),
                    if r.is_leader {
                        "leader".into()
                    } else {
                        "".into()
                    },
                    format!("{:.1}s", r.silent_ms as f64 / 1000.0),
                    r.agents.join(","),
                    r.tools.join(","),
                ]
            })
            .collect();
        print_table(
            &[
                "ID", "HOST", "PID", "VERSION", "ROLE", "SILENT", "AGENTS", "TOOLS",
            ],
            &table,
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `pgcrew leader`.
pub async fn leader(dsn: Option<String>, json: bool) -> Result<ExitCode> {
    let db = connect(dsn).await?;
    let rows = leader::current(&db).await?;
    if json {
        print_json(&rows)?;
    } else if rows.is_empty() {
        println!("no leader");
    } else {
        let table: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                vec![
                    r.name.clone(),
                    r.leader_id.clone(),
                    r.term.to_string(),
                    r.elected_at.to_rfc3339(),
                    if r.valid {
                        format!("{:.1}s", r.remaining_ms as f64 / 1000.0)
                    } else {
                        "expired".into()
                    },
                ]
            })
            .collect();
        print_table(
            &["LEASE", "LEADER", "TERM", "ELECTED_AT", "EXPIRES_IN"],
            &table,
        );
    }
    Ok(ExitCode::SUCCESS)
}
