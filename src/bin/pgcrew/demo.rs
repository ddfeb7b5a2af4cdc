//! `pgcrew demo`: three `pgcrew serve` processes, two tenants, agent runs and plain tasks,
//! a kill -9 of the leader mid-way, and a summary (runs, costs, leader changes, ledgers).

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use pgcrew::agent::{AgentRuntime, demo, register_agent, register_tools};
use pgcrew::db::{Db, ScratchDatabase, TempCluster};
use pgcrew::kernel::Kernel;
use pgcrew::model::ScriptedModel;
use pgcrew::queue::{self, NewTask};
use pgcrew::runs::{self, RunFilter, RunState};
use pgcrew::tenancy::{self, TenantContext, costs::CostFilter};
use pgcrew::{Error, Result, RunId, TenantId};

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
}

const DEMO_EXAMPLES: &str = "Examples:
  pgcrew demo                                  # throwaway local PostgreSQL, offline model
  DATABASE_URL=postgres://me@localhost/postgres pgcrew demo   # scratch database on your server
  OPENAI_API_KEY=sk-... pgcrew demo            # real model calls (OpenAI)
  OPENAI_BASE_URL=http://localhost:11434/v1 pgcrew demo --model llama3.1   # Ollama, vLLM, ...";

const ACME: &str = "acme";
const GLOBEX: &str = "globex";
const QUEUE: &str = "demo";

/// `pgcrew serve` children, stopped (SIGTERM, then SIGKILL) when dropped.
struct Instances {
    children: Vec<(String, Option<Child>)>,
}

impl Instances {
    fn kill9(&mut self, id: &str) -> bool {
        for (name, child) in &mut self.children {
            if name == id
                && let Some(mut c) = child.take()
            {
                let _ = c.kill();
                let _ = c.wait();
                return true;
            }
        }
        false
    }
}

impl Drop for Instances {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            if let Some(c) = child
                && let Ok(pid) = i32::try_from(c.id())
            {
                // SAFETY: plain kill(2) on our own child's pid.
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        for (_, child) in &mut self.children {
            if let Some(mut c) = child.take() {
                while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn spawn_instances(dsn: &str, model: &str) -> Result<Instances> {
    let exe = std::env::current_exe()
        .map_err(|e| Error::invalid("pgcrew", format!("cannot find the pgcrew binary: {e}")))?;
    let mut inst = Instances {
        children: Vec::new(),
    };
    for n in 1..=3 {
        let id = format!("demo-{n}");
        let child = Command::new(&exe)
            .env("DATABASE_URL", dsn)
            .args([
                "--log",
                "off",
                "serve",
                "--instance-id",
                &id,
                "--agents",
                "demo",
                "--model",
                model,
                "--queues",
                QUEUE,
                "--concurrency",
                "2",
                "--heartbeat-interval",
                "300ms",
                "--instance-ttl",
                "2s",
                "--leader-ttl",
                "1500ms",
                "--maintenance-interval",
                "300ms",
                "--run-lease-ttl",
                "1500ms",
                "--task-heartbeat-timeout",
                "1500ms",
                "--worker-poll-interval",
                "200ms",
                "--poll-interval",
                "500ms",
                "--model-latency",
                "600ms",
                "--tool-latency",
                "300ms",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| Error::invalid("pgcrew serve", format!("cannot start: {e}")))?;
        inst.children.push((id, Some(child)));
    }
    Ok(inst)
}

/// `pgcrew demo`.
pub async fn exec(dsn: Option<String>, args: DemoArgs) -> Result<ExitCode> {
    if args.runs == 0 || args.runs > 200 {
        return Err(Error::invalid("runs", "must be between 1 and 200"));
    }
    if args.tasks > 10_000 {
        return Err(Error::invalid("tasks", "must be at most 10000"));
    }
    tokio::select! {
        r = run(dsn, args) => r,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("\ninterrupted: stopping the instances and removing the demo database");
            Ok(ExitCode::from(130))
        }
    }
}

struct Tick {
    by_state: BTreeMap<&'static str, usize>,
    tasks_done: i64,
    tasks_total: i64,
    leader: Option<(String, i64)>,
}

async fn tick(db: &Db) -> Result<(Tick, Vec<runs::Run>)> {
    let filter = RunFilter {
        limit: 10_000,
        ..RunFilter::default()
    };
    let all = runs::list_runs(db, &filter).await?;
    let mut by_state = BTreeMap::new();
    for r in &all {
        *by_state.entry(r.state.as_str()).or_insert(0) += 1;
    }
    let conn = db.get().await?;
    let stats = queue::stats(&**conn).await?;
    let (mut done, mut total) = (0, 0);
    for s in stats.iter().filter(|s| s.queue == QUEUE) {
        total += s.tasks;
        if matches!(s.state.as_str(), "completed" | "discarded" | "cancelled") {
            done += s.tasks;
        }
    }
    let leader = pgcrew::coord::leader::current(db)
        .await?
        .into_iter()
        .find(|l| l.valid)
        .map(|l| (l.leader_id, l.term));
    Ok((
        Tick {
            by_state,
            tasks_done: done,
            tasks_total: total,
            leader,
        },
        all,
    ))
}

fn short(run: RunId) -> String {
    run.to_string()[..8].to_string()
}

async fn run(dsn: Option<String>, args: DemoArgs) -> Result<ExitCode> {
    let started = Instant::now();
    // 1. A database that is never real data.
    let (cluster, admin_dsn) = match dsn {
        Some(d) => (None, d),
        None => {
            println!("DATABASE_URL is not set: starting a throwaway PostgreSQL cluster ...");
            let c = tokio::task::spawn_blocking(TempCluster::start)
                .await
                .map_err(|e| Error::Cluster(e.to_string()))??;
            println!(
                "  cluster at {} on port {} (removed at the end)",
                c.dir().display(),
                c.port()
            );
            let d = c.dsn();
            (Some(c), d)
        }
    };
    let scratch = ScratchDatabase::create(&admin_dsn, "pgcrew_demo").await?;
    println!("scratch database {} (dropped at the end)", scratch.name());
    let db = Db::connect(scratch.dsn(), 8, Duration::from_secs(10)).await?;
    let report = db.migrate().await?;
    println!("migrated to schema version {}", report.to_version);

    // 2. Agents, tools and tenants.
    for d in demo::demo_agents(&args.model) {
        register_agent(&db, &d).await?;
    }
    register_tools(&db, &demo::demo_tools(demo::DEFAULT_TOOL_LATENCY)?).await?;
    let acme = TenantContext::new(ACME)?
        .capabilities([demo::PAYMENTS_CHARGE])
        .budget_usd(Some(1.0));
    let globex = TenantContext::new(GLOBEX)?.budget_usd(Some(0.0008));
    tenancy::upsert(&db, &acme).await?;
    tenancy::upsert(&db, &globex).await?;
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
            format!("{} via the OpenAI-compatible endpoint", args.model)
        } else {
            "the offline scripted demo model (set OPENAI_API_KEY or OPENAI_BASE_URL for a real one)"
                .to_string()
        }
    );

    // 3. Three instances as separate processes.
    let mut instances = spawn_instances(scratch.dsn(), &args.model)?;
    println!("started 3 instances: demo-1, demo-2, demo-3 (pgcrew serve --agents demo)");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = pgcrew::coord::instance::list(&db).await?.len();
        let (t, _) = tick(&db).await?;
        if n == 3 && t.leader.is_some() {
            let (l, term) = t.leader.unwrap_or_default();
            println!("3 instances up; leader {l} (term {term})");
            break;
        }
        if Instant::now() > deadline {
            eprintln!("error: the instances did not come up within 30 s ({n} registered)");
            return Ok(ExitCode::from(1));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 4. Workload: agent runs for both tenants, plain tasks.
    let submitter = AgentRuntime::new(
        Kernel::new(db.clone(), Arc::new(ScriptedModel::demo_agent())),
        "pgcrew-demo",
    );
    let acme_id = TenantId::new(ACME)?;
    let globex_id = TenantId::new(GLOBEX)?;
    let acme_session = submitter.new_session(&acme_id, "acme-support").await?;
    let globex_session = submitter.new_session(&globex_id, "globex-support").await?;
    let cities = ["Oslo", "Lisbon", "Denver", "Osaka", "Nairobi"];
    let mut plan = Vec::new();
    for i in 0..args.runs {
        let session = if i % 2 == 0 {
            acme_session.id
        } else {
            globex_session.id
        };
        let (agent, prompt) = if i % 3 == 2 {
            (
                demo::BILLING_AGENT,
                format!("Charge customer C-{i} for order B-{}", 2000 + i),
            )
        } else {
            (
                demo::SUPPORT_AGENT,
                format!(
                    "Where is order A-{}? Will the weather in {} delay it?",
                    1000 + i,
                    cities[i % cities.len()]
                ),
            )
        };
        plan.push((agent, session, prompt));
    }
    let first_wave = plan.len().div_ceil(2);
    let mut submitted = Vec::new();
    for (agent, session, prompt) in plan.iter().take(first_wave) {
        submitted.push(submitter.submit(agent, *session, prompt).await?);
    }
    {
        let conn = db.get().await?;
        for i in 0..args.tasks {
            let tenant = if i % 2 == 0 { &acme_id } else { &globex_id };
            let task = if i % 4 == 3 {
                NewTask::new(demo::DEMO_NOOP, &serde_json::json!({}))?
            } else {
                NewTask::new(
                    demo::DEMO_SLEEP,
                    &demo::SleepPayload {
                        ms: 150 + (i as u64 * 137) % 500,
                    },
                )?
            };
            queue::enqueue(&conn, &task.queue(QUEUE).tenant(tenant.clone())).await?;
        }
    }
    println!(
        "submitted {} agent runs and {} plain tasks; {} more runs after the failover\n",
        first_wave,
        args.tasks,
        plan.len() - first_wave
    );

    // 5. Live progress; kill -9 the leader mid-way.
    let t0 = Instant::now();
    let mut last_print = Instant::now() - Duration::from_secs(2);
    let mut leaders: Vec<(String, i64)> = Vec::new();
    let mut killed: Option<(String, Instant)> = None;
    let mut victim_runs: BTreeSet<RunId> = BTreeSet::new();
    let mut resumed: BTreeSet<RunId> = BTreeSet::new();
    let mut failover_reported = false;
    let limit = Duration::from_secs(args.timeout_secs);
    loop {
        let (t, all) = tick(&db).await?;
        if let Some(l) = &t.leader
            && leaders.last() != Some(l)
        {
            leaders.push(l.clone());
        }
        // The kill: once the leader is executing a run (or after 6 s regardless).
        if killed.is_none()
            && let Some((leader, term)) = &t.leader
        {
            // Prefer a moment when the leader runs a run of the tenant with budget (so the
            // resumed run completes), then any run, then (after 8 s) whatever it is doing.
            let busy_with = |acme_only: bool| -> Vec<RunId> {
                all.iter()
                    .filter(|r| {
                        r.state == RunState::Running
                            && r.lease_owner.as_deref() == Some(leader.as_str())
                            && (!acme_only || r.tenant_id == ACME)
                    })
                    .map(|r| r.id)
                    .collect()
            };
            let elapsed = t0.elapsed();
            let busy = if elapsed > Duration::from_secs(4) {
                busy_with(false)
            } else {
                busy_with(true)
            };
            if (!busy.is_empty() && elapsed > Duration::from_millis(1500))
                || elapsed > Duration::from_secs(8)
            {
                instances.kill9(leader);
                println!(
                    ">>> kill -9 of the leader {leader} (term {term}) while it runs {} agent run(s): {}",
                    busy.len(),
                    busy.iter()
                        .map(|r| short(*r))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                victim_runs.extend(busy);
                killed = Some((leader.clone(), Instant::now()));
                for (agent, session, prompt) in plan.iter().skip(first_wave) {
                    submitted.push(submitter.submit(agent, *session, prompt).await?);
                }
            }
        }
        if let Some((victim, at)) = &killed {
            if !failover_reported
                && let Some((l, term)) = &t.leader
                && l != victim
            {
                println!(
                    ">>> failover: {l} is the new leader (term {term}), {:.1}s after the kill",
                    at.elapsed().as_secs_f64()
                );
                failover_reported = true;
            }
            for r in all.iter().filter(|r| victim_runs.contains(&r.id)) {
                if resumed.contains(&r.id) {
                    continue;
                }
                let elsewhere = r.lease_owner.as_deref().is_some_and(|o| o != victim);
                if elsewhere || r.state.is_terminal() {
                    resumed.insert(r.id);
                    let how = match r.lease_owner.as_deref() {
                        Some(o) if o != victim => format!("resumed on {o}"),
                        _ => format!("finished ({}) on another instance", r.state.as_str()),
                    };
                    println!(
                        ">>> run {} {how}, {:.1}s after the kill",
                        short(r.id),
                        at.elapsed().as_secs_f64()
                    );
                }
            }
        }
        let all_done = submitted.len() == plan.len()
            && failover_reported
            && all.iter().all(|r| r.state.is_terminal())
            && t.tasks_done >= t.tasks_total;
        if last_print.elapsed() >= Duration::from_secs(1) || all_done {
            last_print = Instant::now();
            let states: Vec<String> = ["pending", "running", "completed", "failed", "cancelled"]
                .iter()
                .map(|s| format!("{s} {}", t.by_state.get(s).copied().unwrap_or(0)))
                .collect();
            let leader = t
                .leader
                .as_ref()
                .map(|(l, term)| format!("{l} (term {term})"))
                .unwrap_or_else(|| "none (election pending)".into());
            println!(
                "[{:>4.1}s] runs: {} | tasks done {}/{} | leader {leader}",
                t0.elapsed().as_secs_f64(),
                states.join(", "),
                t.tasks_done,
                t.tasks_total
            );
        }
        if all_done {
            break;
        }
        if t0.elapsed() > limit {
            eprintln!(
                "error: the workload did not finish within {} s",
                args.timeout_secs
            );
            return Ok(ExitCode::from(1));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // 6. Summary.
    let (t, all) = tick(&db).await?;
    println!("\n== summary ==");
    let mut failures: BTreeMap<String, usize> = BTreeMap::new();
    for r in all.iter().filter(|r| r.state == RunState::Failed) {
        *failures
            .entry(r.error_type.clone().unwrap_or_else(|| "unknown".into()))
            .or_insert(0) += 1;
    }
    let failures_text = if failures.is_empty() {
        String::new()
    } else {
        format!(
            " ({})",
            failures
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    println!(
        "runs: {} total; completed {}, failed {}{failures_text}, cancelled {}",
        all.len(),
        t.by_state.get("completed").copied().unwrap_or(0),
        t.by_state.get("failed").copied().unwrap_or(0),
        t.by_state.get("cancelled").copied().unwrap_or(0),
    );
    println!("tasks: {} of {} finished", t.tasks_done, t.tasks_total);
    println!(
        "cost per tenant (view pgcrew.tenant_costs; spend from the ledger's model_completed events):"
    );
    let spend: BTreeMap<String, f64> = tenancy::costs::spend_from_events(&db)
        .await?
        .into_iter()
        .collect();
    for tenant in [&acme_id, &globex_id] {
        let rows = tenancy::costs::cost_breakdown(&db, &CostFilter::tenant(tenant.clone())).await?;
        let cost: f64 = rows.iter().map(|r| r.cost_usd).sum();
        let tokens: i64 = rows
            .iter()
            .map(|r| r.prompt_tokens + r.completion_tokens)
            .sum();
        let status = tenancy::costs::budget_status(&db, tenant).await?;
        let per_run = |s: RunState| {
            all.iter()
                .filter(|r| r.tenant_id == tenant.as_str() && r.state == s)
                .count()
        };
        println!(
            "  {:<8} ${cost:.6} ({tokens} tokens; ledger ${:.6}) budget {} status {:?}; runs completed {}, failed {}",
            tenant.as_str(),
            spend.get(tenant.as_str()).copied().unwrap_or(0.0),
            status
                .budget_usd_limit
                .map(|l| format!("${l}"))
                .unwrap_or_else(|| "none".into()),
            status.status,
            per_run(RunState::Completed),
            per_run(RunState::Failed),
        );
    }
    let chain: Vec<String> = leaders
        .iter()
        .map(|(l, term)| format!("{l} (term {term})"))
        .collect();
    println!(
        "leader changes: {} ({})",
        leaders.len().saturating_sub(1),
        chain.join(" -> ")
    );
    if let Some((victim, _)) = &killed {
        println!(
            "failover: killed {victim}; {} of its {} in-flight run(s) finished elsewhere",
            resumed.len(),
            victim_runs.len()
        );
    }
    let mut valid = 0;
    for r in &all {
        let v = runs::verify_run_chain(&db, r.id).await?;
        if v.valid {
            valid += 1;
        } else {
            println!("  run {} ledger INVALID: {v:?}", r.id);
        }
    }
    println!("ledger: {valid} of {} run chains verified valid", all.len());
    let ok = valid == all.len() && failover_reported && leaders.len() >= 2;
    drop(instances);
    db.pool().close();
    drop(db);
    drop(scratch);
    drop(cluster);
    println!(
        "demo {} in {:.1}s (instances stopped, demo database removed)",
        if ok { "finished" } else { "FAILED" },
        started.elapsed().as_secs_f64()
    );
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
