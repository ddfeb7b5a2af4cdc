//! The worker pool: a [`Service`] that claims tasks for the handlers registered by kind, runs
//! them with bounded concurrency, and acknowledges them in batches.
//!
//! Inside one instance: a fetcher claims batches sized to free capacity (nothing when full), a
//! fixed set of executors run handlers (timeout, cancellation token, panic capture), one acker
//! writes many acknowledgements per statement, and one heartbeat statement per interval keeps
//! every claimed task alive (until its acknowledgement is applied) and picks up cancellation
//! requests. When acknowledgements fall behind (two batches waiting), the fetcher stops
//! claiming until the acker catches up. Idle fetchers wake on
//! `pgcrew_task_available` and poll on a slow fallback interval (or when the next delayed task
//! is due). On stop the pool drains: it claims nothing more, finishes what it holds, flushes
//! every acknowledgement, and only then returns.
//!
//! Acknowledgements are never dropped while the process lives: each is clamped and sanitised
//! before it is sent (see [`ack`](super::ack)); a batch the database refuses is split and its
//! parts retried, so one bad entry never holds back the others (an entry refused on its own is
//! logged with its task id); transient failures are retried with backoff until they succeed.
//!
//! The pool's parts, after River's: `fetch` claims (the producer), `execute` runs
//! handlers and heartbeats held tasks (the job executor), `ack` writes acknowledgements (the
//! completer); `builder` collects the settings.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::Serialize;
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::claim::{Ack, ClaimedTask};
use super::retry::RetryPolicy;
use crate::coord::notify::EventKind;
use crate::coord::service::{Service, ServiceContext};
use crate::error::Result;
use crate::ids::{ClaimToken, RunId, TaskId, TenantId};
use crate::sync::with_lock;

mod ack;
mod builder;
mod execute;
mod fetch;
mod saturation;
mod trace;
mod vacuum;

pub use builder::WorkerPoolBuilder;
pub use saturation::{DEFAULT_SATURATION_THRESHOLD, Saturation};

/// The error type handlers return (anything convertible with `?`).
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// What a handler decided.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskOutcome {
    /// Done: the task completes.
    Complete,
    /// Run again after this delay without consuming an attempt.
    Snooze(Duration),
    /// Give up for good (the reason is kept); no retry.
    Discard(String),
}

/// What a handler gets besides its payload.
#[derive(Debug, Clone)]
pub struct TaskContext {
    /// The task.
    pub id: TaskId,
    /// Its queue.
    pub queue: String,
    /// Its kind.
    pub kind: String,
    /// Its tenant.
    pub tenant: TenantId,
    /// Its run, if any.
    pub run_id: Option<RunId>,
    /// This attempt (1-based).
    pub attempt: i32,
    /// Attempts allowed.
    pub max_attempts: i32,
    /// The claim token.
    pub token: ClaimToken,
    /// Fires when the task is cancelled, its claim is lost, or the pool's shutdown timeout
    /// passes. The handler future is dropped right after; pass the token to sub-tasks.
    pub cancel: CancellationToken,
    /// The run's lease, taken in the claim's transaction when the pool leases runs of this
    /// kind ([`WorkerPoolBuilder::lease_runs_of`]) and the run could be taken then; the
    /// handler uses it instead of taking the lease itself.
    pub run_lease: Option<crate::runs::LeasedRun>,
    /// What the instance running the pool offers the handler (database, instance id,
    /// configuration, notifier). Named `client` for the handlers written when it was the
    /// whole client.
    pub client: ServiceContext,
}

type BoxFuture =
    Pin<Box<dyn Future<Output = std::result::Result<TaskOutcome, HandlerError>> + Send>>;
type Handler = Arc<dyn Fn(TaskContext, serde_json::Value) -> BoxFuture + Send + Sync>;

/// Counters of one pool (cumulative since the pool was built).
#[derive(Debug)]
pub struct WorkerMetrics {
    started: Instant,
    claimed: AtomicU64,
    executed: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
    snoozed: AtomicU64,
    stale_acks: AtomicU64,
    rejected_acks: AtomicU64,
    in_flight: AtomicUsize,
    lag_us: AtomicU64,
    vacuums: AtomicU64,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        WorkerMetrics {
            started: Instant::now(),
            claimed: AtomicU64::new(0),
            executed: AtomicU64::new(0),
            succeeded: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            snoozed: AtomicU64::new(0),
            stale_acks: AtomicU64::new(0),
            rejected_acks: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            lag_us: AtomicU64::new(0),
            vacuums: AtomicU64::new(0),
        }
    }
}

/// A point-in-time copy of [`WorkerMetrics`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkerMetricsSnapshot {
    /// Tasks claimed.
    pub claimed: u64,
    /// Handler runs finished (any outcome).
    pub executed: u64,
    /// Completed.
    pub succeeded: u64,
    /// Failed (error, panic, timeout, cancellation, discard).
    pub failed: u64,
    /// Snoozed.
    pub snoozed: u64,
    /// Acknowledgements rejected as stale.
    pub stale_acks: u64,
    /// Acknowledgements the database refused on their own (logged with the task id; the task
    /// is rescued after its heartbeat timeout). Entries are clamped and sanitised before they
    /// are sent, so this stays 0 unless something outside the pool is wrong (e.g. permissions).
    pub rejected_acks: u64,
    /// Tasks held right now (running or claimed and waiting for an executor).
    pub in_flight: usize,
    /// Executed tasks per second since the pool was built.
    pub throughput_per_sec: f64,
    /// Queue lag of the most recent claim: how long its oldest task waited after becoming due.
    pub queue_lag_ms: f64,
    /// Vacuums of `pgcrew.tasks` this pool ran (see [`WorkerPoolBuilder::vacuum_tasks`]); one
    /// that found another session vacuuming the table, and so skipped it, counts too.
    pub vacuums: u64,
}

impl WorkerMetrics {
    /// A snapshot.
    pub fn snapshot(&self) -> WorkerMetricsSnapshot {
        let executed = self.executed.load(Ordering::Relaxed);
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        WorkerMetricsSnapshot {
            claimed: self.claimed.load(Ordering::Relaxed),
            executed,
            succeeded: self.succeeded.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            snoozed: self.snoozed.load(Ordering::Relaxed),
            stale_acks: self.stale_acks.load(Ordering::Relaxed),
            rejected_acks: self.rejected_acks.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            throughput_per_sec: executed as f64 / secs,
            queue_lag_ms: self.lag_us.load(Ordering::Relaxed) as f64 / 1000.0,
            vacuums: self.vacuums.load(Ordering::Relaxed),
        }
    }
}

/// The tunables a [`WorkerPoolBuilder`] collects and a [`WorkerPool`] runs with.
#[derive(Debug, Clone)]
struct Settings {
    concurrency: usize,
    prefetch: usize,
    max_batch: usize,
    poll_interval: Duration,
    recheck_after: Duration,
    heartbeat_interval: Duration,
    timeout: Option<Duration>,
    shutdown_timeout: Option<Duration>,
    retry: RetryPolicy,
    vacuum_tasks: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            concurrency: 10,
            prefetch: 0,
            max_batch: 100,
            poll_interval: Duration::from_secs(1),
            recheck_after: Duration::from_millis(100),
            heartbeat_interval: Duration::from_secs(5),
            timeout: None,
            shutdown_timeout: None,
            retry: RetryPolicy::default(),
            vacuum_tasks: true,
        }
    }
}

/// A pool of task executors for one instance. Build with [`WorkerPool::builder`], register
/// with `ClientBuilder::service`; it runs
/// between the client's `start()` and `stop()`.
pub struct WorkerPool {
    queues: Vec<String>,
    handlers: HashMap<String, Handler>,
    /// Kinds whose runs are leased in the claim's transaction.
    run_leasing: HashMap<String, crate::runs::RunLeasing>,
    settings: Settings,
    metrics: Arc<WorkerMetrics>,
    /// Identifies this pool in `pgcrew.queue_waiters`.
    pool_id: crate::ids::PoolId,
}

impl std::fmt::Debug for WorkerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerPool")
            .field("queues", &self.queues)
            .field("kinds", &self.handlers.keys().collect::<Vec<_>>())
            .field("concurrency", &self.settings.concurrency)
            .field("prefetch", &self.settings.prefetch)
            .finish_non_exhaustive()
    }
}

/// State shared by the pool's loops during one `run`.
#[derive(Default)]
struct Shared {
    /// Claimed tasks held (queued for an executor, running, or finished with their
    /// acknowledgement not yet applied): every one of them is heartbeated, so a task whose
    /// acknowledgement waits (a slow or unreachable database) is not rescued and run again.
    held: Mutex<HashMap<TaskId, Held>>,
    /// Acknowledgements queued or being delivered (see [`ack::ACK_BACKLOG`]: the fetcher stops
    /// claiming while a batch of them waits).
    ack_backlog: AtomicUsize,
    /// Signalled when an executor frees a slot, and when acknowledgements were delivered.
    slot_freed: Notify,
    /// Signalled by acknowledgement flushes that may have made work claimable for this pool.
    wake: Notify,
    /// Set by the fetcher while its claims go to the plain fast statement (one tenant with
    /// work, no limit, nothing due: see [`FastRoute::plain`]): a completed task then frees
    /// nothing it could claim, so the acker wakes it only for other outcomes (a retry or a
    /// snooze changes when work is next due). Work that completions do make available
    /// (dependants, keys at their bound) is announced by NOTIFY.
    ///
    /// [`FastRoute::plain`]: crate::queue::claim::FastRoute::plain
    completions_free_nothing: AtomicBool,
    /// Set while stopping with a shutdown timeout: acknowledgements still failing with
    /// transient errors after this instant are given up (logged with their task ids).
    ack_deadline: Mutex<Option<tokio::time::Instant>>,
    /// Trace contexts of held tasks (only while OpenTelemetry tracing is on).
    traces: Mutex<HashMap<TaskId, String>>,
    /// Run leases taken with the claims of held tasks (kinds in `run_leasing`), until their
    /// executor starts them.
    run_leases: Mutex<HashMap<TaskId, crate::runs::LeasedRun>>,
    /// The vacuum of `pgcrew.tasks` between autovacuum's visits (the `vacuum` module).
    vacuum: Arc<vacuum::TasksVacuum>,
}

/// A held task: its handler's cancellation token, and where its acknowledgement is.
#[derive(Debug, Default)]
struct Held {
    cancel: CancellationToken,
    ack: AckState,
}

/// Where a held task's acknowledgement is.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum AckState {
    /// None yet: the task is queued for an executor or running.
    #[default]
    None,
    /// The handler finished; the acknowledgement waits for the acker.
    Queued,
    /// In the acker's statement, which holds the task's row until it commits (a heartbeat
    /// of the row would only wait for it).
    Sending,
}

impl Shared {
    /// The held tasks to heartbeat: all but those in the acker's statement.
    fn held_ids(&self) -> Vec<TaskId> {
        self.with_held(|h| {
            h.iter()
                .filter(|(_, e)| e.ack != AckState::Sending)
                .map(|(id, _)| *id)
                .collect()
        })
    }
    fn ack_deadline_passed(&self) -> bool {
        let deadline = match self.ack_deadline.lock() {
            Ok(g) => *g,
            Err(p) => *p.into_inner(),
        };
        deadline.is_some_and(|d| tokio::time::Instant::now() >= d)
    }
    fn with_traces<R>(&self, f: impl FnOnce(&mut HashMap<TaskId, String>) -> R) -> R {
        with_lock(&self.traces, f)
    }
    fn with_run_leases<R>(
        &self,
        f: impl FnOnce(&mut HashMap<TaskId, crate::runs::LeasedRun>) -> R,
    ) -> R {
        with_lock(&self.run_leases, f)
    }
    fn with_held<R>(&self, f: impl FnOnce(&mut HashMap<TaskId, Held>) -> R) -> R {
        with_lock(&self.held, f)
    }
}

impl WorkerPool {
    /// This pool's metrics.
    pub fn metrics(&self) -> &Arc<WorkerMetrics> {
        &self.metrics
    }

    /// The queues this pool works.
    pub fn queues(&self) -> &[String] {
        &self.queues
    }
}

#[async_trait]
impl Service for WorkerPool {
    fn name(&self) -> &'static str {
        "worker_pool"
    }

    /// The claim loop and the acknowledger each keep one pooled connection.
    fn held_connections(&self) -> usize {
        2
    }

    async fn run(
        self: Arc<Self>,
        ctx: ServiceContext,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<()> {
        if self.settings.heartbeat_interval * 2 >= ctx.config().task_heartbeat_timeout {
            warn!(
                heartbeat = ?self.settings.heartbeat_interval,
                timeout = ?ctx.config().task_heartbeat_timeout,
                "worker pool: the task heartbeat interval is not well under the client's task_heartbeat_timeout; running tasks may be rescued while alive"
            );
        }
        let shared = Arc::new(Shared::default());
        shared.vacuum.enable(self.settings.vacuum_tasks);
        let (ack_tx, ack_rx) = mpsc::unbounded_channel::<Ack>();
        let (work_tx, work_rx) = mpsc::unbounded_channel::<ClaimedTask>();
        let work_rx = Arc::new(tokio::sync::Mutex::new(work_rx));
        let acker = tokio::spawn(ack::acker_loop(
            ctx.db().clone(),
            ack_rx,
            self.metrics.clone(),
            shared.clone(),
        ));
        let mut executors = Vec::with_capacity(self.settings.concurrency);
        for _ in 0..self.settings.concurrency {
            executors.push(tokio::spawn(self.clone().executor_loop(
                ctx.clone(),
                shared.clone(),
                work_rx.clone(),
                ack_tx.clone(),
            )));
        }
        drop(ack_tx);
        let (hb_stop, hb_rx) = watch::channel(false);
        let hb = tokio::spawn(
            self.clone()
                .heartbeat_loop(ctx.clone(), shared.clone(), hb_rx),
        );
        let mut sub = ctx.subscribe(&[EventKind::TaskAvailable]);
        self.fetch_loop(&ctx, &shared, &work_tx, &mut sub, &mut shutdown)
            .await;
        drop(sub);

        // Drain: no more claims; executors finish what is held, then the acker flushes.
        drop(work_tx);
        let canceller = self.settings.shutdown_timeout.map(|t| {
            let shared = shared.clone();
            tokio::spawn(async move {
                tokio::time::sleep(t).await;
                shared.with_held(|h| h.values().for_each(|c| c.cancel.cancel()));
            })
        });
        for e in executors {
            let _ = e.await;
        }
        if let Some(c) = canceller {
            c.abort();
        }
        // Every acknowledgement is sent now. The acker retries transient failures for as long
        // as it takes, except that a pool with a shutdown timeout stops waiting for an
        // unreachable database once that timeout passed again.
        if let Some(t) = self.settings.shutdown_timeout {
            let deadline = tokio::time::Instant::now() + t;
            match shared.ack_deadline.lock() {
                Ok(mut g) => *g = Some(deadline),
                Err(p) => *p.into_inner() = Some(deadline),
            }
        }
        let _ = acker.await;
        let _ = hb_stop.send(true);
        let _ = hb.await;
        Ok(())
    }
}
