//! The crate's single error type.
//!
//! Every fallible pgcrew API returns [`Result<T>`](crate::Result). Errors caused by the caller
//! (bad input, unknown ids, illegal transitions) are distinct variants so they can be matched,
//! and every message says what went wrong and, where there is one, what to do about it.

use crate::sqlstate;
use crate::vocab::ModelErrorKind;
use std::time::Duration;

/// The pgcrew result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every error pgcrew can return.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is invalid (the message names the setting and the accepted range).
    #[error("invalid configuration: {0}")]
    Config(String),

    /// An argument supplied by the caller is invalid; nothing was written.
    #[error("invalid {field}: {message}")]
    InvalidInput {
        /// The argument or field that was rejected.
        field: &'static str,
        /// Why it was rejected.
        message: String,
    },

    /// PostgreSQL could not be reached (refused, timed out, DNS failure, malformed DSN).
    #[error("cannot connect to PostgreSQL: {message}")]
    Connect {
        /// What happened and what to check.
        message: String,
    },

    /// PostgreSQL rejected the credentials.
    #[error(
        "PostgreSQL rejected the credentials: {message} (check the user and password in the DSN / DATABASE_URL)"
    )]
    Authentication {
        /// The server's message.
        message: String,
    },

    /// The pgcrew schema has not been installed in this database.
    #[error(
        "the pgcrew schema is not installed in this database: run `pgcrew migrate` (or build the client with `.migrate(true)`) first"
    )]
    SchemaMissing,

    /// The database was migrated by a newer pgcrew than this one.
    #[error(
        "the database schema is at version {database} but this pgcrew ({crate_version}) supports at most version {supported}: upgrade pgcrew before connecting"
    )]
    SchemaTooNew {
        /// The newest migration applied to the database.
        database: i64,
        /// The newest migration this build knows.
        supported: i64,
        /// This crate's version.
        crate_version: &'static str,
    },

    /// The database schema is older than this pgcrew needs.
    #[error(
        "the database schema is at version {database} but this pgcrew needs version {required}: run `pgcrew migrate`"
    )]
    SchemaOutdated {
        /// The newest migration applied to the database.
        database: i64,
        /// The newest migration this build knows.
        required: i64,
    },

    /// Running the embedded migrations failed.
    #[error("migration failed: {0}")]
    Migration(String),

    /// A broken invariant inside pgcrew (a statement that must return a row returned none, a
    /// result that cannot happen on this path): a bug, not a problem with the input.
    #[error("internal error: {0}")]
    Internal(String),

    /// A database error that is not one of the classified cases.
    #[error("database error: {}", describe_pg_error(.0))]
    Database(#[source] tokio_postgres::Error),

    /// No connection could be taken from the pool.
    #[error("connection pool: {0}")]
    Pool(String),

    /// A row the caller named does not exist (or belongs to another tenant).
    #[error("{kind} not found: {id}")]
    NotFound {
        /// What kind of thing was looked up (`run`, `task`, `tenant`, ...).
        kind: &'static str,
        /// The id that was looked up.
        id: String,
    },

    /// A state machine transition that is not allowed (for example out of a terminal state).
    #[error("illegal {entity} state transition for {id}: {from} -> {to}")]
    IllegalTransition {
        /// `run` or `task`.
        entity: &'static str,
        /// The id of the row.
        id: String,
        /// The current state.
        from: String,
        /// The requested state.
        to: String,
    },

    /// An enqueue that asked for backpressure was refused: the queue's available depth (or the
    /// tenant's in it) has reached its configured threshold. Nothing was stored; retry later.
    #[error(
        "backpressure: queue {queue}{} has {depth} available tasks (threshold {threshold}); nothing was enqueued, retry later",
        tenant.as_ref().map(|t| format!(" (tenant {t})")).unwrap_or_default()
    )]
    Backpressure {
        /// The queue.
        queue: String,
        /// The tenant whose threshold was reached (`None`: the queue's own).
        tenant: Option<String>,
        /// The available depth counted (up to the threshold).
        depth: i64,
        /// The threshold.
        threshold: i64,
    },

    /// A lease (run lease, task claim or leadership) is no longer held by the caller.
    #[error("lease lost: {0}")]
    LeaseLost(String),

    /// The ledger key is missing, unreadable or too short (the message never contains the key).
    #[error("ledger key: {0}")]
    LedgerKey(String),

    /// An append to a finished (or purged) run was refused: its ledger is closed.
    #[error("ledger of run {run} is closed: {message}")]
    LedgerClosed {
        /// The run.
        run: String,
        /// The database's message (the run's state).
        message: String,
    },

    /// A run input (ledger payload, artifact value, summary, prompt, ...) is larger than its limit
    /// (the library's configured limit, or the database's hard cap: SQLSTATE `PC040`); nothing
    /// was stored.
    #[error("{field} is {size} bytes; at most {limit} are allowed (nothing was stored)")]
    TooLarge {
        /// What was too large (`event payload`, `artifact value`, `summary content`, ...).
        field: String,
        /// Its size in bytes (as measured by whoever refused it).
        size: u64,
        /// The limit in bytes.
        limit: u64,
    },

    /// A write to a finished run's artifacts or summaries was refused (SQLSTATE `PC041`):
    /// finished runs are closed.
    #[error(
        "run {run} is {state}: finished runs are closed (artifacts and summaries cannot be changed)"
    )]
    RunFinished {
        /// The run.
        run: String,
        /// Its terminal state (`completed`, `failed`, `cancelled`).
        state: String,
    },

    /// The stored ledger was written outside pgcrew (for example an event inserted beyond the
    /// recorded head): appends stop until it is checked (`pgcrew run verify-ledger`) and repaired.
    #[error("ledger of run {run} was changed outside pgcrew: {message}")]
    LedgerTampered {
        /// The run.
        run: String,
        /// What was found.
        message: String,
    },

    /// The tenant's (or run's) budget cannot cover the requested reservation.
    #[error(
        "budget exceeded for tenant {tenant}: limit {limit_usd} USD, spent {spent_usd}, reserved {reserved_usd}, requested {requested_usd}"
    )]
    BudgetExceeded {
        /// The tenant whose budget was checked.
        tenant: String,
        /// The budget limit.
        limit_usd: f64,
        /// Already spent.
        spent_usd: f64,
        /// Currently reserved by in-flight calls.
        reserved_usd: f64,
        /// The reservation that was refused.
        requested_usd: f64,
    },

    /// A run's own budget ([`set_run_budget`](crate::tenancy::set_run_budget)) cannot cover
    /// the requested reservation; the tenant's budget could. ([`Error::BudgetExceeded`] is the
    /// tenant's budget; [`Error::is_budget_exceeded`] matches both.)
    #[error(
        "run budget exceeded for run {run} of tenant {tenant}: limit {limit_usd} USD, spent {spent_usd}, reserved {reserved_usd}, requested {requested_usd}"
    )]
    RunBudgetExceeded {
        /// The tenant.
        tenant: String,
        /// The run whose budget was checked.
        run: String,
        /// The run's budget limit.
        limit_usd: f64,
        /// Already spent by the run.
        spent_usd: f64,
        /// Currently reserved by the run's in-flight calls.
        reserved_usd: f64,
        /// The reservation that was refused.
        requested_usd: f64,
    },

    /// The tenant lacks a capability required by a tool.
    #[error("capability denied: tenant {tenant} lacks `{capability}` required by tool `{tool}`")]
    CapabilityDenied {
        /// The tenant.
        tenant: String,
        /// The missing capability.
        capability: String,
        /// The tool that requires it.
        tool: String,
    },

    /// A per-tenant concurrency limit was reached and the caller asked to be rejected.
    #[error("concurrency limit reached for tenant {tenant}: {message}")]
    LimitReached {
        /// The tenant.
        tenant: String,
        /// Which limit.
        message: String,
    },

    /// No price is configured for a model.
    #[error(
        "no price is configured for model `{0}`: add it to the price table (PriceTable::set) before using it"
    )]
    UnknownModelPrice(String),

    /// A recorded step does not match the current request under the strict replay policy.
    #[error("replay consistency error at step `{step_key}`: {message}")]
    ReplayConsistency {
        /// The step key.
        step_key: String,
        /// What differed.
        message: String,
    },

    /// A tool's outcome is unknown and must be reconciled before the run can continue.
    #[error("tool `{tool}` at step `{step_key}` has an unknown outcome: call reconcile_tool")]
    ToolOutcomeUnknown {
        /// The tool.
        tool: String,
        /// The step key.
        step_key: String,
    },

    /// A tool failed.
    #[error("tool `{tool}` failed: {message}")]
    ToolFailed {
        /// The tool.
        tool: String,
        /// The tool's error message.
        message: String,
    },

    /// A sub-agent call or definition was refused: it closes a cycle of agents calling each
    /// other (`reason` `cycle`, SQLSTATE `PC070`) or passes the depth limit (`depth`, `PC071`).
    /// In a run, no child is started and the refusal (`child_run_refused`) goes back to the model.
    #[error("sub-agent `{agent}` refused ({reason}): {message}")]
    SubagentRefused {
        /// The sub-agent that was called (or defined).
        agent: String,
        /// `cycle` or `depth`.
        reason: &'static str,
        /// The database's message (the chain of agents).
        message: String,
    },

    /// A harness unit finished its work but its clean-state check failed: it is not marked
    /// done and runs again on the next `harness.run`.
    #[error("harness unit `{unit}` did not leave a clean state: {message}")]
    UncleanState {
        /// The unit.
        unit: String,
        /// What the check found.
        message: String,
    },

    /// The model provider returned an error.
    #[error("model provider error ({kind}): {message}")]
    Model {
        /// Classification (shown as its name: `rate_limited`, `server`, `timeout`,
        /// `invalid_request`, `invalid_output`, ...).
        kind: ModelErrorKind,
        /// The provider's message.
        message: String,
    },

    /// The run is parked at a durable wait (not a failure): whoever works on it stops, and a
    /// signal or the wait's deadline resumes it (its task, if any, is parked until then).
    #[error(
        "run {run} is waiting for signal `{name}` (it resumes on that signal or in {resume_in:?})"
    )]
    Waiting {
        /// The run.
        run: String,
        /// The signal it waits for.
        name: String,
        /// Time left until the wait's deadline.
        resume_in: Duration,
    },

    /// A signal or decision for a run that is not waiting for it (SQLSTATE `PC050`: the run waits
    /// for another signal; `PC051`: the step is not waiting for approval or was already decided;
    /// `PC052`: the run waits at another step).
    #[error("run {run}: {message}")]
    NotWaiting {
        /// The run.
        run: String,
        /// What it waits for instead.
        message: String,
    },

    /// A durable wait reached its deadline without its signal, under a policy that fails the run
    /// (the timeout is recorded as `wait_timed_out`).
    #[error("run {run}: the wait for signal `{name}` timed out")]
    WaitTimedOut {
        /// The run.
        run: String,
        /// The signal waited for.
        name: String,
    },

    /// The operation was cancelled.
    #[error("cancelled: {0}")]
    Cancelled(String),

    /// The operation did not finish in time.
    #[error("timed out after {0:?}")]
    Timeout(Duration),

    /// The client is not running (call `start()` first) or is shutting down.
    #[error("client is not running: {0}")]
    NotRunning(String),

    /// The throwaway local PostgreSQL cluster could not be created or started.
    #[error("throwaway PostgreSQL cluster: {0}")]
    Cluster(String),

    /// JSON (de)serialisation failed.
    #[error("JSON error: {0}")]
    Json(#[from] serde_json::Error),

    /// An I/O error.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),

    /// A tenant routing map names a shard that was not configured (see `pgcrew::shard`).
    #[error(
        "routing map names shard `{shard}`{} but no shard of that name is configured (configured: {configured}); add its DSN or fix the map",
        tenant.as_ref().map(|t| format!(" for tenant `{t}`")).unwrap_or_default()
    )]
    UnknownShard {
        /// The shard named.
        shard: String,
        /// The tenant routed to it, if any.
        tenant: Option<String>,
        /// The configured shard names, comma-separated.
        configured: String,
    },

    /// A tenant routing map puts one tenant on two shards.
    #[error(
        "routing map puts tenant `{tenant}` on two shards, `{first}` and `{second}`: a tenant lives on exactly one shard"
    )]
    TenantInTwoShards {
        /// The tenant.
        tenant: String,
        /// One shard.
        first: String,
        /// The other.
        second: String,
    },

    /// The routing map has no shard for this tenant.
    #[error("tenant `{tenant}` is not in the routing map: add it to a shard")]
    TenantNotRouted {
        /// The tenant.
        tenant: String,
    },

    /// The shard holding the tenant could not be reached; other shards are unaffected.
    #[error("shard `{shard}` is unavailable: {message}")]
    ShardDown {
        /// The shard.
        shard: String,
        /// What failed.
        message: String,
    },

    /// The tenant is being moved between shards: new work is refused until the move ends.
    #[error(
        "tenant `{tenant}` is moving from shard `{from}` to `{to}`: new work is refused until the move ends (reload the routing map and retry)"
    )]
    TenantMoving {
        /// The tenant.
        tenant: String,
        /// The source shard.
        from: String,
        /// The target shard.
        to: String,
    },

    /// A tenant move between shards stopped; the message says at which step and what to do.
    /// Nothing was deleted from the source unless the message says so.
    #[error("moving tenant `{tenant}`: {message}")]
    TenantTransfer {
        /// The tenant.
        tenant: String,
        /// What stopped the move.
        message: String,
    },
}

impl Error {
    /// Shorthand for [`Error::InvalidInput`].
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Error::InvalidInput {
            field,
            message: message.into(),
        }
    }

    /// Shorthand for [`Error::NotFound`].
    pub fn not_found(kind: &'static str, id: impl ToString) -> Self {
        Error::NotFound {
            kind,
            id: id.to_string(),
        }
    }

    /// True for [`Error::BudgetExceeded`] (the tenant's budget) and
    /// [`Error::RunBudgetExceeded`] (the run's budget).
    pub fn is_budget_exceeded(&self) -> bool {
        matches!(
            self,
            Error::BudgetExceeded { .. } | Error::RunBudgetExceeded { .. }
        )
    }

    /// The driver's error behind an [`Error::Database`] (a statement's error that was not
    /// classified as anything more specific), for callers that map its SQLSTATE further; any
    /// other error comes back as it is.
    pub(crate) fn into_driver(self) -> std::result::Result<tokio_postgres::Error, Error> {
        match self {
            Error::Database(e) => Ok(e),
            other => Err(other),
        }
    }

    /// The SQLSTATE code of an underlying database error, if any.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            Error::Database(e) => e.code().map(|c| c.code()),
            _ => None,
        }
    }

    /// True when the error is transient (connection lost, pool timeout, serialization failure)
    /// and the operation may succeed if retried.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Connect { .. } | Error::Pool(_) | Error::Timeout(_) => true,
            Error::Database(e) => {
                e.is_closed()
                    || matches!(
                        e.code().map(|c| c.code()),
                        Some(
                            sqlstate::SERIALIZATION_FAILURE
                                | sqlstate::DEADLOCK_DETECTED
                                | sqlstate::ADMIN_SHUTDOWN
                                | sqlstate::CRASH_SHUTDOWN
                                | sqlstate::CANNOT_CONNECT_NOW
                                | sqlstate::CONNECTION_EXCEPTION
                                | sqlstate::CONNECTION_DOES_NOT_EXIST
                                | sqlstate::CONNECTION_FAILURE
                        )
                    )
                    || e.as_db_error().is_none()
            }
            _ => false,
        }
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        classify_pg_error(e)
    }
}

impl From<deadpool_postgres::PoolError> for Error {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        use deadpool_postgres::PoolError;
        match e {
            PoolError::Backend(pg) => classify_pg_error(pg),
            PoolError::Timeout(kind) => Error::Pool(format!(
                "timed out waiting for a connection ({kind:?}); the pool may be exhausted: raise pool_size or check the database"
            )),
            other => Error::Pool(other.to_string()),
        }
    }
}

/// PostgreSQL's own words for a driver error: message, SQLSTATE, and detail, hint and
/// constraint where present (the driver's `Display` says only `db error`).
pub(crate) fn describe_pg_error(e: &tokio_postgres::Error) -> String {
    let Some(db) = e.as_db_error() else {
        return match std::error::Error::source(e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        };
    };
    let mut out = format!("{} (SQLSTATE {})", db.message(), db.code().code());
    if let Some(detail) = db.detail() {
        out.push_str(&format!("; detail: {detail}"));
    }
    if let Some(hint) = db.hint() {
        out.push_str(&format!("; hint: {hint}"));
    }
    if let Some(constraint) = db.constraint() {
        out.push_str(&format!("; constraint: {constraint}"));
    }
    out
}

/// Turn a driver error into the most specific variant, with an actionable message.
pub(crate) fn classify_pg_error(e: tokio_postgres::Error) -> Error {
    if let Some(db) = e.as_db_error() {
        match db.code().code() {
            sqlstate::INVALID_PASSWORD | sqlstate::INVALID_AUTHORIZATION => {
                return Error::Authentication {
                    message: db.message().to_string(),
                };
            }
            sqlstate::INVALID_CATALOG_NAME => {
                return Error::Connect {
                    message: format!("{} (create the database or fix the DSN)", db.message()),
                };
            }
            sqlstate::INVALID_SCHEMA_NAME => return Error::SchemaMissing,
            // A named prepared statement missing (or its name taken) on the server connection:
            // a transaction pooler moved this client to another server.
            sqlstate::INVALID_SQL_STATEMENT_NAME | sqlstate::DUPLICATE_PREPARED_STATEMENT
                if db.message().contains("prepared statement") =>
            {
                return crate::db::cached_statements_lost(&describe_pg_error(&e));
            }
            // pgcrew.money_amount / pgcrew.token_count (V012): an invalid amount or count.
            sqlstate::INVALID_AMOUNT => return Error::invalid("amount", db.message()),
            sqlstate::TOO_LARGE => return too_large_from_db(db),
            sqlstate::UNDEFINED_TABLE | sqlstate::UNDEFINED_FUNCTION
                if db.message().contains("pgcrew.") =>
            {
                return Error::SchemaMissing;
            }
            _ => {}
        }
        return Error::Database(e);
    }
    // Errors without a server response before a connection was made are connection failures.
    let text = e.to_string();
    let source = std::error::Error::source(&e).map(|s| s.to_string());
    if text.contains("error connecting")
        || text.contains("invalid connection string")
        || text.contains("configuration")
        || text.contains("timeout")
        || text.contains("TLS")
    {
        let detail = match source {
            Some(s) => format!("{text}: {s}"),
            None => text,
        };
        return Error::Connect {
            message: format!(
                "{detail} (is PostgreSQL running and is the DSN / DATABASE_URL right? e.g. postgres://user@127.0.0.1:5432/db)"
            ),
        };
    }
    Error::Database(e)
}

/// `PC040` (a run input over its database cap): the DETAIL carries
/// `{"field": ..., "size": ..., "limit": ...}`.
fn too_large_from_db(db: &tokio_postgres::error::DbError) -> Error {
    let detail: serde_json::Value = db
        .detail()
        .and_then(|d| serde_json::from_str(d).ok())
        .unwrap_or(serde_json::Value::Null);
    Error::TooLarge {
        field: detail["field"]
            .as_str()
            .map_or_else(|| db.message().to_string(), str::to_string),
        size: detail["size"].as_u64().unwrap_or(0),
        limit: detail["limit"].as_u64().unwrap_or(0),
    }
}

/// `impl Display` for enums named by their `as_str()` (the stored or printed name).
macro_rules! display_as_str {
    ($($t:ty),+ $(,)?) => {$(
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    )+};
}
pub(crate) use display_as_str;
