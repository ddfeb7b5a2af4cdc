//! `/tasks` (filters: queue, state, tenant, kind, payload containment, limit, before; the
//! payload search's report and continuation; bulk actions),
//! `/tasks/{id}` (attempts, errors, actions taken with who and when, parents and children,
//! claim) and `/bulk/{id}`.

use axum::extract::{Path, State};
use axum::response::Response;
use maud::{Markup, html};

use super::{Params, json, opt_time, params, state, time};
use crate::ids::TaskId;
use crate::ui::bulk::BulkJob;
use crate::ui::data::{self, SearchMode, TaskDetail, TaskList};
use crate::ui::error::UiError;
use crate::ui::filters::TaskQuery;
use crate::ui::respond::Ctx;
use crate::ui::{Shared, UiState};

/// `GET /tasks` and `/api/tasks`.
pub(crate) async fn list_handler(State(s): State<Shared>, ctx: Ctx, q: Params) -> Response {
    let d = match params(q).and_then(|p| TaskQuery::parse(&p)) {
        Ok(f) => {
            s.cache
                .get(&ctx.key, || data::tasks(s.client.db(), &s.payload, f))
                .await
        }
        Err(e) => Err(e),
    };
    let matching = match &d {
        // Counting every match of a payload filter without its index would read every task:
        // a bounded search offers the selected rows only.
        Ok(l)
            if s.auth.enabled()
                && !ctx.json
                && !l
                    .payload_search
                    .as_ref()
                    .is_some_and(|p| p.mode == SearchMode::Bounded) =>
        {
            data::count_tasks(s.client.db(), &l.filter).await.ok()
        }
        _ => None,
    };
    ctx.respond(d, |d| {
        super::layout::page(&ctx, "Tasks", "all", list(&ctx, &s, d, matching))
    })
}

fn list(ctx: &Ctx, s: &UiState, d: &TaskList, matching: Option<i64>) -> Markup {
    let f = &d.filter;
    let v = |o: Option<String>| o.unwrap_or_default();
    let csrf = s.auth.csrf_for(ctx).unwrap_or("");
    html! {
        form.filters method="get" action=(ctx.link("/tasks")) {
            label { "queue" input name="queue" value=(v(f.queue.clone())); }
            label { "state" input name="state" value=(v(f.state.map(|s| s.as_str().to_string()))); }
            label { "tenant" input name="tenant" value=(v(f.tenant.as_ref().map(|t| t.to_string()))); }
            label { "kind" input name="kind" value=(v(f.kind.clone())); }
            label { "payload contains (JSON)" input name="payload" value=(v(f.payload.as_ref().map(|p| p.to_string()))); }
            label { "limit" input name="limit" value=(f.limit); }
            button type="submit" { "Filter" }
        }
        @if let Some(n) = matching {
            form #bulk-all method="post" action=(ctx.link("/tasks/bulk"))
                data-confirm=(format!("Apply to all {n} tasks matching this filter?")) {
                input type="hidden" name="csrf" value=(csrf);
                input type="hidden" name="confirm" value=(n);
                @if let Some(q) = &f.queue { input type="hidden" name="f_queue" value=(q); }
                @if let Some(q) = &f.state { input type="hidden" name="f_state" value=(q.as_str()); }
                @if let Some(q) = &f.tenant { input type="hidden" name="f_tenant" value=(q.as_str()); }
                @if let Some(q) = &f.kind { input type="hidden" name="f_kind" value=(q); }
                @if let Some(q) = &f.payload { input type="hidden" name="f_payload" value=(q.to_string()); }
                "All " b { (n) } " matching: "
                button name="action" value="cancel" { "Cancel all" } " "
                button name="action" value="retry" { "Retry all" } " "
                button name="action" value="discard" { "Discard all" }
            }
        }
        form #bulk-selected method="post" action=(ctx.link("/tasks/bulk")) {
            input type="hidden" name="csrf" value=(csrf);
            table #tasks {
                tr { th {} th { "task" } th { "queue" } th { "kind" } th { "tenant" } th { "state" }
                     th { "attempts" } th { "created" } th { "last error" } }
                @for t in &d.tasks {
                    tr data-task=(t.id) {
                        td { @if s.auth.enabled() { input type="checkbox" name="ids" value=(t.id); } }
                        td { a href=(ctx.link(&format!("/tasks/{}", t.id))) { (t.id) } }
                        td { (t.queue) } td { (t.kind) } td { (t.tenant_id) }
                        td { (state(t.state.as_str())) } td { (t.attempts) "/" (t.max_attempts) }
                        td { (time(&t.created_at)) } td { (t.last_error.as_deref().unwrap_or("")) }
                    }
                }
            }
            @if s.auth.enabled() && !d.tasks.is_empty() {
                "Selected: " button name="action" value="cancel" { "Cancel selected" } " "
                button name="action" value="retry" { "Retry selected" } " "
                button name="action" value="discard" { "Discard selected" }
            }
        }
        @if d.tasks.is_empty() { p.muted { "no tasks match" } }
        @if let Some(ps) = &d.payload_search {
            div #payload-search data-mode=(if ps.mode == SearchMode::Bounded { "bounded" } else { "index" }) {
                p { (ps.message) }
                @if let Some(sql) = &ps.index_sql { pre { (sql) } }
            }
        }
        @if let Some(b) = d.next_before {
            @let more = if d.payload_search.as_ref().is_some_and(|p| p.mode == SearchMode::Bounded) {
                "Search further back"
            } else {
                "Older tasks"
            };
            @let q = f.to_query_string();
            @let href = ctx.link(&format!("/tasks?{q}{}limit={}&before={b}", if q.is_empty() { "" } else { "&" }, f.limit));
            p { a #next-page href=(href) { (more) } }
        }
    }
}

/// `GET /tasks/{id}` and `/api/tasks/{id}`.
pub(crate) async fn detail_handler(
    State(s): State<Shared>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> Response {
    let d = match id.parse::<TaskId>() {
        Ok(t) => s.cache.get(&ctx.key, || data::task(s.client.db(), t)).await,
        Err(_) => Err(UiError::not_found("task", &id)),
    };
    ctx.respond(d, |d| {
        super::layout::page(
            &ctx,
            &format!("Task {}", d.task.id),
            "all",
            detail(&ctx, &s, d),
        )
    })
}

fn detail(ctx: &Ctx, s: &UiState, d: &TaskDetail) -> Markup {
    let t = &d.task;
    let csrf = s.auth.csrf_for(ctx).unwrap_or("");
    let errors = t.errors.as_array().cloned().unwrap_or_default();
    html! {
        h2 { "Task " (t.id) " " span #task-state { (state(t.state.as_str())) } }
        table {
            tr { th { "queue / kind" } td { (t.queue) " / " (t.kind) } }
            tr { th { "tenant" } td { a href=(ctx.link(&format!("/tenants/{}", t.tenant_id))) { (t.tenant_id) } } }
            @if let Some(r) = t.run_id { tr { th { "run" } td { a href=(ctx.link(&format!("/runs/{r}"))) { (r) } } } }
            tr { th { "priority" } td { (t.priority) } }
            tr { th { "attempts" } td #attempts { (t.attempts) " of " (t.max_attempts) } }
            tr { th { "due" } td { (time(&t.run_at)) } }
            tr { th { "claimed by (last claim)" } td { (t.claimed_by.as_deref().unwrap_or("-")) ", last heartbeat " (opt_time(&t.heartbeat_at)) } }
            @if t.cancel_requested_at.is_some() { tr { th { "cancel requested" } td { (opt_time(&t.cancel_requested_at)) } } }
            tr { th { "created / finished" } td { (time(&t.created_at)) " / " (opt_time(&t.finalized_at)) } }
            @if let Some(k) = &t.unique_key { tr { th { "unique key" } td { (k) } } }
            tr { th { "payload" } td { (json(&t.payload)) } }
        }
        @if s.auth.enabled() {
            @if !t.state.is_final() {
                form.inline method="post" action=(ctx.link(&format!("/tasks/{}/cancel", t.id))) {
                    input type="hidden" name="csrf" value=(csrf);
                    button #cancel-task type="submit" { "Cancel task" }
                }
            }
            @if matches!(t.state.as_str(), "available" | "scheduled" | "retryable") {
                form.inline method="post" action=(ctx.link(&format!("/tasks/{}/discard", t.id))) {
                    input type="hidden" name="csrf" value=(csrf);
                    button #discard-task type="submit" { "Discard task" }
                }
            }
            @if t.state.as_str() != "running" {
                form.inline method="post" action=(ctx.link(&format!("/tasks/{}/retry", t.id))) {
                    input type="hidden" name="csrf" value=(csrf);
                    button #retry-task type="submit" { "Retry task" }
                }
            }
        }
        h2 { "Attempts and claims" }
        p.muted { "Each attempt that did not succeed (failed, rescued from a stopped instance, cancelled or discarded) with the instance that held its claim (recorded since V037), then the last claim." }
        table #errors { tr { th { "attempt" } th { "instance" } th { "at" } th { "outcome" } }
            @for e in &errors {
                tr.attempt { td { (e.get("attempt").map(|v| v.to_string()).unwrap_or_default()) }
                     td.instance { (e.get("instance").and_then(|v| v.as_str()).unwrap_or("-")) }
                     td { (e.get("at").and_then(|v| v.as_str()).unwrap_or("")) }
                     td { pre { (e.get("error").and_then(|v| v.as_str()).unwrap_or("")) } } }
            }
            @if let Some(by) = &t.claimed_by {
                tr #last-claim { td { (t.attempts) } td.instance { (by) }
                     td { "last heartbeat " (opt_time(&t.heartbeat_at)) }
                     td { "last claim: " (state(t.state.as_str())) } }
            }
            @if errors.is_empty() && t.claimed_by.is_none() {
                tr { td colspan="4" { span.muted { "never claimed" } } }
            }
        }
        h2 { "Actions taken" }
        @if d.events.is_empty() { p.muted { "no actions recorded" } }
        @else {
            table #task-events { tr { th { "at" } th { "action" } th { "by" } th { "state" } th { "from" } }
                @for e in &d.events {
                    tr data-action=(e.action) { td { (time(&e.at)) } td { (e.action) } td.actor { (e.actor) }
                         td { (state(e.previous_state.as_str())) " → " (state(e.state.as_str())) } td { (e.source) } }
                }
            }
        }
        h2 { "Dependencies" }
        (graph(ctx, t.id.0, d))
    }
}

/// Parents → this task → children, as a small SVG graph with links.
fn graph(ctx: &Ctx, id: i64, d: &TaskDetail) -> Markup {
    let parents: Vec<_> = d
        .relatives
        .iter()
        .filter(|r| r.relation == "parent")
        .collect();
    let children: Vec<_> = d
        .relatives
        .iter()
        .filter(|r| r.relation == "child")
        .collect();
    if parents.is_empty() && children.is_empty() {
        return html! { p.muted { "no parents or children" } };
    }
    let rows = parents.len().max(children.len()).max(1);
    let h = 30 * rows + 10;
    let mid = (h / 2) as i64;
    html! {
        svg.chart #deps width="620" height=(h) viewBox=(format!("0 0 620 {h}")) {
            @for (i, p) in parents.iter().enumerate() {
                @let y = 10 + 30 * i as i64;
                line x1="180" y1=(y + 10) x2="240" y2=(mid) stroke="#888" {}
                a href=(ctx.link(&format!("/tasks/{}", p.id))) {
                    rect x="0" y=(y) width="180" height="20" fill="#eef0f4" {}
                    text x="4" y=(y + 14) { (format!("#{} {} ({})", p.id, p.kind, p.state)) }
                }
            }
            rect x="240" y=(mid - 10) width="140" height="20" fill="#cfd8ea" {}
            text x="244" y=(mid + 4) { (format!("#{id}")) }
            @for (i, c) in children.iter().enumerate() {
                @let y = 10 + 30 * i as i64;
                line x1="380" y1=(mid) x2="440" y2=(y + 10) stroke="#888" {}
                a href=(ctx.link(&format!("/tasks/{}", c.id))) {
                    rect x="440" y=(y) width="180" height="20" fill="#eef0f4" {}
                    text x="444" y=(y + 14) { (format!("#{} {} ({})", c.id, c.kind, c.state)) }
                }
            }
        }
    }
}

/// `/bulk/{id}`: a bulk job's progress (re-read every few hundred ms until it ends).
pub(crate) fn bulk_page(ctx: &Ctx, j: &BulkJob) -> Markup {
    let body = html! {
        h2 { "Bulk " (j.action) " by " (j.by) }
        p #bulk-progress data-finished=(j.finished) {
            (j.applied + j.skipped) " of " (j.total) " handled: " (j.applied) " applied, " (j.skipped) " skipped"
            @if j.finished { " - done" } @else { span data-poll="1" { " - working" } }
        }
        progress max=(j.total.max(1)) value=(j.applied + j.skipped) {}
        @for e in &j.errors { p.muted { (e) } }
        p { a href=(ctx.link("/tasks")) { "Back to tasks" } }
    };
    super::layout::page(ctx, "Bulk action", "all", body)
}
