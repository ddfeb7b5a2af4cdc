//! `pgcrew bench queue`: bulk enqueue, processing throughput and idle wake-up latency, in a
//! scratch database (on `--dsn`'s server, or a throwaway local cluster) that is dropped after.
//!
//! Each of `--rounds` rounds runs in a fresh scratch database and measures, beside pgcrew, the
//! same loops in plain SQL on the same server: claim+complete by `UPDATE ... FOR UPDATE SKIP
//! LOCKED` (`--raw-connections` connections, batches of `--raw-batch`) and the wake-up loop
//! (INSERT + NOTIFY, LISTEN, claim). The report gives the median of the rounds, their spread,
//! the pgcrew/raw ratios, and the instance process's resident memory idle and under load.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use pgcrew::db::{Db, StatementMode};
use pgcrew::queue::{self, NewTask, TaskOutcome, WorkerPool};
use pgcrew::{Client, ClientConfig, Error, InstanceId, Result};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::bench::percentile_ms;

/// Arguments of `pgcrew bench queue`.
#[derive(Debug, Args)]
pub struct QueueBenchArgs {
    /// Tasks to enqueue (bulk) and process.
    #[arg(long, default_value_t = 100_000)]
    pub tasks: usize,
    /// Rounds (each in a fresh scratch database); the report gives their medians and spread.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Connections of the raw claim+complete loop (default: instances x concurrency).
    #[arg(long, value_name = "N")]
    pub raw_connections: Option<usize>,
    /// Rows claimed per statement by the raw claim+complete loop.
    #[arg(long, default_value_t = 100)]
    pub raw_batch: usize,
    /// Handlers running at once per instance.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// In-process instances (each a Client with its own worker pool).
    #[arg(long, default_value_t = 1)]
    pub instances: usize,
    /// Tasks claimed ahead per instance beyond `concurrency` (0 = claim only for free slots).
    #[arg(long, default_value_t = 100)]
    pub prefetch: usize,
    /// Tasks per bulk-enqueue statement.
    #[arg(long, default_value_t = 5_000)]
    pub batch: usize,
    /// Connections enqueueing concurrently (each sends whole batches).
    #[arg(long, default_value_t = 2)]
    pub producers: usize,
    /// Wake-up latency samples per phase (tasks enqueued one at a time to an idle pool).
    #[arg(long, default_value_t = 1000)]
    pub wakeups: usize,
    /// Gap between wake-up samples.
    #[arg(long, default_value = "5ms", value_parser = pgcrew::config::parse_duration)]
    pub wakeup_gap: Duration,
    /// Connection budget of each instance (`ClientConfig::max_connections`, LISTEN included);
    /// default: a pool of 8 plus the coordination connection.
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// Configure a rate limit (10 million a second) and a key limit (1000 running per payload
    /// `i`) on the bench queue: limits above the processing rate, to measure their cost.
    #[arg(long)]
    pub with_limits: bool,
    /// Finished tasks already in `pgcrew.tasks` before the run (completed, in another queue):
    /// the table a deployment that keeps its finished tasks for a while works on. The raw
    /// claim+complete loop's table is not filled.
    #[arg(long, default_value_t = 0)]
    pub retained: u64,
    /// Whether the worker pools vacuum `pgcrew.tasks` between autovacuum's visits
    /// (`WorkerPoolBuilder::vacuum_tasks`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub pool_vacuum: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

impl Default for QueueBenchArgs {
    fn default() -> Self {
        QueueBenchArgs {
            tasks: 100_000,
            rounds: 3,
            raw_connections: None,
            raw_batch: 100,
            concurrency: 4,
            instances: 1,
            prefetch: 100,
            batch: 5_000,
            producers: 2,
            wakeups: 1000,
            wakeup_gap: Duration::from_millis(5),
            max_connections: None,
            with_limits: false,
            retained: 0,
            pool_vacuum: true,
            json: false,
        }
    }
}

/// The figures printed.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    tasks: usize,
    concurrency: usize,
    instances: usize,
    prefetch: usize,
    /// Connections per instance (pool + coordination).
    pub(crate) connections_per_instance: usize,
    enqueue_secs: f64,
    pub(crate) enqueue_per_sec: f64,
    process_secs: f64,
    pub(crate) processed_per_sec: f64,
    /// Vacuums of `pgcrew.tasks` the pools ran while processing (`WorkerPoolBuilder::vacuum_tasks`).
    vacuums: u64,
    /// Finished tasks written into the table before the run (`--retained`).
    retained: u64,
    /// Whether the pools vacuumed the table (`--pool-vacuum`).
    pool_vacuum: bool,
    /// CPU of the instance process (this process) per task processed, µs.
    pub(crate) instance_cpu_us_per_task: f64,
    /// CPU of the database's backends per task processed, µs (0 when the server's processes
    /// are not on this machine).
    pub(crate) server_cpu_us_per_task: f64,
    wakeup_samples: usize,
    pub(crate) wakeup_p50_ms: f64,
    pub(crate) wakeup_p99_ms: f64,
    wakeup_max_ms: f64,
    wakeup_from_commit_p50_ms: f64,
    wakeup_from_commit_p99_ms: f64,
    /// Wake-up p50 right after the processing burst, before the tasks table is vacuumed.
    wakeup_after_burst_p50_ms: f64,
    /// Wake-up p99 right after the burst.
    wakeup_after_burst_p99_ms: f64,
    /// The same loop in plain SQL on three connections (INSERT + NOTIFY, LISTEN, claim by
    /// `UPDATE ... FOR UPDATE SKIP LOCKED`): the floor this server and machine allow.
    raw_wakeup_p50_ms: f64,
    /// p99 of the plain-SQL loop.
    raw_wakeup_p99_ms: f64,
    /// p50 of the plain-SQL loop from the INSERT's return (commit) to the claimed row.
    raw_wakeup_from_commit_p50_ms: f64,
    /// Connections of the raw claim+complete loop.
    raw_connections: usize,
    /// Rows per claim of the raw claim+complete loop.
    raw_batch: usize,
    /// Seconds the raw loop took for the same number of tasks (0 when not measured).
    raw_process_secs: f64,
    /// Rows claimed and completed per second by the raw loop (0 when not measured).
    pub(crate) raw_processed_per_sec: f64,
    /// `processed_per_sec / raw_processed_per_sec` (0 when not measured).
    processed_ratio: f64,
    /// The instance process's resident memory (the benchmark process: its instances run in it).
    pub(crate) memory: super::Memory,
    /// Instance RSS when [`RSS_MARK`] tasks had been processed, MiB (0 when the round had
    /// fewer tasks): the first figure of "flat between 100k and 1M tasks processed".
    rss_at_mark_mib: f64,
    /// Instance RSS when every task had been processed (still under load), MiB.
    rss_at_end_mib: f64,
    /// `rss_at_end_mib / rss_at_mark_mib - 1`, in percent (0 when there is no mark).
    rss_growth_from_mark_pct: f64,
}

/// Tasks processed at which a round samples the instance RSS, to compare with the RSS at the
/// end of a longer round (issue #23: flat between 100k and 1M tasks processed, one process).
const RSS_MARK: u64 = 100_000;

impl Report {
    /// The raw claim+complete loop's connections and batch for `args`.
    fn raw_shape(args: &QueueBenchArgs) -> (usize, usize) {
        (
            args.raw_connections
                .unwrap_or(args.instances * args.concurrency),
            args.raw_batch,
        )
    }
}

/// The rounds of `pgcrew bench queue`: medians (same names as a round's figures), spreads and
/// every round.
#[derive(Debug, Serialize)]
struct Summary {
    tasks: usize,
    concurrency: usize,
    instances: usize,
    prefetch: usize,
    connections_per_instance: usize,
    raw_connections: usize,
    raw_batch: usize,
    /// Finished tasks in the table before each round (`--retained`).
    retained: u64,
    /// Whether the pools vacuumed the table (`--pool-vacuum`).
    pool_vacuum: bool,
    /// Number of rounds.
    rounds: usize,
    enqueue_per_sec: f64,
    processed_per_sec: f64,
    /// (max - min) / median of the rounds' processing rates.
    processed_spread: f64,
    /// CPU of the instance process per task processed, µs.
    instance_cpu_us_per_task: f64,
    /// CPU of the database's backends per task processed, µs.
    server_cpu_us_per_task: f64,
    raw_processed_per_sec: f64,
    /// (max - min) / median of the rounds' raw rates.
    raw_processed_spread: f64,
    /// Median of the rounds' pgcrew/raw ratios (each round's pair ran back to back).
    processed_ratio: f64,
    wakeup_p50_ms: f64,
    wakeup_p99_ms: f64,
    wakeup_from_commit_p50_ms: f64,
    wakeup_from_commit_p99_ms: f64,
    wakeup_after_burst_p50_ms: f64,
    wakeup_after_burst_p99_ms: f64,
    raw_wakeup_p50_ms: f64,
    raw_wakeup_p99_ms: f64,
    raw_wakeup_from_commit_p50_ms: f64,
    /// Median of the rounds' wake-up p50 / raw p50.
    wakeup_p50_ratio: f64,
    /// Median of the rounds' wake-up p99 / raw p99.
    wakeup_p99_ratio: f64,
    /// Instance RSS idle before the first round, MiB.
    rss_idle_mib: f64,
    /// Highest instance RSS under load over the rounds, MiB.
    rss_load_mib: f64,
    /// Instance RSS idle after the last round's processing, MiB.
    rss_after_mib: f64,
    /// Anonymous part (heap, stacks) of the instance RSS idle before the first round, MiB.
    rss_idle_anon_mib: f64,
    /// Anonymous part of the instance RSS idle after the last round's processing, MiB.
    rss_after_anon_mib: f64,
    /// Every round.
    per_round: Vec<Report>,
}

impl Summary {
    fn new(args: &QueueBenchArgs, rounds: Vec<Report>) -> Summary {
        let m = |f: fn(&Report) -> f64| super::median(&rounds.iter().map(f).collect::<Vec<_>>());
        let s = |f: fn(&Report) -> f64| super::spread(&rounds.iter().map(f).collect::<Vec<_>>());
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        let (raw_connections, raw_batch) = Report::raw_shape(args);
        Summary {
            tasks: args.tasks,
            concurrency: args.concurrency,
            instances: args.instances,
            prefetch: args.prefetch,
            connections_per_instance: rounds.first().map_or(0, |r| r.connections_per_instance),
            raw_connections,
            raw_batch,
            retained: args.retained,
            pool_vacuum: args.pool_vacuum,
            rounds: rounds.len(),
            enqueue_per_sec: m(|r| r.enqueue_per_sec),
            processed_per_sec: m(|r| r.processed_per_sec),
            processed_spread: s(|r| r.processed_per_sec),
            instance_cpu_us_per_task: m(|r| r.instance_cpu_us_per_task),
            server_cpu_us_per_task: m(|r| r.server_cpu_us_per_task),
            raw_processed_per_sec: m(|r| r.raw_processed_per_sec),
            raw_processed_spread: s(|r| r.raw_processed_per_sec),
            processed_ratio: m(|r| r.processed_ratio),
            wakeup_p50_ms: m(|r| r.wakeup_p50_ms),
            wakeup_p99_ms: m(|r| r.wakeup_p99_ms),
            wakeup_from_commit_p50_ms: m(|r| r.wakeup_from_commit_p50_ms),
            wakeup_from_commit_p99_ms: m(|r| r.wakeup_from_commit_p99_ms),
            wakeup_after_burst_p50_ms: m(|r| r.wakeup_after_burst_p50_ms),
            wakeup_after_burst_p99_ms: m(|r| r.wakeup_after_burst_p99_ms),
            raw_wakeup_p50_ms: m(|r| r.raw_wakeup_p50_ms),
            raw_wakeup_p99_ms: m(|r| r.raw_wakeup_p99_ms),
            raw_wakeup_from_commit_p50_ms: m(|r| r.raw_wakeup_from_commit_p50_ms),
            wakeup_p50_ratio: super::median(
                &rounds
                    .iter()
                    .map(|r| ratio(r.wakeup_p50_ms, r.raw_wakeup_p50_ms))
                    .collect::<Vec<_>>(),
            ),
            wakeup_p99_ratio: super::median(
                &rounds
                    .iter()
                    .map(|r| ratio(r.wakeup_p99_ms, r.raw_wakeup_p99_ms))
                    .collect::<Vec<_>>(),
            ),
            rss_idle_mib: rounds.first().map_or(0.0, |r| r.memory.idle_mib),
            rss_load_mib: rounds.iter().map(|r| r.memory.load_mib).fold(0.0, f64::max),
            rss_after_mib: rounds.last().map_or(0.0, |r| r.memory.after_mib),
            rss_idle_anon_mib: rounds.first().map_or(0.0, |r| r.memory.idle_anon_mib),
            rss_after_anon_mib: rounds.last().map_or(0.0, |r| r.memory.after_anon_mib),
            per_round: rounds,
        }
    }
}

/// Refuse arguments the benchmark cannot run with.
pub(crate) fn check_args(args: &QueueBenchArgs) -> Result<()> {
    super::at_least_one(&[
        ("--tasks", args.tasks as u64),
        ("--concurrency", args.concurrency as u64),
        ("--instances", args.instances as u64),
        ("--batch", args.batch as u64),
        ("--producers", args.producers as u64),
        ("--rounds", args.rounds as u64),
        ("--raw-batch", args.raw_batch as u64),
        (
            "--raw-connections",
            args.raw_connections.map_or(1, |n| n as u64),
        ),
    ])
}

/// Run the benchmark.
pub async fn run(dsn: Option<String>, args: QueueBenchArgs) -> Result<ExitCode> {
    check_args(&args)?;
    let mut rounds = Vec::with_capacity(args.rounds);
    for r in 0..args.rounds {
        eprintln!("round {}/{}", r + 1, args.rounds);
        let report =
            crate::bench::in_scratch(dsn.clone(), async |dsn| bench(dsn, &args).await).await?;
        eprintln!(
            "  processed {:.0} tasks/s ({} vacuums of pgcrew.tasks by the pool), raw {:.0}/s ({:.2}); wake-up p50 {:.3} ms, raw {:.3} ms; RSS idle {:.1} / load {:.1} / after {:.1} MiB",
            report.processed_per_sec,
            report.vacuums,
            report.raw_processed_per_sec,
            report.processed_ratio,
            report.wakeup_p50_ms,
            report.raw_wakeup_p50_ms,
            report.memory.idle_mib,
            report.memory.load_mib,
            report.memory.after_mib
        );
        if report.rss_at_mark_mib > 0.0 {
            eprintln!(
                "  RSS at {RSS_MARK} tasks processed {:.1} MiB, at the end {:.1} MiB ({:+.1} %)",
                report.rss_at_mark_mib, report.rss_at_end_mib, report.rss_growth_from_mark_pct
            );
        }
        rounds.push(report);
    }
    let summary = Summary::new(&args, rounds);
    super::print_report(args.json, &summary, |s| {
        println!(
            "pgcrew bench queue: {} no-op tasks, concurrency {} x {} instance(s), prefetch {}, {} connections per instance{}{}{}; medians of {} round(s) (spread = (max - min) / median)",
            s.tasks,
            s.concurrency,
            s.instances,
            s.prefetch,
            s.connections_per_instance,
            if args.with_limits {
                ", rate limit 1e7/s + key limit 1000 per i"
            } else {
                ""
            },
            if args.retained > 0 {
                format!(", {} finished tasks retained", args.retained)
            } else {
                String::new()
            },
            if args.pool_vacuum {
                ""
            } else {
                ", pool vacuum off"
            },
            s.rounds
        );
        let list = |f: fn(&Report) -> f64, digits: usize| {
            s.per_round
                .iter()
                .map(|r| format!("{:.*}", digits, f(r)))
                .collect::<Vec<_>>()
                .join(" / ")
        };
        println!(
            "  enqueue (bulk, {} per statement, {} connections): {:>10.0} tasks/s  [{}]",
            args.batch,
            args.producers,
            s.enqueue_per_sec,
            list(|r| r.enqueue_per_sec, 0)
        );
        println!(
            "  processed: {:>10.0} tasks/s, spread {:.2}  [{}]",
            s.processed_per_sec,
            s.processed_spread,
            list(|r| r.processed_per_sec, 0)
        );
        println!(
            "  CPU per task processed: instance {:.1} µs, database backends {:.1} µs",
            s.instance_cpu_us_per_task, s.server_cpu_us_per_task
        );
        println!(
            "  raw claim+complete (plain UPDATE ... FOR UPDATE SKIP LOCKED, batches of {}, {} connections): {:>10.0} rows/s, spread {:.2}  [{}]",
            s.raw_batch,
            s.raw_connections,
            s.raw_processed_per_sec,
            s.raw_processed_spread,
            list(|r| r.raw_processed_per_sec, 0)
        );
        println!(
            "  pgcrew / raw: {:.2}  [{}]",
            s.processed_ratio,
            list(|r| r.processed_ratio, 2)
        );
        println!(
            "  wake-up latency (idle pool after VACUUM, {} tasks one at a time, {:?} apart, enqueue call to handler start): p50 {:.3} ms, p99 {:.3} ms  [p50 {}]",
            args.wakeups,
            args.wakeup_gap,
            s.wakeup_p50_ms,
            s.wakeup_p99_ms,
            list(|r| r.wakeup_p50_ms, 3)
        );
        println!(
            "  wake-up latency from the enqueue's commit (call returned) to handler start: p50 {:.3} ms, p99 {:.3} ms",
            s.wakeup_from_commit_p50_ms, s.wakeup_from_commit_p99_ms
        );
        println!(
            "  wake-up latency right after the burst (before VACUUM): p50 {:.3} ms, p99 {:.3} ms",
            s.wakeup_after_burst_p50_ms, s.wakeup_after_burst_p99_ms
        );
        println!(
            "  raw PostgreSQL floor (plain INSERT+NOTIFY, LISTEN, UPDATE ... SKIP LOCKED claim; no handler): p50 {:.3} ms, p99 {:.3} ms; from the INSERT's commit p50 {:.3} ms",
            s.raw_wakeup_p50_ms, s.raw_wakeup_p99_ms, s.raw_wakeup_from_commit_p50_ms
        );
        println!(
            "  wake-up / floor: p50 {:.2}x, p99 {:.2}x",
            s.wakeup_p50_ratio, s.wakeup_p99_ratio
        );
        println!(
            "  instance process RSS: idle {:.1} MiB (anonymous {:.1}), under load {:.1} MiB (highest sample), idle after the last round {:.1} MiB (anonymous {:.1})",
            s.rss_idle_mib,
            s.rss_idle_anon_mib,
            s.rss_load_mib,
            s.rss_after_mib,
            s.rss_after_anon_mib
        );
        if args.tasks as u64 > RSS_MARK {
            println!(
                "  instance process RSS at {RSS_MARK} tasks processed / at the end ({} processed), per round: {}",
                args.tasks,
                s.per_round
                    .iter()
                    .map(|r| format!(
                        "{:.1} / {:.1} MiB ({:+.1} %)",
                        r.rss_at_mark_mib, r.rss_at_end_mib, r.rss_growth_from_mark_pct
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// One run of the benchmark on `dsn` (a database it may fill; `pgcrew bench tls` and
/// `pgcrew bench budget` reuse it).
pub(crate) async fn bench(dsn: &str, args: &QueueBenchArgs) -> Result<Report> {
    bench_on(
        Target {
            pool_dsn: dsn,
            direct_dsn: dsn,
            statements: StatementMode::Cached,
            raw_floor: true,
        },
        args,
    )
    .await
}

/// Where the queue benchmark's connections go.
pub(crate) struct Target<'a> {
    /// The pools' DSN (maybe through PgBouncer).
    pub(crate) pool_dsn: &'a str,
    /// A direct DSN to the same database: LISTEN and migrations.
    pub(crate) direct_dsn: &'a str,
    /// The pools' statement mode.
    pub(crate) statements: StatementMode,
    /// Also measure the plain-SQL wake-up floor (prepared statements on the pool's DSN).
    pub(crate) raw_floor: bool,
}

/// The queue benchmark on `target`'s database (already migrated or not).
pub(crate) async fn bench_on(target: Target<'_>, args: &QueueBenchArgs) -> Result<Report> {
    let pool_size = 4 + args.instances * 4;
    let db = Db::connect_with(
        target.pool_dsn,
        pgcrew::db::PoolOptions {
            size: pool_size,
            statements: target.statements,
            ..Default::default()
        },
    )
    .await?;
    db.migrate_direct(target.direct_dsn).await?;
    let dsn = target.pool_dsn;
    if args.with_limits {
        queue::set_rate_limit(
            &db,
            queue::RateScope::Queue,
            "default",
            queue::Rate::per_second(1e7).burst(10_000_000),
        )
        .await?;
        queue::set_key_limit(&db, "default", "i", 1000).await?;
    }

    let mut retained = 0;
    if args.retained > 0 {
        eprintln!(
            "[0/5] {} finished tasks already in the table ...",
            args.retained
        );
        let conn = db.get().await?;
        let n = i64::try_from(args.retained)
            .map_err(|_| Error::Config("--retained: too many tasks".into()))?;
        retained = conn
            .execute(pgcrew::sql!("bench/queue_retained"), &[&n])
            .await?;
        conn.batch_execute(pgcrew::sql!("bench/queue_vacuum"))
            .await?;
    }

    // 1. Bulk enqueue: whole batches from `producers` connections at once.
    eprintln!("[1/5] bulk enqueue of {} tasks ...", args.tasks);
    // Each producer builds its batches as it sends them (batch k of every `producers`), so the
    // benchmark holds no more than one batch per producer: the memory figures are the
    // instance's, not a list of every task.
    let mut conns = Vec::with_capacity(args.producers);
    for _ in 0..args.producers {
        conns.push(db.get().await?);
    }
    let t0 = Instant::now();
    let mut producers = Vec::new();
    let (n, batch, lanes) = (args.tasks, args.batch, args.producers);
    for (lane, conn) in conns.into_iter().enumerate() {
        producers.push(tokio::spawn(async move {
            for start in (lane * batch..n).step_by(batch * lanes) {
                let chunk = (start..(start + batch).min(n))
                    .map(|i| NewTask::new("noop", &serde_json::json!({ "i": i })))
                    .collect::<Result<Vec<_>>>()?;
                queue::enqueue_many(&conn, &chunk).await?;
            }
            Ok::<_, Error>(())
        }));
    }
    for p in producers {
        p.await
            .map_err(|e| Error::Config(format!("producer task failed: {e}")))??;
    }
    let enqueue_secs = t0.elapsed().as_secs_f64();

    // 2. Processing across instances.
    eprintln!("[2/5] processing them ...");
    let (wake_tx, mut wake_rx) = mpsc::unbounded_channel::<Instant>();
    let mut clients: Vec<Client> = Vec::new();
    let mut pools = Vec::new();
    for i in 0..args.instances {
        let wake_tx = wake_tx.clone();
        let pool = WorkerPool::builder()
            .queue("default")
            .concurrency(args.concurrency)
            .prefetch(args.prefetch)
            .poll_interval(Duration::from_secs(1))
            .vacuum_tasks(args.pool_vacuum)
            .handler("noop", |_ctx, _p: serde_json::Value| async move {
                Ok(TaskOutcome::Complete)
            })
            .handler("wake", move |_ctx, _p: serde_json::Value| {
                let _ = wake_tx.send(Instant::now());
                async move { Ok(TaskOutcome::Complete) }
            })
            .build()?;
        let config = ClientConfig::builder()
            .instance_id(InstanceId::new(format!("bench-{i}"))?)
            .statements(target.statements)
            .listen_dsn(target.direct_dsn);
        let config = match args.max_connections {
            Some(n) => config.max_connections(n),
            None => config.pool_size(8),
        }
        .build()?;
        let client = Client::builder(dsn)
            .config(config)
            .service(pool.clone())
            .build()
            .await?;
        clients.push(client);
        pools.push(pool);
    }
    drop(wake_tx);
    // Clients start (register, LISTEN) before the clock starts; their pools begin claiming as
    // the last step of `start`, so at most a few tasks run before `t1`.
    for c in &clients {
        c.start().await?;
    }
    let probe = db.get().await?;
    let cpu = super::cpu::CpuMeter::start(&probe).await?;
    let mut memory = super::Memory::idle();
    let mut rss_at_mark = None;
    let t1 = Instant::now();
    let total = args.tasks as u64;
    let executed = || {
        pools
            .iter()
            .map(|p| p.metrics().snapshot().executed)
            .sum::<u64>()
    };
    // 10 minutes, plus a second per thousand tasks (a loaded machine at a million tasks).
    let limit = Duration::from_secs(600 + total / 1000);
    let deadline = Instant::now() + limit;
    loop {
        let done = executed();
        if rss_at_mark.is_none() && done >= RSS_MARK && total > RSS_MARK {
            rss_at_mark = Some(super::Rss::now().mib());
        }
        if done >= total {
            break;
        }
        if Instant::now() > deadline {
            return Err(Error::Timeout(limit));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
        memory.sample();
    }
    let process_secs = t1.elapsed().as_secs_f64();
    let vacuums = pools
        .iter()
        .map(|p| p.metrics().snapshot().vacuums)
        .sum::<u64>();
    let rss_at_end = super::Rss::now().mib();
    let rss_at_mark = rss_at_mark.unwrap_or(0.0);
    let cpu = cpu.used(&probe).await?;
    drop(probe);

    // 3. Wake-up latency: the pools are idle now. First right after the burst (the tasks table
    // still holds the burst's dead index entries, which every claim steps over until vacuum),
    // then in the idle steady state: after the VACUUM autovacuum would run within a minute.
    eprintln!(
        "[3/5] wake-up latency ({} tasks one at a time, after the burst, then after VACUUM) ...",
        args.wakeups
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    memory.finish();
    let conn = db.get().await?;
    let (mut burst, _) = wake_samples(&conn, &mut wake_rx, args).await?;
    conn.batch_execute(pgcrew::sql!("bench/queue_vacuum"))
        .await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (mut samples, mut from_commit) = wake_samples(&conn, &mut wake_rx, args).await?;
    drop(conn);
    for c in &clients {
        c.stop().await?;
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    from_commit.sort_by(|a, b| a.total_cmp(b));
    burst.sort_by(|a, b| a.total_cmp(b));

    // 4. The same wake-up loop in plain SQL, for the floor.
    eprintln!("[4/5] raw PostgreSQL wake-up floor ...");
    let (mut raw, mut raw_commit) = if target.raw_floor {
        raw_wakeups(&db, args).await?
    } else {
        (Vec::new(), Vec::new())
    };
    raw.sort_by(|a, b| a.total_cmp(b));
    raw_commit.sort_by(|a, b| a.total_cmp(b));

    // 5. The same claim+complete work in plain SQL, for the limit.
    let (raw_connections, raw_batch) = Report::raw_shape(args);
    let raw_process_secs = if target.raw_floor {
        eprintln!(
            "[5/5] raw claim+complete of {} rows ({raw_connections} connections, batches of {raw_batch}) ...",
            args.tasks
        );
        raw_claim_complete(&db, args.tasks, raw_connections, raw_batch).await?
    } else {
        0.0
    };
    let processed_per_sec = args.tasks as f64 / process_secs;
    let raw_processed_per_sec = if raw_process_secs > 0.0 {
        args.tasks as f64 / raw_process_secs
    } else {
        0.0
    };
    Ok(Report {
        tasks: args.tasks,
        concurrency: args.concurrency,
        instances: args.instances,
        prefetch: args.prefetch,
        connections_per_instance: clients
            .first()
            .map_or(0, |c| c.config().connections_needed()),
        enqueue_secs,
        enqueue_per_sec: args.tasks as f64 / enqueue_secs,
        process_secs,
        processed_per_sec,
        vacuums,
        retained,
        pool_vacuum: args.pool_vacuum,
        instance_cpu_us_per_task: cpu.instance_secs * 1e6 / args.tasks as f64,
        server_cpu_us_per_task: cpu.server_secs * 1e6 / args.tasks as f64,
        wakeup_samples: samples.len(),
        wakeup_p50_ms: percentile_ms(&samples, 0.50),
        wakeup_p99_ms: percentile_ms(&samples, 0.99),
        wakeup_max_ms: samples.last().copied().unwrap_or(0.0),
        wakeup_from_commit_p50_ms: percentile_ms(&from_commit, 0.50),
        wakeup_from_commit_p99_ms: percentile_ms(&from_commit, 0.99),
        wakeup_after_burst_p50_ms: percentile_ms(&burst, 0.50),
        wakeup_after_burst_p99_ms: percentile_ms(&burst, 0.99),
        raw_wakeup_p50_ms: percentile_ms(&raw, 0.50),
        raw_wakeup_p99_ms: percentile_ms(&raw, 0.99),
        raw_wakeup_from_commit_p50_ms: percentile_ms(&raw_commit, 0.50),
        raw_connections,
        raw_batch,
        raw_process_secs,
        raw_processed_per_sec,
        processed_ratio: if raw_processed_per_sec > 0.0 {
            processed_per_sec / raw_processed_per_sec
        } else {
            0.0
        },
        memory,
        rss_at_mark_mib: rss_at_mark,
        rss_at_end_mib: rss_at_end,
        rss_growth_from_mark_pct: if rss_at_mark > 0.0 {
            (rss_at_end / rss_at_mark - 1.0) * 100.0
        } else {
            0.0
        },
    })
}

/// The claim+complete loop with no pgcrew code on the path: `tasks` rows in a plain table,
/// drained by `connections` connections (tokio-postgres, prepared statements), each claiming
/// `batch` rows by `UPDATE ... FOR UPDATE SKIP LOCKED` and completing them by id in a second
/// statement, until none is left. Seconds from the first claim to the last completion.
async fn raw_claim_complete(
    db: &Db,
    tasks: usize,
    connections: usize,
    batch: usize,
) -> Result<f64> {
    let setup = db.get().await?;
    setup
        .batch_execute(pgcrew::sql!("bench/queue_raw_cc_setup"))
        .await?;
    setup
        .execute(pgcrew::sql!("bench/queue_raw_cc_fill"), &[&(tasks as i64)])
        .await?;
    setup
        .batch_execute(pgcrew::sql!("bench/queue_raw_cc_analyze"))
        .await?;
    let mut conns = Vec::with_capacity(connections);
    for _ in 0..connections {
        let (client, conn) = db.config().open().await?;
        let driver = tokio::spawn(conn);
        let claim = client
            .prepare(pgcrew::sql!("bench/queue_raw_cc_claim"))
            .await?;
        let complete = client
            .prepare(pgcrew::sql!("bench/queue_raw_cc_complete"))
            .await?;
        conns.push((client, driver, claim, complete));
    }
    let batch = batch as i64;
    let start = Instant::now();
    let mut workers = Vec::with_capacity(connections);
    for (client, driver, claim, complete) in conns {
        workers.push(tokio::spawn(async move {
            loop {
                let rows = client.query(&claim, &[&batch]).await?;
                if rows.is_empty() {
                    break;
                }
                let ids = rows
                    .iter()
                    .map(|r| r.try_get::<_, i64>(0))
                    .collect::<std::result::Result<Vec<i64>, _>>()?;
                client.execute(&complete, &[&ids]).await?;
            }
            drop(client);
            let _ = driver.await;
            Ok::<_, Error>(())
        }));
    }
    for w in workers {
        w.await
            .map_err(|e| Error::Config(format!("raw claim+complete task failed: {e}")))??;
    }
    let secs = start.elapsed().as_secs_f64();
    setup
        .batch_execute(pgcrew::sql!("bench/queue_raw_cc_teardown"))
        .await?;
    Ok(secs)
}

/// Enqueue `args.wakeups` tasks one at a time to the idle pool; milliseconds from each enqueue
/// call (and from its return) to the handler's start.
async fn wake_samples(
    conn: &pgcrew::db::Conn,
    wake_rx: &mut mpsc::UnboundedReceiver<Instant>,
    args: &QueueBenchArgs,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut samples = Vec::with_capacity(args.wakeups);
    let mut from_commit = Vec::with_capacity(args.wakeups);
    for i in 0..args.wakeups {
        let task = NewTask::new("wake", &serde_json::json!({ "i": i }))?;
        let sent = Instant::now();
        queue::enqueue(conn, &task).await?;
        let committed = Instant::now();
        match tokio::time::timeout(Duration::from_secs(10), wake_rx.recv()).await {
            Ok(Some(at)) => {
                samples.push(at.duration_since(sent).as_secs_f64() * 1000.0);
                from_commit.push(at.saturating_duration_since(committed).as_secs_f64() * 1000.0);
            }
            _ => return Err(Error::Timeout(Duration::from_secs(10))),
        }
        tokio::time::sleep(args.wakeup_gap).await;
    }
    Ok((samples, from_commit))
}

/// The wake-up loop with no pgcrew code on the path ([`super::wake_floor`]): milliseconds from
/// the INSERT call, and from its return, to the claim's row.
async fn raw_wakeups(db: &Db, args: &QueueBenchArgs) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut floor = super::wake_floor::WakeFloor::start(db).await?;
    let mut samples = Vec::with_capacity(args.wakeups);
    let mut from_commit = Vec::with_capacity(args.wakeups);
    for _ in 0..args.wakeups {
        let s = floor.sample().await?;
        samples.push(s.from_call_ms);
        from_commit.push(s.from_commit_ms);
        tokio::time::sleep(args.wakeup_gap).await;
    }
    floor.stop().await?;
    Ok((samples, from_commit))
}
