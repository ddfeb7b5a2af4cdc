//! Human approval of tool calls: the agent run parks until someone approves or rejects the call;
//! approved calls run once, rejected ones go back to the model; decisions and deciders are in the
//! ledger; an approval from the CLI resumes a run whose instance was killed, on another instance.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pgcrew::agent::{AgentDef, Tool, ToolRegistry, register_agent, register_tools};
use pgcrew::model::{ScriptedModel, ScriptedReply};
use pgcrew::runs::{self, RunState};
use pgcrew::tenancy::{self, TenantContext};
use pgcrew::{Db, Error, RunId};
use serde_json::{Value, json};

use crate::common::{
    agent_runtime, cli, count, db_with_tenant, ledger_events, scalar, serve, submit_run, wait_until,
};
use crate::mock_openai::{MockScript, mock_openai};

/// The step key of the scripted model's first tool call.
const STEP: &str = "iter-0/tool-call_0_0";

fn refund_tool(body_runs: Arc<AtomicU64>) -> Tool {
    Tool::builder("refund")
        .description("refunds an order")
        .input_schema(json!({"type": "object", "properties": {"order": {"type": "string"}}}))
        .requires_approval()
        .handler(move |_ctx, args| {
            let body_runs = body_runs.clone();
            async move {
                body_runs.fetch_add(1, Ordering::SeqCst);
                Ok(json!({"refunded": args["order"]}))
            }
        })
        .build()
        .unwrap()
}

fn refund_agent() -> AgentDef {
    AgentDef::new("refunder", "gpt-4o-mini")
        .system_prompt("refund when asked")
        .tool("refund")
        .max_tokens(100)
        .temperature(0.0)
        .max_iterations(4)
}

fn script() -> Vec<ScriptedReply> {
    vec![
        ScriptedReply::tool_call("refund", json!({"order": "A-1"})),
        ScriptedReply::text("Done."),
    ]
}

async fn decisions(db: &Db, run: RunId) -> Vec<Value> {
    ledger_events(db, run)
        .await
        .into_iter()
        .filter(|(ty, _, _)| ty == "approval_decided")
        .map(|(_, _, p)| p)
        .collect()
}

#[tokio::test]
async fn approved_calls_run_once_rejected_calls_go_back_to_the_model_and_bad_decisions_are_refused()
{
    let (t, tenant) = db_with_tenant("acme", &[], Some(10.0)).await;
    let body_runs = Arc::new(AtomicU64::new(0));
    let tools = || {
        ToolRegistry::new()
            .with(refund_tool(body_runs.clone()))
            .unwrap()
    };
    register_agent(&t.db, &refund_agent()).await.unwrap();
    register_tools(&t.db, &tools()).await.unwrap();

    // Approved.
    let model = Arc::new(ScriptedModel::by_turn(script()));
    let rt = agent_runtime(&t.db, model.clone(), tools(), "i1");
    let run = submit_run(&rt, &tenant, "u", "refunder", "refund A-1").await;
    let e = rt.execute(run, None).await.unwrap_err();
    assert!(matches!(e, Error::Waiting { .. }), "{e}");
    let r = runs::get_run(&t.db, run).await.unwrap();
    assert_eq!(r.state, RunState::Waiting);
    assert!(r.lease_owner.is_none());
    assert_eq!(body_runs.load(Ordering::SeqCst), 0);
    let evs = ledger_events(&t.db, run).await;
    let started = evs
        .iter()
        .find(|(ty, _, _)| ty == "wait_started")
        .expect("wait_started");
    assert_eq!(started.2["name"], format!("approval/{STEP}"));
    assert_eq!(started.2["details"]["tool"], "refund");
    assert_eq!(started.2["details"]["arguments"], json!({"order": "A-1"}));
    // Executing again before a decision parks it again without calling the model.
    assert!(matches!(
        rt.execute(run, None).await,
        Err(Error::Waiting { .. })
    ));
    assert_eq!(model.calls(), 1);
    // A step that is not waiting: refused, nothing changes.
    let e = runs::approve_step(&t.db, run, "iter-0/tool-nope", Some("alice"), None)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NotWaiting { .. }), "{e}");
    assert!(e.to_string().contains("not waiting for approval"), "{e}");
    runs::approve_step(&t.db, run, STEP, Some("alice"), Some("looks right"))
        .await
        .unwrap();
    // A second decision of the same step before the run takes the first: refused.
    let e = runs::reject_step(&t.db, run, STEP, Some("mallory"), None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("already decided"), "{e}");
    let done = rt.execute(run, None).await.unwrap();
    assert_eq!(done.state, RunState::Completed);
    assert_eq!(done.response_text.as_deref(), Some("Done."));
    assert_eq!(body_runs.load(Ordering::SeqCst), 1);
    assert_eq!(model.calls(), 2, "turn 0 was not asked again");
    let d = decisions(&t.db, run).await;
    assert_eq!(d.len(), 1);
    assert_eq!(d[0]["decision"], "approved");
    assert_eq!(d[0]["by"], "alice");
    assert_eq!(d[0]["reason"], "looks right");
    // Charged once per model call, never again on resume.
    assert_eq!(
        scalar(
            &t.db,
            &format!("SELECT count(*) FROM pgcrew.cost_entries WHERE run_id = '{run}'")
        )
        .await,
        2
    );
    assert!(runs::verify_run_chain(&t.db, run).await.unwrap().valid);
    // Deciding a finished run: refused.
    let e = runs::approve_step(&t.db, run, STEP, None, None)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::RunFinished { .. }), "{e}");

    // Rejected: the tool is not run, the model is told.
    let model = Arc::new(ScriptedModel::by_turn(script()));
    let rt = agent_runtime(&t.db, model.clone(), tools(), "i2");
    let run = submit_run(&rt, &tenant, "u", "refunder", "refund A-1").await;
    assert!(matches!(
        rt.execute(run, None).await,
        Err(Error::Waiting { .. })
    ));
    runs::reject_step(&t.db, run, STEP, Some("bob"), Some("not eligible"))
        .await
        .unwrap();
    let done = rt.execute(run, None).await.unwrap();
    assert_eq!(done.state, RunState::Completed);
    assert_eq!(
        body_runs.load(Ordering::SeqCst),
        1,
        "the rejected call did not run"
    );
    let evs = ledger_events(&t.db, run).await;
    assert_eq!(count(&evs, "tool_requested"), 0);
    let d = decisions(&t.db, run).await;
    assert_eq!(d[0]["decision"], "rejected");
    assert_eq!(d[0]["by"], "bob");
    let last = model.requests().pop().unwrap();
    let told = format!("{:?}", last.messages);
    assert!(
        told.contains("not approved") && told.contains("not eligible"),
        "{told}"
    );
    assert!(runs::verify_run_chain(&t.db, run).await.unwrap().valid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approval_from_the_cli_resumes_the_run_on_another_instance_after_kill_9() {
    let t = crate::common::test_db().await;
    let server = mock_openai(MockScript {
        tool_calls: json!([{"id": "call_refund", "type": "function", "function":
            {"name": "issue_refund", "arguments": "{\"order_id\":\"A-1001\"}"}}]),
        final_text: "Refunded A-1001.",
        latency: Duration::from_millis(50),
        usage: (50, 10),
    })
    .await;
    // Answer turn 1 too (the mock hangs it by default).
    server.hang.store(false, Ordering::SeqCst);
    let ctx = TenantContext::new("acme").unwrap().budget_usd(Some(5.0));
    tenancy::upsert(&t.db, &ctx).await.unwrap();
    let spawn = |id: &str| {
        serve(t.dsn(), id)
            .demo_agents("2s", "1500ms", "20ms")
            .args(["--model-base-url", &server.base_url])
            .spawn()
    };
    let mut a = Some(spawn("serve-a"));
    let mut b = Some(spawn("serve-b"));
    wait_until(Duration::from_secs(30), "serve processes up", || async {
        let agent = pgcrew::agent::get_agent(&t.db, "refunds").await.is_ok();
        let n = pgcrew::coord::instance::list(&t.db)
            .await
            .map(|l| l.len())
            .unwrap_or(0);
        agent && n == 2
    })
    .await;
    let submitter = agent_runtime(
        &t.db,
        Arc::new(ScriptedModel::demo_agent()),
        ToolRegistry::new(),
        "submitter",
    );
    let run = submit_run(&submitter, &ctx.tenant_id, "u", "refunds", "refund A-1001").await;
    wait_until(
        Duration::from_secs(30),
        "the run waits for approval",
        || async { runs::get_run(&t.db, run).await.unwrap().state == RunState::Waiting },
    )
    .await;
    let waiting = runs::get_run(&t.db, run).await.unwrap();
    let first = waiting
        .instance_id
        .clone()
        .expect("the instance that ran it");
    // Kill -9 the instance that ran the run up to its wait.
    let victim = if a.as_ref().is_some_and(|s| s.id == first) {
        a.take()
    } else {
        b.take()
    };
    drop(victim.expect("one of the serve processes"));

    let run_s = run.to_string();
    let step = "iter-0/tool-call_refund";
    // Approving a step that is not waiting: refused with a clear message.
    let bad = cli(t.dsn(), ["run", "approve", &run_s, "iter-0/tool-other"]).await;
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not waiting for approval"));
    let ok = cli(
        t.dsn(),
        [
            "run", "approve", &run_s, step, "--by", "alice", "--reason", "verified",
        ],
    )
    .await;
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    wait_until(
        Duration::from_secs(45),
        "the survivor finishes the run",
        || async { runs::get_run(&t.db, run).await.unwrap().state.is_terminal() },
    )
    .await;
    let done = runs::get_run(&t.db, run).await.unwrap();
    assert_eq!(done.state, RunState::Completed, "{:?}", done.error_message);
    assert_eq!(done.response_text.as_deref(), Some("Refunded A-1001."));
    let survivor = a.as_ref().or(b.as_ref()).unwrap();
    assert_eq!(done.instance_id.as_deref(), Some(survivor.id.as_str()));
    assert_ne!(survivor.id, first);
    // Each model turn answered once (turn 0 not repeated), so charged once each.
    assert_eq!(server.requested_turns(), vec![0, 1]);
    assert_eq!(done.input_tokens, 100);
    assert_eq!(done.output_tokens, 20);
    let evs = ledger_events(&t.db, run).await;
    assert_eq!(count(&evs, "tool_completed"), 1);
    let d = decisions(&t.db, run).await;
    assert_eq!(d.len(), 1);
    assert_eq!(d[0]["decision"], "approved");
    assert_eq!(d[0]["by"], "alice");
    assert_eq!(d[0]["reason"], "verified");
    assert!(runs::verify_run_chain(&t.db, run).await.unwrap().valid);
    // Deciding it again after it finished: refused.
    let late = cli(t.dsn(), ["run", "reject", &run_s, step]).await;
    assert!(!late.status.success());
}
