//! Schedules in process: fire-now, enable/disable, the CLI, each fire once under repeated
//! firing, and the leader firing an every-second schedule with two clients electing.

use std::time::Duration;

use chrono::{DateTime, Utc};
use pgcrew::schedule::{self, MisfirePolicy, NewSchedule, ScheduleSpec};

use crate::common::{self, cli, fast_config, scalar, test_db, wait_until};

/// Fire times recorded for `name`, oldest first, with their tasks.
pub async fn fires(db: &pgcrew::Db, name: &str) -> Vec<(DateTime<Utc>, Option<i64>, bool)> {
    let conn = db.get().await.unwrap();
    conn.query(
        "SELECT fire_at, task_id, manual FROM pgcrew.schedule_fires WHERE schedule = $1 ORDER BY fire_at",
        &[&name],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

/// Every scheduled (not manual) fire of an every-second schedule is one whole second after the
/// previous one, has its own task, and the tasks of `kind` are exactly these.
pub async fn assert_one_task_per_second(db: &pgcrew::Db, name: &str, kind: &str) -> usize {
    let f: Vec<_> = fires(db, name).await.into_iter().filter(|f| !f.2).collect();
    assert!(!f.is_empty(), "no fires");
    for w in f.windows(2) {
        assert_eq!(
            w[1].0 - w[0].0,
            chrono::TimeDelta::seconds(1),
            "a fire was dropped between {} and {}",
            w[0].0,
            w[1].0
        );
    }
    let mut tasks: Vec<i64> = f.iter().map(|x| x.1.expect("fire without task")).collect();
    tasks.sort();
    tasks.dedup();
    assert_eq!(tasks.len(), f.len(), "two fires share a task");
    let n = scalar(
        db,
        &format!("SELECT count(*) FROM pgcrew.tasks WHERE kind = '{kind}'"),
    )
    .await;
    assert_eq!(
        n as usize,
        f.len(),
        "tasks of {kind} other than one per fire"
    );
    f.len()
}

#[tokio::test]
async fn fire_now_enable_disable_and_each_fire_once() {
    let t = test_db().await;
    let s = NewSchedule::new(
        "daily",
        ScheduleSpec::cron_in("0 9 * * *", "Europe/Paris"),
        "report",
    )
    .queue("reports")
    .payload(serde_json::json!({"to": "ops"}))
    .misfire(MisfirePolicy::CatchUpOne);
    assert!(schedule::set(&t.db, &s).await.unwrap());
    assert!(
        !schedule::set(&t.db, &s).await.unwrap(),
        "replaced, not created"
    );
    let task = schedule::fire_now(&t.db, "daily").await.unwrap();
    let row = pgcrew::queue::get(&t.db, task).await.unwrap();
    assert_eq!(
        (row.queue.as_str(), row.kind.as_str()),
        ("reports", "report")
    );
    assert_eq!(row.payload, serde_json::json!({"to": "ops"}));
    assert!(fires(&t, "daily").await[0].2, "recorded as manual");
    // The same fire time twice (two leaders overlapping): one task.
    let conn = t.db.get().await.unwrap();
    let at: DateTime<Utc> = "2026-01-01T08:00:00Z".parse().unwrap();
    for expected in [1usize, 0] {
        let got = conn
            .query(
                "SELECT * FROM pgcrew.fire_schedule('daily', ARRAY[$1::timestamptz], NULL)",
                &[&at],
            )
            .await
            .unwrap();
        assert_eq!(got.len(), expected);
    }
    assert_eq!(scalar(&t, "SELECT count(*) FROM pgcrew.tasks").await, 2);
    assert!(schedule::set_enabled(&t.db, "daily", false).await.unwrap());
    assert!(!schedule::set_enabled(&t.db, "daily", false).await.unwrap());
    let listed = schedule::list(&t.db).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(!listed[0].enabled);
    assert_eq!(listed[0].misfire, "catch_up_one");
    // The CLI.
    let out = cli(
        t.dsn(),
        [
            "schedules",
            "set",
            "tick",
            "--every",
            "1s",
            "--kind",
            "tick",
            "--queue",
            "ticks",
            "--disabled",
        ],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let out = cli(t.dsn(), ["schedules", "list", "--json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    let out = cli(t.dsn(), ["schedules", "fire-now", "tick"]).await;
    assert!(out.status.success(), "{out:?}");
    let out = cli(t.dsn(), ["schedules", "delete", "tick"]).await;
    assert!(out.status.success(), "{out:?}");
    let out = cli(t.dsn(), ["queues", "list"]).await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("ticks"));
    schedule::delete(&t.db, "daily").await.unwrap();
    assert_eq!(
        scalar(&t, "SELECT count(*) FROM pgcrew.schedule_fires").await,
        0
    );
}

/// Two clients elect; the leader fires an every-second schedule: one task per second, none
/// dropped; disabled, it stops.
#[tokio::test]
async fn the_leader_fires_every_second_once() {
    let t = test_db().await;
    let a = common::start_client(t.dsn(), fast_config("sa").build().unwrap(), None).await;
    let b = common::start_client(t.dsn(), fast_config("sb").build().unwrap(), None).await;
    let s = NewSchedule::new("sec", ScheduleSpec::Every(Duration::from_secs(1)), "sec");
    schedule::set(&t.db, &s).await.unwrap();
    wait_until(Duration::from_secs(10), "four fires", || async {
        fires(&t, "sec").await.len() >= 4
    })
    .await;
    schedule::set_enabled(&t.db, "sec", false).await.unwrap();
    let n = assert_one_task_per_second(&t, "sec", "sec").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(fires(&t, "sec").await.len(), n, "fired while disabled");
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}
