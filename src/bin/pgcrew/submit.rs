//! `pgcrew run submit`: submit an agent run through `pgcrew.submit_run` (the same function any
//! language calls) and, with `--wait`, wait for it through `pgcrew_run_state_changed`.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use pgcrew::client::{submit_run, wait_for_run};
use pgcrew::coord::notify::{Notifier, NotifierConfig};
use pgcrew::runs::RunState;
use pgcrew::{Db, Result, TenantId};
use serde_json::json;

use crate::output::duration_arg;

/// Flags of `pgcrew run submit`.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The agent (registered by an instance hosting it).
    #[arg(long)]
    pub agent: String,
    /// The tenant the run is for.
    #[arg(long)]
    pub tenant: TenantId,
    /// The session identifier (created when missing); without it the run has no session.
    #[arg(long)]
    pub session: Option<String>,
    /// The user's message.
    #[arg(long)]
    pub prompt: String,
    /// Wait until the run finishes: exit 0 when it completed, 1 when it failed or was cancelled.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up after this long (exit 2).
    #[arg(long, value_parser = duration_arg, default_value = "10m", requires = "wait")]
    pub timeout: Duration,
}

/// `pgcrew run submit`: prints the run id; with `--wait` then a line with the final state and
/// the response (or the error).
pub async fn exec(db: &Db, args: SubmitArgs) -> Result<ExitCode> {
    // Listening before the submit commits, so the run's last change cannot be missed.
    let notifier = Notifier::new(256);
    let listener = args.wait.then(|| {
        notifier.spawn_listener(NotifierConfig {
            pg_config: db.config().clone(),
            poll_only: false,
            poll_interval: Duration::from_secs(1),
            instance: None,
        })
    });
    if listener.is_some() {
        notifier.wait_connected(Duration::from_secs(5)).await;
    }
    let input = json!({ "prompt": args.prompt });
    let run = submit_run(
        db,
        &args.agent,
        &args.tenant,
        args.session.as_deref(),
        &input,
    )
    .await?;
    println!("{run}");
    let Some(listener) = listener else {
        return Ok(ExitCode::SUCCESS);
    };
    let waited = wait_for_run(db, &notifier, run, args.timeout, Duration::from_secs(1)).await;
    listener.stop().await;
    let r = waited?;
    let detail = match r.state {
        RunState::Completed => r.response_text.unwrap_or_default(),
        RunState::Cancelled => r.cancel_reason.unwrap_or_default(),
        _ => format!(
            "{}{}",
            r.error_type.map(|t| format!("{t}: ")).unwrap_or_default(),
            r.error_message.unwrap_or_default()
        ),
    };
    println!("{}\t{}", r.state, detail.replace('\n', " "));
    Ok(if r.state == RunState::Completed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
