//! Inspecting and controlling tasks: stats, listing, cancel, retry, discard, per-queue tenant
//! limits.

use chrono::{DateTime, Utc};
use serde::Serialize;
use tracing::instrument;
use uuid::Uuid;

use super::TaskState;
use super::claim::invalid_state;
use crate::db::Executor;
use crate::error::{Error, Result};
use crate::ids::{TaskId, TenantId, validate_text_id};
use crate::sqlstate;

/// One row of [`stats`]: tasks of a queue in a state.
#[derive(Debug, Clone, PartialEq, Serialize, postgres_from_row::FromRow)]
pub struct TaskStats {
    /// Queue.
    pub queue: String,
    /// State.
    pub state: TaskState,
    /// Number of tasks.
    pub tasks: i64,
    /// For `available`: seconds since the oldest available task became due.
    pub oldest_available_age_s: Option<f64>,
}

/// Task counts per queue and state (the `pgcrew.queue_stats` view).
#[instrument(skip(client), err)]
pub async fn stats<C: Executor + ?Sized>(client: &C) -> Result<Vec<TaskStats>> {
    let rows = client.query(sql!("queue/stats"), typed![]).await?;
    crate::db::rows_as(&rows)
}

/// A task as stored.
#[derive(Debug, Clone, PartialEq, Serialize, postgres_from_row::FromRow)]
pub struct TaskRow {
    /// Id.
    pub id: TaskId,
    /// Queue.
    pub queue: String,
    /// Kind.
    pub kind: String,
    /// Tenant.
    pub tenant_id: TenantId,
    /// Run.
    pub run_id: Option<Uuid>,
    /// Priority (0 critical .. 4 batch).
    pub priority: i16,
    /// State.
    pub state: TaskState,
    /// Payload.
    pub payload: serde_json::Value,
    /// Attempts made.
    pub attempts: i32,
    /// Attempts allowed.
    pub max_attempts: i32,
    /// Due time.
    pub run_at: DateTime<Utc>,
    /// Instance that claimed it last.
    pub claimed_by: Option<String>,
    /// Last heartbeat while running.
    pub heartbeat_at: Option<DateTime<Utc>>,
    /// Last error.
    pub last_error: Option<String>,
    /// Every error, oldest first (`[{attempt, at, error}]`).
    pub errors: serde_json::Value,
    /// Unique key.
    pub unique_key: Option<String>,
    /// Parents.
    pub depends_on: Option<Vec<i64>>,
    /// Parents not yet completed.
    pub pending_deps: i32,
    /// When cancellation of the running task was requested.
    pub cancel_requested_at: Option<DateTime<Utc>>,
    /// Enqueue time.
    pub created_at: DateTime<Utc>,
    /// When it reached a final state.
    pub finalized_at: Option<DateTime<Utc>>,
}

/// One task.
#[instrument(skip(client), err)]
pub async fn get<C: Executor + ?Sized>(client: &C, id: TaskId) -> Result<TaskRow> {
    let row = client
        .query_opt(sql!("queue/get"), typed![&id])
        .await?
        .ok_or_else(|| Error::not_found("task", id))?;
    crate::db::row_as(&row)
}

/// The newest tasks (at most `limit`), optionally filtered by state, queue and tenant.
#[instrument(skip(client), err)]
pub async fn list<C: Executor + ?Sized>(
    client: &C,
    state: Option<TaskState>,
    queue: Option<&str>,
    tenant: Option<&TenantId>,
    limit: i64,
) -> Result<Vec<TaskRow>> {
    if limit < 1 {
        return Err(Error::invalid("limit", "must be at least 1"));
    }
    let rows = client
        .query(sql!("queue/list"), typed![&state, &queue, &tenant, &limit])
        .await?;
    crate::db::rows_as(&rows)
}

/// Cancel a task. A task that has not started is cancelled at once (with its dependants);
/// a running task gets a cancellation request, announced on `pgcrew_task_cancel_requested`: the
/// claiming worker pool re-reads its tasks' flags at once (or at its next heartbeat, if the
/// notification is missed) and the handler's cancellation token fires. Returns the state after
/// the call. A task already in a final state is an [`Error::IllegalTransition`].
#[instrument(skip(client), err)]
pub async fn cancel<C: Executor + ?Sized>(client: &C, id: TaskId) -> Result<TaskState> {
    let row = client
        .query_opt(sql!("queue/cancel"), typed![&id])
        .await?
        .ok_or_else(|| Error::not_found("task", id))?;
    let prev: TaskState = row.try_get("previous_state")?;
    if prev.is_final() {
        return Err(invalid_state(id, prev.as_str(), "cancelled"));
    }
    Ok(row.try_get("state")?)
}

/// Make a task available again now (discarded, cancelled, completed, retryable or scheduled),
/// with at least one attempt left. A dependant waits for its parents again: it becomes
/// [`TaskState::Scheduled`] while one of them has not completed (parents deleted by retention
/// count as completed). A running task is an [`Error::IllegalTransition`]. Fails with
/// [`Error::InvalidInput`] (field `task`) when another non-final task holds the same unique
/// key, or when a parent was discarded or cancelled (it can never complete: retry it first).
#[instrument(skip(client), err)]
pub async fn retry<C: Executor + ?Sized>(client: &C, id: TaskId) -> Result<TaskState> {
    let row = client
        .query_opt(sql!("queue/retry"), typed![&id])
        .await
        .map_err(|e| {
            let e = match e.into_driver() {
                Ok(e) => e,
                Err(other) => return other,
            };
            match e.as_db_error().map(|d| (d.code().code(), d.message())) {
                Some((sqlstate::UNIQUE_VIOLATION, _)) => Error::invalid(
                    "task",
                    format!(
                        "task {id} cannot be retried: another unfinished task holds its unique key"
                    ),
                ),
                // A parent was discarded or cancelled (V011).
                Some((sqlstate::PARENT_FINISHED, message)) => {
                    Error::invalid("task", message.to_string())
                }
                _ => Error::from(e),
            }
        })?
        .ok_or_else(|| Error::not_found("task", id))?;
    let prev: TaskState = row.try_get("previous_state")?;
    if prev == TaskState::Running {
        return Err(invalid_state(id, prev.as_str(), "available"));
    }
    Ok(row.try_get("state")?)
}

/// Discard a task by hand (V033): a task that is not running and not finished (available,
/// scheduled, retryable) becomes [`TaskState::Discarded`] with `reason` as its last error, and
/// its dependants not yet started are cancelled, as for any discarded parent. Returns the state
/// after the call. A running task or one in a final state is an [`Error::IllegalTransition`]
/// and nothing changes; an unknown task is [`Error::NotFound`].
#[instrument(skip(client), err)]
pub async fn discard<C: Executor + ?Sized>(
    client: &C,
    id: TaskId,
    reason: &str,
) -> Result<TaskState> {
    let row = client
        .query_opt(sql!("queue/discard"), typed![&id, &reason])
        .await?
        .ok_or_else(|| Error::not_found("task", id))?;
    let prev: TaskState = row.try_get("previous_state")?;
    let state: TaskState = row.try_get("state")?;
    if state != TaskState::Discarded || prev == TaskState::Discarded {
        return Err(invalid_state(id, prev.as_str(), "discarded"));
    }
    Ok(state)
}

/// Limit how many tasks of `tenant` may run at once in `queue` (in addition to the tenant's
/// `max_concurrent_tasks` over all queues).
#[instrument(skip(client), err)]
pub async fn set_queue_limit<C: Executor + ?Sized>(
    client: &C,
    tenant: &TenantId,
    queue: &str,
    max_concurrent_tasks: i32,
) -> Result<()> {
    validate_text_id("queue", queue)?;
    if max_concurrent_tasks < 1 {
        return Err(Error::invalid(
            "max_concurrent_tasks",
            "must be at least 1 (clear the limit instead)",
        ));
    }
    client
        .execute(
            sql!("queue/set_queue_limit"),
            typed![tenant, &queue, &max_concurrent_tasks],
        )
        .await
        .map_err(|e| {
            if e.sqlstate() == Some(sqlstate::FOREIGN_KEY_VIOLATION) {
                Error::not_found("tenant", tenant)
            } else {
                e
            }
        })?;
    Ok(())
}

/// Remove a per-queue tenant limit. Returns whether one existed.
#[instrument(skip(client), err)]
pub async fn clear_queue_limit<C: Executor + ?Sized>(
    client: &C,
    tenant: &TenantId,
    queue: &str,
) -> Result<bool> {
    Ok(client
        .execute(sql!("queue/clear_queue_limit"), typed![tenant, &queue])
        .await?
        == 1)
}
