//! Scratch databases: a fresh, uniquely named database created from an admin DSN and dropped
//! when the handle is dropped. Every test gets one, and `pgcrew bench` runs in one, so nothing
//! touches real data.

use std::sync::OnceLock;

use tracing::warn;

use super::{TempCluster, dsn_from_env, parse_dsn, redact_dsn};
use crate::error::{Error, Result};

/// A uniquely named database that is dropped (`WITH (FORCE)`) when this handle is dropped.
///
/// Its `Debug` output shows the DSNs with their passwords redacted.
pub struct ScratchDatabase {
    admin_dsn: String,
    name: String,
    dsn: String,
    keep: bool,
}

impl std::fmt::Debug for ScratchDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScratchDatabase")
            .field("admin_dsn", &redact_dsn(&self.admin_dsn))
            .field("name", &self.name)
            .field("dsn", &redact_dsn(&self.dsn))
            .field("keep", &self.keep)
            .finish()
    }
}

fn with_dbname(dsn: &str, dbname: &str) -> Result<String> {
    // Rebuild a key/value DSN from the parsed config so URL and key/value forms both work.
    let cfg = parse_dsn(dsn)?;
    let mut parts = Vec::new();
    for (i, host) in cfg.get_hosts().iter().enumerate() {
        let h = match host {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        };
        let port = cfg
            .get_ports()
            .get(i)
            .or(cfg.get_ports().first())
            .copied()
            .unwrap_or(5432);
        parts.push((h, port));
    }
    let mut out = String::new();
    if !parts.is_empty() {
        out.push_str(&format!(
            "host={} port={} ",
            parts
                .iter()
                .map(|p| quote(&p.0))
                .collect::<Vec<_>>()
                .join(","),
            parts
                .iter()
                .map(|p| p.1.to_string())
                .collect::<Vec<_>>()
                .join(",")
        ));
    }
    if let Some(u) = cfg.get_user() {
        out.push_str(&format!("user={} ", quote(u)));
    }
    if let Some(p) = cfg.get_password() {
        out.push_str(&format!("password={} ", quote(&String::from_utf8_lossy(p))));
    }
    // TLS settings (tokio-postgres' config does not hold them all).
    for (k, v) in cfg.tls().dsn_params() {
        out.push_str(&format!("{k}={} ", quote(&v)));
    }
    out.push_str(&format!("dbname={}", quote(dbname)));
    Ok(out)
}

fn quote(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

impl ScratchDatabase {
    /// Create a fresh database named `<prefix>_<random>` through `admin_dsn`.
    pub async fn create(admin_dsn: &str, prefix: &str) -> Result<ScratchDatabase> {
        let name = format!(
            "{}_{}",
            prefix,
            &uuid::Uuid::new_v4().simple().to_string()[..16]
        );
        let cfg = parse_dsn(admin_dsn)?;
        let (client, conn) = cfg.open().await?;
        let driver = tokio::spawn(conn);
        client
            .batch_execute(&sql!("db/create_database").replace("{name}", &name))
            .await?;
        drop(client);
        let _ = driver.await;
        let dsn = with_dbname(admin_dsn, &name)?;
        Ok(ScratchDatabase {
            admin_dsn: admin_dsn.to_string(),
            name,
            dsn,
            keep: false,
        })
    }

    /// A scratch database for a test: on `PGCREW_TEST_DATABASE_URL` / `DATABASE_URL` when set,
    /// else on a throwaway cluster shared by the whole process (removed when the process exits).
    pub async fn for_tests() -> Result<ScratchDatabase> {
        let admin = match dsn_from_env() {
            Some(dsn) => dsn,
            None => shared_cluster_dsn().await?,
        };
        Self::create(&admin, "pgcrew_test").await
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A DSN for the database (with the admin DSN's password, if any: print it only through
    /// [`redact_dsn`]).
    pub fn dsn(&self) -> &str {
        &self.dsn
    }

    /// Do not drop the database on drop (for debugging a failed test).
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

static SHARED_CLUSTER: OnceLock<std::result::Result<TempCluster, String>> = OnceLock::new();

/// A throwaway cluster shared by the whole process, started on first use. It is never dropped;
/// its watchdog removes it when the process exits.
pub(crate) async fn shared_cluster_dsn() -> Result<String> {
    let started = tokio::task::spawn_blocking(|| {
        let c = SHARED_CLUSTER.get_or_init(|| TempCluster::start().map_err(|e| e.to_string()));
        c.as_ref().map(|c| c.dsn()).map_err(|e| e.clone())
    })
    .await
    .map_err(|e| Error::Cluster(e.to_string()))?;
    started.map_err(Error::Cluster)
}

impl Drop for ScratchDatabase {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        let admin = self.admin_dsn.clone();
        let name = self.name.clone();
        // Drop runs outside async context guarantees: use a private runtime on a new thread.
        let handle = std::thread::spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(_) => return,
            };
            rt.block_on(async move {
                let Ok(cfg) = parse_dsn(&admin) else { return };
                let Ok((client, conn)) = cfg.open().await else {
                    return;
                };
                tokio::spawn(conn);
                if let Err(e) = client
                    .batch_execute(&sql!("db/drop_database").replace("{name}", &name))
                    .await
                {
                    warn!(database = %name, error = %e, "could not drop scratch database");
                }
            });
        });
        let _ = handle.join();
    }
}
