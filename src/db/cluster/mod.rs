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

mod process;
mod tls;

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use process::{find_bindir, free_port, is_root};

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
        self.pg_ctl("stop", |c| {
            c.args(["-w", "-m", mode, "stop"]);
        })
    }

    /// Start the server again after [`TempCluster::stop_server`], on the same port.
    pub fn restart(&self) -> Result<()> {
        self.pg_ctl("start", |c| {
            c.arg("-l")
                .arg(self.dir.join("server.log"))
                .args(["-w", "-t", "60", "-o"])
                .arg(&self.start_opts)
                .arg("start")
                .stdin(Stdio::null());
        })
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
