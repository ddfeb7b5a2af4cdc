//! Fetching (River's producer): claim batches sized to free capacity, register as a waiter
//! when out of work, and wait for a notification, a flush, the next due task or the poll.

use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

use super::{Shared, WorkerPool};
use crate::coord::notify::{Event, Subscription};
use crate::coord::service::ServiceContext;
use crate::db::{Conn, Executor};
use crate::error::Result;
use crate::ids::{PoolId, RunId, TaskId, TenantId};
use crate::queue::claim::{ClaimedTask, FastRoute, claim_routed, next_due_with};
use crate::runs::lease::lease_runs;
use crate::runs::{LeasedRun, RunLeasing};

impl WorkerPool {
    pub(super) async fn fetch_loop(
        &self,
        ctx: &ServiceContext,
        shared: &Shared,
        work_tx: &mpsc::UnboundedSender<ClaimedTask>,
        sub: &mut Subscription,
        shutdown: &mut watch::Receiver<bool>,
    ) {
        let capacity = self.settings.concurrency + self.settings.prefetch;
        let mut conn: Option<Conn> = None;
        let mut backoff = Duration::from_millis(50);
        // Whether this pool is registered in `pgcrew.queue_waiters` (so enqueues NOTIFY it).
        let mut waiting = false;
        // Just registered: look again at this time (the pool's `recheck_after`, see
        // [`WorkerPoolBuilder::recheck_after`]) unless a claim started after it already did.
        //
        // [`WorkerPoolBuilder::recheck_after`]: super::WorkerPoolBuilder::recheck_after
        let mut recheck_at: Option<tokio::time::Instant> = None;
        // Which single-statement claim the next claim tries first, if any.
        let mut route = FastRoute::default();
        // This loop's handles on the claimed tasks' series.
        let mut series = crate::telemetry::TaskSeriesCache::new();
        loop {
            if *shutdown.borrow() {
                if waiting {
                    self.set_waiting(ctx, &mut conn, false).await;
                }
                return;
            }
            let held = self.metrics.in_flight.load(Ordering::SeqCst);
            let free = capacity.saturating_sub(held);
            // Without prefetch, claim for any free slot (latency); with prefetch, refill once
            // half the capacity is free so claims stay large (throughput).
            let threshold = if self.settings.prefetch == 0 {
                1
            } else {
                (capacity / 2).clamp(1, self.settings.max_batch)
            };
            // Saturated, or acknowledgements are not keeping up (a slow database: claiming more
            // would only pile up running tasks behind them): wait for a slot or a delivery.
            // Enqueues need not wake us meanwhile (keeps NOTIFY off the hot path).
            if free == 0
                || (held > 0 && free < threshold)
                || shared.ack_backlog.load(Ordering::SeqCst) >= super::ack::ACK_BACKLOG
            {
                if waiting {
                    waiting = !self.set_waiting(ctx, &mut conn, false).await;
                }
                tokio::select! {
                    _ = shared.slot_freed.notified() => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            let limit = free.min(self.settings.max_batch);
            // Wake-ups received so far are answered by this claim; only later ones count.
            while let Some(Some(_)) = sub.recv().now_or_never() {}
            let claim_started = tokio::time::Instant::now();
            match self
                .claim_once(ctx, shared, &mut conn, limit, &mut route)
                .await
            {
                Ok(tasks) => {
                    backoff = Duration::from_millis(50);
                    let got = tasks.len();
                    // Out of work: nothing claimed, or the plain fast statement claimed fewer
                    // tasks than asked, so another claim now would find none (it is not sent:
                    // a lone task costs one claim, not two).
                    let drained = got == 0 || (got < limit && route.drained());
                    shared
                        .completions_free_nothing
                        .store(route.plain(), Ordering::SeqCst);
                    if let Some(max_lag) = tasks.iter().map(|t| t.lag).max() {
                        self.metrics
                            .lag_us
                            .store(max_lag.as_micros() as u64, Ordering::Relaxed);
                    }
                    self.metrics
                        .claimed
                        .fetch_add(got as u64, Ordering::Relaxed);
                    let tel = crate::telemetry::global();
                    tel.claimed(got);
                    super::trace::note_claims(ctx.db(), shared, &tasks).await;
                    for t in tasks {
                        self.metrics.in_flight.fetch_add(1, Ordering::SeqCst);
                        series.claimed(&t.queue, &t.kind, t.lag);
                        shared.with_held(|h| h.insert(t.id, super::Held::default()));
                        if work_tx.send(t).is_err() {
                            return;
                        }
                    }
                    if got > 0 {
                        // Let the executors pick the tasks up before the next claim is sent.
                        tokio::task::yield_now().await;
                    }
                    if drained {
                        if !waiting {
                            // Out of work: ask for wake-ups, then claim once more so a task
                            // enqueued before the registration is not left to the poll.
                            waiting = self.set_waiting(ctx, &mut conn, true).await;
                            if waiting {
                                recheck_at =
                                    Some(tokio::time::Instant::now() + self.settings.recheck_after);
                                continue;
                            }
                        }
                        let mut wait = self.settings.poll_interval;
                        match recheck_at {
                            Some(at) if claim_started < at => {
                                let now = tokio::time::Instant::now();
                                wait = wait.min(at.saturating_duration_since(now));
                            }
                            _ => recheck_at = None,
                        }
                        self.idle_wait(&mut conn, shared, sub, shutdown, wait).await;
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
    async fn set_waiting(&self, ctx: &ServiceContext, conn: &mut Option<Conn>, on: bool) -> bool {
        if conn.is_none() {
            match ctx.db().get().await {
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
            c.execute(
                sql!("queue/register_waiter"),
                typed![self.queues, self.pool_id, ctx.instance_id()],
            )
            .await
        } else {
            c.execute(sql!("queue/unregister_waiter"), typed![self.pool_id])
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

    /// Claim up to `limit` tasks. A single-queue pool first tries a one-statement fast path
    /// (`queue/claim_fast`, the common single-tenant, unlimited case, or
    /// `queue/claim_fast_limited` for a queue with a rate or key limit that cannot bind); when
    /// that steps aside (the queue has work it does not take; when it has none, or another
    /// claimer holds it, nothing more runs), the general `pgcrew.claim_tasks` runs, and if it
    /// finds work (several tenants with work, limits, due tasks), the pool uses the general
    /// path until it next runs out of work, then tries the limited fast path (`route`, see
    /// [`claim_routed`]). A pool that leases runs ([`WorkerPoolBuilder::lease_runs_of`]) claims in a
    /// transaction that also takes those leases (see [`Self::lease_claimed`]). The same holds
    /// behind PgBouncer ([`crate::db::StatementMode::Unnamed`]): the fast claims are PL/pgSQL
    /// functions (V048), whose plans stay in the server session whichever client the pooler
    /// lends it to; only their one-line call is planned each time.
    ///
    /// [`WorkerPoolBuilder::lease_runs_of`]: super::WorkerPoolBuilder::lease_runs_of
    async fn claim_once(
        &self,
        ctx: &ServiceContext,
        shared: &Shared,
        conn: &mut Option<Conn>,
        limit: usize,
        route: &mut FastRoute,
    ) -> Result<Vec<ClaimedTask>> {
        if conn.is_none() {
            *conn = Some(ctx.db().get().await?);
        }
        let Some(c) = conn.as_mut() else {
            return Ok(Vec::new());
        };
        let limit = i32::try_from(limit).unwrap_or(i32::MAX);
        let instance = ctx.instance_id();
        if self.run_leasing.is_empty() {
            let c: &Conn = c;
            return claim_routed(c, &self.queues, limit, instance, route).await;
        }
        let tx = c.transaction().await?;
        let tasks = claim_routed(&tx, &self.queues, limit, instance, route).await?;
        let leases = self.lease_claimed(&tx, &tasks).await?;
        tx.commit().await?;
        if !leases.is_empty() {
            shared.with_run_leases(|m| m.extend(leases));
        }
        Ok(tasks)
    }

    /// In the claim's transaction: take the run leases of the claimed tasks whose kind this
    /// pool leases runs for. A failure here (say, a run whose ledger was tampered with) must not
    /// undo the claim or hold back the other tasks: it is rolled back to a savepoint and logged,
    /// and those handlers take (or fail to take) their leases themselves.
    async fn lease_claimed(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        tasks: &[ClaimedTask],
    ) -> Result<Vec<(TaskId, LeasedRun)>> {
        let mut by_leasing: Vec<LeaseGroup<'_>> = Vec::new();
        for t in tasks {
            let (Some(run), Some(leasing)) = (t.run_id, self.run_leasing.get(&t.kind)) else {
                continue;
            };
            let i = match by_leasing.iter().position(|g| g.leasing == leasing) {
                Some(i) => i,
                None => {
                    by_leasing.push(LeaseGroup {
                        leasing,
                        runs: Vec::new(),
                        tasks: Vec::new(),
                    });
                    by_leasing.len() - 1
                }
            };
            by_leasing[i].runs.push((run, t.tenant.clone()));
            by_leasing[i].tasks.push((run, t.id));
        }
        if by_leasing.is_empty() {
            return Ok(Vec::new());
        }
        tx.batch_execute("SAVEPOINT pgcrew_lease_runs").await?;
        let mut out = Vec::new();
        for LeaseGroup {
            leasing,
            runs,
            tasks: tasks_of,
        } in &by_leasing
        {
            match lease_runs(tx, runs, leasing).await {
                Ok(taken) => {
                    for l in taken {
                        // Two claimed tasks naming one run: the first (in execution order)
                        // gets the lease, the other takes its own turn.
                        if let Some((_, task)) = tasks_of.iter().find(|(r, _)| *r == l.lease.run_id)
                            && !out.iter().any(|(t, _): &(TaskId, LeasedRun)| t == task)
                        {
                            out.push((*task, l));
                        }
                    }
                }
                Err(e) => {
                    warn!(error = %e, "worker pool: taking run leases with the claim failed; the handlers take them");
                    tx.batch_execute("ROLLBACK TO SAVEPOINT pgcrew_lease_runs")
                        .await?;
                    return Ok(Vec::new());
                }
            }
        }
        Ok(out)
    }

    /// Nothing to claim: wait for a notification on one of our queues (read directly from the
    /// subscription: no extra task hop), an acknowledgement flush, the next due task, `wait`
    /// (the fallback poll, or the second look after registering), or stop.
    async fn idle_wait(
        &self,
        conn: &mut Option<Conn>,
        shared: &Shared,
        sub: &mut Subscription,
        shutdown: &mut watch::Receiver<bool>,
        mut wait: Duration,
    ) {
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
                    Some(Event::TaskAvailable { queue, pool, backup }) => {
                        match self.named(&queue, pool, backup) {
                            Named::Now => return,
                            Named::Backup => {
                                let at = tokio::time::Instant::now() + BACKUP_DELAY;
                                if at < sleep.deadline() {
                                    sleep.as_mut().reset(at);
                                }
                            }
                            Named::Not => {}
                        }
                    }
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

    /// What a wake-up for `queue` naming `pool` (and `backup`) asks of this pool.
    fn named(&self, queue: &str, pool: Option<PoolId>, backup: Option<PoolId>) -> Named {
        if !self.queues.iter().any(|q| q == queue) {
            Named::Not
        } else if pool.is_none() || pool == Some(self.pool_id) {
            Named::Now
        } else if backup == Some(self.pool_id) {
            Named::Backup
        } else {
            Named::Not
        }
    }
}

/// How long a pool named as a wake-up's backup waits before it claims: long enough that the
/// named pool has claimed the task when it is alive (about a millisecond), short enough that a
/// task named to a pool killed before it was reaped is taken at once for a person.
const BACKUP_DELAY: Duration = Duration::from_millis(20);

/// What a wake-up asks of the pool that received it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Named {
    /// Claim now: the wake-up names this pool, or no pool.
    Now,
    /// Claim after [`BACKUP_DELAY`] unless something else wakes it first.
    Backup,
    /// Another queue's, or another pool's.
    Not,
}

/// The claimed runs to lease as one [`RunLeasing`] says, and the task naming each.
struct LeaseGroup<'a> {
    leasing: &'a RunLeasing,
    runs: Vec<(RunId, TenantId)>,
    tasks: Vec<(RunId, TaskId)>,
}
