//! `pgcrew bench [queue|ledger|fanout]`: benchmarks that run in their own scratch database.

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
    Queue(crate::bench_queue::QueueBenchArgs),
    /// Ledger: sequenced hash-chained appends, batch appends, verification.
    Ledger(crate::bench_ledger::LedgerBenchArgs),
    /// LISTEN/NOTIFY fan-out to many subscribers.
    Fanout(crate::bench_fanout::FanoutBenchArgs),
}

/// Run the chosen benchmark.
pub async fn exec(dsn: Option<String>, args: BenchArgs) -> Result<ExitCode> {
    match args.which {
        None => crate::bench_queue::run(dsn, crate::bench_queue::QueueBenchArgs::default()).await,
        Some(BenchKind::Queue(a)) => crate::bench_queue::run(dsn, a).await,
        Some(BenchKind::Ledger(a)) => crate::bench_ledger::run(dsn, a).await,
        Some(BenchKind::Fanout(a)) => crate::bench_fanout::run(dsn, a).await,
    }
}
