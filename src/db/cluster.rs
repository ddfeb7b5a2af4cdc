//! A throwaway local PostgreSQL cluster for development, tests, examples and `pgcrew demo`.
//!
//! The cluster is created with the system's PostgreSQL binaries (found on `PATH`, through
//! `pg_config --bindir`, or under `/usr/lib/postgresql/*/bin`) in a fresh temporary directory,
//! listens on a free port on 127.0.0.1 (and a unix socket in its directory), and is stopped and
//! removed when the [`TempCluster`] is dropped. A watchdog process also removes it if the owning
//! process dies without dropping it (for example on `kill -9`). When running as root the cluster
//! is created and run as the `postgres` user, because `initdb` refuses to run as root.
//!
//! Other local users get nothing from a throwaway cluster: its directory (data, log and unix
//! socket) is mode 0700 and owned by the cluster's OS user, TCP connections need the
//! superuser's password (`scram-sha-256`, never `trust`), and that password is random per
//! cluster, handed to `initdb` in an owner-only file that is removed right after, and never
//! put on a command line (which `ps` shows to everyone).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::error::{Error, Result};

/// Options for [`TempCluster::start_with`].
#[derive(Debug, Clone)]
pub struct TempClusterOptions {
    /// `max_connections` of the cluster (default 300).
    pub max_connections: u32,
    /// Turn off fsync and synchronous commit for speed (default true; never for real data).
    pub unsafe_fast: bool,
    /// Extra `-c name=value` settings.
    pub settings: Vec<(String, String)>,
    /// Fixed port instead of a free one (default: pick a free port).
    pub port: Option<u16>,
    /// Serve TLS (`ssl=on`) with a server certificate for `localhost` and `127.0.0.1` signed by
    /// a CA made for this cluster (default false); clients trust it through
    /// [`TempCluster::tls_root_cert`].
    pub tls: bool,
    /// Roles that must log in over TLS with a client certificate (`hostssl all <role>
    /// 127.0.0.1/32 cert`), issued by [`TempCluster::issue_client_cert`]; needs `tls`.
    pub tls_cert_auth_roles: Vec<String>,
}

impl Default for TempClusterOptions {
    fn default() -> Self {
        Self {
            max_connections: 300,
            unsafe_fast: true,
            settings: Vec::new(),
            port: None,
            tls: false,
            tls_cert_auth_roles: Vec::new(),
        }
    }
}

/// A running throwaway PostgreSQL cluster. Dropping it stops the server and deletes its files.
///
/// Its `Debug` output leaves out the superuser password.
pub struct TempCluster {
    dir: PathBuf,
    bindir: PathBuf,
    port: u16,
    password: String,
    start_opts: String,
    run_as_postgres: bool,
    watchdog: Option<std::process::Child>,
    stopped: bool,
    /// The cluster's CA and the path of its certificate, when it serves TLS.
    tls: Option<(super::certs::CertificateAuthority, PathBuf)>,
}

impl std::fmt::Debug for TempCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TempCluster")
            .field("dir", &self.dir)
            .field("bindir", &self.bindir)
            .field("port", &self.port)
            .field("password", &"<redacted>")
            .field("start_opts", &self.start_opts)
            .field("run_as_postgres", &self.run_as_postgres)
            .field("stopped", &self.stopped)
            .field("tls", &self.tls.as_ref().map(|t| &t.1))
            .finish_non_exhaustive()
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn find_bindir() -> Result<PathBuf> {
    if let Ok(dir) = std::env::var("PGCREW_PG_BINDIR") {
        let p = PathBuf::from(dir);
        if p.join("initdb").exists() {
            return Ok(p);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let initdb = dir.join("initdb");
            if initdb.exists() && dir.join("pg_ctl").exists() {
                // Resolve symlinks (Debian links /usr/local/bin/initdb to the versioned dir),
                // so that `postgres` is found next to it.
                let real = std::fs::canonicalize(&initdb).unwrap_or(initdb);
                if let Some(parent) = real.parent()
                    && parent.join("postgres").exists()
                {
                    return Ok(parent.to_path_buf());
                }
            }
        }
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if p.join("initdb").exists() {
            return Ok(p);
        }
    }
    let mut candidates: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    candidates.sort();
    candidates.pop().map(|(_, p)| p).ok_or_else(|| {
        Error::Cluster(
            "no PostgreSQL server binaries found (initdb, pg_ctl, postgres): install the \
             PostgreSQL server (e.g. `apt-get install postgresql`), put its bin directory on \
             PATH or set PGCREW_PG_BINDIR, or set DATABASE_URL to an existing database"
                .into(),
        )
    })
}

/// Give the PostgreSQL tools (and the server they start) only `PATH` and `TZ` from our
/// environment. Ours may hold secrets (`DATABASE_URL`, API keys), and a server run as the
/// `postgres` user could read them in its own `/proc/<pid>/environ`; stray `PG*` variables
/// cannot change what initdb and pg_ctl do either.
fn minimal_env(cmd: &mut Command) {
    cmd.env_clear();
    for key in ["PATH", "TZ"] {
        if let Some(v) = std::env::var_os(key) {
            cmd.env(key, v);
        }
    }
}

fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

impl TempCluster {
    /// Create and start a cluster with the default options.
    pub fn start() -> Result<TempCluster> {
        Self::start_with(TempClusterOptions::default())
    }

    /// Create and start a cluster. Blocking (initdb takes about a second); call it from
    /// `tokio::task::spawn_blocking` inside async code if that matters.
    pub fn start_with(options: TempClusterOptions) -> Result<TempCluster> {
        let bindir = find_bindir()?;
        let run_as_postgres = is_root();
        let base = std::env::temp_dir();
        let dir = base.join(format!(
            "pgcrew-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        ));
        // Creation fails if the path exists (no pre-planted directory or symlink is used). It
        // is created 0700 (never wider, even for a moment), and the mode is set again because
        // the umask could have narrowed it.
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        let password = super::secret::random_password().map_err(|e| {
            Error::Cluster(format!(
                "cannot read /dev/urandom for the cluster's random password: {e}"
            ))
        })?;
        let mut cluster = TempCluster {
            dir: dir.clone(),
            bindir,
            port: 0,
            password,
            start_opts: String::new(),
            run_as_postgres,
            watchdog: None,
            stopped: false,
            tls: None,
        };
        if run_as_postgres {
            let status = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&dir)
                .status()?;
            if !status.success() {
                return Err(Error::Cluster(
                    "running as root, the cluster must be owned by the `postgres` user, but \
                     `chown postgres` failed: create that user (the PostgreSQL packages do) or run \
                     as a non-root user"
                        .into(),
                ));
            }
        }
        cluster.spawn_watchdog()?;
        let data = dir.join("data");
        // Authentication: TCP (127.0.0.1 only) always needs the random password
        // (scram-sha-256; `trust` over TCP would let every local user in). Unix-socket
        // connections are trusted: the socket lives in the cluster directory, which only the
        // cluster's OS user (and root) can enter, and that user can read the data directory
        // anyway, so `trust` there grants nobody anything new (and keeps `psql -h <dir>` working
        // for debugging).
        //
        // The password reaches initdb through a file that only the owner can read (created
        // with mode 0600 inside the 0700 directory), never through argv, and is removed as soon
        // as initdb has read it.
        let pwfile = dir.join("pwfile");
        {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&pwfile)?;
            f.write_all(format!("{}\n", cluster.password).as_bytes())?;
        }
        if run_as_postgres {
            let status = Command::new("chown")
                .arg("postgres:postgres")
                .arg(&pwfile)
                .status();
            if !status.is_ok_and(|s| s.success()) {
                let _ = std::fs::remove_file(&pwfile);
                return Err(Error::Cluster(
                    "running as root, the password file must be handed to the `postgres` user, \
                     but `chown postgres` failed"
                        .into(),
                ));
            }
        }
        let initdb = cluster
            .command("initdb")
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .args(["-E", "UTF8", "--no-sync", "--locale=C"])
            .output();
        let _ = std::fs::remove_file(&pwfile);
        let initdb = initdb?;
        if !initdb.status.success() {
            return Err(Error::Cluster(format!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&initdb.stdout),
                String::from_utf8_lossy(&initdb.stderr)
            )));
        }
        let tls_opts = if options.tls {
            cluster.setup_tls(&data, &options.tls_cert_auth_roles)?
        } else if !options.tls_cert_auth_roles.is_empty() {
            return Err(Error::Config(
                "TempClusterOptions::tls_cert_auth_roles needs tls: true".into(),
            ));
        } else {
            String::new()
        };
        let mut last_err = String::new();
        for _ in 0..5 {
            let port = match options.port {
                Some(p) => p,
                None => free_port()?,
            };
            cluster.port = port;
            let mut opts = format!(
                "-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} \
                 -c unix_socket_permissions=0700 -c max_connections={}",
                dir.display(),
                options.max_connections
            );
            if options.unsafe_fast {
                opts.push_str(" -c fsync=off -c synchronous_commit=off -c full_page_writes=off");
            }
            opts.push_str(&tls_opts);
            for (k, v) in &options.settings {
                opts.push_str(&format!(" -c {k}={v}"));
            }
            let out = cluster
                .command("pg_ctl")
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(dir.join("server.log"))
                .args(["-w", "-t", "60", "-o"])
                .arg(&opts)
                .arg("start")
                .stdin(Stdio::null())
                .output()?;
            if out.status.success() {
                cluster.start_opts = opts;
                return Ok(cluster);
            }
            last_err = format!(
                "{}{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(dir.join("server.log")).unwrap_or_default()
            );
            if options.port.is_some() {
                break;
            }
        }
        Err(Error::Cluster(format!("pg_ctl start failed: {last_err}")))
    }

    /// Make the CA and the server certificate, hand them to the server's OS user, and add the
    /// `hostssl ... cert` lines; returns the `-c` options that turn TLS on.
    fn setup_tls(&mut self, data: &Path, cert_auth_roles: &[String]) -> Result<String> {
        use super::certs::{CertificateAuthority, Validity, write_file};
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
    pub fn replace_server_cert(&self, cert: &super::certs::IssuedCert) -> Result<()> {
        if self.tls.is_none() {
            return Err(Error::Config(
                "replace_server_cert needs a cluster started with tls: true".into(),
            ));
        }
        let (crt, key) = cert.write(&self.dir, "server")?;
        self.chown_to_server(&[&crt, &key])?;
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("reload")
            .output()?;
        if !out.status.success() {
            return Err(Error::Cluster(format!(
                "pg_ctl reload failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(())
    }

    fn command(&self, tool: &str) -> Command {
        let exe = self.bindir.join(tool);
        let mut cmd = if self.run_as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        };
        cmd.current_dir(&self.dir);
        minimal_env(&mut cmd);
        // The server must not be killed by a terminal's Ctrl-C aimed at the owner: the owner
        // (or the watchdog) stops it.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd
    }

    /// A watchdog that stops the server and deletes the directory once this process is gone.
    fn spawn_watchdog(&mut self) -> Result<()> {
        let pg_ctl = self.bindir.join("pg_ctl");
        let data = self.dir.join("data");
        let prefix = if self.run_as_postgres {
            "runuser -u postgres -- "
        } else {
            ""
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
             {prefix}'{pg_ctl}' -D '{data}' stop -m immediate >/dev/null 2>&1; rm -rf '{dir}'",
            pid = std::process::id(),
            pg_ctl = pg_ctl.display(),
            data = data.display(),
            dir = self.dir.display(),
        );
        let mut cmd = Command::new("sh");
        minimal_env(&mut cmd);
        cmd.arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        self.watchdog = Some(cmd.spawn()?);
        Ok(())
    }

    /// The TCP port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster's directory (data in `data/`, log in `server.log`, unix socket).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A DSN for database `dbname` as the superuser `postgres` (over TCP, with the cluster's
    /// password). It contains the password: hand it to child processes through the environment
    /// (`DATABASE_URL`), never on a command line, and print it only through
    /// [`redact_dsn`](crate::db::redact_dsn).
    pub fn dsn_for(&self, dbname: &str) -> String {
        format!(
            "postgres://postgres:{}@127.0.0.1:{}/{}",
            self.password, self.port, dbname
        )
    }

    /// The superuser's password: random per cluster (192 bits from the kernel's CSPRNG).
    pub fn password(&self) -> &str {
        &self.password
    }

    /// A DSN for the `postgres` database.
    pub fn dsn(&self) -> String {
        self.dsn_for("postgres")
    }

    /// Stop the server (fast shutdown) without deleting its files; [`TempCluster::restart`] can
    /// start it again. Used by fault tests.
    pub fn stop_server(&self, mode: &str) -> Result<()> {
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-w", "-m", mode, "stop"])
            .output()?;
        if !out.status.success() {
            return Err(Error::Cluster(format!(
                "pg_ctl stop failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(())
    }

    /// Start the server again after [`TempCluster::stop_server`], on the same port.
    pub fn restart(&self) -> Result<()> {
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("server.log"))
            .args(["-w", "-t", "60", "-o"])
            .arg(&self.start_opts)
            .arg("start")
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            return Err(Error::Cluster(format!(
                "pg_ctl start failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(())
    }

    /// Wait until the server accepts connections (after a restart).
    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let cfg = super::parse_dsn(&self.dsn())?;
            if cfg.open().await.is_ok() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Timeout(timeout));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for TempCluster {
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-w", "-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}
