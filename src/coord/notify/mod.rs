//! LISTEN/NOTIFY fan-out.
//!
//! One dedicated connection per instance (outside the pool) LISTENs on every pgcrew channel and
//! fans notifications out to any number of in-process subscribers (through the hub: one ring of
//! recent events, one waker per subscriber). NOTIFY is only a wake-up:
//! subscribers re-read state from the tables. When the LISTEN connection is lost the notifier
//! reconnects with backoff, LISTENs again and emits [`Event::Resync`] so subscribers re-read
//! everything they care about; a subscriber that falls behind also gets `Resync` instead of the
//! events it missed. In poll-only mode there is no connection and `Resync` is emitted on every
//! poll interval.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::ids::RunId;

mod event;
mod hub;
mod listener;

pub use event::{CHANNELS, Event, EventKind, WAKE_CHANNEL_PREFIX, wake_channel};
pub use listener::NotifierConfig;

struct Shared {
    hub: Arc<hub::Hub>,
    reconnects: AtomicU64,
    connected: watch::Sender<bool>,
    /// The live LISTEN connection, shared with the client's coordination work (heartbeats and
    /// leader renewals run on it, so they need no connection of their own).
    session: watch::Sender<Option<Arc<tokio_postgres::Client>>>,
}

impl Drop for Shared {
    /// The last handle that could publish is gone: subscribers end after the events left.
    fn drop(&mut self) {
        self.hub.close();
    }
}

/// The per-instance notification hub. Cheap to clone.
#[derive(Clone)]
pub struct Notifier {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("subscribers", &self.shared.hub.subscribers())
            .finish()
    }
}

/// Handle on the notifier's background task; stopping it ends the LISTEN connection.
#[derive(Debug)]
pub struct NotifierTask {
    shutdown: watch::Sender<bool>,
    handle: JoinHandle<()>,
}

impl NotifierTask {
    /// Stop listening and wait for the background task to end.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let _ = self.handle.await;
    }
}

impl Notifier {
    /// A hub with room for `capacity` buffered events per subscriber (a subscriber further
    /// behind gets [`Event::Resync`]). It delivers nothing until a listener is spawned with
    /// [`Notifier::spawn_listener`] or events are [published](Notifier::publish).
    pub fn new(capacity: usize) -> Notifier {
        let (connected, _) = watch::channel(false);
        let (session, _) = watch::channel(None);
        Notifier {
            shared: Arc::new(Shared {
                hub: Arc::new(hub::Hub::new(capacity.max(16))),
                reconnects: AtomicU64::new(0),
                connected,
                session,
            }),
        }
    }

    /// Start listening in the background: open the LISTEN connection (unless poll-only).
    /// Returns immediately; [`Notifier::wait_connected`] waits for the first LISTEN.
    pub fn spawn_listener(&self, config: NotifierConfig) -> NotifierTask {
        let (shutdown, shutdown_rx) = watch::channel(false);
        let handle = tokio::spawn(listener::run_listener(
            self.shared.clone(),
            config,
            shutdown_rx,
        ));
        NotifierTask { shutdown, handle }
    }

    /// Deliver an event to local subscribers (as if it had been notified).
    pub fn publish(&self, event: Event) {
        self.shared.hub.publish(event);
    }

    /// Subscribe to the given kinds (`Resync` is always delivered). An empty slice means all.
    pub fn subscribe(&self, kinds: &[EventKind]) -> Subscription {
        Subscription::new(self.shared.hub.subscribe(), kinds, None)
    }

    /// Subscribe to everything concerning one run (state changes and ledger events).
    pub fn subscribe_run(&self, run_id: RunId) -> Subscription {
        Subscription::new(
            self.shared.hub.subscribe(),
            &[EventKind::RunStateChanged, EventKind::RunEvent],
            Some(run_id),
        )
    }

    /// Call `callback` for every event of the given kinds until the returned handle is dropped.
    pub fn on<F>(&self, kinds: &[EventKind], mut callback: F) -> CallbackHandle
    where
        F: FnMut(Event) + Send + 'static,
    {
        let mut sub = self.subscribe(kinds);
        let handle = tokio::spawn(async move {
            while let Some(ev) = sub.next().await {
                callback(ev);
            }
        });
        CallbackHandle { handle }
    }

    /// The LISTEN connection while it is up (`None` while reconnecting or in poll-only mode).
    pub(crate) fn session(&self) -> watch::Receiver<Option<Arc<tokio_postgres::Client>>> {
        self.shared.session.subscribe()
    }

    /// Number of live subscribers.
    pub fn subscriber_count(&self) -> usize {
        self.shared.hub.subscribers()
    }

    /// How many times the LISTEN connection has been re-established.
    pub fn reconnects(&self) -> u64 {
        self.shared.reconnects.load(Ordering::Relaxed)
    }

    /// Whether the LISTEN connection is currently up.
    pub fn is_connected(&self) -> bool {
        *self.shared.connected.borrow()
    }

    /// Wait until the LISTEN connection is up (returns at once in poll-only mode after `timeout`).
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let mut rx = self.shared.connected.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|c| *c))
            .await
            .map(|r| r.is_ok())
            .unwrap_or(false)
    }
}

/// Unsubscribes its callback when dropped.
#[derive(Debug)]
pub struct CallbackHandle {
    handle: JoinHandle<()>,
}

impl Drop for CallbackHandle {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

/// A stream of events of the subscribed kinds. Dropping it unsubscribes.
///
/// Receiving costs no allocation and takes no lock another subscriber waits on (see the
/// hub's module docs); filtering is a bit set test.
pub struct Subscription {
    cursor: hub::Cursor,
    filter: Filter,
}

/// Which events a subscription passes.
#[derive(Clone, Copy)]
struct Filter {
    /// Bit `1 << kind as u16` per subscribed kind; all ones when every kind is wanted.
    kinds: u16,
    run: Option<RunId>,
}

impl Filter {
    fn new(kinds: &[EventKind], run: Option<RunId>) -> Filter {
        let kinds = if kinds.is_empty() {
            u16::MAX
        } else {
            kinds.iter().fold(0, |m, k| m | Self::bit(*k))
        };
        Filter { kinds, run }
    }

    fn bit(kind: EventKind) -> u16 {
        1 << (kind as u16)
    }

    /// `Resync` always passes.
    fn passes(&self, ev: &Event) -> bool {
        let kind = ev.kind();
        kind == EventKind::Resync
            || (self.kinds & Self::bit(kind) != 0
                && self.run.is_none_or(|r| ev.run_id() == Some(r)))
    }
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Subscription")
    }
}

impl Subscription {
    fn new(cursor: hub::Cursor, kinds: &[EventKind], run: Option<RunId>) -> Self {
        Subscription {
            cursor,
            filter: Filter::new(kinds, run),
        }
    }

    /// The next event; `None` when the notifier is gone.
    pub async fn recv(&mut self) -> Option<Event> {
        self.next().await
    }
}

impl Stream for Subscription {
    type Item = Event;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        loop {
            match std::task::ready!(self.cursor.poll_recv(cx)) {
                Some(ev) if self.filter.passes(&ev) => return Poll::Ready(Some(ev)),
                Some(_) => {}
                None => return Poll::Ready(None),
            }
        }
    }
}
