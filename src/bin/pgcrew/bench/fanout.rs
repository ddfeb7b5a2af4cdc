//! `pgcrew bench fanout`: NOTIFY delivery latency to many in-process subscribers over one
//! LISTEN connection, next to the raw latency of one plain LISTEN connection in the same run.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use futures_util::StreamExt;
use pgcrew::coord::notify::{Event, EventKind};
use pgcrew::{Client, ClientConfig, Result, RunId};
use tokio::sync::Mutex;

use crate::bench::{percentile_us, scratch_db};

/// Arguments of `pgcrew bench fanout`.
#[derive(Debug, Args)]
pub struct FanoutBenchArgs {
    /// In-process subscribers.
    #[arg(long, default_value_t = 1000)]
    pub subscribers: usize,
    /// Notifications sent (one at a time, each awaited by every subscriber).
    #[arg(long, default_value_t = 200)]
    pub notifications: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// The figures printed.
#[derive(Debug, serde::Serialize)]
struct Report {
    subscribers: usize,
    notifications: usize,
    /// Deliveries measured (subscribers x notifications when none was lost).
    deliveries: usize,
    seconds: f64,
    /// NOTIFY call to a subscriber's receipt, through the instance's notifier, microseconds.
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    /// NOTIFY call to the receipt on one plain LISTEN connection, microseconds.
    raw_p50_us: f64,
    raw_p99_us: f64,
    /// `p50_us / raw_p50_us`.
    p50_ratio: f64,
    /// `p99_us / raw_p99_us`.
    p99_ratio: f64,
    /// The instance process's resident memory.
    memory: crate::bench::Memory,
}

impl Default for FanoutBenchArgs {
    fn default() -> Self {
        Self {
            subscribers: 1000,
            notifications: 200,
            json: false,
        }
    }
}

const NOTIFY_SQL: &str = pgcrew::sql!("bench/coord_notify");

const LISTEN_SQL: &str = pgcrew::sql!("coord/listen");

/// Run the benchmark.
pub async fn run(dsn: Option<String>, args: FanoutBenchArgs) -> Result<ExitCode> {
    let bench = scratch_db(dsn).await?;
    let run_id = RunId::new();

    // Raw: one plain LISTEN connection, no fan-out.
    let raw = raw_latencies(&bench.dsn, run_id, args.notifications).await?;

    // pgcrew: one LISTEN connection per instance, N subscribers.
    let client = Client::connect(
        bench.dsn.as_str(),
        ClientConfig::builder().leader_election(false).build()?,
    )
    .await?;
    client.start().await?;
    client
        .notifier()
        .wait_connected(Duration::from_secs(5))
        .await;
    let sent_at: Arc<Mutex<Vec<Option<Instant>>>> =
        Arc::new(Mutex::new(vec![None; args.notifications]));
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Duration)>();
    let mut tasks = Vec::new();
    for _ in 0..args.subscribers {
        let mut sub = client.subscribe(&[EventKind::RunEvent]);
        let sent_at = sent_at.clone();
        let done = done_tx.clone();
        let n = args.notifications;
        tasks.push(tokio::spawn(async move {
            let mut got = 0;
            while got < n {
                match sub.next().await {
                    Some(Event::RunEvent { seq, .. }) => {
                        let now = Instant::now();
                        let i = seq as usize;
                        let sent = sent_at.lock().await.get(i).copied().flatten();
                        if let Some(s) = sent {
                            let _ = done.send((i, now.duration_since(s)));
                        }
                        got += 1;
                    }
                    Some(_) => {}
                    None => break,
                }
            }
        }));
    }
    drop(done_tx);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut memory = crate::bench::Memory::idle();
    let conn = client.db().get().await?;
    let stmt = conn.prepare(NOTIFY_SQL).await?;
    let mut lat = Vec::with_capacity(args.subscribers * args.notifications);
    let started = Instant::now();
    for i in 0..args.notifications {
        sent_at.lock().await[i] = Some(Instant::now());
        conn.execute(&stmt, &[&run_id.0, &(i as i64)]).await?;
        let mut received = 0;
        while received < args.subscribers {
            match tokio::time::timeout(Duration::from_secs(5), done_rx.recv()).await {
                Ok(Some((_, d))) => {
                    lat.push(d);
                    received += 1;
                }
                _ => break,
            }
        }
        memory.sample();
    }
    let elapsed = started.elapsed();
    for t in tasks {
        t.abort();
    }
    client.stop().await?;
    memory.finish();
    lat.sort();
    let (p50, p99) = (percentile_us(&lat, 50.0), percentile_us(&lat, 99.0));
    let (raw50, raw99) = (percentile_us(&raw, 50.0), percentile_us(&raw, 99.0));
    let report = Report {
        subscribers: args.subscribers,
        notifications: args.notifications,
        deliveries: lat.len(),
        seconds: elapsed.as_secs_f64(),
        p50_us: p50,
        p99_us: p99,
        max_us: percentile_us(&lat, 100.0),
        raw_p50_us: raw50,
        raw_p99_us: raw99,
        p50_ratio: p50 / raw50,
        p99_ratio: p99 / raw99,
        memory,
    };
    crate::bench::print_report(args.json, &report, |r| {
        println!(
            "fan-out: {} subscribers, {} notifications, {} deliveries in {:.2}s",
            r.subscribers, r.notifications, r.deliveries, r.seconds
        );
        println!(
            "  pgcrew fan-out delivery latency: p50 {:.0} us, p99 {:.0} us, max {:.0} us",
            r.p50_us, r.p99_us, r.max_us
        );
        println!(
            "  raw single LISTEN latency:       p50 {:.0} us, p99 {:.0} us",
            r.raw_p50_us, r.raw_p99_us
        );
        println!(
            "  pgcrew / raw: p50 {:.2}x, p99 {:.2}x",
            r.p50_ratio, r.p99_ratio
        );
        println!("  {}", r.memory.line());
        Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

async fn raw_latencies(dsn: &str, run_id: RunId, n: usize) -> Result<Vec<Duration>> {
    let cfg = pgcrew::db::parse_dsn(dsn)?;
    let (listener, driver, mut rx) = pgcrew::Db::connect_dedicated(&cfg).await?;
    listener.batch_execute(LISTEN_SQL).await?;
    let (sender, conn) = cfg.open().await?;
    let sender_task = tokio::spawn(conn);
    let stmt = sender.prepare(NOTIFY_SQL).await?;
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let t0 = Instant::now();
        sender.execute(&stmt, &[&run_id.0, &(i as i64)]).await?;
        if let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            lat.push(t0.elapsed());
        }
    }
    drop(listener);
    drop(sender);
    driver.abort();
    sender_task.abort();
    lat.sort();
    Ok(lat)
}
