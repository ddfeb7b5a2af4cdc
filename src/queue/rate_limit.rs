//! Rate limits: claims per second of a queue, of a kind (in any queue) or of a tenant (in any
//! queue), as token buckets in `pgcrew.rate_limits` that every claimer takes from in the
//! transaction that claims, so the rate holds across instances. A task that finds no token
//! stays available without using an attempt; idle worker pools find it at their next poll
//! (set the pool's `poll_interval` below the time a token takes for smooth pacing).

use std::fmt;
use std::time::Duration;

use serde::Serialize;
use tracing::instrument;

use crate::db::Executor;
use crate::error::{Error, Result};
use crate::ids::validate_text_id;
use crate::sqlstate;

/// What a rate limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RateScope {
    /// Claims from one queue.
    Queue,
    /// Claims of one task kind, in any queue.
    Kind,
    /// Claims of one tenant's tasks, in any queue.
    Tenant,
}

impl RateScope {
    /// The name stored in `pgcrew.rate_limits.scope`.
    pub fn as_str(self) -> &'static str {
        match self {
            RateScope::Queue => "queue",
            RateScope::Kind => "kind",
            RateScope::Tenant => "tenant",
        }
    }
}

impl fmt::Display for RateScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rate: `count` claims per `per` (a second, a minute, ...).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Claims allowed per second (may be fractional: 30 a minute is 0.5).
    pub per_second: f64,
    /// Most claims at once after a quiet period (`None`: one second's worth, at least 1).
    pub burst: Option<i32>,
}

impl Rate {
    /// `n` claims a second.
    pub fn per_second(n: f64) -> Self {
        Rate {
            per_second: n,
            burst: None,
        }
    }

    /// `n` claims a minute.
    pub fn per_minute(n: f64) -> Self {
        Rate::per(n, Duration::from_secs(60))
    }

    /// `n` claims per `period`.
    pub fn per(n: f64, period: Duration) -> Self {
        Rate::per_second(n / period.as_secs_f64())
    }

    /// Allow bursts of up to `n` claims.
    pub fn burst(mut self, n: i32) -> Self {
        self.burst = Some(n);
        self
    }
}

/// A stored rate limit and the tokens its bucket holds now.
#[derive(Debug, Clone, PartialEq, Serialize, postgres_from_row::FromRow)]
pub struct RateLimit {
    /// `queue`, `kind` or `tenant`.
    pub scope: String,
    /// The queue, kind or tenant.
    pub name: String,
    /// Claims per second.
    pub per_second: f64,
    /// Bucket size.
    pub burst: i32,
    /// Tokens available now.
    pub tokens: f64,
}

/// Limit claims of the queue, kind or tenant `name` to `rate` (replacing its limit, if any).
/// A rate that is not above zero (or not finite), a burst below 1 or a bad name is an
/// [`Error::InvalidInput`]; nothing is stored.
#[instrument(skip(client), err)]
pub async fn set_rate_limit<E: Executor + ?Sized>(
    client: &E,
    scope: RateScope,
    name: &str,
    rate: Rate,
) -> Result<()> {
    validate_text_id(scope.as_str(), name)?;
    if !rate.per_second.is_finite() || rate.per_second <= 0.0 || rate.per_second > 1e9 {
        return Err(Error::invalid(
            "rate",
            format!(
                "{} per second: a rate must be above 0 (and at most 1e9 a second); to stop claims, pause the queue",
                rate.per_second
            ),
        ));
    }
    if let Some(b) = rate.burst.filter(|b| *b < 1) {
        return Err(Error::invalid(
            "burst",
            format!("is {b}; at least 1 claim must fit"),
        ));
    }
    client
        .execute(
            sql!("queue/set_rate_limit"),
            typed![scope.as_str(), name, &rate.per_second, &rate.burst],
        )
        .await
        .map_err(|e| match (e.sqlstate(), &e) {
            (Some(sqlstate::INVALID_RATE_LIMIT), Error::Database(d)) => Error::invalid(
                "rate",
                d.as_db_error()
                    .map(|d| d.message().to_string())
                    .unwrap_or_default(),
            ),
            _ => e,
        })?;
    Ok(())
}

/// Remove the rate limit of the queue, kind or tenant `name`; returns whether there was one.
#[instrument(skip(client), err)]
pub async fn clear_rate_limit<E: Executor + ?Sized>(
    client: &E,
    scope: RateScope,
    name: &str,
) -> Result<bool> {
    let n = client
        .execute(sql!("queue/clear_rate_limit"), typed![scope.as_str(), name])
        .await?;
    Ok(n > 0)
}

/// Every rate limit, with the tokens its bucket holds now.
#[instrument(skip(client), err)]
pub async fn rate_limits<E: Executor + ?Sized>(client: &E) -> Result<Vec<RateLimit>> {
    let rows = client.query(sql!("queue/rate_limits"), typed![]).await?;
    crate::db::rows_as(&rows)
}
