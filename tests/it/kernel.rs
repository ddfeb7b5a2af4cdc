//! Kernel and agent integration tests.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use pgcrew::agent::{Tool, ToolError, ToolRegistry};
use pgcrew::kernel::{Kernel, ReplayPolicy, RunScope};
use pgcrew::model::{ModelRequest, PriceTable, ScriptedModel, ScriptedReply, error_kind};
use pgcrew::runs::{self, NewRun};
use pgcrew::tenancy;
use pgcrew::{Db, Error, TenantId};
use serde_json::{Value, json};

use std::time::Duration;

use crate::common::{
    TestDb, agent_runtime, count, eventually, ledger_events, submit_run, tenant, test_db,
};
use crate::mock_openai::{MockOpenAi, MockScript, mock_openai};

async fn setup(caps: &[&str], budget: Option<f64>) -> (TestDb, RunScope) {
    let t = test_db().await;
    let tenant = tenant(&t.db, "acme", caps, budget).await;
    let run = runs::create_run(&t.db, NewRun::new(tenant.clone()))
        .await
        .unwrap();
    (t, RunScope::new(run, tenant))
}

async fn events(db: &Db, scope: &RunScope) -> Vec<(String, Option<String>, Value)> {
    ledger_events(db, scope.run).await
}

/// A fake payment provider: remembers charges by idempotency key.
#[derive(Default)]
struct Provider {
    charges: Mutex<Vec<(String, i64)>>,
    keys_seen: Mutex<BTreeSet<String>>,
    body_runs: AtomicU64,
}

fn payment_tool(provider: Arc<Provider>) -> Tool {
    Tool::builder("charge_credit_card")
        .description("charges a card")
        .input_schema(json!({
            "type": "object",
            "properties": {
                "amount_cents": {"type": "integer", "minimum": 1},
                "card": {"type": "string", "minLength": 4}
            },
            "required": ["amount_cents", "card"],
            "additionalProperties": false
        }))
        .requires_capability("payments:charge")
        .handler(move |ctx, args| {
            let provider = provider.clone();
            async move {
                let n = provider.body_runs.fetch_add(1, Ordering::SeqCst);
                provider
                    .keys_seen
                    .lock()
                    .unwrap()
                    .insert(ctx.idempotency_key.clone());
                let amount = args["amount_cents"].as_i64().unwrap();
                let mut charges = provider.charges.lock().unwrap();
                // The provider is idempotent by key.
                let existing = charges.iter().position(|(k, _)| *k == ctx.idempotency_key);
                let index = match existing {
                    Some(i) => i,
                    None => {
                        charges.push((ctx.idempotency_key.clone(), amount));
                        charges.len() - 1
                    }
                };
                if n == 0 {
                    // The charge went through, but the response was lost.
                    assert!(!ctx.reconciliation);
                    return Err(ToolError::UnknownOutcome("provider timed out".into()));
                }
                assert!(ctx.reconciliation);
                Ok(json!({"charge_id": format!("ch_{index}"), "amount_cents": amount}))
            }
        })
        .build()
        .unwrap()
}

fn kernel(db: &Db, model: Arc<ScriptedModel>, tools: ToolRegistry) -> Kernel {
    Kernel::new(db.clone(), model).with_tools(tools)
}

#[tokio::test]
async fn payment_tool_unknown_outcome_is_reconciled_with_the_same_key() {
    let (t, scope) = setup(&["payments:charge"], None).await;
    let provider = Arc::new(Provider::default());
    let tools = ToolRegistry::new()
        .with(payment_tool(provider.clone()))
        .unwrap();
    let model = Arc::new(ScriptedModel::sequence(vec![]));
    let k = kernel(&t.db, model, tools);
    let args = json!({"amount_cents": 1250, "card": "4242"});

    let err = k
        .step_tool(&scope, "pay", "charge_credit_card", args.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ToolOutcomeUnknown { .. }), "{err}");
    // Calling the step again does not re-execute it: it still needs reconciliation.
    let again = k
        .step_tool(&scope, "pay", "charge_credit_card", args.clone())
        .await
        .unwrap_err();
    assert!(matches!(again, Error::ToolOutcomeUnknown { .. }), "{again}");
    assert_eq!(provider.body_runs.load(Ordering::SeqCst), 1);

    let done = k.reconcile_tool(&scope, "pay").await.unwrap();
    assert!(done.reconciled);
    assert_eq!(done.output["charge_id"], "ch_0");
    assert_eq!(done.output["amount_cents"], 1250);

    // A recorded completion is never re-executed.
    let replay = k
        .step_tool(&scope, "pay", "charge_credit_card", args.clone())
        .await
        .unwrap();
    assert!(replay.replayed);
    assert_eq!(replay.output, done.output);
    let again = k.reconcile_tool(&scope, "pay").await.unwrap();
    assert!(again.replayed);

    assert!(provider.body_runs.load(Ordering::SeqCst) <= 2);
    assert_eq!(provider.keys_seen.lock().unwrap().len(), 1);
    assert_eq!(provider.charges.lock().unwrap().len(), 1);
    assert_eq!(done.idempotency_key, replay.idempotency_key);

    let evs = events(&t.db, &scope).await;
    assert_eq!(count(&evs, "tool_requested"), 1);
    assert_eq!(count(&evs, "tool_outcome_unknown"), 1);
    assert_eq!(count(&evs, "tool_completed"), 1);
    assert!(
        runs::verify_run_chain(&t.db, scope.run)
            .await
            .unwrap()
            .valid
    );
}

#[tokio::test]
async fn crash_between_requested_and_completed_needs_reconciliation() {
    let (t, scope) = setup(&["payments:charge"], None).await;
    let provider = Arc::new(Provider::default());
    // The first instance "crashed" after recording tool_requested: simulate by recording it.
    let key = Kernel::idempotency_key(scope.run, "pay");
    runs::append_event(
        &t.db,
        scope.run,
        runs::NewEvent::new(
            "tool_requested",
            json!({"tool": "charge_credit_card", "arguments": {"amount_cents": 99, "card": "4242"},
                   "idempotency_key": key}),
        )
        .step("pay"),
        None,
    )
    .await
    .unwrap();
    provider.body_runs.store(1, Ordering::SeqCst); // the crashed attempt ran the body once
    let tools = ToolRegistry::new()
        .with(payment_tool(provider.clone()))
        .unwrap();
    let k = kernel(&t.db, Arc::new(ScriptedModel::sequence(vec![])), tools);
    let err = k
        .step_tool(
            &scope,
            "pay",
            "charge_credit_card",
            json!({"amount_cents": 99, "card": "4242"}),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ToolOutcomeUnknown { .. }), "{err}");
    assert_eq!(provider.body_runs.load(Ordering::SeqCst), 1);
    let done = k.reconcile_tool(&scope, "pay").await.unwrap();
    assert_eq!(done.idempotency_key, key);
    assert_eq!(done.output["amount_cents"], 99);
    assert_eq!(provider.body_runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn tool_rejections_are_recorded_and_the_tool_does_not_run() {
    // The tenant lacks payments:charge.
    let (t, scope) = setup(&[], None).await;
    let provider = Arc::new(Provider::default());
    let tools = ToolRegistry::new()
        .with(payment_tool(provider.clone()))
        .unwrap();
    let k = kernel(&t.db, Arc::new(ScriptedModel::sequence(vec![])), tools);

    let bad = k
        .step_tool(
            &scope,
            "s1",
            "charge_credit_card",
            json!({"amount_cents": "ten", "card": "4242", "extra": 1}),
        )
        .await
        .unwrap_err();
    let text = bad.to_string();
    assert!(matches!(bad, Error::InvalidInput { .. }), "{text}");
    assert!(text.contains("/amount_cents: expected integer"), "{text}");
    assert!(text.contains("unexpected property `extra`"), "{text}");

    let unknown = k
        .step_tool(&scope, "s2", "launch_rockets", json!({}))
        .await
        .unwrap_err();
    assert!(
        matches!(&unknown, Error::NotFound { kind: "tool", .. }),
        "{unknown}"
    );

    let denied = k
        .step_tool(
            &scope,
            "s3",
            "charge_credit_card",
            json!({"amount_cents": 5, "card": "4242"}),
        )
        .await
        .unwrap_err();
    assert!(matches!(denied, Error::CapabilityDenied { .. }), "{denied}");
    assert_eq!(provider.body_runs.load(Ordering::SeqCst), 0);

    let evs = events(&t.db, &scope).await;
    assert_eq!(count(&evs, "tool_requested"), 0);
    let rejected: Vec<_> = evs
        .iter()
        .filter(|(t, _, _)| t == "tool_rejected")
        .collect();
    assert_eq!(rejected.len(), 2);
    assert_eq!(rejected[0].1.as_deref(), Some("s1"));
    assert_eq!(rejected[0].2["reason"], "invalid_arguments");
    assert_eq!(rejected[1].2["reason"], "unknown_tool");
    let denied: Vec<_> = evs
        .iter()
        .filter(|(t, _, _)| t == "capability_denied")
        .collect();
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0].2["capability"], "payments:charge");

    // Broken definitions are rejected at build time.
    assert!(
        Tool::builder("bad name!")
            .handler(|_, a| async move { Ok(a) })
            .build()
            .is_err()
    );
    assert!(
        Tool::builder("t")
            .input_schema(json!({"type": "strnig"}))
            .handler(|_, a| async move { Ok(a) })
            .build()
            .is_err()
    );
    assert!(Tool::builder("t").build().is_err());
}

fn request(prompt: &str) -> ModelRequest {
    ModelRequest::new("gpt-4o-mini")
        .system("be brief")
        .user(prompt)
        .max_tokens(50)
        .temperature(0.2)
}

#[tokio::test]
async fn model_step_records_settles_and_replays_without_calling() {
    let (t, scope) = setup(&[], Some(10.0)).await;
    let model = Arc::new(ScriptedModel::sequence(vec![ScriptedReply::text("four")]));
    let k = kernel(&t.db, model.clone(), ToolRegistry::new());
    let first = k
        .step_model(&scope, "m1", &request("2+2?"), ReplayPolicy::Strict)
        .await
        .unwrap();
    assert!(!first.replayed);
    assert_eq!(first.response.content_text(), "four");
    assert!(first.cost_usd > 0.0);
    assert_eq!(model.calls(), 1);

    let again = k
        .step_model(&scope, "m1", &request("2+2?"), ReplayPolicy::Strict)
        .await
        .unwrap();
    assert!(again.replayed && !again.drift);
    assert_eq!(again.response, first.response);
    assert_eq!(model.calls(), 1);

    let tenant = tenancy::get(&t.db, &scope.tenant).await.unwrap();
    assert!((tenant.spent_usd - first.cost_usd).abs() < 1e-12);
    assert!(tenant.reserved_usd.abs() < 1e-12);
    let evs = events(&t.db, &scope).await;
    let completed = evs.iter().find(|(t, _, _)| t == "model_completed").unwrap();
    assert_eq!(
        completed.2["fingerprint"],
        request("2+2?").fingerprint().unwrap()
    );
    assert_eq!(completed.2["output"], "four");
    assert!(completed.2["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    assert_eq!(count(&evs, "model_requested"), 1);
    let conn = t.db.get().await.unwrap();
    let entries: i64 = conn
        .query_one(
            "SELECT count(*) FROM pgcrew.cost_entries WHERE run_id = $1",
            &[&scope.run.as_uuid()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(entries, 1);
}

#[tokio::test]
async fn replay_policies_with_prompt_and_option_drift() {
    let (t, scope) = setup(&[], None).await;
    let model = Arc::new(ScriptedModel::by_turn(vec![ScriptedReply::text("first")]));
    let k = kernel(&t.db, model.clone(), ToolRegistry::new());
    k.step_model(&scope, "m1", &request("hello"), ReplayPolicy::Strict)
        .await
        .unwrap();
    assert_eq!(model.calls(), 1);

    let prompt_drift = request("hello, changed");
    let option_drift = request("hello").temperature(0.9);

    // strict: both drifts are rejected, no model call.
    for drifted in [&prompt_drift, &option_drift] {
        let err = k
            .step_model(&scope, "m1", drifted, ReplayPolicy::Strict)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::ReplayConsistency { .. }), "{err}");
    }
    assert_eq!(model.calls(), 1);

    // allow_prompt_drift: recorded output, drift recorded.
    for drifted in [&prompt_drift, &option_drift] {
        let s = k
            .step_model(&scope, "m1", drifted, ReplayPolicy::AllowPromptDrift)
            .await
            .unwrap();
        assert!(s.replayed && s.drift);
        assert_eq!(s.run, scope.run);
        assert_eq!(s.response.content_text(), "first");
    }
    assert_eq!(model.calls(), 1);
    let evs = events(&t.db, &scope).await;
    assert_eq!(count(&evs, "replay_rejected"), 2);
    assert_eq!(count(&evs, "replayed_with_drift"), 2);
    let seq_of_step = runs::read_events(&t.db, scope.run, 0, 1000)
        .await
        .unwrap()
        .into_iter()
        .find(|e| e.step_key.as_deref() == Some("m1"))
        .unwrap()
        .seq;

    // fork_on_drift (option drift): a new run carrying the events before the step, executed there.
    let s = k
        .step_model(&scope, "m1", &option_drift, ReplayPolicy::ForkOnDrift)
        .await
        .unwrap();
    assert!(!s.replayed && s.drift);
    assert_eq!(s.forked_from, Some(scope.run));
    assert_ne!(s.run, scope.run);
    assert_eq!(model.calls(), 2);
    let fork = runs::get_run(&t.db, s.run).await.unwrap();
    assert_eq!(fork.parent_run_id, Some(scope.run));
    assert_eq!(fork.forked_at_seq, Some(seq_of_step - 1));
    let fork_scope = RunScope::new(s.run, scope.tenant.clone());
    let fevs = events(&t.db, &fork_scope).await;
    assert_eq!(count(&fevs, "run_forked"), 1);
    assert_eq!(count(&fevs, "model_completed"), 1);
    // Replaying the forked step with the new options in the fork does not call the model.
    let r = k
        .step_model(&fork_scope, "m1", &option_drift, ReplayPolicy::Strict)
        .await
        .unwrap();
    assert!(r.replayed);
    assert_eq!(model.calls(), 2);

    // fork_on_drift with prompt drift, from a run that has an earlier step to carry over.
    let mut other_model = request("second");
    other_model.model = "gpt-4o".into();
    k.step_model(&fork_scope, "m2", &other_model, ReplayPolicy::Strict)
        .await
        .unwrap();
    let s2 = k
        .step_model(
            &fork_scope,
            "m2",
            &request("second, drifted"),
            ReplayPolicy::ForkOnDrift,
        )
        .await
        .unwrap();
    assert_eq!(s2.forked_from, Some(fork_scope.run));
    let second = RunScope::new(s2.run, scope.tenant.clone());
    let carried = events(&t.db, &second).await;
    // m1's events were carried over, so m1 replays in the second fork without a model call.
    assert!(
        carried
            .iter()
            .any(|(ty, k, _)| ty == "model_completed" && k.as_deref() == Some("m1"))
    );
    let calls = model.calls();
    let r = k
        .step_model(&second, "m1", &option_drift, ReplayPolicy::Strict)
        .await
        .unwrap();
    assert!(r.replayed);
    assert_eq!(model.calls(), calls);
    assert!(runs::verify_run_chain(&t.db, s.run).await.unwrap().valid);
    // Forks re-append the carried events through append_events: fresh v2 hashes bound to the
    // fork, valid under both verifiers.
    for fork in [s.run, s2.run] {
        let v = runs::verify_run_chain(&t.db, fork).await.unwrap();
        assert!(v.valid && v.format == 2, "{v:?}");
        let v = runs::verify_run_chain_sql(&t.db, fork).await.unwrap();
        assert!(v.valid && v.format == 2, "{v:?}");
    }
}

#[tokio::test]
async fn budget_exhausted_mid_run_is_recorded_and_nothing_is_overspent() {
    let limit = 0.05;
    let (t, scope) = setup(&[], Some(limit)).await;
    // An expensive model: ~ (prompt + 200 completion tokens) at $50/M each.
    let prices = PriceTable::empty().with("pricey", 50.0, 50.0).unwrap();
    let model = Arc::new(ScriptedModel::from_fn(|req| {
        ScriptedModel::reply(req, &ScriptedReply::text("x".repeat(800)))
    }));
    let k = kernel(&t.db, model.clone(), ToolRegistry::new()).with_prices(prices);
    let mut completed = 0;
    let err = loop {
        let req = ModelRequest::new("pricey").user("go").max_tokens(200);
        match k
            .step_model(
                &scope,
                &format!("iter-{completed}/model"),
                &req,
                ReplayPolicy::Strict,
            )
            .await
        {
            Ok(_) => completed += 1,
            Err(e) => break e,
        }
        assert!(completed < 100, "budget never ran out");
    };
    assert!(matches!(err, Error::BudgetExceeded { .. }), "{err}");
    assert!(completed >= 1);
    assert_eq!(model.calls(), completed as u64);
    runs::fail_run(&t.db, scope.run, "budget_exceeded", &err.to_string(), None)
        .await
        .unwrap();
    let run = runs::get_run(&t.db, scope.run).await.unwrap();
    assert_eq!(run.state, runs::RunState::Failed);
    assert_eq!(run.error_type.as_deref(), Some("budget_exceeded"));
    let tenant = tenancy::get(&t.db, &scope.tenant).await.unwrap();
    assert!(
        tenant.spent_usd <= limit + 1e-12,
        "spent {}",
        tenant.spent_usd
    );
    assert!(tenant.reserved_usd.abs() < 1e-12);
    let evs = events(&t.db, &scope).await;
    assert_eq!(count(&evs, "budget_exceeded"), 1);
    assert_eq!(count(&evs, "model_completed"), completed);
}

#[tokio::test]
async fn provider_errors_and_invalid_structured_output_are_recorded() {
    let (t, scope) = setup(&[], Some(10.0)).await;
    let model = Arc::new(ScriptedModel::sequence(vec![
        ScriptedReply::error(error_kind::RATE_LIMITED, "slow down"),
        ScriptedReply::text("not json {"),
    ]));
    let k = kernel(&t.db, model.clone(), ToolRegistry::new());
    let err = k
        .step_model(&scope, "m1", &request("hi"), ReplayPolicy::Strict)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Model { kind, .. } if kind == error_kind::RATE_LIMITED),
        "{err}"
    );
    let tenant = tenancy::get(&t.db, &scope.tenant).await.unwrap();
    assert!(tenant.reserved_usd.abs() < 1e-12, "reservation released");
    assert!(tenant.spent_usd.abs() < 1e-12);

    #[derive(serde::Deserialize, Debug)]
    struct Answer {
        #[allow(dead_code)]
        n: i64,
    }
    let req = request("answer").output_schema(
        "answer",
        json!({"type": "object", "properties": {"n": {"type": "integer"}}}),
    );
    let err = k
        .step_model_structured::<Answer>(&scope, "m2", &req, ReplayPolicy::Strict)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Model { kind, .. } if kind == error_kind::INVALID_OUTPUT),
        "{err}"
    );
    let evs = events(&t.db, &scope).await;
    let failed = evs.iter().find(|(t, _, _)| t == "model_failed").unwrap();
    assert_eq!(failed.2["kind"], "rate_limited");
    assert_eq!(failed.1.as_deref(), Some("m1"));
    let invalid = evs.iter().find(|(t, _, _)| t == "output_invalid").unwrap();
    assert_eq!(invalid.1.as_deref(), Some("m2"));
    assert!(
        invalid.2["message"]
            .as_str()
            .unwrap()
            .contains("invalid JSON")
    );
}

#[tokio::test]
async fn workflow_resume_skips_completed_steps() {
    let (t, scope) = setup(&[], None).await;
    let k = kernel(
        &t.db,
        Arc::new(ScriptedModel::sequence(vec![])),
        ToolRegistry::new(),
    );
    let runs_a = Arc::new(AtomicU64::new(0));
    let runs_b = Arc::new(AtomicU64::new(0));
    let crash = Arc::new(std::sync::atomic::AtomicBool::new(true));

    let workflow = |ctx: pgcrew::kernel::WorkflowCtx| {
        let (a, b, crash) = (runs_a.clone(), runs_b.clone(), crash.clone());
        async move {
            let x: i64 = ctx
                .step("fetch", || async {
                    a.fetch_add(1, Ordering::SeqCst);
                    Ok(20)
                })
                .await?;
            let y: i64 = ctx
                .step("compute", || async {
                    b.fetch_add(1, Ordering::SeqCst);
                    if crash.load(Ordering::SeqCst) {
                        return Err(Error::Cancelled("simulated crash".into()));
                    }
                    Ok(x + 22)
                })
                .await?;
            Ok::<_, Error>(y)
        }
    };
    let err = k.run_workflow(&scope, workflow).await.unwrap_err();
    assert!(matches!(err, Error::Cancelled(_)));
    assert_eq!(runs_a.load(Ordering::SeqCst), 1);
    assert_eq!(runs_b.load(Ordering::SeqCst), 1);

    crash.store(false, Ordering::SeqCst);
    let out: i64 = k.run_workflow(&scope, workflow).await.unwrap();
    assert_eq!(out, 42);
    assert_eq!(runs_a.load(Ordering::SeqCst), 1, "fetch was not repeated");
    assert_eq!(runs_b.load(Ordering::SeqCst), 2);

    // A completed workflow returns its recorded result without running anything.
    let out: i64 = k.run_workflow(&scope, workflow).await.unwrap();
    assert_eq!(out, 42);
    assert_eq!(runs_a.load(Ordering::SeqCst), 1);
    assert_eq!(runs_b.load(Ordering::SeqCst), 2);

    let evs = events(&t.db, &scope).await;
    assert_eq!(count(&evs, "workflow_step_completed"), 2);
    assert_eq!(count(&evs, "workflow_step_failed"), 1);
    assert_eq!(count(&evs, "workflow_completed"), 1);

    // Duplicate step names in one execution are rejected.
    let scope2 = RunScope::new(
        runs::create_run(&t.db, NewRun::new(scope.tenant.clone()))
            .await
            .unwrap(),
        scope.tenant.clone(),
    );
    let err = k
        .run_workflow(&scope2, |ctx| async move {
            let _: i64 = ctx.step("a", || async { Ok(1) }).await?;
            let v: i64 = ctx.step("a", || async { Ok(2) }).await?;
            Ok::<_, Error>(v)
        })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInput { .. }), "{err}");
}

// ------------------------------------------------------------------------------------------
// Agents
// ------------------------------------------------------------------------------------------

use pgcrew::agent::{AgentDef, AgentRuntime, register_agent, register_tools};
use pgcrew::model::{ModelPort, ModelResponse};

pub(crate) fn weather_tool(body_runs: Arc<AtomicU64>) -> Tool {
    Tool::builder("lookup_weather")
        .description("weather of a city")
        .input_schema(json!({
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"]
        }))
        .handler(move |_ctx, args| {
            let body_runs = body_runs.clone();
            async move {
                body_runs.fetch_add(1, Ordering::SeqCst);
                Ok(json!({"city": args["city"], "forecast": "sunny"}))
            }
        })
        .build()
        .unwrap()
}

pub(crate) fn weather_agent() -> AgentDef {
    AgentDef::new("forecaster", "gpt-4o-mini")
        .description("answers weather questions")
        .system_prompt("use the tool")
        .tool("lookup_weather")
        .max_tokens(100)
        .temperature(0.0)
        .max_iterations(4)
}

fn weather_script() -> Vec<ScriptedReply> {
    vec![
        ScriptedReply::tool_call("lookup_weather", json!({"city": "Oslo"})),
        ScriptedReply::text("It is sunny in Oslo."),
    ]
}

/// A model that answers the first `turns` turns from a script and then never answers (the
/// instance "dies" during that call).
struct HangsAfter {
    inner: ScriptedModel,
    turns: usize,
}

#[async_trait::async_trait]
impl ModelPort for HangsAfter {
    fn name(&self) -> &str {
        "hangs-after"
    }
    async fn complete(&self, request: &ModelRequest) -> pgcrew::Result<ModelResponse> {
        let turn = request
            .messages
            .iter()
            .filter(|m| m.role() == "assistant")
            .count();
        if turn >= self.turns {
            std::future::pending::<()>().await;
        }
        self.inner.complete(request).await
    }
}

/// `rt` executes `run`, retrying while the lease of the instance that died is still valid
/// (for 10 s at most).
async fn execute_once_lease_expires(rt: &AgentRuntime, run: pgcrew::RunId) -> pgcrew::runs::Run {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match rt.execute(run, None).await {
            Ok(r) => return r,
            Err(Error::LeaseLost(_)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[tokio::test]
async fn agent_run_resumes_on_another_instance_without_repeating_steps() {
    let (t, scope) = setup(&[], Some(10.0)).await;
    let _ = scope;
    let body_runs = Arc::new(AtomicU64::new(0));
    let tools = || {
        ToolRegistry::new()
            .with(weather_tool(body_runs.clone()))
            .unwrap()
    };
    register_agent(&t.db, &weather_agent()).await.unwrap();
    register_tools(&t.db, &tools()).await.unwrap();

    // Instance A: answers turn 0, then hangs in the turn-1 call and is killed.
    let model_a = Arc::new(HangsAfter {
        inner: ScriptedModel::by_turn(weather_script()),
        turns: 1,
    });
    let a =
        agent_runtime(&t.db, model_a, tools(), "instance-a").lease_ttl(Duration::from_millis(800));
    let tenant = TenantId::new("acme").unwrap();
    let run = submit_run(&a, &tenant, "user-1", "forecaster", "weather in Oslo?").await;
    let a_task = tokio::spawn({
        let a = a.clone();
        async move { a.execute(run, None).await }
    });
    let scope = RunScope::new(run, tenant.clone());
    assert!(
        eventually(Duration::from_secs(10), || async {
            let evs = events(&t.db, &scope).await;
            evs.iter()
                .any(|(ty, k, _)| ty == "model_requested" && k.as_deref() == Some("iter-1/model"))
        })
        .await
    );
    a_task.abort(); // kill -9 of instance A
    assert_eq!(body_runs.load(Ordering::SeqCst), 1);

    // Instance B takes over once A's lease expires.
    let model_b = Arc::new(ScriptedModel::by_turn(weather_script()));
    let b = agent_runtime(&t.db, model_b.clone(), tools(), "instance-b");
    let done = execute_once_lease_expires(&b, run).await;
    assert_eq!(done.state, runs::RunState::Completed);
    assert_eq!(done.response_text.as_deref(), Some("It is sunny in Oslo."));
    assert!(done.input_tokens > 0 && done.output_tokens > 0);
    assert!(done.cost_usd > 0.0);
    // B replayed iter-0 (no model call, no tool run) and made only the turn-1 call.
    assert_eq!(model_b.calls(), 1);
    assert_eq!(body_runs.load(Ordering::SeqCst), 1);
    let evs = events(&t.db, &scope).await;
    assert_eq!(count(&evs, "model_completed"), 2);
    assert_eq!(count(&evs, "tool_completed"), 1);
    assert!(evs.iter().any(|(ty, k, _)| ty == "tool_completed"
        && k.as_deref().is_some_and(|k| k.starts_with("iter-0/tool-"))));
    assert!(runs::verify_run_chain(&t.db, run).await.unwrap().valid);
}

#[tokio::test]
async fn agent_run_is_claimed_from_the_queue_by_an_instance_with_its_tools() {
    let t = test_db().await;
    let tenant = tenant(&t.db, "acme", &[], Some(10.0)).await;
    let body_runs = Arc::new(AtomicU64::new(0));
    let tools = ToolRegistry::new()
        .with(weather_tool(body_runs.clone()))
        .unwrap();
    register_agent(&t.db, &weather_agent()).await.unwrap();
    let model = Arc::new(ScriptedModel::by_turn(weather_script()));
    let rt = agent_runtime(&t.db, model.clone(), tools, "worker-1");
    let pool = rt
        .clone()
        .install(
            pgcrew::queue::WorkerPool::builder().poll_interval(Duration::from_millis(100)),
            &["forecaster"],
        )
        .build()
        .unwrap();
    let cfg = pgcrew::ClientConfig::builder()
        .instance_id(pgcrew::InstanceId::new("worker-1").unwrap())
        .build()
        .unwrap();
    let client = pgcrew::Client::builder(t.dsn())
        .config(cfg)
        .service(pool)
        .build()
        .await
        .unwrap();
    client.start().await.unwrap();
    let run = submit_run(&rt, &tenant, "s", "forecaster", "weather in Oslo?").await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            runs::get_run(&t.db, run).await.unwrap().state == runs::RunState::Completed
        })
        .await
    );
    client.stop().await.unwrap();
    assert_eq!(model.calls(), 2);
    assert_eq!(body_runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn unknown_agent_max_iterations_and_cancellation_are_recorded() {
    let t = test_db().await;
    let tenant = tenant(&t.db, "acme", &[], None).await;
    let body_runs = Arc::new(AtomicU64::new(0));
    let tools = ToolRegistry::new()
        .with(weather_tool(body_runs.clone()))
        .unwrap();
    // Always calls the tool: never finishes.
    let model = Arc::new(ScriptedModel::from_fn(|req| {
        ScriptedModel::reply(
            req,
            &ScriptedReply::tool_call("lookup_weather", json!({"city": "Rome"})),
        )
    }));
    let rt = agent_runtime(&t.db, model.clone(), tools, "i1");
    let session = rt.new_session(&tenant, "s").await.unwrap();

    // Unknown agent at submit: clear error, nothing written.
    let err = rt.submit("ghost", session.id, "hi").await.unwrap_err();
    assert!(
        matches!(&err, Error::NotFound { kind: "agent", .. }),
        "{err}"
    );
    let n = runs::list_runs(&t.db, &runs::RunFilter::default())
        .await
        .unwrap()
        .len();
    assert_eq!(n, 0);

    // Unknown agent at execution (e.g. definition removed): the run fails, recorded.
    let ghost = runs::create_run(
        &t.db,
        NewRun::new(tenant.clone()).agent("ghost").prompt("hi"),
    )
    .await
    .unwrap();
    let r = rt.execute(ghost, None).await.unwrap();
    assert_eq!(r.state, runs::RunState::Failed);
    assert_eq!(r.error_type.as_deref(), Some("unknown_agent"));
    let evs = events(&t.db, &RunScope::new(ghost, tenant.clone())).await;
    assert!(
        evs.iter()
            .any(|(ty, _, p)| ty == "run_failed" && p.to_string().contains("unknown_agent"))
    );

    // Max iterations.
    register_agent(&t.db, &weather_agent().max_iterations(2))
        .await
        .unwrap();
    let run = rt.submit("forecaster", session.id, "loop").await.unwrap();
    let r = rt.execute(run, None).await.unwrap();
    assert_eq!(r.state, runs::RunState::Failed);
    assert_eq!(r.error_type.as_deref(), Some("max_iterations"));
    assert_eq!(model.calls(), 2);
    assert_eq!(body_runs.load(Ordering::SeqCst), 2);

    // Cancellation mid-run: the tool cancels the run; the loop stops at the next iteration.
    let db = t.db.clone();
    let canceller = Tool::builder("lookup_weather")
        .input_schema(json!({"type": "object"}))
        .handler(move |ctx, _args| {
            let db = db.clone();
            async move {
                runs::cancel_run(&db, ctx.run, "user pressed stop")
                    .await
                    .map_err(|e| ToolError::Failed(e.to_string()))?;
                Ok(json!({"ok": true}))
            }
        })
        .build()
        .unwrap();
    let model2 = Arc::new(ScriptedModel::from_fn(|req| {
        ScriptedModel::reply(
            req,
            &ScriptedReply::tool_call("lookup_weather", json!({"city": "Rome"})),
        )
    }));
    let rt2 = AgentRuntime::new(
        Kernel::new(t.db.clone(), model2.clone())
            .with_tools(ToolRegistry::new().with(canceller).unwrap()),
        "i2",
    );
    let run = rt2
        .submit("forecaster", session.id, "stop me")
        .await
        .unwrap();
    let r = rt2.execute(run, None).await;
    let r = match r {
        Ok(r) => r,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(r.state, runs::RunState::Cancelled);
    assert_eq!(model2.calls(), 1);
}

// ------------------------------------------------------------------------------------------
// Incremental harness
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn harness_run_twice_does_only_the_remaining_work() {
    use pgcrew::kernel::Harness;
    let (t, scope) = setup(&[], None).await;
    let k = kernel(
        &t.db,
        Arc::new(ScriptedModel::sequence(vec![])),
        ToolRegistry::new(),
    );
    let a_runs = Arc::new(AtomicU64::new(0));
    let b_runs = Arc::new(AtomicU64::new(0));
    let c_runs = Arc::new(AtomicU64::new(0));
    // Unit b processes 4 items, saving progress after each; the first time it crashes after 2.
    let crash_b = Arc::new(std::sync::atomic::AtomicBool::new(true));
    // Unit c's clean-state check fails once (a temp file was left behind).
    let dirty_c = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let items_done = Arc::new(Mutex::new(Vec::<i64>::new()));

    let build = || {
        let (a, b, c) = (a_runs.clone(), b_runs.clone(), c_runs.clone());
        let (crash, dirty, items) = (crash_b.clone(), dirty_c.clone(), items_done.clone());
        Harness::new(k.clone())
            .unit("a", move |_ctx| {
                let a = a.clone();
                async move {
                    a.fetch_add(1, Ordering::SeqCst);
                    Ok(json!("a done"))
                }
            })
            .unit("b", move |ctx| {
                let (b, crash, items) = (b.clone(), crash.clone(), items.clone());
                async move {
                    b.fetch_add(1, Ordering::SeqCst);
                    let start = ctx.progress().and_then(|p| p["next"].as_i64()).unwrap_or(0);
                    for i in start..4 {
                        items.lock().unwrap().push(i);
                        ctx.save_progress(json!({"next": i + 1})).await?;
                        if i == 1 && crash.swap(false, Ordering::SeqCst) {
                            return Err(Error::Cancelled("crash in unit b".into()));
                        }
                    }
                    Ok(json!({"items": 4}))
                }
            })
            .unit("c", move |_ctx| {
                let c = c.clone();
                async move {
                    c.fetch_add(1, Ordering::SeqCst);
                    Ok(json!("c done"))
                }
            })
            .clean_check(move |_ctx, _out| {
                let dirty = dirty.clone();
                async move {
                    if dirty.load(Ordering::SeqCst) {
                        Err("temp file /tmp/c.lock still exists".to_string())
                    } else {
                        Ok(())
                    }
                }
            })
            .unit("d", |_ctx| async move { Ok(json!(null)) })
    };

    let err = build().run(&scope).await.unwrap_err();
    assert!(matches!(err, Error::Cancelled(_)), "{err}");
    assert_eq!(*items_done.lock().unwrap(), vec![0, 1]);

    let err = build().run(&scope).await.unwrap_err();
    assert!(
        matches!(&err, Error::UncleanState { unit, .. } if unit == "c"),
        "{err}"
    );
    // b resumed from its progress snapshot: items 2 and 3 only.
    assert_eq!(*items_done.lock().unwrap(), vec![0, 1, 2, 3]);

    dirty_c.store(false, Ordering::SeqCst);
    let report = build().run(&scope).await.unwrap();
    assert_eq!(report.skipped, vec!["a".to_string(), "b".to_string()]);
    assert_eq!(report.ran, vec!["c".to_string(), "d".to_string()]);
    let report = build().run(&scope).await.unwrap();
    assert!(report.ran.is_empty());
    assert_eq!(report.skipped.len(), 4);
    assert_eq!(report.outputs[1].1, json!({"items": 4}));

    assert_eq!(a_runs.load(Ordering::SeqCst), 1);
    assert_eq!(b_runs.load(Ordering::SeqCst), 2);
    assert_eq!(c_runs.load(Ordering::SeqCst), 2);
    let evs = events(&t.db, &scope).await;
    assert_eq!(count(&evs, "harness_unit_completed"), 4);
    assert_eq!(count(&evs, "harness_unit_unclean"), 1);
    assert_eq!(count(&evs, "harness_unit_failed"), 1);
    let history = runs::artifact_history(&t.db, scope.run, "harness/b/progress")
        .await
        .unwrap();
    assert_eq!(history.len(), 4);
}

#[tokio::test]
async fn agent_run_fails_with_budget_exceeded_and_nothing_is_overspent() {
    let limit = 0.05;
    let t = test_db().await;
    let tenant = tenant(&t.db, "acme", &[], Some(limit)).await;
    let body_runs = Arc::new(AtomicU64::new(0));
    let tools = ToolRegistry::new()
        .with(weather_tool(body_runs.clone()))
        .unwrap();
    // A model that always calls the tool (the run never finishes by itself), priced high.
    let model = Arc::new(ScriptedModel::from_fn(|req| {
        ScriptedModel::reply(
            req,
            &ScriptedReply::tool_call("lookup_weather", json!({"city": "Rome"})),
        )
    }));
    let prices = PriceTable::empty().with("pricey", 50.0, 50.0).unwrap();
    let def = AgentDef::new("spender", "pricey")
        .tool("lookup_weather")
        .max_tokens(200)
        .max_iterations(500);
    register_agent(&t.db, &def).await.unwrap();
    let rt = AgentRuntime::new(
        Kernel::new(t.db.clone(), model.clone())
            .with_tools(tools)
            .with_prices(prices),
        "i1",
    );
    let run = submit_run(&rt, &tenant, "s", "spender", "go").await;
    let r = rt.execute(run, None).await.unwrap();
    assert_eq!(r.state, runs::RunState::Failed);
    assert_eq!(r.error_type.as_deref(), Some("budget_exceeded"));
    assert!(model.calls() >= 2, "some iterations ran first");
    let tn = tenancy::get(&t.db, &tenant).await.unwrap();
    assert!(tn.spent_usd > 0.0);
    assert!(tn.spent_usd <= limit + 1e-12, "spent {}", tn.spent_usd);
    assert!(tn.reserved_usd.abs() < 1e-12);
    let evs = events(&t.db, &RunScope::new(run, tenant.clone())).await;
    assert_eq!(count(&evs, "budget_exceeded"), 1);
    assert_eq!(count(&evs, "model_completed") as u64, model.calls());
    assert_eq!(count(&evs, "run_failed"), 1);
}

// ------------------------------------------------------------------------------------------
// Resume against an OpenAI-compatible mock server on loopback
// ------------------------------------------------------------------------------------------

/// The mock for the weather agent: turn 0 calls `lookup_weather`, turn 1 answers.
pub(crate) async fn weather_mock() -> MockOpenAi {
    mock_openai(MockScript {
        tool_calls: json!([{
            "id": "call_abc", "type": "function",
            "function": {"name": "lookup_weather", "arguments": "{\"city\":\"Oslo\"}"}}]),
        final_text: "It is sunny in Oslo.",
        latency: Duration::ZERO,
        usage: (40, 9),
    })
    .await
}

pub(crate) fn openai(server: &MockOpenAi) -> Arc<pgcrew::model::OpenAiModel> {
    Arc::new(pgcrew::model::OpenAiModel::new(
        pgcrew::model::OpenAiConfig::builder()
            .base_url(&server.base_url)
            .api_key("sk-test")
            .timeout(Duration::from_secs(60))
            .max_retries(0)
            .build()
            .unwrap(),
    ))
}

#[tokio::test]
async fn killed_instance_mid_agent_run_openai_mock_sees_each_completed_step_once() {
    let t = test_db().await;
    let tenant = tenant(&t.db, "acme", &[], Some(10.0)).await;
    let server = weather_mock().await;
    let body_runs = Arc::new(AtomicU64::new(0));
    let tools = || {
        ToolRegistry::new()
            .with(weather_tool(body_runs.clone()))
            .unwrap()
    };
    register_agent(&t.db, &weather_agent()).await.unwrap();
    let a = agent_runtime(&t.db, openai(&server), tools(), "instance-a")
        .lease_ttl(Duration::from_millis(900));
    let run = submit_run(&a, &tenant, "u", "forecaster", "weather in Oslo?").await;
    let a_task = tokio::spawn({
        let a = a.clone();
        async move { a.execute(run, None).await }
    });
    assert!(
        eventually(Duration::from_secs(10), || async {
            server.requests.lock().unwrap().contains(&1)
        })
        .await
    );
    a_task.abort(); // instance A dies in the middle of the turn-1 call
    server.hang.store(false, Ordering::SeqCst);

    let b = agent_runtime(&t.db, openai(&server), tools(), "instance-b");
    let done = execute_once_lease_expires(&b, run).await;
    assert_eq!(done.state, runs::RunState::Completed);
    assert_eq!(done.response_text.as_deref(), Some("It is sunny in Oslo."));
    assert_eq!(done.input_tokens, 80);
    assert_eq!(done.output_tokens, 18);
    // Each completed model step was answered by the server exactly once; the tool ran once.
    let mut answered = server.answered.lock().unwrap().clone();
    answered.sort();
    assert_eq!(answered, vec![0, 1]);
    let mut requests = server.requests.lock().unwrap().clone();
    requests.sort();
    assert_eq!(requests, vec![0, 1, 1], "B did not repeat the turn-0 call");
    assert_eq!(body_runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn agent_feeds_unknown_tool_and_bad_arguments_back_and_records_them() {
    let t = test_db().await;
    let tenant = tenant(&t.db, "acme", &[], None).await;
    let body_runs = Arc::new(AtomicU64::new(0));
    let tools = ToolRegistry::new()
        .with(weather_tool(body_runs.clone()))
        .unwrap();
    register_agent(&t.db, &weather_agent()).await.unwrap();
    let model = Arc::new(ScriptedModel::by_turn(vec![
        ScriptedReply::tool_call("teleport", json!({"to": "Mars"})),
        ScriptedReply::tool_call("lookup_weather", json!({"town": 7})),
        ScriptedReply::text("Sorry, I could not look that up."),
    ]));
    let rt = agent_runtime(&t.db, model.clone(), tools, "i1");
    let run = submit_run(&rt, &tenant, "s", "forecaster", "weather?").await;
    let r = rt.execute(run, None).await.unwrap();
    assert_eq!(r.state, runs::RunState::Completed);
    assert_eq!(body_runs.load(Ordering::SeqCst), 0);
    // The model saw both errors as tool results.
    let last = model.requests().pop().unwrap();
    let tool_texts: Vec<String> = last
        .messages
        .iter()
        .filter(|m| m.role() == "tool")
        .map(|m| m.text().to_string())
        .collect();
    assert_eq!(tool_texts.len(), 2);
    assert!(
        tool_texts[0].contains("tool not found: teleport"),
        "{tool_texts:?}"
    );
    assert!(
        tool_texts[1].contains("missing required property `city`"),
        "{tool_texts:?}"
    );
    let evs = events(&t.db, &RunScope::new(run, tenant.clone())).await;
    let reasons: Vec<_> = evs
        .iter()
        .filter(|(ty, _, _)| ty == "tool_rejected")
        .map(|(_, k, p)| {
            (
                k.clone().unwrap(),
                p["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        reasons,
        vec![
            (
                "iter-0/tool-call_0_0".to_string(),
                "unknown_tool".to_string()
            ),
            (
                "iter-1/tool-call_1_0".to_string(),
                "invalid_arguments".to_string()
            ),
        ]
    );
}

/// A model whose call outlives the caller's run lease (the run is cancelled during the call).
struct LosesLease {
    db: Db,
    inner: ScriptedModel,
}

#[async_trait::async_trait]
impl ModelPort for LosesLease {
    fn name(&self) -> &str {
        "loses-lease"
    }
    async fn complete(&self, request: &ModelRequest) -> pgcrew::Result<ModelResponse> {
        let run = runs::list_runs(&self.db, &runs::RunFilter::default())
            .await?
            .remove(0)
            .id;
        runs::cancel_run(&self.db, run, "stop during the call").await?;
        self.inner.complete(request).await
    }
}

#[tokio::test]
async fn model_call_that_cannot_be_recorded_is_still_charged() {
    let (t, scope) = setup(&[], Some(10.0)).await;
    let lease = runs::acquire_run_lease(&t.db, scope.run, "me", Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    let scope = scope.with_lease(lease.token);
    let model = Arc::new(LosesLease {
        db: t.db.clone(),
        inner: ScriptedModel::sequence(vec![ScriptedReply::text("late")]),
    });
    let k = Kernel::new(t.db.clone(), model);
    let err = k
        .step_model(&scope, "m1", &request("hi"), ReplayPolicy::Strict)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::LeaseLost(_)), "{err}");
    let tn = tenancy::get(&t.db, &scope.tenant).await.unwrap();
    assert!(tn.spent_usd > 0.0, "the paid call was charged");
    assert!(tn.reserved_usd.abs() < 1e-12);
    let evs = events(&t.db, &scope).await;
    assert_eq!(count(&evs, "model_requested"), 1);
    assert_eq!(count(&evs, "model_completed"), 0);
}
