//! `pgcrew doctor`: a running deployment checked against a production checklist.
//!
//! [`run`] reads the server's settings and statistics and pgcrew's own tables through one
//! connection, and returns a [`Report`]: one [`Finding`] per [`CheckId`], each with a
//! [`Status`] (pass, warn, fail), a message, the things it names (instances, runs, tenants,
//! roles, connections) and, unless it passed, what to do. Nothing is written.
//!
//! | check | looks at | fails / warns when |
//! |---|---|---|
//! | `server_version` | `server_version_num` | fail below PostgreSQL 15; warn above the newest major pgcrew knows |
//! | `migrations` | `pgcrew.refinery_schema_history` | fail when the schema is missing or older than this pgcrew |
//! | `max_connections` | `max_connections`, reserved slots, `pg_stat_activity`, `pgcrew.instances` | fail when the instances' budget plus the other sessions exceed the usable slots; warn when less than the headroom is left |
//! | `idle_in_transaction_timeout` | `idle_in_transaction_session_timeout` | warn when off or very low |
//! | `statement_timeout` | `statement_timeout` | warn when set below the minimum |
//! | `tasks_autovacuum` | `autovacuum`, `track_counts`, `pgcrew.tasks` options and statistics | fail when autovacuum cannot run on the table; warn on piled-up dead tuples |
//! | `tls` | `pg_stat_ssl` joined with `pg_stat_activity` | fail when a pgcrew TCP connection does not use TLS |
//! | `leader` | `pgcrew.leader` | fail when no valid lease is held |
//! | `instances` | `pgcrew.instances` | fail when none is registered or one is silent beyond the TTL |
//! | `stuck_runs` | `pgcrew.stuck_runs` | fail when any run is listed |
//! | `queue_lag` | due available tasks in `pgcrew.tasks` | warn when a queue's oldest due task waited longer than the threshold |
//! | `tenant_budgets` | `pgcrew.tenants` | warn for tenants without a budget limit |
//! | `tenant_roles` | `pgcrew.tenant_role_bindings`, role attributes, grants, `pg_hba_file_rules` | fail for roles RLS does not apply to or that log in over TCP without a password; warn for missing or extra grants |
//! | `pg_locks_public` | the `SELECT` privilege of `PUBLIC` on `pg_locks` | warn while tenant roles are bound and it is readable |
//! | `ledger_checkpoints` | `pgcrew.ledger_checkpoints` of recently finished runs | fail when a run finished without a signed checkpoint at its head |
//! | `ledger_signatures` | the same checkpoints, with the ledger key | fail when one does not verify; warn without a key |
//!
//! A check that cannot run because the doctor's role lacks a privilege (or the schema is not
//! installed) is a warning saying so; any other error while checking is a failure naming it.
//! Run the doctor as the role that owns the pgcrew schema; a superuser (or a member of
//! `pg_read_all_stats`) also sees the connections of other roles and `pg_hba.conf`.
//!
//! ```no_run
//! # async fn demo() -> pgcrew::Result<()> {
//! use pgcrew::doctor::{self, DoctorOptions, Status};
//!
//! let db = pgcrew::Db::connect("postgres://owner@db.internal/app", 1, std::time::Duration::from_secs(10)).await?;
//! let report = doctor::run(&db, &DoctorOptions::default()).await?;
//! for f in report.findings.iter().filter(|f| f.status != Status::Pass) {
//!     println!("{} {}: {}", f.status, f.check, f.message);
//! }
//! # Ok(())
//! # }
//! ```

mod checks;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::ClientConfig;
use crate::db::Db;
use crate::error::{Error, Result};
use crate::ledger_key::LedgerKey;

/// The `application_name` the `pgcrew doctor` command connects with: its own sessions are never
/// counted as the deployment's connections.
pub const DOCTOR_APPLICATION_NAME: &str = "pgcrew-doctor";

/// The oldest PostgreSQL major version pgcrew runs on (its schema uses `security_invoker` views).
pub const MIN_SERVER_MAJOR: i32 = 15;

/// The newest PostgreSQL major version pgcrew is known to run on; newer ones are a warning.
pub const NEWEST_KNOWN_SERVER_MAJOR: i32 = 18;

/// One item of the checklist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CheckId {
    /// The server's major version is one pgcrew supports.
    ServerVersion,
    /// The schema is at the version this pgcrew expects.
    Migrations,
    /// `max_connections` leaves room for every instance's connection budget.
    MaxConnections,
    /// `idle_in_transaction_session_timeout` is set.
    IdleInTransactionTimeout,
    /// `statement_timeout` is off or not too low for pgcrew's statements.
    StatementTimeout,
    /// Autovacuum can run on `pgcrew.tasks` and keeps up.
    TasksAutovacuum,
    /// Every pgcrew connection uses TLS.
    Tls,
    /// A leader holds the maintenance lease.
    Leader,
    /// Instances are registered and heartbeat within their TTL.
    Instances,
    /// No run is listed by `pgcrew.stuck_runs`.
    StuckRuns,
    /// No queue's oldest due task has waited longer than the threshold.
    QueueLag,
    /// Every tenant has a budget limit.
    TenantBudgets,
    /// Roles bound to tenants are ones row-level security applies to, with the right grants.
    TenantRoles,
    /// `pg_locks` is not readable by every role while tenants have SQL access.
    PgLocksPublic,
    /// Recently finished runs carry a signed checkpoint at their ledger head.
    LedgerCheckpoints,
    /// A sample of those checkpoints verifies with the ledger key.
    LedgerSignatures,
}

impl CheckId {
    /// Every check, in the order [`run`] reports them.
    pub const ALL: [CheckId; 16] = [
        CheckId::ServerVersion,
        CheckId::Migrations,
        CheckId::MaxConnections,
        CheckId::IdleInTransactionTimeout,
        CheckId::StatementTimeout,
        CheckId::TasksAutovacuum,
        CheckId::Tls,
        CheckId::Leader,
        CheckId::Instances,
        CheckId::StuckRuns,
        CheckId::QueueLag,
        CheckId::TenantBudgets,
        CheckId::TenantRoles,
        CheckId::PgLocksPublic,
        CheckId::LedgerCheckpoints,
        CheckId::LedgerSignatures,
    ];

    /// The check's name (`snake_case`, as in the JSON output).
    pub fn as_str(&self) -> &'static str {
        match self {
            CheckId::ServerVersion => "server_version",
            CheckId::Migrations => "migrations",
            CheckId::MaxConnections => "max_connections",
            CheckId::IdleInTransactionTimeout => "idle_in_transaction_timeout",
            CheckId::StatementTimeout => "statement_timeout",
            CheckId::TasksAutovacuum => "tasks_autovacuum",
            CheckId::Tls => "tls",
            CheckId::Leader => "leader",
            CheckId::Instances => "instances",
            CheckId::StuckRuns => "stuck_runs",
            CheckId::QueueLag => "queue_lag",
            CheckId::TenantBudgets => "tenant_budgets",
            CheckId::TenantRoles => "tenant_roles",
            CheckId::PgLocksPublic => "pg_locks_public",
            CheckId::LedgerCheckpoints => "ledger_checkpoints",
            CheckId::LedgerSignatures => "ledger_signatures",
        }
    }
}

crate::error::display_as_str!(CheckId);

impl std::str::FromStr for CheckId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        CheckId::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| {
                Error::invalid(
                    "check",
                    format!(
                        "unknown check `{s}`; the checks are: {}",
                        CheckId::ALL.map(|c| c.as_str()).join(", ")
                    ),
                )
            })
    }
}

/// How a check came out. Ordered: `Pass < Warn < Fail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Nothing to do.
    Pass,
    /// Worth a look; does not fail the report.
    Warn,
    /// Must be fixed; the report fails (`pgcrew doctor` exits 1).
    Fail,
}

impl Status {
    /// `pass`, `warn` or `fail`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Warn => "warn",
            Status::Fail => "fail",
        }
    }
}

crate::error::display_as_str!(Status);

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    /// Which check.
    pub check: CheckId,
    /// Pass, warn or fail.
    pub status: Status,
    /// What was found, with the figures it was judged on.
    pub message: String,
    /// What the finding names (stale instances, stuck runs, tenants, roles, connections), at
    /// most [`DoctorOptions::max_items`]; a last item says how many more there are.
    pub items: Vec<String>,
    /// What to do (`None` when the check passed).
    pub advice: Option<String>,
}

impl Finding {
    fn new(check: CheckId, status: Status, message: impl Into<String>) -> Finding {
        Finding {
            check,
            status,
            message: message.into(),
            items: Vec::new(),
            advice: None,
        }
    }

    fn pass(check: CheckId, message: impl Into<String>) -> Finding {
        Finding::new(check, Status::Pass, message)
    }

    fn warn(check: CheckId, message: impl Into<String>, advice: impl Into<String>) -> Finding {
        Finding::new(check, Status::Warn, message).advice(advice)
    }

    fn fail(check: CheckId, message: impl Into<String>, advice: impl Into<String>) -> Finding {
        Finding::new(check, Status::Fail, message).advice(advice)
    }

    fn advice(mut self, advice: impl Into<String>) -> Finding {
        self.advice = Some(advice.into());
        self
    }

    fn items(mut self, items: Vec<String>, max: usize) -> Finding {
        self.items = limit_items(items, max);
        self
    }

    /// The finding of a check that could not run: a privilege the doctor's role lacks or a
    /// missing schema is a warning saying so; anything else is a failure naming the error.
    fn from_error(check: CheckId, e: &Error) -> Finding {
        match e {
            Error::SchemaMissing => Finding::warn(
                check,
                "not checked: the pgcrew schema (or the part this check reads) is not installed",
                "run `pgcrew migrate` (see the migrations check)",
            ),
            _ if e.sqlstate() == Some("42501") => Finding::warn(
                check,
                format!("not checked: the doctor's role lacks a privilege this check needs ({e})"),
                "run `pgcrew doctor` as the role that owns the pgcrew schema (the one that ran \
                 `pgcrew migrate`); the connections of other roles also need pg_read_all_stats \
                 or a superuser",
            ),
            _ => Finding::fail(
                check,
                format!("could not check: {e}"),
                "fix the error above and run `pgcrew doctor` again",
            ),
        }
    }
}

fn limit_items(mut items: Vec<String>, max: usize) -> Vec<String> {
    let max = max.max(1);
    if items.len() > max {
        let more = items.len() - max;
        items.truncate(max);
        items.push(format!("... and {more} more"));
    }
    items
}

/// Counts of findings per status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// Checks that passed.
    pub pass: usize,
    /// Checks with a warning.
    pub warn: usize,
    /// Checks that failed.
    pub fail: usize,
}

/// Every finding of one [`run`], in [`CheckId::ALL`] order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The worst status of all findings.
    pub status: Status,
    /// Counts per status.
    pub summary: Summary,
    /// One finding per check.
    pub findings: Vec<Finding>,
}

impl Report {
    /// A report of these findings (status and summary computed).
    pub fn new(findings: Vec<Finding>) -> Report {
        let mut summary = Summary::default();
        for f in &findings {
            match f.status {
                Status::Pass => summary.pass += 1,
                Status::Warn => summary.warn += 1,
                Status::Fail => summary.fail += 1,
            }
        }
        let status = findings
            .iter()
            .map(|f| f.status)
            .max()
            .unwrap_or(Status::Pass);
        Report {
            status,
            summary,
            findings,
        }
    }

    /// Whether any check failed.
    pub fn failed(&self) -> bool {
        self.status == Status::Fail
    }

    /// The finding of `check`.
    pub fn finding(&self, check: CheckId) -> Option<&Finding> {
        self.findings.iter().find(|f| f.check == check)
    }
}

/// What the doctor judges against. [`DoctorOptions::default`] uses the defaults of
/// [`ClientConfig`]; [`DoctorOptions::for_client_config`] the configuration the instances run
/// with.
#[derive(Debug, Clone)]
pub struct DoctorOptions {
    /// An instance silent for longer than this is stale (the instances' `instance_ttl`; default
    /// 2 min).
    pub instance_ttl: Duration,
    /// The leader lease that must be held (default `default`, the one [`crate::Client`] takes).
    pub lease_name: String,
    /// The connections one instance may open (its pool and its coordination connection, which
    /// is also its LISTEN connection); default: [`connections_per_instance`] of [`ClientConfig::default`].
    pub connections_per_instance: u32,
    /// The share of the usable connection slots to keep free (default 0.2): more in use (by the
    /// instances' budget and the other open sessions) is a warning.
    pub connection_headroom: f64,
    /// Connections to this database whose `application_name` starts with this are pgcrew's
    /// (default `pgcrew`, what pgcrew connects with unless the DSN names another;
    /// [`DOCTOR_APPLICATION_NAME`] never counts).
    pub application_name_prefix: String,
    /// A queue whose oldest due, available task has waited longer than this is a warning
    /// (default 1 min).
    pub max_queue_lag: Duration,
    /// A `statement_timeout` below this (and not 0) is a warning (default 10 s).
    pub min_statement_timeout: Duration,
    /// An `idle_in_transaction_session_timeout` below this (and not 0) is a warning (default 1 s).
    pub min_idle_in_transaction_timeout: Duration,
    /// Dead tuples in `pgcrew.tasks` above this share of the live ones are a warning (default
    /// 0.2), once there are at least [`DoctorOptions::min_dead_tuples`].
    pub max_dead_tuple_ratio: f64,
    /// Fewer dead tuples than this are never a warning (default 10 000).
    pub min_dead_tuples: i64,
    /// Runs finished within this window are checked for signed checkpoints (default 24 h).
    pub ledger_window: Duration,
    /// At most this many of them, newest first (default 200).
    pub ledger_sample: i64,
    /// The ledger key, to verify the checkpoints' signatures (without it they are not verified,
    /// which is a warning).
    pub ledger_key: Option<LedgerKey>,
    /// At most this many items named per finding (default 10).
    pub max_items: usize,
}

/// The connections one instance configured by `config` opens at most, LISTEN included:
/// [`ClientConfig::connections_needed`] (its pool plus the one coordination connection, which is
/// also the LISTEN connection).
pub fn connections_per_instance(config: &ClientConfig) -> u32 {
    u32::try_from(config.connections_needed()).unwrap_or(u32::MAX)
}

impl Default for DoctorOptions {
    fn default() -> Self {
        DoctorOptions::for_client_config(&ClientConfig::default())
    }
}

impl DoctorOptions {
    /// The defaults, judged against instances configured by `config` (its instance TTL and
    /// connection budget).
    pub fn for_client_config(config: &ClientConfig) -> DoctorOptions {
        DoctorOptions {
            instance_ttl: config.instance_ttl,
            lease_name: crate::coord::leader::DEFAULT_LEASE.to_string(),
            connections_per_instance: connections_per_instance(config),
            connection_headroom: 0.2,
            application_name_prefix: "pgcrew".to_string(),
            max_queue_lag: Duration::from_secs(60),
            min_statement_timeout: Duration::from_secs(10),
            min_idle_in_transaction_timeout: Duration::from_secs(1),
            max_dead_tuple_ratio: 0.2,
            min_dead_tuples: 10_000,
            ledger_window: Duration::from_secs(24 * 3600),
            ledger_sample: 200,
            ledger_key: None,
            max_items: 10,
        }
    }

    /// Check the thresholds ([`Error::InvalidInput`] naming the first bad one).
    pub fn validate(&self) -> Result<()> {
        if self.instance_ttl.is_zero() {
            return Err(Error::invalid("instance_ttl", "must be greater than zero"));
        }
        if self.lease_name.trim().is_empty() {
            return Err(Error::invalid("lease_name", "must not be empty"));
        }
        if self.connections_per_instance == 0 {
            return Err(Error::invalid(
                "connections_per_instance",
                "must be at least 1",
            ));
        }
        if !(0.0..1.0).contains(&self.connection_headroom) {
            return Err(Error::invalid(
                "connection_headroom",
                format!(
                    "is {}; give a fraction from 0 (none) up to, not including, 1",
                    self.connection_headroom
                ),
            ));
        }
        if !self.max_dead_tuple_ratio.is_finite() || self.max_dead_tuple_ratio < 0.0 {
            return Err(Error::invalid(
                "max_dead_tuple_ratio",
                format!(
                    "is {}; give a non-negative fraction (e.g. 0.2)",
                    self.max_dead_tuple_ratio
                ),
            ));
        }
        if self.min_dead_tuples < 0 {
            return Err(Error::invalid("min_dead_tuples", "must not be negative"));
        }
        if self.ledger_window.is_zero() {
            return Err(Error::invalid("ledger_window", "must be greater than zero"));
        }
        if self.ledger_sample < 1 {
            return Err(Error::invalid("ledger_sample", "must be at least 1"));
        }
        if self.max_items == 0 {
            return Err(Error::invalid("max_items", "must be at least 1"));
        }
        Ok(())
    }
}

/// Run every check against the deployment behind `db` (one pooled connection; nothing is
/// written). Fails only when the options are invalid or no connection can be taken; a check
/// that cannot run is reported as its finding.
#[tracing::instrument(skip(db, options), err)]
pub async fn run(db: &Db, options: &DoctorOptions) -> Result<Report> {
    options.validate()?;
    let conn = db.get().await?;
    Ok(checks::run_all(&conn, options).await)
}
