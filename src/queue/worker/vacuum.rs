//! Vacuuming `pgcrew.tasks` while a pool is busy (issue #23).
//!
//! A claim takes the head of its queue's range of `tasks_available_idx`, and every task it
//! claims leaves its entry there, dead, until a VACUUM removes it: later claims step over those
//! entries again and again. Nothing else cleans that part of the index (inserts go to its tail),
//! so the run of dead entries grows with every task claimed since the table's last vacuum, and
//! so does the cost of each claim (measured: a 100-task claim read 131 index pages with 20,000
//! tasks claimed since the last vacuum and 1,212 with 200,000; 0.5 ms against 2.8 ms).
//! Autovacuum vacuums the table once it has enough dead rows (V003 sets the threshold to 1,000
//! rows plus 1 % of the table), but its launcher visits a database only once per
//! `autovacuum_naptime` (1 min by default): a queue processing 10,000 tasks a second claims over
//! up to 600,000 dead entries before it does.
//!
//! So the acker, every [`CHECK_EVERY`] acknowledgements, asks (`queue/vacuum_due`) whether the
//! table has reached that same threshold and was not vacuumed in the last [`MIN_GAP`], and if
//! so vacuums it (`queue/vacuum_tasks`, `SKIP_LOCKED`: a vacuum already running elsewhere is not
//! waited for), on a connection of its own in a task of its own, so acknowledgements never wait
//! for it. An idle pool sends nothing. A role that may not vacuum the table (not its owner) is
//! told once in the log and the pool stops asking. Turn it off with
//! [`WorkerPoolBuilder::vacuum_tasks`](super::WorkerPoolBuilder::vacuum_tasks) where vacuums
//! are scheduled otherwise.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tracing::{debug, warn};

use super::WorkerMetrics;
use crate::config::interval_micros;
use crate::db::{Db, Executor};
use crate::error::Result;
use crate::sqlstate;

/// Acknowledgements between two looks at whether the table is due for a vacuum.
pub(super) const CHECK_EVERY: u64 = 5_000;

/// The least time between the end of one vacuum of the table (any session's, autovacuum's
/// included) and the start of the next one by a pool.
pub(super) const MIN_GAP: Duration = Duration::from_secs(1);

/// The pool's vacuum state for one `run`.
#[derive(Debug, Default)]
pub(super) struct TasksVacuum {
    /// Whether the pool vacuums at all (its setting, until the role turns out not to own the
    /// table).
    on: AtomicBool,
    /// Acknowledgements since the last look.
    since_check: AtomicU64,
    /// A look (or its vacuum) is in flight.
    busy: AtomicBool,
}

impl TasksVacuum {
    /// Turn the vacuum on or off for this run (the pool's setting).
    pub(super) fn enable(&self, on: bool) {
        self.on.store(on, Ordering::SeqCst);
    }

    /// Count `n` acknowledgements applied; every [`CHECK_EVERY`], look at the table (and vacuum
    /// it when due) in a task of its own, unless a look is still in flight.
    pub(super) fn acked(self: &Arc<Self>, n: usize, db: &Db, metrics: &Arc<WorkerMetrics>) {
        if !self.on.load(Ordering::Relaxed) {
            return;
        }
        let n = n as u64;
        if self.since_check.fetch_add(n, Ordering::Relaxed) + n < CHECK_EVERY
            || self.busy.swap(true, Ordering::AcqRel)
        {
            return;
        }
        self.since_check.store(0, Ordering::Relaxed);
        let this = self.clone();
        let db = db.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            match vacuum_if_due(&db).await {
                Ok(Looked::Vacuumed) => {
                    metrics.vacuums.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Looked::NotDue) => {}
                Ok(Looked::NotOwner) => {
                    this.on.store(false, Ordering::SeqCst);
                    warn!(
                        "worker pool: this role does not own pgcrew.tasks, so the pool cannot vacuum it between autovacuum's visits; claims get slower as dead index entries pile up in a busy queue (lower autovacuum_naptime, or run the pool as the role that ran the migrations)"
                    );
                }
                Ok(Looked::Cancelled {
                    after,
                    statement_timeout,
                }) => {
                    this.on.store(false, Ordering::SeqCst);
                    warn!(
                        after = ?after,
                        statement_timeout = %statement_timeout,
                        "worker pool: its VACUUM of pgcrew.tasks was cancelled (statement_timeout here: {statement_timeout}), so it stops vacuuming the table until it is started again, and claims get slower as dead index entries pile up between autovacuum's visits; raise or turn off statement_timeout for the role pgcrew connects as (ALTER ROLE ... SET statement_timeout), or turn the pool's vacuum off (WorkerPoolBuilder::vacuum_tasks(false)) and lower autovacuum_naptime"
                    );
                }
                Err(e) => debug!(error = %e, "worker pool: vacuum of pgcrew.tasks failed"),
            }
            this.busy.store(false, Ordering::Release);
        });
    }
}

/// What a look at the table found (and did).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Looked {
    /// Due, and vacuumed (or skipped at once: another session was vacuuming it).
    Vacuumed,
    /// Not due.
    NotDue,
    /// This role may not vacuum the table.
    NotOwner,
    /// The vacuum was cancelled (SQLSTATE 57014) after `after`, under this session's
    /// `statement_timeout` (`0` when there is none: an operator cancelled it).
    Cancelled {
        /// How long it ran.
        after: Duration,
        /// The session's `statement_timeout`, as `SHOW` gives it.
        statement_timeout: String,
    },
}

async fn vacuum_if_due(db: &Db) -> Result<Looked> {
    let conn = db.get().await?;
    let gap = interval_micros(MIN_GAP);
    let row = conn
        .query_one(sql!("queue/vacuum_due"), typed![&gap])
        .await?;
    if !row.try_get::<_, bool>("owner")? {
        return Ok(Looked::NotOwner);
    }
    if !row.try_get::<_, bool>("due")? {
        return Ok(Looked::NotDue);
    }
    let started = std::time::Instant::now();
    // VACUUM cannot run in a transaction block or as a prepared statement: a simple query.
    match conn.batch_execute(sql!("queue/vacuum_tasks")).await {
        Ok(()) => {
            debug!(elapsed = ?started.elapsed(), "worker pool: vacuumed pgcrew.tasks");
            Ok(Looked::Vacuumed)
        }
        Err(e) if sqlstate::of(&e) == Some(sqlstate::QUERY_CANCELED) => Ok(Looked::Cancelled {
            after: started.elapsed(),
            statement_timeout: row.try_get("statement_timeout")?,
        }),
        Err(e) => Err(e.into()),
    }
}
