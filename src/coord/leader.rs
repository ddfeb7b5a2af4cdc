//! The leader lease: one row per lease name in `pgcrew.leader`, taken or renewed by a single
//! conditional upsert on database time, with a fencing `term` that changes with every holder.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tracing::instrument;

use crate::config::interval_micros;
use crate::db::Db;
use crate::db::Executor;
use crate::error::Result;
use crate::ids::InstanceId;

/// The lease name the client (`Client`) takes for maintenance leadership.
pub const DEFAULT_LEASE: &str = "default";

/// Outcome of an election attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Election {
    /// We hold the lease with this term.
    Leader {
        /// Fencing term.
        term: i64,
    },
    /// Someone else holds a valid lease.
    Follower {
        /// The current holder, if known.
        leader_id: Option<String>,
        /// Time until the current lease expires (database time), if known.
        expires_in: Option<Duration>,
    },
}

/// Try to take or renew `name` for `id` for `ttl`.
#[instrument(skip(db), err)]
pub async fn elect(db: &Db, name: &str, id: &InstanceId, ttl: Duration) -> Result<Election> {
    let conn = db.get().await?;
    elect_on(&conn, name, id, ttl).await
}

/// [`elect`] on a given connection (the instance's coordination connection).
pub(crate) async fn elect_on(
    conn: &tokio_postgres::Client,
    name: &str,
    id: &InstanceId,
    ttl: Duration,
) -> Result<Election> {
    let ttl_us = interval_micros(ttl);
    if let Some(row) =
        Executor::query_opt(conn, sql!("coord/elect"), typed![&name, id, &ttl_us]).await?
    {
        return Ok(Election::Leader { term: row.get(0) });
    }
    let row = Executor::query_opt(conn, sql!("coord/leader_wait"), typed![&name]).await?;
    Ok(match row {
        Some(r) => Election::follower(r.get(0), r.get(2)),
        None => Election::follower(None, None),
    })
}

impl Election {
    /// A follower's view: the holder and its lease's remaining time in µs, as read.
    fn follower(leader_id: Option<String>, remaining_us: Option<i64>) -> Election {
        Election::Follower {
            leader_id,
            expires_in: remaining_us.map(|us| Duration::from_micros(us.max(0) as u64)),
        }
    }
}

/// One election attempt of a started instance, in one statement (`coord/elect_beat`): take or
/// renew `name` for `id` for `ttl`, refresh `id`'s heartbeat, and, when another instance holds
/// the lease, learn who and until when. Returns the outcome and whether the instance row was
/// there to refresh (`false`: it was removed as stale and must re-register).
pub(crate) async fn elect_and_beat_on(
    conn: &tokio_postgres::Client,
    name: &str,
    id: &InstanceId,
    ttl: Duration,
) -> Result<(Election, bool)> {
    let ttl_us = interval_micros(ttl);
    let row =
        Executor::query_one(conn, sql!("coord/elect_beat"), typed![&name, id, &ttl_us]).await?;
    let ours: Option<bool> = row.try_get(0)?;
    let beat: bool = row.try_get(4)?;
    let election = match ours {
        Some(true) => Election::Leader {
            term: row.try_get(1)?,
        },
        Some(false) => Election::follower(row.try_get(2)?, row.try_get(3)?),
        // No lease row and our insert lost a race: unknown holder.
        None => Election::follower(None, None),
    };
    Ok((election, beat))
}

/// Give up the lease if we hold it (DELETE fires the leader-changed NOTIFY, so followers
/// elect at once). Returns whether we held it.
#[instrument(skip(db), err)]
pub async fn resign(db: &Db, name: &str, id: &InstanceId) -> Result<bool> {
    let conn = db.get().await?;
    resign_on(&conn, name, id).await
}

/// [`resign`] on a given connection (the instance's coordination connection).
pub(crate) async fn resign_on(
    conn: &tokio_postgres::Client,
    name: &str,
    id: &InstanceId,
) -> Result<bool> {
    Ok(Executor::execute(conn, sql!("coord/resign"), typed![&name, id]).await? > 0)
}

/// A lease row.
#[derive(Debug, Clone, Serialize, postgres_from_row::FromRow)]
pub struct LeaderRow {
    /// Lease name.
    pub name: String,
    /// Holder.
    pub leader_id: String,
    /// Fencing term.
    pub term: i64,
    /// When the current holder took it.
    pub elected_at: DateTime<Utc>,
    /// When it expires unless renewed.
    pub expires_at: DateTime<Utc>,
    /// Whether it is still valid (database time).
    pub valid: bool,
    /// Milliseconds until expiry (negative when expired).
    pub remaining_ms: i64,
}

/// All lease rows.
#[instrument(skip(db), err)]
pub async fn current(db: &Db) -> Result<Vec<LeaderRow>> {
    let rows = db.query(sql!("coord/current_leader"), typed![]).await?;
    crate::db::rows_as(&rows)
}
