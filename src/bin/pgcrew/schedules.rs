//! `pgcrew schedules set|list|enable|disable|delete|fire-now`.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use pgcrew::queue::Priority;
use pgcrew::schedule::{self, MisfirePolicy, NewSchedule, ScheduleSpec};
use pgcrew::{Error, Result, TenantId};

use crate::output::{JsonFlag, connect, duration_arg, print_json, print_rows};

/// `pgcrew schedules` subcommands.
#[derive(Debug, Subcommand)]
pub enum SchedulesCmd {
    /// Create or replace a schedule (`--cron` [with `--time-zone`] or `--every`).
    Set(Box<SetArgs>),
    /// List the schedules.
    List(JsonFlag),
    /// Enable a schedule (it fires from its next fire after now).
    Enable(NameArgs),
    /// Disable a schedule.
    Disable(NameArgs),
    /// Delete a schedule (the tasks it enqueued stay).
    Delete(NameArgs),
    /// Enqueue the schedule's task now, once (its timetable is unchanged).
    FireNow(NameArgs),
}

/// Flags of `pgcrew schedules set`.
#[derive(Debug, Args)]
pub struct SetArgs {
    /// The schedule's name.
    pub name: String,
    /// Cron expression: 5 fields, or 6 with seconds first (e.g. "*/10 * * * * *").
    #[arg(long, conflicts_with = "every", required_unless_present = "every")]
    pub cron: Option<String>,
    /// IANA time zone of the cron expression.
    #[arg(long, default_value = "UTC", requires = "cron")]
    pub time_zone: String,
    /// A fixed interval instead (e.g. 30s, 5min).
    #[arg(long, value_parser = duration_arg)]
    pub every: Option<Duration>,
    /// Task kind.
    #[arg(long)]
    pub kind: String,
    /// Task queue.
    #[arg(long, default_value = "default")]
    pub queue: String,
    /// Task tenant.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Task payload (JSON).
    #[arg(long, default_value = "{}")]
    pub payload: String,
    /// Task priority (critical, high, normal, low, batch).
    #[arg(long, default_value = "normal")]
    pub priority: String,
    /// Attempts per task.
    #[arg(long, default_value_t = 25)]
    pub max_attempts: i32,
    /// Fires missed for longer than the grace period: skip or catch_up_one.
    #[arg(long, default_value = "skip")]
    pub misfire: String,
    /// Store it disabled.
    #[arg(long)]
    pub disabled: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// A schedule name argument.
#[derive(Debug, Args)]
pub struct NameArgs {
    /// The schedule's name.
    pub name: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Run a `pgcrew schedules` subcommand.
pub async fn exec(dsn: Option<String>, cmd: SchedulesCmd) -> Result<ExitCode> {
    match cmd {
        SchedulesCmd::Set(a) => set(dsn, *a).await,
        SchedulesCmd::List(f) => list(dsn, f.json).await,
        SchedulesCmd::Enable(a) => enable(dsn, a, true).await,
        SchedulesCmd::Disable(a) => enable(dsn, a, false).await,
        SchedulesCmd::Delete(a) => {
            let db = connect(dsn).await?;
            schedule::delete(&db, &a.name).await?;
            report(a.json, &a.name, "deleted")
        }
        SchedulesCmd::FireNow(a) => {
            let db = connect(dsn).await?;
            let task = schedule::fire_now(&db, &a.name).await?;
            if a.json {
                print_json(&serde_json::json!({"schedule": a.name, "task": task}))?;
            } else {
                println!("schedule {} fired: task {task}", a.name);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn report(json: bool, name: &str, what: &str) -> Result<ExitCode> {
    if json {
        print_json(&serde_json::json!({"schedule": name, "result": what}))?;
    } else {
        println!("schedule {name} {what}");
    }
    Ok(ExitCode::SUCCESS)
}

async fn set(dsn: Option<String>, a: SetArgs) -> Result<ExitCode> {
    let spec = match (a.cron, a.every) {
        (Some(expr), _) => ScheduleSpec::cron_in(expr, a.time_zone),
        (None, Some(d)) => ScheduleSpec::Every(d),
        (None, None) => return Err(Error::invalid("schedule", "give --cron or --every")),
    };
    let payload: serde_json::Value = serde_json::from_str(&a.payload)
        .map_err(|e| Error::invalid("payload", format!("not JSON: {e}")))?;
    let priority: Priority = a.priority.parse()?;
    let misfire: MisfirePolicy = a.misfire.parse()?;
    let mut s = NewSchedule::new(&a.name, spec, a.kind)
        .queue(a.queue)
        .payload(payload)
        .priority(priority)
        .max_attempts(a.max_attempts)
        .misfire(misfire)
        .enabled(!a.disabled);
    if let Some(t) = a.tenant {
        s = s.tenant(TenantId::new(t)?);
    }
    // Check before connecting: bad input never needs the database.
    s.spec.validate()?;
    let db = connect(dsn).await?;
    let created = schedule::set(&db, &s).await?;
    report(
        a.json,
        &a.name,
        if created { "created" } else { "replaced" },
    )
}

async fn enable(dsn: Option<String>, a: NameArgs, on: bool) -> Result<ExitCode> {
    let db = connect(dsn).await?;
    let changed = schedule::set_enabled(&db, &a.name, on).await?;
    let what = match (on, changed) {
        (true, true) => "enabled",
        (true, false) => "was enabled already",
        (false, true) => "disabled",
        (false, false) => "was disabled already",
    };
    report(a.json, &a.name, what)
}

async fn list(dsn: Option<String>, json: bool) -> Result<ExitCode> {
    let db = connect(dsn).await?;
    let rows = schedule::list(&db).await?;
    let headers = ["NAME", "WHEN", "TASK", "ENABLED", "MISFIRE", "NEXT FIRE"];
    print_rows(json, &rows, Some("no schedules"), &headers, |s| {
        let when = match (&s.cron, schedule::interval_of(s)) {
            (Some(c), _) => format!("{c} ({})", s.time_zone),
            (None, Some(d)) => format!("every {}", humantime::format_duration(d)),
            (None, None) => String::new(),
        };
        vec![
            s.name.clone(),
            when,
            format!("{}/{} ({})", s.queue, s.kind, s.tenant_id),
            s.enabled.to_string(),
            s.misfire.clone(),
            s.next_fire_at.map(|t| t.to_rfc3339()).unwrap_or_default(),
        ]
    })?;
    Ok(ExitCode::SUCCESS)
}
