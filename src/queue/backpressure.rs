//! Backpressure: producers that ask for it are refused ([`Error::Backpressure`]) or held back
//! while a queue's available depth, or a tenant's in the queue, is at its configured threshold
//! (`pgcrew.queue_backpressure`). The check runs just before the enqueue, so it is a soft
//! limit: concurrent producers may pass it by a few tasks. Plain [`enqueue`] ignores it.

use std::time::{Duration, Instant};

use tracing::instrument;

use super::{Enqueued, NewTask, enqueue};
use crate::db::Executor;
use crate::error::{Error, Result};
use crate::ids::{TenantId, validate_text_id};

/// How often a waiting producer looks at the depth again.
const RECHECK: Duration = Duration::from_millis(50);

/// What [`enqueue_with_backpressure`] does at a threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackpressureMode {
    /// Return [`Error::Backpressure`] at once.
    #[default]
    Fail,
    /// Wait (checking every 50 ms) up to this long for the depth to fall below the threshold,
    /// then return [`Error::Backpressure`].
    Wait(Duration),
}

/// Hold producers of `queue` (of `tenant` in it, or of every tenant when `None`) that ask for
/// backpressure once `max_available` tasks are available there. `max_available` below 1 is an
/// [`Error::InvalidInput`]; an unknown tenant an [`Error::NotFound`]; nothing is stored.
#[instrument(skip(client), err)]
pub async fn set_backpressure<E: Executor + ?Sized>(
    client: &E,
    queue: &str,
    tenant: Option<&TenantId>,
    max_available: i64,
) -> Result<()> {
    validate_text_id("queue", queue)?;
    if max_available < 1 {
        return Err(Error::invalid(
            "max_available",
            format!("is {max_available}; the threshold must be at least 1"),
        ));
    }
    client
        .execute(
            sql!("queue/set_backpressure"),
            typed![queue, &tenant, &max_available],
        )
        .await
        .map_err(|e| match (e.sqlstate(), tenant) {
            (Some(crate::sqlstate::FOREIGN_KEY_VIOLATION), Some(t)) => {
                Error::not_found("tenant", t)
            }
            _ => e,
        })?;
    Ok(())
}

/// Remove a backpressure threshold; returns whether there was one.
#[instrument(skip(client), err)]
pub async fn clear_backpressure<E: Executor + ?Sized>(
    client: &E,
    queue: &str,
    tenant: Option<&TenantId>,
) -> Result<bool> {
    let n = client
        .execute(sql!("queue/clear_backpressure"), typed![queue, &tenant])
        .await?;
    Ok(n > 0)
}

/// [`enqueue`], unless the task's queue (or its tenant in the queue) has reached its
/// backpressure threshold: then [`Error::Backpressure`] at once ([`BackpressureMode::Fail`]) or
/// after waiting for room ([`BackpressureMode::Wait`]). Nothing is stored when refused.
#[instrument(skip(client, task), fields(queue = %task.queue), err)]
pub async fn enqueue_with_backpressure<E: Executor + ?Sized>(
    client: &E,
    task: &NewTask,
    mode: BackpressureMode,
) -> Result<Enqueued> {
    let deadline = match mode {
        BackpressureMode::Fail => None,
        BackpressureMode::Wait(d) => Some(Instant::now() + d),
    };
    loop {
        let Some(row) = client
            .query_opt(
                sql!("queue/backpressure_check"),
                typed![&task.queue, &task.tenant],
            )
            .await?
        else {
            return enqueue(client, task).await;
        };
        if deadline.is_some_and(|d| Instant::now() + RECHECK <= d) {
            tokio::time::sleep(RECHECK).await;
            continue;
        }
        return Err(Error::Backpressure {
            queue: task.queue.clone(),
            tenant: row.try_get("tenant_id")?,
            depth: row.try_get("depth")?,
            threshold: row.try_get("max_available")?,
        });
    }
}
