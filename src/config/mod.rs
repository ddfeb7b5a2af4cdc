//! Client configuration: a builder with documented defaults.
//!
//! | setting | default | meaning |
//! |---|---|---|
//! | `instance_id` | random UUID | this instance's id in `pgcrew.instances` |
//! | `heartbeat_interval` | 30 s | how often the instance refreshes `last_heartbeat_at` |
//! | `instance_ttl` | 2 min | silence after which the leader deletes an instance |
//! | `leader_ttl` | 30 s | leader lease duration; renewed every `leader_ttl / 3` |
//! | `maintenance_interval` | 1 min | how often the leader runs maintenance |
//! | `stuck_run_timeout` | 1 h | a run `running` longer than this with no live lease is failed with `run timed out` (a renewed lease keeps it alive) |
//! | `notify_poll_interval` | 5 s | fallback poll interval of listeners (NOTIFY is only a wake-up) |
//! | `pool_size` | 16 | maximum pooled connections (ignored when `max_connections` is set) |
//! | `max_connections` | unset (= `pool_size` + 1 = 17) | total connection budget of a started instance: the pool gets `max_connections - 1`, the coordination connection (which is also the LISTEN connection) the last one; at least 3, at least 4 with a worker pool |
//! | `connect_timeout` | 10 s | timeout to open one connection |
//! | `pool_wait_timeout` | 30 s | how long a caller waits for a pooled connection before `Error::Pool` |
//! | `listen_dsn` | the main DSN | separate DSN for the LISTEN connection (e.g. bypassing PgBouncer) |
//! | `statements` | `cached` | `unnamed`: every statement goes out unnamed in one round trip (behind PgBouncer in transaction mode; see [`StatementMode`]) |
//! | `poll_only` | false | no LISTEN connection at all; everything polls |
//! | `migrate` | false | run the embedded migrations when the client is built |
//! | `leader_election` | true | take part in leader election |
//! | `task_retention` | 24 h | completed/discarded tasks older than this are deleted by maintenance |
//! | `history_retention` | 30 days | leader terms (`pgcrew.leader_terms`) and the console's queue pause/resume records older than this are deleted by maintenance (a lease's newest term always stays) |
//! | `retention_batch_size` | 10 000 | rows deleted per retention statement |
//! | `task_heartbeat_timeout` | 2 min | running tasks whose heartbeat is older than this are rescued |
//! | `ledger_key` | `PGCREW_LEDGER_KEY` / `PGCREW_LEDGER_KEY_FILE`, else none | signs ledger checkpoints ([`LedgerKey`]) |
//! | `checkpoint_interval` | 64 | sign a run's ledger head at most every this many appends (and when it finishes) |
//! | `run_limits` | the database's hard caps (1 MiB payload/artifact/summary) | refuse larger run inputs in the library ([`RunLimits`]; lower only) |
//! | `run_retention` | off | finished runs older than this lose their ledger (chain anchor and final checkpoint kept), artifacts, summaries and cost entries (folded into `pgcrew.cost_daily`) |
//! | `run_retention_batch_size` | 100 | finished runs retained per maintenance pass |
//! | `run_row_retention` | off | retained runs (see `run_retention`) finalized longer ago than this are deleted with their chain anchor and checkpoints, children before parents, never while a parent is unfinished (`pgcrew.delete_retained_runs`, V036; `run_retention_batch_size` per pass) |

use std::time::Duration;

use crate::db::StatementMode;
use crate::error::{Error, Result};
use crate::ids::InstanceId;
use crate::ledger_key::{DEFAULT_CHECKPOINT_INTERVAL, LedgerKey};
use crate::runs::limits::RunLimits;

mod builder;

pub use builder::ClientConfigBuilder;

/// Pooled connections of an instance by default ([`ClientConfig::pool_size`]).
pub const DEFAULT_POOL_SIZE: usize = 16;

/// Connections a started instance holds outside its pool: one coordination connection, which
/// runs heartbeats and leader renewals and is also the LISTEN connection (in `poll_only` mode
/// it only coordinates). Total = pool + this.
pub const COORDINATION_CONNECTIONS: usize = 1;

/// The smallest pool a client accepts.
pub const MIN_POOL_SIZE: usize = 2;

/// The smallest `max_connections` a client accepts: [`MIN_POOL_SIZE`] pooled connections plus
/// the coordination connection. An instance running a worker pool needs one more
/// ([`MIN_WORKER_CONNECTIONS`]).
pub const MIN_CONNECTIONS: usize = MIN_POOL_SIZE + COORDINATION_CONNECTIONS;

/// The smallest `max_connections` of an instance running a
/// [`WorkerPool`](crate::queue::WorkerPool): the pool holds one connection for claims and one
/// for acknowledgements, and needs a third for task heartbeats and handlers.
pub const MIN_WORKER_CONNECTIONS: usize = 3 + COORDINATION_CONNECTIONS;

/// Configuration of a [`Client`](crate::Client). Build it with [`ClientConfig::builder`].
///
/// Its `Debug` output shows `listen_dsn` with its password redacted.
#[derive(Clone)]
pub struct ClientConfig {
    /// This instance's id.
    pub instance_id: InstanceId,
    /// Free-form metadata stored with the instance row.
    pub metadata: serde_json::Value,
    /// Agent names this instance can run (stored in `pgcrew.instance_agents`).
    pub agents: Vec<String>,
    /// Tool names this instance has registered (stored in `pgcrew.instance_tools`).
    pub tools: Vec<String>,
    /// Heartbeat interval.
    pub heartbeat_interval: Duration,
    /// Instance time-to-live without heartbeat.
    pub instance_ttl: Duration,
    /// Leader lease time-to-live.
    pub leader_ttl: Duration,
    /// Maintenance interval (leader only).
    pub maintenance_interval: Duration,
    /// Runs `running` longer than this with no live lease are failed by maintenance (a run
    /// whose lease is being renewed is never failed as stuck).
    pub stuck_run_timeout: Duration,
    /// Fallback polling interval for listeners.
    pub notify_poll_interval: Duration,
    /// Maximum pooled connections. Ignored when [`ClientConfig::max_connections`] is set (the
    /// pool then gets the budget minus the coordination connection); see
    /// [`ClientConfig::pool_connections`].
    pub pool_size: usize,
    /// The instance's total connection budget: `Some(n)` gives the pool `n - 1` connections
    /// and the coordination connection (heartbeats, leader renewals, and LISTEN unless
    /// `poll_only`) the last one. `None`: the pool has `pool_size` connections and the instance
    /// `pool_size + 1` in all. See [`ClientConfig::connections_needed`].
    pub max_connections: Option<usize>,
    /// Timeout to open one connection.
    pub connect_timeout: Duration,
    /// How long a caller waits for a free pooled connection before `Error::Pool`.
    pub pool_wait_timeout: Duration,
    /// Separate DSN for the LISTEN connection (redacted in `Debug` output).
    pub listen_dsn: Option<String>,
    /// How statements go out on the pools' connections (`Unnamed` behind PgBouncer in
    /// transaction mode; migrations then run over `listen_dsn`).
    pub statements: StatementMode,
    /// Disable LISTEN entirely and rely on polling.
    pub poll_only: bool,
    /// Run the embedded migrations when the client is built.
    pub migrate: bool,
    /// Take part in leader election.
    pub leader_election: bool,
    /// Age after which completed/discarded tasks are deleted.
    pub task_retention: Duration,
    /// Age after which leader terms and the console's queue pause/resume records are deleted
    /// (a lease's newest term always stays).
    pub history_retention: Duration,
    /// Rows deleted per retention statement.
    pub retention_batch_size: i64,
    /// Running tasks with a heartbeat older than this are returned to the queue.
    pub task_heartbeat_timeout: Duration,
    /// The key signing ledger checkpoints. `None`: the client reads it from the environment
    /// when it is built ([`LedgerKey::from_env`]); no key there means checkpoints are not signed.
    pub ledger_key: Option<LedgerKey>,
    /// Sign a run's ledger head at most every this many appended events (at least 1).
    pub checkpoint_interval: u32,
    /// Limits on run inputs enforced by the client's handle (each at most the database's cap).
    pub run_limits: RunLimits,
    /// Retain finished runs older than this (finalized before `now() - run_retention`): their
    /// events (a chain anchor and the final signed checkpoint stay), artifacts, summaries and
    /// cost entries (totals kept in `pgcrew.cost_daily`) are removed by the leader.
    /// `None` (the default): never.
    pub run_retention: Option<Duration>,
    /// Finished runs retained per maintenance pass (at least 1); also the run rows deleted
    /// per pass by [`run_row_retention`](Self::run_row_retention).
    pub run_retention_batch_size: i64,
    /// Delete the rows of runs already retained (see [`run_retention`](Self::run_retention))
    /// that were finalized before `now() - run_row_retention`, with their chain anchor and
    /// checkpoints: their ledger can no longer be verified afterwards. Children go before
    /// parents; a run whose parent is unfinished, that still has events, or whose tenant is
    /// being moved between shards stays. `None` (the default): never.
    pub run_row_retention: Option<Duration>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            instance_id: InstanceId::random(),
            metadata: serde_json::json!({}),
            agents: Vec::new(),
            tools: Vec::new(),
            heartbeat_interval: Duration::from_secs(30),
            instance_ttl: Duration::from_secs(120),
            leader_ttl: Duration::from_secs(30),
            maintenance_interval: Duration::from_secs(60),
            stuck_run_timeout: Duration::from_secs(3600),
            notify_poll_interval: Duration::from_secs(5),
            pool_size: DEFAULT_POOL_SIZE,
            max_connections: None,
            connect_timeout: Duration::from_secs(10),
            pool_wait_timeout: Duration::from_secs(30),
            listen_dsn: None,
            poll_only: false,
            statements: StatementMode::Cached,
            migrate: false,
            leader_election: true,
            task_retention: Duration::from_secs(24 * 3600),
            history_retention: Duration::from_secs(30 * 24 * 3600),
            retention_batch_size: 10_000,
            task_heartbeat_timeout: Duration::from_secs(120),
            ledger_key: None,
            checkpoint_interval: DEFAULT_CHECKPOINT_INTERVAL,
            run_limits: RunLimits::default(),
            run_retention: None,
            run_retention_batch_size: 100,
            run_row_retention: None,
        }
    }
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Destructured so that a new field cannot be forgotten here.
        let ClientConfig {
            instance_id,
            metadata,
            agents,
            tools,
            heartbeat_interval,
            instance_ttl,
            leader_ttl,
            maintenance_interval,
            stuck_run_timeout,
            notify_poll_interval,
            pool_size,
            max_connections,
            connect_timeout,
            pool_wait_timeout,
            listen_dsn,
            statements,
            poll_only,
            migrate,
            leader_election,
            task_retention,
            history_retention,
            retention_batch_size,
            task_heartbeat_timeout,
            ledger_key,
            checkpoint_interval,
            run_limits,
            run_retention,
            run_retention_batch_size,
            run_row_retention,
        } = self;
        f.debug_struct("ClientConfig")
            .field("instance_id", instance_id)
            .field("metadata", metadata)
            .field("agents", agents)
            .field("tools", tools)
            .field("heartbeat_interval", heartbeat_interval)
            .field("instance_ttl", instance_ttl)
            .field("leader_ttl", leader_ttl)
            .field("maintenance_interval", maintenance_interval)
            .field("stuck_run_timeout", stuck_run_timeout)
            .field("notify_poll_interval", notify_poll_interval)
            .field("pool_size", pool_size)
            .field("max_connections", max_connections)
            .field("connect_timeout", connect_timeout)
            .field("pool_wait_timeout", pool_wait_timeout)
            .field(
                "listen_dsn",
                &listen_dsn.as_deref().map(crate::db::redact_dsn),
            )
            .field("statements", statements)
            .field("poll_only", poll_only)
            .field("migrate", migrate)
            .field("leader_election", leader_election)
            .field("task_retention", task_retention)
            .field("history_retention", history_retention)
            .field("retention_batch_size", retention_batch_size)
            .field("ledger_key", ledger_key)
            .field("checkpoint_interval", checkpoint_interval)
            .field("task_heartbeat_timeout", task_heartbeat_timeout)
            .field("run_limits", run_limits)
            .field("run_retention", run_retention)
            .field("run_retention_batch_size", run_retention_batch_size)
            .field("run_row_retention", run_row_retention)
            .finish()
    }
}

impl ClientConfig {
    /// A builder starting from the defaults.
    pub fn builder() -> ClientConfigBuilder {
        ClientConfigBuilder::new()
    }

    /// The size of the instance's connection pool: `max_connections - 1` when a budget is set,
    /// otherwise `pool_size`.
    pub fn pool_connections(&self) -> usize {
        match self.max_connections {
            Some(m) => m.saturating_sub(COORDINATION_CONNECTIONS),
            None => self.pool_size,
        }
    }

    /// Connections a started instance with this configuration opens at most, LISTEN included:
    /// `pool_connections() + 1` (the coordination connection). With the defaults, 17.
    /// Size the server's `max_connections` as the sum over instances plus what other clients
    /// (migrations, the CLI, superuser_reserved_connections) need. When the client is built on
    /// an existing [`Db`](crate::Db), its pool is that handle's instead.
    pub fn connections_needed(&self) -> usize {
        self.pool_connections() + COORDINATION_CONNECTIONS
    }

    /// How long a coordination statement waits for a row lock before it fails and is retried
    /// (`lock_timeout` of the coordination connection): a leader renewal waiting behind the
    /// leader's own maintenance step must not hold up the heartbeats queued behind it on the
    /// same connection, nor the LISTEN connection's liveness ping. The lesser of the renewal
    /// interval and half the notify poll interval, at least 50 ms.
    pub fn coordination_lock_timeout(&self) -> Duration {
        self.leader_renew_interval()
            .min(self.notify_poll_interval / 2)
            .max(Duration::from_millis(50))
    }

    /// The leader renewal interval: a third of the lease TTL.
    pub fn leader_renew_interval(&self) -> Duration {
        self.leader_ttl / 3
    }

    /// Check the invariants between settings.
    pub fn validate(&self) -> Result<()> {
        fn positive(name: &str, d: Duration) -> Result<()> {
            if d.is_zero() {
                return Err(Error::Config(format!("{name} must be greater than zero")));
            }
            Ok(())
        }
        positive("heartbeat_interval", self.heartbeat_interval)?;
        positive("instance_ttl", self.instance_ttl)?;
        positive("leader_ttl", self.leader_ttl)?;
        positive("maintenance_interval", self.maintenance_interval)?;
        positive("stuck_run_timeout", self.stuck_run_timeout)?;
        positive("notify_poll_interval", self.notify_poll_interval)?;
        positive("connect_timeout", self.connect_timeout)?;
        positive("pool_wait_timeout", self.pool_wait_timeout)?;
        positive("task_heartbeat_timeout", self.task_heartbeat_timeout)?;
        if self.leader_ttl < Duration::from_millis(300) {
            return Err(Error::Config(format!(
                "leader_ttl is {:?}; it must be at least 300ms so the lease can be renewed in time",
                self.leader_ttl
            )));
        }
        if self.instance_ttl <= self.heartbeat_interval {
            return Err(Error::Config(format!(
                "instance_ttl ({:?}) must be longer than heartbeat_interval ({:?}), or live instances would be deleted",
                self.instance_ttl, self.heartbeat_interval
            )));
        }
        match self.max_connections {
            Some(m) if m < MIN_CONNECTIONS => {
                return Err(Error::Config(format!(
                    "max_connections is {m}; an instance needs at least {MIN_CONNECTIONS} ({MIN_POOL_SIZE} pooled + {COORDINATION_CONNECTIONS} coordination/LISTEN connection), and at least {MIN_WORKER_CONNECTIONS} to run a worker pool"
                )));
            }
            Some(_) => {}
            None if self.pool_size < MIN_POOL_SIZE => {
                return Err(Error::Config(format!(
                    "pool_size must be at least {MIN_POOL_SIZE}"
                )));
            }
            None => {}
        }
        if self.checkpoint_interval < 1 {
            return Err(Error::Config(
                "checkpoint_interval must be at least 1".into(),
            ));
        }
        self.run_limits.validate()?;
        if self.run_retention_batch_size < 1 {
            return Err(Error::Config(
                "run_retention_batch_size must be at least 1".into(),
            ));
        }
        if self.retention_batch_size < 1 {
            return Err(Error::Config(
                "retention_batch_size must be at least 1".into(),
            ));
        }
        for a in self.agents.iter().chain(self.tools.iter()) {
            crate::ids::validate_text_id("agent or tool name", a)?;
        }
        Ok(())
    }
}

/// Parse a human duration such as `500ms`, `2s`, `1m 30s` or `1h`, with a clear error.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let d = humantime::parse_duration(s.trim()).map_err(|e| {
        Error::invalid(
            "duration",
            format!("`{s}` is not a duration ({e}); use e.g. 500ms, 2s, 1m, 1h"),
        )
    })?;
    if d.is_zero() {
        return Err(Error::invalid(
            "duration",
            format!("`{s}` must be greater than zero"),
        ));
    }
    Ok(d)
}

/// Render a duration as a PostgreSQL interval literal bound as a parameter (`'123 milliseconds'`)
/// — whole microseconds, so intervals compare exactly with `now()` arithmetic.
pub(crate) fn interval_micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_documented_values() {
        let c = ClientConfig::builder().build().expect("defaults valid");
        assert_eq!(c.heartbeat_interval, Duration::from_secs(30));
        assert_eq!(c.leader_ttl, Duration::from_secs(30));
        assert_eq!(c.leader_renew_interval(), Duration::from_secs(10));
        assert_eq!(c.instance_ttl, Duration::from_secs(120));
        assert_eq!(c.maintenance_interval, Duration::from_secs(60));
        assert_eq!(c.stuck_run_timeout, Duration::from_secs(3600));
    }

    #[test]
    fn invalid_settings_are_rejected() {
        assert!(
            ClientConfig::builder()
                .heartbeat_interval(Duration::from_secs(10))
                .instance_ttl(Duration::from_secs(5))
                .build()
                .is_err()
        );
        assert!(
            ClientConfig::builder()
                .leader_ttl(Duration::ZERO)
                .build()
                .is_err()
        );
        assert!(parse_duration("abc").is_err());
        assert!(parse_duration("0s").is_err());
        assert_eq!(
            parse_duration("500ms").ok(),
            Some(Duration::from_millis(500))
        );
    }
}
