//! The filters of the list pages, parsed from query parameters: a malformed or unknown
//! parameter is a 400 naming it and saying why.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::error::UiError;
use crate::ids::TenantId;
use crate::queue::TaskState;
use crate::runs::RunState;

/// Most rows a list page shows.
pub const MAX_LIMIT: i64 = 1000;
/// Rows a list page shows by default.
pub const DEFAULT_LIMIT: i64 = 100;

/// A point in time of a filter: an RFC 3339 timestamp or a duration back from the database's
/// `now()` (`15m`, `2h`, `1d`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeBound {
    /// An absolute time.
    At(DateTime<Utc>),
    /// This many seconds before `now()`.
    AgoSeconds(f64),
}

impl TimeBound {
    /// (absolute, seconds ago) for SQL, at most one set.
    pub(crate) fn parts(b: &Option<TimeBound>) -> (Option<DateTime<Utc>>, Option<f64>) {
        match b {
            Some(TimeBound::At(t)) => (Some(*t), None),
            Some(TimeBound::AgoSeconds(s)) => (None, Some(*s)),
            None => (None, None),
        }
    }
}

/// Filters of `/runs`: `tenant`, `state`, `agent`, `since`, `until`, `limit`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RunQuery {
    /// Only this tenant.
    pub tenant: Option<TenantId>,
    /// Only this state.
    pub state: Option<RunState>,
    /// Only this agent.
    pub agent: Option<String>,
    /// Created at or after.
    pub since: Option<TimeBound>,
    /// Created before.
    pub until: Option<TimeBound>,
    /// At most this many (1..=1000, default 100).
    pub limit: i64,
}

/// Filters of `/tasks`: `queue`, `state`, `tenant`, `kind`, `payload` (JSON the payload must
/// contain, e.g. `{"customer": 42}`), `limit`, and `before` (a task id: only older tasks; the
/// next page's and a payload search's continuation).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TaskQuery {
    /// Only this queue.
    pub queue: Option<String>,
    /// Only this state.
    pub state: Option<TaskState>,
    /// Only this tenant.
    pub tenant: Option<TenantId>,
    /// Only this kind.
    pub kind: Option<String>,
    /// The payload contains this JSON (`@>`).
    pub payload: Option<serde_json::Value>,
    /// At most this many (1..=1000, default 100).
    pub limit: i64,
    /// Only tasks with a smaller id (the continuation cursor).
    pub before: Option<i64>,
}

fn nonempty(pairs: &[(String, String)]) -> impl Iterator<Item = (&str, &str)> {
    pairs
        .iter()
        .map(|(k, v)| (k.as_str(), v.trim()))
        .filter(|(_, v)| !v.is_empty())
}

fn bad(field: &str, why: impl std::fmt::Display) -> UiError {
    UiError::bad_request(format!("invalid filter `{field}`: {why}"))
}

fn limit(v: &str) -> Result<i64, UiError> {
    v.parse::<i64>()
        .ok()
        .filter(|n| (1..=MAX_LIMIT).contains(n))
        .ok_or_else(|| {
            bad(
                "limit",
                format!("`{v}` is not a number from 1 to {MAX_LIMIT}"),
            )
        })
}

fn time(field: &str, v: &str) -> Result<TimeBound, UiError> {
    if let Ok(t) = DateTime::parse_from_rfc3339(v) {
        return Ok(TimeBound::At(t.with_timezone(&Utc)));
    }
    humantime::parse_duration(v)
        .map(|d| TimeBound::AgoSeconds(d.as_secs_f64()))
        .map_err(|_| {
            bad(
                field,
                format!("`{v}` is neither an RFC 3339 time nor a duration such as 15m or 2h"),
            )
        })
}

fn tenant(v: &str) -> Result<TenantId, UiError> {
    TenantId::new(v).map_err(|e| bad("tenant", e))
}

fn text(field: &str, v: &str) -> Result<String, UiError> {
    crate::ids::validate_text_id("filter", v).map_err(|e| bad(field, e))?;
    Ok(v.to_string())
}

impl RunQuery {
    /// Parse the query parameters (empty values are ignored).
    pub(crate) fn parse(pairs: &[(String, String)]) -> Result<Self, UiError> {
        let mut q = RunQuery {
            limit: DEFAULT_LIMIT,
            ..Default::default()
        };
        for (k, v) in nonempty(pairs) {
            match k {
                "tenant" => q.tenant = Some(tenant(v)?),
                "state" => q.state = Some(v.parse().map_err(|e| bad("state", e))?),
                "agent" => q.agent = Some(text("agent", v)?),
                "since" => q.since = Some(time("since", v)?),
                "until" => q.until = Some(time("until", v)?),
                "limit" => q.limit = limit(v)?,
                other => {
                    return Err(bad(
                        other,
                        "unknown filter (tenant, state, agent, since, until, limit)",
                    ));
                }
            }
        }
        Ok(q)
    }
}

impl TaskQuery {
    /// Parse the query parameters (empty values are ignored).
    pub(crate) fn parse(pairs: &[(String, String)]) -> Result<Self, UiError> {
        let mut q = TaskQuery {
            limit: DEFAULT_LIMIT,
            ..Default::default()
        };
        for (k, v) in nonempty(pairs) {
            match k {
                "queue" => q.queue = Some(text("queue", v)?),
                "state" => q.state = Some(v.parse().map_err(|e| bad("state", e))?),
                "tenant" => q.tenant = Some(tenant(v)?),
                "kind" => q.kind = Some(text("kind", v)?),
                "payload" => {
                    q.payload = Some(
                        serde_json::from_str(v)
                            .map_err(|e| bad("payload", format!("not JSON: {e}")))?,
                    )
                }
                "limit" => q.limit = limit(v)?,
                "before" => {
                    q.before = Some(
                        v.parse::<i64>()
                            .ok()
                            .filter(|n| *n > 0)
                            .ok_or_else(|| bad("before", format!("`{v}` is not a task id")))?,
                    )
                }
                other => {
                    return Err(bad(
                        other,
                        "unknown filter (queue, state, tenant, kind, payload, limit, before)",
                    ));
                }
            }
        }
        Ok(q)
    }

    /// The filter as query parameters (for links and bulk actions; without `limit` and
    /// `before`).
    pub fn to_query_string(&self) -> String {
        let mut parts: Vec<(String, String)> = Vec::new();
        if let Some(v) = &self.queue {
            parts.push(("queue".into(), v.clone()));
        }
        if let Some(v) = &self.state {
            parts.push(("state".into(), v.as_str().into()));
        }
        if let Some(v) = &self.tenant {
            parts.push(("tenant".into(), v.as_str().into()));
        }
        if let Some(v) = &self.kind {
            parts.push(("kind".into(), v.clone()));
        }
        if let Some(v) = &self.payload {
            parts.push(("payload".into(), v.to_string()));
        }
        parts
            .iter()
            .map(|(k, v)| format!("{k}={}", encode(v)))
            .collect::<Vec<_>>()
            .join("&")
    }
}

/// Percent-encode a query value.
pub(crate) fn encode(v: &str) -> String {
    let mut out = String::new();
    for b in v.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn filters_parse_or_say_why_not() {
        let q = RunQuery::parse(&p(&[
            ("state", "running"),
            ("since", "15m"),
            ("tenant", ""),
        ]))
        .unwrap();
        assert_eq!(q.state, Some(RunState::Running));
        assert_eq!(q.since, Some(TimeBound::AgoSeconds(900.0)));
        assert_eq!(q.tenant, None);
        assert!(RunQuery::parse(&p(&[("state", "sleeping")])).is_err());
        assert!(RunQuery::parse(&p(&[("limit", "0")])).is_err());
        assert!(RunQuery::parse(&p(&[("colour", "red")])).is_err());
        let t = TaskQuery::parse(&p(&[("payload", r#"{"customer": 42}"#)])).unwrap();
        assert_eq!(t.payload, Some(serde_json::json!({"customer": 42})));
        assert!(TaskQuery::parse(&p(&[("payload", "{customer")])).is_err());
        assert_eq!(
            TaskQuery::parse(&p(&[("queue", "a b")]))
                .unwrap()
                .to_query_string(),
            "queue=a%20b"
        );
    }
}
