//! `pgcrew queues pause|resume|list`.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use pgcrew::queue;
use pgcrew::{Result, TenantId};

use crate::output::{JsonFlag, connect, print_json, print_rows};

/// `pgcrew queues` subcommands.
#[derive(Debug, Subcommand)]
pub enum QueuesCmd {
    /// Pause a queue (for every tenant, or `--tenant`): claims stop at once on every instance;
    /// running tasks finish.
    Pause(PauseArgs),
    /// Resume a queue (for every tenant, or `--tenant`) and wake its worker pools.
    Resume(PauseArgs),
    /// Every queue with waiting or running tasks or a pause: depth and pause state.
    List(JsonFlag),
}

/// Flags of `pgcrew queues pause|resume`.
#[derive(Debug, Args)]
pub struct PauseArgs {
    /// The queue.
    pub queue: String,
    /// Only this tenant's tasks in the queue.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Run a `pgcrew queues` subcommand.
pub async fn exec(dsn: Option<String>, cmd: QueuesCmd) -> Result<ExitCode> {
    match cmd {
        QueuesCmd::Pause(a) => pause(dsn, a, true).await,
        QueuesCmd::Resume(a) => pause(dsn, a, false).await,
        QueuesCmd::List(f) => list(dsn, f.json).await,
    }
}

async fn pause(dsn: Option<String>, a: PauseArgs, on: bool) -> Result<ExitCode> {
    let tenant = a.tenant.map(TenantId::new).transpose()?;
    let db = connect(dsn).await?;
    let changed = if on {
        queue::pause(&db, &a.queue, tenant.as_ref()).await?
    } else {
        queue::resume(&db, &a.queue, tenant.as_ref()).await?
    };
    let scope = match &tenant {
        Some(t) => format!("queue {} for tenant {t}", a.queue),
        None => format!("queue {}", a.queue),
    };
    if a.json {
        print_json(&serde_json::json!({
            "queue": a.queue, "tenant": tenant, "paused": on, "changed": changed
        }))?;
    } else {
        let what = match (on, changed) {
            (true, true) => "paused",
            (true, false) => "was paused already",
            (false, true) => "resumed",
            (false, false) => "was not paused",
        };
        println!("{scope} {what}");
    }
    Ok(ExitCode::SUCCESS)
}

async fn list(dsn: Option<String>, json: bool) -> Result<ExitCode> {
    let db = connect(dsn).await?;
    let rows = queue::queues(&db).await?;
    let headers = [
        "QUEUE",
        "AVAILABLE",
        "SCHEDULED",
        "RUNNING",
        "OLDEST AVAILABLE",
        "PAUSED",
    ];
    print_rows(json, &rows, Some("no queues"), &headers, |r| {
        let paused = match (r.paused, r.paused_tenants.is_empty()) {
            (true, _) => "yes".to_string(),
            (false, true) => "no".to_string(),
            (false, false) => format!("tenants: {}", r.paused_tenants.join(",")),
        };
        vec![
            r.queue.clone(),
            r.available.to_string(),
            r.scheduled.to_string(),
            r.running.to_string(),
            r.oldest_available_age_s
                .map(|s| format!("{s:.3}s"))
                .unwrap_or_default(),
            paused,
        ]
    })?;
    Ok(ExitCode::SUCCESS)
}
