//! `pgcrew demo`: three `pgcrew serve` processes, two tenants, agent runs and plain tasks,
//! a kill -9 of the leader mid-way, and a summary (runs, costs, leader changes, ledgers).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use pgcrew::agent::{demo, register_agent, register_tools};
use pgcrew::db::{Db, ScratchDatabase, TempCluster};
use pgcrew::tenancy::{self, TenantContext};
use pgcrew::{Error, Result};

use crate::output::dsn_or_cluster;

mod console;
mod instances;
mod summary;
mod watch;
mod workload;

use instances::start_instances;
use summary::summary;
use watch::watch;
use workload::submit_workload;

/// Flags of `pgcrew demo`.
#[derive(Debug, Args)]
#[command(after_help = DEMO_EXAMPLES)]
pub struct DemoArgs {
    /// Agent runs to submit (split between the two tenants).
    #[arg(long, default_value_t = 16)]
    pub runs: usize,
    /// Plain tasks (`demo.sleep`, `demo.noop`) to enqueue.
    #[arg(long, default_value_t = 40)]
    pub tasks: usize,
    /// Model name of the demo agents (with OPENAI_BASE_URL, the model your server serves).
    #[arg(long, default_value = demo::DEMO_MODEL)]
    pub model: String,
    /// Give up (exit code 1) when the workload has not finished after this many seconds.
    #[arg(long, default_value_t = 50)]
    pub timeout_secs: u64,
    /// Serve the operations console on the demo's database (default address 127.0.0.1:8080)
    /// while the demo runs and after it, until Ctrl-C.
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = "127.0.0.1:8080")]
    pub ui: Option<std::net::SocketAddr>,
    /// Leave the demo database in place and print its DSN and three example queries (with a
    /// throwaway cluster: keep it running until Ctrl-C).
    #[arg(long)]
    pub keep: bool,
}

const DEMO_EXAMPLES: &str = "Examples:
  pgcrew demo                                  # throwaway local PostgreSQL, offline model
  pgcrew demo --ui --keep                      # with the operations console; explore afterwards
  DATABASE_URL=postgres://me@localhost/postgres pgcrew demo   # scratch database on your server
  OPENAI_API_KEY=sk-... pgcrew demo            # real model calls (OpenAI)
  OPENAI_BASE_URL=http://localhost:11434/v1 pgcrew demo --model llama3.1   # Ollama, vLLM, ...";

const ACME: &str = "acme";
const GLOBEX: &str = "globex";
const QUEUE: &str = "demo";

/// `pgcrew demo`.
pub async fn exec(dsn: Option<String>, args: DemoArgs) -> Result<ExitCode> {
    if args.runs == 0 || args.runs > 200 {
        return Err(Error::invalid("runs", "must be between 1 and 200"));
    }
    if args.tasks > 10_000 {
        return Err(Error::invalid("tasks", "must be at most 10000"));
    }
    let database = tokio::select! {
        d = setup_database(dsn, args.keep) => d?,
        _ = tokio::signal::ctrl_c() => return Ok(interrupted(false)),
    };
    let console = match args.ui {
        Some(addr) => Some(console::open(database.scratch.dsn(), addr).await?),
        None => None,
    };
    let mut stop = false;
    let code = tokio::select! {
        r = run(&database, &args) => r,
        _ = tokio::signal::ctrl_c() => {
            stop = true;
            Ok(interrupted(args.keep))
        }
    };
    let mut database = database;
    let cluster = database._cluster.is_some();
    if args.keep {
        database.scratch.keep();
        console::print_kept(database.scratch.dsn());
    }
    if !stop && code.is_ok() && (console.is_some() || (args.keep && cluster)) {
        println!(
            "\nCtrl-C to stop{}",
            if args.keep && cluster {
                " (the throwaway cluster and its database go with it)"
            } else {
                ""
            }
        );
        let _ = tokio::signal::ctrl_c().await;
    }
    if let Some(c) = console {
        c.close().await;
    }
    database.db.pool().close();
    drop(database);
    code
}

fn interrupted(keep: bool) -> ExitCode {
    eprintln!(
        "\ninterrupted: stopping the instances{}",
        if keep {
            ""
        } else {
            " and removing the demo database"
        }
    );
    ExitCode::from(130)
}

/// The demo's database: a scratch database on the given server or on a throwaway cluster.
/// Fields drop in order: the pool, the scratch database, then the cluster.
struct Database {
    db: Db,
    scratch: ScratchDatabase,
    _cluster: Option<TempCluster>,
}

/// Phase 1: a database that is never real data, migrated.
async fn setup_database(dsn: Option<String>, keep: bool) -> Result<Database> {
    let (admin_dsn, cluster) = dsn_or_cluster(dsn, || {
        println!("DATABASE_URL is not set: starting a throwaway PostgreSQL cluster ...")
    })
    .await?;
    if let Some(c) = &cluster {
        println!(
            "  cluster at {} on port {} (removed at the end)",
            c.dir().display(),
            c.port()
        );
    }
    let scratch = ScratchDatabase::create(&admin_dsn, "pgcrew_demo").await?;
    println!(
        "scratch database {} ({})",
        scratch.name(),
        if keep {
            "kept: --keep"
        } else {
            "dropped at the end"
        }
    );
    let db = Db::connect(scratch.dsn(), 8, Duration::from_secs(10)).await?;
    let report = db.migrate().await?;
    println!("migrated to schema version {}", report.to_version);
    Ok(Database {
        db,
        scratch,
        _cluster: cluster,
    })
}

/// Phase 2: agents, tools and tenants.
async fn register(db: &Db, model: &str) -> Result<()> {
    for d in demo::demo_agents(model) {
        register_agent(db, &d).await?;
    }
    register_tools(db, &demo::demo_tools(demo::DEFAULT_TOOL_LATENCY)?).await?;
    let acme = TenantContext::new(ACME)?
        .capabilities([demo::PAYMENTS_CHARGE])
        .budget_usd(Some(1.0));
    let globex = TenantContext::new(GLOBEX)?.budget_usd(Some(0.0008));
    tenancy::upsert(db, &acme).await?;
    tenancy::upsert(db, &globex).await?;
    println!(
        "tenants: {ACME} (budget $1.00, may charge cards), {GLOBEX} (budget $0.0008, no {})",
        demo::PAYMENTS_CHARGE
    );
    let openai = ["OPENAI_API_KEY", "OPENAI_BASE_URL"]
        .iter()
        .any(|k| std::env::var(k).is_ok_and(|v| !v.trim().is_empty()));
    println!(
        "model: {}",
        if openai {
            format!("{model} via the OpenAI-compatible endpoint")
        } else {
            "the offline scripted demo model (set OPENAI_API_KEY or OPENAI_BASE_URL for a real one)"
                .to_string()
        }
    );
    Ok(())
}

/// The tour, phase by phase: database, registrations, instances, workload, live progress with
/// the failover, summary. Exit code 1 when a phase times out or the summary finds a fault.
async fn run(database: &Database, args: &DemoArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let db = &database.db;
    register(db, &args.model).await?;
    let Some(mut instances) = start_instances(db, database.scratch.dsn(), &args.model).await?
    else {
        return Ok(ExitCode::from(1));
    };
    let mut workload = submit_workload(db, args.runs, args.tasks).await?;
    let Some(failover) = watch(db, args.timeout_secs, &mut instances, &mut workload).await? else {
        return Ok(ExitCode::from(1));
    };
    let ok = summary(db, &workload, &failover).await?;
    drop(instances);
    println!(
        "demo {} in {:.1}s (instances stopped{})",
        if ok { "finished" } else { "FAILED" },
        started.elapsed().as_secs_f64(),
        if args.keep {
            ""
        } else {
            ", demo database removed"
        }
    );
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
