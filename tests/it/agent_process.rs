//! Real processes: two `pgcrew serve --agents demo` instances against an OpenAI-compatible
//! mock server on loopback; the instance executing an agent run is killed with SIGKILL in the
//! middle of a model call and the other one finishes the run from the ledger.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use pgcrew::agent::AgentRuntime;
use pgcrew::kernel::Kernel;
use pgcrew::model::ScriptedModel;
use pgcrew::runs::{self, RunState};
use pgcrew::tenancy::{self, TenantContext};
use pgcrew::{Db, RunId};
use serde_json::json;

use crate::common::{Serve, serve, submit_run, test_db, wait_until};
use crate::mock_openai::{MockOpenAi, MockScript, mock_openai};

/// The mock for the demo `support` agent: turn 0 calls `lookup_order` and `get_weather`.
async fn support_mock() -> MockOpenAi {
    mock_openai(MockScript {
        tool_calls: json!([
            {"id": "call_order", "type": "function", "function":
                {"name": "lookup_order", "arguments": "{\"order_id\":\"A-1001\"}"}},
            {"id": "call_weather", "type": "function", "function":
                {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}]),
        final_text: "Order A-1001 is on its way.",
        // A little provider latency so that runs take a visible moment.
        latency: Duration::from_millis(200),
        usage: (50, 10),
    })
    .await
}

/// A `pgcrew serve --agents demo` child on the mock model, killed (SIGKILL) on drop.
fn spawn_serve(dsn: &str, id: &str, model_url: &str) -> Serve {
    serve(dsn, id)
        .demo_agents("2s", "1500ms", "50ms")
        .args(["--model-base-url", model_url])
        .spawn()
}

async fn event_counts(db: &Db, run: RunId) -> Vec<(String, String)> {
    runs::read_events(db, run, 0, 10_000)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.event_type, e.step_key.unwrap_or_default()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_agent_run_other_serve_process_finishes_it_without_repeating_steps() {
    let t = test_db().await;
    let server = support_mock().await;
    let ctx = TenantContext::new("acme").unwrap().budget_usd(Some(5.0));
    tenancy::upsert(&t.db, &ctx).await.unwrap();
    let tenant = ctx.tenant_id.clone();

    let mut a = Some(spawn_serve(t.dsn(), "serve-a", &server.base_url));
    let mut b = Some(spawn_serve(t.dsn(), "serve-b", &server.base_url));
    // Both instances registered the demo agents and tools, and are alive.
    wait_until(
        Duration::from_secs(30),
        "serve processes did not come up",
        || async {
            let ok_agent = pgcrew::agent::get_agent(&t.db, "support").await.is_ok();
            let n = pgcrew::coord::instance::list(&t.db)
                .await
                .map(|l| l.len())
                .unwrap_or(0);
            ok_agent && n == 2
        },
    )
    .await;

    // Submit from this process (a client that does not execute runs).
    let submitter = AgentRuntime::new(
        Kernel::new(t.db.clone(), Arc::new(ScriptedModel::demo_agent())),
        "submitter",
    );
    let run = submit_run(
        &submitter,
        &tenant,
        "user-1",
        "support",
        "Where is order A-1001?",
    )
    .await;

    // Wait until the executing instance is in the middle of the turn-1 model call.
    wait_until(
        Duration::from_secs(30),
        "the run never reached its second model call",
        || async { server.requests.lock().unwrap().contains(&1) },
    )
    .await;
    let owner = runs::get_run(&t.db, run).await.unwrap();
    assert_eq!(owner.state, RunState::Running);
    let conn = t.db.get().await.unwrap();
    let lease_owner: Option<String> = conn
        .query_one("SELECT lease_owner FROM pgcrew.runs WHERE id = $1", &[&run])
        .await
        .unwrap()
        .get(0);
    drop(conn);
    let lease_owner = lease_owner.expect("the running run has a lease owner");
    let victim = if a.as_ref().is_some_and(|s| s.id == lease_owner) {
        a.take()
    } else {
        b.take()
    };
    let victim = victim.expect("lease owner is one of the serve processes");
    assert_eq!(victim.id, lease_owner);
    // The ledger before the kill: turn 0 and both tools are recorded.
    let before = event_counts(&t.db, run).await;
    assert!(
        before
            .iter()
            .any(|(ty, k)| ty == "model_completed" && k == "iter-0/model")
    );
    assert_eq!(
        before
            .iter()
            .filter(|(ty, _)| ty == "tool_completed")
            .count(),
        2
    );
    drop(victim); // kill -9
    server.hang.store(false, Ordering::SeqCst);

    // The survivor resumes the run after the lease / task heartbeat timeouts.
    wait_until(
        Duration::from_secs(45),
        "the surviving instance did not finish the run",
        || async { runs::get_run(&t.db, run).await.unwrap().state.is_terminal() },
    )
    .await;
    let done = runs::get_run(&t.db, run).await.unwrap();
    assert_eq!(done.state, RunState::Completed, "{:?}", done.error_message);
    assert_eq!(
        done.response_text.as_deref(),
        Some("Order A-1001 is on its way.")
    );
    assert_eq!(done.input_tokens, 100);
    assert_eq!(done.output_tokens, 20);
    // The survivor is still alive (it finished the run; the victim is dead).
    let survivor = a.as_mut().or(b.as_mut()).unwrap();
    assert!(survivor.child.try_wait().unwrap().is_none());

    // Each completed model step was answered exactly once; the turn-0 call was not repeated.
    assert_eq!(server.answered_turns(), vec![0, 1]);
    assert_eq!(
        server.requested_turns(),
        vec![0, 1, 1],
        "turn 0 was requested again"
    );
    let evs = event_counts(&t.db, run).await;
    for key in ["iter-0/model", "iter-1/model"] {
        assert_eq!(
            evs.iter()
                .filter(|(ty, k)| ty == "model_completed" && k == key)
                .count(),
            1,
            "{key}"
        );
    }
    // The tools ran once each (recorded completions are never re-executed).
    assert_eq!(
        evs.iter().filter(|(ty, _)| ty == "tool_requested").count(),
        2
    );
    assert_eq!(
        evs.iter().filter(|(ty, _)| ty == "tool_completed").count(),
        2
    );
    assert!(runs::verify_run_chain(&t.db, run).await.unwrap().valid);
}
