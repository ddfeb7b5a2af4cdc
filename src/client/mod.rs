//! The [`Client`]: one per instance, at the top of the crate (it may use every module; no
//! module imports it). `start()` registers the instance, starts the heartbeat, the leader
//! elector (and, while leader, maintenance), the notifier and any registered services; `stop()`
//! drains services, resigns, deregisters and waits for every background task.
//!
//! The client composes the default maintenance from each module's own steps
//! ([`default_maintenance_steps`]) and hands services a [`ServiceContext`], not itself.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::ClientConfig;
use crate::coord::instance::{self, InstanceInfo};
use crate::coord::leader::DEFAULT_LEASE;
use crate::coord::maintenance::{self, MaintenanceContext, MaintenanceReport, MaintenanceStep};
use crate::coord::notify::{EventKind, Notifier, NotifierConfig, NotifierTask, Subscription};
use crate::coord::session::Session;
use crate::db::Db;
use crate::error::{Error, Result};
use crate::ids::{InstanceId, TaskId};
use crate::queue::{self, Enqueued, NewTask};
use crate::runs::RunWatcher;

mod agents;
mod background;
mod builder;
mod submit;

pub use crate::coord::service::{Service, ServiceContext};
pub use crate::coord::source::DbSource;
pub use builder::ClientBuilder;
pub use submit::{submit_run, wait_for_run};

/// The maintenance every client runs while it is leader, in order: coordination's stale
/// instances, stuck runs, coordination's expired leases and old leader terms, then the queue's, the runs' and
/// tenancy's own steps (each module's `maintenance.rs`). [`ClientBuilder::maintenance_step`]
/// appends more.
pub fn default_maintenance_steps() -> Vec<Arc<dyn MaintenanceStep>> {
    let mut steps: Vec<Arc<dyn MaintenanceStep>> = vec![
        Arc::new(maintenance::StaleInstances),
        Arc::new(crate::runs::StuckRuns),
        Arc::new(maintenance::ExpiredLeaders),
        Arc::new(crate::coord::leader_history::LeaderHistoryRetention),
    ];
    steps.extend(queue::maintenance_steps());
    steps.extend(crate::runs::maintenance_steps());
    steps.extend(crate::tenancy::maintenance_steps());
    steps.push(Arc::new(crate::schedule::ScheduleFireRetention));
    steps
}

type ErrorCallback = Arc<dyn Fn(&Error) + Send + Sync>;
type TermCallback = Arc<dyn Fn(i64) + Send + Sync>;
type PlainCallback = Arc<dyn Fn() + Send + Sync>;

#[derive(Default, Clone)]
struct Callbacks {
    on_error: Option<ErrorCallback>,
    on_became_leader: Option<TermCallback>,
    on_lost_leadership: Option<PlainCallback>,
}

#[derive(Debug, Clone, Copy)]
struct LeaderState {
    term: i64,
    deadline: Instant,
}

struct Running {
    shutdown: watch::Sender<bool>,
    services_shutdown: watch::Sender<bool>,
    core_tasks: Vec<JoinHandle<()>>,
    service_tasks: Vec<JoinHandle<()>>,
    notifier_task: NotifierTask,
}

struct Inner {
    db: Db,
    /// The coordination connection (heartbeats, leader renewals).
    session: Session,
    config: Arc<ClientConfig>,
    notifier: Notifier,
    listen_config: crate::db::PgConfig,
    callbacks: Callbacks,
    steps: Vec<Arc<dyn MaintenanceStep>>,
    services: Vec<Arc<dyn Service>>,
    leader: Mutex<Option<LeaderState>>,
    /// When the instance's heartbeat was last refreshed (the statement's send time) and
    /// whether by the elector (whose attempts refresh it too): the heartbeat loop beats only
    /// when nothing else did for a heartbeat interval.
    last_beat: Mutex<Option<(Instant, bool)>>,
    running: tokio::sync::Mutex<Option<Running>>,
    is_running: AtomicBool,
}

/// A pgcrew instance. Cheap to clone; clones share everything.
///
/// Everything that only reads or enqueues works without [`Client::start`].
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("instance_id", &self.inner.config.instance_id)
            .field("running", &self.is_running())
            .field("leader", &self.is_leader())
            .finish()
    }
}

impl Client {
    /// A builder connecting to a DSN (`&str`/`String`) or using an existing [`Db`].
    pub fn builder(source: impl Into<DbSource>) -> ClientBuilder {
        ClientBuilder::new(source.into())
    }

    /// Shorthand for `Client::builder(source).config(config).build()`.
    pub async fn connect(source: impl Into<DbSource>, config: ClientConfig) -> Result<Client> {
        Client::builder(source).config(config).build().await
    }

    /// The database handle.
    pub fn db(&self) -> &Db {
        &self.inner.db
    }

    /// Enqueue one task on a pooled connection (its prepared statement is cached per
    /// connection). To enqueue inside your own transaction, use [`queue::enqueue`] with it.
    /// Works whether or not the client is started.
    pub async fn enqueue(&self, task: &NewTask) -> Result<Enqueued> {
        let conn = self.inner.db.get().await?;
        queue::enqueue(&conn, task).await
    }

    /// Enqueue many tasks in one statement on a pooled connection; see [`queue::enqueue_many`].
    pub async fn enqueue_many(&self, tasks: &[NewTask]) -> Result<Vec<TaskId>> {
        let conn = self.inner.db.get().await?;
        queue::enqueue_many(&conn, tasks).await
    }

    /// The configuration.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// This instance's id.
    pub fn instance_id(&self) -> &InstanceId {
        &self.inner.config.instance_id
    }

    /// What services get: database, configuration, instance id and notifier.
    pub fn context(&self) -> ServiceContext {
        ServiceContext::new(
            self.inner.db.clone(),
            self.inner.config.clone(),
            self.inner.notifier.clone(),
        )
    }

    /// A [`RunWatcher`] on this client's database and notifier, polling at the client's
    /// `notify_poll_interval` as a fallback.
    pub fn run_watcher(&self) -> RunWatcher {
        RunWatcher::for_context(&self.context())
    }

    /// The notification hub (events flow once `start()` has run).
    pub fn notifier(&self) -> &Notifier {
        &self.inner.notifier
    }

    /// Subscribe to notifications of the given kinds (empty: all). See [`Notifier::subscribe`].
    pub fn subscribe(&self, kinds: &[EventKind]) -> Subscription {
        self.inner.notifier.subscribe(kinds)
    }

    /// Whether `start()` has run and `stop()` has not.
    pub fn is_running(&self) -> bool {
        self.inner.is_running.load(Ordering::SeqCst)
    }

    /// Whether this instance holds the leader lease right now. Judged against a local deadline
    /// that is conservatively earlier than the lease's expiry in the database, so a leader that
    /// cannot renew stops acting before anyone else can be elected.
    pub fn is_leader(&self) -> bool {
        self.leader_term().is_some()
    }

    /// The fencing term while leader.
    pub fn leader_term(&self) -> Option<i64> {
        let guard = self.inner.leader.lock().ok()?;
        guard
            .filter(|l| Instant::now() < l.deadline)
            .map(|l| l.term)
    }

    fn report_error(&self, e: &Error) {
        warn!(instance = %self.instance_id(), error = %e, "background error");
        if let Some(cb) = &self.inner.callbacks.on_error {
            cb(e);
        }
    }

    fn instance_info(&self) -> InstanceInfo {
        let c = &self.inner.config;
        InstanceInfo {
            id: c.instance_id.clone(),
            hostname: instance::hostname(),
            pid: std::process::id() as i32,
            version: crate::VERSION.to_string(),
            metadata: c.metadata.clone(),
            agents: c.agents.clone(),
            tools: c.tools.clone(),
        }
    }

    /// Register the instance and start the background tasks. Errors if already running.
    pub async fn start(&self) -> Result<()> {
        let mut running = self.inner.running.lock().await;
        if running.is_some() {
            return Err(Error::Config("client is already running".into()));
        }
        instance::register(&self.inner.db, &self.instance_info()).await?;
        info!(instance = %self.instance_id(), "instance registered");
        let notifier_task = self.inner.notifier.spawn_listener(NotifierConfig {
            pg_config: self.inner.listen_config.clone(),
            poll_only: self.inner.config.poll_only,
            poll_interval: self.inner.config.notify_poll_interval,
            instance: Some(self.instance_id().clone()),
        });
        if !self.inner.config.poll_only {
            self.inner
                .notifier
                .wait_connected(Duration::from_secs(5))
                .await;
        }
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (services_shutdown, services_rx) = watch::channel(false);
        let mut core_tasks = vec![tokio::spawn(
            self.clone().heartbeat_loop(shutdown_rx.clone()),
        )];
        if self.inner.config.leader_election {
            // Subscribe before the first election so no leader change is missed.
            let sub = self.inner.notifier.subscribe(&[EventKind::LeaderChanged]);
            core_tasks.push(tokio::spawn(self.clone().elector_loop(sub, shutdown_rx)));
        }
        let mut service_tasks = Vec::new();
        for svc in &self.inner.services {
            let svc = svc.clone();
            let client = self.clone();
            let rx = services_rx.clone();
            service_tasks.push(tokio::spawn(async move {
                let name = svc.name();
                if let Err(e) = svc.run(client.context(), rx).await {
                    warn!(service = name, error = %e, "service ended with an error");
                    client.report_error(&e);
                }
            }));
        }
        *running = Some(Running {
            shutdown,
            services_shutdown,
            core_tasks,
            service_tasks,
            notifier_task,
        });
        self.inner.is_running.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Graceful stop: drain services, resign leadership (followers take over at once),
    /// deregister, and return once every background task has ended. Idempotent.
    pub async fn stop(&self) -> Result<()> {
        let mut running = self.inner.running.lock().await;
        let Some(r) = running.take() else {
            return Ok(());
        };
        let _ = r.services_shutdown.send(true);
        for t in r.service_tasks {
            let _ = t.await;
        }
        let _ = r.shutdown.send(true);
        for t in r.core_tasks {
            let _ = t.await;
        }
        let result = instance::deregister(&self.inner.db, self.instance_id()).await;
        r.notifier_task.stop().await;
        self.inner.session.close().await;
        self.inner.is_running.store(false, Ordering::SeqCst);
        info!(instance = %self.instance_id(), "instance stopped");
        result.map(|_| ())
    }

    /// Run one maintenance pass now (leader only).
    pub async fn run_maintenance(&self) -> Result<MaintenanceReport> {
        let term = self
            .leader_term()
            .ok_or_else(|| Error::NotRunning("this instance is not the leader".into()))?;
        maintenance::run_once(
            &self.inner.db,
            &self.inner.steps,
            &self.maintenance_ctx(term),
        )
        .await
    }

    fn maintenance_ctx(&self, term: i64) -> MaintenanceContext {
        MaintenanceContext {
            config: self.inner.config.clone(),
            instance_id: self.instance_id().clone(),
            lease: DEFAULT_LEASE.to_string(),
            term,
        }
    }
}

impl From<&Client> for ServiceContext {
    fn from(client: &Client) -> Self {
        client.context()
    }
}
