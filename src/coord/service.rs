//! Background services and what they are given: a [`Service`] runs between the client's
//! `start()` and `stop()` with a [`ServiceContext`] (database, configuration, instance id,
//! notifier), never the whole client, so modules below the client need not know it.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::watch;

use super::notify::{EventKind, Notifier, Subscription};
use crate::config::ClientConfig;
use crate::db::Db;
use crate::error::Result;
use crate::ids::InstanceId;

/// What a [`Service`] (and a task handler) may use of the instance running it. Cheap to
/// clone; clones share everything.
#[derive(Clone)]
pub struct ServiceContext {
    db: Db,
    config: Arc<ClientConfig>,
    notifier: Notifier,
}

impl std::fmt::Debug for ServiceContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceContext")
            .field("instance_id", &self.config.instance_id)
            .finish_non_exhaustive()
    }
}

impl ServiceContext {
    /// A context over these parts (the client builds one for its services).
    pub fn new(db: Db, config: Arc<ClientConfig>, notifier: Notifier) -> Self {
        ServiceContext {
            db,
            config,
            notifier,
        }
    }

    /// The database handle.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The instance's configuration.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// The instance's id.
    pub fn instance_id(&self) -> &InstanceId {
        &self.config.instance_id
    }

    /// The instance's notification hub.
    pub fn notifier(&self) -> &Notifier {
        &self.notifier
    }

    /// Subscribe to notifications of the given kinds (empty: all). See [`Notifier::subscribe`].
    pub fn subscribe(&self, kinds: &[EventKind]) -> Subscription {
        self.notifier.subscribe(kinds)
    }
}

/// A background service run by the client between `start()` and `stop()` (the worker pool,
/// run watchers, ...). `run` must return once `shutdown` turns `true`, after draining its work.
#[async_trait]
pub trait Service: Send + Sync {
    /// Short name for logs.
    fn name(&self) -> &'static str;
    /// Run until shutdown.
    async fn run(
        self: Arc<Self>,
        ctx: ServiceContext,
        shutdown: watch::Receiver<bool>,
    ) -> Result<()>;
    /// Pooled connections the service holds for as long as it runs (default 0). The client
    /// refuses to build ([`Error::Config`](crate::Error::Config)) unless its pool has these plus
    /// one to spare for everything else.
    fn held_connections(&self) -> usize {
        0
    }
}
