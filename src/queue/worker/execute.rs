//! Executing (River's job executor): run handlers with timeout, cancellation and panic
//! capture, and heartbeat every held task (which also picks up cancellation requests).

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures_util::FutureExt;
use opentelemetry::context::FutureExt as _;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{Shared, TaskContext, TaskOutcome, WorkerPool};
use crate::coord::notify::{Event, EventKind};
use crate::coord::service::ServiceContext;
use crate::ids::TaskId;
use crate::queue::claim::{Ack, AckOutcome, ClaimedTask, heartbeat};
use crate::telemetry::{self, AttemptOutcome};

impl WorkerPool {
    async fn execute(
        &self,
        ctx: &ServiceContext,
        task: ClaimedTask,
        cancel: CancellationToken,
        run_lease: Option<crate::runs::LeasedRun>,
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
            retry_in: self.settings.retry.delay(attempt),
        };
        if cancel.is_cancelled() {
            return fail("cancelled before it started".into());
        }
        let Some(handler) = self.handlers.get(&kind) else {
            return fail(format!(
                "no handler is registered for kind `{kind}` in this worker pool"
            ));
        };
        let task_ctx = TaskContext {
            id,
            queue,
            kind,
            tenant,
            run_id,
            attempt,
            max_attempts,
            token,
            cancel: cancel.clone(),
            run_lease,
            client: ctx.clone(),
        };
        let fut = AssertUnwindSafe(handler(task_ctx, payload)).catch_unwind();
        let timed = async {
            match self.settings.timeout {
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

    pub(super) async fn executor_loop(
        self: Arc<Self>,
        ctx: ServiceContext,
        shared: Arc<Shared>,
        work_rx: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<ClaimedTask>>>,
        ack_tx: mpsc::UnboundedSender<Ack>,
    ) {
        // This loop's handles on the finished tasks' series.
        let mut series = telemetry::TaskSeriesCache::new();
        loop {
            let next = {
                let mut rx = work_rx.lock().await;
                rx.recv().await
            };
            let Some(task) = next else { return };
            let id = task.id;
            let token = task.token;
            let cancel = shared
                .with_held(|h| h.get(&id).map(|e| e.cancel.clone()))
                .unwrap_or_default();
            let slot = series.slot(&task.queue, &task.kind);
            let retries_left = task.attempt < task.max_attempts;
            let traceparent = shared.with_traces(|m| m.remove(&id));
            let run_lease = if self.run_leasing.is_empty() {
                None
            } else {
                shared.with_run_leases(|m| m.remove(&id))
            };
            let trace = super::trace::TaskTrace::start(&task, traceparent.as_deref());
            let started = std::time::Instant::now();
            let run = self.execute(&ctx, task, cancel, run_lease);
            let outcome = match &trace {
                Some(t) => run.with_context(t.context()).await,
                None => run.await,
            };
            series.finished(
                slot,
                match &outcome {
                    AckOutcome::Complete => AttemptOutcome::Succeeded,
                    AckOutcome::Snooze(_) => AttemptOutcome::Snoozed,
                    AckOutcome::Fail { .. } => AttemptOutcome::Failed {
                        retried: retries_left,
                    },
                    _ => AttemptOutcome::Failed { retried: false },
                },
                started.elapsed(),
            );
            // The names are shared only for a span (not cloned per task while tracing is off).
            if let Some(t) = trace
                && let Some((queue, kind)) = series.names(slot)
            {
                t.end(
                    queue,
                    kind,
                    match &outcome {
                        AckOutcome::Fail { error, .. } | AckOutcome::Discard { error } => {
                            Some(error.as_str())
                        }
                        _ => None,
                    },
                );
            }
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
            // Held (and heartbeated) until the acker has delivered the acknowledgement.
            shared.with_held(|h| {
                if let Some(e) = h.get_mut(&id) {
                    e.ack = super::AckState::Queued;
                }
            });
            shared.ack_backlog.fetch_add(1, Ordering::SeqCst);
            if ack_tx.send(Ack { id, token, outcome }).is_err() {
                shared.ack_backlog.fetch_sub(1, Ordering::SeqCst);
                shared.with_held(|h| h.remove(&id));
            }
            m.in_flight.fetch_sub(1, Ordering::SeqCst);
            telemetry::global().released();
            shared.slot_freed.notify_one();
        }
    }

    /// Heartbeat held tasks every interval, and at once when a cancellation of one of them is
    /// announced (or notifications may have been missed): the heartbeat re-reads the tasks'
    /// cancellation flags, so a cancelled running task's token fires within a round trip.
    pub(super) async fn heartbeat_loop(
        self: Arc<Self>,
        ctx: ServiceContext,
        shared: Arc<Shared>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut sub = ctx.subscribe(&[EventKind::TaskCancelRequested]);
        let mut listening = true;
        let mut next = tokio::time::Instant::now() + self.settings.heartbeat_interval;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {
                    next = tokio::time::Instant::now() + self.settings.heartbeat_interval;
                }
                ev = sub.recv(), if listening => match ev {
                    Some(Event::TaskCancelRequested { task_id, instance_id }) => {
                        let ours = instance_id.as_deref() == Some(ctx.instance_id().as_str());
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
                let conn = ctx.db().get().await?;
                heartbeat(&conn, ctx.instance_id(), &ids).await
            }
            .await;
            match result {
                Ok(rep) => {
                    let alive: std::collections::HashSet<TaskId> =
                        rep.alive.iter().copied().collect();
                    shared.with_held(|h| {
                        for id in &rep.cancel_requested {
                            if let Some(t) = h.get(id) {
                                t.cancel.cancel();
                            }
                        }
                        for id in &ids {
                            // A finished task's acknowledgement may have been applied since the
                            // ids were read: only a task still running here was lost.
                            if !alive.contains(id)
                                && let Some(t) = h.get(id)
                                && t.ack == super::AckState::None
                            {
                                warn!(task = %id, "task claim lost (rescued by maintenance); cancelling its handler");
                                t.cancel.cancel();
                            }
                        }
                    });
                }
                Err(e) => warn!(error = %e, "worker pool: task heartbeat failed"),
            }
        }
    }
}
