//! Streaming model calls (issue #18, item 7) against the streaming mock: deltas reach
//! subscribers live (in-process and over the run's secret NOTIFY channel) while the ledger
//! records one `model_completed`; a cut stream is a recorded, retryable failure charged once;
//! 429 waits for `Retry-After`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pgcrew::Db;
use pgcrew::kernel::{Kernel, ReplayPolicy, RunScope};
use pgcrew::model::{
    ModelErrorKind, ModelRequest, OpenAiConfig, OpenAiModel, ScriptedModel, ScriptedReply,
};
use pgcrew::runs::{self, NewRun, OutputEvent, RunOutput};
use serde_json::json;

use crate::common::{TestDb, db_with_tenant, ledger_events, scalar};
use crate::mock_openai::{MockReply, StreamMock, mock_openai_stream};

const ANSWER: &[&str] = &["It ", "is ", "sunny ", "in ", "Oslo."];

fn stream_reply(gap_ms: u64) -> MockReply {
    MockReply::Stream {
        chunks: ANSWER.to_vec(),
        gap: Duration::from_millis(gap_ms),
        usage: (21, 5),
    }
}

fn model(mock: &StreamMock, retries: u32) -> Arc<OpenAiModel> {
    Arc::new(OpenAiModel::new(
        OpenAiConfig::builder()
            .base_url(&mock.base_url)
            .api_key("sk-test")
            .timeout(Duration::from_secs(10))
            .max_retries(retries)
            .initial_backoff(Duration::from_millis(1))
            .max_backoff(Duration::from_millis(2))
            .build()
            .unwrap(),
    ))
}

fn request() -> ModelRequest {
    ModelRequest::new("gpt-4o-mini")
        .user("weather in Oslo?")
        .max_tokens(50)
}

/// A database with tenant `acme` and a run of it.
async fn setup() -> (TestDb, RunScope) {
    let (t, tenant) = db_with_tenant("acme", &[], Some(10.0)).await;
    let run = runs::create_run(&t.db, NewRun::new(tenant.clone()))
        .await
        .unwrap();
    (t, RunScope::new(run, tenant))
}

/// Output pieces until (and with) the step's `Done`.
async fn until_done(mut next: impl AsyncFnMut() -> Option<RunOutput>) -> Vec<RunOutput> {
    let mut got = Vec::new();
    loop {
        let o = tokio::time::timeout(Duration::from_secs(10), next())
            .await
            .expect("output within 10 s")
            .expect("output stream open");
        let done = matches!(o.event, OutputEvent::Done { .. });
        got.push(o);
        if done {
            return got;
        }
    }
}

fn text(outs: &[RunOutput]) -> String {
    outs.iter()
        .filter_map(|o| match &o.event {
            OutputEvent::Text { text } => Some(text.as_str()),
            _ => None,
        })
        .collect()
}

async fn money(db: &Db) -> (f64, f64, i64) {
    let conn = db.get().await.unwrap();
    let row = conn
        .query_one(
            "SELECT spent_usd::float8, reserved_usd::float8,
                    (SELECT count(*) FROM pgcrew.cost_entries)
               FROM pgcrew.tenants WHERE id = 'acme'",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

#[tokio::test]
async fn streamed_output_reaches_subscribers_live_and_the_ledger_records_one_completion() {
    let (t, scope) = setup().await;
    let mock = mock_openai_stream(vec![stream_reply(150)]).await;
    let kernel = Kernel::new(t.db.clone(), model(&mock, 0)).with_streaming();
    let mut local = runs::subscribe_output(scope.run);
    let mut remote = runs::listen_output(&t.db, scope.run).await.unwrap();
    let step = tokio::spawn({
        let (kernel, scope) = (kernel.clone(), scope.clone());
        async move {
            kernel
                .step_model(&scope, "s1", &request(), ReplayPolicy::Strict)
                .await
        }
    });
    // The first piece arrives while the model is still answering.
    let first = tokio::time::timeout(Duration::from_secs(10), local.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(!step.is_finished(), "a delta arrived only after the call");
    assert_eq!(first.run_id, scope.run);
    assert_eq!(first.step_key, "s1");
    let mut outs = vec![first];
    outs.extend(until_done(async || local.recv().await).await);
    assert_eq!(text(&outs), ANSWER.concat());
    assert!(outs.len() >= ANSWER.len(), "one piece per chunk: {outs:?}");
    assert_eq!(outs.last().unwrap().event, OutputEvent::Done { ok: true });
    let step = step.await.unwrap().unwrap();
    assert_eq!(step.response.content_text(), ANSWER.concat());
    assert_eq!(
        (
            step.response.usage.prompt_tokens,
            step.response.usage.completion_tokens
        ),
        (21, 5)
    );
    assert!(!step.response.usage.estimated);
    // The other path: the run's NOTIFY channel carries the same text.
    let far = until_done(async || remote.recv().await).await;
    assert_eq!(text(&far), ANSWER.concat());
    // The request asked for a stream with usage.
    let body = mock.body(0);
    assert_eq!(body["stream"], json!(true));
    assert_eq!(body["stream_options"]["include_usage"], json!(true));
    // No delta in the ledger: the step is model_requested + model_completed, as unstreamed.
    let evs = ledger_events(&t.db, scope.run).await;
    let kinds: Vec<&str> = evs
        .iter()
        .filter(|(_, k, _)| k.as_deref() == Some("s1"))
        .map(|(ty, _, _)| ty.as_str())
        .collect();
    assert_eq!(kinds, ["model_requested", "model_completed"]);
    // Replay answers from the ledger without a request.
    let again = kernel
        .step_model(&scope, "s1", &request(), ReplayPolicy::Strict)
        .await
        .unwrap();
    assert!(again.replayed);
    assert_eq!(again.response, step.response);
    assert_eq!(mock.request_count(), 1);
    assert_eq!(money(&t.db).await.2, 1);
}

#[tokio::test]
async fn a_cut_stream_is_a_recorded_retryable_failure_and_the_step_is_charged_once() {
    let (t, scope) = setup().await;
    let cut = MockReply::Cut {
        chunks: vec!["It ", "is "],
    };
    let mock = mock_openai_stream(vec![cut, stream_reply(0)]).await;
    let kernel = Kernel::new(t.db.clone(), model(&mock, 0)).with_streaming();
    let mut local = runs::subscribe_output(scope.run);
    let err = kernel
        .step_model(&scope, "s1", &request(), ReplayPolicy::Strict)
        .await
        .unwrap_err();
    assert_eq!(
        ModelErrorKind::of(&err),
        Some(ModelErrorKind::StreamCut),
        "{err}"
    );
    assert!(ModelErrorKind::StreamCut.is_retryable());
    let outs = until_done(async || local.recv().await).await;
    assert_eq!(text(&outs), "It is ");
    assert_eq!(outs.last().unwrap().event, OutputEvent::Done { ok: false });
    let evs = ledger_events(&t.db, scope.run).await;
    let failed: Vec<_> = evs
        .iter()
        .filter(|(ty, _, _)| ty == "model_failed")
        .collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].2["kind"], "stream_cut");
    assert_eq!(money(&t.db).await, (0.0, 0.0, 0), "nothing charged or held");
    // The step is retried by the caller: answered and charged once.
    let step = kernel
        .step_model(&scope, "s1", &request(), ReplayPolicy::Strict)
        .await
        .unwrap();
    assert_eq!(step.response.content_text(), ANSWER.concat());
    let (spent, reserved, entries) = money(&t.db).await;
    assert_eq!(entries, 1);
    assert_eq!(reserved, 0.0);
    assert!((spent - step.cost_usd).abs() < 1e-9);
    assert!(
        runs::verify_run_chain(&t.db, scope.run)
            .await
            .unwrap()
            .valid
    );
}

#[tokio::test]
async fn a_cut_stream_is_retried_within_the_call_and_subscribers_are_told() {
    let (t, scope) = setup().await;
    let cut = MockReply::Cut {
        chunks: vec!["It ", "was "],
    };
    let mock = mock_openai_stream(vec![cut, stream_reply(0)]).await;
    let kernel = Kernel::new(t.db.clone(), model(&mock, 1)).with_streaming();
    let mut local = runs::subscribe_output(scope.run);
    let step = kernel
        .step_model(&scope, "s1", &request(), ReplayPolicy::Strict)
        .await
        .unwrap();
    assert_eq!(step.response.content_text(), ANSWER.concat());
    assert_eq!(mock.request_count(), 2);
    let outs = until_done(async || local.recv().await).await;
    let retry = outs
        .iter()
        .position(|o| matches!(o.event, OutputEvent::Retry { attempt: 1, .. }))
        .expect("a retry marker");
    assert_eq!(text(&outs[..retry]), "It was ");
    assert_eq!(text(&outs[retry..]), ANSWER.concat());
    let evs = ledger_events(&t.db, scope.run).await;
    assert_eq!(crate::common::count(&evs, "model_completed"), 1);
    assert_eq!(crate::common::count(&evs, "model_failed"), 0);
    assert_eq!(money(&t.db).await.2, 1);
}

#[tokio::test]
async fn rate_limited_calls_wait_for_retry_after_in_seconds_or_as_a_date() {
    for as_date in [false, true] {
        // As a date: 3 s ahead, taken now (the header has whole seconds, so at least 2 s are
        // left when the mock answers; the first case took about 1 s of the test's time).
        let (retry_after, at_least) = if as_date {
            let date = (chrono::Utc::now() + chrono::Duration::seconds(3))
                .format("%a, %d %b %Y %H:%M:%S GMT")
                .to_string();
            (date, 1000)
        } else {
            ("1".to_string(), 950)
        };
        let limited = MockReply::RateLimited { retry_after };
        let mock = mock_openai_stream(vec![limited, stream_reply(0)]).await;
        // Streaming and plain calls both honour it (backoff alone would be 1-2 ms).
        let m = model(&mock, 1);
        let sink = |_d: pgcrew::model::ModelDelta| {};
        let r = pgcrew::model::ModelPort::stream(&*m, &request(), &sink)
            .await
            .unwrap();
        assert_eq!(r.content_text(), ANSWER.concat());
        assert_eq!(mock.request_count(), 2);
        assert!(
            mock.gap_after(0) >= Duration::from_millis(at_least),
            "waited only {:?}",
            mock.gap_after(0)
        );
    }
    let limited = MockReply::RateLimited {
        retry_after: "1".into(),
    };
    let mock = mock_openai_stream(vec![limited, stream_reply(0)]).await;
    let m = model(&mock, 1);
    let r = pgcrew::model::ModelPort::complete(&*m, &request())
        .await
        .unwrap();
    assert_eq!(r.content_text(), ANSWER.concat());
    assert!(mock.gap_after(0) >= Duration::from_millis(950));
    // Asked to wait longer than max_retry_after: fails at once, typed.
    let limited = MockReply::RateLimited {
        retry_after: "3600".into(),
    };
    let mock = mock_openai_stream(vec![limited]).await;
    let m = OpenAiModel::new(
        OpenAiConfig::builder()
            .base_url(&mock.base_url)
            .max_retries(3)
            .max_retry_after(Duration::from_secs(5))
            .build()
            .unwrap(),
    );
    let started = Instant::now();
    let e = pgcrew::model::ModelPort::complete(&m, &request())
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(ModelErrorKind::of(&e), Some(ModelErrorKind::RateLimited));
    assert!(e.to_string().contains("max_retry_after"), "{e}");
    assert_eq!(mock.request_count(), 1);
}

#[tokio::test]
async fn ports_without_streaming_hand_over_the_whole_answer_as_one_delta() {
    let (t, scope) = setup().await;
    let scripted = Arc::new(ScriptedModel::sequence(vec![ScriptedReply::text("Sunny.")]));
    let kernel = Kernel::new(t.db.clone(), scripted).with_streaming();
    let mut local = runs::subscribe_output(scope.run);
    kernel
        .step_model(&scope, "s1", &request(), ReplayPolicy::Strict)
        .await
        .unwrap();
    let outs = until_done(async || local.recv().await).await;
    assert_eq!(outs.len(), 2);
    assert_eq!(text(&outs), "Sunny.");
}

#[tokio::test]
async fn output_channels_are_secret_per_run_and_closed_to_other_roles() {
    let (t, scope) = setup().await;
    let other = runs::create_run(&t.db, NewRun::new(scope.tenant.clone()))
        .await
        .unwrap();
    let conn = t.db.get().await.unwrap();
    let channel = |run: pgcrew::RunId| {
        let conn = &conn;
        async move {
            conn.query_one("SELECT pgcrew.run_output_channel($1)", &[&run])
                .await
                .unwrap()
                .get::<_, String>(0)
        }
    };
    let (a, b) = (channel(scope.run).await, channel(other).await);
    assert_ne!(a, b);
    assert!(a.starts_with("pgcrew_run_output_") && a.len() == 50, "{a}");
    assert!(!a.contains(&scope.run.to_string().replace('-', "")[..8]));
    // A role other than the owner (a tenant's, say) cannot derive any run's channel.
    let role = format!("stream_probe_{}", uuid::Uuid::new_v4().simple());
    conn.batch_execute(&format!(
        "CREATE ROLE {role} NOLOGIN; GRANT USAGE ON SCHEMA pgcrew TO {role}"
    ))
    .await
    .unwrap();
    let mut c2 = t.db.get().await.unwrap();
    let tx = c2.transaction().await.unwrap();
    tx.batch_execute(&format!("SET LOCAL ROLE {role}"))
        .await
        .unwrap();
    let err = tx
        .query_one("SELECT pgcrew.run_output_channel($1)", &[&scope.run])
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
    );
    drop(tx);
    drop(c2);
    conn.batch_execute(&format!(
        "REVOKE USAGE ON SCHEMA pgcrew FROM {role}; DROP ROLE {role}"
    ))
    .await
    .unwrap();
    assert_eq!(
        scalar(
            &t.db,
            "SELECT count(*) FROM pgcrew.events WHERE event_type LIKE '%delta%'"
        )
        .await,
        0
    );
}

#[tokio::test]
async fn an_agent_run_on_a_streaming_kernel_publishes_its_model_steps() {
    use crate::kernel::{weather_agent, weather_registry, weather_script};
    let (t, tenant) = db_with_tenant("acme", &[], Some(10.0)).await;
    let body_runs = Arc::new(std::sync::atomic::AtomicU64::new(0));
    pgcrew::agent::register_agent(&t.db, &weather_agent())
        .await
        .unwrap();
    let model = Arc::new(ScriptedModel::by_turn(weather_script()));
    let kernel = Kernel::new(t.db.clone(), model)
        .with_tools(weather_registry(&body_runs))
        .with_streaming();
    let rt = pgcrew::AgentRuntime::new(kernel, "i1");
    let run = crate::common::submit_run(&rt, &tenant, "u", "forecaster", "weather?").await;
    let mut local = runs::subscribe_output(run);
    let done = rt.execute(run, None).await.unwrap();
    assert_eq!(done.state, runs::RunState::Completed);
    // iter-0 (a tool call, no text) and iter-1 (the answer) each end with Done.
    let first = until_done(async || local.recv().await).await;
    assert_eq!(first[0].step_key, "iter-0/model");
    let second = until_done(async || local.recv().await).await;
    assert_eq!(second[0].step_key, "iter-1/model");
    assert_eq!(text(&second), "It is sunny in Oslo.");
}
