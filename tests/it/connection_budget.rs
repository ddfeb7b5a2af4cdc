//! The connection budget: an instance limited to 4 connections (LISTEN included) keeps its
//! heartbeats and its leadership while handlers that hold pooled connections saturate its pool,
//! recovers when its coordination connection is killed, and a budget too small for the
//! configured work is refused at start-up.

use std::sync::Arc;
use std::time::Duration;

use pgcrew::queue::{NewTask, TaskOutcome, WorkerPool};
use pgcrew::{Client, ClientConfig, Error, InstanceId};

use crate::common::{TestDb, lock_leader_row, start_leader, test_db, wait_leader, wait_until};

const INSTANCE_TTL: Duration = Duration::from_secs(2);
const LEADER_TTL: Duration = Duration::from_millis(1500);

fn budget_config(id: &str, max_connections: usize) -> ClientConfig {
    ClientConfig::builder()
        .instance_id(InstanceId::new(id).unwrap())
        .heartbeat_interval(Duration::from_millis(200))
        .instance_ttl(INSTANCE_TTL)
        .leader_ttl(LEADER_TTL)
        .maintenance_interval(Duration::from_millis(200))
        .notify_poll_interval(Duration::from_secs(1))
        .task_heartbeat_timeout(Duration::from_secs(30))
        .max_connections(max_connections)
        .build()
        .unwrap()
}

/// A worker pool whose `hold` tasks each keep a pooled connection busy in `pg_sleep`.
fn holding_pool(sleep_secs: f64) -> Arc<WorkerPool> {
    WorkerPool::builder()
        .queue("default")
        .concurrency(8)
        .poll_interval(Duration::from_millis(100))
        .heartbeat_interval(Duration::from_millis(500))
        .handler("hold", move |ctx, _p: serde_json::Value| async move {
            let conn = ctx.client.db().get().await?;
            conn.execute("SELECT pg_sleep($1)", &[&sleep_secs]).await?;
            Ok(TaskOutcome::Complete)
        })
        .build()
        .unwrap()
}

/// A DSN naming the instance's connections, so that they can be counted.
fn named_dsn(t: &TestDb, app: &str) -> String {
    format!("{} application_name={app}", t.dsn())
}

async fn enqueue_holds(client: &Client, n: usize) {
    let tasks: Vec<NewTask> = (0..n)
        .map(|i| NewTask::new("hold", &serde_json::json!({ "i": i })).unwrap())
        .collect();
    client.enqueue_many(&tasks).await.unwrap();
}

/// One observation from the observer's connection, on database time.
#[derive(Debug)]
struct Sample {
    /// Seconds since the instance's last heartbeat (`None`: no instance row).
    heartbeat_age: Option<f64>,
    /// The term of a valid lease held by the instance (`None`: not leader).
    term: Option<i64>,
    /// Backends of the instance (its pool and its coordination connection).
    backends: i64,
}

async fn sample(observer: &pgcrew::db::Conn, id: &str, app: &str) -> Sample {
    let row = observer
        .query_one(
            "SELECT \
               (SELECT extract(epoch FROM now() - last_heartbeat_at)::float8 \
                  FROM pgcrew.instances WHERE id = $1), \
               (SELECT term FROM pgcrew.leader \
                  WHERE name = 'default' AND leader_id = $1 AND expires_at > now()), \
               (SELECT count(*) FROM pg_stat_activity \
                  WHERE datname = current_database() AND application_name LIKE $2 || '%')",
            &[&id, &app],
        )
        .await
        .unwrap();
    Sample {
        heartbeat_age: row.get(0),
        term: row.get(1),
        backends: row.get(2),
    }
}

/// [`sample`]s of instance `id` every `every_ms` milliseconds for `span`.
async fn samples_for(
    observer: &pgcrew::db::Conn,
    id: &str,
    app: &str,
    span: Duration,
    every_ms: u64,
) -> Vec<Sample> {
    let mut samples = Vec::new();
    let start = tokio::time::Instant::now();
    while start.elapsed() < span {
        samples.push(sample(observer, id, app).await);
        tokio::time::sleep(Duration::from_millis(every_ms)).await;
    }
    samples
}

/// In every one of `samples` the instance's heartbeat is younger than [`INSTANCE_TTL`] (`when`
/// says when, in the message) and it has at most 4 backends (its budget).
fn assert_alive_within_budget(samples: &[Sample], when: &str) {
    for s in samples {
        let age = s.heartbeat_age.expect("the instance row stays");
        assert!(
            age < INSTANCE_TTL.as_secs_f64(),
            "heartbeat gap of {age:.3} s {when}: {samples:?}"
        );
        assert!(
            s.backends <= 4,
            "{} backends for a budget of 4: {samples:?}",
            s.backends
        );
    }
}

/// `aggregate` (of `int8` type, say `count(*)`) over the backends of `app`'s coordination
/// connection.
async fn on_coordination(observer: &pgcrew::db::Conn, app: &str, aggregate: &str) -> i64 {
    let sql = format!(
        "SELECT {aggregate} FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = $1"
    );
    let name = format!("{app} coordination");
    observer.query_one(&sql, &[&name]).await.unwrap().get(0)
}

/// The database's clock.
async fn db_now(observer: &pgcrew::db::Conn) -> chrono::DateTime<chrono::Utc> {
    observer
        .query_one("SELECT now()", &[])
        .await
        .unwrap()
        .get(0)
}

/// Instance `id`'s last heartbeat.
async fn last_heartbeat(observer: &pgcrew::db::Conn, id: &str) -> chrono::DateTime<chrono::Utc> {
    let sql = "SELECT last_heartbeat_at FROM pgcrew.instances WHERE id = $1";
    observer.query_one(sql, &[&id]).await.unwrap().get(0)
}

/// A client (not started) on the DSN named `app`, with [`budget_config`] for instance `id`
/// (four connections) and the worker pool, if any.
async fn budget_client(t: &TestDb, app: &str, id: &str, pool: Option<Arc<WorkerPool>>) -> Client {
    let mut b = Client::builder(named_dsn(t, app)).config(budget_config(id, 4));
    if let Some(p) = pool {
        b = b.service(p);
    }
    b.build().await.unwrap()
}

#[tokio::test]
async fn four_connections_keep_heartbeats_and_leadership_while_workers_saturate_the_pool() {
    let t = test_db().await;
    let app = "budget-saturated";
    let pool = holding_pool(0.25);
    let client = budget_client(&t, app, "saturated", Some(pool.clone())).await;
    assert_eq!(client.config().connections_needed(), 4);
    assert_eq!(client.db().pool().status().max_size, 3);
    start_leader(&client, Duration::from_secs(5)).await;

    // More work than the pool can serve: the claim loop and the acknowledger hold two pooled
    // connections, so one handler at a time sleeps on the third while the others wait for it.
    enqueue_holds(&client, 40).await;
    let observer = t.db.get().await.unwrap();
    let mut samples = Vec::new();
    let mut max_waiting = 0;
    let start = tokio::time::Instant::now();
    while start.elapsed() < Duration::from_secs(6) {
        samples.push(sample(&observer, "saturated", app).await);
        max_waiting = max_waiting.max(client.db().pool().status().waiting);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let executed = pool.metrics().snapshot().executed;
    client.stop().await.unwrap();

    assert!(samples.len() >= 20, "{} samples", samples.len());
    assert!(
        max_waiting > 0,
        "the handlers never had to wait for a pooled connection: the pool was not saturated"
    );
    assert!(executed > 0 && executed < 40, "{executed} tasks ran");
    let term = samples[0].term.expect("leader when sampling starts");
    assert_alive_within_budget(&samples, "exceeds the instance TTL");
    for s in &samples {
        assert_eq!(
            s.term,
            Some(term),
            "leadership lost or term changed: {samples:?}"
        );
    }
    // The budget was used: the pool and the coordination connection were all open.
    assert!(samples.iter().any(|s| s.backends == 4), "{samples:?}");
}

#[tokio::test]
async fn killed_coordination_connection_reconnects_and_heartbeats_resume() {
    let t = test_db().await;
    let app = "budget-killed";
    let pool = holding_pool(0.2);
    let client = budget_client(&t, app, "killed", Some(pool)).await;
    start_leader(&client, Duration::from_secs(5)).await;
    enqueue_holds(&client, 30).await;
    let observer = t.db.get().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let killed_at = db_now(&observer).await;
    let killed = on_coordination(&observer, app, "count(pg_terminate_backend(pid))").await;
    assert_eq!(killed, 1, "one coordination connection per instance");

    let samples = samples_for(&observer, "killed", app, Duration::from_secs(4), 150).await;
    assert_alive_within_budget(&samples, "after the kill");
    // Heartbeats were written after the kill, the coordination connection is back (the
    // notifier reconnected), and the instance leads (kept or re-acquired).
    let last = last_heartbeat(&observer, "killed").await;
    assert!(last > killed_at, "no heartbeat since the kill");
    assert!(client.notifier().reconnects() >= 1);
    let back = on_coordination(&observer, app, "count(*)").await;
    assert_eq!(back, 1, "the coordination connection was re-opened");
    assert!(samples.last().and_then(|s| s.term).is_some(), "{samples:?}");
    assert!(client.is_leader());
    client.stop().await.unwrap();
}

#[tokio::test]
async fn poll_only_instance_coordinates_on_one_connection() {
    let t = test_db().await;
    let app = "budget-poll";
    let config = ClientConfig::builder()
        .instance_id(InstanceId::new("poller").unwrap())
        .heartbeat_interval(Duration::from_millis(200))
        .instance_ttl(INSTANCE_TTL)
        .leader_ttl(LEADER_TTL)
        .poll_only(true)
        .max_connections(3)
        .build()
        .unwrap();
    let client = Client::connect(named_dsn(&t, app), config).await.unwrap();
    start_leader(&client, Duration::from_secs(5)).await;
    let observer = t.db.get().await.unwrap();
    wait_until(
        Duration::from_secs(3),
        "the coordination connection is open",
        || async { on_coordination(&observer, app, "count(*)").await == 1 },
    )
    .await;
    // Killed, it is re-opened (with backoff) and the heartbeats go on.
    let killed_at = db_now(&observer).await;
    on_coordination(&observer, app, "count(pg_terminate_backend(pid))").await;
    wait_until(
        Duration::from_secs(3),
        "the killed coordination connection is re-opened and heartbeats go on",
        || async {
            let s = sample(&observer, "poller", app).await;
            let last = last_heartbeat(&observer, "poller").await;
            last > killed_at && s.term.is_some() && s.backends <= 3
        },
    )
    .await;
    client.stop().await.unwrap();
}

#[tokio::test]
async fn budgets_too_small_for_the_work_are_refused_at_start_up() {
    for (config, says) in [
        // Below the minimum.
        (
            ClientConfig::builder().max_connections(2),
            "max_connections is 2",
        ),
        // Contradicting pool size.
        (
            ClientConfig::builder().pool_size(8).max_connections(4),
            "disagree",
        ),
    ] {
        let err = config.build().unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{err}");
        assert!(err.to_string().contains(says), "{err}");
    }
    // A consistent pair, and the derived sizes.
    let c = ClientConfig::builder()
        .pool_size(3)
        .max_connections(4)
        .build()
        .unwrap();
    assert_eq!((c.pool_connections(), c.connections_needed()), (3, 4));
    assert_eq!(ClientConfig::default().connections_needed(), 17);

    let t = test_db().await;
    // A worker pool needs 4: two held connections, one to spare, the coordination one.
    let err = Client::builder(t.dsn())
        .config(budget_config("small", 3))
        .service(holding_pool(0.1))
        .build()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("too few connections"), "{msg}");
    assert!(msg.contains("max_connections to at least 4"), "{msg}");
    // A handle whose pool exceeds the budget.
    let err = Client::builder(t.db.clone())
        .config(budget_config("shared", 4))
        .build()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err}");
    assert!(err.to_string().contains("max_connections 4"), "{err}");

    // The CLI: exit 2 with the message, at once.
    for args in [
        vec!["serve", "--max-connections", "2"],
        vec!["serve", "--max-connections", "3", "--queues", "q"],
    ] {
        let out = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::process::Command::new(crate::common::pgcrew_bin())
                .args(&args)
                .env("DATABASE_URL", t.dsn())
                .output(),
        )
        .await
        .expect("the CLI answers at once")
        .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("max_connections"), "{args:?}: {stderr}");
    }
}

#[tokio::test]
async fn renewal_blocked_on_the_leader_row_does_not_hold_up_heartbeats() {
    let t = test_db().await;
    let app = "budget-blocked";
    let client = budget_client(&t, app, "blocked", None).await;
    start_leader(&client, Duration::from_secs(5)).await;
    // Hold the leader row as a long maintenance step would (FOR SHARE): every renewal waits on
    // it. The heartbeats share the renewals' connection and must still get through.
    let mut holder = t.db.get().await.unwrap();
    let tx = holder.transaction().await.unwrap();
    lock_leader_row(&tx, "FOR SHARE").await;
    let observer = t.db.get().await.unwrap();
    let samples = samples_for(&observer, "blocked", app, Duration::from_secs(3), 100).await;
    tx.rollback().await.unwrap();
    assert_alive_within_budget(&samples, "while a renewal waited on the leader row");
    // Nor did the wait cost the LISTEN connection (a liveness ping stuck behind the renewal
    // would have made the notifier drop it and open another).
    assert_eq!(client.notifier().reconnects(), 0);
    // Renewals go through again once the row is free.
    wait_leader(&client, Duration::from_secs(5)).await;
    client.stop().await.unwrap();
}
