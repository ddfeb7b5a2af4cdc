//! Agent runs: resuming on another instance, claims from the queue, cancellation, the incremental harness, budgets.

use super::*;

#[tokio::test]
async fn agent_run_resumes_on_another_instance_without_repeating_steps() {
    let (t, scope) = setup(&[], Some(10.0)).await;
    let _ = scope;
    let body_runs = Arc::new(AtomicU64::new(0));
    let tools = || weather_registry(&body_runs);
    register_agent(&t.db, &weather_agent()).await.unwrap();
    register_tools(&t.db, &tools()).await.unwrap();

    // Instance A: answers turn 0, then hangs in the turn-1 call and is killed.
    let model_a = Arc::new(hangs_after(ScriptedModel::by_turn(weather_script()), 1));
    let a =
        agent_runtime(&t.db, model_a, tools(), "instance-a").lease_ttl(Duration::from_millis(800));
    let tenant = TenantId::new("acme").unwrap();
    let run = submit_run(&a, &tenant, "user-1", "forecaster", "weather in Oslo?").await;
    let a_task = tokio::spawn({
        let a = a.clone();
        async move { a.execute(run, None).await }
    });
    let scope = RunScope::new(run, tenant.clone());
    wait_until(
        Duration::from_secs(10),
        "the run reached its first model request",
        || async {
            let evs = events(&t.db, &scope).await;
            evs.iter()
                .any(|(ty, k, _)| ty == "model_requested" && k.as_deref() == Some("iter-1/model"))
        },
    )
    .await;
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
    let (t, tenant) = db_with_tenant("acme", &[], Some(10.0)).await;
    let (tools, body_runs) = weather_tools();
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
    wait_until(Duration::from_secs(20), "the run completes", || async {
        runs::get_run(&t.db, run).await.unwrap().state == runs::RunState::Completed
    })
    .await;
    client.stop().await.unwrap();
    assert_eq!(model.calls(), 2);
    assert_eq!(body_runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn unknown_agent_max_iterations_and_cancellation_are_recorded() {
    let (t, tenant) = db_with_tenant("acme", &[], None).await;
    let (tools, body_runs) = weather_tools();
    // Always calls the tool: never finishes.
    let model = always_calls_weather();
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
    let model2 = always_calls_weather();
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
    let k = bare_kernel(&t.db);
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
    let (t, tenant) = db_with_tenant("acme", &[], Some(limit)).await;
    let (tools, _) = weather_tools();
    // A model that always calls the tool (the run never finishes by itself), priced high.
    let model = always_calls_weather();
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
