//! Wake-ups: which enqueues notify which waiting pools.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use pgcrew::queue::{self, NewTask, TaskOutcome, WorkerPool};

use super::{listen_wake_ups, start_client};
use crate::common::{
    COMPLETED_TASKS, enqueued, register_instance, task, test_db, wait_for, wait_until,
};

/// A pool of `queue` running `concurrency` tasks of kind `k` at once, each counted in `runs`,
/// whose fallback poll is far longer than a test: only NOTIFY wakes it.
fn notify_only_pool(queue: &str, concurrency: usize, runs: &Arc<AtomicUsize>) -> Arc<WorkerPool> {
    let r = runs.clone();
    WorkerPool::builder()
        .queue(queue)
        .concurrency(concurrency)
        .poll_interval(Duration::from_secs(60))
        .handler("k", move |_ctx, _p: serde_json::Value| {
            r.fetch_add(1, Ordering::SeqCst);
            async move { Ok(TaskOutcome::Complete) }
        })
        .build()
        .unwrap()
}

#[tokio::test]
async fn idle_pool_wakes_on_notify_and_stats_report_queues() {
    let t = test_db().await;
    let runs = Arc::new(AtomicUsize::new(0));
    let pool = notify_only_pool("fast", 2, &runs);
    let client = start_client(&t, "idle", Some(pool.clone()), false).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let conn = t.db.get().await.unwrap();
    for i in 1..=3 {
        let what = "idle pool did not wake on enqueue #{i}";
        enqueue_and_count_to(&conn, &task("k").queue("fast"), &runs, i, what).await;
    }
    queue::enqueue(&conn, &task("k").queue("elsewhere"))
        .await
        .unwrap();
    let stats = queue::stats(&conn).await.unwrap();
    let find = |q: &str, s: &str| {
        stats
            .iter()
            .find(|r| r.queue == q && r.state == s)
            .map(|r| r.tasks)
    };
    wait_until(
        Duration::from_secs(3),
        "the three fast tasks complete",
        || async {
            let conn = t.db.get().await.unwrap();
            queue::stats(&conn)
                .await
                .unwrap()
                .iter()
                .any(|r| r.queue == "fast" && r.state == "completed" && r.tasks == 3)
        },
    )
    .await;
    assert_eq!(find("elsewhere", "available"), Some(1));
    let avail = stats.iter().find(|r| r.queue == "elsewhere").unwrap();
    assert!(avail.oldest_available_age_s.unwrap() >= 0.0);
    let m = pool.metrics().snapshot();
    assert_eq!(m.executed, 3);
    assert_eq!(m.in_flight, 0);
    client.stop().await.unwrap();
}

#[tokio::test]
async fn saturated_pools_get_no_notifications_idle_ones_do() {
    let t = test_db().await;
    // Count NOTIFYs from a separate LISTEN connection: on the shared channel, and on the
    // instance's own channel, where single enqueues name its pool.
    let instance = pgcrew::InstanceId::new("saturated").unwrap();
    let (listener, driver, mut notes) = listen_wake_ups(&t, &instance).await;
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let started = Arc::new(AtomicUsize::new(0));
    let pool = blocking_pool("busy", 1, &started, &release);
    let client = start_client(&t, instance.as_str(), Some(pool), false).await;
    // Idle: the pool registers as a waiter, and an enqueue wakes it through NOTIFY.
    let waiters = "SELECT count(*) FROM pgcrew.queue_waiters";
    wait_for(&t, &format!("{waiters} WHERE queue = 'busy'"))
        .within(Duration::from_secs(3))
        .until(|n| n == 1, "the idle pool waits on queue busy")
        .await;
    let conn = t.db.get().await.unwrap();
    let what = "the blocking handler started";
    enqueue_and_count_to(&conn, &task("k").queue("busy"), &started, 1, what).await;
    // Saturated (its one slot is blocked): it leaves the waiters, and enqueues send no NOTIFY.
    wait_for(&t, waiters)
        .within(Duration::from_secs(3))
        .until(|n| n == 0, "the saturated pool leaves the waiters")
        .await;
    while tokio::time::timeout(Duration::from_millis(200), notes.recv())
        .await
        .is_ok()
    {}
    for _ in 0..20 {
        queue::enqueue(&conn, &task("k").queue("busy"))
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
    wait_for(&t, &format!("{COMPLETED_TASKS} AND queue = 'busy'"))
        .within(Duration::from_secs(10))
        .until(|n| n == 21, "every busy task completes")
        .await;
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
    let inst = register_instance(&t, "waiting").await;
    // Single enqueues name the waiting pool on its instance's own channel.
    let (listener, driver, mut notes) = listen_wake_ups(&t, &inst).await;
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

    // Several enqueues in one transaction: sent at commit, identical payloads folded. The single
    // enqueues name the queue's one waiting pool (one NOTIFY), the bulk one names none (another).
    let tx = conn.transaction().await.unwrap();
    for _ in 0..3 {
        queue::enqueue(&tx, &task("k").queue("w2")).await.unwrap();
    }
    queue::enqueue_many(&tx, &[task("k").queue("w2")])
        .await
        .unwrap();
    assert!(woken().await.is_empty(), "nothing before commit");
    tx.commit().await.unwrap();
    assert_eq!(
        woken().await,
        ["w2", "w2"],
        "one per payload per transaction"
    );

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

/// Enqueue `task`, then wait (up to 3 s, panicking with `what`) until `count` is `n`.
async fn enqueue_and_count_to(
    conn: &pgcrew::db::Conn,
    task: &NewTask,
    count: &AtomicUsize,
    n: usize,
    what: &str,
) {
    enqueued(conn, task).await;
    wait_until(Duration::from_secs(3), what, || async {
        count.load(Ordering::SeqCst) == n
    })
    .await;
}

/// Issue #22 (the wake-up herd): an enqueue into N idle instances woke every waiting pool, and
/// each sent a claim (about N + 3 claims per task: one per woken pool, and the winner's as it
/// goes idle again). The enqueue now names one waiting pool, and a backup that claims after a
/// short delay: about 5 claims per task whatever N (the winner's claim, its three as it goes
/// idle again: before and after it registers as a waiter, and its second look 100 ms later; the
/// backup's). The pools that lose the race (here, the backup) must not send the
/// general `pgcrew.claim_tasks` either. Eight instances with one idle pool each, tasks enqueued
/// one at a time; claims counted with `pg_stat_statements` on a throwaway cluster.
#[tokio::test]
async fn an_enqueue_wakes_one_named_pool_and_its_backup_not_every_pool() {
    const INSTANCES: usize = 8;
    const TASKS: i64 = 10;
    let (cluster, scratch, db) = crate::common::statements_db("herd").await;
    let runs = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for i in 0..INSTANCES {
        let pool = notify_only_pool("herd", 1, &runs);
        let mut cfg = crate::common::fast_config(&format!("herd-{i}"))
            .pool_size(3)
            .build()
            .unwrap();
        cfg.leader_election = false;
        clients.push(crate::common::start_client(scratch.dsn(), cfg, Some(pool)).await);
    }
    for c in &clients {
        crate::common::wait_listening(c, Duration::from_secs(10)).await;
    }
    let waiters = "SELECT count(*) FROM pgcrew.queue_waiters WHERE queue = 'herd'";
    let all_idle = || async { crate::common::scalar(&db, waiters).await == INSTANCES as i64 };
    wait_until(Duration::from_secs(10), "every pool idle", all_idle).await;
    let conn = db.get().await.unwrap();
    conn.execute("SELECT pg_stat_statements_reset()", &[])
        .await
        .unwrap();
    for k in 1..=TASKS {
        queue::enqueue(&conn, &task("k").queue("herd"))
            .await
            .unwrap();
        wait_until(Duration::from_secs(10), "the task runs", || async {
            runs.load(Ordering::SeqCst) as i64 == k
        })
        .await;
        wait_until(Duration::from_secs(10), "every pool idle again", all_idle).await;
    }
    let (fast, general) = crate::common::claim_statements(&db).await;
    // Per task: the named pool's claim, its claims as it goes idle again (before and after it
    // registers as a waiter, and its second look), the backup's; one more for slack.
    assert_eq!(
        general, 0,
        "woken pools ran pgcrew.claim_tasks ({fast} fast claims, {TASKS} tasks, {INSTANCES} instances)"
    );
    assert!(
        fast <= TASKS * 6,
        "{fast} fast claims for {TASKS} tasks at {INSTANCES} instances: every pool was woken"
    );
    for c in clients {
        c.stop().await.unwrap();
    }
    drop(conn);
    drop(db);
    drop(scratch);
    drop(cluster);
}

/// Issue #23: an idle pool woken for a lone task sent three claims for it: the claim that took
/// it, another at once (though the first had claimed fewer tasks than it asked for, so the
/// queue was drained), and a third when the task's acknowledgement was written (an
/// acknowledgement flush woke the pool, though a completed task frees nothing a pool on the
/// plain fast claim could take). Now it sends one; a snooze still wakes it (the task is due
/// again). Claims counted with `pg_stat_statements` on a throwaway cluster.
#[tokio::test]
async fn a_lone_task_costs_an_idle_pool_one_claim() {
    const TASKS: i64 = 10;
    let (cluster, scratch, db) = crate::common::statements_db("lone").await;
    let runs = Arc::new(AtomicUsize::new(0));
    let snoozed = Arc::new(AtomicUsize::new(0));
    let (r, f) = (runs.clone(), snoozed.clone());
    let pool = WorkerPool::builder()
        .queue("lone")
        .concurrency(4)
        .poll_interval(Duration::from_secs(60))
        .handler("k", move |_ctx, p: serde_json::Value| {
            r.fetch_add(1, Ordering::SeqCst);
            let again = p["again"].as_bool() == Some(true) && f.fetch_add(1, Ordering::SeqCst) == 0;
            async move {
                if again {
                    Ok(TaskOutcome::Snooze(Duration::from_millis(200)))
                } else {
                    Ok(TaskOutcome::Complete)
                }
            }
        })
        .build()
        .unwrap();
    let mut cfg = crate::common::fast_config("lone").build().unwrap();
    cfg.leader_election = false;
    let client = crate::common::start_client(scratch.dsn(), cfg, Some(pool)).await;
    crate::common::wait_listening(&client, Duration::from_secs(10)).await;
    let waiting = || async {
        crate::common::scalar(
            &db,
            "SELECT count(*) FROM pgcrew.queue_waiters WHERE queue = 'lone'",
        )
        .await
            == 1
    };
    wait_until(Duration::from_secs(10), "the pool idle", waiting).await;
    // Past the pool's second look after it registered.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let conn = db.get().await.unwrap();
    conn.execute("SELECT pg_stat_statements_reset()", &[])
        .await
        .unwrap();
    for k in 1..=TASKS {
        queue::enqueue(&conn, &task("k").queue("lone"))
            .await
            .unwrap();
        wait_until(Duration::from_secs(10), "the task runs", || async {
            runs.load(Ordering::SeqCst) as i64 == k
        })
        .await;
        wait_for(&db, COMPLETED_TASKS)
            .until(|c| c == k, "the task completed")
            .await;
        // Whatever the acknowledgement sets off has happened.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (fast, general) = crate::common::claim_statements(&db).await;
    assert_eq!(general, 0, "{fast} fast claims");
    assert!(
        fast <= TASKS + 1,
        "{fast} claims for {TASKS} lone tasks enqueued to an idle pool"
    );
    // A snoozed task wakes the pool when it is due again: it runs twice and completes.
    queue::enqueue(
        &conn,
        &NewTask::new("k", &serde_json::json!({ "again": true }))
            .unwrap()
            .queue("lone"),
    )
    .await
    .unwrap();
    wait_for(&db, COMPLETED_TASKS)
        .until(|c| c == TASKS + 1, "the snoozed task completed")
        .await;
    assert_eq!(runs.load(Ordering::SeqCst) as i64, TASKS + 2);
    client.stop().await.unwrap();
    drop(conn);
    drop(db);
    drop(scratch);
    drop(cluster);
}

/// A fast claim takes at most 1,000 tasks whatever it asks for: an idle pool asking for more,
/// woken once for more, must not take the short claim for a drained queue and wait for its poll
/// (a minute here) with the rest of the tasks left behind.
#[tokio::test]
async fn a_pool_asking_for_more_than_a_fast_claim_takes_drains_a_bulk_enqueue() {
    const TASKS: usize = 1500;
    let t = test_db().await;
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let pool = WorkerPool::builder()
        .queue("big")
        .concurrency(4)
        .prefetch(2000)
        .max_batch(2000)
        .poll_interval(Duration::from_secs(60))
        .handler("k", move |_ctx, _p: serde_json::Value| {
            r.fetch_add(1, Ordering::SeqCst);
            async move { Ok(TaskOutcome::Complete) }
        })
        .build()
        .unwrap();
    let client = start_client(&t, "big", Some(pool), false).await;
    wait_waiters(&t.db, "big", 1).await;
    // Past the pool's second look after it registered.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Written in SQL, then one wake-up (a bulk enqueue's notifications may trickle in and
    // wake the pool again by chance).
    t.db.get()
        .await
        .unwrap()
        .batch_execute(&format!(
            "INSERT INTO pgcrew.tasks (queue, kind, payload) \
             SELECT 'big', 'k', '{{}}' FROM generate_series(1, {TASKS}); \
             SELECT pgcrew.wake_queues(ARRAY['big'])"
        ))
        .await
        .unwrap();
    wait_until(
        Duration::from_secs(20),
        "every task of the bulk enqueue runs",
        || async { runs.load(Ordering::SeqCst) == TASKS },
    )
    .await;
    client.stop().await.unwrap();
}

/// Wait (up to 10 s) until `n` pools wait on `queue`.
async fn wait_waiters(db: &pgcrew::Db, queue: &str, n: i64) {
    let sql = format!("SELECT count(*) FROM pgcrew.queue_waiters WHERE queue = '{queue}'");
    wait_for(db, &sql)
        .until(|c| c == n, &format!("{n} pools wait on queue {queue}"))
        .await;
}

/// A pool of `queue` whose `concurrency` tasks of kind `k` each count in `started`, then block
/// until `release` gives a permit; only NOTIFY wakes it (the poll is a minute).
fn blocking_pool(
    queue: &str,
    concurrency: usize,
    started: &Arc<AtomicUsize>,
    release: &Arc<tokio::sync::Semaphore>,
) -> Arc<WorkerPool> {
    blocking_builder(queue, concurrency, started, release)
        .build()
        .unwrap()
}

/// [`blocking_pool`]'s builder, for a test that sets more.
fn blocking_builder(
    queue: &str,
    concurrency: usize,
    started: &Arc<AtomicUsize>,
    release: &Arc<tokio::sync::Semaphore>,
) -> pgcrew::queue::WorkerPoolBuilder {
    let (st, rel) = (started.clone(), release.clone());
    WorkerPool::builder()
        .queue(queue)
        .concurrency(concurrency)
        .poll_interval(Duration::from_secs(60))
        .handler("k", move |_ctx, _p: serde_json::Value| {
            st.fetch_add(1, Ordering::SeqCst);
            let rel = rel.clone();
            async move {
                let _permit = rel.acquire().await;
                Ok(TaskOutcome::Complete)
            }
        })
}

/// A wake-up names a pool and a backup. The named pool's instance was killed (`kill -9` of a
/// `pgcrew serve` process) and not yet reaped, so its row stays in `pgcrew.queue_waiters` and
/// enqueues keep naming it in turn: the backup claims those tasks after its short delay. Without
/// the backup they would wait for the other pool's poll (a minute here).
#[tokio::test]
async fn tasks_named_to_a_killed_instance_are_claimed_by_the_backup() {
    let t = test_db().await;
    let mut victim = crate::common::serve(t.dsn(), "named-victim")
        .args(["--queues", "named", "--worker-poll-interval", "60s"])
        .args(["--instance-ttl", "1h", "--leader-ttl", "1h"])
        .quiet()
        .spawn();
    let victims_row = "SELECT count(*) FROM pgcrew.queue_waiters \
                       WHERE queue = 'named' AND instance_id = 'named-victim'";
    wait_for(&t, victims_row)
        .within(Duration::from_secs(30))
        .until(|n| n == 1, "the serve process waits on queue named")
        .await;
    let runs = Arc::new(AtomicUsize::new(0));
    let pool = notify_only_pool("named", 4, &runs);
    let client = start_client(&t, "named-backup", Some(pool), false).await;
    wait_waiters(&t, "named", 2).await;
    victim.child.kill().unwrap();
    victim.child.wait().unwrap();
    let conn = t.db.get().await.unwrap();
    for i in 1..=10 {
        let what = format!("task #{i} is claimed though every other one names the dead pool");
        enqueue_and_count_to(&conn, &task("k").queue("named"), &runs, i, &what).await;
    }
    assert_eq!(
        crate::common::scalar(&t.db, victims_row).await,
        1,
        "the killed instance's pool was named all along"
    );
    client.stop().await.unwrap();
}

/// Several single-statement enqueues in one transaction whose wake-ups name the same pool fold
/// into one NOTIFY. That pool takes what it can, fills up and leaves the waiters; as work is
/// left on its queue, leaving wakes the other waiting pools (not only the backup), which take
/// the rest at once instead of at their poll.
#[tokio::test]
async fn a_named_pool_that_fills_up_hands_the_rest_to_the_other_waiters() {
    let t = test_db().await;
    let started = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let mut clients = Vec::new();
    for i in 0..3 {
        let pool = blocking_pool("handon", 1, &started, &release);
        clients.push(start_client(&t, &format!("handon-{i}"), Some(pool), false).await);
    }
    wait_waiters(&t, "handon", 3).await;
    // Task ids three apart (a task elsewhere in between) name the same pool and backup.
    let mut conn = t.db.get().await.unwrap();
    let tx = conn.transaction().await.unwrap();
    let mut ids = Vec::new();
    for i in 0..7 {
        let q = if i % 3 == 0 { "handon" } else { "elsewhere" };
        let id = queue::enqueue(&tx, &task("k").queue(q)).await.unwrap().id;
        if i % 3 == 0 {
            ids.push(id.0);
        }
    }
    tx.commit().await.unwrap();
    assert!(
        ids.iter().all(|id| id % 3 == ids[0] % 3),
        "the three tasks name one pool: {ids:?}"
    );
    wait_until(
        Duration::from_secs(5),
        "every pool takes a task",
        || async { started.load(Ordering::SeqCst) == 3 },
    )
    .await;
    release.add_permits(100);
    for c in clients {
        c.stop().await.unwrap();
    }
}

/// An enqueue reads the waiters when its statement starts and NOTIFYs when it commits. One whose
/// statement ran while the only pool was busy (no waiter) and whose transaction committed after
/// the pool had freed its slot, registered, claimed once more and been woken by its
/// acknowledgement's flush (finding nothing each time: the task was not committed yet) notified
/// nobody, and the task waited for the pool's poll (a minute here). A pool that has just
/// registered looks once more `recheck_after` later (100 ms by default). The test commits a few
/// milliseconds after the registration; the pool's second look is set 3 s out, so a loaded
/// machine cannot make the commit miss it (at 100 ms it once did in CI). The task is claimed
/// at that second look; without it, at the poll a minute later.
#[tokio::test]
async fn an_enqueue_racing_a_pools_registration_is_found_by_its_second_look() {
    let t = test_db().await;
    let started = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let pool = blocking_builder("race", 1, &started, &release)
        .recheck_after(Duration::from_secs(3))
        .build()
        .unwrap();
    let client = start_client(&t, "race", Some(pool), false).await;
    wait_waiters(&t, "race", 1).await;
    let conn = t.db.get().await.unwrap();
    let what = "the first task starts";
    enqueue_and_count_to(&conn, &task("k").queue("race"), &started, 1, what).await;
    // Its one slot blocked, the pool leaves the waiters.
    wait_waiters(&t, "race", 0).await;
    let mut racing = t.db.get().await.unwrap();
    let tx = racing.transaction().await.unwrap();
    queue::enqueue(&tx, &task("k").queue("race")).await.unwrap();
    // The pool frees its slot, claims (nothing committed), registers and claims again; its
    // acknowledgement's flush wakes it once more (nothing committed yet either).
    release.add_permits(1);
    let settled = "SELECT (SELECT count(*) FROM pgcrew.queue_waiters WHERE queue = 'race') \
                        + (SELECT count(*) FROM pgcrew.tasks \
                            WHERE queue = 'race' AND state = 'completed')";
    while crate::common::scalar(&t.db, settled).await < 2 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    tx.commit().await.unwrap();
    wait_until(
        Duration::from_secs(15),
        "the racing task starts",
        || async { started.load(Ordering::SeqCst) == 2 },
    )
    .await;
    release.add_permits(10);
    client.stop().await.unwrap();
}
