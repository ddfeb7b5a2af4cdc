//! Backpressure: producers that ask for it are refused (or wait) at a queue's or a tenant's
//! threshold, nothing stored; worker pools report their saturation against 80 %.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pgcrew::queue::{self, BackpressureMode, TaskOutcome, WorkerPool};
use pgcrew::{Error, TenantId};
use tokio::sync::Notify;

use crate::common::{
    self, create_tenant, db_with_instance_conn, fast_config, scalar, task, test_db, wait_until,
};

fn expect_backpressure(r: pgcrew::Result<queue::Enqueued>, tenant: Option<&str>, threshold: i64) {
    match r {
        Err(Error::Backpressure {
            tenant: t,
            depth,
            threshold: th,
            ..
        }) => {
            assert_eq!((t.as_deref(), th), (tenant, threshold));
            assert!(depth >= threshold);
        }
        other => panic!("expected backpressure, got {other:?}"),
    }
}

#[tokio::test]
async fn thresholds_refuse_or_hold_producers() {
    let (t, me, conn) = db_with_instance_conn("bp").await;
    let a = create_tenant(&t, "ta", None).await;
    let b = create_tenant(&t, "tb", None).await;
    queue::set_backpressure(&conn, "bp", None, 5).await.unwrap();
    queue::set_backpressure(&conn, "bp", Some(&a), 2)
        .await
        .unwrap();
    let fail = BackpressureMode::Fail;
    for _ in 0..2 {
        queue::enqueue_with_backpressure(&conn, &task("k").queue("bp").tenant(a.clone()), fail)
            .await
            .unwrap();
    }
    // Tenant ta is at its threshold; tb is not.
    expect_backpressure(
        queue::enqueue_with_backpressure(&conn, &task("k").queue("bp").tenant(a.clone()), fail)
            .await,
        Some("ta"),
        2,
    );
    for _ in 0..3 {
        queue::enqueue_with_backpressure(&conn, &task("k").queue("bp").tenant(b.clone()), fail)
            .await
            .unwrap();
    }
    // The queue is at 5.
    expect_backpressure(
        queue::enqueue_with_backpressure(&conn, &task("k").queue("bp").tenant(b.clone()), fail)
            .await,
        None,
        5,
    );
    assert_eq!(scalar(&t, "SELECT count(*) FROM pgcrew.tasks").await, 5);
    // Plain enqueue ignores it; the depth view shows the signal.
    queue::enqueue(&conn, &task("k").queue("bp")).await.unwrap();
    let depth = queue::queues(&conn).await.unwrap();
    assert_eq!(depth.iter().find(|d| d.queue == "bp").unwrap().available, 6);
    // Waiting: a consumer drains within the wait, and the producer gets through.
    let started = Instant::now();
    expect_backpressure(
        queue::enqueue_with_backpressure(
            &conn,
            &task("k").queue("bp"),
            BackpressureMode::Wait(Duration::from_millis(300)),
        )
        .await,
        None,
        5,
    );
    assert!(started.elapsed() >= Duration::from_millis(200));
    let drainer = {
        let (db, me) = (t.db.clone(), me.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let c = db.get().await.unwrap();
            queue::claim(&c, &["bp".to_string()], 4, &me).await.unwrap()
        })
    };
    queue::enqueue_with_backpressure(
        &conn,
        &task("k").queue("bp"),
        BackpressureMode::Wait(Duration::from_secs(10)),
    )
    .await
    .unwrap();
    assert_eq!(drainer.await.unwrap().len(), 4);
    // Bad thresholds: refused, nothing stored.
    match queue::set_backpressure(&conn, "bp", None, 0).await {
        Err(Error::InvalidInput { field, .. }) => assert_eq!(field, "max_available"),
        other => panic!("{other:?}"),
    }
    let ghost = TenantId::new("ghost").unwrap();
    match queue::set_backpressure(&conn, "bp", Some(&ghost), 3).await {
        Err(Error::NotFound { kind, .. }) => assert_eq!(kind, "tenant"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        scalar(&t, "SELECT count(*) FROM pgcrew.queue_backpressure").await,
        2
    );
    assert!(
        queue::clear_backpressure(&conn, "bp", Some(&a))
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn pools_report_saturation_against_eighty_percent() {
    let t = test_db().await;
    let gate = Arc::new(Notify::new());
    let g = gate.clone();
    let pool = WorkerPool::builder()
        .queue("sat")
        .concurrency(5)
        .handler("hold", move |_ctx, _p: serde_json::Value| {
            let g = g.clone();
            async move {
                g.notified().await;
                Ok(TaskOutcome::Complete)
            }
        })
        .build()
        .unwrap();
    let client = common::start_client(
        t.dsn(),
        fast_config("sat").build().unwrap(),
        Some(pool.clone()),
    )
    .await;
    assert_eq!(pool.saturation().ratio, 0.0);
    for n in [3usize, 4] {
        while scalar(&t, "SELECT count(*) FROM pgcrew.tasks").await < n as i64 {
            queue::enqueue(&t.db, &task("hold").queue("sat"))
                .await
                .unwrap();
        }
        wait_until(
            Duration::from_secs(5),
            "the pool holds the tasks",
            || async { pool.saturation().running == n },
        )
        .await;
        // 3 of 5 is 60 %: not saturated; 4 of 5 is 80 %: saturated.
        assert_eq!(pool.is_saturated(), n == 4, "{:?}", pool.saturation());
    }
    gate.notify_waiters();
    client.stop().await.unwrap();
}
