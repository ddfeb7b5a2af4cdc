//! Coordination under faults: a silent network partition between the leader and PostgreSQL,
//! and a PostgreSQL restart.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgcrew::{Client, ClientConfig, EventKind};

use crate::common::{
    cluster_db, fast_config, insert_run, next_run_state_change, start_leader, test_db, wait_leader,
    wait_until,
};
use crate::proxy::{Proxy, upstream, with_port};

/// [`fast_config`] with a 3 s instance TTL, a 500 ms fallback poll, a 2 s connect timeout
/// and four connections.
fn config(id: &str) -> ClientConfig {
    fast_config(id)
        .instance_ttl(Duration::from_secs(3))
        .notify_poll_interval(Duration::from_millis(500))
        .connect_timeout(Duration::from_secs(2))
        .pool_size(4)
        .build()
        .unwrap()
}

#[tokio::test]
async fn partitioned_leader_steps_down_before_another_is_elected() {
    let t = test_db().await;
    let proxy = Proxy::start(upstream(t.dsn())).await;
    let events: Arc<Mutex<Vec<(&'static str, Instant)>>> = Arc::new(Mutex::new(Vec::new()));

    let e1 = events.clone();
    let e2 = events.clone();
    let cut = Client::builder(with_port(t.dsn(), proxy.port()))
        .config(config("cut"))
        .on_lost_leadership(move || e1.lock().unwrap().push(("cut lost", Instant::now())))
        .on_became_leader(move |_| e2.lock().unwrap().push(("cut won", Instant::now())))
        .build()
        .await
        .unwrap();
    start_leader(&cut, Duration::from_secs(5)).await;

    let e3 = events.clone();
    let other = Client::builder(t.db.clone())
        .config(config("other"))
        .on_became_leader(move |_| e3.lock().unwrap().push(("other won", Instant::now())))
        .build()
        .await
        .unwrap();
    other.start().await.unwrap();

    proxy.pause();
    wait_until(
        Duration::from_secs(10),
        "the connected instance takes over",
        || async { other.is_leader() },
    )
    .await;
    assert!(!cut.is_leader());
    let ev = events.lock().unwrap().clone();
    let lost = ev.iter().find(|(n, _)| *n == "cut lost").map(|e| e.1);
    let won = ev.iter().find(|(n, _)| *n == "other won").map(|e| e.1);
    let (lost, won) = (lost.expect("cut lost leadership"), won.expect("other won"));
    assert!(
        lost < won,
        "the cut leader must stop acting before another is elected"
    );

    // Heal: the cut instance reconnects and stays a follower; exactly one leader.
    proxy.resume();
    proxy.drop_connections();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(other.is_leader() ^ cut.is_leader());
    other.stop().await.unwrap();
    // After the healthy leader resigns, the healed instance can lead again.
    wait_leader(&cut, Duration::from_secs(10)).await;
    cut.stop().await.unwrap();
}

/// A maintenance step that, in its fenced transaction, tells the test it is there (once) and
/// then waits a while before committing: the moment to cut the leader off.
struct InsideTheFence(tokio::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>);

#[async_trait::async_trait]
impl pgcrew::coord::maintenance::MaintenanceStep for InsideTheFence {
    fn name(&self) -> &'static str {
        "inside_the_fence"
    }
    async fn run(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        _ctx: &pgcrew::coord::maintenance::MaintenanceContext,
    ) -> pgcrew::Result<u64> {
        if let Some(tell) = self.0.lock().await.take() {
            tx.execute("SELECT 1", &[]).await?;
            let _ = tell.send(());
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Ok(0)
    }
}

/// The leader is cut off while its maintenance transaction holds the leader row (`FOR SHARE`,
/// the fence): on the server the session sits idle in that transaction, its connection still
/// open, and nobody could take the lease until the server noticed (TCP keepalive: hours). The
/// fence limits how long a fenced transaction may sit idle (the leader TTL), so the server ends
/// that session and the connected instance takes over.
#[tokio::test]
async fn a_leader_cut_off_inside_its_fenced_transaction_does_not_block_the_next() {
    let t = test_db().await;
    let proxy = Proxy::start(upstream(t.dsn())).await;
    let (tell, inside) = tokio::sync::oneshot::channel();
    let step = std::sync::Arc::new(InsideTheFence(tokio::sync::Mutex::new(Some(tell))));
    let cut = Client::builder(with_port(t.dsn(), proxy.port()))
        .config(config("cut"))
        .maintenance_step(step)
        .build()
        .await
        .unwrap();
    start_leader(&cut, Duration::from_secs(5)).await;
    let other = Client::builder(t.db.clone())
        .config(config("other"))
        .build()
        .await
        .unwrap();
    other.start().await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), inside)
        .await
        .expect("the leader's maintenance reached the step")
        .unwrap();
    proxy.pause();
    wait_until(
        Duration::from_secs(10),
        "the connected instance takes over from a leader cut off inside its fence",
        || async { other.is_leader() },
    )
    .await;
    assert!(!cut.is_leader());
    other.stop().await.unwrap();
    proxy.resume();
    proxy.drop_connections();
    cut.stop().await.unwrap();
}

#[tokio::test]
async fn postgres_restart_reconnects_listen_and_reelects() {
    let (cluster, scratch, db) = cluster_db("pgcrew_fault").await;
    let a = Client::connect(db.clone(), config("a")).await.unwrap();
    let b = Client::connect(scratch.dsn(), config("b")).await.unwrap();
    a.start().await.unwrap();
    b.start().await.unwrap();
    wait_until(
        Duration::from_secs(5),
        "one of the two clients becomes leader",
        || async { a.is_leader() || b.is_leader() },
    )
    .await;
    let mut sub = b.subscribe(&[EventKind::RunStateChanged]);

    cluster.stop_server("fast").unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cluster.restart().unwrap();

    // Leadership is re-established and the notifiers reconnect (with a Resync).
    wait_until(
        Duration::from_secs(15),
        "leader re-elected and LISTEN re-established after restart",
        || async {
            (a.is_leader() ^ b.is_leader())
                && a.notifier().reconnects() >= 1
                && b.notifier().reconnects() >= 1
        },
    )
    .await;
    let mut saw_resync = false;
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(100), sub.recv()).await {
        if ev == pgcrew::Event::Resync {
            saw_resync = true;
        }
    }
    assert!(saw_resync);
    // Heartbeats resumed: both instances are registered and fresh.
    wait_until(
        Duration::from_secs(10),
        "both instances heartbeat again after the restart",
        || async {
            match pgcrew::coord::instance::list(&db).await {
                Ok(rows) => rows.len() == 2 && rows.iter().all(|r| r.silent_ms < 1000),
                Err(_) => false,
            }
        },
    )
    .await;
    // Notifications flow again.
    let run_id = insert_run(&db).await;
    let r = next_run_state_change(&mut sub, Duration::from_secs(5), "event after restart").await;
    assert_eq!(r.0, run_id);
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    drop(scratch);
    drop(cluster);
}
