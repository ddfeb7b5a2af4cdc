//! `pgcrew run ...` (being built: see the open issue for this command group).

use std::process::ExitCode;

use clap::Subcommand;
use pgcrew::{Error, Result};

/// `pgcrew run` subcommands.
#[derive(Debug, Subcommand)]
pub enum RunCmd {}

/// Execute a `pgcrew run` subcommand.
pub async fn exec(_dsn: Option<String>, cmd: RunCmd) -> Result<ExitCode> {
    match cmd {}
    #[allow(unreachable_code)]
    Err(Error::Config("unreachable".into()))
}
