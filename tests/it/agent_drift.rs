//! Agent runs replayed after their definition changed (issue #18, item 8): the system prompt
//! is edited between a crash and the resume, under each per-agent replay policy.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pgcrew::agent::{AgentDef, AgentRuntime, get_agent, register_agent, register_tools};
use pgcrew::kernel::{ReplayPolicy, RunScope};
use pgcrew::model::{ModelRequest, ScriptedModel};
use pgcrew::runs::{self, RunState};
use pgcrew::{RunId, TenantId};

use crate::common::{
    TestDb, agent_runtime, count, db_with_tenant, ledger_events, scalar, submit_run, wait_until,
};
use crate::kernel::{
    execute_once_lease_expires, hangs_after, weather_agent, weather_registry, weather_script,
};

/// The edited system prompt the resumed run sees.
const NEW_PROMPT: &str = "use the tool, then answer in one sentence";

/// A weather run whose instance died during its second model call (after the first model
/// step and the tool step were recorded), then the agent re-registered under `policy` with a
/// new system prompt: the database, the run, the tool's run counter and a runtime (instance
/// B, with a fresh scripted model) to resume it.
async fn crashed_run_with_new_prompt(
    policy: ReplayPolicy,
) -> (
    TestDb,
    RunId,
    Arc<AtomicU64>,
    AgentRuntime,
    Arc<ScriptedModel>,
) {
    let (t, tenant) = db_with_tenant("acme", &[], Some(10.0)).await;
    let body_runs = Arc::new(AtomicU64::new(0));
    register_agent(&t.db, &weather_agent().replay_policy(policy))
        .await
        .unwrap();
    register_tools(&t.db, &weather_registry(&body_runs))
        .await
        .unwrap();
    let model_a = Arc::new(hangs_after(ScriptedModel::by_turn(weather_script()), 1));
    let a = agent_runtime(&t.db, model_a, weather_registry(&body_runs), "instance-a")
        .lease_ttl(Duration::from_millis(800));
    let run = submit_run(&a, &tenant, "user-1", "forecaster", "weather in Oslo?").await;
    let a_task = tokio::spawn({
        let a = a.clone();
        async move { a.execute(run, None).await }
    });
    wait_until(Duration::from_secs(10), "the second model call", || async {
        ledger_events(&t.db, run)
            .await
            .iter()
            .any(|(ty, k, _)| ty == "model_requested" && k.as_deref() == Some("iter-1/model"))
    })
    .await;
    a_task.abort(); // kill -9 of instance A
    let edited = weather_agent()
        .system_prompt(NEW_PROMPT)
        .replay_policy(policy);
    register_agent(&t.db, &edited).await.unwrap();
    let model_b = Arc::new(ScriptedModel::by_turn(weather_script()));
    let b = agent_runtime(
        &t.db,
        model_b.clone(),
        weather_registry(&body_runs),
        "instance-b",
    );
    (t, run, body_runs, b, model_b)
}

/// The system prompt of a request.
fn system_prompt(r: &ModelRequest) -> String {
    serde_json::to_value(&r.messages[0]).unwrap()["content"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn strict_agent_fails_the_resumed_run_when_its_prompt_changed() {
    let (t, run, body_runs, b, model_b) = crashed_run_with_new_prompt(ReplayPolicy::Strict).await;
    let done = execute_once_lease_expires(&b, run).await;
    assert_eq!(done.state, RunState::Failed);
    assert_eq!(done.error_type.as_deref(), Some("replay_consistency"));
    assert_eq!(
        model_b.calls(),
        0,
        "no model call after the rejected replay"
    );
    assert_eq!(body_runs.load(Ordering::SeqCst), 1);
    let evs = ledger_events(&t.db, run).await;
    assert_eq!(count(&evs, "replay_rejected"), 1);
    assert!(runs::verify_run_chain(&t.db, run).await.unwrap().valid);
}

#[tokio::test]
async fn allow_prompt_drift_agent_keeps_the_recorded_steps_and_finishes_with_the_new_prompt() {
    let (t, run, body_runs, b, model_b) =
        crashed_run_with_new_prompt(ReplayPolicy::AllowPromptDrift).await;
    let done = execute_once_lease_expires(&b, run).await;
    assert_eq!(done.id, run);
    assert_eq!(done.state, RunState::Completed);
    assert_eq!(done.response_text.as_deref(), Some("It is sunny in Oslo."));
    // iter-0 came from the ledger (drift recorded), the tool did not run again; only the
    // turn-1 call was made, with the edited prompt.
    assert_eq!(model_b.calls(), 1);
    assert_eq!(system_prompt(&model_b.requests()[0]), NEW_PROMPT);
    assert_eq!(body_runs.load(Ordering::SeqCst), 1);
    let evs = ledger_events(&t.db, run).await;
    let drift: Vec<_> = evs
        .iter()
        .filter(|(ty, _, _)| ty == "replayed_with_drift")
        .collect();
    assert_eq!(drift.len(), 1);
    assert_eq!(drift[0].1.as_deref(), Some("iter-0/model"));
    assert_eq!(count(&evs, "model_completed"), 2);
    assert!(runs::verify_run_chain(&t.db, run).await.unwrap().valid);
}

#[tokio::test]
async fn fork_on_drift_agent_continues_the_run_in_a_fork() {
    let (t, run, body_runs, b, model_b) =
        crashed_run_with_new_prompt(ReplayPolicy::ForkOnDrift).await;
    let done = execute_once_lease_expires(&b, run).await;
    // The run returned is the fork, finished with the new prompt from its first step on.
    assert_ne!(done.id, run);
    assert_eq!(done.parent_run_id, Some(run));
    assert_eq!(done.state, RunState::Completed);
    assert_eq!(done.response_text.as_deref(), Some("It is sunny in Oslo."));
    assert_eq!(model_b.calls(), 2);
    assert!(
        model_b
            .requests()
            .iter()
            .all(|r| system_prompt(r) == NEW_PROMPT)
    );
    // The fork ran its own tool step (the parent's was after the drift point).
    assert_eq!(body_runs.load(Ordering::SeqCst), 2);
    let parent = runs::get_run(&t.db, run).await.unwrap();
    assert_eq!(parent.state, RunState::Cancelled);
    let reason = parent.cancel_reason.unwrap_or_default();
    assert!(reason.contains(&done.id.to_string()), "{reason}");
    let fork_evs = ledger_events(&t.db, done.id).await;
    assert_eq!(count(&fork_evs, "run_forked"), 1);
    assert_eq!(count(&fork_evs, "model_completed"), 2);
    // The fork has an agent-run task of its own (any instance resumes it after a crash).
    let tasks = scalar(
        &t.db,
        &format!(
            "SELECT count(*) FROM pgcrew.tasks WHERE run_id = '{}' AND kind = 'pgcrew.agent_run'",
            done.id
        ),
    )
    .await;
    assert_eq!(tasks, 1);
    // Resuming the parent again changes nothing: it is finished.
    let again = b.execute(run, None).await.unwrap();
    assert_eq!(again.state, RunState::Cancelled);
    assert_eq!(model_b.calls(), 2);
    for r in [run, done.id] {
        assert!(runs::verify_run_chain(&t.db, r).await.unwrap().valid);
    }
}

#[tokio::test]
async fn fork_on_drift_after_a_crash_before_the_hand_over_reuses_the_fork() {
    let (t, run, _body_runs, b, model_b) =
        crashed_run_with_new_prompt(ReplayPolicy::ForkOnDrift).await;
    // An earlier attempt forked and made the drifted call, then died before handing over:
    // the same step through the kernel, as that attempt did.
    let def = get_agent(&t.db, "forecaster").await.unwrap();
    let tenant = TenantId::new("acme").unwrap();
    let request = ModelRequest::new(def.model.clone())
        .system(def.system_prompt.clone())
        .user("weather in Oslo?")
        .tool(b.kernel().tools().get("lookup_weather").unwrap().spec())
        .max_tokens(100)
        .temperature(0.0);
    let first = b
        .kernel()
        .step_model(
            &RunScope::new(run, tenant),
            "iter-0/model",
            &request,
            ReplayPolicy::ForkOnDrift,
        )
        .await
        .unwrap();
    assert_eq!(first.forked_from, Some(run));
    assert_eq!(model_b.calls(), 1);
    // The resume finds that fork: no second fork, no second call of the drifted step.
    let done = execute_once_lease_expires(&b, run).await;
    assert_eq!(done.id, first.run);
    assert_eq!(done.state, RunState::Completed);
    assert_eq!(model_b.calls(), 2, "only the fork's turn-1 call was added");
    let forks = scalar(
        &t.db,
        &format!("SELECT count(*) FROM pgcrew.runs WHERE parent_run_id = '{run}'"),
    )
    .await;
    assert_eq!(forks, 1);
}

#[tokio::test]
async fn replay_policy_is_stored_per_agent_and_defaults_to_strict() {
    let (t, _tenant) = db_with_tenant("acme", &[], None).await;
    register_agent(&t.db, &AgentDef::new("plain", "gpt-4o-mini"))
        .await
        .unwrap();
    let plain = get_agent(&t.db, "plain").await.unwrap();
    assert_eq!(plain.replay_policy, ReplayPolicy::Strict);
    let forking = AgentDef::new("forking", "gpt-4o-mini").replay_policy(ReplayPolicy::ForkOnDrift);
    register_agent(&t.db, &forking).await.unwrap();
    assert_eq!(
        get_agent(&t.db, "forking").await.unwrap().replay_policy,
        ReplayPolicy::ForkOnDrift
    );
    // The column refuses other values; the names parse back.
    let conn = t.db.get().await.unwrap();
    let err = conn
        .execute(
            "UPDATE pgcrew.agents SET replay_policy = 'lenient' WHERE name = 'plain'",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION)
    );
    assert_eq!(
        "allow_prompt_drift".parse::<ReplayPolicy>().unwrap(),
        ReplayPolicy::AllowPromptDrift
    );
    let e = "lenient".parse::<ReplayPolicy>().unwrap_err();
    crate::common::assert_invalid_input(&e, "replay_policy");
}
