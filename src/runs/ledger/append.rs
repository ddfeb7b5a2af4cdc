//! Appends: one event or a batch, on the pool or inside the caller's transaction; periodic
//! signed checkpoints.

use tracing::{instrument, warn};

use super::{AppendedEvent, LedgerEvent, MAX_BATCH, NewEvent};
use crate::db::{Db, Executor, Handle, handle_of};
use crate::error::{Error, Result};
use crate::ids::RunId;
use crate::ledger_key::LedgerKey;
use crate::runs::{limits, map_db_error};

type AppendParams = (
    Vec<String>,
    Vec<Option<String>>,
    Vec<serde_json::Value>,
    Vec<bool>,
);

fn params(events: &[NewEvent], max_payload: usize) -> Result<AppendParams> {
    if events.is_empty() {
        return Err(Error::invalid("events", "at least one event is required"));
    }
    if events.len() > MAX_BATCH {
        return Err(Error::invalid(
            "events",
            format!(
                "{} events in one batch; at most {MAX_BATCH} are allowed",
                events.len()
            ),
        ));
    }
    for e in events {
        e.validate()?;
        limits::check("event payload", limits::json_len(&e.payload), max_payload)?;
    }
    Ok((
        events.iter().map(|e| e.event_type.clone()).collect(),
        events.iter().map(|e| e.step_key.clone()).collect(),
        events.iter().map(|e| e.payload.clone()).collect(),
        events.iter().map(|e| e.idempotent).collect(),
    ))
}

fn appended(rows: Vec<tokio_postgres::Row>) -> Vec<AppendedEvent> {
    rows.into_iter()
        .map(|r| AppendedEvent {
            seq: r.get(0),
            hash: r.get(1),
            created_at: r.get(2),
            inserted: r.get(3),
        })
        .collect()
}

/// Append one event to a run (see [`append_events`]). With `lease_token`, the append is
/// rejected with [`Error::LeaseLost`] unless that token is the run's current, unexpired lease.
#[instrument(skip(on, event), fields(event_type = %event.event_type), err)]
pub async fn append_event<E: Executor + ?Sized>(
    on: &E,
    run: RunId,
    event: NewEvent,
    lease_token: Option<i64>,
) -> Result<AppendedEvent> {
    let mut v = append_events(on, run, std::slice::from_ref(&event), lease_token).await?;
    v.pop()
        .ok_or_else(|| Error::Internal("pgcrew.append_events returned no row".into()))
}

/// Append several events to a run in one statement (consecutive seqs; nothing of the batch is
/// stored on error). With `lease_token`, the append is rejected with [`Error::LeaseLost`] unless
/// that token is the run's current, unexpired lease.
///
/// Given the pool (`&db`), the batch commits on its own, a payload over the handle's limit
/// ([`Db::run_limits`], at most the 1 MiB hard cap) is refused with [`Error::TooLarge`], and the
/// head is signed every [`Db::checkpoint_interval`] events when the handle has a ledger key.
/// Given a transaction (for example the one settling a budget), the run stays locked for appends
/// until that transaction ends, `pgcrew_run_event` is notified at most once per transaction and
/// run, at commit, and payloads are checked against the hard cap
/// ([`limits::MAX_EVENT_PAYLOAD_BYTES`]) — or the handle's limit when joined through one
/// ([`Db::join`]); no periodic checkpoint is signed there (a run's final head is, when it
/// finishes).
#[instrument(skip(on, events), fields(n = events.len()), err)]
pub async fn append_events<E: Executor + ?Sized>(
    on: &E,
    run: RunId,
    events: &[NewEvent],
    lease_token: Option<i64>,
) -> Result<Vec<AppendedEvent>> {
    let handle = handle_of(on);
    let max_payload = handle.db().map_or(limits::MAX_EVENT_PAYLOAD_BYTES, |db| {
        db.run_limits().max_event_payload_bytes
    });
    let out = append_rows(on, run, events, lease_token, max_payload).await?;
    crate::telemetry::global().appended(out.iter().filter(|a| a.inserted).count() as u64);
    if let Handle::Pool(db) = handle
        && let Some(key) = db.ledger_key()
    {
        checkpoint_after_append(on, key, db.checkpoint_interval(), run, &out).await;
    }
    Ok(out)
}

/// Append `events` with payloads of at most `max_payload` bytes, nothing else.
pub(crate) async fn append_rows<E: Executor + ?Sized>(
    on: &E,
    run: RunId,
    events: &[NewEvent],
    lease_token: Option<i64>,
    max_payload: usize,
) -> Result<Vec<AppendedEvent>> {
    let (types, keys, payloads, dedupe) = params(events, max_payload)?;
    let rows = match (&types[..], &keys[..], &payloads[..], &dedupe[..]) {
        // One event: pgcrew.append_event, the same path with scalar arguments (V023).
        ([ty], [key], [payload], [idempotent]) => {
            on.query(
                sql!("runs/append_event"),
                typed![&run, &lease_token, ty, key, payload, idempotent],
            )
            .await
        }
        _ => {
            on.query(
                sql!("runs/append_events"),
                typed![&run, &lease_token, &types, &keys, &payloads, &dedupe],
            )
            .await
        }
    }
    .map_err(|e| map_db_error(e, run))?;
    Ok(appended(rows))
}

/// Check `events` as an append through `db` would (types, step keys, the handle's payload
/// cap), for a statement that appends them itself (the kernel's model-step functions, V040).
pub(crate) fn check_events(db: &Db, events: &[NewEvent]) -> Result<()> {
    params(events, db.run_limits().max_event_payload_bytes).map(|_| ())
}

/// What an append through the pool does after its statement, for a statement that appended
/// `appended` itself: the appended-events counter and, with a ledger key, the periodic signed
/// checkpoint.
pub(crate) async fn after_append(db: &Db, run: RunId, appended: &[AppendedEvent]) {
    crate::telemetry::global().appended(appended.iter().filter(|a| a.inserted).count() as u64);
    if let Some(key) = db.ledger_key() {
        checkpoint_after_append(db, key, db.checkpoint_interval(), run, appended).await;
    }
}

/// Sign the head reached by an append when the append crossed a multiple of `every` (so a run
/// is signed at most every `every` events). The append has committed: a checkpoint that cannot
/// be stored is logged and left to the next one (or to the run's final checkpoint).
async fn checkpoint_after_append<E: Executor + ?Sized>(
    conn: &E,
    key: &LedgerKey,
    every: u32,
    run: RunId,
    appended: &[AppendedEvent],
) {
    let every = i64::from(every.max(1));
    let (Some(first), Some(last)) = (
        appended.iter().find(|e| e.inserted),
        appended.iter().rev().find(|e| e.inserted),
    ) else {
        return;
    };
    if last.seq / every == (first.seq - 1) / every {
        return;
    }
    let mac = key.sign(run, last.seq, &last.hash);
    let stored = async {
        conn.execute(
            sql!("runs/add_checkpoint"),
            typed![&run, &last.seq, &last.hash, &mac.as_slice(), &false],
        )
        .await
    }
    .await;
    if let Err(e) = stored {
        warn!(run = %run, seq = last.seq, error = %e, "ledger checkpoint not stored; the next one covers it");
    }
}

/// Sign a run's head `(seq, head_hash)` with `key` and store the checkpoint inside the caller's
/// transaction (`last` marks the checkpoint signed when the run finished).
pub(crate) async fn sign_head<E: Executor + ?Sized>(
    tx: &E,
    key: &LedgerKey,
    run: RunId,
    seq: i64,
    head_hash: &[u8],
    last: bool,
) -> Result<()> {
    let mac = key.sign(run, seq, head_hash);
    tx.execute(
        sql!("runs/add_checkpoint"),
        typed![&run, &seq, &head_hash, &mac.as_slice(), &last],
    )
    .await
    .map_err(|e| map_db_error(e, run))?;
    Ok(())
}

fn ledger_event(run: RunId, r: &tokio_postgres::Row) -> LedgerEvent {
    LedgerEvent {
        run_id: run,
        seq: r.get(0),
        tenant_id: r.get(1),
        event_type: r.get(2),
        step_key: r.get(3),
        payload: r.get(4),
        prev_hash: r.get(5),
        hash: r.get(6),
        created_at: r.get(7),
    }
}

/// Read up to `limit` events of a run with `seq > after_seq`, in order.
#[instrument(skip(db), err)]
pub async fn read_events(
    db: &Db,
    run: RunId,
    after_seq: i64,
    limit: i64,
) -> Result<Vec<LedgerEvent>> {
    if limit < 1 {
        return Err(Error::invalid("limit", "must be at least 1"));
    }
    let rows = db
        .query(sql!("runs/read_events"), typed![&run, &after_seq, &limit])
        .await?;
    Ok(rows.iter().map(|r| ledger_event(run, r)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_are_validated_before_touching_the_database() {
        assert!(params_max(&[]).is_err());
        assert!(params_max(&[NewEvent::new("", serde_json::json!({}))]).is_err());
        assert!(params_max(&[NewEvent::new("a", serde_json::json!({})).step("x\n")]).is_err());
        assert!(
            params_max(&[NewEvent::new("a", serde_json::json!({})).step("k".repeat(513))]).is_err()
        );
        assert!(params_max(&[NewEvent::new("a", serde_json::json!({})).step("k")]).is_ok());
        // Payload limit: compact JSON text, refused with TooLarge.
        let big = NewEvent::new("a", serde_json::json!("x".repeat(100)));
        assert!(params(std::slice::from_ref(&big), 102).is_ok());
        assert!(matches!(
            params(&[big], 101),
            Err(Error::TooLarge {
                size: 102,
                limit: 101,
                ..
            })
        ));
    }

    fn params_max(events: &[NewEvent]) -> Result<AppendParams> {
        params(events, limits::MAX_EVENT_PAYLOAD_BYTES)
    }
}
