//! `pgcrew bench budget`: the queue benchmark (`bench queue`) with the default connections
//! (a pool of 8 plus the coordination connection) and with a small connection budget
//! (`--max-connections`, default 4, LISTEN included), alternating, each run in its own scratch
//! database; prints the medians of both and their ratio.

use std::process::ExitCode;

use clap::Args;
use pgcrew::Result;
use serde::Serialize;

use crate::bench::queue::{QueueBenchArgs, bench, check_args};

/// Arguments of `pgcrew bench budget`.
#[derive(Debug, Args)]
pub struct BudgetBenchArgs {
    /// The budget compared with the defaults (connections per instance, LISTEN included).
    #[arg(long, default_value_t = 4)]
    pub max_connections: usize,
    /// Runs of each configuration (alternating: default, budget, default, ...).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Tasks per run.
    #[arg(long, default_value_t = 20_000)]
    pub tasks: usize,
    /// Handlers running at once per instance.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Wake-up latency samples per phase and run.
    #[arg(long, default_value_t = 300)]
    pub wakeups: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Medians of one configuration's runs.
#[derive(Debug, Serialize)]
struct Side {
    connections_per_instance: usize,
    processed_per_sec: Vec<f64>,
    processed_per_sec_median: f64,
    wakeup_p50_ms_median: f64,
    /// The instance process's resident memory over this side's rounds.
    memory: crate::bench::Memory,
    wakeup_p99_ms_median: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    rounds: usize,
    tasks: usize,
    concurrency: usize,
    defaults: Side,
    budget: Side,
    /// Budget throughput over default throughput (medians).
    throughput_ratio: f64,
    /// Budget wake-up p50 over default wake-up p50 (medians; lower is better).
    wakeup_p50_ratio: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    crate::bench::percentile_ms(&v, 0.5)
}

fn side(runs: &[crate::bench::queue::Report]) -> Side {
    let per_sec: Vec<f64> = runs.iter().map(|r| r.processed_per_sec).collect();
    Side {
        connections_per_instance: runs.first().map_or(0, |r| r.connections_per_instance),
        processed_per_sec_median: median(per_sec.clone()),
        processed_per_sec: per_sec,
        wakeup_p50_ms_median: median(runs.iter().map(|r| r.wakeup_p50_ms).collect()),
        wakeup_p99_ms_median: median(runs.iter().map(|r| r.wakeup_p99_ms).collect()),
        memory: runs
            .iter()
            .fold(crate::bench::Memory::default(), |mut m, r| {
                m.merge(&r.memory);
                m
            }),
    }
}

/// Run the comparison.
pub async fn run(dsn: Option<String>, args: BudgetBenchArgs) -> Result<ExitCode> {
    crate::bench::at_least_one(&[("--rounds", args.rounds as u64)])?;
    let queue_args = |max_connections| QueueBenchArgs {
        tasks: args.tasks,
        concurrency: args.concurrency,
        wakeups: args.wakeups,
        max_connections,
        ..QueueBenchArgs::default()
    };
    let budget_args = queue_args(Some(args.max_connections));
    check_args(&budget_args)?;
    // Refuse a bad budget before any scratch database is made.
    pgcrew::ClientConfig::builder()
        .max_connections(args.max_connections)
        .build()?;
    let default_args = queue_args(None);
    let mut defaults = Vec::new();
    let mut budget = Vec::new();
    for round in 0..args.rounds {
        for (name, a, out) in [
            ("defaults", &default_args, &mut defaults),
            ("budget", &budget_args, &mut budget),
        ] {
            eprintln!("round {}/{}: {name}", round + 1, args.rounds);
            let r = crate::bench::in_scratch(dsn.clone(), async |d| bench(d, a).await).await?;
            eprintln!(
                "  {:.0} tasks/s, wake-up p50 {:.3} ms",
                r.processed_per_sec, r.wakeup_p50_ms
            );
            out.push(r);
        }
    }
    let defaults = side(&defaults);
    let budget = side(&budget);
    let report = Report {
        rounds: args.rounds,
        tasks: args.tasks,
        concurrency: args.concurrency,
        throughput_ratio: budget.processed_per_sec_median / defaults.processed_per_sec_median,
        wakeup_p50_ratio: budget.wakeup_p50_ms_median / defaults.wakeup_p50_ms_median,
        defaults,
        budget,
    };
    super::print_report(args.json, &report, |report| {
        println!(
            "pgcrew bench budget: queue benchmark, {} no-op tasks, concurrency {}, {} rounds (medians)",
            report.tasks, report.concurrency, report.rounds
        );
        for (name, s) in [("defaults", &report.defaults), ("budget", &report.budget)] {
            println!(
                "  {name:<8} {:>2} connections/instance: {:>8.0} tasks/s, wake-up p50 {:.3} ms, p99 {:.3} ms",
                s.connections_per_instance,
                s.processed_per_sec_median,
                s.wakeup_p50_ms_median,
                s.wakeup_p99_ms_median
            );
            println!("           {}", s.memory.line());
        }
        println!(
            "  ratio budget/defaults: throughput {:.3}, wake-up p50 {:.3}",
            report.throughput_ratio, report.wakeup_p50_ratio
        );
        Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}
