//! `/`: instances, the leader, queues, runs per state, tenants' budgets, stuck runs and stale
//! instances.

use axum::extract::State;
use axum::response::Response;
use maud::{Markup, html};

use super::{age, secs, state, time};
use crate::ui::Shared;
use crate::ui::charts;
use crate::ui::data::{self, Overview};
use crate::ui::respond::Ctx;

/// `GET /` and `/api/overview`.
pub(crate) async fn handler(State(s): State<Shared>, ctx: Ctx) -> Response {
    let d = s
        .cache
        .get(&ctx.key, || {
            data::overview(s.client.db(), s.leaders.snapshot())
        })
        .await;
    ctx.respond(d, |d| {
        super::layout::page(&ctx, "Overview", "all", render(&ctx, d))
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

fn render(ctx: &Ctx, d: &Overview) -> Markup {
    html! {
        p.muted { "database time " (time(&d.now)) " UTC" }
        (leaders(ctx, d.now, &d.leaders))
        @if !d.leader_history.is_empty() {
            details { summary { "leader changes seen by this console (" (d.leader_history.len()) ")" }
                table { tr { th { "seen" } th { "lease" } th { "leader" } th { "term" } }
                    @for h in &d.leader_history {
                        tr { td { (time(&h.seen_at)) } td { (h.name) }
                             td { (h.leader_id.as_deref().unwrap_or("(released)")) } td { (h.term) } }
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
            tr { th { "queue" } th { "depth by state" } th { "oldest available" } }
            @for q in &d.queues {
                tr { td { a href=(ctx.link(&format!("/tasks?queue={}", crate::ui::filters::encode(&q.queue)))) { (q.queue) } }
                     td { @for (s, n) in &q.states { (state(s)) " " (n) "  " } }
                     td { (q.oldest_available_age_s.map(age).unwrap_or_else(|| "-".into())) } }
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
