//! `pgcrew bench agents`: agent runs with the offline scripted model
//! ([`ScriptedModel::demo_agent`]): runs per second, database statements and round trips per
//! run by kind, and what bounds the rate.
//!
//! Two agents: `bench_answer` (no tools: one model step, then the run completes) and
//! `bench_tool` (one tool, `bench_echo`: a model step calling it, the tool step, and a model
//! step answering). Each is measured with 1 and with 4 in-process instances (each a
//! [`Client`] hosting both agents with its own pool, LISTEN connection and worker pool of
//! `--concurrency`), in phases: `--runs` runs are submitted first, then the instances start and
//! the clock runs until every run is finished.
//!
//! Statements per run come from `pg_stat_statements` when the server loaded it (the phase's
//! own statements only: the benchmark's probes are left out); otherwise a smaller counted
//! phase of `--counted-runs` runs connects the instances through a counting proxy
//! ([`super::wire`]), which also gives round trips. Either way the counts include the
//! instances' background work during the phase (heartbeats, leader renewal, LISTEN pings),
//! spread over the runs. The bound: the instance process's CPU (getrusage) and the database
//! backends' CPU (`/proc/<pid>/stat`, when the server is local) against the wall time and the
//! machine's cores, with commits (`pg_stat_database.xact_commit`) and WAL syncs
//! (`pg_stat_wal`, cluster-wide) per run.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use pgcrew::agent::demo::DEMO_MODEL;
use pgcrew::agent::{AgentDef, Tool};
use pgcrew::model::ScriptedModel;
use pgcrew::queue::WorkerPool;
use pgcrew::tenancy::{self, TenantContext};
use pgcrew::{Client, ClientConfig, Error, InstanceId, Result, TenantId};
use serde::Serialize;

use crate::bench::wire::{CountingProxy, Counts, statement_kind};
use crate::bench::{Memory, at_least_one, print_report, scratch_db};

/// Arguments of `pgcrew bench agents`.
#[derive(Debug, Args)]
pub struct AgentsBenchArgs {
    /// Runs per timed phase.
    #[arg(long, default_value_t = 2000)]
    pub runs: u64,
    /// Runs per counted phase (through the counting proxy; only without pg_stat_statements).
    #[arg(long, default_value_t = 200)]
    pub counted_runs: u64,
    /// Instance counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 4])]
    pub instances: Vec<usize>,
    /// Worker concurrency of each instance.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// The agents: (name, what a run does).
const AGENTS: [(&str, &str); 2] = [
    ("bench_answer", "one model step"),
    (
        "bench_tool",
        "model step (tool call), tool step, model step (answer)",
    ),
];

/// The tool of `bench_tool`.
const TOOL: &str = "bench_echo";

#[derive(Debug, Serialize)]
struct Report {
    runs: u64,
    concurrency: usize,
    /// Where the statement counts come from: `pg_stat_statements` or `proxy`.
    statements_from: &'static str,
    /// The machine's cores.
    cores: usize,
    phases: Vec<Phase>,
}

#[derive(Debug, Serialize)]
struct Phase {
    agent: &'static str,
    steps: &'static str,
    instances: usize,
    runs: u64,
    /// Runs that did not complete (failed or cancelled).
    runs_not_completed: i64,
    seconds: f64,
    runs_per_sec: f64,
    /// Statements per run (all kinds).
    statements_per_run: f64,
    /// Round trips per run (`Sync` messages and simple queries; proxy only, else 0).
    round_trips_per_run: f64,
    /// Statements per run by kind, most frequent first.
    statements_by_kind: Vec<Kind>,
    /// Committed transactions of the database per run.
    commits_per_run: f64,
    /// WAL records per run (cluster-wide).
    wal_records_per_run: f64,
    /// WAL bytes per run (cluster-wide).
    wal_bytes_per_run: f64,
    /// WAL syncs (fsyncs) per run (cluster-wide).
    wal_syncs_per_run: f64,
    /// CPU of the instance process over the phase, in cores (CPU seconds / wall seconds).
    instance_cpu_cores: f64,
    /// CPU of this database's backends over the phase, in cores (0 when the server is not
    /// local).
    server_cpu_cores: f64,
    /// Instance CPU per run, ms.
    instance_cpu_ms_per_run: f64,
    /// Server CPU per run, ms.
    server_cpu_ms_per_run: f64,
    /// What limits runs/s, as measured.
    bound: String,
    /// The instance process's resident memory.
    memory: Memory,
}

#[derive(Debug, Serialize)]
struct Kind {
    kind: String,
    per_run: f64,
}

/// Run the benchmark.
pub async fn run(dsn: Option<String>, args: AgentsBenchArgs) -> Result<ExitCode> {
    at_least_one(&[
        ("--runs", args.runs),
        ("--counted-runs", args.counted_runs),
        ("--concurrency", args.concurrency as u64),
        ("--instances", args.instances.len() as u64),
    ])?;
    if args.instances.contains(&0) {
        return Err(Error::invalid(
            "--instances",
            "each count must be at least 1",
        ));
    }
    let bench = scratch_db(dsn).await?;
    let probe_db = pgcrew::Db::connect(&bench.dsn, 1, Duration::from_secs(10)).await?;
    let probe = probe_db.get().await?;
    let pgss: bool = probe
        .query_one(pgcrew::sql!("bench/agents_pgss_loaded"), &[])
        .await?
        .try_get(0)?;
    if pgss {
        probe
            .batch_execute(pgcrew::sql!("bench/agents_pgss_setup"))
            .await?;
    }
    let proxy = if pgss {
        None
    } else {
        Some(CountingProxy::start(upstream(&bench.dsn)?).await?)
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut phases = Vec::new();
    let mut tag = 0;
    for &instances in &args.instances {
        for (agent, steps) in AGENTS {
            tag += 1;
            let mut counted = None;
            if let Some(proxy) = &proxy {
                eprintln!(
                    "[{agent} x {instances}] counted phase: {} runs through the counting proxy ...",
                    args.counted_runs
                );
                let dsn = proxied_dsn(&bench.dsn, proxy.addr())?;
                let spec = Spec {
                    agent,
                    instances,
                    runs: args.counted_runs,
                    tag,
                };
                let (p, counts) = phase(&dsn, &probe, spec, args.concurrency, Some(proxy)).await?;
                counted = counts.map(|c| (c, p.runs));
                tag += 1;
            }
            eprintln!(
                "[{agent} x {instances}] timed phase: {} runs ...",
                args.runs
            );
            if pgss {
                probe
                    .batch_execute(pgcrew::sql!("bench/agents_pgss_reset"))
                    .await?;
            }
            let spec = Spec {
                agent,
                instances,
                runs: args.runs,
                tag,
            };
            let (mut p, _) = phase(&bench.dsn, &probe, spec, args.concurrency, None).await?;
            p.steps = steps;
            let (by_kind, round_trips, runs) = match counted {
                Some((c, runs)) => (c.by_kind.clone(), c.round_trips, runs),
                None => (pgss_counts(&probe).await?, 0, p.runs),
            };
            let per = |n: u64| n as f64 / runs.max(1) as f64;
            let mut kinds: Vec<Kind> = by_kind
                .iter()
                .map(|(k, n)| Kind {
                    kind: k.clone(),
                    per_run: per(*n),
                })
                .collect();
            kinds.sort_by(|a, b| b.per_run.total_cmp(&a.per_run).then(a.kind.cmp(&b.kind)));
            p.statements_per_run = per(by_kind.values().sum());
            p.round_trips_per_run = per(round_trips);
            p.statements_by_kind = kinds;
            p.bound = bound(&p, cores);
            phases.push(p);
        }
    }
    let report = Report {
        runs: args.runs,
        concurrency: args.concurrency,
        statements_from: if pgss { "pg_stat_statements" } else { "proxy" },
        cores,
        phases,
    };
    print_report(args.json, &report, |r| {
        println!(
            "pgcrew bench agents: scripted model, {} runs per phase, concurrency {} per instance; statements counted by {}; {} cores",
            r.runs, r.concurrency, r.statements_from, r.cores
        );
        for p in &r.phases {
            println!(
                "  {} ({}), {} instance(s): {:.0} runs/s ({} runs in {:.2} s, {} not completed)",
                p.agent,
                p.steps,
                p.instances,
                p.runs_per_sec,
                p.runs,
                p.seconds,
                p.runs_not_completed
            );
            println!(
                "    per run: {:.1} statements, {:.1} round trips, {:.1} commits, {:.1} WAL records ({:.0} bytes), {:.2} WAL syncs (WAL figures cluster-wide)",
                p.statements_per_run,
                p.round_trips_per_run,
                p.commits_per_run,
                p.wal_records_per_run,
                p.wal_bytes_per_run,
                p.wal_syncs_per_run
            );
            println!(
                "    CPU: instance {:.2} cores ({:.2} ms/run), database backends {:.2} cores ({:.2} ms/run); bound: {}",
                p.instance_cpu_cores,
                p.instance_cpu_ms_per_run,
                p.server_cpu_cores,
                p.server_cpu_ms_per_run,
                p.bound
            );
            println!("    {}", p.memory.line());
            for k in &p.statements_by_kind {
                println!("    {:>6.2}  {}", k.per_run, k.kind);
            }
        }
        Ok(())
    })?;
    drop(probe);
    drop(proxy);
    drop(bench);
    Ok(ExitCode::SUCCESS)
}

/// What one phase runs.
#[derive(Clone, Copy)]
struct Spec {
    agent: &'static str,
    instances: usize,
    runs: u64,
    /// Numbers the phase's tenant and instance ids.
    tag: usize,
}

/// One phase: `instances` clients on `dsn` hosting both agents; `runs` runs of `agent` (its
/// own tenant) submitted, then the clients started and timed until every run is finished.
async fn phase(
    dsn: &str,
    probe: &pgcrew::db::Conn,
    spec: Spec,
    concurrency: usize,
    proxy: Option<&CountingProxy>,
) -> Result<(Phase, Option<Counts>)> {
    let Spec {
        agent,
        instances,
        runs,
        tag,
    } = spec;
    let mut clients = Vec::with_capacity(instances);
    for i in 0..instances {
        clients.push(instance(dsn, i, tag, concurrency).await?);
    }
    let first = clients
        .first()
        .ok_or_else(|| Error::Internal("no instance".into()))?;
    let tenant = TenantId::new(format!("bench-agents-{tag}"))?;
    tenancy::upsert(first.db(), &TenantContext::new(tenant.as_str())?).await?;
    for i in 0..runs {
        first
            .submit(agent, &tenant, &format!("s{i}"), &format!("Echo run {i}"))
            .await?;
    }
    for c in &clients {
        c.start().await?;
    }
    let mut memory = Memory::idle();
    if let Some(p) = proxy {
        p.take();
    }
    let before = Sample::take(probe).await?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(600);
    // The probe's own statements between the samples (each one commit), left out of commits:
    // the first sample, the polls, the backends' CPU and the flush before the last sample.
    let mut probe_commits = 3;
    loop {
        probe_commits += 1;
        let left: i64 = probe
            .query_one(pgcrew::sql!("bench/agents_progress"), &[])
            .await?
            .try_get(0)?;
        memory.sample();
        if left == 0 {
            break;
        }
        if Instant::now() > deadline {
            return Err(Error::Timeout(Duration::from_secs(600)));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let counts = proxy.map(CountingProxy::take);
    let cpu = super::cpu::process_cpu();
    let backends_cpu = Sample::backends_cpu(probe).await?;
    for c in &clients {
        c.stop().await?;
    }
    memory.finish();
    // The instances' backends report their statistics as they exit (a busy backend flushes at
    // most once a second, an idle one after 10 s): sample the counters once they are gone.
    drop(clients);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut after = Sample::take(probe).await?;
    after.cpu = cpu;
    after.backends = backends_cpu;
    let row = probe
        .query_one(pgcrew::sql!("bench/agents_outcome"), &[&tenant.as_str()])
        .await?;
    let (completed, not_completed): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
    if let Some(first) = row.try_get::<_, Option<String>>(2)? {
        eprintln!("  {not_completed} run(s) of {agent} not completed; the first: {first}");
    }
    if completed + not_completed != runs as i64 {
        return Err(Error::Internal(format!(
            "{agent}: {runs} runs submitted, {} found",
            completed + not_completed
        )));
    }
    let per = |n: i64| n as f64 / runs as f64;
    let instance_cpu = (after.cpu - before.cpu).as_secs_f64();
    let server_cpu = after.backends_cpu_since(&before);
    let phase = Phase {
        agent,
        steps: "",
        instances,
        runs,
        runs_not_completed: not_completed,
        seconds,
        runs_per_sec: runs as f64 / seconds,
        statements_per_run: 0.0,
        round_trips_per_run: 0.0,
        statements_by_kind: Vec::new(),
        commits_per_run: per(after.commits - before.commits - probe_commits),
        wal_records_per_run: per(after.wal_records - before.wal_records),
        wal_bytes_per_run: per(after.wal_bytes - before.wal_bytes),
        wal_syncs_per_run: per(after.wal_syncs - before.wal_syncs),
        instance_cpu_cores: instance_cpu / seconds,
        server_cpu_cores: server_cpu / seconds,
        instance_cpu_ms_per_run: instance_cpu * 1000.0 / runs as f64,
        server_cpu_ms_per_run: server_cpu * 1000.0 / runs as f64,
        bound: String::new(),
        memory,
    };
    Ok((phase, counts))
}

/// An instance hosting both agents, the tool and the scripted model; built, not started.
async fn instance(dsn: &str, i: usize, tag: usize, concurrency: usize) -> Result<Client> {
    let tool = Tool::builder(TOOL)
        .description("Echo the text back.")
        .input_schema(serde_json::json!({
            "type": "object",
            "properties": { "text": { "type": "string" } },
            "required": ["text"]
        }))
        .handler(|_ctx, args| async move { Ok(args) })
        .build()?;
    let config = ClientConfig::builder()
        .instance_id(InstanceId::new(format!("bench-agents-{tag}-{i}"))?)
        .build()?;
    Client::builder(dsn.to_string())
        .config(config)
        .agent(AgentDef::new(AGENTS[0].0, DEMO_MODEL).description("Answers at once."))
        .agent(
            AgentDef::new(AGENTS[1].0, DEMO_MODEL)
                .description("Calls its tool once, then answers.")
                .tool(TOOL),
        )
        .tool(tool)
        .model(Arc::new(ScriptedModel::demo_agent()))
        .worker_pool(WorkerPool::builder().concurrency(concurrency))
        .build()
        .await
}

/// Server and process counters at one moment.
struct Sample {
    commits: i64,
    wal_records: i64,
    wal_bytes: i64,
    wal_syncs: i64,
    /// CPU seconds of each backend of the database (empty when `/proc` does not show them).
    backends: HashMap<i32, f64>,
    /// CPU of this process.
    cpu: Duration,
}

impl Sample {
    async fn take(probe: &pgcrew::db::Conn) -> Result<Sample> {
        probe
            .batch_execute(pgcrew::sql!("bench/agents_flush"))
            .await?;
        let row = probe
            .query_one(pgcrew::sql!("bench/agents_server"), &[])
            .await?;
        Ok(Sample {
            commits: row.try_get(0)?,
            wal_records: row.try_get(1)?,
            wal_bytes: row.try_get(2)?,
            wal_syncs: row.try_get(3)?,
            backends: super::cpu::cpu_of(row.try_get(4)?),
            cpu: super::cpu::process_cpu(),
        })
    }

    /// CPU seconds of the database's backends now.
    async fn backends_cpu(probe: &pgcrew::db::Conn) -> Result<HashMap<i32, f64>> {
        let row = probe
            .query_one(pgcrew::sql!("bench/agents_server"), &[])
            .await?;
        Ok(super::cpu::cpu_of(row.try_get(4)?))
    }

    /// CPU seconds the database's backends used since `before` (backends that started since
    /// count whole; backends that ended since are missed).
    fn backends_cpu_since(&self, before: &Sample) -> f64 {
        self.backends
            .iter()
            .map(|(p, s)| s - before.backends.get(p).copied().unwrap_or(0.0))
            .sum()
    }
}

/// The statements of the phase from `pg_stat_statements`, by kind (the benchmark's own probes
/// left out).
async fn pgss_counts(probe: &pgcrew::db::Conn) -> Result<HashMap<String, u64>> {
    let rows = probe
        .query(pgcrew::sql!("bench/agents_pgss_read"), &[])
        .await?;
    let mut by_kind = HashMap::new();
    for row in rows {
        let query: String = row.try_get(0)?;
        let calls: i64 = row.try_get(1)?;
        if query.contains("pgcrew bench agents") || query.contains("pg_stat_statements") {
            continue;
        }
        *by_kind.entry(statement_kind(&query)).or_default() += u64::try_from(calls).unwrap_or(0);
    }
    Ok(by_kind)
}

/// What limits the rate: a side using most of its share of the cores, or else latency.
fn bound(p: &Phase, cores: usize) -> String {
    let total = p.instance_cpu_cores + p.server_cpu_cores;
    let cores = cores as f64;
    let (side, used) = if p.server_cpu_cores >= p.instance_cpu_cores {
        ("database backends", p.server_cpu_cores)
    } else {
        ("instance process", p.instance_cpu_cores)
    };
    if total >= 0.8 * cores {
        format!(
            "CPU: instance + backends use {total:.2} of {cores:.0} cores; the larger share is the {side} ({used:.2} cores)"
        )
    } else {
        format!(
            "latency, not CPU: {total:.2} of {cores:.0} cores used; each run waits on {:.1} statements and {:.1} commits ({:.2} WAL syncs) in sequence",
            p.statements_per_run, p.commits_per_run, p.wal_syncs_per_run
        )
    }
}

/// The TCP address of the scratch database's server.
fn upstream(dsn: &str) -> Result<SocketAddr> {
    let cfg = pgcrew::db::parse_dsn(dsn)?;
    let pg = cfg.pg_config();
    let host = match pg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => {
            return Err(Error::Config(
                "bench agents: the counting proxy needs a TCP server address (or a server with pg_stat_statements loaded)".into(),
            ));
        }
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    (host.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| Error::Config(format!("bench agents: cannot resolve {host}: {e}")))?
        .next()
        .ok_or_else(|| Error::Config(format!("bench agents: {host} has no address")))
}

/// `dsn` through the proxy at `addr` (TLS off: the proxy reads the messages).
fn proxied_dsn(dsn: &str, addr: SocketAddr) -> Result<String> {
    let cfg = pgcrew::db::parse_dsn(dsn)?;
    let pg = cfg.pg_config();
    let quote = |s: &str| format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"));
    let mut out = format!("host={} port={} sslmode=disable", addr.ip(), addr.port());
    if let Some(u) = pg.get_user() {
        out.push_str(&format!(" user={}", quote(u)));
    }
    if let Some(d) = pg.get_dbname() {
        out.push_str(&format!(" dbname={}", quote(d)));
    }
    if let Some(p) = pg.get_password() {
        out.push_str(&format!(" password={}", quote(&String::from_utf8_lossy(p))));
    }
    Ok(out)
}
