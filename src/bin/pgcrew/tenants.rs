//! `pgcrew tenants ...` (being built: see the open issue for this command group).

use std::process::ExitCode;

use clap::Subcommand;
use pgcrew::{Error, Result};

/// `pgcrew tenants` subcommands.
#[derive(Debug, Subcommand)]
pub enum TenantsCmd {}

/// Execute a `pgcrew tenants` subcommand.
pub async fn exec(_dsn: Option<String>, cmd: TenantsCmd) -> Result<ExitCode> {
    match cmd {}
    #[allow(unreachable_code)]
    Err(Error::Config("unreachable".into()))
}
