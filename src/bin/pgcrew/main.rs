//! The `pgcrew` command line: migrations, instances, leadership, runs, tasks, tenants, the
//! doctor, benchmarks and the demo. DSN from `--dsn` or `DATABASE_URL`.
//!
//! Exit codes: 0 success, 1 a check failed (e.g. an invalid ledger), 2 usage or connection error.

mod bench;
mod coord;
mod demo;
mod doctor;
mod http;
mod init;
mod output;
mod queues;
mod run;
mod schedules;
mod shard;
mod signal;
mod submit;
mod tasks;
mod tenants;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Durable, multi-tenant AI-agent runs coordinated entirely inside PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "pgcrew", version, about, long_about = None, after_help = EXAMPLES)]
pub struct Cli {
    /// PostgreSQL DSN (URL or key/value form). Prefer DATABASE_URL for a DSN with a password:
    /// every local user can read a process's command line.
    #[arg(long, global = true, env = "DATABASE_URL", hide_env_values = true)]
    pub dsn: Option<output::DsnArg>,

    /// How statements go out: `cached` (prepared once per connection; the default) or `unnamed`
    /// (one round trip each, nothing kept on the server: behind PgBouncer in transaction mode).
    #[arg(
        long,
        global = true,
        env = "PGCREW_STATEMENTS",
        default_value = "cached"
    )]
    pub statements: pgcrew::db::StatementMode,

    /// Log filter (e.g. `info`, `pgcrew=debug`); also RUST_LOG.
    #[arg(long, global = true, default_value = "warn")]
    pub log: String,

    #[command(subcommand)]
    pub command: Command,
}

const EXAMPLES: &str = "Examples:
  pgcrew demo                      # the guided tour (no setup: throwaway PostgreSQL)
  pgcrew init my-service           # scaffold a service that links the library
  pgcrew migrate --dsn postgres://root@127.0.0.1:5432/test
  DATABASE_URL=postgres://root@127.0.0.1/test pgcrew serve --heartbeat-interval 500ms --leader-ttl 2s
  pgcrew instances --json
  pgcrew leader";

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply the embedded migrations (idempotent).
    Migrate,
    /// Run a bare instance (registration, heartbeat, election, maintenance) until SIGINT/SIGTERM.
    Serve(Box<coord::ServeArgs>),
    /// List registered instances.
    Instances(output::JsonFlag),
    /// Show the leader lease.
    Leader(output::JsonFlag),
    /// Inspect and control runs.
    #[command(subcommand)]
    Run(run::RunCmd),
    /// Inspect and control tasks.
    #[command(subcommand)]
    Tasks(tasks::TasksCmd),
    /// Pause, resume and list queues.
    #[command(subcommand)]
    Queues(queues::QueuesCmd),
    /// Manage schedules (cron or fixed interval) that enqueue tasks.
    #[command(subcommand)]
    Schedules(schedules::SchedulesCmd),
    /// Manage tenants.
    #[command(subcommand)]
    Tenants(tenants::TenantsCmd),
    /// Tenants sharded across PostgreSQL clusters: check the routing map, move a tenant.
    #[command(subcommand)]
    Shard(shard::ShardCmd),
    /// Benchmarks in a scratch database (never touches real data); default: the queue.
    Bench(bench::BenchArgs),
    /// The guided tour: 3 instances, 2 tenants, agent runs and tasks, a leader killed mid-way
    /// (throwaway cluster unless DATABASE_URL is set; then a scratch database on it).
    Demo(demo::DemoArgs),
    /// Check a running deployment against the production checklist (exit 1 when a check fails).
    Doctor(doctor::DoctorArgs),
    /// Scaffold a starter service (Cargo.toml, src/main.rs with an agent, a tool and a task
    /// handler) in a new or empty directory.
    Init(init::InitArgs),
    /// Serve the operations console (an instance that takes no leadership and runs no work)
    /// until SIGINT/SIGTERM; actions need PGCREW_UI_TOKEN.
    Ui(http::UiArgs),
}

/// Logs to stderr (filtered by `--log` / `RUST_LOG`) and, when `OTEL_EXPORTER_OTLP_ENDPOINT` is
/// set, pgcrew's spans exported over OTLP whatever the log filter (the guard flushes them).
fn init_tracing(filter: &str) -> Option<pgcrew::telemetry::trace::OtelGuard> {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| filter.to_string());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(tracing_subscriber::EnvFilter::new(filter));
    let (otel, guard) = match pgcrew::telemetry::trace::otlp_layer("pgcrew") {
        Some((layer, guard)) => (Some(layer), Some(guard)),
        None => (None, None),
    };
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .with(tracing_subscriber::filter::filter_fn(|meta| {
            !is_returned_error_event(meta)
        }))
        .try_init();
    guard
}

/// The event `#[instrument(err)]` emits when a library call returns an error: a lone `error`
/// field. The CLI prints the error it gets back exactly once, so these would only repeat it.
fn is_returned_error_event(meta: &tracing::Metadata<'_>) -> bool {
    meta.is_event() && {
        let mut fields = meta.fields().iter();
        matches!((fields.next(), fields.next()), (Some(f), None) if f.name() == "error")
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _otel = match &cli.command {
        Command::Bench(b) if b.installs_tracing() => None,
        _ => init_tracing(&cli.log),
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    rt.block_on(dispatch(cli))
}

async fn dispatch(cli: Cli) -> ExitCode {
    let dsn = cli.dsn.clone().map(|d| d.0);
    output::set_statements(cli.statements);
    let result = match cli.command {
        Command::Migrate => coord::migrate(dsn).await,
        Command::Serve(args) => coord::serve(dsn, *args).await,
        Command::Instances(f) => coord::instances(dsn, f.json).await,
        Command::Leader(f) => coord::leader(dsn, f.json).await,
        Command::Run(cmd) => run::exec(dsn, cmd).await,
        Command::Tasks(cmd) => tasks::exec(dsn, cmd).await,
        Command::Queues(cmd) => queues::exec(dsn, cmd).await,
        Command::Schedules(cmd) => schedules::exec(dsn, cmd).await,
        Command::Tenants(cmd) => tenants::exec(dsn, cmd).await,
        Command::Shard(cmd) => shard::exec(cmd).await,
        Command::Bench(args) => bench::exec(dsn, args).await,
        Command::Demo(args) => demo::exec(dsn, args).await,
        Command::Doctor(args) => doctor::exec(dsn, args).await,
        Command::Init(args) => init::exec(args),
        Command::Ui(args) => http::ui(dsn, args).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
