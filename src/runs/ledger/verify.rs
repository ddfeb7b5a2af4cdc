//! Verification: streaming in Rust without the key, with the key (signed checkpoints), and
//! through the SQL function `pgcrew.verify_run_chain`.

use futures_util::StreamExt;
use tokio_postgres::types::{ToSql, Type};
use tracing::instrument;

use super::{ChainAnchor, ChainVerification, LedgerFormat, SignedVerification};
use crate::db::{Conn, Db, Executor};
use crate::error::{Error, Result};
use crate::ids::RunId;
use crate::ledger_key::LedgerKey;
use crate::runs::state::{RunState, ensure_run};

async fn anchor<C: Executor + ?Sized>(client: &C, run: RunId) -> Result<Option<ChainAnchor>> {
    let row = client
        .query_opt(sql!("runs/get_anchor"), typed![&run])
        .await?;
    Ok(row.map(|r| ChainAnchor {
        last_seq: r.get(0),
        last_hash: r.get(1),
        event_count: r.get(2),
        reason: r.get(3),
        purged_at: r.get(4),
    }))
}

/// A stored checkpoint.
struct Checkpoint {
    seq: i64,
    head_hash: Vec<u8>,
    mac: Vec<u8>,
    /// The stored event at `seq`, as streamed: its hash and whether it finishes the run.
    event: Option<(Vec<u8>, bool)>,
}

/// The event types a terminal transition records (always a finished run's last event).
fn finishes_run(event_type: &str) -> bool {
    crate::vocab::EventType::from_name(event_type).is_some_and(|e| e.finishes_run())
}

/// What one consistent scan of a run's ledger found.
struct Scan {
    chain: ChainVerification,
    state: RunState,
    head_hash: Option<Vec<u8>>,
    purged: bool,
    checkpoints: Vec<Checkpoint>,
}

/// One read-only, repeatable-read transaction on `conn` (a consistent snapshot of the run's
/// ledger), once the run is known to exist.
async fn snapshot(conn: &mut Conn, run: RunId) -> Result<deadpool_postgres::Transaction<'_>> {
    ensure_run(&*conn, run).await?;
    Ok(conn
        .build_transaction()
        .read_only(true)
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await?)
}

/// Stream a run's events (and, with `with_checkpoints`, its checkpoints) in one read-only,
/// repeatable-read snapshot and apply the unkeyed checks, exactly like `pgcrew.verify_run_chain`.
async fn scan(db: &Db, run: RunId, with_checkpoints: bool) -> Result<Scan> {
    let mut conn = db.get().await?;
    let tx = snapshot(&mut conn, run).await?;
    let head = tx
        .query_opt(sql!("runs/ledger_head"), typed![&run])
        .await?
        .ok_or_else(|| Error::not_found("run", run))?;
    let head_seq: i64 = head.get(0);
    let head_hash: Option<Vec<u8>> = head.get(1);
    let state: RunState = head.try_get(2)?;
    let format_value: i16 = head.get(3);
    let format = LedgerFormat::from_i16(format_value)?;
    let anchor = anchor(&tx, run).await?;
    let mut checkpoints: Vec<Checkpoint> = if with_checkpoints {
        tx.query(sql!("runs/list_checkpoints"), typed![&run])
            .await?
            .iter()
            .map(|r| Checkpoint {
                seq: r.get(0),
                head_hash: r.get(1),
                mac: r.get(2),
                event: None,
            })
            .collect()
    } else {
        Vec::new()
    };
    // Streamed row by row, as an unnamed statement (nothing is left on the server connection,
    // which behind a transaction pooler may serve another client next).
    let rows = tx
        .query_typed_raw(
            sql!("runs/verify_rows"),
            [(&run as &(dyn ToSql + Sync), Type::UUID)],
        )
        .await?;
    let mut rows = Box::pin(rows);
    let mut expected_prev = vec![0u8; 32];
    let mut rn: i64 = 0;
    let mut next_ck = 0usize;
    let mut first_bad: Option<(i64, String)> = None;
    'outer: loop {
        let Some(r) = rows.next().await.transpose()? else {
            break;
        };
        {
            rn += 1;
            let seq: i64 = r.get(0);
            let tenant: &str = r.get(1);
            let event_type: &str = r.get(2);
            let step_key: Option<&str> = r.get(3);
            let created_us: i64 = r.get(4);
            let payload: &str = r.get(5);
            let prev: &[u8] = r.get(6);
            let hash: &[u8] = r.get(7);
            if seq != rn {
                first_bad = Some((rn, "event missing or moved".into()));
                break 'outer;
            }
            let computed = format.hash(
                prev, run, seq, tenant, event_type, step_key, created_us, payload,
            );
            if prev != expected_prev.as_slice() {
                first_bad = Some((seq, "event does not link to its predecessor".into()));
                break 'outer;
            }
            if hash != computed.as_slice() {
                first_bad = Some((
                    seq,
                    "event hash does not match its contents (changed, or copied from another run)"
                        .into(),
                ));
                break 'outer;
            }
            while next_ck < checkpoints.len() && checkpoints[next_ck].seq < seq {
                next_ck += 1;
            }
            if let Some(ck) = checkpoints.get_mut(next_ck)
                && ck.seq == seq
            {
                ck.event = Some((hash.to_vec(), finishes_run(event_type)));
            }
            expected_prev.clear();
            expected_prev.extend_from_slice(hash);
        }
    }
    drop(rows);
    // A bad row past head + 1 means rows are stored beyond the recorded head: report that first,
    // like the SQL function (which sees every row).
    if let Some((bad, _)) = &first_bad
        && *bad > head_seq + 1
    {
        first_bad = Some((
            head_seq + 1,
            format!("events stored beyond the recorded head (seq {head_seq})"),
        ));
    }
    // Stored events: rn (all of them when the rows were good; only needed then).
    let stored = rn;
    let last_hash = (stored > 0).then_some(expected_prev.as_slice());
    let purged = anchor.as_ref().is_some_and(|a| {
        stored == 0
            && first_bad.is_none()
            && state.is_terminal()
            && a.last_seq == head_seq
            && Some(&a.last_hash) == head_hash.as_ref()
            && a.event_count == head_seq
    });
    if first_bad.is_none() && !purged {
        if stored < head_seq {
            first_bad = Some((
                stored + 1,
                format!(
                    "events missing after the last stored one (recorded head is seq {head_seq})"
                ),
            ));
        } else if stored > head_seq {
            first_bad = Some((
                head_seq + 1,
                format!("events stored beyond the recorded head (seq {head_seq})"),
            ));
        } else if stored > 0 && last_hash != head_hash.as_deref() {
            first_bad = Some((head_seq, "the last event is not the recorded head".into()));
        }
    }
    if first_bad.is_none()
        && !purged
        && let Some(a) = &anchor
    {
        first_bad = Some((
            a.last_seq.min(head_seq).max(1),
            "chain anchor does not match a purged run (events still stored, run unfinished, or anchor differs from the recorded head)".into(),
        ));
    }
    let checked = match first_bad {
        // Like the SQL function, report the number of events stored.
        Some(_) => count_events(&tx, run).await?,
        None => u64::try_from(rn).unwrap_or(0),
    };
    tx.commit().await?;
    let (first_bad_seq, problem) = match first_bad {
        Some((s, p)) => (Some(s), Some(p)),
        None => (None, None),
    };
    Ok(Scan {
        chain: ChainVerification {
            valid: first_bad_seq.is_none(),
            first_bad_seq,
            checked,
            anchor,
            problem,
            head_seq,
            format: format_value,
        },
        state,
        head_hash,
        purged,
        checkpoints,
    })
}

/// Verify a run's chain without the key, in Rust, streaming the rows through a cursor (constant
/// memory) in one consistent snapshot. Reports the first bad seq exactly like
/// [`verify_run_chain_sql`]. A full rewrite with recomputed hashes and head is not detected
/// without the key: see [`verify_run_chain_signed`].
#[instrument(skip(db), err)]
pub async fn verify_run_chain(db: &Db, run: RunId) -> Result<ChainVerification> {
    Ok(scan(db, run, false).await?.chain)
}

/// Verify a run's chain and its signed checkpoints with the ledger key. Detects everything
/// [`verify_run_chain`] does, and also a full rewrite (recomputed hashes and head), events copied
/// from another run, forged, mismatching or deleted checkpoints, and a finished run whose head is
/// not covered by a valid checkpoint. For a run still running, [`SignedVerification::signed_seq`]
/// says how far it is signed.
#[instrument(skip(db, key), err)]
pub async fn verify_run_chain_signed(
    db: &Db,
    run: RunId,
    key: &LedgerKey,
) -> Result<SignedVerification> {
    let scan = scan(db, run, true).await?;
    Ok(judge_signed(run, key, scan))
}

fn judge_signed(run: RunId, key: &LedgerKey, scan: Scan) -> SignedVerification {
    let Scan {
        chain,
        state,
        head_hash,
        purged,
        checkpoints,
    } = scan;
    let head_seq = chain.head_seq;
    let count = checkpoints.len() as u64;
    let verdict = |problem: Option<String>, signed_seq: Option<i64>| SignedVerification {
        valid: chain.valid && problem.is_none(),
        problem: chain.problem.clone().or(problem),
        signed_seq,
        checkpoints: count,
        state,
        chain: chain.clone(),
    };
    if !chain.valid {
        return verdict(None, None);
    }
    let mut signed: Option<i64> = None;
    let mut finished_at: Option<i64> = None;
    for ck in &checkpoints {
        let seq = ck.seq;
        if !key.verify(run, seq, &ck.head_hash, &ck.mac) {
            return verdict(
                Some(format!(
                    "checkpoint at seq {seq} does not verify with this key (forged, or signed with another key)"
                )),
                signed,
            );
        }
        if seq > head_seq {
            return verdict(
                Some(format!(
                    "checkpoint at seq {seq} is beyond the recorded head (seq {head_seq}): signed events were removed"
                )),
                signed,
            );
        }
        if purged {
            // Only the anchored head is left to compare with.
            if seq == head_seq && Some(&ck.head_hash) != head_hash.as_ref() {
                return verdict(
                    Some(format!(
                        "checkpoint at seq {seq} does not match the chain anchor (rewritten ledger)"
                    )),
                    signed,
                );
            }
        } else {
            match &ck.event {
                Some((hash, finishes)) if *hash == ck.head_hash => {
                    if *finishes {
                        finished_at = Some(seq);
                    }
                }
                Some(_) => {
                    return verdict(
                        Some(format!(
                            "checkpoint at seq {seq} does not match the stored chain (rewritten ledger)"
                        )),
                        signed,
                    );
                }
                None => {
                    return verdict(
                        Some(format!(
                            "checkpoint at seq {seq} covers an event that is not stored"
                        )),
                        signed,
                    );
                }
            }
        }
        signed = Some(signed.map_or(seq, |s| s.max(seq)));
    }
    if let Some(at) = finished_at {
        if !state.is_terminal() {
            return verdict(
                Some(format!(
                    "the signed ledger finishes the run at seq {at}, but the run is {state}"
                )),
                signed,
            );
        }
        if at != head_seq {
            return verdict(
                Some(format!(
                    "events after the signed end of the run (seq {at}; recorded head seq {head_seq})"
                )),
                signed,
            );
        }
    }
    if state.is_terminal() {
        if signed != Some(head_seq) {
            return verdict(
                Some(format!(
                    "the run is {state} but its head (seq {head_seq}) is not covered by a valid checkpoint (signed up to {})",
                    signed.map_or("nothing".to_string(), |s| format!("seq {s}"))
                )),
                signed,
            );
        }
        if !purged && finished_at != Some(head_seq) {
            return verdict(
                Some(format!(
                    "the run is {state} but its signed head (seq {head_seq}) is not the event that finished it"
                )),
                signed,
            );
        }
    }
    verdict(None, signed)
}

async fn count_events<C: Executor + ?Sized>(client: &C, run: RunId) -> Result<u64> {
    let row = client
        .query_one(sql!("runs/count_events"), typed![&run])
        .await?;
    let n: i64 = row.get(0);
    Ok(u64::try_from(n).unwrap_or(0))
}

/// Verify a run's chain with the SQL function `pgcrew.verify_run_chain(run)` (what an auditor
/// runs without pgcrew; no key, so a full rewrite is not detected).
#[instrument(skip(db), err)]
pub async fn verify_run_chain_sql(db: &Db, run: RunId) -> Result<ChainVerification> {
    let mut conn = db.get().await?;
    let tx = snapshot(&mut conn, run).await?;
    let anchor = anchor(&tx, run).await?;
    let head = tx
        .query_opt(sql!("runs/ledger_head"), typed![&run])
        .await?
        .ok_or_else(|| Error::not_found("run", run))?;
    let row = tx
        .query_one(sql!("runs/verify_chain"), typed![&run])
        .await?;
    tx.commit().await?;
    let checked: i64 = row.get(2);
    Ok(ChainVerification {
        valid: row.get(0),
        first_bad_seq: row.get(1),
        checked: u64::try_from(checked).unwrap_or(0),
        anchor,
        problem: row.get(3),
        head_seq: head.get(0),
        format: head.get(3),
    })
}
