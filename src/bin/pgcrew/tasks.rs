//! `pgcrew tasks ...` (being built: see the open issue for this command group).

use std::process::ExitCode;

use clap::Subcommand;
use pgcrew::{Error, Result};

/// `pgcrew tasks` subcommands.
#[derive(Debug, Subcommand)]
pub enum TasksCmd {}

/// Execute a `pgcrew tasks` subcommand.
pub async fn exec(_dsn: Option<String>, cmd: TasksCmd) -> Result<ExitCode> {
    match cmd {}
    #[allow(unreachable_code)]
    Err(Error::Config("unreachable".into()))
}
