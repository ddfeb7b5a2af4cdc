//! `pgcrew bench waits`: many runs parked at a durable wait on one instance hold no connection
//! and no worker slot, and signalling them all completes them quickly.
//!
//! One instance (default configuration: its pool plus one LISTEN connection) works a queue of
//! `--runs` tasks; each task waits for the signal `go` (1 hour) under the run's lease — a bare
//! kernel wait step, or with `--workflow` a workflow's `wait_for_signal` — then completes its
//! run. Once every run waits, the benchmark counts the
//! backends connected to the scratch database (`pg_stat_activity`) against the instance's
//! connection budget, then signals every run in one SQL statement (`pgcrew.signal_run`) and
//! measures how fast they all complete.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use pgcrew::kernel::{Kernel, RunScope, waiting_outcome};
use pgcrew::model::ScriptedModel;
use pgcrew::queue::{HandlerError, TaskOutcome, WorkerPool};
use pgcrew::runs::{self, LimitPolicy, RunState};
use pgcrew::tenancy::{self, TenantContext};
use pgcrew::{Client, ClientConfig, NewTask, Result, RunId};
use serde::Serialize;

use crate::bench::{at_least_one, print_report, scratch_db};

/// Arguments of `pgcrew bench waits`.
#[derive(Debug, Args)]
pub struct WaitsBenchArgs {
    /// Runs waiting at once.
    #[arg(long, default_value_t = 10_000)]
    pub runs: u64,
    /// Worker concurrency of the instance.
    #[arg(long, default_value_t = 64)]
    pub concurrency: u64,
    /// Wait inside a workflow (`WorkflowCtx::wait_for_signal`, which also records
    /// `run_resumed` and `workflow_completed`) instead of a bare kernel wait step
    /// (`Kernel::wait_step`).
    #[arg(long)]
    pub workflow: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    runs: u64,
    concurrency: u64,
    /// `workflow` or `wait_step`.
    via: &'static str,
    /// Connections the instance may open (pool + LISTEN).
    instance_connection_budget: usize,
    /// Backends on the database with the instance started and idle (before any run).
    connections_idle: i64,
    /// Backends on the database while the runs reach their waits (the highest sample).
    connections_while_parking: i64,
    /// Backends on the database while every run waits (the highest of several samples).
    connections_while_waiting: i64,
    /// Worker slots in use while every run waits.
    workers_busy_while_waiting: u64,
    /// Seconds from the first task to every run waiting.
    park_seconds: f64,
    /// Seconds from the signal statement to every run completed.
    resume_seconds: f64,
    /// Seconds the signal statement itself took.
    signal_seconds: f64,
    /// Completed runs per second after the signal.
    resumed_runs_per_second: f64,
    /// CPU time of this process (the instance and the benchmark's own polling) per resumed run,
    /// in milliseconds, from the signal to the last completion.
    instance_cpu_ms_per_run: f64,
    /// The instance process's resident memory: idle before the runs, the highest sample while
    /// they park, wait and resume, and after.
    memory: crate::bench::Memory,
}

const TENANT: &str = "bench-waits";

/// Run the benchmark.
pub async fn run(dsn: Option<String>, args: WaitsBenchArgs) -> Result<ExitCode> {
    at_least_one(&[("--runs", args.runs), ("--concurrency", args.concurrency)])?;
    let bench = scratch_db(dsn).await?;
    let config = ClientConfig::builder().build()?;
    let budget = config.pool_connections() + 1;
    let model: std::sync::Arc<dyn pgcrew::ModelPort> =
        std::sync::Arc::new(ScriptedModel::sequence(vec![]));
    let owner = config.instance_id.to_string();
    // The runs' leases are taken with the claims (V029), as the agent runtime takes them.
    let leasing = runs::RunLeasing::new(
        owner.clone(),
        Duration::from_secs(60),
        Some(config.instance_id.clone()),
    )?;
    let pool = WorkerPool::builder()
        .queue("waits")
        .lease_runs_of("bench.wait", leasing)
        .concurrency(usize::try_from(args.concurrency).unwrap_or(usize::MAX))
        .handler("bench.wait", move |mut ctx, _p: serde_json::Value| {
            // The instance's own pool: the benchmark counts its connections.
            let kernel = Kernel::new(ctx.client.db().clone(), model.clone());
            let owner = owner.clone();
            let workflow = args.workflow;
            async move {
                let Some(run) = ctx.run_id else {
                    return Ok(TaskOutcome::Discard("no run".into()));
                };
                drive(&kernel, run, &owner, ctx.run_lease.take(), workflow)
                    .await
                    .or_else(|e| waiting_outcome(&e).ok_or_else(|| Box::new(e) as HandlerError))
            }
        })
        .build()?;
    let client = Client::builder(bench.dsn.as_str())
        .config(config)
        .service(pool.clone())
        .build()
        .await?;
    client.start().await?;
    // The benchmark's own connection (not the instance's), with its statements prepared.
    let probe_db = pgcrew::Db::connect(&bench.dsn, 1, Duration::from_secs(10)).await?;
    tenancy::upsert(&probe_db, &TenantContext::new(TENANT)?).await?;
    let probe = probe_db.get().await?;
    let seed = probe.prepare(pgcrew::sql!("bench/waits_seed")).await?;
    let in_state = probe.prepare(pgcrew::sql!("bench/waits_count")).await?;
    let signal_all = probe
        .prepare(pgcrew::sql!("bench/waits_signal_all"))
        .await?;
    let backends = probe
        .prepare(pgcrew::sql!("bench/waits_connections"))
        .await?;
    let connections =
        async || -> Result<i64> { Ok(probe.query_one(&backends, &[]).await?.try_get(0)?) };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let connections_idle = connections().await?;
    let mut memory = crate::bench::Memory::idle();

    // Park: create the runs and their tasks; every run reaches its wait.
    let tenant = pgcrew::TenantId::new(TENANT)?;
    let n = i32::try_from(args.runs)
        .map_err(|_| pgcrew::Error::invalid("--runs", "at most 2^31 - 1"))?;
    let started = Instant::now();
    let rows = probe.query(&seed, &[&TENANT, &n]).await?;
    let ids: Vec<RunId> = rows.iter().map(|r| r.get(0)).collect();
    for chunk in ids.chunks(1000) {
        let tasks = chunk
            .iter()
            .map(|r| {
                Ok(NewTask::new("bench.wait", &serde_json::json!({}))?
                    .queue("waits")
                    .tenant(tenant.clone())
                    .run(*r))
            })
            .collect::<Result<Vec<_>>>()?;
        pgcrew::queue::enqueue_many(&probe, &tasks).await?;
    }
    let count = async |state: RunState| -> Result<i64> {
        Ok(probe
            .query_one(&in_state, &[&TENANT, &state.as_str()])
            .await?
            .try_get(0)?)
    };
    let total = i64::from(n);
    let mut connections_while_parking = 0;
    while count(RunState::Waiting).await? < total {
        connections_while_parking = connections_while_parking.max(connections().await?);
        memory.sample();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let park_seconds = started.elapsed().as_secs_f64();
    // Every run waits: sample the connections and the busy worker slots for a moment.
    let mut workers_busy_while_waiting = 0;
    let mut connections_while_waiting = 0;
    for _ in 0..10 {
        connections_while_waiting = connections_while_waiting.max(connections().await?);
        workers_busy_while_waiting =
            workers_busy_while_waiting.max(pool.metrics().snapshot().in_flight as u64);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Resume: one statement signals every run.
    let started = Instant::now();
    let cpu_before = super::cpu::process_cpu();
    probe.query_one(&signal_all, &[&TENANT, &n]).await?;
    let signal_seconds = started.elapsed().as_secs_f64();
    while count(RunState::Completed).await? < total {
        memory.sample();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resume_seconds = started.elapsed().as_secs_f64();
    let resume_cpu = super::cpu::process_cpu().saturating_sub(cpu_before);
    client.stop().await?;
    memory.finish();
    let report = Report {
        runs: args.runs,
        concurrency: args.concurrency,
        via: if args.workflow {
            "workflow"
        } else {
            "wait_step"
        },
        instance_connection_budget: budget,
        connections_idle,
        connections_while_parking,
        connections_while_waiting,
        workers_busy_while_waiting,
        park_seconds,
        resume_seconds,
        signal_seconds,
        resumed_runs_per_second: args.runs as f64 / resume_seconds,
        instance_cpu_ms_per_run: resume_cpu.as_secs_f64() * 1000.0 / args.runs as f64,
        memory,
    };
    print_report(args.json, &report, |r| {
        println!(
            "{} runs waiting: {} connections (idle instance {}, budget {}), {} workers busy; \
             signalled, all completed in {:.2} s = {:.0} runs/s ({:.2} ms instance CPU per run)",
            r.runs,
            r.connections_while_waiting,
            r.connections_idle,
            r.instance_connection_budget,
            r.workers_busy_while_waiting,
            r.resume_seconds,
            r.resumed_runs_per_second,
            r.instance_cpu_ms_per_run
        );
        println!("  {}", r.memory.line());
        Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// One task of the benchmark: lease (taken with the claim, else here), start, the wait (in a
/// workflow, or a bare wait step, which moves a waiting run back to running itself), complete.
async fn drive(
    kernel: &Kernel,
    run: RunId,
    owner: &str,
    taken: Option<runs::LeasedRun>,
    workflow: bool,
) -> Result<TaskOutcome> {
    let db = kernel.db();
    // The lease, and the run resumed when its wait resolved: with the claim (V029), or here
    // in one statement (V025) when the claim could not take it.
    let taken = match taken.filter(|t| t.run.id == run) {
        Some(t) => t,
        None => runs::lease_run(db, run, owner, Duration::from_secs(60), None)
            .await?
            .ok_or_else(|| pgcrew::Error::LeaseLost(format!("run {run} is leased elsewhere")))?,
    };
    let (lease, r) = (taken.lease, taken.run);
    if r.state == RunState::Pending {
        runs::start_run(db, run, None, Some(lease.token), LimitPolicy::Reject).await?;
    }
    let scope = RunScope::new(run, r.tenant_id).with_lease(lease.token);
    let hour = Duration::from_secs(3600);
    if workflow {
        kernel
            .run_workflow(&scope, |ctx| async move {
                ctx.wait_for_signal("go", hour).await
            })
            .await?;
    } else {
        kernel
            .wait_step(&scope, "wait/go", "go", hour, serde_json::json!({}))
            .await?;
    }
    runs::complete_run(db, run, runs::RunOutcome::default(), Some(lease.token)).await?;
    Ok(TaskOutcome::Complete)
}
