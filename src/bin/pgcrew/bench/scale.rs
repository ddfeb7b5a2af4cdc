//! `pgcrew bench scale`: claim latency as the tasks table grows to millions of rows, and how
//! long another tenant's single task waits behind one tenant's backlog of a million tasks.
//!
//! One claimer runs `queue::claim` + `queue::ack` (complete) cycles, each claim shared by two
//! tenants with work (big and small), in three table states:
//! 1. only the measured tasks;
//! 2. plus `--finished` completed tasks (a day of work that retention has not deleted yet);
//! 3. plus `--backlog` available tasks of one tenant ("big") in the same queue.
//!
//! Then a single low-priority task of a third tenant ("late") is enqueued behind that backlog,
//! and the bench counts the claims until it is claimed: once with `--batch`-sized claims and
//! once with claims of one task (round robin across the tenants with work).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use pgcrew::db::Conn;
use pgcrew::queue::{self, Ack, AckOutcome, ClaimedTask, NewTask, Priority};
use pgcrew::tenancy::{self, TenantContext};
use pgcrew::{Client, ClientConfig, Db, Error, InstanceId, Result, TenantId};
use serde::Serialize;

use crate::bench::percentile_ms;

/// Arguments of `pgcrew bench scale`.
#[derive(Debug, Args)]
pub struct ScaleBenchArgs {
    /// Completed tasks added before the second phase (finished work awaiting retention).
    #[arg(long, default_value_t = 1_000_000)]
    pub finished: u64,
    /// Available tasks of one tenant added before the third phase (a backlog in the same queue).
    #[arg(long, default_value_t = 1_000_000)]
    pub backlog: u64,
    /// Claim + complete cycles measured per phase.
    #[arg(long, default_value_t = 500)]
    pub samples: usize,
    /// Tasks per claim.
    #[arg(long, default_value_t = 10)]
    pub batch: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Claim latency in one table state.
#[derive(Debug, Serialize)]
struct Phase {
    /// Rows in `pgcrew.tasks` when the phase started.
    table_rows: i64,
    /// Available tasks in the queue when the phase started.
    available: i64,
    claim_p50_ms: f64,
    claim_p99_ms: f64,
    /// The claim's acknowledgement (complete, one statement for the batch).
    ack_p50_ms: f64,
}

/// The figures printed.
#[derive(Debug, Serialize)]
struct Report {
    samples: usize,
    batch: usize,
    finished: u64,
    backlog: u64,
    /// Seconds to seed the finished tasks and the backlog (one INSERT ... SELECT each, then
    /// VACUUM ANALYZE).
    seed_secs: f64,
    only_measured: Phase,
    with_finished: Phase,
    with_backlog: Phase,
    /// Tenants with available work when the late tenant's task was enqueued.
    tenants_with_work: i64,
    /// Claims of `batch` tasks until the late tenant's task was claimed.
    fair_claims_batch: usize,
    /// Claims of one task until the late tenant's next task was claimed.
    fair_claims_single: usize,
}

/// Run the benchmark.
pub async fn run(dsn: Option<String>, args: ScaleBenchArgs) -> Result<ExitCode> {
    if !(1..=100_000).contains(&args.samples) || !(1..=1000).contains(&args.batch) {
        return Err(Error::invalid(
            "bench",
            "--samples must be between 1 and 100000 and --batch between 1 and 1000",
        ));
    }
    let r = crate::bench::in_scratch(dsn, async |dsn| bench(dsn, &args).await).await?;
    super::print_report(args.json, &r, |r| {
        println!(
            "pgcrew bench scale: claims of {} tasks + complete, {} per phase (seeding took {:.1} s)",
            r.batch, r.samples, r.seed_secs
        );
        for (name, p) in [
            ("only the measured tasks", &r.only_measured),
            ("+ finished tasks", &r.with_finished),
            ("+ one tenant's backlog", &r.with_backlog),
        ] {
            println!(
                "  {name:<24} {:>9} rows, {:>9} available: claim p50 {:.3} ms, p99 {:.3} ms; ack p50 {:.3} ms",
                p.table_rows, p.available, p.claim_p50_ms, p.claim_p99_ms, p.ack_p50_ms
            );
        }
        println!(
            "  fairness behind the backlog ({} tenants with work): the late tenant's task was claimed by claim #{} (claims of {}), #{} (claims of 1)",
            r.tenants_with_work, r.fair_claims_batch, r.batch, r.fair_claims_single
        );
        Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

async fn bench(dsn: &str, args: &ScaleBenchArgs) -> Result<Report> {
    let db = Db::connect(dsn, 4, Duration::from_secs(10)).await?;
    for t in ["big", "small", "late"] {
        tenancy::upsert(&db, &TenantContext::new(t)?).await?;
    }
    // A registered instance does the claiming (no leader: nothing rescues its tasks).
    let client = Client::connect(
        dsn,
        ClientConfig::builder()
            .instance_id(InstanceId::new("bench-scale")?)
            .leader_election(false)
            .build()?,
    )
    .await?;
    client.start().await?;
    let me = client.instance_id().clone();
    let conn = db.get().await?;

    eprintln!("[1/4] claim latency, the table holding only the measured tasks ...");
    let only_measured = phase(&conn, &me, args).await?;

    eprintln!("[2/4] adding {} finished tasks ...", args.finished);
    let mut seed_secs = seed(&conn, args.finished, "completed").await?;
    let with_finished = phase(&conn, &me, args).await?;

    eprintln!(
        "[3/4] adding a backlog of {} available tasks of tenant big ...",
        args.backlog
    );
    seed_secs += seed(&conn, args.backlog, "available").await?;
    let with_backlog = phase(&conn, &me, args).await?;

    eprintln!("[4/4] fairness: one task of tenant late behind the backlog ...");
    let late = TenantId::new("late")?;
    let tenants_with_work = scalar(&conn, pgcrew::sql!("bench/queue_tenants_with_work")).await? + 1;
    let fair_claims_batch = claims_until_served(&conn, &me, &late, args.batch).await?;
    let fair_claims_single = claims_until_served(&conn, &me, &late, 1).await?;
    drop(conn);
    client.stop().await?;
    Ok(Report {
        samples: args.samples,
        batch: args.batch,
        finished: args.finished,
        backlog: args.backlog,
        seed_secs,
        only_measured,
        with_finished,
        with_backlog,
        tenants_with_work,
        fair_claims_batch,
        fair_claims_single,
    })
}

/// Add `n` tasks of tenant big in `state`, then VACUUM ANALYZE as autovacuum would soon do
/// (the table's autovacuum thresholds are low). Returns the seconds it took.
async fn seed(conn: &Conn, n: u64, state: &str) -> Result<f64> {
    let n = i64::try_from(n).map_err(|_| Error::invalid("bench", "too many tasks to seed"))?;
    let t0 = Instant::now();
    conn.execute(pgcrew::sql!("bench/queue_seed"), &[&n, &"big", &state])
        .await?;
    conn.batch_execute(pgcrew::sql!("bench/queue_vacuum"))
        .await?;
    Ok(t0.elapsed().as_secs_f64())
}

async fn scalar(conn: &Conn, sql: &str) -> Result<i64> {
    Ok(conn.query_one(sql, &[]).await?.try_get(0)?)
}

/// Enqueue `samples x batch` tasks for each of tenants big and small, then time `samples`
/// claim + complete cycles. Every phase claims across the same two tenants, so the phases
/// differ only in what else the table holds.
async fn phase(conn: &Conn, me: &InstanceId, args: &ScaleBenchArgs) -> Result<Phase> {
    let n = args.samples * args.batch;
    let (small, big) = (TenantId::new("small")?, TenantId::new("big")?);
    let tasks: Vec<NewTask> = (0..2 * n)
        .map(|i| {
            let tenant = if i < n { &small } else { &big };
            Ok(NewTask::new("noop", &serde_json::json!({ "i": i }))?.tenant(tenant.clone()))
        })
        .collect::<Result<_>>()?;
    for chunk in tasks.chunks(5_000) {
        queue::enqueue_many(conn, chunk).await?;
    }
    let table_rows = scalar(conn, pgcrew::sql!("bench/queue_table_rows")).await?;
    let available = scalar(conn, pgcrew::sql!("bench/queue_available")).await?;
    let queues = vec!["default".to_string()];
    let limit = i32::try_from(args.batch).unwrap_or(i32::MAX);
    let mut claims = Vec::with_capacity(args.samples);
    let mut acks = Vec::with_capacity(args.samples);
    for _ in 0..args.samples {
        let t = Instant::now();
        let claimed = queue::claim(unnamed(conn), &queues, limit, me).await?;
        claims.push(t.elapsed().as_secs_f64() * 1000.0);
        if claimed.len() != args.batch {
            return Err(Error::Config(format!(
                "bench scale: a claim returned {} tasks instead of {}",
                claimed.len(),
                args.batch
            )));
        }
        let t = Instant::now();
        complete_all(conn, &claimed).await?;
        acks.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    claims.sort_by(f64::total_cmp);
    acks.sort_by(f64::total_cmp);
    Ok(Phase {
        table_rows,
        available,
        claim_p50_ms: percentile_ms(&claims, 0.50),
        claim_p99_ms: percentile_ms(&claims, 0.99),
        ack_p50_ms: percentile_ms(&acks, 0.50),
    })
}

/// The pooled connection's plain client: claims and acks measured here go out as unnamed
/// statements (planned with each call's parameters), as they always have in this benchmark.
fn unnamed(conn: &Conn) -> &tokio_postgres::Client {
    conn
}

/// Complete `claimed` in one acknowledgement statement; an error if any was rejected.
async fn complete_all(conn: &Conn, claimed: &[ClaimedTask]) -> Result<()> {
    let acks: Vec<Ack> = claimed
        .iter()
        .map(|c| c.ack(AckOutcome::Complete))
        .collect();
    let report = queue::ack(unnamed(conn), &acks).await?;
    if report.applied.len() != acks.len() {
        return Err(Error::Config(format!(
            "bench scale: {} of {} acknowledgements were rejected",
            acks.len() - report.applied.len(),
            acks.len()
        )));
    }
    Ok(())
}

/// Enqueue one low-priority task of `late` and count claims of `batch` until it is claimed.
/// Every claimed task is completed.
async fn claims_until_served(
    conn: &Conn,
    me: &InstanceId,
    late: &TenantId,
    batch: usize,
) -> Result<usize> {
    let task = NewTask::new("noop", &serde_json::json!({ "late": true }))?
        .tenant(late.clone())
        .priority(Priority::Low);
    let id = queue::enqueue(conn, &task).await?.id;
    let queues = vec!["default".to_string()];
    let limit = i32::try_from(batch).unwrap_or(i32::MAX);
    // A bound far above any fair answer, so an unfair claim shows up as a failure, not a hang.
    for n in 1..=1000 {
        let claimed = queue::claim(unnamed(conn), &queues, limit, me).await?;
        complete_all(conn, &claimed).await?;
        if claimed.iter().any(|c| c.id == id) {
            return Ok(n);
        }
    }
    Err(Error::Config(format!(
        "bench scale: the late tenant's task {id} was not claimed within 1000 claims of {batch}"
    )))
}
