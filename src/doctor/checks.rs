//! The checks of [`super::run`], each reading through the doctor's one connection.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tokio_postgres::Client;

use super::{
    CheckId, DOCTOR_APPLICATION_NAME, DoctorOptions, Finding, MIN_SERVER_MAJOR,
    NEWEST_KNOWN_SERVER_MAJOR, Report,
};
use crate::error::{Error, Result};
use crate::ids::RunId;

/// The settings read once for all checks.
const SETTINGS: &[&str] = &[
    "server_version",
    "server_version_num",
    "max_connections",
    "superuser_reserved_connections",
    "reserved_connections",
    "idle_in_transaction_session_timeout",
    "statement_timeout",
    "autovacuum",
    "track_counts",
];

/// A setting as `pg_settings` shows it.
#[derive(Debug, Clone)]
struct Setting {
    value: String,
    unit: Option<String>,
}

/// A backend from `pg_stat_activity` (with `pg_stat_ssl`).
#[derive(Debug, Clone)]
struct Backend {
    pid: i32,
    this_db: bool,
    usename: Option<String>,
    application_name: String,
    backend_type: Option<String>,
    client_addr: Option<String>,
    client_port: Option<i32>,
    has_user: bool,
    hidden: bool,
    ssl: Option<bool>,
    tls_version: Option<String>,
}

impl Backend {
    /// A client session (it takes a `max_connections` slot). A session hidden from this role
    /// shows no backend type; one with a user is a client session (background processes have
    /// none).
    fn is_client(&self) -> bool {
        match self.backend_type.as_deref() {
            Some(t) => t == "client backend",
            None => self.hidden && self.has_user,
        }
    }

    fn is_pgcrew(&self, prefix: &str) -> bool {
        self.is_client()
            && self.this_db
            && self.application_name.starts_with(prefix)
            && self.application_name != DOCTOR_APPLICATION_NAME
    }

    fn unix_socket(&self) -> bool {
        self.client_port == Some(-1)
    }

    fn describe(&self) -> String {
        let from = match (&self.client_addr, self.client_port) {
            (_, Some(-1)) => "a unix socket".to_string(),
            (Some(a), Some(p)) => format!("{a}:{p}"),
            (Some(a), None) => a.clone(),
            (None, _) => "an unknown address".to_string(),
        };
        format!(
            "pid {} user {} from {} (application_name {})",
            self.pid,
            self.usename.as_deref().unwrap_or("?"),
            from,
            if self.application_name.is_empty() {
                "not set"
            } else {
                &self.application_name
            }
        )
    }
}

struct Ctx<'a> {
    client: &'a Client,
    opts: &'a DoctorOptions,
    settings: std::result::Result<HashMap<String, Setting>, String>,
    backends: Option<Vec<Backend>>,
    instances: Option<Vec<InstanceRow>>,
}

#[derive(Debug, Clone)]
struct InstanceRow {
    id: String,
    hostname: String,
    pid: i32,
    silent_ms: i64,
}

pub(super) async fn run_all(client: &Client, opts: &DoctorOptions) -> Report {
    let settings = read_settings(client).await.map_err(|e| e.to_string());
    let mut ctx = Ctx {
        client,
        opts,
        settings,
        backends: None,
        instances: None,
    };
    let mut findings = Vec::with_capacity(CheckId::ALL.len());
    for check in CheckId::ALL {
        let result = match check {
            CheckId::ServerVersion => server_version(&ctx),
            CheckId::Migrations => migrations(&ctx).await,
            CheckId::MaxConnections => max_connections(&mut ctx).await,
            CheckId::IdleInTransactionTimeout => idle_in_transaction(&ctx),
            CheckId::StatementTimeout => statement_timeout(&ctx),
            CheckId::TasksAutovacuum => tasks_autovacuum(&ctx).await,
            CheckId::Tls => tls(&mut ctx).await,
            CheckId::Leader => leader(&ctx).await,
            CheckId::Instances => instances(&mut ctx).await,
            CheckId::StuckRuns => stuck_runs(&ctx).await,
            CheckId::QueueLag => queue_lag(&ctx).await,
            CheckId::TenantBudgets => tenant_budgets(&ctx).await,
            CheckId::TenantRoles => tenant_roles(&ctx).await,
            CheckId::PgLocksPublic => pg_locks_public(&ctx).await,
            CheckId::LedgerCheckpoints => ledger_checkpoints(&ctx).await,
            CheckId::LedgerSignatures => ledger_signatures(&ctx).await,
        };
        findings.push(result.unwrap_or_else(|e| Finding::from_error(check, &e)));
    }
    Report::new(findings)
}

async fn read_settings(client: &Client) -> Result<HashMap<String, Setting>> {
    let names: Vec<&str> = SETTINGS.to_vec();
    let rows = client.query(sql!("doctor/settings"), &[&names]).await?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get::<_, String>("name")?,
                Setting {
                    value: r.try_get("setting")?,
                    unit: r.try_get("unit")?,
                },
            ))
        })
        .collect()
}

impl Ctx<'_> {
    fn setting(&self, name: &str) -> Result<Option<&Setting>> {
        match &self.settings {
            Ok(s) => Ok(s.get(name)),
            Err(e) => Err(Error::Config(format!(
                "the server settings could not be read: {e}"
            ))),
        }
    }

    fn required(&self, name: &str) -> Result<&Setting> {
        self.setting(name)?
            .ok_or_else(|| Error::Config(format!("the server has no setting `{name}`")))
    }

    fn int(&self, name: &str) -> Result<i64> {
        let s = self.required(name)?;
        s.value.parse().map_err(|_| {
            Error::Config(format!("setting `{name}` is `{}`, not an integer", s.value))
        })
    }

    /// A time setting in milliseconds (`pg_settings` gives the value in its unit).
    fn millis(&self, name: &str) -> Result<i64> {
        let v = self.int(name)?;
        let s = self.required(name)?;
        Ok(match s.unit.as_deref() {
            Some("s") => v.saturating_mul(1000),
            Some("min") => v.saturating_mul(60_000),
            Some("us") => v / 1000,
            _ => v,
        })
    }

    fn on(&self, name: &str) -> Result<bool> {
        Ok(self.required(name)?.value == "on")
    }

    /// `pg_stat_activity`, read once (an error is returned as it is, and read again next time).
    async fn backends(&mut self) -> Result<&Vec<Backend>> {
        if self.backends.is_none() {
            self.backends = Some(read_backends(self.client).await?);
        }
        self.backends
            .as_ref()
            .ok_or_else(|| Error::Config("pg_stat_activity was not read".into()))
    }

    /// `pgcrew.instances`, read once (an error is returned as it is, and read again next time).
    async fn instances(&mut self) -> Result<&Vec<InstanceRow>> {
        if self.instances.is_none() {
            self.instances = Some(read_instances(self.client).await?);
        }
        self.instances
            .as_ref()
            .ok_or_else(|| Error::Config("pgcrew.instances was not read".into()))
    }
}

async fn read_backends(client: &Client) -> Result<Vec<Backend>> {
    let rows = client.query(sql!("doctor/backends"), &[]).await?;
    rows.iter()
        .map(|r| {
            Ok(Backend {
                pid: r.try_get("pid")?,
                this_db: r.try_get("this_db")?,
                usename: r.try_get("usename")?,
                application_name: r.try_get("application_name")?,
                backend_type: r.try_get("backend_type")?,
                client_addr: r.try_get("client_addr")?,
                client_port: r.try_get("client_port")?,
                has_user: r.try_get("has_user")?,
                hidden: r.try_get("hidden")?,
                ssl: r.try_get("ssl")?,
                tls_version: r.try_get("tls_version")?,
            })
        })
        .collect()
}

async fn read_instances(client: &Client) -> Result<Vec<InstanceRow>> {
    let rows = client.query(sql!("doctor/instances"), &[]).await?;
    rows.iter()
        .map(|r| {
            Ok(InstanceRow {
                id: r.try_get("id")?,
                hostname: r.try_get("hostname")?,
                pid: r.try_get("pid")?,
                silent_ms: r.try_get("silent_ms")?,
            })
        })
        .collect()
}

/// `26h 2m 3s` for whole seconds (hours as the largest unit; under a second, milliseconds).
fn human(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        return format!("{}ms", d.as_millis());
    }
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut parts = Vec::new();
    if h > 0 {
        parts.push(format!("{h}h"));
    }
    if m > 0 {
        parts.push(format!("{m}m"));
    }
    if s > 0 {
        parts.push(format!("{s}s"));
    }
    parts.join(" ")
}

fn human_secs(secs: f64) -> String {
    human(Duration::from_secs_f64(secs.max(0.0)))
}

fn human_ms(ms: i64) -> String {
    human(Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
}

fn percent(part: f64, whole: f64) -> String {
    if whole <= 0.0 {
        return "-".into();
    }
    format!("{:.0} %", part / whole * 100.0)
}

// ------------------------------------------------------------------------------------------
// Server
// ------------------------------------------------------------------------------------------

fn server_version(ctx: &Ctx<'_>) -> Result<Finding> {
    let check = CheckId::ServerVersion;
    let num = ctx.int("server_version_num")?;
    let text = ctx.required("server_version")?.value.clone();
    let major = i32::try_from(num / 10_000).unwrap_or(i32::MAX);
    Ok(if major < MIN_SERVER_MAJOR {
        Finding::fail(
            check,
            format!(
                "PostgreSQL {text} (major {major}): pgcrew needs PostgreSQL {MIN_SERVER_MAJOR} or newer"
            ),
            format!(
                "upgrade the server to PostgreSQL {MIN_SERVER_MAJOR} or newer (pg_upgrade, or a \
                 dump and restore); pgcrew's schema uses security_invoker views"
            ),
        )
    } else if major > NEWEST_KNOWN_SERVER_MAJOR {
        Finding::warn(
            check,
            format!(
                "PostgreSQL {text} (major {major}) is newer than any major this pgcrew knows \
                 ({MIN_SERVER_MAJOR} to {NEWEST_KNOWN_SERVER_MAJOR})"
            ),
            "run the test suite against this server before relying on it, or upgrade pgcrew",
        )
    } else {
        Finding::pass(
            check,
            format!(
                "PostgreSQL {text} (major {major}; pgcrew runs on {MIN_SERVER_MAJOR} to {NEWEST_KNOWN_SERVER_MAJOR})"
            ),
        )
    })
}

/// The schema version, classified as [`Db::check_schema`](crate::Db::check_schema) does (read on
/// the doctor's connection: the doctor's pool has no second one).
async fn schema_version(client: &Client, latest: i64) -> Result<i64> {
    let exists: bool = client
        .query_one(sql!("db/schema_history_exists"), &[])
        .await?
        .try_get(0)?;
    if !exists {
        return Err(Error::SchemaMissing);
    }
    let v: i64 = client
        .query_one(sql!("db/schema_version"), &[])
        .await?
        .try_get(0)?;
    match v {
        v if v > latest => Err(Error::SchemaTooNew {
            database: v,
            supported: latest,
            crate_version: crate::VERSION,
        }),
        v if v < latest => Err(Error::SchemaOutdated {
            database: v,
            required: latest,
        }),
        v => Ok(v),
    }
}

async fn migrations(ctx: &Ctx<'_>) -> Result<Finding> {
    let check = CheckId::Migrations;
    let latest = crate::db::latest_version();
    Ok(match schema_version(ctx.client, latest).await {
        Ok(v) => Finding::pass(
            check,
            format!("schema at version {v}, the newest this pgcrew knows"),
        ),
        Err(Error::SchemaMissing) => Finding::fail(
            check,
            "the pgcrew schema is not installed in this database",
            "run `pgcrew migrate` (or build one client with `.migrate(true)`) as the role that \
             will own the schema",
        ),
        Err(Error::SchemaOutdated { database, required }) => Finding::fail(
            check,
            format!("schema at version {database}; this pgcrew needs version {required}"),
            "run `pgcrew migrate` with this pgcrew (migrations are idempotent and safe while \
             instances run)",
        ),
        Err(Error::SchemaTooNew {
            database,
            supported,
            crate_version,
        }) => Finding::warn(
            check,
            format!(
                "schema at version {database}, newer than this pgcrew ({crate_version}) knows \
                 (up to {supported}); its other checks may misread the schema"
            ),
            format!(
                "run the doctor of the pgcrew version the deployment runs (schema version \
                 {database}; this one knows {latest})"
            ),
        ),
        Err(e) => return Err(e),
    })
}

async fn max_connections(ctx: &mut Ctx<'_>) -> Result<Finding> {
    let check = CheckId::MaxConnections;
    let max = ctx.int("max_connections")?;
    let superuser_reserved = ctx.int("superuser_reserved_connections")?;
    let reserved = match ctx.setting("reserved_connections")? {
        Some(_) => ctx.int("reserved_connections")?,
        None => 0,
    };
    let usable = (max - superuser_reserved - reserved).max(0);
    let per_instance = i64::from(ctx.opts.connections_per_instance);
    // Without the instances table (no schema, no privilege) the live connections still count.
    let instances = match ctx.instances().await {
        Ok(i) => Some(i.len() as i64),
        Err(_) => None,
    };
    let prefix = ctx.opts.application_name_prefix.clone();
    let headroom = ctx.opts.connection_headroom;
    let max_items = ctx.opts.max_items;
    let backends = ctx.backends().await?;
    let mut live_pgcrew = 0i64;
    let mut others = 0i64;
    let mut groups: BTreeMap<(String, String), i64> = BTreeMap::new();
    for b in backends.iter().filter(|b| b.is_client()) {
        if b.is_pgcrew(&prefix) {
            live_pgcrew += 1;
            let from = match (&b.client_addr, b.unix_socket()) {
                (_, true) => "a unix socket".to_string(),
                (Some(a), false) => a.clone(),
                (None, false) => "an address hidden from this role".to_string(),
            };
            *groups
                .entry((b.application_name.clone(), from))
                .or_default() += 1;
        } else {
            others += 1;
        }
    }
    let budget = instances.map(|n| n * per_instance).unwrap_or(0);
    let needed = budget.max(live_pgcrew);
    let total = needed + others;
    let items: Vec<String> = groups
        .into_iter()
        .map(|((app, from), n)| format!("{app} from {from}: {n} open"))
        .collect();
    let instances_text = match instances {
        Some(n) => format!("{n} instance(s) x {per_instance} = {budget}"),
        None => "the instances table could not be read".to_string(),
    };
    let message = format!(
        "max_connections = {max} ({usable} usable: {superuser_reserved} reserved for superusers, \
         {reserved} reserved); pgcrew's budget: {instances_text} (open now: {live_pgcrew}); \
         other sessions open now: {others}; in use at most {total} of {usable} ({}), headroom \
         kept: {:.0} %",
        percent(total as f64, usable as f64),
        headroom * 100.0
    );
    let advice = "raise max_connections (takes a restart), lower the instances' connection \
                  budget (pool_size), or put PgBouncer in transaction mode in front of the pools \
                  (LISTEN stays direct)";
    Ok(if total > usable {
        Finding::fail(
            check,
            format!(
                "{message}: the server refuses connections before every instance has its budget"
            ),
            advice,
        )
        .items(items, max_items)
    } else if (total as f64) > (usable as f64) * (1.0 - headroom) {
        Finding::warn(
            check,
            format!("{message}: less than the headroom is left"),
            advice,
        )
        .items(items, max_items)
    } else {
        Finding::pass(check, message).items(items, max_items)
    })
}

fn idle_in_transaction(ctx: &Ctx<'_>) -> Result<Finding> {
    let check = CheckId::IdleInTransactionTimeout;
    let ms = ctx.millis("idle_in_transaction_session_timeout")?;
    let min = ctx.opts.min_idle_in_transaction_timeout;
    let advice = "set it for the role pgcrew connects as, e.g. `ALTER ROLE <pgcrew role> SET \
                  idle_in_transaction_session_timeout = '60s'` (or for the database, or in \
                  postgresql.conf)";
    Ok(if ms == 0 {
        Finding::warn(
            check,
            "idle_in_transaction_session_timeout is off: a session left idle inside a \
             transaction (a crashed or hung client) keeps its locks and row versions until \
             someone ends it, and vacuum of pgcrew.tasks cannot remove dead tuples behind it",
            advice,
        )
    } else if (ms as u128) < min.as_millis() {
        Finding::warn(
            check,
            format!(
                "idle_in_transaction_session_timeout = {} is below {}: a busy client pausing \
                 between the statements of one transaction loses its connection",
                human_ms(ms),
                human(min)
            ),
            advice,
        )
    } else {
        Finding::pass(
            check,
            format!("idle_in_transaction_session_timeout = {}", human_ms(ms)),
        )
    })
}

fn statement_timeout(ctx: &Ctx<'_>) -> Result<Finding> {
    let check = CheckId::StatementTimeout;
    let ms = ctx.millis("statement_timeout")?;
    let min = ctx.opts.min_statement_timeout;
    Ok(if ms == 0 {
        Finding::pass(
            check,
            "statement_timeout is off (pgcrew's statements are short; maintenance works in \
             batches)",
        )
    } else if (ms as u128) < min.as_millis() {
        Finding::warn(
            check,
            format!(
                "statement_timeout = {} is below {}: migrations, retention batches and large \
                 claims can be cancelled half-way and retried forever",
                human_ms(ms),
                human(min)
            ),
            format!(
                "raise it to at least {} for the role pgcrew connects as (`ALTER ROLE <pgcrew \
                 role> SET statement_timeout = '30s'`), or turn it off for that role",
                human(min)
            ),
        )
    } else {
        Finding::pass(check, format!("statement_timeout = {}", human_ms(ms)))
    })
}

fn reloption_off(options: &[String], name: &str) -> bool {
    options.iter().any(|o| {
        o.split_once('=').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case(name)
                && matches!(
                    v.trim().to_ascii_lowercase().as_str(),
                    "false" | "off" | "no" | "0" | "f" | "n"
                )
        })
    })
}

async fn tasks_autovacuum(ctx: &Ctx<'_>) -> Result<Finding> {
    let check = CheckId::TasksAutovacuum;
    let row = ctx
        .client
        .query_one(sql!("doctor/tasks_autovacuum"), &[])
        .await?;
    let reloptions: Vec<String> = row.try_get("reloptions")?;
    let toast: Vec<String> = row.try_get("toast_reloptions")?;
    let live: i64 = row.try_get("n_live_tup")?;
    let dead: i64 = row.try_get("n_dead_tup")?;
    let vacuumed: Option<f64> = row.try_get("vacuumed_s_ago")?;
    let autovacuum_on = ctx.on("autovacuum")?;
    let track_counts = ctx.on("track_counts")?;
    let mut off = Vec::new();
    if !autovacuum_on {
        off.push("autovacuum = off on the server".to_string());
    }
    if !track_counts {
        off.push("track_counts = off on the server (autovacuum needs it)".to_string());
    }
    if reloption_off(&reloptions, "autovacuum_enabled") {
        off.push("pgcrew.tasks has autovacuum_enabled = false".to_string());
    }
    if reloption_off(&toast, "autovacuum_enabled") {
        off.push("pgcrew.tasks's TOAST table has autovacuum_enabled = false".to_string());
    }
    let last = match vacuumed {
        Some(s) => format!("last vacuumed {} ago", human_secs(s)),
        None => "never vacuumed since the statistics were reset".to_string(),
    };
    let figures = format!("{live} live and {dead} dead tuples, {last}");
    if !off.is_empty() {
        return Ok(Finding::fail(
            check,
            format!(
                "autovacuum cannot run on pgcrew.tasks ({figures}): every claim and \
                 acknowledgement leaves a dead row version, and the table and its indexes bloat \
                 until claims slow down",
            ),
            "turn it back on: `ALTER TABLE pgcrew.tasks RESET (autovacuum_enabled)` (and \
             `toast.autovacuum_enabled`), `autovacuum = on` and `track_counts = on` in \
             postgresql.conf",
        )
        .items(off, ctx.opts.max_items));
    }
    let over = dead >= ctx.opts.min_dead_tuples
        && (dead as f64) > ctx.opts.max_dead_tuple_ratio * (live.max(0) as f64);
    Ok(if over {
        Finding::warn(
            check,
            format!(
                "{figures}: more than {:.0} % of the live tuples are dead; autovacuum is not \
                 keeping up",
                ctx.opts.max_dead_tuple_ratio * 100.0
            ),
            "look for what holds vacuum back: long transactions and idle-in-transaction \
             sessions (pg_stat_activity.xact_start), abandoned replication slots and prepared \
             transactions; then `VACUUM (VERBOSE) pgcrew.tasks`",
        )
    } else {
        Finding::pass(check, format!("autovacuum on; {figures}"))
    })
}

// ------------------------------------------------------------------------------------------
// Connections
// ------------------------------------------------------------------------------------------

async fn tls(ctx: &mut Ctx<'_>) -> Result<Finding> {
    let check = CheckId::Tls;
    let own = ctx.client.query_opt(sql!("doctor/own_tls"), &[]).await?;
    let own_text = match own {
        Some(r) if r.try_get::<_, bool>("unix_socket")? => "a unix socket".to_string(),
        Some(r) if r.try_get::<_, Option<bool>>("ssl")? == Some(true) => format!(
            "TLS ({})",
            r.try_get::<_, Option<String>>("version")?
                .unwrap_or_else(|| "?".into())
        ),
        Some(_) => "no TLS".to_string(),
        None => "unknown".to_string(),
    };
    let prefix = ctx.opts.application_name_prefix.clone();
    let max_items = ctx.opts.max_items;
    let backends = ctx.backends().await?;
    let pgcrew: Vec<&Backend> = backends.iter().filter(|b| b.is_pgcrew(&prefix)).collect();
    let advice_plain = "connect every instance with TLS: `sslmode=verify-full` (with \
                        `sslrootcert=<CA file>` or `system`) in its DSN (DATABASE_URL) and in \
                        listen_dsn; turn `ssl = on` on with a server certificate; then make \
                        pg_hba.conf accept pgcrew's role over `hostssl` lines only. Instances \
                        on the database host may use a unix socket instead";
    if pgcrew.is_empty() {
        return Ok(Finding::warn(
            check,
            format!(
                "no pgcrew connection to this database is open (application_name `{prefix}...`), \
                 so none could be checked (this doctor's connection: {own_text})"
            ),
            "run the doctor while the instances run; if they connect with another \
             application_name, pass it (--application-name-prefix)",
        ));
    }
    let plain: Vec<&&Backend> = pgcrew
        .iter()
        .filter(|b| !b.hidden && !b.unix_socket() && b.ssl != Some(true))
        .collect();
    let hidden: Vec<&&Backend> = pgcrew.iter().filter(|b| b.hidden).collect();
    let unix = pgcrew.iter().filter(|b| b.unix_socket()).count();
    let tls: Vec<&&Backend> = pgcrew.iter().filter(|b| b.ssl == Some(true)).collect();
    let mut versions: Vec<String> = tls.iter().filter_map(|b| b.tls_version.clone()).collect();
    versions.sort();
    versions.dedup();
    let unix_text = if unix > 0 {
        format!("; {unix} over a unix socket, where TLS does not apply")
    } else {
        String::new()
    };
    if !plain.is_empty() {
        return Ok(Finding::fail(
            check,
            format!(
                "{} of {} pgcrew connection(s) do not use TLS{unix_text} (this doctor's \
                 connection: {own_text})",
                plain.len(),
                pgcrew.len()
            ),
            advice_plain,
        )
        .items(plain.iter().map(|b| b.describe()).collect(), max_items));
    }
    if !hidden.is_empty() {
        return Ok(Finding::warn(
            check,
            format!(
                "{} of {} pgcrew connection(s) belong to other roles, whose TLS state this role \
                 cannot see; the {} visible use TLS{unix_text}",
                hidden.len(),
                pgcrew.len(),
                pgcrew.len() - hidden.len()
            ),
            "run the doctor as a superuser or a member of pg_read_all_stats \
             (`GRANT pg_read_all_stats TO <doctor role>`)",
        )
        .items(hidden.iter().map(|b| b.describe()).collect(), max_items));
    }
    Ok(Finding::pass(
        check,
        format!(
            "{} pgcrew connection(s): {} use TLS{}{unix_text} (this doctor's connection: \
             {own_text})",
            pgcrew.len(),
            tls.len(),
            if versions.is_empty() {
                String::new()
            } else {
                format!(" ({})", versions.join(", "))
            }
        ),
    ))
}

// ------------------------------------------------------------------------------------------
// Coordination
// ------------------------------------------------------------------------------------------

async fn leader(ctx: &Ctx<'_>) -> Result<Finding> {
    let check = CheckId::Leader;
    let name = &ctx.opts.lease_name;
    let row = ctx.client.query_opt(sql!("doctor/leader"), &[name]).await?;
    let advice = "make sure at least one instance runs with leader election on (the default); \
                  while nobody leads, maintenance stops: stale instances and their claims are not \
                  released, stuck runs are not failed, retention does not run";
    let Some(row) = row else {
        return Ok(Finding::fail(
            check,
            format!("no leader: nobody holds the lease `{name}`"),
            advice,
        ));
    };
    let leader_id: String = row.try_get("leader_id")?;
    let term: i64 = row.try_get("term")?;
    let valid: bool = row.try_get("valid")?;
    let remaining: i64 = row.try_get("remaining_ms")?;
    let registered: bool = row.try_get("registered")?;
    Ok(if !valid {
        Finding::fail(
            check,
            format!(
                "no leader: the lease `{name}` of {leader_id} (term {term}) expired {} ago and \
                 nobody took it over",
                human_ms(-remaining)
            ),
            advice,
        )
        .items(vec![leader_id], ctx.opts.max_items)
    } else if !registered {
        Finding::warn(
            check,
            format!(
                "the lease `{name}` is held by {leader_id} (term {term}, {} left), which is \
                 not a registered instance",
                human_ms(remaining)
            ),
            "something outside pgcrew's instances holds the lease (a script, an old \
             process): find it; the lease lapses by itself unless renewed",
        )
        .items(vec![leader_id], ctx.opts.max_items)
    } else {
        Finding::pass(
            check,
            format!(
                "{leader_id} leads (lease `{name}`, term {term}, renewed: {} left)",
                human_ms(remaining)
            ),
        )
    })
}

async fn instances(ctx: &mut Ctx<'_>) -> Result<Finding> {
    let check = CheckId::Instances;
    let ttl = ctx.opts.instance_ttl;
    let max_items = ctx.opts.max_items;
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    let rows = ctx.instances().await?.clone();
    if rows.is_empty() {
        return Ok(Finding::fail(
            check,
            "no instance is registered: nothing works the queues or runs agents",
            "start the instances (a service linking pgcrew, or `pgcrew serve`) against this \
             database",
        ));
    }
    let stale: Vec<&InstanceRow> = rows.iter().filter(|r| r.silent_ms > ttl_ms).collect();
    let loudest = rows.iter().map(|r| r.silent_ms).max().unwrap_or(0);
    if !stale.is_empty() {
        return Ok(Finding::fail(
            check,
            format!(
                "{} of {} instance(s) silent for longer than the instance TTL ({})",
                stale.len(),
                rows.len(),
                human(ttl)
            ),
            "a stale instance has stopped (or lost the database) without deregistering; the \
             leader removes it and releases its claims and run leases. If it is still \
             running, find out why its heartbeats stop (pool exhausted, network); if no \
             leader is removing it, see the leader check",
        )
        .items(
            stale
                .iter()
                .map(|r| {
                    format!(
                        "{} (host {}, pid {}): silent for {}",
                        r.id,
                        r.hostname,
                        r.pid,
                        human_ms(r.silent_ms)
                    )
                })
                .collect(),
            max_items,
        ));
    }
    Ok(Finding::pass(
        check,
        format!(
            "{} instance(s), all heartbeating (longest silence {}, TTL {})",
            rows.len(),
            human_ms(loudest),
            human(ttl)
        ),
    ))
}

async fn stuck_runs(ctx: &Ctx<'_>) -> Result<Finding> {
    let check = CheckId::StuckRuns;
    let limit = i64::try_from(ctx.opts.max_items).unwrap_or(i64::MAX);
    let rows = ctx
        .client
        .query(sql!("doctor/stuck_runs"), &[&limit])
        .await?;
    let Some(first) = rows.first() else {
        return Ok(Finding::pass(
            check,
            "no run is stuck (pgcrew.stuck_runs is empty)",
        ));
    };
    let total: i64 = first.try_get("total")?;
    let mut items = Vec::with_capacity(rows.len() + 1);
    for r in &rows {
        let run: RunId = r.try_get("run_id")?;
        let tenant: String = r.try_get("tenant_id")?;
        let agent: Option<String> = r.try_get("agent_name")?;
        let state: String = r.try_get("state")?;
        let reason: String = r.try_get("reason")?;
        let age: f64 = r.try_get("age_s")?;
        items.push(format!(
            "run {run} (tenant {tenant}, agent {}, {state}): {reason}, age {}",
            agent.as_deref().unwrap_or("-"),
            human_secs(age)
        ));
    }
    if total > rows.len() as i64 {
        items.push(format!("... and {} more", total - rows.len() as i64));
    }
    Ok(Finding {
        items,
        ..Finding::fail(
            check,
            format!("{total} stuck run(s) in pgcrew.stuck_runs"),
            "a running run whose lease expired or whose instance is gone is resumed by an \
             instance serving its agent, or failed by the leader's maintenance after \
             stuck_run_timeout: check that the leader and such instances run. A pending run \
             older than an hour has no instance serving its agent. Cancel what should not \
             run with `pgcrew run cancel <run>`",
        )
    })
}

async fn queue_lag(ctx: &Ctx<'_>) -> Result<Finding> {
    let check = CheckId::QueueLag;
    let rows = ctx.client.query(sql!("doctor/queue_lag"), &[]).await?;
    let max = ctx.opts.max_queue_lag.as_secs_f64();
    let mut over = Vec::new();
    let mut worst: Option<(String, f64)> = None;
    for r in &rows {
        let queue: String = r.try_get("queue")?;
        let due: i64 = r.try_get("due")?;
        let lag: f64 = r.try_get("lag_s")?;
        if worst.as_ref().is_none_or(|(_, w)| lag > *w) {
            worst = Some((queue.clone(), lag));
        }
        if lag > max {
            over.push(format!(
                "queue {queue}: {due} due task(s), the oldest waiting {}",
                human_secs(lag)
            ));
        }
    }
    let threshold = human(ctx.opts.max_queue_lag);
    Ok(match worst {
        None => Finding::pass(check, "no task is waiting to be claimed"),
        Some(_) if !over.is_empty() => Finding::warn(
            check,
            format!(
                "{} queue(s) lag more than {threshold} (the oldest due, available task's wait)",
                over.len()
            ),
            "no running instance works these queues, their workers are saturated, or tenant \
             concurrency limits hold the tasks back: check `pgcrew tasks stats`, the instances' \
             queues and concurrency, and `pgcrew tenants list`",
        )
        .items(over, ctx.opts.max_items),
        Some((queue, lag)) => Finding::pass(
            check,
            format!(
                "{} queue(s) with due tasks; the longest wait is {} (queue {queue}), within \
                 {threshold}",
                rows.len(),
                human_secs(lag)
            ),
        ),
    })
}

// ------------------------------------------------------------------------------------------
// Tenancy
// ------------------------------------------------------------------------------------------

async fn tenant_budgets(ctx: &Ctx<'_>) -> Result<Finding> {
    let check = CheckId::TenantBudgets;
    let row = ctx
        .client
        .query_one(sql!("doctor/tenants_without_budget"), &[])
        .await?;
    let total: i64 = row.try_get("total")?;
    let unlimited: Vec<String> = row.try_get("unlimited")?;
    Ok(if unlimited.is_empty() {
        Finding::pass(
            check,
            format!("every tenant in use has a budget limit ({total} tenant(s))"),
        )
    } else {
        Finding::warn(
            check,
            format!(
                "{} of {total} tenant(s) have no budget limit: their model and tool spending is \
                 unbounded",
                unlimited.len()
            ),
            "give each one a limit: `pgcrew tenants set <tenant> --budget-usd <limit>` (or \
             TenantContext::budget_usd)",
        )
        .items(
            unlimited
                .into_iter()
                .map(|t| format!("tenant {t}"))
                .collect(),
            ctx.opts.max_items,
        )
    })
}

async fn tenant_roles(ctx: &Ctx<'_>) -> Result<Finding> {
    let check = CheckId::TenantRoles;
    let rows = ctx.client.query(sql!("doctor/tenant_roles"), &[]).await?;
    if rows.is_empty() {
        return Ok(Finding::pass(
            check,
            "no role is bound to a tenant (tenants have no SQL access)",
        ));
    }
    let who = ctx
        .client
        .query_one(sql!("doctor/is_superuser"), &[])
        .await?;
    let superuser: bool = who.try_get("superuser")?;
    let mut trust: HashMap<String, Vec<i32>> = HashMap::new();
    let mut hba_note = String::new();
    if superuser {
        match ctx
            .client
            .query(sql!("doctor/tenant_roles_trust"), &[])
            .await
        {
            Ok(rs) => {
                for r in rs {
                    trust.insert(r.try_get("role_name")?, r.try_get("lines")?);
                }
            }
            Err(e) => {
                hba_note = format!("; pg_hba.conf could not be read ({})", Error::from(e));
            }
        }
    } else {
        hba_note = "; pg_hba.conf not checked (needs a superuser)".to_string();
    }
    let mut fails = Vec::new();
    let mut warns = Vec::new();
    let mut kinds: Vec<&str> = Vec::new();
    for r in &rows {
        let role: String = r.try_get("role_name")?;
        let tenant: String = r.try_get("tenant_id")?;
        let who = format!("role {role} (tenant {tenant})");
        if r.try_get::<_, bool>("role_dropped")? {
            warns.push(format!(
                "{who}: the role was dropped; the binding is left over"
            ));
            kinds.push("dropped");
            continue;
        }
        if r.try_get::<_, bool>("superuser")? {
            fails.push(format!(
                "{who}: is a superuser, so row-level security does not apply to it"
            ));
            kinds.push("rls");
        }
        if r.try_get::<_, bool>("bypassrls")? {
            fails.push(format!(
                "{who}: has BYPASSRLS, so row-level security does not apply to it"
            ));
            kinds.push("rls");
        }
        if r.try_get::<_, bool>("owner_member")? {
            fails.push(format!(
                "{who}: is (a member of) the owner of the pgcrew tables, so row-level security \
                 does not apply to it"
            ));
            kinds.push("rls");
        }
        if let Some(lines) = trust.get(&role) {
            fails.push(format!(
                "{who}: can log in over TCP without a password (pg_hba.conf `trust`, line(s) {})",
                lines
                    .iter()
                    .map(|l| l.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            kinds.push("trust");
        }
        let missing: Vec<String> = r.try_get("missing")?;
        if !missing.is_empty() {
            warns.push(format!("{who}: lacks {}", missing.join(", ")));
            kinds.push("missing");
        }
        let extra: Vec<String> = r.try_get("extra")?;
        if !extra.is_empty() {
            warns.push(format!("{who}: also has {}", extra.join(", ")));
            kinds.push("extra");
        }
    }
    // Isolation first, then the grants, then leftovers.
    let order = ["rls", "trust", "missing", "extra", "dropped"];
    kinds.sort_by_key(|k| order.iter().position(|o| o == k));
    kinds.dedup();
    let mut advice = Vec::new();
    for k in &kinds {
        advice.push(match *k {
            "rls" => {
                "bind plain roles only (NOSUPERUSER NOBYPASSRLS, not members of the owner): \
                      `ALTER ROLE <role> NOSUPERUSER NOBYPASSRLS`, `REVOKE <owner> FROM <role>`, \
                      or unbind it with `pgcrew tenants revoke-role <role>`"
            }
            "trust" => {
                "require a password or certificate for these roles in pg_hba.conf (no \
                        `trust` on host lines), then `SELECT pg_reload_conf()`"
            }
            "missing" => {
                "grant again what reading needs: `pgcrew tenants grant-role <role> \
                          <tenant>` (idempotent)"
            }
            "extra" => {
                "revoke what grant-role does not give, e.g. `REVOKE INSERT, UPDATE, \
                        DELETE, TRUNCATE ON ALL TABLES IN SCHEMA pgcrew FROM <role>` and SELECT \
                        on tables without row-level security, then grant-role again"
            }
            _ => {
                "remove the leftover binding as the owner: `DELETE FROM pgcrew.tenant_roles \
                  WHERE role_oid = <oid>` (pgcrew.tenant_role_bindings shows the oid)"
            }
        });
    }
    let n = rows.len();
    let mut items = fails.clone();
    items.extend(warns.iter().cloned());
    Ok(if !fails.is_empty() {
        Finding::fail(
            check,
            format!(
                "{} problem(s) that break tenant isolation, {} to tidy, among {n} bound role(s){hba_note}",
                fails.len(),
                warns.len()
            ),
            advice.join("; "),
        )
        .items(items, ctx.opts.max_items)
    } else if !warns.is_empty() {
        Finding::warn(
            check,
            format!(
                "{} problem(s) with the grants of {n} bound role(s){hba_note}",
                warns.len()
            ),
            advice.join("; "),
        )
        .items(items, ctx.opts.max_items)
    } else {
        Finding::pass(
            check,
            format!(
                "{n} bound role(s): row-level security applies to each, with exactly the \
                 grants reading needs{hba_note}"
            ),
        )
    })
}

async fn pg_locks_public(ctx: &Ctx<'_>) -> Result<Finding> {
    let check = CheckId::PgLocksPublic;
    let readable: bool = ctx
        .client
        .query_one(sql!("tenancy/pg_locks_public"), &[])
        .await?
        .try_get(0)?;
    if !readable {
        return Ok(Finding::pass(
            check,
            "pg_catalog.pg_locks is not readable by PUBLIC",
        ));
    }
    let bound: i64 = ctx
        .client
        .query_one(sql!("doctor/tenant_role_count"), &[])
        .await?
        .try_get(0)?;
    Ok(if bound == 0 {
        Finding::pass(
            check,
            "pg_catalog.pg_locks is readable by PUBLIC, but no role is bound to a tenant (revoke \
             it before giving tenants SQL access)",
        )
    } else {
        Finding::warn(
            check,
            format!(
                "pg_catalog.pg_locks is readable by PUBLIC while {bound} role(s) are bound to \
                 tenants: a tenant role polling it sees the keys of the advisory locks other \
                 tenants' runs hold, and can take one to block that run"
            ),
            "as a superuser, in this database: `REVOKE SELECT ON pg_catalog.pg_locks FROM \
             PUBLIC;`",
        )
    })
}

// ------------------------------------------------------------------------------------------
// Ledger
// ------------------------------------------------------------------------------------------

struct FinishedRun {
    run: RunId,
    state: String,
    head_seq: i64,
    head_hash: Option<Vec<u8>>,
    mac: Option<Vec<u8>>,
}

async fn finished_runs(ctx: &Ctx<'_>) -> Result<Vec<FinishedRun>> {
    let window = crate::config::interval_micros(ctx.opts.ledger_window);
    let rows = ctx
        .client
        .query(
            sql!("doctor/recent_checkpoints"),
            &[&window, &ctx.opts.ledger_sample],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(FinishedRun {
                run: r.try_get("id")?,
                state: r.try_get("state")?,
                head_seq: r.try_get("ledger_head_seq")?,
                head_hash: r.try_get("ledger_head_hash")?,
                mac: r.try_get("mac")?,
            })
        })
        .collect()
}

fn window_text(opts: &DoctorOptions) -> String {
    format!(
        "in the last {} (newest {} at most)",
        human(opts.ledger_window),
        opts.ledger_sample
    )
}

async fn ledger_checkpoints(ctx: &Ctx<'_>) -> Result<Finding> {
    let check = CheckId::LedgerCheckpoints;
    let runs = finished_runs(ctx).await?;
    let window = window_text(ctx.opts);
    if runs.is_empty() {
        return Ok(Finding::pass(
            check,
            format!("no run finished {window}: no checkpoint to look for"),
        ));
    }
    let unsigned: Vec<&FinishedRun> = runs.iter().filter(|r| r.mac.is_none()).collect();
    if unsigned.is_empty() {
        return Ok(Finding::pass(
            check,
            format!(
                "all {} run(s) finished {window} have a signed checkpoint at their ledger head",
                runs.len()
            ),
        ));
    }
    let what = if unsigned.len() == runs.len() {
        "none of them is signed: the instances run without the ledger key".to_string()
    } else {
        format!(
            "{} of them are not: some process finishing runs has no ledger key",
            unsigned.len()
        )
    };
    Ok(Finding::fail(
        check,
        format!("{} run(s) finished {window}; {what}", runs.len()),
        "give every instance (and every tool that finishes runs, e.g. `pgcrew run cancel`) the \
         ledger key: PGCREW_LEDGER_KEY_FILE=<file> (or PGCREW_LEDGER_KEY, or \
         ClientConfig::ledger_key), at least 32 random bytes (`openssl rand -hex 32`). Without \
         a signed checkpoint a full rewrite of a run's ledger (hashes recomputed) goes unnoticed",
    )
    .items(
        unsigned
            .iter()
            .map(|r| {
                format!(
                    "run {} ({}): head seq {} not signed",
                    r.run, r.state, r.head_seq
                )
            })
            .collect(),
        ctx.opts.max_items,
    ))
}

async fn ledger_signatures(ctx: &Ctx<'_>) -> Result<Finding> {
    let check = CheckId::LedgerSignatures;
    let Some(key) = &ctx.opts.ledger_key else {
        return Ok(Finding::warn(
            check,
            "not verified: the doctor was given no ledger key",
            "pass the key the instances sign with: --key-file <file>, or PGCREW_LEDGER_KEY / \
             PGCREW_LEDGER_KEY_FILE",
        ));
    };
    let runs = finished_runs(ctx).await?;
    let signed: Vec<&FinishedRun> = runs.iter().filter(|r| r.mac.is_some()).collect();
    let window = window_text(ctx.opts);
    if signed.is_empty() {
        return Ok(Finding::pass(
            check,
            format!("no signed checkpoint of a run finished {window} to verify"),
        ));
    }
    let bad: Vec<&&FinishedRun> = signed
        .iter()
        .filter(|r| match (&r.head_hash, &r.mac) {
            (Some(h), Some(m)) => !key.verify(r.run, r.head_seq, h, m),
            _ => true,
        })
        .collect();
    Ok(if bad.is_empty() {
        Finding::pass(
            check,
            format!(
                "the final checkpoints of {} run(s) finished {window} verify with the given key",
                signed.len()
            ),
        )
    } else {
        Finding::fail(
            check,
            format!(
                "{} of {} checkpoint(s) of runs finished {window} do not verify with the given \
                 key: signed with another key, or forged",
                bad.len(),
                signed.len()
            ),
            "check that the doctor and the instances use the same key; then verify each run \
             named with `pgcrew run verify-ledger <run> --key-file <file>`",
        )
        .items(
            bad.iter()
                .map(|r| {
                    format!(
                        "run {} ({}): checkpoint at seq {}",
                        r.run, r.state, r.head_seq
                    )
                })
                .collect(),
            ctx.opts.max_items,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reloptions_turning_autovacuum_off_are_recognised() {
        let opts = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(reloption_off(
            &opts(&["autovacuum_enabled=false"]),
            "autovacuum_enabled"
        ));
        assert!(reloption_off(
            &opts(&["fillfactor=70", "autovacuum_enabled=off"]),
            "autovacuum_enabled"
        ));
        assert!(!reloption_off(
            &opts(&["autovacuum_enabled=true"]),
            "autovacuum_enabled"
        ));
        assert!(!reloption_off(
            &opts(&["fillfactor=70"]),
            "autovacuum_enabled"
        ));
    }

    #[test]
    fn items_are_limited_with_a_count_of_the_rest() {
        let items: Vec<String> = (0..5).map(|i| i.to_string()).collect();
        let limited = super::super::limit_items(items.clone(), 3);
        assert_eq!(limited, vec!["0", "1", "2", "... and 2 more"]);
        assert_eq!(super::super::limit_items(items.clone(), 5), items);
    }

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(human(Duration::from_millis(250)), "250ms");
        assert_eq!(human(Duration::from_secs(3723)), "1h 2m 3s");
        assert_eq!(human(Duration::from_secs(24 * 3600)), "24h");
        assert_eq!(human(Duration::from_secs(120)), "2m");
        assert_eq!(human_ms(-5), "0ms");
    }
}
