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

macro_rules! setter {
    ($(#[$doc:meta])* $name:ident: $ty:ty) => {
        $(#[$doc])*
        pub fn $name(mut self, value: $ty) -> Self {
            self.config.$name = value;
            self
        }
    };
}

impl ClientConfigBuilder {
    pub(super) fn new() -> Self {
        ClientConfigBuilder {
            config: ClientConfig::default(),
            pool_size_set: false,
        }
    }

    /// This instance's id (default: a random UUID).
    pub fn instance_id(mut self, id: InstanceId) -> Self {
        self.config.instance_id = id;
        self
    }
    setter!(
        /// Metadata stored with the instance (default `{}`).
        metadata: serde_json::Value
    );
    setter!(
        /// Agent names this instance serves (default none).
        agents: Vec<String>
    );
    setter!(
        /// Tool names this instance has (default none).
        tools: Vec<String>
    );
    setter!(
        /// Heartbeat interval (default 30 s).
        heartbeat_interval: Duration
    );
    setter!(
        /// Instance TTL (default 2 min).
        instance_ttl: Duration
    );
    setter!(
        /// Leader lease TTL (default 30 s; renewed at TTL/3).
        leader_ttl: Duration
    );
    setter!(
        /// Maintenance interval (default 1 min).
        maintenance_interval: Duration
    );
    setter!(
        /// Stuck-run timeout (default 1 h).
        stuck_run_timeout: Duration
    );
    setter!(
        /// Listener fallback poll interval (default 5 s).
        notify_poll_interval: Duration
    );
    /// Pool size (default 16; ignored when [`max_connections`](Self::max_connections) is set,
    /// and then it must agree with it if given: `pool_size + 1 == max_connections`).
    pub fn pool_size(mut self, value: usize) -> Self {
        self.config.pool_size = value;
        self.pool_size_set = true;
        self
    }

    /// The instance's total connection budget, LISTEN included (default: unset, i.e.
    /// `pool_size + 1`): the pool gets `n - 1` connections and the coordination connection the
    /// last one. At least 3, and at least 4 to run a worker pool (checked when the client is
    /// built).
    pub fn max_connections(mut self, n: usize) -> Self {
        self.config.max_connections = Some(n);
        self
    }
    setter!(
        /// Connect timeout (default 10 s).
        connect_timeout: Duration
    );
    setter!(
        /// Wait for a free pooled connection at most this long (default 30 s).
        pool_wait_timeout: Duration
    );
    setter!(
        /// Poll-only mode, no LISTEN connection (default false).
        poll_only: bool
    );
    setter!(
        /// Run migrations on build (default false).
        migrate: bool
    );
    setter!(
        /// Take part in leader election (default true).
        leader_election: bool
    );
    setter!(
        /// Task retention (default 24 h).
        task_retention: Duration
    );
    setter!(
        /// Retention batch size (default 10 000).
        retention_batch_size: i64
    );
    setter!(
        /// Task heartbeat timeout (default 2 min).
        task_heartbeat_timeout: Duration
    );

    setter!(
        /// Sign a run's ledger head at most every this many appends (default 64).
        checkpoint_interval: u32
    );

    /// The key signing ledger checkpoints (default: `PGCREW_LEDGER_KEY` or
    /// `PGCREW_LEDGER_KEY_FILE`, read when the client is built).
    pub fn ledger_key(mut self, key: LedgerKey) -> Self {
        self.config.ledger_key = Some(key);
        self
    }

    setter!(
        /// Limits on run inputs (default: the database's hard caps; lower only).
        run_limits: RunLimits
    );
    setter!(
        /// Finished runs retained per maintenance pass (default 100).
        run_retention_batch_size: i64
    );

    /// Retain finished runs older than `age` (default: off): the leader removes their ledger
    /// (keeping a chain anchor and the final signed checkpoint), artifacts, summaries and cost
    /// entries (folding the totals into `pgcrew.cost_daily`).
    pub fn run_retention(mut self, age: Duration) -> Self {
        self.config.run_retention = Some(age);
        self
    }

    /// Separate DSN for the LISTEN connection (default: the main DSN).
    pub fn listen_dsn(mut self, dsn: impl Into<String>) -> Self {
        self.config.listen_dsn = Some(dsn.into());
        self
    }

    /// How statements go out (default [`StatementMode::Cached`]). Behind PgBouncer in
    /// transaction mode use [`StatementMode::Unnamed`] and point `listen_dsn` at PostgreSQL
    /// directly (LISTEN and migrations go there).
    pub fn statements(mut self, mode: StatementMode) -> Self {
        self.config.statements = mode;
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
