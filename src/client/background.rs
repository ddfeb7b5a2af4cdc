//! The client's background loops: instance heartbeat, leader election and, while leader,
//! maintenance.

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, warn};

use super::{Client, LeaderState};
use crate::coord::instance;
use crate::coord::leader::{self, DEFAULT_LEASE, Election};
use crate::coord::maintenance;
use crate::coord::notify::{Event, Subscription};
use crate::error::{Error, Result};
use crate::ids::InstanceId;

impl Client {
    pub(super) async fn heartbeat_loop(self, mut shutdown: watch::Receiver<bool>) {
        let interval = self.inner.config.heartbeat_interval;
        while !sleep_or_shutdown(interval, &mut shutdown).await {
            let beat = async {
                let conn = self.inner.session.get().await?;
                instance::heartbeat_on(&conn, self.instance_id()).await
            };
            match beat.await {
                Ok(true) => {}
                Ok(false) => {
                    warn!(instance = %self.instance_id(), "instance row was removed; re-registering");
                    if let Err(e) = instance::register(&self.inner.db, &self.instance_info()).await
                    {
                        self.report_error(&e);
                    }
                }
                Err(e) => self.report_error(&e),
            }
        }
    }

    fn set_leader(&self, state: Option<LeaderState>) -> Option<LeaderState> {
        match self.inner.leader.lock() {
            Ok(mut g) => std::mem::replace(&mut *g, state),
            Err(poisoned) => std::mem::replace(&mut *poisoned.into_inner(), state),
        }
    }

    fn lose_leadership(&self, maintenance: &mut Option<JoinHandle<()>>) {
        if let Some(h) = maintenance.take() {
            h.abort();
        }
        if let Some(prev) = self.set_leader(None) {
            info!(instance = %self.instance_id(), term = prev.term, "lost leadership");
            if let Some(cb) = &self.inner.callbacks.on_lost_leadership {
                cb();
            }
        }
    }

    pub(super) async fn elector_loop(
        self,
        mut sub: Subscription,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let ttl = self.inner.config.leader_ttl;
        let renew = self.inner.config.leader_renew_interval();
        // Stop acting a tenth of the TTL before the database's expiry (which is itself later
        // than `sent + ttl`), to absorb clock-rate differences between hosts.
        let margin = ttl / 10;
        let mut maintenance: Option<JoinHandle<()>> = None;
        let me = self.instance_id().clone();
        loop {
            if *shutdown.borrow() {
                break;
            }
            let current = self.inner.leader.lock().ok().and_then(|g| *g);
            let deadline = current.map(|l| l.deadline);
            let sent = Instant::now();
            let elect = async {
                let conn = self.inner.session.get().await?;
                leader::elect_on(&conn, DEFAULT_LEASE, &me, ttl).await
            };
            let attempt = tokio::select! {
                r = elect => Some(r),
                _ = sleep_until_opt(deadline) => None,
                _ = shutdown.changed() => break,
            };
            let mut next = renew;
            match attempt {
                None => self.lose_leadership(&mut maintenance),
                Some(Ok(Election::Leader { term })) => {
                    let state = LeaderState {
                        term,
                        deadline: sent + ttl - margin,
                    };
                    let same_term = current.map(|c| c.term) == Some(term);
                    if !same_term {
                        if current.is_some() {
                            self.lose_leadership(&mut maintenance);
                        }
                        self.set_leader(Some(state));
                        info!(instance = %me, term, "became leader");
                        if let Some(cb) = &self.inner.callbacks.on_became_leader {
                            cb(term);
                        }
                        maintenance = Some(tokio::spawn(self.clone().maintenance_loop(term)));
                    } else {
                        self.set_leader(Some(state));
                    }
                }
                Some(Ok(Election::Follower { expires_in, .. })) => {
                    if current.is_some() {
                        self.lose_leadership(&mut maintenance);
                    }
                    next = match expires_in {
                        Some(d) => (d + Duration::from_millis(5)).min(renew),
                        None => Duration::from_millis(5),
                    };
                }
                Some(Err(e)) => {
                    if is_lock_timeout(&e) {
                        // Our own maintenance step holds the leader row: retry shortly.
                        tracing::debug!(error = %e, "leader renewal waited for the leader row; retrying");
                        next = renew.min(Duration::from_millis(100));
                    } else {
                        self.report_error(&e);
                        next = renew.min(Duration::from_secs(1));
                    }
                }
            }
            let deadline = self
                .inner
                .leader
                .lock()
                .ok()
                .and_then(|g| *g)
                .map(|l| l.deadline);
            let wake = Instant::now() + next;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(wake) => break,
                    _ = sleep_until_opt(deadline) => { self.lose_leadership(&mut maintenance); break; }
                    ev = sub.recv() => match ev {
                        Some(Event::LeaderChanged { name, leader_id, .. }) if name == DEFAULT_LEASE => {
                            let ours = leader_id.as_deref() == Some(me.as_str());
                            if !ours && !self.is_leader() && leader_id.is_none() {
                                break; // lease released: elect now
                            }
                            if !ours && self.is_leader() && leader_id.is_some() {
                                break; // someone else took it: check at once
                            }
                        }
                        Some(_) => {}
                        None => break,
                    },
                    _ = shutdown.changed() => break,
                }
            }
        }
        // Shutdown: stop maintenance, then resign so a follower takes over immediately.
        if let Some(h) = maintenance.take() {
            h.abort();
            let _ = h.await;
        }
        if self.set_leader(None).is_some() {
            if let Err(e) = self.resign(&me).await {
                self.report_error(&e);
            }
            if let Some(cb) = &self.inner.callbacks.on_lost_leadership {
                cb();
            }
        } else {
            // We may hold a lease we never learned about (reply lost): release it if ours.
            let _ = self.resign(&me).await;
        }
    }

    async fn resign(&self, me: &InstanceId) -> Result<bool> {
        let conn = self.inner.session.get().await?;
        leader::resign_on(&conn, DEFAULT_LEASE, me).await
    }

    /// While leader: the maintenance passes and, beside them, the scheduler (which fires due
    /// schedules in its own fenced transactions); both stop when the term is lost.
    async fn maintenance_loop(self, term: i64) {
        let scheduler =
            crate::schedule::run_scheduler(self.inner.db.clone(), self.maintenance_ctx(term));
        tokio::select! {
            _ = self.clone().maintenance_passes(term) => {}
            _ = scheduler => {}
        }
    }

    async fn maintenance_passes(self, term: i64) {
        let ctx = self.maintenance_ctx(term);
        loop {
            if self.leader_term() != Some(term) {
                return;
            }
            match maintenance::run_once(&self.inner.db, &self.inner.steps, &ctx).await {
                Ok(report) => {
                    let total: u64 = report.steps.iter().map(|(_, n)| n).sum();
                    if total > 0 {
                        info!(?report, "maintenance pass");
                    }
                }
                Err(Error::LeaseLost(m)) => {
                    warn!(message = %m, "maintenance stopped: lease lost");
                    return;
                }
                Err(e) => self.report_error(&e),
            }
            tokio::time::sleep(self.inner.config.maintenance_interval).await;
        }
    }
}
/// Whether `e` is a `lock_timeout` expiry (SQLSTATE 55P03).
fn is_lock_timeout(e: &Error) -> bool {
    e.sqlstate() == Some(crate::sqlstate::LOCK_NOT_AVAILABLE)
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Sleep helper of the background loops: returns `true` when shutdown was signalled.
async fn sleep_or_shutdown(d: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    if *shutdown.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => *shutdown.borrow(),
        _ = shutdown.changed() => true,
    }
}
