//! Sub-agents (issue #18, item 5): an agent calls another agent as a tool; the child is a run of
//! its own with a budget carved out of the parent's, keyed by (parent, step key), cancelled
//! with its parent, and refused when it closes a cycle or passes the depth limit.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pgcrew::agent::{
    AgentDef, AgentRuntime, Subagent, Tool, ToolError, ToolRegistry, child_runs, register_agent,
};
use pgcrew::kernel::Kernel;
use pgcrew::model::{Message, ModelRequest, PriceTable, ScriptedModel, ScriptedReply};
use pgcrew::runs::{self, RunState};
use pgcrew::{Db, Error, RunId, TenantId};
use serde_json::{Value, json};
use tokio::sync::Notify;

use crate::common::{
    TestDb, count, ledger_events, scalar, submit_run, tenant, test_db, wait_until,
};

/// Both models cost exactly 1 USD per completion token and nothing per prompt token, and every
/// answer uses all of its `max_tokens`: a call's reservation equals its cost, so budgets can be
/// made to add up exactly.
fn prices() -> PriceTable {
    PriceTable::empty()
        .with("lead-m", 0.0, 1_000_000.0)
        .unwrap()
        .with("sub-m", 0.0, 1_000_000.0)
        .unwrap()
}

/// The agent a request comes from (its system prompt is the agent's name).
fn agent_of(req: &ModelRequest) -> String {
    req.messages
        .iter()
        .find_map(|m| match m {
            Message::System { content } => Some(content.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

/// The request's user prompt.
fn prompt_of(req: &ModelRequest) -> String {
    req.messages
        .iter()
        .find_map(|m| match m {
            Message::User { content } => Some(content.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

/// The tool results the request carries, joined.
fn tool_results(req: &ModelRequest) -> String {
    req.messages
        .iter()
        .filter_map(|m| match m {
            Message::Tool { content, .. } => Some(content.clone()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

/// A model answering with `script(agent, turn, request)`, charging all of `max_tokens`.
fn team_model(
    script: impl Fn(&str, usize, &ModelRequest) -> ScriptedReply + Send + Sync + 'static,
) -> Arc<ScriptedModel> {
    Arc::new(ScriptedModel::from_fn(move |req| {
        let turn = req
            .messages
            .iter()
            .filter(|m| matches!(m, Message::Assistant { .. }))
            .count();
        // Answers are not cut at `max_tokens` (the test reads them whole) but charged at it.
        let mut uncapped = req.clone();
        uncapped.max_tokens = None;
        let mut r = ScriptedModel::reply(&uncapped, &script(&agent_of(req), turn, req))?;
        r.usage.completion_tokens = u64::from(req.max_tokens.unwrap_or(10));
        Ok(r)
    }))
}

/// An agent named `name` (its system prompt is its name) on `model`, 10 tokens a call.
fn agent(name: &str, model: &str) -> AgentDef {
    AgentDef::new(name, model)
        .description(format!("the {name}"))
        .system_prompt(name)
        .max_tokens(10)
        .max_iterations(4)
}

fn runtime(db: &Db, model: Arc<ScriptedModel>, tools: ToolRegistry, owner: &str) -> AgentRuntime {
    let kernel = Kernel::new(db.clone(), model)
        .with_prices(prices())
        .with_tools(tools);
    AgentRuntime::new(kernel, owner).lease_ttl(Duration::from_millis(800))
}

async fn setup() -> (TestDb, TenantId) {
    let t = test_db().await;
    let tenant = tenant(&t.db, "acme", &[], None).await;
    (t, tenant)
}

/// A run's budget figures: (limit, spent, reserved).
async fn run_budget(db: &Db, run: RunId) -> (Option<f64>, f64, f64) {
    let row = db
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT budget_usd_limit::float8, budget_spent_usd::float8, budget_reserved_usd::float8 \
             FROM pgcrew.runs WHERE id = $1",
            &[&run],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

async fn submit_with_budget(
    rt: &AgentRuntime,
    tenant: &TenantId,
    agent: &str,
    budget: Option<f64>,
) -> RunId {
    let run = submit_run(rt, tenant, "user-1", agent, "plan a trip").await;
    pgcrew::tenancy::set_run_budget(rt.kernel().db(), tenant, run, budget)
        .await
        .unwrap();
    run
}

async fn assert_chain_valid(db: &Db, run: RunId) {
    assert!(
        runs::verify_run_chain(db, run).await.unwrap().valid,
        "the ledger of {run} verifies"
    );
}

/// lead: turn 0 calls researcher and writer, turn 1 answers with their results.
fn lead_and_two_helpers() -> Arc<ScriptedModel> {
    team_model(|agent, turn, req| match (agent, turn) {
        ("lead", 0) => ScriptedReply::ToolCalls(vec![
            ("researcher".into(), json!({"prompt": "find facts"})),
            ("writer".into(), json!({"prompt": "write it up"})),
        ]),
        ("lead", _) => ScriptedReply::text(format!("done: {}", tool_results(req))),
        (other, _) => ScriptedReply::text(format!("{other} did: {}", prompt_of(req))),
    })
}

async fn register_team(db: &Db) {
    register_agent(
        db,
        &agent("lead", "lead-m")
            .subagent_with(Subagent::new("researcher").budget_usd(10.0))
            .subagent("writer"),
    )
    .await
    .unwrap();
    register_agent(db, &agent("researcher", "sub-m"))
        .await
        .unwrap();
    register_agent(db, &agent("writer", "sub-m")).await.unwrap();
}

#[tokio::test]
async fn a_parent_and_two_subagents_spend_its_budget_exactly() {
    let (t, tenant) = setup().await;
    register_team(&t.db).await;
    let model = lead_and_two_helpers();
    let rt = runtime(&t.db, model.clone(), ToolRegistry::new(), "i-1");
    // 10 (lead, turn 0) + 10 (researcher, its own budget of 10) + 10 (writer, carved the 20
    // left) + 10 (lead, turn 1) = 40: every reservation fits with nothing to spare.
    let run = submit_with_budget(&rt, &tenant, "lead", Some(40.0)).await;
    let done = rt.execute(run, None).await.unwrap();
    assert_eq!(done.state, RunState::Completed, "{:?}", done.error_message);
    let answer = done.response_text.unwrap();
    assert!(answer.contains("researcher did: find facts"), "{answer}");
    assert!(answer.contains("writer did: write it up"), "{answer}");

    let children = child_runs(&t.db, run).await.unwrap();
    assert_eq!(children.len(), 2);
    let (r, w) = (&children[0], &children[1]);
    assert_eq!(r.agent_name.as_deref(), Some("researcher"));
    assert_eq!(r.parent_step_key, "iter-0/tool-call_0_0");
    assert_eq!((r.budget_usd, r.spent_usd, r.depth), (Some(10.0), 10.0, 1));
    assert_eq!(w.agent_name.as_deref(), Some("writer"));
    // The writer names no budget: it gets all the parent has left (40 - 10 - 10).
    assert_eq!((w.budget_usd, w.spent_usd), (Some(20.0), 10.0));
    assert!(children.iter().all(|c| c.state == RunState::Completed));
    // Unused carve returned: the parent's spend is the whole budget, nothing stays reserved.
    assert_eq!(run_budget(&t.db, run).await, (Some(40.0), 40.0, 0.0));
    assert_eq!(
        scalar(
            &t.db,
            "SELECT (sum(cost_usd) * 100)::int8 FROM pgcrew.cost_entries"
        )
        .await,
        4000
    );
    assert_eq!(model.calls(), 4);

    let evs = ledger_events(&t.db, run).await;
    assert_eq!(count(&evs, "child_run_started"), 2);
    assert_eq!(count(&evs, "child_run_completed"), 2);
    for c in &children {
        assert!(evs.iter().any(|(ty, k, p)| ty == "child_run_completed"
            && k.as_deref() == Some(c.parent_step_key.as_str())
            && p["child_run_id"] == json!(c.id)
            && p["state"] == "completed"));
        let child_evs = ledger_events(&t.db, c.id).await;
        assert_eq!(child_evs[0].2["parent_run_id"], json!(run));
        assert_eq!(count(&child_evs, "model_completed"), 1);
        assert_chain_valid(&t.db, c.id).await;
    }
    assert_chain_valid(&t.db, run).await;
    // Forks and sub-agents are told apart.
    assert_eq!(
        scalar(
            &t.db,
            "SELECT count(*) FROM pgcrew.runs WHERE parent_relation = 'subagent'"
        )
        .await,
        2
    );
}

#[tokio::test]
async fn one_cent_less_and_the_parent_cannot_finish() {
    let (t, tenant) = setup().await;
    register_team(&t.db).await;
    let rt = runtime(&t.db, lead_and_two_helpers(), ToolRegistry::new(), "i-1");
    let run = submit_with_budget(&rt, &tenant, "lead", Some(39.99)).await;
    let done = rt.execute(run, None).await.unwrap();
    // Both children ran (the writer's carve was 19.99), but the last 10 USD call cannot be
    // reserved: parent and children together never pass the parent's budget.
    assert_eq!(done.state, RunState::Failed);
    assert_eq!(done.error_type.as_deref(), Some("budget_exceeded"));
    let (_, spent, reserved) = run_budget(&t.db, run).await;
    assert!(
        (spent - 30.0).abs() < 1e-9 && reserved == 0.0,
        "{spent} {reserved}"
    );
    assert_chain_valid(&t.db, run).await;
}

#[tokio::test]
async fn a_subagent_budget_the_parent_cannot_cover_fails_the_parent_without_a_child() {
    let (t, tenant) = setup().await;
    register_team(&t.db).await;
    let rt = runtime(&t.db, lead_and_two_helpers(), ToolRegistry::new(), "i-1");
    // 10 for the lead's first call leaves 5: the researcher's 10 cannot be carved.
    let run = submit_with_budget(&rt, &tenant, "lead", Some(15.0)).await;
    let done = rt.execute(run, None).await.unwrap();
    assert_eq!(done.state, RunState::Failed);
    assert_eq!(done.error_type.as_deref(), Some("budget_exceeded"));
    assert!(child_runs(&t.db, run).await.unwrap().is_empty());
    let evs = ledger_events(&t.db, run).await;
    let refused = evs
        .iter()
        .find(|(ty, _, _)| ty == "budget_exceeded")
        .expect("budget_exceeded recorded");
    assert_eq!(refused.2["subagent"], "researcher");
    assert_eq!(refused.2["scope"], "run");
    assert_eq!(refused.2["estimate_usd"], 10.0);
    assert_eq!(run_budget(&t.db, run).await, (Some(15.0), 10.0, 0.0));
}

/// A tool that counts its calls and, given `gate`, answers only once the gate is opened.
fn lookup_tool(gate: Option<Arc<Notify>>, calls: Arc<AtomicU64>) -> ToolRegistry {
    let tool = Tool::builder("lookup")
        .handler(move |ctx, _args| {
            let (calls, gate) = (calls.clone(), gate.clone());
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                if let Some(gate) = gate {
                    gate.notified().await;
                }
                Ok::<_, ToolError>(
                    json!({"fact": "Oslo is sunny", "reconciled": ctx.reconciliation}),
                )
            }
        })
        .build()
        .unwrap();
    ToolRegistry::new().with(tool).unwrap()
}

#[tokio::test]
async fn a_parent_resumed_elsewhere_finds_its_child_and_nothing_is_charged_twice() {
    let (t, tenant) = setup().await;
    register_agent(&t.db, &agent("lead", "lead-m").subagent("researcher"))
        .await
        .unwrap();
    register_agent(&t.db, &agent("researcher", "sub-m").tool("lookup"))
        .await
        .unwrap();
    let script = |agent: &str, turn: usize, req: &ModelRequest| match (agent, turn) {
        ("lead", 0) => ScriptedReply::tool_call("researcher", json!({"prompt": "weather?"})),
        ("researcher", 0) => ScriptedReply::tool_call("lookup", json!({})),
        (_, _) => ScriptedReply::text(format!("{agent}: {}", tool_results(req))),
    };
    let calls = Arc::new(AtomicU64::new(0));
    let model_a = team_model(script);
    let a = runtime(
        &t.db,
        model_a,
        lookup_tool(Some(Arc::new(Notify::new())), calls.clone()),
        "instance-a",
    );
    let run = submit_with_budget(&a, &tenant, "lead", Some(100.0)).await;
    let a_task = tokio::spawn({
        let a = a.clone();
        async move { a.execute(run, None).await }
    });
    wait_until(
        Duration::from_secs(10),
        "the child is in its tool",
        || async { calls.load(Ordering::SeqCst) == 1 },
    )
    .await;
    a_task.abort(); // instance A dies with parent and child leased
    let child = child_runs(&t.db, run).await.unwrap();
    assert_eq!(child.len(), 1);
    let child = child[0].id;

    let model_b = team_model(script);
    let b = runtime(
        &t.db,
        model_b.clone(),
        lookup_tool(None, calls.clone()),
        "instance-b",
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let done = loop {
        match b.execute(run, None).await {
            Ok(r) => break r,
            Err(Error::LeaseLost(_)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(done.state, RunState::Completed, "{:?}", done.error_message);
    let answer = done.response_text.unwrap();
    assert!(answer.contains("Oslo is sunny"), "{answer}");
    assert!(answer.contains("\"reconciled\":true"), "{answer}");

    // The same child, resumed: no second child, no repeated model call, nothing charged twice.
    let children = child_runs(&t.db, run).await.unwrap();
    assert_eq!(children.len(), 1);
    assert_eq!(children[0].id, child);
    assert_eq!(children[0].state, RunState::Completed);
    // B made only the calls A never finished: the researcher's turn 1 and the lead's turn 1.
    assert_eq!(model_b.calls(), 2);
    assert_eq!(calls.load(Ordering::SeqCst), 2); // the call A died in, reconciled once
    assert_eq!(
        scalar(&t.db, "SELECT count(*) FROM pgcrew.cost_entries").await,
        4
    );
    assert_eq!(
        scalar(
            &t.db,
            "SELECT (t.spent_usd - (SELECT sum(cost_usd) FROM pgcrew.cost_entries))::int8 \
             FROM pgcrew.tenants t WHERE id = 'acme'"
        )
        .await,
        0
    );
    assert_eq!(run_budget(&t.db, run).await, (Some(100.0), 40.0, 0.0));
    let evs = ledger_events(&t.db, run).await;
    assert_eq!(count(&evs, "child_run_started"), 1);
    assert_eq!(count(&evs, "child_run_completed"), 1);
    let child_evs = ledger_events(&t.db, child).await;
    assert_eq!(count(&child_evs, "model_completed"), 2);
    assert_eq!(count(&child_evs, "tool_completed"), 1);
    assert_chain_valid(&t.db, run).await;
    assert_chain_valid(&t.db, child).await;
}

#[tokio::test]
async fn cancelling_a_parent_cancels_its_children_and_grandchildren() {
    let (t, tenant) = setup().await;
    register_agent(&t.db, &agent("lead", "lead-m").subagent("researcher"))
        .await
        .unwrap();
    register_agent(
        &t.db,
        &agent("researcher", "sub-m").subagent_with(Subagent::new("checker").budget_usd(20.0)),
    )
    .await
    .unwrap();
    register_agent(&t.db, &agent("checker", "sub-m").tool("lookup"))
        .await
        .unwrap();
    let model = team_model(|agent, turn, req| match (agent, turn) {
        ("lead", 0) => ScriptedReply::tool_call("researcher", json!({"prompt": "dig"})),
        ("researcher", 0) => ScriptedReply::tool_call("checker", json!({"prompt": "check"})),
        ("checker", 0) => ScriptedReply::tool_call("lookup", json!({})),
        (_, _) => ScriptedReply::text(tool_results(req)),
    });
    let calls = Arc::new(AtomicU64::new(0));
    let gate = Arc::new(Notify::new());
    let rt = runtime(
        &t.db,
        model.clone(),
        lookup_tool(Some(gate.clone()), calls.clone()),
        "i-1",
    );
    let run = submit_with_budget(&rt, &tenant, "lead", Some(100.0)).await;
    let task = tokio::spawn({
        let rt = rt.clone();
        async move { rt.execute(run, None).await }
    });
    wait_until(
        Duration::from_secs(10),
        "the grandchild is in its tool",
        || async { calls.load(Ordering::SeqCst) == 1 },
    )
    .await;
    let child = child_runs(&t.db, run).await.unwrap()[0].id;
    let grandchild = child_runs(&t.db, child).await.unwrap()[0].id;
    // While they run, the carves are reserved on each parent.
    assert_eq!(run_budget(&t.db, run).await.2, 90.0);
    assert_eq!(run_budget(&t.db, child).await.2, 20.0);

    // The CLI's cancel (`pgcrew run cancel`, with the ledger key) on the parent.
    let key = pgcrew::LedgerKey::new([7u8; 32]).unwrap();
    let keyed = t.db.clone().with_ledger_key(key.clone());
    runs::cancel_run(&keyed, run, "the user gave up")
        .await
        .unwrap();
    for (r, parent) in [(child, run), (grandchild, child)] {
        // The cascaded final heads are signed in the cancel's transaction too.
        let signed = runs::verify_run_chain_signed(&t.db, r, &key).await.unwrap();
        assert!(signed.valid, "{:?}", signed.problem);
        let got = runs::get_run(&t.db, r).await.unwrap();
        assert_eq!(got.state, RunState::Cancelled);
        assert!(got.cancel_reason.unwrap().contains(&parent.to_string()));
        let evs = ledger_events(&t.db, r).await;
        let (ty, _, p) = evs.last().unwrap();
        assert_eq!(ty, "run_cancelled");
        assert_eq!(
            (p["cascaded"].clone(), p["parent_run_id"].clone()),
            (json!(true), json!(parent))
        );
        assert_chain_valid(&t.db, r).await;
    }
    // The carves went back: what the children spent is the parents' spend, nothing reserved.
    assert_eq!(run_budget(&t.db, child).await, (Some(90.0), 20.0, 0.0));
    assert_eq!(run_budget(&t.db, run).await, (Some(100.0), 30.0, 0.0));
    // The instance notices at its next write (the grandchild's tool result) and reports the
    // cancelled parent; no model call follows the cancel.
    let calls_before = model.calls();
    gate.notify_one();
    let done = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(done.state, RunState::Cancelled);
    assert_eq!(model.calls(), calls_before);
    assert_chain_valid(&t.db, run).await;
}

#[tokio::test]
async fn a_cycle_is_refused_at_registration() {
    let (t, _tenant) = setup().await;
    register_agent(&t.db, &agent("a", "sub-m").subagent("b"))
        .await
        .unwrap();
    register_agent(&t.db, &agent("b", "sub-m").subagent("c"))
        .await
        .unwrap();
    let err = register_agent(&t.db, &agent("c", "sub-m").subagent("a"))
        .await
        .unwrap_err();
    match &err {
        Error::SubagentRefused {
            agent,
            reason,
            message,
        } => {
            assert_eq!((agent.as_str(), *reason), ("c", "cycle"));
            assert!(message.contains("c -> a -> b -> c"), "{message}");
        }
        other => panic!("expected SubagentRefused, got {other:?}"),
    }
    // Nothing of `c` was written.
    assert!(matches!(
        pgcrew::agent::get_agent(&t.db, "c").await,
        Err(Error::NotFound { .. })
    ));
    let self_call = register_agent(&t.db, &agent("d", "sub-m").subagent("d")).await;
    assert!(matches!(
        self_call,
        Err(Error::SubagentRefused {
            reason: "cycle",
            ..
        })
    ));
    // A sub-agent named like one of the agent's tools is refused before anything is written.
    let clash = agent("e", "sub-m").tool("x").subagent("x").validate();
    assert!(matches!(
        clash,
        Err(Error::InvalidInput {
            field: "subagent",
            ..
        })
    ));
}

/// lead calls helper; helper calls whatever its definition offers, then answers with what the
/// call returned.
fn relay_model(helper_calls: &'static str) -> Arc<ScriptedModel> {
    team_model(move |agent, turn, req| match (agent, turn) {
        ("lead", 0) => ScriptedReply::tool_call("helper", json!({"prompt": "go"})),
        ("helper", 0) => ScriptedReply::tool_call(helper_calls, json!({"prompt": "again"})),
        (_, _) => ScriptedReply::text(format!("{agent} got: {}", tool_results(req))),
    })
}

#[tokio::test]
async fn a_cycle_at_call_time_is_recorded_and_returned_to_the_model() {
    let (t, tenant) = setup().await;
    register_agent(&t.db, &agent("lead", "lead-m").subagent("helper"))
        .await
        .unwrap();
    register_agent(&t.db, &agent("helper", "sub-m"))
        .await
        .unwrap();
    // Another instance's definition of helper calls lead back (registration on this one could
    // not see it): the parent chain catches the cycle.
    t.db.get()
        .await
        .unwrap()
        .execute(
            "INSERT INTO pgcrew.agent_subagents (agent, subagent, position) VALUES ('helper', 'lead', 1)",
            &[],
        )
        .await
        .unwrap();
    let rt = runtime(&t.db, relay_model("lead"), ToolRegistry::new(), "i-1");
    let run = submit_with_budget(&rt, &tenant, "lead", None).await;
    let done = rt.execute(run, None).await.unwrap();
    assert_eq!(done.state, RunState::Completed, "{:?}", done.error_message);
    let answer = done.response_text.unwrap();
    assert!(
        answer.contains("sub-agent `lead` refused (cycle)"),
        "{answer}"
    );
    assert!(answer.contains("lead -> helper -> lead"), "{answer}");
    let helper = child_runs(&t.db, run).await.unwrap();
    assert_eq!(helper.len(), 1);
    assert!(child_runs(&t.db, helper[0].id).await.unwrap().is_empty());
    let evs = ledger_events(&t.db, helper[0].id).await;
    let refused: Vec<&Value> = evs
        .iter()
        .filter(|(ty, _, _)| ty == "child_run_refused")
        .map(|(_, _, p)| p)
        .collect();
    assert_eq!(refused.len(), 1);
    assert_eq!(
        (refused[0]["agent"].clone(), refused[0]["reason"].clone()),
        (json!("lead"), json!("cycle"))
    );
    assert_chain_valid(&t.db, helper[0].id).await;
}

#[tokio::test]
async fn a_call_past_the_depth_limit_is_refused() {
    let (t, tenant) = setup().await;
    register_agent(&t.db, &agent("lead", "lead-m").subagent("helper"))
        .await
        .unwrap();
    register_agent(&t.db, &agent("helper", "sub-m").subagent("leaf"))
        .await
        .unwrap();
    register_agent(&t.db, &agent("leaf", "sub-m"))
        .await
        .unwrap();
    let rt = runtime(&t.db, relay_model("leaf"), ToolRegistry::new(), "i-1").max_subagent_depth(1);
    let run = submit_with_budget(&rt, &tenant, "lead", None).await;
    let done = rt.execute(run, None).await.unwrap();
    assert_eq!(done.state, RunState::Completed, "{:?}", done.error_message);
    let answer = done.response_text.unwrap();
    assert!(answer.contains("refused (depth)"), "{answer}");
    let helper = child_runs(&t.db, run).await.unwrap();
    assert_eq!(helper[0].depth, 1);
    assert!(child_runs(&t.db, helper[0].id).await.unwrap().is_empty());
    let evs = ledger_events(&t.db, helper[0].id).await;
    assert!(
        evs.iter()
            .any(|(ty, _, p)| ty == "child_run_refused" && p["reason"] == "depth")
    );
}

#[tokio::test]
async fn the_sql_surface_keys_children_by_step_and_cascades_a_plain_sql_cancel() {
    let (t, tenant) = setup().await;
    let parent = runs::create_run(&t.db, runs::NewRun::new(tenant.clone()).agent("lead"))
        .await
        .unwrap();
    runs::start_run(&t.db, parent, None, None, runs::LimitPolicy::Reject)
        .await
        .unwrap();
    let conn = t.db.get().await.unwrap();
    let start = |run: RunId, key: &'static str, agent: &'static str| {
        let conn = &conn;
        async move {
            conn.query_one(
                "SELECT child_id, created FROM pgcrew.start_child_run($1, $2, $3, 'do it')",
                &[&run, &key, &agent],
            )
            .await
        }
    };
    let first = start(parent, "iter-0/tool-a", "helper").await.unwrap();
    let again = start(parent, "iter-0/tool-a", "helper").await.unwrap();
    let child: RunId = first.get(0);
    assert!(first.get::<_, bool>(1));
    assert_eq!(
        (again.get::<_, RunId>(0), again.get::<_, bool>(1)),
        (child, false)
    );
    let grandchild: RunId = start(child, "iter-0/tool-b", "leaf").await.unwrap().get(0);
    // lead -> helper -> lead closes a cycle: PC070, nothing created.
    let cycle = start(child, "iter-0/tool-c", "lead").await.unwrap_err();
    assert_eq!(cycle.code().map(|c| c.code()), Some("PC070"));
    assert_eq!(
        scalar(
            &t.db,
            "SELECT count(*) FROM pgcrew.runs WHERE parent_relation = 'subagent'"
        )
        .await,
        2
    );
    // A run created with a parent by the fork path is a fork.
    let mut fork = runs::NewRun::new(tenant.clone());
    fork.parent_run_id = Some(parent);
    fork.forked_at_seq = Some(1);
    let fork = runs::create_run(&t.db, fork).await.unwrap();
    let relation: String = conn
        .query_one(
            "SELECT parent_relation FROM pgcrew.runs WHERE id = $1",
            &[&fork],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(relation, "fork");
    // The new columns' rules hold for plain SQL too (a trigger: runs carries no CHECK).
    for (set, constraint) in [
        ("parent_relation = 'sibling'", "runs_parent_relation_check"),
        ("parent_relation = 'subagent'", "runs_subagent_step"),
        ("carved_budget_usd = -1", "runs_carved_budget_usd_valid"),
    ] {
        let e = conn
            .execute(
                &format!("UPDATE pgcrew.runs SET {set} WHERE id = $1"),
                &[&fork],
            )
            .await
            .unwrap_err();
        let db = e.as_db_error().unwrap();
        assert_eq!(
            (db.code().code(), db.constraint()),
            ("23514", Some(constraint))
        );
    }
    // A plain SQL cancel of the parent reaches both descendants (not the fork).

    conn.execute(
        "UPDATE pgcrew.runs SET state = 'cancelled' WHERE id = $1",
        &[&parent],
    )
    .await
    .unwrap();
    for r in [child, grandchild] {
        assert_eq!(
            runs::get_run(&t.db, r).await.unwrap().state,
            RunState::Cancelled
        );
        assert_eq!(
            ledger_events(&t.db, r).await.last().unwrap().0,
            "run_cancelled"
        );
        assert_chain_valid(&t.db, r).await;
    }
    assert_eq!(
        runs::get_run(&t.db, fork).await.unwrap().state,
        RunState::Pending
    );
    // Spend settled on a finished child later (a call in flight at the cancel) reaches every
    // ancestor once.
    conn.execute(
        "UPDATE pgcrew.runs SET budget_spent_usd = budget_spent_usd + 2 WHERE id = $1",
        &[&grandchild],
    )
    .await
    .unwrap();
    for r in [grandchild, child, parent] {
        assert_eq!(run_budget(&t.db, r).await.1, 2.0, "run {r}");
    }
}

#[tokio::test]
async fn subagents_run_inside_their_parents_slot_of_the_concurrency_limit() {
    let (t, tenant) = setup().await;
    t.db.get()
        .await
        .unwrap()
        .execute(
            "UPDATE pgcrew.tenants SET max_concurrent_runs = 1 WHERE id = 'acme'",
            &[],
        )
        .await
        .unwrap();
    register_team(&t.db).await;
    let rt = runtime(&t.db, lead_and_two_helpers(), ToolRegistry::new(), "i-1");
    let run = submit_with_budget(&rt, &tenant, "lead", None).await;
    let done = rt.execute(run, None).await.unwrap();
    assert_eq!(done.state, RunState::Completed, "{:?}", done.error_message);
    assert_eq!(child_runs(&t.db, run).await.unwrap().len(), 2);
    // A second top-level run is still held back while one runs.
    let other = submit_run(&rt, &tenant, "user-2", "lead", "another").await;
    let blocker = submit_run(&rt, &tenant, "user-3", "lead", "blocker").await;
    runs::start_run(&t.db, blocker, None, None, runs::LimitPolicy::Reject)
        .await
        .unwrap();
    let held = runs::start_run(&t.db, other, None, None, runs::LimitPolicy::Reject).await;
    assert!(matches!(held, Err(Error::LimitReached { .. })), "{held:?}");
}

#[tokio::test]
async fn an_instance_without_the_subagents_tools_leaves_the_child_to_one_with_them() {
    let (t, tenant) = setup().await;
    register_agent(&t.db, &agent("lead", "lead-m").subagent("researcher"))
        .await
        .unwrap();
    register_agent(&t.db, &agent("researcher", "sub-m").tool("lookup"))
        .await
        .unwrap();
    let script = |agent: &str, turn: usize, req: &ModelRequest| match (agent, turn) {
        ("lead", 0) => ScriptedReply::tool_call("researcher", json!({"prompt": "weather?"})),
        ("researcher", 0) => ScriptedReply::tool_call("lookup", json!({})),
        (_, _) => ScriptedReply::text(format!("{agent}: {}", tool_results(req))),
    };
    let bare = runtime(&t.db, team_model(script), ToolRegistry::new(), "bare");
    let run = submit_with_budget(&bare, &tenant, "lead", Some(100.0)).await;
    let err = bare.execute(run, None).await.unwrap_err();
    assert!(
        matches!(&err, Error::Config(m) if m.contains("lookup")),
        "{err}"
    );
    // Not a tool result for the model: the parent is still running, the child waits.
    let child = child_runs(&t.db, run).await.unwrap();
    assert_eq!(child.len(), 1);
    assert_eq!(child[0].state, RunState::Running);
    assert_eq!(
        count(&ledger_events(&t.db, run).await, "child_run_completed"),
        0
    );
    let calls = Arc::new(AtomicU64::new(0));
    let full = runtime(&t.db, team_model(script), lookup_tool(None, calls), "full");
    let done = full.execute(run, None).await.unwrap();
    assert_eq!(done.state, RunState::Completed, "{:?}", done.error_message);
    assert_eq!(child_runs(&t.db, run).await.unwrap()[0].id, child[0].id);
}

/// A sub-agent parked at a durable wait (V020) is unfinished: cancelling it returns its carve
/// to the parent, and a parent that is cancelled cancels it too.
#[tokio::test]
async fn a_waiting_subagent_returns_its_carve_and_is_cancelled_with_its_parent() {
    let (t, tenant) = setup().await;
    let parent = runs::create_run(&t.db, runs::NewRun::new(tenant).agent("lead"))
        .await
        .unwrap();
    runs::start_run(&t.db, parent, None, None, runs::LimitPolicy::Reject)
        .await
        .unwrap();
    let conn = t.db.get().await.unwrap();
    conn.execute(
        "UPDATE pgcrew.runs SET budget_usd_limit = 10 WHERE id = $1",
        &[&parent],
    )
    .await
    .unwrap();
    let waiting_child = |key: &'static str| {
        let conn = &conn;
        async move {
            let child: RunId = conn
                .query_one(
                    "SELECT child_id FROM pgcrew.start_child_run($1, $2, 'helper', 'do it')",
                    &[&parent, &key],
                )
                .await
                .unwrap()
                .get(0);
            for state in ["running", "waiting"] {
                conn.execute(
                    "UPDATE pgcrew.runs SET state = $2 WHERE id = $1",
                    &[&child, &state],
                )
                .await
                .unwrap();
            }
            child
        }
    };
    // The first child takes the parent's whole remaining budget; cancelled while it waits, it
    // gives it back.
    let first = waiting_child("iter-0/tool-a").await;
    assert_eq!(run_budget(&t.db, parent).await, (Some(10.0), 0.0, 10.0));
    runs::cancel_run(&t.db, first, "no longer needed")
        .await
        .unwrap();
    assert_eq!(run_budget(&t.db, parent).await, (Some(10.0), 0.0, 0.0));
    // The second waits when its parent is cancelled: it is cancelled with it.
    let second = waiting_child("iter-0/tool-b").await;
    runs::cancel_run(&t.db, parent, "stop").await.unwrap();
    let run = runs::get_run(&t.db, second).await.unwrap();
    assert_eq!(run.state, RunState::Cancelled);
    let events = ledger_events(&t.db, second).await;
    let (ty, _, payload) = events.last().unwrap();
    assert_eq!(ty, "run_cancelled");
    assert_eq!(
        (&payload["from"], &payload["cascaded"]),
        (&json!("waiting"), &json!(true))
    );
    for r in [parent, first, second] {
        assert_chain_valid(&t.db, r).await;
    }
}
