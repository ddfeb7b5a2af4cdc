//! `pgcrew bench fanout` (being built by its issue).

use std::process::ExitCode;

use clap::Args;
use pgcrew::{Error, Result};

/// Arguments of `pgcrew bench fanout`.
#[derive(Debug, Args, Default)]
pub struct FanoutBenchArgs {}

/// Run the benchmark.
pub async fn run(_dsn: Option<String>, _args: FanoutBenchArgs) -> Result<ExitCode> {
    Err(Error::Config(
        "the fanout benchmark is not built yet".into(),
    ))
}
