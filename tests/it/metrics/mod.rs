//! `/metrics` (#20): a known workload, scraped over HTTP from the router served on
//! 127.0.0.1:0, checked value by value and parsed by `promtool check metrics`; the endpoint
//! answers while the database is down, with the cluster gauges marked stale.
//!
//! The instance's own series are per process (the test binary runs many clients), so every
//! series checked here carries labels unique to the test (queue, kind, model, tool, instance).

use std::sync::Arc;
use std::time::Duration;

use pgcrew::TenantId;
use pgcrew::agent::{Tool, ToolError, ToolRegistry};
use pgcrew::kernel::{Kernel, RunScope};
use pgcrew::model::{ModelRequest, PriceTable, ScriptedModel, ScriptedReply};
use pgcrew::queue::{NewTask, RetryPolicy, TaskOutcome, WorkerPool};
use pgcrew::runs::{self, NewRun};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod bench;
mod down;
mod workload;

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

pub(crate) fn suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_string()
}

pub(crate) fn pool(queue: &str) -> Arc<WorkerPool> {
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

pub(crate) fn on(queue: &str, kind: &str, max_attempts: i32) -> NewTask {
    let mut t = NewTask::new(kind, &json!({})).unwrap();
    t.queue = queue.to_string();
    t.max_attempts = max_attempts;
    t
}

/// A model step and three tool steps (ok, failed, unknown outcome) on a run of `tenant`.
pub(crate) async fn model_and_tools(
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
