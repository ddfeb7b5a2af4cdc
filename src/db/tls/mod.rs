//! TLS to PostgreSQL the way libpq does it: `sslmode`, `sslrootcert`, `sslcert` and `sslkey`
//! read from the DSN (URL or key/value form), connections made with rustls.
//!
//! tokio-postgres' own configuration knows only `sslmode=disable|prefer|require` and rejects
//! the other `ssl*` keys, so [`PgConfig::parse`] takes those keys out of the DSN, hands the rest
//! to [`tokio_postgres::Config`], and keeps the TLS settings next to it. Every pgcrew connection
//! (the pool, sibling pools, LISTEN and other dedicated connections, the CLI, the benchmarks)
//! is opened through the same [`PgConfig`].
//!
//! | `sslmode` | TLS | server certificate |
//! | --- | --- | --- |
//! | `disable` | never | — |
//! | `allow` | only if the plaintext attempt is refused by the server | not checked |
//! | `prefer` (default) | when the server offers it, else plaintext | not checked |
//! | `require` | always | not checked, unless `sslrootcert` is set: then as `verify-ca` |
//! | `verify-ca` | always | chain to `sslrootcert` |
//! | `verify-full` | always | chain to `sslrootcert` and host name |
//!
//! `sslrootcert` is a PEM file of CA certificates, or `system` for the platform's trusted roots
//! (which implies, and requires, `verify-full`); without it, `~/.postgresql/root.crt` is used
//! when it exists, as libpq does. `sslcert`/`sslkey` are PEM files of a client certificate and
//! its private key (default `~/.postgresql/postgresql.crt` / `postgresql.key` when both exist).
//! Connections over a Unix socket never use TLS (as libpq).

mod config;
mod dsn;
mod settings;
mod verify;

use std::path::PathBuf;

use tokio_postgres::config::{Host, SslMode as DriverSslMode};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::error::{Error, Result};

pub use config::{PgConfig, PgConnection};
pub use settings::TlsSettings;

/// libpq's `sslmode`: whether TLS is used and how the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// Plaintext first; TLS (unverified) only if the server refuses the plaintext attempt.
    Allow,
    /// TLS when the server offers it (certificate not checked), else plaintext. The default.
    #[default]
    Prefer,
    /// Always TLS; the certificate is not checked unless `sslrootcert` is given (then as
    /// `verify-ca`).
    Require,
    /// Always TLS; the certificate must chain to `sslrootcert`.
    VerifyCa,
    /// Always TLS; the certificate must chain to `sslrootcert` and name the host.
    VerifyFull,
}

impl SslMode {
    /// The DSN spelling (`verify-full`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    fn parse(value: &str) -> Result<SslMode> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(Error::Config(format!(
                    "sslmode `{}` is not one of disable, allow, prefer, require, verify-ca, verify-full",
                    other.escape_debug()
                )));
            }
        })
    }
}

crate::error::display_as_str!(SslMode);

/// Where trusted CA certificates come from (`sslrootcert`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    /// A PEM file of CA certificates.
    File(PathBuf),
    /// The platform's trusted roots (`sslrootcert=system`).
    System,
}

/// Connect one client with `mode`'s rules (libpq's `allow` retries with TLS when the server
/// refused the plaintext attempt). Unix-socket connections never use TLS.
pub(crate) async fn connect_raw(
    pg: &tokio_postgres::Config,
    mode: SslMode,
    connector: MakeRustlsConnect,
) -> std::result::Result<(tokio_postgres::Client, PgConnection), tokio_postgres::Error> {
    let unix_only =
        !pg.get_hosts().is_empty() && pg.get_hosts().iter().all(|h| matches!(h, Host::Unix(_)));
    let driver_mode = match mode {
        _ if unix_only => DriverSslMode::Disable,
        SslMode::Disable | SslMode::Allow => DriverSslMode::Disable,
        SslMode::Prefer => DriverSslMode::Prefer,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => DriverSslMode::Require,
    };
    let mut cfg = pg.clone();
    cfg.ssl_mode(driver_mode);
    match cfg.connect(connector.clone()).await {
        // The server was reached but the plaintext attempt failed (refused by pg_hba, or the
        // authentication it asked for failed): try again with TLS, as libpq does.
        Err(e) if mode == SslMode::Allow && !unix_only && reached_server(&e) => {
            // Prefer, not Require: a server without TLS then fails as it did the first time
            // instead of with "server does not support TLS", which would hide the cause.
            cfg.ssl_mode(DriverSslMode::Prefer);
            cfg.connect(connector).await
        }
        other => other,
    }
}

/// Whether a failed attempt got as far as the server (not a refused or timed-out TCP connect).
fn reached_server(e: &tokio_postgres::Error) -> bool {
    let text = e.to_string();
    !(text.starts_with("error connecting to server") || text.contains("timeout"))
}

/// The pool's way of opening connections: the same TLS settings as every other connection.
pub(crate) struct PoolConnect {
    pub(crate) mode: SslMode,
    pub(crate) connector: MakeRustlsConnect,
}

impl deadpool_postgres::Connect for PoolConnect {
    fn connect(
        &self,
        pg_config: &tokio_postgres::Config,
    ) -> futures_util::future::BoxFuture<
        '_,
        std::result::Result<
            (tokio_postgres::Client, tokio::task::JoinHandle<()>),
            tokio_postgres::Error,
        >,
    > {
        let pg = pg_config.clone();
        Box::pin(async move {
            let (client, connection) = connect_raw(&pg, self.mode, self.connector.clone()).await?;
            let handle = tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "pooled connection ended");
                }
            });
            Ok((client, handle))
        })
    }
}
