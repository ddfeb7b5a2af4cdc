//! `pgcrew` child processes: `serve` instances, CLI runs and benches.

use std::ffi::OsStr;
use std::process::{Child, Command, Output, Stdio};

use pgcrew::Db;

use super::{TestDb, scalar};

/// Path of the built `pgcrew` binary.
pub fn pgcrew_bin() -> &'static str {
    env!("CARGO_BIN_EXE_pgcrew")
}

/// A `pgcrew serve` child process, killed (SIGKILL) and reaped on drop.
pub struct Serve {
    /// Its instance id.
    pub id: String,
    /// The process.
    pub child: Child,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `pgcrew serve --instance-id <id>` on `dsn` (through `DATABASE_URL`: a password on argv is
/// visible to every local user), without OpenAI settings from the environment, stdin and
/// stdout closed, stderr inherited; add arguments with `.args(..)` and start it with
/// [`spawn`](ServeCommand::spawn).
pub fn serve(dsn: &str, id: &str) -> ServeCommand {
    let mut cmd = Command::new(pgcrew_bin());
    cmd.env("DATABASE_URL", dsn)
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .args(["serve", "--instance-id", id])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    ServeCommand {
        id: id.to_string(),
        cmd,
    }
}

/// A `pgcrew serve` command being put together (see [`serve`]).
pub struct ServeCommand {
    id: String,
    cmd: Command,
}

impl ServeCommand {
    /// More command-line arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.cmd.args(args);
        self
    }

    /// `--agents demo` with test timings: heartbeats, maintenance and worker polls every few
    /// hundred milliseconds, a 1.5 s leader TTL and run lease, and the given instance TTL, task
    /// heartbeat timeout and tool latency.
    pub fn demo_agents(
        self,
        instance_ttl: &str,
        task_heartbeat_timeout: &str,
        tool_latency: &str,
    ) -> Self {
        self.args(["--agents", "demo"])
            .args([
                "--heartbeat-interval",
                "300ms",
                "--instance-ttl",
                instance_ttl,
            ])
            .args(["--leader-ttl", "1500ms", "--maintenance-interval", "300ms"])
            .args(["--run-lease-ttl", "1500ms"])
            .args(["--task-heartbeat-timeout", task_heartbeat_timeout])
            .args([
                "--worker-poll-interval",
                "200ms",
                "--poll-interval",
                "500ms",
            ])
            .args(["--tool-latency", tool_latency])
    }

    /// Discard the process's stderr.
    pub fn quiet(mut self) -> Self {
        self.cmd.stderr(Stdio::null());
        self
    }

    /// Start the process.
    pub fn spawn(mut self) -> Serve {
        let child = self.cmd.spawn().expect("spawn pgcrew serve");
        Serve { id: self.id, child }
    }
}

/// Run `pgcrew <args>` on `dsn` (through `DATABASE_URL`) to its end.
pub async fn cli<I, S>(dsn: &str, args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    tokio::process::Command::new(pgcrew_bin())
        .env("DATABASE_URL", dsn)
        .args(args)
        .output()
        .await
        .unwrap()
}

/// A fresh test database, and `pgcrew bench <args> --json` run on its server (`args` split at
/// white space): the database, the bench's JSON report and its stderr.
pub async fn run_bench(args: &str) -> (TestDb, serde_json::Value, String) {
    let t = crate::common::test_db().await;
    let mut argv = vec!["bench".to_string()];
    argv.extend(args.split_whitespace().map(str::to_string));
    argv.push("--json".into());
    let dsn = t.dsn().to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(pgcrew_bin())
            .args(&argv)
            .env("DATABASE_URL", dsn)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    (t, serde_json::from_slice(&out.stdout).unwrap(), stderr)
}

/// Every scratch database a bench named on stderr (at least one) no longer exists; how many
/// it named.
pub async fn assert_bench_database_dropped(db: &Db, stderr: &str) -> usize {
    let names: Vec<&str> = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("benchmark database: "))
        .map(str::trim)
        .collect();
    assert!(!names.is_empty(), "the bench names its database");
    for name in &names {
        assert_eq!(
            scalar(
                db,
                &format!("SELECT count(*) FROM pg_database WHERE datname = '{name}'")
            )
            .await,
            0,
            "the benchmark database {name} was not dropped"
        );
    }
    names.len()
}

/// `pgcrew tasks work --record-effects` on `dsn` for the `effect` tasks of `queue` (eight at a
/// time, sixteen prefetched, each taking `task_time`), stdout closed, killed on drop; add
/// arguments or environment and spawn it.
pub fn effect_worker(dsn: &str, id: &str, queue: &str, task_time: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(pgcrew_bin());
    cmd.args(["tasks", "work", "--instance-id", id, "--queue", queue])
        .args(["--kind", "effect", "--concurrency", "8", "--prefetch", "16"])
        .args(["--task-time", task_time, "--record-effects"])
        .env("DATABASE_URL", dsn)
        .stdout(Stdio::null())
        .kill_on_drop(true);
    cmd
}
