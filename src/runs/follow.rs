//! Following a run: a stream of its new ledger events, in order, with no gaps.
//!
//! NOTIFY `pgcrew_run_event` is only a wake-up: the stream always re-reads the table from the
//! last seq it yielded, on every notification, on every [`Event::Resync`](crate::Event::Resync)
//! and on a fallback poll interval, so a lost notification only delays events.

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::Stream;
use tracing::warn;

use super::ledger::{LedgerEvent, read_events};
use crate::coord::notify::{Notifier, Subscription};
use crate::db::Db;
use crate::error::Result;
use crate::ids::RunId;

/// Events read per query.
const PAGE: i64 = 500;
/// How many times a missing seq is re-read before the stream skips it (a seq can only be
/// missing when rows were deleted behind pgcrew's back; `verify_run_chain` reports that).
const GAP_RETRIES: u32 = 50;

struct Follow {
    db: Db,
    run: RunId,
    sub: Subscription,
    last: i64,
    buf: VecDeque<LedgerEvent>,
    poll: Duration,
    gap_retries: u32,
}

/// A stream of the run's events with `seq > after_seq`, in order and without gaps, that keeps
/// following new events (it never ends on its own; drop it to stop). Wake-ups come from
/// `notifier` (start the client or spawn a listener for prompt delivery); without
/// notifications the stream polls every `poll_interval`. Read errors are yielded and the stream
/// carries on from the same position.
pub fn subscribe_run(
    db: Db,
    notifier: &Notifier,
    run: RunId,
    after_seq: i64,
    poll_interval: Duration,
) -> impl Stream<Item = Result<LedgerEvent>> + Send + 'static {
    let state = Follow {
        db,
        run,
        sub: notifier.subscribe_run(run),
        last: after_seq.max(0),
        buf: VecDeque::new(),
        poll: poll_interval.max(Duration::from_millis(10)),
        gap_retries: 0,
    };
    futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(ev) = s.buf.pop_front() {
                return Some((Ok(ev), s));
            }
            match read_events(&s.db, s.run, s.last, PAGE).await {
                Err(e) => {
                    tokio::time::sleep(s.poll).await;
                    return Some((Err(e), s));
                }
                Ok(rows) => {
                    if let Some(first) = rows.first()
                        && first.seq != s.last + 1
                    {
                        s.gap_retries += 1;
                        if s.gap_retries < GAP_RETRIES {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                        warn!(run = %s.run, missing = s.last + 1, next = first.seq, "ledger has a gap; skipping it");
                        s.last = first.seq - 1;
                    }
                    s.gap_retries = 0;
                    for ev in rows {
                        if ev.seq != s.last + 1 {
                            break;
                        }
                        s.last = ev.seq;
                        s.buf.push_back(ev);
                    }
                    if !s.buf.is_empty() {
                        continue;
                    }
                }
            }
            // Caught up: wait for a wake-up (any run event, state change or resync) or the poll.
            tokio::select! {
                ev = s.sub.recv() => {
                    if ev.is_none() {
                        tokio::time::sleep(s.poll).await;
                    }
                }
                _ = tokio::time::sleep(s.poll) => {}
            }
        }
    })
}
