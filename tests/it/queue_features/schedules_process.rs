//! Schedules across processes: three `pgcrew serve`, an every-second schedule for ~20 s, the
//! leader killed with SIGKILL in the middle: exactly one task per fire time, none dropped.

use std::time::Duration;

use pgcrew::schedule::{self, NewSchedule, ScheduleSpec};

use super::schedules::{assert_one_task_per_second, fires};
use crate::common::{Serve, serve, test_db, wait_until};

async fn leader(db: &pgcrew::Db) -> Option<String> {
    let conn = db.get().await.unwrap();
    conn.query_opt(
        "SELECT leader_id FROM pgcrew.leader WHERE name = 'default' AND expires_at > now()",
        &[],
    )
    .await
    .unwrap()
    .and_then(|r| r.get(0))
}

#[tokio::test]
async fn every_second_across_three_processes_with_the_leader_killed() {
    let t = test_db().await;
    let mut procs: Vec<Serve> = (0..3)
        .map(|i| {
            serve(t.dsn(), &format!("sched-{i}"))
                .args(["--heartbeat-interval", "300ms", "--instance-ttl", "3s"])
                .args(["--leader-ttl", "1500ms", "--maintenance-interval", "300ms"])
                .quiet()
                .spawn()
        })
        .collect();
    wait_until(Duration::from_secs(15), "a leader", || async {
        leader(&t).await.is_some()
    })
    .await;
    let s = NewSchedule::new("beat", ScheduleSpec::Every(Duration::from_secs(1)), "beat")
        .queue("beats");
    schedule::set(&t.db, &s).await.unwrap();
    tokio::time::sleep(Duration::from_secs(9)).await;
    let first = leader(&t).await.expect("a leader");
    let before = fires(&t, "beat").await.len();
    let idx = procs.iter().position(|p| p.id == first).unwrap();
    let mut killed = procs.remove(idx);
    killed.child.kill().unwrap(); // SIGKILL
    killed.child.wait().unwrap();
    wait_until(Duration::from_secs(10), "a new leader", || async {
        leader(&t).await.is_some_and(|l| l != first)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    schedule::set_enabled(&t.db, "beat", false).await.unwrap();
    // Let a tick in flight finish.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = fires(&t, "beat").await.len();
    assert!(before >= 7, "fired before the kill: {before}");
    assert!(
        after >= before + 9,
        "fired after the failover: {after} vs {before}"
    );
    let n = assert_one_task_per_second(&t, "beat", "beat").await;
    assert!(n >= 17, "{n} fires in ~20 s");
    drop(procs);
}
