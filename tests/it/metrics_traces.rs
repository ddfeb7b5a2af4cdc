//! OpenTelemetry traces across processes (#20): every `pgcrew` child exports OTLP/HTTP to a
//! receiver in this test. A run submitted by one process (`pgcrew run submit`), started by a
//! second (`serve-a`, killed with SIGKILL mid-run) and finished by a third (`serve-b`) is one
//! trace. A wrong endpoint costs one warning and never holds a run back.

use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use pgcrew::runs::{self, RunState};
use pgcrew::tenancy::{self, TenantContext};
use pgcrew::{Db, RunId};
use prost::Message;
use serde_json::json;

use crate::common::{Serve, pgcrew_bin, test_db, wait_until};
use crate::metrics::serve_app;
use crate::mock_openai::{MockOpenAi, MockScript, mock_openai};

/// One span received: its service, name, trace id and whether it has a parent.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    name: String,
    trace: String,
    has_parent: bool,
}

type Received = Arc<Mutex<Vec<Got>>>;

/// An OTLP/HTTP (protobuf) trace receiver on 127.0.0.1:0: its endpoint and what it received.
async fn receiver() -> (String, Received) {
    let got: Received = Arc::default();
    let store = got.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| {
            let store = store.clone();
            async move {
                if let Ok(req) = ExportTraceServiceRequest::decode(body) {
                    let mut out = store.lock().unwrap();
                    for rs in req.resource_spans {
                        let service = rs
                            .resource
                            .iter()
                            .flat_map(|r| r.attributes.iter())
                            .find(|kv| kv.key == "service.name")
                            .and_then(|kv| kv.value.as_ref()?.value.clone())
                            .map(|v| match v {
                                AnyValue::StringValue(s) => s,
                                other => format!("{other:?}"),
                            })
                            .unwrap_or_default();
                        for ss in rs.scope_spans {
                            for s in ss.spans {
                                out.push(Got {
                                    service: service.clone(),
                                    name: s.name,
                                    trace: hex::encode(&s.trace_id),
                                    has_parent: !s.parent_span_id.is_empty(),
                                });
                            }
                        }
                    }
                }
                (
                    [("content-type", "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }
        }),
    );
    let addr = serve_app(app).await;
    (format!("http://{addr}"), got)
}

fn spans(got: &Received) -> Vec<Got> {
    got.lock().unwrap().clone()
}

/// `pgcrew serve --agents demo` on the mock model, exporting to `endpoint` as `service`.
fn spawn_serve(dsn: &str, id: &str, model_url: &str, endpoint: &str, stderr: Stdio) -> Serve {
    spawn_serve_with(dsn, id, model_url, endpoint, stderr, &[])
}

/// [`spawn_serve`] with more arguments.
fn spawn_serve_with(
    dsn: &str,
    id: &str,
    model_url: &str,
    endpoint: &str,
    stderr: Stdio,
    more: &[&str],
) -> Serve {
    let child = Command::new(pgcrew_bin())
        .env("DATABASE_URL", dsn)
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        .env("OTEL_SERVICE_NAME", id)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .args(["serve", "--instance-id", id, "--agents", "demo"])
        .args(["--heartbeat-interval", "300ms", "--instance-ttl", "2s"])
        .args(["--leader-ttl", "1500ms", "--maintenance-interval", "300ms"])
        .args([
            "--run-lease-ttl",
            "1500ms",
            "--task-heartbeat-timeout",
            "1500ms",
        ])
        .args([
            "--worker-poll-interval",
            "200ms",
            "--poll-interval",
            "500ms",
        ])
        .args(["--tool-latency", "50ms"])
        .args(["--model-base-url", model_url])
        .args(more)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("spawn pgcrew serve");
    Serve {
        id: id.to_string(),
        child,
    }
}

async fn support_mock() -> MockOpenAi {
    mock_openai(MockScript {
        tool_calls: json!([
            {"id": "call_order", "type": "function", "function":
                {"name": "lookup_order", "arguments": "{\"order_id\":\"A-1001\"}"}}]),
        final_text: "Order A-1001 is on its way.",
        latency: Duration::from_millis(50),
        usage: (50, 10),
    })
    .await
}

/// `pgcrew run submit` exporting to `endpoint` as `submitter`: the run id.
async fn cli_submit(dsn: &str, endpoint: &str) -> RunId {
    let out = tokio::process::Command::new(pgcrew_bin())
        .env("DATABASE_URL", dsn)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        .env("OTEL_SERVICE_NAME", "submitter")
        .args(["run", "submit", "--agent", "support", "--tenant", "acme"])
        .args(["--prompt", "Where is order A-1001?"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    RunId(stdout.trim().parse().unwrap())
}

async fn stored_trace_ids(db: &Db, run: RunId) -> (Option<String>, Option<String>) {
    let conn = db.get().await.unwrap();
    let row = conn
        .query_one(
            "SELECT r.trace_context, (SELECT t.trace_context FROM pgcrew.tasks t
                                       WHERE t.run_id = r.id ORDER BY t.id LIMIT 1)
               FROM pgcrew.runs r WHERE r.id = $1",
            &[&run],
        )
        .await
        .unwrap();
    let id = |tp: Option<String>| tp.map(|s| s.split('-').nth(1).unwrap().to_string());
    (id(row.get(0)), id(row.get(1)))
}

async fn wait_agents(db: &Db, n: usize) {
    wait_until(
        Duration::from_secs(30),
        "serve processes did not come up",
        || async {
            pgcrew::agent::get_agent(db, "support").await.is_ok()
                && pgcrew::coord::instance::list(db)
                    .await
                    .map(|l| l.len())
                    .unwrap_or(0)
                    == n
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_run_is_one_trace_across_submitter_a_killed_instance_and_its_successor() {
    let t = test_db().await;
    let (endpoint, got) = receiver().await;
    let server = support_mock().await;
    tenancy::upsert(
        &t.db,
        &TenantContext::new("acme").unwrap().budget_usd(Some(5.0)),
    )
    .await
    .unwrap();
    let a = spawn_serve(
        t.dsn(),
        "serve-a",
        &server.base_url,
        &endpoint,
        Stdio::inherit(),
    );
    wait_agents(&t.db, 1).await;

    let run = cli_submit(t.dsn(), &endpoint).await;
    // The submitter's span, with the trace context stored with the run and its task.
    wait_until(
        Duration::from_secs(10),
        "the submitter exported nothing",
        || async { spans(&got).iter().any(|s| s.service == "submitter") },
    )
    .await;
    let submit = spans(&got)
        .into_iter()
        .find(|s| s.service == "submitter" && s.name == "submit_run")
        .expect("a submit_run span");
    let trace = submit.trace.clone();
    assert_eq!(
        stored_trace_ids(&t.db, run).await,
        (Some(trace.clone()), Some(trace.clone()))
    );

    // serve-a runs turn 0 and its tool, hangs in the turn-1 model call, and is killed.
    wait_until(
        Duration::from_secs(30),
        "serve-a never reached turn 1",
        || async {
            server.requests.lock().unwrap().contains(&1)
                && spans(&got)
                    .iter()
                    .any(|s| s.service == "serve-a" && s.name == "step_model")
        },
    )
    .await;
    drop(a); // kill -9
    server.hang.store(false, Ordering::SeqCst);
    let b = spawn_serve(
        t.dsn(),
        "serve-b",
        &server.base_url,
        &endpoint,
        Stdio::inherit(),
    );
    wait_until(
        Duration::from_secs(45),
        "serve-b did not finish the run",
        || async { runs::get_run(&t.db, run).await.unwrap().state.is_terminal() },
    )
    .await;
    assert_eq!(
        runs::get_run(&t.db, run).await.unwrap().state,
        RunState::Completed
    );
    wait_until(
        Duration::from_secs(15),
        "serve-b exported no task span",
        || async {
            spans(&got)
                .iter()
                .any(|s| s.service == "serve-b" && s.name == "pgcrew.task")
        },
    )
    .await;
    drop(b);

    let all = spans(&got);
    // serve-a started the run; serve-b took over the running run (no transition until it
    // completes it).
    for (service, names) in [
        ("serve-a", ["pgcrew.claim", "step_model", "start_run"]),
        ("serve-b", ["pgcrew.claim", "step_model", "complete_run"]),
    ] {
        let mine: Vec<&Got> = all.iter().filter(|s| s.service == service).collect();
        for name in names {
            assert!(
                mine.iter().any(|s| s.name == name && s.trace == trace),
                "{service}: no {name} span in the run's trace: {mine:?}"
            );
        }
        // Every span of the run's work on this instance is in the submitter's trace, under a
        // parent (the remote one for the claim and task spans).
        for s in &mine {
            if [
                "pgcrew.claim",
                "pgcrew.task",
                "step_model",
                "step_tool",
                "execute",
                "start_run",
                "complete_run",
            ]
            .contains(&s.name.as_str())
            {
                assert_eq!(s.trace, trace, "{service}: {} is in another trace", s.name);
                assert!(s.has_parent, "{service}: {} has no parent", s.name);
            }
        }
    }
    // serve-b finished: its task span ended in the run's trace.
    assert!(
        all.iter()
            .any(|s| s.service == "serve-b" && s.name == "pgcrew.task" && s.trace == trace)
    );
    assert!(
        all.iter()
            .any(|s| s.service == "serve-b" && s.name == "complete_run" && s.trace == trace)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_otlp_endpoint_logs_one_warning_and_runs_are_not_held_back() {
    let t = test_db().await;
    let server = support_mock().await;
    server.hang.store(false, Ordering::SeqCst);
    tenancy::upsert(
        &t.db,
        &TenantContext::new("acme").unwrap().budget_usd(Some(5.0)),
    )
    .await
    .unwrap();
    // Nothing listens on port 9 of loopback.
    let dead = "http://127.0.0.1:9";
    let mut a = spawn_serve(t.dsn(), "serve-w", &server.base_url, dead, Stdio::piped());
    wait_agents(&t.db, 1).await;
    let mut ran = Vec::new();
    for _ in 0..3 {
        ran.push(cli_submit(t.dsn(), dead).await);
    }
    for run in &ran {
        let run = *run;
        wait_until(Duration::from_secs(30), "a run did not finish", || async {
            runs::get_run(&t.db, run).await.unwrap().state.is_terminal()
        })
        .await;
        assert_eq!(
            runs::get_run(&t.db, run).await.unwrap().state,
            RunState::Completed
        );
    }
    // Let several export rounds fail.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = a.child.kill();
    let out = a.child.wait_with_output_ref();
    let warnings = out.matches("exporting spans failed").count();
    assert_eq!(warnings, 1, "{out}");
}

/// Reading a killed child's piped stderr.
trait StderrOf {
    fn wait_with_output_ref(&mut self) -> String;
}

impl StderrOf for std::process::Child {
    fn wait_with_output_ref(&mut self) -> String {
        use std::io::Read;
        let _ = self.wait();
        let mut s = String::new();
        if let Some(mut e) = self.stderr.take() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_task_has_a_task_span_and_one_enqueued_while_tracing_continues_that_trace() {
    let t = test_db().await;
    let (endpoint, got) = receiver().await;
    let server = support_mock().await;
    let a = spawn_serve_with(
        t.dsn(),
        "serve-q",
        &server.base_url,
        &endpoint,
        Stdio::inherit(),
        &["--queues", "default"],
    );
    wait_agents(&t.db, 1).await;
    // Enqueued from this process inside no span: the tasks carry no trace context, and each
    // task is a trace of its own.
    let n = 20;
    for _ in 0..n {
        let task = pgcrew::NewTask::new(pgcrew::agent::demo::DEMO_NOOP, &json!({})).unwrap();
        pgcrew::queue::enqueue(&t.db, &task).await.unwrap();
    }
    // And one from `pgcrew tasks enqueue` (a pooled connection) while tracing: its task
    // continues the trace of the enqueue span.
    let out = tokio::process::Command::new(pgcrew_bin())
        .env("DATABASE_URL", t.dsn())
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .env("OTEL_SERVICE_NAME", "enqueuer")
        .args(["tasks", "enqueue", "--kind", pgcrew::agent::demo::DEMO_NOOP])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until(
        Duration::from_secs(30),
        "the tasks' spans were not exported",
        || async {
            spans(&got)
                .iter()
                .filter(|s| s.name == "pgcrew.task")
                .count()
                > n
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(a);
    let all = spans(&got);
    let claims = all.iter().filter(|s| s.name == "pgcrew.claim").count();
    let tasks = all.iter().filter(|s| s.name == "pgcrew.task").count();
    // A claim marker only for the task continuing a trace.
    assert_eq!((claims, tasks), (1, n + 1), "{all:?}");
    let enqueue = all
        .iter()
        .find(|s| s.service == "enqueuer" && s.name == "enqueue")
        .expect("the enqueue span");
    let linked: Vec<&Got> = all
        .iter()
        .filter(|s| s.service == "serve-q" && s.trace == enqueue.trace)
        .collect();
    assert!(
        linked
            .iter()
            .any(|s| s.name == "pgcrew.task" && s.has_parent)
            && linked.iter().any(|s| s.name == "pgcrew.claim"),
        "{all:?}"
    );
    // The others are traces of their own.
    let roots = all
        .iter()
        .filter(|s| s.name == "pgcrew.task" && !s.has_parent)
        .count();
    assert_eq!(roots, n);
}
