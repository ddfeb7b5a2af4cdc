//! `/instances`: every live instance, the leader, and stale instances.

use axum::extract::State;
use axum::response::Response;
use maud::html;

use super::age;
use crate::ui::Shared;
use crate::ui::data;
use crate::ui::respond::Ctx;

/// `GET /instances` and `/api/instances`.
pub(crate) async fn handler(State(s): State<Shared>, ctx: Ctx) -> Response {
    let d = s
        .cache
        .get(&ctx.key, || data::instances(s.client.db()))
        .await;
    ctx.respond(d, |d| {
        let body = html! {
            (super::overview::leaders(&ctx, d.now, &d.leaders))
            h2 { "Instances (" (d.instances.len()) ")" }
            (super::overview::instance_table(d.now, &d.instances))
            h2 { "Stale instances" }
            @if d.stale_instances.is_empty() { p.muted { "none" } }
            @for s in &d.stale_instances {
                p.bad { (s.id) " on " (s.hostname) ", silent " (age(s.silent_s)) }
            }
        };
        super::layout::page(&ctx, "Instances", "all", body)
    })
}
