//! A throwaway PgBouncer in front of a PostgreSQL server, for tests and `pgcrew bench
//! pgbouncer`: the distribution's `pgbouncer` binary (Debian: `apt-get install pgbouncer`)
//! started on a free local port with a generated configuration, stopped on drop.
//!
//! As root it runs as the `postgres` user (PgBouncer refuses to run as root), like
//! [`TempCluster`](super::TempCluster)'s server.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::parse_dsn;
use crate::error::{Error, Result};

/// A running PgBouncer (killed and its directory removed on drop).
pub struct TempPgBouncer {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl std::fmt::Debug for TempPgBouncer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TempPgBouncer")
            .field("port", &self.port)
            .field("dir", &self.dir)
            .finish()
    }
}

/// How a [`TempPgBouncer`] assigns server connections to clients (`pool_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    /// A server connection per client for the client's whole session.
    Session,
    /// A server connection per transaction (what pgcrew's unnamed statement mode is for).
    Transaction,
}

impl TempPgBouncer {
    /// The `pgbouncer` binary: on `PATH`, else `/usr/sbin/pgbouncer`; `None` when missing.
    pub fn binary() -> Option<PathBuf> {
        let on_path = std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("pgbouncer"))
                .find(|p| p.is_file())
        });
        on_path.or_else(|| {
            let p = PathBuf::from("/usr/sbin/pgbouncer");
            p.is_file().then_some(p)
        })
    }

    /// Start PgBouncer in `mode` in front of the server `upstream_dsn` points at (its host,
    /// port, user and password; clients choose the database). Clients log in without a
    /// password (`auth_type = any`) and PgBouncer logs in to the server as the DSN's user.
    /// Blocking (waits until PgBouncer accepts connections, at most 10 s).
    pub fn start(upstream_dsn: &str, mode: PoolMode) -> Result<TempPgBouncer> {
        let exe = Self::binary().ok_or_else(|| {
            Error::Config("pgbouncer is not installed (apt-get install pgbouncer)".into())
        })?;
        let cfg = parse_dsn(upstream_dsn)?;
        let (host, port) = match (cfg.get_hosts().first(), cfg.get_ports().first()) {
            (Some(tokio_postgres::config::Host::Tcp(h)), p) => (h.clone(), *p.unwrap_or(&5432)),
            (Some(tokio_postgres::config::Host::Unix(d)), p) => {
                (d.display().to_string(), *p.unwrap_or(&5432))
            }
            (None, p) => ("127.0.0.1".to_string(), *p.unwrap_or(&5432)),
        };
        let user = cfg.get_user().unwrap_or("postgres").to_string();
        let password = cfg
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned());
        // SAFETY: geteuid(2) cannot fail and touches no memory.
        let as_postgres = unsafe { libc::geteuid() } == 0;
        let dir = std::env::temp_dir().join(format!(
            "pgcrew-pgbouncer-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        ));
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        let listen_port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?.port()
        };
        let quote = |v: &str| format!("'{}'", v.replace('\'', "''"));
        let mut server = format!("host={} port={port} user={}", quote(&host), quote(&user));
        if let Some(pw) = &password {
            server.push_str(&format!(" password={}", quote(pw)));
        }
        let ini = format!(
            "[databases]\n* = {server}\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {listen_port}\n\
             unix_socket_dir =\nauth_type = any\npool_mode = {}\ndefault_pool_size = 20\n\
             max_client_conn = 1000\nlogfile = {}\npidfile = {}\n\
             ignore_startup_parameters = extra_float_digits\n",
            match mode {
                PoolMode::Session => "session",
                PoolMode::Transaction => "transaction",
            },
            dir.join("pgbouncer.log").display(),
            dir.join("pgbouncer.pid").display(),
        );
        let ini_path = dir.join("pgbouncer.ini");
        {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&ini_path)?;
            f.write_all(ini.as_bytes())?;
        }
        if as_postgres {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status()?
                .success();
            if !ok {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(Error::Config(
                    "running as root, pgbouncer must run as the `postgres` user, but `chown postgres` failed".into(),
                ));
            }
        }
        let mut cmd = if as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        cmd.arg(&ini_path)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn()?;
        let mut bouncer = TempPgBouncer {
            child,
            dir,
            port: listen_port,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", listen_port)).is_ok() {
                return Ok(bouncer);
            }
            if let Ok(Some(status)) = bouncer.child.try_wait() {
                return Err(Error::Config(format!(
                    "pgbouncer exited at start-up ({status}): {}",
                    bouncer.log()
                )));
            }
            if Instant::now() >= deadline {
                return Err(Error::Config(format!(
                    "pgbouncer did not accept connections within 10 s: {}",
                    bouncer.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The port PgBouncer listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A DSN for database `dbname` through PgBouncer (no password: `auth_type = any`).
    pub fn dsn_for(&self, dbname: &str) -> String {
        format!("postgres://pgcrew@127.0.0.1:{}/{dbname}", self.port)
    }

    /// PgBouncer's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }

    /// The directory holding the configuration and the log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for TempPgBouncer {
    fn drop(&mut self) {
        // The whole process group: as root `runuser` forks pgbouncer and waits for it.
        if let Ok(pgid) = i32::try_from(self.child.id()) {
            // SAFETY: kill(2) with a negative pid signals that process group; no memory is
            // touched.
            unsafe {
                libc::kill(-pgid, libc::SIGTERM);
            }
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
