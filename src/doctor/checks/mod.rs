//! The checks of [`super::run`], each reading through the doctor's one connection: shared
//! reads (settings, backends, instances) here, the checks in one file per group (server,
//! connections, coordination, tenancy, ledger).

mod connections;
mod coordination;
mod ledger;
mod server;
mod tenancy;

use std::collections::HashMap;
use std::time::Duration;

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row};

use super::{CheckId, DOCTOR_APPLICATION_NAME, DoctorOptions, Finding, Report};
use crate::error::{Error, Result};

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
#[derive(Debug, Clone, postgres_from_row::FromRow)]
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

#[derive(Debug, Clone, postgres_from_row::FromRow)]
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
            CheckId::ServerVersion => server::server_version(&ctx),
            CheckId::Migrations => server::migrations(&ctx).await,
            CheckId::MaxConnections => server::max_connections(&mut ctx).await,
            CheckId::IdleInTransactionTimeout => server::idle_in_transaction(&ctx),
            CheckId::StatementTimeout => server::statement_timeout(&ctx),
            CheckId::TasksAutovacuum => server::tasks_autovacuum(&ctx).await,
            CheckId::Tls => connections::tls(&mut ctx).await,
            CheckId::Leader => coordination::leader(&ctx).await,
            CheckId::Instances => coordination::instances(&mut ctx).await,
            CheckId::StuckRuns => coordination::stuck_runs(&ctx).await,
            CheckId::QueueLag => coordination::queue_lag(&ctx).await,
            CheckId::TenantBudgets => tenancy::tenant_budgets(&ctx).await,
            CheckId::TenantRoles => tenancy::tenant_roles(&ctx).await,
            CheckId::PgLocksPublic => tenancy::pg_locks_public(&ctx).await,
            CheckId::LedgerCheckpoints => ledger::ledger_checkpoints(&ctx).await,
            CheckId::LedgerSignatures => ledger::ledger_signatures(&ctx).await,
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
        let client = self.client;
        read_once(
            &mut self.backends,
            read_backends(client),
            "pg_stat_activity",
        )
        .await
    }

    /// `pgcrew.instances`, read once (an error is returned as it is, and read again next time).
    async fn instances(&mut self) -> Result<&Vec<InstanceRow>> {
        let client = self.client;
        read_once(
            &mut self.instances,
            read_instances(client),
            "pgcrew.instances",
        )
        .await
    }

    /// The one row of `query` (without parameters).
    async fn one(&self, query: &str) -> Result<Row> {
        Ok(self.client.query_one(query, &[]).await?)
    }
}

/// What `slot` holds, filled by `read` the first time (`what` names it in the error that
/// cannot happen).
async fn read_once<'s, T>(
    slot: &'s mut Option<T>,
    read: impl Future<Output = Result<T>>,
    what: &str,
) -> Result<&'s T> {
    if slot.is_none() {
        *slot = Some(read.await?);
    }
    slot.as_ref()
        .ok_or_else(|| Error::Config(format!("{what} was not read")))
}

/// Every row of `query`, each read into a `T` (columns by field name).
async fn read_rows<T: postgres_from_row::FromRow>(
    client: &Client,
    query: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<T>> {
    crate::db::rows_as(&client.query(query, params).await?)
}

async fn read_backends(client: &Client) -> Result<Vec<Backend>> {
    read_rows(client, sql!("doctor/backends"), &[]).await
}

async fn read_instances(client: &Client) -> Result<Vec<InstanceRow>> {
    read_rows(client, sql!("doctor/instances"), &[]).await
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

#[cfg(test)]
mod tests {
    use super::*;

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
