//! Concurrency per key: sampled under 16 concurrent claimers, never more than the limit per
//! key runs, while unkeyed tasks run more widely; bad limits are refused.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use pgcrew::Error;
use pgcrew::queue::{self, AckOutcome, NewTask};
use serde_json::json;

use crate::common::{create_tenant, register_instance, scalar, test_db};

const MAX_PER_KEY: &str = "SELECT coalesce(max(n), 0) FROM (SELECT count(*) AS n FROM pgcrew.tasks
    WHERE state = 'running' AND queue = 'kq' AND payload ? 'customer' GROUP BY payload->>'customer') c";
const UNKEYED_RUNNING: &str = "SELECT count(*) FROM pgcrew.tasks
    WHERE state = 'running' AND queue = 'kq' AND NOT payload ? 'customer'";

#[tokio::test]
async fn key_limit_holds_under_sixteen_claimers() {
    let t = test_db().await;
    let me = register_instance(&t, "keys").await;
    let other = create_tenant(&t, "other", None).await;
    let mut tasks = Vec::new();
    for i in 0..300 {
        let mut nt = NewTask::new("k", &json!({"customer": i % 4}))
            .unwrap()
            .queue("kq");
        if i % 3 == 0 {
            nt = nt.tenant(other.clone());
        }
        tasks.push(nt);
        if i % 5 == 0 {
            tasks.push(NewTask::new("k", &json!({"n": i})).unwrap().queue("kq"));
        }
    }
    queue::enqueue_many(&t.db, &tasks).await.unwrap();
    queue::set_key_limit(&t.db, "kq", "customer", 2)
        .await
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let seen_keyed = Arc::new(AtomicI64::new(0));
    let seen_unkeyed = Arc::new(AtomicI64::new(0));
    let sampler = {
        let (db, stop, k, u) = (
            t.db.clone(),
            stop.clone(),
            seen_keyed.clone(),
            seen_unkeyed.clone(),
        );
        tokio::spawn(async move {
            let mut samples = 0;
            while !stop.load(Ordering::SeqCst) {
                let n = scalar(&db, MAX_PER_KEY).await;
                assert!(n <= 2, "{n} tasks of one key running at once");
                k.fetch_max(n, Ordering::SeqCst);
                u.fetch_max(scalar(&db, UNKEYED_RUNNING).await, Ordering::SeqCst);
                samples += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            samples
        })
    };
    let queues = vec!["kq".to_string()];
    let claimers: Vec<_> = (0..16)
        .map(|i| {
            let (db, me, queues) = (t.db.clone(), me.clone(), queues.clone());
            tokio::spawn(async move {
                let conn = db.get().await.unwrap();
                let mut idle = 0;
                while idle < 50 {
                    let got = queue::claim(&conn, &queues, 1 + i % 4, &me).await.unwrap();
                    if got.is_empty() {
                        idle += 1;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    }
                    idle = 0;
                    tokio::time::sleep(Duration::from_millis(fastrand::u64(2..12))).await;
                    let acks: Vec<_> = got.iter().map(|c| c.ack(AckOutcome::Complete)).collect();
                    queue::ack(&conn, &acks).await.unwrap();
                }
            })
        })
        .collect();
    for c in claimers {
        c.await.unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    let samples = sampler.await.unwrap();
    assert_eq!(
        scalar(
            &t,
            "SELECT count(*) FROM pgcrew.tasks WHERE state <> 'completed'"
        )
        .await,
        0,
        "every task ran"
    );
    assert!(samples > 50, "{samples} samples");
    assert_eq!(
        seen_keyed.load(Ordering::SeqCst),
        2,
        "the limit was reached"
    );
    assert!(
        seen_unkeyed.load(Ordering::SeqCst) > 2,
        "unkeyed tasks are not limited (the claimers ran concurrently)"
    );
    // Bad limits: refused, nothing changed.
    for bad in [0, -3] {
        match queue::set_key_limit(&t.db, "kq", "customer", bad).await {
            Err(Error::InvalidInput { field, .. }) => assert_eq!(field, "max_running"),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(queue::key_limits(&t.db).await.unwrap()[0].max_running, 2);
    assert!(queue::clear_key_limit(&t.db, "kq").await.unwrap());
    assert!(queue::key_limits(&t.db).await.unwrap().is_empty());
}
