//! The demo's three `pgcrew serve` instances, as child processes.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pgcrew::db::Db;
use pgcrew::{Error, Result};

use super::QUEUE;
use super::watch::tick;

/// `pgcrew serve` children, stopped (SIGTERM, then SIGKILL) when dropped.
pub(super) struct Instances {
    children: Vec<(String, Option<Child>)>,
}

impl Instances {
    pub(super) fn kill9(&mut self, id: &str) -> bool {
        for (name, child) in &mut self.children {
            if name == id
                && let Some(mut c) = child.take()
            {
                let _ = c.kill();
                let _ = c.wait();
                return true;
            }
        }
        false
    }
}

impl Drop for Instances {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            if let Some(c) = child
                && let Ok(pid) = i32::try_from(c.id())
            {
                // SAFETY: plain kill(2) on our own child's pid.
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        for (_, child) in &mut self.children {
            if let Some(mut c) = child.take() {
                while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

pub(super) fn spawn_instances(dsn: &str, model: &str) -> Result<Instances> {
    let exe = std::env::current_exe()
        .map_err(|e| Error::invalid("pgcrew", format!("cannot find the pgcrew binary: {e}")))?;
    let mut inst = Instances {
        children: Vec::new(),
    };
    for n in 1..=3 {
        let id = format!("demo-{n}");
        let child = Command::new(&exe)
            .env("DATABASE_URL", dsn)
            .args([
                "--log",
                "off",
                "serve",
                "--instance-id",
                &id,
                "--agents",
                "demo",
                "--model",
                model,
                "--queues",
                QUEUE,
                "--concurrency",
                "2",
                "--heartbeat-interval",
                "300ms",
                "--instance-ttl",
                "2s",
                "--leader-ttl",
                "1500ms",
                "--maintenance-interval",
                "300ms",
                "--run-lease-ttl",
                "1500ms",
                "--task-heartbeat-timeout",
                "1500ms",
                "--worker-poll-interval",
                "200ms",
                "--poll-interval",
                "500ms",
                "--model-latency",
                "600ms",
                "--tool-latency",
                "300ms",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| Error::invalid("pgcrew serve", format!("cannot start: {e}")))?;
        inst.children.push((id, Some(child)));
    }
    Ok(inst)
}

/// Phase 3: start the instances and wait (30 s at most) until all three are registered and
/// one leads; `None` (after saying so) when they do not come up.
pub(super) async fn start_instances(db: &Db, dsn: &str, model: &str) -> Result<Option<Instances>> {
    let instances = spawn_instances(dsn, model)?;
    println!("started 3 instances: demo-1, demo-2, demo-3 (pgcrew serve --agents demo)");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // The three demo instances (not the console of `--ui`).
        let n = pgcrew::coord::instance::list(db)
            .await?
            .iter()
            .filter(|i| i.id.starts_with("demo-") && i.id != "demo-console")
            .count();
        let (t, _) = tick(db).await?;
        if n == 3 && t.leader.is_some() {
            let (l, term) = t.leader.unwrap_or_default();
            println!("3 instances up; leader {l} (term {term})");
            return Ok(Some(instances));
        }
        if Instant::now() > deadline {
            eprintln!("error: the instances did not come up within 30 s ({n} registered)");
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
