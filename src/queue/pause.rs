//! Pausing and resuming a queue, for every tenant or for one, and the queue depth per queue.
//!
//! A pause is a row of `pgcrew.queue_pauses`; both claim statements read it, so every claim
//! that starts after [`pause`] returns takes nothing from the queue (on every instance, with no
//! message to miss); tasks already running finish. [`resume`] deletes the row and NOTIFYs
//! `pgcrew_task_available` for the queue, so idle worker pools claim at once (a pool that misses
//! the notification finds the work at its next poll).

use serde::Serialize;
use tracing::instrument;

use crate::db::Executor;
use crate::error::{Error, Result};
use crate::ids::{TenantId, validate_text_id};
use crate::sqlstate;

/// Pause `queue` for every tenant (`tenant` `None`) or for one tenant. Returns whether it was
/// newly paused (`false`: it was paused already). Claims that start after this returns take
/// nothing from the queue (or the tenant's tasks in it); running tasks finish.
///
/// An unknown queue — one with no waiting or running task, worker pool, tenant limit, schedule
/// or pause — is refused with [`Error::NotFound`] (`queue`; SQLSTATE `PC100`), an unknown tenant
/// with [`Error::NotFound`] (`tenant`); nothing is stored.
#[instrument(skip(client), err)]
pub async fn pause<E: Executor + ?Sized>(
    client: &E,
    queue: &str,
    tenant: Option<&TenantId>,
) -> Result<bool> {
    validate_text_id("queue", queue)?;
    let row = client
        .query_one(sql!("queue/pause"), typed![queue, &tenant])
        .await
        .map_err(|e| map_pause_error(e, queue, tenant))?;
    Ok(row.try_get(0)?)
}

/// Lift the pause of `queue` for every tenant (`tenant` `None`; pauses of single tenants stay)
/// or for one tenant, and wake the queue's idle worker pools. Returns whether a pause was
/// lifted (`false`: there was none).
#[instrument(skip(client), err)]
pub async fn resume<E: Executor + ?Sized>(
    client: &E,
    queue: &str,
    tenant: Option<&TenantId>,
) -> Result<bool> {
    validate_text_id("queue", queue)?;
    let row = client
        .query_one(sql!("queue/resume"), typed![queue, &tenant])
        .await?;
    Ok(row.try_get(0)?)
}

/// One queue's depth and pause state (a row of the `pgcrew.queue_depth` view).
#[derive(Debug, Clone, PartialEq, Serialize, postgres_from_row::FromRow)]
pub struct QueueDepth {
    /// The queue.
    pub queue: String,
    /// Tasks available now: the auto-scaling signal.
    pub available: i64,
    /// Tasks delayed, waiting for a retry or for dependencies.
    pub scheduled: i64,
    /// Tasks running.
    pub running: i64,
    /// Seconds since the oldest available task became due.
    pub oldest_available_age_s: Option<f64>,
    /// Paused for every tenant.
    pub paused: bool,
    /// Tenants paused in this queue on their own.
    pub paused_tenants: Vec<String>,
}

/// Every queue with waiting or running tasks or a pause: depth and pause state, by name.
#[instrument(skip(client), err)]
pub async fn queues<E: Executor + ?Sized>(client: &E) -> Result<Vec<QueueDepth>> {
    let rows = client.query(sql!("queue/depth"), typed![]).await?;
    crate::db::rows_as(&rows)
}

fn map_pause_error(e: Error, queue: &str, tenant: Option<&TenantId>) -> Error {
    match e.sqlstate() {
        Some(sqlstate::UNKNOWN_QUEUE) => Error::not_found("queue", queue),
        Some(sqlstate::FOREIGN_KEY_VIOLATION) => match tenant {
            Some(t) => Error::not_found("tenant", t),
            None => e,
        },
        _ => e,
    }
}
