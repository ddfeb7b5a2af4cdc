//! This process's own instruments: the Prometheus series every module records into (tasks,
//! claims, acknowledgements, notifier, maintenance, model and tool calls, ledger appends), and
//! the OpenTelemetry trace plumbing ([`trace`]).
//!
//! The lowest layer of the crate (it imports nothing of pgcrew), so any module may record
//! into it; [`crate::metrics`] at the top renders it with the client's scrape-time gauges and
//! the cluster-wide ones.
//!
//! One registry per process ([`global`]), as Prometheus expects one target per process.
//! Labels are bounded: queues, kinds, models, tools, maintenance steps and outcomes, never run
//! or task ids; each labelled family keeps at most [`MAX_SERIES`] label sets and counts the
//! rest under the value `_other`.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

mod export;
mod labels;
mod otlp;
mod record;
mod series;
mod task_span;
pub mod trace;

pub(crate) use task_span::TaskSpan;

pub use labels::{
    Bounded, ModelLabel, ModelOutcome, ModelTokens, QueueKind, QueueLabel, StepLabel, ToolOutcome,
};
pub use series::{AttemptOutcome, Slot, TaskSeriesCache};

static RECORDING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Whether this process records into its series (default on; `pgcrew bench observability`
/// turns it off to measure what it costs).
pub fn recording() -> bool {
    RECORDING.load(Ordering::Relaxed)
}

/// Turn recording on or off (the series keep their values while off).
pub fn set_recording(on: bool) {
    RECORDING.store(on, Ordering::Relaxed);
}

/// The most label sets one family keeps; later ones are counted under `_other`.
pub const MAX_SERIES: usize = 2000;

/// The label value that stands for every label set past [`MAX_SERIES`].
pub const OTHER: &str = "_other";

fn duration_buckets() -> Histogram {
    // 1 ms .. ~65 s.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.001, 4.0, 9,
    ))
}

fn batch_buckets() -> Histogram {
    Histogram::new([1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0])
}

/// The instruments of this process (see the module docs for what each counts).
#[derive(Debug)]
pub struct Telemetry {
    /// Tasks claimed.
    pub tasks_claimed: Bounded<QueueKind, Counter>,
    /// Task attempts completed.
    pub tasks_succeeded: Bounded<QueueKind, Counter>,
    /// Task attempts failed (error, panic, timeout, cancellation, discard).
    pub tasks_failed: Bounded<QueueKind, Counter>,
    /// Failed attempts that will run again (attempts left).
    pub tasks_retried: Bounded<QueueKind, Counter>,
    /// Attempts snoozed.
    pub tasks_snoozed: Bounded<QueueKind, Counter>,
    /// Orphaned running tasks rescued by this instance's maintenance (while leader).
    pub tasks_rescued: Bounded<QueueKind, Counter>,
    /// Handler duration.
    pub task_duration: Bounded<QueueKind, Histogram>,
    /// Time from due to claimed (database clock).
    pub task_queue_wait: Bounded<QueueLabel, Histogram>,
    /// Tasks per claim that returned at least one.
    pub claim_batch: Histogram,
    /// Acknowledgements per statement.
    pub ack_batch: Histogram,
    /// Tasks held (claimed, not yet acknowledged).
    pub tasks_in_flight: Gauge,
    /// Acknowledgements found stale (claim lost).
    pub acks_stale: Counter,
    /// Acknowledgements the database refused on their own.
    pub acks_rejected: Counter,
    /// LISTEN connection re-established.
    pub notifier_reconnects: Counter,
    /// Resynchronisations announced to subscribers (reconnects, lagging subscribers, polls).
    pub notifier_resyncs: Counter,
    /// Maintenance step duration.
    pub maintenance_duration: Bounded<StepLabel, Histogram>,
    /// Rows affected by maintenance steps.
    pub maintenance_rows: Bounded<StepLabel, Counter>,
    /// Maintenance passes that failed.
    pub maintenance_errors: Counter,
    /// Model calls by model and outcome.
    pub model_calls: Bounded<ModelOutcome, Counter>,
    /// Model call latency.
    pub model_latency: Bounded<ModelOutcome, Histogram>,
    /// Tokens used.
    pub model_tokens: Bounded<ModelTokens, Counter>,
    /// Cost charged, in US dollars.
    pub model_cost_usd: Bounded<ModelLabel, Counter<f64, AtomicU64>>,
    /// Tool calls by tool and outcome.
    pub tool_calls: Bounded<ToolOutcome, Counter>,
    /// Ledger events appended.
    pub ledger_appends: Counter,
    /// Spans dropped by the OTLP export (queue full or export failed).
    pub spans_dropped: Counter,
    /// Spans exported.
    pub spans_exported: Counter,
    registry: Registry,
}

impl Telemetry {
    fn new() -> Telemetry {
        let mut t = Telemetry {
            tasks_claimed: Bounded::new(Counter::default),
            tasks_succeeded: Bounded::new(Counter::default),
            tasks_failed: Bounded::new(Counter::default),
            tasks_retried: Bounded::new(Counter::default),
            tasks_snoozed: Bounded::new(Counter::default),
            tasks_rescued: Bounded::new(Counter::default),
            task_duration: Bounded::new(duration_buckets),
            task_queue_wait: Bounded::new(duration_buckets),
            claim_batch: batch_buckets(),
            ack_batch: batch_buckets(),
            tasks_in_flight: Gauge::default(),
            acks_stale: Counter::default(),
            acks_rejected: Counter::default(),
            notifier_reconnects: Counter::default(),
            notifier_resyncs: Counter::default(),
            maintenance_duration: Bounded::new(duration_buckets),
            maintenance_rows: Bounded::new(Counter::default),
            maintenance_errors: Counter::default(),
            model_calls: Bounded::new(Counter::default),
            model_latency: Bounded::new(duration_buckets),
            model_tokens: Bounded::new(Counter::default),
            model_cost_usd: Bounded::new(Counter::default),
            tool_calls: Bounded::new(Counter::default),
            ledger_appends: Counter::default(),
            spans_dropped: Counter::default(),
            spans_exported: Counter::default(),
            registry: Registry::with_prefix("pgcrew"),
        };
        t.register_all();
        t
    }

    fn register_all(&mut self) {
        let r = &mut self.registry;
        self.tasks_claimed
            .register(r, "tasks_claimed", "Tasks claimed by this instance");
        self.tasks_succeeded
            .register(r, "tasks_succeeded", "Task attempts completed");
        self.tasks_failed.register(
            r,
            "tasks_failed",
            "Task attempts failed (error, panic, timeout, cancellation, discard)",
        );
        self.tasks_retried.register(
            r,
            "tasks_retried",
            "Failed task attempts that will run again",
        );
        self.tasks_snoozed
            .register(r, "tasks_snoozed", "Task attempts snoozed");
        self.tasks_rescued.register(
            r,
            "tasks_rescued",
            "Orphaned running tasks rescued by this instance's maintenance",
        );
        self.task_duration.register(
            r,
            "task_duration_seconds",
            "Handler duration of task attempts",
        );
        self.task_queue_wait.register(
            r,
            "task_queue_wait_seconds",
            "Time from due to claimed (database clock)",
        );
        r.register(
            "claim_batch_size",
            "Tasks per claim that returned any",
            self.claim_batch.clone(),
        );
        r.register(
            "ack_batch_size",
            "Acknowledgements per statement",
            self.ack_batch.clone(),
        );
        r.register(
            "tasks_in_flight",
            "Tasks held by this instance (claimed, not yet acknowledged)",
            self.tasks_in_flight.clone(),
        );
        r.register(
            "acks_stale",
            "Acknowledgements found stale (claim lost)",
            self.acks_stale.clone(),
        );
        r.register(
            "acks_rejected",
            "Acknowledgements the database refused on their own",
            self.acks_rejected.clone(),
        );
        r.register(
            "notifier_reconnects",
            "LISTEN connection re-established",
            self.notifier_reconnects.clone(),
        );
        r.register(
            "notifier_resyncs",
            "Resynchronisations announced to subscribers",
            self.notifier_resyncs.clone(),
        );
        self.maintenance_duration.register(
            r,
            "maintenance_step_duration_seconds",
            "Maintenance step duration (leader only)",
        );
        self.maintenance_rows
            .register(r, "maintenance_rows", "Rows affected by maintenance steps");
        r.register(
            "maintenance_errors",
            "Maintenance passes that failed",
            self.maintenance_errors.clone(),
        );
        self.model_calls
            .register(r, "model_calls", "Model calls by model and outcome");
        self.model_latency.register(
            r,
            "model_latency_seconds",
            "Model call latency by model and outcome",
        );
        self.model_tokens
            .register(r, "model_tokens", "Tokens used by model and direction");
        self.model_cost_usd
            .register(r, "model_cost_usd", "Model cost charged, in US dollars");
        self.tool_calls
            .register(r, "tool_calls", "Tool calls by tool and outcome");
        r.register(
            "ledger_appends",
            "Ledger events appended by this instance",
            self.ledger_appends.clone(),
        );
        r.register(
            "otel_spans_dropped",
            "Spans dropped by the OTLP export (queue full or export failed)",
            self.spans_dropped.clone(),
        );
        r.register(
            "otel_spans_exported",
            "Spans exported over OTLP",
            self.spans_exported.clone(),
        );
    }

    /// The registry holding every series above (prefix `pgcrew_`).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

/// This process's instruments.
pub fn global() -> &'static Telemetry {
    static GLOBAL: OnceLock<Telemetry> = OnceLock::new();
    GLOBAL.get_or_init(Telemetry::new)
}
