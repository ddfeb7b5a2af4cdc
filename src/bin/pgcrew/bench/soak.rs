//! `pgcrew bench soak --duration 30m`: mixed load on `pgcrew serve` processes (no-op tasks,
//! agent runs with the offline scripted model, cancellations, a `kill -9` of the leader every
//! few minutes, task and run retention on), sampled over time: throughput, each instance's RSS,
//! table and index sizes, dead tuples. Ends by verifying every run's ledger and that every task
//! enqueued finished (none lost), counting the ones run more than once.

use std::collections::{HashMap, HashSet};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use pgcrew::queue::NewTask;
use pgcrew::tenancy::TenantContext;
use pgcrew::{Db, Error, Result, RunId, TenantId};
use serde::Serialize;
use serde_json::json;

use crate::bench::print_report;
use crate::bench::scale_out::{Fleet, current_leader, wait_instances, wait_leader};

/// Arguments of `pgcrew bench soak`.
#[derive(Debug, Args)]
pub struct SoakBenchArgs {
    /// How long the load runs.
    #[arg(long, default_value = "30m", value_parser = crate::output::duration_arg)]
    pub duration: Duration,
    /// `pgcrew serve` processes.
    #[arg(long, default_value_t = 3)]
    pub instances: usize,
    /// No-op tasks enqueued per second.
    #[arg(long, default_value_t = 200)]
    pub tasks_per_s: usize,
    /// Agent runs submitted per second.
    #[arg(long, default_value_t = 2)]
    pub runs_per_s: usize,
    /// `kill -9` the leader (and start a replacement) this often.
    #[arg(long, default_value = "3m", value_parser = crate::output::duration_arg)]
    pub kill_every: Duration,
    /// Sample the figures this often.
    #[arg(long, default_value = "1m", value_parser = crate::output::duration_arg)]
    pub sample_every: Duration,
    /// Task and run retention of the instances.
    #[arg(long, default_value = "2m", value_parser = crate::output::duration_arg)]
    pub retention: Duration,
    /// Run row retention of the instances (`serve --run-row-retention`): retained runs
    /// finalized longer ago than this lose their row and chain anchor.
    #[arg(long, default_value = "5m", value_parser = crate::output::duration_arg)]
    pub run_row_retention: Duration,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// One sample.
#[derive(Debug, Clone, Serialize)]
pub struct SoakSample {
    /// Seconds since the load started.
    pub at_s: f64,
    /// Tasks finished per second since the previous sample.
    pub tasks_per_s: f64,
    /// Runs finished per second since the previous sample.
    pub runs_per_s: f64,
    /// Each live instance's resident memory, MiB, by instance.
    pub rss_mib: Vec<(String, f64)>,
    /// All pgcrew tables (heap and TOAST), MiB.
    pub tables_mib: f64,
    /// All their indexes, MiB.
    pub indexes_mib: f64,
    /// Dead tuples in all pgcrew tables.
    pub dead_tuples: i64,
    /// The largest tables: (name, table + indexes MiB).
    pub largest: Vec<(String, f64)>,
}

/// The report.
#[derive(Debug, Serialize)]
pub struct SoakReport {
    /// The load's length, s.
    pub duration_s: f64,
    /// Instances.
    pub instances: usize,
    /// Samples over time.
    pub samples: Vec<SoakSample>,
    /// Tasks enqueued.
    pub tasks_enqueued: usize,
    /// Tasks finished (completed or cancelled).
    pub tasks_finished: usize,
    /// Tasks cancelled on purpose (and found cancelled).
    pub tasks_cancelled: usize,
    /// Tasks never seen finished: lost.
    pub tasks_lost: usize,
    /// Tasks that took more than one attempt (claimed by an instance killed with `kill -9`,
    /// then rescued: at-least-once).
    pub tasks_retried: usize,
    /// Runs submitted.
    pub runs_submitted: usize,
    /// Runs cancelled on purpose.
    pub runs_cancelled: usize,
    /// Runs by final state.
    pub runs_by_state: HashMap<String, usize>,
    /// Runs not finished at the end.
    pub runs_unfinished: usize,
    /// Ledgers verified (`pgcrew::runs::verify_run_chain`) and how many were invalid.
    pub ledgers_verified: usize,
    /// Runs whose row run row retention had deleted by the end (nothing left to verify).
    pub runs_deleted: usize,
    /// Invalid ledgers.
    pub ledgers_invalid: usize,
    /// Leader kills.
    pub leader_kills: usize,
    /// Growth of the instances' RSS over the last 20 minutes (or last two thirds), the same
    /// instances compared: from sample to sample, the instances alive in both and already warm
    /// (a replacement started after a `kill -9` is left out for its first five minutes, while
    /// it warms up), chained, %.
    pub rss_growth_pct: f64,
    /// Growth of tables + indexes over the same span, %.
    pub size_growth_pct: f64,
}

const SIZES: &str = pgcrew::sql!("bench/soak_sizes");
const FINISHED_TASKS: &str = pgcrew::sql!("bench/soak_finished_tasks");
const FINISHED_RUNS: &str = pgcrew::sql!("bench/soak_finished_runs");
const QUEUE: &str = "soak";
const AGENT: &str = pgcrew::agent::demo::SUPPORT_AGENT;
const MIB: f64 = 1024.0 * 1024.0;

/// What the driver tracks.
#[derive(Default)]
struct Books {
    pending_tasks: HashSet<i64>,
    cancelled_tasks: HashSet<i64>,
    finished_tasks: usize,
    found_cancelled: usize,
    retried: usize,
    pending_runs: HashSet<uuid::Uuid>,
    all_runs: Vec<RunId>,
    runs_by_state: HashMap<String, usize>,
    runs_cancelled: usize,
}

impl Books {
    /// Move the tasks and runs that finished out of the pending sets; returns (tasks, runs).
    async fn settle(&mut self, db: &Db) -> Result<(usize, usize)> {
        let conn = db.get().await?;
        let ids: Vec<i64> = self.pending_tasks.iter().copied().collect();
        let mut tasks = 0;
        for chunk in ids.chunks(5000) {
            for r in conn.query(FINISHED_TASKS, &[&chunk]).await? {
                let id: i64 = r.get(0);
                let state: String = r.get(1);
                let attempts: i32 = r.get(2);
                self.pending_tasks.remove(&id);
                tasks += 1;
                if attempts > 1 {
                    self.retried += 1;
                }
                if state == "cancelled" && self.cancelled_tasks.contains(&id) {
                    self.found_cancelled += 1;
                }
            }
        }
        self.finished_tasks += tasks;
        let runs: Vec<uuid::Uuid> = self.pending_runs.iter().copied().collect();
        let mut done = 0;
        for r in conn.query(FINISHED_RUNS, &[&runs]).await? {
            let id: uuid::Uuid = r.get(0);
            let state: String = r.get(1);
            self.pending_runs.remove(&id);
            *self.runs_by_state.entry(state).or_default() += 1;
            done += 1;
        }
        Ok((tasks, done))
    }
}

async fn sample(
    db: &Db,
    fleet: &Fleet,
    at: f64,
    span: f64,
    tasks: usize,
    runs: usize,
) -> Result<SoakSample> {
    let conn = db.get().await?;
    let mut tables = 0i64;
    let mut indexes = 0i64;
    let mut dead = 0i64;
    let mut largest = Vec::new();
    for r in conn.query(SIZES, &[]).await? {
        let (name, t, i, d): (String, i64, i64, i64) = (r.get(0), r.get(1), r.get(2), r.get(3));
        tables += t;
        indexes += i;
        dead += d;
        largest.push((name, (t + i) as f64 / MIB));
    }
    largest.sort_by(|a, b| b.1.total_cmp(&a.1));
    largest.truncate(4);
    Ok(SoakSample {
        at_s: at,
        tasks_per_s: tasks as f64 / span,
        runs_per_s: runs as f64 / span,
        rss_mib: fleet
            .pids()
            .iter()
            .filter_map(|(n, p)| Some((n.clone(), super::Rss::of_process_mib(*p)?)))
            .collect(),
        tables_mib: tables as f64 / MIB,
        indexes_mib: indexes as f64 / MIB,
        dead_tuples: dead,
        largest,
    })
}

/// Growth of `f` from the first sample of the last 20 minutes (the last two thirds of a
/// shorter run) to the last sample, %; `f` sees a sample and its predecessor.
fn growth(
    samples: &[SoakSample],
    total: f64,
    f: impl Fn(&SoakSample, Option<&SoakSample>) -> f64,
) -> f64 {
    let from = if total > 25.0 * 60.0 {
        total - 20.0 * 60.0
    } else {
        total / 3.0
    };
    let Some(first) = samples.iter().position(|s| s.at_s >= from) else {
        return 0.0;
    };
    let value = |i: usize| f(&samples[i], i.checked_sub(1).map(|p| &samples[p]));
    // The first and the last samples that have a figure (a sample where every instance was
    // just replaced has none).
    let Some(a) = (first..samples.len()).map(value).find(|v| *v > 0.0) else {
        return 0.0;
    };
    let b = (first..samples.len())
        .rev()
        .map(value)
        .find(|v| *v > 0.0)
        .unwrap_or(a);
    (b - a) / a * 100.0
}

/// How long an instance warms up: a `kill -9` replacement grows for its first minutes (its
/// pools, caches and prepared statements fill; about 30 to 31.5 MiB over five minutes in the
/// 30-minute release soak) and is left out of [`rss_growth`] until then.
const WARM_UP_S: f64 = 300.0;

/// Growth of the instances' RSS over the same span as [`growth`], comparing only the same
/// instances: from each sample to the next, the summed RSS of the instances alive in both and
/// already warm (first seen at least [`WARM_UP_S`] before the earlier sample), the ratios chained
/// over the span, %. A step with no such instance counts as flat.
fn rss_growth(samples: &[SoakSample], total: f64) -> f64 {
    let from = if total > 25.0 * 60.0 {
        total - 20.0 * 60.0
    } else {
        total / 3.0
    };
    let Some(first) = samples.iter().position(|s| s.at_s >= from) else {
        return 0.0;
    };
    let mut first_seen: HashMap<&str, f64> = HashMap::new();
    for s in samples {
        for (n, _) in &s.rss_mib {
            first_seen.entry(n.as_str()).or_insert(s.at_s);
        }
    }
    let rss = |s: &SoakSample, n: &str| s.rss_mib.iter().find(|(m, _)| m == n).map(|(_, v)| *v);
    let mut ratio = 1.0;
    for i in (first + 1)..samples.len() {
        let (b, c) = (&samples[i - 1], &samples[i]);
        let (mut before, mut after) = (0.0, 0.0);
        for (n, v) in &c.rss_mib {
            let warm = first_seen
                .get(n.as_str())
                .is_some_and(|t| *t <= b.at_s - WARM_UP_S);
            if let (true, Some(p)) = (warm, rss(b, n)) {
                before += p;
                after += v;
            }
        }
        if before > 0.0 {
            ratio *= after / before;
        }
    }
    (ratio - 1.0) * 100.0
}

/// Run the benchmark.
pub async fn run(dsn: Option<String>, args: SoakBenchArgs) -> Result<ExitCode> {
    crate::bench::at_least_one(&[
        ("--instances", args.instances as u64),
        ("--tasks-per-s", args.tasks_per_s as u64),
    ])?;
    let bench = crate::bench::scratch_db(dsn).await?;
    let db = Db::connect(&bench.dsn, 4, Duration::from_secs(10)).await?;
    let tenants = [TenantId::new("soak-a")?, TenantId::new("soak-b")?];
    for t in &tenants {
        pgcrew::tenancy::tenants::upsert(&db, &TenantContext::for_id(t.clone())).await?;
    }
    let ms = |d: Duration| format!("{}ms", d.as_millis());
    let extra: Vec<String> = [
        "--agents",
        AGENT,
        "--queues",
        &format!("{QUEUE},{}", pgcrew::agent::agent_queue(AGENT)),
        "--concurrency",
        "8",
        "--max-connections",
        "8",
        "--heartbeat-interval",
        "1s",
        "--leader-ttl",
        "2s",
        "--instance-ttl",
        "10s",
        "--run-lease-ttl",
        "3s",
        "--task-heartbeat-timeout",
        "4s",
        "--maintenance-interval",
        "2s",
        "--model-latency",
        "20ms",
        "--tool-latency",
        "10ms",
        "--task-retention",
        &ms(args.retention),
        "--run-retention",
        &ms(args.retention),
        "--run-row-retention",
        &ms(args.run_row_retention),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut fleet = Fleet::new(&bench.dsn, extra);
    for _ in 0..args.instances {
        fleet.spawn()?;
    }
    wait_instances(&db, args.instances as i64).await?;
    wait_leader(&db, Duration::from_secs(60), |l| l.is_some()).await?;
    let noop = NewTask::new(pgcrew::agent::demo::DEMO_NOOP, &json!({}))?.queue(QUEUE);
    let mut books = Books::default();
    let mut samples = Vec::new();
    let start = Instant::now();
    let tick = Duration::from_millis(100);
    let per_tick = args.tasks_per_s.div_ceil(10);
    let mut next_tick = start;
    let mut next_sample = start + args.sample_every;
    let mut next_kill = start + args.kill_every;
    let mut next_settle = start + Duration::from_secs(1);
    let mut next_second = start + Duration::from_secs(1);
    let (mut span_tasks, mut span_runs, mut last_sample) = (0usize, 0usize, start);
    let mut kills = 0;
    let mut seconds = 0u64;
    let mut enqueued = 0usize;
    samples.push(sample(&db, &fleet, 0.0, 1.0, 0, 0).await?);
    while start.elapsed() < args.duration {
        tokio::time::sleep_until(next_tick.into()).await;
        next_tick += tick;
        let now = Instant::now();
        {
            let conn = db.get().await?;
            let batch: Vec<NewTask> = (0..per_tick)
                .map(|i| noop.clone().tenant(tenants[i % 2].clone()))
                .collect();
            for id in pgcrew::queue::enqueue_many(&conn, &batch).await? {
                books.pending_tasks.insert(id.0);
            }
            enqueued += batch.len();
        }
        if now >= next_second {
            next_second += Duration::from_secs(1);
            seconds += 1;
            for i in 0..args.runs_per_s {
                let tenant = &tenants[i % 2];
                let input = json!({"prompt": format!("Where is order A-{}?", 1000 + seconds)});
                let run =
                    pgcrew::client::submit_run(&db, AGENT, tenant, Some("soak"), &input).await?;
                books.pending_runs.insert(run.0);
                books.all_runs.push(run);
            }
            if seconds.is_multiple_of(5) {
                // A task for later, cancelled at once; and the newest run, cancelled.
                let conn = db.get().await?;
                let later = noop.clone().delay(Duration::from_secs(3600));
                let id = pgcrew::queue::enqueue(&conn, &later).await?.id;
                books.pending_tasks.insert(id.0);
                books.cancelled_tasks.insert(id.0);
                enqueued += 1;
                pgcrew::queue::cancel(&conn, id).await?;
                if let Some(run) = books.all_runs.last().copied()
                    && pgcrew::runs::cancel_run(&db, run, "soak cancellation")
                        .await
                        .is_ok()
                {
                    books.runs_cancelled += 1;
                }
            }
        }
        if now >= next_settle {
            next_settle += Duration::from_secs(1);
            let (t, r) = books.settle(&db).await?;
            span_tasks += t;
            span_runs += r;
        }
        if now >= next_kill {
            next_kill += args.kill_every;
            if let Some(leader) = current_leader(&db).await?
                && fleet.kill(&leader)
            {
                kills += 1;
                fleet.spawn()?;
                eprintln!(
                    "soak {:.0}s: kill -9 leader {leader}",
                    start.elapsed().as_secs_f64()
                );
            }
        }
        if now >= next_sample {
            next_sample += args.sample_every;
            let at = start.elapsed().as_secs_f64();
            let span = last_sample.elapsed().as_secs_f64();
            let s = sample(&db, &fleet, at, span, span_tasks, span_runs).await?;
            eprintln!(
                "soak {:.0}s: {:.0} tasks/s, {:.1} runs/s, RSS {:?} MiB, tables {:.1} MiB, indexes {:.1} MiB, dead {}",
                s.at_s,
                s.tasks_per_s,
                s.runs_per_s,
                s.rss_mib,
                s.tables_mib,
                s.indexes_mib,
                s.dead_tuples
            );
            samples.push(s);
            (span_tasks, span_runs, last_sample) = (0, 0, Instant::now());
        }
    }
    let duration_s = start.elapsed().as_secs_f64();
    // Drain: every task and run finishes (up to 3 minutes).
    let drain = Instant::now();
    while (!books.pending_tasks.is_empty() || !books.pending_runs.is_empty())
        && drain.elapsed() < Duration::from_secs(180)
    {
        books.settle(&db).await?;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    fleet.stop_all();
    let mut invalid = 0;
    let mut deleted = 0;
    for run in &books.all_runs {
        let v = match pgcrew::runs::ledger::verify_run_chain(&db, *run).await {
            Ok(v) => v,
            Err(Error::NotFound { .. }) => {
                deleted += 1;
                continue;
            }
            Err(e) => return Err(e),
        };
        if !v.valid {
            invalid += 1;
            eprintln!("ledger of run {run} is invalid: {:?}", v.problem);
        }
    }
    let rss_growth = rss_growth(&samples, duration_s);
    let size_growth = growth(&samples, duration_s, |s, _| s.tables_mib + s.indexes_mib);
    let report = SoakReport {
        duration_s,
        instances: args.instances,
        samples,
        tasks_enqueued: enqueued,
        tasks_finished: books.finished_tasks,
        tasks_cancelled: books.found_cancelled,
        tasks_lost: books.pending_tasks.len(),
        tasks_retried: books.retried,
        runs_submitted: books.all_runs.len(),
        runs_cancelled: books.runs_cancelled,
        runs_by_state: books.runs_by_state.clone(),
        runs_unfinished: books.pending_runs.len(),
        ledgers_verified: books.all_runs.len() - deleted,
        runs_deleted: deleted,
        ledgers_invalid: invalid,
        leader_kills: kills,
        rss_growth_pct: rss_growth,
        size_growth_pct: size_growth,
    };
    drop(db);
    drop(bench);
    let ok = report.tasks_lost == 0 && report.runs_unfinished == 0 && report.ledgers_invalid == 0;
    print_report(args.json, &report, |r| {
        println!(
            "soak: {:.0} s, {} instances, {} leader kills",
            r.duration_s, r.instances, r.leader_kills
        );
        for s in &r.samples {
            println!(
                "  {:>6.0}s {:>7.0} tasks/s {:>5.1} runs/s  RSS {:>6.1} MiB total  tables {:>7.1} MiB  indexes {:>7.1} MiB  dead {:>7}",
                s.at_s,
                s.tasks_per_s,
                s.runs_per_s,
                s.rss_mib.iter().map(|(_, v)| v).sum::<f64>(),
                s.tables_mib,
                s.indexes_mib,
                s.dead_tuples
            );
        }
        println!(
            "  tasks: {} enqueued, {} finished ({} cancelled on purpose), {} lost, {} retried after a kill",
            r.tasks_enqueued, r.tasks_finished, r.tasks_cancelled, r.tasks_lost, r.tasks_retried
        );
        println!(
            "  runs: {} submitted ({} cancelled on purpose), by state {:?}, {} unfinished",
            r.runs_submitted, r.runs_cancelled, r.runs_by_state, r.runs_unfinished
        );
        println!(
            "  ledgers: {} verified, {} invalid, {} runs deleted by run row retention; growth over the last span: RSS per warm instance {:+.1} %, tables+indexes {:+.1} %",
            r.ledgers_verified,
            r.ledgers_invalid,
            r.runs_deleted,
            r.rss_growth_pct,
            r.size_growth_pct
        );
        Ok(())
    })?;
    if !ok {
        return Err(Error::Internal(format!(
            "soak failed: {} tasks lost, {} runs unfinished, {} invalid ledgers",
            report.tasks_lost, report.runs_unfinished, report.ledgers_invalid
        )));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(at_s: f64, rss: &[(&str, f64)]) -> SoakSample {
        SoakSample {
            at_s,
            tasks_per_s: 0.0,
            runs_per_s: 0.0,
            rss_mib: rss.iter().map(|(n, v)| (n.to_string(), *v)).collect(),
            tables_mib: 1.0,
            indexes_mib: 1.0,
            dead_tuples: 0,
            largest: Vec::new(),
        }
    }

    #[test]
    fn rss_growth_compares_the_same_warm_instances_not_a_replacement_just_started() {
        // The last sample is taken just after a kill -9: bench-2 is gone, its replacement
        // bench-3 has barely started. The instances themselves did not grow.
        let samples = [
            at(
                0.0,
                &[("bench-0", 29.0), ("bench-1", 29.0), ("bench-2", 29.0)],
            ),
            at(
                300.0,
                &[("bench-0", 30.0), ("bench-1", 30.0), ("bench-2", 30.0)],
            ),
            at(
                360.0,
                &[("bench-0", 30.0), ("bench-1", 30.0), ("bench-2", 30.0)],
            ),
            at(
                420.0,
                &[("bench-0", 30.0), ("bench-1", 30.0), ("bench-3", 1.7)],
            ),
        ];
        let g = rss_growth(&samples, 420.0);
        assert!(g.abs() < 0.01, "{g}");
        // Real growth of the same instances shows.
        let mut grown = samples.clone();
        grown[3] = at(
            420.0,
            &[("bench-0", 33.0), ("bench-1", 33.0), ("bench-3", 1.7)],
        );
        let g = rss_growth(&grown, 420.0);
        assert!((g - 10.0).abs() < 0.01, "{g}");
        // Every instance replaced since the previous sample: that step has no figure, the
        // steps before it count.
        grown[3] = at(420.0, &[("bench-4", 1.7), ("bench-5", 1.8)]);
        assert_eq!(rss_growth(&grown, 420.0), 0.0);
        grown[2] = at(
            360.0,
            &[("bench-0", 31.5), ("bench-1", 31.5), ("bench-2", 31.5)],
        );
        let g = rss_growth(&grown, 420.0);
        assert!((g - 5.0).abs() < 0.01, "{g}");
    }

    #[test]
    fn a_replacement_counts_only_after_its_first_five_minutes() {
        // bench-2 is replaced by bench-3 at 360 s; bench-3 grows from 20 to 30 MiB over its
        // first minutes, then stays flat, as do the others.
        let mut samples = vec![at(0.0, &[("bench-0", 30.0), ("bench-2", 30.0)])];
        let warming = [20.0, 24.0, 27.0, 29.0, 30.0, 30.0, 30.0, 30.0, 30.0];
        for (k, v) in warming.iter().enumerate() {
            let t = 360.0 + 60.0 * k as f64;
            samples.push(at(t, &[("bench-0", 30.0), ("bench-3", *v)]));
        }
        let total = samples.last().map_or(0.0, |s| s.at_s);
        let g = rss_growth(&samples, total);
        assert!(g.abs() < 0.01, "a replacement warming up is no growth: {g}");
        // Growth after its warm-up counts.
        samples.push(at(total + 60.0, &[("bench-0", 30.0), ("bench-3", 36.0)]));
        let g = rss_growth(&samples, total + 60.0);
        assert!((g - 10.0).abs() < 0.01, "{g}");
    }
}
