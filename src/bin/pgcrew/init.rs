//! `pgcrew init DIR`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use pgcrew::Result;

/// Flags of `pgcrew init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// The directory to create (must not exist or be empty).
    pub dir: PathBuf,
}

/// `pgcrew init`.
pub fn exec(_args: InitArgs) -> Result<ExitCode> {
    Err(pgcrew::Error::invalid("init", "not implemented yet"))
}
