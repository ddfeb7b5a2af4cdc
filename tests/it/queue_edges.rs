//! Queue promises at the edges (issue #15): poison acknowledgements, limits under multi-queue
//! claims, retries of dependants, unbounded inputs, agent/worker wiring.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgcrew::queue::{self, Ack, AckOutcome, NewTask, RetryPolicy, TaskOutcome, TaskState};
use pgcrew::queue::{WorkerPool, WorkerPoolBuilder};
use pgcrew::{Client, ClientConfig, Error};

use crate::common::{
    TestDb, create_tenant, eventually, fast_config, first_column, pgcrew_bin, register_instance,
    scalar, start_client, task, test_db,
};

/// [`fast_config`] with a 2 s task heartbeat timeout, eight connections and leader election
/// on or off.
fn config(id: &str, leader: bool) -> ClientConfig {
    fast_config(id)
        .task_heartbeat_timeout(Duration::from_secs(2))
        .pool_size(8)
        .leader_election(leader)
        .build()
        .unwrap()
}

async fn start(t: &TestDb, id: &str, pool: Arc<WorkerPool>, leader: bool) -> Client {
    start_client(t.dsn(), config(id, leader), Some(pool)).await
}

fn qs(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

// ---------------------------------------------------------------------------------------------
// 1. Poison acknowledgements
// ---------------------------------------------------------------------------------------------

/// 10,000 tasks; 1 % of handlers fail with an error text holding a NUL byte, 1 % snooze for
/// `Duration::MAX`. Every other task completes exactly once, and no task runs twice.
#[tokio::test]
async fn poison_acks_never_hold_back_a_batch() {
    let t = test_db().await;
    {
        let conn = t.db.get().await.unwrap();
        conn.batch_execute("CREATE TABLE executions (task_id bigint NOT NULL, i int NOT NULL)")
            .await
            .unwrap();
        let tasks: Vec<NewTask> = (0..10_000)
            .map(|i| NewTask::new("edge", &serde_json::json!({ "i": i })).unwrap())
            .collect();
        for chunk in tasks.chunks(5_000) {
            queue::enqueue_many(&**conn, chunk).await.unwrap();
        }
    }
    let mut clients = Vec::new();
    for w in 0..2 {
        let pool = WorkerPool::builder()
            .concurrency(8)
            .prefetch(100)
            .heartbeat_interval(Duration::from_millis(500))
            // Failed tasks wait an hour: any second execution within the test is a duplicate.
            .retry_policy(RetryPolicy {
                base: Duration::from_secs(3600),
                ..RetryPolicy::default()
            })
            .handler("edge", |ctx, p: serde_json::Value| async move {
                let i = p["i"].as_i64().unwrap_or(-1) as i32;
                let conn = ctx.client.db().get().await?;
                conn.execute("INSERT INTO executions VALUES ($1, $2)", &[&ctx.id, &i])
                    .await?;
                match i % 100 {
                    7 => Err(format!("bad\0byte in task {i}").into()),
                    13 => Ok(TaskOutcome::Snooze(Duration::MAX)),
                    _ => Ok(TaskOutcome::Complete),
                }
            })
            .build()
            .unwrap();
        clients.push(start(&t, &format!("edge-{w}"), pool, w == 0).await);
    }
    // Done when every task ran and left `running`; stop early once a task ran twice.
    let settled = eventually(Duration::from_secs(120), || async {
        scalar(
            &t,
            "SELECT CASE WHEN (SELECT count(*) - count(DISTINCT task_id) FROM executions) > 0 THEN 1
                         WHEN (SELECT count(DISTINCT task_id) FROM executions) = 10000
                          AND NOT EXISTS (SELECT FROM pgcrew.tasks
                                           WHERE state IN ('running', 'available')
                                              OR (state = 'retryable' AND run_at <= now()))
                         THEN 1 ELSE 0 END::bigint",
        )
        .await
            == 1
    })
    .await;
    // Checked before stopping: a pool that cannot deliver its acknowledgements may not stop.
    let dups = scalar(
        &t,
        "SELECT count(*) - count(DISTINCT task_id) FROM executions",
    )
    .await;
    assert_eq!(dups, 0, "{dups} duplicate executions");
    assert!(settled, "the tasks never settled");
    for c in &clients {
        c.stop().await.unwrap();
    }
    assert_eq!(scalar(&t, "SELECT count(*) FROM executions").await, 10_000);
    assert_eq!(
        scalar(
            &t,
            "SELECT count(*) FROM pgcrew.tasks
              WHERE (payload->>'i')::int % 100 NOT IN (7, 13) AND state = 'completed'"
        )
        .await,
        9_800
    );
    // The failures are kept, with the NUL made visible.
    assert_eq!(
        scalar(
            &t,
            "SELECT count(*) FROM pgcrew.tasks
              WHERE (payload->>'i')::int % 100 = 7 AND state = 'retryable' AND attempts = 1
                AND last_error LIKE 'bad' || chr(9216) || 'byte in task %'
                AND jsonb_array_length(errors) = 1"
        )
        .await,
        100
    );
    // The snoozes are clamped to the documented maximum delay (years away), not lost.
    assert_eq!(
        scalar(
            &t,
            "SELECT count(*) FROM pgcrew.tasks
              WHERE (payload->>'i')::int % 100 = 13 AND state = 'scheduled' AND attempts = 0
                AND run_at > now() + interval '9 years'"
        )
        .await,
        100
    );
}

/// A batch the database refuses (here a trigger rejects one task's completion) is split and
/// retried in parts: every other acknowledgement of the batch is applied once, and the one
/// refused on its own is counted and left to the rescue.
#[tokio::test]
async fn a_refused_batch_is_split_and_the_rest_applied() {
    let t = test_db().await;
    let conn = t.db.get().await.unwrap();
    conn.batch_execute("CREATE TABLE executions (task_id bigint NOT NULL)")
        .await
        .unwrap();
    let tasks: Vec<NewTask> = (0..300).map(|_| task("edge")).collect();
    let ids = queue::enqueue_many(&**conn, &tasks).await.unwrap();
    let bad = ids[150];
    conn.batch_execute(&format!(
        "CREATE FUNCTION refuse_one() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.id = {bad} AND NEW.state = 'completed' THEN
                 RAISE EXCEPTION 'refusing task %', NEW.id;
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER refuse_one BEFORE UPDATE ON pgcrew.tasks
             FOR EACH ROW EXECUTE FUNCTION refuse_one();"
    ))
    .await
    .unwrap();
    let pool = WorkerPool::builder()
        .concurrency(4)
        .prefetch(300)
        .max_batch(300)
        .heartbeat_interval(Duration::from_millis(500))
        .handler("edge", |ctx, _p: serde_json::Value| async move {
            let conn = ctx.client.db().get().await?;
            conn.execute("INSERT INTO executions VALUES ($1)", &[&ctx.id])
                .await?;
            Ok(TaskOutcome::Complete)
        })
        .build()
        .unwrap();
    let metrics = pool.metrics().clone();
    let client = start(&t, "splitter", pool, false).await;
    let applied = eventually(Duration::from_secs(60), || async {
        scalar(
            &t,
            "SELECT count(*) FROM pgcrew.tasks WHERE state = 'completed'",
        )
        .await
            == 299
            && metrics.snapshot().rejected_acks >= 1
    })
    .await;
    let dups = scalar(
        &t,
        "SELECT count(*) - count(DISTINCT task_id) FROM executions",
    )
    .await;
    assert!(applied, "{:?}", metrics.snapshot());
    assert_eq!(dups, 0);
    assert_eq!(metrics.snapshot().rejected_acks, 1);
    // The refused task is still running (the rescue will give it back), nothing else is.
    let running: Vec<i64> =
        first_column(&conn, "SELECT id FROM pgcrew.tasks WHERE state = 'running'").await;
    assert_eq!(running, vec![bad.0]);
    client.stop().await.unwrap();
}

/// One statement of acknowledgements with a NUL byte, an overlong error text and a delay too
/// large for an interval: every acknowledgement is applied, values clamped and marked.
#[tokio::test]
async fn ack_clamps_delays_and_sanitises_error_text() {
    let t = test_db().await;
    let me = register_instance(&t, "acker").await;
    let conn = t.db.get().await.unwrap();
    let tasks: Vec<NewTask> = (0..5).map(|_| task("k").max_attempts(5)).collect();
    queue::enqueue_many(&**conn, &tasks).await.unwrap();
    let c = queue::claim(&**conn, &qs(&["default"]), 10, &me)
        .await
        .unwrap();
    assert_eq!(c.len(), 5);
    let huge = "é".repeat(1_000_000);
    let acks = vec![
        c[0].ack(AckOutcome::Complete),
        c[1].ack(AckOutcome::Fail {
            error: "nul\0here".into(),
            retry_in: Duration::MAX,
        }),
        c[2].ack(AckOutcome::Snooze(Duration::MAX)),
        c[3].ack(AckOutcome::Discard {
            error: huge.clone(),
        }),
        c[4].ack(AckOutcome::Complete),
    ];
    let rep = queue::ack(&**conn, &acks).await.unwrap();
    assert_eq!(rep.applied.len(), 5, "{rep:?}");
    assert!(rep.stale.is_empty());
    let row = conn
        .query_one(
            "SELECT last_error, run_at > now() + interval '9 years' AS far
               FROM pgcrew.tasks WHERE id = $1",
            &[&c[1].id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "nul\u{2400}here");
    assert!(row.get::<_, bool>(1));
    let row = conn
        .query_one(
            "SELECT length(last_error), last_error, errors->0->>'error' = last_error
               FROM pgcrew.tasks WHERE id = $1",
            &[&c[3].id],
        )
        .await
        .unwrap();
    let len: i32 = row.get(0);
    let text: String = row.get(1);
    assert_eq!(len, 8192, "error text is bounded");
    assert!(text.starts_with("éé"));
    assert!(
        text.ends_with("[truncated: 1000000 characters in all]"),
        "{}",
        &text[text.len() - 60..]
    );
    assert!(row.get::<_, bool>(2));
}

/// `pgcrew.ack_tasks` is public: it clamps what it is given and refuses malformed calls with
/// a clear error instead of misapplying them.
#[tokio::test]
async fn sql_ack_tasks_clamps_and_validates() {
    let t = test_db().await;
    let me = register_instance(&t, "sqlacker").await;
    let conn = t.db.get().await.unwrap();
    let tasks: Vec<NewTask> = (0..3).map(|_| task("k")).collect();
    queue::enqueue_many(&**conn, &tasks).await.unwrap();
    let c = queue::claim(&**conn, &qs(&["default"]), 10, &me)
        .await
        .unwrap();
    let ids: Vec<i64> = c.iter().map(|x| x.id.0).collect();
    let tokens: Vec<uuid::Uuid> = c.iter().map(|x| x.token.as_uuid()).collect();
    // Unknown outcome: refused, nothing changed.
    let err = conn
        .query(
            "SELECT * FROM pgcrew.ack_tasks($1, $2, ARRAY['complete', 'explode', 'complete'], NULL, NULL)",
            &[&ids, &tokens],
        )
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("PC020"), "{err:?}");
    // Arrays of different lengths: refused.
    let err = conn
        .query(
            "SELECT * FROM pgcrew.ack_tasks($1, $2, ARRAY['complete'], NULL, NULL)",
            &[&ids, &tokens],
        )
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("PC020"), "{err:?}");
    assert_eq!(
        scalar(
            &t,
            "SELECT count(*) FROM pgcrew.tasks WHERE state = 'running'"
        )
        .await,
        3
    );
    // Huge delays and texts are clamped.
    let rows = conn
        .query(
            "SELECT * FROM pgcrew.ack_tasks($1, $2, ARRAY['snooze', 'fail', 'discard'],
                    ARRAY[9223372036854775807, 9223372036854775807, -5],
                    ARRAY[NULL, repeat('x', 100000), repeat('y', 9000)])",
            &[&ids, &tokens],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(
        scalar(
            &t,
            "SELECT count(*) FROM pgcrew.tasks
              WHERE run_at > now() + interval '9 years' AND run_at < now() + interval '11 years'"
        )
        .await,
        2
    );
    assert_eq!(
        scalar(
            &t,
            "SELECT count(*) FROM pgcrew.tasks
              WHERE length(last_error) = 8192 AND last_error LIKE '%characters in all]'"
        )
        .await,
        2
    );
}

/// The `errors` history of a task failing again and again stays bounded (the most recent
/// entries are kept, each numbered by its attempt).
#[tokio::test]
async fn error_history_is_bounded() {
    let t = test_db().await;
    let me = register_instance(&t, "failer").await;
    let conn = t.db.get().await.unwrap();
    let id = queue::enqueue(&**conn, &task("k").max_attempts(1000))
        .await
        .unwrap()
        .id;
    for n in 0..120 {
        let c = queue::claim(&**conn, &qs(&["default"]), 1, &me)
            .await
            .unwrap();
        assert_eq!(c.len(), 1, "cycle {n}");
        let rep = queue::ack(
            &**conn,
            &[c[0].ack(AckOutcome::Fail {
                error: format!("failure {n}"),
                retry_in: Duration::ZERO,
            })],
        )
        .await
        .unwrap();
        assert_eq!(rep.applied.len(), 1);
    }
    let row = conn
        .query_one(
            "SELECT jsonb_array_length(errors), (errors->-1->>'attempt')::int,
                    errors->-1->>'error', (errors->0->>'attempt')::int
               FROM pgcrew.tasks WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 100);
    assert_eq!(row.get::<_, i32>(1), 120);
    assert_eq!(row.get::<_, String>(2), "failure 119");
    assert_eq!(row.get::<_, i32>(3), 21);
}

// ---------------------------------------------------------------------------------------------
// 2. Concurrency limits under multi-queue claims
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn multi_queue_claims_hold_tenant_and_queue_limits() {
    let t = test_db().await;
    let me = register_instance(&t, "w1").await;
    let one = create_tenant(&t, "one", Some(1)).await;
    let conn = t.db.get().await.unwrap();
    for q in ["qa", "qb"] {
        queue::enqueue(&**conn, &task("k").tenant(one.clone()).queue(q))
            .await
            .unwrap();
    }
    let rows = conn
        .query(
            "SELECT id FROM pgcrew.claim_tasks(ARRAY['qa', 'qb'], 10, 'w1')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        rows.len(),
        1,
        "tenant limited to 1 got {} tasks",
        rows.len()
    );
    assert!(
        queue::claim(&**conn, &qs(&["qa", "qb"]), 10, &me)
            .await
            .unwrap()
            .is_empty()
    );
    // A per-queue limit, with the queue named twice.
    let narrow = create_tenant(&t, "narrow", None).await;
    queue::set_queue_limit(&**conn, &narrow, "qn", 1)
        .await
        .unwrap();
    for _ in 0..3 {
        queue::enqueue(&**conn, &task("k").tenant(narrow.clone()).queue("qn"))
            .await
            .unwrap();
    }
    let c = queue::claim(&**conn, &qs(&["qn", "qb", "qn"]), 10, &me)
        .await
        .unwrap();
    assert_eq!(c.len(), 1, "queue limited to 1 got {}", c.len());
}

/// Random queues, tenant and tenant-queue limits, and concurrent claimers on their own
/// connections (single-queue ones take the fast path, multi-queue ones pgcrew.claim_tasks):
/// neither a continuous sampler of the database nor the claimers' own books ever see a limit
/// exceeded.
#[tokio::test]
async fn limits_hold_for_random_queues_limits_and_concurrent_claimers() {
    for seed in [11u64, 22, 33] {
        limit_property(seed).await;
    }
}

/// Tasks the claimers hold, per tenant (queue `None`) and per tenant and queue.
type Books = HashMap<(String, Option<String>), i64>;

async fn limit_property(seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let t = test_db().await;
    let me = register_instance(&t, "prop").await;
    let queues = ["qa", "qb", "qc"];
    let mut tenant_limits: HashMap<String, i64> = HashMap::new();
    let mut queue_limits: HashMap<(String, String), i64> = HashMap::new();
    let mut tenants = Vec::new();
    let conn = t.db.get().await.unwrap();
    for i in 0..4 {
        let name = format!("t{i}");
        // t0 is always limited to 1; the others at random (or not at all).
        let limit = if i == 0 {
            Some(1)
        } else {
            match rng.u32(0..4) {
                0 => None,
                n => Some(n as i32),
            }
        };
        let tn = create_tenant(&t, &name, limit).await;
        if let Some(l) = limit {
            tenant_limits.insert(name.clone(), l as i64);
        }
        for q in queues {
            if rng.u32(0..3) == 0 {
                let l = rng.i32(1..3);
                queue::set_queue_limit(&**conn, &tn, q, l).await.unwrap();
                queue_limits.insert((name.clone(), q.to_string()), l as i64);
            }
        }
        tenants.push(tn);
    }
    let tasks: Vec<NewTask> = (0..400)
        .map(|_| {
            task("k")
                .tenant(tenants[rng.usize(0..tenants.len())].clone())
                .queue(queues[rng.usize(0..queues.len())])
        })
        .collect();
    queue::enqueue_many(&**conn, &tasks).await.unwrap();

    let books: Arc<Mutex<Books>> = Arc::default();
    let violations: Arc<Mutex<Vec<String>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for c in 0..8 {
        // A random ordered subset of the queues, sometimes with a queue named twice.
        let mut mine: Vec<String> = queues
            .iter()
            .filter(|_| rng.bool())
            .map(|s| s.to_string())
            .collect();
        if mine.is_empty() || c < 2 {
            mine = queues.iter().map(|s| s.to_string()).collect();
        }
        rng.shuffle(&mut mine);
        if rng.u32(0..4) == 0 {
            mine.push(mine[0].clone());
        }
        let claim_n = rng.i32(1..5);
        let hold_ms = rng.u64(0..3);
        let (db, me, books, violations) =
            (t.db.clone(), me.clone(), books.clone(), violations.clone());
        let (tenant_limits, queue_limits) = (tenant_limits.clone(), queue_limits.clone());
        handles.push(tokio::spawn(async move {
            let conn = db.get().await.unwrap();
            let mut idle = 0;
            while idle < 30 {
                let got = queue::claim(&**conn, &mine, claim_n, &me).await.unwrap();
                if got.is_empty() {
                    idle += 1;
                    tokio::time::sleep(Duration::from_millis(3)).await;
                    continue;
                }
                idle = 0;
                {
                    let mut b = books.lock().unwrap();
                    for x in &got {
                        for key in [
                            (x.tenant.clone(), None),
                            (x.tenant.clone(), Some(x.queue.clone())),
                        ] {
                            let n = b.entry(key.clone()).or_default();
                            *n += 1;
                            let limit = match &key.1 {
                                None => tenant_limits.get(&key.0),
                                Some(q) => queue_limits.get(&(key.0.clone(), q.clone())),
                            };
                            if let Some(l) = limit
                                && *n > *l
                            {
                                violations
                                    .lock()
                                    .unwrap()
                                    .push(format!("claimers held {n} of {key:?} (limit {l})"));
                            }
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(hold_ms)).await;
                {
                    let mut b = books.lock().unwrap();
                    for x in &got {
                        *b.entry((x.tenant.clone(), None)).or_default() -= 1;
                        *b.entry((x.tenant.clone(), Some(x.queue.clone())))
                            .or_default() -= 1;
                    }
                }
                let acks: Vec<Ack> = got.iter().map(|x| x.ack(AckOutcome::Complete)).collect();
                queue::ack(&**conn, &acks).await.unwrap();
            }
        }));
    }
    let sampler = {
        let (db, done) = (t.db.clone(), done.clone());
        tokio::spawn(async move {
            let conn = db.get().await.unwrap();
            let (mut over, mut at_limit, mut samples) = (Vec::new(), 0i64, 0u64);
            while !done.load(Ordering::SeqCst) {
                // One statement: one snapshot of every running count against its limit.
                let rows = conn
                    .query(
                        "WITH r AS (SELECT tenant_id, queue, count(*) AS n FROM pgcrew.tasks
                                     WHERE state = 'running' GROUP BY tenant_id, queue),
                              c AS (SELECT r.tenant_id, NULL::text AS queue, sum(r.n)::bigint AS n,
                                           tn.max_concurrent_tasks::bigint AS lim
                                      FROM r JOIN pgcrew.tenants tn ON tn.id = r.tenant_id
                                     WHERE tn.max_concurrent_tasks IS NOT NULL
                                     GROUP BY r.tenant_id, tn.max_concurrent_tasks
                                    UNION ALL
                                    SELECT r.tenant_id, r.queue, r.n, l.max_concurrent_tasks::bigint
                                      FROM r JOIN pgcrew.tenant_queue_limits l
                                        ON l.tenant_id = r.tenant_id AND l.queue = r.queue)
                         SELECT tenant_id, queue, n, lim FROM c WHERE n >= lim",
                        &[],
                    )
                    .await
                    .unwrap();
                for r in &rows {
                    let (n, lim): (i64, i64) = (r.get(2), r.get(3));
                    if n > lim {
                        over.push(format!(
                            "database: {n} running for {}/{:?} (limit {lim})",
                            r.get::<_, String>(0),
                            r.get::<_, Option<String>>(1)
                        ));
                    } else {
                        at_limit += 1;
                    }
                }
                samples += 1;
            }
            (over, at_limit, samples)
        })
    };
    for h in handles {
        h.await.unwrap();
    }
    done.store(true, Ordering::SeqCst);
    let (over, at_limit, samples) = sampler.await.unwrap();
    let local = violations.lock().unwrap().clone();
    assert!(
        over.is_empty() && local.is_empty(),
        "seed {seed}: limits exceeded: {:?} {:?}",
        &over[..over.len().min(5)],
        &local[..local.len().min(5)]
    );
    assert!(samples > 20, "seed {seed}: only {samples} samples");
    assert!(
        at_limit > 0,
        "seed {seed}: no limit was ever reached: the test did not exercise them"
    );
    assert_eq!(
        scalar(
            &t,
            "SELECT count(*) FROM pgcrew.tasks WHERE state <> 'completed'"
        )
        .await,
        0,
        "seed {seed}: tasks left over"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Retrying a dependant
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn retried_dependant_waits_for_its_parent() {
    let t = test_db().await;
    let me = register_instance(&t, "deps").await;
    let conn = t.db.get().await.unwrap();
    let parent = queue::enqueue(&**conn, &task("k").queue("dq"))
        .await
        .unwrap()
        .id;
    let child = queue::enqueue(&**conn, &task("k").queue("dq").depends_on([parent]))
        .await
        .unwrap();
    assert_eq!(child.state, TaskState::Scheduled);
    let child = child.id;
    assert_eq!(
        queue::cancel(&**conn, child).await.unwrap(),
        TaskState::Cancelled
    );
    // Retried while the parent has not run: the child waits for it.
    assert_eq!(
        queue::retry(&**conn, child).await.unwrap(),
        TaskState::Scheduled
    );
    let c = queue::claim(&**conn, &qs(&["dq"]), 10, &me).await.unwrap();
    assert_eq!(
        c.iter().map(|x| x.id).collect::<Vec<_>>(),
        vec![parent],
        "the child ran before its parent"
    );
    queue::ack(&**conn, &[c[0].ack(AckOutcome::Complete)])
        .await
        .unwrap();
    let c = queue::claim(&**conn, &qs(&["dq"]), 10, &me).await.unwrap();
    assert_eq!(c.iter().map(|x| x.id).collect::<Vec<_>>(), vec![child]);
    queue::ack(&**conn, &[c[0].ack(AckOutcome::Complete)])
        .await
        .unwrap();
    // Retried after the parent completed: available at once.
    assert_eq!(
        queue::retry(&**conn, child).await.unwrap(),
        TaskState::Available
    );

    // A parent that was cancelled will never complete: retrying its dependant is refused
    // with a pointer to the parent, and nothing changes.
    let p2 = queue::enqueue(&**conn, &task("k").queue("dq2"))
        .await
        .unwrap()
        .id;
    let c2 = queue::enqueue(&**conn, &task("k").queue("dq2").depends_on([p2]))
        .await
        .unwrap()
        .id;
    queue::cancel(&**conn, p2).await.unwrap();
    assert_eq!(
        queue::get(&**conn, c2).await.unwrap().state,
        TaskState::Cancelled
    );
    let err = queue::retry(&**conn, c2).await.unwrap_err();
    assert!(
        matches!(err, Error::InvalidInput { field: "task", .. }),
        "{err}"
    );
    assert!(err.to_string().contains(&p2.to_string()), "{err}");
    assert_eq!(
        queue::get(&**conn, c2).await.unwrap().state,
        TaskState::Cancelled
    );
    // Retry the parent first, then the child: it waits for the parent again.
    assert_eq!(
        queue::retry(&**conn, p2).await.unwrap(),
        TaskState::Available
    );
    assert_eq!(
        queue::retry(&**conn, c2).await.unwrap(),
        TaskState::Scheduled
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Unbounded inputs
// ---------------------------------------------------------------------------------------------

/// The payload limit is the size of PostgreSQL's JSON text of the payload, the same on every
/// enqueue path, the SQL function included; refused payloads store nothing.
#[tokio::test]
async fn payload_limit_is_the_same_on_every_path() {
    let t = test_db().await;
    let conn = t.db.get().await.unwrap();
    let max = queue::MAX_PAYLOAD_BYTES;
    // `{"a": "xxx"}` is 9 bytes of JSON text around the string.
    let fits = serde_json::json!({ "a": "x".repeat(max - 9) });
    let over = serde_json::json!({ "a": "x".repeat(max - 8) });
    let len: i32 = conn
        .query_one("SELECT octet_length($1::jsonb::text)", &[&fits])
        .await
        .unwrap()
        .get(0);
    assert_eq!(len as usize, max);

    // The library's measure is PostgreSQL's, numbers, escapes and nesting included.
    for v in [
        serde_json::json!({"n": [1e16, 1.5e-7, -0.0, 0.1, 100.0, -12.25, u64::MAX, i64::MIN]}),
        serde_json::json!({"s": "q\"\\\n\t\u{1}\u{7f}é€😀/", "": [[], {}, null, true, false]}),
        serde_json::json!([1.7976931348623157e308, 5e-324, 123456789.125, {"a": {"b": [1, 2]}}]),
    ] {
        let pg: i32 = conn
            .query_one("SELECT octet_length($1::jsonb::text)", &[&v])
            .await
            .unwrap()
            .get(0);
        assert_eq!(queue::payload_size(&v).unwrap(), pg as usize, "{v}");
    }
    let ok = NewTask::new("k", &fits).unwrap();
    queue::enqueue(&**conn, &ok).await.unwrap();
    queue::enqueue(&**conn, &ok.clone().unique_key("u1"))
        .await
        .unwrap();
    queue::enqueue_many(&**conn, std::slice::from_ref(&ok))
        .await
        .unwrap();
    assert_eq!(scalar(&t, "SELECT count(*) FROM pgcrew.tasks").await, 3);

    let big = NewTask::new("k", &over).unwrap();
    for (what, r) in [
        ("enqueue", queue::enqueue(&**conn, &big).await.map(|_| ())),
        (
            "enqueue with unique key",
            queue::enqueue(&**conn, &big.clone().unique_key("u2"))
                .await
                .map(|_| ()),
        ),
        (
            "enqueue_many",
            queue::enqueue_many(&**conn, std::slice::from_ref(&big))
                .await
                .map(|_| ()),
        ),
    ] {
        let err = r.expect_err(what);
        assert!(
            matches!(
                err,
                Error::InvalidInput {
                    field: "payload",
                    ..
                }
            ),
            "{what}: {err}"
        );
    }
    let err = conn
        .query(
            "SELECT * FROM pgcrew.enqueue_task('default', 'k', 'default', NULL, 2::int2, $1::jsonb,
                                               0, NULL, 25, NULL, NULL)",
            &[&over],
        )
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("PC021"), "{err:?}");
    assert_eq!(scalar(&t, "SELECT count(*) FROM pgcrew.tasks").await, 3);

    // A delay too large for the database is refused up front, on every path.
    for (what, r) in [
        (
            "enqueue",
            queue::enqueue(&**conn, &task("k").delay(Duration::MAX))
                .await
                .map(|_| ()),
        ),
        (
            "enqueue_many",
            queue::enqueue_many(&**conn, &[task("k").delay(Duration::MAX)])
                .await
                .map(|_| ()),
        ),
    ] {
        let err = r.expect_err(what);
        assert!(
            matches!(err, Error::InvalidInput { field: "delay", .. }),
            "{what}: {err}"
        );
    }
    let err = conn
        .query(
            "SELECT * FROM pgcrew.enqueue_task('default', 'k', 'default', NULL, 2::int2, '{}',
                                               9223372036854775807, NULL, 25, NULL, NULL)",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("PC022"), "{err:?}");
    assert_eq!(scalar(&t, "SELECT count(*) FROM pgcrew.tasks").await, 3);
}

/// `pgcrew tasks enqueue --count` is bounded (exit 2, nothing stored), and so is a bulk
/// enqueue through the library.
#[tokio::test]
async fn enqueue_count_is_bounded() {
    let t = test_db().await;
    let dsn = t.dsn().to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(pgcrew_bin())
            .args(["tasks", "enqueue", "--kind", "k", "--count", "100001"])
            .env("DATABASE_URL", dsn)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("100000"), "{stderr}");
    assert_eq!(scalar(&t, "SELECT count(*) FROM pgcrew.tasks").await, 0);

    let conn = t.db.get().await.unwrap();
    let tasks = vec![task("k"); 100_001];
    let err = queue::enqueue_many(&**conn, &tasks).await.unwrap_err();
    assert!(
        matches!(err, Error::InvalidInput { field: "tasks", .. }),
        "{err}"
    );
    assert_eq!(scalar(&t, "SELECT count(*) FROM pgcrew.tasks").await, 0);
    queue::enqueue_many(&**conn, &tasks[..100_000])
        .await
        .unwrap();
    assert_eq!(
        scalar(&t, "SELECT count(*) FROM pgcrew.tasks").await,
        100_000
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Agents and the worker pool's queues
// ---------------------------------------------------------------------------------------------

fn runtime(t: &TestDb) -> pgcrew::agent::AgentRuntime {
    let model = Arc::new(pgcrew::model::ScriptedModel::by_turn(Vec::new()));
    pgcrew::agent::AgentRuntime::new(pgcrew::kernel::Kernel::new(t.db.clone(), model), "edge")
}

#[tokio::test]
async fn installing_agents_keeps_the_pools_queues() {
    let t = test_db().await;
    let base = || -> WorkerPoolBuilder {
        WorkerPool::builder()
            .poll_interval(Duration::from_millis(100))
            .heartbeat_interval(Duration::from_millis(500))
            .handler("plain", |_ctx, _p: serde_json::Value| async move {
                Ok(TaskOutcome::Complete)
            })
    };
    // The implicit default queue survives.
    let pool = runtime(&t).install(base(), &["helper"]).build().unwrap();
    assert_eq!(pool.queues(), ["default", "agent.helper"]);
    // Explicit queues survive, whether named before or after.
    let pool = runtime(&t)
        .install(base().queue("mine"), &["helper"])
        .queue("later")
        .build()
        .unwrap();
    assert_eq!(pool.queues(), ["mine", "agent.helper", "later"]);

    // And the pool works them: 503 plain tasks on the default queue are all processed.
    let pool = runtime(&t).install(base(), &["helper"]).build().unwrap();
    {
        let conn = t.db.get().await.unwrap();
        let tasks = vec![task("plain"); 503];
        queue::enqueue_many(&**conn, &tasks).await.unwrap();
    }
    let client = start(&t, "agents", pool, false).await;
    let all = eventually(Duration::from_secs(60), || async {
        scalar(
            &t,
            "SELECT count(*) FROM pgcrew.tasks WHERE state = 'completed'",
        )
        .await
            == 503
    })
    .await;
    client.stop().await.unwrap();
    assert!(all, "default-queue tasks were left unprocessed");
}
