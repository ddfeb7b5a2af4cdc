//! Retention of one finished run's ledger, keeping a chain anchor.

use tracing::{info, instrument};

use super::ChainAnchor;
use crate::db::{Db, Executor};
use crate::error::{Error, Result};
use crate::ids::RunId;
use crate::runs::map_db_error;

/// Retention: remove a *finished* run's events, artifacts and summaries, keeping a chain anchor
/// (the recorded head: last seq and hash) in `pgcrew.chain_anchors` and the run's signed
/// checkpoints (SQL function `pgcrew.purge_run_ledger`). Logged at `info`. The run row stays; its
/// ledger is closed (appends are refused) and it still verifies, through the anchor.
#[instrument(skip(db, reason), err)]
pub async fn purge_run(db: &Db, run: RunId, reason: &str) -> Result<ChainAnchor> {
    if reason.trim().is_empty() {
        return Err(Error::invalid(
            "reason",
            "say why the run's ledger is removed",
        ));
    }
    let row = db
        .query_one(sql!("runs/purge_ledger"), typed![&run, &reason])
        .await
        .map_err(|e| match e.into_driver() {
            Ok(pg) => match pg.as_db_error() {
                Some(d) if d.code().code() == crate::sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE => {
                    Error::invalid("run", d.message())
                }
                _ => map_db_error(Error::Database(pg), run),
            },
            Err(other) => map_db_error(other, run),
        })?;
    let events: i64 = row.get(5);
    let artifacts: i64 = row.get(6);
    let summaries: i64 = row.get(7);
    info!(run = %run, events, artifacts, summaries, reason, "retention: purged finished run's ledger (chain anchor kept)");
    Ok(ChainAnchor {
        last_seq: row.get(0),
        last_hash: row.get(1),
        event_count: row.get(2),
        reason: row.get(3),
        purged_at: row.get(4),
    })
}
