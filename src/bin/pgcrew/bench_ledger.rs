//! `pgcrew bench ledger` (being built by its issue).

use std::process::ExitCode;

use clap::Args;
use pgcrew::{Error, Result};

/// Arguments of `pgcrew bench ledger`.
#[derive(Debug, Args, Default)]
pub struct LedgerBenchArgs {}

/// Run the benchmark.
pub async fn run(_dsn: Option<String>, _args: LedgerBenchArgs) -> Result<ExitCode> {
    Err(Error::Config(
        "the ledger benchmark is not built yet".into(),
    ))
}
