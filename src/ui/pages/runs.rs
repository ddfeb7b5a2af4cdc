//! `/runs` (filters: tenant, state, agent, since, until, limit) and `/runs/{id}` (the ledger
//! timeline, forks, artifacts, summaries, chain verification, cancel).

use axum::extract::{Path, State};
use axum::response::Response;
use maud::{Markup, html};

use super::{Params, age, json, opt_time, params, state, time};
use crate::ids::RunId;
use crate::ui::data::{self, RunList};
use crate::ui::error::UiError;
use crate::ui::filters::RunQuery;
use crate::ui::respond::Ctx;
use crate::ui::timeline::{self, RunDetail};
use crate::ui::{Shared, UiState};

/// `GET /runs` and `/api/runs`.
pub(crate) async fn list_handler(State(s): State<Shared>, ctx: Ctx, q: Params) -> Response {
    let d = match params(q).and_then(|p| RunQuery::parse(&p)) {
        Ok(f) => s.cache.get(&ctx.key, || data::runs(s.client.db(), f)).await,
        Err(e) => Err(e),
    };
    ctx.respond(d, |d| {
        super::layout::page(&ctx, "Runs", "all", list(&ctx, d))
    })
}

fn list(ctx: &Ctx, d: &RunList) -> Markup {
    let f = &d.filter;
    let v = |o: Option<String>| o.unwrap_or_default();
    html! {
        form.filters method="get" action=(ctx.link("/runs")) {
            label { "tenant" input name="tenant" value=(v(f.tenant.as_ref().map(|t| t.to_string()))); }
            label { "state" input name="state" value=(v(f.state.map(|s| s.to_string()))); }
            label { "agent" input name="agent" value=(v(f.agent.clone())); }
            label { "since (15m, RFC 3339)" input name="since"; }
            label { "until" input name="until"; }
            label { "limit" input name="limit" value=(f.limit); }
            button type="submit" { "Filter" }
        }
        table #runs {
            tr { th { "run" } th { "tenant" } th { "agent" } th { "state" } th { "created" }
                 th { "tokens in/out" } th { "cost" } th { "parent" } }
            @for r in &d.runs {
                tr data-run=(r.id) {
                    td { a href=(ctx.link(&format!("/runs/{}", r.id))) { (r.id) } }
                    td { (r.tenant_id) } td { (r.agent_name.as_deref().unwrap_or("")) }
                    td { (state(r.state.as_str())) } td { (time(&r.created_at)) }
                    td { (r.input_tokens) " / " (r.output_tokens) }
                    td { (format!("{:.4}", r.cost_usd)) }
                    td { @if let Some(p) = r.parent_run_id {
                        a href=(ctx.link(&format!("/runs/{p}"))) { "fork of " (p) } } }
                }
            }
        }
        @if d.runs.is_empty() { p.muted { "no runs match" } }
    }
}

/// `GET /runs/{id}` and `/api/runs/{id}`.
pub(crate) async fn detail_handler(
    State(s): State<Shared>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> Response {
    let d = match id.parse::<RunId>() {
        Ok(run) => {
            s.cache
                .get(&ctx.key, || timeline::run_detail(s.client.db(), run))
                .await
        }
        Err(_) => Err(UiError::not_found("run", &id)),
    };
    ctx.respond(d, |d| {
        let live = format!("run:{}", d.run.id);
        super::layout::page(
            &ctx,
            &format!("Run {}", d.run.id),
            &live,
            detail(&ctx, &s, d),
        )
    })
}

fn detail(ctx: &Ctx, s: &UiState, d: &RunDetail) -> Markup {
    let r = &d.run;
    html! {
        h2 { "Run " (r.id) " " span #run-state { (state(r.state.as_str())) } }
        table {
            tr { th { "tenant" } td { a href=(ctx.link(&format!("/tenants/{}", r.tenant_id))) { (r.tenant_id) } } }
            tr { th { "agent" } td { (r.agent_name.as_deref().unwrap_or("")) } }
            tr { th { "created / started / finished" } td { (time(&r.created_at)) " / " (opt_time(&r.started_at)) " / " (opt_time(&r.finalized_at)) } }
            tr { th { "lease" } td { (r.lease_owner.as_deref().unwrap_or("-")) " token " (r.lease_token)
                 @if r.lease_valid { " (held)" } } }
            tr { th { "tokens in / out" } td { (r.input_tokens) " / " (r.output_tokens) } }
            tr { th { "cost" } td { (format!("{:.6} USD", r.cost_usd)) } }
            @if let Some(p) = r.parent_run_id {
                tr { th { "forked from" } td { a #parent-run href=(ctx.link(&format!("/runs/{p}"))) { (p) } " at seq " (r.forked_at_seq.unwrap_or(0)) } }
            }
            @if let Some(m) = &r.error_message { tr { th { "error" } td.bad { (r.error_type.as_deref().unwrap_or("")) ": " (m) } } }
            @if let Some(c) = &r.cancel_reason { tr { th { "cancelled" } td { (c) } } }
            @if let Some(t) = &r.response_text { tr { th { "response" } td { pre { (t) } } } }
        }
        h2 { "Chain" }
        p #chain {
            @if let Some(v) = &d.verification {
                @if v.valid { span.good data-valid="true" { "verified" } " (" (v.checked) " events, head seq " (v.head_seq) ", format v" (v.format) ")" }
                @else { span.bad data-valid="false" { "INVALID" } " at seq " (v.first_bad_seq.unwrap_or(0)) ": " (v.problem.as_deref().unwrap_or("")) }
            } @else { span.warn { "not verified: " (d.verification_error.as_deref().unwrap_or("")) } }
        }
        @if s.auth.enabled() && !r.state.is_terminal() {
            form #cancel-form method="post" action=(ctx.link(&format!("/runs/{}/cancel", r.id))) {
                input type="hidden" name="csrf" value=(s.auth.csrf_for(ctx).unwrap_or(""));
                input type="text" name="reason" placeholder="reason (recorded)";
                button #cancel-run type="submit" { "Cancel run" }
            }
        }
        @if !d.forks.is_empty() {
            h2 { "Forks" }
            ul { @for f in &d.forks { li { a href=(ctx.link(&format!("/runs/{}", f.id))) { (f.id) } " at seq " (f.forked_at_seq.unwrap_or(0)) " " (state(&f.state)) } } }
        }
        h2 { "Ledger" @if d.truncated { span.muted { " (newest " (timeline::TIMELINE_EVENTS) ")" } } }
        table #timeline {
            tr { th { "seq" } th { "time" } th { "event" } th { "step" } th { "details" } }
            @for e in &d.timeline {
                tr class=(format!("cat-{}", e.category)) data-seq=(e.seq) {
                    td { (e.seq) } td { (time(&e.at)) } td { (e.event_type) }
                    td { (e.step_key.as_deref().unwrap_or("")) }
                    td {
                        @if let Some(m) = &e.model { "model " b { (m) } " " }
                        @if let (Some(p), Some(c)) = (e.prompt_tokens, e.completion_tokens) { (p) " + " (c) " tokens " }
                        @if let Some(c) = e.cost_usd { (format!("{c:.6} USD ")) }
                        @if let Some(l) = e.latency_ms { (age(l / 1000.0)) " " }
                        @if let Some(t) = e.tool_state { "tool: " b { (t) } " " }
                        @if let Some(d) = &e.decision { "budget: " b.decision { (d) } " " }
                        @if let Some(l) = &e.link_run { a href=(ctx.link(&format!("/runs/{l}"))) { "run " (l) } " " }
                        details { summary { "payload" } (json(&e.payload)) }
                    }
                }
            }
        }
        @if !d.artifacts.is_empty() {
            h2 { "Artifacts" }
            table { @for a in &d.artifacts { tr { th { (a.key) " v" (a.version) } td { (json(&a.value)) } } } }
        }
        @if !d.summaries.is_empty() {
            h2 { "Summaries" }
            table { @for s in &d.summaries { tr { th { (s.summary_type) } td { (time(&s.created_at)) } td { (json(&serde_json::to_value(&s.content).unwrap_or_default())) } } } }
        }
    }
}
