//! Leader history (V030): every term of every lease — holder and when it was taken — recorded
//! in `pgcrew.leader_terms` by triggers on `pgcrew.leader` in the transaction that elects, so it
//! is the same on every instance and survives restarts. The leader's maintenance
//! ([`LeaderHistoryRetention`]) deletes terms older than `history_retention` (a lease's newest
//! term always stays). Operators read it through the view `pgcrew.leader_history`.

use chrono::{DateTime, Utc};
use serde::Serialize;
use tracing::{info, instrument};

use crate::config::interval_micros;
use crate::db::Executor;
use crate::error::Result;

/// One leader term.
#[derive(Debug, Clone, Serialize, postgres_from_row::FromRow)]
pub struct LeaderTerm {
    /// The lease.
    pub name: String,
    /// The fencing term.
    pub term: i64,
    /// The instance that held it.
    pub leader_id: String,
    /// When it was taken (database time).
    pub acquired_at: DateTime<Utc>,
    /// When the next term of the lease began (`None`: the newest term).
    pub held_until: Option<DateTime<Utc>>,
}

/// The newest `limit` terms of every lease, newest first.
#[instrument(skip(client), err)]
pub async fn history<E: Executor + ?Sized>(client: &E, limit: i64) -> Result<Vec<LeaderTerm>> {
    let rows = client
        .query(sql!("coord/leader_history"), typed![&limit])
        .await?;
    crate::db::rows_as(&rows)
}

maintenance_step! {
    /// Deletes leader terms taken more than `history_retention` ago (never a lease's newest),
    /// at most `retention_batch_size` per pass.
    LeaderHistoryRetention, "leader_history_retention", probe: |_ctx| crate::coord::maintenance::Probe::WhenDue,
    |tx, ctx| {
        let age = interval_micros(ctx.config.history_retention);
        let n = Executor::execute(tx,
            sql!("coord/leader_terms_retention"),
            typed![&age, &ctx.config.retention_batch_size],
        ).await?;
        if n > 0 {
            info!(deleted = n, "maintenance: deleted old leader terms");
        }
        Ok(n)
    }
}
