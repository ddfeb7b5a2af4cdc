//! Budgets: concurrent reservations, per-tenant and per-run limits, status changes, released reservations, degradation, exact books.

use super::*;

#[tokio::test]
async fn concurrent_model_steps_never_exceed_the_budget() {
    let t = test_db().await;
    let acme = tenant(&t.db, "acme", Some(10.0)).await;
    let runs: Vec<RunId> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(new_run(&t.db, &acme).await);
        }
        v
    };
    // Each step reserves 1.00 and really costs 0.75: 32 steps would cost 24 > 10.
    let mut handles = Vec::new();
    for i in 0..32 {
        let db = t.db.clone();
        let tenant = acme.clone();
        let run = runs[i % runs.len()];
        handles.push(tokio::spawn(model_step(db, tenant, run, i, 1.0, 0.75)));
    }
    let (mut ok, mut refused) = (0usize, 0usize);
    for h in handles {
        match h.await.unwrap() {
            Ok(c) => {
                assert_eq!(c, 0.75);
                ok += 1;
            }
            Err(Error::BudgetExceeded {
                limit_usd,
                spent_usd,
                reserved_usd,
                requested_usd,
                ..
            }) => {
                assert_eq!(limit_usd, 10.0);
                assert_eq!(requested_usd, 1.0);
                assert!(spent_usd + reserved_usd + requested_usd > limit_usd);
                refused += 1;
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!(ok + refused, 32);
    // A refusal implies more than 9 USD committed, i.e. at least 10 successful steps; the limit
    // allows at most floor(10 / 0.75) = 13.
    assert!(refused > 0);
    assert!((10..=13).contains(&ok), "ok = {ok}");
    let row = tenancy::get(&t.db, &acme).await.unwrap();
    assert!(row.spent_usd <= 10.0);
    assert_eq!(row.spent_usd, 0.75 * ok as f64);
    assert_eq!(row.reserved_usd, 0.0);
    assert_eq!(row.active_reservations, 0);
    assert!(books_balance(&t.db, &acme).await);
    // The operator query over the ledger agrees with the books.
    let spend = tenancy::spend_from_events(&t.db).await.unwrap();
    assert_eq!(spend.len(), 1);
    assert_eq!(spend[0].0, "acme");
    assert!((spend[0].1 - row.spent_usd).abs() < 1e-9);
    let conn = t.db.get().await.unwrap();
    let direct: f64 = value_on(
        &conn,
        "SELECT tenant_id, COALESCE(SUM((payload ->> 'cost_usd')::double precision), 0.0) AS spend FROM pgcrew.events WHERE event_type = 'model_completed' GROUP BY tenant_id;",
        1,
    )
    .await;
    assert!((direct - row.spent_usd).abs() < 1e-9);
    // Per-run budget columns add up to the tenant's spend.
    let runs_spent: f64 = value_on(
        &conn,
        "SELECT sum(budget_spent_usd)::float8 FROM pgcrew.runs WHERE tenant_id = 'acme'",
        0,
    )
    .await;
    assert_eq!(runs_spent, row.spent_usd);
}

#[tokio::test]
async fn one_tenants_exhaustion_does_not_affect_another() {
    let t = test_db().await;
    let a = tenant(&t.db, "a", Some(1.0)).await;
    let b = tenant(&t.db, "b", Some(1.0)).await;
    let run_a = new_run(&t.db, &a).await;
    let run_b = new_run(&t.db, &b).await;
    // Exhaust a concurrently while b works too.
    let mut handles = Vec::new();
    for i in 0..8 {
        handles.push(tokio::spawn(model_step(
            t.db.clone(),
            a.clone(),
            run_a,
            i,
            0.5,
            0.5,
        )));
    }
    for h in handles {
        let _ = h.await.unwrap();
    }
    let ta = tenancy::get(&t.db, &a).await.unwrap();
    assert_eq!(ta.spent_usd, 1.0);
    assert_eq!(ta.status, BudgetStatus::Exceeded);
    assert!(matches!(
        tenancy::reserve(&t.db, &ReserveRequest::new(a.clone(), 0.01)).await,
        Err(Error::BudgetExceeded { .. })
    ));
    // b is untouched and can spend its whole budget.
    let tb = tenancy::get(&t.db, &b).await.unwrap();
    assert_eq!((tb.spent_usd, tb.status), (0.0, BudgetStatus::Healthy));
    model_step(t.db.clone(), b.clone(), run_b, 0, 0.9, 0.9)
        .await
        .unwrap();
    assert_eq!(tenancy::get(&t.db, &b).await.unwrap().spent_usd, 0.9);
    // No cross-tenant charging: b cannot reserve or charge against a's run, nor settle a's
    // reservation.
    let err = tenancy::reserve(&t.db, &ReserveRequest::new(b.clone(), 0.01).run(run_a))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound { kind: "run", .. }), "{err}");
    let err = tenancy::charge(
        &t.db,
        &b,
        Some(run_a),
        &CostInput::other(CostCategory::Tool, 0.01),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::NotFound { kind: "run", .. }), "{err}");
    // The refused reservation left nothing behind for b.
    let tb = tenancy::get(&t.db, &b).await.unwrap();
    assert_eq!((tb.spent_usd, tb.reserved_usd), (0.9, 0.0));
    assert!(books_balance(&t.db, &a).await);
    assert!(books_balance(&t.db, &b).await);
}

#[tokio::test]
async fn per_run_budget_is_enforced_and_refusal_rolls_back() {
    let t = test_db().await;
    let acme = tenant(&t.db, "acme", Some(100.0)).await;
    let run = new_run(&t.db, &acme).await;
    tenancy::set_run_budget(&t.db, &acme, run, Some(1.0))
        .await
        .unwrap();
    let r1 = tenancy::reserve(&t.db, &ReserveRequest::new(acme.clone(), 0.6).run(run))
        .await
        .unwrap();
    let err = tenancy::reserve(&t.db, &ReserveRequest::new(acme.clone(), 0.6).run(run))
        .await
        .unwrap_err();
    assert!(err.is_budget_exceeded());
    match &err {
        Error::RunBudgetExceeded {
            tenant: who,
            run: which,
            limit_usd,
            reserved_usd,
            ..
        } => {
            assert_eq!(
                (who.as_str(), which.as_str()),
                ("acme", run.to_string().as_str())
            );
            assert_eq!((*limit_usd, *reserved_usd), (1.0, 0.6));
        }
        e => panic!("unexpected {e}"),
    }
    // The tenant row did not keep the refused reservation.
    assert_eq!(tenancy::get(&t.db, &acme).await.unwrap().reserved_usd, 0.6);
    // Releasing frees both budgets.
    assert!(tenancy::release(&t.db, &r1).await.unwrap());
    assert!(!tenancy::release(&t.db, &r1).await.unwrap());
    let tr = tenancy::get(&t.db, &acme).await.unwrap();
    assert_eq!((tr.reserved_usd, tr.spent_usd), (0.0, 0.0));
    tenancy::reserve(&t.db, &ReserveRequest::new(acme.clone(), 1.0).run(run))
        .await
        .unwrap();
    // A run of another tenant cannot get a budget through this tenant.
    let other = tenant(&t.db, "other", None).await;
    assert!(matches!(
        tenancy::set_run_budget(&t.db, &other, run, Some(5.0)).await,
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        tenancy::set_run_budget(&t.db, &acme, run, Some(f64::NAN)).await,
        Err(Error::InvalidInput { .. })
    ));
}

#[tokio::test]
async fn budget_status_transitions_are_notified() {
    let t = test_db().await;
    let ctx = TenantContext::new("acme").unwrap().budget_usd(Some(10.0));
    tenancy::upsert(&t.db, &ctx).await.unwrap();
    let acme = tid("acme");
    let (client, _task, mut rx) = Db::connect_dedicated(t.db.config()).await.unwrap();
    client
        .batch_execute("LISTEN pgcrew_budget_status_changed")
        .await
        .unwrap();
    let charge = |usd: f64| {
        let db = t.db.clone();
        let acme = acme.clone();
        async move {
            tenancy::charge(&db, &acme, None, &CostInput::other(CostCategory::Tool, usd))
                .await
                .unwrap()
                .status
        }
    };
    assert_eq!(charge(7.9).await, BudgetStatus::Healthy);
    assert_eq!(charge(0.1).await, BudgetStatus::Warning); // 8.0 = 80 %
    assert_eq!(charge(0.5).await, BudgetStatus::Warning); // no change, no notification
    assert_eq!(charge(0.5).await, BudgetStatus::Critical); // 9.0
    assert_eq!(charge(1.0).await, BudgetStatus::Exceeded); // 10.0
    // Raising the limit recomputes the status.
    tenancy::upsert(&t.db, &ctx.clone().budget_usd(Some(100.0)))
        .await
        .unwrap();
    // Custom thresholds: warning at 10 %.
    tenancy::upsert(
        &t.db,
        &ctx.clone()
            .budget_usd(Some(100.0))
            .thresholds(BudgetThresholds::new(0.1, 0.5).unwrap()),
    )
    .await
    .unwrap();
    // One notification per change (WARNING, CRITICAL, EXCEEDED, HEALTHY, WARNING), none for
    // the charge that left the status as it was; the payload names no tenant and no status.
    let expected = 5;
    let mut seen = Vec::new();
    let got_all = eventually(Duration::from_secs(5), || {
        while let Ok(msg) = rx.try_recv() {
            if let tokio_postgres::AsyncMessage::Notification(n) = msg {
                match Event::parse(n.channel(), n.payload()) {
                    Some(Event::BudgetStatusChanged) => seen.push(n.payload().to_string()),
                    other => panic!("unexpected notification {other:?}"),
                }
            }
        }
        let done = seen.len() >= expected;
        async move { done }
    })
    .await;
    assert!(got_all, "saw {seen:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    while let Ok(msg) = rx.try_recv() {
        if let tokio_postgres::AsyncMessage::Notification(n) = msg {
            seen.push(n.payload().to_string());
        }
    }
    assert_eq!(seen, vec!["{}"; expected]);
    let snap = tenancy::budget_status(&t.db, &acme).await.unwrap();
    assert_eq!(snap.status, BudgetStatus::Warning);
    assert_eq!(snap.spent_usd, 10.0);
    assert_eq!(snap.used_pct, Some(10.0));
    assert_eq!(snap.remaining_usd, Some(90.0));
}

#[tokio::test]
async fn maintenance_releases_reservations_of_dead_instances() {
    let t = test_db().await;
    let acme = tenant(&t.db, "acme", Some(10.0)).await;
    let info = |id: &str| InstanceInfo {
        id: InstanceId::new(id).unwrap(),
        hostname: "h".into(),
        pid: 1,
        version: "t".into(),
        metadata: serde_json::json!({}),
        agents: vec![],
        tools: vec![],
    };
    instance::register(&t.db, &info("dead")).await.unwrap();
    instance::register(&t.db, &info("alive")).await.unwrap();
    let dead = tenancy::reserve(
        &t.db,
        &ReserveRequest::new(acme.clone(), 4.0).instance(InstanceId::new("dead").unwrap()),
    )
    .await
    .unwrap();
    let alive = tenancy::reserve(
        &t.db,
        &ReserveRequest::new(acme.clone(), 3.0).instance(InstanceId::new("alive").unwrap()),
    )
    .await
    .unwrap();
    // 7 reserved: a 4 USD call does not fit.
    assert!(matches!(
        tenancy::reserve(&t.db, &ReserveRequest::new(acme.clone(), 4.0)).await,
        Err(Error::BudgetExceeded { .. })
    ));
    let step = ReleaseOrphanedReservations::default();
    assert_eq!(run_step(&t.db, &step).await, 0, "both instances are alive");
    instance::deregister(&t.db, &InstanceId::new("dead").unwrap())
        .await
        .unwrap();
    assert_eq!(run_step(&t.db, &step).await, 1);
    let row = tenancy::get(&t.db, &acme).await.unwrap();
    assert_eq!((row.reserved_usd, row.active_reservations), (3.0, 1));
    tenancy::reserve(&t.db, &ReserveRequest::new(acme.clone(), 4.0))
        .await
        .unwrap();
    // The presumed-dead instance comes back and settles: the cost is charged, nothing is
    // released twice.
    let mut conn = t.db.get().await.unwrap();
    let tx = conn.transaction().await.unwrap();
    let s = tenancy::settle(&tx, &dead, &CostInput::llm("m", 1, 1, 2.0))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert!(!s.released);
    assert_eq!((s.tenant_spent_usd, s.tenant_reserved_usd), (2.0, 7.0));
    // Age-based release catches reservations of live instances that are too old.
    let by_age = ReleaseOrphanedReservations {
        max_age: Some(Duration::from_millis(1)),
    };
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(run_step(&t.db, &by_age).await, 2);
    let row = tenancy::get(&t.db, &acme).await.unwrap();
    assert_eq!((row.reserved_usd, row.active_reservations), (0.0, 0));
    assert!(!tenancy::release(&t.db, &alive).await.unwrap());
    assert!(books_balance(&t.db, &acme).await);
    assert_eq!(tenancy::maintenance_steps().len(), 1);
}

#[tokio::test]
async fn degradation_decisions_follow_the_tenant_status() {
    let t = test_db().await;
    let policy = DegradationPolicy::default()
        .rule(
            BudgetStatus::Warning,
            DegradationAction::SwitchModel {
                from: None,
                to: "gpt-4o-mini".into(),
            },
        )
        .rule(
            BudgetStatus::Critical,
            DegradationAction::CapMaxTokens { max_tokens: 200 },
        )
        .rule(BudgetStatus::Exceeded, DegradationAction::SkipOptional);
    let ctx = TenantContext::new("acme")
        .unwrap()
        .budget_usd(Some(10.0))
        .degradation(policy.clone());
    tenancy::upsert(&t.db, &ctx).await.unwrap();
    let acme = tid("acme");
    assert_eq!(
        tenancy::get(&t.db, &acme)
            .await
            .unwrap()
            .context
            .degradation,
        policy
    );
    let req = StepRequest {
        model: "gpt-4o".into(),
        max_tokens: 1000,
        optional: true,
    };
    let d = tenancy::decide_for_tenant(&t.db, &acme, &req)
        .await
        .unwrap();
    assert!(!d.degraded());
    assert_eq!(d.model, "gpt-4o");
    let charge = |usd: f64| {
        let db = t.db.clone();
        let acme = acme.clone();
        async move {
            tenancy::charge(&db, &acme, None, &CostInput::llm("gpt-4o", 1, 1, usd))
                .await
                .unwrap();
        }
    };
    charge(8.5).await;
    let d = tenancy::decide_for_tenant(&t.db, &acme, &req)
        .await
        .unwrap();
    assert_eq!(
        (d.status, d.model.as_str(), d.max_tokens, d.skip),
        (BudgetStatus::Warning, "gpt-4o-mini", 1000, false)
    );
    assert!(d.reason.contains("WARNING"), "{}", d.reason);
    charge(1.0).await;
    let d = tenancy::decide_for_tenant(&t.db, &acme, &req)
        .await
        .unwrap();
    assert_eq!(
        (d.model.as_str(), d.max_tokens, d.skip),
        ("gpt-4o-mini", 200, false)
    );
    charge(0.5).await;
    let d = tenancy::decide_for_tenant(&t.db, &acme, &req)
        .await
        .unwrap();
    assert!(d.skip);
    let d = tenancy::decide_for_tenant(
        &t.db,
        &acme,
        &StepRequest {
            optional: false,
            ..req
        },
    )
    .await
    .unwrap();
    assert!(!d.skip);
}

/// Books stay exact under sustained concurrent reserve/settle load; prints the rate (no timed
/// assertion).
#[tokio::test]
async fn sustained_reserve_settle_keeps_books_exact() {
    let t = test_db().await;
    let acme = tenant(&t.db, "acme", Some(1_000_000.0)).await;
    let run = new_run(&t.db, &acme).await;
    let (workers, per_worker) = (4usize, 250usize);
    let started = std::time::Instant::now();
    let mut handles = Vec::new();
    for w in 0..workers {
        let db = t.db.clone();
        let acme = acme.clone();
        handles.push(tokio::spawn(async move {
            for i in 0..per_worker {
                let r = tenancy::reserve(&db, &ReserveRequest::new(acme.clone(), 0.002).run(run))
                    .await
                    .unwrap();
                let mut conn = db.get().await.unwrap();
                let tx = conn.transaction().await.unwrap();
                tenancy::settle(
                    &tx,
                    &r,
                    &CostInput::llm("gpt-4o-mini", 10, 10, 0.0012345678901)
                        .step(format!("w{w}-{i}")),
                )
                .await
                .unwrap();
                tx.commit().await.unwrap();
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let elapsed = started.elapsed();
    let n = workers * per_worker;
    eprintln!(
        "reserve+settle: {n} cycles with {workers} workers in {elapsed:?} = {:.0} cycles/s",
        n as f64 / elapsed.as_secs_f64()
    );
    let row = tenancy::get(&t.db, &acme).await.unwrap();
    // Each cost is rounded once to 10 decimals: 0.0012345679 x 1000.
    let conn = t.db.get().await.unwrap();
    let exact: bool = value_on(
        &conn,
        "SELECT spent_usd = 1000 * 0.0012345679 AND reserved_usd = 0 FROM pgcrew.tenants WHERE id = 'acme'",
        0,
    )
    .await;
    assert!(
        exact,
        "spent {} reserved {}",
        row.spent_usd, row.reserved_usd
    );
    assert!(books_balance(&t.db, &acme).await);
}
