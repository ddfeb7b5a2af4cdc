//! `pgcrew bench pgbouncer`: `pgcrew bench queue` directly on PostgreSQL and through a
//! PgBouncer (transaction mode, unnamed statements, LISTEN direct) in front of the same server,
//! alternating, plus the direct cost of unnamed statements against the default cached ones.

use std::process::ExitCode;

use clap::Args;
use pgcrew::Result;
use pgcrew::db::pgbouncer::PoolMode;
use pgcrew::db::{StatementMode, TempPgBouncer};
use serde::Serialize;

use crate::bench::queue::{QueueBenchArgs, Target, bench_on};

/// Arguments of `pgcrew bench pgbouncer`.
#[derive(Debug, Args)]
pub struct PgBouncerBenchArgs {
    /// The queue benchmark's settings. Its `--rounds` counts the rounds here: each runs direct
    /// (cached), direct (unnamed) and through PgBouncer once, one `bench queue` round each.
    #[command(flatten)]
    pub queue: QueueBenchArgs,
}

/// Rates of one configuration over the rounds.
#[derive(Debug, Default, Serialize)]
struct Rates {
    enqueue_per_sec: Vec<f64>,
    processed_per_sec: Vec<f64>,
    /// Wake-up latency p50 of each round (idle pool, enqueue call to handler start), ms.
    wakeup_p50_ms: Vec<f64>,
    /// The instance process's resident memory over this configuration's rounds.
    memory: crate::bench::Memory,
}

impl Rates {
    fn median(v: &[f64]) -> f64 {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    }
}

/// The figures printed.
#[derive(Debug, Serialize)]
struct Report {
    pgbouncer_version: String,
    rounds: usize,
    tasks: usize,
    direct_cached: Rates,
    direct_unnamed: Rates,
    pgbouncer_unnamed: Rates,
    /// Median processed/s through PgBouncer over median direct (cached, the default).
    pgbouncer_over_direct_processed: f64,
    /// The same for bulk enqueue.
    pgbouncer_over_direct_enqueue: f64,
    /// Median processed/s direct with unnamed statements over cached.
    unnamed_over_cached_processed: f64,
    /// The same for bulk enqueue.
    unnamed_over_cached_enqueue: f64,
}

/// Run the benchmark.
pub async fn run(dsn: Option<String>, args: PgBouncerBenchArgs) -> Result<ExitCode> {
    crate::bench::queue::check_args(&args.queue)?;
    let exe = TempPgBouncer::binary().ok_or_else(|| {
        pgcrew::Error::Config("pgbouncer is not installed (apt-get install pgbouncer)".into())
    })?;
    let version = std::process::Command::new(&exe)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_default();
    // One server for every round: the given one, or a throwaway cluster.
    let (admin, _cluster) = super::throwaway_unless(dsn).await?;
    let upstream = admin.clone();
    let bouncer =
        tokio::task::spawn_blocking(move || TempPgBouncer::start(&upstream, PoolMode::Transaction))
            .await
            .map_err(|e| pgcrew::Error::Config(e.to_string()))??;
    eprintln!(
        "{version} in transaction mode on 127.0.0.1:{}",
        bouncer.port()
    );
    let mut direct_cached = Rates::default();
    let mut direct_unnamed = Rates::default();
    let mut through = Rates::default();
    for round in 1..=args.queue.rounds {
        for (label, mode, via_bouncer, rates) in [
            (
                "direct, cached",
                StatementMode::Cached,
                false,
                &mut direct_cached,
            ),
            (
                "direct, unnamed",
                StatementMode::Unnamed,
                false,
                &mut direct_unnamed,
            ),
            (
                "pgbouncer, unnamed",
                StatementMode::Unnamed,
                true,
                &mut through,
            ),
        ] {
            eprintln!("round {round}/{}: {label}", args.queue.rounds);
            let report = crate::bench::in_scratch(Some(admin.clone()), async |direct| {
                let db_name = pgcrew::db::parse_dsn(direct)?
                    .get_dbname()
                    .unwrap_or("postgres")
                    .to_string();
                let pooled = bouncer.dsn_for(&db_name);
                bench_on(
                    Target {
                        pool_dsn: if via_bouncer { &pooled } else { direct },
                        direct_dsn: direct,
                        statements: mode,
                        raw_floor: false,
                    },
                    &args.queue,
                )
                .await
            })
            .await?;
            rates.enqueue_per_sec.push(report.enqueue_per_sec);
            rates.processed_per_sec.push(report.processed_per_sec);
            rates.wakeup_p50_ms.push(report.wakeup_p50_ms);
            rates.memory.merge(&report.memory);
        }
    }
    let m = Rates::median;
    let report = Report {
        pgbouncer_version: version,
        rounds: args.queue.rounds,
        tasks: args.queue.tasks,
        pgbouncer_over_direct_processed: m(&through.processed_per_sec)
            / m(&direct_cached.processed_per_sec),
        pgbouncer_over_direct_enqueue: m(&through.enqueue_per_sec)
            / m(&direct_cached.enqueue_per_sec),
        unnamed_over_cached_processed: m(&direct_unnamed.processed_per_sec)
            / m(&direct_cached.processed_per_sec),
        unnamed_over_cached_enqueue: m(&direct_unnamed.enqueue_per_sec)
            / m(&direct_cached.enqueue_per_sec),
        direct_cached,
        direct_unnamed,
        pgbouncer_unnamed: through,
    };
    super::print_report(args.queue.json, &report, |report| {
        println!(
            "pgcrew bench pgbouncer: {} rounds of `bench queue` ({} tasks) alternating; {}",
            report.rounds, report.tasks, report.pgbouncer_version
        );
        for (label, r) in [
            ("direct, cached statements (default)", &report.direct_cached),
            ("direct, unnamed statements", &report.direct_unnamed),
            ("through PgBouncer, unnamed", &report.pgbouncer_unnamed),
        ] {
            println!(
                "  {label:<38} processed {:>8.0} tasks/s  enqueue {:>8.0} tasks/s  wake-up p50 {:.3} ms  (medians)",
                m(&r.processed_per_sec),
                m(&r.enqueue_per_sec),
                m(&r.wakeup_p50_ms)
            );
            println!("    {}", r.memory.line());
        }
        println!(
            "  PgBouncer / direct: processed {:.2}x, enqueue {:.2}x",
            report.pgbouncer_over_direct_processed, report.pgbouncer_over_direct_enqueue
        );
        println!(
            "  unnamed / cached (direct): processed {:.2}x, enqueue {:.2}x",
            report.unnamed_over_cached_processed, report.unnamed_over_cached_enqueue
        );
        Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}
