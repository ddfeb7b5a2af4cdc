//! `pgcrew bench queue` (being built by its issue).

use std::process::ExitCode;

use clap::Args;
use pgcrew::{Error, Result};

/// Arguments of `pgcrew bench queue`.
#[derive(Debug, Args, Default)]
pub struct QueueBenchArgs {}

/// Run the benchmark.
pub async fn run(_dsn: Option<String>, _args: QueueBenchArgs) -> Result<ExitCode> {
    Err(Error::Config("the queue benchmark is not built yet".into()))
}
