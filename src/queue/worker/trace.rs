//! Tracing the pool's work: each claimed task continues the trace stored with it (its run's,
//! or its own; V027) in a `pgcrew.claim` span (a marker with the queue wait and batch size)
//! and a `pgcrew.task` span around the handler, on whichever instance claimed it; a task
//! without a stored trace starts one with its `pgcrew.task` span, sampled at the head
//! ([`crate::telemetry::trace::sample_root`]: an unsampled one records no span at all). Only
//! while OpenTelemetry tracing is on ([`crate::telemetry::trace::enabled`]); otherwise there
//! are no spans and nothing is read. The fast claim returns each task's stored context; only
//! tasks of a run (whose run's context comes first) or from the general claim are read again.

use std::collections::HashMap;
use std::sync::Arc;

use std::time::SystemTime;

use opentelemetry::Context;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing::info_span;

use super::Shared;
use crate::db::{Db, Executor};
use crate::ids::{RunId, TaskId};
use crate::queue::claim::{ClaimedTask, StoredTrace};
use crate::telemetry::TaskSpan;
use crate::telemetry::trace::{
    context_from, enabled, record_task_span, sample_root, set_remote_parent,
};

/// A task's `pgcrew.task` span while its handler runs: the OpenTelemetry context the handler
/// runs in (its spans, and the trace context of what it enqueues, are children of this span),
/// recorded when the task ends. Not a `tracing` span through the OpenTelemetry layer, nor even
/// the SDK's `SpanData`: one span per task is tracing's largest cost at a queue's rates, so it is
/// kept as the few figures a [`TaskSpan`] holds and written to OTLP from them (`bench
/// observability`, README).
pub(super) struct TaskTrace {
    /// The context of the span, or of the unsampled trace it continues.
    cx: Context,
    /// What is recorded at the end; `None` when the trace is not sampled.
    span: Option<Started>,
}

/// A sampled task span's figures known when its handler starts.
struct Started {
    trace_id: TraceId,
    span_id: SpanId,
    parent_span_id: SpanId,
    trace_state: TraceState,
    start: SystemTime,
    task_id: i64,
    attempt: i64,
    run_id: Option<RunId>,
    queue_wait_ms: f64,
}

impl TaskTrace {
    /// The trace of `task`: a child of the trace context stored with it (sampled when that
    /// one was), or a new trace drawn at the sampling ratio. `None` without tracing, or for a
    /// new trace not drawn (no span, no context).
    pub(super) fn start(task: &ClaimedTask, traceparent: Option<&str>) -> Option<TaskTrace> {
        if !enabled() {
            return None;
        }
        Self::begin(task, traceparent, sample_root)
    }

    /// [`TaskTrace::start`] with tracing on and `draw` deciding a new trace's sampling.
    fn begin(
        task: &ClaimedTask,
        traceparent: Option<&str>,
        draw: impl FnOnce() -> bool,
    ) -> Option<TaskTrace> {
        let parent = traceparent.and_then(context_from);
        let (trace_id, parent_span_id, trace_state, sampled) = match &parent {
            Some(cx) => {
                let p = cx.span().span_context().clone();
                (
                    p.trace_id(),
                    p.span_id(),
                    p.trace_state().clone(),
                    p.is_sampled(),
                )
            }
            None if draw() => (
                TraceId::from(fastrand::u128(1..)),
                SpanId::INVALID,
                TraceState::default(),
                true,
            ),
            None => return None,
        };
        if !sampled {
            // The children stay out of the trace too (parent-based sampling).
            return parent.map(|cx| TaskTrace { cx, span: None });
        }
        let span_id = SpanId::from(fastrand::u64(1..));
        let cx = Context::new().with_remote_span_context(SpanContext::new(
            trace_id,
            span_id,
            TraceFlags::SAMPLED,
            false,
            trace_state.clone(),
        ));
        Some(TaskTrace {
            cx,
            span: Some(Started {
                trace_id,
                span_id,
                parent_span_id,
                trace_state,
                start: SystemTime::now(),
                task_id: task.id.0,
                attempt: i64::from(task.attempt),
                run_id: task.run_id,
                queue_wait_ms: task.lag.as_secs_f64() * 1000.0,
            }),
        })
    }

    /// The context the handler runs in.
    pub(super) fn context(&self) -> Context {
        self.cx.clone()
    }

    /// The handler of the task of `queue` and `kind` returned `failed` (an error or a panic:
    /// the span's status is an error): record the span.
    pub(super) fn end(self, queue: Arc<str>, kind: Arc<str>, failed: Option<&str>) {
        if let Some(span) = self.finish(queue, kind, failed) {
            record_task_span(span);
        }
    }

    /// The span to record, if the trace is sampled.
    fn finish(self, queue: Arc<str>, kind: Arc<str>, failed: Option<&str>) -> Option<TaskSpan> {
        let s = self.span?;
        Some(TaskSpan {
            trace_id: s.trace_id,
            span_id: s.span_id,
            parent_span_id: s.parent_span_id,
            trace_state: s.trace_state,
            start: s.start,
            end: SystemTime::now(),
            queue,
            kind,
            task_id: s.task_id,
            attempt: s.attempt,
            run_id: s.run_id,
            queue_wait_ms: s.queue_wait_ms,
            error: failed.map(str::to_string),
        })
    }
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use opentelemetry::Value;
    use opentelemetry::trace::Status;
    use opentelemetry_sdk::trace::SpanData;

    use super::*;
    use crate::ids::{ClaimToken, RunId, TenantId};
    use crate::queue::Priority;

    fn task(run: Option<RunId>) -> ClaimedTask {
        ClaimedTask {
            id: TaskId(42),
            queue: "q".into(),
            kind: "k".into(),
            tenant: TenantId::new("acme").unwrap(),
            run_id: run,
            priority: Priority::Normal,
            payload: serde_json::Value::Null,
            attempt: 2,
            max_attempts: 5,
            token: ClaimToken::new(),
            run_at: chrono::Utc::now(),
            created_at: chrono::Utc::now(),
            lag: Duration::from_micros(1500),
            stored_trace: StoredTrace::Unknown,
        }
    }

    const SAMPLED: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    const UNSAMPLED: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";

    fn attr<'a>(s: &'a SpanData, k: &str) -> Option<&'a Value> {
        s.attributes
            .iter()
            .find(|kv| kv.key.as_str() == k)
            .map(|kv| &kv.value)
    }

    #[test]
    fn a_task_continues_its_stored_trace_or_starts_one_when_drawn() {
        // A stored, sampled trace: a child span of it, whose context the handler runs in.
        let run = RunId::new();
        let t = TaskTrace::begin(&task(Some(run)), Some(SAMPLED), || false).unwrap();
        let cx = t.context();
        let recorded = t.finish("q".into(), "k".into(), Some("boom")).unwrap();
        assert_eq!(&*recorded.queue, "q");
        let span = recorded.into_span_data();
        assert_eq!(
            span.span_context.trace_id(),
            TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap()
        );
        assert_eq!(
            span.parent_span_id,
            SpanId::from_hex("b7ad6b7169203331").unwrap()
        );
        assert!(span.parent_span_is_remote && span.span_context.is_sampled());
        assert_eq!(
            cx.span().span_context().span_id(),
            span.span_context.span_id()
        );
        assert_eq!(span.name, "pgcrew.task");
        assert_eq!(span.status, Status::error("boom"));
        assert_eq!(attr(&span, "task_id"), Some(&Value::I64(42)));
        assert_eq!(attr(&span, "attempt"), Some(&Value::I64(2)));
        assert_eq!(attr(&span, "queue"), Some(&Value::from("q")));
        assert_eq!(attr(&span, "run_id"), Some(&Value::from(run.to_string())));
        assert_eq!(attr(&span, "queue_wait_ms"), Some(&Value::F64(1.5)));
        assert!(span.end_time >= span.start_time);

        // A stored trace that was not sampled: no span, and the handler's spans stay out too.
        let t = TaskTrace::begin(&task(None), Some(UNSAMPLED), || true).unwrap();
        assert!(!t.context().span().span_context().is_sampled());
        assert!(t.finish("q".into(), "k".into(), None).is_none());

        // No stored trace: a new one when drawn (a root), none at all otherwise.
        let span = TaskTrace::begin(&task(None), None, || true)
            .unwrap()
            .finish("q".into(), "k".into(), None)
            .unwrap()
            .into_span_data();
        assert_eq!(span.parent_span_id, SpanId::INVALID);
        assert!(!span.parent_span_is_remote);
        assert_eq!(span.status, Status::Unset);
        assert_eq!(attr(&span, "run_id"), None);
        assert!(TaskTrace::begin(&task(None), None, || false).is_none());
        // A stored value that is not a trace context counts as none.
        assert!(TaskTrace::begin(&task(None), Some("garbage"), || false).is_none());
    }
}
