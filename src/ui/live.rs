//! `/events`: Server-Sent Events fed by the instance's own LISTEN connection. One hub task
//! subscribes to the in-process notifier, starts a new page-cache generation for every
//! notification (see `cache`) and passes it on to every browser (no database connection of
//! their own); each
//! notification becomes one small `change` event naming what changed (`kind`, and the run or
//! queue when there is one), and the page re-reads its data. A `resync` event (sent first on
//! every connection, and whenever the notifier reconnected or the browser fell behind) tells the
//! page to re-read everything; the browser's `EventSource` reconnects on its own.

use std::convert::Infallible;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::{Stream, StreamExt};
use serde_json::json;
use tokio::sync::broadcast;

use super::Shared;
use super::cache::PageCache;
use crate::client::Client;
use crate::coord::notify::Event;

/// Notifications buffered per browser (one further behind gets a resync).
const BUFFER: usize = 1024;

/// The hub: one subscription to the notifier, fanned out to the browsers.
#[derive(Default)]
pub(crate) struct Hub {
    tx: OnceLock<broadcast::Sender<Event>>,
}

impl Hub {
    /// Start the hub (once) when inside a Tokio runtime; returns its sender.
    pub(crate) fn start(
        &self,
        client: &Client,
        cache: &Arc<PageCache>,
    ) -> Option<&broadcast::Sender<Event>> {
        if let Some(tx) = self.tx.get() {
            return Some(tx);
        }
        let rt = tokio::runtime::Handle::try_current().ok()?;
        let tx = self.tx.get_or_init(|| {
            let (tx, _) = broadcast::channel(BUFFER);
            let mut sub = client.subscribe(&[]);
            let out = tx.clone();
            let cache = cache.clone();
            rt.spawn(async move {
                while let Some(ev) = sub.recv().await {
                    cache.invalidate();
                    let _ = out.send(ev);
                }
            });
            tx
        });
        Some(tx)
    }
}

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
    if let Event::TaskAvailable { queue, .. } = e {
        data["queue"] = json!(queue);
    }
    SseEvent::default().event("change").data(data.to_string())
}

/// The SSE stream.
pub(crate) async fn handler(
    State(state): State<Shared>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let rx = state
        .hub
        .start(&state.client, &state.cache)
        .map(|tx| tx.subscribe());
    let first = futures_util::stream::once(async { Ok(to_sse(&Event::Resync)) });
    let rest = futures_util::stream::unfold(rx, |rx| async move {
        let mut rx = rx?;
        let ev = match rx.recv().await {
            Ok(ev) => ev,
            Err(broadcast::error::RecvError::Lagged(_)) => Event::Resync,
            Err(broadcast::error::RecvError::Closed) => return None,
        };
        Some((Ok(to_sse(&ev)), Some(rx)))
    });
    Sse::new(first.chain(rest)).keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
}
