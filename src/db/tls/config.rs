//! [`PgConfig`]: a parsed DSN (tokio-postgres' settings plus the TLS settings), opening
//! connections and explaining TLS failures.

use std::path::{Path, PathBuf};

use rustls::CertificateError;
use tokio_postgres::config::{Host, SslMode as DriverSslMode};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::dsn::split_ssl_keys;
use super::{RootCert, SslMode, TlsSettings, connect_raw};
use crate::error::{Error, Result};

/// A parsed DSN: tokio-postgres' connection settings plus the TLS settings it cannot hold.
///
/// Dereferences to [`tokio_postgres::Config`] for reading and adjusting the connection
/// settings. `Debug` shows hosts, user, database and TLS file names, never the password.
#[derive(Clone)]
pub struct PgConfig {
    pg: tokio_postgres::Config,
    tls: TlsSettings,
}

impl std::fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConfig")
            .field("hosts", &self.pg.get_hosts())
            .field("ports", &self.pg.get_ports())
            .field("user", &self.pg.get_user())
            .field("dbname", &self.pg.get_dbname())
            .field("password", &self.pg.get_password().map(|_| "***"))
            .field("tls", &self.tls)
            .finish()
    }
}

impl std::ops::Deref for PgConfig {
    type Target = tokio_postgres::Config;
    fn deref(&self) -> &tokio_postgres::Config {
        &self.pg
    }
}

impl std::ops::DerefMut for PgConfig {
    fn deref_mut(&mut self) -> &mut tokio_postgres::Config {
        &mut self.pg
    }
}

impl From<tokio_postgres::Config> for PgConfig {
    /// TLS without files: the config's `ssl_mode` (disable, prefer or require; the
    /// certificate is not verified).
    fn from(pg: tokio_postgres::Config) -> Self {
        let mode = match pg.get_ssl_mode() {
            DriverSslMode::Disable => SslMode::Disable,
            DriverSslMode::Require => SslMode::Require,
            _ => SslMode::Prefer,
        };
        PgConfig {
            pg,
            tls: TlsSettings {
                mode,
                ..TlsSettings::default()
            },
        }
    }
}

/// The connection type every pgcrew connection has.
pub type PgConnection = tokio_postgres::Connection<
    tokio_postgres::Socket,
    <MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>>::Stream,
>;

impl PgConfig {
    /// Parse a DSN (URL or key/value) with its `ssl*` keys; see the module documentation.
    /// Prefer [`crate::db::parse_dsn`], which also explains malformed DSNs.
    pub fn parse(dsn: &str) -> Result<PgConfig> {
        let home = std::env::var_os("HOME").map(PathBuf::from);
        Self::parse_with_home(dsn, home.as_deref())
    }

    pub(crate) fn parse_with_home(dsn: &str, home: Option<&Path>) -> Result<PgConfig> {
        let (rest, keys) = split_ssl_keys(dsn)?;
        let pg: tokio_postgres::Config = rest
            .parse()
            .map_err(|e| crate::db::describe_parse_error(dsn, &e))?;
        let tls = TlsSettings::from_keys(&keys, home)?;
        Ok(PgConfig { pg, tls })
    }

    /// The TLS settings.
    pub fn tls(&self) -> &TlsSettings {
        &self.tls
    }

    /// The effective `sslmode`.
    pub fn ssl_mode(&self) -> SslMode {
        self.tls.mode
    }

    /// The tokio-postgres part.
    pub fn pg_config(&self) -> &tokio_postgres::Config {
        &self.pg
    }

    /// Open one connection outside any pool with these settings; the caller drives the
    /// returned connection (e.g. `tokio::spawn(connection)`). Errors name the host and, for a
    /// certificate that does not verify, the reason.
    pub async fn open(&self) -> Result<(tokio_postgres::Client, PgConnection)> {
        let connector = self.tls.connector()?;
        connect_raw(&self.pg, self.tls.mode, connector)
            .await
            .map_err(|e| self.explain(e))
    }

    /// Turn a driver error from connecting with these settings into a pgcrew error; TLS
    /// failures name the host, the sslmode and the reason.
    pub(crate) fn explain(&self, e: tokio_postgres::Error) -> Error {
        match tls_failure(&e) {
            Some(reason) => Error::Connect {
                message: format!(
                    "TLS to {} failed (sslmode={}): {}",
                    self.host_list(),
                    self.tls.mode,
                    self.reason_text(reason)
                ),
            },
            None => Error::from(e),
        }
    }

    fn host_list(&self) -> String {
        let ports = self.pg.get_ports();
        self.pg
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
                match h {
                    Host::Tcp(h) => format!("{h}:{port}"),
                    Host::Unix(p) => p.display().to_string(),
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn reason_text(&self, reason: TlsFailure) -> String {
        let roots = match &self.tls.root_cert {
            Some(RootCert::File(p)) => format!("sslrootcert={}", p.display()),
            Some(RootCert::System) => "the system's trusted roots".into(),
            None => "sslrootcert".into(),
        };
        match reason {
            TlsFailure::NotSupported => "the server does not support TLS (ssl is off on the server); enable ssl on the server, or use sslmode=prefer or disable".into(),
            TlsFailure::Certificate(CertificateError::UnknownIssuer) => format!(
                "the server's certificate is not trusted: unknown CA (it is not signed by a CA in {roots})"
            ),
            TlsFailure::Certificate(CertificateError::NotValidForName) => format!(
                "the server's certificate does not match the host name: name mismatch for {}",
                self.host_names()
            ),
            TlsFailure::Certificate(CertificateError::NotValidForNameContext {
                expected,
                presented,
            }) => format!(
                "the server's certificate does not match the host name: name mismatch ({} is not among the names it is valid for: {}); connect by one of those names or use sslmode=verify-ca",
                expected.to_str(),
                presented
                    .iter()
                    .map(|n| n
                        .strip_prefix("DnsName(\"")
                        .and_then(|n| n.strip_suffix("\")"))
                        .unwrap_or(n))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            TlsFailure::Certificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. },
            ) => "the server's certificate has expired".into(),
            TlsFailure::Certificate(
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
            ) => "the server's certificate is not valid yet (check the clocks)".into(),
            TlsFailure::Certificate(other) => {
                format!("the server's certificate does not verify: {other:?}")
            }
            TlsFailure::Other(text) => text,
        }
    }

    fn host_names(&self) -> String {
        self.pg
            .get_hosts()
            .iter()
            .filter_map(|h| match h {
                Host::Tcp(h) => Some(h.clone()),
                Host::Unix(_) => None,
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

enum TlsFailure {
    NotSupported,
    Certificate(CertificateError),
    Other(String),
}

/// Whether a driver error is a TLS failure, and which.
fn tls_failure(e: &tokio_postgres::Error) -> Option<TlsFailure> {
    let text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let rustls_err = s.downcast_ref::<rustls::Error>().or_else(|| {
            s.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(r) = rustls_err {
            return Some(match r {
                rustls::Error::InvalidCertificate(c) => TlsFailure::Certificate(c.clone()),
                other => TlsFailure::Other(other.to_string()),
            });
        }
        if s.to_string().contains("server does not support TLS") {
            return Some(TlsFailure::NotSupported);
        }
        source = s.source();
    }
    text.contains("TLS")
        .then(|| TlsFailure::Other(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_follow_libpq() {
        let p = |dsn: &str| PgConfig::parse_with_home(dsn, None);
        assert_eq!(p("host=h").expect("default").ssl_mode(), SslMode::Prefer);
        for m in ["disable", "allow", "prefer", "require"] {
            assert_eq!(
                p(&format!("host=h sslmode={m}"))
                    .expect(m)
                    .ssl_mode()
                    .as_str(),
                m
            );
        }
        // (DSN, what its error says)
        let rejected = [
            (
                "host=h sslmode=verify-fulll",
                "sslmode `verify-fulll` is not one of",
            ),
            ("host=h sslmode=verify-full", "no CA is given"),
            ("host=h sslcert=/x", "sslcert is set but sslkey is not"),
            ("host=h sslkey=/x", "sslkey is set but sslcert is not"),
            (
                "host=h sslrootcert=system sslmode=require",
                "needs sslmode=verify-full",
            ),
            (
                "host=h sslmode=require sslrootcert=/nonexistent/ca.pem",
                "cannot read sslrootcert=/nonexistent/ca.pem",
            ),
            ("host=h sslpassword=x", "sslpassword is not supported"),
        ];
        for (dsn, want) in rejected {
            let e = p(dsn).expect_err(dsn).to_string();
            assert!(e.contains(want), "{dsn}: {e}");
        }
    }

    #[test]
    fn debug_and_dsn_params_hold_no_secrets() {
        let c = PgConfig::parse_with_home("postgres://u:hunter2@h/db?sslmode=require", None)
            .expect("parse");
        let d = format!("{c:?}");
        assert!(!d.contains("hunter2"), "{d}");
        assert!(d.contains("Require"), "{d}");
        assert_eq!(
            c.tls().dsn_params(),
            vec![("sslmode", "require".to_string())]
        );
    }
}
