//! The queue's hot statements keep one plan (issue #23): PostgreSQL's plan cache plans a
//! prepared statement (and a PL/pgSQL statement) for its parameters' values five times, then
//! keeps the generic plan only if it does not look costlier than those. The fast claims and
//! the acknowledgement's key-limit check looked costlier, so they were planned again on every
//! call: ~0.5 ms for a claim (more than running it), ~0.16 ms for an acknowledgement's check
//! (for 0.005 ms of work). A claim could also fall into plans made for its values for good
//! once the statistics changed (V048): the claims' statements now run in PL/pgSQL functions
//! that keep their generic plans. Counted, not timed: `pg_prepared_statements` for the
//! prepared statements, the planner's statistics log lines for everything a call plans.

use pgcrew::queue;
use tokio_postgres::AsyncMessage;

use crate::common::{register_instance, test_db};

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

/// The session's messages: every planning of one of its statements arrives as a LOG line
/// (`log_planner_stats`, `client_min_messages = log`).
type Notes = tokio::sync::mpsc::UnboundedReceiver<AsyncMessage>;

/// Forget what the session has reported so far.
fn drain(notes: &mut Notes) {
    while notes.try_recv().is_ok() {}
}

/// Statements planned since the last look: the planner's statistics lines among the messages.
fn planned(notes: &mut Notes) -> usize {
    let mut n = 0;
    while let Ok(m) = notes.try_recv() {
        if matches!(&m, AsyncMessage::Notice(notice) if notice.message() == "PLANNER STATISTICS") {
            n += 1;
        }
    }
    n
}

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
    let (c, _driver, mut notes) = pgcrew::Db::connect_dedicated(t.db.config()).await.unwrap();
    c.batch_execute("SET log_planner_stats = on; SET client_min_messages = log")
        .await
        .unwrap();
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
/// (V046) it was planned on every call.
#[tokio::test]
async fn acknowledgements_plan_nothing_once_warm() {
    let t = test_db().await;
    let conn = t.db.get().await.unwrap();
    conn.batch_execute(SEED).await.unwrap();
    let (c, _driver, mut notes) = pgcrew::Db::connect_dedicated(t.db.config()).await.unwrap();
    // Every planning of a statement of this session is reported to it as a LOG line.
    c.batch_execute("SET log_planner_stats = on; SET client_min_messages = log")
        .await
        .unwrap();
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
        // 50 tasks claimed (on another connection), as a worker pool's batch.
        let claimed = queue::claim(&conn, &queues, 50, &me).await.unwrap();
        let ids: Vec<i64> = claimed.iter().map(|c| c.id.0).collect();
        let tokens: Vec<uuid::Uuid> = claimed.iter().map(|c| c.token.as_uuid()).collect();
        drain(&mut notes);
        let acked: i64 = c.query_one(&ack, &[&ids, &tokens]).await.unwrap().get(0);
        assert_eq!(acked, 50);
        plans.push(planned(&mut notes));
    }
    assert!(
        plans[..5].iter().sum::<usize>() > 0,
        "no planning reported at all ({plans:?}): the test does not see the planner's log lines"
    );
    assert_eq!(
        plans[7..],
        [0, 0, 0],
        "statements planned per acknowledgement, call by call: {plans:?}"
    );
}
