//! The span export behind [`otlp_layer`](super::trace::otlp_layer): a bounded queue that never
//! blocks the caller, drained by one thread that batches spans and sends them with the OTLP
//! exporter; full-queue drops and failed batches are counted, the first failure is logged.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry::Context;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
#[cfg(test)]
use opentelemetry_sdk::trace::SpanExporter;
use opentelemetry_sdk::trace::{Span, SpanData, SpanProcessor};
use tracing::warn;

use super::TaskSpan;

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

// A task span is queued inline, whatever the size of the other messages: one is queued per
// sampled task, and boxing it would cost an allocation and a free each (the queue's slots are
// allocated once).
#[allow(clippy::large_enum_variant)]
enum Msg {
    Span(Box<SpanData>),
    /// Inline, one per sampled task.
    Task(TaskSpan),
    Flush(SyncSender<()>),
    Shutdown,
}

/// What the callers and the export thread share.
#[derive(Debug)]
struct Shared {
    /// Spans queued and not yet taken by the export thread.
    pending: AtomicUsize,
    /// Spans per export: the queue wakes the thread when this many wait.
    max_batch: usize,
    /// Set by shutdown: later spans are dropped (and counted).
    closed: AtomicBool,
    /// Times the export thread woke up (tests: it must not wake once per span).
    wakeups: AtomicU64,
}

/// The span processor: a bounded queue that never blocks, drained by one export thread.
///
/// The thread sleeps until a batch is full or the schedule delay has passed (or a flush or
/// shutdown asks): queuing a span is a lock-free push that wakes nobody, so a span costs its
/// caller no system call and no context switch. (A thread blocked in `recv` would be woken
/// for every span: two context switches per span, the largest part of tracing's cost at a
/// queue's rates.)
#[derive(Debug)]
pub(super) struct BoundedExport {
    sink: SpanSink,
    resource: Arc<Mutex<Option<Resource>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// The sending side of the export queue: [`BoundedExport::on_end`] queues the spans of the
/// SDK's tracer through it, and the worker pool's task spans are queued through a clone of it
/// without going through a tracer ([`super::trace::record_span`]).
#[derive(Debug, Clone)]
pub(super) struct SpanSink {
    tx: SyncSender<Msg>,
    shared: Arc<Shared>,
    /// The export thread, to wake it (`None` when it could not be spawned).
    waker: Option<std::thread::Thread>,
}

impl SpanSink {
    /// Queue a finished span without blocking (an unsampled one is skipped); a full queue or
    /// a stopped export drops it and counts it.
    pub(super) fn push(&self, span: SpanData) {
        if span.span_context.is_sampled() {
            self.send(Msg::Span(Box::new(span)));
        }
    }

    /// Queue a worker pool's task span, as [`SpanSink::push`] does a span (it is sampled).
    pub(super) fn push_task(&self, span: TaskSpan) {
        self.send(Msg::Task(span));
    }

    /// Queue a span message without blocking; a full queue or a stopped export drops it and
    /// counts it.
    fn send(&self, msg: Msg) {
        if self.shared.closed.load(Ordering::Relaxed) {
            super::global().spans_dropped.inc();
            return;
        }
        // Counted before the send, so the export thread's decrement always follows it.
        let queued = self.shared.pending.fetch_add(1, Ordering::Relaxed) + 1;
        match self.tx.try_send(msg) {
            Ok(()) => {
                // Wake the thread once per full batch, not per span.
                if queued == self.shared.max_batch {
                    self.wake();
                }
            }
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.shared.pending.fetch_sub(1, Ordering::Relaxed);
                super::global().spans_dropped.inc();
            }
        }
    }

    fn wake(&self) {
        if let Some(t) = &self.waker {
            t.unpark();
        }
    }
}

/// What the export thread sends its batches with: the SDK's spans and the worker pools' task
/// spans of one batch. The OTLP exporter writes task spans straight from their fields; any
/// other exporter would get them as `SpanData` (as the tests' do).
pub(super) trait Export: Send + 'static {
    /// Send one batch (blocking the export thread).
    fn export(&mut self, spans: Vec<SpanData>, tasks: Vec<TaskSpan>) -> OTelSdkResult;
    /// The resource of the spans.
    fn set_resource(&mut self, resource: &Resource);
    /// The export ends.
    fn shutdown(&mut self) -> OTelSdkResult;
}

/// An SDK span exporter as an [`Export`] (the tests' exporters): task spans are converted to
/// `SpanData` and follow the batch's other spans.
#[cfg(test)]
#[derive(Debug)]
pub(super) struct Sdk<E>(pub(super) E);

#[cfg(test)]
impl<E: SpanExporter + 'static> Export for Sdk<E> {
    fn export(&mut self, mut spans: Vec<SpanData>, tasks: Vec<TaskSpan>) -> OTelSdkResult {
        spans.extend(tasks.into_iter().map(TaskSpan::into_span_data));
        block_on(self.0.export(spans))
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.0.set_resource(resource);
    }

    fn shutdown(&mut self) -> OTelSdkResult {
        self.0.shutdown()
    }
}

impl BoundedExport {
    /// Start the export thread; it builds the exporter itself (an HTTP client that blocks must
    /// not be built or dropped on an async runtime's thread).
    pub(super) fn start<E, B, BE>(build: B, settings: ExportSettings) -> BoundedExport
    where
        E: Export,
        B: FnOnce() -> std::result::Result<E, BE> + Send + 'static,
        BE: std::fmt::Display,
    {
        let (tx, rx) = sync_channel::<Msg>(settings.max_queue);
        let resource = Arc::new(Mutex::new(None));
        let shared = Arc::new(Shared {
            pending: AtomicUsize::new(0),
            max_batch: settings.max_batch,
            closed: AtomicBool::new(false),
            wakeups: AtomicU64::new(0),
        });
        let (res, sh) = (resource.clone(), shared.clone());
        let thread = std::thread::Builder::new()
            .name("pgcrew-otlp".into())
            .spawn(move || match build() {
                Ok(exporter) => export_loop(exporter, rx, settings, res, sh),
                Err(e) => {
                    warn!(error = %e, "OpenTelemetry: the OTLP exporter could not be built; spans are dropped (counted in pgcrew_otel_spans_dropped_total)");
                    drop(rx);
                }
            })
            .ok();
        BoundedExport {
            sink: SpanSink {
                tx,
                waker: thread.as_ref().map(|t| t.thread().clone()),
                shared,
            },
            resource,
            thread: Mutex::new(thread),
        }
    }

    /// A sending handle of the queue.
    pub(super) fn sink(&self) -> SpanSink {
        self.sink.clone()
    }

    /// Send a control message (waits for queue room at most until `deadline`).
    fn control(&self, mut msg: Msg, deadline: Instant) -> bool {
        loop {
            match self.sink.tx.try_send(msg) {
                Ok(()) => {
                    self.sink.wake();
                    return true;
                }
                Err(TrySendError::Full(m)) if Instant::now() < deadline => {
                    msg = m;
                    self.sink.wake();
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return false,
            }
        }
    }

    /// A reader of the times the export thread woke up so far.
    #[cfg(test)]
    fn wakeups(&self) -> impl Fn() -> u64 + use<> {
        let shared = self.sink.shared.clone();
        move || shared.wakeups.load(Ordering::Relaxed)
    }
}

impl SpanProcessor for BoundedExport {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        self.sink.push(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        if self.sink.shared.closed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let (done_tx, done_rx) = sync_channel(1);
        // Waits for queue room at most as long as for the flush itself.
        let deadline = Instant::now() + Duration::from_secs(5);
        if !self.control(Msg::Flush(done_tx), deadline) {
            return Err(OTelSdkError::Timeout(Duration::from_secs(5)));
        }
        done_rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .map_err(|_| OTelSdkError::Timeout(Duration::from_secs(5)))
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        if self.sink.shared.closed.swap(true, Ordering::Relaxed) {
            return Ok(());
        }
        // A thread that never got the message (its exporter stuck past the timeout with the
        // queue full) is left to end on its own rather than waited for without bound.
        let deadline = Instant::now() + timeout;
        let sent = self.control(Msg::Shutdown, deadline);
        if let Some(t) = self.thread.lock().ok().and_then(|mut g| g.take()) {
            // The last export happens on the thread: wait for it until the deadline.
            while sent && !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            if !t.is_finished() {
                return Err(OTelSdkError::Timeout(timeout));
            }
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

fn export_loop<E: Export>(
    mut exporter: E,
    rx: Receiver<Msg>,
    settings: ExportSettings,
    resource: Arc<Mutex<Option<Resource>>>,
    shared: Arc<Shared>,
) {
    let warned = AtomicBool::new(false);
    let mut resource_set = false;
    let mut batch: Vec<SpanData> = Vec::new();
    let mut tasks: Vec<TaskSpan> = Vec::new();
    let mut acks: Vec<SyncSender<()>> = Vec::new();
    let mut due = Instant::now() + settings.delay;
    loop {
        // Take what is queued: spans up to a batch, and every control message before them.
        let mut ended = false;
        let mut flush = false;
        while batch.len() + tasks.len() < settings.max_batch {
            match rx.try_recv() {
                Ok(Msg::Span(s)) => {
                    shared.pending.fetch_sub(1, Ordering::Relaxed);
                    batch.push(*s);
                }
                Ok(Msg::Task(t)) => {
                    shared.pending.fetch_sub(1, Ordering::Relaxed);
                    tasks.push(t);
                }
                Ok(Msg::Flush(done)) => {
                    acks.push(done);
                    flush = true;
                }
                Ok(Msg::Shutdown) | Err(TryRecvError::Disconnected) => {
                    ended = true;
                    break;
                }
                Err(TryRecvError::Empty) => break,
            }
        }
        let full = batch.len() + tasks.len() >= settings.max_batch;
        if full || flush || ended || Instant::now() >= due {
            if !resource_set && let Some(r) = resource.lock().ok().and_then(|g| g.clone()) {
                exporter.set_resource(&r);
                resource_set = true;
            }
            if !batch.is_empty() || !tasks.is_empty() {
                let spans = std::mem::take(&mut batch);
                let done = std::mem::replace(&mut tasks, Vec::with_capacity(settings.max_batch));
                let n = (spans.len() + done.len()) as u64;
                match exporter.export(spans, done) {
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
        // A flush is answered once everything queued before it was exported (a full batch
        // taken before the flush message leaves the rest for the next pass).
        if !full || ended {
            for done in acks.drain(..) {
                let _ = done.send(());
            }
        }
        if ended {
            let _ = exporter.shutdown();
            return;
        }
        if !full && !flush {
            std::thread::park_timeout(due.saturating_duration_since(Instant::now()));
            shared.wakeups.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Drive a future to completion on this (export) thread.
#[cfg(test)]
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

    /// An exporter that counts the spans of each batch.
    #[derive(Debug)]
    struct Counting(Arc<Mutex<Vec<usize>>>);

    impl SpanExporter for Counting {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            if let Ok(mut b) = self.0.lock() {
                b.push(batch.len());
            }
            Ok(())
        }
    }

    #[test]
    fn the_export_thread_wakes_per_batch_not_per_span() {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let exporter = Counting(batches.clone());
        let settings = ExportSettings {
            max_queue: 4096,
            max_batch: 512,
            // Far away: only full batches and the flush export.
            delay: Duration::from_secs(600),
        };
        let export = BoundedExport::start(move || Ok::<_, String>(Sdk(exporter)), settings);
        let wakeups = export.wakeups();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(export)
            .build();
        let tracer = provider.tracer("test");
        // A burst, then spans one at a time as a queue's tasks end (the thread has gone back
        // to sleep between them).
        for i in 0..1_100 {
            tracer.in_span(format!("s{i}"), |_| {});
        }
        for i in 0..100 {
            tracer.in_span(format!("t{i}"), |_| {});
            std::thread::sleep(Duration::from_millis(2));
        }
        provider.force_flush().expect("flush");
        let got = batches.lock().map(|b| b.clone()).unwrap_or_default();
        assert_eq!(got.iter().sum::<usize>(), 1_200, "batches: {got:?}");
        assert!(got.iter().all(|n| *n <= 512), "{got:?}");
        let wakeups = wakeups();
        // Two full batches and the flush: a handful of wake-ups, where a thread woken for
        // each span would have woken for each of the last 100 at least.
        assert!(
            wakeups <= 10,
            "the export thread woke {wakeups} times for 1,200 spans"
        );
        let _ = provider.shutdown();
    }

    /// Tests that drop spans: the dropped-spans counter is process-wide.
    static DROPPING: Mutex<()> = Mutex::new(());

    #[test]
    fn shutdown_with_a_stuck_exporter_and_a_full_queue_gives_up_at_its_timeout() {
        let _serial = DROPPING.lock().unwrap_or_else(|p| p.into_inner());
        let (_go, rx) = mpsc::channel();
        let exporter = Stuck {
            go: Mutex::new(rx),
            batches: Arc::new(Mutex::new(Vec::new())),
        };
        let settings = ExportSettings {
            max_queue: 2,
            max_batch: 1,
            delay: Duration::from_millis(10),
        };
        let export = BoundedExport::start(move || Ok::<_, String>(Sdk(exporter)), settings);
        let provider = SdkTracerProvider::builder()
            .with_span_processor(export)
            .build();
        let tracer = provider.tracer("test");
        // One span in the stuck export, two filling the queue.
        for i in 0..8 {
            tracer.in_span(format!("s{i}"), |_| {});
        }
        // The export never returns (its `go` is never sent): shutdown must not wait for it.
        let r = provider.shutdown_with_timeout(Duration::from_millis(200));
        assert!(r.is_err(), "{r:?}");
    }

    #[test]
    fn a_full_queue_and_a_failed_export_drop_spans_counted_and_never_block() {
        let _serial = DROPPING.lock().unwrap_or_else(|p| p.into_inner());
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
                move || Ok::<_, String>(Sdk(exporter)),
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
