//! The pages: each file has its handlers (which load data through `data` / `timeline` and
//! answer through `Ctx::respond`) and its maud templates.

pub(crate) mod instances;
pub(crate) mod layout;
pub(crate) mod overview;
pub(crate) mod runs;
pub(crate) mod tasks;
pub(crate) mod tenants;

use maud::{Markup, html};

/// A duration in seconds for people: `850ms`, `12.3s`, `4m 05s`, `2h 03m`.
pub(crate) fn age(s: f64) -> String {
    if s < 1.0 {
        format!("{:.0}ms", s * 1000.0)
    } else if s < 60.0 {
        format!("{s:.1}s")
    } else if s < 3600.0 {
        format!("{}m {:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!(
            "{}h {:02}m",
            (s / 3600.0) as u64,
            ((s % 3600.0) / 60.0) as u64
        )
    }
}

/// A state, coloured.
pub(crate) fn state(s: &str) -> Markup {
    html! { span class=(format!("state state-{s}")) data-state=(s) { (s) } }
}

/// A timestamp (UTC, seconds).
pub(crate) fn time(t: &chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

/// A timestamp or a dash.
pub(crate) fn opt_time(t: &Option<chrono::DateTime<chrono::Utc>>) -> String {
    t.as_ref().map(time).unwrap_or_else(|| "-".into())
}

/// Seconds between two times.
pub(crate) fn secs(from: chrono::DateTime<chrono::Utc>, to: chrono::DateTime<chrono::Utc>) -> f64 {
    (to - from).num_milliseconds() as f64 / 1000.0
}

/// A JSON value, pretty-printed.
pub(crate) fn json(v: &serde_json::Value) -> Markup {
    html! { pre { (serde_json::to_string_pretty(v).unwrap_or_default()) } }
}

/// The query parameters of a request, 400 when they are not `k=v&...`.
pub(crate) type Params =
    Result<axum::extract::Query<Vec<(String, String)>>, axum::extract::rejection::QueryRejection>;

/// The pairs, or a 400.
pub(crate) fn params(p: Params) -> Result<Vec<(String, String)>, super::error::UiError> {
    p.map(|q| q.0)
        .map_err(|e| super::error::UiError::bad_request(format!("malformed query: {e}")))
}
