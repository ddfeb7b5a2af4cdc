//! Agent runs against an OpenAI-compatible mock server on loopback.

use super::*;

#[tokio::test]
async fn killed_instance_mid_agent_run_openai_mock_sees_each_completed_step_once() {
    let (t, tenant) = db_with_tenant("acme", &[], Some(10.0)).await;
    let server = weather_mock().await;
    let body_runs = Arc::new(AtomicU64::new(0));
    let tools = || weather_registry(&body_runs);
    register_agent(&t.db, &weather_agent()).await.unwrap();
    let a = agent_runtime(&t.db, openai(&server), tools(), "instance-a")
        .lease_ttl(Duration::from_millis(900));
    let run = submit_run(&a, &tenant, "u", "forecaster", "weather in Oslo?").await;
    let a_task = tokio::spawn({
        let a = a.clone();
        async move { a.execute(run, None).await }
    });
    wait_until(
        Duration::from_secs(10),
        "instance A sent the turn-1 request",
        || async { server.requests.lock().unwrap().contains(&1) },
    )
    .await;
    a_task.abort(); // instance A dies in the middle of the turn-1 call
    server.hang.store(false, Ordering::SeqCst);

    let b = agent_runtime(&t.db, openai(&server), tools(), "instance-b");
    let done = execute_once_lease_expires(&b, run).await;
    assert_eq!(done.state, runs::RunState::Completed);
    assert_eq!(done.response_text.as_deref(), Some("It is sunny in Oslo."));
    assert_eq!(done.input_tokens, 80);
    assert_eq!(done.output_tokens, 18);
    // Each completed model step was answered by the server exactly once; the tool ran once.
    assert_eq!(server.answered_turns(), vec![0, 1]);
    assert_eq!(
        server.requested_turns(),
        vec![0, 1, 1],
        "B did not repeat the turn-0 call"
    );
    assert_eq!(body_runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn agent_feeds_unknown_tool_and_bad_arguments_back_and_records_them() {
    let (t, tenant) = db_with_tenant("acme", &[], None).await;
    let (tools, body_runs) = weather_tools();
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
fn loses_lease(db: Db, inner: ScriptedModel) -> Hooked {
    let before: BeforeCall = Box::new(move |_: &ModelRequest| {
        let db = db.clone();
        Box::pin(async move {
            let run = runs::list_runs(&db, &runs::RunFilter::default())
                .await?
                .remove(0)
                .id;
            runs::cancel_run(&db, run, "stop during the call").await?;
            Ok(())
        })
    });
    Hooked {
        name: "loses-lease",
        inner,
        before,
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
    let late = ScriptedModel::sequence(vec![ScriptedReply::text("late")]);
    let model = Arc::new(loses_lease(t.db.clone(), late));
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
