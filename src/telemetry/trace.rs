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
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry::Context;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, Span, SpanData, SpanExporter, SpanProcessor};
use tokio_postgres::Row;
use tokio_postgres::types::{ToSql, Type};
use tracing::warn;

use crate::db::Executor;
use crate::db::{Handle, handle_of};
use tracing_opentelemetry::OpenTelemetrySpanExt;

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
/// span's `traceparent` as the default trace context of the rows it inserts (V027), reset right
/// after, on one connection (taken from the pool when `on` is the pool). Without tracing, or
/// outside a recorded span, this is `on.query_one(sql, params)` alone.
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
        let conn = db.get().await?;
        return traced(&conn, &tp, sql, params).await;
    }
    traced(on, &tp, sql, params).await
}

async fn traced<E: Executor + ?Sized>(
    on: &E,
    traceparent: &String,
    sql: &str,
    params: &[(&(dyn ToSql + Sync), Type)],
) -> crate::error::Result<Row> {
    on.execute(sql!("telemetry/set_trace_context"), typed![traceparent])
        .await?;
    let result = on.query_one(sql, params).await;
    let empty = String::new();
    let reset = on
        .execute(sql!("telemetry/set_trace_context"), typed![&empty])
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

/// Queue and batch settings of the export (the `OTEL_BSP_*` variables).
#[derive(Debug, Clone, Copy)]
pub struct ExportSettings {
    /// Spans queued at most; later ones are dropped (and counted).
    pub max_queue: usize,
    /// Spans per export at most.
    pub max_batch: usize,
    /// How long a partial batch waits.
    pub delay: Duration,
}

impl ExportSettings {
    fn from_env() -> ExportSettings {
        let num = |k: &str, d: usize| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .filter(|n| *n > 0)
                .unwrap_or(d)
        };
        ExportSettings {
            max_queue: num("OTEL_BSP_MAX_QUEUE_SIZE", 2048),
            max_batch: num("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512),
            delay: Duration::from_millis(num("OTEL_BSP_SCHEDULE_DELAY", 1000) as u64),
        }
    }
}

enum Msg {
    Span(Box<SpanData>),
    Flush(SyncSender<()>),
}

/// The span processor: a bounded queue that never blocks, drained by one export thread.
#[derive(Debug)]
struct BoundedExport {
    tx: Mutex<Option<SyncSender<Msg>>>,
    resource: Arc<Mutex<Option<Resource>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl BoundedExport {
    /// Start the export thread; it builds the exporter itself (an HTTP client that blocks must
    /// not be built or dropped on an async runtime's thread).
    fn start<E, B, BE>(build: B, settings: ExportSettings) -> BoundedExport
    where
        E: SpanExporter + 'static,
        B: FnOnce() -> std::result::Result<E, BE> + Send + 'static,
        BE: std::fmt::Display,
    {
        let (tx, rx) = sync_channel::<Msg>(settings.max_queue);
        let resource = Arc::new(Mutex::new(None));
        let res = resource.clone();
        let thread = std::thread::Builder::new()
            .name("pgcrew-otlp".into())
            .spawn(move || match build() {
                Ok(exporter) => export_loop(exporter, rx, settings, res),
                Err(e) => {
                    warn!(error = %e, "OpenTelemetry: the OTLP exporter could not be built; spans are dropped (counted in pgcrew_otel_spans_dropped_total)");
                    drop(rx);
                }
            })
            .ok();
        BoundedExport {
            tx: Mutex::new(Some(tx)),
            resource,
            thread: Mutex::new(thread),
        }
    }

    fn sender(&self) -> Option<SyncSender<Msg>> {
        self.tx.lock().ok().and_then(|g| g.clone())
    }
}

impl SpanProcessor for BoundedExport {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        let Some(tx) = self.sender() else { return };
        match tx.try_send(Msg::Span(Box::new(span))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                super::global().spans_dropped.inc();
            }
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        let Some(tx) = self.sender() else {
            return Ok(());
        };
        let (done_tx, done_rx) = sync_channel(1);
        // Waits for queue room at most as long as for the flush itself.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut msg = Msg::Flush(done_tx);
        loop {
            match tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Full(m)) if Instant::now() < deadline => {
                    msg = m;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return Err(OTelSdkError::Timeout(Duration::from_secs(5))),
            }
        }
        done_rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .map_err(|_| OTelSdkError::Timeout(Duration::from_secs(5)))
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        if let Ok(mut g) = self.tx.lock() {
            g.take();
        }
        if let Some(t) = self.thread.lock().ok().and_then(|mut g| g.take()) {
            let _ = t.join();
        }
        Ok(())
    }

    fn set_resource(&mut self, resource: &Resource) {
        if let Ok(mut g) = self.resource.lock() {
            *g = Some(resource.clone());
        }
    }
}

fn export_loop<E: SpanExporter>(
    mut exporter: E,
    rx: Receiver<Msg>,
    settings: ExportSettings,
    resource: Arc<Mutex<Option<Resource>>>,
) {
    let warned = AtomicBool::new(false);
    let mut resource_set = false;
    let mut batch: Vec<SpanData> = Vec::new();
    let mut due = Instant::now() + settings.delay;
    loop {
        let wait = due.saturating_duration_since(Instant::now());
        let (flush, ended, ack) = match rx.recv_timeout(wait) {
            Ok(Msg::Span(s)) => {
                batch.push(*s);
                (batch.len() >= settings.max_batch, false, None)
            }
            Ok(Msg::Flush(done)) => (true, false, Some(done)),
            Err(RecvTimeoutError::Timeout) => (true, false, None),
            Err(RecvTimeoutError::Disconnected) => (true, true, None),
        };
        if flush {
            if !resource_set && let Some(r) = resource.lock().ok().and_then(|g| g.clone()) {
                exporter.set_resource(&r);
                resource_set = true;
            }
            if !batch.is_empty() {
                let spans = std::mem::take(&mut batch);
                let n = spans.len() as u64;
                match block_on(exporter.export(spans)) {
                    Ok(()) => {
                        super::global().spans_exported.inc_by(n);
                    }
                    Err(e) => {
                        super::global().spans_dropped.inc_by(n);
                        if !warned.swap(true, Ordering::Relaxed) {
                            warn!(error = %e, "OpenTelemetry: exporting spans failed (further failures are counted in pgcrew_otel_spans_dropped_total, not logged)");
                        }
                    }
                }
            }
            due = Instant::now() + settings.delay;
        }
        if let Some(done) = ack {
            let _ = done.send(());
        }
        if ended {
            let _ = exporter.shutdown();
            return;
        }
    }
}

/// Drive a future to completion on this (export) thread.
fn block_on<F: std::future::Future>(fut: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        if let std::task::Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}
