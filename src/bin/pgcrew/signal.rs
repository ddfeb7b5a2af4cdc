//! `pgcrew run signal|approve|reject`: wake runs parked at durable waits.

use clap::Args;
use pgcrew::runs::{self, Decision};
use pgcrew::{Result, RunId};

/// Arguments of `pgcrew run signal`.
#[derive(Debug, Args)]
pub struct SignalArgs {
    /// The run id.
    pub run: RunId,
    /// The signal's name (what the run's wait waits for).
    pub name: String,
    /// The signal's payload, a JSON value (the wait returns it).
    #[arg(long)]
    pub payload: Option<String>,
}

/// Arguments of `pgcrew run approve` and `pgcrew run reject`.
#[derive(Debug, Args)]
pub struct DecideArgs {
    /// The run id.
    pub run: RunId,
    /// The tool call's step key (`iter-N/tool-CALL_ID`, shown by `pgcrew run tail` in the
    /// step's `wait_started` event).
    pub step: String,
    /// Who decides (default: the database user).
    #[arg(long)]
    pub by: Option<String>,
    /// Why.
    #[arg(long)]
    pub reason: Option<String>,
}

/// Parse the payload before connecting (bad JSON is a usage error).
pub fn parse_payload(payload: Option<&str>) -> Result<Option<serde_json::Value>> {
    payload
        .map(|p| {
            serde_json::from_str(p).map_err(|e| {
                pgcrew::Error::invalid("payload", format!("`--payload` is not JSON: {e}"))
            })
        })
        .transpose()
}

/// `pgcrew run signal RUN NAME [--payload JSON]`: prints `signal <id> sent to <run>`.
pub async fn signal(db: &pgcrew::Db, args: SignalArgs) -> Result<()> {
    let payload = parse_payload(args.payload.as_deref())?;
    let id = runs::signal_run(db, args.run, &args.name, payload.as_ref()).await?;
    println!("signal {id} `{}` sent to {}", args.name, args.run);
    Ok(())
}

/// `pgcrew run approve|reject RUN STEP [--by WHO] [--reason R]`: prints the decision.
pub async fn decide(db: &pgcrew::Db, args: DecideArgs, decision: Decision) -> Result<()> {
    let id = runs::decide_step(
        db,
        args.run,
        &args.step,
        decision,
        args.by.as_deref(),
        args.reason.as_deref(),
    )
    .await?;
    let word = match decision {
        Decision::Approved => "approved",
        Decision::Rejected => "rejected",
    };
    println!("{word} step {} of {} (signal {id})", args.step, args.run);
    Ok(())
}
