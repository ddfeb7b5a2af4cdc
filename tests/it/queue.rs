//! Task queue: enqueue, claim, acks, worker pool, limits, fairness, crash recovery.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::time::Duration;

use pgcrew::queue::{
    self, Ack, AckOutcome, NewTask, Priority, RetryPolicy, TaskOutcome, TaskState, WorkerPool,
};
use pgcrew::{ClaimToken, Client, ClientConfig, Error, InstanceId, TaskId, TenantId};
use serde::{Deserialize, Serialize};

use crate::common::{TestDb, eventually, pgcrew_bin, test_db};

fn config(id: &str) -> ClientConfig {
    ClientConfig::builder()
        .instance_id(InstanceId::new(id).unwrap())
        .heartbeat_interval(Duration::from_millis(200))
        .instance_ttl(Duration::from_secs(2))
        .leader_ttl(Duration::from_secs(1))
        .maintenance_interval(Duration::from_millis(200))
        .notify_poll_interval(Duration::from_secs(1))
        .task_heartbeat_timeout(Duration::from_secs(2))
        .pool_size(6)
        .build()
        .unwrap()
}

async fn start_client(t: &TestDb, id: &str, pool: Option<Arc<WorkerPool>>, leader: bool) -> Client {
    let mut cfg = config(id);
    cfg.leader_election = leader;
    let mut b = Client::builder(t.dsn()).config(cfg);
    if let Some(p) = pool {
        b = b.service(p);
    }
    let c = b.build().await.unwrap();
    c.start().await.unwrap();
    c
}

async fn scalar(t: &TestDb, sql: &str) -> i64 {
    let conn = t.db.get().await.unwrap();
    conn.query_one(sql, &[]).await.unwrap().get(0)
}

async fn state_of(t: &TestDb, id: TaskId) -> TaskState {
    let conn = t.db.get().await.unwrap();
    queue::get(&**conn, id).await.unwrap().state
}

async fn register(t: &TestDb, id: &str) -> InstanceId {
    let conn = t.db.get().await.unwrap();
    conn.execute(
        "INSERT INTO pgcrew.instances (id, hostname, pid, version) VALUES ($1, 'test', 1, 'test')",
        &[&id],
    )
    .await
    .unwrap();
    InstanceId::new(id).unwrap()
}

/// A connection of its own listening on `pgcrew_task_available`, to see every wake-up NOTIFY
/// whatever the pools do: (client, connection driver, notifications).
async fn listen_task_available(
    t: &TestDb,
) -> (
    tokio_postgres::Client,
    tokio::task::JoinHandle<()>,
    tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::AsyncMessage>,
) {
    let (listener, driver, notes) = pgcrew::Db::connect_dedicated(t.db.config()).await.unwrap();
    listener
        .batch_execute("LISTEN pgcrew_task_available")
        .await
        .unwrap();
    (listener, driver, notes)
}

fn task(kind: &str) -> NewTask {
    NewTask::new(kind, &serde_json::json!({})).unwrap()
}

async fn create_tenant(t: &TestDb, id: &str, limit: Option<i32>) -> TenantId {
    let conn = t.db.get().await.unwrap();
    conn.execute(
        "INSERT INTO pgcrew.tenants (id, max_concurrent_tasks) VALUES ($1, $2)",
        &[&id, &limit],
    )
    .await
    .unwrap();
    TenantId::new(id).unwrap()
}

fn q(name: &str) -> Vec<String> {
    vec![name.to_string()]
}

/// Run `pgcrew bench <args> --json` on the test database's server: its JSON report and stderr.
pub(crate) async fn run_bench(t: &TestDb, args: &[&str]) -> (serde_json::Value, String) {
    let mut argv = vec!["bench".to_string()];
    argv.extend(args.iter().map(|a| a.to_string()));
    argv.push("--json".into());
    let dsn = t.dsn().to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(pgcrew_bin())
            .args(&argv)
            .env("DATABASE_URL", dsn)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    (serde_json::from_slice(&out.stdout).unwrap(), stderr)
}

/// The scratch database a bench named on stderr no longer exists.
pub(crate) async fn assert_bench_database_dropped(t: &TestDb, stderr: &str) {
    let name = stderr
        .lines()
        .find_map(|l| l.strip_prefix("benchmark database: "))
        .expect("the bench names its database")
        .trim()
        .to_string();
    assert_eq!(
        scalar(
            t,
            &format!("SELECT count(*) FROM pg_database WHERE datname = '{name}'")
        )
        .await,
        0,
        "the benchmark database {name} was not dropped"
    );
}

#[tokio::test]
async fn claim_and_ack_with_stale_token_rejected() {
    let t = test_db().await;
    let me = register(&t, "w1").await;
    let conn = t.db.get().await.unwrap();
    let e = queue::enqueue(&**conn, &task("k").queue("q1"))
        .await
        .unwrap();
    assert_eq!(e.state, TaskState::Available);
    assert!(!e.duplicate);
    let claimed = queue::claim(&**conn, &q("q1"), 10, &me).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].id, e.id);
    assert_eq!(claimed[0].attempt, 1);
    assert!(
        queue::claim(&**conn, &q("q1"), 10, &me)
            .await
            .unwrap()
            .is_empty()
    );

    // A wrong token is rejected and changes nothing.
    let bad = Ack {
        id: e.id,
        token: ClaimToken::new(),
        outcome: AckOutcome::Complete,
    };
    let rep = queue::ack(&**conn, std::slice::from_ref(&bad))
        .await
        .unwrap();
    assert_eq!(rep.stale, vec![e.id]);
    assert!(rep.applied.is_empty());
    assert_eq!(state_of(&t, e.id).await, TaskState::Running);

    let good = Ack {
        id: e.id,
        token: claimed[0].token,
        outcome: AckOutcome::Complete,
    };
    let rep = queue::ack(&**conn, std::slice::from_ref(&good))
        .await
        .unwrap();
    assert_eq!(rep.applied, vec![(e.id, TaskState::Completed)]);
    // Acking again (e.g. a duplicate after a retry) is stale too.
    let rep = queue::ack(&**conn, &[good]).await.unwrap();
    assert_eq!(rep.stale, vec![e.id]);
    assert_eq!(state_of(&t, e.id).await, TaskState::Completed);
}

#[tokio::test]
async fn rescued_task_rejects_the_old_claims_ack() {
    let t = test_db().await;
    // Maintenance only when asked (the background pass runs hourly).
    let mut cfg = config("leader");
    cfg.maintenance_interval = Duration::from_secs(3600);
    let leader = Client::builder(t.dsn()).config(cfg).build().await.unwrap();
    leader.start().await.unwrap();
    assert!(eventually(Duration::from_secs(5), || async { leader.is_leader() }).await);
    let conn = t.db.get().await.unwrap();
    let e = queue::enqueue(&**conn, &task("k")).await.unwrap();
    // Claimed by an instance that is not registered: maintenance rescues it.
    let ghost = InstanceId::new("ghost").unwrap();
    let first = queue::claim(&**conn, &q("default"), 1, &ghost)
        .await
        .unwrap();
    assert_eq!(first.len(), 1);
    let report = leader.run_maintenance().await.unwrap();
    assert!(report.count("rescue_tasks") <= 1);
    let row = queue::get(&**conn, e.id).await.unwrap();
    assert_eq!(row.state, TaskState::Retryable);
    assert!(row.last_error.unwrap().contains("rescued"));
    // Reclaimed by a live instance; the ghost's late ack is rejected, the new one applies.
    let live = queue::claim(&**conn, &q("default"), 1, leader.instance_id())
        .await
        .unwrap();
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].attempt, 2);
    let stale = queue::ack(
        &**conn,
        &[Ack {
            id: e.id,
            token: first[0].token,
            outcome: AckOutcome::Complete,
        }],
    )
    .await
    .unwrap();
    assert_eq!(stale.stale, vec![e.id]);
    assert_eq!(state_of(&t, e.id).await, TaskState::Running);
    let ok = queue::ack(
        &**conn,
        &[Ack {
            id: e.id,
            token: live[0].token,
            outcome: AckOutcome::Complete,
        }],
    )
    .await
    .unwrap();
    assert_eq!(ok.applied, vec![(e.id, TaskState::Completed)]);

    // A live instance whose heartbeat on a task went stale loses it too; out of attempts, the
    // task is discarded with the reason kept.
    let last = queue::enqueue(&**conn, &task("k").max_attempts(1))
        .await
        .unwrap();
    let c = queue::claim(&**conn, &q("default"), 1, leader.instance_id())
        .await
        .unwrap();
    assert_eq!(c[0].id, last.id);
    let fresh = leader.run_maintenance().await.unwrap();
    assert_eq!(
        fresh.count("rescue_tasks"),
        0,
        "a fresh heartbeat was rescued"
    );
    assert_eq!(state_of(&t, last.id).await, TaskState::Running);
    conn.execute(
        "UPDATE pgcrew.tasks SET heartbeat_at = now() - interval '1 hour' WHERE id = $1",
        &[&last.id],
    )
    .await
    .unwrap();
    let report = leader.run_maintenance().await.unwrap();
    assert!(report.count("rescue_tasks") <= 1);
    let row = queue::get(&**conn, last.id).await.unwrap();
    assert_eq!(row.state, TaskState::Discarded);
    assert!(row.last_error.unwrap().contains("rescued"));
    leader.stop().await.unwrap();
}

#[tokio::test]
async fn stop_drains_in_flight_tasks_and_flushes_acks() {
    let t = test_db().await;
    let pool = WorkerPool::builder()
        .concurrency(4)
        .prefetch(4)
        .handler("slow", |_ctx, _p: serde_json::Value| async move {
            tokio::time::sleep(Duration::from_millis(400)).await;
            Ok(TaskOutcome::Complete)
        })
        .build()
        .unwrap();
    let client = start_client(&t, "drainer", Some(pool.clone()), false).await;
    let conn = t.db.get().await.unwrap();
    queue::enqueue_many(&**conn, &(0..8).map(|_| task("slow")).collect::<Vec<_>>())
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            scalar(
                &t,
                "SELECT count(*) FROM pgcrew.tasks WHERE state = 'running'",
            )
            .await
                == 8
        })
        .await,
        "the pool did not claim and prefetch the tasks"
    );
    client.stop().await.unwrap();
    // Everything it held ran to completion and was acknowledged before stop returned.
    assert_eq!(
        scalar(
            &t,
            "SELECT count(*) FROM pgcrew.tasks WHERE state = 'completed'"
        )
        .await,
        8
    );
    let m = pool.metrics().snapshot();
    assert_eq!((m.executed, m.succeeded, m.in_flight), (8, 8, 0));
    assert!(m.queue_lag_ms >= 0.0 && m.throughput_per_sec > 0.0);
}

#[tokio::test]
async fn transactional_enqueue_rolls_back_with_the_caller() {
    let t = test_db().await;
    let mut conn = t.db.get().await.unwrap();
    {
        let tx = conn.transaction().await.unwrap();
        queue::enqueue(&*tx, &task("k")).await.unwrap();
        queue::enqueue_many(&*tx, &[task("k"), task("k")])
            .await
            .unwrap();
        tx.rollback().await.unwrap();
    }
    assert_eq!(scalar(&t, "SELECT count(*) FROM pgcrew.tasks").await, 0);
    {
        let tx = conn.transaction().await.unwrap();
        queue::enqueue(&*tx, &task("k")).await.unwrap();
        tx.commit().await.unwrap();
    }
    assert_eq!(scalar(&t, "SELECT count(*) FROM pgcrew.tasks").await, 1);
}

/// Every kind of `db::Executor` enqueues; pooled connections and transactions prepare each
/// statement once per connection and reuse it; transactions still decide whether tasks exist;
/// input errors keep their meaning on the cached path.
#[tokio::test]
async fn enqueue_runs_on_every_executor_and_pooled_ones_cache_the_statement() {
    let t = test_db().await;
    let count = |kind: &'static str| {
        let sql = format!("SELECT count(*) FROM pgcrew.tasks WHERE kind = '{kind}'");
        let t = &t;
        async move { scalar(t, &sql).await }
    };

    // A plain tokio-postgres client and transaction (no cache).
    let cfg = pgcrew::db::parse_dsn(t.dsn()).unwrap();
    let (mut plain, driver) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
    let driver = tokio::spawn(driver);
    queue::enqueue(&plain, &task("plain")).await.unwrap();
    queue::enqueue_many(&plain, &[task("plain"), task("plain")])
        .await
        .unwrap();
    let tx = plain.transaction().await.unwrap();
    queue::enqueue(&tx, &task("plain_tx")).await.unwrap();
    tx.rollback().await.unwrap();
    let tx = plain.transaction().await.unwrap();
    queue::enqueue(&tx, &task("plain_tx")).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(count("plain").await, 3);
    assert_eq!(count("plain_tx").await, 1);
    drop(plain);
    let _ = driver.await;

    // A pooled connection: one cached statement per distinct SQL, reused on later calls.
    let mut conn = t.db.get().await.unwrap();
    conn.statement_cache.clear();
    queue::enqueue(&conn, &task("pooled")).await.unwrap();
    assert_eq!(conn.statement_cache.size(), 1, "simple enqueue is cached");
    queue::enqueue(&conn, &task("pooled")).await.unwrap();
    queue::enqueue(&*conn, &task("pooled")).await.unwrap();
    assert_eq!(
        conn.statement_cache.size(),
        1,
        "the same statement is reused"
    );
    let keyed = task("pooled").unique_key("k1");
    let first = queue::enqueue(&conn, &keyed).await.unwrap();
    let again = queue::enqueue(&conn, &keyed).await.unwrap();
    assert!(!first.duplicate && again.duplicate && again.id == first.id);
    assert_eq!(
        conn.statement_cache.size(),
        2,
        "the unique-key statement is cached too"
    );
    queue::enqueue_many(&conn, &[task("pooled"), task("pooled")])
        .await
        .unwrap();
    assert_eq!(conn.statement_cache.size(), 3);
    assert_eq!(count("pooled").await, 6);

    // Errors on the cached path are the same actionable input errors.
    let err = queue::enqueue(
        &conn,
        &task("pooled").tenant(TenantId::new("nobody").unwrap()),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidInput { field, message } if *field == "tenant" && message.contains("nobody")),
        "{err}"
    );
    let err = queue::enqueue(&conn, &task("pooled").depends_on([TaskId(i64::MAX)]))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidInput { field, .. } if *field == "depends_on"),
        "{err}"
    );
    // The connection is still usable after those errors.
    queue::enqueue(&conn, &task("pooled")).await.unwrap();
    assert_eq!(count("pooled").await, 7);

    // A pooled transaction: cached on its connection, and rolled back means no task.
    let before = conn.statement_cache.size();
    {
        let tx = conn.transaction().await.unwrap();
        queue::enqueue(&tx, &task("pooled_tx")).await.unwrap();
        queue::enqueue_many(&tx, &[task("pooled_tx")])
            .await
            .unwrap();
        tx.rollback().await.unwrap();
    }
    assert_eq!(count("pooled_tx").await, 0);
    {
        let tx = conn.transaction().await.unwrap();
        queue::enqueue(&tx, &task("pooled_tx")).await.unwrap();
        tx.commit().await.unwrap();
    }
    assert_eq!(count("pooled_tx").await, 1);
    assert_eq!(
        conn.statement_cache.size(),
        before,
        "the transaction reused the cache"
    );
    drop(conn);

    // The Client's own entry points.
    let client = Client::builder(t.db.clone())
        .config(config("exec-client"))
        .build()
        .await
        .unwrap();
    let e = client.enqueue(&task("via_client")).await.unwrap();
    assert_eq!(e.state, TaskState::Available);
    let ids = client
        .enqueue_many(&[task("via_client"), task("via_client")])
        .await
        .unwrap();
    assert_eq!(ids.len(), 2);
    assert_eq!(count("via_client").await, 3);
}

#[tokio::test]
async fn invalid_input_is_rejected_and_nothing_is_stored() {
    let t = test_db().await;
    let conn = t.db.get().await.unwrap();
    let big = NewTask::new("k", &"x".repeat(queue::MAX_PAYLOAD_BYTES + 10)).unwrap();
    let err = queue::enqueue(&**conn, &big).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidInput {
                field: "payload",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("at most"), "{err}");
    let err = queue::enqueue_many(&**conn, &[task("k"), big])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("task #1"), "{err}");
    let err = queue::enqueue(&**conn, &task("k").depends_on([TaskId(424242)]))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidInput {
                field: "depends_on",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("424242"), "{err}");
    let err = queue::enqueue(&**conn, &task("k").tenant(TenantId::new("nobody").unwrap()))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidInput {
                field: "tenant",
                ..
            }
        ),
        "{err}"
    );
    let err = queue::enqueue_many(
        &**conn,
        &[
            task("k"),
            task("k").tenant(TenantId::new("nobody").unwrap()),
        ],
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidInput {
                field: "tenant",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(scalar(&t, "SELECT count(*) FROM pgcrew.tasks").await, 0);
    // A tenant with tasks cannot be deleted from under them.
    let gone = create_tenant(&t, "gone", None).await;
    queue::enqueue(&**conn, &task("k").tenant(gone))
        .await
        .unwrap();
    let del = conn
        .execute("DELETE FROM pgcrew.tenants WHERE id = 'gone'", &[])
        .await
        .unwrap_err();
    assert_eq!(del.code().map(|c| c.code()), Some("23503"), "{del}");
}

#[tokio::test]
async fn unique_keys_dedupe_among_unfinished_tasks() {
    let t = test_db().await;
    let me = register(&t, "w").await;
    let conn = t.db.get().await.unwrap();
    let a = queue::enqueue(&**conn, &task("k").unique_key("u1"))
        .await
        .unwrap();
    let b = queue::enqueue(&**conn, &task("k").unique_key("u1"))
        .await
        .unwrap();
    assert!(!a.duplicate);
    assert!(b.duplicate);
    assert_eq!(a.id, b.id);
    // Other tenant or other queue: not a duplicate.
    let other = create_tenant(&t, "other", None).await;
    let c = queue::enqueue(&**conn, &task("k").unique_key("u1").tenant(other))
        .await
        .unwrap();
    assert!(!c.duplicate);
    // Bulk: duplicates (with existing rows and within the batch) are skipped.
    let ids = queue::enqueue_many(
        &**conn,
        &[
            task("k").unique_key("u1"),
            task("k").unique_key("u2"),
            task("k").unique_key("u2"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(ids.len(), 1);
    // Once the task is finished, the key is free again.
    let claimed = queue::claim(&**conn, &q("default"), 10, &me).await.unwrap();
    let acks: Vec<Ack> = claimed
        .iter()
        .map(|c| c.ack(AckOutcome::Complete))
        .collect();
    queue::ack(&**conn, &acks).await.unwrap();
    let d = queue::enqueue(&**conn, &task("k").unique_key("u1"))
        .await
        .unwrap();
    assert!(!d.duplicate);
    assert_ne!(d.id, a.id);
}

#[tokio::test]
async fn priorities_are_claimed_in_order() {
    let t = test_db().await;
    let me = register(&t, "w").await;
    let conn = t.db.get().await.unwrap();
    let order = [
        Priority::Batch,
        Priority::Low,
        Priority::Normal,
        Priority::High,
        Priority::Critical,
    ];
    let mut by_prio = HashMap::new();
    for p in order {
        let e = queue::enqueue(&**conn, &task("k").priority(p))
            .await
            .unwrap();
        by_prio.insert(e.id, p);
    }
    let mut got = Vec::new();
    for _ in 0..5 {
        let c = queue::claim(&**conn, &q("default"), 1, &me).await.unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].priority, by_prio[&c[0].id]);
        got.push(c[0].priority);
    }
    assert_eq!(
        got,
        vec![
            Priority::Critical,
            Priority::High,
            Priority::Normal,
            Priority::Low,
            Priority::Batch
        ]
    );

    // One claim of several tasks hands them over in execution order too.
    for p in order {
        queue::enqueue(&**conn, &task("k").priority(p))
            .await
            .unwrap();
    }
    let batch = queue::claim(&**conn, &q("default"), 10, &me).await.unwrap();
    let prios: Vec<Priority> = batch.iter().map(|c| c.priority).collect();
    assert_eq!(prios, got, "a batch is returned in priority order");

    // A delayed task that has come due competes by priority with the available ones: the claim
    // promotes it before taking any of them (the single-statement path must not claim around
    // it).
    let urgent = queue::enqueue(
        &**conn,
        &task("k")
            .priority(Priority::Critical)
            .delay(Duration::from_millis(300)),
    )
    .await
    .unwrap();
    for _ in 0..3 {
        queue::enqueue(&**conn, &task("k").priority(Priority::Batch))
            .await
            .unwrap();
    }
    let due = format!(
        "SELECT count(*) FROM pgcrew.tasks WHERE id = {} AND run_at <= now()",
        urgent.id.0
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            scalar(&t, &due).await == 1
        })
        .await
    );
    let c = queue::claim(&**conn, &q("default"), 1, &me).await.unwrap();
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].id, urgent.id, "the due critical task comes first");
}

#[tokio::test]
async fn delayed_tasks_wait_for_database_time() {
    let t = test_db().await;
    let me = register(&t, "w").await;
    let conn = t.db.get().await.unwrap();
    // Taken before the enqueue: the claim cannot succeed until 600 ms of database time later.
    let before = std::time::Instant::now();
    let e = queue::enqueue(&**conn, &task("k").delay(Duration::from_millis(600)))
        .await
        .unwrap();
    assert_eq!(e.state, TaskState::Scheduled);
    assert!(
        queue::claim(&**conn, &q("default"), 10, &me)
            .await
            .unwrap()
            .is_empty()
    );
    let due = queue::next_due(&**conn, &q("default"))
        .await
        .unwrap()
        .unwrap();
    assert!(
        due > Duration::from_millis(100) && due <= Duration::from_millis(600),
        "{due:?}"
    );
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while got.is_empty() && std::time::Instant::now() < deadline {
        got = queue::claim(&**conn, &q("default"), 10, &me).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(got[0].id, e.id);
    assert!(before.elapsed() >= Duration::from_millis(590));
    // The row's run_at agrees with the delay measured on the database clock.
    let gap: f64 = conn
        .query_one(
            "SELECT extract(epoch FROM run_at - created_at)::float8 FROM pgcrew.tasks WHERE id = $1",
            &[&e.id],
        )
        .await
        .unwrap()
        .get(0);
    assert!((0.59..0.7).contains(&gap), "{gap}");
}

#[tokio::test]
async fn dependencies_gate_availability_and_failures_cancel_dependants() {
    let t = test_db().await;
    let me = register(&t, "w").await;
    let conn = t.db.get().await.unwrap();
    let a = queue::enqueue(&**conn, &task("a")).await.unwrap().id;
    let b = queue::enqueue(&**conn, &task("b")).await.unwrap().id;
    let child = queue::enqueue(&**conn, &task("child").depends_on([a, b]))
        .await
        .unwrap();
    assert_eq!(child.state, TaskState::Scheduled);
    let grandchild = queue::enqueue(&**conn, &task("gc").depends_on([child.id]))
        .await
        .unwrap();
    let claimed = queue::claim(&**conn, &q("default"), 10, &me).await.unwrap();
    let ids: HashSet<TaskId> = claimed.iter().map(|c| c.id).collect();
    assert_eq!(ids, HashSet::from([a, b]));
    let tok: HashMap<TaskId, ClaimToken> = claimed.iter().map(|c| (c.id, c.token)).collect();
    let done = |id: TaskId| Ack {
        id,
        token: tok[&id],
        outcome: AckOutcome::Complete,
    };
    queue::ack(&**conn, &[done(a)]).await.unwrap();
    assert!(
        queue::claim(&**conn, &q("default"), 10, &me)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(state_of(&t, child.id).await, TaskState::Scheduled);
    queue::ack(&**conn, &[done(b)]).await.unwrap();
    let next = queue::claim(&**conn, &q("default"), 10, &me).await.unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].id, child.id);
    // The child is discarded: the grandchild is cancelled with a reason.
    queue::ack(
        &**conn,
        &[Ack {
            id: child.id,
            token: next[0].token,
            outcome: AckOutcome::Discard {
                error: "boom".into(),
            },
        }],
    )
    .await
    .unwrap();
    assert_eq!(state_of(&t, child.id).await, TaskState::Discarded);
    let gc = queue::get(&**conn, grandchild.id).await.unwrap();
    assert_eq!(gc.state, TaskState::Cancelled);
    assert!(gc.last_error.unwrap().contains("dependency"));
    // A new dependant of a discarded task is cancelled at once.
    let late = queue::enqueue(&**conn, &task("late").depends_on([child.id]))
        .await
        .unwrap();
    assert_eq!(late.state, TaskState::Cancelled);
    // Depending on a completed task: available at once.
    let after_done = queue::enqueue(&**conn, &task("x").depends_on([a]))
        .await
        .unwrap();
    assert_eq!(after_done.state, TaskState::Available);
}

#[tokio::test]
async fn failures_back_off_then_discard_with_errors_kept_and_snooze_keeps_attempts() {
    let t = test_db().await;
    let me = register(&t, "w").await;
    let conn = t.db.get().await.unwrap();
    let e = queue::enqueue(&**conn, &task("k").max_attempts(2))
        .await
        .unwrap();
    let c = queue::claim(&**conn, &q("default"), 1, &me).await.unwrap();
    let rep = queue::ack(
        &**conn,
        &[Ack {
            id: e.id,
            token: c[0].token,
            outcome: AckOutcome::Fail {
                error: "first".into(),
                retry_in: Duration::from_secs(30),
            },
        }],
    )
    .await
    .unwrap();
    assert_eq!(rep.applied, vec![(e.id, TaskState::Retryable)]);
    let wait: f64 = conn
        .query_one(
            "SELECT extract(epoch FROM run_at - now())::float8 FROM pgcrew.tasks WHERE id = $1",
            &[&e.id],
        )
        .await
        .unwrap()
        .get(0);
    assert!((28.0..=30.0).contains(&wait), "{wait}");
    assert!(
        queue::claim(&**conn, &q("default"), 1, &me)
            .await
            .unwrap()
            .is_empty()
    );
    conn.execute(
        "UPDATE pgcrew.tasks SET run_at = now() WHERE id = $1",
        &[&e.id],
    )
    .await
    .unwrap();
    let c = queue::claim(&**conn, &q("default"), 1, &me).await.unwrap();
    assert_eq!(c[0].attempt, 2);
    // Snooze gives the attempt back.
    queue::ack(
        &**conn,
        &[Ack {
            id: e.id,
            token: c[0].token,
            outcome: AckOutcome::Snooze(Duration::ZERO),
        }],
    )
    .await
    .unwrap();
    let row = queue::get(&**conn, e.id).await.unwrap();
    assert_eq!((row.state, row.attempts), (TaskState::Scheduled, 1));
    let c = queue::claim(&**conn, &q("default"), 1, &me).await.unwrap();
    assert_eq!(c[0].attempt, 2);
    let rep = queue::ack(
        &**conn,
        &[Ack {
            id: e.id,
            token: c[0].token,
            outcome: AckOutcome::Fail {
                error: "second".into(),
                retry_in: Duration::from_secs(1),
            },
        }],
    )
    .await
    .unwrap();
    assert_eq!(rep.applied, vec![(e.id, TaskState::Discarded)]);
    let row = queue::get(&**conn, e.id).await.unwrap();
    let errors: Vec<String> = row
        .errors
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["error"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(errors, vec!["first", "second"]);
    assert!(row.finalized_at.is_some());
}

#[derive(Debug, Serialize, Deserialize)]
struct Flaky {
    fail_times: i32,
}

/// Cancelling a running task reaches its handler through `pgcrew_task_cancel_requested`, not
/// at the pool's next heartbeat: with a 10-minute heartbeat interval the token still fires.
/// A repeated request is not announced again.
#[tokio::test]
async fn running_task_cancellation_is_announced_not_left_to_the_heartbeat() {
    let t = test_db().await;
    let seen = Arc::new(AtomicBool::new(false));
    let seen_in = seen.clone();
    let pool = WorkerPool::builder()
        .queue("cancel_me")
        .heartbeat_interval(Duration::from_secs(600))
        .handler("wait", move |ctx, _p: serde_json::Value| {
            let seen = seen_in.clone();
            async move {
                let cancel = ctx.cancel.clone();
                tokio::spawn(async move {
                    cancel.cancelled().await;
                    seen.store(true, Ordering::SeqCst);
                });
                tokio::time::sleep(Duration::from_secs(600)).await;
                Ok(TaskOutcome::Complete)
            }
        })
        .build()
        .unwrap();
    let client = start_client(&t, "canceller", Some(pool.clone()), false).await;
    let mut announcements = client.subscribe(&[pgcrew::EventKind::TaskCancelRequested]);
    let conn = t.db.get().await.unwrap();
    let id = queue::enqueue(&conn, &task("wait").queue("cancel_me").max_attempts(1))
        .await
        .unwrap()
        .id;
    assert!(
        eventually(Duration::from_secs(10), || async {
            state_of(&t, id).await == TaskState::Running
        })
        .await
    );
    assert_eq!(
        queue::cancel(&**conn, id).await.unwrap(),
        TaskState::Running
    );
    assert_eq!(
        queue::cancel(&**conn, id).await.unwrap(),
        TaskState::Running
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            state_of(&t, id).await == TaskState::Cancelled
        })
        .await,
        "the cancellation did not reach the handler before the (10-minute) heartbeat"
    );
    assert!(seen.load(Ordering::SeqCst));
    let ev = tokio::time::timeout(Duration::from_secs(5), announcements.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        ev,
        pgcrew::Event::TaskCancelRequested {
            task_id: id,
            instance_id: Some("canceller".into())
        }
    );
    // The second request found the flag already set: no second announcement.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), announcements.recv())
            .await
            .is_err()
    );
    client.stop().await.unwrap();
}

#[tokio::test]
async fn worker_pool_retries_with_backoff_times_out_and_cancels() {
    let t = test_db().await;
    let cancelled_seen = Arc::new(AtomicBool::new(false));
    let seen = cancelled_seen.clone();
    let pool = WorkerPool::builder()
        .concurrency(4)
        .heartbeat_interval(Duration::from_millis(100))
        .poll_interval(Duration::from_millis(200))
        .retry_policy(RetryPolicy {
            base: Duration::from_millis(100),
            factor: 2.0,
            max: Duration::from_secs(1),
            jitter: 0.0,
        })
        .handler("flaky", |ctx, p: Flaky| async move {
            if ctx.attempt <= p.fail_times {
                return Err(format!("attempt {} failed", ctx.attempt).into());
            }
            Ok(TaskOutcome::Complete)
        })
        .handler("slow", |ctx, _p: serde_json::Value| async move {
            if ctx.attempt == 1 {
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
            Ok(TaskOutcome::Complete)
        })
        .handler("forever", move |ctx, _p: serde_json::Value| {
            let seen = seen.clone();
            async move {
                let cancel = ctx.cancel.clone();
                tokio::spawn(async move {
                    cancel.cancelled().await;
                    seen.store(true, Ordering::SeqCst);
                });
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok(TaskOutcome::Complete)
            }
        })
        .handler("panics", |_ctx, _p: serde_json::Value| async move {
            if fastrand::u8(..) < 255 {
                panic!("handler bug");
            }
            Ok(TaskOutcome::Complete)
        })
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let client = start_client(&t, "pool", Some(pool.clone()), false).await;
    let conn = t.db.get().await.unwrap();
    // Before the enqueue: the idle pool may start the first attempt at once.
    let t0 = std::time::Instant::now();
    let flaky = queue::enqueue(
        &**conn,
        &NewTask::new("flaky", &Flaky { fail_times: 2 }).unwrap(),
    )
    .await
    .unwrap()
    .id;
    let slow = queue::enqueue(&**conn, &task("slow")).await.unwrap().id;
    let panics = queue::enqueue(&**conn, &task("panics").max_attempts(1))
        .await
        .unwrap()
        .id;
    let unknown = queue::enqueue(&**conn, &task("nobody-handles-this").max_attempts(1))
        .await
        .unwrap()
        .id;
    let bad_payload = queue::enqueue(
        &**conn,
        &NewTask::new("flaky", &serde_json::json!({"wrong": true})).unwrap(),
    )
    .await
    .unwrap()
    .id;
    assert!(
        eventually(Duration::from_secs(10), || async {
            state_of(&t, flaky).await == TaskState::Completed
        })
        .await
    );
    // Two failures with 100 ms then 200 ms backoff.
    assert!(t0.elapsed() >= Duration::from_millis(300));
    let row = queue::get(&**conn, flaky).await.unwrap();
    assert_eq!(row.attempts, 3);
    assert_eq!(row.errors.as_array().unwrap().len(), 2);
    assert!(
        eventually(Duration::from_secs(10), || async {
            state_of(&t, slow).await == TaskState::Completed
        })
        .await
    );
    let row = queue::get(&**conn, slow).await.unwrap();
    assert!(
        row.errors[0]["error"]
            .as_str()
            .unwrap()
            .contains("timed out")
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            state_of(&t, panics).await == TaskState::Discarded
                && state_of(&t, unknown).await == TaskState::Discarded
                && state_of(&t, bad_payload).await == TaskState::Discarded
        })
        .await
    );
    let p = queue::get(&**conn, panics).await.unwrap();
    assert!(p.last_error.unwrap().contains("handler bug"));
    let u = queue::get(&**conn, unknown).await.unwrap();
    assert!(u.last_error.unwrap().contains("no handler"));
    let b = queue::get(&**conn, bad_payload).await.unwrap();
    assert!(b.last_error.unwrap().contains("payload"));

    // Cancel a running task: the handler's token fires and the task ends cancelled. The
    // pool-wide timeout (500 ms) is longer than the cancel path (heartbeat 100 ms).
    let forever = queue::enqueue(&**conn, &task("forever").max_attempts(1))
        .await
        .unwrap()
        .id;
    assert!(
        eventually(Duration::from_secs(5), || async {
            state_of(&t, forever).await == TaskState::Running
        })
        .await
    );
    assert_eq!(
        queue::cancel(&**conn, forever).await.unwrap(),
        TaskState::Running
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            state_of(&t, forever).await == TaskState::Cancelled
        })
        .await
    );
    assert!(cancelled_seen.load(Ordering::SeqCst));
    let row = queue::get(&**conn, forever).await.unwrap();
    assert!(
        row.last_error.unwrap().contains("cancelled"),
        "{:?}",
        row.errors
    );
    // Cancelling a finished task is an illegal transition; retry brings it back.
    assert!(matches!(
        queue::cancel(&**conn, forever).await,
        Err(Error::IllegalTransition { .. })
    ));
    let m = pool.metrics().snapshot();
    assert!(
        m.executed >= 8 && m.failed >= 5 && m.succeeded >= 2,
        "{m:?}"
    );
    client.stop().await.unwrap();
    // Not-started tasks cancel at once; retry makes them available again.
    let idle = queue::enqueue(&**conn, &task("flaky")).await.unwrap().id;
    assert_eq!(
        queue::cancel(&**conn, idle).await.unwrap(),
        TaskState::Cancelled
    );
    assert_eq!(
        queue::retry(&**conn, idle).await.unwrap(),
        TaskState::Available
    );
    assert!(matches!(
        queue::retry(&**conn, TaskId(999_999)).await,
        Err(Error::NotFound { .. })
    ));
}

#[tokio::test]
async fn tenant_limit_holds_under_16_concurrent_claimers() {
    let t = test_db().await;
    let limited = create_tenant(&t, "limited", Some(3)).await;
    let free = create_tenant(&t, "free", None).await;
    let conn = t.db.get().await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..600 {
        let tn = if i % 3 == 0 {
            free.clone()
        } else {
            limited.clone()
        };
        tasks.push(task("k").tenant(tn));
    }
    queue::enqueue_many(&**conn, &tasks).await.unwrap();
    let me = register(&t, "claimers").await;
    let done = Arc::new(AtomicBool::new(false));
    let local_max = Arc::new(AtomicI64::new(0));
    let local_now = Arc::new(AtomicI64::new(0));
    let mut handles = Vec::new();
    for _ in 0..16 {
        let db = t.db.clone();
        let me = me.clone();
        let (local_max, local_now) = (local_max.clone(), local_now.clone());
        handles.push(tokio::spawn(async move {
            let conn = db.get().await.unwrap();
            let mut idle = 0;
            while idle < 20 {
                let c = queue::claim(&**conn, &q("default"), 4, &me).await.unwrap();
                if c.is_empty() {
                    idle += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                idle = 0;
                let n_lim = c.iter().filter(|x| x.tenant == "limited").count() as i64;
                let now = local_now.fetch_add(n_lim, Ordering::SeqCst) + n_lim;
                local_max.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(2)).await;
                local_now.fetch_sub(n_lim, Ordering::SeqCst);
                let acks: Vec<Ack> = c.iter().map(|x| x.ack(AckOutcome::Complete)).collect();
                queue::ack(&**conn, &acks).await.unwrap();
            }
        }));
    }
    // Sample the database continuously while the claimers run.
    let sampler = {
        let db = t.db.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let conn = db.get().await.unwrap();
            let (mut max, mut samples) = (0i64, 0u64);
            while !done.load(Ordering::SeqCst) {
                let n: i64 = conn
                    .query_one(
                        "SELECT count(*) FROM pgcrew.tasks WHERE tenant_id = 'limited' AND state = 'running'",
                        &[],
                    )
                    .await
                    .unwrap()
                    .get(0);
                max = max.max(n);
                samples += 1;
            }
            (max, samples)
        })
    };
    for h in handles {
        h.await.unwrap();
    }
    done.store(true, Ordering::SeqCst);
    let (db_max, samples) = sampler.await.unwrap();
    assert!(samples > 50, "only {samples} samples");
    assert!(
        db_max <= 3,
        "database saw {db_max} running for a tenant limited to 3"
    );
    assert!(
        db_max >= 2,
        "the limit was never approached ({db_max}): test is not exercising it"
    );
    let lm = local_max.load(Ordering::SeqCst);
    assert!(lm <= 3, "claimers held {lm} limited tasks at once");
    assert_eq!(
        scalar(
            &t,
            "SELECT count(*) FROM pgcrew.tasks WHERE state <> 'completed'"
        )
        .await,
        0
    );

    // A per-queue limit on top: 1 at a time in queue `narrow`.
    queue::set_queue_limit(&**conn, &free, "narrow", 1)
        .await
        .unwrap();
    queue::enqueue_many(
        &**conn,
        &[
            task("k").tenant(free.clone()).queue("narrow"),
            task("k").tenant(free.clone()).queue("narrow"),
        ],
    )
    .await
    .unwrap();
    let c = queue::claim(&**conn, &q("narrow"), 10, &me).await.unwrap();
    assert_eq!(c.len(), 1);
    assert!(
        queue::claim(&**conn, &q("narrow"), 10, &me)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        queue::clear_queue_limit(&**conn, &free, "narrow")
            .await
            .unwrap()
    );
    assert_eq!(
        queue::claim(&**conn, &q("narrow"), 10, &me)
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn claiming_is_fair_across_tenants() {
    let t = test_db().await;
    let big = create_tenant(&t, "big", None).await;
    let small = create_tenant(&t, "small", None).await;
    let me = register(&t, "w").await;
    let conn = t.db.get().await.unwrap();
    // A backlog of a million tasks, written in one statement (enqueue_many is covered
    // elsewhere): older and higher priority than the small tenant's task.
    let seeded = conn
        .execute(
            "INSERT INTO pgcrew.tasks (queue, kind, tenant_id, priority, run_at) \
             SELECT 'default', 'k', $1, 1, now() - interval '1 hour' \
               FROM generate_series(1, 1000000)",
            &[&big.as_str()],
        )
        .await
        .unwrap();
    assert_eq!(seeded, 1_000_000);
    let single = queue::enqueue(&**conn, &task("k").tenant(small).priority(Priority::Low))
        .await
        .unwrap()
        .id;
    let c = queue::claim(&**conn, &q("default"), 10, &me).await.unwrap();
    assert_eq!(c.len(), 10);
    assert!(
        c.iter().any(|x| x.id == single),
        "the small tenant's task waited behind the backlog"
    );
    assert_eq!(c.iter().filter(|x| x.tenant == "big").count(), 9);
    // Even a claim of 1 alternates: the small tenant gets its turn within 2 claims.
    let s2 = queue::enqueue(&**conn, &task("k").tenant(TenantId::new("small").unwrap()))
        .await
        .unwrap()
        .id;
    let mut seen = false;
    for _ in 0..2 {
        let c = queue::claim(&**conn, &q("default"), 1, &me).await.unwrap();
        seen |= c.iter().any(|x| x.id == s2);
    }
    assert!(seen);
}

#[tokio::test]
async fn exactly_once_100k_tasks_16_claimers_across_instances() {
    let t = test_db().await;
    {
        let conn = t.db.get().await.unwrap();
        conn.batch_execute("CREATE TABLE effects (task_id bigint NOT NULL)")
            .await
            .unwrap();
        let tasks: Vec<NewTask> = (0..100_000).map(|_| task("effect")).collect();
        for chunk in tasks.chunks(10_000) {
            queue::enqueue_many(&**conn, chunk).await.unwrap();
        }
    }
    let mut clients = Vec::new();
    for i in 0..16 {
        let pool = WorkerPool::builder()
            .concurrency(2)
            .prefetch(30)
            .handler("effect", |ctx, _p: serde_json::Value| async move {
                let conn = ctx.client.db().get().await?;
                conn.execute("INSERT INTO effects VALUES ($1)", &[&ctx.id])
                    .await?;
                Ok(TaskOutcome::Complete)
            })
            .build()
            .unwrap();
        clients.push(start_client(&t, &format!("worker-{i}"), Some(pool), i == 0).await);
    }
    assert!(
        eventually(Duration::from_secs(150), || async {
            scalar(
                &t,
                "SELECT count(*) FROM pgcrew.tasks WHERE state = 'completed'",
            )
            .await
                == 100_000
        })
        .await,
        "not all tasks completed"
    );
    for c in &clients {
        c.stop().await.unwrap();
    }
    assert_eq!(scalar(&t, "SELECT count(*) FROM effects").await, 100_000);
    assert_eq!(
        scalar(&t, "SELECT count(DISTINCT task_id) FROM effects").await,
        100_000
    );
    assert_eq!(
        scalar(
            &t,
            "SELECT count(*) FROM pgcrew.tasks WHERE state <> 'completed'"
        )
        .await,
        0
    );
    assert_eq!(
        scalar(&t, "SELECT count(*) FROM pgcrew.tasks WHERE attempts <> 1").await,
        0
    );
    // Work was spread over the instances.
    assert!(
        scalar(&t, "SELECT count(DISTINCT claimed_by) FROM pgcrew.tasks").await >= 8,
        "work was not spread across instances"
    );
}

#[tokio::test]
async fn kill_9_of_a_worker_process_loses_no_task() {
    let t = test_db().await;
    let conn = t.db.get().await.unwrap();
    conn.batch_execute(
        "CREATE TABLE pgcrew_task_effects (task_id bigint NOT NULL, instance_id text NOT NULL)",
    )
    .await
    .unwrap();
    let tasks: Vec<NewTask> = (0..3000).map(|_| task("effect").queue("crash")).collect();
    queue::enqueue_many(&**conn, &tasks).await.unwrap();
    let mut child = tokio::process::Command::new(pgcrew_bin())
        .args([
            "tasks",
            "work",
            "--instance-id",
            "doomed",
            "--queue",
            "crash",
            "--kind",
            "effect",
            "--concurrency",
            "8",
            "--prefetch",
            "16",
            "--task-time",
            "2ms",
            "--record-effects",
        ])
        .env("DATABASE_URL", t.dsn())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    assert!(
        eventually(Duration::from_secs(30), || async {
            scalar(&t, "SELECT count(*) FROM pgcrew_task_effects").await >= 500
        })
        .await,
        "the worker process did not start working"
    );
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    // What the dead process held at the moment it died (nothing can change it any more).
    let held: HashSet<i64> = conn
        .query(
            "SELECT id FROM pgcrew.tasks WHERE state = 'running' AND claimed_by = 'doomed'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        !held.is_empty(),
        "killed with nothing in flight: not a mid-batch crash"
    );
    let remaining = scalar(
        &t,
        "SELECT count(*) FROM pgcrew.tasks WHERE state <> 'completed'",
    )
    .await;
    assert!(
        remaining > 0,
        "the process finished everything before the kill"
    );

    // A survivor (leader: rescues the dead instance's tasks) finishes the work.
    let pool = WorkerPool::builder()
        .queue("crash")
        .concurrency(8)
        .handler("effect", |ctx, _p: serde_json::Value| async move {
            let conn = ctx.client.db().get().await?;
            conn.execute(
                "INSERT INTO pgcrew_task_effects VALUES ($1, $2)",
                &[&ctx.id, &ctx.client.instance_id().as_str()],
            )
            .await?;
            Ok(TaskOutcome::Complete)
        })
        .build()
        .unwrap();
    let survivor = start_client(&t, "survivor", Some(pool), true).await;
    assert!(
        eventually(Duration::from_secs(60), || async {
            scalar(
                &t,
                "SELECT count(*) FROM pgcrew.tasks WHERE state <> 'completed'",
            )
            .await
                == 0
        })
        .await,
        "tasks of the killed process were not recovered"
    );
    survivor.stop().await.unwrap();
    assert_eq!(
        scalar(
            &t,
            "SELECT count(DISTINCT task_id) FROM pgcrew_task_effects"
        )
        .await,
        3000
    );
    let repeated: HashSet<i64> = conn
        .query(
            "SELECT task_id FROM pgcrew_task_effects GROUP BY task_id HAVING count(*) > 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        repeated.is_subset(&held),
        "tasks repeated that were not in flight in the killed process: {:?}",
        repeated.difference(&held).collect::<Vec<_>>()
    );
    assert_eq!(
        scalar(
            &t,
            "SELECT max(n) FROM (SELECT count(*) AS n FROM pgcrew_task_effects GROUP BY task_id) x"
        )
        .await,
        if repeated.is_empty() { 1 } else { 2 }
    );
}

#[tokio::test]
async fn retention_deletes_old_finished_tasks_in_batches() {
    let t = test_db().await;
    let mut cfg = config("keeper");
    cfg.task_retention = Duration::from_secs(3600);
    cfg.retention_batch_size = 2;
    let leader = Client::builder(t.db.clone())
        .config(cfg)
        .build()
        .await
        .unwrap();
    leader.start().await.unwrap();
    assert!(eventually(Duration::from_secs(5), || async { leader.is_leader() }).await);
    let conn = t.db.get().await.unwrap();
    let ids = queue::enqueue_many(&**conn, &(0..5).map(|_| task("k")).collect::<Vec<_>>())
        .await
        .unwrap();
    conn.execute(
        "UPDATE pgcrew.tasks SET state = 'completed', finalized_at = now() - interval '2 hours' WHERE id = ANY($1)",
        &[&ids[..4].iter().map(|i| i.0).collect::<Vec<_>>()],
    )
    .await
    .unwrap();
    conn.execute(
        "UPDATE pgcrew.tasks SET state = 'completed', finalized_at = now() WHERE id = $1",
        &[&ids[4]],
    )
    .await
    .unwrap();
    // The background maintenance may run too; check the end state and the batch bound.
    let first = leader.run_maintenance().await.unwrap();
    assert!(first.count("task_retention") <= 2);
    assert!(
        eventually(Duration::from_secs(10), || async {
            scalar(&t, "SELECT count(*) FROM pgcrew.tasks").await == 1
        })
        .await
    );
    assert_eq!(
        scalar(
            &t,
            "SELECT count(*) FROM pgcrew.tasks WHERE finalized_at > now() - interval '1 minute'"
        )
        .await,
        1
    );
    leader.stop().await.unwrap();
}

#[tokio::test]
async fn idle_pool_wakes_on_notify_and_stats_report_queues() {
    let t = test_db().await;
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let pool = WorkerPool::builder()
        .queue("fast")
        .concurrency(2)
        // A fallback poll far longer than the test: only NOTIFY can wake the pool.
        .poll_interval(Duration::from_secs(60))
        .handler("k", move |_ctx, _p: serde_json::Value| {
            r.fetch_add(1, Ordering::SeqCst);
            async move { Ok(TaskOutcome::Complete) }
        })
        .build()
        .unwrap();
    let client = start_client(&t, "idle", Some(pool.clone()), false).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let conn = t.db.get().await.unwrap();
    for i in 1..=3 {
        queue::enqueue(&**conn, &task("k").queue("fast"))
            .await
            .unwrap();
        assert!(
            eventually(Duration::from_secs(3), || async {
                runs.load(Ordering::SeqCst) == i
            })
            .await,
            "idle pool did not wake on enqueue #{i}"
        );
    }
    queue::enqueue(&**conn, &task("k").queue("elsewhere"))
        .await
        .unwrap();
    let stats = queue::stats(&**conn).await.unwrap();
    let find = |q: &str, s: &str| {
        stats
            .iter()
            .find(|r| r.queue == q && r.state == s)
            .map(|r| r.tasks)
    };
    assert!(
        eventually(Duration::from_secs(3), || async {
            let conn = t.db.get().await.unwrap();
            queue::stats(&**conn)
                .await
                .unwrap()
                .iter()
                .any(|r| r.queue == "fast" && r.state == "completed" && r.tasks == 3)
        })
        .await
    );
    assert_eq!(find("elsewhere", "available"), Some(1));
    let avail = stats.iter().find(|r| r.queue == "elsewhere").unwrap();
    assert!(avail.oldest_available_age_s.unwrap() >= 0.0);
    let m = pool.metrics().snapshot();
    assert_eq!(m.executed, 3);
    assert_eq!(m.in_flight, 0);
    client.stop().await.unwrap();
}

#[tokio::test]
async fn cli_tasks_enqueue_stats_list_cancel_retry() {
    let t = test_db().await;
    let run = |args: &[&str]| {
        let out = std::process::Command::new(pgcrew_bin())
            .args(args)
            .env("DATABASE_URL", t.dsn())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, out, err) = run(&["tasks", "enqueue", "--kind", "mail", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = v["id"].as_i64().unwrap().to_string();
    let (code, _, _) = run(&["tasks", "enqueue", "--kind", "mail", "--count", "3"]);
    assert_eq!(code, Some(0));
    let (code, out, _) = run(&["tasks", "stats", "--json"]);
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["queue"], "default");
    assert_eq!(v[0]["state"], "available");
    assert_eq!(v[0]["tasks"], 4);
    let (code, out, _) = run(&["tasks", "cancel", &id]);
    assert_eq!(code, Some(0));
    assert!(out.contains("cancelled"), "{out}");
    let (code, out, _) = run(&["tasks", "list", "--state", "cancelled", "--json"]);
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["id"].to_string(), id);
    let (code, out, _) = run(&["tasks", "list"]);
    assert_eq!(code, Some(0));
    assert!(out.starts_with("ID"), "{out}");
    let (code, out, _) = run(&["tasks", "retry", &id, "--json"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("available"), "{out}");
    let (code, _, err) = run(&["tasks", "list", "--state", "bogus"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("not a task state"), "{err}");
    let (code, _, err) = run(&["tasks", "cancel", "999999"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("not found"), "{err}");
    let (code, _, err) = run(&["tasks", "enqueue", "--kind", "k", "--payload", "{oops"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("not valid JSON"), "{err}");
}

#[tokio::test]
async fn saturated_pools_get_no_notifications_idle_ones_do() {
    let t = test_db().await;
    // Count NOTIFYs on the wake-up channel from a separate LISTEN connection.
    let (listener, driver, mut notes) = listen_task_available(&t).await;
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let started = Arc::new(AtomicUsize::new(0));
    let (rel, st) = (release.clone(), started.clone());
    let pool = WorkerPool::builder()
        .queue("busy")
        .concurrency(1)
        .poll_interval(Duration::from_secs(60))
        .handler("block", move |_ctx, _p: serde_json::Value| {
            let rel = rel.clone();
            st.fetch_add(1, Ordering::SeqCst);
            async move {
                let _permit = rel.acquire().await;
                Ok(TaskOutcome::Complete)
            }
        })
        .build()
        .unwrap();
    let client = start_client(&t, "saturated", Some(pool), false).await;
    // Idle: the pool registers as a waiter, and an enqueue wakes it through NOTIFY.
    assert!(
        eventually(Duration::from_secs(3), || async {
            scalar(
                &t,
                "SELECT count(*) FROM pgcrew.queue_waiters WHERE queue = 'busy'",
            )
            .await
                == 1
        })
        .await
    );
    let conn = t.db.get().await.unwrap();
    queue::enqueue(&**conn, &task("block").queue("busy"))
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(3), || async {
            started.load(Ordering::SeqCst) == 1
        })
        .await
    );
    // Saturated (its one slot is blocked): it leaves the waiters, and enqueues send no NOTIFY.
    assert!(
        eventually(Duration::from_secs(3), || async {
            scalar(&t, "SELECT count(*) FROM pgcrew.queue_waiters").await == 0
        })
        .await
    );
    while tokio::time::timeout(Duration::from_millis(200), notes.recv())
        .await
        .is_ok()
    {}
    for _ in 0..20 {
        queue::enqueue(&**conn, &task("block").queue("busy"))
            .await
            .unwrap();
    }
    let got = tokio::time::timeout(Duration::from_millis(500), notes.recv()).await;
    assert!(
        got.is_err(),
        "no NOTIFY while the only pool is saturated: {got:?}"
    );
    // Release everything: all tasks complete (claimed by the pool as slots free up).
    release.add_permits(100);
    assert!(
        eventually(Duration::from_secs(10), || async {
            scalar(
                &t,
                "SELECT count(*) FROM pgcrew.tasks WHERE queue = 'busy' AND state = 'completed'",
            )
            .await
                == 21
        })
        .await
    );
    client.stop().await.unwrap();
    drop(listener);
    driver.abort();
}

/// Every enqueue path wakes the pools waiting on the queues it made work available in (the
/// NOTIFY is sent by the enqueue itself, once per queue and transaction), and nothing else:
/// no NOTIFY for queues without a waiting pool, for delayed tasks or for unique-key duplicates.
/// Rows written by plain SQL do not notify until `pgcrew.wake_queues` is called.
#[tokio::test]
async fn every_enqueue_path_notifies_waiting_queues_and_only_those() {
    let t = test_db().await;
    let (listener, driver, mut notes) = listen_task_available(&t).await;
    let inst = register(&t, "waiting").await;
    let mut conn = t.db.get().await.unwrap();
    for q in ["w1", "w2"] {
        conn.execute(
            "INSERT INTO pgcrew.queue_waiters (queue, pool_id, instance_id) \
             VALUES ($1, gen_random_uuid(), $2)",
            &[&q, &inst.as_str()],
        )
        .await
        .unwrap();
    }
    // The queues notified since the last call, sorted.
    let mut woken = async || {
        let mut got = Vec::new();
        while let Ok(Some(msg)) =
            tokio::time::timeout(Duration::from_millis(300), notes.recv()).await
        {
            if let tokio_postgres::AsyncMessage::Notification(n) = msg {
                let v: serde_json::Value = serde_json::from_str(n.payload()).unwrap();
                got.push(v["queue"].as_str().unwrap().to_string());
            }
        }
        got.sort();
        got
    };

    queue::enqueue(&conn, &task("k").queue("w1")).await.unwrap();
    assert_eq!(woken().await, ["w1"], "single enqueue");
    queue::enqueue(&conn, &task("k").queue("nobody"))
        .await
        .unwrap();
    queue::enqueue(&conn, &task("k").queue("w1").delay(Duration::from_secs(60)))
        .await
        .unwrap();
    assert!(woken().await.is_empty(), "no waiter / delayed task");

    // The PL/pgSQL path (unique key, dependencies) notifies too, but not for a duplicate.
    let first = queue::enqueue(&conn, &task("k").queue("w2").unique_key("u"))
        .await
        .unwrap();
    assert_eq!(woken().await, ["w2"], "enqueue with a unique key");
    let dup = queue::enqueue(&conn, &task("k").queue("w2").unique_key("u"))
        .await
        .unwrap();
    assert!(dup.duplicate && dup.id == first.id);
    assert!(woken().await.is_empty(), "duplicate");

    // Bulk: one NOTIFY per waiting queue with available work, ids in input order.
    let batch = vec![
        task("k").queue("w1"),
        task("k").queue("nobody"),
        task("k").queue("w2"),
        task("k").queue("w1"),
        task("k").queue("w1").delay(Duration::from_secs(60)),
    ];
    let ids = queue::enqueue_many(&conn, &batch).await.unwrap();
    assert_eq!(ids.len(), 5);
    assert!(ids.windows(2).all(|w| w[0].0 < w[1].0), "{ids:?}");
    let queues: Vec<String> = {
        let raw: Vec<i64> = ids.iter().map(|i| i.0).collect();
        conn.query(
            "SELECT queue FROM pgcrew.tasks WHERE id = ANY ($1) ORDER BY id",
            &[&raw],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    assert_eq!(queues, ["w1", "nobody", "w2", "w1", "w1"]);
    assert_eq!(woken().await, ["w1", "w2"], "bulk enqueue");
    let only_delayed = vec![task("k").queue("w1").delay(Duration::from_secs(60))];
    queue::enqueue_many(&conn, &only_delayed).await.unwrap();
    assert!(woken().await.is_empty(), "bulk of delayed tasks");

    // Several enqueues in one transaction: one NOTIFY per queue, sent at commit.
    let tx = conn.transaction().await.unwrap();
    for _ in 0..3 {
        queue::enqueue(&tx, &task("k").queue("w2")).await.unwrap();
    }
    queue::enqueue_many(&tx, &[task("k").queue("w2")])
        .await
        .unwrap();
    assert!(woken().await.is_empty(), "nothing before commit");
    tx.commit().await.unwrap();
    assert_eq!(woken().await, ["w2"], "one per queue per transaction");

    // Plain SQL writes are silent until pgcrew.wake_queues is called.
    conn.execute(
        "INSERT INTO pgcrew.tasks (queue, kind) VALUES ('w1', 'k'), ('w2', 'k')",
        &[],
    )
    .await
    .unwrap();
    assert!(woken().await.is_empty(), "plain INSERT");
    let n: i32 = conn
        .query_one(
            "SELECT pgcrew.wake_queues(ARRAY['w1', 'nobody', NULL, 'w1'])",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    assert_eq!(woken().await, ["w1"], "wake_queues");
    drop(listener);
    driver.abort();
}

/// `pgcrew bench queue` runs end to end in its own scratch database (small sizes), reports every
/// figure, including the plain-SQL wake-up floor, and drops its database afterwards.
#[tokio::test]
async fn cli_bench_queue_reports_every_figure_and_cleans_up() {
    let t = test_db().await;
    let (v, stderr) = run_bench(
        &t,
        &[
            "queue",
            "--tasks",
            "300",
            "--batch",
            "100",
            "--wakeups",
            "5",
            "--wakeup-gap",
            "1ms",
        ],
    )
    .await;
    assert_eq!(v["tasks"], 300);
    assert_eq!(v["wakeup_samples"], 5);
    for field in [
        "enqueue_per_sec",
        "processed_per_sec",
        "wakeup_p50_ms",
        "wakeup_p99_ms",
        "wakeup_after_burst_p50_ms",
        "raw_wakeup_p50_ms",
        "raw_wakeup_p99_ms",
    ] {
        let x = v[field].as_f64().unwrap_or(f64::NAN);
        assert!(x.is_finite() && x > 0.0, "{field} = {:?}", v[field]);
    }
    // Measured from the enqueue call's return: on a loaded machine the handler can start before
    // the client has read the enqueue's reply, which counts as 0.
    for field in ["wakeup_from_commit_p50_ms", "raw_wakeup_from_commit_p50_ms"] {
        let x = v[field].as_f64().unwrap_or(f64::NAN);
        assert!(x.is_finite() && x >= 0.0, "{field} = {:?}", v[field]);
    }
    assert_bench_database_dropped(&t, &stderr).await;
}

/// `pgcrew bench scale` runs end to end in its own scratch database (small sizes): the table
/// grows phase by phase as asked, every claim is measured, the late tenant's single task is
/// claimed within one claim cycle, and the database is dropped afterwards.
#[tokio::test]
async fn cli_bench_scale_grows_the_table_and_reports_fairness() {
    let t = test_db().await;
    let (v, stderr) = run_bench(
        &t,
        &[
            "scale",
            "--finished",
            "3000",
            "--backlog",
            "4000",
            "--samples",
            "20",
            "--batch",
            "6",
        ],
    )
    .await;
    // Each phase enqueues 20 x 6 tasks for each of two tenants and claims 20 x 6 of them.
    let rows = |p: &str| v[p]["table_rows"].as_i64().unwrap();
    let available = |p: &str| v[p]["available"].as_i64().unwrap();
    assert_eq!(rows("only_measured"), 240);
    assert_eq!(available("only_measured"), 240);
    assert_eq!(rows("with_finished"), 240 + 3000 + 240);
    assert_eq!(available("with_finished"), 120 + 240);
    assert_eq!(rows("with_backlog"), 240 + 3000 + 240 + 4000 + 240);
    assert_eq!(available("with_backlog"), 240 + 4000 + 240);
    for p in ["only_measured", "with_finished", "with_backlog"] {
        for f in ["claim_p50_ms", "claim_p99_ms", "ack_p50_ms"] {
            let x = v[p][f].as_f64().unwrap_or(f64::NAN);
            assert!(x.is_finite() && x > 0.0, "{p}.{f} = {:?}", v[p][f]);
        }
    }
    // Big (backlog), small (leftovers) and late.
    assert_eq!(v["tenants_with_work"], 3);
    assert_eq!(v["fair_claims_batch"], 1);
    let single = v["fair_claims_single"].as_i64().unwrap();
    assert!((1..=3).contains(&single), "claims of 1: {single}");
    assert_bench_database_dropped(&t, &stderr).await;
}

/// The fast claim's probes of the tasks table (another tenant with work? a due delayed task?)
/// stay on their indexes whatever the statistics say. With two tenants' rows in the statistics
/// an EXISTS probe was planned as a sequential scan, which reads the whole heap when the other
/// tenant's rows sit at its end: every idle wake-up of a multi-tenant queue paid for it.
#[tokio::test]
async fn fast_claim_probes_stay_on_indexes_whatever_the_statistics() {
    let t = test_db().await;
    create_tenant(&t, "a", None).await;
    create_tenant(&t, "b", None).await;
    let conn = t.db.get().await.unwrap();
    // Tenant a's available tasks fill the heap first, then b's; many delayed tasks are not due.
    conn.batch_execute(
        "INSERT INTO pgcrew.tasks (queue, kind, tenant_id) \
           SELECT 'default', 'k', 'a' FROM generate_series(1, 20000); \
         INSERT INTO pgcrew.tasks (queue, kind, tenant_id, state, run_at) \
           SELECT 'default', 'k', 'a', 'scheduled', now() + interval '1 day' \
             FROM generate_series(1, 20000); \
         INSERT INTO pgcrew.tasks (queue, kind, tenant_id) \
           SELECT 'default', 'k', 'b' FROM generate_series(1, 20000); \
         ANALYZE pgcrew.tasks",
    )
    .await
    .unwrap();
    let claim_fast = include_str!("../../sql/queries/queue/claim_fast.sql");
    for mode in ["force_generic_plan", "force_custom_plan"] {
        conn.batch_execute(&format!(
            "SET plan_cache_mode = {mode}; \
             PREPARE fast_probe(text, integer, text, uuid) AS {claim_fast}"
        ))
        .await
        .unwrap();
        let plan: Vec<String> = conn
            .query(
                "EXPLAIN EXECUTE fast_probe('default', 10, 'w', gen_random_uuid())",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect();
        let plan = plan.join("\n");
        assert!(
            !plan.contains("Seq Scan on tasks"),
            "{mode}: the fast claim scans the tasks table sequentially:\n{plan}"
        );
        conn.batch_execute("DEALLOCATE fast_probe; RESET plan_cache_mode")
            .await
            .unwrap();
    }
    // And it does what it is for: two tenants with work, so it claims nothing (the general
    // path shares the batch).
    let me = register(&t, "w").await;
    let token = uuid::Uuid::new_v4();
    let rows = conn
        .query(claim_fast, &[&"default", &10i32, &me.as_str(), &token])
        .await
        .unwrap();
    assert!(rows.is_empty());
}
