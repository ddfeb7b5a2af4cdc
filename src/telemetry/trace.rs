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
//! Sampling is at the head and parent-based: a span with a parent (local, or the stored context
//! of a task or run) is sampled when its parent was, so a sampled trace stays whole across
//! instances; a trace's first span is sampled with the ratio of the standard
//! `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` (`always_on` or unset: 1, `always_off`: 0,
//! `traceidratio` / `parentbased_traceidratio`: the argument), or [`set_sample_ratio`]. A
//! worker pool decides a task's root span before creating it ([`sample_root`]), so an unsampled
//! task costs no span at all.
//!
//! The export never blocks a task: finished spans go into a bounded queue
//! (`OTEL_BSP_MAX_QUEUE_SIZE`, default 2048) drained by one thread; a full queue drops the span
//! and a failed export drops its batch, both counted in `pgcrew_otel_spans_dropped_total`; the
//! first failure logs one warning.

use std::collections::HashMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use opentelemetry::Context;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{Link, SpanKind, TraceContextExt, TraceId, TracerProvider as _};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SamplingResult, SdkTracerProvider, ShouldSample};
use tokio_postgres::Row;
use tokio_postgres::types::{ToSql, Type};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::TaskSpan;
use super::export::{BoundedExport, ExportSettings, SpanSink};
use super::otlp::{OtlpConfig, OtlpHttp};
use crate::db::{Executor, Handle, handle_of};

static ENABLED: AtomicBool = AtomicBool::new(false);

/// The export queue of the last [`otlp_layer`] set up, for spans recorded without a tracer
/// ([`record_task_span`]).
static SINK: RwLock<Option<SpanSink>> = RwLock::new(None);

/// The instrumentation scope of pgcrew's spans (the tracer's: `pgcrew`).
pub(crate) fn scope() -> InstrumentationScope {
    InstrumentationScope::builder("pgcrew").build()
}

/// Queue a worker pool's `pgcrew.task` span (one per sampled task; recorded without a tracer,
/// as the few figures of a [`TaskSpan`], which costs a fraction of a `tracing` span through the
/// OpenTelemetry layer) for export with the others. Dropped when no export is set up.
pub(crate) fn record_task_span(span: TaskSpan) {
    let guard = SINK
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(sink) = guard.as_ref() {
        sink.push_task(span);
    }
}

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

/// The sampling ratio of traces' first spans, as `f64` bits (1.0 until set).
static RATIO: AtomicU64 = AtomicU64::new(0x3FF0_0000_0000_0000);

/// The ratio of traces sampled at their first span (0 to 1; default 1, or what
/// `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` said when [`otlp_layer`] ran).
pub fn sample_ratio() -> f64 {
    f64::from_bits(RATIO.load(Ordering::Relaxed))
}

/// Sample this share of new traces (clamped to 0..=1; not a number: 1). Spans with a parent
/// follow their parent's decision whatever the ratio.
pub fn set_sample_ratio(ratio: f64) {
    let r = if ratio.is_nan() {
        1.0
    } else {
        ratio.clamp(0.0, 1.0)
    };
    RATIO.store(r.to_bits(), Ordering::Relaxed);
}

/// The ratio the standard variables name: `always_on` 1, `always_off` (or
/// `parentbased_always_off`) 0, `traceidratio` / `parentbased_traceidratio` their argument
/// (1 when it is missing or invalid, as the SDK does); `None` when the sampler is not set.
pub(crate) fn ratio_from(sampler: Option<&str>, arg: Option<&str>) -> Option<f64> {
    let arg = || {
        arg.and_then(|a| a.trim().parse::<f64>().ok())
            .filter(|r| (0.0..=1.0).contains(r))
            .unwrap_or(1.0)
    };
    match sampler?.trim() {
        "always_off" | "parentbased_always_off" => Some(0.0),
        "traceidratio" | "parentbased_traceidratio" => Some(arg()),
        _ => Some(1.0),
    }
}

/// Whether a trace started now (a task without a stored trace) is sampled: a draw against
/// [`sample_ratio`]. The span is then created and recorded (the sampler keeps the draw);
/// otherwise the caller creates none.
pub fn sample_root() -> bool {
    let r = sample_ratio();
    r >= 1.0 || (r > 0.0 && fastrand::f64() < r)
}

/// The sampler of traces' first spans (under `Sampler::ParentBased`, which applies a
/// parent's decision): by trace id at [`sample_ratio`], read at each decision (the ratio can be
/// changed after the provider is built). A worker pool's `pgcrew.task` spans do not come
/// through it: the pool draws their roots with [`sample_root`] and records them itself.
#[derive(Debug, Clone)]
struct RootSampler;

impl ShouldSample for RootSampler {
    fn should_sample(
        &self,
        parent_context: Option<&Context>,
        trace_id: TraceId,
        name: &str,
        span_kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[Link],
    ) -> SamplingResult {
        Sampler::TraceIdRatioBased(sample_ratio()).should_sample(
            parent_context,
            trace_id,
            name,
            span_kind,
            attributes,
            links,
        )
    }
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
    traceparent_in(&span.context())
}

/// The `traceparent` of the span in `cx`, when it is a valid one.
fn traceparent_in(cx: &Context) -> Option<String> {
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(cx, &mut carrier);
    carrier.remove("traceparent")
}

/// The `traceparent` of the current span (see [`traceparent_of`]); outside any recorded
/// `tracing` span, that of the current OpenTelemetry context (a worker pool's task handler runs
/// in its `pgcrew.task` span's context).
pub fn current_traceparent() -> Option<String> {
    traceparent_of(&tracing::Span::current()).or_else(|| traceparent_in(&Context::current()))
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
    let export = BoundedExport::start(
        move || OtlpHttp::new(OtlpConfig::from_env(url.as_deref())),
        ExportSettings::from_env(),
    );
    match SINK.write() {
        Ok(mut g) => *g = Some(export.sink()),
        Err(p) => *p.into_inner() = Some(export.sink()),
    }
    let provider = SdkTracerProvider::builder()
        .with_span_processor(export)
        .with_resource(Resource::builder().with_service_name(service).build())
        .with_sampler(Sampler::ParentBased(Box::new(RootSampler)))
        .build();
    let var = |k: &str| std::env::var(k).ok();
    if let Some(r) = ratio_from(
        var("OTEL_TRACES_SAMPLER").as_deref(),
        var("OTEL_TRACES_SAMPLER_ARG").as_deref(),
    ) {
        set_sample_ratio(r);
    }
    let tracer = provider.tracer("pgcrew");
    set_enabled(true);
    use tracing_subscriber::Layer as _;
    // Without the source location, thread and busy/idle attributes pgcrew's spans do not use:
    // each costs every span (the task span is one per task).
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
        // Dynamic: decided per span, not cached per callsite, so set_enabled takes effect for
        // callsites first hit while tracing was off.
        .with_filter(
            tracing_subscriber::filter::dynamic_filter_fn(|m, _| {
                enabled() && m.target().starts_with("pgcrew") && *m.level() <= tracing::Level::INFO
            })
            // Decided once per callsite where it can be: other crates' callsites (tokio-postgres
            // traces every message) never reach this layer, and nothing below INFO does, so
            // the process's level hint is not raised to TRACE for every event everywhere.
            .with_callsite_filter(|m| {
                if m.target().starts_with("pgcrew") && *m.level() <= tracing::Level::INFO {
                    tracing::subscriber::Interest::sometimes()
                } else {
                    tracing::subscriber::Interest::never()
                }
            })
            .with_max_level_hint(tracing::level_filters::LevelFilter::INFO),
        );
    (layer, OtelGuard { provider })
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceState};
    use opentelemetry_sdk::trace::SamplingDecision;

    use super::*;

    fn decide(parent: Option<bool>, name: &str) -> bool {
        let sampler = Sampler::ParentBased(Box::new(RootSampler));
        let cx = parent.map(|sampled| {
            let flags = if sampled {
                TraceFlags::SAMPLED
            } else {
                TraceFlags::default()
            };
            Context::new().with_remote_span_context(SpanContext::new(
                TraceId::from(7u128),
                SpanId::from(9u64),
                flags,
                true,
                TraceState::default(),
            ))
        });
        let r = sampler.should_sample(
            cx.as_ref(),
            TraceId::from(0x1234_5678_9abc_def0_1234_5678_9abc_def0u128),
            name,
            &SpanKind::Internal,
            &[],
            &[],
        );
        r.decision == SamplingDecision::RecordAndSample
    }

    /// One test: the ratio is process-wide.
    #[test]
    fn parent_based_with_the_ratio_for_roots() {
        assert_eq!(ratio_from(None, Some("0.5")), None);
        assert_eq!(ratio_from(Some("always_off"), None), Some(0.0));
        assert_eq!(
            ratio_from(Some("parentbased_traceidratio"), Some("0.25")),
            Some(0.25)
        );
        assert_eq!(ratio_from(Some("traceidratio"), Some("2")), Some(1.0));
        assert_eq!(ratio_from(Some("parentbased_always_on"), None), Some(1.0));

        set_sample_ratio(0.0);
        assert!(!sample_root());
        assert!(!decide(None, "enqueue"), "a root at ratio 0");
        assert!(
            decide(Some(true), "pgcrew.claim"),
            "a sampled parent's trace stays whole"
        );
        set_sample_ratio(1.0);
        assert!(sample_root());
        assert!(decide(None, "enqueue"));
        assert!(
            !decide(Some(false), "step_model"),
            "an unsampled parent's trace stays out"
        );
        set_sample_ratio(f64::NAN);
        assert_eq!(sample_ratio(), 1.0);
        set_sample_ratio(0.5);
        let drawn = (0..10_000).filter(|_| sample_root()).count();
        assert!((4_000..6_000).contains(&drawn), "{drawn} of 10,000 at 0.5");
        set_sample_ratio(1.0);
    }
}
