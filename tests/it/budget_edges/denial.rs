//! Capability denial inside an agent run.

use super::*;

/// A registry holding `charge_card` (needs `payments:charge`) and the counter of its handler's
/// runs.
fn charge_tools() -> (ToolRegistry, Arc<AtomicU64>) {
    let body_runs = Arc::new(AtomicU64::new(0));
    let counter = body_runs.clone();
    let charge = Tool::builder("charge_card")
        .description("charges a card")
        .input_schema(json!({
            "type": "object",
            "properties": {"amount_cents": {"type": "integer"}},
            "required": ["amount_cents"]
        }))
        .requires_capability("payments:charge")
        .handler(move |_ctx, args| {
            let body_runs = body_runs.clone();
            async move {
                body_runs.fetch_add(1, Ordering::SeqCst);
                Ok(json!({"charged": args["amount_cents"]}))
            }
        })
        .build()
        .unwrap();
    (ToolRegistry::new().with(charge).unwrap(), counter)
}

fn payer_script() -> Vec<ScriptedReply> {
    vec![
        ScriptedReply::tool_call("charge_card", json!({"amount_cents": 500})),
        ScriptedReply::text("I could not charge the card."),
    ]
}

/// An agent `name` on gpt-4o-mini that may call `charge_card`, with 100 tokens a turn.
fn payer_agent(name: &str) -> AgentDef {
    AgentDef::new(name, "gpt-4o-mini")
        .tool("charge_card")
        .max_tokens(100)
}

/// A run of agent `def` (registered in a fresh database) for tenant `acme` (no capabilities,
/// a 1 USD budget), with [`charge_tools`] and the model answering [`payer_script`], executed.
struct PayerRun {
    t: TestDb,
    run: RunId,
    /// The run as it ended.
    r: runs::Run,
    model: Arc<ScriptedModel>,
    /// How often `charge_card`'s handler ran.
    body_runs: Arc<AtomicU64>,
}

async fn payer_run(def: &AgentDef) -> PayerRun {
    let (t, acme) = db_with_tenant("acme", &[], Some(1.0)).await;
    let (tools, body_runs) = charge_tools();
    register_agent(&t.db, def).await.unwrap();
    let model = Arc::new(ScriptedModel::by_turn(payer_script()));
    let rt = agent_runtime(&t.db, model.clone(), tools, "i1");
    let run = submit_run(&rt, &acme, "s", &def.name, "charge 5 USD").await;
    let r = rt.execute(run, None).await.unwrap();
    PayerRun {
        t,
        run,
        r,
        model,
        body_runs,
    }
}

#[tokio::test]
async fn capability_denial_returned_to_the_model_when_the_agent_says_so() {
    let def = payer_agent("lenient").on_capability_denied(CapabilityDenialPolicy::ReturnToModel);
    let PayerRun {
        t,
        run,
        r,
        model,
        body_runs,
    } = payer_run(&def).await;
    assert_eq!(
        pgcrew::agent::get_agent(&t.db, "lenient")
            .await
            .unwrap()
            .on_capability_denied,
        CapabilityDenialPolicy::ReturnToModel
    );
    assert_eq!(r.state, RunState::Completed);
    assert_eq!(
        r.response_text.as_deref(),
        Some("I could not charge the card.")
    );
    assert_eq!(body_runs.load(Ordering::SeqCst), 0, "the tool did not run");
    // The model saw the denial as the tool's result.
    let last = model.requests().pop().unwrap();
    let tool_text = last
        .messages
        .iter()
        .find(|m| m.role() == "tool")
        .map(|m| m.text().to_string())
        .unwrap();
    assert!(tool_text.contains("capability denied"), "{tool_text}");
    assert!(tool_text.contains("payments:charge"), "{tool_text}");
    let evs = events(&t.db, run).await;
    assert_eq!(count(&evs, "capability_denied"), 1);
    let denied = evs
        .iter()
        .find(|(t, _, _)| t == "capability_denied")
        .unwrap();
    assert_eq!(denied.2["capability"], "payments:charge");
    assert_eq!(count(&evs, "run_completed"), 1);
}

#[tokio::test]
async fn capability_denial_fails_the_agent_run_by_default() {
    let def = payer_agent("payer");
    assert_eq!(def.on_capability_denied, CapabilityDenialPolicy::FailRun);
    let PayerRun {
        t,
        run,
        r,
        model,
        body_runs,
    } = payer_run(&def).await;
    assert_eq!(r.state, RunState::Failed);
    assert_eq!(r.error_type.as_deref(), Some("capability_denied"));
    assert!(
        r.error_message
            .as_deref()
            .unwrap_or_default()
            .contains("payments:charge"),
        "{:?}",
        r.error_message
    );
    assert_eq!(body_runs.load(Ordering::SeqCst), 0, "the tool did not run");
    assert_eq!(model.calls(), 1, "the model was not asked again");
    let evs = events(&t.db, run).await;
    assert_eq!(count(&evs, "capability_denied"), 1);
    assert_eq!(count(&evs, "run_failed"), 1);
}
