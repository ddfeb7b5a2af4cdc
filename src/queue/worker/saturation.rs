//! How full a worker pool is: tasks held (running, or claimed and about to run) against its
//! concurrency, so a service can stop taking work at a threshold.

use std::sync::atomic::Ordering;

use serde::Serialize;

use super::WorkerPool;

/// The saturation threshold of the Delivery OS design: 80 %.
pub const DEFAULT_SATURATION_THRESHOLD: f64 = 0.8;

/// A worker pool's saturation at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Saturation {
    /// Tasks running (held, at most `concurrency`).
    pub running: usize,
    /// Handlers the pool runs at once.
    pub concurrency: usize,
    /// `running / concurrency`, 0.0 to 1.0.
    pub ratio: f64,
}

impl Saturation {
    /// Whether the ratio has reached `threshold` (e.g. [`DEFAULT_SATURATION_THRESHOLD`]).
    pub fn at_least(&self, threshold: f64) -> bool {
        self.ratio >= threshold
    }
}

impl WorkerPool {
    /// The pool's saturation now.
    pub fn saturation(&self) -> Saturation {
        let concurrency = self.settings.concurrency.max(1);
        let running = self
            .metrics
            .in_flight
            .load(Ordering::SeqCst)
            .min(concurrency);
        Saturation {
            running,
            concurrency,
            ratio: running as f64 / concurrency as f64,
        }
    }

    /// Whether the pool is at least [`DEFAULT_SATURATION_THRESHOLD`] (80 %) saturated: a
    /// service can stop taking work while this holds.
    pub fn is_saturated(&self) -> bool {
        self.saturation().at_least(DEFAULT_SATURATION_THRESHOLD)
    }
}
