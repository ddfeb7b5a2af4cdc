//! Claiming, acknowledging and heartbeating tasks (the low-level API the worker pool uses).

use std::borrow::Cow;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tracing::{debug, instrument, warn};
use uuid::Uuid;

use super::{Priority, TaskState, bound_error_text};
use crate::config::interval_micros;
use crate::db::Executor;
use crate::error::{Error, Result};
use crate::ids::{ClaimToken, InstanceId, RunId, TaskId, TenantId};

/// A task claimed for execution.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClaimedTask {
    /// Task id.
    pub id: TaskId,
    /// Queue.
    pub queue: String,
    /// Kind.
    pub kind: String,
    /// Tenant.
    pub tenant: TenantId,
    /// Run, if any.
    pub run_id: Option<RunId>,
    /// Priority.
    pub priority: Priority,
    /// Payload.
    pub payload: serde_json::Value,
    /// This attempt's number (1-based).
    pub attempt: i32,
    /// Attempts allowed.
    pub max_attempts: i32,
    /// The claim token every acknowledgement must carry.
    pub token: ClaimToken,
    /// When the task became due.
    pub run_at: DateTime<Utc>,
    /// When it was enqueued.
    pub created_at: DateTime<Utc>,
    /// How long it waited after becoming due (database clock).
    pub lag: Duration,
    /// The trace context stored with the task (V027), when the claim returned it (the fast
    /// path does): lets a tracing pool skip reading it again.
    #[serde(skip)]
    pub(crate) stored_trace: StoredTrace,
}

/// Whether a claim returned the task's stored trace context.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) enum StoredTrace {
    /// Not returned (the general claim): read it when tracing.
    #[default]
    Unknown,
    /// Returned: the task's own (`None`: none stored).
    Task(Option<String>),
}

impl ClaimedTask {
    /// The acknowledgement of this claim with `outcome`. It carries the claim token, so it is
    /// rejected as stale if the task was rescued (and maybe claimed again) in the meantime.
    pub fn ack(&self, outcome: AckOutcome) -> Ack {
        Ack {
            id: self.id,
            token: self.token,
            outcome,
        }
    }
}

/// Claim up to `limit` tasks from `queues` for `instance` (which must be registered, or the
/// leader's maintenance will rescue the tasks). Fair across tenants, within tenant limits. The
/// tasks come back in execution order: priority, then due time, then id.
///
/// A claim on a single queue first runs a one-round-trip fast path (`pgcrew.claim_fast`,
/// V048) that applies when exactly one tenant has work there, without a concurrency limit, and
/// no delayed or retryable task of the queue is due; when it does not apply,
/// `pgcrew.claim_tasks` runs, which shares the batch fairly, holds limits and promotes due
/// tasks. Both claim the same tasks in the same order.
#[instrument(skip(client, queues), fields(limit), err)]
pub async fn claim<E: Executor + ?Sized>(
    client: &E,
    queues: &[String],
    limit: i32,
    instance: &InstanceId,
) -> Result<Vec<ClaimedTask>> {
    claim_routed(client, queues, limit, instance, &mut FastRoute::default()).await
}

/// The most tasks one fast claim takes, whatever its limit: the constant bound of its locking
/// scan (V048), which keeps its plan generic.
const FAST_CLAIM_BOUND: usize = 1000;

/// Which one-statement claim a caller tries first for a single queue, learned from its
/// previous claims (see [`claim_routed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FastRoute {
    /// Whether the next claim tries a one-statement claim before `pgcrew.claim_tasks`.
    enabled: bool,
    /// Whether that is `queue/claim_fast_limited` (the queue has a rate or key limit, V035)
    /// rather than `queue/claim_fast` (cheaper, for queues without features).
    limited: bool,
    /// Whether the last claim saw the queue drained: the plain fast statement found no work,
    /// or claimed fewer tasks than asked and than [`FAST_CLAIM_BOUND`] (it takes every
    /// available task of the queue's only tenant that no other claimer holds, so another claim
    /// now would find nothing).
    drained: bool,
}

impl Default for FastRoute {
    fn default() -> Self {
        FastRoute {
            enabled: true,
            limited: false,
            drained: false,
        }
    }
}

impl FastRoute {
    /// Whether the next claim goes to the plain fast statement (`queue/claim_fast`: one tenant
    /// with work, no limit, nothing due).
    pub(crate) fn plain(&self) -> bool {
        self.enabled && !self.limited
    }

    /// Whether the last claim saw its queue drained (see the field): only more work than it
    /// saw, announced by NOTIFY, makes another claim worth sending.
    pub(crate) fn drained(&self) -> bool {
        self.drained
    }
}

/// The fast path first for a single queue while `route` says so, then (when it stepped aside)
/// `pgcrew.claim_tasks`. Both fast statements tell "no work for any claim" from "work this
/// path does not take": no row, the queue has no work (for the plain statement also: every
/// task it could take is locked by another claimer), and `pgcrew.claim_tasks`, which would
/// claim nothing, is skipped (so an idle pool woken for a task another instance's pool
/// claimed sends one claim, not two: issue #22); a row without a task, it stepped aside. When
/// the general claim then finds work, the fast path did not apply, so a caller that keeps its
/// route (the worker pool) goes straight to the general path until a claim comes back empty,
/// and tries the limited fast statement from then on (it also claims where the plain one does,
/// at a little more cost: it goes back to the plain one when its queue turns out to have no
/// features).
pub(crate) async fn claim_routed<E: Executor + ?Sized>(
    client: &E,
    queues: &[String],
    limit: i32,
    instance: &InstanceId,
    route: &mut FastRoute,
) -> Result<Vec<ClaimedTask>> {
    if limit <= 0 || queues.is_empty() {
        return Ok(Vec::new());
    }
    let single = queues.len() == 1;
    route.drained = false;
    if let [queue] = queues
        && route.enabled
    {
        let plain = !route.limited;
        // A fresh random token per claim, as pgcrew.claim_tasks draws one.
        let token = Uuid::new_v4();
        let fast = if route.limited {
            sql!("queue/claim_fast_limited")
        } else {
            sql!("queue/claim_fast")
        };
        let rows = client
            .query(fast, typed![queue, limit, instance, token])
            .await?;
        // Both statements: no row, the queue has no work, or (the plain one) every task it
        // could take was locked by another claimer: the general claim would claim nothing and
        // is skipped (issue #22, the wake-up herd); one row without a task, it stepped aside;
        // else the tasks it claimed.
        let Some(first) = rows.first() else {
            route.drained = plain;
            return Ok(Vec::new());
        };
        if route.limited && !first.try_get::<_, bool>("limited")? {
            route.limited = false;
        }
        if first.try_get::<_, Option<i64>>("id")?.is_some() {
            let asked = usize::try_from(limit)
                .unwrap_or(usize::MAX)
                .min(FAST_CLAIM_BOUND);
            route.drained = plain && rows.len() < asked;
            return in_order(&rows);
        }
    }
    let rows = client
        .query(sql!("queue/claim"), typed![queues, limit, instance])
        .await?;
    if rows.is_empty() {
        route.enabled = true;
    } else {
        if route.enabled && single {
            route.limited = true;
        }
        route.enabled = false;
    }
    in_order(&rows)
}

/// Claimed rows as tasks in execution order (priority, due time, id): `UPDATE ... RETURNING`
/// returns them in whatever order the rows were updated.
fn in_order(rows: &[tokio_postgres::Row]) -> Result<Vec<ClaimedTask>> {
    let mut tasks = rows.iter().map(task_from_row).collect::<Result<Vec<_>>>()?;
    tasks.sort_by_key(|t| (t.priority.as_i16(), t.run_at, t.id.0));
    Ok(tasks)
}

fn task_from_row(r: &tokio_postgres::Row) -> Result<ClaimedTask> {
    let run: Option<Uuid> = r.get("run_id");
    let lag_us: i64 = r.get("lag_us");
    let token: Uuid = r.get("claim_token");
    Ok(ClaimedTask {
        id: TaskId(r.get("id")),
        queue: r.get("queue"),
        kind: r.get("kind"),
        tenant: r.get("tenant_id"),
        run_id: run.map(RunId::from),
        priority: r.try_get("priority")?,
        payload: r.get("payload"),
        attempt: r.get("attempts"),
        max_attempts: r.get("max_attempts"),
        token: ClaimToken::from(token),
        run_at: r.get("run_at"),
        created_at: r.get("created_at"),
        lag: Duration::from_micros(lag_us.max(0) as u64),
        // Only the fast claim returns the column (pgcrew.claim_tasks's result is fixed).
        stored_trace: if r.columns().iter().any(|c| c.name() == "trace_context") {
            StoredTrace::Task(r.try_get("trace_context")?)
        } else {
            StoredTrace::Unknown
        },
    })
}

/// What happened to a claimed task.
#[derive(Debug, Clone, PartialEq)]
pub enum AckOutcome {
    /// It succeeded.
    Complete,
    /// It failed: retry after `retry_in` (or discard when out of attempts); `error` is kept.
    Fail {
        /// The error, kept in the task's `errors`.
        error: String,
        /// Backoff before the next attempt.
        retry_in: Duration,
    },
    /// Run it again after this delay without consuming an attempt.
    Snooze(Duration),
    /// Give up now; `error` is kept.
    Discard {
        /// The reason.
        error: String,
    },
}

/// One acknowledgement.
#[derive(Debug, Clone, PartialEq)]
pub struct Ack {
    /// The task.
    pub id: TaskId,
    /// The token of the claim being acknowledged.
    pub token: ClaimToken,
    /// The outcome.
    pub outcome: AckOutcome,
}

/// The result of [`ack`].
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AckReport {
    /// Applied acknowledgements and the state each task went to.
    pub applied: Vec<(TaskId, TaskState)>,
    /// Rejected acknowledgements: the claim token was stale (the task was rescued, maybe
    /// reclaimed) or the task was no longer running. Nothing was changed for them.
    pub stale: Vec<TaskId>,
}

/// Acknowledge many tasks in one statement. Acks whose claim token is stale are rejected,
/// logged and reported in [`AckReport::stale`]; they never change the task.
///
/// Every entry is made storable first, so one entry cannot fail the statement for the others:
/// snooze and retry delays are clamped to [`MAX_TASK_DELAY`](super::MAX_TASK_DELAY), error
/// texts go through [`bound_error_text`](super::bound_error_text) (NUL made visible as `␀`,
/// at most [`MAX_ERROR_CHARS`](super::MAX_ERROR_CHARS) characters, truncation marked).
#[instrument(skip(client, acks), fields(n = acks.len()), err)]
pub async fn ack<E: Executor + ?Sized>(client: &E, acks: &[Ack]) -> Result<AckReport> {
    ack_with(client, sql!("queue/ack"), acks).await
}

pub(crate) async fn ack_with<E: Executor + ?Sized>(
    client: &E,
    query: &str,
    acks: &[Ack],
) -> Result<AckReport> {
    if acks.is_empty() {
        return Ok(AckReport::default());
    }
    let mut ids = Vec::with_capacity(acks.len());
    let mut tokens = Vec::with_capacity(acks.len());
    let mut outcomes = Vec::with_capacity(acks.len());
    let mut delays = Vec::with_capacity(acks.len());
    let mut errors: Vec<Option<Cow<'_, str>>> = Vec::with_capacity(acks.len());
    for a in acks {
        ids.push(a.id.0);
        tokens.push(a.token.as_uuid());
        // Every entry storable, so none can fail the statement for the others: delays within
        // MAX_TASK_DELAY (Duration::MAX overflows an interval), error texts without NUL (which
        // PostgreSQL text cannot hold) and within MAX_ERROR_CHARS.
        let (o, d, e) = match &a.outcome {
            AckOutcome::Complete => ("complete", 0, None),
            AckOutcome::Fail { error, retry_in } => (
                "fail",
                bounded_delay_us(*retry_in),
                Some(bound_error_text(error)),
            ),
            AckOutcome::Snooze(d) => ("snooze", bounded_delay_us(*d), None),
            AckOutcome::Discard { error } => ("discard", 0, Some(bound_error_text(error))),
        };
        outcomes.push(o);
        delays.push(d);
        errors.push(e);
    }
    let errors: Vec<Option<&str>> = errors.iter().map(|e| e.as_deref()).collect();
    let rows = client
        .query(query, typed![ids, tokens, outcomes, delays, errors])
        .await?;
    let mut report = AckReport::default();
    for r in &rows {
        report
            .applied
            .push((TaskId(r.get("id")), r.try_get::<_, TaskState>("state")?));
    }
    if report.applied.len() < acks.len() {
        let applied: std::collections::HashSet<TaskId> =
            report.applied.iter().map(|(id, _)| *id).collect();
        for a in acks {
            if !applied.contains(&a.id) {
                if matches!(a.outcome, AckOutcome::Snooze(_)) {
                    // Expected for a task parked by a durable wait (kernel::wait): benign.
                    debug!(task = %a.id, token = %a.token, "stale snooze acknowledgement (the task is no longer running)");
                } else {
                    warn!(task = %a.id, token = %a.token, "rejected a stale task acknowledgement (the task was rescued or is no longer running)");
                }
                report.stale.push(a.id);
            }
        }
    }
    Ok(report)
}

/// The result of [`heartbeat`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HeartbeatReport {
    /// Tasks still claimed by this instance.
    pub alive: Vec<TaskId>,
    /// Of those, the ones whose cancellation was requested.
    pub cancel_requested: Vec<TaskId>,
    /// Of `alive`, the ones another transaction held locked (an acknowledgement in flight, a
    /// transaction enqueuing a dependant, a cancellation request): the heartbeat does not wait
    /// for them, so they keep their previous `heartbeat_at` until the next heartbeat. They are
    /// reported as the statement's snapshot saw them, still claimed by this instance.
    pub busy: Vec<TaskId>,
}

/// Refresh the heartbeat of every task `instance` is running, in one statement that never
/// waits for a row lock: a task another transaction holds locked is reported
/// [`busy`](HeartbeatReport::busy) instead of waited for (waiting could deadlock, 40P01, with a
/// transaction that locks two of the tasks in the other order).
#[instrument(skip(client, ids), fields(n = ids.len()), err)]
pub async fn heartbeat<E: Executor + ?Sized>(
    client: &E,
    instance: &InstanceId,
    ids: &[TaskId],
) -> Result<HeartbeatReport> {
    let raw: Vec<i64> = ids.iter().map(|t| t.0).collect();
    let rows = client
        .query(sql!("queue/heartbeat"), typed![raw, instance])
        .await?;
    let mut rep = HeartbeatReport::default();
    for r in &rows {
        let id = TaskId(r.try_get("id")?);
        rep.alive.push(id);
        if r.try_get::<_, bool>("cancel_requested")? {
            rep.cancel_requested.push(id);
        }
        if r.try_get::<_, bool>("busy")? {
            rep.busy.push(id);
        }
    }
    Ok(rep)
}

/// How long until the next scheduled or retryable task of `queues` is due, or until a rate
/// limit that may hold back their available work has a whole token again (`None`: neither).
#[instrument(skip(client, queues), err)]
pub async fn next_due<E: Executor + ?Sized>(
    client: &E,
    queues: &[String],
) -> Result<Option<Duration>> {
    next_due_with(client, sql!("queue/next_due"), queues).await
}

pub(crate) async fn next_due_with<E: Executor + ?Sized>(
    client: &E,
    query: &str,
    queues: &[String],
) -> Result<Option<Duration>> {
    let row = client.query_opt(query, typed![queues]).await?;
    let us = match row {
        Some(r) => r.try_get::<_, Option<i64>>(0)?,
        None => None,
    };
    Ok(us.map(|us| Duration::from_micros(us.max(0) as u64)))
}

/// `d` in microseconds, clamped to [`MAX_TASK_DELAY`](super::MAX_TASK_DELAY).
fn bounded_delay_us(d: Duration) -> i64 {
    interval_micros(d.min(super::MAX_TASK_DELAY))
}

pub(crate) fn invalid_state(id: TaskId, from: &str, to: &str) -> Error {
    Error::IllegalTransition {
        entity: "task",
        id: id.to_string(),
        from: from.to_string(),
        to: to.to_string(),
    }
}
