//! Run cancellation watcher: hands out [`CancellationToken`]s that fire when a watched run is
//! cancelled (or otherwise finished by someone else, e.g. failed by maintenance).
//!
//! The watcher listens for `pgcrew_run_state_changed` through the instance's [`Notifier`] and
//! re-reads the watched runs from the table on every relevant notification, on every
//! [`Event::Resync`] and on a fallback poll interval — a notification is only a wake-up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, instrument, warn};

use crate::coord::notify::{Event, EventKind, Notifier};
use crate::coord::service::ServiceContext;
use crate::db::Db;
use crate::db::Executor;
use crate::error::Result;
use crate::ids::RunId;

struct Inner {
    db: Db,
    tokens: Mutex<HashMap<RunId, CancellationToken>>,
}

/// Watches runs for cancellation. Dropping it stops the background task (tokens already
/// handed out simply never fire afterwards).
pub struct RunWatcher {
    inner: Arc<Inner>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for RunWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunWatcher")
            .field("watched", &self.watched())
            .finish()
    }
}

impl Drop for RunWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock(inner: &Inner) -> std::sync::MutexGuard<'_, HashMap<RunId, CancellationToken>> {
    inner
        .tokens
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl RunWatcher {
    /// Start watching in the background on the current runtime. `poll_interval` is the fallback
    /// when notifications are lost or the notifier is not listening.
    pub fn spawn(db: Db, notifier: &Notifier, poll_interval: Duration) -> RunWatcher {
        let inner = Arc::new(Inner {
            db,
            tokens: Mutex::new(HashMap::new()),
        });
        let mut sub = notifier.subscribe(&[EventKind::RunStateChanged]);
        let poll = poll_interval.max(Duration::from_millis(10));
        let bg = inner.clone();
        let task = tokio::spawn(async move {
            loop {
                let check = tokio::select! {
                    ev = sub.recv() => match ev {
                        Some(Event::RunStateChanged { run_id, .. }) => {
                            lock(&bg).contains_key(&run_id)
                        }
                        Some(_) => true,
                        None => {
                            tokio::time::sleep(poll).await;
                            true
                        }
                    },
                    _ = tokio::time::sleep(poll) => true,
                };
                if check && let Err(e) = check_runs(&bg).await {
                    warn!(error = %e, "run watcher: cannot re-read watched runs; will retry");
                }
            }
        });
        RunWatcher { inner, task }
    }

    /// A watcher on a service context's database and notifier (`Client::run_watcher` makes
    /// one for a client), polling at the instance's `notify_poll_interval` as a fallback.
    pub fn for_context(ctx: &ServiceContext) -> RunWatcher {
        RunWatcher::spawn(
            ctx.db().clone(),
            ctx.notifier(),
            ctx.config().notify_poll_interval,
        )
    }

    /// A token that is cancelled when the run is cancelled or finished by someone else. When it
    /// already is, the token is returned cancelled. Watching the same run twice returns clones
    /// of the same token.
    #[instrument(skip(self), err)]
    pub async fn watch(&self, run: RunId) -> Result<CancellationToken> {
        let token = lock(&self.inner).entry(run).or_default().clone();
        check_runs(&self.inner).await?;
        Ok(token)
    }

    /// Stop watching a run (its token never fires afterwards).
    pub fn unwatch(&self, run: RunId) {
        lock(&self.inner).remove(&run);
    }

    /// Number of runs being watched.
    pub fn watched(&self) -> usize {
        lock(&self.inner).len()
    }
}

async fn check_runs(inner: &Inner) -> Result<()> {
    let ids: Vec<RunId> = lock(inner).keys().copied().collect();
    if ids.is_empty() {
        return Ok(());
    }
    let conn = inner.db.get().await?;
    let rows = conn.query(sql!("runs/watched_runs"), typed![&ids]).await?;
    let mut tokens = lock(inner);
    for r in rows {
        let id: RunId = r.get(0);
        let state: String = r.get(1);
        if let Some(t) = tokens.remove(&id) {
            debug!(run = %id, state = %state, "run watcher: cancelling in-flight work");
            t.cancel();
        }
    }
    Ok(())
}
