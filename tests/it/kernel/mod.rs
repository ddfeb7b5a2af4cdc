//! Kernel and agent integration tests.

mod agents;
mod degradation;
mod model;
mod openai;
mod round_trips;
mod tools;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use pgcrew::agent::{Tool, ToolError, ToolRegistry};
use pgcrew::kernel::{Kernel, ReplayPolicy, RunScope};
use pgcrew::model::{
    ModelErrorKind, ModelRequest, PriceTable, ScriptedModel, ScriptedReply, error_kind,
};
use pgcrew::runs::{self, NewRun};
use pgcrew::tenancy;
use pgcrew::{Db, Error, TenantId};
use serde_json::{Value, json};

use std::time::Duration;

use crate::common::{
    TestDb, agent_runtime, count, db_with_tenant, ledger_events, submit_run, wait_until,
};
use crate::mock_openai::{MockOpenAi, MockScript, mock_openai};

async fn setup(caps: &[&str], budget: Option<f64>) -> (TestDb, RunScope) {
    let (t, tenant) = db_with_tenant("acme", caps, budget).await;
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

/// A kernel without tools and with a model without turns (for workflows of plain steps).
fn bare_kernel(db: &Db) -> Kernel {
    kernel(
        db,
        Arc::new(ScriptedModel::sequence(vec![])),
        ToolRegistry::new(),
    )
}

/// The payment tool's name.
const CHARGE: &str = "charge_credit_card";

/// The tool step `step` of the payment tool with `args`.
async fn charge(
    k: &Kernel,
    scope: &RunScope,
    step: &str,
    args: Value,
) -> pgcrew::Result<pgcrew::kernel::ToolStep> {
    k.step_tool(scope, step, CHARGE, args).await
}

/// A kernel with only the payment tool of `provider` (and a model without turns).
fn payment_kernel(db: &Db, provider: &Arc<Provider>) -> Kernel {
    let tools = ToolRegistry::new()
        .with(payment_tool(provider.clone()))
        .unwrap();
    kernel(db, Arc::new(ScriptedModel::sequence(vec![])), tools)
}

fn request(prompt: &str) -> ModelRequest {
    ModelRequest::new("gpt-4o-mini")
        .system("be brief")
        .user(prompt)
        .max_tokens(50)
        .temperature(0.2)
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

/// A registry holding [`weather_tool`], counting its handler's runs in `body_runs`.
pub(crate) fn weather_registry(body_runs: &Arc<AtomicU64>) -> ToolRegistry {
    ToolRegistry::new()
        .with(weather_tool(body_runs.clone()))
        .unwrap()
}

/// A registry holding [`weather_tool`] and the counter of its handler's runs.
fn weather_tools() -> (ToolRegistry, Arc<AtomicU64>) {
    let body_runs = Arc::new(AtomicU64::new(0));
    (weather_registry(&body_runs), body_runs)
}

/// A scripted model that always calls `lookup_weather` (a run never finishes by itself).
fn always_calls_weather() -> Arc<ScriptedModel> {
    Arc::new(ScriptedModel::from_fn(|req| {
        ScriptedModel::reply(
            req,
            &ScriptedReply::tool_call("lookup_weather", json!({"city": "Rome"})),
        )
    }))
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

pub(crate) fn weather_script() -> Vec<ScriptedReply> {
    vec![
        ScriptedReply::tool_call("lookup_weather", json!({"city": "Oslo"})),
        ScriptedReply::text("It is sunny in Oslo."),
    ]
}

/// What a [`Hooked`] model does first on each call: given the request, a future that must end
/// (and may fail the call) before the scripted answer is given.
type BeforeCall = Box<
    dyn Fn(&ModelRequest) -> futures_util::future::BoxFuture<'static, pgcrew::Result<()>>
        + Send
        + Sync,
>;

/// A scripted model named `name` that runs `before` first on each call.
pub(crate) struct Hooked {
    name: &'static str,
    inner: ScriptedModel,
    before: BeforeCall,
}

#[async_trait::async_trait]
impl ModelPort for Hooked {
    fn name(&self) -> &str {
        self.name
    }
    async fn complete(&self, request: &ModelRequest) -> pgcrew::Result<ModelResponse> {
        (self.before)(request).await?;
        self.inner.complete(request).await
    }
}

/// A model that answers the first `turns` turns from `inner` and then never answers (the
/// instance "dies" during that call).
pub(crate) fn hangs_after(inner: ScriptedModel, turns: usize) -> Hooked {
    let before: BeforeCall = Box::new(move |request: &ModelRequest| {
        let turn = request
            .messages
            .iter()
            .filter(|m| m.role() == "assistant")
            .count();
        Box::pin(async move {
            if turn >= turns {
                std::future::pending::<()>().await;
            }
            Ok(())
        })
    });
    Hooked {
        name: "hangs-after",
        inner,
        before,
    }
}

/// `rt` executes `run`, retrying while the lease of the instance that died is still valid
/// (for 10 s at most).
pub(crate) async fn execute_once_lease_expires(
    rt: &AgentRuntime,
    run: pgcrew::RunId,
) -> pgcrew::runs::Run {
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
