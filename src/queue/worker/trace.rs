//! Tracing the pool's work: each claimed task continues the trace stored with it (its run's,
//! or its own; V027) in a `pgcrew.claim` span (a marker with the queue wait and batch size)
//! and a `pgcrew.task` span around the handler, on whichever instance claimed it; a task
//! without a stored trace starts one with its `pgcrew.task` span, sampled at the head
//! ([`crate::telemetry::trace::sample_root`]: an unsampled one records no span at all). Only
//! while OpenTelemetry tracing is on ([`crate::telemetry::trace::enabled`]); otherwise there
//! are no spans and nothing is read. The fast claim returns each task's stored context; only
//! tasks of a run (whose run's context comes first) or from the general claim are read again.

use std::collections::HashMap;

use tracing::{Span, info_span};

use super::Shared;
use crate::db::{Db, Executor};
use crate::ids::TaskId;
use crate::queue::claim::{ClaimedTask, StoredTrace};
use crate::telemetry::trace::{enabled, sample_root, set_remote_parent};

/// The span a task's handler runs in, a child of the trace context stored with the task.
/// Without tracing, no span (a span the log layer records would cost every task).
pub(super) fn task_span(task: &ClaimedTask, traceparent: Option<&str>) -> Span {
    if !enabled() || (traceparent.is_none() && !sample_root()) {
        return Span::none();
    }
    // A root when no trace is stored (whatever span is current here).
    let span = info_span!(
        target: "pgcrew::queue",
        parent: None,
        "pgcrew.task",
        queue = %task.queue,
        kind = %task.kind,
        task_id = task.id.0,
        attempt = task.attempt,
        run_id = task.run_id.map(|r| r.to_string()),
        queue_wait_ms = task.lag.as_secs_f64() * 1000.0,
    );
    set_remote_parent(&span, traceparent);
    span
}

/// After a claim (tracing on): read the trace contexts of `tasks`, keep them for their
/// `pgcrew.task` spans, and record a `pgcrew.claim` span in the trace of each task that has
/// one (queue wait and batch size as attributes). A failed read only loses the links.
pub(super) async fn note_claims(db: &Db, shared: &Shared, tasks: &[ClaimedTask]) {
    if !enabled() || tasks.is_empty() {
        return;
    }
    let mut found: HashMap<TaskId, String> = HashMap::new();
    // Read only what the claim did not return: contexts of tasks of a run (the run's comes
    // first) and of tasks the general claim returned.
    let mut ids: Vec<i64> = Vec::new();
    for t in tasks {
        match (&t.stored_trace, t.run_id) {
            (StoredTrace::Task(Some(tp)), None) => {
                found.insert(t.id, tp.clone());
            }
            (StoredTrace::Task(None), None) => {}
            _ => ids.push(t.id.0),
        }
    }
    if !ids.is_empty() {
        let read = async {
            let conn = db.get().await?;
            Executor::query(&conn, sql!("telemetry/task_trace_contexts"), typed![&ids]).await
        }
        .await;
        match read {
            Ok(rows) => {
                for r in rows {
                    if let (Ok(id), Ok(tp)) = (r.try_get::<_, i64>(0), r.try_get::<_, String>(1)) {
                        found.insert(TaskId(id), tp);
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "worker pool: reading trace contexts failed"),
        }
    }
    // A claim marker only where it links instances (a task continuing a stored trace); a task
    // starting a trace of its own carries the queue wait on its `pgcrew.task` span.
    for t in tasks {
        let Some(tp) = found.get(&t.id).map(String::as_str) else {
            continue;
        };
        let span = info_span!(
            target: "pgcrew::queue",
            "pgcrew.claim",
            queue = %t.queue,
            kind = %t.kind,
            task_id = t.id.0,
            batch = tasks.len(),
            queue_wait_ms = t.lag.as_secs_f64() * 1000.0,
        );
        set_remote_parent(&span, Some(tp));
        drop(span);
    }
    shared.with_traces(|m| m.extend(found));
}
