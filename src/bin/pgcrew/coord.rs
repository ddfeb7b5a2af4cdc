//! `pgcrew migrate`, `serve`, `instances`, `leader`.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use pgcrew::coord::{instance, leader};
use pgcrew::{Client, ClientConfig, InstanceId, Result};

use crate::output::{connect, duration_arg, print_rows, require_dsn};

/// Flags of `pgcrew serve`.
#[derive(Debug, Args)]
#[command(after_help = SERVE_EXAMPLES)]
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
    pub listen_dsn: Option<crate::output::DsnArg>,
    /// Do not LISTEN; poll only.
    #[arg(long)]
    pub poll_only: bool,
    /// Apply migrations before starting.
    #[arg(long)]
    pub migrate: bool,
    /// Print one line per leadership change on stdout (for scripts and tests).
    #[arg(long)]
    pub print_events: bool,
    /// Host agents: `demo` (the built-in `support` and `billing` agents and their tools) or a
    /// comma-separated list of demo agent names. Registers them and runs their queues.
    #[arg(long, value_delimiter = ',')]
    pub agents: Vec<String>,
    /// Work these queues (comma-separated) with the demo task kinds `demo.sleep` and `demo.noop`.
    #[arg(long, value_delimiter = ',')]
    pub queues: Vec<String>,
    /// Most tasks (agent runs included) this instance runs at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Use the OpenAI-compatible adapter at this base URL (key from OPENAI_API_KEY, if any).
    /// Default: the adapter when OPENAI_API_KEY or OPENAI_BASE_URL is set, else the offline
    /// scripted demo model.
    #[arg(long)]
    pub model_base_url: Option<String>,
    /// Model name of the hosted demo agents.
    #[arg(long, default_value = pgcrew::agent::demo::DEMO_MODEL)]
    pub model: String,
    /// Simulated latency of each call of the offline scripted model.
    #[arg(long, value_parser = duration_arg, default_value = "300ms")]
    pub model_latency: Duration,
    /// Simulated latency of each demo tool call.
    #[arg(long, value_parser = duration_arg, default_value = "150ms")]
    pub tool_latency: Duration,
    /// Run lease TTL of agent runs (another instance resumes a run after its holder is silent
    /// this long).
    #[arg(long, value_parser = duration_arg, default_value = "30s")]
    pub run_lease_ttl: Duration,
    /// Running tasks whose heartbeat is older than this are rescued by the leader.
    #[arg(long, value_parser = duration_arg, default_value = "2m")]
    pub task_heartbeat_timeout: Duration,
    /// Completed/discarded tasks older than this are deleted by maintenance (default 24 h).
    #[arg(long, value_parser = duration_arg)]
    pub task_retention: Option<Duration>,
    /// Finished runs older than this lose their ledger (chain anchor and final checkpoint
    /// kept), artifacts and cost entries (default: off).
    #[arg(long, value_parser = duration_arg)]
    pub run_retention: Option<Duration>,
    /// Retained runs (see --run-retention) finalized longer ago than this are deleted with
    /// their chain anchor and checkpoints; their ledger no longer verifies (default: off).
    #[arg(long, value_parser = duration_arg)]
    pub run_row_retention: Option<Duration>,
    /// Fallback poll interval of the worker pool.
    #[arg(long, value_parser = duration_arg, default_value = "1s")]
    pub worker_poll_interval: Duration,
    /// Connections this instance may open in all, LISTEN included: the pool gets N - 1, the
    /// coordination connection (heartbeats, leader renewals, LISTEN) the last one; hosted agents
    /// share the pool. At least 3, at least 4 with `--agents`/`--queues`. Default: a pool of 16,
    /// 17 in all.
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// Serve the operations console (and the app's other HTTP routes) on this address, e.g.
    /// 127.0.0.1:8080; actions need PGCREW_UI_TOKEN.
    #[arg(long, value_name = "ADDR")]
    pub http: Option<std::net::SocketAddr>,
}

const SERVE_EXAMPLES: &str = "Examples:
  pgcrew serve --migrate
  pgcrew serve --agents demo --queues default --concurrency 8
  pgcrew serve --agents demo --model-base-url http://localhost:11434/v1 --model llama3.1
  pgcrew serve --agents demo --heartbeat-interval 500ms --leader-ttl 2s --run-lease-ttl 2s \\
      --task-heartbeat-timeout 2s --maintenance-interval 500ms";

/// The agent names `--agents` selects (`demo` = all demo agents).
fn hosted_agents(requested: &[String]) -> Result<Vec<String>> {
    use pgcrew::agent::demo::{BILLING_AGENT, REFUNDS_AGENT, SUPPORT_AGENT};
    let mut out: Vec<String> = Vec::new();
    for a in requested.iter().map(|a| a.trim()).filter(|a| !a.is_empty()) {
        let names: Vec<&str> = match a {
            "demo" => vec![SUPPORT_AGENT, BILLING_AGENT, REFUNDS_AGENT],
            SUPPORT_AGENT | BILLING_AGENT | REFUNDS_AGENT => vec![a],
            other => {
                return Err(pgcrew::Error::invalid(
                    "agents",
                    format!(
                        "unknown agent `{other}`: `pgcrew serve` hosts `demo` (or `{SUPPORT_AGENT}`, `{BILLING_AGENT}`, `{REFUNDS_AGENT}`); link the library to host your own agents"
                    ),
                ));
            }
        };
        for n in names {
            if !out.iter().any(|o| o == n) {
                out.push(n.to_string());
            }
        }
    }
    Ok(out)
}

/// The model port of hosted agents (see `--model-base-url`).
fn model_port(args: &ServeArgs) -> Result<(std::sync::Arc<dyn pgcrew::model::ModelPort>, String)> {
    use pgcrew::model::{OpenAiConfig, OpenAiModel, ScriptedModel};
    let env_set = |k: &str| std::env::var(k).is_ok_and(|v| !v.trim().is_empty());
    if let Some(url) = &args.model_base_url {
        let mut b = OpenAiConfig::from_env().base_url(url);
        if !env_set("OPENAI_API_KEY") {
            b = b.api_key("sk-none");
        }
        let m = OpenAiModel::new(b.build()?);
        return Ok((
            std::sync::Arc::new(m),
            format!("OpenAI-compatible at {url}"),
        ));
    }
    if env_set("OPENAI_API_KEY") || env_set("OPENAI_BASE_URL") {
        let m = OpenAiModel::from_env()?;
        let what = format!("OpenAI-compatible at {}", m.config().base_url());
        return Ok((std::sync::Arc::new(m), what));
    }
    let m = ScriptedModel::demo_agent().with_delay(args.model_latency);
    Ok((std::sync::Arc::new(m), "offline scripted demo model".into()))
}

/// `pgcrew migrate`.
pub async fn migrate(dsn: Option<String>) -> Result<ExitCode> {
    let dsn = require_dsn(dsn)?;
    let db = crate::output::connect_pool(&dsn, 2, Duration::from_secs(10)).await?;
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

/// `pgcrew serve` (examples: [`SERVE_EXAMPLES`]).
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
        .statements(crate::output::statements())
        .migrate(args.migrate);
    if let Some(n) = args.max_connections {
        b = b.max_connections(n);
    }
    if let Some(r) = args.task_retention {
        b = b.task_retention(r);
    }
    if let Some(r) = args.run_retention {
        b = b.run_retention(r);
    }
    if let Some(r) = args.run_row_retention {
        b = b.run_row_retention(r);
    }
    if let Some(id) = args.instance_id.clone() {
        b = b.instance_id(InstanceId::new(id)?);
    }
    if let Some(l) = args.listen_dsn.clone() {
        b = b.listen_dsn(l.0);
    }
    let agents = hosted_agents(&args.agents)?;
    let queues: Vec<String> = args
        .queues
        .iter()
        .map(|q| q.trim().to_string())
        .filter(|q| !q.is_empty())
        .collect();
    if args.concurrency == 0 {
        return Err(pgcrew::Error::invalid("concurrency", "must be at least 1"));
    }
    b = b.task_heartbeat_timeout(args.task_heartbeat_timeout);
    // Queues and hosted agents share one worker pool; the client builder registers the agents
    // and tools, builds the kernel on the client's own database (so the instance stays within
    // its connection budget) and installs the agent runtime on the pool.
    let mut pool = None;
    let mut hosted = None;
    if !agents.is_empty() || !queues.is_empty() {
        use pgcrew::agent::demo;
        use pgcrew::queue::WorkerPool;
        let tools = demo::demo_tools(args.tool_latency)?;
        let defs: Vec<_> = demo::demo_agents(&args.model)
            .into_iter()
            .filter(|d| agents.contains(&d.name))
            .collect();
        let mut wb = WorkerPool::builder()
            .concurrency(args.concurrency)
            .poll_interval(args.worker_poll_interval)
            .heartbeat_interval((args.task_heartbeat_timeout / 4).min(Duration::from_secs(5)));
        for q in &queues {
            wb = wb.queue(q.clone());
        }
        if queues.is_empty() {
            // Only the agents' queues (a pool naming no queue would also work `default`).
            for a in &agents {
                wb = wb.queue(pgcrew::agent::agent_queue(a));
            }
        }
        pool = Some(demo::install_demo_tasks(wb));
        if !defs.is_empty() {
            let (model, what) = model_port(&args)?;
            eprintln!("pgcrew serve: hosting agents {} ({what})", agents.join(","));
            hosted = Some((defs, tools, model));
        }
    }
    let config = b.build()?;
    let print = args.print_events;
    let mut cb = Client::builder(dsn).config(config);
    match (pool, hosted) {
        (Some(wb), Some((defs, tools, model))) => {
            cb = cb
                .worker_pool(wb)
                .model(model)
                .run_lease_ttl(args.run_lease_ttl);
            for d in defs {
                cb = cb.agent(d);
            }
            for t in tools.iter() {
                cb = cb.tool(t.clone());
            }
        }
        (Some(wb), None) => cb = cb.service(wb.build()?),
        (None, _) => {}
    }
    let client = cb
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
    if args.http.is_some() {
        pgcrew::ui::UiConfig::from_env().validate()?;
    }
    client.start().await?;
    println!("serving instance {}", client.instance_id());
    let server = match args.http {
        Some(addr) => Some(crate::http::start(addr, crate::http::app(&client)).await?),
        None => None,
    };
    wait_for_signal().await;
    eprintln!("pgcrew serve: stopping (draining, resigning, deregistering)");
    if let Some(s) = server {
        s.stop().await;
    }
    client.stop().await?;
    println!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// Wait for SIGINT or SIGTERM.
pub async fn wait_for_signal() {
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
    let headers = [
        "ID", "HOST", "PID", "VERSION", "ROLE", "SILENT", "AGENTS", "TOOLS",
    ];
    print_rows(json, &rows, None, &headers, |r| {
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
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `pgcrew leader`.
pub async fn leader(dsn: Option<String>, json: bool) -> Result<ExitCode> {
    let db = connect(dsn).await?;
    let rows = leader::current(&db).await?;
    let headers = ["LEASE", "LEADER", "TERM", "ELECTED_AT", "EXPIRES_IN"];
    print_rows(json, &rows, Some("no leader"), &headers, |r| {
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
    })?;
    Ok(ExitCode::SUCCESS)
}
