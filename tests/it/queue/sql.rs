//! Enqueue, claim and acknowledge at the SQL level: tokens, executors, input checks, unique
//! keys and the fast claim's plans.

use std::time::Duration;

use pgcrew::queue::{self, Ack, AckOutcome, NewTask, TaskState};
use pgcrew::{ClaimToken, Client, Error, InstanceId, TaskId, TenantId};

use super::{completed, config, q, state_of, wait_state};
use crate::common::{
    assert_invalid_input, create_tenant, db_with_instance_conn, enqueued, register_instance,
    scalar, start_leader, task, test_db,
};

#[tokio::test]
async fn claim_and_ack_with_stale_token_rejected() {
    let (t, me, conn) = db_with_instance_conn("w1").await;
    let e = enqueued(&conn, &task("k").queue("q1")).await;
    assert_eq!(e.state, TaskState::Available);
    assert!(!e.duplicate);
    let claimed = queue::claim(&conn, &q("q1"), 10, &me).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].id, e.id);
    assert_eq!(claimed[0].attempt, 1);
    assert!(
        queue::claim(&conn, &q("q1"), 10, &me)
            .await
            .unwrap()
            .is_empty()
    );

    // A wrong token is rejected and changes nothing.
    let bad = completed(e.id, ClaimToken::new());
    let rep = queue::ack(&conn, std::slice::from_ref(&bad)).await.unwrap();
    assert_eq!(rep.stale, vec![e.id]);
    assert!(rep.applied.is_empty());
    assert_eq!(state_of(&t, e.id).await, TaskState::Running);

    let good = completed(e.id, claimed[0].token);
    let rep = queue::ack(&conn, std::slice::from_ref(&good))
        .await
        .unwrap();
    assert_eq!(rep.applied, vec![(e.id, TaskState::Completed)]);
    // Acking again (e.g. a duplicate after a retry) is stale too.
    let rep = queue::ack(&conn, &[good]).await.unwrap();
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
    start_leader(&leader, Duration::from_secs(5)).await;
    let conn = t.db.get().await.unwrap();
    let e = queue::enqueue(&conn, &task("k")).await.unwrap();
    // Claimed by an instance that is not registered: maintenance rescues it.
    let ghost = InstanceId::new("ghost").unwrap();
    let first = queue::claim(&conn, &q("default"), 1, &ghost).await.unwrap();
    assert_eq!(first.len(), 1);
    let report = leader.run_maintenance().await.unwrap();
    assert!(report.count("rescue_tasks") <= 1);
    // The pass the leader runs when elected may be rescuing it at the same time (the row is then
    // locked and skipped by ours): wait for that pass to commit.
    let what = "the rescue of the ghost's task committed";
    wait_state(
        &t,
        e.id,
        TaskState::Retryable,
        Duration::from_secs(10),
        what,
    )
    .await;
    let row = queue::get(&conn, e.id).await.unwrap();
    assert_eq!(row.state, TaskState::Retryable);
    assert!(row.last_error.unwrap().contains("rescued"));
    // Reclaimed by a live instance; the ghost's late ack is rejected, the new one applies.
    let live = queue::claim(&conn, &q("default"), 1, leader.instance_id())
        .await
        .unwrap();
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].attempt, 2);
    let stale = queue::ack(&conn, &[completed(e.id, first[0].token)])
        .await
        .unwrap();
    assert_eq!(stale.stale, vec![e.id]);
    assert_eq!(state_of(&t, e.id).await, TaskState::Running);
    let ok = queue::ack(&conn, &[completed(e.id, live[0].token)])
        .await
        .unwrap();
    assert_eq!(ok.applied, vec![(e.id, TaskState::Completed)]);

    // A live instance whose heartbeat on a task went stale loses it too; out of attempts, the
    // task is discarded with the reason kept.
    let last = enqueued(&conn, &task("k").max_attempts(1)).await;
    let c = queue::claim(&conn, &q("default"), 1, leader.instance_id())
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
    let what = "the rescue of the stale task committed";
    wait_state(
        &t,
        last.id,
        TaskState::Discarded,
        Duration::from_secs(10),
        what,
    )
    .await;
    let row = queue::get(&conn, last.id).await.unwrap();
    assert_eq!(row.state, TaskState::Discarded);
    assert!(row.last_error.unwrap().contains("rescued"));
    leader.stop().await.unwrap();
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
    let err = queue::enqueue(&conn, &big).await.unwrap_err();
    assert_invalid_input(&err, "payload");
    assert!(err.to_string().contains("at most"), "{err}");
    let err = queue::enqueue_many(&conn, &[task("k"), big])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("task #1"), "{err}");
    let err = queue::enqueue(&conn, &task("k").depends_on([TaskId(424242)]))
        .await
        .unwrap_err();
    assert_invalid_input(&err, "depends_on");
    assert!(err.to_string().contains("424242"), "{err}");
    let err = queue::enqueue(&conn, &task("k").tenant(TenantId::new("nobody").unwrap()))
        .await
        .unwrap_err();
    assert_invalid_input(&err, "tenant");
    let err = queue::enqueue_many(
        &conn,
        &[
            task("k"),
            task("k").tenant(TenantId::new("nobody").unwrap()),
        ],
    )
    .await
    .unwrap_err();
    assert_invalid_input(&err, "tenant");
    assert_eq!(scalar(&t, "SELECT count(*) FROM pgcrew.tasks").await, 0);
    // A tenant with tasks cannot be deleted from under them.
    let gone = create_tenant(&t, "gone", None).await;
    enqueued(&conn, &task("k").tenant(gone)).await;
    let del = conn
        .execute("DELETE FROM pgcrew.tenants WHERE id = 'gone'", &[])
        .await
        .unwrap_err();
    assert_eq!(del.code().map(|c| c.code()), Some("23503"), "{del}");
}

#[tokio::test]
async fn unique_keys_dedupe_among_unfinished_tasks() {
    let (t, me, conn) = db_with_instance_conn("w").await;
    let a = enqueued(&conn, &task("k").unique_key("u1")).await;
    let b = enqueued(&conn, &task("k").unique_key("u1")).await;
    assert!(!a.duplicate);
    assert!(b.duplicate);
    assert_eq!(a.id, b.id);
    // Other tenant or other queue: not a duplicate.
    let other = create_tenant(&t, "other", None).await;
    let c = enqueued(&conn, &task("k").unique_key("u1").tenant(other)).await;
    assert!(!c.duplicate);
    // Bulk: duplicates (with existing rows and within the batch) are skipped.
    let ids = queue::enqueue_many(
        &conn,
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
    let claimed = queue::claim(&conn, &q("default"), 10, &me).await.unwrap();
    let acks: Vec<Ack> = claimed
        .iter()
        .map(|c| c.ack(AckOutcome::Complete))
        .collect();
    queue::ack(&conn, &acks).await.unwrap();
    let d = enqueued(&conn, &task("k").unique_key("u1")).await;
    assert!(!d.duplicate);
    assert_ne!(d.id, a.id);
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
    // The statement in pgcrew.claim_fast; the function itself plans it generically (V048).
    let claim_fast = claim_fast_statement(&t.db).await;
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
    // And it does what it is for: two tenants with work, so it claims nothing and steps aside
    // (one row without a task: the general path shares the batch).
    let me = register_instance(&t, "w").await;
    let token = uuid::Uuid::new_v4();
    let rows = conn
        .query(
            include_str!("../../../sql/queries/queue/claim_fast.sql"),
            &[&"default", &10i32, &me.as_str(), &token],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, Option<i64>>("id"), None);
}

/// Issue #23: the fast claim steps over the entries its earlier claims left in
/// tasks_available_idx (dead until VACUUM, at the head of the queue's range) once, in its own
/// ordered scan; its tenant probes read from the range's end. The tenant probe used to read from
/// the head, over every claimed task's entry: with 30,000 tasks claimed since the last vacuum,
/// ~215 index pages for it as for the claim, so a claim's cost grew twice as fast with a run's
/// length (a 1,000,000-task `bench queue` ran at a fifth of the raw loop). Read by
/// `EXPLAIN (ANALYZE, BUFFERS)`: pages, not time.
#[tokio::test]
async fn fast_claim_probes_skip_the_entries_of_claimed_tasks() {
    let t = test_db().await;
    let conn = t.db.get().await.unwrap();
    // 40,000 available tasks, of which the first 30,000 are then claimed (the claim's own
    // update: running, out of the partial index), with no vacuum in between.
    conn.batch_execute(
        "ALTER TABLE pgcrew.tasks SET (autovacuum_enabled = off); \
         INSERT INTO pgcrew.tasks (queue, kind, payload) \
           SELECT 'default', 'k', jsonb_build_object('i', g) FROM generate_series(1, 40000) g; \
         ANALYZE pgcrew.tasks; \
         UPDATE pgcrew.tasks SET state = 'running', attempts = 1, claimed_by = 'w', \
                claim_token = gen_random_uuid(), claimed_at = now(), heartbeat_at = now() \
          WHERE id <= 30000",
    )
    .await
    .unwrap();
    let me = register_instance(&t, "w").await;
    let claim_fast = include_str!("../../../sql/queries/queue/claim_fast.sql");
    // A first claim marks the claimed tasks' entries dead (as the pool's claims do), then a
    // second one is measured, rolled back: the statement in pgcrew.claim_fast (V048), whose
    // plan the call's EXPLAIN does not show.
    let token = uuid::Uuid::new_v4();
    let rows = conn
        .query(claim_fast, &[&"default", &100i32, &me.as_str(), &token])
        .await
        .unwrap();
    assert_eq!(rows.len(), 100);
    conn.batch_execute("BEGIN").await.unwrap();
    let explain = format!(
        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {}",
        claim_fast_statement(&t.db).await
    );
    let plan: serde_json::Value = conn
        .query_one(&explain, &[&"default", &100i32, &me.as_str(), &token])
        .await
        .unwrap()
        .get(0);
    conn.batch_execute("ROLLBACK").await.unwrap();
    let mut reads = Vec::new();
    available_index_reads(&plan[0]["Plan"], &mut reads);
    reads.sort_unstable();
    // The claim's own scan steps over the ~215 pages of dead entries; every other read of the
    // index (the probes: the tenant, another tenant) reads a few pages.
    let (claim_scan, probes) = reads.split_last().expect("scans of tasks_available_idx");
    assert!(
        *claim_scan > 150,
        "the claim's scan read {claim_scan} pages: the test did not leave dead entries"
    );
    assert!(
        probes.iter().all(|&p| p < 30),
        "the probes of tasks_available_idx read {probes:?} pages (the claim's scan {claim_scan}): \
         they stepped over the claimed tasks' entries\n{plan:#}"
    );
}

/// Shared buffers (hit + read) of each node of `plan` that scans tasks_available_idx.
fn available_index_reads(plan: &serde_json::Value, out: &mut Vec<i64>) {
    if plan["Index Name"] == "tasks_available_idx" {
        let n = |k: &str| plan[k].as_i64().unwrap_or(0);
        out.push(n("Shared Hit Blocks") + n("Shared Read Blocks"));
    }
    for child in plan["Plans"].as_array().into_iter().flatten() {
        available_index_reads(child, out);
    }
}

/// Issue #23: an acknowledgement finds its tasks by primary key, whatever the number of
/// running tasks. Its plan (cached by PL/pgSQL after five calls, with statistics taken while
/// nothing ran) joined the batch to the whole of tasks_running_idx: every running task of every
/// queue was read for each acknowledgement (V042).
#[tokio::test]
async fn ack_reads_only_its_own_tasks() {
    let t = test_db().await;
    let c = t.get().await.unwrap();
    seed_running(&c, "w").await;
    let running_idx_reads = async || running_index_reads(&c).await;
    // Ten acknowledgements of one task each: the last ones run PL/pgSQL's cached plan.
    let ack = "SELECT count(*) FROM pgcrew.ack_tasks(ARRAY[$1::bigint],
                   ARRAY[(SELECT claim_token FROM pgcrew.tasks WHERE id = $1::bigint)],
                   ARRAY['complete'], NULL, NULL)";
    for id in 1..=8_i64 {
        let n: i64 = c.query_one(ack, &[&id]).await.unwrap().get(0);
        assert_eq!(n, 1);
    }
    let before = running_idx_reads().await;
    for id in 9..=10_i64 {
        let n: i64 = c.query_one(ack, &[&id]).await.unwrap().get(0);
        assert_eq!(n, 1);
    }
    let read = running_idx_reads().await - before;
    assert!(
        read < 100,
        "two acknowledgements read {read} entries of tasks_running_idx (390 tasks running)"
    );
    assert_eq!(
        scalar(
            &t,
            "SELECT count(*) FROM pgcrew.tasks WHERE state = 'completed'"
        )
        .await,
        10
    );
}

/// Issue #23: a heartbeat finds the held tasks by primary key, whatever the number of running
/// tasks (its cached generic plan read the whole of tasks_running_idx).
#[tokio::test]
async fn heartbeat_reads_only_the_held_tasks() {
    let (t, me, conn) = db_with_instance_conn("w1").await;
    let c = t.get().await.unwrap();
    seed_running(&c, "other").await;
    let claimed = queue::claim(&conn, &q("q"), 2, &me).await.unwrap();
    assert_eq!(claimed.len(), 2);
    let ids: Vec<TaskId> = claimed.iter().map(|t| t.id).collect();
    let running_idx_reads = async || running_index_reads(&conn).await;
    // The same prepared statement eight times: the last ones run its generic plan.
    for _ in 0..8 {
        let rep = queue::heartbeat(&conn, &me, &ids).await.unwrap();
        assert_eq!(rep.alive.len(), 2);
    }
    let before = running_idx_reads().await;
    for _ in 0..2 {
        let rep = queue::heartbeat(&conn, &me, &ids).await.unwrap();
        assert_eq!(rep.alive.len(), 2);
    }
    let read = running_idx_reads().await - before;
    assert!(
        read < 100,
        "two heartbeats read {read} entries of tasks_running_idx (402 tasks running)"
    );
}

/// A heartbeat never waits for a held task another transaction has locked (40P01 seen in CI
/// logs): it skipped nothing and waited, in id order, so a transaction that enqueues dependants
/// of two held tasks, the higher id first, deadlocked with it. Now the locked task is reported
/// busy (still alive), the other one is heartbeated, and the transaction goes through.
#[tokio::test]
async fn a_heartbeat_does_not_wait_for_a_held_task_another_transaction_locked() {
    let (t, me, conn) = db_with_instance_conn("w1").await;
    enqueued(&conn, &task("k").queue("q")).await;
    enqueued(&conn, &task("k").queue("q")).await;
    let mut claimed = queue::claim(&conn, &q("q"), 2, &me).await.unwrap();
    claimed.sort_by_key(|c| c.id);
    let (low, high) = (claimed[0].id, claimed[1].id);

    // A transaction enqueues a dependant of the higher task first: it holds that task's row.
    let mut dependants = t.db.get().await.unwrap();
    let tx = dependants.transaction().await.unwrap();
    enqueued(&*tx, &task("child").queue("children").depends_on([high])).await;

    // The heartbeat of both, beside it.
    let beat = {
        let (db, me) = (t.db.clone(), me.clone());
        tokio::spawn(async move {
            let c = db.get().await.unwrap();
            queue::heartbeat(&c, &me, &[low, high]).await
        })
    };
    // Until the heartbeat has answered or waits for a lock.
    for _ in 0..500 {
        let waiting = scalar(
            &t,
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .await;
        if beat.is_finished() || waiting > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Then the transaction enqueues a dependant of the lower task, and commits.
    let second = queue::enqueue(&*tx, &task("child").queue("children").depends_on([low])).await;
    let committed = match second {
        Ok(_) => tx.commit().await.map_err(Error::from),
        Err(e) => Err(e),
    };
    let rep = beat.await.unwrap();
    assert!(
        committed.is_ok(),
        "the enqueuing transaction failed: {committed:?}"
    );
    let rep = rep.expect("the heartbeat failed");
    let mut alive = rep.alive.clone();
    alive.sort();
    assert_eq!(alive, vec![low, high], "both tasks are still held");
    assert_eq!(rep.busy, vec![high], "the locked task is reported busy");
    assert!(rep.cancel_requested.is_empty());
    assert_eq!(
        scalar(
            &t,
            "SELECT count(*) FROM pgcrew.tasks WHERE queue = 'children' AND state = 'scheduled'"
        )
        .await,
        2
    );
    // Unlocked, the next heartbeat writes both.
    let rep = queue::heartbeat(&conn, &me, &[low, high]).await.unwrap();
    assert_eq!(rep.alive.len(), 2);
    assert!(rep.busy.is_empty());
}

/// 2,000 tasks of queue `q`, the first 400 running on instance `by`.
async fn seed_running(c: &tokio_postgres::Client, by: &str) {
    c.execute(
        "INSERT INTO pgcrew.tasks (queue, kind, payload)
         SELECT 'q', 'k', jsonb_build_object('i', g) FROM generate_series(1, 2000) g",
        &[],
    )
    .await
    .unwrap();
    c.batch_execute("ANALYZE pgcrew.tasks").await.unwrap();
    c.execute(
        "UPDATE pgcrew.tasks SET state = 'running', attempts = 1, claimed_by = $1,
                claim_token = gen_random_uuid(), claimed_at = now(), heartbeat_at = now()
          WHERE id <= 400",
        &[&by],
    )
    .await
    .unwrap();
}

/// Index entries read from `tasks_running_idx` so far (statistics flushed first).
async fn running_index_reads(c: &tokio_postgres::Client) -> i64 {
    c.batch_execute("SELECT pg_stat_force_next_flush()")
        .await
        .unwrap();
    c.batch_execute("SELECT pg_stat_clear_snapshot()")
        .await
        .unwrap();
    c.query_one(
        "SELECT idx_tup_read FROM pg_stat_user_indexes
          WHERE indexrelname = 'tasks_running_idx'",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// The statement `pgcrew.claim_fast` runs (V048), as the database holds it, with the
/// function's arguments turned back into parameters `$1`-`$4`: what its plans are read from.
async fn claim_fast_statement(db: &pgcrew::Db) -> String {
    crate::common::function_statement(
        db,
        "pgcrew.claim_fast",
        &[
            ("p_queue", "$1::text"),
            ("p_limit", "$2::integer"),
            ("p_instance", "$3::text"),
            ("p_token", "$4::uuid"),
        ],
    )
    .await
}
