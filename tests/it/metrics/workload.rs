//! The known workload: every series checked value by value, and parsed by promtool.

use std::time::Duration;

use pgcrew::metrics::MetricsConfig;

use super::*;
use crate::common::{fast_config, start_client, tenant, test_db, wait_leader, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_of_a_known_workload_have_the_expected_values_and_pass_promtool() {
    let t = test_db().await;
    let id = suffix();
    let (queue, idle) = (format!("obs-{id}"), format!("obs-idle-{id}"));
    let instance = format!("obs-{id}");
    let acme = tenant(&t.db, &format!("acme-{id}"), &[], Some(10.0)).await;
    let conn = t.db.get().await.unwrap();
    conn.execute(
        "UPDATE pgcrew.tenants SET spent_usd = 2.5 WHERE id = $1",
        &[&acme.as_str()],
    )
    .await
    .unwrap();
    drop(conn);

    let client = start_client(
        t.db.clone(),
        fast_config(&instance).build().unwrap(),
        Some(pool(&queue)),
    )
    .await;
    wait_leader(&client, Duration::from_secs(10)).await;
    // 5 ok, 2 bad with one attempt, 1 flaky with three; 3 available and 1 scheduled on a
    // queue nobody works.
    for _ in 0..5 {
        client.enqueue(&on(&queue, "ok", 5)).await.unwrap();
    }
    for _ in 0..2 {
        client.enqueue(&on(&queue, "bad", 1)).await.unwrap();
    }
    client.enqueue(&on(&queue, "flaky", 3)).await.unwrap();
    for _ in 0..3 {
        client.enqueue(&on(&idle, "ok", 5)).await.unwrap();
    }
    let mut later = on(&idle, "ok", 5);
    later.delay = Some(Duration::from_secs(3600));
    client.enqueue(&later).await.unwrap();
    let (prompt, completion, cost) = model_and_tools(
        &t.db,
        &acme,
        &format!("obs-model-{id}"),
        &format!("obs_tool_{id}"),
    )
    .await;

    // Cluster gauges re-read at most every 100 ms (the default is 10 s).
    let config = MetricsConfig {
        cluster_interval: Duration::from_millis(100),
        ..MetricsConfig::default()
    };
    let addr = serve_app(pgcrew::metrics::router_with(&client, config)).await;
    wait_until(
        Duration::from_secs(30),
        "the workload did not finish",
        || {
            let q = queue.clone();
            async move {
                let body = http_get(addr, "/metrics").await.2;
                sample(
                    &body,
                    "pgcrew_tasks_succeeded_total",
                    &[("queue", &q), ("kind", "flaky")],
                ) == Some(1.0)
                    && sample(
                        &body,
                        "pgcrew_tasks_failed_total",
                        &[("queue", &q), ("kind", "bad")],
                    ) == Some(2.0)
                    && sample(
                        &body,
                        "pgcrew_tasks_succeeded_total",
                        &[("queue", &q), ("kind", "ok")],
                    ) == Some(5.0)
            }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (status, ctype, body) = http_get(addr, "/metrics").await;
    assert!(status.contains("200"), "{status}");
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    let q = queue.as_str();
    let v = |name: &str, labels: &[(&str, &str)]| sample(&body, name, labels);
    // Tasks by queue and kind.
    assert_eq!(
        v(
            "pgcrew_tasks_claimed_total",
            &[("queue", q), ("kind", "ok")]
        ),
        Some(5.0)
    );
    assert_eq!(
        v(
            "pgcrew_tasks_claimed_total",
            &[("queue", q), ("kind", "bad")]
        ),
        Some(2.0)
    );
    assert_eq!(
        v(
            "pgcrew_tasks_claimed_total",
            &[("queue", q), ("kind", "flaky")]
        ),
        Some(3.0)
    );
    assert_eq!(
        v(
            "pgcrew_tasks_failed_total",
            &[("queue", q), ("kind", "flaky")]
        ),
        Some(2.0)
    );
    assert_eq!(
        v(
            "pgcrew_tasks_retried_total",
            &[("queue", q), ("kind", "flaky")]
        ),
        Some(2.0)
    );
    assert_eq!(
        v(
            "pgcrew_tasks_retried_total",
            &[("queue", q), ("kind", "bad")]
        ),
        None
    );
    assert_eq!(
        v("pgcrew_tasks_failed_total", &[("queue", q), ("kind", "ok")]),
        None
    );
    assert_eq!(
        v(
            "pgcrew_task_duration_seconds_count",
            &[("queue", q), ("kind", "ok")]
        ),
        Some(5.0)
    );
    assert_eq!(
        v("pgcrew_task_queue_wait_seconds_count", &[("queue", q)]),
        Some(10.0)
    );
    // Cluster gauges (this instance leads).
    assert_eq!(v("pgcrew_leader", &[("instance", &instance)]), Some(1.0));
    assert!(v("pgcrew_leader_term", &[("instance", &instance)]).unwrap() >= 1.0);
    assert_eq!(
        v(
            "pgcrew_queue_depth",
            &[("queue", &idle), ("state", "available")]
        ),
        Some(3.0)
    );
    assert_eq!(
        v(
            "pgcrew_queue_depth",
            &[("queue", &idle), ("state", "scheduled")]
        ),
        Some(1.0)
    );
    assert_eq!(
        v(
            "pgcrew_queue_depth",
            &[("queue", q), ("state", "available")]
        ),
        None
    );
    let oldest = v("pgcrew_queue_oldest_available_seconds", &[("queue", &idle)]).unwrap();
    assert!(oldest > 0.0 && oldest < 120.0, "{oldest}");
    assert_eq!(
        v("pgcrew_budget_used_ratio", &[("tenant", acme.as_str())]).map(|r| (r * 1e6).round()),
        Some(((2.5 + cost) / 10.0 * 1e6_f64).round())
    );
    assert_eq!(
        v(
            "pgcrew_budget_status",
            &[("tenant", acme.as_str()), ("status", "HEALTHY")]
        ),
        Some(1.0)
    );
    assert_eq!(v("pgcrew_instances_alive", &[]), Some(1.0));
    assert_eq!(v("pgcrew_cluster_stale", &[]), Some(0.0));
    assert_eq!(v("pgcrew_runs_stuck", &[]), Some(0.0));
    // Model and tool calls.
    let model = format!("obs-model-{id}");
    let tool = format!("obs_tool_{id}");
    assert_eq!(
        v(
            "pgcrew_model_calls_total",
            &[("model", &model), ("outcome", "ok")]
        ),
        Some(1.0)
    );
    assert_eq!(
        v(
            "pgcrew_model_tokens_total",
            &[("model", &model), ("direction", "prompt")]
        ),
        Some(prompt as f64)
    );
    assert_eq!(
        v(
            "pgcrew_model_tokens_total",
            &[("model", &model), ("direction", "completion")]
        ),
        Some(completion as f64)
    );
    let charged = v("pgcrew_model_cost_usd_total", &[("model", &model)]).unwrap();
    assert!(
        (charged - cost).abs() < 1e-9 && cost > 0.0,
        "{charged} vs {cost}"
    );
    assert_eq!(
        v(
            "pgcrew_model_latency_seconds_count",
            &[("model", &model), ("outcome", "ok")]
        ),
        Some(1.0)
    );
    for outcome in ["ok", "failed", "unknown"] {
        assert_eq!(
            v(
                "pgcrew_tool_calls_total",
                &[("tool", &tool), ("outcome", outcome)]
            ),
            Some(1.0),
            "{outcome}"
        );
    }
    // Process-wide series are present (other tests add to them).
    for name in [
        "pgcrew_ledger_appends_total",
        "pgcrew_claim_batch_size_count",
        "pgcrew_ack_batch_size_count",
        "pgcrew_tasks_in_flight",
        "pgcrew_notifier_reconnects_total",
        "pgcrew_notifier_resyncs_total",
        "pgcrew_db_pool_size",
        "pgcrew_db_pool_waiting",
    ] {
        assert!(v(name, &[]).is_some(), "{name} missing");
    }
    assert!(v("pgcrew_ledger_appends_total", &[]).unwrap() >= 6.0);
    assert!(
        body.lines().any(|l| l
            .starts_with("pgcrew_maintenance_step_duration_seconds_count{step=\"rescue_tasks\"}")),
        "maintenance series missing"
    );
    // No run or task id in any label.
    assert!(!body.contains("run_id=") && !body.contains("task_id="));
    let (ok, out) = promtool(&body);
    assert!(ok, "promtool check metrics failed:\n{out}");
    // What Prometheus asks for: OpenMetrics, the same samples.
    let (_, ctype, om) = http_get_accept(
        addr,
        "/metrics",
        "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
    )
    .await;
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(om.contains("# TYPE pgcrew_tasks_succeeded counter"));
    assert_eq!(
        sample(
            &om,
            "pgcrew_tasks_succeeded_total",
            &[("queue", q), ("kind", "ok")]
        ),
        Some(5.0)
    );
    client.stop().await.unwrap();
}
