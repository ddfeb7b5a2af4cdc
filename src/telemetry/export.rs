//! The span export behind [`otlp_layer`](super::trace::otlp_layer): a bounded queue that never
//! blocks the caller, drained by one thread that batches spans and sends them with the OTLP
//! exporter; full-queue drops and failed batches are counted, the first failure is logged.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry::Context;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter, SpanProcessor};
use tracing::warn;

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
    pub(super) fn from_env() -> ExportSettings {
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
pub(super) struct BoundedExport {
    tx: Mutex<Option<SyncSender<Msg>>>,
    resource: Arc<Mutex<Option<Resource>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl BoundedExport {
    /// Start the export thread; it builds the exporter itself (an HTTP client that blocks must
    /// not be built or dropped on an async runtime's thread).
    pub(super) fn start<E, B, BE>(build: B, settings: ExportSettings) -> BoundedExport
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

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use opentelemetry::trace::{Tracer as _, TracerProvider as _};
    use opentelemetry_sdk::trace::SdkTracerProvider;

    use super::*;

    /// An exporter that waits for `go` before each export, then fails it.
    #[derive(Debug)]
    struct Stuck {
        go: Mutex<mpsc::Receiver<()>>,
        batches: Arc<Mutex<Vec<usize>>>,
    }

    impl SpanExporter for Stuck {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            if let Ok(rx) = self.go.lock() {
                let _ = rx.recv();
            }
            if let Ok(mut b) = self.batches.lock() {
                b.push(batch.len());
            }
            Err(OTelSdkError::InternalFailure("collector down".into()))
        }
    }

    #[test]
    fn a_full_queue_and_a_failed_export_drop_spans_counted_and_never_block() {
        let dropped_before = crate::telemetry::global().spans_dropped.get();
        let (go, rx) = mpsc::channel();
        let batches = Arc::new(Mutex::new(Vec::new()));
        let exporter = Stuck {
            go: Mutex::new(rx),
            batches: batches.clone(),
        };
        let settings = ExportSettings {
            max_queue: 4,
            max_batch: 1,
            delay: Duration::from_millis(10),
        };
        let provider = SdkTracerProvider::builder()
            .with_span_processor(BoundedExport::start(
                move || Ok::<_, String>(exporter),
                settings,
            ))
            .build();
        let tracer = provider.tracer("test");
        // The export thread takes one span and waits in the exporter; the queue holds 4; the
        // other 15 are dropped at once (if on_end blocked, this loop would never finish).
        for i in 0..20 {
            tracer.in_span(format!("s{i}"), |_| {});
        }
        for _ in 0..64 {
            let _ = go.send(());
        }
        let _ = provider.force_flush();
        let _ = provider.shutdown();
        let exported: usize = batches.lock().map(|b| b.iter().sum()).unwrap_or(0);
        let dropped = crate::telemetry::global().spans_dropped.get() - dropped_before;
        // Every span is accounted for: dropped at the queue, or dropped by the failed export.
        assert_eq!(dropped, 20, "exported batches: {exported}");
        assert!((1..=5).contains(&exported), "{exported}");
    }
}
