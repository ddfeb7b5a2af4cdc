//! Instances, leader lease, maintenance and notifications.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use pgcrew::coord::instance;
use pgcrew::coord::leader;
use pgcrew::{Client, ClientConfig, Error, EventKind, InstanceId};

use crate::common::{eventually, test_db};

fn fast_config(id: &str) -> ClientConfig {
    ClientConfig::builder()
        .instance_id(InstanceId::new(id).unwrap())
        .heartbeat_interval(Duration::from_millis(200))
        .instance_ttl(Duration::from_secs(2))
        .leader_ttl(Duration::from_secs(1))
        .maintenance_interval(Duration::from_millis(200))
        .notify_poll_interval(Duration::from_secs(1))
        .pool_size(4)
        .build()
        .unwrap()
}

#[tokio::test]
async fn migrate_is_idempotent_and_schema_is_checked() {
    let t = test_db().await;
    let report = t.db.migrate().await.unwrap();
    assert!(report.applied.is_empty());
    assert_eq!(report.to_version, pgcrew::db::latest_version());
    assert_eq!(
        t.db.check_schema().await.unwrap(),
        pgcrew::db::latest_version()
    );
}

#[tokio::test]
async fn start_registers_elects_and_stop_deregisters() {
    let t = test_db().await;
    let became = Arc::new(AtomicUsize::new(0));
    let b = became.clone();
    let client = Client::builder(t.db.clone())
        .config(fast_config("solo"))
        .on_became_leader(move |_| {
            b.fetch_add(1, Ordering::SeqCst);
        })
        .build()
        .await
        .unwrap();
    client.start().await.unwrap();
    assert!(client.is_running());
    assert!(eventually(Duration::from_secs(5), || async { client.is_leader() }).await);
    assert_eq!(became.load(Ordering::SeqCst), 1);
    let rows = instance::list(&t.db).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].id, "solo");
    assert!(rows[0].is_leader);
    client.stop().await.unwrap();
    assert!(!client.is_running());
    assert!(!client.is_leader());
    assert!(instance::list(&t.db).await.unwrap().is_empty());
    assert!(leader::current(&t.db).await.unwrap().is_empty());
}

#[tokio::test]
async fn client_without_schema_gets_clear_error() {
    let scratch = pgcrew::db::ScratchDatabase::for_tests().await.unwrap();
    let err = Client::connect(scratch.dsn(), ClientConfig::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::SchemaMissing), "{err}");
    assert!(err.to_string().contains("pgcrew migrate"));
}

#[tokio::test]
async fn subscribers_receive_run_state_changes() {
    let t = test_db().await;
    let client = Client::builder(t.db.clone())
        .config(fast_config("listener"))
        .build()
        .await
        .unwrap();
    client.start().await.unwrap();
    let mut subs: Vec<_> = (0..50)
        .map(|_| client.subscribe(&[EventKind::RunStateChanged]))
        .collect();
    let conn = t.db.get().await.unwrap();
    let run_id = uuid::Uuid::new_v4();
    conn.execute(
        "INSERT INTO pgcrew.runs (id, tenant_id) VALUES ($1, 'default')",
        &[&run_id],
    )
    .await
    .unwrap();
    for s in subs.iter_mut() {
        loop {
            let ev = tokio::time::timeout(Duration::from_secs(5), s.recv())
                .await
                .unwrap()
                .unwrap();
            if let pgcrew::Event::RunStateChanged { run_id: r, to, .. } = ev {
                assert_eq!(r.0, run_id);
                assert_eq!(to, "pending");
                break;
            }
        }
    }
    client.stop().await.unwrap();
}
