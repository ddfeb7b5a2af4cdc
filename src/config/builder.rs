//! [`ClientConfigBuilder`]: every setting with its default, checked once by `build`.

use std::time::Duration;

use super::{COORDINATION_CONNECTIONS, ClientConfig};
use crate::db::StatementMode;
use crate::error::{Error, Result};
use crate::ids::InstanceId;
use crate::ledger_key::LedgerKey;
use crate::runs::limits::RunLimits;

/// Builder for [`ClientConfig`]. Every setter documents its default.
#[derive(Debug, Clone)]
pub struct ClientConfigBuilder {
    config: ClientConfig,
    /// Whether `pool_size` was set explicitly (then it must agree with `max_connections`).
    pool_size_set: bool,
}

impl ClientConfigBuilder {
    pub(super) fn new() -> Self {
        ClientConfigBuilder {
            config: ClientConfig::default(),
            pool_size_set: false,
        }
    }

    setters! {
        config;
        /// This instance's id (default: a random UUID).
        instance_id(id: InstanceId) => instance_id = id;
        /// Metadata stored with the instance (default `{}`).
        metadata(value: serde_json::Value) => metadata = value;
        /// Agent names this instance serves (default none).
        agents(value: Vec<String>) => agents = value;
        /// Tool names this instance has (default none).
        tools(value: Vec<String>) => tools = value;
        /// Heartbeat interval (default 30 s).
        heartbeat_interval(value: Duration) => heartbeat_interval = value;
        /// Instance TTL (default 2 min).
        instance_ttl(value: Duration) => instance_ttl = value;
        /// Leader lease TTL (default 30 s; renewed at TTL/3).
        leader_ttl(value: Duration) => leader_ttl = value;
        /// Maintenance interval (default 1 min).
        maintenance_interval(value: Duration) => maintenance_interval = value;
        /// Stuck-run timeout (default 1 h).
        stuck_run_timeout(value: Duration) => stuck_run_timeout = value;
        /// Listener fallback poll interval (default 5 s).
        notify_poll_interval(value: Duration) => notify_poll_interval = value;
        /// The instance's total connection budget, LISTEN included (default: unset, i.e.
        /// `pool_size + 1`): the pool gets `n - 1` connections and the coordination connection
        /// the last one. At least 3, and at least 4 to run a worker pool (checked when the
        /// client is built).
        max_connections(n: usize) => max_connections = Some(n);
        /// Connect timeout (default 10 s).
        connect_timeout(value: Duration) => connect_timeout = value;
        /// Wait for a free pooled connection at most this long (default 30 s).
        pool_wait_timeout(value: Duration) => pool_wait_timeout = value;
        /// Poll-only mode, no LISTEN connection (default false).
        poll_only(value: bool) => poll_only = value;
        /// Run migrations on build (default false).
        migrate(value: bool) => migrate = value;
        /// Take part in leader election (default true).
        leader_election(value: bool) => leader_election = value;
        /// Task retention (default 24 h).
        task_retention(value: Duration) => task_retention = value;
        /// Leader terms and console queue pause/resume records kept (default 30 days).
        history_retention(value: Duration) => history_retention = value;
        /// Retention batch size (default 10 000).
        retention_batch_size(value: i64) => retention_batch_size = value;
        /// Task heartbeat timeout (default 2 min).
        task_heartbeat_timeout(value: Duration) => task_heartbeat_timeout = value;
        /// Sign a run's ledger head at most every this many appends (default 64).
        checkpoint_interval(value: u32) => checkpoint_interval = value;
        /// The key signing ledger checkpoints (default: `PGCREW_LEDGER_KEY` or
        /// `PGCREW_LEDGER_KEY_FILE`, read when the client is built).
        ledger_key(key: LedgerKey) => ledger_key = Some(key);
        /// Limits on run inputs (default: the database's hard caps; lower only).
        run_limits(value: RunLimits) => run_limits = value;
        /// Finished runs retained per maintenance pass (default 100).
        run_retention_batch_size(value: i64) => run_retention_batch_size = value;
        /// Retain finished runs older than `age` (default: off): the leader removes their
        /// ledger (keeping a chain anchor and the final signed checkpoint), artifacts,
        /// summaries and cost entries (folding the totals into `pgcrew.cost_daily`).
        run_retention(age: Duration) => run_retention = Some(age);
        /// Delete the rows of retained runs finalized longer ago than `age` (default: off),
        /// with their chain anchor and checkpoints (see
        /// [`ClientConfig::run_row_retention`]).
        run_row_retention(age: Duration) => run_row_retention = Some(age);
        /// Separate DSN for the LISTEN connection (default: the main DSN).
        listen_dsn(dsn: impl Into<String>) => listen_dsn = Some(dsn.into());
        /// How statements go out (default [`StatementMode::Cached`]). Behind PgBouncer in
        /// transaction mode use [`StatementMode::Unnamed`] and point `listen_dsn` at PostgreSQL
        /// directly (LISTEN and migrations go there).
        statements(mode: StatementMode) => statements = mode;
    }

    /// Pool size (default 16; ignored when [`max_connections`](Self::max_connections) is set,
    /// and then it must agree with it if given: `pool_size + 1 == max_connections`).
    pub fn pool_size(mut self, value: usize) -> Self {
        self.config.pool_size = value;
        self.pool_size_set = true;
        self
    }

    /// Validate and return the configuration.
    pub fn build(mut self) -> Result<ClientConfig> {
        if let Some(m) = self.config.max_connections {
            if self.pool_size_set && self.config.pool_size + COORDINATION_CONNECTIONS != m {
                return Err(Error::Config(format!(
                    "pool_size {} and max_connections {m} disagree: an instance uses pool_size + {COORDINATION_CONNECTIONS} connections (the coordination connection, which also LISTENs); set only one of them",
                    self.config.pool_size
                )));
            }
            self.config.pool_size = m.saturating_sub(COORDINATION_CONNECTIONS);
        }
        self.config.validate()?;
        Ok(self.config)
    }
}
