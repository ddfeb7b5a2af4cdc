//! `pgcrew bench observability`: what metrics and tracing cost. The queue benchmark
//! (`bench queue`) in rounds of three runs: both off (no series recorded, no spans), metrics
//! only, and both on (every series, spans exported over OTLP/HTTP to a receiver inside this
//! process), each run in its own scratch database; then the time of a `/metrics` render on the leader with `--queues`
//! queues and `--tenants` tenants (the cluster gauges re-read from the database every time).

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use pgcrew::metrics::{ClusterGauges, Metrics, MetricsConfig};
use pgcrew::telemetry::{self, trace};
use pgcrew::{Client, ClientConfig, Db, Result};
use serde::Serialize;

use crate::bench::queue::{QueueBenchArgs, bench, check_args};

/// Arguments of `pgcrew bench observability`.
#[derive(Debug, Args)]
pub struct ObservabilityBenchArgs {
    /// Runs of each configuration (off, metrics only, both; the order turns each round).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Tasks per run.
    #[arg(long, default_value_t = 20_000)]
    pub tasks: usize,
    /// Handlers running at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Queues with tasks for the scrape measurement.
    #[arg(long, default_value_t = 100)]
    pub queues: usize,
    /// Tenants with a budget for the scrape measurement.
    #[arg(long, default_value_t = 1000)]
    pub tenants: usize,
    /// Scrapes timed.
    #[arg(long, default_value_t = 50)]
    pub scrapes: usize,
    /// Share of new traces sampled while tracing (0 to 1; default: `OTEL_TRACES_SAMPLER` /
    /// `OTEL_TRACES_SAMPLER_ARG`, else 1: every task's span exported).
    #[arg(long)]
    pub sample_ratio: Option<f64>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    rounds: usize,
    tasks: usize,
    concurrency: usize,
    /// Share of new traces sampled in the traced runs.
    sample_ratio: f64,
    off_processed_per_sec: Vec<f64>,
    metrics_processed_per_sec: Vec<f64>,
    on_processed_per_sec: Vec<f64>,
    off_median: f64,
    metrics_median: f64,
    on_median: f64,
    /// Metrics only over off (medians).
    metrics_ratio: f64,
    /// Metrics and tracing over off (medians).
    throughput_ratio: f64,
    spans_exported: u64,
    spans_dropped: u64,
    otlp_requests: u64,
    queues: usize,
    tenants: usize,
    scrape_p50_ms: f64,
    scrape_p99_ms: f64,
    scrape_bytes: usize,
    scrape_series: usize,
    /// Median CPU per task of the instance process (µs): off, metrics only, both.
    instance_cpu_us_per_task: [f64; 3],
    /// Median CPU per task of the database's backends (µs): off, metrics only, both.
    server_cpu_us_per_task: [f64; 3],
    /// The instance process's resident memory over the rounds (tracing on in some of them).
    memory: crate::bench::Memory,
}

/// An OTLP/HTTP receiver that accepts and counts requests: its traces URL. It reads each body
/// and drops it chunk by chunk as it arrives (a collector's own work is not pgcrew's cost; the
/// body gathered into one buffer cost this process a copy and reallocations per request).
async fn receiver(requests: Arc<AtomicU64>) -> Result<String> {
    use futures_util::StreamExt as _;
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Body| {
            let requests = requests.clone();
            async move {
                let mut chunks = body.into_data_stream();
                while let Some(chunk) = chunks.next().await {
                    if chunk.is_err() {
                        return axum::http::StatusCode::BAD_REQUEST;
                    }
                }
                requests.fetch_add(1, Ordering::Relaxed);
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(format!("http://{addr}/v1/traces"))
}

/// Switch metrics and tracing.
fn observe(metrics: bool, tracing: bool) {
    telemetry::set_recording(metrics);
    trace::set_enabled(tracing);
}

/// Run the comparison and the scrape measurement.
pub async fn run(dsn: Option<String>, args: ObservabilityBenchArgs) -> Result<ExitCode> {
    crate::bench::at_least_one(&[
        ("--rounds", args.rounds as u64),
        ("--queues", args.queues as u64),
        ("--scrapes", args.scrapes as u64),
    ])?;
    let queue_args = QueueBenchArgs {
        tasks: args.tasks,
        concurrency: args.concurrency,
        wakeups: 50,
        ..QueueBenchArgs::default()
    };
    check_args(&queue_args)?;
    let requests = Arc::new(AtomicU64::new(0));
    let url = receiver(requests.clone()).await?;
    // This command installs its own subscriber (main leaves it to it): warnings to stderr and
    // pgcrew's spans to the receiver.
    let (layer, guard) = trace::otlp_layer_to("pgcrew-bench", Some(&url));
    if let Some(r) = args.sample_ratio {
        if !(0.0..=1.0).contains(&r) {
            return Err(pgcrew::Error::Config(format!(
                "--sample-ratio must be between 0 and 1, not {r}"
            )));
        }
        trace::set_sample_ratio(r);
    }
    let sample_ratio = trace::sample_ratio();
    {
        use tracing_subscriber::Layer as _;
        use tracing_subscriber::layer::SubscriberExt as _;
        use tracing_subscriber::util::SubscriberInitExt as _;
        let fmt = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::registry()
            .with(fmt)
            .with(layer)
            .try_init();
    }
    // Per configuration: tasks/s, instance and server CPU µs per task, one entry per round.
    let mut figures: [[Vec<f64>; 3]; 3] = Default::default();
    let mut memory = crate::bench::Memory::default();
    let configs = [
        ("off", false, false),
        ("metrics only", true, false),
        ("metrics and tracing", true, true),
    ];
    for round in 0..args.rounds {
        // The order turns each round, so no configuration always runs first or last (the
        // server's checkpoints and the scratch databases' creation fall on each in turn).
        for i in 0..configs.len() {
            let c = (i + round) % configs.len();
            let (name, m, t) = configs[c];
            observe(m, t);
            eprintln!("round {}/{}: {name}", round + 1, args.rounds);
            let r = crate::bench::in_scratch(dsn.clone(), async |d| bench(d, &queue_args).await)
                .await?;
            eprintln!(
                "  {:.0} tasks/s; CPU per task: instance {:.1} µs, database {:.1} µs",
                r.processed_per_sec, r.instance_cpu_us_per_task, r.server_cpu_us_per_task
            );
            memory.merge(&r.memory);
            figures[c][0].push(r.processed_per_sec);
            figures[c][1].push(r.instance_cpu_us_per_task);
            figures[c][2].push(r.server_cpu_us_per_task);
        }
    }
    let [off, metrics, on] = figures.clone().map(|[rate, _, _]| rate);
    let cpu = figures
        .map(|[_, inst, server]| [crate::bench::median(&inst), crate::bench::median(&server)]);
    observe(true, true);
    guard.shutdown();
    eprintln!(
        "scrape: {} queues, {} tenants, {} scrapes ...",
        args.queues, args.tenants, args.scrapes
    );
    let (samples, bytes, series) =
        crate::bench::in_scratch(dsn, async |d| scrapes(d, &args).await).await?;
    let t = telemetry::global();
    let (off_median, on_median) = (crate::bench::median(&off), crate::bench::median(&on));
    let metrics_median = crate::bench::median(&metrics);
    let report = Report {
        rounds: args.rounds,
        tasks: args.tasks,
        concurrency: args.concurrency,
        sample_ratio,
        throughput_ratio: on_median / off_median,
        metrics_ratio: metrics_median / off_median,
        off_median,
        metrics_median,
        on_median,
        off_processed_per_sec: off,
        metrics_processed_per_sec: metrics,
        on_processed_per_sec: on,
        spans_exported: t.spans_exported.get(),
        spans_dropped: t.spans_dropped.get(),
        otlp_requests: requests.load(Ordering::Relaxed),
        queues: args.queues,
        tenants: args.tenants,
        scrape_p50_ms: crate::bench::percentile_ms(&samples, 0.5),
        scrape_p99_ms: crate::bench::percentile_ms(&samples, 0.99),
        scrape_bytes: bytes,
        scrape_series: series,
        instance_cpu_us_per_task: cpu.map(|c| c[0]),
        server_cpu_us_per_task: cpu.map(|c| c[1]),
        memory,
    };
    super::print_report(args.json, &report, |r| {
        println!(
            "pgcrew bench observability: queue benchmark, {} no-op tasks, concurrency {}, {} rounds (medians)",
            r.tasks, r.concurrency, r.rounds
        );
        println!("  metrics and tracing off: {:>8.0} tasks/s", r.off_median);
        println!(
            "  metrics only:            {:>8.0} tasks/s (ratio {:.3})",
            r.metrics_median, r.metrics_ratio
        );
        println!(
            "  metrics and tracing on:  {:>8.0} tasks/s (traces sampled at {}: {} spans exported in {} OTLP requests, {} dropped)",
            r.on_median, r.sample_ratio, r.spans_exported, r.otlp_requests, r.spans_dropped
        );
        println!("  ratio on/off: {:.3}", r.throughput_ratio);
        let [i, m, b] = r.instance_cpu_us_per_task;
        let [si, sm, sb] = r.server_cpu_us_per_task;
        println!(
            "  CPU per task, instance: off {i:.1} µs, metrics {m:.1} µs, both {b:.1} µs; database backends: {si:.1} / {sm:.1} / {sb:.1} µs"
        );
        println!(
            "  /metrics on the leader, {} queues, {} tenants: p50 {:.2} ms, p99 {:.2} ms ({} series, {} bytes)",
            r.queues, r.tenants, r.scrape_p50_ms, r.scrape_p99_ms, r.scrape_series, r.scrape_bytes
        );
        println!("  {}", r.memory.line());
        Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Seed the queues and tenants, then time renders that re-read the cluster gauges each time:
/// the sorted samples (ms), the body's size and its series count.
async fn scrapes(dsn: &str, args: &ObservabilityBenchArgs) -> Result<(Vec<f64>, usize, usize)> {
    let db = Db::connect(dsn, 4, Duration::from_secs(10)).await?;
    db.migrate().await?;
    let tenants = i32::try_from(args.tenants).unwrap_or(i32::MAX);
    let queues = i32::try_from(args.queues).unwrap_or(i32::MAX);
    let per_queue = 20i32;
    let conn = db.get().await?;
    conn.execute(pgcrew::sql!("bench/metrics_seed_tenants"), &[&tenants])
        .await?;
    conn.execute(
        pgcrew::sql!("bench/metrics_seed_tasks"),
        &[&queues, &per_queue],
    )
    .await?;
    drop(conn);
    let client = Client::builder(db.clone())
        .config(ClientConfig::builder().leader_election(false).build()?)
        .build()
        .await?;
    let metrics = Metrics::new(&client).with_config(MetricsConfig {
        cluster_interval: Duration::ZERO,
        cluster_timeout: Duration::from_secs(5),
        cluster_gauges: ClusterGauges::Always,
    });
    let mut samples = Vec::with_capacity(args.scrapes);
    let mut body = String::new();
    for _ in 0..args.scrapes {
        let t0 = Instant::now();
        body = metrics.render().await;
        samples.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    let series = body.lines().filter(|l| !l.starts_with('#')).count();
    Ok((samples, body.len(), series))
}
