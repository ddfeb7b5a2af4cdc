//! Schedules in process: fire-now, enable/disable, the CLI, each fire once under repeated
//! firing, and the leader firing an every-second schedule with two clients electing.

use std::time::Duration;

use chrono::{DateTime, Utc};
use pgcrew::schedule::{self, MisfirePolicy, NewSchedule, ScheduleSpec};

use crate::common::{
    self, cli, fast_config, scalar, test_db, wait_leader, wait_listening, wait_until,
};

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

/// The leader's scheduler sleeps while no schedule is enabled; a schedule created, or enabled,
/// through another pool (as from another instance) wakes it through `pgcrew_schedules_changed`
/// and fires without waiting for the scheduler's safety poll (a minute).
#[tokio::test]
async fn a_schedule_created_or_enabled_elsewhere_wakes_the_sleeping_scheduler() {
    let t = test_db().await;
    let a = common::start_client(t.dsn(), fast_config("wake-a").build().unwrap(), None).await;
    wait_leader(&a, Duration::from_secs(10)).await;
    wait_listening(&a, Duration::from_secs(10)).await;
    // Let the new leader's scheduler find no schedule and go to sleep.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let s = NewSchedule::new(
        "woken",
        ScheduleSpec::Every(Duration::from_secs(1)),
        "woken",
    );
    schedule::set(&t.db, &s).await.unwrap();
    wait_until(
        Duration::from_secs(10),
        "two fires of a new schedule",
        || async { fires(&t, "woken").await.len() >= 2 },
    )
    .await;
    // Disabled, then (the scheduler asleep again) enabled: fires again.
    schedule::set_enabled(&t.db, "woken", false).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = fires(&t, "woken").await.len();
    schedule::set_enabled(&t.db, "woken", true).await.unwrap();
    wait_until(
        Duration::from_secs(10),
        "two fires once enabled",
        || async { fires(&t, "woken").await.len() >= before + 2 },
    )
    .await;
    schedule::set_enabled(&t.db, "woken", false).await.unwrap();
    a.stop().await.unwrap();
}

/// Calls of the scheduler's statements (`schedule/due` and `schedule/next_wake`, the reads of
/// `pgcrew.schedules` other than `schedule/list`) in the current database, from
/// `pg_stat_statements`.
async fn scheduler_statements(db: &pgcrew::Db) -> i64 {
    scalar(
        db,
        "SELECT coalesce(sum(s.calls), 0)::bigint FROM pg_stat_statements s \
           JOIN pg_database d ON d.oid = s.dbid \
          WHERE d.datname = current_database() AND s.query LIKE '%FROM pgcrew.schedules%' \
            AND s.query NOT LIKE '%ORDER BY name%' AND s.query NOT LIKE '%pg_stat_statements%'",
    )
    .await
}

/// Issue #22: at idle the leader's scheduler runs no statement (it ran a fenced transaction
/// every second, 5 statements, with no schedule at all); with a schedule whose next fire is far
/// away it runs one tick when the schedule is created, then sleeps until the fire (or its
/// safety poll). Counted with `pg_stat_statements` on a throwaway cluster
/// (`PGCREW_TEST_CLUSTER_PORT` fixes its port; default a free one).
#[tokio::test]
async fn at_idle_the_leader_runs_no_scheduler_statement() {
    let (cluster, scratch, db) = common::statements_db("sched_idle").await;
    // A long lease: a leadership lost on a loaded machine would start a new scheduler.
    let config = fast_config("idle-leader")
        .leader_ttl(Duration::from_secs(10))
        .build()
        .unwrap();
    let a = common::start_client(scratch.dsn(), config, None).await;
    wait_leader(&a, Duration::from_secs(15)).await;
    wait_listening(&a, Duration::from_secs(10)).await;
    let term = a.leader_term();
    wait_until(
        Duration::from_secs(10),
        "the scheduler's first tick",
        || async { scheduler_statements(&db).await >= 1 },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = scheduler_statements(&db).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        scheduler_statements(&db).await,
        idle,
        "the scheduler ran statements with no schedule"
    );
    // A schedule firing once a year: one tick (woken by the change) computes its next fire,
    // then the scheduler sleeps until it.
    let s = NewSchedule::new("yearly", ScheduleSpec::cron("0 0 1 1 *"), "yearly");
    schedule::set(&db, &s).await.unwrap();
    wait_until(
        Duration::from_secs(10),
        "the next fire computed",
        || async {
            schedule::get(&db, "yearly")
                .await
                .unwrap()
                .next_fire_at
                .is_some()
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let woken = scheduler_statements(&db).await;
    assert!(woken > idle, "the change did not wake the scheduler");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        scheduler_statements(&db).await,
        woken,
        "the scheduler ran statements before the next fire"
    );
    assert_eq!(a.leader_term(), term, "leadership changed during the test");
    a.stop().await.unwrap();
    drop(db);
    drop(scratch);
    drop(cluster);
}
