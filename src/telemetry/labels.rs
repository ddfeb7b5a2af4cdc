//! The label sets of the series, and [`Bounded`]: a labelled family that keeps at most
//! [`MAX_SERIES`] label sets.

use std::sync::atomic::{AtomicUsize, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::{MAX_SERIES, recording};

/// `{queue, kind}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueKind {
    /// Queue.
    pub queue: String,
    /// Task kind.
    pub kind: String,
}

impl QueueKind {
    /// The label set of `queue` and `kind`.
    pub fn new(queue: &str, kind: &str) -> QueueKind {
        QueueKind {
            queue: queue.to_string(),
            kind: kind.to_string(),
        }
    }

    /// The label set every (queue, kind) past [`MAX_SERIES`] is counted under.
    pub fn other() -> QueueKind {
        QueueKind::new(super::OTHER, super::OTHER)
    }
}

/// `{queue}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabel {
    /// Queue.
    pub queue: String,
}

/// `{step}` (a maintenance step).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabel {
    /// Step name.
    pub step: String,
}

/// `{model, outcome}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelOutcome {
    /// Model name.
    pub model: String,
    /// `ok` or the error kind.
    pub outcome: String,
}

/// `{model, direction}` (`prompt` or `completion`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelTokens {
    /// Model name.
    pub model: String,
    /// `prompt` or `completion`.
    pub direction: String,
}

/// `{model}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    /// Model name.
    pub model: String,
}

/// `{tool, outcome}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ToolOutcome {
    /// Tool name.
    pub tool: String,
    /// `ok`, `failed`, `unknown` or `replayed`.
    pub outcome: String,
}

/// A labelled family that keeps at most [`MAX_SERIES`] label sets.
#[derive(Debug)]
pub struct Bounded<L, M>
where
    L: Clone + std::hash::Hash + Eq,
{
    family: Family<L, M, fn() -> M>,
    series: AtomicUsize,
}

impl<L, M> Bounded<L, M>
where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
    M: prometheus_client::metrics::TypedMetric
        + prometheus_client::encoding::EncodeMetric
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    pub(super) fn new(make: fn() -> M) -> Self {
        Bounded {
            family: Family::new_with_constructor(make),
            series: AtomicUsize::new(0),
        }
    }

    /// Apply `f` to the series of `labels` (or of `other` once the family is full).
    pub fn with(&self, labels: L, other: impl FnOnce() -> L, f: impl FnOnce(&M)) {
        if !recording() {
            return;
        }
        f(&self.series(labels, other));
    }

    /// The series of `labels` (or of `other` once the family is full), as a handle that
    /// shares its value with the family's (for [`super::TaskSeriesCache`]).
    pub fn handle(&self, labels: L, other: impl FnOnce() -> L) -> M
    where
        M: Clone,
    {
        self.series(labels, other).clone()
    }

    /// The series of `labels`, created while the family has fewer than [`MAX_SERIES`] label
    /// sets; past that, the series of `other`.
    fn series(
        &self,
        labels: L,
        other: impl FnOnce() -> L,
    ) -> impl std::ops::Deref<Target = M> + '_ {
        if let Some(m) = self.family.get(&labels) {
            return m;
        }
        let labels = if self.series.fetch_add(1, Ordering::Relaxed) < MAX_SERIES {
            labels
        } else {
            other()
        };
        self.family.get_or_create(&labels)
    }

    /// Whether the family has a series for `labels`.
    #[cfg(test)]
    pub(super) fn contains(&self, labels: &L) -> bool {
        self.family.get(labels).is_some()
    }

    pub(super) fn register(&self, registry: &mut Registry, name: &str, help: &str) {
        registry.register(name, help, self.family.clone());
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::text::encode;
    use prometheus_client::metrics::counter::Counter;

    use super::*;

    #[test]
    fn a_family_keeps_at_most_max_series_label_sets_and_counts_the_rest_as_other() {
        let family: Bounded<QueueLabel, Counter> = Bounded::new(Counter::default);
        for i in 0..MAX_SERIES + 25 {
            family.with(
                QueueLabel {
                    queue: format!("q{i}"),
                },
                || QueueLabel {
                    queue: super::super::OTHER.into(),
                },
                |c| {
                    c.inc();
                },
            );
        }
        // A label set seen before the family filled up keeps its own series.
        family.with(
            QueueLabel { queue: "q0".into() },
            || QueueLabel {
                queue: super::super::OTHER.into(),
            },
            |c| {
                c.inc();
            },
        );
        // A handle resolved past the bound counts under `_other` too.
        family
            .handle(
                QueueLabel {
                    queue: "late".into(),
                },
                || QueueLabel {
                    queue: super::super::OTHER.into(),
                },
            )
            .inc();
        let mut registry = Registry::default();
        family.register(&mut registry, "t", "test");
        let mut out = String::new();
        encode(&mut out, &registry).unwrap();
        let series = out.lines().filter(|l| l.starts_with("t_total{")).count();
        assert_eq!(series, MAX_SERIES + 1);
        assert!(out.contains("t_total{queue=\"_other\"} 26\n"), "{out}");
        assert!(out.contains("t_total{queue=\"q0\"} 2\n"));
    }
}
