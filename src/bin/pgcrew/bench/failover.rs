//! `pgcrew bench failover`: leader failover time with real `pgcrew serve` processes, after
//! `kill -9` of the leader and after its graceful stop (SIGTERM).

use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use pgcrew::{Db, Error, Result};

use crate::bench::{percentile_us, scratch_db};

/// Arguments of `pgcrew bench failover`.
#[derive(Debug, Args)]
pub struct FailoverBenchArgs {
    /// Failovers of each kind to measure.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Leader lease TTL of the instances.
    #[arg(long, default_value = "2s", value_parser = |s: &str| pgcrew::config::parse_duration(s).map_err(|e| e.to_string()))]
    pub leader_ttl: Duration,
}

impl Default for FailoverBenchArgs {
    fn default() -> Self {
        Self {
            rounds: 5,
            leader_ttl: Duration::from_secs(2),
        }
    }
}

const CURRENT_LEADER: &str = pgcrew::sql!("bench/coord_current_leader");
const INSTANCE_COUNT: &str = pgcrew::sql!("bench/coord_instance_count");

struct Node {
    id: String,
    child: Child,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(dsn: &str, id: &str, ttl: Duration) -> Result<Node> {
    let exe = crate::bench::own_exe();
    // The DSN (with its password) goes through the environment: argv is public to local users.
    let child = Command::new(exe)
        .env("DATABASE_URL", dsn)
        .args(["serve", "--instance-id", id])
        .args(["--heartbeat-interval", "200ms", "--instance-ttl", "5s"])
        .arg("--leader-ttl")
        .arg(format!("{}ms", ttl.as_millis()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    Ok(Node {
        id: id.to_string(),
        child,
    })
}

async fn leader(db: &Db) -> Result<Option<(String, i64)>> {
    let conn = db.get().await?;
    Ok(conn
        .query_opt(CURRENT_LEADER, &[])
        .await?
        .map(|r| (r.get(0), r.get(1))))
}

async fn wait_for(db: &Db, pred: impl Fn(Option<&(String, i64)>) -> bool) -> Result<Duration> {
    let start = Instant::now();
    loop {
        if pred(leader(db).await?.as_ref()) {
            return Ok(start.elapsed());
        }
        if start.elapsed() > Duration::from_secs(60) {
            return Err(Error::Timeout(Duration::from_secs(60)));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn wait_instances(db: &Db, n: i64) -> Result<()> {
    let start = Instant::now();
    loop {
        let conn = db.get().await?;
        let count: i64 = conn.query_one(INSTANCE_COUNT, &[]).await?.get(0);
        if count == n {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(30) {
            return Err(Error::Timeout(Duration::from_secs(30)));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Run the benchmark.
pub async fn run(dsn: Option<String>, args: FailoverBenchArgs) -> Result<ExitCode> {
    let bench = scratch_db(dsn).await?;
    let db = Db::connect(&bench.dsn, 2, Duration::from_secs(10)).await?;
    let ttl = args.leader_ttl;
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(spawn(&bench.dsn, &format!("bench-{i}"), ttl)?);
    }
    let mut next_id = 3;
    wait_instances(&db, 3).await?;
    wait_for(&db, |l| l.is_some()).await?;
    let mut killed = Vec::new();
    let mut graceful = Vec::new();
    for round in 0..args.rounds * 2 {
        let Some((current, _)) = leader(&db).await? else {
            wait_for(&db, |l| l.is_some()).await?;
            continue;
        };
        let Some(idx) = nodes.iter().position(|n| n.id == current) else {
            return Err(Error::Config(format!(
                "leader {current} is not one of ours"
            )));
        };
        let mut victim = nodes.remove(idx);
        let hard = round % 2 == 0;
        if hard {
            victim.child.kill()?;
        } else {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(victim.child.id() as i32, libc::SIGTERM) };
        }
        let took = wait_for(&db, |l| l.is_some_and(|(id, _)| *id != current)).await?;
        let _ = victim.child.wait();
        eprintln!(
            "round {}: {} -> new leader after {:?}",
            round + 1,
            if hard { "kill -9" } else { "SIGTERM" },
            took
        );
        if hard { &mut killed } else { &mut graceful }.push(took);
        nodes.push(spawn(&bench.dsn, &format!("bench-{next_id}"), ttl)?);
        next_id += 1;
        // Let the replacement register before the next round.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    killed.sort();
    graceful.sort();
    println!("leader failover, 3 `pgcrew serve` processes, leader TTL {ttl:?}:");
    println!(
        "  after kill -9:       p50 {:.0} ms, max {:.0} ms ({} rounds; bound: TTL)",
        percentile_us(&killed, 50.0) / 1000.0,
        percentile_us(&killed, 100.0) / 1000.0,
        killed.len()
    );
    println!(
        "  after graceful stop: p50 {:.1} ms, max {:.1} ms ({} rounds)",
        percentile_us(&graceful, 50.0) / 1000.0,
        percentile_us(&graceful, 100.0) / 1000.0,
        graceful.len()
    );
    Ok(ExitCode::SUCCESS)
}
