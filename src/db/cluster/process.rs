//! Finding and running the PostgreSQL tools of a [`TempCluster`], and the watchdog that
//! removes the cluster when its owner dies.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use super::TempCluster;
use crate::error::{Error, Result};

pub(super) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

pub(super) fn find_bindir() -> Result<PathBuf> {
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

pub(super) fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

impl TempCluster {
    pub(super) fn command(&self, tool: &str) -> Command {
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
    pub(super) fn spawn_watchdog(&mut self) -> Result<()> {
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

    /// `pg_ctl -D <data>` with the arguments `args` adds; an error names `action` and carries
    /// pg_ctl's standard error.
    pub(super) fn pg_ctl(&self, action: &str, args: impl FnOnce(&mut Command)) -> Result<()> {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D").arg(self.dir.join("data"));
        args(&mut cmd);
        let out = cmd.output()?;
        if !out.status.success() {
            return Err(Error::Cluster(format!(
                "pg_ctl {action} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(())
    }
}
