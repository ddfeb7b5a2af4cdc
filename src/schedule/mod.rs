//! Schedules: named timetables (cron with optional seconds and a time zone, or a fixed
//! interval) that enqueue a task at every fire, stored in `pgcrew.schedules`.
//!
//! The leader fires due schedules ([`run_scheduler`], started by the client beside its
//! maintenance). Each fire is a row of `pgcrew.schedule_fires` keyed by (schedule, fire time),
//! inserted in the same transaction as its task, so a leader change, two leaders overlapping or
//! a restart never enqueue a fire twice; `next_fire_at` moves in that transaction too, so no
//! fire is dropped either (fires more than [`MISFIRE_GRACE`] late follow the schedule's
//! [`MisfirePolicy`]).
//!
//! ```no_run
//! use std::time::Duration;
//! use pgcrew::schedule::{self, NewSchedule, ScheduleSpec};
//!
//! # async fn demo(db: &pgcrew::Db) -> pgcrew::Result<()> {
//! // Every weekday at 09:00 in Paris, and every 30 seconds.
//! schedule::set(db, &NewSchedule::new("report", ScheduleSpec::cron_in("0 9 * * MON-FRI", "Europe/Paris"), "send_report")).await?;
//! schedule::set(db, &NewSchedule::new("ping", ScheduleSpec::Every(Duration::from_secs(30)), "ping")
//!     .queue("health")
//!     .payload(serde_json::json!({"target": "db"}))).await?;
//! # Ok(())
//! # }
//! ```

mod maintenance;
mod runner;
mod spec;

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tracing::instrument;

use crate::db::Executor;
use crate::error::{Error, Result};
use crate::ids::{TaskId, TenantId, validate_text_id};
use crate::queue::{DEFAULT_QUEUE, DEFAULT_TENANT, Priority};
use crate::sqlstate;

pub use maintenance::ScheduleFireRetention;
pub use runner::run_scheduler;
pub use spec::{MAX_FIRES_PER_TICK, MISFIRE_GRACE, MisfirePolicy, ScheduleSpec};

/// A schedule to create or replace with [`set`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NewSchedule {
    /// Its name (unique).
    pub name: String,
    /// When it fires.
    pub spec: ScheduleSpec,
    /// The queue of its tasks (default `default`).
    pub queue: String,
    /// The kind of its tasks.
    pub kind: String,
    /// The tenant of its tasks (`None`: `default`).
    pub tenant: Option<TenantId>,
    /// The payload of its tasks (default `{}`).
    pub payload: serde_json::Value,
    /// The priority of its tasks.
    pub priority: Priority,
    /// Attempts allowed per task (default 25).
    pub max_attempts: i32,
    /// Whether it fires (default true).
    pub enabled: bool,
    /// What happens to fires missed for longer than [`MISFIRE_GRACE`].
    pub misfire: MisfirePolicy,
}

impl NewSchedule {
    /// A schedule `name` firing on `spec` a task of `kind` (queue and tenant `default`, payload
    /// `{}`, normal priority, 25 attempts, enabled, misfires skipped).
    pub fn new(name: impl Into<String>, spec: ScheduleSpec, kind: impl Into<String>) -> Self {
        NewSchedule {
            name: name.into(),
            spec,
            queue: DEFAULT_QUEUE.to_string(),
            kind: kind.into(),
            tenant: None,
            payload: serde_json::json!({}),
            priority: Priority::Normal,
            max_attempts: 25,
            enabled: true,
            misfire: MisfirePolicy::Skip,
        }
    }

    /// The queue of its tasks.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = queue.into();
        self
    }

    /// The tenant of its tasks.
    pub fn tenant(mut self, tenant: TenantId) -> Self {
        self.tenant = Some(tenant);
        self
    }

    /// The payload of its tasks.
    pub fn payload(mut self, payload: serde_json::Value) -> Self {
        self.payload = payload;
        self
    }

    /// The priority of its tasks.
    pub fn priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }

    /// Attempts allowed per task.
    pub fn max_attempts(mut self, n: i32) -> Self {
        self.max_attempts = n;
        self
    }

    /// Whether it fires.
    pub fn enabled(mut self, enabled: bool) -> Self {
        self.enabled = enabled;
        self
    }

    /// The misfire policy.
    pub fn misfire(mut self, policy: MisfirePolicy) -> Self {
        self.misfire = policy;
        self
    }

    fn validate(&self) -> Result<()> {
        validate_text_id("name", &self.name)?;
        validate_text_id("queue", &self.queue)?;
        validate_text_id("kind", &self.kind)?;
        if self.max_attempts < 1 {
            return Err(Error::invalid("max_attempts", "must be at least 1"));
        }
        self.spec.validate()
    }
}

/// A stored schedule.
#[derive(Debug, Clone, PartialEq, Serialize, postgres_from_row::FromRow)]
pub struct Schedule {
    /// Name.
    pub name: String,
    /// Cron expression (or `None` for an interval schedule).
    pub cron: Option<String>,
    /// Time zone of the cron expression.
    pub time_zone: String,
    /// Interval in microseconds (or `None` for a cron schedule).
    pub interval_us: Option<i64>,
    /// Queue of its tasks.
    pub queue: String,
    /// Kind of its tasks.
    pub kind: String,
    /// Tenant of its tasks.
    pub tenant_id: TenantId,
    /// Payload of its tasks.
    pub payload: serde_json::Value,
    /// Priority of its tasks (0 critical .. 4 batch).
    pub priority: i16,
    /// Attempts allowed per task.
    pub max_attempts: i32,
    /// Whether it fires.
    pub enabled: bool,
    /// `skip` or `catch_up_one`.
    pub misfire: String,
    /// The next fire (`None`: the leader has not computed it yet).
    pub next_fire_at: Option<DateTime<Utc>>,
    /// The latest fire enqueued by the leader.
    pub last_fire_at: Option<DateTime<Utc>>,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Last changed.
    pub updated_at: DateTime<Utc>,
}

/// Create or replace a schedule. Returns whether it was created (`false`: replaced). A changed
/// timetable takes effect from now (no catch-up for the old one). Bad input (name, queue, kind,
/// cron expression, time zone, interval, attempts) is an [`Error::InvalidInput`], an unknown
/// tenant an [`Error::NotFound`]; nothing is stored.
#[instrument(skip(client, schedule), fields(name = %schedule.name), err)]
pub async fn set<E: Executor + ?Sized>(client: &E, schedule: &NewSchedule) -> Result<bool> {
    schedule.validate()?;
    let (cron, tz, interval_us) = match &schedule.spec {
        ScheduleSpec::Cron { expr, time_zone } => (Some(expr.as_str()), time_zone.as_str(), None),
        ScheduleSpec::Every(d) => (
            None,
            "UTC",
            Some(i64::try_from(d.as_micros()).unwrap_or(i64::MAX)),
        ),
    };
    let priority = schedule.priority.as_i16();
    let tenant = schedule
        .tenant
        .as_ref()
        .map_or(DEFAULT_TENANT, |t| t.as_str());
    let row = client
        .query_one(
            sql!("schedule/set"),
            typed![
                &schedule.name,
                &cron,
                tz,
                &interval_us,
                &schedule.queue,
                &schedule.kind,
                tenant,
                &schedule.payload,
                &priority,
                &schedule.max_attempts,
                &schedule.enabled,
                schedule.misfire.as_str()
            ],
        )
        .await
        .map_err(|e| map_error(e, &schedule.name, Some(tenant)))?;
    Ok(row.try_get(0)?)
}

/// Every schedule, by name.
#[instrument(skip(client), err)]
pub async fn list<E: Executor + ?Sized>(client: &E) -> Result<Vec<Schedule>> {
    let rows = client
        .query(sql!("schedule/list"), typed![&None::<String>])
        .await?;
    crate::db::rows_as(&rows)
}

/// One schedule ([`Error::NotFound`] when there is none of that name).
#[instrument(skip(client), err)]
pub async fn get<E: Executor + ?Sized>(client: &E, name: &str) -> Result<Schedule> {
    let row = client
        .query_opt(sql!("schedule/list"), typed![&Some(name)])
        .await?
        .ok_or_else(|| Error::not_found("schedule", name))?;
    crate::db::row_as(&row)
}

/// Enable (`true`) or disable a schedule; returns whether it changed. Enabling fires from the
/// next fire after now on (the disabled time is not caught up).
#[instrument(skip(client), err)]
pub async fn set_enabled<E: Executor + ?Sized>(
    client: &E,
    name: &str,
    enabled: bool,
) -> Result<bool> {
    let row = client
        .query_one(sql!("schedule/enable"), typed![name, &enabled])
        .await
        .map_err(|e| map_error(e, name, None))?;
    Ok(row.try_get(0)?)
}

/// Delete a schedule (the tasks it enqueued stay). [`Error::NotFound`] when there is none.
#[instrument(skip(client), err)]
pub async fn delete<E: Executor + ?Sized>(client: &E, name: &str) -> Result<()> {
    let n = client
        .execute(sql!("schedule/delete"), typed![name])
        .await?;
    if n == 0 {
        return Err(Error::not_found("schedule", name));
    }
    Ok(())
}

/// Enqueue the schedule's task now, once, outside its timetable (recorded as a manual fire at
/// the database's `now()`); its next fire is unchanged. Works on a disabled schedule too.
#[instrument(skip(client), err)]
pub async fn fire_now<E: Executor + ?Sized>(client: &E, name: &str) -> Result<TaskId> {
    let row = client
        .query_opt(sql!("schedule/fire_now"), typed![name])
        .await
        .map_err(|e| map_error(e, name, None))?
        .ok_or_else(|| {
            Error::Internal(format!("schedule {name}: a manual fire enqueued nothing"))
        })?;
    Ok(TaskId(row.try_get(1)?))
}

fn map_error(e: Error, name: &str, tenant: Option<&str>) -> Error {
    let message = match &e {
        Error::Database(d) => d.as_db_error().map(|d| d.message().to_string()),
        _ => None,
    };
    match (e.sqlstate(), message) {
        (Some(sqlstate::UNKNOWN_SCHEDULE), _) => Error::not_found("schedule", name),
        (Some(sqlstate::INVALID_SCHEDULE), Some(m)) => Error::invalid("schedule", m),
        (Some(sqlstate::FOREIGN_KEY_VIOLATION), _) if tenant.is_some() => {
            Error::not_found("tenant", tenant.unwrap_or_default())
        }
        _ => e,
    }
}

/// The interval of an interval schedule as a [`Duration`] (`None` for a cron schedule).
pub fn interval_of(s: &Schedule) -> Option<Duration> {
    s.interval_us
        .and_then(|us| u64::try_from(us).ok())
        .map(Duration::from_micros)
}
