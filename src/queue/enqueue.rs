//! Enqueueing: single (with dependencies and unique keys) and bulk, on any client or inside the
//! caller's transaction.

use crate::telemetry::trace::query_one_traced;
use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::types::{ToSql, Type};
use tracing::instrument;
use uuid::Uuid;

use super::{NewTask, TaskState};
use crate::db::{Executor, caches_statements};
use crate::error::{Error, Result};
use crate::ids::TaskId;

/// The result of [`enqueue`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Enqueued {
    /// The task's id (the existing task's when `duplicate`).
    pub id: TaskId,
    /// Its state right after the call.
    pub state: TaskState,
    /// True when the unique key matched an existing non-final task and nothing was inserted.
    pub duplicate: bool,
}

/// Enqueue one task. Works on a plain client, inside the caller's transaction (the task then
/// exists only if that transaction commits) or on a pooled connection or transaction (`&conn`,
/// `&tx`: their prepared statement is cached per connection, which saves PostgreSQL parsing and
/// planning it on every call; see [`Executor`]).
///
/// Dependencies are locked while the task is inserted, so a parent finishing concurrently is
/// always accounted for. Unknown parents, an unknown tenant, an oversized payload (see
/// [`MAX_PAYLOAD_BYTES`](super::MAX_PAYLOAD_BYTES)) or a delay beyond
/// [`MAX_TASK_DELAY`](super::MAX_TASK_DELAY) are rejected with [`Error::InvalidInput`] and
/// nothing is written.
///
/// While OpenTelemetry tracing is on, the task stores the trace context of this call's span
/// (see [`crate::telemetry::trace`]).
#[instrument(skip(client, task), fields(kind = %task.kind, queue = %task.queue), err)]
pub async fn enqueue<E: Executor + ?Sized>(client: &E, task: &NewTask) -> Result<Enqueued> {
    task.validate()?;
    let deps: Option<Vec<i64>> = if task.depends_on.is_empty() {
        None
    } else {
        Some(task.depends_on.iter().map(|t| t.0).collect())
    };
    let run: Option<Uuid> = task.run_id.map(|r| r.as_uuid());
    // Typed parameters: on a plain client one round trip (no separate prepare); on a pooled one
    // a statement prepared once per connection. Without dependencies or a unique key a plain
    // INSERT does (no PL/pgSQL call).
    let simple = deps.is_none() && task.unique_key.is_none();
    let params: &[(&(dyn ToSql + Sync), Type)] = &[
        (&task.queue, Type::TEXT),
        (&task.kind, Type::TEXT),
        (&task.tenant, Type::TEXT),
        (&run, Type::UUID),
        (&task.priority, Type::INT2),
        (&task.payload, Type::JSONB),
        (&task.delay_us(), Type::INT8),
        (&task.run_at, Type::TIMESTAMPTZ),
        (&task.max_attempts, Type::INT4),
        (&task.unique_key, Type::TEXT),
        (&deps, Type::INT8_ARRAY),
    ];
    let row = if simple {
        // The same parameters minus the unique key and dependencies. Where statements are not
        // kept (unnamed, or a plain client), the statement's function form (V049): sent itself
        // it would be planned on every call.
        let sql = if caches_statements(client) {
            sql!("queue/enqueue_simple")
        } else {
            sql!("queue/enqueue_simple_call")
        };
        query_one_traced(client, sql, &params[..9]).await
    } else {
        query_one_traced(client, sql!("queue/enqueue"), params).await
    }
    .map_err(|e| map_enqueue_error(e, Some(task.tenant.as_str())))?;
    Ok(Enqueued {
        id: TaskId(row.get("id")),
        state: row.try_get("state")?,
        duplicate: row.get("duplicate"),
    })
}

/// Enqueue many tasks in one statement (thousands per call). Tasks whose unique key is taken by
/// a non-final task are skipped; the ids of the inserted tasks are returned in input order of
/// the inserted ones. Every task is validated first: one invalid task rejects the whole batch
/// and nothing is written. At most [`MAX_ENQUEUE_BATCH`](super::MAX_ENQUEUE_BATCH) tasks per
/// call. Dependencies are not supported here (use [`enqueue`]).
#[instrument(skip(client, tasks), fields(n = tasks.len()), err)]
pub async fn enqueue_many<E: Executor + ?Sized>(
    client: &E,
    tasks: &[NewTask],
) -> Result<Vec<TaskId>> {
    if tasks.is_empty() {
        return Ok(Vec::new());
    }
    if tasks.len() > super::MAX_ENQUEUE_BATCH {
        return Err(Error::invalid(
            "tasks",
            format!(
                "{} tasks in one bulk enqueue; at most {} are allowed: split them into several calls",
                tasks.len(),
                super::MAX_ENQUEUE_BATCH
            ),
        ));
    }
    for (i, t) in tasks.iter().enumerate() {
        t.validate().map_err(|e| match e {
            Error::InvalidInput { field, message } => Error::InvalidInput {
                field,
                message: format!("(task #{i} of the batch) {message}"),
            },
            other => other,
        })?;
        if !t.depends_on.is_empty() {
            return Err(Error::invalid(
                "depends_on",
                format!(
                    "(task #{i} of the batch) bulk enqueue does not take dependencies: enqueue tasks with depends_on one at a time with queue::enqueue"
                ),
            ));
        }
    }
    let n = tasks.len();
    let mut queues = Vec::with_capacity(n);
    let mut kinds = Vec::with_capacity(n);
    let mut tenants = Vec::with_capacity(n);
    let mut runs: Vec<Option<Uuid>> = Vec::with_capacity(n);
    let mut prios = Vec::with_capacity(n);
    let mut payloads = Vec::with_capacity(n);
    let mut max_attempts = Vec::with_capacity(n);
    let mut run_ats: Vec<Option<DateTime<Utc>>> = Vec::with_capacity(n);
    let mut delays = Vec::with_capacity(n);
    let mut keys: Vec<Option<&str>> = Vec::with_capacity(n);
    for t in tasks {
        queues.push(t.queue.as_str());
        kinds.push(t.kind.as_str());
        tenants.push(t.tenant.as_str());
        runs.push(t.run_id.map(|r| r.as_uuid()));
        prios.push(t.priority);
        payloads.push(&t.payload);
        max_attempts.push(t.max_attempts);
        run_ats.push(t.run_at);
        delays.push(t.delay_us());
        keys.push(t.unique_key.as_deref());
    }
    let rows = client
        .query(
            sql!("queue/enqueue_many"),
            &[
                (&queues, Type::TEXT_ARRAY),
                (&kinds, Type::TEXT_ARRAY),
                (&tenants, Type::TEXT_ARRAY),
                (&runs, Type::UUID_ARRAY),
                (&prios, Type::INT2_ARRAY),
                (&payloads, Type::JSONB_ARRAY),
                (&max_attempts, Type::INT4_ARRAY),
                (&run_ats, Type::TIMESTAMPTZ_ARRAY),
                (&delays, Type::INT8_ARRAY),
                (&keys, Type::TEXT_ARRAY),
            ],
        )
        .await
        .map_err(|e| map_enqueue_error(e, None))?;
    Ok(rows.iter().map(|r| TaskId(r.get(0))).collect())
}

/// Turn the database's complaints about an enqueue into actionable input errors.
/// `tenant` names the tenant when the statement could not say which one was unknown.
pub(crate) fn map_enqueue_error(e: Error, tenant: Option<&str>) -> Error {
    use crate::sqlstate;
    let e = match e.into_driver() {
        Ok(e) => e,
        Err(other) => return other,
    };
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        match code {
            // pgcrew.enqueue_task: payload too large, delay too long (V011).
            sqlstate::PAYLOAD_TOO_LARGE => {
                return Error::invalid("payload", db.message().to_string());
            }
            sqlstate::DELAY_TOO_LONG => return Error::invalid("delay", db.message().to_string()),
            // A run_at PostgreSQL cannot represent.
            sqlstate::DATETIME_FIELD_OVERFLOW => {
                return Error::invalid(
                    "run_at",
                    format!(
                        "{}: give a time between 4713 BC and 294276 AD",
                        db.message()
                    ),
                );
            }
            _ => {}
        }
        if code == sqlstate::FOREIGN_KEY_VIOLATION && db.hint() == Some("pgcrew_missing_dependency")
        {
            return Error::invalid("depends_on", db.message().to_string());
        }
        if (code == sqlstate::FOREIGN_KEY_VIOLATION && db.hint() == Some("pgcrew_unknown_tenant"))
            || (code == sqlstate::NOT_NULL_VIOLATION && db.column() == Some("tenant_id"))
        {
            let what = match tenant {
                _ if code == sqlstate::FOREIGN_KEY_VIOLATION => db.message().to_string(),
                Some(t) => format!("tenant {t} does not exist"),
                None => "the tenant does not exist".to_string(),
            };
            return Error::invalid(
                "tenant",
                format!("{what}: create it first (`pgcrew tenants set <id>` or the tenancy API)"),
            );
        }
    }
    Error::from(e)
}
