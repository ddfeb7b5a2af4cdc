//! Bad input to pauses and schedules: a typed error each, nothing stored.

use std::time::Duration;

use pgcrew::Error;
use pgcrew::TenantId;
use pgcrew::queue;
use pgcrew::schedule::{self, NewSchedule, ScheduleSpec};

use crate::common::{cli, scalar, test_db};

fn expect_invalid<T: std::fmt::Debug>(r: pgcrew::Result<T>, field: &str) {
    match r {
        Err(Error::InvalidInput { field: f, .. }) => assert_eq!(f, field),
        other => panic!("expected invalid {field}, got {other:?}"),
    }
}

fn expect_not_found<T: std::fmt::Debug>(r: pgcrew::Result<T>, kind: &str) {
    match r {
        Err(Error::NotFound { kind: k, .. }) => assert_eq!(k, kind),
        other => panic!("expected {kind} not found, got {other:?}"),
    }
}

#[tokio::test]
async fn bad_pauses_and_schedules_are_refused_and_store_nothing() {
    let t = test_db().await;
    // Pausing an unknown queue, or for an unknown tenant.
    expect_not_found(queue::pause(&t.db, "nope", None).await, "queue");
    queue::enqueue(&t.db, &crate::common::task("k").queue("known"))
        .await
        .unwrap();
    let ghost = TenantId::new("ghost").unwrap();
    expect_not_found(queue::pause(&t.db, "known", Some(&ghost)).await, "tenant");
    expect_invalid(queue::pause(&t.db, "", None).await, "queue");
    assert_eq!(
        scalar(&t, "SELECT count(*) FROM pgcrew.queue_pauses").await,
        0
    );

    // Schedules: invalid cron, time zone, interval (zero), attempts; unknown tenant.
    let every = |d| NewSchedule::new("s", ScheduleSpec::Every(d), "k");
    expect_invalid(
        schedule::set(
            &t.db,
            &NewSchedule::new("s", ScheduleSpec::cron("every day"), "k"),
        )
        .await,
        "cron",
    );
    expect_invalid(
        schedule::set(
            &t.db,
            &NewSchedule::new("s", ScheduleSpec::cron("* * 31 2 *"), "k"),
        )
        .await,
        "cron",
    );
    expect_invalid(
        schedule::set(
            &t.db,
            &NewSchedule::new("s", ScheduleSpec::cron_in("* * * * *", "Moon/Base"), "k"),
        )
        .await,
        "time_zone",
    );
    expect_invalid(
        schedule::set(&t.db, &every(Duration::ZERO)).await,
        "interval",
    );
    expect_invalid(
        schedule::set(&t.db, &every(Duration::from_secs(1)).max_attempts(0)).await,
        "max_attempts",
    );
    expect_not_found(
        schedule::set(&t.db, &every(Duration::from_secs(1)).tenant(ghost)).await,
        "tenant",
    );
    assert_eq!(scalar(&t, "SELECT count(*) FROM pgcrew.schedules").await, 0);

    // Through SQL: the table's trigger refuses what it can check (PC101).
    let conn = t.db.get().await.unwrap();
    for sql in [
        "INSERT INTO pgcrew.schedules (name, kind, cron, time_zone) VALUES ('x', 'k', '* * * * *', 'Nowhere/Land')",
        "INSERT INTO pgcrew.schedules (name, kind, interval_us) VALUES ('x', 'k', -5)",
        "INSERT INTO pgcrew.schedules (name, kind) VALUES ('x', 'k')",
        "INSERT INTO pgcrew.schedules (name, kind, interval_us, misfire) VALUES ('x', 'k', 1000000, 'sometimes')",
    ] {
        let e = conn.execute(sql, &[]).await.unwrap_err();
        assert_eq!(e.code().map(|c| c.code()), Some("PC101"), "{sql}: {e}");
    }
    let e = conn
        .query("SELECT pgcrew.pause_queue('nope')", &[])
        .await
        .unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("PC100"));
    assert_eq!(scalar(&t, "SELECT count(*) FROM pgcrew.schedules").await, 0);

    // Unknown schedules.
    expect_not_found(schedule::fire_now(&t.db, "ghost").await, "schedule");
    expect_not_found(
        schedule::set_enabled(&t.db, "ghost", true).await,
        "schedule",
    );
    expect_not_found(schedule::delete(&t.db, "ghost").await, "schedule");
    expect_not_found(schedule::get(&t.db, "ghost").await, "schedule");

    // The CLI: exit 2 with the message, nothing stored.
    let out = cli(t.dsn(), ["queues", "pause", "nope"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("queue not found: nope"));
    let out = cli(
        t.dsn(),
        [
            "schedules",
            "set",
            "s",
            "--cron",
            "61 * * * *",
            "--kind",
            "k",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid cron"));
    assert_eq!(scalar(&t, "SELECT count(*) FROM pgcrew.schedules").await, 0);
    assert_eq!(
        scalar(&t, "SELECT count(*) FROM pgcrew.queue_pauses").await,
        0
    );
}
