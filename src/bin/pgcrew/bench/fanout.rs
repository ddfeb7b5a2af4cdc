//! `pgcrew bench fanout`: NOTIFY delivery latency to many in-process subscribers over one
//! LISTEN connection, next to the raw latency of one plain LISTEN connection in the same run.
//!
//! Each subscriber records its own sample without taking anything shared but atomics: it reads
//! the send time of the notification from an atomic, stores its latency in its own slot and
//! counts itself in; the one that completes the count wakes the sender. (Until issue #23's
//! second pass every subscriber took one shared `tokio::sync::Mutex` to read the send time and
//! pushed its sample through an unbounded channel to the sending task, which then ran beside
//! the subscribers draining 1,000 samples per notification: the recording serialised the
//! subscribers and competed with them for the runtime's workers.)
//!
//! `--mutex-recording` records the old way (the shared mutex and the channel), so one build
//! can show in one run what that recording adds to the figures.
//!
//! `--in-process` leaves PostgreSQL out: the notifications are published into a bare
//! [`Notifier`] (what the LISTEN connection's handler does with a parsed notification), so the
//! run measures the in-process dispatch alone. Run under `valgrind --tool=callgrind` with two
//! values of `--notifications`, the difference of the instruction counts divided by the
//! difference of notifications is the dispatch cost per notification, independent of load.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use futures_util::StreamExt;
use pgcrew::coord::notify::{Event, EventKind, Notifier, Subscription};
use pgcrew::{Client, ClientConfig, Result, RunId};
use tokio::sync::Notify;

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
    /// Notifications timed on the single LISTEN connection beside it (its p99 is the ratio's
    /// denominator: with 200 samples, the second slowest, which moved 230–490 µs between runs).
    #[arg(long, default_value_t = 1000)]
    pub raw_samples: usize,
    /// Rounds (each the single LISTEN's samples, then the fan-out's, with new subscribers);
    /// the report gives their medians. The in-process run has one.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// No database: publish into a bare notifier (the in-process dispatch alone; for counting
    /// its instructions under callgrind).
    #[arg(long)]
    pub in_process: bool,
    /// Record the old way, to show the artefact: every subscriber takes one shared
    /// `tokio::sync::Mutex` to read the send time and sends its sample over an unbounded
    /// channel to the sending task, which drains them while the others are still delivering.
    #[arg(long)]
    pub mutex_recording: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// The figures printed: medians of the rounds (deliveries, seconds and raw samples summed,
/// `max_us` the highest), each round's figures, and the instance process's memory.
#[derive(Debug, serde::Serialize)]
struct Report {
    /// NOTIFY call to a subscriber's receipt, through the instance's notifier.
    #[serde(flatten)]
    delivery: Delivery,
    max_us: f64,
    /// NOTIFY call to the receipt on one plain LISTEN connection, microseconds.
    raw_p50_us: f64,
    raw_p99_us: f64,
    /// Notifications timed on the single LISTEN connection.
    raw_samples: usize,
    /// Median of the rounds' `p50_us / raw_p50_us`.
    p50_ratio: f64,
    /// Median of the rounds' `p99_us / raw_p99_us`.
    p99_ratio: f64,
    /// (max - min) / median of the rounds' p99 ratios.
    p99_ratio_spread: f64,
    rounds: usize,
    per_round: Vec<Round>,
    /// The instance process's resident memory over all rounds.
    memory: crate::bench::Memory,
}

/// One round: the single LISTEN's samples, then the fan-out's, back to back.
#[derive(Debug, serde::Serialize)]
struct Round {
    #[serde(flatten)]
    delivery: Delivery,
    max_us: f64,
    raw_p50_us: f64,
    raw_p99_us: f64,
    raw_samples: usize,
    /// `p50_us / raw_p50_us`.
    p50_ratio: f64,
    /// `p99_us / raw_p99_us`.
    p99_ratio: f64,
}

impl Round {
    /// The round's figures from every delivery's latency `lat` (sent in `elapsed`) and the
    /// single LISTEN's `raw` latencies, both sorted.
    fn of(args: &FanoutBenchArgs, lat: &[Duration], elapsed: Duration, raw: &[Duration]) -> Round {
        let delivery = Delivery::of(args, lat, elapsed);
        let (raw50, raw99) = (percentile_us(raw, 50.0), percentile_us(raw, 99.0));
        Round {
            max_us: percentile_us(lat, 100.0),
            raw_p50_us: raw50,
            raw_p99_us: raw99,
            raw_samples: raw.len(),
            p50_ratio: delivery.p50_us / raw50,
            p99_ratio: delivery.p99_us / raw99,
            delivery,
        }
    }
}

/// What both runs (through the database, and in process) measure of the fan-out.
#[derive(Debug, serde::Serialize)]
struct Delivery {
    subscribers: usize,
    notifications: usize,
    /// Deliveries measured (subscribers x notifications when none was lost).
    deliveries: usize,
    seconds: f64,
    /// Send to a subscriber's receipt, microseconds.
    p50_us: f64,
    p99_us: f64,
}

impl Delivery {
    /// The figures of `lat` (every delivery's latency), sent in `elapsed`.
    fn of(args: &FanoutBenchArgs, lat: &[Duration], elapsed: Duration) -> Delivery {
        Delivery {
            subscribers: args.subscribers,
            notifications: args.notifications,
            deliveries: lat.len(),
            seconds: elapsed.as_secs_f64(),
            p50_us: percentile_us(lat, 50.0),
            p99_us: percentile_us(lat, 99.0),
        }
    }
}

impl Default for FanoutBenchArgs {
    fn default() -> Self {
        Self {
            subscribers: 1000,
            notifications: 200,
            raw_samples: 1000,
            rounds: 3,
            in_process: false,
            mutex_recording: false,
            json: false,
        }
    }
}

const NOTIFY_SQL: &str = pgcrew::sql!("bench/coord_notify");

const LISTEN_SQL: &str = pgcrew::sql!("coord/listen");

/// What the subscribers record into: per notification its send time and how many subscribers
/// have seen it, per delivery its latency. Atomics only, so recording serialises nothing.
struct Record {
    base: Instant,
    subscribers: usize,
    /// Send time of notification `i`, nanoseconds after `base`.
    sent: Vec<AtomicU64>,
    /// Subscribers that have seen notification `i`.
    seen: Vec<AtomicUsize>,
    /// Latency of notification `i` at subscriber `j` at `i * subscribers + j`, nanoseconds
    /// plus one (zero: not delivered).
    samples: Vec<AtomicU64>,
    /// Woken by the subscriber that completes a notification's count.
    all_seen: Notify,
}

impl Record {
    fn new(subscribers: usize, notifications: usize) -> Record {
        Record {
            base: Instant::now(),
            subscribers,
            sent: (0..notifications).map(|_| AtomicU64::new(0)).collect(),
            seen: (0..notifications).map(|_| AtomicUsize::new(0)).collect(),
            samples: (0..subscribers * notifications)
                .map(|_| AtomicU64::new(0))
                .collect(),
            all_seen: Notify::new(),
        }
    }

    fn nanos(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.base).as_nanos() as u64
    }

    fn mark_sent(&self, i: usize) {
        self.sent[i].store(self.nanos(Instant::now()), Ordering::Release);
    }

    /// Subscriber `j` saw notification `i` at `at`.
    fn seen(&self, i: usize, j: usize, at: Instant) {
        let Some(sent) = self.sent.get(i) else {
            return;
        };
        let lat = self.nanos(at).saturating_sub(sent.load(Ordering::Acquire));
        self.samples[i * self.subscribers + j].store(lat + 1, Ordering::Relaxed);
        if self.seen[i].fetch_add(1, Ordering::AcqRel) + 1 == self.subscribers {
            self.all_seen.notify_one();
        }
    }

    /// Wait until every subscriber has seen the notification just sent (or 5 s).
    async fn wait_all_seen(&self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.all_seen.notified()).await;
    }

    fn latencies(&self) -> Vec<Duration> {
        let mut lat: Vec<Duration> = self
            .samples
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .filter(|&n| n > 0)
            .map(|n| Duration::from_nanos(n - 1))
            .collect();
        lat.sort();
        lat
    }
}

/// Spawn the subscribers: each records every `RunEvent` of `run` it sees, until it has seen
/// `n`. (Events of other runs are not the round's: the single LISTEN's notifications, sent
/// with another run id on the same channel, can still be arriving when a round's subscribers
/// start.)
fn spawn_subscribers(
    subs: Vec<Subscription>,
    record: &Arc<Record>,
    n: usize,
    run: RunId,
) -> Vec<tokio::task::JoinHandle<()>> {
    subs.into_iter()
        .enumerate()
        .map(|(j, mut sub)| {
            let record = record.clone();
            tokio::spawn(async move {
                let mut got = 0;
                while got < n {
                    match sub.next().await {
                        Some(Event::RunEvent { run_id, seq }) if run_id == run => {
                            record.seen(seq as usize, j, Instant::now());
                            got += 1;
                        }
                        Some(_) => {}
                        None => break,
                    }
                }
            })
        })
        .collect()
}

/// Run the benchmark.
pub async fn run(dsn: Option<String>, args: FanoutBenchArgs) -> Result<ExitCode> {
    crate::bench::at_least_one(&[
        ("--subscribers", args.subscribers as u64),
        ("--notifications", args.notifications as u64),
        ("--raw-samples", args.raw_samples as u64),
        ("--rounds", args.rounds as u64),
    ])?;
    if args.in_process {
        return run_in_process(args).await;
    }
    let bench = scratch_db(dsn).await?;
    // The single LISTEN's notifications carry a run id of their own: the client LISTENs on
    // their channel too, and a round's subscribers record only the round's run.
    let raw_run = RunId::new();

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
    let conn = client.db().get().await?;
    let stmt = conn.prepare(NOTIFY_SQL).await?;
    let mut memory = crate::bench::Memory::default();
    let mut per_round = Vec::with_capacity(args.rounds);
    for _ in 0..args.rounds {
        // Raw: one plain LISTEN connection, no fan-out.
        let raw = raw_latencies(&bench.dsn, raw_run, args.raw_samples).await?;
        let run_id = RunId::new();
        let subs: Vec<Subscription> = (0..args.subscribers)
            .map(|_| client.subscribe(&[EventKind::RunEvent]))
            .collect();
        let send = |i: usize| {
            let (conn, stmt) = (&conn, &stmt);
            async move {
                conn.execute(stmt, &[&run_id.0, &(i as i64)]).await?;
                Result::<()>::Ok(())
            }
        };
        let (lat, elapsed, mem) = if args.mutex_recording {
            mutex_recorded(subs, &args, run_id, send).await?
        } else {
            atomics_recorded(subs, &args, run_id, send).await?
        };
        memory.merge(&mem);
        per_round.push(Round::of(&args, &lat, elapsed, &raw));
    }
    drop(conn);
    client.stop().await?;
    memory.finish();
    let m =
        |f: fn(&Round) -> f64| crate::bench::median(&per_round.iter().map(f).collect::<Vec<_>>());
    let report = Report {
        delivery: Delivery {
            subscribers: args.subscribers,
            notifications: args.notifications,
            deliveries: per_round.iter().map(|r| r.delivery.deliveries).sum(),
            seconds: per_round.iter().map(|r| r.delivery.seconds).sum(),
            p50_us: m(|r| r.delivery.p50_us),
            p99_us: m(|r| r.delivery.p99_us),
        },
        max_us: per_round.iter().map(|r| r.max_us).fold(0.0, f64::max),
        raw_p50_us: m(|r| r.raw_p50_us),
        raw_p99_us: m(|r| r.raw_p99_us),
        raw_samples: per_round.iter().map(|r| r.raw_samples).sum(),
        p50_ratio: m(|r| r.p50_ratio),
        p99_ratio: m(|r| r.p99_ratio),
        p99_ratio_spread: crate::bench::spread(
            &per_round.iter().map(|r| r.p99_ratio).collect::<Vec<_>>(),
        ),
        rounds: args.rounds,
        per_round,
        memory,
    };
    crate::bench::print_report(args.json, &report, |r| {
        println!(
            "fan-out: {} subscribers, {} notifications per round, {} rounds, {} deliveries in {:.2}s (medians of the rounds)",
            r.delivery.subscribers,
            r.delivery.notifications,
            r.rounds,
            r.delivery.deliveries,
            r.delivery.seconds
        );
        println!(
            "  pgcrew fan-out delivery latency: p50 {:.0} us, p99 {:.0} us, max {:.0} us",
            r.delivery.p50_us, r.delivery.p99_us, r.max_us
        );
        println!(
            "  raw single LISTEN latency:       p50 {:.0} us, p99 {:.0} us ({} notifications)",
            r.raw_p50_us, r.raw_p99_us, r.raw_samples
        );
        println!(
            "  pgcrew / raw: p50 {:.2}x, p99 {:.2}x (spread of the p99 ratios {:.2})",
            r.p50_ratio, r.p99_ratio, r.p99_ratio_spread
        );
        for (i, round) in r.per_round.iter().enumerate() {
            println!(
                "  round {}: p50 {:.0} / {:.0} us, p99 {:.0} / {:.0} us: p50 {:.2}x, p99 {:.2}x",
                i + 1,
                round.delivery.p50_us,
                round.raw_p50_us,
                round.delivery.p99_us,
                round.raw_p99_us,
                round.p50_ratio,
                round.p99_ratio
            );
        }
        println!("  {}", r.memory.line());
        Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// The atomics recording (see the module doc): spawn the subscribers, then send notification
/// `i` (`send(i)`) once every subscriber has seen the one before. Every delivery's latency,
/// sorted, the time the notifications took and the process's memory.
async fn atomics_recorded<F, Fut>(
    subs: Vec<Subscription>,
    args: &FanoutBenchArgs,
    run: RunId,
    send: F,
) -> Result<(Vec<Duration>, Duration, crate::bench::Memory)>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let record = Arc::new(Record::new(args.subscribers, args.notifications));
    let tasks = spawn_subscribers(subs, &record, args.notifications, run);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut memory = crate::bench::Memory::idle();
    let started = Instant::now();
    for i in 0..args.notifications {
        record.mark_sent(i);
        send(i).await?;
        record.wait_all_seen().await;
        memory.sample();
    }
    let elapsed = started.elapsed();
    for t in tasks {
        t.abort();
    }
    Ok((record.latencies(), elapsed, memory))
}

/// `--mutex-recording`: the recording of the bench before issue #23's second pass, kept to
/// show its artefact (see the module doc). `send(i)` sends notification `i`.
async fn mutex_recorded<F, Fut>(
    subs: Vec<Subscription>,
    args: &FanoutBenchArgs,
    run: RunId,
    send: F,
) -> Result<(Vec<Duration>, Duration, crate::bench::Memory)>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let sent_at: Arc<tokio::sync::Mutex<Vec<Option<Instant>>>> =
        Arc::new(tokio::sync::Mutex::new(vec![None; args.notifications]));
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<Duration>();
    let mut tasks = Vec::new();
    for mut sub in subs {
        let sent_at = sent_at.clone();
        let done = done_tx.clone();
        let n = args.notifications;
        tasks.push(tokio::spawn(async move {
            let mut got = 0;
            while got < n {
                match sub.next().await {
                    Some(Event::RunEvent { run_id, seq }) if run_id == run => {
                        let now = Instant::now();
                        let sent = sent_at.lock().await.get(seq as usize).copied().flatten();
                        if let Some(s) = sent {
                            let _ = done.send(now.duration_since(s));
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
    let mut lat = Vec::with_capacity(args.subscribers * args.notifications);
    let started = Instant::now();
    for i in 0..args.notifications {
        sent_at.lock().await[i] = Some(Instant::now());
        send(i).await?;
        let mut received = 0;
        while received < args.subscribers {
            match tokio::time::timeout(Duration::from_secs(5), done_rx.recv()).await {
                Ok(Some(d)) => {
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
    lat.sort();
    Ok((lat, elapsed, memory))
}

/// `--in-process`: publish into a bare notifier, no database.
async fn run_in_process(args: FanoutBenchArgs) -> Result<ExitCode> {
    let notifier = Notifier::new(4096);
    let run_id = RunId::new();
    let subs: Vec<Subscription> = (0..args.subscribers)
        .map(|_| notifier.subscribe(&[EventKind::RunEvent]))
        .collect();
    let publish = |i: usize| {
        notifier.publish(Event::RunEvent {
            run_id,
            seq: i as i64,
        })
    };
    let send = |i: usize| {
        publish(i);
        std::future::ready(Result::<()>::Ok(()))
    };
    let (lat, elapsed, _) = if args.mutex_recording {
        mutex_recorded(subs, &args, run_id, send).await?
    } else {
        atomics_recorded(subs, &args, run_id, send).await?
    };
    let report = Delivery::of(&args, &lat, elapsed);
    crate::bench::print_report(args.json, &report, |r| {
        println!(
            "fan-out in process (no database): {} subscribers, {} notifications, {} deliveries in {:.3}s ({:.1} us per notification)",
            r.subscribers,
            r.notifications,
            r.deliveries,
            r.seconds,
            r.seconds * 1e6 / r.notifications.max(1) as f64
        );
        println!(
            "  publish to a subscriber's receipt: p50 {:.0} us, p99 {:.0} us",
            r.p50_us, r.p99_us
        );
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every subscriber records every notification in its own slot, and the sender is woken
    /// once all have seen the one it sent (no shared lock, nothing sent to the sender).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_subscriber_records_every_notification() {
        let (subscribers, notifications) = (50, 20);
        let notifier = Notifier::new(64);
        let record = Arc::new(Record::new(subscribers, notifications));
        let subs = (0..subscribers)
            .map(|_| notifier.subscribe(&[EventKind::RunEvent]))
            .collect();
        let (run_id, other) = (RunId::new(), RunId::new());
        let tasks = spawn_subscribers(subs, &record, notifications, run_id);
        for i in 0..notifications {
            record.mark_sent(i);
            // Other kinds, and other runs' events (the single LISTEN's, in the bench), are not
            // recorded.
            notifier.publish(Event::SchedulesChanged);
            notifier.publish(Event::RunEvent {
                run_id: other,
                seq: i as i64,
            });
            notifier.publish(Event::RunEvent {
                run_id,
                seq: i as i64,
            });
            let all = tokio::time::timeout(Duration::from_secs(5), record.all_seen.notified());
            assert!(all.await.is_ok(), "notification {i} not seen by all");
            assert_eq!(record.seen[i].load(Ordering::Acquire), subscribers);
        }
        for t in tasks {
            assert!(t.await.is_ok());
        }
        assert_eq!(record.latencies().len(), subscribers * notifications);
        // A sequence number out of range is ignored rather than recorded.
        record.seen(notifications, 0, Instant::now());
        assert_eq!(record.latencies().len(), subscribers * notifications);
    }
}
