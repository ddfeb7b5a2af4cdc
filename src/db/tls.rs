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

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::{Host, SslMode as DriverSslMode};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::error::{Error, Result};

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

impl std::fmt::Display for SslMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where trusted CA certificates come from (`sslrootcert`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    /// A PEM file of CA certificates.
    File(PathBuf),
    /// The platform's trusted roots (`sslrootcert=system`).
    System,
}

/// How the server's certificate is checked once TLS is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verify {
    Nothing,
    Chain,
    ChainAndName,
}

/// The TLS part of a DSN, with the rustls configuration built from it (files already read).
#[derive(Clone)]
pub struct TlsSettings {
    mode: SslMode,
    root_cert: Option<RootCert>,
    client_cert: Option<(PathBuf, PathBuf)>,
    connector: Option<MakeRustlsConnect>,
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // File names only: the key's contents never leave the rustls configuration.
        f.debug_struct("TlsSettings")
            .field("sslmode", &self.mode)
            .field("sslrootcert", &self.root_cert)
            .field("sslcert", &self.client_cert.as_ref().map(|c| &c.0))
            .field("sslkey", &self.client_cert.as_ref().map(|c| &c.1))
            .finish()
    }
}

impl Default for TlsSettings {
    /// `sslmode=prefer`, no files (the connector is built when first needed).
    fn default() -> Self {
        TlsSettings {
            mode: SslMode::Prefer,
            root_cert: None,
            client_cert: None,
            connector: None,
        }
    }
}

impl TlsSettings {
    /// The effective `sslmode`.
    pub fn mode(&self) -> SslMode {
        self.mode
    }

    /// The trusted roots, if any (given or the libpq default file).
    pub fn root_cert(&self) -> Option<&RootCert> {
        self.root_cert.as_ref()
    }

    /// The client certificate and key files, if any.
    pub fn client_cert(&self) -> Option<(&Path, &Path)> {
        self.client_cert
            .as_ref()
            .map(|(c, k)| (c.as_path(), k.as_path()))
    }

    fn verify(&self) -> Verify {
        match self.mode {
            SslMode::VerifyFull => Verify::ChainAndName,
            SslMode::VerifyCa => Verify::Chain,
            SslMode::Require if self.root_cert.is_some() => Verify::Chain,
            _ => Verify::Nothing,
        }
    }

    /// The key/value pairs that reproduce these settings in a DSN (used when a DSN is rebuilt,
    /// e.g. for a scratch database).
    pub fn dsn_params(&self) -> Vec<(&'static str, String)> {
        let mut out = vec![("sslmode", self.mode.as_str().to_string())];
        match &self.root_cert {
            Some(RootCert::File(p)) => out.push(("sslrootcert", p.display().to_string())),
            Some(RootCert::System) => out.push(("sslrootcert", "system".into())),
            None => {}
        }
        if let Some((c, k)) = &self.client_cert {
            out.push(("sslcert", c.display().to_string()));
            out.push(("sslkey", k.display().to_string()));
        }
        out
    }

    fn from_keys(keys: &SslKeys, home: Option<&Path>) -> Result<TlsSettings> {
        let given_root = match keys.rootcert.as_deref() {
            Some("system") => Some(RootCert::System),
            Some("") | None => None,
            Some(p) => Some(RootCert::File(PathBuf::from(p))),
        };
        let mode = match (&keys.mode, &given_root) {
            (Some(m), _) => SslMode::parse(m)?,
            (None, Some(RootCert::System)) => SslMode::VerifyFull,
            (None, _) => SslMode::Prefer,
        };
        if given_root == Some(RootCert::System) && mode != SslMode::VerifyFull {
            return Err(Error::Config(format!(
                "sslrootcert=system trusts every public CA, so it needs sslmode=verify-full (got sslmode={mode}); drop sslmode or set it to verify-full"
            )));
        }
        let default_dir = home.map(|h| h.join(".postgresql"));
        let root_cert = given_root.or_else(|| {
            let p = default_dir.as_ref()?.join("root.crt");
            p.is_file().then_some(RootCert::File(p))
        });
        if matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) && root_cert.is_none() {
            return Err(Error::Config(format!(
                "sslmode={mode} verifies the server's certificate but no CA is given: set sslrootcert to a PEM file of the CA (or `system` for the platform's trusted roots), or use sslmode=require to encrypt without verifying"
            )));
        }
        let client_cert = match (keys.cert.as_deref(), keys.key.as_deref()) {
            (Some(c), Some(k)) => Some((PathBuf::from(c), PathBuf::from(k))),
            (Some(_), None) => {
                return Err(Error::Config(
                    "sslcert is set but sslkey is not: give both the client certificate and its private key".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(Error::Config(
                    "sslkey is set but sslcert is not: give both the client certificate and its private key".into(),
                ));
            }
            (None, None) => default_dir.and_then(|d| {
                let (c, k) = (d.join("postgresql.crt"), d.join("postgresql.key"));
                (c.is_file() && k.is_file()).then_some((c, k))
            }),
        };
        let mut settings = TlsSettings {
            mode,
            root_cert,
            client_cert,
            connector: None,
        };
        if mode != SslMode::Disable {
            settings.connector = Some(settings.build_connector()?);
        }
        Ok(settings)
    }

    /// The rustls connector for these settings (built when the DSN was parsed, or now).
    pub(crate) fn connector(&self) -> Result<MakeRustlsConnect> {
        match &self.connector {
            Some(c) => Ok(c.clone()),
            None => self.build_connector(),
        }
    }

    fn build_connector(&self) -> Result<MakeRustlsConnect> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config(format!("cannot set up TLS: {e}")))?;
        let builder = match (self.verify(), &self.root_cert) {
            (Verify::Nothing, _) | (_, None) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(
                    provider.signature_verification_algorithms,
                ))),
            (verify, Some(root)) => {
                let roots = Arc::new(load_roots(root)?);
                let webpki =
                    rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
                        .build()
                        .map_err(|e| {
                            Error::Config(format!(
                                "cannot use the CA certificates in sslrootcert: {e}"
                            ))
                        })?;
                if verify == Verify::ChainAndName {
                    builder.with_webpki_verifier(webpki)
                } else {
                    builder
                        .dangerous()
                        .with_custom_certificate_verifier(Arc::new(ChainOnly(webpki)))
                }
            }
        };
        let config = match &self.client_cert {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = read_certs(cert, "sslcert")?;
                let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                    Error::Config(format!(
                        "cannot read the client key sslkey={}: {} (a PEM private key, unencrypted, readable by this user)",
                        key.display(),
                        pem_error(&e)
                    ))
                })?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    Error::Config(format!(
                        "the client certificate sslcert={} and key sslkey={} do not fit together: {e}",
                        cert.display(),
                        key_display(&self.client_cert)
                    ))
                })?
            }
        };
        Ok(MakeRustlsConnect::new(config))
    }
}

fn key_display(c: &Option<(PathBuf, PathBuf)>) -> String {
    c.as_ref()
        .map_or_else(String::new, |(_, k)| k.display().to_string())
}

fn pem_error(e: &rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(io) => io.to_string(),
        rustls::pki_types::pem::Error::NoItemsFound => {
            "no PEM item of the expected kind in it".into()
        }
        other => format!("{other:?}"),
    }
}

fn read_certs(path: &Path, key: &str) -> Result<Vec<CertificateDer<'static>>> {
    let bad = |why: String| {
        Error::Config(format!(
            "cannot read {key}={}: {why} (expected a PEM file of certificates readable by this user)",
            path.display()
        ))
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(pem_error(&e)))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad(pem_error(&e)))?;
    if certs.is_empty() {
        return Err(bad("it holds no certificate".into()));
    }
    Ok(certs)
}

fn load_roots(root: &RootCert) -> Result<RootCertStore> {
    let mut store = RootCertStore::empty();
    match root {
        RootCert::File(path) => {
            for cert in read_certs(path, "sslrootcert")? {
                store.add(cert).map_err(|e| {
                    Error::Config(format!(
                        "sslrootcert={} holds a certificate that cannot be a trust anchor: {e}",
                        path.display()
                    ))
                })?;
            }
        }
        RootCert::System => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _ignored) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(Error::Config(format!(
                    "sslrootcert=system but no trusted root certificates were found on this system{} (install ca-certificates, or give sslrootcert a CA file)",
                    found
                        .errors
                        .first()
                        .map_or_else(String::new, |e| format!(": {e}"))
                )));
            }
        }
    }
    Ok(store)
}

/// `prefer`/`require`/`allow`: encryption without authentication of the server, as libpq. The
/// handshake signature is still checked (against the presented certificate).
#[derive(Debug)]
struct NoVerification(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a trusted root; the host name is not checked. webpki
/// checks the chain (and validity dates) before the name, so a name mismatch means the chain
/// was good.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

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
            .map_err(|e| super::describe_parse_error(dsn, &e))?;
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

/// The `ssl*` values taken out of a DSN.
#[derive(Debug, Default)]
struct SslKeys {
    mode: Option<String>,
    rootcert: Option<String>,
    cert: Option<String>,
    key: Option<String>,
}

impl SslKeys {
    /// Take `key=value` if it is ours; `Ok(false)` hands it to tokio-postgres.
    fn take(&mut self, key: &str, value: String) -> Result<bool> {
        let slot = match key {
            "sslmode" => &mut self.mode,
            "sslrootcert" => &mut self.rootcert,
            "sslcert" => &mut self.cert,
            "sslkey" => &mut self.key,
            "sslpassword" | "sslcrl" | "sslcrldir" => {
                return Err(Error::Config(format!(
                    "the DSN parameter {key} is not supported by pgcrew (use an unencrypted sslkey; certificate revocation lists are not checked)"
                )));
            }
            _ => return Ok(false),
        };
        *slot = Some(value);
        Ok(true)
    }
}

/// Split the `ssl*` keys pgcrew handles out of a DSN; the rest goes to tokio-postgres.
fn split_ssl_keys(dsn: &str) -> Result<(String, SslKeys)> {
    let trimmed = dsn.trim_start();
    let mut keys = SslKeys::default();
    if trimmed.starts_with("postgres://") || trimmed.starts_with("postgresql://") {
        // The query starts at the first `?` after the user info (which ends at the last `@`).
        let after_at = trimmed.rfind('@').map_or(0, |p| p + 1);
        let Some(q) = trimmed[after_at..].find('?').map(|p| p + after_at) else {
            return Ok((dsn.to_string(), keys));
        };
        let mut kept = Vec::new();
        for pair in trimmed[q + 1..].split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if !keys.take(&percent_decode(k), percent_decode(v))? {
                kept.push(pair);
            }
        }
        let mut out = trimmed[..q].to_string();
        if !kept.is_empty() {
            out.push('?');
            out.push_str(&kept.join("&"));
        }
        return Ok((out, keys));
    }
    // key/value: `key = value` pairs, values unquoted (with `\` escapes) or single-quoted.
    let b = dsn.as_bytes();
    let mut out = String::with_capacity(dsn.len());
    let mut i = 0;
    while i < b.len() {
        let start = i;
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        let key_start = i;
        while i < b.len() && b[i] != b'=' && !b[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = &dsn[key_start..i];
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= b.len() || b[i] != b'=' {
            // Malformed: let tokio-postgres report it on the untouched string.
            return Ok((dsn.to_string(), SslKeys::default()));
        }
        i += 1;
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        let mut value = String::new();
        if i < b.len() && b[i] == b'\'' {
            i += 1;
            let mut closed = false;
            while i < b.len() {
                match b[i] {
                    b'\\' if i + 1 < b.len() => {
                        value.push(b[i + 1] as char);
                        i += 2;
                    }
                    b'\'' => {
                        i += 1;
                        closed = true;
                        break;
                    }
                    _ => {
                        let ch = dsn[i..].chars().next().unwrap_or(' ');
                        value.push(ch);
                        i += ch.len_utf8();
                    }
                }
            }
            if !closed {
                return Ok((dsn.to_string(), SslKeys::default()));
            }
        } else {
            while i < b.len() && !b[i].is_ascii_whitespace() {
                if b[i] == b'\\' && i + 1 < b.len() {
                    value.push(b[i + 1] as char);
                    i += 2;
                } else {
                    let ch = dsn[i..].chars().next().unwrap_or(' ');
                    value.push(ch);
                    i += ch.len_utf8();
                }
            }
        }
        if !keys.take(key, value)? {
            out.push_str(&dsn[start..i]);
        }
    }
    Ok((out, keys))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(dsn: &str) -> (String, SslKeys) {
        split_ssl_keys(dsn).expect("split")
    }

    #[test]
    fn urls_lose_their_ssl_keys() {
        let (rest, k) = keys(
            "postgres://u:p@h:5432/db?sslmode=verify-full&application_name=x&sslrootcert=%2Ftmp%2Fca.pem",
        );
        assert_eq!(rest, "postgres://u:p@h:5432/db?application_name=x");
        assert_eq!(k.mode.as_deref(), Some("verify-full"));
        assert_eq!(k.rootcert.as_deref(), Some("/tmp/ca.pem"));
        let (rest, k) = keys("postgres://u:p?x@h/db?sslcert=/c&sslkey=/k");
        assert_eq!(rest, "postgres://u:p?x@h/db");
        assert_eq!(
            (k.cert.as_deref(), k.key.as_deref()),
            (Some("/c"), Some("/k"))
        );
        let (rest, k) = keys("postgres://h/db");
        assert_eq!(rest, "postgres://h/db");
        assert!(k.mode.is_none());
    }

    #[test]
    fn key_value_strings_lose_their_ssl_keys() {
        let (rest, k) = keys(
            "host=h sslmode = 'verify-ca' password='a b' sslrootcert=/tmp/my\\ ca.pem dbname=d",
        );
        assert_eq!(rest, "host=h password='a b' dbname=d");
        assert_eq!(k.mode.as_deref(), Some("verify-ca"));
        assert_eq!(k.rootcert.as_deref(), Some("/tmp/my ca.pem"));
        let (rest, k) = keys("host=h password='unterminated sslmode=x");
        assert_eq!(rest, "host=h password='unterminated sslmode=x");
        assert!(k.mode.is_none());
    }

    #[test]
    fn modes_follow_libpq() {
        let none = None;
        let p = |dsn: &str| PgConfig::parse_with_home(dsn, none);
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
        let e = p("host=h sslmode=verify-fulll")
            .expect_err("unknown")
            .to_string();
        assert!(e.contains("sslmode `verify-fulll` is not one of"), "{e}");
        let e = p("host=h sslmode=verify-full")
            .expect_err("no CA")
            .to_string();
        assert!(e.contains("no CA is given"), "{e}");
        let e = p("host=h sslcert=/x").expect_err("no key").to_string();
        assert!(e.contains("sslcert is set but sslkey is not"), "{e}");
        let e = p("host=h sslkey=/x").expect_err("no cert").to_string();
        assert!(e.contains("sslkey is set but sslcert is not"), "{e}");
        let e = p("host=h sslrootcert=system sslmode=require")
            .expect_err("system")
            .to_string();
        assert!(e.contains("needs sslmode=verify-full"), "{e}");
        let e = p("host=h sslmode=require sslrootcert=/nonexistent/ca.pem")
            .expect_err("unreadable")
            .to_string();
        assert!(
            e.contains("cannot read sslrootcert=/nonexistent/ca.pem"),
            "{e}"
        );
        let e = p("host=h sslpassword=x")
            .expect_err("unsupported")
            .to_string();
        assert!(e.contains("sslpassword is not supported"), "{e}");
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
