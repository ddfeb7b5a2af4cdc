//! The leader's scheduler: fires due schedules in fenced transactions, then sleeps until the
//! next fire, or until woken by `pgcrew_schedules_changed` (a schedule was created, changed,
//! enabled, disabled or deleted: V038) or a notifier resync; at most [`SAFETY_POLL`].

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::{FutureExt, StreamExt};
use tracing::{debug, info, warn};

use super::spec::{MisfirePolicy, ScheduleSpec, Timetable, plan};
use crate::coord::maintenance::MaintenanceContext;
use crate::coord::notify::Subscription;
use crate::db::{Db, Executor};
use crate::error::{Error, Result};

/// Longest sleep between two ticks, in case a wake-up is lost. A schedule created or enabled
/// meanwhile is announced by `pgcrew_schedules_changed`, and a lost LISTEN connection ends
/// with a resync, which wakes the scheduler too: this poll is only a safety net.
pub const SAFETY_POLL: Duration = Duration::from_secs(60);

/// Sleep after a failed tick, and the longest sleep once the notifier is gone (no wake-ups:
/// the scheduler polls as it did before V038).
const RETRY: Duration = Duration::from_secs(1);

/// Schedules handled per tick (the rest in the next, at once).
const BATCH: i64 = 100;

/// How long a schedule whose stored expression does not parse is parked before it is tried again.
const PARK_BAD: chrono::TimeDelta = chrono::TimeDelta::minutes(1);

/// Fire due schedules while the leadership term in `ctx` holds: each tick runs in one
/// transaction that first locks the leader row and checks the term (as maintenance steps do),
/// so a deposed leader fires nothing. Returns [`Error::LeaseLost`] once the term is gone;
/// other errors are logged and the tick retried.
///
/// Between ticks it sleeps until the next fire of an enabled schedule (with none, until
/// woken), at most `SAFETY_POLL` (one minute). `wake` (subscribe it to
/// [`EventKind::SchedulesChanged`](crate::coord::notify::EventKind::SchedulesChanged) before
/// the call, so nothing committed meanwhile is missed) ends the sleep at once: a schedule
/// created or enabled on any instance gets its first fire computed without waiting.
pub async fn run_scheduler(db: Db, ctx: MaintenanceContext, mut wake: Subscription) -> Result<()> {
    let mut notifier_gone = false;
    loop {
        let wait = match tick(&db, &ctx).await {
            Ok(wait) => wait,
            Err(Error::LeaseLost(m)) => {
                debug!(message = %m, "scheduler stopped: lease lost");
                return Err(Error::LeaseLost(m));
            }
            Err(e) => {
                warn!(error = %e, "scheduler tick failed; retrying");
                Some(RETRY)
            }
        };
        let cap = if notifier_gone { RETRY } else { SAFETY_POLL };
        let wait = wait.map_or(cap, |w| w.min(cap));
        if wait.is_zero() {
            continue;
        }
        if notifier_gone {
            tokio::time::sleep(wait).await;
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            ev = wake.next() => match ev {
                // Wake-ups that arrived together need one tick: drop those already queued.
                Some(_) => while let Some(Some(_)) = wake.next().now_or_never() {},
                None => {
                    warn!("scheduler: the notifier is gone; polling every second");
                    notifier_gone = true;
                }
            },
        }
    }
}

/// One tick: fire what is due; returns how long to sleep (`None`: no enabled schedule, sleep
/// until woken).
async fn tick(db: &Db, ctx: &MaintenanceContext) -> Result<Option<Duration>> {
    let mut conn = db.get().await?;
    let tx = conn.transaction().await?;
    ctx.fence(&tx, "scheduler").await?;
    let due = tx.query(sql!("schedule/due"), typed![&BATCH]).await?;
    for row in &due {
        let name: String = row.try_get("name")?;
        let now: DateTime<Utc> = row.try_get("now")?;
        let spec = match (
            row.try_get::<_, Option<String>>("cron")?,
            row.try_get::<_, Option<i64>>("interval_us")?,
        ) {
            (Some(expr), _) => ScheduleSpec::Cron {
                expr,
                time_zone: row.try_get("time_zone")?,
            },
            (None, Some(us)) => ScheduleSpec::Every(Duration::from_micros(us.max(0) as u64)),
            (None, None) => continue,
        };
        let tt = match Timetable::new(&spec) {
            Ok(tt) => tt,
            Err(e) => {
                warn!(schedule = %name, error = %e, "scheduler: cannot evaluate the schedule; parked for a minute");
                tx.execute(sql!("schedule/set_next"), typed![&name, &(now + PARK_BAD)])
                    .await?;
                continue;
            }
        };
        let policy: MisfirePolicy = row
            .try_get::<_, String>("misfire")?
            .parse()
            .unwrap_or_default();
        let next_fire_at: Option<DateTime<Utc>> = row.try_get("next_fire_at")?;
        let p = plan(&tt, next_fire_at, now, policy);
        // Never fires again (a date that has passed): look again in a minute. (Never NULL:
        // clearing `next_fire_at` would also wake every scheduler, V038.)
        let next = p.next.unwrap_or(now + PARK_BAD);
        let fired = tx
            .query(
                sql!("schedule/fire"),
                typed![&name, &p.fires, &next, &false],
            )
            .await?;
        if next_fire_at.is_some() && fired.len() < p.fires.len() {
            debug!(schedule = %name, planned = p.fires.len(), enqueued = fired.len(), "scheduler: some fires were enqueued before");
        }
        if let Some(late) = next_fire_at.filter(|f| p.fires.first() != Some(f)) {
            info!(schedule = %name, missed_since = %late, policy = policy.as_str(), "scheduler: fires missed for longer than the grace period were handled by the misfire policy");
        }
    }
    let more = due.len() as i64 >= BATCH;
    let wake = tx.query_opt(sql!("schedule/next_wake"), typed![]).await?;
    tx.commit().await?;
    if more {
        return Ok(Some(Duration::ZERO));
    }
    Ok(match wake {
        Some(r) => {
            let us: i64 = r.try_get(0)?;
            // A little past the fire, so the next tick's now() has reached it.
            Some(Duration::from_micros(us.max(0) as u64) + Duration::from_millis(2))
        }
        None => None,
    })
}
