//! `pgcrew bench ledger`: sequenced hash-chained appends (raw SQL baseline vs pgcrew; pgcrew's
//! v1-format runs without a key vs v2-format runs signing checkpoints with a key, measured in
//! alternating phases), batch appends, and verification of a large run with and without the key —
//! all measured in one run, in a scratch database.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use pgcrew::coord::notify::{Notifier, NotifierConfig};
use pgcrew::db::Db;
use pgcrew::runs::{self, NewEvent, NewRun};
use pgcrew::{Error, LedgerKey, Result, RunId, TenantId};
use serde::Serialize;
use serde_json::json;

/// Arguments of `pgcrew bench ledger`.
#[derive(Debug, Args)]
pub struct LedgerBenchArgs {
    /// Concurrent writers.
    #[arg(long, default_value_t = 4)]
    pub writers: usize,
    /// Runs the writers spread their appends over.
    #[arg(long, default_value_t = 16)]
    pub runs: usize,
    /// Seconds per append phase (the v1 and v2 single-append phases alternate in halves).
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Events per batch in the batch phase.
    #[arg(long, default_value_t = 10)]
    pub batch: usize,
    /// Events in the run that is verified.
    #[arg(long, default_value_t = 100_000)]
    pub verify_events: usize,
    /// Sign a checkpoint of the v2 runs at most every this many appended events.
    #[arg(long, default_value_t = pgcrew::ledger_key::DEFAULT_CHECKPOINT_INTERVAL)]
    pub checkpoint_interval: u32,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

impl Default for LedgerBenchArgs {
    fn default() -> Self {
        LedgerBenchArgs {
            writers: 4,
            runs: 16,
            seconds: 3.0,
            batch: 10,
            verify_events: 100_000,
            checkpoint_interval: pgcrew::ledger_key::DEFAULT_CHECKPOINT_INTERVAL,
            json: false,
        }
    }
}

/// The figures.
#[derive(Debug, Serialize)]
struct Report {
    writers: usize,
    runs: usize,
    raw_appends_per_s: f64,
    /// v2 format, signing a checkpoint every `checkpoint_interval` appends with a ledger key.
    pgcrew_appends_per_s: f64,
    pgcrew_vs_raw: f64,
    /// v1 format (runs created before the v2 migration), no key: the old append path.
    v1_unkeyed_appends_per_s: f64,
    v2_signed_vs_v1: f64,
    checkpoint_interval: u32,
    batch_size: usize,
    batch_events_per_s: f64,
    batch_vs_single: f64,
    verify_events: usize,
    verify_rust_ms: f64,
    verify_signed_ms: f64,
    verify_sql_ms: f64,
    cancel_samples: usize,
    cancel_p50_ms: f64,
    cancel_p99_ms: f64,
    chains_valid: bool,
}

/// Run the benchmark.
pub async fn run(dsn: Option<String>, args: LedgerBenchArgs) -> Result<ExitCode> {
    super::at_least_one(&[
        ("--writers", args.writers as u64),
        ("--runs", args.runs as u64),
        ("--batch", args.batch as u64),
        ("--verify-events", args.verify_events as u64),
        ("--checkpoint-interval", u64::from(args.checkpoint_interval)),
    ])?;
    if !(args.seconds > 0.0 && args.seconds.is_finite()) {
        return Err(Error::invalid("--seconds", "must be a positive number"));
    }
    let r = crate::bench::in_scratch(dsn, async |dsn| bench(dsn, &args).await).await?;
    super::print_report(args.json, &r, |r| {
        println!(
            "pgcrew bench ledger: {} writers on {} runs, {:.1} s per phase",
            r.writers, r.runs, args.seconds
        );
        println!(
            "  raw sequenced hash-chained append (plain SQL)  {:>9.0} appends/s",
            r.raw_appends_per_s
        );
        println!(
            "  pgcrew append_event, v1 run, no key            {:>9.0} appends/s",
            r.v1_unkeyed_appends_per_s
        );
        println!(
            "  pgcrew append_event, v2 run, signed every {:<4} {:>9.0} appends/s  ({:.2} x v1; target >= 0.95) ({:.2} x raw; target >= 0.8)",
            r.checkpoint_interval, r.pgcrew_appends_per_s, r.v2_signed_vs_v1, r.pgcrew_vs_raw
        );
        println!(
            "  pgcrew append_events, batch of {:<3}             {:>9.0} events/s   ({:.2} x single; target >= 3)",
            r.batch_size, r.batch_events_per_s, r.batch_vs_single
        );
        println!(
            "  verify a {}-event run: Rust (streaming) {:.0} ms, Rust with the key {:.0} ms, SQL function {:.0} ms (target < 1000 ms)",
            r.verify_events, r.verify_rust_ms, r.verify_signed_ms, r.verify_sql_ms
        );
        println!(
            "  cancellation: cancel_run call -> watcher token fired ({} samples): p50 {:.2} ms, p99 {:.2} ms",
            r.cancel_samples, r.cancel_p50_ms, r.cancel_p99_ms
        );
        println!(
            "  all chains valid afterwards: {}",
            if r.chains_valid { "yes" } else { "NO" }
        );
        Ok(())
    })?;
    Ok(if r.chains_valid {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Alternating halves per phase for the v1 / v2 single-append comparison (so load changes on a
/// shared machine hit both alike).
const ROUNDS: u32 = 4;

async fn bench(dsn: &str, args: &LedgerBenchArgs) -> Result<Report> {
    let db = Db::connect(dsn, args.writers + 4, Duration::from_secs(10)).await?;
    db.migrate().await?;
    // A random key for this run only.
    let key_bytes: Vec<u8> = (0..32).map(|_| fastrand::u8(..)).collect();
    let signed = db
        .clone()
        .with_ledger_key(LedgerKey::new(&key_bytes)?)
        .with_checkpoint_interval(args.checkpoint_interval);
    let key = signed.ledger_key().cloned();
    let tenant = TenantId::new("default")?;
    let mut raw_runs = Vec::new();
    let mut v1_runs = Vec::new();
    let mut pg_runs = Vec::new();
    for _ in 0..args.runs {
        raw_runs.push(runs::create_run(&db, NewRun::new(tenant.clone())).await?);
        pg_runs.push(runs::create_run(&signed, NewRun::new(tenant.clone())).await?);
        let v1 = RunId::new();
        db.get()
            .await?
            .execute(sql_v1_run(), &[&v1, &tenant.as_str()])
            .await?;
        v1_runs.push(v1);
    }
    let phase = Duration::from_secs_f64(args.seconds);

    eprintln!(
        "[1/5] raw sequenced append (plain SQL) for {:.1} s ...",
        args.seconds
    );
    let raw = measure(args.writers, phase, raw_runs.clone(), {
        let db = db.clone();
        move |run, i| {
            let db = db.clone();
            async move { raw_append(&db, run, i).await.map(|_| 1) }
        }
    })
    .await?;
    eprintln!(
        "[2/5] pgcrew append_event, v1 unkeyed and v2 signed, alternating, {:.1} s each ...",
        args.seconds
    );
    let single = |db: Db| {
        move |run, i| {
            let db = db.clone();
            async move {
                runs::append_event(&db, run, NewEvent::new("bench", json!({"i": i})), None)
                    .await
                    .map(|_| 1)
            }
        }
    };
    let half = phase / ROUNDS;
    let (mut v1_sum, mut v2_sum) = (0.0, 0.0);
    for round in 0..ROUNDS {
        // Alternate which goes first, too.
        let (a, b) = if round % 2 == 0 {
            (true, false)
        } else {
            (false, true)
        };
        for is_v1 in [a, b] {
            if is_v1 {
                v1_sum += measure(args.writers, half, v1_runs.clone(), single(db.clone())).await?;
            } else {
                v2_sum +=
                    measure(args.writers, half, pg_runs.clone(), single(signed.clone())).await?;
            }
        }
    }
    let v1_rate = v1_sum / f64::from(ROUNDS);
    let v2_rate = v2_sum / f64::from(ROUNDS);
    let batch_n = args.batch;
    eprintln!(
        "[3/5] pgcrew batch append (v2, signed) for {:.1} s ...",
        args.seconds
    );
    let batch = measure(args.writers, phase, pg_runs.clone(), {
        let db = signed.clone();
        move |run, i| {
            let db = db.clone();
            async move {
                let evs: Vec<NewEvent> = (0..batch_n)
                    .map(|j| NewEvent::new("bench", json!({"i": i, "j": j})))
                    .collect();
                runs::append_events(&db, run, &evs, None)
                    .await
                    .map(|v| v.len() as u64)
            }
        }
    })
    .await?;

    // A large run for verification, appended in big batches.
    let big = runs::create_run(&signed, NewRun::new(tenant)).await?;
    eprintln!(
        "[4/5] building and verifying a {}-event run ...",
        args.verify_events
    );
    let mut left = args.verify_events.saturating_sub(1);
    let mut k = 0u64;
    while left > 0 {
        let n = left.min(runs::ledger::MAX_BATCH);
        let evs: Vec<NewEvent> = (0..n)
            .map(|j| {
                k += 1;
                NewEvent::new(
                    "bench",
                    json!({"k": k, "text": "a typical small payload", "j": j}),
                )
            })
            .collect();
        runs::append_events(&signed, big, &evs, None).await?;
        left -= n;
    }
    let t = Instant::now();
    let rust = runs::verify_run_chain(&db, big).await?;
    let verify_rust = t.elapsed();
    let mut valid = rust.valid && rust.checked == args.verify_events as u64;
    let t = Instant::now();
    if let Some(key) = &key {
        let v = runs::verify_run_chain_signed(&db, big, key).await?;
        valid &= v.valid && v.signed_seq.is_some();
    }
    let verify_signed = t.elapsed();
    let t = Instant::now();
    let sql = runs::verify_run_chain_sql(&db, big).await?;
    let verify_sql = t.elapsed();
    valid &= sql.valid;

    eprintln!("[5/5] cancellation latency ({CANCEL_SAMPLES} runs) ...");
    let (cancel_p50, cancel_p99) = cancel_latency(&db, CANCEL_SAMPLES).await?;

    // The raw baseline bypasses pgcrew (no recorded head, v1 hashes): not a pgcrew ledger.
    for r in v1_runs.iter().chain(pg_runs.iter()) {
        valid &= runs::verify_run_chain(&db, *r).await?.valid;
    }
    if let Some(key) = &key {
        for r in &pg_runs {
            valid &= runs::verify_run_chain_signed(&db, *r, key).await?.valid;
        }
    }
    Ok(Report {
        writers: args.writers,
        runs: args.runs,
        raw_appends_per_s: raw,
        pgcrew_appends_per_s: v2_rate,
        pgcrew_vs_raw: v2_rate / raw.max(1e-9),
        v1_unkeyed_appends_per_s: v1_rate,
        v2_signed_vs_v1: v2_rate / v1_rate.max(1e-9),
        checkpoint_interval: signed.checkpoint_interval(),
        batch_size: args.batch,
        batch_events_per_s: batch,
        batch_vs_single: batch / v2_rate.max(1e-9),
        verify_events: args.verify_events,
        verify_rust_ms: verify_rust.as_secs_f64() * 1e3,
        verify_signed_ms: verify_signed.as_secs_f64() * 1e3,
        verify_sql_ms: verify_sql.as_secs_f64() * 1e3,
        cancel_samples: CANCEL_SAMPLES,
        cancel_p50_ms: cancel_p50,
        cancel_p99_ms: cancel_p99,
        chains_valid: valid,
    })
}

/// Runs cancelled in the cancellation-latency phase.
const CANCEL_SAMPLES: usize = 100;

/// Latency from calling `cancel_run` (another connection, as another instance would) until a
/// [`RunWatcher`](runs::RunWatcher) token fires through LISTEN/NOTIFY: (p50, p99) in ms.
async fn cancel_latency(db: &Db, samples: usize) -> Result<(f64, f64)> {
    let notifier = Notifier::new(1024);
    let listener = notifier.spawn_listener(NotifierConfig {
        pg_config: db.config().clone(),
        poll_only: false,
        poll_interval: Duration::from_secs(5),
        instance: None,
    });
    if !notifier.wait_connected(Duration::from_secs(10)).await {
        listener.stop().await;
        return Err(Error::Timeout(Duration::from_secs(10)));
    }
    let watcher = runs::RunWatcher::spawn(db.clone(), &notifier, Duration::from_secs(5));
    let tenant = TenantId::new("default")?;
    let mut lat = Vec::with_capacity(samples);
    for _ in 0..samples {
        let run = runs::create_run(db, NewRun::new(tenant.clone())).await?;
        runs::start_run(db, run, None, None, runs::LimitPolicy::Reject).await?;
        let token = watcher.watch(run).await?;
        let t = Instant::now();
        runs::cancel_run(db, run, "bench").await?;
        tokio::time::timeout(Duration::from_secs(10), token.cancelled())
            .await
            .map_err(|_| Error::Timeout(Duration::from_secs(10)))?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    drop(watcher);
    listener.stop().await;
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize];
    Ok((pct(0.5), pct(0.99)))
}

/// Run `op` from `writers` tasks for `phase`, spreading over `runs`; returns items per second.
async fn measure<F, Fut>(writers: usize, phase: Duration, runs: Vec<RunId>, op: F) -> Result<f64>
where
    F: Fn(RunId, u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<u64>> + Send,
{
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + phase;
    let mut handles = Vec::new();
    for w in 0..writers {
        let op = op.clone();
        let done = done.clone();
        let runs = runs.clone();
        handles.push(tokio::spawn(async move {
            let mut i = w as u64;
            while Instant::now() < deadline {
                let run = runs[fastrand::usize(..runs.len())];
                let n = op(run, i).await?;
                done.fetch_add(n, Ordering::Relaxed);
                i += writers as u64;
            }
            Ok::<(), Error>(())
        }));
    }
    for h in handles {
        h.await.map_err(|e| Error::Io(std::io::Error::other(e)))??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok(done.load(Ordering::Relaxed) as f64 / elapsed)
}

/// The raw baseline: BEGIN; advisory xact lock; read the last (seq, hash); insert seq + 1; COMMIT.
async fn raw_append(db: &Db, run: RunId, i: u64) -> Result<()> {
    let mut conn = db.get().await?;
    let lock = conn.prepare_cached(sql_lock()).await?;
    let last = conn.prepare_cached(sql_last()).await?;
    let insert = conn.prepare_cached(sql_insert()).await?;
    let tx = conn.transaction().await?;
    tx.execute(&lock, &[&run]).await?;
    let (seq, prev): (i64, Vec<u8>) = match tx.query_opt(&last, &[&run]).await? {
        Some(r) => (r.get(0), r.get(1)),
        None => (0, vec![0u8; 32]),
    };
    let payload = json!({ "i": i });
    tx.execute(&insert, &[&run, &(seq + 1), &prev, &payload])
        .await?;
    tx.commit().await?;
    Ok(())
}

fn sql_v1_run() -> &'static str {
    pgcrew::sql!("bench/runs_v1_run")
}

fn sql_lock() -> &'static str {
    pgcrew::sql!("bench/runs_raw_lock")
}

fn sql_last() -> &'static str {
    pgcrew::sql!("bench/runs_raw_last")
}

fn sql_insert() -> &'static str {
    pgcrew::sql!("bench/runs_raw_insert")
}
