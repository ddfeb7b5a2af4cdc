//! Model steps: recording, settling and replay, replay policies, budgets, provider errors, workflow resume.

use super::*;

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
        ScriptedReply::error(ModelErrorKind::RateLimited, "slow down"),
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
    let k = bare_kernel(&t.db);
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
