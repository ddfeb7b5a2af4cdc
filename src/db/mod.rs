//! Database access: the connection pool, embedded migrations, a throwaway local cluster for
//! development and tests, and scratch databases.

pub mod atomic;
pub mod certs;
mod cluster;
mod executor;
mod migrate;
pub mod pgbouncer;
mod pooler;
mod scratch;
mod secret;
pub mod tls;

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tracing::instrument;

pub use atomic::{Acquire, Acquired, Atomic, Joined};

/// Read `row` into a type deriving `postgres_from_row::FromRow` (each field from the column of
/// its name): a missing column or a type mismatch is an error, never a panic.
pub(crate) fn row_as<T: postgres_from_row::FromRow>(
    row: &tokio_postgres::Row,
) -> crate::error::Result<T> {
    Ok(T::try_from_row(row)?)
}

/// [`row_as`] for each of `rows`.
pub(crate) fn rows_as<T: postgres_from_row::FromRow>(
    rows: &[tokio_postgres::Row],
) -> crate::error::Result<Vec<T>> {
    rows.iter().map(row_as).collect()
}
pub use cluster::{TempCluster, TempClusterOptions};
pub use executor::{Executor, SqlArrayElement, SqlType, StatementMode, sql_type_of};
pub use migrate::{MigrationReport, latest_version};
pub use pgbouncer::TempPgBouncer;
pub use scratch::ScratchDatabase;
pub use secret::redact_dsn;
pub use tls::{PgConfig, PgConnection, RootCert, SslMode, TlsSettings};

pub(crate) use executor::{Handle, caches_statements, handle_of, typed_params};
pub(crate) use pooler::cached_statements_lost;

use crate::error::{Error, Result};

/// A pooled connection.
pub type Conn = deadpool_postgres::Object;

/// Parse a DSN (URL `postgres://...` or key/value `host=... user=...`) with a clear error,
/// including its TLS settings (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`: see [`tls`]).
/// Certificate and key files are read here, so a bad one is reported at start-up.
pub fn parse_dsn(dsn: &str) -> Result<PgConfig> {
    if dsn.trim().is_empty() {
        return Err(Error::Connect {
            message: "the DSN is empty: pass --dsn or set DATABASE_URL (e.g. postgres://user@127.0.0.1:5432/db)".into(),
        });
    }
    PgConfig::parse(dsn)
}

/// The error for a DSN tokio-postgres cannot parse.
pub(crate) fn describe_parse_error(dsn: &str, e: &tokio_postgres::Error) -> Error {
    // The driver's detail may quote part of the string (`unknown option `...``), which can
    // be a piece of a malformed password: keep only parameter names, and show the DSN
    // redacted.
    let detail = match std::error::Error::source(e) {
        Some(s) => format!("{e}: {}", secret::scrub_parse_detail(&s.to_string())),
        None => e.to_string(),
    };
    Error::Connect {
        message: format!(
            "malformed DSN `{}` ({detail}); expected e.g. postgres://user:password@host:5432/database or `host=... user=... dbname=...`",
            redact_dsn(dsn)
        ),
    }
}

/// Pool settings for [`Db::connect_with`].
#[derive(Debug, Clone, Copy)]
pub struct PoolOptions {
    /// Maximum pooled connections (default 16).
    pub size: usize,
    /// Timeout to open one connection (default 10 s).
    pub connect_timeout: Duration,
    /// How long a caller waits for a free connection before `Error::Pool` (default 30 s).
    pub wait_timeout: Duration,
    /// How statements go out on the pool's connections (default [`StatementMode::Cached`];
    /// [`StatementMode::Unnamed`] behind PgBouncer in transaction mode).
    pub statements: StatementMode,
}

impl Default for PoolOptions {
    fn default() -> Self {
        Self {
            size: 16,
            connect_timeout: Duration::from_secs(10),
            wait_timeout: Duration::from_secs(30),
            statements: StatementMode::Cached,
        }
    }
}

/// A handle on the pgcrew database: a connection pool plus the DSN it came from.
///
/// Cheap to clone; all clones share the pool.
#[derive(Clone)]
pub struct Db {
    pool: Pool,
    config: PgConfig,
    /// Signs ledger checkpoints (see [`Db::with_ledger_key`]).
    ledger_key: Option<crate::ledger_key::LedgerKey>,
    checkpoint_interval: u32,
    /// Limits on run inputs (see [`Db::with_run_limits`]).
    run_limits: crate::runs::limits::RunLimits,
    /// How statements go out on the pool's connections.
    statements: StatementMode,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The connection settings as `PgConfig` shows them (the password redacted).
        f.debug_struct("Db")
            .field("config", &self.config)
            .field("pool", &self.pool.status())
            .field("ledger_key", &self.ledger_key.is_some())
            .field("statements", &self.statements)
            .finish()
    }
}

impl Db {
    /// Connect a pool of at most `pool_size` connections and check that the server answers.
    #[instrument(skip(dsn), err)]
    pub async fn connect(dsn: &str, pool_size: usize, connect_timeout: Duration) -> Result<Db> {
        Self::connect_with(
            dsn,
            PoolOptions {
                size: pool_size,
                connect_timeout,
                ..PoolOptions::default()
            },
        )
        .await
    }

    /// Connect a pool with explicit [`PoolOptions`] and check that the server answers.
    #[instrument(skip(dsn), err)]
    pub async fn connect_with(dsn: &str, options: PoolOptions) -> Result<Db> {
        let mut config = parse_dsn(dsn)?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(options.connect_timeout);
        }
        if config.get_application_name().is_none() {
            config.application_name("pgcrew");
        }
        let db = Self::connect_config(config, options).await?;
        if options.statements == StatementMode::Cached {
            // Cached statements need a server connection that keeps them: refuse at start-up
            // a pooler that would lose them between transactions (see `pooler`).
            let conn = db.get().await?;
            pooler::check_cached_statements(&conn, &db.config, options.connect_timeout).await?;
        }
        Ok(db)
    }

    /// A second, independent pool on the same database and with the same settings (TLS, statement
    /// mode, ledger key, limits), for work that must not wait behind this pool's users.
    pub async fn sibling(&self, pool_size: usize, connect_timeout: Duration) -> Result<Db> {
        let db = Self::connect_config(
            self.config.clone(),
            PoolOptions {
                size: pool_size,
                connect_timeout,
                statements: self.statements,
                ..PoolOptions::default()
            },
        )
        .await?;
        Ok(Db {
            ledger_key: self.ledger_key.clone(),
            checkpoint_interval: self.checkpoint_interval,
            run_limits: self.run_limits,
            ..db
        })
    }

    async fn connect_config(config: PgConfig, options: PoolOptions) -> Result<Db> {
        let PoolOptions {
            size: pool_size,
            connect_timeout,
            wait_timeout,
            statements,
        } = options;
        let manager = Manager::from_connect(
            config.pg_config().clone(),
            tls::PoolConnect {
                mode: config.ssl_mode(),
                connector: config.tls().connector()?,
            },
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let mut builder = Pool::builder(manager);
        if statements == StatementMode::Unnamed {
            // Mark every connection of this pool: the executors then send unnamed statements.
            builder = builder.post_create(deadpool_postgres::Hook::sync_fn(|conn, _| {
                executor::register_unnamed(&conn.statement_cache);
                Ok(())
            }));
        }
        let pool = builder
            .max_size(pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(wait_timeout))
            .create_timeout(Some(connect_timeout))
            .recycle_timeout(Some(connect_timeout))
            .build()
            .map_err(|e| Error::Config(format!("cannot build the connection pool: {e}")))?;
        let mut db = Db::from_pool(pool, config);
        db.statements = statements;
        // Fail fast with a classified error (refused, bad password, unknown database, a
        // certificate that does not verify).
        let conn = match db.pool.get().await {
            Ok(conn) => conn,
            Err(deadpool_postgres::PoolError::Backend(e)) => return Err(db.config.explain(e)),
            Err(e) => return Err(e.into()),
        };
        conn.simple_query(sql!("db/ping")).await?;
        Ok(db)
    }

    /// Wrap an existing deadpool pool (the DSN-derived settings come from the pool's manager;
    /// `config` is what [`Db::sibling`] and dedicated connections use).
    pub fn from_pool(pool: Pool, config: impl Into<PgConfig>) -> Db {
        Db {
            pool,
            config: config.into(),
            ledger_key: None,
            checkpoint_interval: crate::ledger_key::DEFAULT_CHECKPOINT_INTERVAL,
            run_limits: crate::runs::limits::RunLimits::default(),
            statements: StatementMode::Cached,
        }
    }

    /// How statements go out on this handle's pool ([`PoolOptions::statements`]).
    pub fn statements(&self) -> StatementMode {
        self.statements
    }

    /// Sign ledger checkpoints with `key`: appends through this handle sign the run's head at
    /// most every [`Db::checkpoint_interval`] events, and terminal transitions sign it when the
    /// run finishes (see [`crate::runs::ledger`]).
    pub fn with_ledger_key(mut self, key: crate::ledger_key::LedgerKey) -> Db {
        self.ledger_key = Some(key);
        self
    }

    /// Sign a run's head at most every `every` appended events (default 64; 0 counts as 1).
    pub fn with_checkpoint_interval(mut self, every: u32) -> Db {
        self.checkpoint_interval = every.max(1);
        self
    }

    /// Refuse run inputs over `limits` before sending them ([`crate::runs::limits`]); each limit
    /// must be at most the database's hard cap ([`Error::Config`] otherwise).
    pub fn with_run_limits(mut self, limits: crate::runs::limits::RunLimits) -> Result<Db> {
        limits.validate()?;
        self.run_limits = limits;
        Ok(self)
    }

    /// The limits on run inputs this handle enforces.
    pub fn run_limits(&self) -> &crate::runs::limits::RunLimits {
        &self.run_limits
    }

    /// The ledger key this handle signs checkpoints with, if any.
    pub fn ledger_key(&self) -> Option<&crate::ledger_key::LedgerKey> {
        self.ledger_key.as_ref()
    }

    /// How many appended events apart this handle signs checkpoints at most.
    pub fn checkpoint_interval(&self) -> u32 {
        self.checkpoint_interval
    }

    /// Take a connection from the pool.
    pub async fn get(&self) -> Result<Conn> {
        Ok(self.pool.get().await?)
    }

    /// The underlying pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The parsed connection configuration (with its TLS settings).
    pub fn config(&self) -> &PgConfig {
        &self.config
    }

    /// Open a dedicated connection outside the pool (used for LISTEN and long-lived sessions).
    /// The connection task is spawned on the current runtime and ends when the client is dropped.
    pub async fn connect_dedicated(config: &PgConfig) -> Result<DedicatedConnection> {
        connect_with_messages(config).await
    }

    /// Run the embedded migrations (idempotent, safe to call from many instances at once).
    ///
    /// Migrators take a session advisory lock and the migration tool prepares statements, so
    /// migrations need a session of their own: with [`StatementMode::Unnamed`] (a pool behind a
    /// transaction pooler) this refuses with [`Error::Config`]; run them over a direct
    /// connection with [`Db::migrate_direct`].
    #[instrument(skip(self), err)]
    pub async fn migrate(&self) -> Result<MigrationReport> {
        if self.statements == StatementMode::Unnamed {
            return Err(Error::Config(
                "migrations need a direct connection to PostgreSQL (a session advisory lock \
                 serialises migrators, which a transaction pooler such as PgBouncer cannot keep): \
                 this pool uses unnamed statements, so run them with a direct DSN \
                 (`pgcrew migrate --dsn <direct>`, Db::migrate_direct, or set listen_dsn, which \
                 the client then migrates through)"
                    .into(),
            ));
        }
        let mut conn = self.get().await?;
        migrate::run(&mut conn).await
    }

    /// Run the embedded migrations over a dedicated connection to `dsn` (which must reach
    /// PostgreSQL directly or through a session pooler; the same database as this handle's).
    #[instrument(skip(self, dsn), err)]
    pub async fn migrate_direct(&self, dsn: &str) -> Result<MigrationReport> {
        let mut config = parse_dsn(dsn)?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(PoolOptions::default().connect_timeout);
        }
        if config.get_application_name().is_none() {
            config.application_name("pgcrew");
        }
        let (mut client, driver) = connect_with_handler(&config, |_| {}).await?;
        let report = migrate::run(&mut client).await;
        drop(client);
        driver.abort();
        report
    }

    /// Check that the schema is installed and at the version this build expects.
    /// Returns the database's schema version.
    #[instrument(skip(self), err)]
    pub async fn check_schema(&self) -> Result<i64> {
        let conn = self.get().await?;
        migrate::check(&conn).await
    }
}

/// A connection outside the pool: the client, the task driving it (it ends when the client is
/// dropped) and the asynchronous messages (notifications, notices) it received.
pub type DedicatedConnection = (
    tokio_postgres::Client,
    tokio::task::JoinHandle<()>,
    tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::AsyncMessage>,
);

/// Connect one client outside any pool, forwarding asynchronous messages (notifications,
/// notices) to the returned receiver.
pub(crate) async fn connect_with_messages(config: &PgConfig) -> Result<DedicatedConnection> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (client, handle) = connect_with_handler(config, move |m| {
        // Receiver gone: keep driving the connection until the client closes it.
        let _ = tx.send(m);
    })
    .await?;
    Ok((client, handle, rx))
}

/// Connect one client outside any pool; the task driving the connection hands every
/// asynchronous message (notification, notice) to `on_message` as it arrives, with no further
/// task hop. The task ends when the client is dropped or the connection fails.
pub(crate) async fn connect_with_handler<F>(
    config: &PgConfig,
    mut on_message: F,
) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>)>
where
    F: FnMut(tokio_postgres::AsyncMessage) + Send + 'static,
{
    use futures_util::StreamExt;
    let (client, mut connection) = config.open().await?;
    let handle = tokio::spawn(async move {
        let mut stream = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(msg) = stream.next().await {
            match msg {
                Ok(m) => on_message(m),
                Err(e) => {
                    tracing::debug!(error = %e, "dedicated connection ended");
                    break;
                }
            }
        }
    });
    Ok((client, handle))
}

/// The DSN tests and examples should use: `PGCREW_TEST_DATABASE_URL`, then `DATABASE_URL`.
pub fn dsn_from_env() -> Option<String> {
    ["PGCREW_TEST_DATABASE_URL", "DATABASE_URL"]
        .iter()
        .filter_map(|k| std::env::var(k).ok())
        .find(|v| !v.trim().is_empty())
}

/// A database for examples, demos and benchmarks: `DATABASE_URL` when set, otherwise a
/// throwaway local cluster (announced on stderr) that lives as long as the returned guard.
pub async fn database_url_or_throwaway() -> Result<(String, Option<TempCluster>)> {
    if let Some(dsn) = std::env::var("DATABASE_URL")
        .ok()
        .filter(|v| !v.trim().is_empty())
    {
        return Ok((dsn, None));
    }
    eprintln!("DATABASE_URL is not set: starting a throwaway PostgreSQL cluster");
    let cluster = tokio::task::spawn_blocking(TempCluster::start)
        .await
        .map_err(|e| Error::Cluster(e.to_string()))??;
    Ok((cluster.dsn(), Some(cluster)))
}
