//! `pgcrew bench ui`: the operations console on a large database (default 1,000,000 tasks,
//! 100,000 runs, 2,000,000 ledger events, seeded with set-based SQL, and the last hour of
//! per-minute queue figures for every queue, so the overview reads its sparklines' rows): the response time of
//! every page (p50/p95, measured by a client over loopback: an upper bound of server time),
//! then 100 open Server-Sent Events streams: the database connections they add and the
//! NOTIFY-to-browser latency (p50/p99).

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use pgcrew::db::Db;
use pgcrew::tenancy::{self, TenantContext};
use pgcrew::{Client, ClientConfig, Error, Result};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::percentile_ms;

/// Arguments of `pgcrew bench ui`.
#[derive(Debug, Args)]
pub struct UiBenchArgs {
    /// Tasks seeded.
    #[arg(long, default_value_t = 1_000_000)]
    pub tasks: i32,
    /// Runs seeded.
    #[arg(long, default_value_t = 100_000)]
    pub runs: i32,
    /// Ledger events seeded (spread over the runs).
    #[arg(long, default_value_t = 2_000_000)]
    pub events: i32,
    /// Timed requests per page.
    #[arg(long, default_value_t = 20)]
    pub samples: usize,
    /// Open SSE streams.
    #[arg(long, default_value_t = 100)]
    pub clients: usize,
    /// Notifications timed (each reaches every stream).
    #[arg(long, default_value_t = 50)]
    pub notifies: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct PageFigure {
    page: String,
    p50_ms: f64,
    p95_ms: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    tasks: i32,
    runs: i32,
    events: i32,
    samples: usize,
    pages: Vec<PageFigure>,
    worst_p95_ms: f64,
    sse_clients: usize,
    connections_before: i64,
    connections_with_streams: i64,
    notify_deliveries: usize,
    notify_p50_ms: f64,
    notify_p99_ms: f64,
}

/// Run the benchmark.
pub async fn run(dsn: Option<String>, args: UiBenchArgs) -> Result<ExitCode> {
    if args.tasks < 10 || args.runs < 10 || args.events < args.runs || args.samples == 0 {
        return Err(Error::invalid(
            "arguments",
            "--tasks and --runs must be at least 10, --events at least --runs, --samples at least 1",
        ));
    }
    super::at_least_one(&[
        ("--clients", args.clients as u64),
        ("--notifies", args.notifies as u64),
    ])?;
    let r = crate::bench::in_scratch(dsn, async |dsn| bench(dsn, &args).await).await?;
    super::print_report(args.json, &r, |r| {
        println!(
            "pgcrew bench ui: {} tasks, {} runs, {} ledger events; {} requests per page",
            r.tasks, r.runs, r.events, r.samples
        );
        for p in &r.pages {
            println!(
                "  {:<40} p50 {:>7.1} ms  p95 {:>7.1} ms",
                p.page, p.p50_ms, p.p95_ms
            );
        }
        println!("  worst p95 {:.1} ms (target <= 100)", r.worst_p95_ms);
        println!(
            "  {} SSE streams: database connections {} before, {} with them (target: at most 1 more)",
            r.sse_clients, r.connections_before, r.connections_with_streams
        );
        println!(
            "  NOTIFY to browser: p50 {:.2} ms, p99 {:.2} ms over {} deliveries (target p99 <= 50)",
            r.notify_p50_ms, r.notify_p99_ms, r.notify_deliveries
        );
        Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

async fn seed(db: &Db, args: &UiBenchArgs) -> Result<()> {
    for i in 0..10 {
        let ctx = TenantContext::new(format!("bench-{i}"))?.budget_usd(Some(100.0));
        tenancy::upsert(db, &ctx).await?;
    }
    let conn = db.get().await?;
    eprintln!(
        "[1/4] seeding {} runs and {} events ...",
        args.runs, args.events
    );
    conn.execute(
        pgcrew::sql!("bench/ui_seed_runs"),
        &[&args.runs, &args.events],
    )
    .await?;
    eprintln!(
        "[2/4] seeding {} tasks, cost entries and per-minute queue figures ...",
        args.tasks
    );
    conn.execute(pgcrew::sql!("bench/ui_seed_tasks"), &[&args.tasks])
        .await?;
    conn.execute(pgcrew::sql!("bench/ui_seed_costs"), &[&20_000i32])
        .await?;
    conn.execute(pgcrew::sql!("bench/ui_seed_minutes"), &[])
        .await?;
    for t in [
        "pgcrew.runs",
        "pgcrew.events",
        "pgcrew.tasks",
        "pgcrew.cost_entries",
    ] {
        conn.batch_execute(&format!("VACUUM ANALYZE {t}")).await?;
    }
    Ok(())
}

async fn bench(dsn: &str, args: &UiBenchArgs) -> Result<Report> {
    let db = Db::connect(dsn, 2, Duration::from_secs(10)).await?;
    seed(&db, args).await?;
    let config = ClientConfig::builder()
        .leader_election(false)
        .max_connections(5)
        .build()?;
    let client = Client::builder(dsn).config(config).build().await?;
    client.start().await?;
    let result = measure(&db, &client, args).await;
    let _ = client.stop().await;
    result
}

async fn measure(db: &Db, client: &Client, args: &UiBenchArgs) -> Result<Report> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| Error::invalid("listen", e.to_string()))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::invalid("listen", e.to_string()))?;
    let app = pgcrew::ui::router_with(
        client,
        pgcrew::ui::UiConfig::new().cache_ttl(Duration::ZERO),
    );
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let row = db
        .get()
        .await?
        .query_one(pgcrew::sql!("bench/ui_samples"), &[])
        .await?;
    let (run, task): (String, i64) = (row.get(0), row.get(1));
    let pages = [
        "/".to_string(),
        "/runs".into(),
        "/runs?tenant=bench-3&state=completed&since=1d".into(),
        "/runs?agent=agent-2".into(),
        format!("/runs/{run}"),
        "/tasks".into(),
        "/tasks?queue=q0&state=available".into(),
        "/tasks?queue=q3&state=available".into(),
        "/tasks?payload=%7B%22customer%22%3A42%7D".into(),
        "/tasks?payload=%7B%22customer%22%3A-1%7D".into(),
        "/tasks?tenant=bench-5&kind=k2".into(),
        format!("/tasks/{task}"),
        "/tenants".into(),
        "/tenants/bench-1".into(),
        "/instances".into(),
        "/api/overview".into(),
    ];
    eprintln!(
        "[3/4] timing {} pages, {} requests each ...",
        pages.len(),
        args.samples
    );
    let http = reqwest::Client::new();
    let mut figures = Vec::new();
    for page in &pages {
        let url = format!("http://{addr}{page}");
        let mut ms = Vec::with_capacity(args.samples);
        for i in 0..=args.samples {
            let t = Instant::now();
            let r = http
                .get(&url)
                .send()
                .await
                .map_err(|e| Error::invalid("request", e.to_string()))?;
            let status = r.status();
            let _ = r.bytes().await;
            if !status.is_success() {
                return Err(Error::Internal(format!("{page}: HTTP {status}")));
            }
            if i > 0 {
                ms.push(t.elapsed().as_secs_f64() * 1000.0);
            }
        }
        ms.sort_by(f64::total_cmp);
        figures.push(PageFigure {
            page: page.clone(),
            p50_ms: percentile_ms(&ms, 0.5),
            p95_ms: percentile_ms(&ms, 0.95),
        });
    }
    eprintln!(
        "[4/4] {} SSE streams, {} notifications ...",
        args.clients, args.notifies
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before: i64 = db
        .get()
        .await?
        .query_one(pgcrew::sql!("bench/ui_connections"), &[])
        .await?
        .get(0);
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<f64>();
    let mut readers = Vec::new();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    for _ in 0..args.clients {
        let mut tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| Error::invalid("sse", e.to_string()))?;
        tcp.write_all(b"GET /events HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n")
            .await
            .map_err(|e| Error::invalid("sse", e.to_string()))?;
        let (sent, tx, ready) = (sent.clone(), tx.clone(), ready_tx.clone());
        readers.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            let mut pending = String::new();
            let mut announced = false;
            while let Ok(n) = tcp.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                let at = Instant::now();
                pending.push_str(&String::from_utf8_lossy(&buf[..n]));
                if !announced && pending.contains("event: resync") {
                    announced = true;
                    let _ = ready.send(());
                }
                while let Some(i) = pending.find("\"run_id\":\"") {
                    let rest = &pending[i + 10..];
                    let Some(end) = rest.find('"') else { break };
                    let id = rest[..end].to_string();
                    pending = rest[end..].to_string();
                    if let Some(t0) = sent.lock().ok().and_then(|m| m.get(&id).copied()) {
                        let _ = tx.send(at.duration_since(t0).as_secs_f64() * 1000.0);
                    }
                }
            }
        }));
    }
    for _ in 0..args.clients {
        let _ = ready_rx.recv().await;
    }
    let with: i64 = db
        .get()
        .await?
        .query_one(pgcrew::sql!("bench/ui_connections"), &[])
        .await?
        .get(0);
    let conn = db.get().await?;
    for _ in 0..args.notifies {
        let id = uuid::Uuid::new_v4();
        if let Ok(mut m) = sent.lock() {
            m.insert(id.to_string(), Instant::now());
        }
        conn.execute(pgcrew::sql!("bench/ui_notify"), &[&id])
            .await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let expected = args.clients * args.notifies;
    let mut lat = Vec::with_capacity(expected);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while lat.len() < expected {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(ms)) => lat.push(ms),
            _ => break,
        }
    }
    for r in readers {
        r.abort();
    }
    server.abort();
    lat.sort_by(f64::total_cmp);
    let worst = figures.iter().map(|f| f.p95_ms).fold(0.0, f64::max);
    Ok(Report {
        tasks: args.tasks,
        runs: args.runs,
        events: args.events,
        samples: args.samples,
        pages: figures,
        worst_p95_ms: worst,
        sse_clients: args.clients,
        connections_before: before,
        connections_with_streams: with,
        notify_deliveries: lat.len(),
        notify_p50_ms: percentile_ms(&lat, 0.5),
        notify_p99_ms: percentile_ms(&lat, 0.99),
    })
}
