//! Every JSON endpoint of the console, the same data by `Accept` header, filters, and the error
//! cases: unknown ids 404, malformed filters 400 with the reason, a database that goes away 503
//! and recovery.

use std::time::Duration;

use pgcrew::TenantId;
use pgcrew::queue::NewTask;
use pgcrew::runs::{self, NewEvent, NewRun};
use pgcrew::ui::UiConfig;
use serde_json::json;

use super::{console, get_html, get_json};
use crate::common::{eventually, tenant};

/// A tenant `acme` with a run (model and tool steps), a fork, and two dependent tasks.
async fn seed(db: &pgcrew::Db) -> (pgcrew::RunId, pgcrew::RunId, i64, i64) {
    tenant(db, "acme", &["refunds"], Some(10.0)).await;
    let t = TenantId::new("acme").unwrap();
    let run = runs::create_run(db, NewRun::new(t.clone()).agent("support").prompt("hi"))
        .await
        .unwrap();
    runs::start_run(db, run, None, None, runs::LimitPolicy::Reject)
        .await
        .unwrap();
    for ev in [
        NewEvent::new("model_requested", json!({"model": "m1"})).step("model:1"),
        NewEvent::new(
            "model_completed",
            json!({"model": "m1", "usage": {"prompt_tokens": 11, "completion_tokens": 5}, "cost_usd": 0.25}),
        )
        .step("model:1"),
        NewEvent::new("tool_requested", json!({"tool": "lookup"})).step("tool:1"),
    ] {
        runs::append_event(db, run, ev, None).await.unwrap();
    }
    let mut fork = NewRun::new(t.clone()).agent("support");
    fork.parent_run_id = Some(run);
    fork.forked_at_seq = Some(2);
    let fork = runs::create_run(db, fork).await.unwrap();
    let parent = db
        .get()
        .await
        .unwrap()
        .query_one(
            "INSERT INTO pgcrew.tasks (queue, kind, tenant_id, payload, state) VALUES ('mail', 'send', 'acme', '{\"customer\": 42, \"x\": 1}', 'available') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    let mut task = NewTask::new("notify", &json!({"customer": 7}))
        .unwrap()
        .depends_on([pgcrew::TaskId(parent)]);
    task.queue = "mail".into();
    task.tenant = t;
    let child = pgcrew::queue::enqueue(db, &task).await.unwrap().id.0;
    (run, fork, parent, child)
}

#[tokio::test]
async fn every_page_answers_json_under_api_and_by_accept_header() {
    let c = console("ui-http-json", UiConfig::new()).await;
    let (run, fork, parent, child) = seed(&c.t).await;

    let (s, o) = get_json(&c.url("/api/overview")).await;
    assert_eq!(s, 200, "{o}");
    assert!(
        o["instances"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["id"] == "ui-http-json"),
        "{o}"
    );
    assert_eq!(o["queues"][0]["queue"], "mail");
    assert_eq!(o["queues"][0]["states"]["available"], 1);
    assert_eq!(o["run_states"]["running"], 1);
    assert_eq!(o["tenants"][0]["tenant_id"], "acme");
    // The same data on the page's own URL with Accept: application/json.
    let (s, o2) = get_json(&c.url("/")).await;
    assert_eq!(s, 200);
    assert_eq!(o2["queues"][0]["states"], o["queues"][0]["states"]);

    let (s, r) = get_json(&c.url(&format!("/api/runs/{run}"))).await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["run"]["state"], "running");
    assert_eq!(r["verification"]["valid"], true, "{r}");
    let tl = r["timeline"].as_array().unwrap();
    let done = tl
        .iter()
        .find(|e| e["event_type"] == "model_completed")
        .unwrap();
    assert_eq!(done["prompt_tokens"], 11);
    assert_eq!(done["cost_usd"], 0.25);
    assert!(done["latency_ms"].as_f64().unwrap() >= 0.0);
    let tool = tl
        .iter()
        .find(|e| e["event_type"] == "tool_requested")
        .unwrap();
    assert_eq!(tool["tool_state"], "pending");
    assert_eq!(r["forks"][0]["id"], fork.to_string());
    let (_, f) = get_json(&c.url(&format!("/runs/{fork}"))).await;
    assert_eq!(f["run"]["parent_run_id"], run.to_string());

    let (s, l) = get_json(&c.url("/api/runs?tenant=acme&agent=support&since=1h")).await;
    assert_eq!(s, 200, "{l}");
    assert_eq!(l["runs"].as_array().unwrap().len(), 2);
    let (_, l) = get_json(&c.url("/api/runs?state=running")).await;
    assert_eq!(l["runs"].as_array().unwrap().len(), 1);
    let (_, l) = get_json(&c.url("/api/runs?until=1h")).await;
    assert_eq!(l["runs"].as_array().unwrap().len(), 0);

    let (s, t) = get_json(&c.url("/api/tasks?queue=mail")).await;
    assert_eq!(s, 200, "{t}");
    assert_eq!(t["tasks"].as_array().unwrap().len(), 2);
    let (_, t) = get_json(&c.url("/api/tasks?payload=%7B%22customer%22%3A42%7D")).await;
    let ids: Vec<i64> = t["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![parent]);
    let (_, t) = get_json(&c.url("/api/tasks?kind=notify&state=scheduled&tenant=acme")).await;
    assert_eq!(t["tasks"][0]["id"], child);

    let (s, d) = get_json(&c.url(&format!("/api/tasks/{child}"))).await;
    assert_eq!(s, 200, "{d}");
    assert_eq!(d["task"]["depends_on"], json!([parent]));
    assert_eq!(d["relatives"][0]["relation"], "parent");
    let (_, d) = get_json(&c.url(&format!("/api/tasks/{parent}"))).await;
    assert_eq!(d["relatives"][0]["relation"], "child");
    assert_eq!(d["relatives"][0]["id"], child);

    let (s, ts) = get_json(&c.url("/api/tenants")).await;
    assert_eq!(s, 200);
    assert_eq!(ts["tenants"][0]["capabilities"], json!(["refunds"]));
    let (s, td) = get_json(&c.url("/api/tenants/acme")).await;
    assert_eq!(s, 200, "{td}");
    assert_eq!(td["budget"]["budget_usd_limit"], 10.0);
    assert!(td["costs"].is_array());
    let (s, i) = get_json(&c.url("/api/instances")).await;
    assert_eq!(s, 200);
    assert_eq!(i["instances"][0]["id"], "ui-http-json");

    // And as HTML: the pages render what the JSON says.
    for (path, needle) in [
        ("/".to_string(), "mail".to_string()),
        (format!("/runs/{run}"), "model_completed".to_string()),
        ("/runs".to_string(), run.to_string()),
        (format!("/tasks/{child}"), format!("#{parent}")),
        ("/tasks".to_string(), "notify".to_string()),
        ("/tenants".to_string(), "acme".to_string()),
        ("/tenants/acme".to_string(), "<svg".to_string()),
        ("/instances".to_string(), "ui-http-json".to_string()),
    ] {
        let (s, html) = get_html(&c.url(&path)).await;
        assert_eq!(s, 200, "{path}");
        assert!(html.contains(&needle), "{path} lacks {needle}");
        assert!(html.contains("/assets/app.js"), "{path}");
    }
    let (s, css) = get_html(&c.url("/assets/app.css")).await;
    assert_eq!(s, 200);
    assert!(css.contains("pgcrew"));
}

#[tokio::test]
async fn unknown_ids_are_404_and_malformed_filters_400_with_the_reason() {
    let c = console("ui-http-errors", UiConfig::new()).await;
    for path in [
        format!("/api/runs/{}", uuid::Uuid::new_v4()),
        "/api/runs/not-a-uuid".into(),
        "/api/tasks/999999".into(),
        "/api/tasks/-1".into(),
        "/api/tenants/nobody".into(),
        "/api/nothing-here".into(),
        "/api/bulk/7".into(),
    ] {
        let (s, v) = get_json(&c.url(&path)).await;
        assert_eq!(s, 404, "{path}: {v}");
        assert_eq!(v["status"], 404);
    }
    let (s, html) = get_html(&c.url(&format!("/runs/{}", uuid::Uuid::new_v4()))).await;
    assert_eq!(s, 404);
    assert!(
        html.contains("404") && html.contains("run not found"),
        "{html}"
    );
    for (path, reason) in [
        ("/api/runs?state=sleeping", "state"),
        ("/api/runs?limit=0", "limit"),
        ("/api/runs?since=yesterday-ish", "since"),
        ("/api/runs?colour=red", "colour"),
        ("/api/tasks?payload=%7Bcustomer", "payload"),
        ("/api/tasks?state=done", "state"),
        ("/api/tasks?limit=100000", "limit"),
    ] {
        let (s, v) = get_json(&c.url(path)).await;
        assert_eq!(s, 400, "{path}: {v}");
        assert!(v["error"].as_str().unwrap().contains(reason), "{path}: {v}");
    }
    let (s, html) = get_html(&c.url("/tasks?state=done")).await;
    assert_eq!(s, 400);
    assert!(html.contains("invalid filter `state`"), "{html}");
}

#[tokio::test]
async fn a_database_that_goes_away_is_503_and_the_console_recovers() {
    let c = console("ui-http-down", UiConfig::new()).await;
    let name = c.t.scratch.name().to_string();
    let admin = pgcrew::Db::connect(
        &c.t.dsn().replace(&name, "postgres"),
        2,
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let conn = admin.get().await.unwrap();
    conn.batch_execute(&format!(
        "ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS false; SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}' AND pid <> pg_backend_pid()"
    ))
    .await
    .unwrap();
    let (s, v) = get_json(&c.url("/api/overview")).await;
    assert_eq!(s, 503, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("database is unavailable"),
        "{v}"
    );
    let (s, html) = get_html(&c.url("/runs")).await;
    assert_eq!(s, 503);
    assert!(html.contains("data-status=\"503\""), "{html}");
    conn.batch_execute(&format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS true"))
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            get_json(&c.url("/api/overview")).await.0 == 200
        })
        .await,
        "the console did not recover"
    );
}

#[tokio::test]
async fn pgcrew_ui_serves_the_console_and_takes_no_leadership() {
    use std::io::{BufRead, BufReader};
    let t = crate::common::test_db().await;
    let mut child = super::Proc(
        std::process::Command::new(crate::common::pgcrew_bin())
            .env("DATABASE_URL", t.dsn())
            .env_remove("PGCREW_UI_TOKEN")
            .args(["ui", "--listen", "127.0.0.1:0", "--instance-id", "ui-cmd"])
            .stdout(std::process::Stdio::piped())
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let url = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find_map(|l| {
                l.strip_prefix("console ")
                    .map(|u| u.trim_end_matches('/').to_string())
            })
    })
    .await
    .unwrap()
    .expect("console address on stdout");
    let (s, o) = get_json(&format!("{url}/api/overview")).await;
    assert_eq!(s, 200, "{o}");
    let me = o["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == "ui-cmd")
        .unwrap();
    assert_eq!(me["metadata"]["role"], "console");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        crate::common::scalar(&t, "SELECT count(*) FROM pgcrew.leader").await,
        0
    );
    let (s, i) = get_json(&format!("{url}/api/instances")).await;
    assert_eq!(s, 200);
    assert_eq!(i["leaders"].as_array().unwrap().len(), 0);
    // The same server answers /metrics (pgcrew::metrics, merged into the app): the Prometheus
    // text format, this instance's series, and no leader here.
    let m = super::http()
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(m.status().as_u16(), 200);
    let ct = m.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/plain"), "{ct}");
    let body = m.text().await.unwrap();
    assert!(
        body.contains("pgcrew_leader{instance=\"ui-cmd\"} 0"),
        "{body}"
    );
    assert!(
        body.contains("pgcrew_leader_term{instance=\"ui-cmd\"} 0"),
        "{body}"
    );
    // SIGTERM: it deregisters and exits cleanly.
    unsafe {
        libc::kill(child.0.id() as i32, libc::SIGTERM);
    }
    assert!(child.0.wait().unwrap().success());
    assert_eq!(
        crate::common::scalar(&t, "SELECT count(*) FROM pgcrew.instances").await,
        0
    );
}

#[tokio::test]
async fn mounted_under_a_path_the_console_links_and_answers_there() {
    let c = console("ui-http-nest", UiConfig::new()).await;
    let app = axum::Router::new().nest("/ops", pgcrew::ui::router(&c.client));
    let (addr, server) = super::serve_router(app).await;
    let base = format!("http://{addr}/ops");
    let (s, o) = get_json(&format!("{base}/api/overview")).await;
    assert_eq!(s, 200, "{o}");
    assert_eq!(o["instances"][0]["id"], "ui-http-nest");
    let (s, html) = get_html(&format!("{base}/instances")).await;
    assert_eq!(s, 200);
    assert!(
        html.contains("href=\"/ops/runs\"") && html.contains("/ops/assets/app.js"),
        "{html}"
    );
    let (s, html) = get_html(&base).await;
    assert_eq!(s, 200);
    assert!(
        html.contains("href=\"/ops/tasks\"") && html.contains("href=\"/ops\""),
        "{html}"
    );
    let (s, _) = get_json(&format!("{base}/api/runs/{}", uuid::Uuid::new_v4())).await;
    assert_eq!(s, 404);
    server.abort();
}
