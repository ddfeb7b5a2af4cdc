//! The worker pool: a [`Service`] that claims tasks for the handlers registered by kind, runs
//! them with bounded concurrency, and acknowledges them in batches.
//!
//! Inside one instance: a fetcher claims batches sized to free capacity (nothing when full), a
//! fixed set of executors run handlers (timeout, cancellation token, panic capture), one acker
//! writes many acknowledgements per statement, and one heartbeat statement per interval keeps
//! every claimed task alive and picks up cancellation requests. Idle fetchers wake on
//! `pgcrew_task_available` and poll on a slow fallback interval (or when the next delayed task
//! is due). On stop the pool drains: it claims nothing more, finishes what it holds, flushes
//! every acknowledgement, and only then returns.
//!
//! Acknowledgements are never dropped while the process lives: each is clamped and sanitised
//! before it is sent (see [`ack`](super::ack)); a batch the database refuses is split and its
//! parts retried, so one bad entry never holds back the others (an entry refused on its own is
//! logged with its task id); transient failures are retried with backoff until they succeed.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::FutureExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use super::claim::{
    Ack, AckOutcome, ClaimedTask, ack_with, claim_routed, heartbeat, next_due_with,
};
use super::retry::RetryPolicy;
use crate::coord::client::{Client, Service};
use crate::coord::notify::{Event, EventKind, Subscription};
use crate::db::Executor;
use crate::db::{Conn, Db};
use crate::error::{Error, Result};
use crate::ids::{ClaimToken, RunId, TaskId, validate_text_id};

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
    pub tenant: String,
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
    /// The client running the pool (database access for the handler).
    pub client: Client,
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
        }
    }
}

/// Builder of a [`WorkerPool`]; see [`WorkerPool::builder`].
pub struct WorkerPoolBuilder {
    queues: Vec<String>,
    /// Whether a queue was named with [`WorkerPoolBuilder::queue`] (else `default` is worked
    /// too, in front of queues added by others, such as `AgentRuntime::install`).
    queues_named: bool,
    handlers: HashMap<String, Handler>,
    concurrency: usize,
    prefetch: usize,
    max_batch: usize,
    poll_interval: Duration,
    heartbeat_interval: Duration,
    timeout: Option<Duration>,
    shutdown_timeout: Option<Duration>,
    retry: RetryPolicy,
    error: Option<Error>,
}

impl std::fmt::Debug for WorkerPoolBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerPoolBuilder")
            .field("queues", &self.queues)
            .field("kinds", &self.handlers.keys().collect::<Vec<_>>())
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

impl WorkerPoolBuilder {
    /// Work this queue (call again for more; claimed in the order given). Default: `default`
    /// (worked when no queue is named here, also when
    /// [`AgentRuntime::install`](crate::agent::AgentRuntime::install) adds its agents'
    /// queues).
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queues_named = true;
        self.add_queue(queue.into())
    }

    /// Work `queue` in addition to the configured ones, without replacing the implicit
    /// `default` queue of a builder that names none (what `AgentRuntime::install` uses).
    pub(crate) fn also_queue(self, queue: impl Into<String>) -> Self {
        self.add_queue(queue.into())
    }

    fn add_queue(mut self, q: String) -> Self {
        if let Err(e) = validate_text_id("queue", &q) {
            self.error.get_or_insert(e);
        }
        if !self.queues.contains(&q) {
            self.queues.push(q);
        }
        self
    }

    /// Register the handler of `kind`. The payload is deserialised into `P`; a payload that
    /// does not deserialise discards the task (retrying cannot fix it).
    pub fn handler<P, F, Fut>(mut self, kind: impl Into<String>, f: F) -> Self
    where
        P: DeserializeOwned + Send + 'static,
        F: Fn(TaskContext, P) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<TaskOutcome, HandlerError>> + Send + 'static,
    {
        let kind = kind.into();
        if let Err(e) = validate_text_id("kind", &kind) {
            self.error.get_or_insert(e);
        }
        let f = Arc::new(f);
        let h: Handler = Arc::new(move |ctx, payload| {
            let f = f.clone();
            Box::pin(async move {
                match serde_json::from_value::<P>(payload) {
                    Ok(p) => f(ctx, p).await,
                    Err(e) => Ok(TaskOutcome::Discard(format!(
                        "payload does not match the handler's type: {e}"
                    ))),
                }
            })
        });
        self.handlers.insert(kind, h);
        self
    }

    /// Most handlers running at once (default 10).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n;
        self
    }

    /// Extra tasks claimed ahead and held locally while all executors are busy (default 0).
    /// They count as running for tenant limits and are heartbeated like running tasks. With a
    /// prefetch the pool refills once half of `concurrency + prefetch` is free, so claims stay
    /// large: on a slow link or for short tasks this multiplies throughput, at the cost of
    /// holding up to that many tasks that another instance could have run.
    pub fn prefetch(mut self, n: usize) -> Self {
        self.prefetch = n;
        self
    }

    /// Largest claim batch (default 100).
    pub fn max_batch(mut self, n: usize) -> Self {
        self.max_batch = n;
        self
    }

    /// Fallback poll interval of an idle pool (default 1 s).
    pub fn poll_interval(mut self, d: Duration) -> Self {
        self.poll_interval = d;
        self
    }

    /// Task heartbeat interval (default 5 s; keep it well under the client's
    /// `task_heartbeat_timeout`). Cancellation requests arrive at once through
    /// `pgcrew_task_cancel_requested`; this interval is their fallback if a notification is lost.
    pub fn heartbeat_interval(mut self, d: Duration) -> Self {
        self.heartbeat_interval = d;
        self
    }

    /// Per-task timeout (default none): a handler running longer fails the attempt.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = Some(d);
        self
    }

    /// On stop, cancel handlers still running after this long (default: wait for them). Also
    /// bounds how long a stopping pool keeps retrying acknowledgements while the database is
    /// unreachable (default: until they are delivered; a running pool never gives up on one).
    pub fn shutdown_timeout(mut self, d: Duration) -> Self {
        self.shutdown_timeout = Some(d);
        self
    }

    /// Backoff between attempts (default: 1 s doubling to 1 h, ±20 % jitter).
    pub fn retry_policy(mut self, p: RetryPolicy) -> Self {
        self.retry = p;
        self
    }

    /// Validate and build. Pass the result to [`ClientBuilder::service`](crate::coord::client::ClientBuilder::service).
    pub fn build(mut self) -> Result<Arc<WorkerPool>> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        if self.concurrency == 0 {
            return Err(Error::invalid("concurrency", "must be at least 1"));
        }
        if self.max_batch == 0 {
            return Err(Error::invalid("max_batch", "must be at least 1"));
        }
        if self.handlers.is_empty() {
            return Err(Error::invalid(
                "handlers",
                "register at least one handler with .handler(kind, f)",
            ));
        }
        for (field, d) in [
            ("poll_interval", self.poll_interval),
            ("heartbeat_interval", self.heartbeat_interval),
        ] {
            if d.is_zero() {
                return Err(Error::invalid(field, "must be greater than zero"));
            }
        }
        let default = super::DEFAULT_QUEUE.to_string();
        if !self.queues_named && !self.queues.contains(&default) {
            self.queues.insert(0, default);
        }
        Ok(Arc::new(WorkerPool {
            queues: self.queues,
            handlers: self.handlers,
            concurrency: self.concurrency,
            prefetch: self.prefetch,
            max_batch: self.max_batch,
            poll_interval: self.poll_interval,
            heartbeat_interval: self.heartbeat_interval,
            timeout: self.timeout,
            shutdown_timeout: self.shutdown_timeout,
            retry: self.retry,
            metrics: Arc::new(WorkerMetrics::default()),
            pool_id: uuid::Uuid::new_v4(),
        }))
    }
}

/// A pool of task executors for one instance. Build with [`WorkerPool::builder`], register
/// with [`ClientBuilder::service`](crate::coord::client::ClientBuilder::service); it runs
/// between the client's `start()` and `stop()`.
pub struct WorkerPool {
    queues: Vec<String>,
    handlers: HashMap<String, Handler>,
    concurrency: usize,
    prefetch: usize,
    max_batch: usize,
    poll_interval: Duration,
    heartbeat_interval: Duration,
    timeout: Option<Duration>,
    shutdown_timeout: Option<Duration>,
    retry: RetryPolicy,
    metrics: Arc<WorkerMetrics>,
    /// Identifies this pool in `pgcrew.queue_waiters`.
    pool_id: uuid::Uuid,
}

impl std::fmt::Debug for WorkerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerPool")
            .field("queues", &self.queues)
            .field("kinds", &self.handlers.keys().collect::<Vec<_>>())
            .field("concurrency", &self.concurrency)
            .field("prefetch", &self.prefetch)
            .finish_non_exhaustive()
    }
}

/// State shared by the pool's loops during one `run`.
#[derive(Default)]
struct Shared {
    /// Claimed tasks held (queued for an executor or running) and their cancellation tokens.
    held: Mutex<HashMap<TaskId, CancellationToken>>,
    /// Signalled when an executor frees a slot.
    slot_freed: Notify,
    /// Signalled by notifications and acknowledgement flushes.
    wake: Notify,
    /// Set while stopping with a shutdown timeout: acknowledgements still failing with
    /// transient errors after this instant are given up (logged with their task ids).
    ack_deadline: Mutex<Option<tokio::time::Instant>>,
}

impl Shared {
    fn held_ids(&self) -> Vec<TaskId> {
        match self.held.lock() {
            Ok(g) => g.keys().copied().collect(),
            Err(p) => p.into_inner().keys().copied().collect(),
        }
    }
    fn ack_deadline_passed(&self) -> bool {
        let deadline = match self.ack_deadline.lock() {
            Ok(g) => *g,
            Err(p) => *p.into_inner(),
        };
        deadline.is_some_and(|d| tokio::time::Instant::now() >= d)
    }
    fn with_held<R>(&self, f: impl FnOnce(&mut HashMap<TaskId, CancellationToken>) -> R) -> R {
        match self.held.lock() {
            Ok(mut g) => f(&mut g),
            Err(p) => f(&mut p.into_inner()),
        }
    }
}

impl WorkerPool {
    /// A builder with the defaults.
    pub fn builder() -> WorkerPoolBuilder {
        WorkerPoolBuilder {
            queues: Vec::new(),
            queues_named: false,
            handlers: HashMap::new(),
            concurrency: 10,
            prefetch: 0,
            max_batch: 100,
            poll_interval: Duration::from_secs(1),
            heartbeat_interval: Duration::from_secs(5),
            timeout: None,
            shutdown_timeout: None,
            retry: RetryPolicy::default(),
            error: None,
        }
    }

    /// This pool's metrics.
    pub fn metrics(&self) -> &Arc<WorkerMetrics> {
        &self.metrics
    }

    /// The queues this pool works.
    pub fn queues(&self) -> &[String] {
        &self.queues
    }

    async fn fetch_loop(
        &self,
        client: &Client,
        shared: &Shared,
        work_tx: &mpsc::UnboundedSender<ClaimedTask>,
        sub: &mut Subscription,
        shutdown: &mut watch::Receiver<bool>,
    ) {
        let capacity = self.concurrency + self.prefetch;
        let mut conn: Option<Conn> = None;
        let mut backoff = Duration::from_millis(50);
        // Whether this pool is registered in `pgcrew.queue_waiters` (so enqueues NOTIFY it).
        let mut waiting = false;
        // Whether the next claim tries the single-statement fast path first.
        let mut try_fast = true;
        loop {
            if *shutdown.borrow() {
                if waiting {
                    self.set_waiting(client, &mut conn, false).await;
                }
                return;
            }
            let held = self.metrics.in_flight.load(Ordering::SeqCst);
            let free = capacity.saturating_sub(held);
            // Without prefetch, claim for any free slot (latency); with prefetch, refill once
            // half the capacity is free so claims stay large (throughput).
            let threshold = if self.prefetch == 0 {
                1
            } else {
                (capacity / 2).clamp(1, self.max_batch)
            };
            if free == 0 || (held > 0 && free < threshold) {
                // Saturated: enqueues need not wake us (keeps NOTIFY off the hot path).
                if waiting {
                    waiting = !self.set_waiting(client, &mut conn, false).await;
                }
                tokio::select! {
                    _ = shared.slot_freed.notified() => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            let limit = free.min(self.max_batch);
            // Wake-ups received so far are answered by this claim; only later ones count.
            while let Some(Some(_)) = sub.recv().now_or_never() {}
            match self
                .claim_once(client, &mut conn, limit, &mut try_fast)
                .await
            {
                Ok(tasks) => {
                    backoff = Duration::from_millis(50);
                    let got = tasks.len();
                    if let Some(max_lag) = tasks.iter().map(|t| t.lag).max() {
                        self.metrics
                            .lag_us
                            .store(max_lag.as_micros() as u64, Ordering::Relaxed);
                    }
                    self.metrics
                        .claimed
                        .fetch_add(got as u64, Ordering::Relaxed);
                    for t in tasks {
                        self.metrics.in_flight.fetch_add(1, Ordering::SeqCst);
                        shared.with_held(|h| h.insert(t.id, CancellationToken::new()));
                        if work_tx.send(t).is_err() {
                            return;
                        }
                    }
                    if got > 0 {
                        // Let the executors pick the tasks up before the next claim is sent.
                        tokio::task::yield_now().await;
                    }
                    if got == 0 {
                        if !waiting {
                            // Out of work: ask for wake-ups, then claim once more so a task
                            // enqueued before the registration is not left to the poll.
                            waiting = self.set_waiting(client, &mut conn, true).await;
                            if waiting {
                                continue;
                            }
                        }
                        self.idle_wait(&mut conn, shared, sub, shutdown).await;
                    }
                }
                Err(e) => {
                    warn!(error = %e, "worker pool: claim failed; retrying");
                    conn = None;
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Register (`true`) or unregister this pool as waiting for work on its queues. Returns
    /// whether the change was made; failures are logged (the fallback poll still finds work).
    async fn set_waiting(&self, client: &Client, conn: &mut Option<Conn>, on: bool) -> bool {
        if conn.is_none() {
            match client.db().get().await {
                Ok(c) => *conn = Some(c),
                Err(e) => {
                    debug!(error = %e, "worker pool: no connection to update the waiter row");
                    return false;
                }
            }
        }
        let Some(c) = conn.as_ref() else {
            return false;
        };
        let result = if on {
            c.execute_typed_count(
                sql!("queue/register_waiter"),
                typed![self.queues, self.pool_id, client.instance_id()],
            )
            .await
        } else {
            c.execute_typed_count(sql!("queue/unregister_waiter"), typed![self.pool_id])
                .await
        };
        match result {
            Ok(_) => true,
            Err(e) => {
                debug!(error = %e, "worker pool: cannot update the waiter row");
                *conn = None;
                false
            }
        }
    }

    /// Claim up to `limit` tasks. A single-queue pool first tries the one-statement fast path
    /// (`queue/claim_fast`, the common single-tenant, unlimited case); when that claims nothing,
    /// the general `pgcrew.claim_tasks` runs, and if it finds work (several tenants with work,
    /// limits, due tasks), the pool uses the general path until it next runs out of work
    /// (`try_fast`).
    async fn claim_once(
        &self,
        client: &Client,
        conn: &mut Option<Conn>,
        limit: usize,
        try_fast: &mut bool,
    ) -> Result<Vec<ClaimedTask>> {
        if conn.is_none() {
            *conn = Some(client.db().get().await?);
        }
        let Some(c) = conn.as_ref() else {
            return Ok(Vec::new());
        };
        if client.db().statements() == crate::db::StatementMode::Unnamed {
            // Unnamed statements are planned on every call: the fast path's statement would be
            // too, while `pgcrew.claim_tasks` (PL/pgSQL) keeps its plans in the server session,
            // whichever client the pooler lends that session to.
            *try_fast = false;
        }
        claim_routed(
            c,
            sql!("queue/claim_fast"),
            sql!("queue/claim"),
            &self.queues,
            i32::try_from(limit).unwrap_or(i32::MAX),
            client.instance_id(),
            try_fast,
        )
        .await
    }

    /// Nothing to claim: wait for a notification on one of our queues (read directly from the
    /// subscription: no extra task hop), an acknowledgement flush, the next due task, the
    /// fallback poll, or stop.
    async fn idle_wait(
        &self,
        conn: &mut Option<Conn>,
        shared: &Shared,
        sub: &mut Subscription,
        shutdown: &mut watch::Receiver<bool>,
    ) {
        let mut wait = self.poll_interval;
        if let Some(c) = conn.as_ref() {
            let due = next_due_with(c, sql!("queue/next_due"), &self.queues).await;
            match due {
                // At least 1 ms: a due task another claimer is promoting right now must not
                // turn this into a busy loop.
                Ok(Some(d)) => wait = wait.min(d).max(Duration::from_millis(1)),
                Ok(None) => {}
                Err(e) => {
                    debug!(error = %e, "worker pool: next_due failed");
                    *conn = None;
                }
            }
        }
        let sleep = tokio::time::sleep(wait);
        tokio::pin!(sleep);
        let mut listening = true;
        loop {
            tokio::select! {
                ev = sub.recv(), if listening => match ev {
                    Some(Event::TaskAvailable { queue }) if !self.queues.contains(&queue) => {}
                    Some(_) => return,
                    // The notifier is gone: rely on the poll.
                    None => listening = false,
                },
                _ = shared.wake.notified() => return,
                _ = &mut sleep => return,
                _ = shutdown.changed() => return,
            }
        }
    }

    async fn execute(
        &self,
        client: &Client,
        task: ClaimedTask,
        cancel: CancellationToken,
    ) -> AckOutcome {
        let ClaimedTask {
            id,
            queue,
            kind,
            tenant,
            run_id,
            payload,
            attempt,
            max_attempts,
            token,
            ..
        } = task;
        let fail = |error: String| AckOutcome::Fail {
            error,
            retry_in: self.retry.delay(attempt),
        };
        if cancel.is_cancelled() {
            return fail("cancelled before it started".into());
        }
        let Some(handler) = self.handlers.get(&kind) else {
            return fail(format!(
                "no handler is registered for kind `{kind}` in this worker pool"
            ));
        };
        let ctx = TaskContext {
            id,
            queue,
            kind,
            tenant,
            run_id,
            attempt,
            max_attempts,
            token,
            cancel: cancel.clone(),
            client: client.clone(),
        };
        let fut = AssertUnwindSafe(handler(ctx, payload)).catch_unwind();
        let timed = async {
            match self.timeout {
                Some(t) => tokio::time::timeout(t, fut).await.map_err(|_| t),
                None => Ok(fut.await),
            }
        };
        let result = tokio::select! {
            r = timed => r,
            _ = cancel.cancelled() => return fail("cancelled while running".into()),
        };
        match result {
            Ok(Ok(Ok(TaskOutcome::Complete))) => AckOutcome::Complete,
            Ok(Ok(Ok(TaskOutcome::Snooze(d)))) => AckOutcome::Snooze(d),
            Ok(Ok(Ok(TaskOutcome::Discard(reason)))) => AckOutcome::Discard { error: reason },
            Ok(Ok(Err(e))) => fail(e.to_string()),
            Ok(Err(panic)) => {
                let msg = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                fail(format!("handler panicked: {msg}"))
            }
            Err(t) => fail(format!("timed out after {t:?}")),
        }
    }

    async fn executor_loop(
        self: Arc<Self>,
        client: Client,
        shared: Arc<Shared>,
        work_rx: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<ClaimedTask>>>,
        ack_tx: mpsc::UnboundedSender<Ack>,
    ) {
        loop {
            let next = {
                let mut rx = work_rx.lock().await;
                rx.recv().await
            };
            let Some(task) = next else { return };
            let id = task.id;
            let token = task.token;
            let cancel = shared
                .with_held(|h| h.get(&id).cloned())
                .unwrap_or_default();
            let outcome = self.execute(&client, task, cancel).await;
            let m = &self.metrics;
            m.executed.fetch_add(1, Ordering::Relaxed);
            match &outcome {
                AckOutcome::Complete => m.succeeded.fetch_add(1, Ordering::Relaxed),
                AckOutcome::Snooze(_) => m.snoozed.fetch_add(1, Ordering::Relaxed),
                _ => m.failed.fetch_add(1, Ordering::Relaxed),
            };
            if let AckOutcome::Fail { error, .. } | AckOutcome::Discard { error } = &outcome {
                debug!(task = %id, error = %error, "task attempt failed");
            }
            shared.with_held(|h| h.remove(&id));
            let _ = ack_tx.send(Ack { id, token, outcome });
            m.in_flight.fetch_sub(1, Ordering::SeqCst);
            shared.slot_freed.notify_one();
        }
    }

    /// Heartbeat held tasks every interval, and at once when a cancellation of one of them is
    /// announced (or notifications may have been missed): the heartbeat re-reads the tasks'
    /// cancellation flags, so a cancelled running task's token fires within a round trip.
    async fn heartbeat_loop(
        self: Arc<Self>,
        client: Client,
        shared: Arc<Shared>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut sub = client.subscribe(&[EventKind::TaskCancelRequested]);
        let mut listening = true;
        let mut next = tokio::time::Instant::now() + self.heartbeat_interval;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {
                    next = tokio::time::Instant::now() + self.heartbeat_interval;
                }
                ev = sub.recv(), if listening => match ev {
                    Some(Event::TaskCancelRequested { task_id, instance_id }) => {
                        let ours = instance_id.as_deref() == Some(client.instance_id().as_str());
                        if !ours || shared.with_held(|h| !h.contains_key(&task_id)) {
                            continue;
                        }
                    }
                    Some(_) => {}
                    None => listening = false,
                },
                _ = stop.changed() => return,
            }
            // One heartbeat answers every announcement received so far.
            while let Some(Some(_)) = sub.recv().now_or_never() {}
            let ids = shared.held_ids();
            if ids.is_empty() {
                continue;
            }
            let result = async {
                let conn = client.db().get().await?;
                heartbeat(&conn, client.instance_id(), &ids).await
            }
            .await;
            match result {
                Ok(rep) => {
                    let alive: std::collections::HashSet<TaskId> =
                        rep.alive.iter().copied().collect();
                    shared.with_held(|h| {
                        for id in &rep.cancel_requested {
                            if let Some(t) = h.get(id) {
                                t.cancel();
                            }
                        }
                        for id in &ids {
                            if !alive.contains(id)
                                && let Some(t) = h.get(id)
                            {
                                warn!(task = %id, "task claim lost (rescued by maintenance); cancelling its handler");
                                t.cancel();
                            }
                        }
                    });
                }
                Err(e) => warn!(error = %e, "worker pool: task heartbeat failed"),
            }
        }
    }
}

/// Acknowledgements per statement.
const ACK_BATCH: usize = 1000;

async fn acker_loop(
    db: Db,
    mut rx: mpsc::UnboundedReceiver<Ack>,
    metrics: Arc<WorkerMetrics>,
    shared: Arc<Shared>,
) {
    let mut conn: Option<Conn> = None;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < ACK_BATCH {
            match rx.try_recv() {
                Ok(a) => batch.push(a),
                Err(_) => break,
            }
        }
        deliver(&db, &mut conn, batch, &metrics, &shared).await;
        shared.wake.notify_one();
    }
}

/// Deliver one batch of acknowledgements; returns when every one of them was applied, found
/// stale, or rejected on its own.
///
/// * A transient failure (connection lost, pool timeout, serialization failure) retries the
///   same part with a backoff growing to 5 s, for as long as the process lives; only a pool
///   that is stopping with a `shutdown_timeout` gives up, once that timeout passed after its
///   handlers finished, logging every task id.
/// * Any other failure means an entry the database refuses: the part is split in halves and
///   each half delivered on its own, so one bad entry never holds back the others. An entry
///   refused on its own is logged with its task id and counted in `rejected_acks`; its task is
///   rescued after its heartbeat timeout, like the task of a crashed worker.
///
/// Entries are validated and clamped before they are sent (see [`ack`](super::ack)), so on
/// the happy path this is one statement per batch.
async fn deliver(
    db: &Db,
    conn: &mut Option<Conn>,
    batch: Vec<Ack>,
    metrics: &WorkerMetrics,
    shared: &Shared,
) {
    let mut parts = vec![batch];
    let mut backoff = Duration::from_millis(50);
    let mut failures = 0u32;
    while let Some(part) = parts.pop() {
        match flush(db, conn, &part).await {
            Ok(stale) => {
                metrics.stale_acks.fetch_add(stale, Ordering::Relaxed);
                backoff = Duration::from_millis(50);
                failures = 0;
            }
            Err(e) if e.is_transient() => {
                *conn = None;
                failures += 1;
                if shared.ack_deadline_passed() {
                    let ids: Vec<String> = parts
                        .iter()
                        .chain(std::iter::once(&part))
                        .flatten()
                        .map(|a| a.id.to_string())
                        .collect();
                    error!(error = %e, tasks = %ids.join(","), "worker pool: stopping, and the database is still unreachable after the shutdown timeout: giving up on these acknowledgements; the tasks will be rescued and run again");
                    return;
                }
                if failures == 1 || failures.is_power_of_two() {
                    warn!(error = %e, n = part.len(), failures, "worker pool: acknowledgement failed; retrying until the database answers");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                parts.push(part);
            }
            Err(e) if part.len() == 1 => {
                metrics.rejected_acks.fetch_add(1, Ordering::Relaxed);
                if let Some(a) = part.first() {
                    error!(task = %a.id, token = %a.token, error = %e, "worker pool: the database rejected this task's acknowledgement; the task stays running until it is rescued after its heartbeat timeout");
                }
            }
            Err(e) => {
                debug!(error = %e, n = part.len(), "worker pool: acknowledgement batch refused; splitting it");
                let mut first = part;
                let second = first.split_off(first.len() / 2);
                // Delivered in order: the first half first.
                parts.push(second);
                parts.push(first);
            }
        }
    }
}

async fn flush(db: &Db, conn: &mut Option<Conn>, batch: &[Ack]) -> Result<u64> {
    if conn.is_none() {
        *conn = Some(db.get().await?);
    }
    let Some(c) = conn.as_ref() else {
        return Ok(0);
    };
    let rep = ack_with(c, sql!("queue/ack"), batch).await?;
    Ok(rep.stale.len() as u64)
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
        client: Client,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<()> {
        if self.heartbeat_interval * 2 >= client.config().task_heartbeat_timeout {
            warn!(
                heartbeat = ?self.heartbeat_interval,
                timeout = ?client.config().task_heartbeat_timeout,
                "worker pool: the task heartbeat interval is not well under the client's task_heartbeat_timeout; running tasks may be rescued while alive"
            );
        }
        let shared = Arc::new(Shared::default());
        let (ack_tx, ack_rx) = mpsc::unbounded_channel::<Ack>();
        let (work_tx, work_rx) = mpsc::unbounded_channel::<ClaimedTask>();
        let work_rx = Arc::new(tokio::sync::Mutex::new(work_rx));
        let acker = tokio::spawn(acker_loop(
            client.db().clone(),
            ack_rx,
            self.metrics.clone(),
            shared.clone(),
        ));
        let mut executors = Vec::with_capacity(self.concurrency);
        for _ in 0..self.concurrency {
            executors.push(tokio::spawn(self.clone().executor_loop(
                client.clone(),
                shared.clone(),
                work_rx.clone(),
                ack_tx.clone(),
            )));
        }
        drop(ack_tx);
        let (hb_stop, hb_rx) = watch::channel(false);
        let hb = tokio::spawn(
            self.clone()
                .heartbeat_loop(client.clone(), shared.clone(), hb_rx),
        );
        let mut sub = client.subscribe(&[EventKind::TaskAvailable]);
        self.fetch_loop(&client, &shared, &work_tx, &mut sub, &mut shutdown)
            .await;
        drop(sub);

        // Drain: no more claims; executors finish what is held, then the acker flushes.
        drop(work_tx);
        let canceller = self.shutdown_timeout.map(|t| {
            let shared = shared.clone();
            tokio::spawn(async move {
                tokio::time::sleep(t).await;
                shared.with_held(|h| h.values().for_each(|c| c.cancel()));
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
        if let Some(t) = self.shutdown_timeout {
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
