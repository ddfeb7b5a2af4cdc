//! [`ClientBuilder`]: connects, migrates or checks the schema, assembles the agent service
//! (agents, tools, model, worker pool) and checks the connection budget.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::agents::AgentService;
use super::{Callbacks, Client, Inner, Service, default_maintenance_steps};
use crate::agent::{AgentDef, Tool};
use crate::config::{COORDINATION_CONNECTIONS, ClientConfig};
use crate::coord::maintenance::MaintenanceStep;
use crate::coord::notify::Notifier;
use crate::coord::session::Session;
use crate::coord::source::DbSource;
use crate::db::Db;
use crate::error::{Error, Result};
use crate::model::ModelPort;
use crate::queue::WorkerPoolBuilder;

/// Builder for [`Client`]; see [`Client::builder`].
///
/// An agent service says each fact once: `.agent(def)`, `.tool(tool)`, `.model(model)` and,
/// optionally, `.worker_pool(builder)` with the service's own queues and handlers. `build()`
/// registers the agents and tools, builds the kernel on the client's database and instance and
/// installs the agent runtime on the worker pool; `start()` starts it and `stop()` drains it.
pub struct ClientBuilder {
    source: DbSource,
    config: ClientConfig,
    callbacks: Callbacks,
    steps: Vec<Arc<dyn MaintenanceStep>>,
    services: Vec<Arc<dyn Service>>,
    agents: AgentService,
}

impl std::fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ClientBuilder {
    pub(super) fn new(source: DbSource) -> Self {
        ClientBuilder {
            source,
            config: ClientConfig::default(),
            callbacks: Callbacks::default(),
            steps: default_maintenance_steps(),
            services: Vec::new(),
            agents: AgentService::default(),
        }
    }

    /// Host this agent: registered in `pgcrew.agents` by `build()`, its runs (submitted from
    /// any instance or from SQL) are worked on its queue `agent.<name>`. Its tools must be
    /// added with [`tool`](Self::tool) and a [`model`](Self::model) must be set.
    pub fn agent(mut self, def: AgentDef) -> Self {
        self.agents.agents.push(def);
        self
    }

    /// Add a tool this instance can run (registered in `pgcrew.tools` by `build()`).
    pub fn tool(mut self, tool: Tool) -> Self {
        self.agents.tools.push(tool);
        self
    }

    /// The model the hosted agents call.
    pub fn model(mut self, model: Arc<dyn ModelPort>) -> Self {
        self.agents.model = Some(model);
        self
    }

    /// The worker pool the agent runtime is installed on, with the service's own queues and
    /// handlers and the pool's settings (concurrency, ...): it works its queues (`default` if
    /// it names none) and the agents' queues. Without it the client gets a pool working only
    /// the agents' queues (when it hosts agents). Started and drained with the client.
    pub fn worker_pool(mut self, pool: WorkerPoolBuilder) -> Self {
        self.agents.pool = Some(pool);
        self
    }

    /// The run lease TTL of the hosted agents' runs (default 60 s; renewed after every step):
    /// how long a run of a crashed instance waits before another instance resumes it.
    pub fn run_lease_ttl(mut self, ttl: Duration) -> Self {
        self.agents.run_lease_ttl = Some(ttl);
        self
    }

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

    /// Connect (and migrate when configured, otherwise check the schema version), then register
    /// the agents and tools and build the worker pool of an agent service.
    pub async fn build(mut self) -> Result<Client> {
        let agents = std::mem::take(&mut self.agents);
        let tools = agents.prepare(&mut self.config)?;
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
        if let Some(tools) = tools
            && let Some(pool) = agents.install(&db, &self.config, tools).await?
        {
            self.services.push(pool);
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
                last_beat: Mutex::new(None),
                running: tokio::sync::Mutex::new(None),
                is_running: AtomicBool::new(false),
            }),
        })
    }
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
