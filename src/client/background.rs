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
use crate::coord::notify::{Event, EventKind, Subscription};
use crate::error::{Error, Result};
use crate::ids::InstanceId;
use crate::sync::with_lock;

impl Client {
    pub(super) async fn heartbeat_loop(self, mut shutdown: watch::Receiver<bool>) {
        let interval = self.inner.config.heartbeat_interval;
        // The elector's attempts refresh the heartbeat too (one statement, `coord/elect_beat`):
        // after one of them, wait a tenth of an interval longer, so that a leader renewing
        // every interval (or a follower trying) is not doubled by a heartbeat racing it.
        let slack = interval / 10;
        let due = |beat: Option<(Instant, bool)>| match beat {
            Some((at, by_elector)) => {
                at + interval + if by_elector { slack } else { Duration::ZERO }
            }
            None => Instant::now(),
        };
        // Registered just now.
        self.note_beat(Instant::now(), false);
        loop {
            let wake = due(self.last_beat());
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                _ = shutdown.changed() => {}
            }
            if *shutdown.borrow() {
                break;
            }
            if due(self.last_beat()) > Instant::now() {
                continue; // refreshed meanwhile by the elector
            }
            let sent = Instant::now();
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
            // Also after a failure: the next attempt is an interval later, as before.
            self.note_beat(sent, false);
        }
    }

    fn last_beat(&self) -> Option<(Instant, bool)> {
        with_lock(&self.inner.last_beat, |g| *g)
    }

    /// Record a heartbeat refreshed by a statement sent at `at` (keeps a later one).
    fn note_beat(&self, at: Instant, by_elector: bool) {
        with_lock(&self.inner.last_beat, |g| {
            if g.is_none_or(|(t, _)| t <= at) {
                *g = Some((at, by_elector));
            }
        });
    }

    fn set_leader(&self, state: Option<LeaderState>) -> Option<LeaderState> {
        with_lock(&self.inner.leader, |g| std::mem::replace(g, state))
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
            // One statement: the attempt refreshes our heartbeat too.
            let elect = async {
                let conn = self.inner.session.get().await?;
                let (election, beat) =
                    leader::elect_and_beat_on(&conn, DEFAULT_LEASE, &me, ttl).await?;
                if beat {
                    // A removed row is left to the heartbeat loop, which re-registers.
                    self.note_beat(sent, true);
                }
                Ok::<_, Error>(election)
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
                    next = follower_wait(expires_in, ttl);
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
    /// schedules in its own fenced transactions, woken by `pgcrew_schedules_changed`); both
    /// stop when the term is lost.
    async fn maintenance_loop(self, term: i64) {
        // Subscribed before the scheduler's first read: a change committed after it wakes it.
        let wake = self
            .inner
            .notifier
            .subscribe(&[EventKind::SchedulesChanged]);
        let scheduler =
            crate::schedule::run_scheduler(self.inner.db.clone(), self.maintenance_ctx(term), wake);
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

/// When a follower tries again: just after the holder's lease expires (database time; a
/// resignation wakes it earlier through `pgcrew_leader_changed`, and a renewal it did not see
/// only makes it try early and read the new expiry), or shortly when the lease is free or its
/// holder unknown. Never later than our own TTL. Not every renew interval: a follower's
/// attempts are coordination statements, and with many instances they dominated (issue #22).
fn follower_wait(expires_in: Option<Duration>, ttl: Duration) -> Duration {
    const AFTER: Duration = Duration::from_millis(5);
    match expires_in {
        Some(d) => (d + AFTER).min(ttl),
        None => AFTER,
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_follower_waits_for_the_lease_to_expire_not_for_the_renew_interval() {
        let ttl = Duration::from_secs(30);
        let ms = Duration::from_millis;
        // A 30 s lease with 20 s left: the follower tries again when it expires.
        assert_eq!(
            follower_wait(Some(Duration::from_secs(20)), ttl),
            Duration::from_secs(20) + ms(5)
        );
        assert_eq!(follower_wait(None, ttl), ms(5));
        assert_eq!(follower_wait(Some(Duration::ZERO), ttl), ms(5));
        // A holder with a longer lease than ours: no later than our own TTL.
        assert_eq!(follower_wait(Some(Duration::from_secs(90)), ttl), ttl);
    }
}
