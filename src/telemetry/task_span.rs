//! A worker pool's `pgcrew.task` span as it is recorded: its ids, times and the task's
//! figures, with no attribute list, no boxed copy and no scope of its own. One is recorded per
//! sampled task, so at a queue's rates it is tracing's largest cost; kept this small it is
//! queued inline, and the OTLP exporter writes its protobuf straight from these fields
//! ([`super::otlp`]); the bytes equal those of the same span as the SDK's `SpanData` (tested).

use std::sync::Arc;
use std::time::SystemTime;

use opentelemetry::trace::{SpanId, TraceId, TraceState};
#[cfg(test)]
use opentelemetry_sdk::trace::SpanData;

use crate::ids::RunId;

/// The name of a task's span.
pub(crate) const TASK_SPAN_NAME: &str = "pgcrew.task";

/// A finished, sampled `pgcrew.task` span (the handler's run of one attempt of a task).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TaskSpan {
    /// The trace: the stored context's, or a new one.
    pub trace_id: TraceId,
    /// This span.
    pub span_id: SpanId,
    /// The stored context's span (a remote parent), or `SpanId::INVALID` for a trace's root.
    pub parent_span_id: SpanId,
    /// The stored context's trace state (empty for a new trace).
    pub trace_state: TraceState,
    /// When the handler started.
    pub start: SystemTime,
    /// When it returned.
    pub end: SystemTime,
    /// Attribute `queue` (shared with the recording loop's series cache: no copy per task).
    pub queue: Arc<str>,
    /// Attribute `kind` (shared likewise).
    pub kind: Arc<str>,
    /// Attribute `task_id`.
    pub task_id: i64,
    /// Attribute `attempt`.
    pub attempt: i64,
    /// Attribute `run_id`, for a task of a run.
    pub run_id: Option<RunId>,
    /// Attribute `queue_wait_ms`: from when the task was due to its claim.
    pub queue_wait_ms: f64,
    /// The handler's error (an error status), or `None` (status unset).
    pub error: Option<String>,
}

impl TaskSpan {
    /// Whether the parent is a remote one (a stored context), not this trace's root.
    pub(crate) fn parent_is_remote(&self) -> bool {
        self.parent_span_id != SpanId::INVALID
    }

    /// The same span as the SDK's `SpanData` (for exporters other than OTLP's: the tests'), with attributes in the order the OTLP exporter
    /// writes them: queue, kind, task_id, attempt, run_id when set, queue_wait_ms).
    #[cfg(test)]
    pub(crate) fn into_span_data(self) -> SpanData {
        use opentelemetry::KeyValue;
        use opentelemetry::trace::{SpanContext, SpanKind, Status, TraceFlags};
        use opentelemetry_sdk::trace::{SpanEvents, SpanLinks};
        let remote = self.parent_is_remote();
        let mut attributes = Vec::with_capacity(6);
        attributes.push(KeyValue::new("queue", self.queue.to_string()));
        attributes.push(KeyValue::new("kind", self.kind.to_string()));
        attributes.push(KeyValue::new("task_id", self.task_id));
        attributes.push(KeyValue::new("attempt", self.attempt));
        if let Some(run) = self.run_id {
            attributes.push(KeyValue::new("run_id", run.to_string()));
        }
        attributes.push(KeyValue::new("queue_wait_ms", self.queue_wait_ms));
        SpanData {
            span_context: SpanContext::new(
                self.trace_id,
                self.span_id,
                TraceFlags::SAMPLED,
                false,
                self.trace_state,
            ),
            parent_span_id: self.parent_span_id,
            parent_span_is_remote: remote,
            span_kind: SpanKind::Internal,
            name: std::borrow::Cow::Borrowed(TASK_SPAN_NAME),
            start_time: self.start,
            end_time: self.end,
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: self.error.map_or(Status::Unset, Status::error),
            instrumentation_scope: super::trace::scope(),
        }
    }
}
