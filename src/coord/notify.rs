//! LISTEN/NOTIFY fan-out.
//!
//! One dedicated connection per instance (outside the pool) LISTENs on every pgcrew channel and
//! fans notifications out to any number of in-process subscribers. NOTIFY is only a wake-up:
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
use serde::Deserialize;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::ids::{RunId, TaskId};

/// Every NOTIFY channel pgcrew uses.
pub const CHANNELS: &[&str] = &[
    "pgcrew_run_state_changed",
    "pgcrew_instance_registered",
    "pgcrew_instance_deregistered",
    "pgcrew_leader_changed",
    "pgcrew_task_available",
    "pgcrew_run_event",
    "pgcrew_budget_status_changed",
    "pgcrew_task_cancel_requested",
];

/// The kind of an [`Event`], used to filter subscriptions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EventKind {
    /// `pgcrew_run_state_changed`.
    RunStateChanged,
    /// `pgcrew_instance_registered`.
    InstanceRegistered,
    /// `pgcrew_instance_deregistered`.
    InstanceDeregistered,
    /// `pgcrew_leader_changed`.
    LeaderChanged,
    /// `pgcrew_task_available`.
    TaskAvailable,
    /// `pgcrew_run_event`.
    RunEvent,
    /// `pgcrew_budget_status_changed`.
    BudgetStatusChanged,
    /// `pgcrew_task_cancel_requested`.
    TaskCancelRequested,
    /// The notifier (re)connected or the subscriber fell behind: re-read state.
    Resync,
}

/// A notification, decoded from its channel's JSON payload.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// A run was created or changed state. The payload carries the run id only (any role can
    /// LISTEN on any channel, so tenant ids and states stay out of payloads): re-read the run
    /// (e.g. [`crate::runs::get_run`]) for its tenant and state.
    RunStateChanged {
        /// The run.
        run_id: RunId,
    },
    /// An instance registered.
    InstanceRegistered {
        /// The instance.
        instance_id: String,
    },
    /// An instance deregistered or was removed by maintenance.
    InstanceDeregistered {
        /// The instance.
        instance_id: String,
    },
    /// The leader of `name` changed (`leader_id` is `None` when the lease was released).
    LeaderChanged {
        /// The lease name.
        name: String,
        /// The new holder, if any.
        leader_id: Option<String>,
        /// The fencing term.
        term: i64,
    },
    /// Tasks became available on a queue.
    TaskAvailable {
        /// The queue.
        queue: String,
    },
    /// A run's ledger got a new event.
    RunEvent {
        /// The run.
        run_id: RunId,
        /// The event's sequence number.
        seq: i64,
    },
    /// Some tenant's budget status changed. The payload names no tenant (any role can LISTEN
    /// on any channel): re-read `pgcrew.budget_status` (e.g. [`crate::tenancy::budget_status`]).
    BudgetStatusChanged,
    /// Cancellation of a running task was requested (`pgcrew.cancel_task`); the claiming
    /// instance's worker pool re-reads its tasks' cancellation flags at once.
    TaskCancelRequested {
        /// The task.
        task_id: TaskId,
        /// The instance that claimed it (`None` if the row had no claimant).
        instance_id: Option<String>,
    },
    /// Notifications may have been missed: re-read state.
    Resync,
}

impl Event {
    /// This event's kind.
    pub fn kind(&self) -> EventKind {
        match self {
            Event::RunStateChanged { .. } => EventKind::RunStateChanged,
            Event::InstanceRegistered { .. } => EventKind::InstanceRegistered,
            Event::InstanceDeregistered { .. } => EventKind::InstanceDeregistered,
            Event::LeaderChanged { .. } => EventKind::LeaderChanged,
            Event::TaskAvailable { .. } => EventKind::TaskAvailable,
            Event::RunEvent { .. } => EventKind::RunEvent,
            Event::BudgetStatusChanged => EventKind::BudgetStatusChanged,
            Event::TaskCancelRequested { .. } => EventKind::TaskCancelRequested,
            Event::Resync => EventKind::Resync,
        }
    }

    /// The run this event concerns, if any.
    pub fn run_id(&self) -> Option<RunId> {
        match self {
            Event::RunStateChanged { run_id, .. } | Event::RunEvent { run_id, .. } => Some(*run_id),
            _ => None,
        }
    }

    /// Decode a notification. Unknown channels and malformed payloads give `None` (and are
    /// logged by the notifier): a payload is never trusted beyond being a wake-up.
    pub fn parse(channel: &str, payload: &str) -> Option<Event> {
        #[derive(Deserialize)]
        struct RunState {
            run_id: RunId,
        }
        #[derive(Deserialize)]
        struct Instance {
            instance_id: String,
        }
        #[derive(Deserialize)]
        struct Leader {
            name: String,
            leader_id: Option<String>,
            term: i64,
        }
        #[derive(Deserialize)]
        struct Task {
            queue: String,
        }
        #[derive(Deserialize)]
        struct RunEv {
            run_id: RunId,
            seq: i64,
        }
        #[derive(Deserialize)]
        struct Cancel {
            task_id: i64,
            instance_id: Option<String>,
        }
        let ev = match channel {
            "pgcrew_run_state_changed" => {
                let p: RunState = serde_json::from_str(payload).ok()?;
                Event::RunStateChanged { run_id: p.run_id }
            }
            "pgcrew_instance_registered" => Event::InstanceRegistered {
                instance_id: serde_json::from_str::<Instance>(payload).ok()?.instance_id,
            },
            "pgcrew_instance_deregistered" => Event::InstanceDeregistered {
                instance_id: serde_json::from_str::<Instance>(payload).ok()?.instance_id,
            },
            "pgcrew_leader_changed" => {
                let p: Leader = serde_json::from_str(payload).ok()?;
                Event::LeaderChanged {
                    name: p.name,
                    leader_id: p.leader_id,
                    term: p.term,
                }
            }
            "pgcrew_task_available" => Event::TaskAvailable {
                queue: serde_json::from_str::<Task>(payload).ok()?.queue,
            },
            "pgcrew_run_event" => {
                let p: RunEv = serde_json::from_str(payload).ok()?;
                Event::RunEvent {
                    run_id: p.run_id,
                    seq: p.seq,
                }
            }
            "pgcrew_budget_status_changed" => Event::BudgetStatusChanged,
            "pgcrew_task_cancel_requested" => {
                let p: Cancel = serde_json::from_str(payload).ok()?;
                Event::TaskCancelRequested {
                    task_id: TaskId(p.task_id),
                    instance_id: p.instance_id,
                }
            }
            _ => return None,
        };
        Some(ev)
    }
}

/// Notifier settings.
#[derive(Debug, Clone)]
pub struct NotifierConfig {
    /// Where to LISTEN.
    pub pg_config: crate::db::PgConfig,
    /// No LISTEN connection: emit `Resync` every `poll_interval` instead.
    pub poll_only: bool,
    /// Fallback poll interval (a `Resync` tick in poll-only mode).
    pub poll_interval: Duration,
}

struct Shared {
    tx: broadcast::Sender<Event>,
    reconnects: AtomicU64,
    connected: watch::Sender<bool>,
    /// The live LISTEN connection, shared with the client's coordination work (heartbeats and
    /// leader renewals run on it, so they need no connection of their own).
    session: watch::Sender<Option<Arc<tokio_postgres::Client>>>,
}

/// The per-instance notification hub. Cheap to clone.
#[derive(Clone)]
pub struct Notifier {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("subscribers", &self.shared.tx.receiver_count())
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
        let (tx, _) = broadcast::channel(capacity.max(16));
        let (connected, _) = watch::channel(false);
        let (session, _) = watch::channel(None);
        Notifier {
            shared: Arc::new(Shared {
                tx,
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
        let handle = tokio::spawn(run_listener(self.shared.clone(), config, shutdown_rx));
        NotifierTask { shutdown, handle }
    }

    /// Deliver an event to local subscribers (as if it had been notified).
    pub fn publish(&self, event: Event) {
        let _ = self.shared.tx.send(event);
    }

    /// Subscribe to the given kinds (`Resync` is always delivered). An empty slice means all.
    pub fn subscribe(&self, kinds: &[EventKind]) -> Subscription {
        Subscription::new(self.shared.tx.subscribe(), kinds.to_vec(), None)
    }

    /// Subscribe to everything concerning one run (state changes and ledger events).
    pub fn subscribe_run(&self, run_id: RunId) -> Subscription {
        Subscription::new(
            self.shared.tx.subscribe(),
            vec![EventKind::RunStateChanged, EventKind::RunEvent],
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
        self.shared.tx.receiver_count()
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
pub struct Subscription {
    inner: Pin<Box<dyn Stream<Item = Event> + Send>>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Subscription")
    }
}

impl Subscription {
    fn new(rx: broadcast::Receiver<Event>, kinds: Vec<EventKind>, run: Option<RunId>) -> Self {
        let stream = futures_util::stream::unfold(rx, move |mut rx| {
            let kinds = kinds.clone();
            async move {
                loop {
                    match rx.recv().await {
                        Ok(ev) => {
                            let kind = ev.kind();
                            if kind == EventKind::Resync {
                                return Some((ev, rx));
                            }
                            if !kinds.is_empty() && !kinds.contains(&kind) {
                                continue;
                            }
                            if let Some(r) = run
                                && ev.run_id() != Some(r)
                            {
                                continue;
                            }
                            return Some((ev, rx));
                        }
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            debug!(missed = n, "subscriber lagged; resync");
                            return Some((Event::Resync, rx));
                        }
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            }
        });
        Subscription {
            inner: Box::pin(stream),
        }
    }

    /// The next event; `None` when the notifier is gone.
    pub async fn recv(&mut self) -> Option<Event> {
        self.inner.next().await
    }
}

impl Stream for Subscription {
    type Item = Event;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.inner.as_mut().poll_next(cx)
    }
}

async fn run_listener(
    shared: Arc<Shared>,
    config: NotifierConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    if config.poll_only {
        let mut tick = tokio::time::interval(config.poll_interval);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => { let _ = shared.tx.send(Event::Resync); }
                _ = shutdown.changed() => return,
            }
        }
    }
    let mut backoff = Duration::from_millis(100);
    let mut first = true;
    loop {
        if *shutdown.borrow() {
            return;
        }
        match listen_once(&shared, &config, &mut shutdown, first).await {
            ListenEnd::Shutdown => return,
            ListenEnd::Lost { was_up } => {
                let _ = shared.connected.send(false);
                if was_up {
                    backoff = Duration::from_millis(100);
                    first = false;
                }
                let jitter =
                    Duration::from_millis(fastrand::u64(0..=backoff.as_millis() as u64 / 4));
                tokio::select! {
                    _ = tokio::time::sleep(backoff + jitter) => {}
                    _ = shutdown.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

enum ListenEnd {
    Shutdown,
    Lost { was_up: bool },
}

async fn listen_once(
    shared: &Shared,
    config: &NotifierConfig,
    shutdown: &mut watch::Receiver<bool>,
    first: bool,
) -> ListenEnd {
    // The connection's driver task parses and broadcasts each notification itself: one task
    // hop from the socket to the subscribers.
    let tx = shared.tx.clone();
    let (client, mut driver) =
        match crate::db::connect_with_handler(&config.pg_config, move |msg| {
            if let tokio_postgres::AsyncMessage::Notification(n) = msg {
                match Event::parse(n.channel(), n.payload()) {
                    Some(ev) => {
                        let _ = tx.send(ev);
                    }
                    None => debug!(
                        channel = n.channel(),
                        payload = n.payload(),
                        "ignoring malformed notification"
                    ),
                }
            }
        })
        .await
        {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "notifier: cannot connect the LISTEN connection; retrying");
                return ListenEnd::Lost { was_up: false };
            }
        };
    if let Err(e) = client.batch_execute(sql!("coord/listen")).await {
        warn!(error = %e, "notifier: LISTEN failed; retrying");
        driver.abort();
        return ListenEnd::Lost { was_up: false };
    }
    let client = Arc::new(client);
    let _ = shared.session.send(Some(client.clone()));
    let _ = shared.connected.send(true);
    if first {
        info!("notifier: listening on {} channels", CHANNELS.len());
    } else {
        shared.reconnects.fetch_add(1, Ordering::Relaxed);
        info!("notifier: reconnected; emitting resync");
    }
    // After any (re)connect, state may have changed unseen.
    let _ = shared.tx.send(Event::Resync);
    let mut ping = tokio::time::interval(config.poll_interval);
    ping.tick().await;
    loop {
        tokio::select! {
            _ = &mut driver => {
                let _ = shared.session.send(None);
                warn!("notifier: LISTEN connection lost; reconnecting");
                return ListenEnd::Lost { was_up: true };
            }
            _ = ping.tick() => {
                // Detect half-open connections that would otherwise never report an error.
                if tokio::time::timeout(config.poll_interval, client.simple_query(sql!("db/ping"))).await.map(|r| r.is_err()).unwrap_or(true) {
                    let _ = shared.session.send(None);
                    warn!("notifier: LISTEN connection unresponsive; reconnecting");
                    driver.abort();
                    return ListenEnd::Lost { was_up: true };
                }
            }
            _ = shutdown.changed() => {
                let _ = shared.session.send(None);
                drop(client);
                let _ = driver.await;
                return ListenEnd::Shutdown;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_channel_payloads() {
        let id = RunId::new();
        let ev = Event::parse(
            "pgcrew_run_state_changed",
            &format!(r#"{{"run_id":"{id}"}}"#),
        );
        assert_eq!(ev, Some(Event::RunStateChanged { run_id: id }));
        // Payloads of instances from before V010 carried more fields: still a wake-up.
        let old = format!(r#"{{"run_id":"{id}","tenant_id":"t","from":null,"to":"pending"}}"#);
        assert_eq!(
            Event::parse("pgcrew_run_state_changed", &old),
            Some(Event::RunStateChanged { run_id: id })
        );
        assert_eq!(
            Event::parse("pgcrew_budget_status_changed", "{}"),
            Some(Event::BudgetStatusChanged)
        );
        assert_eq!(
            Event::parse(
                "pgcrew_leader_changed",
                r#"{"name":"default","leader_id":null,"term":3}"#
            ),
            Some(Event::LeaderChanged {
                name: "default".into(),
                leader_id: None,
                term: 3
            })
        );
        assert_eq!(
            Event::parse(
                "pgcrew_task_cancel_requested",
                r#"{"task_id":42,"instance_id":"w1"}"#
            ),
            Some(Event::TaskCancelRequested {
                task_id: TaskId(42),
                instance_id: Some("w1".into())
            })
        );
        assert_eq!(
            Event::parse("pgcrew_task_cancel_requested", r#"{"task_id":"x"}"#),
            None
        );
        assert_eq!(Event::parse("pgcrew_task_available", "not json"), None);
        assert_eq!(Event::parse("other", "{}"), None);
    }
}
