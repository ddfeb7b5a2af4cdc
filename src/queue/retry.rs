//! Retry backoff: exponential with jitter.

use std::time::Duration;

/// Exponential backoff with jitter: attempt `n` (1-based) waits `base * factor^(n-1)`, capped
/// at `max`, then spread by ±`jitter` (a fraction) so retries of many tasks do not align.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Delay after the first failed attempt (default 1 s).
    pub base: Duration,
    /// Growth factor per attempt (default 2).
    pub factor: f64,
    /// Upper bound before jitter (default 1 h).
    pub max: Duration,
    /// Relative jitter in `0.0..=1.0` (default 0.2 = ±20 %).
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            base: Duration::from_secs(1),
            factor: 2.0,
            max: Duration::from_secs(3600),
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// The delay before the retry that follows failed attempt `attempt` (1-based), never more
    /// than [`MAX_TASK_DELAY`](super::MAX_TASK_DELAY) whatever the policy's values (a `max`
    /// of `Duration::MAX` or a NaN factor included).
    pub fn delay(&self, attempt: i32) -> Duration {
        let exp = (attempt.max(1) - 1).min(64);
        let raw = self.base.as_secs_f64() * self.factor.max(1.0).powi(exp);
        let capped = raw.min(self.max.as_secs_f64());
        let j = self.jitter.clamp(0.0, 1.0);
        let spread = if j > 0.0 {
            1.0 + j * (fastrand::f64() * 2.0 - 1.0)
        } else {
            1.0
        };
        // try_from: an overflowing (or NaN) value would make from_secs_f64 panic.
        Duration::try_from_secs_f64((capped * spread).max(0.0))
            .unwrap_or(super::MAX_TASK_DELAY)
            .min(super::MAX_TASK_DELAY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_within_jitter_and_cap() {
        let p = RetryPolicy {
            base: Duration::from_millis(100),
            factor: 2.0,
            max: Duration::from_secs(1),
            jitter: 0.1,
        };
        for _ in 0..100 {
            let d1 = p.delay(1).as_secs_f64();
            let d3 = p.delay(3).as_secs_f64();
            let d20 = p.delay(20).as_secs_f64();
            assert!((0.09..=0.11).contains(&d1), "{d1}");
            assert!((0.36..=0.44).contains(&d3), "{d3}");
            assert!((0.9..=1.1).contains(&d20), "{d20}");
        }
        let none = RetryPolicy {
            jitter: 0.0,
            ..RetryPolicy::default()
        };
        assert_eq!(none.delay(2), Duration::from_secs(2));
        let extreme = RetryPolicy {
            base: Duration::MAX,
            factor: f64::NAN,
            max: Duration::MAX,
            jitter: f64::NAN,
        };
        for attempt in [i32::MIN, 1, 64, i32::MAX] {
            assert_eq!(extreme.delay(attempt), crate::queue::MAX_TASK_DELAY);
        }
    }
}
