//! Progressive skills (issue #18, item 6): an agent loads skills through its built-in
//! `load_skill` tool; loading is recorded, the instructions reach the model, the skill's tools
//! are offered afterwards and still need their capabilities, and a resumed run replays the same
//! loaded set.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pgcrew::agent::{
    AgentDef, CapabilityDenialPolicy, LOAD_SKILL_TOOL, Skill, Tool, ToolRegistry, register_agent,
    register_skills, register_tools,
};
use pgcrew::model::{ModelRequest, ScriptedModel, ScriptedReply};
use pgcrew::runs::{self, RunState};
use pgcrew::{Db, Error};
use serde_json::json;

use crate::common::{
    agent_runtime, count, db_with_tenant, ledger_events, scalar, submit_run, wait_until,
};
use crate::kernel::{execute_once_lease_expires, hangs_after, weather_tool};

const INSTRUCTIONS: &str = "Give every temperature in degrees Celsius.";

/// The `weather` skill: `lookup_weather` and [`INSTRUCTIONS`].
fn weather_skill() -> Skill {
    Skill::new("weather")
        .description("forecasts")
        .instructions(INSTRUCTIONS)
        .tool("lookup_weather")
}

/// An agent with no tools of its own that may load `weather`.
fn travel_agent() -> AgentDef {
    AgentDef::new("travel", "gpt-4o-mini")
        .system_prompt("help travellers")
        .skill("weather")
        .max_tokens(100)
        .temperature(0.0)
        .max_iterations(5)
}

/// Load `weather`, look up Oslo, answer.
fn load_then_use() -> Vec<ScriptedReply> {
    vec![
        ScriptedReply::tool_call(LOAD_SKILL_TOOL, json!({"name": "weather"})),
        ScriptedReply::tool_call("lookup_weather", json!({"city": "Oslo"})),
        ScriptedReply::text("12 degrees Celsius and sunny."),
    ]
}

/// A database with tenant `acme` (capabilities `caps`), the weather tool, the skill and the
/// agent registered: the database and the tool's run counter.
async fn setup(caps: &[&str]) -> (crate::common::TestDb, Arc<AtomicU64>) {
    let (t, _tenant) = db_with_tenant("acme", caps, Some(10.0)).await;
    let body_runs = Arc::new(AtomicU64::new(0));
    register_tools(&t.db, &registry(&body_runs)).await.unwrap();
    register_skills(&t.db, &[weather_skill()]).await.unwrap();
    register_agent(&t.db, &travel_agent()).await.unwrap();
    (t, body_runs)
}

fn registry(body_runs: &Arc<AtomicU64>) -> ToolRegistry {
    ToolRegistry::new()
        .with(weather_tool(body_runs.clone()))
        .unwrap()
}

fn tool_names(r: &ModelRequest) -> Vec<String> {
    r.tools.iter().map(|t| t.name.clone()).collect()
}

/// The text of every message of a request, serialised.
fn context(r: &ModelRequest) -> String {
    serde_json::to_string(&r.messages).unwrap()
}

async fn skill_rows(db: &Db) -> i64 {
    scalar(db, "SELECT count(*) FROM pgcrew.skills").await
}

#[tokio::test]
async fn a_skill_naming_an_unknown_tool_is_refused_at_registration() {
    let (t, _tenant) = db_with_tenant("acme", &[], None).await;
    let body_runs = Arc::new(AtomicU64::new(0));
    register_tools(&t.db, &registry(&body_runs)).await.unwrap();
    let bad = Skill::new("maps").tool("lookup_weather").tool("draw_map");
    let err = register_skills(&t.db, &[weather_skill(), bad.clone()])
        .await
        .unwrap_err();
    crate::common::assert_invalid_input(&err, "skill");
    assert!(err.to_string().contains("`draw_map`"), "{err}");
    assert!(err.to_string().contains("`maps`"), "{err}");
    assert_eq!(skill_rows(&t.db).await, 0, "nothing is written");
    // The same check against an instance's own registry.
    let err = bad.check_tools(&registry(&body_runs)).unwrap_err();
    assert!(err.to_string().contains("`draw_map`"), "{err}");
    assert!(weather_skill().check_tools(&registry(&body_runs)).is_ok());
    // A skill cannot bundle the built-in.
    let err = register_skills(&t.db, &[Skill::new("meta").tool(LOAD_SKILL_TOOL)])
        .await
        .unwrap_err();
    crate::common::assert_invalid_input(&err, "skill");
    register_skills(&t.db, &[weather_skill()]).await.unwrap();
    assert_eq!(skill_rows(&t.db).await, 1);
}

#[tokio::test]
async fn an_agent_loads_a_skill_and_then_uses_its_tool() {
    let (t, body_runs) = setup(&[]).await;
    let model = Arc::new(ScriptedModel::by_turn(load_then_use()));
    let rt = agent_runtime(&t.db, model.clone(), registry(&body_runs), "i1");
    let tenant = pgcrew::TenantId::new("acme").unwrap();
    let run = submit_run(&rt, &tenant, "u", "travel", "weather in Oslo?").await;
    let done = rt.execute(run, None).await.unwrap();
    assert_eq!(done.state, RunState::Completed, "{:?}", done.error_message);
    let reqs = model.requests();
    assert_eq!(reqs.len(), 3);
    // Before loading only load_skill is offered; afterwards the skill's tool too, and the
    // instructions are in the context.
    assert_eq!(tool_names(&reqs[0]), vec![LOAD_SKILL_TOOL]);
    assert!(reqs[0].tools[0].description.contains("weather: forecasts"));
    assert!(!context(&reqs[0]).contains(INSTRUCTIONS));
    assert_eq!(
        tool_names(&reqs[1]),
        vec![LOAD_SKILL_TOOL, "lookup_weather"]
    );
    assert!(context(&reqs[1]).contains(INSTRUCTIONS));
    assert_eq!(body_runs.load(Ordering::SeqCst), 1);
    let evs = ledger_events(&t.db, run).await;
    let loaded: Vec<_> = evs
        .iter()
        .filter(|(ty, _, _)| ty == "skill_loaded")
        .collect();
    assert_eq!(loaded.len(), 1);
    assert_eq!(loaded[0].1.as_deref(), Some("iter-0/tool-call_0_0"));
    assert_eq!(loaded[0].2["skill"]["name"], "weather");
    assert_eq!(loaded[0].2["skill"]["tools"], json!(["lookup_weather"]));
    assert_eq!(count(&evs, "tool_completed"), 1);
    assert!(runs::verify_run_chain(&t.db, run).await.unwrap().valid);
}

#[tokio::test]
async fn a_skill_tool_called_before_loading_is_refused_and_returned_to_the_model() {
    let (t, body_runs) = setup(&[]).await;
    let model = Arc::new(ScriptedModel::by_turn(vec![
        ScriptedReply::tool_call("lookup_weather", json!({"city": "Oslo"})),
        ScriptedReply::tool_call(LOAD_SKILL_TOOL, json!({"name": "cooking"})),
        ScriptedReply::text("I cannot tell."),
    ]));
    let rt = agent_runtime(&t.db, model.clone(), registry(&body_runs), "i1");
    let tenant = pgcrew::TenantId::new("acme").unwrap();
    let run = submit_run(&rt, &tenant, "u", "travel", "weather in Oslo?").await;
    let done = rt.execute(run, None).await.unwrap();
    assert_eq!(done.state, RunState::Completed);
    assert_eq!(body_runs.load(Ordering::SeqCst), 0, "the tool never ran");
    let reqs = model.requests();
    assert!(context(&reqs[1]).contains("load one of the skills"));
    assert!(context(&reqs[2]).contains("no skill named `cooking`"));
    let evs = ledger_events(&t.db, run).await;
    let reasons: Vec<_> = evs
        .iter()
        .filter(|(ty, _, _)| ty == "tool_rejected")
        .map(|(_, _, p)| p["reason"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(reasons, vec!["not_available", "unknown_skill"]);
    assert_eq!(count(&evs, "skill_loaded"), 0);
}

#[tokio::test]
async fn a_loaded_skills_tools_still_require_their_capabilities() {
    let (t, _tenant) = db_with_tenant("acme", &[], Some(10.0)).await;
    let charged = Arc::new(AtomicU64::new(0));
    let pay = Tool::builder("charge_card")
        .description("charges a card")
        .input_schema(json!({"type": "object"}))
        .requires_capability("payments:charge")
        .handler({
            let charged = charged.clone();
            move |_ctx, _args| {
                let charged = charged.clone();
                async move {
                    charged.fetch_add(1, Ordering::SeqCst);
                    Ok(json!({"ok": true}))
                }
            }
        })
        .build()
        .unwrap();
    let tools = ToolRegistry::new().with(pay).unwrap();
    register_tools(&t.db, &tools).await.unwrap();
    register_skills(&t.db, &[Skill::new("billing").tool("charge_card")])
        .await
        .unwrap();
    let agent = AgentDef::new("clerk", "gpt-4o-mini")
        .skill("billing")
        .on_capability_denied(CapabilityDenialPolicy::ReturnToModel);
    register_agent(&t.db, &agent).await.unwrap();
    let model = Arc::new(ScriptedModel::by_turn(vec![
        ScriptedReply::tool_call(LOAD_SKILL_TOOL, json!({"name": "billing"})),
        ScriptedReply::tool_call("charge_card", json!({})),
        ScriptedReply::text("Could not charge."),
    ]));
    let rt = agent_runtime(&t.db, model.clone(), tools, "i1");
    let tenant = pgcrew::TenantId::new("acme").unwrap();
    let run = submit_run(&rt, &tenant, "u", "clerk", "charge me").await;
    let done = rt.execute(run, None).await.unwrap();
    assert_eq!(done.state, RunState::Completed);
    assert_eq!(charged.load(Ordering::SeqCst), 0);
    let evs = ledger_events(&t.db, run).await;
    assert_eq!(count(&evs, "skill_loaded"), 1);
    assert_eq!(count(&evs, "capability_denied"), 1);
    assert!(context(&model.requests()[2]).contains("capability"));
}

#[tokio::test]
async fn a_resumed_run_replays_the_same_loaded_skills() {
    let (t, body_runs) = setup(&[]).await;
    // Instance A loads the skill, uses its tool, and dies in the third model call.
    let model_a = Arc::new(hangs_after(ScriptedModel::by_turn(load_then_use()), 2));
    let a = agent_runtime(&t.db, model_a, registry(&body_runs), "instance-a")
        .lease_ttl(Duration::from_millis(800));
    let tenant = pgcrew::TenantId::new("acme").unwrap();
    let run = submit_run(&a, &tenant, "u", "travel", "weather in Oslo?").await;
    let a_task = tokio::spawn({
        let a = a.clone();
        async move { a.execute(run, None).await }
    });
    wait_until(Duration::from_secs(10), "the third model call", || async {
        ledger_events(&t.db, run)
            .await
            .iter()
            .any(|(ty, k, _)| ty == "model_requested" && k.as_deref() == Some("iter-2/model"))
    })
    .await;
    a_task.abort();
    // The skill's definition changes meanwhile: the run keeps what it loaded.
    register_skills(&t.db, &[weather_skill().instructions("Use Fahrenheit.")])
        .await
        .unwrap();
    let model_b = Arc::new(ScriptedModel::by_turn(load_then_use()));
    let b = agent_runtime(&t.db, model_b.clone(), registry(&body_runs), "instance-b");
    let done = execute_once_lease_expires(&b, run).await;
    // Strict replay of iter-0 and iter-1 succeeded: the same tools and context as recorded.
    assert_eq!(done.state, RunState::Completed, "{:?}", done.error_message);
    assert_eq!(model_b.calls(), 1);
    let req = &model_b.requests()[0];
    assert_eq!(tool_names(req), vec![LOAD_SKILL_TOOL, "lookup_weather"]);
    assert!(context(req).contains(INSTRUCTIONS));
    assert!(!context(req).contains("Fahrenheit"));
    assert_eq!(body_runs.load(Ordering::SeqCst), 1);
    let evs = ledger_events(&t.db, run).await;
    assert_eq!(count(&evs, "skill_loaded"), 1);
    assert_eq!(count(&evs, "replay_rejected"), 0);
}

#[tokio::test]
async fn an_agent_naming_an_unregistered_skill_fails_its_run() {
    let (t, tenant) = db_with_tenant("acme", &[], None).await;
    register_agent(&t.db, &AgentDef::new("lost", "gpt-4o-mini").skill("ghost"))
        .await
        .unwrap();
    let model = Arc::new(ScriptedModel::by_turn(vec![ScriptedReply::text("hi")]));
    let rt = agent_runtime(&t.db, model.clone(), ToolRegistry::new(), "i1");
    let run = submit_run(&rt, &tenant, "u", "lost", "hi").await;
    let done = rt.execute(run, None).await.unwrap();
    assert_eq!(done.state, RunState::Failed);
    assert_eq!(done.error_type.as_deref(), Some("unknown_skill"));
    assert_eq!(model.calls(), 0);
    let err = pgcrew::agent::get_skills(&t.db, &["ghost".to_string()])
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::NotFound { kind: "skill", .. }),
        "{err}"
    );
}
