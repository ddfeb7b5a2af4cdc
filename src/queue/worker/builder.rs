//! [`WorkerPoolBuilder`]: queues, handlers by kind and the pool's settings.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;

use super::{Handler, HandlerError, Settings, TaskContext, TaskOutcome, WorkerMetrics, WorkerPool};
use crate::error::{Error, Result};
use crate::ids::validate_text_id;
use crate::queue::RetryPolicy;
use crate::runs::RunLeasing;

/// Builder of a [`WorkerPool`]; see [`WorkerPool::builder`].
pub struct WorkerPoolBuilder {
    queues: Vec<String>,
    /// Whether a queue was named with [`WorkerPoolBuilder::queue`] (else `default` is worked
    /// too, in front of queues added by others, such as `AgentRuntime::install`).
    queues_named: bool,
    handlers: HashMap<String, Handler>,
    run_leasing: HashMap<String, RunLeasing>,
    settings: Settings,
    error: Option<Error>,
}

impl std::fmt::Debug for WorkerPoolBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerPoolBuilder")
            .field("queues", &self.queues)
            .field("kinds", &self.handlers.keys().collect::<Vec<_>>())
            .field("concurrency", &self.settings.concurrency)
            .finish_non_exhaustive()
    }
}

impl WorkerPoolBuilder {
    /// Work this queue (call again for more; claimed in the order given). Default: `default`
    /// (worked when no queue is named here, also when
    /// `AgentRuntime::install` adds its agents'
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

    /// Take the run lease of every claimed task of `kind` that names a run, in the claim's own
    /// transaction, as `leasing` says; the handler finds it in [`TaskContext::run_lease`]. A
    /// run that waits and whose wait resolved is resumed there too (as
    /// [`runs::lease_run`](crate::runs::lease_run) does). One WAL flush per claimed batch
    /// then covers what took one per run (the agent runtime registers its kind this way). A run
    /// whose lock is busy at the claim, or that another owner holds, is left to the handler
    /// (`run_lease` is `None`).
    pub fn lease_runs_of(mut self, kind: impl Into<String>, leasing: RunLeasing) -> Self {
        let kind = kind.into();
        if let Err(e) = validate_text_id("kind", &kind) {
            self.error.get_or_insert(e);
        }
        self.run_leasing.insert(kind, leasing);
        self
    }

    setters! {
        settings;
        /// Most handlers running at once (default 10).
        concurrency(n: usize) => concurrency = n;

        /// Extra tasks claimed ahead and held locally while all executors are busy (default 0).
        /// They count as running for tenant limits and are heartbeated like running tasks. With
        /// a prefetch the pool refills once half of `concurrency + prefetch` is free, so claims
        /// stay large: on a slow link or for short tasks this multiplies throughput, at the cost
        /// of holding up to that many tasks that another instance could have run.
        prefetch(n: usize) => prefetch = n;

        /// Largest claim batch (default 100). A single-queue pool's one-statement claim takes
        /// at most 1,000 tasks a statement (a bound that keeps its plan cached); a larger batch
        /// is claimed over several statements.
        max_batch(n: usize) => max_batch = n;

        /// Fallback poll interval of an idle pool (default 1 s).
        poll_interval(d: Duration) => poll_interval = d;

        /// How soon a pool that has just registered as a waiter looks for work once more,
        /// whatever wakes it meanwhile (default 100 ms). An enqueue reads the waiters when its
        /// statement starts and NOTIFYs when its transaction commits: one that read them before
        /// the registration committed and commits after the claim that follows the
        /// registration notifies nobody, and its task would wait for the poll. The second look
        /// finds the tasks of such transactions that commit within this time; raise it when
        /// tasks are enqueued inside longer transactions (one claim more per idle transition).
        recheck_after(d: Duration) => recheck_after = d;

        /// Whether the pool vacuums `pgcrew.tasks` while it is busy (default on): every 5,000
        /// acknowledgements it looks whether the table has as many dead rows as its own
        /// autovacuum threshold and was not vacuumed in the last second, and vacuums it then,
        /// beside the acknowledgements. Claims step over the dead index entries that tasks
        /// claimed since the last vacuum leave, and autovacuum visits a database only once a
        /// minute by default (see `queue::worker::vacuum` in the source). Needs the role that
        /// owns the table (else the pool says so once and stops trying). Turn it off where
        /// vacuums are scheduled otherwise.
        vacuum_tasks(on: bool) => vacuum_tasks = on;

        /// Task heartbeat interval (default 5 s; keep it well under the client's
        /// `task_heartbeat_timeout`). Cancellation requests arrive at once through
        /// `pgcrew_task_cancel_requested`; this interval is their fallback if a notification
        /// is lost.
        heartbeat_interval(d: Duration) => heartbeat_interval = d;

        /// Per-task timeout (default none): a handler running longer fails the attempt.
        timeout(d: Duration) => timeout = Some(d);

        /// On stop, cancel handlers still running after this long (default: wait for them).
        /// Also bounds how long a stopping pool keeps retrying acknowledgements while the
        /// database is unreachable (default: until they are delivered; a running pool never
        /// gives up on one).
        shutdown_timeout(d: Duration) => shutdown_timeout = Some(d);

        /// Backoff between attempts (default: 1 s doubling to 1 h, ±20 % jitter).
        retry_policy(p: RetryPolicy) => retry = p;
    }

    /// Validate and build. Pass the result to `ClientBuilder::service`.
    pub fn build(mut self) -> Result<Arc<WorkerPool>> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        if self.settings.concurrency == 0 {
            return Err(Error::invalid("concurrency", "must be at least 1"));
        }
        if self.settings.max_batch == 0 {
            return Err(Error::invalid("max_batch", "must be at least 1"));
        }
        if self.handlers.is_empty() {
            return Err(Error::invalid(
                "handlers",
                "register at least one handler with .handler(kind, f)",
            ));
        }
        for (field, d) in [
            ("poll_interval", self.settings.poll_interval),
            ("recheck_after", self.settings.recheck_after),
            ("heartbeat_interval", self.settings.heartbeat_interval),
        ] {
            if d.is_zero() {
                return Err(Error::invalid(field, "must be greater than zero"));
            }
        }
        let default = crate::queue::DEFAULT_QUEUE.to_string();
        if !self.queues_named && !self.queues.contains(&default) {
            self.queues.insert(0, default);
        }
        Ok(Arc::new(WorkerPool {
            queues: self.queues,
            handlers: self.handlers,
            run_leasing: self.run_leasing,
            settings: self.settings,
            metrics: Arc::new(WorkerMetrics::default()),
            pool_id: crate::ids::PoolId::new(),
        }))
    }
}

impl WorkerPool {
    /// A builder with the defaults.
    pub fn builder() -> WorkerPoolBuilder {
        WorkerPoolBuilder {
            queues: Vec::new(),
            queues_named: false,
            handlers: HashMap::new(),
            run_leasing: HashMap::new(),
            settings: Settings::default(),
            error: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{TaskOutcome, WorkerPool, WorkerPoolBuilder};

    /// A change to a builder.
    type Set = fn(WorkerPoolBuilder) -> WorkerPoolBuilder;

    fn builder() -> WorkerPoolBuilder {
        WorkerPool::builder().handler("k", |_ctx, _p: serde_json::Value| async {
            Ok(TaskOutcome::Complete)
        })
    }

    /// Zero sizes and intervals are refused by name; the defaults build.
    #[test]
    fn zero_settings_are_refused_by_name() {
        assert!(builder().build().is_ok());
        let refused: [(&str, Set); 5] = [
            ("concurrency", |b| b.concurrency(0)),
            ("max_batch", |b| b.max_batch(0)),
            ("poll_interval", |b| b.poll_interval(Duration::ZERO)),
            ("recheck_after", |b| b.recheck_after(Duration::ZERO)),
            ("heartbeat_interval", |b| {
                b.heartbeat_interval(Duration::ZERO)
            }),
        ];
        for (field, set) in refused {
            match set(builder()).build() {
                Err(e) => assert!(e.to_string().contains(field), "{field}: {e}"),
                Ok(_) => panic!("{field} = 0 was accepted"),
            }
        }
    }
}
