//! Recording: the methods the instrumented modules call (each a no-op while recording is off).

use std::time::Duration;

use super::{
    ModelLabel, ModelOutcome, ModelTokens, OTHER, QueueKind, StepLabel, Telemetry, ToolOutcome,
    recording,
};

impl Telemetry {
    /// Count a claim that returned `n` tasks (held from now on).
    pub fn claimed(&self, n: usize) {
        if recording() && n > 0 {
            self.claim_batch.observe(n as f64);
            self.tasks_in_flight.inc_by(n as i64);
        }
    }

    /// Count a held task released (acknowledgement queued).
    pub fn released(&self) {
        if recording() {
            self.tasks_in_flight.dec();
        }
    }

    /// Count one acknowledgement statement of `n` entries, `stale` of them stale.
    pub fn acked(&self, n: usize, stale: u64) {
        if recording() {
            self.ack_batch.observe(n as f64);
            self.acks_stale.inc_by(stale);
        }
    }

    /// Count `n` ledger events appended.
    pub fn appended(&self, n: u64) {
        if recording() {
            self.ledger_appends.inc_by(n);
        }
    }

    /// Count one rescued task.
    pub fn task_rescued(&self, queue: &str, kind: &str) {
        self.tasks_rescued
            .with(QueueKind::new(queue, kind), QueueKind::other, |c| {
                c.inc();
            });
    }

    /// Record one maintenance step.
    pub fn maintenance_step(&self, step: &str, took: Duration, rows: u64) {
        let l = StepLabel { step: step.into() };
        let other = || StepLabel { step: OTHER.into() };
        self.maintenance_duration
            .with(l.clone(), other, |h| h.observe(took.as_secs_f64()));
        self.maintenance_rows.with(l, other, |c| {
            c.inc_by(rows);
        });
    }

    /// A maintenance step left out of a pass (nothing to do): its series exist (a duration count
    /// of 0 until it first runs), no duration is observed and no row counted.
    pub fn maintenance_step_skipped(&self, step: &str) {
        let l = StepLabel { step: step.into() };
        let other = || StepLabel { step: OTHER.into() };
        self.maintenance_duration.with(l.clone(), other, |_| {});
        self.maintenance_rows.with(l, other, |c| {
            c.inc_by(0);
        });
    }

    /// Record one model call (`outcome`: `ok` or an error kind).
    pub fn model_call(&self, model: &str, outcome: &str, took: Duration) {
        let l = ModelOutcome {
            model: model.into(),
            outcome: outcome.into(),
        };
        let other = || ModelOutcome {
            model: OTHER.into(),
            outcome: OTHER.into(),
        };
        self.model_calls.with(l.clone(), other, |c| {
            c.inc();
        });
        self.model_latency
            .with(l, other, |h| h.observe(took.as_secs_f64()));
    }

    /// Record the tokens and cost of one completed model call.
    pub fn model_usage(&self, model: &str, prompt: u64, completion: u64, cost_usd: f64) {
        for (direction, n) in [("prompt", prompt), ("completion", completion)] {
            self.model_tokens.with(
                ModelTokens {
                    model: model.into(),
                    direction: direction.into(),
                },
                || ModelTokens {
                    model: OTHER.into(),
                    direction: direction.into(),
                },
                |c| {
                    c.inc_by(n);
                },
            );
        }
        self.model_cost_usd.with(
            ModelLabel {
                model: model.into(),
            },
            || ModelLabel {
                model: OTHER.into(),
            },
            |c| {
                c.inc_by(cost_usd.max(0.0));
            },
        );
    }

    /// Record one tool call (`outcome`: `ok`, `failed`, `unknown`).
    pub fn tool_call(&self, tool: &str, outcome: &str) {
        self.tool_calls.with(
            ToolOutcome {
                tool: tool.into(),
                outcome: outcome.into(),
            },
            || ToolOutcome {
                tool: OTHER.into(),
                outcome: outcome.into(),
            },
            |c| {
                c.inc();
            },
        );
    }
}
