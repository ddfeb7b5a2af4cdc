//! `/`: instances, the leader, queues, runs per state, tenants' budgets, stuck runs and stale
//! instances.

use axum::extract::State;
use axum::response::Response;
use maud::{Markup, html};

use super::{age, opt_time, secs, state, time};
use crate::ui::charts;
use crate::ui::data::QueueSummary;
use crate::ui::data::{self, Overview};
use crate::ui::respond::Ctx;
use crate::ui::{Shared, UiState};

/// `GET /` and `/api/overview`.
pub(crate) async fn handler(State(s): State<Shared>, ctx: Ctx) -> Response {
    let d = s
        .cache
        .get(&ctx.key, || data::overview(s.client.db()))
        .await;
    ctx.respond(d, |d| {
        super::layout::page(&ctx, "Overview", "all", render(&ctx, &s, d))
    })
}

/// The leader section (also on `/instances`).
pub(crate) fn leaders(
    ctx: &Ctx,
    now: chrono::DateTime<chrono::Utc>,
    rows: &[crate::coord::leader::LeaderRow],
) -> Markup {
    html! {
        h2 { "Leader" }
        @if rows.is_empty() { p #leader.warn data-leader="" { "no leader" } }
        @for l in rows {
            p #leader data-leader=(l.leader_id) data-term=(l.term) {
                "lease " b { (l.name) } ": "
                a href=(ctx.link("/instances")) { b { (l.leader_id) } }
                " term " b { (l.term) }
                " elected " (age(secs(l.elected_at, now))) " ago, "
                @if l.valid { "lease left " (age(l.remaining_ms as f64 / 1000.0)) }
                @else { span.bad { "lease expired" } }
            }
        }
    }
}

/// The instances table (also on `/instances`).
pub(crate) fn instance_table(
    now: chrono::DateTime<chrono::Utc>,
    rows: &[crate::coord::instance::InstanceRow],
) -> Markup {
    html! {
        table #instances {
            tr { th { "instance" } th { "role" } th { "host" } th { "pid" } th { "version" }
                 th { "heartbeat age" } th { "up" } th { "agents" } th { "tools" } }
            @for i in rows {
                tr data-instance=(i.id) {
                    td { (i.id) }
                    td { @if i.is_leader { b { "leader" } }
                         @else if let Some(r) = i.metadata.get("role").and_then(|r| r.as_str()) { (r) } }
                    td { (i.hostname) } td { (i.pid) } td { (i.version) }
                    td { (age(i.silent_ms as f64 / 1000.0)) }
                    td { (age(secs(i.created_at, now))) }
                    td { (i.agents.join(", ")) } td { (i.tools.join(", ")) }
                }
            }
        }
    }
}

/// A queue's throughput (finished per minute) and latency (mean due → finished) sparklines
/// over the last hour, from `pgcrew.queue_minutes`.
fn sparklines(now: chrono::DateTime<chrono::Utc>, q: &QueueSummary) -> (Markup, Markup) {
    let n = charts::SPARK_MINUTES;
    let mut finished = vec![None; n];
    let mut latency = vec![None; n];
    let newest = now.timestamp().div_euclid(60);
    for m in &q.minutes {
        let back = newest - m.minute.timestamp().div_euclid(60);
        if let Ok(back) = usize::try_from(back)
            && back < n
        {
            finished[n - 1 - back] = Some(m.finished as f64);
            latency[n - 1 - back] = m.latency_ms;
        }
    }
    (
        charts::sparkline(&finished, true, "tasks/min", "spark-throughput"),
        charts::sparkline(&latency, false, "ms", "spark-latency"),
    )
}

fn queue_row(
    ctx: &Ctx,
    s: &UiState,
    now: chrono::DateTime<chrono::Utc>,
    q: &QueueSummary,
) -> Markup {
    let csrf = s.auth.csrf_for(ctx).unwrap_or("");
    let all_paused = q.pauses.iter().any(|p| p.tenant_id.is_none());
    let (throughput, latency) = sparklines(now, q);
    let enc = crate::ui::filters::encode(&q.queue);
    html! {
        tr data-queue=(q.queue) data-paused=(all_paused) {
            td { a href=(ctx.link(&format!("/tasks?queue={enc}"))) { (q.queue) } }
            td { @for (st, n) in &q.states { (state(st)) " " (n) "  " } }
            td { (q.oldest_available_age_s.map(age).unwrap_or_else(|| "-".into())) }
            td { (throughput) } td { (latency) }
            td.pauses {
                @for p in &q.pauses {
                    span.warn { "paused" @if let Some(t) = &p.tenant_id { " for " (t) } }
                    " since " (time(&p.paused_at))
                    @if let Some(b) = &p.paused_by { " by " (b) }
                    @if s.auth.enabled() {
                        " " form.inline method="post" action=(ctx.link(&format!("/queues/{enc}/resume"))) {
                            input type="hidden" name="csrf" value=(csrf);
                            @if let Some(t) = &p.tenant_id { input type="hidden" name="tenant" value=(t); }
                            button.resume-queue type="submit" { "Resume" }
                        }
                    }
                    br;
                }
                @if s.auth.enabled() && !all_paused {
                    form.inline method="post" action=(ctx.link(&format!("/queues/{enc}/pause"))) {
                        input type="hidden" name="csrf" value=(csrf);
                        button.pause-queue type="submit" { "Pause" }
                    }
                }
            }
        }
    }
}

fn render(ctx: &Ctx, s: &UiState, d: &Overview) -> Markup {
    html! {
        p.muted { "database time " (time(&d.now)) " UTC" }
        (leaders(ctx, d.now, &d.leaders))
        @if !d.leader_history.is_empty() {
            details #leader-history { summary { "leader history (" (d.leader_history.len()) " newest terms)" }
                table { tr { th { "lease" } th { "term" } th { "leader" } th { "taken" } th { "held until" } }
                    @for h in &d.leader_history {
                        tr data-term=(h.term) { td { (h.name) } td { (h.term) } td { (h.leader_id) }
                             td { (time(&h.acquired_at)) } td { (opt_time(&h.held_until)) } }
                    }
                }
            }
        }
        h2 { "Instances (" (d.instances.len()) ")" }
        (instance_table(d.now, &d.instances))
        @if !d.stale_instances.is_empty() {
            h2.bad { "Stale instances" }
            table { tr { th { "instance" } th { "host" } th { "silent" } th { "leader of" } }
                @for s in &d.stale_instances {
                    tr { td { (s.id) } td { (s.hostname) } td { (age(s.silent_s)) }
                         td { (s.leader_of.as_deref().unwrap_or("")) } }
                }
            }
        }
        h2 { "Queues" }
        table #queues {
            tr { th { "queue" } th { "depth by state" } th { "oldest available" }
                 th { "finished / min (1 h)" } th { "latency (1 h)" } th { "paused" } }
            @for q in &d.queues { (queue_row(ctx, s, d.now, q)) }
        }
        @if !d.queue_pause_events.is_empty() {
            details #queue-pause-events { summary { "queue pauses and resumes (" (d.queue_pause_events.len()) " newest)" }
                table { tr { th { "at" } th { "queue" } th { "tenant" } th { "action" } th { "by" } th { "changed" } }
                    @for e in &d.queue_pause_events {
                        tr { td { (time(&e.at)) } td { (e.queue) } td { (e.tenant_id.as_deref().unwrap_or("(all)")) }
                             td { (e.action) } td { (e.actor) } td { (e.changed) } }
                    }
                }
            }
        }
        h2 { "Runs" }
        p #run-states { @for (s, n) in &d.run_states {
            a href=(ctx.link(&format!("/runs?state={s}"))) { (state(s)) } " " (n) "   " } }
        h2 { "Tenants" }
        table #tenants {
            tr { th { "tenant" } th { "budget" } th { "status" } th { "spent" } th { "limit" } }
            @for t in &d.tenants {
                tr { td { a href=(ctx.link(&format!("/tenants/{}", crate::ui::filters::encode(t.context.tenant_id.as_str())))) { (t.context.tenant_id) } }
                     td { (charts::gauge(t.spent_usd, t.reserved_usd, t.context.budget_usd_limit, t.status.as_str())) }
                     td { (t.status.as_str()) }
                     td { (format!("{:.4}", t.spent_usd)) }
                     td { (t.context.budget_usd_limit.map(|l| format!("{l:.4}")).unwrap_or_else(|| "-".into())) } }
            }
        }
        h2 { "Stuck runs" }
        @if d.stuck_runs.is_empty() { p.muted { "none" } }
        @else {
            table #stuck-runs { tr { th { "run" } th { "tenant" } th { "state" } th { "age" } th { "why" } }
                @for r in &d.stuck_runs {
                    tr { td { a href=(ctx.link(&format!("/runs/{}", r.run_id))) { (r.run_id) } }
                         td { (r.tenant_id) } td { (state(&r.state)) } td { (age(r.age_s)) } td { (r.reason) } }
                }
            }
        }
    }
}
