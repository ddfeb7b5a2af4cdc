//! [`TlsSettings`]: the TLS part of a DSN and the rustls connector built from it (CA, client
//! certificate and key files read when the DSN is parsed).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::dsn::SslKeys;
use super::verify::RelaxedVerifier;
use super::{RootCert, SslMode};
use crate::error::{Error, Result};

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
    pub(super) mode: SslMode,
    pub(super) root_cert: Option<RootCert>,
    pub(super) client_cert: Option<(PathBuf, PathBuf)>,
    pub(super) connector: Option<MakeRustlsConnect>,
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

    pub(super) fn from_keys(keys: &SslKeys, home: Option<&Path>) -> Result<TlsSettings> {
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
        let algorithms = provider.signature_verification_algorithms;
        let builder = match (self.verify(), &self.root_cert) {
            (Verify::Nothing, _) | (_, None) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(RelaxedVerifier {
                    chain: None,
                    algorithms,
                })),
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
                        .with_custom_certificate_verifier(Arc::new(RelaxedVerifier {
                            chain: Some(webpki),
                            algorithms,
                        }))
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
