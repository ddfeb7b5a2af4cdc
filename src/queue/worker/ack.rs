//! Acknowledging (River's completer): many acknowledgements per statement, never dropped
//! while the process lives.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{debug, error, warn};

use super::{Shared, WorkerMetrics};
use crate::db::{Conn, Db};
use crate::error::Result;
use crate::queue::claim::{Ack, AckOutcome, ack_with};

/// Acknowledgements per statement.
const ACK_BATCH: usize = 1000;

/// Acknowledgements queued or being delivered at which the fetcher stops claiming until a
/// delivery: a batch being written and a batch waiting. Without it a database slow to take
/// acknowledgements (while claims still go through) piles up running tasks behind them, which
/// makes every count of running tasks slower still.
pub(super) const ACK_BACKLOG: usize = 2 * ACK_BATCH;

pub(super) async fn acker_loop(
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
        let ids: Vec<_> = batch.iter().map(|a| a.id).collect();
        let wake = !shared.completions_free_nothing.load(Ordering::SeqCst)
            || batch.iter().any(|a| a.outcome != AckOutcome::Complete);
        shared.with_held(|h| {
            for id in &ids {
                if let Some(e) = h.get_mut(id) {
                    e.ack = super::AckState::Sending;
                }
            }
        });
        deliver(&db, &mut conn, batch, &metrics, &shared).await;
        // Applied, stale, given up or refused: no longer heartbeated by this pool (a refused
        // one is rescued after its heartbeat timeout).
        shared.with_held(|h| {
            for id in &ids {
                h.remove(id);
            }
        });
        shared.ack_backlog.fetch_sub(ids.len(), Ordering::SeqCst);
        shared.vacuum.acked(ids.len(), &db, &metrics);
        shared.slot_freed.notify_one();
        if wake {
            shared.wake.notify_one();
        }
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
/// Entries are validated and clamped before they are sent (see [`ack`](crate::queue::ack)), so on
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
                crate::telemetry::global().acked(part.len(), stale);
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
                crate::telemetry::global().acks_rejected.inc();
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
