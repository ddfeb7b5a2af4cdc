//! OpenTelemetry traces: the W3C trace context carried by tasks and runs, and the OTLP export.
//!
//! Spans are `tracing` spans (target `pgcrew`): `pgcrew.enqueue`, `pgcrew.claim`,
//! `pgcrew.task`, `pgcrew.run_transition`, `pgcrew.model_step`, `pgcrew.tool_step`. With the
//! layer of [`otlp_layer`] installed they become OpenTelemetry spans; without it nothing is
//! stored or exported and [`current_traceparent`] is `None`.
//!
//! Enqueueing stores the `traceparent` of its span with the task and the run
//! (`pgcrew.tasks.trace_context`, `pgcrew.runs.trace_context`, V027); the instance that
//! claims the task makes that context the parent of its `pgcrew.task` span (the run's when the
//! task belongs to a run), so one agent run is one trace across instances, retries and
//! failovers.
//!
//! The export never blocks a task: finished spans go into a bounded queue
//! (`OTEL_BSP_MAX_QUEUE_SIZE`, default 2048) drained by one thread; a full queue drops the span
//! and a failed export drops its batch, both counted in `pgcrew_otel_spans_dropped_total`; the
//! first failure logs one warning.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::Context;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tokio_postgres::Row;
use tokio_postgres::types::{ToSql, Type};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::export::{BoundedExport, ExportSettings};
use crate::db::{Executor, Handle, handle_of};

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether an OpenTelemetry export was set up in this process ([`otlp_layer`] or
/// [`set_enabled`]): only then are trace contexts stored and restored (no cost otherwise).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Turn tracing on or off: storing and restoring trace contexts, and the spans the layer of
/// [`otlp_layer`] records (for a layer installed by other means, only the former).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// `on.query_one(sql, params)` (a statement that creates tasks or runs) with the current
/// span's `traceparent` as the default trace context of the rows it inserts (V027). On the pool
/// (`&db`): in a transaction of its own with a transaction-local setting (safe behind PgBouncer
/// in transaction mode); on a connection or transaction: a session setting, reset right after.
/// Without tracing, or outside a recorded span, this is `on.query_one(sql, params)` alone.
pub async fn query_one_traced<E>(
    on: &E,
    sql: &str,
    params: &[(&(dyn ToSql + Sync), Type)],
) -> crate::error::Result<Row>
where
    E: Executor + ?Sized,
{
    let Some(tp) = enabled().then(current_traceparent).flatten() else {
        return on.query_one(sql, params).await;
    };
    if let Handle::Pool(db) = handle_of(on) {
        let mut conn = db.get().await?;
        let tx = conn.transaction().await?;
        tx.execute(sql!("telemetry/set_trace_context"), typed![&tp, &true])
            .await?;
        let row = Executor::query_one(&tx, sql, params).await?;
        tx.commit().await?;
        return Ok(row);
    }
    on.execute(sql!("telemetry/set_trace_context"), typed![&tp, &false])
        .await?;
    let result = on.query_one(sql, params).await;
    let empty = String::new();
    let reset = on
        .execute(sql!("telemetry/set_trace_context"), typed![&empty, &false])
        .await;
    let row = result?;
    reset?;
    Ok(row)
}

/// The `traceparent` of `span` (W3C trace context), when it is recorded by an OpenTelemetry
/// layer; `None` otherwise (no layer, or not sampled).
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove("traceparent")
}

/// The `traceparent` of the current span (see [`traceparent_of`]).
pub fn current_traceparent() -> Option<String> {
    traceparent_of(&tracing::Span::current())
}

/// The context a stored `traceparent` names (`None` when it is not a valid one).
pub fn context_from(traceparent: &str) -> Option<Context> {
    let carrier = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    cx.span().span_context().is_valid().then_some(cx)
}

/// Make the span a stored `traceparent` names the parent of `span` (ignored when it is absent
/// or invalid, or no OpenTelemetry layer records `span`).
pub fn set_remote_parent(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(cx) = traceparent.and_then(context_from) {
        let _ = span.set_parent(cx);
    }
}

/// What [`otlp_layer`] returns besides the layer: flushes and stops the export on
/// [`OtelGuard::shutdown`] (or on drop).
#[derive(Debug)]
pub struct OtelGuard {
    provider: SdkTracerProvider,
}

impl OtelGuard {
    /// Export what is queued (bounded wait) and stop the export thread.
    pub fn shutdown(&self) {
        let _ = self.provider.force_flush();
        let _ = self.provider.shutdown();
    }
}

impl Drop for OtelGuard {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A `tracing` layer exporting pgcrew's spans over OTLP/HTTP, when `OTEL_EXPORTER_OTLP_ENDPOINT`
/// (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set; `None` otherwise. The standard variables
/// apply (`OTEL_SERVICE_NAME`, `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_BSP_MAX_QUEUE_SIZE`,
/// `OTEL_BSP_SCHEDULE_DELAY`, `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`). Only spans of target `pgcrew*`
/// are recorded (the exporter's own HTTP client is never traced).
pub fn otlp_layer<S>(
    service_name: &str,
) -> Option<(
    impl tracing_subscriber::Layer<S> + Send + Sync + 'static,
    OtelGuard,
)>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a> + Send + Sync,
{
    let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.trim().is_empty());
    if !set("OTEL_EXPORTER_OTLP_ENDPOINT") && !set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        return None;
    }
    Some(otlp_layer_to(service_name, None))
}

/// [`otlp_layer`] exporting to `traces_url` (the full URL, e.g.
/// `http://127.0.0.1:4318/v1/traces`) whatever the environment says (`None`: the environment's
/// endpoint).
pub fn otlp_layer_to<S>(
    service_name: &str,
    traces_url: Option<&str>,
) -> (
    impl tracing_subscriber::Layer<S> + Send + Sync + 'static,
    OtelGuard,
)
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a> + Send + Sync,
{
    let url = traces_url.map(str::to_string);
    let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service_name.to_string());
    let provider = SdkTracerProvider::builder()
        .with_span_processor(BoundedExport::start(
            move || {
                use opentelemetry_otlp::WithExportConfig as _;
                let builder = opentelemetry_otlp::SpanExporter::builder().with_http();
                match url {
                    Some(u) => builder.with_endpoint(u).build(),
                    None => builder.build(),
                }
            },
            ExportSettings::from_env(),
        ))
        .with_resource(Resource::builder().with_service_name(service).build())
        .build();
    let tracer = provider.tracer("pgcrew");
    set_enabled(true);
    use tracing_subscriber::Layer as _;
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        // Dynamic: decided per span, not cached per callsite, so set_enabled takes effect for
        // callsites first hit while tracing was off.
        .with_filter(tracing_subscriber::filter::dynamic_filter_fn(|m, _| {
            enabled() && m.target().starts_with("pgcrew")
        }));
    (layer, OtelGuard { provider })
}
