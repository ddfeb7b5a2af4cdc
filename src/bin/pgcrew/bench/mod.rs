//! `pgcrew bench [queue|agents|ledger|fanout|failover|scale|rls|tls|budget|pgbouncer|waits|ui]`: benchmarks that run in their own scratch database.

pub mod agents;
pub mod budget;
pub(crate) mod cpu;
pub mod failover;
pub mod fanout;
pub mod ledger;
pub mod observability;
pub mod pgbouncer;
pub mod queue;
pub mod rls;
pub mod scale;
pub mod scale_out;
pub mod soak;
pub mod tls;
pub mod ui;
pub mod waits;
pub(crate) mod wake_floor;
pub mod wire;

use std::process::ExitCode;

use clap::{Args, Subcommand};
use pgcrew::Result;

/// Arguments of `pgcrew bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Which benchmark (default: queue).
    #[command(subcommand)]
    pub which: Option<BenchKind>,
}

/// The benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchKind {
    /// Task queue: bulk enqueue, processing throughput, wake-up latency.
    Queue(queue::QueueBenchArgs),
    /// Agent runs with the scripted model: runs/s, database round trips and statements per
    /// run, and the bound that limits them, at 1 and 4 in-process instances.
    Agents(agents::AgentsBenchArgs),
    /// Ledger: sequenced hash-chained appends, batch appends, verification.
    Ledger(ledger::LedgerBenchArgs),
    /// LISTEN/NOTIFY fan-out to many subscribers.
    Fanout(fanout::FanoutBenchArgs),
    /// Leader failover time with real processes (kill -9 and graceful stop).
    Failover(failover::FailoverBenchArgs),
    /// Claim latency as the tasks table grows to millions of rows; fairness behind a
    /// million-task backlog of one tenant.
    Scale(scale::ScaleBenchArgs),
    /// Reads by a tenant role under row-level security against the owner's, on a million
    /// ledger events.
    Rls(rls::RlsBenchArgs),
    /// The queue benchmark without TLS and with TLS (`verify-full`) against the same server,
    /// alternating, and the ratio.
    Tls(tls::TlsBenchArgs),
    /// The queue benchmark with the default connections and with a 4-connection budget per
    /// instance, alternating; prints both and the ratio.
    Budget(budget::BudgetBenchArgs),
    /// `bench queue` directly and through PgBouncer (transaction mode) in front of the same
    /// server, alternating; plus unnamed against cached statements directly.
    Pgbouncer(pgbouncer::PgBouncerBenchArgs),
    /// Many runs parked at a durable wait on one instance: the connections they hold, then the
    /// rate at which they complete once signalled.
    Waits(waits::WaitsBenchArgs),
    /// The operations console on a large database: every page's response time, and 100 SSE
    /// streams (connections added, NOTIFY-to-browser latency).
    Ui(ui::UiBenchArgs),
    /// The queue benchmark with metrics and tracing off and on (spans exported to a local
    /// OTLP receiver), alternating, and the time of a `/metrics` scrape with many queues and
    /// tenants.
    Observability(observability::ObservabilityBenchArgs),
    /// N `pgcrew serve` processes on one database for each N: total tasks/s, wake-up, claim,
    /// coordination statements, connections, leader failover.
    ScaleOut(scale_out::ScaleOutBenchArgs),
    /// Mixed load with leader kills and retention over time: throughput, RSS, table sizes,
    /// dead tuples; ends verifying every ledger and that no task was lost.
    Soak(soak::SoakBenchArgs),
}

impl BenchArgs {
    /// Whether the benchmark installs its own `tracing` subscriber (main then installs none).
    pub fn installs_tracing(&self) -> bool {
        matches!(self.which, Some(BenchKind::Observability(_)))
    }
}

/// Run the chosen benchmark.
pub async fn exec(dsn: Option<String>, args: BenchArgs) -> Result<ExitCode> {
    match args.which {
        None => queue::run(dsn, queue::QueueBenchArgs::default()).await,
        Some(BenchKind::Queue(a)) => queue::run(dsn, a).await,
        Some(BenchKind::Agents(a)) => agents::run(dsn, a).await,
        Some(BenchKind::Ledger(a)) => ledger::run(dsn, a).await,
        Some(BenchKind::Fanout(a)) => fanout::run(dsn, a).await,
        Some(BenchKind::Failover(a)) => failover::run(dsn, a).await,
        Some(BenchKind::Scale(a)) => scale::run(dsn, a).await,
        Some(BenchKind::Rls(a)) => rls::run(dsn, a).await,
        Some(BenchKind::Tls(a)) => tls::run(dsn, a).await,
        Some(BenchKind::Budget(a)) => budget::run(dsn, a).await,
        Some(BenchKind::Pgbouncer(a)) => pgbouncer::run(dsn, a).await,
        Some(BenchKind::Waits(a)) => waits::run(dsn, a).await,
        Some(BenchKind::Ui(a)) => ui::run(dsn, a).await,
        Some(BenchKind::Observability(a)) => observability::run(dsn, a).await,
        Some(BenchKind::ScaleOut(a)) => scale_out::run(dsn, a).await,
        Some(BenchKind::Soak(a)) => soak::run(dsn, a).await,
    }
}

/// A scratch database for a benchmark: on the given server (`CREATE DATABASE`, dropped
/// afterwards) or, without a DSN, on a throwaway local cluster. Never touches existing data.
pub struct BenchDb {
    /// DSN of the scratch database.
    pub dsn: String,
    _scratch: pgcrew::db::ScratchDatabase,
    _cluster: Option<pgcrew::db::TempCluster>,
}

/// Create the benchmark's scratch database (migrated), printing where it lives.
pub async fn scratch_db(dsn: Option<String>) -> Result<BenchDb> {
    let (admin, cluster) = throwaway_unless(dsn).await?;
    let scratch = pgcrew::db::ScratchDatabase::create(&admin, "pgcrew_bench").await?;
    let db = pgcrew::Db::connect(scratch.dsn(), 2, std::time::Duration::from_secs(10)).await?;
    db.migrate().await?;
    eprintln!("benchmark database: {}", scratch.name());
    Ok(BenchDb {
        dsn: scratch.dsn().to_string(),
        _scratch: scratch,
        _cluster: cluster,
    })
}

/// The benchmark's server: the DSN (when not blank), or a throwaway local cluster.
pub async fn throwaway_unless(
    dsn: Option<String>,
) -> Result<(String, Option<pgcrew::db::TempCluster>)> {
    crate::output::dsn_or_cluster(dsn.filter(|d| !d.trim().is_empty()), || {
        eprintln!("no DATABASE_URL/--dsn: starting a throwaway PostgreSQL cluster")
    })
    .await
}

/// Print a benchmark's report: pretty JSON with `--json`, else the text `text` prints.
pub fn print_report<R: serde::Serialize>(
    json: bool,
    report: &R,
    text: impl FnOnce(&R) -> Result<()>,
) -> Result<()> {
    if json {
        crate::output::print_json(report)
    } else {
        text(report)
    }
}

/// Run `f` on a scratch database ([`scratch_db`]), which is dropped afterwards whatever `f`
/// returned.
pub async fn in_scratch<T>(
    dsn: Option<String>,
    f: impl AsyncFnOnce(&str) -> Result<T>,
) -> Result<T> {
    let scratch = scratch_db(dsn).await?;
    let result = f(&scratch.dsn).await;
    drop(scratch);
    result
}

/// Refuse the flags among `flags` (`("--writers", value)`) that are zero, naming each of them.
pub fn at_least_one(flags: &[(&str, u64)]) -> Result<()> {
    let zero: Vec<&str> = flags
        .iter()
        .filter(|(_, v)| *v == 0)
        .map(|(f, _)| *f)
        .collect();
    if zero.is_empty() {
        return Ok(());
    }
    Err(pgcrew::Error::invalid(
        "arguments",
        format!("{} must be at least 1", zero.join(", ")),
    ))
}

/// The `q`-quantile (0..=1) of sorted samples: the sample nearest to rank `q x (n - 1)`.
fn quantile<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    let last = sorted.len().checked_sub(1)?;
    let idx = (last as f64 * q).round() as usize;
    Some(sorted[idx.min(last)])
}

/// The `q`-quantile (0..=1) of sorted samples in milliseconds (0 when there are none).
pub fn percentile_ms(sorted: &[f64], q: f64) -> f64 {
    quantile(sorted, q).unwrap_or(0.0)
}

/// The `p`-th percentile (0..=100) of sorted samples, in microseconds (NaN when there are none).
pub fn percentile_us(sorted: &[std::time::Duration], p: f64) -> f64 {
    quantile(sorted, p / 100.0).map_or(f64::NAN, |d| d.as_secs_f64() * 1e6)
}

/// Resident memory of this process (the benchmark runs its instances in-process), from
/// `/proc/self/status`: `VmRSS` now, its anonymous part `RssAnon` (heap and stacks; the rest is
/// mostly the binary's mapped pages) and `VmHWM` (the high-water mark since the process
/// started), in KiB. Zero where `/proc` is missing.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Rss {
    /// Resident set size now, KiB.
    pub rss_kib: u64,
    /// Anonymous resident memory now, KiB.
    pub anon_kib: u64,
    /// Peak resident set size of the process so far, KiB.
    pub hwm_kib: u64,
}

impl Rss {
    /// Read the figures of this process now.
    pub fn now() -> Rss {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        Rss {
            rss_kib: status_kib(&status, "VmRSS:").unwrap_or(0),
            anon_kib: status_kib(&status, "RssAnon:").unwrap_or(0),
            hwm_kib: status_kib(&status, "VmHWM:").unwrap_or(0),
        }
    }

    /// `VmRSS` of process `pid` in MiB (`None` when it is gone, or has no memory left to
    /// report: a killed process not yet reaped).
    pub fn of_process_mib(pid: u32) -> Option<f64> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status_kib(&status, "VmRSS:").map(|kib| kib as f64 / 1024.0)
    }

    /// `VmRSS` in MiB.
    pub fn mib(self) -> f64 {
        self.rss_kib as f64 / 1024.0
    }
}

/// A `/proc/<pid>/status` field in KiB (`name` with its colon, e.g. `VmRSS:`).
fn status_kib(status: &str, name: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The instance process's resident memory: idle (instances started, no work), the highest
/// sample under load, and idle again after the load.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Memory {
    /// `VmRSS` with the instance(s) started and idle, before the load, MiB.
    pub idle_mib: f64,
    /// The highest `VmRSS` sampled under load, MiB.
    pub load_mib: f64,
    /// `VmRSS` idle again after the load, MiB.
    pub after_mib: f64,
    /// `RssAnon` (heap and stacks) idle before the load, MiB.
    pub idle_anon_mib: f64,
    /// `RssAnon` idle after the load, MiB.
    pub after_anon_mib: f64,
}

impl Memory {
    /// Start with the idle figure read now.
    pub fn idle() -> Memory {
        let now = Rss::now();
        let m = now.mib();
        Memory {
            idle_mib: m,
            load_mib: m,
            after_mib: m,
            idle_anon_mib: now.anon_kib as f64 / 1024.0,
            after_anon_mib: now.anon_kib as f64 / 1024.0,
        }
    }

    /// Sample under load (keeps the highest).
    pub fn sample(&mut self) {
        self.load_mib = self.load_mib.max(Rss::now().mib());
    }

    /// The idle figure after the load.
    pub fn finish(&mut self) {
        self.sample();
        let now = Rss::now();
        self.after_mib = now.mib();
        self.after_anon_mib = now.anon_kib as f64 / 1024.0;
    }

    /// Fold another run's figures in: the first idle figure, the highest load, the last after.
    pub fn merge(&mut self, other: &Memory) {
        if self.idle_mib == 0.0 {
            self.idle_mib = other.idle_mib;
            self.idle_anon_mib = other.idle_anon_mib;
        }
        self.load_mib = self.load_mib.max(other.load_mib);
        self.after_mib = other.after_mib;
        self.after_anon_mib = other.after_anon_mib;
    }

    /// One line of text.
    pub fn line(&self) -> String {
        format!(
            "instance process RSS: idle {:.1} MiB (anonymous {:.1}), under load {:.1} MiB (highest sample), idle after {:.1} MiB (anonymous {:.1})",
            self.idle_mib, self.idle_anon_mib, self.load_mib, self.after_mib, self.after_anon_mib
        )
    }
}

/// The program `pgcrew serve` children are started from: this process's own executable,
/// through `/proc/self/exe`, which names the running file even after it was replaced or deleted
/// (a `cargo build` during a 30-minute soak used to make every later `kill -9` replacement fail
/// to start, `current_exe()` then naming a deleted path).
pub fn own_exe() -> &'static std::path::Path {
    std::path::Path::new("/proc/self/exe")
}

/// Median of the samples (0 when there are none).
pub fn median(samples: &[f64]) -> f64 {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Spread of the samples: (max - min) / median (0 when there are none).
pub fn spread(samples: &[f64]) -> f64 {
    let m = median(samples);
    let (lo, hi) = samples
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        });
    if m > 0.0 && lo.is_finite() {
        (hi - lo) / m
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::own_exe;

    const CHILD: &str = "PGCREW_OWN_EXE_CHILD";
    const NAME: &str = "bench::tests::own_exe_starts_this_program_after_its_file_is_gone";

    /// A copy of this test binary deletes its own file (as a rebuild replaces it), then starts
    /// itself again: through `own_exe()` it starts, through `current_exe()` it does not.
    #[test]
    fn own_exe_starts_this_program_after_its_file_is_gone() {
        if std::env::var_os(CHILD).is_some() {
            let me = std::env::current_exe().unwrap();
            std::fs::remove_file(&me).unwrap();
            let old = std::env::current_exe().unwrap();
            assert!(
                Command::new(&old).arg("--list").output().is_err(),
                "{old:?} still starts"
            );
            let out = Command::new(own_exe()).arg("--list").output().unwrap();
            assert!(out.status.success(), "{out:?}");
            assert!(String::from_utf8_lossy(&out.stdout).contains(NAME));
            return;
        }
        // Beside this binary (a directory it may run from), not in a temporary directory that
        // might be mounted without exec.
        let me = std::env::current_exe().unwrap();
        let dir = me.with_file_name(format!("own-exe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let copy = dir.join("copy");
        std::fs::copy(&me, &copy).unwrap();
        let out = Command::new(&copy)
            .env(CHILD, "1")
            .args([NAME, "--exact", "--nocapture"])
            .output()
            .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(out.status.success(), "{out:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("1 passed"),
            "{out:?}"
        );
    }
}
