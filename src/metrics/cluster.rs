//! Cluster-wide gauges: read from the database by the leader only, at most once per interval,
//! and kept (marked stale) when the database does not answer.

use std::time::Duration;

use tokio::time::Instant;

use crate::db::{Db, Executor};
use crate::error::Result;

/// Tasks of one queue in one state.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueDepth {
    /// Queue.
    pub queue: String,
    /// Task state (`scheduled`, `available`, `running`, `retryable`).
    pub state: String,
    /// Tasks.
    pub tasks: i64,
    /// Age of the oldest due available task (available rows only).
    pub oldest_available_s: Option<f64>,
}

/// One tenant's budget use.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantBudget {
    /// Tenant.
    pub tenant: String,
    /// Spent / limit (`None` without a limit).
    pub used_ratio: Option<f64>,
    /// `HEALTHY`, `WARNING`, `CRITICAL` or `EXCEEDED`.
    pub status: String,
}

/// What one refresh read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterSnapshot {
    /// Per queue and state.
    pub queues: Vec<QueueDepth>,
    /// Instances with a recent heartbeat.
    pub instances_alive: i64,
    /// Rows of `pgcrew.stuck_runs`.
    pub stuck_runs: i64,
    /// Runs running.
    pub running_runs: i64,
    /// Runs pending.
    pub pending_runs: i64,
    /// Per tenant.
    pub budgets: Vec<TenantBudget>,
}

/// The cached snapshot and when it was read.
#[derive(Debug, Default)]
pub(super) struct ClusterCache {
    /// The last snapshot read successfully, and when.
    pub last: Option<(ClusterSnapshot, Instant)>,
    /// When the last refresh was tried (successful or not).
    pub tried: Option<Instant>,
    /// Whether the last refresh failed.
    pub failed: bool,
    /// Refreshes that failed.
    pub errors: u64,
}

impl ClusterCache {
    /// Refresh when the last try is older than `interval` (a failed try also waits, so a
    /// database that is down costs one timeout per interval, not per scrape).
    pub async fn refresh_if_due(
        &mut self,
        db: &Db,
        interval: Duration,
        timeout: Duration,
        ttl: Duration,
    ) {
        if self.tried.is_some_and(|t| t.elapsed() < interval) {
            return;
        }
        self.tried = Some(Instant::now());
        let read = tokio::time::timeout(timeout, read(db, ttl)).await;
        match read {
            Ok(Ok(snap)) => {
                self.last = Some((snap, Instant::now()));
                self.failed = false;
            }
            Ok(Err(e)) => self.fail(&e.to_string()),
            Err(_) => self.fail(&format!("no answer within {timeout:?}")),
        }
    }

    fn fail(&mut self, why: &str) {
        if !self.failed {
            tracing::warn!(error = %why, "metrics: reading the cluster gauges failed; serving the last values, marked stale");
        }
        self.failed = true;
        self.errors += 1;
    }
}

/// Read every cluster gauge (three statements on one pooled connection).
pub async fn read(db: &Db, instance_ttl: Duration) -> Result<ClusterSnapshot> {
    let conn = db.get().await?;
    let mut snap = ClusterSnapshot::default();
    for r in Executor::query(&conn, sql!("metrics/queue_depth"), typed![]).await? {
        snap.queues.push(QueueDepth {
            queue: r.try_get(0)?,
            state: r.try_get(1)?,
            tasks: r.try_get(2)?,
            oldest_available_s: r.try_get(3)?,
        });
    }
    let ttl_us = i64::try_from(instance_ttl.as_micros()).unwrap_or(i64::MAX);
    let counts =
        Executor::query_one(&conn, sql!("metrics/cluster_counts"), typed![&ttl_us]).await?;
    snap.instances_alive = counts.try_get(0)?;
    snap.stuck_runs = counts.try_get(1)?;
    snap.running_runs = counts.try_get(2)?;
    snap.pending_runs = counts.try_get(3)?;
    for r in Executor::query(&conn, sql!("metrics/budgets"), typed![]).await? {
        snap.budgets.push(TenantBudget {
            tenant: r.try_get(0)?,
            used_ratio: r.try_get(1)?,
            status: r.try_get(2)?,
        });
    }
    Ok(snap)
}
