//! `pgcrew bench scale-out --instances 1,2,4,8,16,32`: for each N, N `pgcrew serve` processes
//! (small pools) on one scratch database: total tasks/s, wake-up p50/p99, claim p50/p99 (a
//! probe claiming through the benchmark's own connection) and the claim statement's time,
//! coordination statements per second while idle (pg_stat_statements when the server loads it,
//! else transactions from `pg_stat_database`), connections used, and leader failover time after
//! `kill -9` of the leader. Beside pgcrew's wake-up, the wake-up floor ([`super::wake_floor`])
//! on the same database with the same instances idle, samples alternating.

use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use pgcrew::queue::NewTask;
use pgcrew::{Db, Error, Result};
use serde::Serialize;

use crate::bench::{percentile_ms, print_report};

/// Arguments of `pgcrew bench scale-out`.
#[derive(Debug, Args)]
pub struct ScaleOutBenchArgs {
    /// Instance counts to measure, in order.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32")]
    pub instances: Vec<usize>,
    /// No-op tasks processed per instance count (the throughput figure).
    #[arg(long, default_value_t = 20_000)]
    pub tasks: usize,
    /// Wake-up samples (one task at a time into idle instances).
    #[arg(long, default_value_t = 200)]
    pub wakeups: usize,
    /// Concurrency (tasks at once) of each instance.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Connections of each instance in all (`serve --max-connections`).
    #[arg(long, default_value_t = 4)]
    pub max_connections: usize,
    /// Heartbeat interval of the instances (coordination is reported per interval).
    #[arg(long, default_value = "1s", value_parser = crate::output::duration_arg)]
    pub heartbeat_interval: Duration,
    /// Leader lease TTL of the instances (bounds the failover time; renewed every TTL/3).
    #[arg(long, default_value = "3s", value_parser = crate::output::duration_arg)]
    pub leader_ttl: Duration,
    /// Maintenance interval of the leader (`serve`'s default: 1m).
    #[arg(long, default_value = "1m", value_parser = crate::output::duration_arg)]
    pub maintenance_interval: Duration,
    /// Idle window over which coordination statements are counted.
    #[arg(long, default_value = "10s", value_parser = crate::output::duration_arg)]
    pub idle_window: Duration,
    /// Port of the throwaway cluster started when no DSN is given (default: a free port).
    #[arg(long)]
    pub cluster_port: Option<u16>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// One instance count's figures.
#[derive(Debug, Serialize)]
pub struct ScaleOutRow {
    /// Instances (`pgcrew serve` processes).
    pub instances: usize,
    /// Tasks processed per second, all instances together.
    pub tasks_per_s: f64,
    /// Ratio to the first row's `tasks_per_s` (same run).
    pub vs_first: f64,
    /// WAL written per task processed (enqueue, claim, completion), bytes (the whole server's
    /// WAL over the run).
    pub wal_bytes_per_task: f64,
    /// Statements per task processed (pg_stat_statements; `null` without it).
    pub statements_per_task: Option<f64>,
    /// Wake-up (task created to claimed, database clock) p50, ms.
    pub wakeup_p50_ms: f64,
    /// Wake-up p99, ms.
    pub wakeup_p99_ms: f64,
    /// Wake-up as the enqueuer sees it, p50, ms: from the enqueue call to the benchmark's first
    /// read of the task as claimed (client clock; reads every 0.5 ms), so the enqueue's commit
    /// and the claim's own execution and commit are in it.
    pub wakeup_seen_p50_ms: f64,
    /// Wake-up as the enqueuer sees it, p99, ms.
    pub wakeup_seen_p99_ms: f64,
    /// The wake-up floor with the same instances idle on the same database (plain INSERT +
    /// NOTIFY, one more LISTEN connection, plain one-row `SKIP LOCKED` claim; samples
    /// alternating with pgcrew's): row created to claimed (database clock) p50, ms. Every
    /// NOTIFY in a database wakes every backend LISTENing in it (PostgreSQL 15), whatever the
    /// channel, so the instances' idle LISTEN connections slow the floor as they slow pgcrew.
    pub floor_wakeup_p50_ms: f64,
    /// The floor's created-to-claimed p99, ms.
    pub floor_wakeup_p99_ms: f64,
    /// The floor from the INSERT call to the claim's reply (client clock, no polling) p50, ms.
    pub floor_wakeup_seen_p50_ms: f64,
    /// The floor from the INSERT call to the claim's reply p99, ms.
    pub floor_wakeup_seen_p99_ms: f64,
    /// Claim statements the instances sent per wake-up sample (pg_stat_statements over the
    /// wake-up phase, the samples' enqueues and reads left out): with every idle instance woken
    /// by each enqueue's NOTIFY, about one per instance (`null` without pg_stat_statements).
    pub wakeup_claims_per_sample: Option<f64>,
    /// All statements per wake-up sample over the same phase (the benchmark's enqueue and
    /// polling of the task's state included).
    pub wakeup_statements_per_sample: Option<f64>,
    /// Claim round trip p50 while the instances process the tasks, ms: a probe on the
    /// benchmark's own connection claims one task of the same queue (`pgcrew::queue::claim`,
    /// timed from the call to the reply) and acknowledges it, every 10 ms.
    pub claim_p50_ms: f64,
    /// Claim round trip p99 (the same probe), ms.
    pub claim_p99_ms: f64,
    /// Claims the probe timed.
    pub claim_samples: usize,
    /// Claim statement: mean execution time over the run, ms (pg_stat_statements; `null`
    /// without it).
    pub claim_mean_ms: Option<f64>,
    /// Claim statement: the slowest execution, ms (an upper bound of its p99;
    /// pg_stat_statements keeps no percentiles).
    pub claim_max_ms: Option<f64>,
    /// Coordination statements per second while idle: heartbeats, leader elections/renewals
    /// and maintenance (pg_stat_statements), or all transactions (`pg_stat_database`).
    pub coordination_per_s: f64,
    /// Coordination statements per instance per heartbeat interval.
    pub coordination_per_instance_interval: f64,
    /// Of that, what every instance sends itself (heartbeats, election attempts and renewals),
    /// per instance per heartbeat interval: the leader-only work (maintenance passes, the
    /// scheduler's tick), which does not grow with the instances, left out (pg_stat_statements).
    pub instance_part_per_instance_interval: Option<f64>,
    /// Of `coordination_per_s`: plain heartbeats.
    pub heartbeats_per_s: Option<f64>,
    /// Of `coordination_per_s`: leader election attempts and renewals (since issue #22 each
    /// one also refreshes the instance's heartbeat).
    pub elections_per_s: Option<f64>,
    /// Of `coordination_per_s`: the leader's fenced maintenance and scheduler transactions and
    /// everything else (bookkeeping).
    pub maintenance_per_s: Option<f64>,
    /// Idle queue polls per second (worker pools' fallback poll; not coordination).
    pub idle_polls_per_s: Option<f64>,
    /// The most frequent statements while idle: (class, calls/s, first 100 characters).
    pub idle_top: Vec<(String, f64, String)>,
    /// Connections to the database while idle (all instances).
    pub connections: i64,
    /// Time until another instance leads after `kill -9` of the leader, ms (`null` for N = 1).
    pub failover_ms: Option<f64>,
}

/// The report.
#[derive(Debug, Serialize)]
pub struct ScaleOutReport {
    /// `pg_stat_statements` or `pg_stat_database` (transactions, not statements).
    pub coordination_source: String,
    /// Heartbeat interval of the instances, ms.
    pub heartbeat_interval_ms: u64,
    /// Leader TTL, ms.
    pub leader_ttl_ms: u64,
    /// Per instance: concurrency and connections.
    pub concurrency: usize,
    /// Connections per instance.
    pub max_connections: usize,
    /// Tasks per row.
    pub tasks: usize,
    /// One row per instance count.
    pub rows: Vec<ScaleOutRow>,
}

const QUEUE: &str = "scaleout";
const PGSS_LOADED: &str = pgcrew::sql!("bench/scale_out_pgss_loaded");
const PGSS_CREATE: &str = pgcrew::sql!("bench/scale_out_pgss_create");
const PGSS_RESET: &str = pgcrew::sql!("bench/scale_out_pgss_reset");
const STATEMENTS: &str = pgcrew::sql!("bench/scale_out_statements");
const XACTS: &str = pgcrew::sql!("bench/scale_out_xacts");
const CONNECTIONS: &str = pgcrew::sql!("bench/scale_out_connections");
const FINISHED: &str = pgcrew::sql!("bench/scale_out_finished");
const WAKEUP: &str = pgcrew::sql!("bench/scale_out_wakeup");
const WAL: &str = pgcrew::sql!("bench/scale_out_wal");
const CURRENT_LEADER: &str = pgcrew::sql!("bench/coord_current_leader");
const INSTANCE_COUNT: &str = pgcrew::sql!("bench/coord_instance_count");

/// `pgcrew serve` child processes, killed (`kill -9`) and reaped on drop.
pub struct Fleet {
    dsn: String,
    extra: Vec<String>,
    /// The processes, by instance id.
    pub nodes: Vec<(String, Child)>,
    next: usize,
}

impl Fleet {
    /// A fleet of `serve` processes on `dsn`, each started with `extra` flags.
    pub fn new(dsn: &str, extra: Vec<String>) -> Fleet {
        Fleet {
            dsn: dsn.to_string(),
            extra,
            nodes: Vec::new(),
            next: 0,
        }
    }

    /// Start one more process; returns its instance id.
    pub fn spawn(&mut self) -> Result<String> {
        let id = format!("bench-{}", self.next);
        self.next += 1;
        let exe = crate::bench::own_exe();
        let mut cmd = Command::new(exe);
        // SAFETY: prctl is async-signal-safe; the children die with the benchmark even when it
        // is killed (no orphaned `serve` processes on the scratch database).
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        // The DSN (with its password) goes through the environment: argv is public.
        let child = cmd
            .env("DATABASE_URL", &self.dsn)
            .env_remove("OPENAI_API_KEY")
            .env_remove("OPENAI_BASE_URL")
            .args(["serve", "--instance-id", &id])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.nodes.push((id.clone(), child));
        Ok(id)
    }

    /// `kill -9` the process with instance id `id` (and reap it); false when it is not ours.
    pub fn kill(&mut self, id: &str) -> bool {
        let Some(idx) = self.nodes.iter().position(|(n, _)| n == id) else {
            return false;
        };
        let (_, mut child) = self.nodes.remove(idx);
        let _ = child.kill();
        let _ = child.wait();
        true
    }

    /// Stop every process gracefully (SIGTERM), waiting up to 15 s, then `kill -9` the rest.
    pub fn stop_all(&mut self) {
        for (_, c) in &self.nodes {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        for (_, c) in &mut self.nodes {
            while Instant::now() < deadline {
                if matches!(c.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.nodes.clear();
    }

    /// The processes' pids, by instance id.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.nodes
            .iter()
            .map(|(n, c)| (n.clone(), c.id()))
            .collect()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for (_, c) in &mut self.nodes {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The current leader's instance id.
pub async fn current_leader(db: &Db) -> Result<Option<String>> {
    let conn = db.get().await?;
    Ok(conn.query_opt(CURRENT_LEADER, &[]).await?.map(|r| r.get(0)))
}

/// Wait (up to `limit`) until `pred` holds for the current leader; returns the time it took.
pub async fn wait_leader(
    db: &Db,
    limit: Duration,
    pred: impl Fn(Option<&String>) -> bool,
) -> Result<Duration> {
    let start = Instant::now();
    loop {
        if pred(current_leader(db).await?.as_ref()) {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            return Err(Error::Timeout(limit));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Wait (up to 60 s) until `n` instances are registered.
pub async fn wait_instances(db: &Db, n: i64) -> Result<()> {
    let start = Instant::now();
    loop {
        let conn = db.get().await?;
        let count: i64 = conn.query_one(INSTANCE_COUNT, &[]).await?.get(0);
        if count == n {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(60) {
            return Err(Error::Timeout(Duration::from_secs(60)));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Statement classes of the coordination count.
#[derive(Default)]
struct Classes {
    heartbeats: f64,
    elections: f64,
    maintenance: f64,
    polls: f64,
}

fn classify(query: &str) -> &'static str {
    let q = query.to_ascii_lowercase();
    if q.contains("insert into pgcrew.leader") || q.contains("update pgcrew.leader") {
        // Election attempts and renewals (`coord/elect_beat` also refreshes the heartbeat).
        "election"
    } else if q.contains("last_heartbeat_at") && q.contains("update") && !q.contains("delete") {
        "heartbeat"
    } else if q.contains("pgcrew.leader") && !q.contains("for share") && !q.contains("delete") {
        // Reads of the lease (the fence, `FOR SHARE`, opens the leader's maintenance and
        // scheduler transactions: maintenance).
        "election"
    } else if q.contains("pgcrew.tasks") || q.contains("claim") || q.contains("next_due") {
        // A worker pool's claims, and the next-due read an idle pool makes before it sleeps
        // (`queue/next_due`: since V043 it calls `pgcrew.next_due_in` and names no table, and
        // was counted as maintenance).
        "poll"
    } else {
        "maintenance"
    }
}

async fn statements(db: &Db) -> Result<Vec<(String, i64, f64, f64, f64)>> {
    let conn = db.get().await?;
    Ok(conn
        .query(STATEMENTS, &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect())
}

async fn reset(db: &Db, pgss: bool) -> Result<()> {
    if pgss {
        db.get().await?.execute(PGSS_RESET, &[]).await?;
    }
    Ok(())
}

async fn finished(db: &Db) -> Result<i64> {
    Ok(db.get().await?.query_one(FINISHED, &[&QUEUE]).await?.get(0))
}

/// Enqueue `n` no-op tasks in batches of 1,000 and wait until `target` tasks are finished.
async fn process(db: &Db, n: usize, target: i64) -> Result<Duration> {
    let start = Instant::now();
    let task = NewTask::new(pgcrew::agent::demo::DEMO_NOOP, &serde_json::json!({}))?.queue(QUEUE);
    let mut left = n;
    while left > 0 {
        let k = left.min(1000);
        let conn = db.get().await?;
        pgcrew::queue::enqueue_many(&conn, &vec![task.clone(); k]).await?;
        left -= k;
    }
    let limit = Duration::from_secs(600);
    while finished(db).await? < target {
        if start.elapsed() > limit {
            return Err(Error::Timeout(limit));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(start.elapsed())
}

/// The claim probe: until `stop`, claim one task of the queue on a connection of its own as
/// instance `probe` (timing the round trip) and complete it, every 10 ms. Returns the claim
/// times, ms, sorted.
async fn claim_probe(
    db: &Db,
    probe: &pgcrew::InstanceId,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<Vec<f64>> {
    let conn = db.get().await?;
    let queues = [QUEUE.to_string()];
    let mut times = Vec::new();
    while !*stop.borrow() {
        let t0 = Instant::now();
        let claimed = pgcrew::queue::claim(&conn, &queues, 1, probe).await?;
        times.push(t0.elapsed().as_secs_f64() * 1000.0);
        let acks: Vec<_> = claimed
            .iter()
            .map(|t| t.ack(pgcrew::queue::AckOutcome::Complete))
            .collect();
        pgcrew::queue::ack(&conn, &acks).await?;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    times.sort_by(f64::total_cmp);
    Ok(times)
}

/// Wake-up samples, ms, each sorted: pgcrew's and, alternating with them on the same
/// database while the same instances idle, the floor's ([`super::wake_floor`]).
#[derive(Default)]
struct Wakes {
    /// pgcrew: task created to claimed (database clock).
    created_to_claimed: Vec<f64>,
    /// pgcrew: enqueue call to the benchmark's first read of the task as claimed.
    seen: Vec<f64>,
    /// The floor: row created to claimed (database clock).
    floor: Vec<f64>,
    /// The floor: INSERT call to the claim's reply (client clock).
    floor_seen: Vec<f64>,
}

/// One task at a time into idle instances, each followed by one wake-up of the floor loop.
async fn wakeups(db: &Db, samples: usize) -> Result<Wakes> {
    let task = NewTask::new(pgcrew::agent::demo::DEMO_NOOP, &serde_json::json!({}))?.queue(QUEUE);
    let conn = db.get().await?;
    let mut floor = super::wake_floor::WakeFloor::start(db).await?;
    let mut w = Wakes::default();
    for _ in 0..samples {
        let called = Instant::now();
        let id = pgcrew::queue::enqueue(&conn, &task).await?.id;
        let start = Instant::now();
        loop {
            let row = conn.query_one(WAKEUP, &[&id.0]).await?;
            let state: String = row.get(0);
            if state != "available" {
                w.seen.push(called.elapsed().as_secs_f64() * 1000.0);
                if let Some(ms) = row.get::<_, Option<f64>>(1) {
                    w.created_to_claimed.push(ms);
                }
                break;
            }
            if start.elapsed() > Duration::from_secs(30) {
                return Err(Error::Timeout(Duration::from_secs(30)));
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        let f = floor.sample().await?;
        w.floor.push(f.created_to_claimed_ms);
        w.floor_seen.push(f.from_call_ms);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    floor.stop().await?;
    for v in [
        &mut w.created_to_claimed,
        &mut w.seen,
        &mut w.floor,
        &mut w.floor_seen,
    ] {
        v.sort_by(f64::total_cmp);
    }
    Ok(w)
}

/// Whether `q` (lower case) is a `SKIP LOCKED` claim: the wake-up floor's, or a worker
/// pool's single-statement claim, which runs in `pgcrew.claim_fast` / `claim_fast_limited`
/// (V048).
fn is_fast_claim(q: &str) -> bool {
    q.contains("skip locked") || q.contains("pgcrew.claim_fast")
}

/// Whether a statement is the wake-up floor's (left out of pgcrew's per-wake-up counts).
fn is_floor(query: &str) -> bool {
    query.contains("bench_wake_floor")
}

/// The server: the DSN, or a throwaway cluster (fsync on, pg_stat_statements loaded, 400
/// connections).
async fn server(
    dsn: Option<String>,
    port: Option<u16>,
) -> Result<(String, Option<pgcrew::db::TempCluster>)> {
    if let Some(d) = dsn.filter(|d| !d.trim().is_empty()) {
        return Ok((d, None));
    }
    eprintln!("no DATABASE_URL/--dsn: starting a throwaway PostgreSQL cluster (fsync on)");
    let options = pgcrew::db::TempClusterOptions {
        max_connections: 400,
        unsafe_fast: false,
        settings: vec![(
            "shared_preload_libraries".into(),
            "pg_stat_statements".into(),
        )],
        port,
        ..Default::default()
    };
    let c = tokio::task::spawn_blocking(move || pgcrew::db::TempCluster::start_with(options))
        .await
        .map_err(|e| Error::Cluster(e.to_string()))??;
    Ok((c.dsn(), Some(c)))
}

/// Measure one instance count on a fresh scratch database of `admin`'s server.
async fn measure(admin: &str, n: usize, args: &ScaleOutBenchArgs) -> Result<(ScaleOutRow, bool)> {
    let scratch = pgcrew::db::ScratchDatabase::create(admin, "pgcrew_bench").await?;
    eprintln!("benchmark database: {}", scratch.name());
    let db = Db::connect(scratch.dsn(), 2, Duration::from_secs(10)).await?;
    db.migrate().await?;
    let pgss: bool = db.get().await?.query_one(PGSS_LOADED, &[]).await?.get(0);
    if pgss {
        db.get().await?.batch_execute(PGSS_CREATE).await?;
    }
    let ms = |d: Duration| format!("{}ms", d.as_millis());
    let extra = vec![
        "--queues".into(),
        QUEUE.into(),
        "--concurrency".into(),
        args.concurrency.to_string(),
        "--max-connections".into(),
        args.max_connections.to_string(),
        "--heartbeat-interval".into(),
        ms(args.heartbeat_interval),
        "--leader-ttl".into(),
        ms(args.leader_ttl),
        "--instance-ttl".into(),
        ms(args.heartbeat_interval * 10),
        "--maintenance-interval".into(),
        ms(args.maintenance_interval),
    ];
    let mut fleet = Fleet::new(scratch.dsn(), extra);
    for _ in 0..n {
        fleet.spawn()?;
    }
    wait_instances(&db, n as i64).await?;
    wait_leader(&db, Duration::from_secs(60), |l| l.is_some()).await?;
    // Warm up every instance's connections and statements.
    process(&db, 50 * n, 50 * n as i64).await?;
    reset(&db, pgss).await?;
    let done = finished(&db).await?;
    let wal0: f64 = db.get().await?.query_one(WAL, &[]).await?.get(0);
    // The probe claims as a registered instance of its own (no heartbeats: it acknowledges
    // each task at once and is deregistered right after).
    let probe = probe_instance(&db).await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let probe_db = db.clone();
    let probe_id = probe.id.clone();
    let prober = tokio::spawn(async move { claim_probe(&probe_db, &probe_id, stop_rx).await });
    let took = process(&db, args.tasks, done + args.tasks as i64).await;
    let _ = stop_tx.send(true);
    let claims = prober
        .await
        .map_err(|e| Error::Internal(format!("claim probe: {e}")))?;
    pgcrew::coord::instance::deregister(&db, &probe.id).await?;
    let (took, claims) = (took?, claims?);
    let wal1: f64 = db.get().await?.query_one(WAL, &[]).await?.get(0);
    let tasks_per_s = args.tasks as f64 / took.as_secs_f64();
    let wal_bytes_per_task = (wal1 - wal0) / args.tasks as f64;
    let (claim_mean_ms, claim_max_ms, statements_per_task) = if pgss {
        let all = statements(&db).await?;
        let calls: i64 = all.iter().map(|s| s.1).sum();
        let claim = all
            .into_iter()
            .filter(|s| is_fast_claim(&s.0.to_ascii_lowercase()))
            .max_by_key(|s| s.1);
        (
            claim.as_ref().map(|s| s.4),
            claim.as_ref().map(|s| s.3),
            Some(calls as f64 / args.tasks as f64),
        )
    } else {
        (None, None, None)
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    reset(&db, pgss).await?;
    let wakes = wakeups(&db, args.wakeups).await?;
    let (wakeup_claims_per_sample, wakeup_statements_per_sample) = if pgss {
        let mut all = statements(&db).await?;
        all.retain(|s| !is_floor(&s.0));
        let samples = args.wakeups.max(1) as f64;
        let total: i64 = all.iter().map(|s| s.1).sum();
        let claims: i64 = all
            .iter()
            .filter(|s| {
                let q = s.0.to_ascii_lowercase();
                (is_fast_claim(&q) || q.contains("claim_tasks(")) && !q.contains("due_in_us")
            })
            .map(|s| s.1)
            .sum();
        (Some(claims as f64 / samples), Some(total as f64 / samples))
    } else {
        (None, None)
    };
    // Idle window: coordination only.
    tokio::time::sleep(args.heartbeat_interval).await;
    let connections: i64 = db.get().await?.query_one(CONNECTIONS, &[]).await?.get(0);
    reset(&db, pgss).await?;
    let x0: i64 = db.get().await?.query_one(XACTS, &[]).await?.get(0);
    let w0 = Instant::now();
    tokio::time::sleep(args.idle_window).await;
    let window = w0.elapsed().as_secs_f64();
    let mut classes = Classes::default();
    let mut idle_top = Vec::new();
    let coordination_per_s = if pgss {
        for (q, calls, ..) in statements(&db).await? {
            let c = calls as f64 / window;
            let short: String = q.split_whitespace().collect::<Vec<_>>().join(" ");
            idle_top.push((
                classify(&q).to_string(),
                c,
                short.chars().take(100).collect(),
            ));
            match classify(&q) {
                "heartbeat" => classes.heartbeats += c,
                "election" => classes.elections += c,
                "poll" => classes.polls += c,
                _ => classes.maintenance += c,
            }
        }
        classes.heartbeats + classes.elections + classes.maintenance
    } else {
        // Stats are flushed about once a second: let them land.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let x1: i64 = db.get().await?.query_one(XACTS, &[]).await?.get(0);
        (x1 - x0) as f64 / window
    };
    idle_top.sort_by(|a: &(String, f64, String), b| b.1.total_cmp(&a.1));
    idle_top.truncate(8);
    let per_interval = coordination_per_s * args.heartbeat_interval.as_secs_f64() / n as f64;
    let failover_ms = if n > 1 {
        let leader = current_leader(&db).await?.unwrap_or_default();
        if !fleet.kill(&leader) {
            return Err(Error::Config(format!("leader {leader} is not one of ours")));
        }
        let t = wait_leader(&db, Duration::from_secs(60), |l| {
            l.is_some_and(|id| *id != leader)
        })
        .await?;
        Some(t.as_secs_f64() * 1000.0)
    } else {
        None
    };
    fleet.stop_all();
    drop(db);
    drop(scratch);
    let opt = |v: f64| pgss.then_some(v);
    Ok((
        ScaleOutRow {
            instances: n,
            tasks_per_s,
            vs_first: 1.0,
            wal_bytes_per_task,
            statements_per_task,
            wakeup_p50_ms: percentile_ms(&wakes.created_to_claimed, 0.5),
            wakeup_p99_ms: percentile_ms(&wakes.created_to_claimed, 0.99),
            wakeup_seen_p50_ms: percentile_ms(&wakes.seen, 0.5),
            wakeup_seen_p99_ms: percentile_ms(&wakes.seen, 0.99),
            floor_wakeup_p50_ms: percentile_ms(&wakes.floor, 0.5),
            floor_wakeup_p99_ms: percentile_ms(&wakes.floor, 0.99),
            floor_wakeup_seen_p50_ms: percentile_ms(&wakes.floor_seen, 0.5),
            floor_wakeup_seen_p99_ms: percentile_ms(&wakes.floor_seen, 0.99),
            wakeup_claims_per_sample,
            wakeup_statements_per_sample,
            claim_p50_ms: percentile_ms(&claims, 0.5),
            claim_p99_ms: percentile_ms(&claims, 0.99),
            claim_samples: claims.len(),
            claim_mean_ms,
            claim_max_ms,
            coordination_per_s,
            coordination_per_instance_interval: per_interval,
            instance_part_per_instance_interval: opt((classes.heartbeats + classes.elections)
                * args.heartbeat_interval.as_secs_f64()
                / n as f64),
            heartbeats_per_s: opt(classes.heartbeats),
            elections_per_s: opt(classes.elections),
            maintenance_per_s: opt(classes.maintenance),
            idle_polls_per_s: opt(classes.polls),
            idle_top,
            connections,
            failover_ms,
        },
        pgss,
    ))
}

/// Run the benchmark.
pub async fn run(dsn: Option<String>, args: ScaleOutBenchArgs) -> Result<ExitCode> {
    crate::bench::at_least_one(&[
        ("--tasks", args.tasks as u64),
        ("--wakeups", args.wakeups as u64),
        ("--concurrency", args.concurrency as u64),
        (
            "--instances",
            args.instances.iter().min().copied().unwrap_or(0) as u64,
        ),
    ])?;
    if args.max_connections < 4 {
        return Err(Error::invalid(
            "--max-connections",
            "must be at least 4 (`pgcrew serve --queues` needs 4)",
        ));
    }
    let (admin, _cluster) = server(dsn, args.cluster_port).await?;
    let mut rows: Vec<ScaleOutRow> = Vec::new();
    let mut source = String::from("pg_stat_database (transactions)");
    for &n in &args.instances {
        eprintln!("scale-out: {n} instance(s)");
        let (mut row, pgss) = measure(&admin, n, &args).await?;
        if pgss {
            source = "pg_stat_statements".into();
        }
        if let Some(first) = rows.first() {
            row.vs_first = row.tasks_per_s / first.tasks_per_s;
        }
        rows.push(row);
    }
    let report = ScaleOutReport {
        coordination_source: source,
        heartbeat_interval_ms: args.heartbeat_interval.as_millis() as u64,
        leader_ttl_ms: args.leader_ttl.as_millis() as u64,
        concurrency: args.concurrency,
        max_connections: args.max_connections,
        tasks: args.tasks,
        rows,
    };
    print_report(args.json, &report, |r| {
        println!(
            "scale-out: `pgcrew serve` x N on one database, concurrency {} and {} connections each, heartbeat {} ms, leader TTL {} ms; coordination from {}",
            r.concurrency,
            r.max_connections,
            r.heartbeat_interval_ms,
            r.leader_ttl_ms,
            r.coordination_source
        );
        println!(
            "{:>4} {:>10} {:>6} {:>9} {:>9} {:>10} {:>10} {:>9} {:>9} {:>9} {:>11} {:>6} {:>9}",
            "N",
            "tasks/s",
            "x1",
            "wake p50",
            "wake p99",
            "claim p99",
            "claim max",
            "coord/s",
            "per/inst",
            "own/inst",
            "idle polls/s",
            "conns",
            "failover"
        );
        for row in &r.rows {
            println!(
                "{:>4} {:>10.0} {:>6.2} {:>7.2}ms {:>7.2}ms {:>8.2}ms {:>10} {:>9.1} {:>9.2} {:>9} {:>11} {:>6} {:>9}",
                row.instances,
                row.tasks_per_s,
                row.vs_first,
                row.wakeup_p50_ms,
                row.wakeup_p99_ms,
                row.claim_p99_ms,
                row.claim_max_ms.map_or("-".into(), |v| format!("{v:.2}ms")),
                row.coordination_per_s,
                row.coordination_per_instance_interval,
                row.instance_part_per_instance_interval
                    .map_or("-".into(), |v| format!("{v:.2}")),
                row.idle_polls_per_s
                    .map_or("-".into(), |v| format!("{v:.1}")),
                row.connections,
                row.failover_ms.map_or("-".into(), |v| format!("{v:.0}ms"))
            );
        }
        for row in &r.rows {
            if let (Some(c), Some(t)) = (
                row.wakeup_claims_per_sample,
                row.wakeup_statements_per_sample,
            ) {
                println!(
                    "{:>4} instances: {c:.2} claim statements and {t:.1} statements per wake-up sample; \
                     wake-up seen by the enqueuer p50 {:.2} ms, p99 {:.2} ms",
                    row.instances, row.wakeup_seen_p50_ms, row.wakeup_seen_p99_ms
                );
            }
        }
        for row in &r.rows {
            println!(
                "{:>4} instances: wake-up floor (plain SQL, same instances idle) created to claimed p50 {:.2} ms, p99 {:.2} ms \
                 (pgcrew p99 {:.2}x); INSERT call to claimed p50 {:.2} ms, p99 {:.2} ms",
                row.instances,
                row.floor_wakeup_p50_ms,
                row.floor_wakeup_p99_ms,
                row.wakeup_p99_ms / row.floor_wakeup_p99_ms,
                row.floor_wakeup_seen_p50_ms,
                row.floor_wakeup_seen_p99_ms
            );
        }
        Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Register the claim probe's instance row (`scale-out-probe`).
async fn probe_instance(db: &Db) -> Result<pgcrew::coord::instance::InstanceInfo> {
    let info = pgcrew::coord::instance::InstanceInfo {
        id: pgcrew::InstanceId::new("scale-out-probe")?,
        hostname: pgcrew::coord::instance::hostname(),
        pid: std::process::id() as i32,
        version: env!("CARGO_PKG_VERSION").into(),
        metadata: serde_json::json!({"role": "claim probe"}),
        agents: Vec::new(),
        tools: Vec::new(),
    };
    pgcrew::coord::instance::register(db, &info).await?;
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::{classify, is_floor};

    /// The floor's statements are told apart from pgcrew's, so the per-wake-up counts leave
    /// them out (its claim is a `SKIP LOCKED` claim too).
    #[test]
    fn the_floors_statements_are_left_out_of_pgcrews_counts() {
        for q in [
            pgcrew::sql!("bench/wake_floor_insert"),
            pgcrew::sql!("bench/wake_floor_claim"),
        ] {
            assert!(is_floor(q), "{q}");
        }
        for q in [
            pgcrew::sql!("queue/claim_fast"),
            pgcrew::sql!("queue/enqueue_simple"),
            pgcrew::sql!("queue/claim"),
        ] {
            assert!(!is_floor(q), "{q}");
        }
    }

    /// Every statement an idle instance sends, by the class the report counts it in: the
    /// idle pool's claim and next-due read are polls, not coordination.
    #[test]
    fn idle_statements_are_classified_as_the_report_counts_them() {
        for (query, class) in [
            (pgcrew::sql!("queue/next_due"), "poll"),
            (pgcrew::sql!("queue/claim_fast"), "poll"),
            (
                "UPDATE pgcrew.instances SET last_heartbeat_at = now() WHERE id = $1",
                "heartbeat",
            ),
            ("SELECT $1", "maintenance"),
        ] {
            assert_eq!(classify(query), class, "{query}");
        }
    }
}
