//! Clients for tests: a fast configuration, a started client, and waiting for events.

use std::sync::Arc;
use std::time::Duration;

use super::eventually;
use pgcrew::coord::client::DbSource;
use pgcrew::queue::WorkerPool;
use pgcrew::{Client, ClientConfig, ClientConfigBuilder, Event, InstanceId, RunId, Subscription};

/// A configuration for instance `id` with timings short enough for tests: heartbeats and
/// maintenance every 200 ms, a 2 s instance TTL, a 1 s leader lease and a 1 s fallback poll.
/// Callers override what their test needs and call `build()`.
pub fn fast_config(id: &str) -> ClientConfigBuilder {
    ClientConfig::builder()
        .instance_id(InstanceId::new(id).unwrap())
        .heartbeat_interval(Duration::from_millis(200))
        .instance_ttl(Duration::from_secs(2))
        .leader_ttl(Duration::from_secs(1))
        .maintenance_interval(Duration::from_millis(200))
        .notify_poll_interval(Duration::from_secs(1))
}

/// A client on `source` with `config` (and the worker pool, if any), built and started.
pub async fn start_client(
    source: impl Into<DbSource>,
    config: ClientConfig,
    pool: Option<Arc<WorkerPool>>,
) -> Client {
    let mut b = Client::builder(source).config(config);
    if let Some(p) = pool {
        b = b.service(p);
    }
    let c = b.build().await.unwrap();
    c.start().await.unwrap();
    c
}

/// Wait until `client` is the leader; panics (naming the instance and the caller) if it is
/// not within `timeout`.
#[track_caller]
pub fn wait_leader(client: &Client, timeout: Duration) -> impl Future<Output = ()> + '_ {
    let caller = std::panic::Location::caller();
    async move {
        assert!(
            eventually(timeout, || async { client.is_leader() }).await,
            "not within {timeout:?}: instance {} becomes leader (waited at {caller})",
            client.instance_id()
        );
    }
}

/// Wait until the notifier of `client` has its LISTEN connection; panics (naming the instance
/// and the caller) if it has not within `timeout`.
#[track_caller]
pub fn wait_listening(client: &Client, timeout: Duration) -> impl Future<Output = ()> + '_ {
    let caller = std::panic::Location::caller();
    async move {
        assert!(
            client.notifier().wait_connected(timeout).await,
            "not within {timeout:?}: the notifier of instance {} connects (waited at {caller})",
            client.instance_id()
        );
    }
}

/// Start `client` and wait (as [`wait_leader`]) until it is the leader.
#[track_caller]
pub fn start_leader(client: &Client, timeout: Duration) -> impl Future<Output = ()> + '_ {
    let leads = wait_leader(client, timeout);
    async move {
        client.start().await.unwrap();
        leads.await;
    }
}

/// The run of the next `RunStateChanged` event on `sub` (other events are skipped); each
/// receive waits at most `timeout`, and running out of it panics with `what`.
pub async fn next_run_state_change(sub: &mut Subscription, timeout: Duration, what: &str) -> RunId {
    loop {
        let ev = tokio::time::timeout(timeout, sub.recv())
            .await
            .unwrap_or_else(|_| panic!("{what}"))
            .expect("notifier alive");
        if let Event::RunStateChanged { run_id, .. } = ev {
            return run_id;
        }
    }
}
