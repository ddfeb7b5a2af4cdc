//! PgBouncer for real: Debian's `pgbouncer` (1.18 here) in transaction mode on a free port in
//! front of the test cluster. The pool goes through PgBouncer with unnamed statements, LISTEN
//! and migrations go direct. Without the binary the tests are skipped with a loud message,
//! unless PGCREW_REQUIRE_FAULT_TOOLS is set (CI), where that is a failure.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pgcrew::agent::register_agent;
use pgcrew::coord::instance::{self, InstanceInfo};
use pgcrew::db::pgbouncer::PoolMode;
use pgcrew::db::{Db, PoolOptions, StatementMode, TempPgBouncer};
use pgcrew::queue::{self, Ack, AckOutcome, NewTask, TaskState};
use pgcrew::runs::{self, NewEvent, NewRun, RunOutcome, RunState};
use pgcrew::{Client, ClientConfig, Error, EventKind, InstanceId, TenantId};
use serde_json::json;

use crate::common::{
    TestDb, agent_runtime, fast_config, next_run_state_change, pgcrew_bin, start_leader,
    submit_run, test_db, wait_listening,
};

/// A migrated test database and a PgBouncer (transaction mode) in front of its server.
struct Bounced {
    t: TestDb,
    bouncer: TempPgBouncer,
}

impl Bounced {
    /// The test database through PgBouncer.
    fn through(&self) -> String {
        self.bouncer.dsn_for(self.t.scratch.name())
    }
}

/// `None` (after a loud message) when pgbouncer is missing and PGCREW_REQUIRE_FAULT_TOOLS is
/// unset; a failure when it is set.
async fn bounced() -> Option<Bounced> {
    let t = test_db().await;
    let bouncer = bouncer_in_front_of(t.dsn()).await?;
    Some(Bounced { t, bouncer })
}

/// A PgBouncer (transaction mode) in front of the server of `dsn`; `None` (after a loud
/// message) when pgbouncer is missing and PGCREW_REQUIRE_FAULT_TOOLS is unset.
async fn bouncer_in_front_of(dsn: &str) -> Option<TempPgBouncer> {
    if !crate::common::pgbouncer_installed() {
        return None;
    }
    let dsn = dsn.to_string();
    let bouncer =
        tokio::task::spawn_blocking(move || TempPgBouncer::start(&dsn, PoolMode::Transaction))
            .await
            .unwrap()
            .expect("start pgbouncer");
    Some(bouncer)
}

async fn unnamed_db(dsn: &str, size: usize) -> Db {
    Db::connect_with(
        dsn,
        PoolOptions {
            size,
            statements: StatementMode::Unnamed,
            ..Default::default()
        },
    )
    .await
    .expect("connect through pgbouncer")
}

async fn register(db: &Db, id: &str) -> InstanceId {
    let id = InstanceId::new(id).unwrap();
    instance::register(
        db,
        &InstanceInfo {
            id: id.clone(),
            hostname: "test".into(),
            pid: 1,
            version: "test".into(),
            metadata: json!({}),
            agents: vec![],
            tools: vec![],
        },
    )
    .await
    .unwrap();
    id
}

fn task(kind: &str) -> NewTask {
    NewTask::new(kind, &json!({"k": kind})).unwrap()
}

/// Statement caching left on behind transaction pooling is refused when connecting, naming
/// the setting — never a `prepared statement ... does not exist` later.
#[tokio::test]
async fn cached_statements_behind_transaction_pooling_are_refused_at_start_up() {
    let Some(b) = bounced().await else { return };
    let err = Db::connect(&b.through(), 4, Duration::from_secs(10))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("unnamed") && msg.contains("PgBouncer"),
        "{msg}"
    );

    let err = Client::connect(&b.through(), ClientConfig::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err}");

    // The CLI: exit 2 with the setting named; with `--statements unnamed` it works.
    let through = b.through();
    let out = tokio::task::spawn_blocking(move || {
        let cached = std::process::Command::new(pgcrew_bin())
            .args(["tasks", "stats", "--dsn", &through])
            .env_remove("PGCREW_STATEMENTS")
            .output()
            .unwrap();
        let unnamed = std::process::Command::new(pgcrew_bin())
            .args([
                "--statements",
                "unnamed",
                "tasks",
                "stats",
                "--dsn",
                &through,
            ])
            .output()
            .unwrap();
        (cached, unnamed)
    })
    .await
    .unwrap();
    let (cached, unnamed) = out;
    assert_eq!(cached.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&cached.stderr);
    assert!(stderr.contains("--statements unnamed"), "{stderr}");
    assert!(
        unnamed.status.success(),
        "{}",
        String::from_utf8_lossy(&unnamed.stderr)
    );

    // Directly on PostgreSQL the check passes and the cache is used.
    let direct = Db::connect(b.t.dsn(), 2, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(direct.statements(), StatementMode::Cached);
}

/// A cached statement lost at run time (a pool built without the start-up check) is an
/// actionable error naming the setting, not the server's bare message.
#[tokio::test]
async fn a_prepared_statement_lost_at_run_time_names_the_setting() {
    let Some(b) = bounced().await else { return };
    let config = pgcrew::db::parse_dsn(&b.through()).unwrap();
    let manager =
        deadpool_postgres::Manager::new(config.pg_config().clone(), tokio_postgres::NoTls);
    let pool = deadpool_postgres::Pool::builder(manager)
        .max_size(2)
        .build()
        .unwrap();
    let db = Db::from_pool(pool, config.clone());
    let a = db.get().await.unwrap();
    queue::stats(&a).await.unwrap();
    // Another client takes the server connection `a` prepared its statement on.
    let (other, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
    let driver = tokio::spawn(conn);
    other.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let err = queue::stats(&a).await.unwrap_err();
    other.batch_execute("COMMIT").await.unwrap();
    drop(other);
    let _ = driver.await;
    assert!(matches!(err, Error::Config(_)), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("unnamed") && msg.contains("26000"), "{msg}");
}

#[tokio::test]
async fn queue_enqueue_claim_ack_and_retries_through_pgbouncer() {
    let Some(b) = bounced().await else { return };
    let db = unnamed_db(&b.through(), 4).await;
    assert_eq!(db.statements(), StatementMode::Unnamed);
    let me = register(&db, "bounced-worker").await;
    let conn = db.get().await.unwrap();

    // Single (plain and with a unique key and a dependency) and bulk enqueue.
    let first = queue::enqueue(&conn, &task("a").queue("q")).await.unwrap();
    assert_eq!(first.state, TaskState::Available);
    let keyed = queue::enqueue(&conn, &task("a").queue("q").unique_key("u1"))
        .await
        .unwrap();
    let dup = queue::enqueue(&conn, &task("a").queue("q").unique_key("u1"))
        .await
        .unwrap();
    assert!(dup.duplicate);
    assert_eq!(dup.id, keyed.id);
    let child = queue::enqueue(&conn, &task("child").queue("q2").depends_on([first.id]))
        .await
        .unwrap();
    assert_eq!(child.state, TaskState::Scheduled);
    let bulk = queue::enqueue_many(
        &conn,
        &(0..50).map(|_| task("bulk").queue("q")).collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    assert_eq!(bulk.len(), 50);
    // In a transaction too.
    {
        let mut c2 = db.get().await.unwrap();
        let tx = c2.transaction().await.unwrap();
        queue::enqueue(&tx, &task("tx").queue("q")).await.unwrap();
        tx.commit().await.unwrap();
    }

    // Claim everything, complete all but one, fail that one with a retry.
    let mut claimed = Vec::new();
    loop {
        let got = queue::claim(&conn, &["q".to_string()], 16, &me)
            .await
            .unwrap();
        if got.is_empty() {
            break;
        }
        claimed.extend(got);
    }
    assert_eq!(claimed.len(), 53);
    let (failing, rest) = claimed.split_first().unwrap();
    let acks: Vec<Ack> = rest.iter().map(|t| t.ack(AckOutcome::Complete)).collect();
    let rep = queue::ack(&conn, &acks).await.unwrap();
    assert_eq!(rep.applied.len(), 52);
    assert!(rep.stale.is_empty());
    let rep = queue::ack(
        &conn,
        &[failing.ack(AckOutcome::Fail {
            error: "boom".into(),
            retry_in: Duration::ZERO,
        })],
    )
    .await
    .unwrap();
    assert_eq!(rep.applied, vec![(failing.id, TaskState::Retryable)]);
    // The retry is claimed again as attempt 2 and completes.
    let again = queue::claim(&conn, &["q".to_string()], 16, &me)
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].id, failing.id);
    assert_eq!(again[0].attempt, 2);
    queue::ack(&conn, &[again[0].ack(AckOutcome::Complete)])
        .await
        .unwrap();
    // Reads: one task, the heartbeat of tasks not held, the stats.
    assert_eq!(queue::get(&conn, child.id).await.unwrap().id, child.id);
    let hb = queue::heartbeat(&conn, &me, &[child.id]).await.unwrap();
    assert!(hb.alive.is_empty());
    let stats = queue::stats(&conn).await.unwrap();
    let completed: i64 = stats
        .iter()
        .filter(|s| s.queue == "q" && s.state == "completed")
        .map(|s| s.tasks)
        .sum();
    assert_eq!(completed, 53);
    // Many concurrent statements on several pooled connections (server connections are
    // shared between them by PgBouncer).
    let mut handles = Vec::new();
    for i in 0..8 {
        let db = db.clone();
        handles.push(tokio::spawn(async move {
            let c = db.get().await.unwrap();
            for _ in 0..20 {
                queue::enqueue(&c, &task("load").queue(format!("load{i}")))
                    .await
                    .unwrap();
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
}

/// Issue #23: behind PgBouncer (unnamed statements) the worker pool claimed every batch with
/// the general `pgcrew.claim_tasks`, because the one-statement fast claim would have been
/// planned on every call. Since V048 the fast claims are PL/pgSQL functions, whose plans the
/// server session keeps whichever client PgBouncer lends it to, so the pool takes them there
/// too. A single-tenant queue without limits, processed through PgBouncer: every claim is a
/// fast one (counted with `pg_stat_statements` on a throwaway cluster), and every task runs
/// once.
#[tokio::test]
async fn a_worker_pool_takes_the_fast_claims_through_pgbouncer() {
    const TASKS: usize = 300;
    let (cluster, scratch, db) = crate::common::statements_db("bounced_fast").await;
    let Some(bouncer) = bouncer_in_front_of(scratch.dsn()).await else {
        return;
    };
    let runs = Arc::new(AtomicU64::new(0));
    let r = runs.clone();
    let pool = pgcrew::queue::WorkerPool::builder()
        .queue("bounced")
        .concurrency(4)
        .handler("k", move |_ctx, _p: serde_json::Value| {
            r.fetch_add(1, Ordering::SeqCst);
            async move { Ok(pgcrew::queue::TaskOutcome::Complete) }
        })
        .build()
        .unwrap();
    let config = fast_config("bounced-fast")
        .pool_size(4)
        .statements(StatementMode::Unnamed)
        .listen_dsn(scratch.dsn())
        .build()
        .unwrap();
    let client =
        crate::common::start_client(bouncer.dsn_for(scratch.name()), config, Some(pool)).await;
    wait_listening(&client, Duration::from_secs(10)).await;
    let conn = db.get().await.unwrap();
    conn.execute("SELECT pg_stat_statements_reset()", &[])
        .await
        .unwrap();
    // A burst (bulk enqueue), then wake-ups of the idle pool one task at a time.
    queue::enqueue_many(
        &conn,
        &(0..TASKS - 10)
            .map(|_| task("k").queue("bounced"))
            .collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    crate::common::wait_until(Duration::from_secs(30), "the burst runs", || async {
        runs.load(Ordering::SeqCst) == (TASKS - 10) as u64
    })
    .await;
    for k in TASKS - 9..=TASKS {
        queue::enqueue(&conn, &task("k").queue("bounced"))
            .await
            .unwrap();
        crate::common::wait_until(Duration::from_secs(10), "the task runs", || async {
            runs.load(Ordering::SeqCst) == k as u64
        })
        .await;
    }
    let (fast, general) = crate::common::claim_statements(&db).await;
    assert!(
        fast > 0 && general == 0,
        "through PgBouncer: {fast} fast claims, {general} pgcrew.claim_tasks calls"
    );
    let done = crate::common::scalar(
        &db,
        "SELECT count(*) FROM pgcrew.tasks WHERE state = 'completed' AND attempts = 1",
    )
    .await;
    assert_eq!(done, TASKS as i64);
    client.stop().await.unwrap();
    drop(conn);
    drop(db);
    drop(bouncer);
    drop(scratch);
    drop(cluster);
}

#[tokio::test]
async fn runs_ledger_verify_and_terminal_transitions_through_pgbouncer() {
    let Some(b) = bounced().await else { return };
    let db = unnamed_db(&b.through(), 4).await;
    let tenant = TenantId::new("default").unwrap();
    let run = runs::create_run(&db, NewRun::new(tenant.clone()).agent("tester"))
        .await
        .unwrap();
    let me = register(&db, "bounced-runner").await;
    runs::start_run(&db, run, Some(&me), None, runs::LimitPolicy::Reject)
        .await
        .unwrap();
    for i in 0..20 {
        runs::append_event(
            &db,
            run,
            NewEvent::new("note", json!({"i": i})).step(format!("s{i}")),
            None,
        )
        .await
        .unwrap();
    }
    let batch: Vec<NewEvent> = (0..30)
        .map(|i| NewEvent::new("note", json!({"batch": i})))
        .collect();
    runs::append_events(&db, run, &batch, None).await.unwrap();
    let events = runs::read_events(&db, run, 0, 1000).await.unwrap();
    assert_eq!(events.iter().filter(|e| e.event_type == "note").count(), 50);
    let rust = runs::verify_run_chain(&db, run).await.unwrap();
    let sql = runs::verify_run_chain_sql(&db, run).await.unwrap();
    assert_eq!(rust.first_bad_seq, None);
    assert_eq!(sql.first_bad_seq, None);
    let done = runs::complete_run(&db, run, RunOutcome::default(), None)
        .await
        .unwrap();
    assert_eq!(done.state, RunState::Completed);
    assert_eq!(
        runs::get_run(&db, run).await.unwrap().state,
        RunState::Completed
    );
    // A second run is cancelled.
    let other = runs::create_run(&db, NewRun::new(tenant)).await.unwrap();
    let cancelled = runs::cancel_run(&db, other, "stop").await.unwrap();
    assert_eq!(cancelled.state, RunState::Cancelled);
}

#[tokio::test]
async fn kernel_model_and_tool_steps_through_pgbouncer() {
    let Some(b) = bounced().await else { return };
    let db = unnamed_db(&b.through(), 8).await;
    let tenant = crate::common::tenant(&db, "acme", &[], Some(10.0)).await;
    let server = crate::kernel::weather_mock().await;
    server.hang.store(false, Ordering::SeqCst);
    let body_runs = Arc::new(AtomicU64::new(0));
    let tools = crate::kernel::weather_registry(&body_runs);
    register_agent(&db, &crate::kernel::weather_agent())
        .await
        .unwrap();
    let rt = agent_runtime(
        &db,
        crate::kernel::openai(&server),
        tools,
        "bounced-instance",
    );
    let run = submit_run(&rt, &tenant, "u", "forecaster", "weather in Oslo?").await;
    let done = rt.execute(run, None).await.unwrap();
    assert_eq!(done.state, RunState::Completed);
    assert_eq!(done.response_text.as_deref(), Some("It is sunny in Oslo."));
    assert_eq!(body_runs.load(Ordering::SeqCst), 1);
    let events = runs::read_events(&db, run, 0, 1000).await.unwrap();
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    assert!(types.iter().any(|t| t.starts_with("model")), "{types:?}");
    assert!(types.iter().any(|t| t.starts_with("tool")), "{types:?}");
    assert_eq!(
        runs::verify_run_chain(&db, run)
            .await
            .unwrap()
            .first_bad_seq,
        None
    );
}

#[tokio::test]
async fn client_pool_through_pgbouncer_listen_direct() {
    let Some(b) = bounced().await else { return };
    let config = fast_config("bounced")
        .notify_poll_interval(Duration::from_secs(30))
        .pool_size(4)
        .statements(StatementMode::Unnamed)
        .listen_dsn(b.t.dsn())
        .migrate(true)
        .build()
        .unwrap();
    let client = Client::connect(&b.through(), config).await.unwrap();
    start_leader(&client, Duration::from_secs(10)).await;
    wait_listening(&client, Duration::from_secs(10)).await;
    // A notification raised through PgBouncer arrives on the direct LISTEN connection (the
    // fallback poll is 30 s away, so this is the NOTIFY).
    let mut sub = client.subscribe(&[EventKind::RunStateChanged]);
    let run = runs::create_run(client.db(), NewRun::new(TenantId::new("default").unwrap()))
        .await
        .unwrap();
    while next_run_state_change(
        &mut sub,
        Duration::from_secs(10),
        "notification within 10 s",
    )
    .await
        != run
    {}
    let e = client.enqueue(&task("via-client")).await.unwrap();
    assert_eq!(e.state, TaskState::Available);
    // Heartbeats keep the instance listed; it is the leader.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let rows = instance::list(&b.t.db).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert!(rows[0].is_leader);
    client.stop().await.unwrap();
}

#[tokio::test]
async fn cli_commands_through_pgbouncer() {
    let Some(b) = bounced().await else { return };
    let through = b.through();
    let out = tokio::task::spawn_blocking(move || {
        let run = |args: &[&str]| {
            std::process::Command::new(pgcrew_bin())
                .args(args)
                .env("PGCREW_STATEMENTS", "unnamed")
                .env("DATABASE_URL", &through)
                .output()
                .unwrap()
        };
        let enqueue = run(&["tasks", "enqueue", "--kind", "cli-kind", "--queue", "cliq"]);
        let stats = run(&["tasks", "stats", "--json"]);
        let migrate = run(&["migrate"]);
        (enqueue, stats, migrate)
    })
    .await
    .unwrap();
    let (enqueue, stats, migrate) = out;
    assert!(
        enqueue.status.success(),
        "{}",
        String::from_utf8_lossy(&enqueue.stderr)
    );
    assert!(
        stats.status.success(),
        "{}",
        String::from_utf8_lossy(&stats.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert!(json.to_string().contains("cliq"), "{json}");
    // Migrations need a direct connection: a clear error, exit 2.
    assert_eq!(migrate.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&migrate.stderr).contains("direct"),
        "{}",
        String::from_utf8_lossy(&migrate.stderr)
    );
}
