//! Concurrency per key: at most N tasks of a queue running at once per key, fleet-wide, the key
//! being the value of a payload field (`{"customer": 42}` with field `customer`: the key
//! `customer:42`). Exact under any number of claimers: `pgcrew.claim_tasks` serialises the
//! claims of a queue with a key limit under an advisory lock and counts its running tasks per
//! key under it (the standard of the tenant limits). Tasks without the field are not limited.

use serde::Serialize;
use tracing::instrument;

use crate::db::Executor;
use crate::error::{Error, Result};
use crate::ids::validate_text_id;

/// A queue's key limit (a row of `pgcrew.queue_key_limits`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, postgres_from_row::FromRow)]
pub struct KeyLimit {
    /// The queue.
    pub queue: String,
    /// The payload field whose value is the key.
    pub key_field: String,
    /// Tasks allowed to run at once per key.
    pub max_running: i32,
}

/// Allow at most `max_running` tasks of `queue` to run at once per value of the payload field
/// `key_field` (replacing the queue's key limit, if any). `max_running` below 1, or an empty or
/// over-long queue or field, is an [`Error::InvalidInput`]; nothing is stored.
#[instrument(skip(client), err)]
pub async fn set_key_limit<E: Executor + ?Sized>(
    client: &E,
    queue: &str,
    key_field: &str,
    max_running: i32,
) -> Result<()> {
    validate_text_id("queue", queue)?;
    validate_text_id("key_field", key_field)?;
    if max_running < 1 {
        return Err(Error::invalid(
            "max_running",
            format!("is {max_running}; at least 1 task per key must be allowed to run"),
        ));
    }
    client
        .execute(
            sql!("queue/set_key_limit"),
            typed![queue, key_field, &max_running],
        )
        .await?;
    Ok(())
}

/// Remove `queue`'s key limit and wake its idle pools; returns whether there was one.
#[instrument(skip(client), err)]
pub async fn clear_key_limit<E: Executor + ?Sized>(client: &E, queue: &str) -> Result<bool> {
    let row = client
        .query_one(sql!("queue/clear_key_limit"), typed![queue])
        .await?;
    Ok(row.try_get::<_, i64>(0)? > 0)
}

/// Every key limit, by queue.
#[instrument(skip(client), err)]
pub async fn key_limits<E: Executor + ?Sized>(client: &E) -> Result<Vec<KeyLimit>> {
    let rows = client.query(sql!("queue/key_limits"), typed![]).await?;
    crate::db::rows_as(&rows)
}
