//! A small certificate authority for throwaway clusters and tests: a CA, server certificates
//! (with host-name SANs) and client certificates (common name = the PostgreSQL role, for
//! `cert` authentication), made with rcgen.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::error::{Error, Result};

fn cert_error(what: &str, e: rcgen::Error) -> Error {
    Error::Cluster(format!("cannot make the {what} certificate: {e}"))
}

/// A certificate and its private key, in PEM. `Debug` leaves the key out.
#[derive(Clone)]
pub struct IssuedCert {
    /// The certificate (PEM).
    pub cert_pem: String,
    /// The private key (PEM, unencrypted).
    pub key_pem: String,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl IssuedCert {
    /// Write `<dir>/<stem>.crt` and `<dir>/<stem>.key` (the key owner-only, mode 0600), and
    /// return their paths.
    pub fn write(&self, dir: &Path, stem: &str) -> Result<(PathBuf, PathBuf)> {
        let cert = dir.join(format!("{stem}.crt"));
        let key = dir.join(format!("{stem}.key"));
        write_file(&cert, &self.cert_pem, 0o644)?;
        write_file(&key, &self.key_pem, 0o600)?;
        Ok((cert, key))
    }
}

pub(crate) fn write_file(path: &Path, contents: &str, mode: u32) -> Result<()> {
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    f.write_all(contents.as_bytes())?;
    Ok(())
}

/// Validity of an issued certificate (default: from 1975 to 4096, as rcgen's default).
#[derive(Debug, Clone, Copy, Default)]
pub enum Validity {
    /// Valid now and for a very long time.
    #[default]
    Long,
    /// Expired on 2001-01-01 (for testing how an expired certificate is reported).
    Expired,
}

/// A self-signed certificate authority held in memory.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// A new CA with a fresh key (ECDSA P-256) and the given common name.
    pub fn new(common_name: &str) -> Result<CertificateAuthority> {
        let key = KeyPair::generate().map_err(|e| cert_error("CA", e))?;
        let mut params =
            CertificateParams::new(Vec::<String>::new()).map_err(|e| cert_error("CA", e))?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).map_err(|e| cert_error("CA", e))?;
        Ok(CertificateAuthority {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate (PEM): what clients put in `sslrootcert`.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A server certificate for `names` (DNS names or IP addresses, e.g. `localhost`,
    /// `127.0.0.1`).
    pub fn issue_server(&self, names: &[&str], validity: Validity) -> Result<IssuedCert> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let common_name = names.first().cloned().unwrap_or_default();
        self.issue(
            names,
            &common_name,
            ExtendedKeyUsagePurpose::ServerAuth,
            validity,
        )
    }

    /// A client certificate whose common name is `role` (PostgreSQL's `cert` authentication
    /// logs in the role named by the common name).
    pub fn issue_client(&self, role: &str) -> Result<IssuedCert> {
        self.issue(
            Vec::new(),
            role,
            ExtendedKeyUsagePurpose::ClientAuth,
            Validity::Long,
        )
    }

    fn issue(
        &self,
        names: Vec<String>,
        common_name: &str,
        usage: ExtendedKeyUsagePurpose,
        validity: Validity,
    ) -> Result<IssuedCert> {
        let key = KeyPair::generate().map_err(|e| cert_error("leaf", e))?;
        let mut params = CertificateParams::new(names).map_err(|e| cert_error("leaf", e))?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        if let Validity::Expired = validity {
            params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        }
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| cert_error("leaf", e))?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}
