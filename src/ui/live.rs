//! `/events`: Server-Sent Events fed by the instance's own LISTEN connection. Every browser
//! subscribes to the in-process notifier (no database connection of its own); each
//! notification becomes one small `change` event naming what changed (`kind`, and the run or
//! queue when there is one), and the page re-reads its data. A `resync` event (sent first on
//! every connection, and whenever the notifier reconnected or the browser fell behind) tells the
//! page to re-read everything; the browser's `EventSource` reconnects on its own.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::{Stream, StreamExt};
use serde_json::json;

use super::Shared;
use crate::coord::notify::Event;

/// How often an idle stream sends a comment, so proxies keep it open and a dead peer is seen.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

fn kind_name(e: &Event) -> &'static str {
    use crate::coord::notify::EventKind as K;
    match e.kind() {
        K::RunStateChanged => "run_state_changed",
        K::InstanceRegistered => "instance_registered",
        K::InstanceDeregistered => "instance_deregistered",
        K::LeaderChanged => "leader_changed",
        K::TaskAvailable => "task_available",
        K::RunEvent => "run_event",
        K::BudgetStatusChanged => "budget_status_changed",
        K::TaskCancelRequested => "task_cancel_requested",
        _ => "other",
    }
}

fn to_sse(e: &Event) -> SseEvent {
    if matches!(e, Event::Resync) {
        return SseEvent::default().event("resync").data("{}");
    }
    let mut data = json!({ "kind": kind_name(e) });
    if let Some(r) = e.run_id() {
        data["run_id"] = json!(r.to_string());
    }
    if let Event::TaskAvailable { queue } = e {
        data["queue"] = json!(queue);
    }
    SseEvent::default().event("change").data(data.to_string())
}

/// The SSE stream.
pub(crate) async fn handler(
    State(state): State<Shared>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let sub = state.client.subscribe(&[]);
    let first = futures_util::stream::once(async { Ok(to_sse(&Event::Resync)) });
    let rest = sub.map(|e| Ok(to_sse(&e)));
    Sse::new(first.chain(rest)).keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
}
