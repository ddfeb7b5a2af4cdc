//! The run page's data: the run, its ledger as a timeline (model steps with tokens, cost and
//! latency; tool steps with their two-phase state; drift, forks and sub-runs as links; budget
//! decisions: refusals, overruns and degradations), its artifacts and summaries, and the
//! chain's verification.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

use super::error::UiError;
use crate::db::{Db, Executor};
use crate::ids::RunId;
use crate::runs::{self, Artifact, ChainVerification, Run, Summary};

/// Most ledger events the run page shows (the newest).
pub const TIMELINE_EVENTS: i64 = 500;

/// One ledger event as the timeline shows it.
#[derive(Debug, Clone, Serialize)]
pub struct TimelineEntry {
    /// Sequence number.
    pub seq: i64,
    /// Database time.
    pub at: DateTime<Utc>,
    /// Event type.
    pub event_type: String,
    /// Step key.
    pub step_key: Option<String>,
    /// `run`, `model`, `tool`, `budget`, `drift`, `fork`, `wait`, `child` or `other`.
    pub category: &'static str,
    /// Model of a model step.
    pub model: Option<String>,
    /// Prompt tokens of a model step.
    pub prompt_tokens: Option<i64>,
    /// Completion tokens of a model step.
    pub completion_tokens: Option<i64>,
    /// Cost of a model step (USD).
    pub cost_usd: Option<f64>,
    /// Milliseconds from the step's request to this event (model and tool outcomes).
    pub latency_ms: Option<f64>,
    /// For a tool request: `completed`, `failed`, `outcome unknown`, `rejected` or `pending`
    /// (requested, no outcome recorded yet).
    pub tool_state: Option<&'static str>,
    /// A run this event points to (fork parent or child, sub-agent run).
    pub link_run: Option<String>,
    /// For a budget event: the decision in words (a degradation's reason, a refusal's or
    /// overrun's message).
    pub decision: Option<String>,
    /// The payload.
    pub payload: Value,
}

/// A run forked from this one.
#[derive(Debug, Clone, Serialize, postgres_from_row::FromRow)]
pub struct Fork {
    /// The fork.
    pub id: uuid::Uuid,
    /// Its state.
    pub state: String,
    /// The seq of this run it was forked at.
    pub forked_at_seq: Option<i64>,
    /// When.
    pub created_at: DateTime<Utc>,
}

/// The run page.
#[derive(Debug, Clone, Serialize)]
pub struct RunDetail {
    /// The run.
    pub run: Run,
    /// The newest ledger events (at most [`TIMELINE_EVENTS`]), oldest first.
    pub timeline: Vec<TimelineEntry>,
    /// Whether older events were left out.
    pub truncated: bool,
    /// Runs forked from this one.
    pub forks: Vec<Fork>,
    /// Latest artifacts.
    pub artifacts: Vec<Artifact>,
    /// Newest summaries.
    pub summaries: Vec<Summary>,
    /// The chain's verification without the key (`None` with `verification_error` when it
    /// could not run).
    pub verification: Option<ChainVerification>,
    /// Why verification could not run.
    pub verification_error: Option<String>,
}

fn category(t: &str) -> &'static str {
    match t {
        "model_requested" | "model_completed" | "model_failed" | "output_invalid" => "model",
        "tool_requested"
        | "tool_completed"
        | "tool_failed"
        | "tool_outcome_unknown"
        | "tool_rejected"
        | "capability_denied"
        | "approval_decided" => "tool",
        "budget_exceeded" | "budget_overrun" | "budget_degraded" => "budget",
        "replay_rejected" | "replayed_with_drift" => "drift",
        "run_forked" => "fork",
        "wait_started" | "signal_received" | "wait_timed_out" => "wait",
        "child_run_started" | "child_run_completed" | "child_run_refused" => "child",
        t if t.starts_with("run_") => "run",
        _ => "other",
    }
}

fn int(v: &Value, path: &[&str]) -> Option<i64> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_i64()
}

fn text(v: &Value, keys: &[&str]) -> Option<String> {
    keys.iter()
        .find_map(|k| v.get(k).and_then(Value::as_str).map(str::to_string))
}

/// A ledger row: `(seq, event type, step key, payload, created at)`.
pub(crate) type EventRow = (i64, String, Option<String>, Value, DateTime<Utc>);

/// Build the timeline from ledger rows, oldest first.
pub(crate) fn build(rows: Vec<EventRow>) -> Vec<TimelineEntry> {
    let mut requested: HashMap<(&'static str, String), DateTime<Utc>> = HashMap::new();
    let mut entries: Vec<TimelineEntry> = Vec::with_capacity(rows.len());
    let mut tool_requests: HashMap<String, usize> = HashMap::new();
    for (seq, event_type, step_key, payload, at) in rows {
        let cat = category(&event_type);
        let key = step_key.clone().unwrap_or_default();
        let mut e = TimelineEntry {
            seq,
            at,
            category: cat,
            model: None,
            prompt_tokens: None,
            completion_tokens: None,
            cost_usd: None,
            latency_ms: None,
            tool_state: None,
            link_run: None,
            decision: None,
            event_type,
            step_key,
            payload,
        };
        let since = |k: (&'static str, String)| {
            requested
                .get(&k)
                .map(|t| (at - *t).num_microseconds().unwrap_or(0) as f64 / 1000.0)
        };
        match e.event_type.as_str() {
            "model_requested" => {
                requested.insert(("model", key), at);
                e.model = text(&e.payload, &["model"]);
            }
            "model_completed" => {
                e.model = text(&e.payload, &["model"]);
                e.prompt_tokens = int(&e.payload, &["usage", "prompt_tokens"]);
                e.completion_tokens = int(&e.payload, &["usage", "completion_tokens"]);
                e.cost_usd = e.payload.get("cost_usd").and_then(Value::as_f64);
                e.latency_ms = since(("model", key));
            }
            "model_failed" => e.latency_ms = since(("model", key)),
            "budget_degraded" => {
                e.model = text(&e.payload, &["model"]);
                e.decision = text(&e.payload, &["reason", "message"]);
            }
            "budget_exceeded" | "budget_overrun" => {
                e.model = text(&e.payload, &["model"]);
                e.decision = text(&e.payload, &["message"]);
            }
            "tool_requested" => {
                requested.insert(("tool", key.clone()), at);
                e.tool_state = Some("pending");
                tool_requests.insert(key, entries.len());
            }
            "tool_completed" | "tool_failed" | "tool_outcome_unknown" | "tool_rejected" => {
                let state = match e.event_type.as_str() {
                    "tool_completed" => "completed",
                    "tool_failed" => "failed",
                    "tool_outcome_unknown" => "outcome unknown",
                    _ => "rejected",
                };
                e.tool_state = Some(state);
                e.latency_ms = since(("tool", key.clone()));
                if let Some(i) = tool_requests.get(&key) {
                    entries[*i].tool_state = Some(state);
                }
            }
            "run_forked" | "run_created" => {
                e.link_run = text(&e.payload, &["parent_run_id"]);
            }
            "child_run_started" | "child_run_completed" => {
                e.link_run = text(&e.payload, &["child_run_id", "run_id", "child"]);
            }
            _ => {}
        }
        entries.push(e);
    }
    entries
}

/// Read a run's page.
pub(crate) async fn run_detail(db: &Db, id: RunId) -> Result<RunDetail, UiError> {
    let run = runs::get_run(db, id).await?;
    let rows = db
        .query(sql!("ui/run_events"), typed![&id, &TIMELINE_EVENTS])
        .await?;
    let rows = rows
        .iter()
        .map(|r| {
            Ok((
                r.try_get(0)?,
                r.try_get(1)?,
                r.try_get(2)?,
                r.try_get(3)?,
                r.try_get(4)?,
            ))
        })
        .collect::<Result<Vec<EventRow>, tokio_postgres::Error>>()
        .map_err(crate::Error::from)?;
    let truncated = rows.first().is_some_and(|r| r.0 > 1);
    let forks = crate::db::rows_as(&db.query(sql!("ui/run_forks"), typed![&id]).await?)?;
    let artifacts = runs::list_artifacts(db, id).await?;
    let summaries = runs::list_summaries(db, id, None, 20).await?;
    let (verification, verification_error) = match runs::verify_run_chain(db, id).await {
        Ok(v) => (Some(v), None),
        Err(e) if e.is_transient() => return Err(e.into()),
        Err(e) => (None, Some(e.to_string())),
    };
    Ok(RunDetail {
        run,
        timeline: build(rows),
        truncated,
        forks,
        artifacts,
        summaries,
        verification,
        verification_error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn steps_get_latency_tokens_and_two_phase_state() {
        let t0 = Utc::now();
        let ms = |n| t0 + chrono::Duration::milliseconds(n);
        let rows = vec![
            (
                1,
                "model_requested".into(),
                Some("m1".into()),
                json!({"model": "x"}),
                t0,
            ),
            (
                2,
                "model_completed".into(),
                Some("m1".into()),
                json!({"model": "x", "usage": {"prompt_tokens": 7, "completion_tokens": 3}, "cost_usd": 0.5}),
                ms(250),
            ),
            (
                3,
                "tool_requested".into(),
                Some("t1".into()),
                json!({}),
                ms(300),
            ),
            (
                4,
                "tool_requested".into(),
                Some("t2".into()),
                json!({}),
                ms(310),
            ),
            (
                5,
                "tool_completed".into(),
                Some("t1".into()),
                json!({}),
                ms(400),
            ),
        ];
        let t = build(rows);
        assert_eq!(t[1].prompt_tokens, Some(7));
        assert_eq!(t[1].cost_usd, Some(0.5));
        assert_eq!(t[1].latency_ms, Some(250.0));
        assert_eq!(t[2].tool_state, Some("completed"));
        assert_eq!(t[3].tool_state, Some("pending"));
        assert_eq!(t[4].latency_ms, Some(100.0));
    }
}
