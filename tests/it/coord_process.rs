//! Leader failover with real `pgcrew serve` processes: kill -9 and graceful stop.

use std::time::{Duration, Instant};

use crate::common::{Serve, scalar, serve, test_db, wait_for, wait_until};

/// A quiet `pgcrew serve` child with a 200 ms pace and a 2 s instance TTL.
fn spawn_serve(dsn: &str, id: &str, leader_ttl: &str) -> Serve {
    serve(dsn, id)
        .args(["--heartbeat-interval", "200ms", "--instance-ttl", "2s"])
        .args([
            "--leader-ttl",
            leader_ttl,
            "--maintenance-interval",
            "200ms",
        ])
        .quiet()
        .spawn()
}

async fn current_leader(conn: &deadpool_postgres::Object) -> Option<(String, i64)> {
    conn.query_opt(
        "SELECT leader_id, term FROM pgcrew.leader WHERE name = 'default' AND expires_at > now()",
        &[],
    )
    .await
    .unwrap()
    .map(|r| (r.get(0), r.get(1)))
}

async fn wait_new_leader(
    conn: &deadpool_postgres::Object,
    old: &str,
    old_term: i64,
    within: Duration,
) -> (String, i64, Duration) {
    let start = Instant::now();
    loop {
        if let Some((id, term)) = current_leader(conn).await
            && id != old
        {
            assert!(term > old_term, "term must increase: {term} <= {old_term}");
            return (id, term, start.elapsed());
        }
        assert!(
            start.elapsed() < within,
            "no new leader within {within:?} after the leader {old} went away"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn leader_failover_after_kill_and_after_graceful_stop() {
    let t = test_db().await;
    let conn = t.db.get().await.unwrap();
    let ttl = Duration::from_secs(2);
    let mut nodes: Vec<Serve> = (0..3)
        .map(|i| spawn_serve(t.dsn(), &format!("proc-{i}"), "2s"))
        .collect();
    wait_for(&t, "SELECT count(*) FROM pgcrew.instances")
        .within(Duration::from_secs(20))
        .until(|n| n == 3, "three instances register")
        .await;
    wait_until(
        Duration::from_secs(10),
        "a serve process becomes leader",
        || async { current_leader(&conn).await.is_some() },
    )
    .await;
    let (leader, term) = current_leader(&conn).await.unwrap();

    // kill -9 the leader: a follower takes over within TTL + 1 s.
    let idx = nodes.iter().position(|n| n.id == leader).unwrap();
    let mut victim = nodes.remove(idx);
    victim.child.kill().unwrap();
    victim.child.wait().unwrap();
    let (new_leader, new_term, took) =
        wait_new_leader(&conn, &leader, term, ttl + Duration::from_secs(1)).await;
    eprintln!("failover after kill -9 took {took:?} (TTL {ttl:?})");
    assert_ne!(new_leader, leader);

    // The dead instance is removed by maintenance after the instance TTL.
    let leader_rows = format!("SELECT count(*) FROM pgcrew.instances WHERE id = '{leader}'");
    wait_for(&t, &leader_rows)
        .within(Duration::from_secs(10))
        .until(|n| n == 0, "killed instance removed by maintenance")
        .await;

    // Graceful stop (SIGTERM) of the new leader: another takes over within 1 s.
    let idx = nodes.iter().position(|n| n.id == new_leader).unwrap();
    let mut stopping = nodes.remove(idx);
    let pid = stopping.child.id() as i32;
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let (third, _, took) =
        wait_new_leader(&conn, &new_leader, new_term, Duration::from_secs(1)).await;
    eprintln!("failover after graceful stop took {took:?}");
    assert_eq!(third, nodes[0].id);
    let status = stopping.child.wait().unwrap();
    assert!(status.success(), "graceful stop exits 0: {status:?}");
    // Graceful stop deregistered it at once.
    let gone = scalar(
        &t,
        &format!("SELECT count(*) FROM pgcrew.instances WHERE id = '{new_leader}'"),
    )
    .await;
    assert_eq!(gone, 0);
}
