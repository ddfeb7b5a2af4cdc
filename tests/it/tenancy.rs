//! Tenancy: tenants, capabilities, budgets (reserve/settle), costs, status, degradation, RLS.

use std::sync::Arc;
use std::time::Duration;

use pgcrew::coord::instance::{self, InstanceInfo};
use pgcrew::coord::maintenance::{MaintenanceContext, MaintenanceStep};
use pgcrew::db::Db;
use pgcrew::tenancy::{
    self, BudgetStatus, BudgetThresholds, CostCategory, CostFilter, CostInput, DegradationAction,
    DegradationPolicy, PriceTable, ReleaseOrphanedReservations, ReserveRequest, StepRequest,
    TenantContext,
};
use pgcrew::{ClientConfig, Error, Event, InstanceId, RunId, TenantId};

use crate::common::{eventually, scalar_on, test_db};

fn tid(s: &str) -> TenantId {
    TenantId::new(s).unwrap()
}

async fn tenant(db: &Db, id: &str, budget: Option<f64>) -> TenantId {
    let ctx = TenantContext::new(id).unwrap().budget_usd(budget);
    tenancy::upsert(db, &ctx).await.unwrap();
    tid(id)
}

/// Tests may create runs directly (the runs API belongs to another module).
async fn new_run(db: &Db, tenant: &TenantId) -> RunId {
    let run = RunId::new();
    let conn = db.get().await.unwrap();
    conn.execute(
        "INSERT INTO pgcrew.runs (id, tenant_id, state) VALUES ($1, $2, 'running')",
        &[&run, tenant],
    )
    .await
    .unwrap();
    run
}

/// `sum(cost_entries) = spent_usd` compared as numeric (exact), and reserved_usd = sum of open
/// reservations.
async fn books_balance(db: &Db, tenant: &TenantId) -> bool {
    let conn = db.get().await.unwrap();
    conn.query_one(
        "SELECT (SELECT coalesce(sum(cost_usd), 0) FROM pgcrew.cost_entries WHERE tenant_id = t.id) = t.spent_usd
            AND (SELECT coalesce(sum(amount_usd), 0) FROM pgcrew.budget_reservations WHERE tenant_id = t.id) = t.reserved_usd
         FROM pgcrew.tenants t WHERE t.id = $1",
        &[tenant],
    )
    .await
    .unwrap()
    .get(0)
}

fn maintenance_ctx() -> MaintenanceContext {
    MaintenanceContext {
        config: Arc::new(ClientConfig::default()),
        instance_id: InstanceId::new("leader").unwrap(),
        lease: "pgcrew".into(),
        term: 1,
    }
}

async fn run_step(db: &Db, step: &dyn MaintenanceStep) -> u64 {
    let mut conn = db.get().await.unwrap();
    let tx = conn.transaction().await.unwrap();
    let n = step.run(&tx, &maintenance_ctx()).await.unwrap();
    tx.commit().await.unwrap();
    n
}

/// One "model step" as the kernel will do it: reserve the worst case, call the model, then in
/// one transaction append `model_completed` (payload carries cost_usd) and settle.
async fn model_step(
    db: Db,
    tenant: TenantId,
    run: RunId,
    step: usize,
    estimate: f64,
    actual: f64,
) -> pgcrew::Result<f64> {
    let reservation = tenancy::reserve(
        &db,
        &ReserveRequest::new(tenant.clone(), estimate)
            .run(run)
            .model("gpt-4o-mini"),
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(fastrand::u64(1..20))).await;
    let mut conn = db.get().await?;
    let tx = conn.transaction().await?;
    let cost = CostInput::llm("gpt-4o-mini", 1000, 500, actual).step(format!("step-{step}"));
    let s = tenancy::settle_in_tx(&tx, &reservation, &cost).await?;
    assert!(s.released);
    let payload = serde_json::json!({"cost_usd": s.cost_usd, "model": "gpt-4o-mini"});
    tx.query(
        "SELECT * FROM pgcrew.append_events($1, NULL, ARRAY['model_completed'], ARRAY[$2::text], ARRAY[$3::jsonb], ARRAY[false])",
        &[&run, &format!("step-{step}"), &payload],
    )
    .await?;
    tx.commit().await?;
    Ok(s.cost_usd)
}

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
    let direct: f64 = conn
        .query_one(
            "SELECT tenant_id, COALESCE(SUM((payload ->> 'cost_usd')::double precision), 0.0) AS spend FROM pgcrew.events WHERE event_type = 'model_completed' GROUP BY tenant_id;",
            &[],
        )
        .await
        .unwrap()
        .get(1);
    assert!((direct - row.spent_usd).abs() < 1e-9);
    // Per-run budget columns add up to the tenant's spend.
    let runs_spent: f64 = conn
        .query_one(
            "SELECT sum(budget_spent_usd)::float8 FROM pgcrew.runs WHERE tenant_id = 'acme'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
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
async fn rls_hides_other_tenants_rows() {
    let t = test_db().await;
    let a = tenant(&t.db, "tenant-a", None).await;
    let b = tenant(&t.db, "tenant-b", None).await;
    let run_a = new_run(&t.db, &a).await;
    let run_b = new_run(&t.db, &b).await;
    for (tenant, run) in [(&a, run_a), (&b, run_b)] {
        tenancy::charge(
            &t.db,
            tenant,
            Some(run),
            &CostInput::llm("gpt-4o", 10, 10, 0.5),
        )
        .await
        .unwrap();
        tenancy::reserve(&t.db, &ReserveRequest::new(tenant.clone(), 0.1).run(run))
            .await
            .unwrap();
        let conn = t.db.get().await.unwrap();
        conn.execute(
            "INSERT INTO pgcrew.tasks (queue, kind, tenant_id, run_id) VALUES ('q', 'k', $1, $2)",
            &[tenant, &run],
        )
        .await
        .unwrap();
        conn.execute(
            "INSERT INTO pgcrew.artifacts (run_id, key, version, value) VALUES ($1, 'k', 1, '{}')",
            &[&run],
        )
        .await
        .unwrap();
        conn.execute(
            "INSERT INTO pgcrew.summaries (run_id, summary_type, content_text) VALUES ($1, 's', 'x')",
            &[&run],
        )
        .await
        .unwrap();
        conn.execute(
            "INSERT INTO pgcrew.sessions (id, tenant_id, identifier) VALUES ($1, $2, 'chat')",
            &[&uuid::Uuid::new_v4(), tenant],
        )
        .await
        .unwrap();
        conn.query(
            "SELECT * FROM pgcrew.append_events($1, NULL, ARRAY['model_completed'], ARRAY['s1'], ARRAY['{\"cost_usd\": 0.5}'::jsonb], ARRAY[false])",
            &[&run],
        )
        .await
        .unwrap();
    }
    // A role of our own (roles are cluster-wide: unique name), not the owner.
    let role = format!("reader_{}", uuid::Uuid::new_v4().simple());
    let conn = t.db.get().await.unwrap();
    conn.batch_execute(&format!("CREATE ROLE {role} LOGIN PASSWORD 'pw'"))
        .await
        .unwrap();
    let granted = tenancy::grant_tenant_access(&t.db, &role).await.unwrap();
    for table in [
        "runs",
        "events",
        "cost_entries",
        "tenants",
        "tenant_costs",
        "budget_status",
        "tasks",
        "artifacts",
        "summaries",
        "sessions",
    ] {
        assert!(
            granted.iter().any(|g| g == table),
            "{table} not in {granted:?}"
        );
    }
    let mut cfg = t.db.config().clone();
    cfg.user(&role).password("pw");
    let (client, conn_task) = {
        let (c, connection) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
        (c, tokio::spawn(connection))
    };
    let count = |sql: &'static str| {
        let client = &client;
        async move { client.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    // No setting: nothing at all.
    assert_eq!(count("SELECT count(*) FROM pgcrew.runs").await, 0);
    assert_eq!(count("SELECT count(*) FROM pgcrew.tenants").await, 0);
    // The old way (a setting) binds nothing any more.
    client
        .batch_execute("SET pgcrew.tenant_id = 'tenant-a'")
        .await
        .unwrap();
    assert_eq!(count("SELECT count(*) FROM pgcrew.runs").await, 0);
    // The protected mapping does.
    let tenant_a = TenantId::new("tenant-a").unwrap();
    tenancy::grant_tenant_role(&t.db, &role, &tenant_a)
        .await
        .unwrap();
    let checks = [
        "SELECT count(*) FROM pgcrew.runs",
        "SELECT count(*) FROM pgcrew.events",
        "SELECT count(*) FROM pgcrew.cost_entries",
        "SELECT count(*) FROM pgcrew.budget_reservations",
        "SELECT count(*) FROM pgcrew.tenants",
        "SELECT count(*) FROM pgcrew.tenant_costs",
        "SELECT count(*) FROM pgcrew.budget_status",
        "SELECT count(*) FROM pgcrew.tasks",
        "SELECT count(*) FROM pgcrew.artifacts",
        "SELECT count(*) FROM pgcrew.summaries",
        "SELECT count(*) FROM pgcrew.sessions",
    ];
    for sql in checks {
        assert_eq!(count(sql).await, 1, "{sql}");
    }
    let foreign = [
        "SELECT count(*) FROM pgcrew.tasks WHERE tenant_id <> 'tenant-a'",
        "SELECT count(*) FROM pgcrew.sessions WHERE tenant_id <> 'tenant-a'",
        "SELECT count(*) FROM pgcrew.runs WHERE tenant_id <> 'tenant-a'",
        "SELECT count(*) FROM pgcrew.events WHERE tenant_id <> 'tenant-a'",
        "SELECT count(*) FROM pgcrew.cost_entries WHERE tenant_id <> 'tenant-a'",
        "SELECT count(*) FROM pgcrew.budget_reservations WHERE tenant_id <> 'tenant-a'",
        "SELECT count(*) FROM pgcrew.tenant_costs WHERE tenant_id <> 'tenant-a'",
        "SELECT count(*) FROM pgcrew.budget_status WHERE tenant_id <> 'tenant-a'",
    ];
    for sql in foreign {
        assert_eq!(count(sql).await, 0, "{sql}");
    }
    let spend: Vec<(String, f64)> = client
        .query(
            "SELECT tenant_id, COALESCE(SUM((payload ->> 'cost_usd')::double precision), 0.0) AS spend FROM pgcrew.events WHERE event_type = 'model_completed' GROUP BY tenant_id;",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(spend, vec![("tenant-a".to_string(), 0.5)]);
    // The reader cannot write.
    assert!(
        client
            .execute("UPDATE pgcrew.tenants SET spent_usd = 0", &[])
            .await
            .is_err()
    );
    // The owner still sees everything.
    let all = scalar_on(&conn, "SELECT count(*) FROM pgcrew.runs").await;
    assert_eq!(all, 2);
    drop(client);
    let _ = conn_task.await;
    conn.batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
        .await
        .unwrap();
}

#[tokio::test]
async fn capability_checks() {
    let t = test_db().await;
    let ctx =
        TenantContext::new("acme")
            .unwrap()
            .capabilities(["web_search", "web_search", "email"]);
    assert!(tenancy::upsert(&t.db, &ctx).await.unwrap());
    let acme = tid("acme");
    let stored = tenancy::get(&t.db, &acme).await.unwrap();
    assert_eq!(stored.context.capabilities, vec!["email", "web_search"]);
    tenancy::require_capability(&t.db, &acme, "search", Some("web_search"))
        .await
        .unwrap();
    tenancy::require_capability(&t.db, &acme, "clock", None)
        .await
        .unwrap();
    let err = tenancy::require_capability(&t.db, &acme, "shell", Some("exec"))
        .await
        .unwrap_err();
    match &err {
        Error::CapabilityDenied {
            tenant,
            capability,
            tool,
        } => assert_eq!(
            (tenant.as_str(), capability.as_str(), tool.as_str()),
            ("acme", "exec", "shell")
        ),
        e => panic!("unexpected {e}"),
    }
    assert!(err.to_string().contains("lacks `exec`"), "{err}");
    // In the caller's transaction (where the kernel records the audit event).
    let mut conn = t.db.get().await.unwrap();
    let tx = conn.transaction().await.unwrap();
    assert!(matches!(
        tenancy::require_capability_in_tx(&tx, &acme, "shell", Some("exec")).await,
        Err(Error::CapabilityDenied { .. })
    ));
    assert!(matches!(
        tenancy::require_capability_in_tx(&tx, &tid("ghost"), "shell", Some("exec")).await,
        Err(Error::NotFound { kind: "tenant", .. })
    ));
    tx.rollback().await.unwrap();
    assert!(stored.context.check_capability("x", Some("email")).is_ok());
    assert!(stored.context.check_capability("x", Some("root")).is_err());
}

#[tokio::test]
async fn unknown_model_price_is_a_clear_error() {
    let prices = PriceTable::builtin();
    let err = prices
        .worst_case_cost("mystery-model", 100, 100)
        .unwrap_err();
    assert!(matches!(err, Error::UnknownModelPrice(ref m) if m == "mystery-model"));
    assert!(err.to_string().contains("mystery-model"));
    let prices = prices.with("mystery-model", 1.0, 2.0).unwrap();
    assert_eq!(
        prices
            .worst_case_cost("mystery-model", 1_000_000, 1_000_000)
            .unwrap(),
        3.0
    );
}

#[tokio::test]
async fn invalid_input_is_rejected_and_changes_nothing() {
    let t = test_db().await;
    let acme = tenant(&t.db, "acme", Some(5.0)).await;
    let before = tenancy::get(&t.db, &acme).await.unwrap();

    for bad in [-1.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 1e12] {
        let ctx = before.context.clone().budget_usd(Some(bad));
        let err = tenancy::upsert(&t.db, &ctx).await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidInput {
                    field: "budget_usd_limit",
                    ..
                }
            ),
            "{bad}: {err}"
        );
    }
    let err = TenantContext::new("").unwrap_err();
    assert!(err.to_string().contains("must not be empty"), "{err}");
    let err = TenantContext::new("x".repeat(129)).unwrap_err();
    assert!(err.to_string().contains("at most 128"), "{err}");
    assert!(TenantContext::new("x".repeat(128)).is_ok());
    let bad_limits = before.context.clone().limits(Some(0), None);
    assert!(matches!(
        tenancy::upsert(&t.db, &bad_limits).await,
        Err(Error::InvalidInput {
            field: "max_concurrent_runs",
            ..
        })
    ));
    let mut bad_thresholds = before.context.clone();
    bad_thresholds.thresholds = BudgetThresholds {
        warning: 0.95,
        critical: 0.9,
    };
    assert!(tenancy::upsert(&t.db, &bad_thresholds).await.is_err());
    let bad_caps = before.context.clone().capabilities([""]);
    assert!(tenancy::upsert(&t.db, &bad_caps).await.is_err());
    // Reservations and costs with bad amounts.
    for bad in [-0.5, f64::NAN, f64::INFINITY] {
        assert!(matches!(
            tenancy::reserve(&t.db, &ReserveRequest::new(acme.clone(), bad)).await,
            Err(Error::InvalidInput { .. })
        ));
        assert!(matches!(
            tenancy::charge(
                &t.db,
                &acme,
                None,
                &CostInput::other(CostCategory::Other, bad)
            )
            .await,
            Err(Error::InvalidInput { .. })
        ));
    }
    // Unknown tenant.
    assert!(matches!(
        tenancy::reserve(&t.db, &ReserveRequest::new(tid("ghost"), 0.1)).await,
        Err(Error::NotFound { kind: "tenant", .. })
    ));
    let after = tenancy::get(&t.db, &acme).await.unwrap();
    assert_eq!(after.context, before.context);
    assert_eq!((after.spent_usd, after.reserved_usd), (0.0, 0.0));
    assert_eq!(after.updated_at, before.updated_at);
    assert_eq!(tenancy::list(&t.db).await.unwrap().len(), 2); // default + acme
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
    let s = tenancy::settle_in_tx(&tx, &dead, &CostInput::llm("m", 1, 1, 2.0))
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

#[tokio::test]
async fn cost_breakdown_by_tenant_model_category_and_day() {
    let t = test_db().await;
    let a = tenant(&t.db, "a", None).await;
    let b = tenant(&t.db, "b", None).await;
    tenancy::charge(&t.db, &a, None, &CostInput::llm("gpt-4o", 100, 50, 0.25))
        .await
        .unwrap();
    tenancy::charge(&t.db, &a, None, &CostInput::llm("gpt-4o", 10, 5, 0.125))
        .await
        .unwrap();
    tenancy::charge(&t.db, &a, None, &CostInput::llm("gpt-4o-mini", 1, 1, 0.01))
        .await
        .unwrap();
    tenancy::charge(
        &t.db,
        &a,
        None,
        &CostInput::other(CostCategory::Retrieval, 0.02),
    )
    .await
    .unwrap();
    tenancy::charge(
        &t.db,
        &b,
        None,
        &CostInput::other(CostCategory::Storage, 1.0),
    )
    .await
    .unwrap();
    let rows = tenancy::cost_breakdown(&t.db, &CostFilter::tenant(a.clone()))
        .await
        .unwrap();
    let key: Vec<(&str, &str, i64, i64, i64, f64)> = rows
        .iter()
        .map(|r| {
            (
                r.category.as_str(),
                r.model.as_str(),
                r.entries,
                r.prompt_tokens,
                r.completion_tokens,
                r.cost_usd,
            )
        })
        .collect();
    assert_eq!(
        key,
        vec![
            ("llm", "gpt-4o", 2, 110, 55, 0.375),
            ("llm", "gpt-4o-mini", 1, 1, 1, 0.01),
            ("retrieval", "", 1, 0, 0, 0.02),
        ]
    );
    let today = chrono::Utc::now().date_naive();
    assert!(
        rows.iter()
            .all(|r| r.tenant_id == "a" && (r.day - today).num_days().abs() <= 1)
    );
    let all = tenancy::cost_breakdown(&t.db, &CostFilter::default())
        .await
        .unwrap();
    assert_eq!(all.len(), 4);
    let future = today + chrono::Days::new(2);
    let none = tenancy::cost_breakdown(
        &t.db,
        &CostFilter {
            since: Some(future),
            ..CostFilter::default()
        },
    )
    .await
    .unwrap();
    assert!(none.is_empty());
    assert!(
        tenancy::cost_breakdown(
            &t.db,
            &CostFilter {
                since: Some(future),
                until: Some(today),
                ..CostFilter::default()
            }
        )
        .await
        .is_err()
    );
}

#[tokio::test]
async fn cli_tenants_set_list_show() {
    let t = test_db().await;
    let run = |args: &[&str]| {
        std::process::Command::new(crate::common::pgcrew_bin())
            .args(args)
            .env("DATABASE_URL", t.dsn())
            .output()
            .unwrap()
    };
    let out = run(&[
        "tenants",
        "set",
        "acme",
        "--capabilities",
        "web,email",
        "--budget-usd",
        "12.5",
        "--max-concurrent-runs",
        "3",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("created tenant acme"));
    // Partial update keeps the other settings.
    let out = run(&[
        "tenants",
        "set",
        "acme",
        "--warning-threshold",
        "0.5",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tenant_id"], "acme");
    assert_eq!(v["budget_usd_limit"], 12.5);
    assert_eq!(v["max_concurrent_runs"], 3);
    assert_eq!(v["thresholds"]["warning"], 0.5);
    assert_eq!(v["capabilities"], serde_json::json!(["email", "web"]));
    // Bad input: clear error, exit 2, nothing changed.
    for bad in [
        vec!["tenants", "set", "acme", "--budget-usd", "-1"],
        vec!["tenants", "set", "acme", "--budget-usd", "NaN"],
        vec!["tenants", "set", ""],
        vec!["tenants", "set", "acme", "--critical-threshold", "0.2"],
    ] {
        let out = run(&bad);
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("invalid"),
            "{bad:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let long = "x".repeat(129);
    let out = run(&["tenants", "set", &long]);
    assert_eq!(out.status.code(), Some(2));
    tenancy::charge(
        &t.db,
        &tid("acme"),
        None,
        &CostInput::llm("gpt-4o", 5, 5, 1.5),
    )
    .await
    .unwrap();
    let out = run(&["tenants", "show", "acme", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tenant"]["budget_usd_limit"], 12.5);
    assert_eq!(v["budget"]["spent_usd"], 1.5);
    assert_eq!(v["budget"]["status"], "HEALTHY");
    assert_eq!(v["costs"][0]["model"], "gpt-4o");
    let out = run(&["tenants", "show", "acme"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("capabilities:  email, web"));
    let out = run(&["tenants", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    let out = run(&["tenants", "list"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("acme") && text.contains("default"), "{text}");
    let out = run(&["tenants", "show", "ghost"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tenant not found: ghost"));
    let stored = tenancy::get(&t.db, &tid("acme")).await.unwrap();
    assert_eq!(stored.context.budget_usd_limit, Some(12.5));
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
                tenancy::settle_in_tx(
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
    let exact: bool = conn
        .query_one(
            "SELECT spent_usd = 1000 * 0.0012345679 AND reserved_usd = 0 FROM pgcrew.tenants WHERE id = 'acme'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        exact,
        "spent {} reserved {}",
        row.spent_usd, row.reserved_usd
    );
    assert!(books_balance(&t.db, &acme).await);
}
