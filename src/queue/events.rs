//! What people did to tasks and queues, with who and when (V030): a cancel, retry or discard (V033) of a task
//! taken on someone's behalf (the operations console's actions) is a row of
//! `pgcrew.task_events` written in the action's transaction; a pause or resume of a queue is a
//! row of `pgcrew.queue_pause_events`. Task events go with the retention of tasks
//! (`task_retention`), pause records after `history_retention`.

use chrono::{DateTime, Utc};
use serde::Serialize;
use tracing::instrument;

use crate::db::{Acquire, Executor};
use crate::error::{Error, Result};
use crate::ids::{TaskId, TenantId};
use crate::queue::TaskState;

/// Longest accepted actor name, in characters.
pub const MAX_ACTOR_LEN: usize = 200;

/// An action a person takes on a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskAction {
    /// [`cancel`](crate::queue::cancel).
    Cancel,
    /// [`retry`](crate::queue::retry).
    Retry,
    /// [`discard`](crate::queue::discard), with the reason "discarded in the operations console
    /// by `<actor>`" (source `console`) or "discarded by `<actor>` (`<source>`)".
    Discard,
}

impl TaskAction {
    /// The stored name (`cancel`, `retry`, `discard`).
    pub fn as_str(self) -> &'static str {
        match self {
            TaskAction::Cancel => "cancel",
            TaskAction::Retry => "retry",
            TaskAction::Discard => "discard",
        }
    }
}

/// One recorded action on a task.
#[derive(Debug, Clone, Serialize, postgres_from_row::FromRow)]
pub struct TaskEvent {
    /// Order of recording.
    pub id: i64,
    /// The task.
    pub task_id: i64,
    /// When (database time).
    pub at: DateTime<Utc>,
    /// `cancel`, `retry` or `discard`.
    pub action: String,
    /// Who.
    pub actor: String,
    /// The state before.
    pub previous_state: TaskState,
    /// The state after.
    pub state: TaskState,
    /// Where it came from (`console`).
    pub source: String,
}

fn check_actor(actor: &str) -> Result<&str> {
    let a = actor.trim();
    if a.is_empty() || a.chars().count() > MAX_ACTOR_LEN {
        return Err(Error::invalid(
            "actor",
            format!("must have 1 to {MAX_ACTOR_LEN} characters"),
        ));
    }
    Ok(a)
}

/// Cancel, retry or discard a task on behalf of `actor` and record it (`pgcrew.task_events`) in
/// the same transaction: either both happen or neither. Errors as
/// [`cancel`](crate::queue::cancel), [`retry`](crate::queue::retry) and
/// [`discard`](crate::queue::discard) (a running or finished task is refused); an empty or longer than 200 characters `actor` is
/// [`Error::InvalidInput`] and nothing changes. Returns the state after the action.
#[instrument(skip(db), err)]
pub async fn act_on_task<A: Acquire + ?Sized>(
    db: &A,
    id: TaskId,
    action: TaskAction,
    actor: &str,
    source: &str,
) -> Result<TaskState> {
    let actor = check_actor(actor)?;
    let mut conn = db.acquire().await?;
    let tx = conn.begin().await?;
    let before = tx
        .query_opt(sql!("queue/lock_task_state"), typed![&id])
        .await?
        .ok_or_else(|| Error::not_found("task", id))?;
    let previous: TaskState = before.try_get(0)?;
    let state = match action {
        TaskAction::Cancel => crate::queue::cancel(&tx, id).await?,
        TaskAction::Retry => crate::queue::retry(&tx, id).await?,
        TaskAction::Discard => {
            crate::queue::discard(&tx, id, &discard_reason(actor, source)).await?
        }
    };
    tx.execute(
        sql!("queue/record_task_event"),
        typed![&id, &action.as_str(), &actor, &previous, &state, &source],
    )
    .await?;
    tx.commit().await?;
    Ok(state)
}

/// The reason recorded on a task discarded by `actor` from `source`.
fn discard_reason(actor: &str, source: &str) -> String {
    if source == "console" {
        format!("discarded in the operations console by {actor}")
    } else {
        format!("discarded by {actor} ({source})")
    }
}

/// The recorded actions on a task, oldest first.
#[instrument(skip(client), err)]
pub async fn task_events<E: Executor + ?Sized>(client: &E, id: TaskId) -> Result<Vec<TaskEvent>> {
    let rows = client.query(sql!("queue/task_events"), typed![&id]).await?;
    crate::db::rows_as(&rows)
}

/// One recorded pause or resume of a queue.
#[derive(Debug, Clone, Serialize, postgres_from_row::FromRow)]
pub struct QueuePauseEvent {
    /// Order of recording.
    pub id: i64,
    /// The queue.
    pub queue: String,
    /// The tenant paused or resumed alone (`None`: every tenant).
    pub tenant_id: Option<String>,
    /// `pause` or `resume`.
    pub action: String,
    /// Who.
    pub actor: String,
    /// Whether it changed anything (`false`: paused already, or there was no pause).
    pub changed: bool,
    /// When (database time).
    pub at: DateTime<Utc>,
}

/// [`pause`](crate::queue::pause) or (`pause` false) [`resume`](crate::queue::resume) `queue`
/// on behalf of `actor`, recorded in `pgcrew.queue_pause_events` in the same transaction.
/// Errors as those; an empty or too long `actor` is [`Error::InvalidInput`]. Returns whether
/// it changed anything.
#[instrument(skip(db), err)]
pub async fn set_paused_by<A: Acquire + ?Sized>(
    db: &A,
    queue: &str,
    tenant: Option<&TenantId>,
    pause: bool,
    actor: &str,
) -> Result<bool> {
    let actor = check_actor(actor)?;
    let mut conn = db.acquire().await?;
    let tx = conn.begin().await?;
    let changed = if pause {
        crate::queue::pause(&tx, queue, tenant).await?
    } else {
        crate::queue::resume(&tx, queue, tenant).await?
    };
    let action = if pause { "pause" } else { "resume" };
    tx.execute(
        sql!("queue/record_pause_event"),
        typed![&queue, &tenant, &action, &actor, &changed],
    )
    .await?;
    tx.commit().await?;
    Ok(changed)
}

/// The newest `limit` recorded pauses and resumes (of `queue`, or of every queue), newest
/// first.
#[instrument(skip(client), err)]
pub async fn queue_pause_events<E: Executor + ?Sized>(
    client: &E,
    queue: Option<&str>,
    limit: i64,
) -> Result<Vec<QueuePauseEvent>> {
    let rows = client
        .query(sql!("queue/pause_events"), typed![&queue, &limit])
        .await?;
    crate::db::rows_as(&rows)
}
