//! Server-rendered SVG charts (no JavaScript, no external assets): horizontal bars, columns
//! over days, and a budget gauge.

use maud::{Markup, html};

/// Horizontal bars, one per `(label, value)`, scaled to the largest.
pub(crate) fn bars(items: &[(String, f64)], unit: &str) -> Markup {
    let max = items.iter().map(|i| i.1).fold(0.0_f64, f64::max);
    let row = 22.0;
    let height = row * items.len().max(1) as f64;
    html! {
        svg.chart width="520" height=(height) viewBox=(format!("0 0 520 {height}")) role="img" {
            @if items.is_empty() { text x="0" y="15" { "nothing recorded" } }
            @for (i, (label, v)) in items.iter().enumerate() {
                @let y = i as f64 * row;
                @let w = if max > 0.0 { 220.0 * v / max } else { 0.0 };
                text x="0" y=(y + 15.0) { (short(label, 24)) }
                rect.bar x="180" y=(y + 3.0) width=(format!("{w:.1}")) height="16" {}
                text x=(format!("{:.1}", 186.0 + w)) y=(y + 15.0) { (format!("{v:.4} {unit}")) }
            }
        }
    }
}

/// Columns over days (`(day, value)` oldest first), scaled to the largest.
pub(crate) fn columns(items: &[(String, f64)], unit: &str) -> Markup {
    let max = items.iter().map(|i| i.1).fold(0.0_f64, f64::max);
    let n = items.len().max(1) as f64;
    let col = (500.0 / n).min(40.0);
    html! {
        svg.chart width="520" height="170" viewBox="0 0 520 170" role="img" {
            @if items.is_empty() { text x="0" y="15" { "nothing recorded" } }
            @for (i, (day, v)) in items.iter().enumerate() {
                @let h = if max > 0.0 { 120.0 * v / max } else { 0.0 };
                @let x = 10.0 + i as f64 * col;
                rect.bar x=(format!("{x:.1}")) y=(format!("{:.1}", 130.0 - h)) width=(format!("{:.1}", col * 0.8)) height=(format!("{h:.1}")) {
                    title { (format!("{day}: {v:.4} {unit}")) }
                }
                @if items.len() <= 14 || i % (items.len() / 7).max(1) == 0 {
                    text x=(format!("{x:.1}")) y="150" font-size="10" { (day.get(5..).unwrap_or(day)) }
                }
            }
            text x="10" y="166" font-size="10" { (format!("max {max:.4} {unit}")) }
        }
    }
}

/// A budget gauge: used percentage (spent + reserved over the limit) with the status colour.
pub(crate) fn gauge(spent: f64, reserved: f64, limit: Option<f64>, status: &str) -> Markup {
    let Some(limit) = limit.filter(|l| *l > 0.0) else {
        return html! { span.muted { "no limit" } };
    };
    let sp = (spent / limit).clamp(0.0, 1.0) * 200.0;
    let rs = (reserved / limit).clamp(0.0, 1.0 - sp / 200.0) * 200.0;
    html! {
        svg.gauge width="200" height="14" viewBox="0 0 200 14" role="img" {
            title { (format!("{spent:.4} spent + {reserved:.4} reserved of {limit:.2} USD")) }
            rect x="0" y="0" width="200" height="14" class="gauge-bg" {}
            rect x="0" y="0" width=(format!("{sp:.1}")) height="14" class=(format!("gauge-{}", status.to_ascii_lowercase())) {}
            rect x=(format!("{sp:.1}")) y="0" width=(format!("{rs:.1}")) height="14" class="gauge-reserved" {}
        }
    }
}

fn short(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n - 1).collect::<String>())
    }
}

/// Minutes a sparkline spans.
pub(crate) const SPARK_MINUTES: usize = 60;

/// A sparkline over the last [`SPARK_MINUTES`] minutes: `values[i]` is minute `i` (oldest
/// first; `None`: nothing recorded). `columns` draws columns (counts), otherwise a line through
/// the recorded minutes (means). The title names the newest value and the largest.
pub(crate) fn sparkline(values: &[Option<f64>], columns: bool, unit: &str, class: &str) -> Markup {
    let max = values.iter().flatten().fold(0.0_f64, |a, b| a.max(*b));
    let (w, h) = (120.0, 20.0);
    let step = w / SPARK_MINUTES as f64;
    let y = |v: f64| {
        if max > 0.0 {
            h - 1.0 - (h - 2.0) * v / max
        } else {
            h - 1.0
        }
    };
    let last = values.iter().rev().flatten().next().copied();
    let title = format!(
        "last hour, per minute: newest {}, max {max:.1} {unit}",
        last.map(|v| format!("{v:.1} {unit}"))
            .unwrap_or_else(|| "-".into())
    );
    let line: Vec<String> = values
        .iter()
        .enumerate()
        .filter_map(|(i, v)| v.map(|v| format!("{:.1},{:.1}", (i as f64 + 0.5) * step, y(v))))
        .collect();
    html! {
        svg.spark class=(class) width=(w) height=(h) viewBox=(format!("0 0 {w} {h}")) role="img"
            data-points=(values.iter().flatten().count()) {
            title { (title) }
            rect x="0" y="0" width=(w) height=(h) class="spark-bg" {}
            @if columns {
                @for (i, v) in values.iter().enumerate() {
                    @if let Some(v) = v.filter(|v| *v > 0.0) {
                        rect.bar x=(format!("{:.1}", i as f64 * step)) y=(format!("{:.1}", y(v)))
                            width=(format!("{:.1}", step * 0.9)) height=(format!("{:.1}", h - 1.0 - y(v))) {}
                    }
                }
            } @else if !line.is_empty() {
                polyline points=(line.join(" ")) fill="none" stroke="#3a6ea5" stroke-width="1.2" {}
            }
        }
    }
}
