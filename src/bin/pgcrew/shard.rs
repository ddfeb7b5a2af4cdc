//! `pgcrew shard check|move`: tenants sharded across PostgreSQL clusters (see
//! `pgcrew::shard` and docs/scaling.md). Shard DSNs come from the environment, one variable
//! per shard: `PGCREW_SHARD_<NAME>` (the name upper-cased, `-` and `.` as `_`), never argv.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use pgcrew::shard::{MoveOptions, RoutingMap, ShardedClient, move_tenant};
use pgcrew::{Error, LedgerKey, Result, TenantId};

use crate::output::{duration_arg, print_json};

/// `pgcrew shard` subcommands.
#[derive(Debug, Subcommand)]
pub enum ShardCmd {
    /// Load the routing map, check it against the shards configured in the environment and
    /// print where each tenant lives.
    Check(CheckArgs),
    /// Move a tenant between shards: drain, copy (ledgers with their chains), verify on the
    /// target, delete on the source, switch the routing file.
    Move(MoveArgs),
}

/// Flags of `pgcrew shard check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The routing map (JSON file).
    #[arg(long)]
    pub routes: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `pgcrew shard move`.
#[derive(Debug, Args)]
pub struct MoveArgs {
    /// The routing map (JSON file), updated by the move.
    #[arg(long)]
    pub routes: PathBuf,
    /// The tenant.
    #[arg(long)]
    pub tenant: String,
    /// Its shard now.
    #[arg(long)]
    pub from: String,
    /// The shard it moves to.
    #[arg(long)]
    pub to: String,
    /// How long to wait for the tenant's tasks and runs to finish.
    #[arg(long, value_parser = duration_arg, default_value = "5m")]
    pub drain_timeout: Duration,
    /// File holding the target's ledger key when it differs from the source's (the source's is
    /// PGCREW_LEDGER_KEY / PGCREW_LEDGER_KEY_FILE as everywhere): checkpoints are signed again.
    #[arg(long)]
    pub target_ledger_key_file: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The environment variable holding shard `name`'s DSN.
pub fn shard_env(name: &str) -> String {
    let up: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("PGCREW_SHARD_{up}")
}

/// A client of the shards the routing file names, DSNs from the environment.
fn client(routes: &Path) -> Result<ShardedClient> {
    let map = RoutingMap::load(routes)?;
    let mut b = ShardedClient::builder().routes_file(routes);
    let mut names: Vec<&String> = map.shards.keys().collect();
    names.extend(map.moving.values());
    names.dedup();
    for name in names {
        let var = shard_env(name);
        let dsn = std::env::var(&var).map_err(|_| Error::UnknownShard {
            shard: name.clone(),
            tenant: None,
            configured: format!("none in the environment: set {var} to its DSN"),
        })?;
        b = b.shard(name.clone(), dsn);
    }
    b.build()
}

/// Run a `pgcrew shard` subcommand.
pub async fn exec(cmd: ShardCmd) -> Result<ExitCode> {
    match cmd {
        ShardCmd::Check(a) => {
            let c = client(&a.routes)?;
            let routes = c.routes();
            let mut down = Vec::new();
            for name in c.shard_names() {
                if let Err(e) = c.shard_db(&name).await {
                    down.push((name, e.to_string()));
                }
            }
            if a.json {
                print_json(&serde_json::json!({"routes": routes, "unreachable": down}))?;
            } else {
                for (shard, tenants) in &routes.shards {
                    println!("{shard}: {}", tenants.join(", "));
                }
                for (t, to) in &routes.moving {
                    println!("moving: {t} -> {to}");
                }
                for (s, e) in &down {
                    println!("unreachable: {s}: {e}");
                }
            }
            Ok(if down.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        ShardCmd::Move(a) => {
            let c = client(&a.routes)?;
            let mut opts = MoveOptions::new(TenantId::new(a.tenant)?, a.from, a.to);
            opts.drain_timeout = a.drain_timeout;
            opts.ledger_key = LedgerKey::from_env()?;
            if let Some(p) = &a.target_ledger_key_file {
                opts.target_ledger_key = Some(LedgerKey::from_file(p)?);
            }
            opts.routes_file = Some(a.routes.clone());
            let report = move_tenant(&c, &opts).await?;
            c.close().await;
            if a.json {
                print_json(&report)?;
            } else {
                println!(
                    "moved tenant {} from {} to {}: {} runs ({} events, chains verified on {}), {} other rows, {} deleted on {}; drained in {} ms",
                    report.tenant,
                    report.from,
                    report.to,
                    report.runs,
                    report.events,
                    report.to,
                    report.rows,
                    report.deleted_on_source,
                    report.from,
                    report.drained_ms
                );
                if !report.roles_not_moved.is_empty() {
                    println!(
                        "tenant roles not moved (roles belong to a cluster): {}; create them on {} and run `pgcrew tenants grant-role` there",
                        report.roles_not_moved.join(", "),
                        report.to
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
