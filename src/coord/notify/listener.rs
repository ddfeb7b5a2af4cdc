//! The LISTEN connection: connect, LISTEN on every channel, broadcast what arrives, detect a
//! lost or half-open connection, reconnect with backoff and emit `Resync`; or, poll-only, emit
//! `Resync` on every poll interval.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{CHANNELS, Event, Shared};

/// Notifier settings.
#[derive(Debug, Clone)]
pub struct NotifierConfig {
    /// Where to LISTEN.
    pub pg_config: crate::db::PgConfig,
    /// No LISTEN connection: emit `Resync` every `poll_interval` instead.
    pub poll_only: bool,
    /// Fallback poll interval (a `Resync` tick in poll-only mode).
    pub poll_interval: Duration,
    /// The instance whose pools enqueues wake by name: its [`wake_channel`] is LISTENed too.
    /// `None` for a notifier hosting no worker pool.
    ///
    /// [`wake_channel`]: super::wake_channel
    pub instance: Option<crate::ids::InstanceId>,
}

pub(super) async fn run_listener(
    shared: Arc<Shared>,
    config: NotifierConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    if config.poll_only {
        let mut tick = tokio::time::interval(config.poll_interval);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    crate::telemetry::global().notifier_resyncs.inc();
                    shared.hub.publish(Event::Resync);
                }
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
    // The connection's driver task parses each notification and publishes it into the hub
    // itself: one task hop from the socket to the subscribers.
    let hub = shared.hub.clone();
    let (client, mut driver) =
        match crate::db::connect_with_handler(&config.pg_config, move |msg| {
            if let tokio_postgres::AsyncMessage::Notification(n) = msg {
                match Event::parse(n.channel(), n.payload()) {
                    Some(ev) => hub.publish(ev),
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
    // The wake channel is `pgcrew_wake_` and 32 hex digits (see `wake_channel`): nothing to
    // quote, and LISTEN takes no parameter.
    let listen = match &config.instance {
        Some(i) => format!(
            "{}\nLISTEN {};",
            sql!("coord/listen"),
            super::wake_channel(i)
        ),
        None => sql!("coord/listen").to_string(),
    };
    if let Err(e) = client.batch_execute(&listen).await {
        warn!(error = %e, "notifier: LISTEN failed; retrying");
        driver.abort();
        return ListenEnd::Lost { was_up: false };
    }
    let client = Arc::new(client);
    let _ = shared.session.send(Some(client.clone()));
    let _ = shared.connected.send(true);
    if first {
        let own = usize::from(config.instance.is_some());
        info!("notifier: listening on {} channels", CHANNELS.len() + own);
    } else {
        shared.reconnects.fetch_add(1, Ordering::Relaxed);
        crate::telemetry::global().notifier_reconnects.inc();
        info!("notifier: reconnected; emitting resync");
    }
    // After any (re)connect, state may have changed unseen.
    crate::telemetry::global().notifier_resyncs.inc();
    shared.hub.publish(Event::Resync);
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
