//! Poison acknowledgements: refused batches split, values clamped and sanitised, the SQL
//! acknowledgement function validated, bounded error histories.

use super::*;

/// How many task executions recorded in table `executions` repeat an earlier one's task.
async fn duplicate_executions(t: &TestDb) -> i64 {
    scalar(
        t,
        "SELECT count(*) - count(DISTINCT task_id) FROM executions",
    )
    .await
}

/// 10,000 tasks; 1 % of handlers fail with an error text holding a NUL byte, 1 % snooze for
/// `Duration::MAX`. Every other task completes exactly once, and no task runs twice.
#[tokio::test]
async fn poison_acks_never_hold_back_a_batch() {
    let t = test_db().await;
    let tasks: Vec<NewTask> = (0..10_000)
        .map(|i| NewTask::new("edge", &serde_json::json!({ "i": i })).unwrap())
        .collect();
    let ddl = "CREATE TABLE executions (task_id bigint NOT NULL, i int NOT NULL)";
    setup_and_enqueue(&t, ddl, &tasks, 5_000).await;
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
    let dups = duplicate_executions(&t).await;
    assert_eq!(dups, 0, "{dups} duplicate executions");
    assert!(settled, "the tasks never settled");
    for c in &clients {
        c.stop().await.unwrap();
    }
    assert_eq!(scalar(&t, "SELECT count(*) FROM executions").await, 10_000);
    for (tasks_where, expected) in [
        (
            "(payload->>'i')::int % 100 NOT IN (7, 13) AND state = 'completed'",
            9_800,
        ),
        // The failures are kept, with the NUL made visible.
        (
            "(payload->>'i')::int % 100 = 7 AND state = 'retryable' AND attempts = 1
                AND last_error LIKE 'bad' || chr(9216) || 'byte in task %'
                AND jsonb_array_length(errors) = 1",
            100,
        ),
        // The snoozes are clamped to the documented maximum delay (years away), not lost.
        (
            "(payload->>'i')::int % 100 = 13 AND state = 'scheduled' AND attempts = 0
                AND run_at > now() + interval '9 years'",
            100,
        ),
    ] {
        let sql = format!("SELECT count(*) FROM pgcrew.tasks WHERE {tasks_where}");
        assert_eq!(scalar(&t, &sql).await, expected, "{tasks_where}");
    }
}

/// A batch the database refuses (here a trigger rejects one task's completion) is split and
/// retried in parts: every other acknowledgement of the batch is applied once, and the one
/// refused on its own is counted and left to the rescue.
#[tokio::test]
async fn a_refused_batch_is_split_and_the_rest_applied() {
    let t = test_db().await;
    let tasks: Vec<NewTask> = (0..300).map(|_| task("edge")).collect();
    let ddl = "CREATE TABLE executions (task_id bigint NOT NULL)";
    let ids = setup_and_enqueue(&t, ddl, &tasks, tasks.len()).await;
    let conn = t.db.get().await.unwrap();
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
    let builder = WorkerPool::builder()
        .concurrency(4)
        .prefetch(300)
        .max_batch(300)
        .heartbeat_interval(Duration::from_millis(500));
    let pool = recording_handler(builder, "edge", "executions")
        .build()
        .unwrap();
    let metrics = pool.metrics().clone();
    let client = start(&t, "splitter", pool, false).await;
    let applied = eventually(Duration::from_secs(60), || async {
        scalar(&t, COMPLETED_TASKS).await == 299 && metrics.snapshot().rejected_acks >= 1
    })
    .await;
    let dups = duplicate_executions(&t).await;
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
    let (_t, me, conn) = db_with_instance_conn("acker").await;
    let tasks: Vec<NewTask> = (0..5).map(|_| task("k").max_attempts(5)).collect();
    queue::enqueue_many(&conn, &tasks).await.unwrap();
    let c = queue::claim(&conn, &qs(&["default"]), 10, &me)
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
    let rep = queue::ack(&conn, &acks).await.unwrap();
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
    let (t, me, conn) = db_with_instance_conn("sqlacker").await;
    let tasks: Vec<NewTask> = (0..3).map(|_| task("k")).collect();
    queue::enqueue_many(&conn, &tasks).await.unwrap();
    let c = queue::claim(&conn, &qs(&["default"]), 10, &me)
        .await
        .unwrap();
    let ids: Vec<i64> = c.iter().map(|x| x.id.0).collect();
    let tokens: Vec<uuid::Uuid> = c.iter().map(|x| x.token.as_uuid()).collect();
    for outcomes in [
        // Unknown outcome: refused, nothing changed.
        "ARRAY['complete', 'explode', 'complete']",
        // Arrays of different lengths: refused.
        "ARRAY['complete']",
    ] {
        let sql = format!("SELECT * FROM pgcrew.ack_tasks($1, $2, {outcomes}, NULL, NULL)");
        let err = conn.query(&sql, &[&ids, &tokens]).await.unwrap_err();
        assert_eq!(err.code().map(|c| c.code()), Some("PC020"), "{err:?}");
    }
    assert_eq!(scalar(&t, RUNNING_TASKS).await, 3);
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
    let (_t, me, conn) = db_with_instance_conn("failer").await;
    let id = enqueued(&conn, &task("k").max_attempts(1000)).await.id;
    for n in 0..120 {
        let c = queue::claim(&conn, &qs(&["default"]), 1, &me)
            .await
            .unwrap();
        assert_eq!(c.len(), 1, "cycle {n}");
        let rep = queue::ack(
            &conn,
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
