//! The [`Client`]: one per instance. `start()` registers the instance, starts the heartbeat,
//! the leader elector (and, while leader, maintenance), the notifier and any registered
//! services; `stop()` drains services, resigns, deregisters and waits for every background task.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, warn};

use super::instance::{self, InstanceInfo};
use super::leader::{self, DEFAULT_LEASE, Election};
use super::maintenance::{
    self, MaintenanceContext, MaintenanceReport, MaintenanceStep, sleep_or_shutdown,
};
use super::notify::{Event, EventKind, Notifier, NotifierConfig, NotifierTask, Subscription};
use super::session::Session;
use crate::config::{COORDINATION_CONNECTIONS, ClientConfig};
use crate::db::Db;
use crate::error::{Error, Result};
use crate::ids::{InstanceId, TaskId};
use crate::queue::{self, Enqueued, NewTask};

/// Where the client gets its connections: a DSN, an existing deadpool pool, or a [`Db`].
///
/// Its `Debug` output shows a DSN with its password redacted.
#[derive(Clone)]
pub enum DbSource {
    /// Connect a new pool to this DSN.
    Dsn(String),
    /// Use this handle (and its pool).
    Db(Box<Db>),
}

impl std::fmt::Debug for DbSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DbSource::Dsn(dsn) => f
                .debug_tuple("Dsn")
                .field(&crate::db::redact_dsn(dsn))
                .finish(),
            DbSource::Db(db) => f.debug_tuple("Db").field(db).finish(),
        }
    }
}

impl From<&str> for DbSource {
    fn from(s: &str) -> Self {
        DbSource::Dsn(s.to_string())
    }
}
impl From<String> for DbSource {
    fn from(s: String) -> Self {
        DbSource::Dsn(s)
    }
}
impl From<&String> for DbSource {
    fn from(s: &String) -> Self {
        DbSource::Dsn(s.clone())
    }
}
impl From<Db> for DbSource {
    fn from(db: Db) -> Self {
        DbSource::Db(Box::new(db))
    }
}

/// A background service run by the client between `start()` and `stop()` (the worker pool,
/// run watchers, ...). `run` must return once `shutdown` turns `true`, after draining its work.
#[async_trait]
pub trait Service: Send + Sync {
    /// Short name for logs.
    fn name(&self) -> &'static str;
    /// Run until shutdown.
    async fn run(self: Arc<Self>, client: Client, shutdown: watch::Receiver<bool>) -> Result<()>;
    /// Pooled connections the service holds for as long as it runs (default 0). The client
    /// refuses to build ([`Error::Config`]) unless its pool has these plus one to spare for
    /// everything else.
    fn held_connections(&self) -> usize {
        0
    }
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

/// Builder for [`Client`]; see [`Client::builder`].
pub struct ClientBuilder {
    source: DbSource,
    config: ClientConfig,
    callbacks: Callbacks,
    steps: Vec<Arc<dyn MaintenanceStep>>,
    services: Vec<Arc<dyn Service>>,
}

impl std::fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ClientBuilder {
    /// Use this configuration (default: [`ClientConfig::default`]).
    pub fn config(mut self, config: ClientConfig) -> Self {
        self.config = config;
        self
    }

    /// Called with every error of a background task (heartbeat, election, maintenance, services).
    pub fn on_error(mut self, f: impl Fn(&Error) + Send + Sync + 'static) -> Self {
        self.callbacks.on_error = Some(Arc::new(f));
        self
    }

    /// Called with the fencing term when this instance becomes leader.
    pub fn on_became_leader(mut self, f: impl Fn(i64) + Send + Sync + 'static) -> Self {
        self.callbacks.on_became_leader = Some(Arc::new(f));
        self
    }

    /// Called when this instance stops being leader (lease lost, not renewed in time, or resigned).
    pub fn on_lost_leadership(mut self, f: impl Fn() + Send + Sync + 'static) -> Self {
        self.callbacks.on_lost_leadership = Some(Arc::new(f));
        self
    }

    /// Add a maintenance step run by the leader after the built-in ones.
    pub fn maintenance_step(mut self, step: Arc<dyn MaintenanceStep>) -> Self {
        self.steps.push(step);
        self
    }

    /// Add a background service started by `start()` and drained by `stop()`.
    pub fn service(mut self, service: Arc<dyn Service>) -> Self {
        self.services.push(service);
        self
    }

    /// Connect (and migrate when configured, otherwise check the schema version).
    pub async fn build(mut self) -> Result<Client> {
        self.config.validate()?;
        if self.config.ledger_key.is_none() {
            self.config.ledger_key = crate::ledger_key::LedgerKey::from_env()?;
        }
        let db = match self.source {
            DbSource::Dsn(dsn) => {
                Db::connect_with(
                    &dsn,
                    crate::db::PoolOptions {
                        size: self.config.pool_connections(),
                        connect_timeout: self.config.connect_timeout,
                        wait_timeout: self.config.pool_wait_timeout,
                        statements: self.config.statements,
                    },
                )
                .await?
            }
            DbSource::Db(db) => *db,
        };
        // Appends and transitions through the client's handle sign ledger checkpoints.
        let db = match &self.config.ledger_key {
            Some(key) => db
                .with_ledger_key(key.clone())
                .with_checkpoint_interval(self.config.checkpoint_interval),
            None => db,
        };
        let db = db.with_run_limits(self.config.run_limits)?;
        if self.config.migrate {
            match (&self.config.listen_dsn, db.statements()) {
                // Behind a transaction pooler: migrate over the direct (LISTEN) connection.
                (Some(direct), crate::db::StatementMode::Unnamed) => {
                    db.migrate_direct(direct).await?;
                }
                _ => {
                    db.migrate().await?;
                }
            }
        } else {
            db.check_schema().await?;
        }
        check_budget(&self.config, &db, &self.services)?;
        if db.statements() == crate::db::StatementMode::Unnamed
            && self.config.listen_dsn.is_none()
            && !self.config.poll_only
        {
            // Behind a transaction pooler LISTEN does not stay on one server connection:
            // notifications would be missed and everything would wait for the fallback poll.
            tracing::warn!(
                "unnamed statements (a transaction pooler?) without listen_dsn: LISTEN goes through the \
                 main DSN; point listen_dsn at PostgreSQL directly"
            );
        }
        let mut listen_config = match &self.config.listen_dsn {
            Some(dsn) => crate::db::parse_dsn(dsn)?,
            None => db.config().clone(),
        };
        // The coordination connection is told apart from the pooled ones (same name plus
        // ` coordination`), for `pg_stat_activity` and `pg_terminate_backend`.
        let app = format!(
            "{} coordination",
            listen_config.get_application_name().unwrap_or("pgcrew")
        );
        listen_config.application_name(&app);
        if listen_config.get_connect_timeout().is_none() {
            listen_config.connect_timeout(self.config.connect_timeout);
        }
        // Heartbeats and leader renewals run on one connection outside the pool (the LISTEN
        // connection, or in poll-only mode a dedicated one), so that application work
        // exhausting the pool can never cost this instance its leadership or liveness.
        let notifier = Notifier::new(4096);
        let session = if self.config.poll_only {
            Session::dedicated(listen_config.clone(), db.clone(), &self.config)
        } else {
            Session::on_listen(notifier.session(), db.clone(), &self.config)
        };
        Ok(Client {
            inner: Arc::new(Inner {
                db,
                session,
                config: Arc::new(self.config),
                notifier,
                listen_config,
                callbacks: self.callbacks,
                steps: self.steps,
                services: self.services,
                leader: Mutex::new(None),
                running: tokio::sync::Mutex::new(None),
                is_running: AtomicBool::new(false),
            }),
        })
    }
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
        ClientBuilder {
            source: source.into(),
            config: ClientConfig::default(),
            callbacks: Callbacks::default(),
            steps: maintenance::default_steps(),
            services: Vec::new(),
        }
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
                if let Err(e) = svc.run(client.clone(), rx).await {
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

    async fn heartbeat_loop(self, mut shutdown: watch::Receiver<bool>) {
        let interval = self.inner.config.heartbeat_interval;
        while !sleep_or_shutdown(interval, &mut shutdown).await {
            let beat = async {
                let conn = self.inner.session.get().await?;
                instance::heartbeat_on(&conn, self.instance_id()).await
            };
            match beat.await {
                Ok(true) => {}
                Ok(false) => {
                    warn!(instance = %self.instance_id(), "instance row was removed; re-registering");
                    if let Err(e) = instance::register(&self.inner.db, &self.instance_info()).await
                    {
                        self.report_error(&e);
                    }
                }
                Err(e) => self.report_error(&e),
            }
        }
    }

    fn set_leader(&self, state: Option<LeaderState>) -> Option<LeaderState> {
        match self.inner.leader.lock() {
            Ok(mut g) => std::mem::replace(&mut *g, state),
            Err(poisoned) => std::mem::replace(&mut *poisoned.into_inner(), state),
        }
    }

    fn lose_leadership(&self, maintenance: &mut Option<JoinHandle<()>>) {
        if let Some(h) = maintenance.take() {
            h.abort();
        }
        if let Some(prev) = self.set_leader(None) {
            info!(instance = %self.instance_id(), term = prev.term, "lost leadership");
            if let Some(cb) = &self.inner.callbacks.on_lost_leadership {
                cb();
            }
        }
    }

    async fn elector_loop(self, mut sub: Subscription, mut shutdown: watch::Receiver<bool>) {
        let ttl = self.inner.config.leader_ttl;
        let renew = self.inner.config.leader_renew_interval();
        // Stop acting a tenth of the TTL before the database's expiry (which is itself later
        // than `sent + ttl`), to absorb clock-rate differences between hosts.
        let margin = ttl / 10;
        let mut maintenance: Option<JoinHandle<()>> = None;
        let me = self.instance_id().clone();
        loop {
            if *shutdown.borrow() {
                break;
            }
            let current = self.inner.leader.lock().ok().and_then(|g| *g);
            let deadline = current.map(|l| l.deadline);
            let sent = Instant::now();
            let elect = async {
                let conn = self.inner.session.get().await?;
                leader::elect_on(&conn, DEFAULT_LEASE, &me, ttl).await
            };
            let attempt = tokio::select! {
                r = elect => Some(r),
                _ = sleep_until_opt(deadline) => None,
                _ = shutdown.changed() => break,
            };
            let mut next = renew;
            match attempt {
                None => self.lose_leadership(&mut maintenance),
                Some(Ok(Election::Leader { term })) => {
                    let state = LeaderState {
                        term,
                        deadline: sent + ttl - margin,
                    };
                    let same_term = current.map(|c| c.term) == Some(term);
                    if !same_term {
                        if current.is_some() {
                            self.lose_leadership(&mut maintenance);
                        }
                        self.set_leader(Some(state));
                        info!(instance = %me, term, "became leader");
                        if let Some(cb) = &self.inner.callbacks.on_became_leader {
                            cb(term);
                        }
                        maintenance = Some(tokio::spawn(self.clone().maintenance_loop(term)));
                    } else {
                        self.set_leader(Some(state));
                    }
                }
                Some(Ok(Election::Follower { expires_in, .. })) => {
                    if current.is_some() {
                        self.lose_leadership(&mut maintenance);
                    }
                    next = match expires_in {
                        Some(d) => (d + Duration::from_millis(5)).min(renew),
                        None => Duration::from_millis(5),
                    };
                }
                Some(Err(e)) => {
                    if is_lock_timeout(&e) {
                        // Our own maintenance step holds the leader row: retry shortly.
                        tracing::debug!(error = %e, "leader renewal waited for the leader row; retrying");
                        next = renew.min(Duration::from_millis(100));
                    } else {
                        self.report_error(&e);
                        next = renew.min(Duration::from_secs(1));
                    }
                }
            }
            let deadline = self
                .inner
                .leader
                .lock()
                .ok()
                .and_then(|g| *g)
                .map(|l| l.deadline);
            let wake = Instant::now() + next;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(wake) => break,
                    _ = sleep_until_opt(deadline) => { self.lose_leadership(&mut maintenance); break; }
                    ev = sub.recv() => match ev {
                        Some(Event::LeaderChanged { name, leader_id, .. }) if name == DEFAULT_LEASE => {
                            let ours = leader_id.as_deref() == Some(me.as_str());
                            if !ours && !self.is_leader() && leader_id.is_none() {
                                break; // lease released: elect now
                            }
                            if !ours && self.is_leader() && leader_id.is_some() {
                                break; // someone else took it: check at once
                            }
                        }
                        Some(_) => {}
                        None => break,
                    },
                    _ = shutdown.changed() => break,
                }
            }
        }
        // Shutdown: stop maintenance, then resign so a follower takes over immediately.
        if let Some(h) = maintenance.take() {
            h.abort();
            let _ = h.await;
        }
        if self.set_leader(None).is_some() {
            if let Err(e) = self.resign(&me).await {
                self.report_error(&e);
            }
            if let Some(cb) = &self.inner.callbacks.on_lost_leadership {
                cb();
            }
        } else {
            // We may hold a lease we never learned about (reply lost): release it if ours.
            let _ = self.resign(&me).await;
        }
    }

    async fn resign(&self, me: &InstanceId) -> Result<bool> {
        let conn = self.inner.session.get().await?;
        leader::resign_on(&conn, DEFAULT_LEASE, me).await
    }

    async fn maintenance_loop(self, term: i64) {
        let ctx = self.maintenance_ctx(term);
        loop {
            if self.leader_term() != Some(term) {
                return;
            }
            match maintenance::run_once(&self.inner.db, &self.inner.steps, &ctx).await {
                Ok(report) => {
                    let total: u64 = report.steps.iter().map(|(_, n)| n).sum();
                    if total > 0 {
                        info!(?report, "maintenance pass");
                    }
                }
                Err(Error::LeaseLost(m)) => {
                    warn!(message = %m, "maintenance stopped: lease lost");
                    return;
                }
                Err(e) => self.report_error(&e),
            }
            tokio::time::sleep(self.inner.config.maintenance_interval).await;
        }
    }
}

/// Whether `e` is a `lock_timeout` expiry (SQLSTATE 55P03).
fn is_lock_timeout(e: &Error) -> bool {
    matches!(e, Error::Database(db) if db.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE))
}

/// Refuse a configuration whose pool cannot serve the instance: a `Db` handed in with a pool
/// beyond `max_connections`, or services holding more pooled connections than the pool has to
/// spare.
fn check_budget(config: &ClientConfig, db: &Db, services: &[Arc<dyn Service>]) -> Result<()> {
    let pool = db.pool().status().max_size;
    if let Some(max) = config.max_connections
        && pool + COORDINATION_CONNECTIONS > max
    {
        return Err(Error::Config(format!(
            "the database handle's pool has {pool} connections; with the coordination connection this instance would use {} > max_connections {max}",
            pool + COORDINATION_CONNECTIONS
        )));
    }
    let held: usize = services.iter().map(|s| s.held_connections()).sum();
    if held > 0 && held + 1 > pool {
        let names: Vec<&str> = services
            .iter()
            .filter(|s| s.held_connections() > 0)
            .map(|s| s.name())
            .collect();
        return Err(Error::Config(format!(
            "too few connections for the configured work: {} hold {held} pooled connections while running (a worker pool: one for claims, one for acknowledgements) and need at least one more for task heartbeats and handlers, but the pool has {pool}; raise max_connections to at least {} (= pool + {COORDINATION_CONNECTIONS} coordination/LISTEN connection) or pool_size to at least {}",
            names.join(", "),
            held + 1 + COORDINATION_CONNECTIONS,
            held + 1
        )));
    }
    Ok(())
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
