//! `/metrics` (#20): a known workload, scraped over HTTP from the router served on
//! 127.0.0.1:0, checked value by value and parsed by `promtool check metrics`; the endpoint
//! answers while the database is down, with the cluster gauges marked stale.
//!
//! The instance's own series are per process (the test binary runs many clients), so every
//! series checked here carries labels unique to the test (queue, kind, model, tool, instance).

use std::sync::Arc;
use std::time::Duration;

use pgcrew::agent::{Tool, ToolError, ToolRegistry};
use pgcrew::kernel::{Kernel, RunScope};
use pgcrew::metrics::{ClusterGauges, MetricsConfig};
use pgcrew::model::{ModelRequest, PriceTable, ScriptedModel, ScriptedReply};
use pgcrew::queue::{NewTask, RetryPolicy, TaskOutcome, WorkerPool};
use pgcrew::runs::{self, NewRun};
use pgcrew::{Client, TenantId};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{
    cluster_db, fast_config, start_client, tenant, test_db, wait_leader, wait_until,
};

/// Serve `app` on 127.0.0.1:0; returns its address.
pub(crate) async fn serve_app(app: axum::Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

/// `GET path` over HTTP/1.1: (status line, content type, body).
pub(crate) async fn http_get(addr: std::net::SocketAddr, path: &str) -> (String, String, String) {
    http_get_accept(addr, path, "*/*").await
}

/// [`http_get`] with an `Accept` header.
pub(crate) async fn http_get_accept(
    addr: std::net::SocketAddr,
    path: &str,
    accept: &str,
) -> (String, String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: test\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.lines().next().unwrap().to_string();
    let ctype = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type:")
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default();
    (status, ctype, body.to_string())
}

/// The value of the sample `name{labels}` (labels in the order rendered), if present.
pub(crate) fn sample(body: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want = if labels.is_empty() {
        name.to_string()
    } else {
        let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        format!("{name}{{{}}}", l.join(","))
    };
    body.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        (series == want).then(|| value.parse().ok())?
    })
}

/// `promtool check metrics` on `body`: its exit status and output.
pub(crate) fn promtool(body: &str) -> (bool, String) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package `prometheus`; .ci/run installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_string()
}

fn pool(queue: &str) -> Arc<WorkerPool> {
    WorkerPool::builder()
        .queue(queue)
        .concurrency(4)
        .poll_interval(Duration::from_millis(100))
        .retry_policy(RetryPolicy {
            base: Duration::from_millis(10),
            factor: 1.0,
            max: Duration::from_millis(10),
            jitter: 0.0,
        })
        .handler("ok", |_ctx, _p: serde_json::Value| async move {
            Ok(TaskOutcome::Complete)
        })
        .handler("bad", |_ctx, _p: serde_json::Value| async move {
            Err("boom".into())
        })
        // Fails its first two attempts, then succeeds.
        .handler("flaky", |ctx, _p: serde_json::Value| async move {
            if ctx.attempt < 3 {
                Err("not yet".into())
            } else {
                Ok(TaskOutcome::Complete)
            }
        })
        .build()
        .unwrap()
}

fn on(queue: &str, kind: &str, max_attempts: i32) -> NewTask {
    let mut t = NewTask::new(kind, &json!({})).unwrap();
    t.queue = queue.to_string();
    t.max_attempts = max_attempts;
    t
}

/// A model step and three tool steps (ok, failed, unknown outcome) on a run of `tenant`.
async fn model_and_tools(
    db: &pgcrew::Db,
    tenant: &TenantId,
    model: &str,
    tool: &str,
) -> (u64, u64, f64) {
    let run = runs::create_run(db, NewRun::new(tenant.clone()))
        .await
        .unwrap();
    let scope = RunScope::new(run, tenant.clone());
    let calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let t = Tool::builder(tool)
        .description("test tool")
        .input_schema(json!({"type": "object"}))
        .handler(move |_ctx, _args| {
            let calls = calls.clone();
            async move {
                match calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
                    0 => Ok(json!({"ok": true})),
                    1 => Err(ToolError::Failed("no".into())),
                    _ => Err(ToolError::UnknownOutcome("lost".into())),
                }
            }
        })
        .build()
        .unwrap();
    let prices = PriceTable::empty().with(model, 1_000.0, 2_000.0).unwrap();
    let k = Kernel::new(
        db.clone(),
        Arc::new(ScriptedModel::sequence(vec![ScriptedReply::text("hello")])),
    )
    .with_prices(prices)
    .with_tools(ToolRegistry::new().with(t).unwrap());
    let req = ModelRequest::new(model).user("hi").max_tokens(20);
    let step = k
        .step_model(&scope, "m1", &req, Default::default())
        .await
        .unwrap();
    for key in ["t1", "t2", "t3"] {
        let _ = k.step_tool(&scope, key, tool, json!({})).await;
    }
    (
        step.response.usage.prompt_tokens,
        step.response.usage.completion_tokens,
        step.cost_usd,
    )
}

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
