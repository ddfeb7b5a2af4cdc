//! TLS for a [`TempCluster`]: its own CA, the server certificate, client certificates for
//! certificate-authenticated roles.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::TempCluster;
use crate::db::certs::{CertificateAuthority, IssuedCert, Validity, write_file};
use crate::error::{Error, Result};

impl TempCluster {
    /// Make the CA and the server certificate, hand them to the server's OS user, and add the
    /// `hostssl ... cert` lines; returns the `-c` options that turn TLS on.
    pub(super) fn setup_tls(&mut self, data: &Path, cert_auth_roles: &[String]) -> Result<String> {
        let ca = CertificateAuthority::new("pgcrew throwaway cluster CA")?;
        let ca_path = self.dir.join("ca.crt");
        write_file(&ca_path, ca.cert_pem(), 0o644)?;
        let server = ca.issue_server(&["localhost", "127.0.0.1"], Validity::Long)?;
        let (cert, key) = server.write(&self.dir, "server")?;
        self.chown_to_server(&[&ca_path, &cert, &key])?;
        if !cert_auth_roles.is_empty() {
            let hba = data.join("pg_hba.conf");
            let mut text = String::from("# pgcrew: client-certificate roles\n");
            for role in cert_auth_roles {
                if role.is_empty() || !role.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(Error::Config(format!(
                        "tls_cert_auth_roles: `{role}` is not a plain role name (letters, digits, _)"
                    )));
                }
                text.push_str(&format!("hostssl all {role} 127.0.0.1/32 cert\n"));
            }
            text.push_str(&std::fs::read_to_string(&hba)?);
            std::fs::write(&hba, text)?;
        }
        let opts = format!(
            " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={} -c ssl_ca_file={}",
            cert.display(),
            key.display(),
            ca_path.display()
        );
        self.tls = Some((ca, ca_path));
        Ok(opts)
    }

    fn chown_to_server(&self, paths: &[&Path]) -> Result<()> {
        if !self.run_as_postgres {
            return Ok(());
        }
        let status = Command::new("chown")
            .arg("postgres:postgres")
            .args(paths)
            .status()?;
        if !status.success() {
            return Err(Error::Cluster(
                "cannot hand the TLS files to the `postgres` user (chown failed)".into(),
            ));
        }
        Ok(())
    }

    /// The CA certificate (PEM file) that signed the server's certificate, when the cluster
    /// was started with `tls: true`: use it as `sslrootcert`.
    pub fn tls_root_cert(&self) -> Option<&Path> {
        self.tls.as_ref().map(|t| t.1.as_path())
    }

    /// Issue a client certificate for `role` from the cluster's CA (for the roles in
    /// `tls_cert_auth_roles`), written to the cluster's directory; returns the certificate
    /// and key paths (`sslcert`, `sslkey`).
    pub fn issue_client_cert(&self, role: &str) -> Result<(PathBuf, PathBuf)> {
        let (ca, _) = self.tls.as_ref().ok_or_else(|| {
            Error::Config("issue_client_cert needs a cluster started with tls: true".into())
        })?;
        ca.issue_client(role)?
            .write(&self.dir, &format!("client-{role}"))
    }

    /// Replace the server's certificate and key (e.g. with one from another CA, or an expired
    /// one) and reload the server; new connections get it.
    pub fn replace_server_cert(&self, cert: &IssuedCert) -> Result<()> {
        if self.tls.is_none() {
            return Err(Error::Config(
                "replace_server_cert needs a cluster started with tls: true".into(),
            ));
        }
        let (crt, key) = cert.write(&self.dir, "server")?;
        self.chown_to_server(&[&crt, &key])?;
        self.pg_ctl("reload", |c| {
            c.arg("reload");
        })
    }
}
