//! The queue's hot statements keep one plan (issue #23): PostgreSQL's plan cache plans a
//! prepared statement (and a PL/pgSQL statement) for its parameters' values five times, then
//! keeps the generic plan only if it does not look costlier than those. The fast claims and
//! the acknowledgement's key-limit check looked costlier, so they were planned again on every
//! call: ~0.5 ms for a claim (more than running it), ~0.16 ms for an acknowledgement's check
//! (for 0.005 ms of work). A claim could also fall into plans made for its values for good
//! once the statistics changed (V048): the claims' statements now run in PL/pgSQL functions
//! that keep their generic plans. An enqueue sent unnamed (behind PgBouncer, or on a plain
//! client) calls the function form of its statement (V049). Counted, not timed:
//! `pg_prepared_statements` for the prepared statements, the planner's statistics log lines
//! for everything a call plans, `pg_stat_statements` for the enqueue's plans.

use pgcrew::queue;

use crate::common::{drain, planned, register_instance, test_db};

/// The two single-statement claims (calls of `pgcrew.claim_fast` and `claim_fast_limited`
/// since V048), by name.
const CLAIMS: [(&str, &str); 2] = [
    (
        "claim_fast",
        include_str!("../../../sql/queries/queue/claim_fast.sql"),
    ),
    (
        "claim_fast_limited",
        include_str!("../../../sql/queries/queue/claim_fast_limited.sql"),
    ),
];

/// Available tasks of queue `default`, a long queue as the plan cache saw it under load.
const SEED: &str = "INSERT INTO pgcrew.tasks (queue, kind, payload) \
                      SELECT 'default', 'k', jsonb_build_object('i', g) \
                        FROM generate_series(1, 20000) g; \
                    ANALYZE pgcrew.tasks";

/// Both single-statement claims, prepared on a connection of their own, as a worker pool's
/// fetcher meets them: its first calls see a short queue, the later ones a long one. The first
/// five calls are planned for their values (as every prepared statement's); from the sixth the
/// generic plan is used. Before, every call was planned: the values gave better estimates, or
/// the generic plan, costed on the long queue, looked dearer than the first calls' plans.
/// (Since V048 the statements prepared are calls of `pgcrew.claim_fast` and
/// `claim_fast_limited`; what those plan is counted by the next test.)
#[tokio::test]
async fn fast_claims_keep_their_generic_plan() {
    let t = test_db().await;
    let conn = t.db.get().await.unwrap();
    let me = register_instance(&t, "w").await;
    let (c, _driver, _notes) = pgcrew::Db::connect_dedicated(t.db.config()).await.unwrap();
    for (name, sql) in CLAIMS {
        conn.batch_execute(
            "DELETE FROM pgcrew.tasks; \
             INSERT INTO pgcrew.tasks (queue, kind) SELECT 'default', 'k' FROM generate_series(1, 20); \
             ANALYZE pgcrew.tasks",
        )
        .await
        .unwrap();
        c.batch_execute(&format!(
            "PREPARE {name}(text, integer, text, uuid) AS {sql}"
        ))
        .await
        .unwrap();
        for i in 0..10 {
            if i == 5 {
                conn.batch_execute(SEED).await.unwrap();
            }
            // EXECUTE takes no bind parameters: the instance id is spelt out.
            c.batch_execute(&format!(
                "EXECUTE {name}('default', 100, '{me}', gen_random_uuid())"
            ))
            .await
            .unwrap();
        }
        let row = c
            .query_one(
                "SELECT custom_plans, generic_plans FROM pg_prepared_statements WHERE name = $1",
                &[&name],
            )
            .await
            .unwrap();
        let (custom, generic): (i64, i64) = (row.get(0), row.get(1));
        assert_eq!(
            (custom, generic),
            (5, 5),
            "{name}: {custom} calls planned for their values and {generic} with the generic \
             plan (ten calls): the statement is planned again on every call"
        );
    }
    // The constant that bounds the estimates bounds the claim: at most 1,000 tasks a statement.
    let claimed = conn
        .query(
            include_str!("../../../sql/queries/queue/claim_fast.sql"),
            &[&"default", &5000i32, &me.as_str(), &uuid::Uuid::new_v4()],
        )
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1000);
}

/// The plan cache's trap (V048): a claim prepared while the queue was empty, then run once
/// the statistics show a table full of other queues' work, then again once those are gone.
/// As a prepared statement of its own the claim went over to plans made for its values in the
/// second step (the generic plan, built then, cost more than the empty queue's plans) and
/// never came back, since the cache costs a generic plan again only when it builds one: every
/// claim of the third step was planned (~0.5 ms each on a wake-up's path). Now each statement
/// of the claim is planned only when its plan is invalidated (the first call after an
/// ANALYZE). Counted from the planner's statistics lines, both claims, prepared with the
/// types a worker pool's fetcher gives them.
#[tokio::test]
async fn claims_are_not_planned_again_once_the_queue_changes() {
    use tokio_postgres::types::Type;

    let t = test_db().await;
    let conn = t.db.get().await.unwrap();
    let me = register_instance(&t, "w").await;
    let (c, _driver, mut notes) = crate::common::planner_session(&t.db).await;
    for (name, sql) in CLAIMS {
        conn.batch_execute("DELETE FROM pgcrew.tasks; ANALYZE pgcrew.tasks")
            .await
            .unwrap();
        let stmt = c
            .prepare_typed(sql, &[Type::TEXT, Type::INT4, Type::TEXT, Type::UUID])
            .await
            .unwrap();
        let mut claim = async || {
            drain(&mut notes);
            let token = uuid::Uuid::new_v4();
            let rows = c
                .query(&stmt, &[&"default", &100i32, &me.as_str(), &token])
                .await
                .unwrap();
            (rows.len(), planned(&mut notes))
        };
        // 1. The pool's first claims, of an empty queue.
        let mut first = 0;
        for _ in 0..6 {
            first += claim().await.1;
        }
        assert!(
            first > 0,
            "{name}: no planning reported at all: the test does not see the planner's log lines"
        );
        // 2. Other queues' work fills the table and the statistics show it.
        conn.batch_execute(
            "INSERT INTO pgcrew.tasks (queue, kind, payload) \
               SELECT 'q' || (g % 50), 'k', '{}' FROM generate_series(1, 20000) g; \
             ANALYZE pgcrew.tasks",
        )
        .await
        .unwrap();
        for _ in 0..2 {
            claim().await;
        }
        // 3. It is gone again; one task at a time arrives and is claimed, as wake-ups.
        conn.batch_execute("DELETE FROM pgcrew.tasks; ANALYZE pgcrew.tasks")
            .await
            .unwrap();
        let mut plans = Vec::new();
        for _ in 0..10 {
            conn.batch_execute(
                "INSERT INTO pgcrew.tasks (queue, kind, payload) VALUES ('default', 'k', '{}')",
            )
            .await
            .unwrap();
            let (claimed, planned) = claim().await;
            assert_eq!(claimed, 1, "{name}");
            plans.push(planned);
        }
        assert_eq!(
            plans[2..],
            [0; 8],
            "{name}: statements planned per wake-up claim, call by call: {plans:?}"
        );
    }
}

/// An acknowledgement of a queue without key limits, once its session has made its plans,
/// plans nothing: the key-limit check (parameters: the batch's arrays) is not reached. Before
/// (V046) it was planned on every call. Batches of 50 (a pool under load) and of 1 (an idle
/// pool, an agent run): the update itself was planned again for every batch of one, whose plan
/// for the values looked cheaper than the generic one (V051; 1,872 plans in 1,871
/// acknowledgements of `bench agents`).
/// In a queue with a key limit, the check whether the batch freed a key at its bound was
/// planned on every call too (V047 left it so; V051 reads its values through `arg`).
#[tokio::test]
async fn acknowledgements_plan_nothing_once_warm() {
    for (batch, key_limit) in [(50, false), (1, false), (1, true)] {
        let plans = ack_plans(batch, key_limit).await;
        assert!(
            plans[..5].iter().sum::<usize>() > 0,
            "no planning reported at all ({plans:?}): the test does not see the planner's log lines"
        );
        assert_eq!(
            plans[7..],
            [0, 0, 0],
            "statements planned per acknowledgement of {batch} (key limit: {key_limit}), call by call: {plans:?}"
        );
    }
}

/// Statements planned by each of ten acknowledgements of `batch` tasks (claimed on another
/// connection, as a worker pool's batch) on a session of their own; with `key_limit`, the queue
/// has one (1,000 running per payload `i`, which no acknowledgement here brings to its bound).
async fn ack_plans(batch: i32, key_limit: bool) -> Vec<usize> {
    let t = test_db().await;
    let conn = t.db.get().await.unwrap();
    conn.batch_execute(SEED).await.unwrap();
    if key_limit {
        queue::set_key_limit(&t.db, "default", "i", 1000)
            .await
            .unwrap();
    }
    let (c, _driver, mut notes) = crate::common::planner_session(&t.db).await;
    let ack = c
        .prepare(
            "SELECT count(*) FROM pgcrew.ack_tasks($1::bigint[], $2::uuid[], \
                    array_fill('complete'::text, ARRAY[cardinality($1::bigint[])]), NULL, NULL)",
        )
        .await
        .unwrap();
    let me = register_instance(&t, "w").await;
    let queues = ["default".to_string()];
    let mut plans = Vec::new();
    for _ in 0..10 {
        let claimed = queue::claim(&conn, &queues, batch, &me).await.unwrap();
        let ids: Vec<i64> = claimed.iter().map(|c| c.id.0).collect();
        let tokens: Vec<uuid::Uuid> = claimed.iter().map(|c| c.token.as_uuid()).collect();
        drain(&mut notes);
        let acked: i64 = c.query_one(&ack, &[&ids, &tokens]).await.unwrap().get(0);
        assert_eq!(acked, i64::from(batch));
        plans.push(planned(&mut notes));
    }
    plans
}

/// The enqueue's statement (`queue/enqueue_simple.sql`) among `pg_stat_statements`' rows,
/// top-level or run inside `pgcrew.enqueue_simple` (V049): (calls, plans) since the last reset.
async fn enqueue_statement_counts(db: &pgcrew::Db) -> (i64, i64) {
    let row = db
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT coalesce(sum(s.calls), 0)::bigint, coalesce(sum(s.plans), 0)::bigint \
               FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid \
              WHERE d.datname = current_database() \
                AND s.query LIKE '%INSERT INTO pgcrew.tasks AS t (queue, kind, tenant_id, run_id%' \
                AND s.query LIKE '%pgcrew.queue_waiters%'",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// Issue #23: an enqueue without dependencies or unique key is one statement of six CTEs. Sent
/// unnamed — behind PgBouncer (`StatementMode::Unnamed`) or on a caller's plain tokio-postgres
/// client — it was parsed and planned on every call (0.55 ms a call against 0.17 ms
/// prepared, `pgbench`). Those executors now call `pgcrew.enqueue_simple` (V049), whose
/// statement is planned once per session; a pool that keeps its statements still sends the
/// statement itself (the call costs a little more there). Counted with `pg_stat_statements`
/// (nested statements and planning tracked) on a throwaway cluster: ten enqueues each through
/// a plain client and an unnamed-mode pool plan the statement at most once per session.
#[tokio::test]
async fn enqueues_sent_unnamed_plan_their_statement_once() {
    let (cluster, scratch, db) = crate::common::statements_db("enqueue_plans").await;
    let settings = "ALTER DATABASE {db} SET pg_stat_statements.track = 'all'; \
                    ALTER DATABASE {db} SET pg_stat_statements.track_planning = on";
    db.get()
        .await
        .unwrap()
        .batch_execute(&settings.replace("{db}", scratch.name()))
        .await
        .unwrap();
    let (plain, conn) = tokio_postgres::connect(scratch.dsn(), tokio_postgres::NoTls)
        .await
        .unwrap();
    let driver = tokio::spawn(conn);
    let unnamed = pgcrew::Db::connect_with(
        scratch.dsn(),
        pgcrew::db::PoolOptions {
            size: 1,
            statements: pgcrew::db::StatementMode::Unnamed,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let cached = pgcrew::Db::connect(scratch.dsn(), 1, std::time::Duration::from_secs(5))
        .await
        .unwrap();
    let task = crate::common::task("k").queue("unnamed");
    let reset = "SELECT pg_stat_statements_reset()";
    // A plain client, then a pool in unnamed mode (one connection: one session).
    plain.batch_execute(reset).await.unwrap();
    for _ in 0..10 {
        queue::enqueue(&plain, &task).await.unwrap();
    }
    let (calls, plans) = enqueue_statement_counts(&db).await;
    assert_eq!(calls, 10, "plain client");
    assert!(plans <= 1, "plain client: {plans} plans in {calls} calls");
    plain.batch_execute(reset).await.unwrap();
    let conn = unnamed.get().await.unwrap();
    for _ in 0..10 {
        queue::enqueue(&conn, &task).await.unwrap();
    }
    let (calls, plans) = enqueue_statement_counts(&db).await;
    assert_eq!(calls, 10, "unnamed pool");
    assert!(plans <= 1, "unnamed pool: {plans} plans in {calls} calls");
    // A pool that keeps its statements sends the statement, not the call.
    plain.batch_execute(reset).await.unwrap();
    let conn = cached.get().await.unwrap();
    for _ in 0..10 {
        queue::enqueue(&conn, &task).await.unwrap();
    }
    let via_function = crate::common::scalar(
        &db,
        "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements \
          WHERE query LIKE '%pgcrew.enqueue_simple(%'",
    )
    .await;
    assert_eq!(
        via_function, 0,
        "a caching pool called pgcrew.enqueue_simple"
    );
    assert_eq!(enqueue_statement_counts(&db).await.0, 10, "caching pool");
    // Through the function an unknown tenant is the same clear error, and nothing is stored.
    let nobody = task
        .clone()
        .tenant(pgcrew::TenantId::new("nobody").unwrap());
    let err = queue::enqueue(&plain, &nobody).await.unwrap_err();
    crate::common::assert_invalid_input(&err, "tenant");
    assert!(err.to_string().contains("nobody"), "{err}");
    let n = crate::common::scalar(&db, "SELECT count(*) FROM pgcrew.tasks").await;
    assert_eq!(n, 30);
    drop((conn, plain, unnamed, cached));
    let _ = driver.await;
    drop(db);
    drop(scratch);
    drop(cluster);
}

/// `pgcrew.enqueue_simple` (V049) runs `queue/enqueue_simple.sql`'s statement: the function's
/// body, its arguments turned back into the file's parameters, is the file's statement (both
/// without comments, whitespace aside). A change to one must be made to the other, in a new
/// migration.
#[tokio::test]
async fn the_enqueue_function_runs_the_files_statement() {
    let t = test_db().await;
    // Longest names first: p_run is a prefix of p_run_at.
    let body = crate::common::function_statement(
        &t.db,
        "pgcrew.enqueue_simple",
        &[
            ("p_max_attempts", "$9"),
            ("p_run_at", "$8"),
            ("p_delay_us", "$7"),
            ("p_payload", "$6"),
            ("p_priority", "$5"),
            ("p_tenant", "$3"),
            ("p_queue", "$1"),
            ("p_kind", "$2"),
            ("p_run", "$4"),
        ],
    )
    .await;
    let file = include_str!("../../../sql/queries/queue/enqueue_simple.sql");
    let statement: String = file
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    let words = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    assert_eq!(words(&body), words(&statement));
}

/// Issue #23: the general claim (`pgcrew.claim_tasks`: several tenants with work, limits, due
/// tasks) takes each tenant's share with a locking scan whose values reached its plan; the plan
/// cache planned it again on every call, once per tenant with work (4,001 plans in 4,000 scans
/// over 2,000 claims of two tenants). So did its claim of a single unlimited tenant (a pool
/// reaches it when the fast claim steps aside for a due retry). V050 reads their values through
/// a one-row `arg` under a constant bound, as the fast claims do. Twelve claims of 10 on a
/// session of their own, with one and with two tenants with work: from the eighth on, a claim
/// plans nothing.
#[tokio::test]
async fn general_claims_plan_their_tenant_scans_once() {
    for tenants in [1, 2] {
        let plans = general_claim_plans(tenants).await;
        assert!(
            plans[..5].iter().sum::<usize>() > 0,
            "no planning reported at all ({plans:?}): the test does not see the planner's log lines"
        );
        assert_eq!(
            plans[7..],
            [0, 0, 0, 0, 0],
            "statements planned per general claim of {tenants} tenant(s), call by call: {plans:?}"
        );
    }
}

/// Statements planned by each of twelve calls of `pgcrew.claim_tasks` (claims of 10) on a
/// session of their own, over 20,000 available tasks shared by `tenants` tenants (1 or 2).
async fn general_claim_plans(tenants: i32) -> Vec<usize> {
    let t = test_db().await;
    let conn = t.db.get().await.unwrap();
    crate::common::create_tenant(&t, "second", None).await;
    conn.execute(
        "INSERT INTO pgcrew.tasks (queue, kind, tenant_id, payload) \
         SELECT 'default', 'k', CASE WHEN g % $1 = 0 THEN 'default' ELSE 'second' END, '{}' \
           FROM generate_series(1, 20000) g",
        &[&tenants],
    )
    .await
    .unwrap();
    conn.batch_execute("ANALYZE pgcrew.tasks").await.unwrap();
    register_instance(&t, "w").await;
    let (c, _driver, mut notes) = crate::common::planner_session(&t.db).await;
    let claim = c
        .prepare(
            "SELECT count(*), count(DISTINCT tenant_id) \
               FROM pgcrew.claim_tasks(ARRAY['default'], 10, 'w')",
        )
        .await
        .unwrap();
    let mut plans = Vec::new();
    for _ in 0..12 {
        drain(&mut notes);
        let row = c.query_one(&claim, &[]).await.unwrap();
        let (claimed, with_work): (i64, i64) = (row.get(0), row.get(1));
        assert_eq!(
            (claimed, with_work),
            (10, i64::from(tenants)),
            "a fair claim"
        );
        plans.push(planned(&mut notes));
    }
    plans
}
