//! When a schedule fires: a cron expression in a time zone (croner, chrono-tz) or a fixed
//! interval, and which of the fires due at a tick are enqueued (the misfire policy).

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use serde::Serialize;

use crate::error::{Error, Result};

/// Fires at most this late are always enqueued; older ones follow the [`MisfirePolicy`].
pub const MISFIRE_GRACE: Duration = Duration::from_secs(5);

/// Most fires enqueued for one schedule in one tick (a very frequent schedule after a long
/// pause of the leader enqueues the most recent ones).
pub const MAX_FIRES_PER_TICK: usize = 1000;

/// When a schedule fires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum ScheduleSpec {
    /// A cron expression: 5 fields (minute hour day-of-month month day-of-week) or 6 with
    /// seconds first, evaluated in an IANA time zone (`UTC`, `Europe/Paris`, ...).
    Cron {
        /// The expression.
        expr: String,
        /// The time zone.
        time_zone: String,
    },
    /// Every `interval`, at whole multiples of it since the Unix epoch (every 1 s fires at whole
    /// seconds, every 5 min at :00, :05, ...), in UTC.
    Every(Duration),
}

impl ScheduleSpec {
    /// A cron schedule in UTC.
    pub fn cron(expr: impl Into<String>) -> Self {
        ScheduleSpec::Cron {
            expr: expr.into(),
            time_zone: "UTC".to_string(),
        }
    }

    /// A cron schedule in `time_zone`.
    pub fn cron_in(expr: impl Into<String>, time_zone: impl Into<String>) -> Self {
        ScheduleSpec::Cron {
            expr: expr.into(),
            time_zone: time_zone.into(),
        }
    }

    /// Check the expression, time zone or interval ([`Error::InvalidInput`] on `cron`,
    /// `time_zone` or `interval`).
    pub fn validate(&self) -> Result<()> {
        Timetable::new(self).map(|_| ())
    }
}

/// What happens to fires more than [`MISFIRE_GRACE`] late (after downtime of every instance,
/// or a leader that stalled): fires within the grace are always enqueued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub enum MisfirePolicy {
    /// Drop them.
    #[default]
    Skip,
    /// Enqueue the most recent of them, once.
    CatchUpOne,
}

impl MisfirePolicy {
    /// The name stored in `pgcrew.schedules.misfire`.
    pub fn as_str(self) -> &'static str {
        match self {
            MisfirePolicy::Skip => "skip",
            MisfirePolicy::CatchUpOne => "catch_up_one",
        }
    }
}

impl FromStr for MisfirePolicy {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "skip" => Ok(MisfirePolicy::Skip),
            "catch_up_one" | "catch-up-one" => Ok(MisfirePolicy::CatchUpOne),
            other => Err(Error::invalid(
                "misfire",
                format!("`{other}` is not a misfire policy: use skip or catch_up_one"),
            )),
        }
    }
}

/// A parsed [`ScheduleSpec`] that can list fire times.
#[derive(Debug, Clone)]
pub(crate) enum Timetable {
    Cron(Box<Cron>, Tz),
    Every(i64),
}

impl Timetable {
    pub(crate) fn new(spec: &ScheduleSpec) -> Result<Self> {
        match spec {
            ScheduleSpec::Cron { expr, time_zone } => {
                let tz: Tz = time_zone.parse().map_err(|_| {
                    Error::invalid(
                        "time_zone",
                        format!("`{time_zone}` is not an IANA time zone (e.g. UTC, Europe/Paris)"),
                    )
                })?;
                let cron = CronParser::builder()
                    .seconds(Seconds::Optional)
                    .year(Year::Disallowed)
                    .build()
                    .parse(expr)
                    .map_err(|e| {
                        Error::invalid(
                            "cron",
                            format!(
                                "`{expr}` is not a cron expression ({e}): give 5 fields (minute hour day month weekday) or 6 with seconds first"
                            ),
                        )
                    })?;
                // An expression that can never fire (e.g. 30 February) is refused too.
                let probe = Utc::now().with_timezone(&tz);
                cron.find_next_occurrence(&probe, false)
                    .map_err(|e| Error::invalid("cron", format!("`{expr}` never fires ({e})")))?;
                Ok(Timetable::Cron(Box::new(cron), tz))
            }
            ScheduleSpec::Every(d) => {
                let us = i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
                if us < 1000 {
                    return Err(Error::invalid(
                        "interval",
                        "must be at least 1 ms (a zero or negative rate is not a schedule)",
                    ));
                }
                Ok(Timetable::Every(us))
            }
        }
    }

    /// The first fire strictly after `t`.
    pub(crate) fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Timetable::Cron(cron, tz) => cron
                .find_next_occurrence(&t.with_timezone(tz), false)
                .ok()
                .map(|d| d.with_timezone(&Utc)),
            Timetable::Every(us) => {
                let k = t.timestamp_micros().div_euclid(*us).checked_add(1)?;
                DateTime::from_timestamp_micros(k.checked_mul(*us)?)
            }
        }
    }

    /// The last fire strictly before `t`.
    pub(crate) fn prev_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Timetable::Cron(cron, tz) => cron
                .find_previous_occurrence(&t.with_timezone(tz), false)
                .ok()
                .map(|d| d.with_timezone(&Utc)),
            Timetable::Every(us) => {
                let t = t.timestamp_micros();
                let k = t.div_euclid(*us) - i64::from(t.rem_euclid(*us) == 0);
                DateTime::from_timestamp_micros(k.checked_mul(*us)?)
            }
        }
    }
}

/// What one tick does for one schedule: the fires to enqueue (oldest first) and the next fire.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Plan {
    pub fires: Vec<DateTime<Utc>>,
    pub next: Option<DateTime<Utc>>,
}

/// The fires due at `now` for a schedule whose next fire was `next_fire_at` (`None`: not
/// computed yet, nothing fires). Fires from `max(next_fire_at, now - grace)` to `now` are
/// enqueued; with [`MisfirePolicy::CatchUpOne`], also the latest older one, if any.
pub(crate) fn plan(
    tt: &Timetable,
    next_fire_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    policy: MisfirePolicy,
) -> Plan {
    let next = tt.next_after(now);
    let Some(first) = next_fire_at else {
        return Plan {
            fires: Vec::new(),
            next,
        };
    };
    let grace = TimeDelta::from_std(MISFIRE_GRACE).unwrap_or(TimeDelta::MAX);
    let lo = first.max(now - grace);
    let mut fires = Vec::new();
    if policy == MisfirePolicy::CatchUpOne
        && first < lo
        && let Some(m) = tt.prev_before(lo).filter(|m| *m >= first)
    {
        fires.push(m);
    }
    let mut t = tt.next_after(lo - TimeDelta::microseconds(1));
    let start = fires.len();
    while let Some(f) = t.filter(|f| *f <= now) {
        fires.push(f);
        t = tt.next_after(f);
    }
    // Keep the most recent fires when there are too many.
    if fires.len() - start > MAX_FIRES_PER_TICK {
        fires.drain(start..fires.len() - MAX_FIRES_PER_TICK);
    }
    Plan { fires, next }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn interval_fires_on_multiples() {
        let tt = Timetable::new(&ScheduleSpec::Every(Duration::from_secs(1))).unwrap();
        let t = at("2026-01-01T00:00:00.5Z");
        assert_eq!(tt.next_after(t), Some(at("2026-01-01T00:00:01Z")));
        assert_eq!(tt.prev_before(t), Some(at("2026-01-01T00:00:00Z")));
        let whole = at("2026-01-01T00:00:01Z");
        assert_eq!(tt.prev_before(whole), Some(at("2026-01-01T00:00:00Z")));
    }

    #[test]
    fn cron_with_seconds_and_time_zone() {
        let tt = Timetable::new(&ScheduleSpec::cron_in("0 9 * * *", "Europe/Paris")).unwrap();
        // 09:00 in Paris in January is 08:00 UTC.
        let n = tt.next_after(at("2026-01-05T07:00:00Z")).unwrap();
        assert_eq!(n, at("2026-01-05T08:00:00Z"));
        let s = Timetable::new(&ScheduleSpec::cron("*/10 * * * * *")).unwrap();
        assert_eq!(
            s.next_after(at("2026-01-05T07:00:01Z")),
            Some(at("2026-01-05T07:00:10Z"))
        );
    }

    #[test]
    fn bad_specs_are_typed_errors() {
        for (spec, field) in [
            (ScheduleSpec::cron("not a cron"), "cron"),
            (ScheduleSpec::cron("61 * * * *"), "cron"),
            (
                ScheduleSpec::cron_in("* * * * *", "Mars/Olympus"),
                "time_zone",
            ),
            (ScheduleSpec::Every(Duration::ZERO), "interval"),
        ] {
            match spec.validate() {
                Err(Error::InvalidInput { field: f, .. }) => assert_eq!(f, field, "{spec:?}"),
                other => panic!("{spec:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn plan_follows_the_misfire_policy() {
        let tt = Timetable::new(&ScheduleSpec::Every(Duration::from_secs(1))).unwrap();
        let now = at("2026-01-01T00:01:00.2Z");
        // On time: the one fire due.
        let p = plan(
            &tt,
            Some(at("2026-01-01T00:01:00Z")),
            now,
            MisfirePolicy::Skip,
        );
        assert_eq!(p.fires, vec![at("2026-01-01T00:01:00Z")]);
        assert_eq!(p.next, Some(at("2026-01-01T00:01:01Z")));
        // 60 s late: the last 5 s are within the grace; older ones are skipped ...
        let first = Some(at("2026-01-01T00:00:00Z"));
        let p = plan(&tt, first, now, MisfirePolicy::Skip);
        assert_eq!(p.fires.len(), 5);
        assert_eq!(p.fires[0], at("2026-01-01T00:00:56Z"));
        // ... or the latest of them is caught up.
        let p = plan(&tt, first, now, MisfirePolicy::CatchUpOne);
        assert_eq!(p.fires.len(), 6);
        assert_eq!(p.fires[0], at("2026-01-01T00:00:55Z"));
        // Not computed yet: nothing fires.
        let p = plan(&tt, None, now, MisfirePolicy::CatchUpOne);
        assert!(p.fires.is_empty());
    }
}
