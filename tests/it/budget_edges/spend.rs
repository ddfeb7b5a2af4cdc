//! Spending can pass the budget: reserved caps, prompt estimates, concurrent steps at the edge, overrun settlements.

use super::*;

#[tokio::test]
async fn unset_max_tokens_sends_the_reserved_cap_to_the_provider() {
    let (t, acme) = db_with_tenant("acme", &[], Some(100.0)).await;
    let run = new_run(&t.db, &acme).await;
    let mock = edge_mock(Usage::Edge).await;
    let k = Kernel::new(t.db.clone(), openai(&mock.base_url)).with_prices(edge_prices());
    let scope = RunScope::new(run, acme.clone());
    let request = ModelRequest::new(EDGE_MODEL).user("hello");
    assert_eq!(request.max_tokens, None);
    let step = k
        .step_model(&scope, "m1", &request, ReplayPolicy::Strict)
        .await
        .unwrap();
    let body = mock.bodies.lock().unwrap()[0].clone();
    assert_eq!(
        body["max_tokens"].as_u64(),
        Some(u64::from(DEFAULT_RESERVE_MAX_TOKENS)),
        "the cap reserved for must be sent: {body}"
    );
    // The charge is within what was reserved.
    let evs = events(&t.db, run).await;
    let requested = evs.iter().find(|(t, _, _)| t == "model_requested").unwrap();
    let estimate = requested.2["estimate_usd"].as_f64().unwrap();
    assert!(step.cost_usd <= estimate, "{} > {estimate}", step.cost_usd);
    // Replay does not call again, and the fingerprint is the caller's request.
    let again = k
        .step_model(&scope, "m1", &request, ReplayPolicy::Strict)
        .await
        .unwrap();
    assert!(again.replayed);
    assert_eq!(mock.bodies.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn prompt_estimate_bounds_the_tokens_of_any_script() {
    let (t, acme) = db_with_tenant("acme", &[], None).await;
    let run = new_run(&t.db, &acme).await;
    let mock = edge_mock(Usage::Edge).await;
    let k = Kernel::new(t.db.clone(), openai(&mock.base_url)).with_prices(edge_prices());
    let scope = RunScope::new(run, acme.clone());
    let mut rng = fastrand::Rng::with_seed(15);
    for i in 0..14 {
        let n = 1 + rng.usize(..2000);
        let (text, script) = script_text(&mut rng, n);
        let request = ModelRequest::new(EDGE_MODEL)
            .system("answer briefly")
            .user(text)
            .max_tokens(10);
        let step = k
            .step_model(&scope, &format!("s{i}"), &request, ReplayPolicy::Strict)
            .await
            .unwrap();
        let evs = events(&t.db, run).await;
        let requested = evs
            .iter()
            .rfind(|(t, k, _)| t == "model_requested" && k.as_deref() == Some(&format!("s{i}")))
            .unwrap();
        let estimate = requested.2["estimate_usd"].as_f64().unwrap();
        assert!(
            step.cost_usd <= estimate + 1e-12,
            "{script}: charged {} for a reservation of {estimate}",
            step.cost_usd
        );
    }
}

/// One concurrent model step of the property test.
async fn edge_step(
    k: Kernel,
    scope: RunScope,
    key: String,
    request: ModelRequest,
) -> pgcrew::Result<f64> {
    k.step_model(&scope, &key, &request, ReplayPolicy::Strict)
        .await
        .map(|s| s.cost_usd)
}

async fn spent_exact_le_limit(db: &Db, tenant: &TenantId) -> (bool, String) {
    let conn = db.get().await.unwrap();
    let row = conn
        .query_one(
            "SELECT spent_usd <= budget_usd_limit, spent_usd::text || ' / ' || budget_usd_limit::text
               FROM pgcrew.tenants WHERE id = $1",
            &[tenant],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_steps_at_the_edge_never_pass_the_budget() {
    let t = test_db().await;
    let mock = edge_mock(Usage::Edge).await;
    let k = Kernel::new(t.db.clone(), openai(&mock.base_url)).with_prices(edge_prices());
    let base_seed = std::env::var("PGCREW_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x15_b0d9e7u64);
    for round in 0..2u64 {
        let seed = base_seed + round;
        let mut rng = fastrand::Rng::with_seed(seed);
        let limit = 0.4 + rng.f64() * 0.4;
        let acme = tenant(&t.db, &format!("edge-{round}"), &[], Some(limit)).await;
        let mut runs_v = Vec::new();
        let mut run_limits = BTreeMap::new();
        for i in 0..8 {
            let run = new_run(&t.db, &acme).await;
            if i % 2 == 0 {
                let l = 0.05 + rng.f64() * 0.1;
                tenancy::set_run_budget(&t.db, &acme, run, Some(l))
                    .await
                    .unwrap();
                run_limits.insert(run, l);
            }
            runs_v.push(run);
        }
        let mut handles = Vec::new();
        let mut scripts = Vec::new();
        for i in 0..64 {
            let n = 1 + rng.usize(..3000);
            let (text, script) = script_text(&mut rng, n);
            scripts.push(script);
            let mut request = ModelRequest::new(EDGE_MODEL).user(text);
            if rng.bool() {
                request = request.max_tokens(1 + rng.u32(..3000));
            }
            let scope = RunScope::new(runs_v[i % runs_v.len()], acme.clone());
            handles.push(tokio::spawn(edge_step(
                k.clone(),
                scope,
                format!("step-{i}"),
                request,
            )));
        }
        let (mut ok, mut refused) = (0usize, 0usize);
        for (i, h) in handles.into_iter().enumerate() {
            match h.await.unwrap() {
                Ok(_) => ok += 1,
                Err(e) if e.is_budget_exceeded() => refused += 1,
                Err(e) => panic!("seed {seed}, step {i} ({}): {e}", scripts[i]),
            }
        }
        eprintln!("seed {seed}: limit {limit:.4}, {ok} steps settled, {refused} refused");
        assert_eq!(ok + refused, 64);
        assert!(
            ok > 0 && refused > 0,
            "seed {seed}: ok {ok}, refused {refused}"
        );
        let (within, figures) = spent_exact_le_limit(&t.db, &acme).await;
        assert!(
            within,
            "seed {seed}: tenant spent passed the limit: {figures}"
        );
        let tn = tenancy::get(&t.db, &acme).await.unwrap();
        assert!(tn.reserved_usd.abs() < 1e-12, "seed {seed}");
        for (run, l) in &run_limits {
            let conn = t.db.get().await.unwrap();
            let row = conn
                .query_one(
                    "SELECT budget_spent_usd <= budget_usd_limit, budget_spent_usd::float8
                       FROM pgcrew.runs WHERE id = $1",
                    &[run],
                )
                .await
                .unwrap();
            let (within, spent): (bool, f64) = (row.get(0), row.get(1));
            assert!(within, "seed {seed}: run {run} spent {spent} > {l}");
        }
        for run in &runs_v {
            let evs = events(&t.db, *run).await;
            assert_eq!(count(&evs, "budget_overrun"), 0, "seed {seed}");
        }
    }
    // Every request carried a cap.
    for b in mock.bodies.lock().unwrap().iter() {
        assert!(b["max_tokens"].as_u64().is_some(), "{b}");
    }
}

#[tokio::test]
async fn overrun_settlement_is_recorded_flagged_and_blocks_reservations() {
    let t = test_db().await;
    let mock = edge_mock(Usage::Overrun(50)).await;
    let k = Kernel::new(t.db.clone(), openai(&mock.base_url)).with_prices(edge_prices());

    // Tenant budget: one step reserves ~0.0015 but costs ~0.075 (the provider ignores the cap).
    let acme = tenant(&t.db, "acme", &[], Some(0.01)).await;
    let run = new_run(&t.db, &acme).await;
    let scope = RunScope::new(run, acme.clone());
    let request = ModelRequest::new(EDGE_MODEL).user("hi").max_tokens(100);
    let step = k
        .step_model(&scope, "m1", &request, ReplayPolicy::Strict)
        .await
        .expect("the paid call is recorded");
    assert!(step.cost_usd > 0.01);
    let tn = tenancy::get(&t.db, &acme).await.unwrap();
    assert_eq!(tn.spent_usd, step.cost_usd, "charged in full");
    assert_eq!(tn.status, BudgetStatus::Exceeded);
    let evs = events(&t.db, run).await;
    let overrun = of_type(&evs, "budget_overrun");
    assert_eq!(overrun.len(), 1, "{evs:?}");
    assert_eq!(overrun[0].1.as_deref(), Some("m1"));
    assert_eq!(overrun[0].2["scope"], "tenant");
    assert_eq!(overrun[0].2["limit_usd"], json!(0.01));
    // Nothing more can be reserved, even a free call.
    let err = tenancy::reserve(&t.db, &ReserveRequest::new(acme.clone(), 0.0))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::BudgetExceeded { .. }), "{err}");
    let err = k
        .step_model(&scope, "m2", &request, ReplayPolicy::Strict)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::BudgetExceeded { .. }), "{err}");
    assert_eq!(mock.bodies.lock().unwrap().len(), 1);
    let evs = events(&t.db, run).await;
    let refused = *of_type(&evs, "budget_exceeded").last().unwrap();
    assert_eq!(refused.2["scope"], "tenant");
    // The books still balance: the overrun is a real, recorded cost.
    let conn = t.db.get().await.unwrap();
    let balanced: bool = conn
        .query_one(
            "SELECT (SELECT sum(cost_usd) FROM pgcrew.cost_entries WHERE tenant_id = 'acme') = spent_usd
               FROM pgcrew.tenants WHERE id = 'acme'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(balanced);

    // A run budget: the overrun is flagged on the run's scope and the run refuses further
    // reservations while the tenant (with room left) still accepts them for other runs.
    let globex = tenant(&t.db, "globex", &[], Some(100.0)).await;
    let run2 = new_run(&t.db, &globex).await;
    tenancy::set_run_budget(&t.db, &globex, run2, Some(0.01))
        .await
        .unwrap();
    let scope2 = RunScope::new(run2, globex.clone());
    k.step_model(&scope2, "m1", &request, ReplayPolicy::Strict)
        .await
        .unwrap();
    let evs = events(&t.db, run2).await;
    let overrun = of_type(&evs, "budget_overrun");
    assert_eq!(overrun.len(), 1, "{evs:?}");
    assert_eq!(overrun[0].2["scope"], "run");
    let tn = tenancy::get(&t.db, &globex).await.unwrap();
    assert_ne!(tn.status, BudgetStatus::Exceeded);
    let err = k
        .step_model(&scope2, "m2", &request, ReplayPolicy::Strict)
        .await
        .unwrap_err();
    match &err {
        Error::RunBudgetExceeded { run, tenant, .. } => {
            assert_eq!(
                (run.as_str(), tenant.as_str()),
                (run2.to_string().as_str(), "globex")
            );
        }
        e => panic!("expected RunBudgetExceeded, got {e}"),
    }
    let evs = events(&t.db, run2).await;
    let refused = *of_type(&evs, "budget_exceeded").last().unwrap();
    assert_eq!(refused.2["scope"], "run");
    let other = new_run(&t.db, &globex).await;
    tenancy::reserve(&t.db, &ReserveRequest::new(globex.clone(), 0.5).run(other))
        .await
        .unwrap();
}

/// `settle` / `charge` report overruns to any caller (not only the kernel).
#[tokio::test]
async fn charges_past_the_limit_are_reported_by_the_settlement() {
    let (t, acme) = db_with_tenant("acme", &[], Some(1.0)).await;
    let run = new_run(&t.db, &acme).await;
    let r = tenancy::reserve(&t.db, &ReserveRequest::new(acme.clone(), 0.5).run(run))
        .await
        .unwrap();
    let mut conn = t.db.get().await.unwrap();
    let tx = conn.transaction().await.unwrap();
    let s = tenancy::settle(&tx, &r, &tenancy::CostInput::llm("m", 1, 1, 0.4))
        .await
        .unwrap();
    assert!(s.overruns.is_empty());
    tx.commit().await.unwrap();
    let s = tenancy::charge(
        &t.db,
        &acme,
        Some(run),
        &tenancy::CostInput::other(tenancy::CostCategory::Tool, 0.7),
    )
    .await
    .unwrap();
    assert_eq!(
        s.overruns,
        vec![tenancy::BudgetOverrun {
            scope: tenancy::BudgetScope::Tenant,
            limit_usd: 1.0,
            spent_usd: 1.1,
        }]
    );
    assert_eq!(s.status, BudgetStatus::Exceeded);
    // A zero cost after the overrun is not another overrun.
    let s = tenancy::charge(
        &t.db,
        &acme,
        None,
        &tenancy::CostInput::other(tenancy::CostCategory::Other, 0.0),
    )
    .await
    .unwrap();
    assert!(s.overruns.is_empty());
    assert!(
        tenancy::reserve(&t.db, &ReserveRequest::new(acme.clone(), 0.0))
            .await
            .unwrap_err()
            .is_budget_exceeded()
    );
}
