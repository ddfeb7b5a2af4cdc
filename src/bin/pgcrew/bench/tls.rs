//! `pgcrew bench tls`: the queue benchmark ([`crate::bench::queue`]) against one server without
//! TLS (`sslmode=disable`) and with TLS (`sslmode=verify-full`), alternating, each sample in a
//! fresh scratch database; prints both rates and the TLS / plaintext ratio.
//!
//! Without `--dsn`, a throwaway cluster serving TLS (its own CA) is started. With `--dsn`, the
//! DSN is the TLS one (it must verify, e.g. `sslmode=verify-full sslrootcert=...`) and the
//! plaintext runs use the same DSN with `sslmode=disable`.

use std::process::ExitCode;

use clap::Args;
use pgcrew::db::{ScratchDatabase, SslMode, TempCluster, TempClusterOptions, parse_dsn};
use pgcrew::{Error, Result};
use serde::Serialize;

use crate::bench::queue::QueueBenchArgs;

/// Arguments of `pgcrew bench tls`.
#[derive(Debug, Args)]
pub struct TlsBenchArgs {
    /// Samples per mode (plaintext and TLS alternate; the first mode alternates too).
    #[arg(long, default_value_t = 3)]
    pub samples: usize,
    /// The queue benchmark's settings (`--json` prints this benchmark's report as JSON).
    #[command(flatten)]
    pub queue: QueueBenchArgs,
}

#[derive(Debug, Default, Serialize)]
struct Mode {
    sslmode: &'static str,
    /// Whether the benchmark's own connection saw `pg_stat_ssl.ssl` true.
    ssl_in_use: bool,
    processed_per_sec: Vec<f64>,
    enqueue_per_sec: Vec<f64>,
    wakeup_p50_ms: Vec<f64>,
    processed_per_sec_median: f64,
    enqueue_per_sec_median: f64,
    wakeup_p50_ms_median: f64,
    /// The instance process's resident memory over this mode's samples.
    memory: crate::bench::Memory,
}

#[derive(Debug, Serialize)]
struct Report {
    tasks: usize,
    samples: usize,
    plaintext: Mode,
    tls: Mode,
    /// TLS processed rate / plaintext processed rate (medians).
    processed_ratio: f64,
    /// TLS enqueue rate / plaintext enqueue rate (medians).
    enqueue_ratio: f64,
    /// The target: processed ratio at least 0.9.
    meets_target: bool,
}

/// `dsn` with `sslmode` replaced (a later key wins, in both DSN forms).
fn with_sslmode(dsn: &str, mode: SslMode) -> String {
    let t = dsn.trim();
    if t.starts_with("postgres://") || t.starts_with("postgresql://") {
        let sep = if t[t.rfind('@').unwrap_or(0)..].contains('?') {
            '&'
        } else {
            '?'
        };
        format!("{t}{sep}sslmode={mode}")
    } else {
        format!("{t} sslmode={mode}")
    }
}

/// Run the benchmark.
pub async fn run(dsn: Option<String>, args: TlsBenchArgs) -> Result<ExitCode> {
    crate::bench::at_least_one(&[("--samples", args.samples as u64)])?;
    let (tls_dsn, _cluster) = match dsn.filter(|d| !d.trim().is_empty()) {
        Some(d) => {
            let mode = parse_dsn(&d)?.ssl_mode();
            if !matches!(
                mode,
                SslMode::VerifyFull | SslMode::VerifyCa | SslMode::Require
            ) {
                return Err(Error::invalid(
                    "dsn",
                    format!(
                        "pgcrew bench tls needs a DSN that uses TLS (sslmode=verify-full with sslrootcert, got sslmode={mode})"
                    ),
                ));
            }
            (d, None)
        }
        None => {
            eprintln!("no DATABASE_URL/--dsn: starting a throwaway PostgreSQL cluster with TLS");
            let cluster = tokio::task::spawn_blocking(|| {
                TempCluster::start_with(TempClusterOptions {
                    tls: true,
                    ..Default::default()
                })
            })
            .await
            .map_err(|e| Error::Cluster(e.to_string()))??;
            let root = cluster
                .tls_root_cert()
                .ok_or_else(|| Error::Cluster("the cluster has no CA".into()))?
                .display()
                .to_string();
            let dsn = format!(
                "{}?sslmode=verify-full&sslrootcert={}",
                cluster.dsn(),
                root.replace('%', "%25").replace('&', "%26")
            );
            (dsn, Some(cluster))
        }
    };
    let plain_dsn = with_sslmode(&tls_dsn, SslMode::Disable);
    let mut plain = Mode {
        sslmode: "disable",
        ..Mode::default()
    };
    let mut tls = Mode {
        sslmode: "verify-full",
        ..Mode::default()
    };
    for i in 0..args.samples {
        let order: [(bool, &str); 2] = if i % 2 == 0 {
            [(false, &plain_dsn), (true, &tls_dsn)]
        } else {
            [(true, &tls_dsn), (false, &plain_dsn)]
        };
        for (is_tls, admin) in order {
            eprintln!(
                "sample {}/{}: {} ...",
                i + 1,
                args.samples,
                if is_tls { "TLS" } else { "plaintext" }
            );
            let scratch = ScratchDatabase::create(admin, "pgcrew_bench_tls").await?;
            let ssl = backend_ssl(scratch.dsn()).await?;
            let report = crate::bench::queue::bench(scratch.dsn(), &args.queue).await;
            drop(scratch);
            let report = report?;
            let mode = if is_tls { &mut tls } else { &mut plain };
            if ssl != is_tls {
                return Err(Error::Config(format!(
                    "the {} run's connection has pg_stat_ssl.ssl = {ssl}: the server does not serve TLS as expected",
                    mode.sslmode
                )));
            }
            mode.ssl_in_use = ssl;
            mode.processed_per_sec.push(report.processed_per_sec);
            mode.enqueue_per_sec.push(report.enqueue_per_sec);
            mode.wakeup_p50_ms.push(report.wakeup_p50_ms);
            mode.memory.merge(&report.memory);
        }
    }
    for m in [&mut plain, &mut tls] {
        m.processed_per_sec_median = super::median(&m.processed_per_sec);
        m.enqueue_per_sec_median = super::median(&m.enqueue_per_sec);
        m.wakeup_p50_ms_median = super::median(&m.wakeup_p50_ms);
    }
    let processed_ratio = tls.processed_per_sec_median / plain.processed_per_sec_median;
    let enqueue_ratio = tls.enqueue_per_sec_median / plain.enqueue_per_sec_median;
    let report = Report {
        tasks: args.queue.tasks,
        samples: args.samples,
        processed_ratio,
        enqueue_ratio,
        meets_target: processed_ratio >= 0.9,
        plaintext: plain,
        tls,
    };
    super::print_report(args.queue.json, &report, |report| {
        println!(
            "pgcrew bench tls: queue benchmark, {} no-op tasks, {} samples per mode, same server",
            report.tasks, report.samples
        );
        for m in [&report.plaintext, &report.tls] {
            println!(
                "  sslmode={:<11} processed {:>8.0} tasks/s (median; samples {}), enqueue {:>8.0} tasks/s, wake-up p50 {:.3} ms",
                m.sslmode,
                m.processed_per_sec_median,
                m.processed_per_sec
                    .iter()
                    .map(|r| format!("{r:.0}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                m.enqueue_per_sec_median,
                m.wakeup_p50_ms_median
            );
            println!("    {}", m.memory.line());
        }
        println!(
            "  TLS / plaintext: processed {:.3}, enqueue {:.3} (target processed >= 0.9: {})",
            report.processed_ratio,
            report.enqueue_ratio,
            if report.meets_target {
                "met"
            } else {
                "NOT met"
            }
        );
        Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Whether a connection made with `dsn` is encrypted (`pg_stat_ssl` of its own backend).
async fn backend_ssl(dsn: &str) -> Result<bool> {
    let (client, conn) = parse_dsn(dsn)?.open().await?;
    let driver = tokio::spawn(conn);
    let row = client
        .query_one(pgcrew::sql!("db/backend_ssl"), &[])
        .await?;
    let ssl: bool = row.try_get(0)?;
    drop(client);
    let _ = driver.await;
    Ok(ssl)
}
