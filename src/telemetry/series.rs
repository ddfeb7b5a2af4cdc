//! A task's series resolved once per (queue, kind) and kept by the loop that records them.
//!
//! Recording through a labelled family builds its label set (owned strings) and hashes it on
//! every call: at a queue's rates that was the largest part of what the metrics cost a task.
//! A worker pool's fetch and executor loops each keep a [`TaskSeriesCache`] instead: the
//! family is looked up the first time a (queue, kind) is seen, and later tasks reach their
//! counters and histograms through the handles kept (prometheus-client's metrics share their
//! value between clones), with no allocation, no hashing and no lock on the family. The
//! entry's queue and kind names are shared too: a task's trace span takes them as reference
//! counts ([`TaskSeriesCache::names`]) instead of copies of the strings.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

use super::{OTHER, QueueKind, QueueLabel, global, recording};

/// The most (queue, kind) pairs one cache keeps; past it, it starts over (a pool serves a
/// handful of kinds, so this only bounds a misuse).
const MAX_ENTRIES: usize = 64;

/// How a task attempt ended, for [`TaskSeriesCache::finished`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// Completed.
    Succeeded,
    /// Snoozed.
    Snoozed,
    /// Failed; `retried` when attempts are left.
    Failed {
        /// Whether the task runs again.
        retried: bool,
    },
}

/// The task series of one (queue, kind). The outcome counters are resolved when first
/// needed, so a pair with no failure has no `tasks_failed` series (as before: a series appears
/// with its first count).
#[derive(Debug)]
struct TaskSeries {
    queue: Arc<str>,
    kind: Arc<str>,
    claimed: Option<Counter>,
    queue_wait: Option<Histogram>,
    duration: Option<Histogram>,
    succeeded: Option<Counter>,
    failed: Option<Counter>,
    retried: Option<Counter>,
    snoozed: Option<Counter>,
}

/// The task series a recording loop has resolved, by (queue, kind). Each loop keeps its own
/// (no sharing, no lock); its counts do nothing while recording is off.
#[derive(Debug, Default)]
pub struct TaskSeriesCache {
    entries: Vec<TaskSeries>,
}

impl TaskSeriesCache {
    /// An empty cache.
    pub fn new() -> TaskSeriesCache {
        TaskSeriesCache::default()
    }

    /// Count one claimed task of `queue` and `kind` and its queue wait.
    pub fn claimed(&mut self, queue: &str, kind: &str, wait: Duration) {
        if !recording() {
            return;
        }
        let t = global();
        let slot = self.slot(queue, kind);
        let s = &mut self.entries[slot.0];
        s.claimed
            .get_or_insert_with(|| {
                t.tasks_claimed
                    .handle(QueueKind::new(queue, kind), QueueKind::other)
            })
            .inc();
        s.queue_wait
            .get_or_insert_with(|| {
                t.task_queue_wait.handle(
                    QueueLabel {
                        queue: queue.to_string(),
                    },
                    || QueueLabel {
                        queue: OTHER.into(),
                    },
                )
            })
            .observe(wait.as_secs_f64());
    }

    /// Count one finished attempt of the task of `slot` (from [`TaskSeriesCache::slot`], with
    /// no other call of it since), and its duration.
    pub fn finished(&mut self, slot: Slot, outcome: AttemptOutcome, took: Duration) {
        if !recording() {
            return;
        }
        let t = global();
        let Some(s) = self.entries.get_mut(slot.0) else {
            return;
        };
        let (queue, kind) = (&*s.queue, &*s.kind);
        let (counted, family) = match outcome {
            AttemptOutcome::Succeeded => (&mut s.succeeded, &t.tasks_succeeded),
            AttemptOutcome::Snoozed => (&mut s.snoozed, &t.tasks_snoozed),
            AttemptOutcome::Failed { retried } => {
                if retried {
                    s.retried
                        .get_or_insert_with(|| {
                            t.tasks_retried
                                .handle(QueueKind::new(queue, kind), QueueKind::other)
                        })
                        .inc();
                }
                (&mut s.failed, &t.tasks_failed)
            }
        };
        counted
            .get_or_insert_with(|| family.handle(QueueKind::new(queue, kind), QueueKind::other))
            .inc();
        s.duration
            .get_or_insert_with(|| {
                t.task_duration
                    .handle(QueueKind::new(queue, kind), QueueKind::other)
            })
            .observe(took.as_secs_f64());
    }

    /// The queue and kind names of `slot`, shared (`None` for a slot no longer held).
    pub fn names(&self, slot: Slot) -> Option<(Arc<str>, Arc<str>)> {
        let s = self.entries.get(slot.0)?;
        Some((s.queue.clone(), s.kind.clone()))
    }

    /// The entry of (`queue`, `kind`), added when missing: valid until the next call.
    pub fn slot(&mut self, queue: &str, kind: &str) -> Slot {
        let found = self
            .entries
            .iter()
            .position(|e| &*e.queue == queue && &*e.kind == kind);
        Slot(match found {
            Some(i) => i,
            None => {
                if self.entries.len() >= MAX_ENTRIES {
                    self.entries.clear();
                }
                self.entries.push(TaskSeries {
                    queue: queue.into(),
                    kind: kind.into(),
                    claimed: None,
                    queue_wait: None,
                    duration: None,
                    succeeded: None,
                    failed: None,
                    retried: None,
                    snoozed: None,
                });
                self.entries.len() - 1
            }
        })
    }
}

/// An entry of a [`TaskSeriesCache`], valid until its next [`TaskSeriesCache::slot`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot(usize);

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache's handles count into the same series as the family does, and a series appears
    /// only with its first count.
    #[test]
    fn cached_handles_count_into_the_families_series() {
        let t = global();
        let (q, k) = ("series-cache-q", "series-cache-k");
        let read = |c: &super::super::Bounded<QueueKind, Counter>| {
            c.handle(QueueKind::new(q, k), QueueKind::other).get()
        };
        let mut a = TaskSeriesCache::new();
        let mut b = TaskSeriesCache::new();
        a.claimed(q, k, Duration::from_millis(3));
        b.claimed(q, k, Duration::from_millis(3));
        let sa = a.slot(q, k);
        a.finished(sa, AttemptOutcome::Succeeded, Duration::from_millis(1));
        let sb = b.slot(q, k);
        b.finished(
            sb,
            AttemptOutcome::Failed { retried: true },
            Duration::from_millis(1),
        );
        let sa = a.slot(q, k);
        a.finished(
            sa,
            AttemptOutcome::Failed { retried: false },
            Duration::from_millis(1),
        );
        let (nq, nk) = a.names(sa).unwrap();
        assert_eq!((&*nq, &*nk), (q, k));
        assert!(!t.tasks_snoozed.contains(&QueueKind::new(q, k)));
        assert_eq!(read(&t.tasks_claimed), 2);
        assert_eq!(read(&t.tasks_succeeded), 1);
        assert_eq!(read(&t.tasks_failed), 2);
        assert_eq!(read(&t.tasks_retried), 1);
        assert_eq!(a.entries.len(), 1);
    }

    #[test]
    fn a_full_cache_starts_over() {
        let mut c = TaskSeriesCache::new();
        for i in 0..=MAX_ENTRIES {
            c.claimed("series-cache-full", &format!("k{i}"), Duration::ZERO);
        }
        assert_eq!(c.entries.len(), 1);
    }
}
