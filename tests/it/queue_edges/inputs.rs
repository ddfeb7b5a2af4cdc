//! Unbounded inputs: the payload limit on every enqueue path and bounded enqueue counts.

use super::*;
use pgcrew::TaskId;
use pgcrew::queue::{Priority, TaskRow};

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
    queue::enqueue(&conn, &ok).await.unwrap();
    queue::enqueue(&conn, &ok.clone().unique_key("u1"))
        .await
        .unwrap();
    queue::enqueue_many(&conn, std::slice::from_ref(&ok))
        .await
        .unwrap();
    assert_eq!(scalar(&t, "SELECT count(*) FROM pgcrew.tasks").await, 3);

    let big = NewTask::new("k", &over).unwrap();
    for (what, r) in [
        ("enqueue", queue::enqueue(&conn, &big).await.map(|_| ())),
        (
            "enqueue with unique key",
            queue::enqueue(&conn, &big.clone().unique_key("u2"))
                .await
                .map(|_| ()),
        ),
        (
            "enqueue_many",
            queue::enqueue_many(&conn, std::slice::from_ref(&big))
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
            queue::enqueue(&conn, &task("k").delay(Duration::MAX))
                .await
                .map(|_| ()),
        ),
        (
            "enqueue_many",
            queue::enqueue_many(&conn, &[task("k").delay(Duration::MAX)])
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
    let err = queue::enqueue_many(&conn, &tasks).await.unwrap_err();
    assert!(
        matches!(err, Error::InvalidInput { field: "tasks", .. }),
        "{err}"
    );
    assert_eq!(scalar(&t, "SELECT count(*) FROM pgcrew.tasks").await, 0);
    queue::enqueue_many(&conn, &tasks[..100_000]).await.unwrap();
    assert_eq!(
        scalar(&t, "SELECT count(*) FROM pgcrew.tasks").await,
        100_000
    );
}

/// `pgcrew.enqueue_task` from SQL with named arguments (issue #18, item 2): only the kind is
/// required, every omitted argument means the library's default, a plain integer priority
/// works, and an explicit NULL or an out-of-range priority is a clear error that stores nothing.
#[tokio::test]
async fn sql_enqueue_takes_named_arguments_with_the_library_defaults() {
    let t = test_db().await;
    let conn = t.db.get().await.unwrap();
    let lib = queue::enqueue(&conn, &task("send_email")).await.unwrap().id;
    let row = conn
        .query_one(
            "SELECT id FROM pgcrew.enqueue_task(p_kind => 'send_email', p_payload => '{}')",
            &[],
        )
        .await
        .unwrap();
    let sql: TaskId = row.get(0);
    let defaults = |r: queue::TaskRow| {
        let TaskRow {
            queue,
            tenant_id,
            priority,
            max_attempts,
            state,
            payload,
            ..
        } = r;
        (queue, tenant_id, priority, max_attempts, state, payload)
    };
    assert_eq!(
        defaults(queue::get(&conn, lib).await.unwrap()),
        defaults(queue::get(&conn, sql).await.unwrap()),
        "the SQL defaults are not the library's"
    );
    let low: TaskId = conn
        .query_one(
            "SELECT id FROM pgcrew.enqueue_task(p_kind => 'k', p_priority => 3, p_queue => 'q')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let low = queue::get(&conn, low).await.unwrap();
    assert_eq!(
        (low.priority, low.queue.as_str()),
        (Priority::Low.as_i16(), "q")
    );
    for (sql, code, names) in [
        (
            "SELECT * FROM pgcrew.enqueue_task(p_queue => 'q')",
            "22004",
            "p_kind",
        ),
        (
            "SELECT * FROM pgcrew.enqueue_task(p_kind => 'k', p_priority => NULL)",
            "22004",
            "p_priority",
        ),
        (
            "SELECT * FROM pgcrew.enqueue_task(p_kind => 'k', p_tenant => NULL)",
            "22004",
            "p_tenant",
        ),
        (
            "SELECT * FROM pgcrew.enqueue_task(p_kind => 'k', p_priority => 9)",
            "23514",
            "p_priority is 9",
        ),
    ] {
        let err = conn.query(sql, &[]).await.unwrap_err();
        let db = err.as_db_error().unwrap();
        assert_eq!(db.code().code(), code, "{sql}: {}", db.message());
        assert!(db.message().contains(names), "{sql}: {}", db.message());
    }
    assert_eq!(scalar(&t, "SELECT count(*) FROM pgcrew.tasks").await, 3);
}
