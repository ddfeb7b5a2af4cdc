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
    /// Limit the tasks of a queue running at once per key (the value of a payload field), or
    /// `--clear` the limit; without flags, list the key limits.
    KeyLimit(KeyLimitArgs),
    /// Limit claims per second (or minute) of a queue, a kind or a tenant, or `--clear` the
    /// limit; without a rate, list the rate limits.
    RateLimit(RateLimitArgs),
    /// Set (or `--clear`) the backpressure threshold of a queue (or of a tenant in it):
    /// producers that ask for backpressure are refused once this many tasks are available.
    Backpressure(BackpressureArgs),
}

/// Flags of `pgcrew queues backpressure`.
#[derive(Debug, Args)]
pub struct BackpressureArgs {
    /// The queue.
    pub queue: String,
    /// Only this tenant's tasks in the queue.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Available tasks at which producers are held (at least 1).
    #[arg(long, required_unless_present = "clear", conflicts_with = "clear")]
    pub max_available: Option<i64>,
    /// Remove the threshold.
    #[arg(long)]
    pub clear: bool,
}

/// Flags of `pgcrew queues rate-limit`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("scope").args(["queue", "kind", "tenant"])))]
pub struct RateLimitArgs {
    /// Limit claims from this queue.
    #[arg(long)]
    pub queue: Option<String>,
    /// Limit claims of this task kind (in any queue).
    #[arg(long)]
    pub kind: Option<String>,
    /// Limit claims of this tenant's tasks (in any queue).
    #[arg(long)]
    pub tenant: Option<String>,
    /// Claims per second.
    #[arg(long, requires = "scope", conflicts_with_all = ["per_minute", "clear"])]
    pub per_second: Option<f64>,
    /// Claims per minute.
    #[arg(long, requires = "scope", conflicts_with = "clear")]
    pub per_minute: Option<f64>,
    /// Most claims at once after a quiet period (default: one second's worth).
    #[arg(long)]
    pub burst: Option<i32>,
    /// Remove the limit.
    #[arg(long, requires = "scope")]
    pub clear: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `pgcrew queues key-limit`.
#[derive(Debug, Args)]
pub struct KeyLimitArgs {
    /// The queue (omit to list every key limit).
    pub queue: Option<String>,
    /// The payload field whose value is the key (e.g. `customer`).
    #[arg(long, requires = "queue", requires = "max", conflicts_with = "clear")]
    pub field: Option<String>,
    /// Tasks allowed to run at once per key (at least 1).
    #[arg(long, requires = "field")]
    pub max: Option<i32>,
    /// Remove the queue's key limit.
    #[arg(long, requires = "queue")]
    pub clear: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
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
        QueuesCmd::KeyLimit(a) => key_limit(dsn, a).await,
        QueuesCmd::RateLimit(a) => rate_limit(dsn, a).await,
        QueuesCmd::Backpressure(a) => backpressure(dsn, a).await,
    }
}

async fn key_limit(dsn: Option<String>, a: KeyLimitArgs) -> Result<ExitCode> {
    if let (Some(q), Some(field), Some(max)) = (&a.queue, &a.field, a.max) {
        // Refuse bad input before connecting.
        if max < 1 {
            return Err(pgcrew::Error::invalid(
                "max_running",
                format!("is {max}; at least 1 task per key must be allowed to run"),
            ));
        }
        let db = connect(dsn).await?;
        queue::set_key_limit(&db, q, field, max).await?;
        println!("queue {q}: at most {max} running per {field}");
        return Ok(ExitCode::SUCCESS);
    }
    let db = connect(dsn).await?;
    if let (Some(q), true) = (&a.queue, a.clear) {
        let removed = queue::clear_key_limit(&db, q).await?;
        println!(
            "queue {q}: {}",
            if removed {
                "key limit removed"
            } else {
                "had no key limit"
            }
        );
        return Ok(ExitCode::SUCCESS);
    }
    let rows = queue::key_limits(&db).await?;
    let rows: Vec<_> = rows
        .into_iter()
        .filter(|r| a.queue.as_ref().is_none_or(|q| *q == r.queue))
        .collect();
    print_rows(
        a.json,
        &rows,
        Some("no key limits"),
        &["QUEUE", "KEY FIELD", "MAX RUNNING"],
        |r| {
            vec![
                r.queue.clone(),
                r.key_field.clone(),
                r.max_running.to_string(),
            ]
        },
    )?;
    Ok(ExitCode::SUCCESS)
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

async fn rate_limit(dsn: Option<String>, a: RateLimitArgs) -> Result<ExitCode> {
    let scope = match (&a.queue, &a.kind, &a.tenant) {
        (Some(q), _, _) => Some((queue::RateScope::Queue, q.clone())),
        (_, Some(k), _) => Some((queue::RateScope::Kind, k.clone())),
        (_, _, Some(t)) => Some((queue::RateScope::Tenant, t.clone())),
        _ => None,
    };
    let rate = match (a.per_second, a.per_minute) {
        (Some(n), _) => Some(queue::Rate::per_second(n)),
        (_, Some(n)) => Some(queue::Rate::per_minute(n)),
        _ => None,
    }
    .map(|r| match a.burst {
        Some(b) => r.burst(b),
        None => r,
    });
    let db = connect(dsn).await?;
    match (scope, rate, a.clear) {
        (Some((scope, name)), Some(rate), _) => {
            queue::set_rate_limit(&db, scope, &name, rate).await?;
            println!(
                "{scope} {name}: at most {} claims a second",
                rate.per_second
            );
        }
        (Some((scope, name)), None, true) => {
            let removed = queue::clear_rate_limit(&db, scope, &name).await?;
            println!(
                "{scope} {name}: {}",
                if removed {
                    "rate limit removed"
                } else {
                    "had no rate limit"
                }
            );
        }
        _ => {
            let rows = queue::rate_limits(&db).await?;
            let headers = ["SCOPE", "NAME", "PER SECOND", "BURST", "TOKENS"];
            print_rows(a.json, &rows, Some("no rate limits"), &headers, |r| {
                vec![
                    r.scope.clone(),
                    r.name.clone(),
                    r.per_second.to_string(),
                    r.burst.to_string(),
                    format!("{:.1}", r.tokens),
                ]
            })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn backpressure(dsn: Option<String>, a: BackpressureArgs) -> Result<ExitCode> {
    let tenant = a.tenant.map(TenantId::new).transpose()?;
    if let Some(max) = a.max_available.filter(|m| *m < 1) {
        return Err(pgcrew::Error::invalid(
            "max_available",
            format!("is {max}; the threshold must be at least 1"),
        ));
    }
    let db = connect(dsn).await?;
    match a.max_available {
        Some(max) => {
            queue::set_backpressure(&db, &a.queue, tenant.as_ref(), max).await?;
            println!("queue {}: producers held at {max} available tasks", a.queue);
        }
        None => {
            let removed = queue::clear_backpressure(&db, &a.queue, tenant.as_ref()).await?;
            println!(
                "queue {}: {}",
                a.queue,
                if removed {
                    "backpressure removed"
                } else {
                    "had no backpressure threshold"
                }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
