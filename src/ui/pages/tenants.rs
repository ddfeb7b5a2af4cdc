//! `/tenants` and `/tenants/{id}` (capabilities, limits, budget, degradation rules, the budget
//! decisions recorded in the tenant's ledgers, and cost by day, model and category as SVG
//! charts).

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::response::Response;
use maud::{Markup, html};

use super::time;
use crate::ids::TenantId;
use crate::ui::Shared;
use crate::ui::charts;
use crate::ui::data::{self, TenantDetail, Tenants};
use crate::ui::error::UiError;
use crate::ui::respond::Ctx;

/// `GET /tenants` and `/api/tenants`.
pub(crate) async fn list_handler(State(s): State<Shared>, ctx: Ctx) -> Response {
    let d = s.cache.get(&ctx.key, || data::tenants(s.client.db())).await;
    ctx.respond(d, |d| {
        super::layout::page(&ctx, "Tenants", "all", list(&ctx, d))
    })
}

fn list(ctx: &Ctx, d: &Tenants) -> Markup {
    html! {
        table #tenants {
            tr { th { "tenant" } th { "budget" } th { "status" } th { "spent" } th { "reserved" }
                 th { "limit" } th { "runs / tasks at once" } th { "capabilities" } }
            @for t in &d.tenants {
                @let c = &t.context;
                tr { td { a href=(ctx.link(&format!("/tenants/{}", crate::ui::filters::encode(c.tenant_id.as_str())))) { (c.tenant_id) } }
                     td { (charts::gauge(t.spent_usd, t.reserved_usd, c.budget_usd_limit, t.status.as_str())) }
                     td { (t.status.as_str()) } td { (format!("{:.4}", t.spent_usd)) }
                     td { (format!("{:.4}", t.reserved_usd)) }
                     td { (c.budget_usd_limit.map(|l| format!("{l:.4}")).unwrap_or_else(|| "-".into())) }
                     td { (opt(c.max_concurrent_runs)) " / " (opt(c.max_concurrent_tasks)) }
                     td { (c.capabilities.join(", ")) } }
            }
        }
    }
}

fn rule_action(a: &crate::tenancy::DegradationAction) -> String {
    use crate::tenancy::DegradationAction as A;
    match a {
        A::SwitchModel { from: Some(f), to } => format!("switch model {f} to {to}"),
        A::SwitchModel { from: None, to } => format!("switch any model to {to}"),
        A::CapMaxTokens { max_tokens } => format!("cap max_tokens at {max_tokens}"),
        A::SkipOptional => "skip optional steps".into(),
    }
}

/// The rule a ledger budget decision applied: the scope's limit, or for a degradation the
/// tenant's status and the degradation rules that changed the step.
fn decision_rule(e: &crate::ui::data::BudgetDecision) -> String {
    let p = &e.payload;
    if e.event_type == "budget_degraded" {
        let status = p.get("status").and_then(|s| s.as_str()).unwrap_or("?");
        let rules: Vec<String> = p
            .get("applied")
            .and_then(|a| a.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|r| {
                        serde_json::from_value::<crate::tenancy::DegradationAction>(r.clone()).ok()
                    })
                    .map(|r| rule_action(&r))
                    .collect()
            })
            .unwrap_or_default();
        return format!("degradation at {status}: {}", rules.join("; "));
    }
    let scope = p.get("scope").and_then(|s| s.as_str()).unwrap_or("budget");
    let limit = p.get("limit_usd").and_then(|l| l.as_f64());
    let what = match e.event_type.as_str() {
        "budget_exceeded" => "reservation within the limit",
        _ => "settled cost within the limit",
    };
    match limit {
        Some(l) => format!("{scope} budget {l:.4} USD: {what}"),
        None => format!("{scope} budget: {what}"),
    }
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

/// `GET /tenants/{id}` and `/api/tenants/{id}`.
pub(crate) async fn detail_handler(
    State(s): State<Shared>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> Response {
    let d = match TenantId::new(&id) {
        Ok(t) => {
            s.cache
                .get(&ctx.key, || {
                    let db = s.client.db().clone();
                    async move { data::tenant(&db, &t).await }
                })
                .await
        }
        Err(_) => Err(UiError::not_found("tenant", &id)),
    };
    ctx.respond(d, |d| {
        super::layout::page(
            &ctx,
            &format!("Tenant {}", d.tenant.context.tenant_id),
            "all",
            detail(&ctx, d),
        )
    })
}

fn sums(d: &TenantDetail, key: impl Fn(&crate::tenancy::CostRow) -> String) -> Vec<(String, f64)> {
    let mut m: BTreeMap<String, f64> = BTreeMap::new();
    for c in &d.costs {
        *m.entry(key(c)).or_default() += c.cost_usd;
    }
    m.into_iter().collect()
}

fn detail(ctx: &Ctx, d: &TenantDetail) -> Markup {
    let t = &d.tenant;
    let c = &t.context;
    let b = &d.budget;
    let by_day = sums(d, |c| c.day.to_string());
    let by_model = sums(d, |c| {
        if c.model.is_empty() {
            "(none)".into()
        } else {
            c.model.clone()
        }
    });
    let by_cat = sums(d, |c| c.category.clone());
    html! {
        h2 { "Tenant " (c.tenant_id) }
        table {
            tr { th { "budget" } td #budget data-status=(b.status.as_str()) {
                (charts::gauge(b.spent_usd, b.reserved_usd, b.budget_usd_limit, b.status.as_str()))
                " " (b.status.as_str()) ": spent " (format!("{:.4}", b.spent_usd)) ", reserved "
                (format!("{:.4}", b.reserved_usd)) ", remaining "
                (b.remaining_usd.map(|r| format!("{r:.4}")).unwrap_or_else(|| "unlimited".into()))
                " USD (" (b.active_reservations) " open reservations)" } }
            tr { th { "thresholds" } td { "warning " (b.thresholds.warning) ", critical " (b.thresholds.critical) } }
            tr { th { "capabilities" } td { (c.capabilities.join(", ")) } }
            tr { th { "runs / tasks at once" } td { (opt(c.max_concurrent_runs)) " / " (opt(c.max_concurrent_tasks)) } }
        }
        h2 { "Degradation rules" }
        @if c.degradation.rules.is_empty() { p.muted { "none: model steps are never degraded" } }
        @else {
            table #degradation-rules { tr { th { "from status" } th { "action" } }
                @for r in &c.degradation.rules {
                    tr { td { (r.at.as_str()) } td { (rule_action(&r.action)) } }
                }
            }
        }
        h2 { "Budget decisions" }
        @if d.decisions.is_empty() { p.muted { "no budget decisions recorded" } }
        @else {
            table #budget-decisions { tr { th { "at" } th { "rule" } th { "decision" } th { "step" } th { "run" } }
                @for e in &d.decisions {
                    tr data-event=(e.event_type) {
                        td { (time(&e.created_at)) } td { (decision_rule(e)) }
                        td { (e.payload.get("message").and_then(|m| m.as_str()).unwrap_or(&e.event_type)) }
                        td { (e.step_key.as_deref().unwrap_or("")) }
                        td { a href=(ctx.link(&format!("/runs/{}", e.run_id))) { (e.run_id) } } }
                }
            }
        }
        p { a href=(ctx.link(&format!("/runs?tenant={}", crate::ui::filters::encode(c.tenant_id.as_str())))) { "runs of this tenant" }
            " - " a href=(ctx.link(&format!("/tasks?tenant={}", crate::ui::filters::encode(c.tenant_id.as_str())))) { "tasks" } }
        h2 { "Cost by day (USD)" }
        (charts::columns(&by_day, "USD"))
        h2 { "Cost by model" }
        (charts::bars(&by_model, "USD"))
        h2 { "Cost by category" }
        (charts::bars(&by_cat, "USD"))
    }
}
