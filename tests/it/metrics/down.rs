//! Followers report no cluster gauges; the leader's stay answered (stale) with the database down.

use std::time::Duration;

use pgcrew::Client;
use pgcrew::metrics::{ClusterGauges, MetricsConfig};

use super::*;
use crate::common::{cluster_db, fast_config, start_client, test_db, wait_leader};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_reports_no_cluster_gauges_and_leader_zero() {
    let t = test_db().await;
    let id = suffix();
    let leader = start_client(
        t.db.clone(),
        fast_config(&format!("lead-{id}")).build().unwrap(),
        None,
    )
    .await;
    wait_leader(&leader, Duration::from_secs(10)).await;
    let follower = start_client(
        t.db.clone(),
        fast_config(&format!("follow-{id}")).build().unwrap(),
        None,
    )
    .await;
    let addr = serve_app(pgcrew::metrics::router(&follower)).await;
    let (_, _, body) = http_get(addr, "/metrics").await;
    assert_eq!(
        sample(
            &body,
            "pgcrew_leader",
            &[("instance", &format!("follow-{id}"))]
        ),
        Some(0.0)
    );
    assert!(
        !body.contains("pgcrew_queue_depth") && !body.contains("pgcrew_cluster_stale"),
        "{body}"
    );
    follower.stop().await.unwrap();
    leader.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_keep_answering_with_the_database_down_and_mark_cluster_gauges_stale() {
    let (cluster, _scratch, db) = cluster_db("obs_metrics_down").await;
    let id = suffix();
    let queue = format!("obs-down-{id}");
    let client: Client = Client::builder(db.clone())
        .config(
            fast_config(&format!("down-{id}"))
                .leader_election(false)
                .build()
                .unwrap(),
        )
        .build()
        .await
        .unwrap();
    for _ in 0..2 {
        client.enqueue(&on(&queue, "ok", 5)).await.unwrap();
    }
    let config = MetricsConfig {
        cluster_interval: Duration::from_millis(200),
        cluster_timeout: Duration::from_millis(500),
        cluster_gauges: ClusterGauges::Always,
    };
    let addr = serve_app(pgcrew::metrics::router_with(&client, config)).await;
    let (_, _, body) = http_get(addr, "/metrics").await;
    assert_eq!(
        sample(
            &body,
            "pgcrew_queue_depth",
            &[("queue", &queue), ("state", "available")]
        ),
        Some(2.0),
        "{body}"
    );
    assert_eq!(sample(&body, "pgcrew_cluster_stale", &[]), Some(0.0));

    cluster.stop_server("immediate").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let (status, _, body) =
            tokio::time::timeout(Duration::from_secs(5), http_get(addr, "/metrics"))
                .await
                .expect("/metrics answers while the database is down");
        assert!(status.contains("200"), "{status}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(
            sample(&body, "pgcrew_cluster_stale", &[]),
            Some(1.0),
            "{body}"
        );
        // The last values are kept.
        assert_eq!(
            sample(
                &body,
                "pgcrew_queue_depth",
                &[("queue", &queue), ("state", "available")]
            ),
            Some(2.0)
        );
        assert!(sample(&body, "pgcrew_cluster_read_errors", &[]).unwrap() >= 1.0);
        let (ok, out) = promtool(&body);
        assert!(ok, "{out}");
    }
    cluster.restart().unwrap();
}
